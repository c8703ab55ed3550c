//! Frames: the unit on the wire.
//!
//! ```text
//! offset size field
//!      0    4 magic "TDFS"
//!      4    1 version (FRAME_VERSION)
//!      5    1 type (FrameType)
//!      6    1 flags (bit 0: payload is LZF-compressed; bit 1: LZ4-compressed;
//!                    bit 2: sealed, a 16-byte tag follows the payload; bit 3: encrypted)
//!      7    1 reserved, must be 0
//!      8    8 sequence number (first op of an Ops frame; 0 where unused)
//!     16    4 payload length on the wire (the tag of a sealed frame not included)
//!     20    4 payload length after decompression (equals the wire length when raw)
//!     24    4 crc32 (IEEE, crc32fast) of bytes 0..24 followed by the wire payload; 0 in a
//!               sealed frame, whose tag covers everything
//!     28    . payload
//!      .   16 tag (sealed frames only, see [`crate::seal`])
//! ```
//!
//! Decoding follows mini-redis: [`check`] looks at a buffer and says whether a whole frame is
//! there (or [`FrameError::Incomplete`], which is a normal case, not an error), validating the
//! header and both lengths against [`MAX_PAYLOAD`] before anything is allocated, then the crc
//! before anything is decompressed or parsed. [`parse`] then yields the frame. Sealed frames
//! (the frames of a session authenticated with a shared secret) are refused here: only
//! [`crate::seal::Opener`], which checks their tag first, parses them.

use std::borrow::Cow;

use crate::compress::{self, Compression};

pub const MAGIC: [u8; 4] = *b"TDFS";
/// Version of the frame layout and of every payload encoding.
pub const FRAME_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 28;
/// Largest payload, compressed or not. A write op carries at most 4 MiB of data, so this leaves
/// room for batching without letting a peer make us allocate much.
pub const MAX_PAYLOAD: usize = 8 << 20;

/// Payload is LZF-compressed (`-z 1`).
pub const FLAG_COMPRESSED: u8 = 1;
/// Payload is LZ4-compressed (`-z 2`).
pub const FLAG_LZ4: u8 = 2;
pub(crate) const FLAG_ANY_COMPRESSION: u8 = FLAG_COMPRESSED | FLAG_LZ4;
/// A [`crate::seal::TAG_LEN`]-byte tag follows the payload, computed under the session's keys.
pub const FLAG_SEALED: u8 = 4;
/// The payload (after compression) is encrypted; only together with [`FLAG_SEALED`].
pub const FLAG_ENCRYPTED: u8 = 8;
const KNOWN_FLAGS: u8 = FLAG_ANY_COMPRESSION | FLAG_SEALED | FLAG_ENCRYPTED;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// master -> slave: opening of a session ([`crate::msg::Hello`]).
    Hello = 1,
    /// slave -> master: session accepted ([`crate::msg::HelloAck`]).
    HelloAck = 2,
    /// either way: session refused or ended with a reason ([`crate::msg::Refuse`]).
    Refuse = 3,
    /// master -> slave: a batch of ops ([`crate::op::encode_batch`]).
    Ops = 4,
    /// slave -> master: applied / durable sequence numbers ([`crate::msg::Ack`]).
    Ack = 5,
    /// slave -> master: an op failed to apply ([`crate::msg::ApplyError`]).
    ApplyError = 6,
    /// master -> slave: orderly end of the stream, everything has been sent.
    Bye = 7,
    /// master -> slave: an incremental sync starts; until `SyncEnd`, live ops that fail
    /// because the replica differs are skipped and reported (`SyncMiss`), since the sync
    /// rewrites what they touch.
    SyncBegin = 8,
    /// master -> slave: the sync is complete; the replica equals the master.
    SyncEnd = 9,
    /// master -> slave: ops of a sync (no sequence numbers: they apply at their place in
    /// the stream and do not advance the applied sequence number).
    SyncOps = 10,
    /// master or verifier -> slave: list a directory (header seq = request id; payload a
    /// path); answered by `Listing` once every op sent before it has been applied.
    ListDir = 11,
    /// slave -> requester: a directory listing ([`crate::sync::Listing`]).
    Listing = 12,
    /// requester -> slave: checksum a file's content where it lives (payload a path).
    Checksum = 13,
    /// slave -> requester: [`crate::sync::Digest`].
    Digest = 14,
    /// slave -> master: paths of live ops skipped during a sync ([`crate::sync::Misses`]).
    SyncMiss = 15,
    /// verifier -> slave: opens a read-only session (payload like `Hello`); allowed while a
    /// master is connected, and only `ListDir` and `Checksum` may follow.
    Inspect = 16,
    /// relay -> its upstream: where the relay's own replicas stand
    /// ([`crate::msg::Downstream`]), about once a second, so the master's status shows the
    /// whole tree.
    Downstream = 17,
    /// master -> slave: start of shared-secret authentication ([`crate::auth::AuthRequest`]).
    AuthRequest = 20,
    /// slave -> master: the slave's nonce ([`crate::auth::AuthChallenge`]).
    AuthChallenge = 21,
    /// master -> slave: the master's nonce and proof ([`crate::auth::AuthResponse`]).
    AuthResponse = 22,
    /// slave -> master: the slave's proof ([`crate::auth::AuthOk`]).
    AuthOk = 23,
}

impl FrameType {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::HelloAck,
            3 => Self::Refuse,
            4 => Self::Ops,
            5 => Self::Ack,
            6 => Self::ApplyError,
            7 => Self::Bye,
            8 => Self::SyncBegin,
            9 => Self::SyncEnd,
            10 => Self::SyncOps,
            11 => Self::ListDir,
            12 => Self::Listing,
            13 => Self::Checksum,
            14 => Self::Digest,
            15 => Self::SyncMiss,
            16 => Self::Inspect,
            17 => Self::Downstream,
            20 => Self::AuthRequest,
            21 => Self::AuthChallenge,
            22 => Self::AuthResponse,
            23 => Self::AuthOk,
            _ => return None,
        })
    }
}

/// Why a byte stream is not a frame. Everything but `Incomplete` means the connection is
/// unusable and must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("incomplete frame")]
    Incomplete,
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("unsupported frame version {0} (this build speaks {FRAME_VERSION})")]
    BadVersion(u8),
    #[error("unknown frame type {0}")]
    BadType(u8),
    #[error("unknown frame flags {0:#x}")]
    BadFlags(u8),
    #[error("frame payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("frame crc mismatch (got {got:#010x}, computed {want:#010x})")]
    BadCrc { got: u32, want: u32 },
    #[error("decompression failed: {0}")]
    Decompress(String),
    /// A sealed frame where the session has no keys to check it.
    #[error("sealed frame in a session without a shared secret")]
    Sealed,
    /// A frame without a tag in a session whose frames must all carry one.
    #[error(
        "frame {0} failed authentication: it carries no tag (injected by someone without this \
         session's keys?)"
    )]
    Unsealed(u64),
    /// The tag does not match: the frame was altered, injected, replayed or reordered, or
    /// one before it was dropped.
    #[error(
        "frame {0} failed authentication: altered, injected, replayed or reordered in transit, \
         or a frame before it was dropped"
    )]
    Unauthentic(u64),
    /// A sealed frame whose encryption flag differs from the session's.
    #[error("frame {0} failed authentication: its encryption flag differs from the session's")]
    WrongProtection(u64),
}

impl FrameError {
    /// Whether the frame failed the session's authentication (as opposed to being garbled).
    pub fn is_authentication(&self) -> bool {
        matches!(
            self,
            FrameError::Unsealed(_) | FrameError::Unauthentic(_) | FrameError::WrongProtection(_)
        )
    }
}

/// A decoded frame, payload decompressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameType,
    pub seq: u64,
    pub payload: Vec<u8>,
    /// Bytes this frame occupied on the wire (header included).
    pub wire_len: usize,
}

pub(crate) struct Header {
    pub(crate) kind: FrameType,
    pub(crate) flags: u8,
    pub(crate) seq: u64,
    pub(crate) wire_len: usize,
    pub(crate) raw_len: usize,
    crc: u32,
}

impl Header {
    pub(crate) fn sealed(&self) -> bool {
        self.flags & FLAG_SEALED != 0
    }

    /// Bytes of the whole frame: header, payload and (sealed) tag.
    pub(crate) fn total(&self) -> usize {
        HEADER_LEN
            + self.wire_len
            + if self.sealed() {
                crate::seal::TAG_LEN
            } else {
                0
            }
    }
}

pub(crate) fn header(buf: &[u8]) -> Result<Header, FrameError> {
    if buf.len() < HEADER_LEN {
        // Reject garbage as early as the magic lets us, so a peer cannot hold a connection
        // open by trickling bytes that can never become a frame.
        let n = buf.len().min(4);
        if buf[..n] != MAGIC[..n] {
            let mut m = [0u8; 4];
            m[..n].copy_from_slice(&buf[..n]);
            return Err(FrameError::BadMagic(m));
        }
        return Err(FrameError::Incomplete);
    }
    let magic: [u8; 4] = buf[0..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if buf[4] != FRAME_VERSION {
        return Err(FrameError::BadVersion(buf[4]));
    }
    let kind = FrameType::from_u8(buf[5]).ok_or(FrameError::BadType(buf[5]))?;
    let flags = buf[6];
    if flags & !KNOWN_FLAGS != 0
        || flags & FLAG_ANY_COMPRESSION == FLAG_ANY_COMPRESSION
        || (flags & FLAG_ENCRYPTED != 0 && flags & FLAG_SEALED == 0)
        || buf[7] != 0
    {
        return Err(FrameError::BadFlags(flags));
    }
    let seq = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    let wire_len = u32::from_le_bytes(buf[16..20].try_into().expect("4 bytes")) as usize;
    let raw_len = u32::from_le_bytes(buf[20..24].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(buf[24..28].try_into().expect("4 bytes"));
    if wire_len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(wire_len));
    }
    if raw_len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(raw_len));
    }
    if flags & FLAG_ANY_COMPRESSION == 0 && raw_len != wire_len {
        return Err(FrameError::BadFlags(flags));
    }
    Ok(Header {
        kind,
        flags,
        seq,
        wire_len,
        raw_len,
        crc,
    })
}

/// A frame whose payload still lies in the buffer it was parsed from (a compressed one's is
/// decompressed into a buffer of its own), for callers that decode it at once and need no
/// owned copy of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRef<'a> {
    pub kind: FrameType,
    pub seq: u64,
    pub payload: Cow<'a, [u8]>,
    /// Bytes this frame occupied on the wire (header included).
    pub wire_len: usize,
}

impl FrameRef<'_> {
    pub fn into_owned(self) -> Frame {
        Frame {
            kind: self.kind,
            seq: self.seq,
            payload: self.payload.into_owned(),
            wire_len: self.wire_len,
        }
    }
}

/// The header of the frame at the front of `buf` and its total length, once the frame is all
/// there and its crc matches.
fn checked(buf: &[u8]) -> Result<(Header, usize), FrameError> {
    let h = header(buf)?;
    if h.sealed() {
        return Err(FrameError::Sealed);
    }
    let total = HEADER_LEN + h.wire_len;
    if buf.len() < total {
        return Err(FrameError::Incomplete);
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&buf[..24]);
    hasher.update(&buf[HEADER_LEN..total]);
    let want = hasher.finalize();
    if want != h.crc {
        return Err(FrameError::BadCrc { got: h.crc, want });
    }
    Ok((h, total))
}

/// Returns the total length of the frame at the front of `buf` once it is all there and its
/// crc matches.
pub fn check(buf: &[u8]) -> Result<usize, FrameError> {
    checked(buf).map(|(_, total)| total)
}

/// The total length of the frame at the front of `buf` (a sealed frame's tag included) as
/// soon as its header is there (the rest may still be arriving): a reader can then make room
/// for the whole frame at once.
pub fn frame_len(buf: &[u8]) -> Result<usize, FrameError> {
    header(buf).map(|h| h.total())
}

/// Whether the header at the front of `buf` announces a sealed frame.
pub fn is_sealed(buf: &[u8]) -> bool {
    buf.get(6).is_some_and(|f| f & FLAG_SEALED != 0)
}

/// Parses the frame at the front of `buf` without copying an uncompressed payload.
pub fn parse_ref(buf: &[u8]) -> Result<FrameRef<'_>, FrameError> {
    let (h, total) = checked(buf)?;
    frame_ref(&h, &buf[HEADER_LEN..HEADER_LEN + h.wire_len], total)
}

/// The frame of header `h` whose wire payload is `wire`, decompressed if need be.
pub(crate) fn frame_ref<'a>(
    h: &Header,
    wire: &'a [u8],
    total: usize,
) -> Result<FrameRef<'a>, FrameError> {
    let payload = if h.flags & FLAG_ANY_COMPRESSION != 0 {
        Cow::Owned(
            compress::decompress(h.flags & FLAG_ANY_COMPRESSION, wire, h.raw_len)
                .map_err(FrameError::Decompress)?,
        )
    } else {
        Cow::Borrowed(wire)
    };
    Ok(FrameRef {
        kind: h.kind,
        seq: h.seq,
        payload,
        wire_len: total,
    })
}

/// Parses the frame at the front of `buf` into an owned frame.
pub fn parse(buf: &[u8]) -> Result<Frame, FrameError> {
    parse_ref(buf).map(FrameRef::into_owned)
}

/// Appends a frame carrying `payload` to `out`, compressed when asked and when it shrinks.
///
/// # Panics
/// If `payload` is over [`MAX_PAYLOAD`]: callers size their batches below it.
pub fn encode(kind: FrameType, seq: u64, payload: &[u8], comp: Compression, out: &mut Vec<u8>) {
    assert!(payload.len() <= MAX_PAYLOAD, "frame payload over limit");
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let flag = compress::compress_into(comp, payload, out);
    if flag.is_none() {
        out.truncate(start + HEADER_LEN);
        out.extend_from_slice(payload);
    }
    let (head, wire) = out[start..].split_at_mut(HEADER_LEN);
    let mut crc = crc32fast::Hasher::new();
    crc.update(wire);
    let fields = header_fields(kind, seq, flag.unwrap_or(0), wire.len(), payload.len());
    head.copy_from_slice(&seal(fields, &crc));
}

/// The header of an uncompressed frame of `len` payload bytes whose crc32 state the caller
/// already holds. crc32 states combine, so a sender fanning the same ops out to several peers
/// checksums each op once, not once per peer, and sends header and ops without assembling
/// them in one buffer.
pub fn header_with_crc(
    kind: FrameType,
    seq: u64,
    len: usize,
    payload: &crc32fast::Hasher,
) -> [u8; HEADER_LEN] {
    assert!(len <= MAX_PAYLOAD, "frame payload over limit");
    seal(header_fields(kind, seq, 0, len, len), payload)
}

/// `h` with its crc filled in: over the first 24 header bytes, then the wire payload (whose
/// crc32 state is `payload`).
fn seal(mut h: [u8; HEADER_LEN], payload: &crc32fast::Hasher) -> [u8; HEADER_LEN] {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..24]);
    crc.combine(payload);
    h[24..28].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// Every header field but the crc.
pub(crate) fn header_fields(
    kind: FrameType,
    seq: u64,
    flags: u8,
    wire_len: usize,
    raw_len: usize,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = FRAME_VERSION;
    h[5] = kind as u8;
    h[6] = flags;
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..20].copy_from_slice(&(wire_len as u32).to_le_bytes());
    h[20..24].copy_from_slice(&(raw_len as u32).to_le_bytes());
    h
}

/// Convenience: a frame as a fresh buffer.
pub fn encode_vec(kind: FrameType, seq: u64, payload: &[u8], comp: Compression) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    encode(kind, seq, payload, comp, &mut out);
    out
}
