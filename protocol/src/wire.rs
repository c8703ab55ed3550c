//! Little-endian field encoding shared by ops and messages. The reader checks every length
//! against the bytes actually present *and* against a per-field maximum before it allocates.

use bytes::Bytes;

use crate::op::Timespec;
use crate::path::{PathError, WirePath, MAX_DEPTH, MAX_NAME};

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload ends early while reading {0}")]
    Truncated(&'static str),
    #[error("{what} is {len} bytes, over the {max}-byte limit")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("unknown {what} tag {tag}")]
    BadTag { what: &'static str, tag: u8 },
    #[error("invalid path: {0}")]
    Path(#[from] PathError),
    #[error("invalid timestamp nanoseconds {0}")]
    BadNanos(u32),
    #[error("{0} unexpected trailing bytes")]
    Trailing(usize),
    #[error("invalid value: {0}")]
    Invalid(&'static str),
}

pub(crate) struct Writer<'a> {
    pub(crate) out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    pub(crate) fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn i32(&mut self, v: i32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn i64(&mut self, v: i64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn timespec(&mut self, t: Timespec) {
        self.i64(t.sec);
        self.u32(t.nsec);
    }
    /// Length-prefixed (u32) bytes.
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.u32(u32::try_from(b.len()).expect("field length checked by the encoder's caller"));
        self.out.extend_from_slice(b);
    }
    pub(crate) fn path(&mut self, p: &WirePath) {
        self.u16(u16::try_from(p.depth()).expect("depth bounded by MAX_DEPTH"));
        for c in p.components() {
            self.u8(u8::try_from(c.len()).expect("name bounded by MAX_NAME"));
            self.out.extend_from_slice(c);
        }
    }
}

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    /// The buffer `buf` lies in, when it is shared: bulk data is then handed out as slices of
    /// it rather than copied.
    owner: Option<&'a Bytes>,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, owner: None }
    }
    pub(crate) fn shared(buf: &'a Bytes) -> Self {
        Self {
            buf,
            owner: Some(buf),
        }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.buf.len()))
        }
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    /// Exactly `N` bytes (ids, nonces, MACs, digests).
    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returned N bytes"))
    }
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }
    /// Seconds and nanoseconds, the latter checked to be below one second.
    pub(crate) fn timespec(&mut self, what: &'static str) -> Result<Timespec, DecodeError> {
        let sec = self.i64(what)?;
        let nsec = self.u32(what)?;
        if nsec >= 1_000_000_000 {
            return Err(DecodeError::BadNanos(nsec));
        }
        Ok(Timespec { sec, nsec })
    }
    /// Length-prefixed (u32) bytes, refused above `max` before anything is allocated.
    fn prefixed(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(what)? as usize;
        if len > max {
            return Err(DecodeError::TooLarge { what, len, max });
        }
        self.take(len, what)
    }
    /// Length-prefixed bytes, copied out.
    pub(crate) fn bytes(&mut self, what: &'static str, max: usize) -> Result<Vec<u8>, DecodeError> {
        Ok(self.prefixed(what, max)?.to_vec())
    }
    /// Length-prefixed bytes as in [`Self::bytes`], without a copy when the input is shared.
    pub(crate) fn data(&mut self, what: &'static str, max: usize) -> Result<Bytes, DecodeError> {
        let owner = self.owner;
        let b = self.prefixed(what, max)?;
        Ok(match owner {
            Some(o) => o.slice_ref(b),
            None => Bytes::copy_from_slice(b),
        })
    }
    /// Exactly `len` bytes (the caller bounded `len`).
    pub(crate) fn bytes_exact(
        &mut self,
        len: usize,
        what: &'static str,
    ) -> Result<Vec<u8>, DecodeError> {
        Ok(self.take(len, what)?.to_vec())
    }

    pub(crate) fn path(&mut self) -> Result<WirePath, DecodeError> {
        let n = self.u16("path depth")? as usize;
        if n > MAX_DEPTH {
            return Err(DecodeError::TooLarge {
                what: "path depth",
                len: n,
                max: MAX_DEPTH,
            });
        }
        let mut p = WirePath::root();
        for _ in 0..n {
            let len = self.u8("name length")? as usize;
            debug_assert!(len <= MAX_NAME);
            let name = self.take(len, "name")?;
            p.push(name)?;
        }
        Ok(p)
    }
}
