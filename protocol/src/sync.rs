//! Messages of incremental sync and verification: directory listings, content digests,
//! and the paths a slave skipped while a sync was running.
//!
//! A listing entry carries everything a mirror must agree on (type, permission bits, owner,
//! size, mtime to the nanosecond, device number, symlink target, xattrs) plus the slave's
//! inode number and link count so hard-link groups can be compared.

use crate::path::{validate_name, WirePath, MAX_NAME};
use crate::wire::{DecodeError, Reader, Writer};
use crate::{op, Timespec};

/// Most entries in one `Listing` frame (a directory is sent in as many frames as needed).
pub const MAX_ENTRIES: usize = 4096;
/// Most xattrs per entry.
pub const MAX_XATTRS: usize = 1024;
/// Most paths in one `SyncMiss`.
pub const MAX_MISSES: usize = 4096;

/// `SyncBegin` payload flag (its one byte): the replica diverged from the sender's line, so
/// before the sync overwrites, removes or changes anything it holds, it stashes it.
pub const SYNC_STASH: u8 = 1;

/// File type as the `S_IFMT` bits of `st_mode` shifted right by 12.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    /// `st_mode` in full (type and permission bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Timespec,
    pub rdev: u64,
    pub ino: u64,
    pub nlink: u64,
    /// Symlink target (empty for other types).
    pub target: Vec<u8>,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Inode flags, only the bits of [`op::REPLICATED_FLAGS`] (0 where the filesystem has
    /// none, and for anything but regular files and directories).
    pub flags: u32,
    /// Project id (0 where the filesystem has none).
    pub projid: u32,
}

impl Entry {
    pub fn kind(&self) -> u32 {
        self.mode & 0o170000
    }
}

/// One frame of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// 0, or the errno that listing failed with (e.g. ENOENT, ENOTDIR).
    pub errno: i32,
    /// More frames of this listing follow.
    pub more: bool,
    pub entries: Vec<Entry>,
}

impl Listing {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer { out: &mut out };
        w.i32(self.errno);
        w.u8(u8::from(self.more));
        w.u32(self.entries.len() as u32);
        for e in &self.entries {
            assert!(e.name.len() <= MAX_NAME && e.xattrs.len() <= MAX_XATTRS);
            w.u8(e.name.len() as u8);
            w.out.extend_from_slice(&e.name);
            w.u32(e.mode);
            w.u32(e.uid);
            w.u32(e.gid);
            w.u64(e.size);
            w.timespec(e.mtime);
            w.u64(e.rdev);
            w.u64(e.ino);
            w.u64(e.nlink);
            w.bytes(&e.target);
            w.u16(e.xattrs.len() as u16);
            for (n, v) in &e.xattrs {
                w.bytes(n);
                w.bytes(v);
            }
            w.u32(e.flags);
            w.u32(e.projid);
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let errno = r.i32("errno")?;
        let more = r.u8("more")? != 0;
        let n = r.u32("entry count")? as usize;
        if n > MAX_ENTRIES {
            return Err(DecodeError::TooLarge {
                what: "listing",
                len: n,
                max: MAX_ENTRIES,
            });
        }
        let mut entries = Vec::with_capacity(n.min(r.remaining() / 64));
        for _ in 0..n {
            let len = r.u8("name length")? as usize;
            let name = r.bytes_exact(len, "name")?;
            validate_name(&name)?;
            let mode = r.u32("mode")?;
            let uid = r.u32("uid")?;
            let gid = r.u32("gid")?;
            let size = r.u64("size")?;
            let mtime = r.timespec("mtime")?;
            let rdev = r.u64("rdev")?;
            let ino = r.u64("ino")?;
            let nlink = r.u64("nlink")?;
            let target = r.bytes("symlink target", op::MAX_SYMLINK)?;
            let nx = r.u16("xattr count")? as usize;
            if nx > MAX_XATTRS {
                return Err(DecodeError::TooLarge {
                    what: "xattr list",
                    len: nx,
                    max: MAX_XATTRS,
                });
            }
            let mut xattrs = Vec::with_capacity(nx.min(64));
            for _ in 0..nx {
                let n = r.bytes("xattr name", op::MAX_XATTR_NAME)?;
                let v = r.bytes("xattr value", op::MAX_XATTR_VALUE)?;
                xattrs.push((n, v));
            }
            let flags = r.u32("inode flags")?;
            let projid = r.u32("project id")?;
            entries.push(Entry {
                name,
                mode,
                uid,
                gid,
                size,
                mtime,
                rdev,
                ino,
                nlink,
                target,
                xattrs,
                flags,
                projid,
            });
        }
        r.finish()?;
        Ok(Listing {
            errno,
            more,
            entries,
        })
    }
}

/// Request payload of `ListDir` and `Checksum`: one path.
pub fn encode_path(p: &WirePath) -> Vec<u8> {
    let mut out = Vec::new();
    Writer { out: &mut out }.path(p);
    out
}

pub fn decode_path(buf: &[u8]) -> Result<WirePath, DecodeError> {
    let mut r = Reader::new(buf);
    let p = r.path()?;
    r.finish()?;
    Ok(p)
}

/// Answer to `Checksum`: SHA-256 of the content, computed where the data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub errno: i32,
    pub size: u64,
    pub sha256: [u8; 32],
}

impl Digest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(44);
        let mut w = Writer { out: &mut out };
        w.i32(self.errno);
        w.u64(self.size);
        w.out.extend_from_slice(&self.sha256);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let errno = r.i32("errno")?;
        let size = r.u64("size")?;
        let sha256 = r.array("sha256")?;
        r.finish()?;
        Ok(Digest {
            errno,
            size,
            sha256,
        })
    }
}

/// Paths whose live ops a slave skipped during a sync (the master re-checks them).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Misses {
    pub paths: Vec<WirePath>,
}

impl Misses {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer { out: &mut out };
        let n = self.paths.len().min(MAX_MISSES);
        w.u32(n as u32);
        for p in &self.paths[..n] {
            w.path(p);
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let n = r.u32("miss count")? as usize;
        if n > MAX_MISSES {
            return Err(DecodeError::TooLarge {
                what: "miss list",
                len: n,
                max: MAX_MISSES,
            });
        }
        let mut paths = Vec::with_capacity(n.min(r.remaining() / 2));
        for _ in 0..n {
            paths.push(r.path()?);
        }
        r.finish()?;
        Ok(Misses { paths })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_digest_misses_roundtrip() {
        let l = Listing {
            errno: 0,
            more: true,
            entries: vec![Entry {
                name: b"f".to_vec(),
                mode: 0o100644,
                uid: 1,
                gid: 2,
                size: 3,
                mtime: Timespec { sec: -5, nsec: 7 },
                rdev: 0,
                ino: 99,
                nlink: 2,
                target: vec![],
                xattrs: vec![(b"user.a".to_vec(), b"v".to_vec())],
                flags: 0x20,
                projid: 7,
            }],
        };
        assert_eq!(Listing::decode(&l.encode()).unwrap(), l);
        let d = Digest {
            errno: 0,
            size: 9,
            sha256: [3; 32],
        };
        assert_eq!(Digest::decode(&d.encode()).unwrap(), d);
        let m = Misses {
            paths: vec![WirePath::parse(b"a/b").unwrap(), WirePath::root()],
        };
        assert_eq!(Misses::decode(&m.encode()).unwrap(), m);
        let p = WirePath::parse(b"x/y").unwrap();
        assert_eq!(decode_path(&encode_path(&p)).unwrap(), p);
        // A listing entry named ".." is refused.
        let mut bad = l.clone();
        bad.entries[0].name = b"..".to_vec();
        assert!(Listing::decode(&bad.encode()).is_err());
    }
}
