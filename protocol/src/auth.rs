//! Mutual authentication with a shared secret: the messages and the HMAC computations of the
//! challenge-response that runs before `Hello` when both daemons have `--secret-file` (no
//! I/O here; the exchange itself lives in the daemons' transport code). Its nonces and the
//! secret it settles on key the sealed frames of the session that follows ([`crate::seal`]).
//!
//! ```text
//! master -> slave  AuthRequest   (frame 20)  version u16 (3)
//! slave  -> master AuthChallenge (frame 21)  Ns [32]
//! master -> slave  AuthResponse  (frame 22)  Nm [32], protection u8, n u8 (1..=2),
//!                                             n x (key id [8], HMAC(secret_i, MASTER_LABEL || T))
//! slave  -> master AuthOk        (frame 23)  k u8, HMAC(secret_k, SLAVE_LABEL || T || k)
//!
//! T = version u16 || protection u8 || n u8 || key id_1 .. key id_n || Ns || Nm
//! key id = HMAC(secret, KEY_ID_LABEL), first 8 bytes
//! ```
//!
//! The master offers a proof for each secret it holds (two during a rotation), most preferred
//! first; the slave takes the first whose key id it knows, checks that proof, and answers
//! with the index it took and its own proof under the same secret. Every proof covers the
//! whole offer and the protection asked for, so neither can be changed on the way (to force
//! an older secret or plain frames). The master proves first, so an unauthenticated peer
//! never gets the slave to compute a MAC for it. Both nonces are fresh random 32-byte values,
//! so a recorded response is worthless on a later connection. The two directions use
//! distinct labels, so a slave's proof can never be reflected back as a master's. MACs are
//! compared in constant time. The secret itself never crosses the wire; a key id tells which
//! secret is meant and nothing a recorded proof does not already tell. A slave that rejects
//! the response sends `Refuse` ("authentication failed") and closes.
//!
//! The first two messages keep the layout of version 1, so a peer of either version answers
//! the other's `AuthRequest` with a `Refuse` naming both versions.

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::seal::Protection;
use crate::wire::{DecodeError, Reader, Writer};

type HmacSha256 = hmac::Hmac<Sha256>;

/// Length of each side's nonce.
pub const NONCE_LEN: usize = 32;
/// Length of a MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Length of a secret's key id.
pub const KEY_ID_LEN: usize = 8;
/// Version of this exchange, carried in [`AuthRequest`]. 2: several secrets offered, the
/// protection of the frames that follow negotiated, every frame after it sealed. 3: frames
/// sealed with AEGIS-256X2 instead of BLAKE3 / AES-256-GCM ([`crate::seal`]).
pub const AUTH_VERSION: u16 = 3;
/// Most secrets a daemon holds at once: the current one and, during a rotation, one more.
pub const MAX_SECRETS: usize = 2;
/// Largest payload of any auth frame: readers refuse bigger ones before allocating.
pub const MAX_AUTH_PAYLOAD: usize = 256;

/// Prefix of the master's MAC input.
pub const MASTER_LABEL: &[u8] = b"tdfs-auth-v2 master";
/// Prefix of the slave's MAC input.
pub const SLAVE_LABEL: &[u8] = b"tdfs-auth-v2 slave";
/// What a key id is the MAC of.
pub const KEY_ID_LABEL: &[u8] = b"tdfs-auth-v2 key id";

pub type Nonce = [u8; NONCE_LEN];
pub type Tag = [u8; MAC_LEN];
pub type KeyId = [u8; KEY_ID_LEN];

/// A secret's public name: lets the slave pick the right one of those it accepts, and lets
/// operators see in the logs which secret a connection used.
pub fn key_id(secret: &[u8]) -> KeyId {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(KEY_ID_LABEL);
    let full: [u8; 32] = m.finalize().into_bytes().into();
    full[..KEY_ID_LEN].try_into().expect("8 bytes")
}

/// A key id as log lines show it.
pub fn show_key_id(id: &KeyId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

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

/// One secret's proof in an [`AuthResponse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proof {
    pub key_id: KeyId,
    pub mac: Tag,
}

/// master -> slave: the master's fresh nonce Nm, the protection it asks for, and a proof for
/// each secret it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthResponse {
    pub nonce: Nonce,
    pub protection: Protection,
    pub proofs: Vec<Proof>,
}

/// slave -> master: which of the master's secrets it took, and its proof under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthOk {
    pub index: u8,
    pub mac: Tag,
}

impl AuthRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2);
        Writer { out: &mut out }.u16(self.version);
        out
    }
    /// Only the version is read: a request of another version is refused by its number,
    /// whatever follows it.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        Ok(AuthRequest {
            version: r.u16("auth version")?,
        })
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
        let mut out = Vec::with_capacity(NONCE_LEN + 2 + self.proofs.len() * 40);
        out.extend_from_slice(&self.nonce);
        out.push(self.protection as u8);
        out.push(self.proofs.len() as u8);
        for p in &self.proofs {
            out.extend_from_slice(&p.key_id);
            out.extend_from_slice(&p.mac);
        }
        out
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let nonce = r.array("master nonce")?;
        let protection = Protection::from_u8(r.u8("protection")?)
            .ok_or(DecodeError::Invalid("unknown frame protection"))?;
        let n = r.u8("proof count")? as usize;
        if n == 0 || n > MAX_SECRETS {
            return Err(DecodeError::Invalid("proof count must be 1 or 2"));
        }
        let mut proofs = Vec::with_capacity(n);
        for _ in 0..n {
            proofs.push(Proof {
                key_id: r.array("key id")?,
                mac: r.array("master mac")?,
            });
        }
        r.finish()?;
        Ok(AuthResponse {
            nonce,
            protection,
            proofs,
        })
    }

    fn key_ids(&self) -> Vec<KeyId> {
        self.proofs.iter().map(|p| p.key_id).collect()
    }
}

impl AuthOk {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + MAC_LEN);
        out.push(self.index);
        out.extend_from_slice(&self.mac);
        out
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let v = AuthOk {
            index: r.u8("key index")?,
            mac: r.array("slave mac")?,
        };
        r.finish()?;
        Ok(v)
    }
}

/// What both proofs cover: the offer (protection, key ids) and both nonces.
fn transcript(
    protection: Protection,
    key_ids: &[KeyId],
    slave_nonce: &Nonce,
    master_nonce: &Nonce,
) -> Vec<u8> {
    let mut t = Vec::with_capacity(4 + key_ids.len() * KEY_ID_LEN + 2 * NONCE_LEN);
    t.extend_from_slice(&AUTH_VERSION.to_le_bytes());
    t.push(protection as u8);
    t.push(key_ids.len() as u8);
    for k in key_ids {
        t.extend_from_slice(k);
    }
    t.extend_from_slice(slave_nonce);
    t.extend_from_slice(master_nonce);
    t
}

fn hmac(secret: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    for p in parts {
        m.update(p);
    }
    m
}

/// The master's response: a proof under each of `secrets` (most preferred first).
///
/// # Panics
/// With no secret or more than [`MAX_SECRETS`]: the daemons load at most that many.
pub fn respond(
    secrets: &[&[u8]],
    protection: Protection,
    slave_nonce: &Nonce,
    master_nonce: &Nonce,
) -> AuthResponse {
    assert!(!secrets.is_empty() && secrets.len() <= MAX_SECRETS);
    let ids: Vec<KeyId> = secrets.iter().map(|s| key_id(s)).collect();
    let t = transcript(protection, &ids, slave_nonce, master_nonce);
    let proofs = secrets
        .iter()
        .zip(&ids)
        .map(|(s, id)| Proof {
            key_id: *id,
            mac: hmac(s, &[MASTER_LABEL, &t]).finalize().into_bytes().into(),
        })
        .collect();
    AuthResponse {
        nonce: *master_nonce,
        protection,
        proofs,
    }
}

/// Which of the response's proofs the slave can check: the first whose key id is one of
/// `accepted` (index into the response, index into `accepted`).
pub fn choose(resp: &AuthResponse, accepted: &[KeyId]) -> Option<(usize, usize)> {
    resp.proofs
        .iter()
        .enumerate()
        .find_map(|(i, p)| accepted.iter().position(|a| *a == p.key_id).map(|j| (i, j)))
}

/// Checks the master's proof number `index` under `secret`, in constant time.
pub fn verify_master(
    secret: &[u8],
    slave_nonce: &Nonce,
    resp: &AuthResponse,
    index: usize,
) -> bool {
    let Some(p) = resp.proofs.get(index) else {
        return false;
    };
    let t = transcript(resp.protection, &resp.key_ids(), slave_nonce, &resp.nonce);
    hmac(secret, &[MASTER_LABEL, &t])
        .verify_slice(&p.mac)
        .is_ok()
}

/// The slave's answer: it took the master's proof number `index`, under `secret`.
pub fn accept(secret: &[u8], slave_nonce: &Nonce, resp: &AuthResponse, index: usize) -> AuthOk {
    let t = transcript(resp.protection, &resp.key_ids(), slave_nonce, &resp.nonce);
    AuthOk {
        index: index as u8,
        mac: hmac(secret, &[SLAVE_LABEL, &t, &[index as u8]])
            .finalize()
            .into_bytes()
            .into(),
    }
}

/// Checks the slave's proof (for the secret at `ok.index` of `secrets`), in constant time.
/// Returns that secret's index when it holds.
pub fn verify_slave(
    secrets: &[&[u8]],
    slave_nonce: &Nonce,
    resp: &AuthResponse,
    ok: &AuthOk,
) -> Option<usize> {
    let i = ok.index as usize;
    let secret = secrets.get(i)?;
    let t = transcript(resp.protection, &resp.key_ids(), slave_nonce, &resp.nonce);
    hmac(secret, &[SLAVE_LABEL, &t, &[ok.index]])
        .verify_slice(&ok.mac)
        .is_ok()
        .then_some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &[u8] = b"correct horse battery staple";
    const B: &[u8] = b"another secret, for the rotation";

    #[test]
    fn roundtrip_and_verify() {
        let ns = [1u8; 32];
        let nm = [2u8; 32];
        let resp = respond(&[A], Protection::Mac, &ns, &nm);
        assert_eq!(AuthResponse::decode(&resp.encode()).unwrap(), resp);
        let (i, j) = choose(&resp, &[key_id(B), key_id(A)]).unwrap();
        assert_eq!((i, j), (0, 1));
        assert!(verify_master(A, &ns, &resp, 0));
        // Wrong secret, other slave nonce (a replay), or a flipped bit: refused.
        assert!(!verify_master(b"wrong", &ns, &resp, 0));
        assert!(!verify_master(A, &[3u8; 32], &resp, 0));
        let mut bad = resp.clone();
        bad.proofs[0].mac[0] ^= 1;
        assert!(!verify_master(A, &ns, &bad, 0));
        assert!(!verify_master(A, &ns, &resp, 1));

        let ok = accept(A, &ns, &resp, 0);
        assert_eq!(AuthOk::decode(&ok.encode()).unwrap(), ok);
        assert_eq!(verify_slave(&[A], &ns, &resp, &ok), Some(0));
        assert_eq!(verify_slave(&[b"wrong"], &ns, &resp, &ok), None);
        assert_eq!(
            verify_slave(&[A], &ns, &resp, &AuthOk { index: 1, ..ok }),
            None
        );
        // Reflection: a master proof is not a slave proof over the same exchange.
        assert_eq!(
            verify_slave(
                &[A],
                &ns,
                &resp,
                &AuthOk {
                    index: 0,
                    mac: resp.proofs[0].mac
                }
            ),
            None
        );

        let ch = AuthChallenge { nonce: ns };
        assert_eq!(AuthChallenge::decode(&ch.encode()).unwrap(), ch);
        let rq = AuthRequest {
            version: AUTH_VERSION,
        };
        assert_eq!(AuthRequest::decode(&rq.encode()).unwrap(), rq);
        // A version-1 request (just the version) still decodes, to be refused by number.
        assert_eq!(AuthRequest::decode(&1u16.to_le_bytes()).unwrap().version, 1);
        assert!(AuthChallenge::decode(&[0u8; 31]).is_err());
        assert!(AuthOk::decode(&[0u8; 34]).is_err());
    }

    #[test]
    fn rotation_offers_two_and_the_slave_takes_one_it_knows() {
        let ns = [5u8; 32];
        let nm = [6u8; 32];
        let resp = respond(&[B, A], Protection::Encrypt, &ns, &nm);
        assert_eq!(AuthResponse::decode(&resp.encode()).unwrap(), resp);
        // A slave that knows only A takes the second proof; one that knows both, the first.
        assert_eq!(choose(&resp, &[key_id(A)]), Some((1, 0)));
        assert_eq!(choose(&resp, &[key_id(A), key_id(B)]), Some((0, 1)));
        assert_eq!(
            choose(&resp, &[key_id(b"a third secret, never offered")]),
            None
        );
        assert!(verify_master(A, &ns, &resp, 1));
        let ok = accept(A, &ns, &resp, 1);
        assert_eq!(verify_slave(&[B, A], &ns, &resp, &ok), Some(1));
        // Stripping the preferred proof (to force the older secret) breaks the other one.
        let stripped = AuthResponse {
            proofs: vec![resp.proofs[1]],
            ..resp.clone()
        };
        assert!(!verify_master(A, &ns, &stripped, 0));
        // So does asking for another protection than the master did.
        let downgraded = AuthResponse {
            protection: Protection::Mac,
            ..resp.clone()
        };
        assert!(!verify_master(A, &ns, &downgraded, 1));
        // At most two proofs on the wire.
        let mut three = resp.encode();
        three[NONCE_LEN + 1] = 3;
        assert!(AuthResponse::decode(&three).is_err());
        assert_ne!(key_id(A), key_id(B));
        assert_eq!(show_key_id(&key_id(A)).len(), 16);
    }
}
