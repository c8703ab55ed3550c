//! The replicated op vocabulary.
//!
//! Each op describes a mutation *as it took effect on the master*: the slave never decides a
//! timestamp, an owner or a mode by itself. Ops that change timestamps carry the resulting
//! times of every inode they touched ([`Touch`]), read back from the master's backing tree
//! after the syscall, so that replicas agree on mtime to the nanosecond (web farms derive ETag
//! and Last-Modified from it).

use bytes::Bytes;

use crate::path::WirePath;
use crate::wire::{DecodeError, Reader, Writer};

/// Largest data payload of one [`OpKind::Write`]; the master splits larger writes.
pub const MAX_WRITE: usize = 4 << 20;
/// Largest xattr name (Linux XATTR_NAME_MAX).
pub const MAX_XATTR_NAME: usize = 255;
/// Largest xattr value (Linux XATTR_SIZE_MAX).
pub const MAX_XATTR_VALUE: usize = 65536;
/// Largest symlink target (PATH_MAX without the NUL).
pub const MAX_SYMLINK: usize = 4095;
/// Most [`Touch`] records one op may carry.
pub const MAX_TOUCH: usize = 8;

/// A timestamp as `struct timespec` (nanoseconds always below 1e9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

/// Access and modification time of one inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Times {
    pub atime: Timespec,
    pub mtime: Timespec,
}

/// Ownership and permission bits (the 0o7777 part of `st_mode`, setuid/setgid/sticky included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Attr {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Which inode a resulting timestamp belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touch {
    /// The op's primary path (after the op: `to` of a rename, `new` of a link).
    Own(Times),
    /// The directory containing the primary path.
    Parent(Times),
    /// Any other path (e.g. the source directory of a rename).
    Path(WirePath, Times),
}

/// Special file kinds for [`OpKind::Mknod`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Fifo = 1,
    Socket = 2,
    Char = 3,
    Block = 4,
    Regular = 5,
}

impl NodeKind {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Self::Fifo,
            2 => Self::Socket,
            3 => Self::Char,
            4 => Self::Block,
            5 => Self::Regular,
            tag => {
                return Err(DecodeError::BadTag {
                    what: "node kind",
                    tag,
                })
            }
        })
    }
}

/// `renameat2` flags that may appear on the wire.
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;

/// One replicated mutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// A new, empty regular file (replaces whatever the slave has at `path`).
    Create {
        path: WirePath,
        attr: Attr,
    },
    Mknod {
        path: WirePath,
        kind: NodeKind,
        rdev: u64,
        attr: Attr,
    },
    Mkdir {
        path: WirePath,
        attr: Attr,
    },
    /// `attr.mode` is ignored (symlink permissions are always 0777 on Linux).
    Symlink {
        path: WirePath,
        target: Vec<u8>,
        attr: Attr,
    },
    Link {
        existing: WirePath,
        new: WirePath,
    },
    Unlink {
        path: WirePath,
    },
    Rmdir {
        path: WirePath,
    },
    Rename {
        from: WirePath,
        to: WirePath,
        flags: u32,
    },
    /// Resulting ownership and mode, and the new size when the file was truncated or extended.
    SetAttr {
        path: WirePath,
        size: Option<u64>,
        attr: Attr,
    },
    Write {
        path: WirePath,
        offset: u64,
        /// Shared so that a decoded op points into the received frame instead of a copy.
        data: Bytes,
    },
    /// `fallocate(2)` with its mode flags (keep-size, punch-hole, zero-range, ...).
    Fallocate {
        path: WirePath,
        mode: i32,
        offset: u64,
        len: u64,
    },
    /// `copy_file_range(2)` between two files the slave already holds identically.
    CopyRange {
        src: WirePath,
        src_offset: u64,
        path: WirePath,
        offset: u64,
        len: u64,
    },
    SetXattr {
        path: WirePath,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        path: WirePath,
        name: Vec<u8>,
    },
    /// Durability barrier: the slave makes `path` (or, with `None`, its whole tree) durable
    /// before acknowledging this sequence number as durable.
    Fsync {
        path: Option<WirePath>,
        datasync: bool,
    },
    /// Only timestamps changed (e.g. `utimensat` with no other attribute).
    SetTimes {
        path: WirePath,
    },
    /// Sync only: remove whatever is at `path`, recursively (an entry the master lacks).
    RemoveTree {
        path: WirePath,
    },
    /// Inode flags (`chattr`: append-only, immutable, noatime, nodump, ...) and project id,
    /// as the master's inode holds them after the change. Only the bits of
    /// [`REPLICATED_FLAGS`] are meaningful; a replica keeps its own others (ext4's extents
    /// flag, say).
    SetFlags {
        path: WirePath,
        flags: u32,
        projid: u32,
    },
}

/// The inode flags (`FS_*_FL`) a mirror keeps: those a user sets with `chattr`. Flags a
/// filesystem manages itself (extents, inline data, encryption, verity, ...) are not.
pub const REPLICATED_FLAGS: u32 = 0x0000_0001 // FS_SECRM_FL
    | 0x0000_0002 // FS_UNRM_FL
    | 0x0000_0004 // FS_COMPR_FL
    | 0x0000_0008 // FS_SYNC_FL
    | 0x0000_0010 // FS_IMMUTABLE_FL
    | 0x0000_0020 // FS_APPEND_FL
    | 0x0000_0040 // FS_NODUMP_FL
    | 0x0000_0080 // FS_NOATIME_FL
    | 0x0000_0400 // FS_NOCOMP_FL
    | 0x0000_4000 // FS_JOURNAL_DATA_FL
    | 0x0000_8000 // FS_NOTAIL_FL
    | 0x0001_0000 // FS_DIRSYNC_FL
    | 0x0002_0000 // FS_TOPDIR_FL
    | 0x0080_0000 // FS_NOCOW_FL
    | 0x0200_0000 // FS_DAX_FL
    | 0x2000_0000 // FS_PROJINHERIT_FL
    | 0x4000_0000; // FS_CASEFOLD_FL

/// Flags that stop changes to an inode (immutable, append-only): a replica lifts them for
/// the moment it applies a change the master made before they were set.
pub const GUARD_FLAGS: u32 = 0x0000_0010 | 0x0000_0020;

/// A mutation plus the timestamps it produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub kind: OpKind,
    pub touch: Vec<Touch>,
}

impl Op {
    pub fn new(kind: OpKind) -> Self {
        Self {
            kind,
            touch: Vec::new(),
        }
    }

    pub fn with_touch(mut self, t: Touch) -> Self {
        self.touch.push(t);
        self
    }

    /// The path [`Touch::Own`] and [`Touch::Parent`] refer to.
    pub fn primary_path(&self) -> Option<&WirePath> {
        use OpKind::*;
        match &self.kind {
            Create { path, .. }
            | Mknod { path, .. }
            | Mkdir { path, .. }
            | Symlink { path, .. }
            | Unlink { path }
            | Rmdir { path }
            | SetAttr { path, .. }
            | Write { path, .. }
            | Fallocate { path, .. }
            | CopyRange { path, .. }
            | SetXattr { path, .. }
            | RemoveXattr { path, .. }
            | SetTimes { path }
            | RemoveTree { path }
            | SetFlags { path, .. } => Some(path),
            Link { new, .. } => Some(new),
            Rename { to, .. } => Some(to),
            Fsync { path, .. } => path.as_ref(),
        }
    }

    /// Short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        use OpKind::*;
        match &self.kind {
            Create { .. } => "create",
            Mknod { .. } => "mknod",
            Mkdir { .. } => "mkdir",
            Symlink { .. } => "symlink",
            Link { .. } => "link",
            Unlink { .. } => "unlink",
            Rmdir { .. } => "rmdir",
            Rename { .. } => "rename",
            SetAttr { .. } => "setattr",
            Write { .. } => "write",
            Fallocate { .. } => "fallocate",
            CopyRange { .. } => "copy_file_range",
            SetXattr { .. } => "setxattr",
            RemoveXattr { .. } => "removexattr",
            Fsync { .. } => "fsync",
            SetTimes { .. } => "settimes",
            RemoveTree { .. } => "remove_tree",
            SetFlags { .. } => "setflags",
        }
    }

    /// Bytes of file data this op carries (for accounting).
    pub fn data_len(&self) -> usize {
        match &self.kind {
            OpKind::Write { data, .. } => data.len(),
            _ => 0,
        }
    }

    /// Appends the encoding of this op to `out`.
    ///
    /// # Panics
    /// If a field exceeds its protocol maximum: ops are built by the master from validated
    /// inputs, and exceeding a limit there is a bug, not bad input.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer { out };
        use OpKind::*;
        let attr = |w: &mut Writer<'_>, a: &Attr| {
            w.u32(a.mode);
            w.u32(a.uid);
            w.u32(a.gid);
        };
        match &self.kind {
            Create { path, attr: a } => {
                w.u8(1);
                w.path(path);
                attr(&mut w, a);
            }
            Mknod {
                path,
                kind,
                rdev,
                attr: a,
            } => {
                w.u8(2);
                w.path(path);
                w.u8(*kind as u8);
                w.u64(*rdev);
                attr(&mut w, a);
            }
            Mkdir { path, attr: a } => {
                w.u8(3);
                w.path(path);
                attr(&mut w, a);
            }
            Symlink {
                path,
                target,
                attr: a,
            } => {
                assert!(target.len() <= MAX_SYMLINK);
                w.u8(4);
                w.path(path);
                w.bytes(target);
                attr(&mut w, a);
            }
            Link { existing, new } => {
                w.u8(5);
                w.path(existing);
                w.path(new);
            }
            Unlink { path } => {
                w.u8(6);
                w.path(path);
            }
            Rmdir { path } => {
                w.u8(7);
                w.path(path);
            }
            Rename { from, to, flags } => {
                w.u8(8);
                w.path(from);
                w.path(to);
                w.u32(*flags);
            }
            SetAttr {
                path,
                size,
                attr: a,
            } => {
                w.u8(9);
                w.path(path);
                match size {
                    Some(s) => {
                        w.u8(1);
                        w.u64(*s);
                    }
                    None => w.u8(0),
                }
                attr(&mut w, a);
            }
            Write { path, offset, data } => {
                write_head(&mut w, path, *offset, data.len());
                w.out.extend_from_slice(data);
            }
            Fallocate {
                path,
                mode,
                offset,
                len,
            } => {
                w.u8(11);
                w.path(path);
                w.i32(*mode);
                w.u64(*offset);
                w.u64(*len);
            }
            CopyRange {
                src,
                src_offset,
                path,
                offset,
                len,
            } => {
                w.u8(12);
                w.path(src);
                w.u64(*src_offset);
                w.path(path);
                w.u64(*offset);
                w.u64(*len);
            }
            SetXattr {
                path,
                name,
                value,
                flags,
            } => {
                assert!(name.len() <= MAX_XATTR_NAME && value.len() <= MAX_XATTR_VALUE);
                w.u8(13);
                w.path(path);
                w.bytes(name);
                w.bytes(value);
                w.i32(*flags);
            }
            RemoveXattr { path, name } => {
                assert!(name.len() <= MAX_XATTR_NAME);
                w.u8(14);
                w.path(path);
                w.bytes(name);
            }
            Fsync { path, datasync } => {
                w.u8(15);
                match path {
                    Some(p) => {
                        w.u8(1);
                        w.path(p);
                    }
                    None => w.u8(0),
                }
                w.u8(u8::from(*datasync));
            }
            SetTimes { path } => {
                w.u8(16);
                w.path(path);
            }
            RemoveTree { path } => {
                w.u8(17);
                w.path(path);
            }
            SetFlags {
                path,
                flags,
                projid,
            } => {
                w.u8(18);
                w.path(path);
                w.u32(*flags);
                w.u32(*projid);
            }
        }
        encode_touches(&mut w, &self.touch);
    }

    /// Decodes one op from the front of `r`.
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<Op, DecodeError> {
        use OpKind::*;
        fn attr(r: &mut Reader<'_>) -> Result<Attr, DecodeError> {
            let mode = r.u32("mode")?;
            if mode & !0o7777 != 0 {
                return Err(DecodeError::Invalid("mode has bits beyond 0o7777"));
            }
            Ok(Attr {
                mode,
                uid: r.u32("uid")?,
                gid: r.u32("gid")?,
            })
        }
        fn xattr_name(r: &mut Reader<'_>) -> Result<Vec<u8>, DecodeError> {
            let name = r.bytes("xattr name", MAX_XATTR_NAME)?;
            if name.is_empty() || name.contains(&0) {
                return Err(DecodeError::Invalid("xattr name empty or has NUL"));
            }
            Ok(name)
        }
        fn times(r: &mut Reader<'_>) -> Result<Times, DecodeError> {
            Ok(Times {
                atime: r.timespec("atime")?,
                mtime: r.timespec("mtime")?,
            })
        }
        let tag = r.u8("op tag")?;
        let kind = match tag {
            1 => Create {
                path: r.path()?,
                attr: attr(r)?,
            },
            2 => Mknod {
                path: r.path()?,
                kind: NodeKind::from_u8(r.u8("node kind")?)?,
                rdev: r.u64("rdev")?,
                attr: attr(r)?,
            },
            3 => Mkdir {
                path: r.path()?,
                attr: attr(r)?,
            },
            4 => Symlink {
                path: r.path()?,
                target: {
                    let t = r.bytes("symlink target", MAX_SYMLINK)?;
                    if t.is_empty() || t.contains(&0) {
                        return Err(DecodeError::Invalid("symlink target empty or has NUL"));
                    }
                    t
                },
                attr: attr(r)?,
            },
            5 => Link {
                existing: r.path()?,
                new: r.path()?,
            },
            6 => Unlink { path: r.path()? },
            7 => Rmdir { path: r.path()? },
            8 => {
                let from = r.path()?;
                let to = r.path()?;
                let flags = r.u32("rename flags")?;
                if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
                    || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
                {
                    return Err(DecodeError::Invalid("rename flags"));
                }
                Rename { from, to, flags }
            }
            9 => SetAttr {
                path: r.path()?,
                size: match r.u8("size flag")? {
                    0 => None,
                    1 => Some(r.u64("size")?),
                    _ => return Err(DecodeError::Invalid("size flag")),
                },
                attr: attr(r)?,
            },
            10 => Write {
                path: r.path()?,
                offset: r.u64("offset")?,
                data: r.data("write data", MAX_WRITE)?,
            },
            11 => Fallocate {
                path: r.path()?,
                mode: r.i32("fallocate mode")?,
                offset: r.u64("offset")?,
                len: r.u64("length")?,
            },
            12 => CopyRange {
                src: r.path()?,
                src_offset: r.u64("offset")?,
                path: r.path()?,
                offset: r.u64("offset")?,
                len: r.u64("length")?,
            },
            13 => SetXattr {
                path: r.path()?,
                name: xattr_name(r)?,
                value: r.bytes("xattr value", MAX_XATTR_VALUE)?,
                flags: r.i32("xattr flags")?,
            },
            14 => RemoveXattr {
                path: r.path()?,
                name: xattr_name(r)?,
            },
            15 => Fsync {
                path: match r.u8("fsync path flag")? {
                    0 => None,
                    1 => Some(r.path()?),
                    _ => return Err(DecodeError::Invalid("fsync path flag")),
                },
                datasync: match r.u8("datasync")? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Invalid("datasync flag")),
                },
            },
            16 => SetTimes { path: r.path()? },
            17 => RemoveTree { path: r.path()? },
            18 => SetFlags {
                path: r.path()?,
                flags: r.u32("inode flags")?,
                projid: r.u32("project id")?,
            },
            tag => return Err(DecodeError::BadTag { what: "op", tag }),
        };
        let n = r.u8("touch count")? as usize;
        if n > MAX_TOUCH {
            return Err(DecodeError::TooLarge {
                what: "touch list",
                len: n,
                max: MAX_TOUCH,
            });
        }
        let mut touch = Vec::with_capacity(n);
        for _ in 0..n {
            touch.push(match r.u8("touch tag")? {
                1 => Touch::Own(times(r)?),
                2 => Touch::Parent(times(r)?),
                3 => Touch::Path(r.path()?, times(r)?),
                tag => return Err(DecodeError::BadTag { what: "touch", tag }),
            });
        }
        Ok(Op { kind, touch })
    }

    /// Decodes exactly one op from `buf`.
    pub fn decode(buf: &[u8]) -> Result<Op, DecodeError> {
        let mut r = Reader::new(buf);
        let op = Self::decode_from(&mut r)?;
        r.finish()?;
        Ok(op)
    }
}

/// Everything of a Write op before its data: tag, path, offset and the data's length.
fn write_head(w: &mut Writer<'_>, path: &WirePath, offset: u64, len: usize) {
    assert!(len <= MAX_WRITE);
    w.u8(10);
    w.path(path);
    w.u64(offset);
    w.u32(len as u32);
}

/// The touch list that ends every op.
fn encode_touches(w: &mut Writer<'_>, touch: &[Touch]) {
    assert!(touch.len() <= MAX_TOUCH);
    w.u8(touch.len() as u8);
    for t in touch {
        let times = match t {
            Touch::Own(times) => {
                w.u8(1);
                times
            }
            Touch::Parent(times) => {
                w.u8(2);
                times
            }
            Touch::Path(p, times) => {
                w.u8(3);
                w.path(p);
                times
            }
        };
        w.timespec(times.atime);
        w.timespec(times.mtime);
    }
}

/// Encodes a Write op straight into a shared buffer, copying `data` once: the same bytes as
/// `Op { kind: OpKind::Write { .. }, touch }.encode(..)`, without first copying `data` into
/// an owned op (the master's write path handles every replicated byte).
pub fn encode_write(
    path: &WirePath,
    offset: u64,
    data: &[u8],
    touch: &[Touch],
) -> std::sync::Arc<[u8]> {
    let mut head = Vec::new();
    write_head(&mut Writer { out: &mut head }, path, offset, data.len());
    let mut tail = Vec::new();
    encode_touches(&mut Writer { out: &mut tail }, touch);
    let mut out = std::sync::Arc::<[u8]>::new_uninit_slice(head.len() + data.len() + tail.len());
    let buf = std::sync::Arc::get_mut(&mut out).expect("fresh Arc is unique");
    let parts: [&[u8]; 3] = [&head, data, &tail];
    let mut at = 0;
    for part in parts {
        // SAFETY: `buf` has room for every part (its length is their sum); the source and
        // destination do not overlap (the Arc is freshly allocated).
        unsafe {
            std::ptr::copy_nonoverlapping(
                part.as_ptr(),
                buf[at..].as_mut_ptr().cast::<u8>(),
                part.len(),
            )
        };
        at += part.len();
    }
    // SAFETY: every byte of the slice was written just above.
    unsafe { out.assume_init() }
}

/// Most ops in one batch frame.
pub const MAX_BATCH: usize = 65536;

/// Encodes a batch of ops as an [`crate::FrameType::Ops`] payload: the first op has the frame's
/// sequence number and each next op the one after.
pub fn encode_batch<'a>(ops: impl IntoIterator<Item = &'a Op>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let mut n = 0u32;
    for op in ops {
        op.encode(out);
        n += 1;
    }
    assert!(n as usize <= MAX_BATCH);
    out[start..start + 4].copy_from_slice(&n.to_le_bytes());
}

/// Decodes an ops batch payload.
pub fn decode_batch(buf: &[u8]) -> Result<Vec<Op>, DecodeError> {
    decode_batch_from(Reader::new(buf))
}

/// Decodes an ops batch payload whose write data stay slices of `buf`: the slave applies every
/// replicated byte, and this spares it one copy of each.
pub fn decode_batch_shared(buf: &Bytes) -> Result<Vec<Op>, DecodeError> {
    decode_batch_from(Reader::shared(buf))
}

fn decode_batch_from(mut r: Reader<'_>) -> Result<Vec<Op>, DecodeError> {
    let n = r.u32("batch count")? as usize;
    if n > MAX_BATCH {
        return Err(DecodeError::TooLarge {
            what: "batch",
            len: n,
            max: MAX_BATCH,
        });
    }
    // Each op is at least two bytes, so this bounds the allocation by the input.
    let mut ops = Vec::with_capacity(n.min(r.remaining() / 2));
    for _ in 0..n {
        ops.push(Op::decode_from(&mut r)?);
    }
    r.finish()?;
    Ok(ops)
}
