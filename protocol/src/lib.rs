//! # tdfs wire protocol
//!
//! Everything two tdfs daemons say to each other, with no I/O: callers feed bytes in and get
//! frames, ops and messages out (and the reverse).
//!
//! ## Layers
//! 1. **Frames** ([`frame`]): a 28-byte header (magic `TDFS`, version, type, flags, sequence
//!    number, wire and raw payload lengths, crc32) and a payload, optionally LZF-compressed
//!    ([`compress`]). The crc covers the header and the wire payload and is checked before
//!    anything is decompressed or parsed; both lengths are checked against [`MAX_PAYLOAD`]
//!    before anything is allocated.
//! 2. **Messages** ([`msg`]): `Hello` (master id, protocol range, next sequence), `HelloAck`
//!    (slave's last applied sequence and the master it came from), `Refuse`, `Ack` (applied and
//!    durable sequence numbers), `ApplyError` (sequence, errno, path), `Bye`.
//! 3. **Ops** ([`op`]): the mutation vocabulary. An `Ops` frame carries a batch; the header
//!    sequence number is the first op's, and ops are numbered consecutively. Sequence numbers
//!    are the master's single total order of mutations.
//!
//! ## Field encoding
//! Integers are little-endian. Byte strings are a u32 length and the bytes, with a per-field
//! maximum checked before allocation ([`op::MAX_WRITE`], [`op::MAX_XATTR_VALUE`], ...).
//! Paths are a u16 component count, then for each component a u8 length and the bytes; each
//! component is validated ([`path::validate_name`]: no `/`, NUL, `.`, `..`, at most 255
//! bytes) and the whole is at most 4095 bytes. Timestamps are i64 seconds and u32 nanoseconds
//! (< 1e9).
//!
//! ## Op encoding
//! A u8 tag, the op's fields, then a u8 count of [`op::Touch`] records (resulting atime and
//! mtime of an inode the op changed: the op's own path, its parent, or another path).
//!
//! | tag | op | fields |
//! |---|---|---|
//! | 1 | create | path, attr |
//! | 2 | mknod | path, kind u8, rdev u64, attr |
//! | 3 | mkdir | path, attr |
//! | 4 | symlink | path, target bytes, attr |
//! | 5 | link | existing path, new path |
//! | 6 | unlink | path |
//! | 7 | rmdir | path |
//! | 8 | rename | from, to, flags u32 (1 noreplace, 2 exchange) |
//! | 9 | setattr | path, has-size u8, [size u64], attr |
//! | 10 | write | path, offset u64, data bytes |
//! | 11 | fallocate | path, mode i32, offset u64, len u64 |
//! | 12 | copy_file_range | src, src offset u64, dst, dst offset u64, len u64 |
//! | 13 | setxattr | path, name bytes, value bytes, flags i32 |
//! | 14 | removexattr | path, name bytes |
//! | 15 | fsync | has-path u8, [path], datasync u8 |
//! | 16 | settimes | path |
//! | 17 | remove_tree | path (sync only) |
//! | 18 | setflags | path, inode flags u32, project id u32 |
//!
//! `attr` is mode (u32, only the 0o7777 bits), uid u32, gid u32.
//!
//! ## Authentication (frame types 20..=23) and sealed frames
//! When the daemons share a secret (`--secret-file` on both), the master authenticates
//! before `Hello` with an HMAC-SHA256 challenge-response ([`auth`]), inside TLS when TLS is
//! configured:
//!
//! 1. master -> slave `AuthRequest` (u16 version, 2);
//! 2. slave -> master `AuthChallenge`: a fresh random 32-byte nonce Ns;
//! 3. master -> slave `AuthResponse`: its own fresh nonce Nm, the frame protection it asks
//!    for (TLS, MAC, or encryption), and for each secret it holds (two during a rotation) the
//!    secret's key id and HMAC(secret, "tdfs-auth-v2 master" || T), T covering all of it;
//! 4. slave -> master `AuthOk`: the index of the secret it took and its own HMAC under it,
//!    after checking the master's in constant time; on a mismatch (or an unknown secret, or
//!    another protection than its own) it sends `Refuse` instead and closes. The master checks
//!    the slave's MAC the same way.
//!
//! The secret never crosses the wire; fresh nonces on both sides make a recorded exchange
//! useless later; distinct labels per direction stop reflection. A slave with a secret
//! answers a `Hello` that comes without this exchange with `Refuse`. Auth frames are at most
//! [`auth::MAX_AUTH_PAYLOAD`] bytes and the whole phase is bounded by a timeout, and only an
//! authenticated master can take the slave's session slot or learn that it is busy.
//!
//! Outside TLS, every frame after the exchange, both ways, is **sealed** ([`seal`]): a
//! 16-byte tag under a per-direction key derived (HKDF) from the secret and both nonces,
//! bound to the frame's place in the stream, and checked before anything of the frame is
//! parsed; with `--encrypt` the payload is also encrypted (AEGIS-256X2, the same cipher).

pub mod auth;
pub mod compress;
pub mod frame;
pub mod fuzzing;
pub mod history;
pub mod msg;
pub mod op;
pub mod path;
pub mod seal;
pub mod sync;
mod wire;

pub use bytes::Bytes;
pub use compress::Compression;
pub use frame::{Frame, FrameError, FrameType, HEADER_LEN, MAX_PAYLOAD};
pub use history::{Epoch, History, Standing};
pub use op::{Attr, NodeKind, Op, OpKind, Times, Timespec, Touch};
pub use path::{PathError, WirePath};
pub use wire::DecodeError;

/// The default TCP port of a slave.
pub const DEFAULT_PORT: u16 = 4731;

#[cfg(test)]
mod tests;
