//! Sealed frames: every frame of a session authenticated with a shared secret carries a tag
//! under a key of that session alone, so a frame changed, injected, replayed, reordered or
//! dropped on the way is refused before its payload is parsed.
//!
//! ## Keys
//! The shared-secret handshake ([`crate::auth`]) leaves both sides with the secret they
//! agreed on and two fresh nonces, Nm (master) and Ns (slave). Each direction gets its own
//! 32-byte key:
//!
//! ```text
//! PRK   = HKDF-Extract(salt = Nm || Ns, IKM = secret)                      (HKDF-SHA256)
//! K_m2s = HKDF-Expand(PRK, "tdfs-seal-v2 master->slave" || protection, 32)
//! K_s2m = HKDF-Expand(PRK, "tdfs-seal-v2 slave->master" || protection, 32)
//! ```
//!
//! Fresh nonces make every connection's keys new; the protection byte keeps a MAC key from
//! ever being an AEAD key; separate directions mean a frame cannot be reflected back to its
//! sender.
//!
//! ## Tags
//! Each side counts the frames it sends and receives from 0 (the first frame after the
//! handshake). The counter is not on the wire: both ends know it, so a frame that arrives out
//! of its place checks against the wrong counter and fails.
//!
//! Both modes use AEGIS-256X2 (RFC 10032) with K and a 32-byte nonce = counter (u64 LE)
//! followed by zeros; the header's crc field is 0, so the tag covers every byte.
//!
//! - [`Protection::Mac`]: tag = AEGIS-256X2-MAC(K, nonce; header || wire payload), 16 bytes.
//! - [`Protection::Encrypt`]: AEGIS-256X2 AEAD, the header as associated data, the wire
//!   payload (after compression) encrypted in place; tag = its 16-byte tag.
//!
//! AEGIS was chosen by measurement on the 2-core box the benchmark runs on (single thread,
//! 128 KiB frames, s/GiB): AEGIS-256X2 MAC 0.056 and AEAD 0.061, against keyed BLAKE3 0.27,
//! HMAC-SHA256 0.68 (sha2 or ring), ring's AES-256-GCM 0.15 (GMAC through its associated
//! data 0.59) and ChaCha20-Poly1305 0.45 (ring) or 0.76 (RustCrypto). A local slave shares
//! the CPU with the master and the writer, so every cycle of the MAC shows up in the write
//! speed: with BLAKE3 the MAC cost 40% of it, above the 10% the design allows. The 256-bit
//! variant keeps the 32-byte keys; the 128-bit one would be twice as fast again but halves
//! the key. The `aegis` crate builds libaegis (its author's C implementation, which picks
//! AES-NI, VAES/AVX2 or a portable path at run time) with the C compiler ring already needs.

use aegis::aegis256x2::{Aegis256X2, Aegis256X2Mac};
use hkdf::Hkdf;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::compress::{self, Compression};
use crate::frame::{self, Frame, FrameError, FrameRef, FrameType, HEADER_LEN, MAX_PAYLOAD};

/// Bytes of the tag after a sealed frame's payload.
pub const TAG_LEN: usize = 16;

const M2S_LABEL: &[u8] = b"tdfs-seal-v2 master->slave";
const S2M_LABEL: &[u8] = b"tdfs-seal-v2 slave->master";

/// What guards the frames of an authenticated session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Protection {
    /// TLS underneath already authenticates and encrypts every byte: frames go unsealed.
    Tls = 0,
    /// Every frame carries a MAC; payloads travel in the clear.
    Mac = 1,
    /// Every frame is encrypted and authenticated (`--encrypt`).
    Encrypt = 2,
}

impl Protection {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Tls,
            1 => Self::Mac,
            2 => Self::Encrypt,
            _ => return None,
        })
    }

    /// What a log line says about it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Tls => "protected by TLS",
            Self::Mac => "authenticated (MAC)",
            Self::Encrypt => "encrypted and authenticated",
        }
    }
}

/// Which end of the connection this side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Connects and sends ops (a master, a relay, a verifier).
    Master,
    /// Accepts and applies.
    Slave,
}

/// The two sealing states of a session, one per direction: `None` under
/// [`Protection::Tls`].
pub fn session(
    secret: &[u8],
    protection: Protection,
    master_nonce: &[u8; 32],
    slave_nonce: &[u8; 32],
    role: Role,
) -> Option<(Sealer, Opener)> {
    if protection == Protection::Tls {
        return None;
    }
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(master_nonce);
    salt[32..].copy_from_slice(slave_nonce);
    let hk = Hkdf::<Sha256>::new(Some(&salt), secret);
    let expand = |label: &[u8]| {
        let mut k = [0u8; 32];
        hk.expand_multi_info(&[label, &[protection as u8]], &mut k)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        k
    };
    let (m2s, s2m) = (expand(M2S_LABEL), expand(S2M_LABEL));
    let (send, recv) = match role {
        Role::Master => (m2s, s2m),
        Role::Slave => (s2m, m2s),
    };
    Some((
        Sealer {
            key: Key::new(protection, &send),
            next: 0,
        },
        Opener {
            key: Key::new(protection, &recv),
            next: 0,
        },
    ))
}

enum Key {
    Mac([u8; 32]),
    Aead([u8; 32]),
}

impl Key {
    fn new(p: Protection, k: &[u8; 32]) -> Key {
        match p {
            Protection::Encrypt => Key::Aead(*k),
            _ => Key::Mac(*k),
        }
    }

    fn flags(&self) -> u8 {
        match self {
            Key::Mac(_) => frame::FLAG_SEALED,
            Key::Aead(_) => frame::FLAG_SEALED | frame::FLAG_ENCRYPTED,
        }
    }
}

fn mac(key: &[u8; 32], counter: u64, header: &[u8], parts: &[&[u8]]) -> [u8; TAG_LEN] {
    let mut m = Aegis256X2Mac::<TAG_LEN>::new_with_nonce(key, &nonce(counter));
    m.update(header);
    for p in parts {
        m.update(p);
    }
    m.finalize()
}

fn nonce(counter: u64) -> [u8; 32] {
    let mut n = [0u8; 32];
    n[..8].copy_from_slice(&counter.to_le_bytes());
    n
}

/// Takes the next counter value. 2^64 frames are never sent on one connection; if it ever
/// came to that, reusing a counter would repeat a nonce under the same key, so stop instead.
fn advance(next: &mut u64) -> u64 {
    let c = *next;
    *next = c
        .checked_add(1)
        .expect("frame counter exhausted: reconnect for new keys");
    c
}

/// The sending half of a sealed session.
pub struct Sealer {
    key: Key,
    next: u64,
}

impl Sealer {
    pub fn encrypts(&self) -> bool {
        matches!(self.key, Key::Aead(_))
    }

    /// Appends a sealed frame carrying `payload`, compressed when asked and when it shrinks
    /// (then encrypted, under [`Protection::Encrypt`]).
    ///
    /// # Panics
    /// If `payload` is over [`MAX_PAYLOAD`]: callers size their batches below it.
    pub fn encode(
        &mut self,
        kind: FrameType,
        seq: u64,
        payload: &[u8],
        comp: Compression,
        out: &mut Vec<u8>,
    ) {
        assert!(payload.len() <= MAX_PAYLOAD, "frame payload over limit");
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        let flag = compress::compress_into(comp, payload, out);
        if flag.is_none() {
            out.truncate(start + HEADER_LEN);
            out.extend_from_slice(payload);
        }
        self.finish(kind, seq, flag.unwrap_or(0), payload.len(), out, start);
    }

    /// Appends a sealed, uncompressed frame whose payload is `parts` one after the other.
    pub fn encode_parts(&mut self, kind: FrameType, seq: u64, parts: &[&[u8]], out: &mut Vec<u8>) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        assert!(len <= MAX_PAYLOAD, "frame payload over limit");
        let start = out.len();
        out.reserve(HEADER_LEN + len + TAG_LEN);
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        for p in parts {
            out.extend_from_slice(p);
        }
        self.finish(kind, seq, 0, len, out, start);
    }

    /// Fills in the header of the frame at `out[start..]` (payload in place after it) and
    /// seals it.
    fn finish(
        &mut self,
        kind: FrameType,
        seq: u64,
        comp_flag: u8,
        raw_len: usize,
        out: &mut Vec<u8>,
        start: usize,
    ) {
        let wire_len = out.len() - start - HEADER_LEN;
        let header =
            frame::header_fields(kind, seq, comp_flag | self.key.flags(), wire_len, raw_len);
        let counter = advance(&mut self.next);
        let (head, payload) = out[start..].split_at_mut(HEADER_LEN);
        head.copy_from_slice(&header);
        let tag: [u8; TAG_LEN] = match &self.key {
            Key::Mac(k) => mac(k, counter, &header, &[payload]),
            Key::Aead(k) => {
                Aegis256X2::<TAG_LEN>::new(k, &nonce(counter)).encrypt_in_place(payload, &header)
            }
        };
        out.extend_from_slice(&tag);
    }

    /// For a sender that writes `header`, `parts` and `tag` as they are, without copying the
    /// parts into one buffer: the header and the tag of an uncompressed frame whose payload
    /// is `parts`. `None` under [`Protection::Encrypt`], where the payload must be encrypted
    /// in a buffer of the sender's own ([`Sealer::encode_parts`]).
    pub fn seal_parts(
        &mut self,
        kind: FrameType,
        seq: u64,
        parts: &[&[u8]],
    ) -> Option<([u8; HEADER_LEN], [u8; TAG_LEN])> {
        let Key::Mac(k) = &self.key else {
            return None;
        };
        let len: usize = parts.iter().map(|p| p.len()).sum();
        assert!(len <= MAX_PAYLOAD, "frame payload over limit");
        let header = frame::header_fields(kind, seq, frame::FLAG_SEALED, len, len);
        let counter = advance(&mut self.next);
        Some((header, mac(k, counter, &header, parts)))
    }
}

/// The receiving half of a sealed session.
pub struct Opener {
    key: Key,
    next: u64,
}

impl Opener {
    /// Checks the tag of the sealed frame at the front of `buf` against this session's key
    /// and the frame's place in the stream, decrypts it in place (under
    /// [`Protection::Encrypt`]), and only then parses it. `Incomplete` until the whole frame
    /// is there; nothing is counted until a frame checks out.
    pub fn open<'a>(&mut self, buf: &'a mut [u8]) -> Result<FrameRef<'a>, FrameError> {
        let h = frame::header(buf)?;
        if !h.sealed() {
            return Err(FrameError::Unsealed(self.next));
        }
        let total = h.total();
        if buf.len() < total {
            return Err(FrameError::Incomplete);
        }
        let encrypted = h.flags & frame::FLAG_ENCRYPTED != 0;
        if encrypted != matches!(self.key, Key::Aead(_)) {
            return Err(FrameError::WrongProtection(self.next));
        }
        let counter = self.next;
        let (head, rest) = buf[..total].split_at_mut(HEADER_LEN);
        let ok = match &self.key {
            Key::Mac(k) => {
                let (payload, tag) = rest.split_at(h.wire_len);
                let want = mac(k, counter, head, &[payload]);
                bool::from(want.ct_eq(tag))
            }
            Key::Aead(k) => {
                let (payload, tag) = rest.split_at_mut(h.wire_len);
                let tag: &[u8; TAG_LEN] = (&*tag).try_into().expect("a frame ends in its tag");
                Aegis256X2::<TAG_LEN>::new(k, &nonce(counter))
                    .decrypt_in_place(payload, tag, head)
                    .is_ok()
            }
        };
        if !ok {
            return Err(FrameError::Unauthentic(counter));
        }
        advance(&mut self.next);
        let buf: &'a [u8] = buf;
        frame::frame_ref(&h, &buf[HEADER_LEN..HEADER_LEN + h.wire_len], total)
    }
}

/// How a connection's sender frames what it sends: plainly, or sealed.
pub struct Tx(Option<Sealer>);

impl Tx {
    pub fn plain() -> Tx {
        Tx(None)
    }

    pub fn sealed(s: Sealer) -> Tx {
        Tx(Some(s))
    }

    pub fn sealer(&mut self) -> Option<&mut Sealer> {
        self.0.as_mut()
    }

    pub fn is_sealed(&self) -> bool {
        self.0.is_some()
    }

    /// Appends a frame ([`frame::encode`], or [`Sealer::encode`] when sealed).
    pub fn encode(
        &mut self,
        kind: FrameType,
        seq: u64,
        payload: &[u8],
        comp: Compression,
        out: &mut Vec<u8>,
    ) {
        match &mut self.0 {
            None => frame::encode(kind, seq, payload, comp, out),
            Some(s) => s.encode(kind, seq, payload, comp, out),
        }
    }

    /// A frame as a fresh buffer.
    pub fn encode_vec(
        &mut self,
        kind: FrameType,
        seq: u64,
        payload: &[u8],
        comp: Compression,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TAG_LEN);
        self.encode(kind, seq, payload, comp, &mut out);
        out
    }
}

/// How a connection's receiver reads frames: plain ones, or sealed ones only.
pub struct Rx(Option<Opener>);

impl Rx {
    pub fn plain() -> Rx {
        Rx(None)
    }

    pub fn sealed(o: Opener) -> Rx {
        Rx(Some(o))
    }

    pub fn is_sealed(&self) -> bool {
        self.0.is_some()
    }

    /// The frame at the front of `buf` ([`frame::parse_ref`], or [`Opener::open`] when
    /// sealed: the buffer is then decrypted in place).
    pub fn parse<'a>(&mut self, buf: &'a mut [u8]) -> Result<FrameRef<'a>, FrameError> {
        match &mut self.0 {
            None => frame::parse_ref(buf),
            Some(o) => o.open(buf),
        }
    }

    /// [`Rx::parse`] into an owned frame.
    pub fn parse_owned(&mut self, buf: &mut [u8]) -> Result<Frame, FrameError> {
        self.parse(buf).map(FrameRef::into_owned)
    }
}

/// Both halves of a connection's framing.
pub fn plain() -> (Tx, Rx) {
    (Tx::plain(), Rx::plain())
}

/// [`session`]'s halves as a sender and a receiver (plain under [`Protection::Tls`]).
pub fn framing(
    secret: &[u8],
    protection: Protection,
    master_nonce: &[u8; 32],
    slave_nonce: &[u8; 32],
    role: Role,
) -> (Tx, Rx) {
    match session(secret, protection, master_nonce, slave_nonce, role) {
        None => plain(),
        Some((s, o)) => (Tx::sealed(s), Rx::sealed(o)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"correct horse battery staple";
    const NM: [u8; 32] = [1; 32];
    const NS: [u8; 32] = [2; 32];

    fn pair(p: Protection) -> ((Sealer, Opener), (Sealer, Opener)) {
        (
            session(SECRET, p, &NM, &NS, Role::Master).unwrap(),
            session(SECRET, p, &NM, &NS, Role::Slave).unwrap(),
        )
    }

    fn frames(s: &mut Sealer, n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let mut out = Vec::new();
                let payload = format!("payload of frame {i}: {}", "x".repeat(i * 100));
                s.encode(
                    FrameType::Ops,
                    i as u64 + 1,
                    payload.as_bytes(),
                    if i % 2 == 0 {
                        Compression::None
                    } else {
                        Compression::Lz4
                    },
                    &mut out,
                );
                out
            })
            .collect()
    }

    #[test]
    fn both_directions_round_trip_in_both_modes() {
        for p in [Protection::Mac, Protection::Encrypt] {
            let ((mut ms, mut mo), (mut ss, mut so)) = pair(p);
            for (i, mut f) in frames(&mut ms, 5).into_iter().enumerate() {
                assert_eq!(frame::frame_len(&f).unwrap(), f.len());
                assert!(frame::is_sealed(&f));
                let len = f.len();
                let got = so.open(&mut f).unwrap();
                assert_eq!(got.seq, i as u64 + 1);
                assert_eq!(got.wire_len, len);
                assert!(got
                    .payload
                    .starts_with(format!("payload of frame {i}").as_bytes()));
            }
            let mut back = ss.encode_parts_vec(FrameType::Ack, 0, &[b"ack", b"!"]);
            assert_eq!(&mo.open(&mut back).unwrap().payload[..], b"ack!");
            // A frame is never accepted by its own sender's receiving half (reflection).
            let mut refl = ms.encode_parts_vec(FrameType::Ack, 0, &[b"ack"]);
            assert_eq!(mo.open(&mut refl), Err(FrameError::Unauthentic(1)));
        }
    }

    impl Sealer {
        fn encode_parts_vec(&mut self, kind: FrameType, seq: u64, parts: &[&[u8]]) -> Vec<u8> {
            let mut out = Vec::new();
            self.encode_parts(kind, seq, parts, &mut out);
            out
        }
    }

    #[test]
    fn vectored_mac_frames_equal_encoded_ones() {
        let ((mut a, _), _) = pair(Protection::Mac);
        let ((mut b, _), (_, mut so)) = pair(Protection::Mac);
        let parts: [&[u8]; 3] = [b"\x02\0\0\0", b"first op", b"second op"];
        let (h, t) = a.seal_parts(FrameType::Ops, 9, &parts).unwrap();
        let mut wire = h.to_vec();
        for p in parts {
            wire.extend_from_slice(p);
        }
        wire.extend_from_slice(&t);
        assert_eq!(wire, b.encode_parts_vec(FrameType::Ops, 9, &parts));
        assert_eq!(so.open(&mut wire).unwrap().seq, 9);
        let ((mut e, _), _) = pair(Protection::Encrypt);
        assert!(e.seal_parts(FrameType::Ops, 9, &parts).is_none());
    }

    #[test]
    fn every_single_byte_change_is_refused() {
        for p in [Protection::Mac, Protection::Encrypt] {
            let ((mut ms, _), _) = pair(p);
            let f = ms.encode_parts_vec(FrameType::Ops, 7, &[b"some op bytes here"]);
            for i in 0..f.len() {
                let mut bad = f.clone();
                bad[i] ^= 0x01;
                let (_, (_, mut so)) = pair(p);
                let r = so.open(&mut bad);
                assert!(r.is_err(), "{p:?}: flipping byte {i} went unnoticed");
                // Nothing counted: the genuine frame still opens at its place.
                let mut good = f.clone();
                assert!(so.open(&mut good).is_ok(), "{p:?} byte {i}");
            }
        }
    }

    #[test]
    fn replayed_dropped_reordered_and_injected_frames_are_refused() {
        for p in [Protection::Mac, Protection::Encrypt] {
            let ((mut ms, _), _) = pair(p);
            let fs = frames(&mut ms, 3);
            let opener = || pair(p).1 .1;
            // Replay: frame 0 again at place 1.
            let mut so = opener();
            so.open(&mut fs[0].clone()).unwrap();
            assert_eq!(so.open(&mut fs[0].clone()), Err(FrameError::Unauthentic(1)));
            // Drop: frame 1 never arrives.
            let mut so = opener();
            so.open(&mut fs[0].clone()).unwrap();
            assert_eq!(so.open(&mut fs[2].clone()), Err(FrameError::Unauthentic(1)));
            // Reorder: 1 before 0.
            let mut so = opener();
            assert_eq!(so.open(&mut fs[1].clone()), Err(FrameError::Unauthentic(0)));
            // Injected: a well-formed plain frame, or one flagged sealed with a made-up tag.
            let mut so = opener();
            let mut plain = frame::encode_vec(FrameType::Ops, 1, b"forged", Compression::None);
            assert_eq!(so.open(&mut plain), Err(FrameError::Unsealed(0)));
            let mut forged = plain.clone();
            forged[6] |= ms.key.flags();
            forged[24..28].fill(0);
            forged.extend_from_slice(&[0u8; TAG_LEN]);
            assert!(so.open(&mut forged).unwrap_err().is_authentication());
            // A sealed frame is never taken by a plain reader.
            assert_eq!(frame::parse(&fs[0]), Err(FrameError::Sealed));
            // Incomplete frames wait without counting.
            let mut so = opener();
            let mut part = fs[0][..fs[0].len() - 1].to_vec();
            assert_eq!(so.open(&mut part), Err(FrameError::Incomplete));
            so.open(&mut fs[0].clone()).unwrap();
        }
    }

    #[test]
    fn keys_depend_on_secret_nonces_mode_and_direction() {
        let mut seen = std::collections::HashSet::new();
        for (secret, nm, p) in [
            (SECRET, NM, Protection::Mac),
            (
                b"another secret of enough bytes".as_slice(),
                NM,
                Protection::Mac,
            ),
            (SECRET, [9; 32], Protection::Mac),
            (SECRET, NM, Protection::Encrypt),
        ] {
            let (mut s, _) = session(secret, p, &nm, &NS, Role::Master).unwrap();
            let f = s.encode_parts_vec(FrameType::Ack, 0, &[b"same"]);
            assert!(seen.insert(f[HEADER_LEN..].to_vec()), "{p:?}");
        }
        assert!(session(SECRET, Protection::Tls, &NM, &NS, Role::Master).is_none());
        // Other nonces or another secret: the slave cannot open the master's frames.
        let (mut ms, _) = session(SECRET, Protection::Mac, &NM, &NS, Role::Master).unwrap();
        let (_, mut so) = session(SECRET, Protection::Mac, &NS, &NM, Role::Slave).unwrap();
        let mut f = ms.encode_parts_vec(FrameType::Ack, 0, &[b"x"]);
        assert_eq!(so.open(&mut f), Err(FrameError::Unauthentic(0)));
    }

    #[test]
    fn encrypted_frames_hide_their_payload() {
        let ((mut ms, _), (_, mut so)) = pair(Protection::Encrypt);
        let secret_text = b"the quick brown fox jumps over the lazy dog, the quick brown fox";
        let mut f = ms.encode_parts_vec(FrameType::Ops, 1, &[secret_text]);
        assert!(!f
            .windows(16)
            .any(|w| secret_text.windows(16).any(|s| s == w)));
        assert_eq!(&so.open(&mut f).unwrap().payload[..], secret_text);
        // A MAC-only frame carries it in the clear.
        let ((mut mm, _), _) = pair(Protection::Mac);
        let f = mm.encode_parts_vec(FrameType::Ops, 1, &[secret_text]);
        assert!(f.windows(secret_text.len()).any(|w| w == secret_text));
    }

    proptest::proptest! {
        /// Whatever arrives, an opener answers with a frame or an error, never a panic, and
        /// never a frame for bytes its peer did not seal.
        #[test]
        fn arbitrary_bytes_never_open(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            encrypt in proptest::prelude::any::<bool>(),
        ) {
            let p = if encrypt { Protection::Encrypt } else { Protection::Mac };
            let (_, (_, mut so)) = pair(p);
            let mut b = bytes.clone();
            proptest::prop_assert!(so.open(&mut b).is_err());
            // Even behind a well-formed sealed header.
            let mut h = frame::header_fields(
                FrameType::Ops,
                1,
                frame::FLAG_SEALED | if encrypt { frame::FLAG_ENCRYPTED } else { 0 },
                bytes.len().saturating_sub(TAG_LEN),
                bytes.len().saturating_sub(TAG_LEN),
            )
            .to_vec();
            h.extend_from_slice(&bytes);
            proptest::prop_assert!(so.open(&mut h).is_err());
        }
    }

    #[test]
    fn a_mac_frame_is_refused_by_an_encrypting_session() {
        let ((mut mm, _), _) = pair(Protection::Mac);
        let (_, (_, mut so)) = pair(Protection::Encrypt);
        let mut f = mm.encode_parts_vec(FrameType::Ops, 1, &[b"x"]);
        assert_eq!(so.open(&mut f), Err(FrameError::WrongProtection(0)));
    }
}
