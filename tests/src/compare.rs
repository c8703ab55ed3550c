//! Tree comparator: walks two trees with lstat (never following symlinks) and reports every
//! difference a replica must not have.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::{get_xattr, inode_flags, list_xattrs};

/// What differs at one path. "a" is the reference (the master's backing dir), "b" the
/// replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiffKind {
    /// Present in a, absent in b.
    Missing,
    /// Present in b, absent in a.
    Extra,
    FileType {
        a: String,
        b: String,
    },
    Size {
        a: u64,
        b: u64,
    },
    /// Same size, different bytes starting at `offset`.
    Content {
        offset: u64,
    },
    /// `mode & 0o7777`.
    Mode {
        a: u32,
        b: u32,
    },
    Uid {
        a: u32,
        b: u32,
    },
    Gid {
        a: u32,
        b: u32,
    },
    /// (seconds, nanoseconds).
    Mtime {
        a: (i64, i64),
        b: (i64, i64),
    },
    SymlinkTarget {
        a: PathBuf,
        b: PathBuf,
    },
    /// Device numbers of char/block devices (major, minor).
    Rdev {
        a: (u32, u32),
        b: (u32, u32),
    },
    XattrMissing {
        name: String,
    },
    XattrExtra {
        name: String,
    },
    XattrValue {
        name: String,
    },
    /// Inode flags (`lsattr`, the replicated ones) and project id.
    Flags {
        a: (u32, u32),
        b: (u32, u32),
    },
    /// The set of paths sharing this path's inode differs.
    HardLinks {
        a: Vec<PathBuf>,
        b: Vec<PathBuf>,
    },
    /// The comparator itself could not read something.
    Error {
        msg: String,
    },
}

/// One difference at one relative path ("." is the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    pub path: PathBuf,
    pub kind: DiffKind,
}

impl Diff {
    /// Short name of the kind ("content", "mode", ...), for assertions in tests.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            DiffKind::Missing => "missing",
            DiffKind::Extra => "extra",
            DiffKind::FileType { .. } => "type",
            DiffKind::Size { .. } => "size",
            DiffKind::Content { .. } => "content",
            DiffKind::Mode { .. } => "mode",
            DiffKind::Uid { .. } => "uid",
            DiffKind::Gid { .. } => "gid",
            DiffKind::Mtime { .. } => "mtime",
            DiffKind::SymlinkTarget { .. } => "symlink",
            DiffKind::Rdev { .. } => "rdev",
            DiffKind::XattrMissing { .. } => "xattr-missing",
            DiffKind::XattrExtra { .. } => "xattr-extra",
            DiffKind::XattrValue { .. } => "xattr-value",
            DiffKind::HardLinks { .. } => "hardlinks",
            DiffKind::Flags { .. } => "flags",
            DiffKind::Error { .. } => "error",
        }
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.path.display();
        match &self.kind {
            DiffKind::Missing => write!(f, "{p}: missing in replica"),
            DiffKind::Extra => write!(f, "{p}: extra in replica"),
            DiffKind::FileType { a, b } => write!(f, "{p}: file type {a} vs {b}"),
            DiffKind::Size { a, b } => write!(f, "{p}: size {a} vs {b}"),
            DiffKind::Content { offset } => {
                write!(f, "{p}: content differs from byte {offset}")
            }
            DiffKind::Mode { a, b } => write!(f, "{p}: mode {a:04o} vs {b:04o}"),
            DiffKind::Uid { a, b } => write!(f, "{p}: uid {a} vs {b}"),
            DiffKind::Gid { a, b } => write!(f, "{p}: gid {a} vs {b}"),
            DiffKind::Mtime { a, b } => {
                write!(f, "{p}: mtime {}.{:09} vs {}.{:09}", a.0, a.1, b.0, b.1)
            }
            DiffKind::SymlinkTarget { a, b } => {
                write!(f, "{p}: symlink target {} vs {}", a.display(), b.display())
            }
            DiffKind::Rdev { a, b } => write!(f, "{p}: device {}:{} vs {}:{}", a.0, a.1, b.0, b.1),
            DiffKind::XattrMissing { name } => write!(f, "{p}: xattr {name} missing in replica"),
            DiffKind::XattrExtra { name } => write!(f, "{p}: xattr {name} extra in replica"),
            DiffKind::XattrValue { name } => write!(f, "{p}: xattr {name} value differs"),
            DiffKind::Flags { a, b } => write!(
                f,
                "{p}: inode flags {:#x} project {} vs {:#x} project {}",
                a.0, a.1, b.0, b.1
            ),
            DiffKind::HardLinks { a, b } => write!(
                f,
                "{p}: hard-link group {:?} vs {:?}",
                a.iter()
                    .map(|x| x.display().to_string())
                    .collect::<Vec<_>>(),
                b.iter()
                    .map(|x| x.display().to_string())
                    .collect::<Vec<_>>()
            ),
            DiffKind::Error { msg } => write!(f, "{p}: cannot compare: {msg}"),
        }
    }
}

/// Which properties to compare.
#[derive(Debug, Clone, Copy)]
pub struct CompareOpts {
    /// mode bits, uid, gid, mtime (ns), device numbers.
    pub metadata: bool,
    /// user.* and trusted.* xattrs.
    pub xattrs: bool,
    /// Hard-link partition.
    pub hardlinks: bool,
    /// Also compare the metadata of the two roots themselves.
    pub root: bool,
}

impl CompareOpts {
    /// Everything.
    pub fn full() -> Self {
        CompareOpts {
            metadata: true,
            xattrs: true,
            hardlinks: true,
            root: true,
        }
    }

    /// Names, types, sizes, bytes and symlink targets only.
    pub fn content_only() -> Self {
        CompareOpts {
            metadata: false,
            xattrs: false,
            hardlinks: false,
            root: false,
        }
    }
}

struct Tree {
    entries: BTreeMap<PathBuf, Metadata>,
    errors: Vec<Diff>,
}

fn walk(root: &Path) -> Tree {
    let mut entries = BTreeMap::new();
    let mut errors = Vec::new();
    match std::fs::symlink_metadata(root) {
        Ok(m) => {
            entries.insert(PathBuf::from("."), m);
        }
        Err(e) => errors.push(Diff {
            path: PathBuf::from("."),
            kind: DiffKind::Error {
                msg: format!("lstat {}: {e}", root.display()),
            },
        }),
    }
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                errors.push(Diff {
                    path: rel_or_dot(&rel),
                    kind: DiffKind::Error {
                        msg: format!("readdir {}: {e}", dir.display()),
                    },
                });
                continue;
            }
        };
        for ent in rd {
            let ent = match ent {
                Ok(e) => e,
                Err(e) => {
                    errors.push(Diff {
                        path: rel_or_dot(&rel),
                        kind: DiffKind::Error {
                            msg: format!("readdir {}: {e}", dir.display()),
                        },
                    });
                    break;
                }
            };
            let child = rel.join(ent.file_name());
            match std::fs::symlink_metadata(root.join(&child)) {
                Ok(m) => {
                    if m.file_type().is_dir() {
                        stack.push(child.clone());
                    }
                    entries.insert(child, m);
                }
                // Vanished between readdir and lstat (tree still changing): treat as absent.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => errors.push(Diff {
                    path: child.clone(),
                    kind: DiffKind::Error {
                        msg: format!("lstat: {e}"),
                    },
                }),
            }
        }
    }
    Tree { entries, errors }
}

fn rel_or_dot(rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        rel.to_path_buf()
    }
}

fn type_name(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_file() {
        "file"
    } else if t.is_dir() {
        "dir"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "chardev"
    } else if t.is_block_device() {
        "blockdev"
    } else {
        "unknown"
    }
}

fn dev_pair(rdev: u64) -> (u32, u32) {
    (
        libc::major(rdev as libc::dev_t),
        libc::minor(rdev as libc::dev_t),
    )
}

/// Reads until `buf` is full or EOF; returns bytes read.
fn fill(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Streams both files; Ok(None) if equal, Ok(Some(offset)) of the first difference.
fn first_content_diff(a: &Path, b: &Path) -> io::Result<Option<u64>> {
    // O_NOATIME: comparing must not change what it compares (relatime would bump atime).
    let open = |p: &Path| {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOATIME)
            .open(p)
    };
    let mut fa = open(a)?;
    let mut fb = open(b)?;
    let mut ba = vec![0u8; 1 << 16];
    let mut bb = vec![0u8; 1 << 16];
    let mut off = 0u64;
    loop {
        let na = fill(&mut fa, &mut ba)?;
        let nb = fill(&mut fb, &mut bb)?;
        let n = na.min(nb);
        if let Some(i) = (0..n).find(|&i| ba[i] != bb[i]) {
            return Ok(Some(off + i as u64));
        }
        if na != nb {
            return Ok(Some(off + n as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        off += na as u64;
    }
}

fn xattr_map(path: &Path) -> io::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for name in list_xattrs(path)? {
        let name = String::from_utf8_lossy(&name).into_owned();
        if !(name.starts_with("user.") || name.starts_with("trusted.")) {
            continue;
        }
        if let Some(v) = get_xattr(path, &name)? {
            out.insert(name, v);
        }
    }
    Ok(out)
}

fn link_groups(t: &Tree) -> HashMap<PathBuf, Vec<PathBuf>> {
    let mut by_ino: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    for (p, m) in &t.entries {
        if !m.file_type().is_dir() {
            by_ino
                .entry((m.dev(), m.ino()))
                .or_default()
                .push(p.clone());
        }
    }
    let mut out = HashMap::new();
    for (_, mut g) in by_ino {
        g.sort();
        for p in &g {
            out.insert(p.clone(), g.clone());
        }
    }
    out
}

/// Compares everything (see [`CompareOpts::full`]).
pub fn compare_trees(a: &Path, b: &Path) -> Vec<Diff> {
    compare_trees_with(a, b, CompareOpts::full())
}

/// Compares trees `a` (reference) and `b` (replica) with the given options.
pub fn compare_trees_with(a: &Path, b: &Path, opts: CompareOpts) -> Vec<Diff> {
    let ta = walk(a);
    let tb = walk(b);
    let mut diffs = Vec::new();
    diffs.extend(ta.errors.iter().cloned());
    diffs.extend(tb.errors.iter().cloned());
    let mut push = |path: &Path, kind: DiffKind| {
        diffs.push(Diff {
            path: path.to_path_buf(),
            kind,
        })
    };

    for (p, ma) in &ta.entries {
        let Some(mb) = tb.entries.get(p) else {
            push(p, DiffKind::Missing);
            continue;
        };
        let is_root = p == Path::new(".");
        let (ka, kb) = (type_name(ma), type_name(mb));
        if ka != kb {
            push(
                p,
                DiffKind::FileType {
                    a: ka.into(),
                    b: kb.into(),
                },
            );
            continue;
        }
        let (pa, pb) = (a.join(p), b.join(p));
        if ka == "file" || ka == "symlink" {
            if ma.size() != mb.size() {
                push(
                    p,
                    DiffKind::Size {
                        a: ma.size(),
                        b: mb.size(),
                    },
                );
            } else if ka == "file" {
                match first_content_diff(&pa, &pb) {
                    Ok(None) => {}
                    Ok(Some(offset)) => push(p, DiffKind::Content { offset }),
                    Err(e) => push(
                        p,
                        DiffKind::Error {
                            msg: format!("read: {e}"),
                        },
                    ),
                }
            }
        }
        if ka == "symlink" {
            match (std::fs::read_link(&pa), std::fs::read_link(&pb)) {
                (Ok(x), Ok(y)) if x != y => push(p, DiffKind::SymlinkTarget { a: x, b: y }),
                (Ok(_), Ok(_)) => {}
                (x, y) => push(
                    p,
                    DiffKind::Error {
                        msg: format!("readlink: {x:?} / {y:?}"),
                    },
                ),
            }
        }
        if opts.metadata && (!is_root || opts.root) {
            let (xa, xb) = (ma.mode() & 0o7777, mb.mode() & 0o7777);
            // Linux symlink permissions are always 0777 and not settable: skip them.
            if xa != xb && ka != "symlink" {
                push(p, DiffKind::Mode { a: xa, b: xb });
            }
            if ma.uid() != mb.uid() {
                push(
                    p,
                    DiffKind::Uid {
                        a: ma.uid(),
                        b: mb.uid(),
                    },
                );
            }
            if ma.gid() != mb.gid() {
                push(
                    p,
                    DiffKind::Gid {
                        a: ma.gid(),
                        b: mb.gid(),
                    },
                );
            }
            let (ta_, tb_) = ((ma.mtime(), ma.mtime_nsec()), (mb.mtime(), mb.mtime_nsec()));
            if ta_ != tb_ {
                push(p, DiffKind::Mtime { a: ta_, b: tb_ });
            }
            if ka == "file" || ka == "dir" {
                match (inode_flags(&pa), inode_flags(&pb)) {
                    (Ok(fa), Ok(fb)) if fa != fb => push(p, DiffKind::Flags { a: fa, b: fb }),
                    (Ok(_), Ok(_)) => {}
                    (x, y) => push(
                        p,
                        DiffKind::Error {
                            msg: format!(
                                "inode flags: {:?} / {:?}",
                                x.err().map(|e| e.to_string()),
                                y.err().map(|e| e.to_string())
                            ),
                        },
                    ),
                }
            }
            if (ka == "chardev" || ka == "blockdev") && ma.rdev() != mb.rdev() {
                push(
                    p,
                    DiffKind::Rdev {
                        a: dev_pair(ma.rdev()),
                        b: dev_pair(mb.rdev()),
                    },
                );
            }
        }
        if opts.xattrs && (!is_root || opts.root) {
            match (xattr_map(&pa), xattr_map(&pb)) {
                (Ok(xa), Ok(xb)) => {
                    for (n, v) in &xa {
                        match xb.get(n) {
                            None => push(p, DiffKind::XattrMissing { name: n.clone() }),
                            Some(w) if w != v => push(p, DiffKind::XattrValue { name: n.clone() }),
                            Some(_) => {}
                        }
                    }
                    for n in xb.keys() {
                        if !xa.contains_key(n) {
                            push(p, DiffKind::XattrExtra { name: n.clone() });
                        }
                    }
                }
                (x, y) => push(
                    p,
                    DiffKind::Error {
                        msg: format!(
                            "xattrs: {:?} / {:?}",
                            x.err().map(|e| e.to_string()),
                            y.err().map(|e| e.to_string())
                        ),
                    },
                ),
            }
        }
    }
    for p in tb.entries.keys() {
        if !ta.entries.contains_key(p) {
            push(p, DiffKind::Extra);
        }
    }
    if opts.hardlinks {
        let ga = link_groups(&ta);
        let gb = link_groups(&tb);
        let mut reported: HashSet<Vec<PathBuf>> = HashSet::new();
        for p in ta.entries.keys() {
            let (Some(grp_a), Some(grp_b)) = (ga.get(p), gb.get(p)) else {
                continue;
            };
            if grp_a != grp_b && !reported.contains(grp_a) && !reported.contains(grp_b) {
                reported.insert(grp_a.clone());
                reported.insert(grp_b.clone());
                diffs.push(Diff {
                    path: p.clone(),
                    kind: DiffKind::HardLinks {
                        a: grp_a.clone(),
                        b: grp_b.clone(),
                    },
                });
            }
        }
    }
    diffs.sort_by(|x, y| x.path.cmp(&y.path));
    diffs
}

/// Formats the first 50 diffs (and how many more there are).
pub fn format_diffs(diffs: &[Diff]) -> String {
    let mut s = String::new();
    for d in diffs.iter().take(50) {
        s.push_str(&format!("  {d}\n"));
    }
    if diffs.len() > 50 {
        s.push_str(&format!("  ... and {} more\n", diffs.len() - 50));
    }
    s
}

/// Panics with the list of differences unless the trees are identical.
#[track_caller]
pub fn assert_identical(a: &Path, b: &Path) {
    let diffs = compare_trees(a, b);
    if !diffs.is_empty() {
        panic!(
            "trees differ: {} (reference) vs {} (replica), {} difference(s):\n{}",
            a.display(),
            b.display(),
            diffs.len(),
            format_diffs(&diffs)
        );
    }
}

/// Panics unless the trees have the same names, types, bytes and symlink targets.
#[track_caller]
pub fn assert_same_content(a: &Path, b: &Path) {
    let diffs = compare_trees_with(a, b, CompareOpts::content_only());
    if !diffs.is_empty() {
        panic!(
            "tree contents differ: {} vs {}, {} difference(s):\n{}",
            a.display(),
            b.display(),
            diffs.len(),
            format_diffs(&diffs)
        );
    }
}

/// Polls the comparator until the trees are identical; panics with the remaining
/// differences after `timeout`.
#[track_caller]
pub fn wait_identical(a: &Path, b: &Path, timeout: Duration) {
    if let Err(e) = try_wait_identical(a, b, timeout) {
        panic!("{e}");
    }
}

/// Like [`wait_identical`], returning the remaining differences as an error.
pub fn try_wait_identical(a: &Path, b: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let diffs = compare_trees(a, b);
        if diffs.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "trees still differ after {timeout:?}: {} vs {}, {} difference(s):\n{}",
                a.display(),
                b.display(),
                diffs.len(),
                format_diffs(&diffs)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
