//! Mutual authentication with a shared secret: the messages and the HMAC computations of the
//! challenge-response that runs before `Hello` when both daemons have `--secret-file` (no
//! I/O here; the exchange itself lives in the daemons' transport code).
//!
//! ```text
//! master -> slave  AuthRequest   (frame 20)  version u16
//! slave  -> master AuthChallenge (frame 21)  Ns [32]
//! master -> slave  AuthResponse  (frame 22)  Nm [32], HMAC-SHA256(secret, MASTER_LABEL || Ns || Nm)
//! slave  -> master AuthOk        (frame 23)  HMAC-SHA256(secret, SLAVE_LABEL || Nm || Ns)
//! ```
//!
//! The master proves first, so an unauthenticated peer never gets the slave to compute a MAC
//! for it. Both nonces are fresh random 32-byte values, so a recorded response is worthless
//! on a later connection (its MAC covers the other side's nonce). The two directions use
//! distinct labels, so a slave's proof can never be reflected back as a master's. MACs are
//! compared in constant time ([`verify_master`], [`verify_slave`]). The secret itself never
//! crosses the wire. A slave that rejects the response sends `Refuse` ("authentication
//! failed") and closes.

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::wire::{DecodeError, Reader, Writer};

type HmacSha256 = hmac::Hmac<Sha256>;

/// Length of each side's nonce.
pub const NONCE_LEN: usize = 32;
/// Length of a MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Version of this exchange, carried in [`AuthRequest`].
pub const AUTH_VERSION: u16 = 1;
/// Largest payload of any auth frame: readers refuse bigger ones before allocating.
pub const MAX_AUTH_PAYLOAD: usize = 256;

/// Prefix of the master's MAC input.
pub const MASTER_LABEL: &[u8] = b"tdfs-auth-v1 master";
/// Prefix of the slave's MAC input.
pub const SLAVE_LABEL: &[u8] = b"tdfs-auth-v1 slave";

pub type Nonce = [u8; NONCE_LEN];
pub type Tag = [u8; MAC_LEN];

/// master -> slave: "I want to authenticate" (frame type `AuthRequest`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthRequest {
    pub version: u16,
}

/// slave -> master: the slave's fresh nonce Ns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthChallenge {
    pub nonce: Nonce,
}

/// master -> slave: the master's fresh nonce Nm and its proof over (Ns, Nm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthResponse {
    pub nonce: Nonce,
    pub mac: Tag,
}

/// slave -> master: the slave's proof over (Nm, Ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthOk {
    pub mac: Tag,
}

impl AuthRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2);
        Writer { out: &mut out }.u16(self.version);
        out
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let v = AuthRequest {
            version: r.u16("auth version")?,
        };
        r.finish()?;
        Ok(v)
    }
}

impl AuthChallenge {
    pub fn encode(&self) -> Vec<u8> {
        self.nonce.to_vec()
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let v = AuthChallenge {
            nonce: r.array("slave nonce")?,
        };
        r.finish()?;
        Ok(v)
    }
}

impl AuthResponse {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(NONCE_LEN + MAC_LEN);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.mac);
        out
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let v = AuthResponse {
            nonce: r.array("master nonce")?,
            mac: r.array("master mac")?,
        };
        r.finish()?;
        Ok(v)
    }
}

impl AuthOk {
    pub fn encode(&self) -> Vec<u8> {
        self.mac.to_vec()
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let v = AuthOk {
            mac: r.array("slave mac")?,
        };
        r.finish()?;
        Ok(v)
    }
}

fn hmac(secret: &[u8], label: &[u8], first: &Nonce, second: &Nonce) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(label);
    m.update(first);
    m.update(second);
    m
}

/// The master's proof: HMAC(secret, MASTER_LABEL || Ns || Nm).
pub fn master_mac(secret: &[u8], slave_nonce: &Nonce, master_nonce: &Nonce) -> Tag {
    hmac(secret, MASTER_LABEL, slave_nonce, master_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// The slave's proof: HMAC(secret, SLAVE_LABEL || Nm || Ns).
pub fn slave_mac(secret: &[u8], master_nonce: &Nonce, slave_nonce: &Nonce) -> Tag {
    hmac(secret, SLAVE_LABEL, master_nonce, slave_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a master's proof in constant time.
pub fn verify_master(secret: &[u8], slave_nonce: &Nonce, resp: &AuthResponse) -> bool {
    hmac(secret, MASTER_LABEL, slave_nonce, &resp.nonce)
        .verify_slice(&resp.mac)
        .is_ok()
}

/// Checks a slave's proof in constant time.
pub fn verify_slave(secret: &[u8], master_nonce: &Nonce, slave_nonce: &Nonce, ok: &AuthOk) -> bool {
    hmac(secret, SLAVE_LABEL, master_nonce, slave_nonce)
        .verify_slice(&ok.mac)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_verify() {
        let secret = b"correct horse battery staple";
        let ns = [1u8; 32];
        let nm = [2u8; 32];
        let resp = AuthResponse {
            nonce: nm,
            mac: master_mac(secret, &ns, &nm),
        };
        assert_eq!(AuthResponse::decode(&resp.encode()).unwrap(), resp);
        assert!(verify_master(secret, &ns, &resp));
        // Wrong secret, other slave nonce (a replay), or a flipped bit: refused.
        assert!(!verify_master(b"wrong", &ns, &resp));
        assert!(!verify_master(secret, &[3u8; 32], &resp));
        let mut bad = resp;
        bad.mac[0] ^= 1;
        assert!(!verify_master(secret, &ns, &bad));

        let ok = AuthOk {
            mac: slave_mac(secret, &nm, &ns),
        };
        assert_eq!(AuthOk::decode(&ok.encode()).unwrap(), ok);
        assert!(verify_slave(secret, &nm, &ns, &ok));
        assert!(!verify_slave(b"wrong", &nm, &ns, &ok));
        // Reflection: a master proof is not a slave proof over the same nonces and vice versa.
        assert!(!verify_slave(secret, &nm, &ns, &AuthOk { mac: resp.mac }));
        assert!(!verify_master(
            secret,
            &ns,
            &AuthResponse {
                nonce: nm,
                mac: slave_mac(secret, &ns, &nm)
            }
        ));

        let ch = AuthChallenge { nonce: ns };
        assert_eq!(AuthChallenge::decode(&ch.encode()).unwrap(), ch);
        let rq = AuthRequest {
            version: AUTH_VERSION,
        };
        assert_eq!(AuthRequest::decode(&rq.encode()).unwrap(), rq);
        assert!(AuthChallenge::decode(&[0u8; 31]).is_err());
        assert!(AuthOk::decode(&[0u8; 33]).is_err());
    }
}
