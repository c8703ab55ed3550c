//! One end-to-end test per mutating operation: a real mount, a real slave on loopback, the
//! op done through the mount, then the replica compared with the backing dir and the
//! content checked on both.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{
    symlink, DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use tdfs_tests::util::{
    assert_errno, check, cstr, get_xattr, lchown, mknod, names, pseudo_random, remove_xattr,
    rename2, set_times, set_xattr,
};
use tdfs_tests::Cluster;

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

fn lmeta(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

#[test]
fn op_create_excl() {
    let mut c = Cluster::single("create");
    let p = c.at("new.txt");
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&p)
        .expect("O_CREAT|O_EXCL on a new name");
    f.write_all(b"created").unwrap();
    drop(f);
    let e = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .expect_err("O_EXCL on an existing name must fail");
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    // O_CREAT without O_EXCL on an existing file keeps its content.
    drop(
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .unwrap(),
    );
    File::create(c.at("empty")).unwrap();
    fs::create_dir(c.at("sub")).unwrap();
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(c.at("sub/inner"))
        .unwrap()
        .write_all(b"inner")
        .unwrap();
    c.finish();
    for r in c.roots() {
        assert_eq!(fs::read(r.join("new.txt")).unwrap(), b"created");
        assert_eq!(lmeta(&r.join("new.txt")).mode() & 0o777, 0o640 & !umask());
        assert_eq!(fs::read(r.join("empty")).unwrap(), b"");
        assert_eq!(fs::read(r.join("sub/inner")).unwrap(), b"inner");
        assert_eq!(names(&r), vec!["empty", "new.txt", "sub"]);
    }
}

fn umask() -> u32 {
    // SAFETY: read-and-restore of the process umask.
    unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m as u32
    }
}

#[test]
fn op_mknod_fifo_socket_devices() {
    let mut c = Cluster::single("mknod");
    mknod(&c.at("fifo"), libc::S_IFIFO | 0o644, 0).expect("mkfifo");
    let l = UnixListener::bind(c.at("sock")).expect("bind unix socket on the mount");
    drop(l);
    mknod(&c.at("null"), libc::S_IFCHR | 0o666, libc::makedev(1, 3)).expect("mknod chr");
    mknod(&c.at("loop"), libc::S_IFBLK | 0o660, libc::makedev(7, 0)).expect("mknod blk");
    mknod(&c.at("plain"), libc::S_IFREG | 0o600, 0).expect("mknod regular");
    assert_errno(
        mknod(&c.at("fifo"), libc::S_IFIFO | 0o644, 0),
        libc::EEXIST,
        "mknod over an existing name",
    );
    c.finish();
    for r in c.roots() {
        assert!(lmeta(&r.join("fifo")).file_type().is_fifo());
        assert!(lmeta(&r.join("sock")).file_type().is_socket());
        let n = lmeta(&r.join("null"));
        assert!(n.file_type().is_char_device());
        assert_eq!(n.rdev(), libc::makedev(1, 3));
        let b = lmeta(&r.join("loop"));
        assert!(b.file_type().is_block_device());
        assert_eq!(b.rdev(), libc::makedev(7, 0));
        assert!(lmeta(&r.join("plain")).file_type().is_file());
    }
}

#[test]
fn op_mkdir_rmdir() {
    let mut c = Cluster::single("mkdir");
    fs::create_dir_all(c.at("a/b/c/d")).unwrap();
    fs::DirBuilder::new()
        .mode(0o700)
        .create(c.at("private"))
        .unwrap();
    fs::create_dir(c.at("gone")).unwrap();
    fs::create_dir(c.at("gone/inner")).unwrap();
    assert_errno(fs::create_dir(c.at("a")), libc::EEXIST, "mkdir existing");
    assert_errno(
        fs::remove_dir(c.at("gone")),
        libc::ENOTEMPTY,
        "rmdir non-empty",
    );
    fs::remove_dir(c.at("gone/inner")).unwrap();
    fs::remove_dir(c.at("gone")).unwrap();
    fs::remove_dir(c.at("a/b/c/d")).unwrap();
    c.finish();
    for r in c.roots() {
        assert_eq!(names(&r), vec!["a", "private"]);
        assert_eq!(names(&r.join("a/b/c")), Vec::<String>::new());
        assert_eq!(lmeta(&r.join("private")).mode() & 0o7777, 0o700);
    }
}

#[test]
fn op_unlink() {
    let mut c = Cluster::single("unlink");
    for i in 0..20 {
        fs::write(c.at(&format!("f{i}")), format!("file {i}")).unwrap();
    }
    symlink("f0", c.at("sl")).unwrap();
    for i in (0..20).step_by(2) {
        fs::remove_file(c.at(&format!("f{i}"))).unwrap();
    }
    fs::remove_file(c.at("sl")).unwrap();
    assert_errno(fs::remove_file(c.at("f0")), libc::ENOENT, "unlink missing");
    c.finish();
    for r in c.roots() {
        let want: Vec<String> = {
            let mut v: Vec<String> = (1..20).step_by(2).map(|i| format!("f{i}")).collect();
            v.sort();
            v
        };
        assert_eq!(names(&r), want);
        assert_eq!(fs::read(r.join("f7")).unwrap(), b"file 7");
    }
}

#[test]
fn op_symlink() {
    let mut c = Cluster::single("symlink");
    fs::write(c.at("target"), b"t").unwrap();
    symlink("target", c.at("rel")).unwrap();
    symlink("/etc/passwd", c.at("abs")).unwrap();
    symlink("does/not/exist", c.at("dangling")).unwrap();
    let long = "x".repeat(1000);
    symlink(&long, c.at("long")).unwrap();
    fs::create_dir(c.at("d")).unwrap();
    symlink("../target", c.at("d/up")).unwrap();
    assert_errno(
        symlink("x", c.at("rel")),
        libc::EEXIST,
        "symlink over existing",
    );
    c.finish();
    for r in c.roots() {
        assert_eq!(fs::read_link(r.join("rel")).unwrap(), Path::new("target"));
        assert_eq!(
            fs::read_link(r.join("abs")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            fs::read_link(r.join("dangling")).unwrap(),
            Path::new("does/not/exist")
        );
        assert_eq!(fs::read_link(r.join("long")).unwrap(), Path::new(&long));
        assert_eq!(
            fs::read_link(r.join("d/up")).unwrap(),
            Path::new("../target")
        );
        assert_eq!(fs::read(r.join("d/up")).unwrap(), b"t");
    }
}

#[test]
fn op_link_hard_link_groups() {
    let mut c = Cluster::single("link");
    fs::write(c.at("a"), b"group one").unwrap();
    fs::create_dir(c.at("d")).unwrap();
    fs::hard_link(c.at("a"), c.at("b")).unwrap();
    fs::hard_link(c.at("a"), c.at("d/c")).unwrap();
    fs::write(c.at("x"), b"group two").unwrap();
    fs::hard_link(c.at("x"), c.at("y")).unwrap();
    fs::hard_link(c.at("x"), c.at("z")).unwrap();
    fs::remove_file(c.at("x")).unwrap();
    // Writing through one name is visible through the others.
    OpenOptions::new()
        .append(true)
        .open(c.at("d/c"))
        .unwrap()
        .write_all(b"+")
        .unwrap();
    assert_errno(
        fs::hard_link(c.at("a"), c.at("y")),
        libc::EEXIST,
        "link over existing",
    );
    c.finish();
    for r in c.roots() {
        let a = lmeta(&r.join("a"));
        assert_eq!(a.nlink(), 3);
        assert_eq!(a.ino(), lmeta(&r.join("b")).ino());
        assert_eq!(a.ino(), lmeta(&r.join("d/c")).ino());
        assert_eq!(fs::read(r.join("b")).unwrap(), b"group one+");
        let y = lmeta(&r.join("y"));
        assert_eq!(y.nlink(), 2);
        assert_eq!(y.ino(), lmeta(&r.join("z")).ino());
        assert_ne!(y.ino(), a.ino());
        assert!(!r.join("x").exists());
    }
}

#[test]
fn op_rename_all_flavours() {
    let mut c = Cluster::single("rename");
    fs::write(c.at("a"), b"A").unwrap();
    fs::write(c.at("b"), b"B").unwrap();
    fs::write(c.at("victim"), b"old").unwrap();
    // plain
    fs::rename(c.at("a"), c.at("a2")).unwrap();
    // over existing
    fs::rename(c.at("b"), c.at("victim")).unwrap();
    // directory with contents, into another directory
    fs::create_dir_all(c.at("src/deep/er")).unwrap();
    fs::write(c.at("src/deep/er/leaf"), b"leaf").unwrap();
    fs::write(c.at("src/top"), b"top").unwrap();
    fs::create_dir(c.at("dst")).unwrap();
    fs::rename(c.at("src"), c.at("dst/moved")).unwrap();
    // Write through the new path after the rename.
    fs::write(c.at("dst/moved/deep/er/leaf2"), b"leaf2").unwrap();
    // directory over an empty directory
    fs::create_dir(c.at("emptydir")).unwrap();
    fs::create_dir(c.at("d2")).unwrap();
    fs::write(c.at("d2/f"), b"d2f").unwrap();
    fs::rename(c.at("d2"), c.at("emptydir")).unwrap();
    // RENAME_NOREPLACE: to a new name works, onto an existing one is EEXIST.
    fs::write(c.at("nr"), b"NR").unwrap();
    rename2(&c.at("nr"), &c.at("nr2"), libc::RENAME_NOREPLACE).unwrap();
    assert_errno(
        rename2(&c.at("nr2"), &c.at("victim"), libc::RENAME_NOREPLACE),
        libc::EEXIST,
        "RENAME_NOREPLACE onto an existing file",
    );
    // RENAME_EXCHANGE: two files, then a file and a directory.
    fs::write(c.at("x1"), b"one").unwrap();
    fs::write(c.at("x2"), b"two").unwrap();
    rename2(&c.at("x1"), &c.at("x2"), libc::RENAME_EXCHANGE).unwrap();
    fs::create_dir(c.at("xd")).unwrap();
    fs::write(c.at("xd/in"), b"in").unwrap();
    rename2(&c.at("x1"), &c.at("xd"), libc::RENAME_EXCHANGE).unwrap();
    assert_errno(
        rename2(&c.at("x2"), &c.at("nonexistent"), libc::RENAME_EXCHANGE),
        libc::ENOENT,
        "RENAME_EXCHANGE with a missing target",
    );
    assert_errno(
        fs::rename(c.at("dst"), c.at("dst/moved/inside")),
        libc::EINVAL,
        "rename a directory into itself",
    );
    assert_errno(
        fs::rename(c.at("a2"), c.at("dst")),
        libc::EISDIR,
        "rename a file over a directory",
    );
    c.finish();
    for r in c.roots() {
        assert_eq!(fs::read(r.join("a2")).unwrap(), b"A");
        assert!(!r.join("a").exists() && !r.join("b").exists());
        assert_eq!(fs::read(r.join("victim")).unwrap(), b"B");
        assert_eq!(fs::read(r.join("dst/moved/deep/er/leaf")).unwrap(), b"leaf");
        assert_eq!(
            fs::read(r.join("dst/moved/deep/er/leaf2")).unwrap(),
            b"leaf2"
        );
        assert_eq!(fs::read(r.join("dst/moved/top")).unwrap(), b"top");
        assert!(!r.join("src").exists());
        assert_eq!(fs::read(r.join("emptydir/f")).unwrap(), b"d2f");
        assert!(!r.join("d2").exists());
        assert_eq!(fs::read(r.join("nr2")).unwrap(), b"NR");
        assert_eq!(fs::read(r.join("x2")).unwrap(), b"one");
        assert_eq!(fs::read(r.join("x1/in")).unwrap(), b"in");
        assert_eq!(fs::read(r.join("xd")).unwrap(), b"two");
    }
}

#[test]
fn op_chmod_special_bits() {
    let mut c = Cluster::single("chmod");
    fs::write(c.at("suid"), b"#!/bin/sh\n").unwrap();
    fs::write(c.at("sgid"), b"x").unwrap();
    fs::write(c.at("none"), b"x").unwrap();
    fs::create_dir(c.at("sticky")).unwrap();
    fs::create_dir(c.at("sgiddir")).unwrap();
    chmod(&c.at("suid"), 0o4755);
    chmod(&c.at("sgid"), 0o2710);
    chmod(&c.at("none"), 0o000);
    chmod(&c.at("sticky"), 0o1777);
    chmod(&c.at("sgiddir"), 0o2775);
    // A file created in a setgid directory.
    fs::write(c.at("sgiddir/child"), b"c").unwrap();
    fs::create_dir(c.at("sgiddir/childdir")).unwrap();
    c.finish();
    for r in c.roots() {
        let m = |p: &str| lmeta(&r.join(p)).mode() & 0o7777;
        assert_eq!(m("suid"), 0o4755);
        assert_eq!(m("sgid"), 0o2710);
        assert_eq!(m("none"), 0o000);
        assert_eq!(m("sticky"), 0o1777);
        assert_eq!(m("sgiddir"), 0o2775);
        assert_eq!(m("sgiddir/childdir") & 0o2000, 0o2000);
        assert_eq!(fs::read(r.join("none")).unwrap(), b"x");
    }
}

#[test]
fn op_chown() {
    let mut c = Cluster::single("chown");
    fs::write(c.at("f"), b"owned").unwrap();
    fs::create_dir(c.at("d")).unwrap();
    symlink("f", c.at("sl")).unwrap();
    mknod(&c.at("fifo"), libc::S_IFIFO | 0o600, 0).unwrap();
    lchown(&c.at("f"), 1234, 5678).unwrap();
    lchown(&c.at("d"), 1234, 5678).unwrap();
    lchown(&c.at("sl"), 4321, 8765).unwrap();
    lchown(&c.at("fifo"), 0, 5678).unwrap();
    // chown of a setuid file clears setuid on Linux: the replica must agree.
    fs::write(c.at("suid"), b"s").unwrap();
    chmod(&c.at("suid"), 0o6755);
    lchown(&c.at("suid"), 1234, 5678).unwrap();
    // uid only / gid only
    fs::write(c.at("u"), b"u").unwrap();
    std::os::unix::fs::lchown(c.at("u"), Some(42), None).unwrap();
    fs::write(c.at("g"), b"g").unwrap();
    std::os::unix::fs::lchown(c.at("g"), None, Some(43)).unwrap();
    c.finish();
    for r in c.roots() {
        let o = |p: &str| {
            let m = lmeta(&r.join(p));
            (m.uid(), m.gid())
        };
        assert_eq!(o("f"), (1234, 5678));
        assert_eq!(o("d"), (1234, 5678));
        assert_eq!(o("sl"), (4321, 8765));
        assert_eq!(o("fifo"), (0, 5678));
        assert_eq!(o("suid"), (1234, 5678));
        assert_eq!(o("u"), (42, 0));
        assert_eq!(o("g"), (0, 43));
        assert_eq!(lmeta(&r.join("suid")).mode() & 0o4000, 0);
    }
}

#[test]
fn op_truncate() {
    let mut c = Cluster::single("truncate");
    let data = pseudo_random(1, 100_000);
    fs::write(c.at("shrink"), &data).unwrap();
    fs::write(c.at("extend"), b"short").unwrap();
    fs::write(c.at("zero"), &data).unwrap();
    fs::write(c.at("otrunc"), &data).unwrap();
    fs::write(c.at("bypath"), &data).unwrap();
    OpenOptions::new()
        .write(true)
        .open(c.at("shrink"))
        .unwrap()
        .set_len(12_345)
        .unwrap();
    OpenOptions::new()
        .write(true)
        .open(c.at("extend"))
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    OpenOptions::new()
        .write(true)
        .open(c.at("zero"))
        .unwrap()
        .set_len(0)
        .unwrap();
    // O_TRUNC then write.
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(c.at("otrunc"))
        .unwrap()
        .write_all(b"after")
        .unwrap();
    let p = cstr(&c.at("bypath"));
    // SAFETY: valid path.
    check(unsafe { libc::truncate(p.as_ptr(), 777) }).unwrap();
    // Shrink then extend: the cut part must read back as zeros.
    let f = OpenOptions::new().write(true).open(c.at("shrink")).unwrap();
    f.set_len(10_000).unwrap();
    f.set_len(20_000).unwrap();
    drop(f);
    c.finish();
    for r in c.roots() {
        let s = fs::read(r.join("shrink")).unwrap();
        assert_eq!(s.len(), 20_000);
        assert_eq!(&s[..10_000], &data[..10_000]);
        assert!(s[10_000..].iter().all(|b| *b == 0));
        let e = fs::read(r.join("extend")).unwrap();
        assert_eq!(e.len(), 3 << 20);
        assert_eq!(&e[..5], b"short");
        assert!(e[5..].iter().all(|b| *b == 0));
        assert_eq!(fs::read(r.join("zero")).unwrap().len(), 0);
        assert_eq!(fs::read(r.join("otrunc")).unwrap(), b"after");
        assert_eq!(fs::read(r.join("bypath")).unwrap(), &data[..777]);
    }
}

#[test]
fn op_utimensat() {
    let mut c = Cluster::single("utimens");
    fs::write(c.at("exact"), b"e").unwrap();
    fs::write(c.at("now"), b"n").unwrap();
    fs::write(c.at("omit"), b"o").unwrap();
    fs::create_dir(c.at("dir")).unwrap();
    symlink("exact", c.at("sl")).unwrap();
    let omit = libc::UTIME_OMIT;
    let now = libc::UTIME_NOW;
    set_times(
        &c.at("exact"),
        (1_000_000_000, 1),
        (1_234_567_890, 123_456_789),
    )
    .unwrap();
    set_times(&c.at("now"), (0, now), (0, now)).unwrap();
    set_times(&c.at("omit"), (10, 0), (2_000_000_000, 999_999_999)).unwrap();
    // Only atime: mtime stays.
    set_times(&c.at("omit"), (20, 5), (0, omit)).unwrap();
    set_times(&c.at("dir"), (0, omit), (1_111_111_111, 42)).unwrap();
    // On the link itself: set_times never follows symlinks.
    set_times(&c.at("sl"), (0, omit), (1_222_222_222, 7)).unwrap();
    // Pre-epoch times.
    fs::write(c.at("old"), b"old").unwrap();
    set_times(&c.at("old"), (-100, 0), (-86_400, 500)).unwrap();
    // Set the root's mtime last (every create above changed it).
    set_times(c.mnt(), (0, omit), (1_300_000_000, 300)).unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    c.finish();
    for r in c.roots() {
        let t = |p: &str| {
            let m = lmeta(&r.join(p));
            (m.mtime(), m.mtime_nsec())
        };
        assert_eq!(t("exact"), (1_234_567_890, 123_456_789));
        assert_eq!(t("omit"), (2_000_000_000, 999_999_999));
        assert_eq!(t("dir"), (1_111_111_111, 42));
        assert_eq!(t("sl"), (1_222_222_222, 7));
        assert_eq!(t("old"), (-86_400, 500));
        assert_eq!(t("."), (1_300_000_000, 300));
        assert!(
            (t("now").0 - before).abs() < 600,
            "UTIME_NOW: {:?}",
            t("now")
        );
        assert_eq!(lmeta(&r.join("omit")).atime(), 20);
    }
}

#[test]
fn op_write_offsets_sparse_append() {
    let mut c = Cluster::single("write");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(c.at("offsets"))
        .unwrap();
    f.write_all_at(b"0123456789", 0).unwrap();
    f.write_all_at(b"ab", 3).unwrap();
    f.write_all_at(b"END", 20).unwrap();
    drop(f);
    // Sparse: a byte far away.
    let f = File::create(c.at("sparse")).unwrap();
    f.write_all_at(b"X", 100 << 20).unwrap();
    f.write_all_at(b"start", 0).unwrap();
    drop(f);
    // O_APPEND from two handles.
    fs::write(c.at("append"), b"head;").unwrap();
    let mut a1 = OpenOptions::new()
        .append(true)
        .open(c.at("append"))
        .unwrap();
    let mut a2 = OpenOptions::new()
        .append(true)
        .open(c.at("append"))
        .unwrap();
    for i in 0..10 {
        a1.write_all(format!("a1-{i};").as_bytes()).unwrap();
        a2.write_all(format!("a2-{i};").as_bytes()).unwrap();
    }
    drop((a1, a2));
    // Large write (bigger than one op payload) and seek+write.
    let big = pseudo_random(9, 9 << 20);
    let mut f = File::create(c.at("big")).unwrap();
    f.write_all(&big).unwrap();
    f.seek(SeekFrom::Start(1_000_001)).unwrap();
    f.write_all(b"patched").unwrap();
    drop(f);
    c.finish();
    let mut big2 = big.clone();
    big2[1_000_001..1_000_008].copy_from_slice(b"patched");
    let mut app = b"head;".to_vec();
    for i in 0..10 {
        app.extend_from_slice(format!("a1-{i};a2-{i};").as_bytes());
    }
    for r in c.roots() {
        let mut want = b"012ab56789".to_vec();
        want.resize(20, 0);
        want.extend_from_slice(b"END");
        assert_eq!(fs::read(r.join("offsets")).unwrap(), want);
        let m = lmeta(&r.join("sparse"));
        assert_eq!(m.size(), (100 << 20) + 1);
        let mut f = File::open(r.join("sparse")).unwrap();
        let mut head = [0u8; 5];
        f.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"start");
        let mut x = [0u8; 1];
        f.read_exact_at(&mut x, 100 << 20).unwrap();
        assert_eq!(&x, b"X");
        let mut mid = vec![1u8; 4096];
        f.read_exact_at(&mut mid, 50 << 20).unwrap();
        assert!(mid.iter().all(|b| *b == 0));
        assert_eq!(fs::read(r.join("append")).unwrap(), app);
        assert!(fs::read(r.join("big")).unwrap() == big2, "big differs");
    }
    // The replica stays sparse (not 100 MiB of allocated zeros).
    for r in c.replicas() {
        let blocks = lmeta(&r.join("sparse")).blocks();
        assert!(
            blocks * 512 < 10 << 20,
            "replica sparse file allocates {blocks} blocks"
        );
    }
}

fn fallocate(f: &File, mode: i32, off: i64, len: i64) -> std::io::Result<()> {
    // SAFETY: valid fd.
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) })
}

#[test]
fn op_fallocate() {
    let mut c = Cluster::single("fallocate");
    let data = pseudo_random(3, 1 << 20);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(c.at("plain"))
        .unwrap();
    fallocate(&f, 0, 0, 4 << 20).expect("fallocate plain");
    drop(f);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(c.at("keep"))
        .unwrap();
    f.write_all_at(b"abc", 0).unwrap();
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 0, 8 << 20).expect("fallocate KEEP_SIZE");
    drop(f);
    fs::write(c.at("punch"), &data).unwrap();
    let f = OpenOptions::new().write(true).open(c.at("punch")).unwrap();
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        65_536,
        262_144,
    )
    .expect("fallocate PUNCH_HOLE|KEEP_SIZE");
    // Unaligned punch.
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        700_001,
        999,
    )
    .unwrap();
    drop(f);
    c.finish();
    for r in c.roots() {
        assert_eq!(lmeta(&r.join("plain")).size(), 4 << 20);
        assert!(fs::read(r.join("plain")).unwrap().iter().all(|b| *b == 0));
        assert_eq!(fs::read(r.join("keep")).unwrap(), b"abc");
        let p = fs::read(r.join("punch")).unwrap();
        let mut want = data.clone();
        want[65_536..65_536 + 262_144].fill(0);
        want[700_001..701_000].fill(0);
        assert!(p == want, "punched content differs in {}", r.display());
    }
    for r in c.replicas() {
        assert!(
            lmeta(&r.join("keep")).blocks() * 512 >= 8 << 20,
            "KEEP_SIZE preallocation not replicated"
        );
    }
}

#[test]
fn op_copy_file_range() {
    let mut c = Cluster::single("cfr");
    let data = pseudo_random(5, 3 << 20);
    fs::write(c.at("src"), &data).unwrap();
    fs::write(c.at("dst"), b"0123456789").unwrap();
    let src = File::open(c.at("src")).unwrap();
    let dst = OpenOptions::new().write(true).open(c.at("dst")).unwrap();
    let mut off_in: i64 = 1000;
    let mut off_out: i64 = 5;
    let mut left = 2_000_000usize;
    while left > 0 {
        // SAFETY: valid fds and offset pointers.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                left,
                0,
            )
        };
        assert!(
            n > 0,
            "copy_file_range: {}",
            std::io::Error::last_os_error()
        );
        left -= n as usize;
    }
    drop((src, dst));
    // Whole-file copy via std (which uses copy_file_range on Linux).
    fs::copy(c.at("src"), c.at("copy")).unwrap();
    c.finish();
    let mut want = b"01234".to_vec();
    want.extend_from_slice(&data[1000..1000 + 2_000_000]);
    for r in c.roots() {
        assert!(fs::read(r.join("dst")).unwrap() == want, "dst differs");
        assert!(fs::read(r.join("copy")).unwrap() == data, "copy differs");
    }
}

#[test]
fn op_xattrs() {
    let mut c = Cluster::single("xattr");
    fs::write(c.at("f"), b"f").unwrap();
    fs::create_dir(c.at("d")).unwrap();
    symlink("f", c.at("sl")).unwrap();
    let f = c.at("f");
    set_xattr(&f, "user.a", b"1", 0).unwrap();
    set_xattr(&f, "user.b", b"to be removed", 0).unwrap();
    set_xattr(&f, "user.empty", b"", 0).unwrap();
    set_xattr(&f, "user.big", &pseudo_random(2, 3000), 0).unwrap();
    set_xattr(&f, "user.a", b"replaced", libc::XATTR_REPLACE).unwrap();
    assert_errno(
        set_xattr(&f, "user.a", b"x", libc::XATTR_CREATE),
        libc::EEXIST,
        "XATTR_CREATE on existing",
    );
    assert_errno(
        set_xattr(&f, "user.none", b"x", libc::XATTR_REPLACE),
        libc::ENODATA,
        "XATTR_REPLACE on missing",
    );
    remove_xattr(&f, "user.b").unwrap();
    assert_errno(remove_xattr(&f, "user.b"), libc::ENODATA, "remove missing");
    set_xattr(&f, "trusted.t", b"\x00bin\xff", 0).unwrap();
    set_xattr(&f, "trusted.gone", b"x", 0).unwrap();
    remove_xattr(&f, "trusted.gone").unwrap();
    set_xattr(&c.at("d"), "user.dir", b"dirval", 0).unwrap();
    set_xattr(&c.at("sl"), "trusted.link", b"lnk", 0).unwrap();
    // The mount's root is a directory like any other.
    set_xattr(c.mnt(), "user.root", b"top", 0).unwrap();
    assert_eq!(
        get_xattr(c.mnt(), "user.root").unwrap().as_deref(),
        Some(&b"top"[..])
    );
    c.finish();
    for r in c.roots() {
        let g = |p: &str, n: &str| get_xattr(&r.join(p), n).unwrap();
        assert_eq!(g("f", "user.a").as_deref(), Some(&b"replaced"[..]));
        assert_eq!(g("f", "user.b"), None);
        assert_eq!(g("f", "user.empty").as_deref(), Some(&b""[..]));
        assert_eq!(g("f", "user.big"), Some(pseudo_random(2, 3000)));
        assert_eq!(g("f", "trusted.t").as_deref(), Some(&b"\x00bin\xff"[..]));
        assert_eq!(g("f", "trusted.gone"), None);
        assert_eq!(g("d", "user.dir").as_deref(), Some(&b"dirval"[..]));
        assert_eq!(g("sl", "trusted.link").as_deref(), Some(&b"lnk"[..]));
        assert_eq!(
            get_xattr(&r, "user.root").unwrap().as_deref(),
            Some(&b"top"[..])
        );
    }
}

#[test]
fn op_fsync_fdatasync() {
    let mut c = Cluster::single("fsync");
    let mut f = File::create(c.at("f")).unwrap();
    f.write_all(b"durable data").unwrap();
    f.sync_all().unwrap();
    f.write_all(b" more").unwrap();
    f.sync_data().unwrap();
    drop(f);
    fs::create_dir(c.at("d")).unwrap();
    fs::write(c.at("d/x"), b"x").unwrap();
    File::open(c.at("d"))
        .unwrap()
        .sync_all()
        .expect("fsync a directory");
    // The replica converges while still mounted.
    c.wait_replicas(Duration::from_secs(60));
    c.finish();
    for r in c.roots() {
        assert_eq!(fs::read(r.join("f")).unwrap(), b"durable data more");
        assert_eq!(fs::read(r.join("d/x")).unwrap(), b"x");
    }
}
