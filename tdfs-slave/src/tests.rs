//! Applier tests against temp dirs, and session tests against an in-process listener.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use tdfs_protocol::op::{RENAME_EXCHANGE, RENAME_NOREPLACE};
use tdfs_protocol::{Attr, NodeKind, Op, OpKind, Times, Timespec, Touch, WirePath};

use crate::apply::Applier;

fn p(s: &str) -> WirePath {
    WirePath::parse(s.as_bytes()).unwrap()
}

fn attr(mode: u32, uid: u32, gid: u32) -> Attr {
    Attr { mode, uid, gid }
}

fn times(sec: i64, nsec: u32) -> Times {
    Times {
        atime: Timespec {
            sec: sec - 100,
            nsec: nsec / 2,
        },
        mtime: Timespec { sec, nsec },
    }
}

fn setup() -> (tempfile::TempDir, Applier) {
    // SAFETY: umask has no preconditions; the slave runs with 0 so modes are exact.
    unsafe { libc::umask(0) };
    let d = tempfile::tempdir_in("/tmp").unwrap();
    let a = Applier::open(d.path()).unwrap();
    (d, a)
}

fn op(kind: OpKind) -> Op {
    Op::new(kind)
}

fn lmeta(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap()
}

fn errno_of(r: io::Result<()>) -> i32 {
    r.expect_err("op should fail").raw_os_error().unwrap()
}

fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 1024];
    // SAFETY: strings are NUL-terminated and the buffer pointer/length are valid.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        None
    } else {
        buf.truncate(r as usize);
        Some(buf)
    }
}

#[test]
fn create_sets_exact_attrs_and_times() {
    let (d, mut a) = setup();
    a.apply(&op(OpKind::Mkdir {
        path: p("dir"),
        attr: attr(0o2755, 10, 20),
    }))
    .unwrap();
    a.apply(
        &op(OpKind::Create {
            path: p("dir/f"),
            attr: attr(0o4751, 1000, 2000),
        })
        .with_touch(Touch::Own(times(1_600_000_000, 123_456_789)))
        .with_touch(Touch::Parent(times(1_500_000_000, 987_654_321))),
    )
    .unwrap();
    let m = lmeta(&d.path().join("dir/f"));
    assert!(m.is_file());
    assert_eq!(m.mode() & 0o7777, 0o4751);
    assert_eq!((m.uid(), m.gid(), m.len()), (1000, 2000, 0));
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_600_000_000, 123_456_789));
    assert_eq!(
        (m.atime(), m.atime_nsec()),
        (1_599_999_900, 123_456_789 / 2)
    );
    let dm = lmeta(&d.path().join("dir"));
    assert!(dm.is_dir());
    assert_eq!(dm.mode() & 0o7777, 0o2755);
    assert_eq!((dm.uid(), dm.gid()), (10, 20));
    assert_eq!((dm.mtime(), dm.mtime_nsec()), (1_500_000_000, 987_654_321));

    // Mkdir over an existing directory only fixes its attributes.
    a.apply(&op(OpKind::Mkdir {
        path: p("dir"),
        attr: attr(0o700, 0, 0),
    }))
    .unwrap();
    let dm = lmeta(&d.path().join("dir"));
    assert_eq!((dm.mode() & 0o7777, dm.uid(), dm.gid()), (0o700, 0, 0));
    assert!(d.path().join("dir/f").exists());
}

#[test]
fn create_replaces_existing() {
    let (d, mut a) = setup();
    fs::write(d.path().join("f"), b"old content").unwrap();
    // A second name keeps the old inode alive so we can tell it was replaced, not truncated.
    fs::hard_link(d.path().join("f"), d.path().join("keep")).unwrap();
    a.apply(&op(OpKind::Create {
        path: p("f"),
        attr: attr(0o644, 0, 0),
    }))
    .unwrap();
    let m = lmeta(&d.path().join("f"));
    assert_eq!(m.len(), 0);
    assert_eq!(fs::read(d.path().join("keep")).unwrap(), b"old content");
    assert_eq!(lmeta(&d.path().join("keep")).nlink(), 1);
    // An existing symlink is replaced, not followed.
    std::os::unix::fs::symlink("f", d.path().join("l")).unwrap();
    a.apply(&op(OpKind::Create {
        path: p("l"),
        attr: attr(0o600, 0, 0),
    }))
    .unwrap();
    assert!(lmeta(&d.path().join("l")).is_file());
    // A directory is not silently replaced by a file.
    fs::create_dir(d.path().join("dir")).unwrap();
    let r = a.apply(&op(OpKind::Create {
        path: p("dir"),
        attr: attr(0o600, 0, 0),
    }));
    assert_eq!(errno_of(r), libc::EISDIR);
}

#[test]
fn namespace_ops() {
    let (d, mut a) = setup();
    let r = d.path();
    a.apply(&op(OpKind::Mknod {
        path: p("fifo"),
        kind: NodeKind::Fifo,
        rdev: 0,
        attr: attr(0o640, 5, 6),
    }))
    .unwrap();
    let m = lmeta(&r.join("fifo"));
    assert!(m.file_type().is_fifo());
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, 5, 6));
    a.apply(&op(OpKind::Mknod {
        path: p("chr"),
        kind: NodeKind::Char,
        rdev: libc::makedev(1, 3),
        attr: attr(0o666, 0, 0),
    }))
    .unwrap();
    let m = lmeta(&r.join("chr"));
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), libc::makedev(1, 3));
    a.apply(&op(OpKind::Mknod {
        path: p("reg"),
        kind: NodeKind::Regular,
        rdev: 0,
        attr: attr(0o1644, 0, 0),
    }))
    .unwrap();
    assert!(lmeta(&r.join("reg")).is_file());
    assert_eq!(lmeta(&r.join("reg")).mode() & 0o7777, 0o1644);

    a.apply(
        &op(OpKind::Symlink {
            path: p("sym"),
            target: b"/nonexistent/target".to_vec(),
            attr: attr(0o777, 7, 8),
        })
        .with_touch(Touch::Own(times(1_400_000_000, 1))),
    )
    .unwrap();
    let m = lmeta(&r.join("sym"));
    assert!(m.file_type().is_symlink());
    assert_eq!((m.uid(), m.gid()), (7, 8));
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_400_000_000, 1));
    assert_eq!(
        fs::read_link(r.join("sym")).unwrap(),
        Path::new("/nonexistent/target")
    );

    a.apply(&op(OpKind::Link {
        existing: p("reg"),
        new: p("reg2"),
    }))
    .unwrap();
    assert_eq!(lmeta(&r.join("reg")).nlink(), 2);
    // Hard-linking a symlink links the symlink itself.
    a.apply(&op(OpKind::Link {
        existing: p("sym"),
        new: p("sym2"),
    }))
    .unwrap();
    assert!(lmeta(&r.join("sym2")).file_type().is_symlink());

    a.apply(&op(OpKind::Unlink { path: p("reg2") })).unwrap();
    assert!(!r.join("reg2").exists());
    assert_eq!(lmeta(&r.join("reg")).nlink(), 1);

    fs::write(r.join("a"), b"A").unwrap();
    fs::write(r.join("b"), b"B").unwrap();
    let e = a.apply(&op(OpKind::Rename {
        from: p("a"),
        to: p("b"),
        flags: RENAME_NOREPLACE,
    }));
    assert_eq!(errno_of(e), libc::EEXIST);
    a.apply(&op(OpKind::Rename {
        from: p("a"),
        to: p("b"),
        flags: RENAME_EXCHANGE,
    }))
    .unwrap();
    assert_eq!(fs::read(r.join("a")).unwrap(), b"B");
    assert_eq!(fs::read(r.join("b")).unwrap(), b"A");
    a.apply(&op(OpKind::Mkdir {
        path: p("d"),
        attr: attr(0o755, 0, 0),
    }))
    .unwrap();
    a.apply(
        &op(OpKind::Rename {
            from: p("a"),
            to: p("d/c"),
            flags: 0,
        })
        .with_touch(Touch::Parent(times(1_300_000_000, 5)))
        .with_touch(Touch::Path(WirePath::root(), times(1_300_000_001, 6))),
    )
    .unwrap();
    assert_eq!(fs::read(r.join("d/c")).unwrap(), b"B");
    assert_eq!(lmeta(&r.join("d")).mtime_nsec(), 5);
    let rm = lmeta(r);
    assert_eq!((rm.mtime(), rm.mtime_nsec()), (1_300_000_001, 6));

    let e = a.apply(&op(OpKind::Rmdir { path: p("d") }));
    assert_eq!(errno_of(e), libc::ENOTEMPTY);
    a.apply(&op(OpKind::Unlink { path: p("d/c") })).unwrap();
    a.apply(&op(OpKind::Rmdir { path: p("d") })).unwrap();
    assert!(!r.join("d").exists());
}

#[test]
fn data_and_metadata_ops() {
    let (d, mut a) = setup();
    let r = d.path();
    a.apply(&op(OpKind::Create {
        path: p("f"),
        attr: attr(0o644, 0, 0),
    }))
    .unwrap();
    for (i, chunk) in [b"hello ".as_slice(), b"world"].iter().enumerate() {
        a.apply(&op(OpKind::Write {
            path: p("f"),
            offset: (i * 6) as u64,
            data: chunk.to_vec().into(),
        }))
        .unwrap();
    }
    a.apply(
        &op(OpKind::Write {
            path: p("f"),
            offset: 20,
            data: b"!".to_vec().into(),
        })
        .with_touch(Touch::Own(times(1_700_000_000, 999_999_999))),
    )
    .unwrap();
    let mut want = b"hello world".to_vec();
    want.resize(20, 0);
    want.push(b'!');
    assert_eq!(fs::read(r.join("f")).unwrap(), want);
    let m = lmeta(&r.join("f"));
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_700_000_000, 999_999_999));

    a.apply(&op(OpKind::SetAttr {
        path: p("f"),
        size: Some(5),
        attr: attr(0o6711, 33, 44),
    }))
    .unwrap();
    let m = lmeta(&r.join("f"));
    assert_eq!(m.len(), 5);
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o6711, 33, 44));
    // Changing only the owner keeps the setuid bits the master still reports.
    a.apply(&op(OpKind::SetAttr {
        path: p("f"),
        size: None,
        attr: attr(0o6711, 34, 44),
    }))
    .unwrap();
    let m = lmeta(&r.join("f"));
    assert_eq!((m.mode() & 0o7777, m.uid()), (0o6711, 34));

    a.apply(&op(OpKind::Fallocate {
        path: p("f"),
        mode: 0,
        offset: 0,
        len: 4096,
    }))
    .unwrap();
    assert_eq!(lmeta(&r.join("f")).len(), 4096);
    a.apply(&op(OpKind::SetAttr {
        path: p("f"),
        size: Some(5),
        attr: attr(0o644, 0, 0),
    }))
    .unwrap();

    a.apply(&op(OpKind::Create {
        path: p("g"),
        attr: attr(0o644, 0, 0),
    }))
    .unwrap();
    a.apply(&op(OpKind::CopyRange {
        src: p("f"),
        src_offset: 1,
        path: p("g"),
        offset: 2,
        len: 100,
    }))
    .unwrap();
    assert_eq!(fs::read(r.join("g")).unwrap(), b"\0\0ello");

    a.apply(&op(OpKind::SetXattr {
        path: p("g"),
        name: b"user.k".to_vec(),
        value: b"v1".to_vec(),
        flags: 0,
    }))
    .unwrap();
    assert_eq!(
        getxattr(&r.join("g"), "user.k").as_deref(),
        Some(&b"v1"[..])
    );
    let e = a.apply(&op(OpKind::SetXattr {
        path: p("g"),
        name: b"user.k".to_vec(),
        value: b"v2".to_vec(),
        flags: libc::XATTR_CREATE,
    }));
    assert_eq!(errno_of(e), libc::EEXIST);
    a.apply(&op(OpKind::RemoveXattr {
        path: p("g"),
        name: b"user.k".to_vec(),
    }))
    .unwrap();
    assert_eq!(getxattr(&r.join("g"), "user.k"), None);
    // trusted.* works on symlinks too, and acts on the link, not its target.
    std::os::unix::fs::symlink("g", r.join("l")).unwrap();
    a.apply(&op(OpKind::SetXattr {
        path: p("l"),
        name: b"trusted.t".to_vec(),
        value: b"x".to_vec(),
        flags: 0,
    }))
    .unwrap();
    assert_eq!(
        getxattr(&r.join("l"), "trusted.t").as_deref(),
        Some(&b"x"[..])
    );
    assert_eq!(getxattr(&r.join("g"), "trusted.t"), None);

    a.apply(&op(OpKind::SetTimes { path: p("g") }).with_touch(Touch::Own(times(42, 7))))
        .unwrap();
    let m = lmeta(&r.join("g"));
    assert_eq!((m.mtime(), m.mtime_nsec(), m.atime()), (42, 7, -58));
    // Pre-epoch times are exact too (timespec: negative seconds, positive nanoseconds).
    a.apply(&op(OpKind::SetTimes { path: p("g") }).with_touch(Touch::Own(times(-86_400, 500))))
        .unwrap();
    let m = lmeta(&r.join("g"));
    assert_eq!((m.mtime(), m.mtime_nsec()), (-86_400, 500));
    a.apply(
        &op(OpKind::SetTimes {
            path: WirePath::root(),
        })
        .with_touch(Touch::Own(times(43, 8))),
    )
    .unwrap();
    assert_eq!(lmeta(r).mtime_nsec(), 8);
    a.apply(&op(OpKind::Fsync {
        path: Some(p("g")),
        datasync: false,
    }))
    .unwrap();
    a.apply(&op(OpKind::Fsync {
        path: Some(p("fifo-missing")),
        datasync: true,
    }))
    .unwrap_err();
    a.apply(&op(OpKind::Fsync {
        path: None,
        datasync: false,
    }))
    .unwrap();
    // Root attributes.
    a.apply(&op(OpKind::SetAttr {
        path: WirePath::root(),
        size: None,
        attr: attr(0o751, 3, 4),
    }))
    .unwrap();
    let m = lmeta(r);
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o751, 3, 4));
}

#[test]
fn write_cache_sees_renames() {
    let (d, mut a) = setup();
    let r = d.path();
    for name in ["x", "y"] {
        a.apply(&op(OpKind::Create {
            path: p(name),
            attr: attr(0o644, 0, 0),
        }))
        .unwrap();
    }
    let w = |path: &str, data: &[u8]| {
        op(OpKind::Write {
            path: p(path),
            offset: 0,
            data: data.to_vec().into(),
        })
    };
    a.apply(&w("x", b"1")).unwrap();
    a.apply(&op(OpKind::Rename {
        from: p("x"),
        to: p("y"),
        flags: RENAME_EXCHANGE,
    }))
    .unwrap();
    // "x" is now the other inode: a stale cached fd would write into "y".
    a.apply(&w("x", b"2")).unwrap();
    assert_eq!(fs::read(r.join("x")).unwrap(), b"2");
    assert_eq!(fs::read(r.join("y")).unwrap(), b"1");
}

#[test]
fn apply_error_returns_errno() {
    let (_d, mut a) = setup();
    assert_eq!(
        errno_of(a.apply(&op(OpKind::Unlink { path: p("missing") }))),
        libc::ENOENT
    );
    assert_eq!(
        errno_of(a.apply(&op(OpKind::Write {
            path: p("no/such/dir/f"),
            offset: 0,
            data: b"x".to_vec().into(),
        }))),
        libc::ENOENT
    );
}

/// Ops that reach through a symlink (in the middle or at the end of a path) to a directory
/// outside the root must fail and leave it untouched.
#[test]
fn confinement() {
    let (d, mut a) = setup();
    let r = d.path();
    let outside = tempfile::tempdir_in("/tmp").unwrap();
    let canary = outside.path().join("canary");
    fs::create_dir(&canary).unwrap();
    fs::write(canary.join("f"), b"precious").unwrap();
    fs::set_permissions(canary.join("f"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink(&canary, r.join("esc")).unwrap();
    std::os::unix::fs::symlink(canary.join("f"), r.join("lnk")).unwrap();
    fs::create_dir(r.join("sub")).unwrap();
    std::os::unix::fs::symlink("../esc", r.join("sub/up")).unwrap();
    let snapshot = |dir: &Path| {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                (
                    e.file_name(),
                    m.mode(),
                    m.uid(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.len(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = snapshot(&canary);
    let cm = lmeta(&canary);

    let a0 = attr(0o777, 1, 1);
    let through = [
        OpKind::Write {
            path: p("esc/f"),
            offset: 0,
            data: b"pwned".to_vec().into(),
        },
        OpKind::Write {
            path: p("sub/up/f"),
            offset: 0,
            data: b"pwned".to_vec().into(),
        },
        OpKind::Create {
            path: p("esc/new"),
            attr: a0,
        },
        OpKind::Create {
            path: p("esc/f"),
            attr: a0,
        },
        OpKind::Mkdir {
            path: p("esc/d"),
            attr: a0,
        },
        OpKind::Symlink {
            path: p("esc/s"),
            target: b"x".to_vec(),
            attr: a0,
        },
        OpKind::Mknod {
            path: p("esc/n"),
            kind: NodeKind::Fifo,
            rdev: 0,
            attr: a0,
        },
        OpKind::Rename {
            from: p("esc/f"),
            to: p("stolen"),
            flags: 0,
        },
        OpKind::Rename {
            from: p("sub"),
            to: p("esc/sub"),
            flags: 0,
        },
        OpKind::SetAttr {
            path: p("esc/f"),
            size: Some(0),
            attr: a0,
        },
        OpKind::Link {
            existing: p("esc/f"),
            new: p("hard"),
        },
        OpKind::Link {
            existing: p("sub"),
            new: p("esc/h"),
        },
        OpKind::Unlink { path: p("esc/f") },
        OpKind::SetXattr {
            path: p("esc/f"),
            name: b"user.x".to_vec(),
            value: b"1".to_vec(),
            flags: 0,
        },
        OpKind::SetXattr {
            path: p("lnk"),
            name: b"user.x".to_vec(),
            value: b"1".to_vec(),
            flags: 0,
        },
        OpKind::Fallocate {
            path: p("esc/f"),
            mode: 0,
            offset: 0,
            len: 1 << 20,
        },
        OpKind::CopyRange {
            src: p("esc/f"),
            src_offset: 0,
            path: p("sub/copy"),
            offset: 0,
            len: 8,
        },
        OpKind::Write {
            path: p("lnk"),
            offset: 0,
            data: b"pwned".to_vec().into(),
        },
        OpKind::SetAttr {
            path: p("lnk"),
            size: Some(0),
            attr: a0,
        },
        OpKind::Fsync {
            path: Some(p("esc/f")),
            datasync: false,
        },
        OpKind::SetTimes { path: p("esc/f") },
    ];
    for k in through {
        let name = format!("{k:?}");
        let mut o = op(k);
        if matches!(o.kind, OpKind::SetTimes { .. }) {
            o = o.with_touch(Touch::Own(times(1, 1)));
        }
        assert!(a.apply(&o).is_err(), "{name} should fail");
    }
    // Touches through the symlink fail too.
    let o =
        op(OpKind::SetTimes { path: p("sub") }).with_touch(Touch::Path(p("esc/f"), times(1, 1)));
    assert!(a.apply(&o).is_err());
    // A chmod of a final symlink is a no-op, never a chmod of its target.
    a.apply(&op(OpKind::SetAttr {
        path: p("lnk"),
        size: None,
        attr: attr(0o777, 0, 0),
    }))
    .unwrap();
    // Ownership of a symlink is the link's own; its target keeps its owner.
    a.apply(&op(OpKind::SetAttr {
        path: p("esc"),
        size: None,
        attr: attr(0o777, 1, 1),
    }))
    .unwrap();
    assert_eq!(lmeta(&r.join("esc")).uid(), 1);
    // Replacing the symlink itself is fine and leaves the target alone.
    a.apply(&op(OpKind::Create {
        path: p("lnk"),
        attr: attr(0o600, 0, 0),
    }))
    .unwrap();

    assert_eq!(snapshot(&canary), before);
    assert_eq!(fs::read(canary.join("f")).unwrap(), b"precious");
    assert_eq!(getxattr(&canary.join("f"), "user.x"), None);
    let cm2 = lmeta(&canary);
    assert_eq!(
        (cm.mode(), cm.uid(), cm.gid(), cm.mtime(), cm.mtime_nsec()),
        (
            cm2.mode(),
            cm2.uid(),
            cm2.gid(),
            cm2.mtime(),
            cm2.mtime_nsec()
        )
    );
    assert!(!r.join("stolen").exists() && !r.join("hard").exists());
}

mod session {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use tdfs_protocol::frame::{self, Frame, FrameType};
    use tdfs_protocol::msg::{Ack, ApplyError, Hello, HelloAck, Refuse, RefuseCode};
    use tdfs_protocol::{op as wire_op, Compression, FrameError, Op, OpKind};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::{attr, p};
    use crate::apply::Applier;
    use crate::listener::{self, Core, Shared};
    use tdfs_replication::position::State;

    struct Slave {
        addr: SocketAddr,
        shared: Arc<Shared>,
        root: tempfile::TempDir,
        _state: tempfile::TempDir,
    }

    async fn start() -> Slave {
        // SAFETY: umask has no preconditions.
        unsafe { libc::umask(0) };
        let root = tempfile::tempdir_in("/tmp").unwrap();
        let sd = tempfile::tempdir_in("/tmp").unwrap();
        let node = tdfs_replication::node::NodeState::open(sd.path()).unwrap();
        let state = State::open(&node, &root.path().canonicalize().unwrap()).unwrap();
        let core = Core {
            applier: Applier::open(root.path()).unwrap(),
            state,
            node,
            durable: 0,
            stash_dir: sd.path().join("stash"),
        };
        let shared = Shared::new(core, true, "test-slave".into());
        let l = listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(listener::serve(l, shared.clone()));
        Slave {
            addr,
            shared,
            root,
            _state: sd,
        }
    }

    struct Conn {
        s: TcpStream,
        buf: Vec<u8>,
    }

    impl Conn {
        async fn open(addr: SocketAddr) -> Conn {
            Conn {
                s: TcpStream::connect(addr).await.unwrap(),
                buf: Vec::new(),
            }
        }
        async fn send(&mut self, kind: FrameType, seq: u64, payload: &[u8]) {
            let f = frame::encode_vec(kind, seq, payload, Compression::Lzf);
            self.s.write_all(&f).await.unwrap();
        }
        async fn ops(&mut self, seq: u64, ops: &[Op]) {
            let mut payload = Vec::new();
            wire_op::encode_batch(ops, &mut payload);
            self.send(FrameType::Ops, seq, &payload).await;
        }
        /// The next frame, or None at EOF.
        async fn recv(&mut self) -> Option<Frame> {
            tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match frame::parse(&self.buf) {
                        Ok(f) => {
                            self.buf.drain(..f.wire_len);
                            // Receipt acks (sent before applying, for `--sync received`)
                            // are checked by their own test; the rest see applied acks.
                            if f.kind == FrameType::Ack {
                                let a = Ack::decode(&f.payload).unwrap();
                                if a.received > a.applied {
                                    continue;
                                }
                            }
                            return Some(f);
                        }
                        Err(FrameError::Incomplete) => {}
                        Err(e) => panic!("slave sent a bad frame: {e}"),
                    }
                    let mut chunk = [0u8; 4096];
                    match self.s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return None,
                        Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await
            .expect("timed out waiting for the slave")
        }
        async fn hello(&mut self, id: u8, next_seq: u64) -> Result<HelloAck, Refuse> {
            self.hello_as(
                tdfs_protocol::History::genesis([id; 16], 1),
                next_seq,
                &format!("test-master-{id}"),
            )
            .await
        }
        async fn hello_as(
            &mut self,
            history: tdfs_protocol::History,
            next_seq: u64,
            label: &str,
        ) -> Result<HelloAck, Refuse> {
            let h = Hello {
                proto_min: tdfs_protocol::msg::PROTO_MIN,
                proto_max: tdfs_protocol::msg::PROTO_MAX,
                history,
                next_seq,
                flags: 0,
                label: label.to_string(),
            };
            self.send(FrameType::Hello, 0, &h.encode()).await;
            let f = self.recv().await.expect("reply to hello");
            match f.kind {
                FrameType::HelloAck => Ok(HelloAck::decode(&f.payload).unwrap()),
                FrameType::Refuse => Err(Refuse::decode(&f.payload).unwrap()),
                k => panic!("unexpected {k:?}"),
            }
        }
        async fn ack(&mut self) -> Ack {
            let f = self.recv().await.expect("ack");
            assert_eq!(f.kind, FrameType::Ack);
            Ack::decode(&f.payload).unwrap()
        }
    }

    /// Connects until the previous session released the slot.
    async fn session(addr: SocketAddr, id: u8, next_seq: u64) -> (Conn, HelloAck) {
        for _ in 0..200 {
            let mut c = Conn::open(addr).await;
            match c.hello(id, next_seq).await {
                Ok(a) => return (c, a),
                Err(r) if r.code == RefuseCode::Busy => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(r) => panic!("refused: {r:?}"),
            }
        }
        panic!("slave stayed busy");
    }

    fn create(path: &str) -> Op {
        Op::new(OpKind::Create {
            path: p(path),
            attr: attr(0o640, 0, 0),
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handshake_ops_ack_busy_bye() {
        let sl = start().await;
        let (mut c, ha) = session(sl.addr, 1, 1).await;
        assert_eq!(
            (ha.proto, ha.history.set_id(), ha.applied),
            (tdfs_protocol::msg::PROTO_MAX, None, 0)
        );
        c.ops(
            1,
            &[
                Op::new(OpKind::Mkdir {
                    path: p("d"),
                    attr: attr(0o755, 0, 0),
                }),
                create("d/f"),
                Op::new(OpKind::Write {
                    path: p("d/f"),
                    offset: 0,
                    data: vec![b'z'; 100_000].into(),
                }),
            ],
        )
        .await;
        let a = c.ack().await;
        assert_eq!(a.applied, 3);
        assert_eq!(
            std::fs::read(sl.root.path().join("d/f")).unwrap(),
            vec![b'z'; 100_000]
        );

        // A second master of the same epoch is refused while the first is connected.
        // (It is told once it says Hello: a read-only verifier would be let in.)
        let mut c2 = Conn::open(sl.addr).await;
        let r = c2
            .hello_as(
                tdfs_protocol::History::genesis([1; 16], 1),
                1,
                "another-master",
            )
            .await
            .expect_err("a second master must be refused");
        assert_eq!(r.code, RefuseCode::Busy);
        assert!(
            r.message.contains("test-master-1 from 127.0.0.1"),
            "{}",
            r.message
        );
        assert!(c2.recv().await.is_none());

        // Two frames in one write; a durability barrier at the end.
        let mut payload = Vec::new();
        wire_op::encode_batch([&create("g")], &mut payload);
        let mut both = frame::encode_vec(FrameType::Ops, 4, &payload, Compression::None);
        payload.clear();
        wire_op::encode_batch(
            [&Op::new(OpKind::Fsync {
                path: None,
                datasync: false,
            })],
            &mut payload,
        );
        frame::encode(FrameType::Ops, 5, &payload, Compression::None, &mut both);
        c.s.write_all(&both).await.unwrap();
        let mut a = c.ack().await;
        if a.applied < 5 {
            a = c.ack().await;
        }
        assert_eq!((a.applied, a.durable), (5, 5));

        c.send(FrameType::Bye, 0, &[]).await;
        let a = c.ack().await;
        assert_eq!(a.applied, 5);
        assert!(c.recv().await.is_none());

        // The next session learns where the previous one stopped.
        let (mut c, ha) = session(sl.addr, 1, 6).await;
        assert_eq!((ha.history.set_id(), ha.applied), (Some([1; 16]), 5));
        // A frame out of sequence ends the session without applying anything.
        c.ops(9, &[create("out-of-order")]).await;
        assert!(c.recv().await.is_none());
        assert!(!sl.root.path().join("out-of-order").exists());
        assert!(sl.shared.core().state.applied == 5);
    }

    /// The slot holder is replaced by its own master reconnecting (its old connection is
    /// dead but nothing closed it) and by a master of a newer epoch; the replaced session
    /// applies nothing more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reconnecting_or_newer_master_takes_the_slot_over() {
        let sl = start().await;
        let (mut old, _) = session(sl.addr, 1, 1).await;
        old.ops(1, &[create("a")]).await;
        assert_eq!(old.ack().await.applied, 1);
        // The same master again, on a new connection.
        let (mut same, ha) = session(sl.addr, 1, 2).await;
        assert_eq!(ha.applied, 1);
        assert!(old.recv().await.is_none(), "the stale session must end");
        // Whatever the stale connection still sends goes nowhere (it may fail with EPIPE).
        let mut payload = Vec::new();
        wire_op::encode_batch(&[create("from-the-stale-session")], &mut payload);
        let f = frame::encode_vec(FrameType::Ops, 2, &payload, Compression::None);
        let _ = old.s.write_all(&f).await;
        same.ops(2, &[create("b")]).await;
        assert_eq!(same.ack().await.applied, 2);
        assert!(!sl.root.path().join("from-the-stale-session").exists());

        // A master of a newer epoch (promoted after seq 2) replaces it.
        let mut h = tdfs_protocol::History::genesis([1; 16], 1);
        h.epochs.push(tdfs_protocol::Epoch {
            number: 2,
            id: [2; 16],
            start: 3,
        });
        let mut newer = Conn::open(sl.addr).await;
        let ha = newer
            .hello_as(h, 3, "promoted-master")
            .await
            .expect("a newer epoch takes the slot over");
        assert_eq!(ha.applied, 2);
        assert!(same.recv().await.is_none(), "the replaced session must end");
        newer.ops(3, &[create("c")]).await;
        assert_eq!(newer.ack().await.applied, 3);
        // And the replaced master is now refused as fenced.
        let mut again = Conn::open(sl.addr).await;
        let r = again.hello(1, 3).await.expect_err("fenced");
        assert_eq!(r.code, RefuseCode::Fenced);
        assert_eq!(r.epoch.map(|e| e.number), Some(2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn apply_error_is_reported_and_not_skipped() {
        let sl = start().await;
        let (mut c, _) = session(sl.addr, 2, 10).await;
        c.ops(
            10,
            &[
                create("a"),
                Op::new(OpKind::Unlink { path: p("missing") }),
                create("b"),
            ],
        )
        .await;
        let f = c.recv().await.expect("apply error");
        assert_eq!(f.kind, FrameType::ApplyError);
        let e = ApplyError::decode(&f.payload).unwrap();
        assert_eq!((e.seq, e.errno), (11, libc::ENOENT));
        assert_eq!((e.op.as_str(), e.path.as_str()), ("unlink", "/missing"));
        assert_eq!(c.ack().await.applied, 10);
        assert!(c.recv().await.is_none());
        assert!(sl.root.path().join("a").exists());
        assert!(!sl.root.path().join("b").exists());
        // The master reconnects with its head further on and resends from the failed op.
        let (mut c, ha) = session(sl.addr, 2, 13).await;
        assert_eq!(ha.applied, 10);
        c.ops(11, &[create("missing"), create("b")]).await;
        assert_eq!(c.ack().await.applied, 12);
        assert!(sl.root.path().join("b").exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn version_mismatch_is_refused() {
        let sl = start().await;
        let mut c = Conn::open(sl.addr).await;
        let h = Hello {
            proto_min: 7,
            proto_max: 9,
            history: tdfs_protocol::History::genesis([3; 16], 1),
            next_seq: 1,
            flags: 0,
            label: "future".into(),
        };
        c.send(FrameType::Hello, 0, &h.encode()).await;
        let f = c.recv().await.unwrap();
        assert_eq!(f.kind, FrameType::Refuse);
        assert_eq!(
            Refuse::decode(&f.payload).unwrap().code,
            RefuseCode::Version
        );
    }

    /// A tiny xorshift generator: deterministic garbage without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        /// Between `min` and `min + spread - 1` random bytes.
        fn junk(&mut self, min: usize, spread: usize) -> Vec<u8> {
            let n = min + self.below(spread);
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_connections_leave_slave_alive_and_tree_untouched() {
        let sl = start().await;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut payload = Vec::new();
        wire_op::encode_batch([&create("x")], &mut payload);
        let good_ops = frame::encode_vec(FrameType::Ops, 1, &payload, Compression::None);
        let hello = Hello {
            proto_min: tdfs_protocol::msg::PROTO_MIN,
            proto_max: tdfs_protocol::msg::PROTO_MAX,
            history: tdfs_protocol::History::genesis([9; 16], 1),
            next_seq: 1,
            flags: 0,
            label: "fuzz".into(),
        };
        let good_hello = frame::encode_vec(FrameType::Hello, 0, &hello.encode(), Compression::None);
        for i in 0..60 {
            let mut bytes = Vec::new();
            let with_hello = i % 2 == 0;
            if with_hello {
                bytes.extend_from_slice(&good_hello);
            }
            match i % 6 {
                // Random bytes.
                0 | 1 => bytes.extend(rng.junk(1, 4096)),
                // A truncated ops frame.
                2 => bytes.extend_from_slice(&good_ops[..1 + rng.below(good_ops.len() - 1)]),
                // One flipped bit anywhere in an ops frame.
                3 => {
                    let mut f = good_ops.clone();
                    let at = rng.below(f.len());
                    f[at] ^= 1 << rng.below(8);
                    bytes.extend(f);
                }
                // Valid header, garbage payload with a correct crc.
                4 => {
                    let junk = rng.junk(0, 200);
                    bytes.extend(frame::encode_vec(
                        FrameType::Ops,
                        1,
                        &junk,
                        Compression::None,
                    ));
                }
                // A corrupted hello, then random bytes.
                _ => {
                    let mut h = good_hello.clone();
                    let at = rng.below(h.len());
                    h[at] = h[at].wrapping_add(1 + rng.below(255) as u8);
                    bytes = h;
                    bytes.extend(rng.junk(0, 100));
                }
            }
            let mut s = TcpStream::connect(sl.addr).await.unwrap();
            let _ = s.write_all(&bytes).await;
            let _ = s.shutdown().await;
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink)).await;
        }
        let names: Vec<_> = std::fs::read_dir(sl.root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.is_empty(), "tree changed: {names:?}");
        // Still serving.
        let (mut c, _) = session(sl.addr, 9, 1).await;
        c.ops(1, &[create("x")]).await;
        assert_eq!(c.ack().await.applied, 1);
        assert!(sl.root.path().join("x").exists());
    }
}

/// A ListDir answer: one frame for an empty directory, an errno for a missing one, and a
/// big directory split into frames of at most MAX_ENTRIES, all but the last saying `more`.
#[test]
fn listing_replies_split_big_directories() {
    use std::os::fd::AsFd;
    use tdfs_protocol::sync::{Listing, MAX_ENTRIES};
    let d = tempfile::tempdir_in("/tmp").unwrap();
    fs::create_dir(d.path().join("empty")).unwrap();
    fs::create_dir(d.path().join("big")).unwrap();
    for i in 0..MAX_ENTRIES + 1 {
        fs::write(d.path().join(format!("big/{i:05}")), b"").unwrap();
    }
    let root = crate::confine::open_root(d.path()).unwrap();
    let list = |dir: &str| -> Vec<Listing> {
        crate::session::listing_replies(root.as_fd(), 7, &p(dir))
            .into_iter()
            .map(|(kind, id, payload)| {
                assert_eq!((kind, id), (tdfs_protocol::FrameType::Listing, 7));
                Listing::decode(&payload).unwrap()
            })
            .collect()
    };
    let empty = list("empty");
    assert_eq!(empty.len(), 1);
    assert_eq!((empty[0].errno, empty[0].more), (0, false));
    assert!(empty[0].entries.is_empty());
    let missing = list("missing");
    assert_eq!(missing.len(), 1);
    assert_eq!((missing[0].errno, missing[0].more), (libc::ENOENT, false));
    let big = list("big");
    assert_eq!(big.len(), 2);
    assert_eq!((big[0].more, big[1].more), (true, false));
    assert_eq!(big[0].entries.len(), MAX_ENTRIES);
    let names: Vec<Vec<u8>> = big
        .iter()
        .flat_map(|l| l.entries.iter().map(|e| e.name.clone()))
        .collect();
    let want: Vec<Vec<u8>> = (0..MAX_ENTRIES + 1)
        .map(|i| format!("{i:05}").into_bytes())
        .collect();
    assert_eq!(names, want);
}

/// The pre-openat2 fallback refuses symlinks at every step just like openat2 does.
#[test]
fn fallback_walk_refuses_symlinks() {
    use std::os::fd::AsFd;
    let d = tempfile::tempdir_in("/tmp").unwrap();
    let outside = tempfile::tempdir_in("/tmp").unwrap();
    fs::create_dir_all(d.path().join("a/b")).unwrap();
    std::os::unix::fs::symlink(outside.path(), d.path().join("a/esc")).unwrap();
    let root = crate::confine::open_root(d.path()).unwrap();
    assert!(crate::confine::walk_dir(root.as_fd(), &p("a/b")).is_ok());
    assert!(crate::confine::walk_dir(root.as_fd(), &WirePath::root()).is_ok());
    for bad in ["a/esc", "a/esc/x"] {
        let e = crate::confine::walk_dir(root.as_fd(), &p(bad)).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
            "{bad}: {e}"
        );
        let e = crate::confine::open_dir(root.as_fd(), &p(bad)).unwrap_err();
        assert!(e.raw_os_error().is_some(), "{bad}: {e}");
    }
}
