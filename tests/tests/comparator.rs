//! The comparator must be able to fail: every kind of difference is detected, and exactly
//! that difference is reported. No mount needed.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use tdfs_tests::util::{lchown, mknod, remove_xattr, set_times, set_xattr, temp_dir};
use tdfs_tests::{compare_trees, compare_trees_with, CompareOpts, Diff};

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// For a test that is about owners or device nodes: without root it could only pass
/// without checking anything, so it fails and says why.
fn require_root(what: &str) {
    assert!(
        is_root(),
        "{what} needs root (chown, mknod of devices): run as root"
    );
}

/// Builds the same rich tree every time, with fixed times on every entry.
fn build(root: &Path) {
    fs::create_dir_all(root.join("d/e")).unwrap();
    fs::write(root.join("f"), b"hello world").unwrap();
    fs::write(root.join("d/g"), vec![7u8; 200_000]).unwrap();
    fs::write(root.join("d/e/empty"), b"").unwrap();
    fs::write(root.join("linked"), b"shared inode").unwrap();
    fs::hard_link(root.join("linked"), root.join("d/linked2")).unwrap();
    symlink("f", root.join("sl")).unwrap();
    symlink("/nonexistent/target", root.join("d/dangling")).unwrap();
    mknod(&root.join("fifo"), libc::S_IFIFO | 0o640, 0).unwrap();
    chmod(&root.join("f"), 0o644);
    chmod(&root.join("d/g"), 0o4755);
    chmod(&root.join("d/e"), 0o1777);
    set_xattr(&root.join("f"), "user.color", b"blue", 0).unwrap();
    set_xattr(&root.join("d"), "user.dir", b"x", 0).unwrap();
    if is_root() {
        mknod(
            &root.join("null"),
            libc::S_IFCHR | 0o600,
            libc::makedev(1, 3),
        )
        .unwrap();
        set_xattr(&root.join("f"), "trusted.secret", b"\x00\x01\x02", 0).unwrap();
        lchown(&root.join("d/g"), 1234, 5678).unwrap();
        // chown clears setuid: restore it.
        chmod(&root.join("d/g"), 0o4755);
        lchown(&root.join("sl"), 1234, 5678).unwrap();
    }
    fix_times(root);
}

/// Sets deterministic times on every entry, numbered in path order (children before
/// parents does not matter: utimensat does not touch the parent's mtime).
fn fix_times(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    let mut all = Vec::new();
    while let Some(p) = stack.pop() {
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            stack.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
        all.push(p);
    }
    all.sort();
    for (i, p) in (1i64..).zip(all) {
        set_times(&p, (1_500_000_000 + i, 5), (1_400_000_000 + i, 100 + i)).unwrap();
    }
}

/// Copies the times of every entry of `a` onto the same path in `b`.
fn resync_times(a: &Path, b: &Path) {
    let mut stack = vec![std::path::PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let pa = a.join(&rel);
        let pb = b.join(&rel);
        let (Ok(ma), Ok(mb)) = (fs::symlink_metadata(&pa), fs::symlink_metadata(&pb)) else {
            continue;
        };
        if ma.is_dir() && mb.is_dir() {
            for e in fs::read_dir(&pa).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
        set_times(
            &pb,
            (ma.atime(), ma.atime_nsec()),
            (ma.mtime(), ma.mtime_nsec()),
        )
        .unwrap();
    }
}

struct Pair {
    _t: tdfs_tests::util::TempDir,
    a: std::path::PathBuf,
    b: std::path::PathBuf,
}

fn pair() -> Pair {
    let t = temp_dir("cmp");
    let a = t.path().join("a");
    let b = t.path().join("b");
    build(&a);
    build(&b);
    Pair { _t: t, a, b }
}

fn kinds(d: &[Diff]) -> Vec<(String, &'static str)> {
    d.iter()
        .map(|x| (x.path.display().to_string(), x.kind_name()))
        .collect()
}

#[track_caller]
fn expect(p: &Pair, want: &[(&str, &str)]) {
    let d = compare_trees(&p.a, &p.b);
    let got = kinds(&d);
    let want: Vec<(String, &str)> = want.iter().map(|(a, b)| (a.to_string(), *b)).collect();
    assert_eq!(
        got,
        want,
        "diffs: {:#?}",
        d.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    );
    // Display names the path and the kind.
    for x in &d {
        let s = x.to_string();
        assert!(s.contains(&x.path.display().to_string()), "{s}");
    }
}

#[test]
fn identical_trees_pass() {
    let p = pair();
    expect(&p, &[]);
}

#[test]
fn cp_a_copy_is_identical() {
    require_root("comparing a cp -a copy of owned files and devices");
    let t = temp_dir("cmp-cp");
    let a = t.path().join("a");
    build(&a);
    let b = t.path().join("b");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(&a)
        .arg(&b)
        .status()
        .unwrap();
    assert!(st.success());
    let d = compare_trees(&a, &b);
    // cp -a preserves everything the comparator looks at (it may not copy trusted.*).
    let d: Vec<_> = d
        .into_iter()
        .filter(|x| !matches!(&x.kind, tdfs_tests::compare::DiffKind::XattrMissing { name } if name.starts_with("trusted.")))
        .collect();
    assert!(d.is_empty(), "{:#?}", kinds(&d));
}

#[test]
fn content_same_size_same_mtime_detected() {
    let p = pair();
    fs::write(p.b.join("f"), b"hello World").unwrap();
    resync_times(&p.a, &p.b);
    expect(&p, &[("f", "content")]);
    // Differences far into a big file are found too.
    let mut big = vec![7u8; 200_000];
    big[199_999] = 8;
    fs::write(p.b.join("f"), b"hello world").unwrap();
    fs::write(p.b.join("d/g"), &big).unwrap();
    chmod(&p.b.join("d/g"), 0o4755);
    resync_times(&p.a, &p.b);
    let d = compare_trees(&p.a, &p.b);
    assert_eq!(kinds(&d), vec![("d/g".to_string(), "content")]);
    assert!(
        matches!(
            d[0].kind,
            tdfs_tests::compare::DiffKind::Content { offset: 199_999 }
        ),
        "{}",
        d[0]
    );
}

#[test]
fn size_detected() {
    let p = pair();
    fs::write(p.b.join("f"), b"hello world!").unwrap();
    resync_times(&p.a, &p.b);
    expect(&p, &[("f", "size")]);
}

#[test]
fn mode_detected_including_special_bits() {
    let p = pair();
    chmod(&p.b.join("f"), 0o640);
    chmod(&p.b.join("d/g"), 0o755);
    chmod(&p.b.join("d/e"), 0o777);
    expect(&p, &[("d/e", "mode"), ("d/g", "mode"), ("f", "mode")]);
}

#[test]
fn owner_detected() {
    require_root("detecting an owner difference");
    let p = pair();
    lchown(&p.b.join("f"), 1, 0).unwrap();
    lchown(&p.b.join("sl"), 1234, 1).unwrap();
    chmod(&p.b.join("f"), 0o644);
    expect(&p, &[("f", "uid"), ("sl", "gid")]);
}

#[test]
fn mtime_nanoseconds_detected() {
    let p = pair();
    let m = fs::symlink_metadata(p.a.join("d/g")).unwrap();
    set_times(
        &p.b.join("d/g"),
        (m.atime(), m.atime_nsec()),
        (m.mtime(), m.mtime_nsec() + 1),
    )
    .unwrap();
    let m = fs::symlink_metadata(p.a.join("sl")).unwrap();
    set_times(&p.b.join("sl"), (0, 0), (m.mtime() + 1, m.mtime_nsec())).unwrap();
    let m = fs::symlink_metadata(&p.a).unwrap();
    set_times(&p.b, (0, 0), (m.mtime(), m.mtime_nsec() + 7)).unwrap();
    expect(&p, &[(".", "mtime"), ("d/g", "mtime"), ("sl", "mtime")]);
    // ... and atime is not compared.
    let p = pair();
    let m = fs::symlink_metadata(p.a.join("f")).unwrap();
    set_times(&p.b.join("f"), (1, 1), (m.mtime(), m.mtime_nsec())).unwrap();
    expect(&p, &[]);
}

#[test]
fn symlink_target_detected() {
    let p = pair();
    fs::remove_file(p.b.join("sl")).unwrap();
    symlink("g", p.b.join("sl")).unwrap();
    if is_root() {
        lchown(&p.b.join("sl"), 1234, 5678).unwrap();
    }
    resync_times(&p.a, &p.b);
    expect(&p, &[("sl", "symlink")]);
}

#[test]
fn xattrs_detected() {
    let p = pair();
    set_xattr(&p.b.join("f"), "user.color", b"red!", 0).unwrap();
    remove_xattr(&p.b.join("d"), "user.dir").unwrap();
    set_xattr(&p.b.join("d/g"), "user.new", b"", 0).unwrap();
    expect(
        &p,
        &[
            ("d", "xattr-missing"),
            ("d/g", "xattr-extra"),
            ("f", "xattr-value"),
        ],
    );
    if is_root() {
        let p = pair();
        set_xattr(&p.b.join("f"), "trusted.secret", b"\x00\x01\x03", 0).unwrap();
        set_xattr(&p.b.join("d/e"), "trusted.other", b"1", 0).unwrap();
        expect(&p, &[("d/e", "xattr-extra"), ("f", "xattr-value")]);
    }
}

#[test]
fn hard_link_split_detected() {
    let p = pair();
    // Replace the second name by an identical but separate file.
    let l2 = p.b.join("d/linked2");
    let m = fs::symlink_metadata(&l2).unwrap();
    fs::remove_file(&l2).unwrap();
    fs::write(&l2, b"shared inode").unwrap();
    chmod(&l2, m.mode() & 0o7777);
    if is_root() {
        lchown(&l2, m.uid(), m.gid()).unwrap();
    }
    resync_times(&p.a, &p.b);
    expect(&p, &[("d/linked2", "hardlinks")]);
}

#[test]
fn hard_link_join_detected() {
    let p = pair();
    // In b, "f" becomes a second name of "d/e/empty"'s neighbour: link two files that are
    // separate in a (content made equal first in both).
    fs::write(p.a.join("x1"), b"same").unwrap();
    fs::write(p.a.join("x2"), b"same").unwrap();
    // One time for both: b's two names are one inode, so copying a's times name by name
    // leaves it with x2's, which differ from x1's whenever the writes straddle a clock tick.
    for x in ["x1", "x2"] {
        set_times(&p.a.join(x), (1_600_000_000, 0), (1_600_000_000, 0)).unwrap();
    }
    fs::write(p.b.join("x1"), b"same").unwrap();
    fs::hard_link(p.b.join("x1"), p.b.join("x2")).unwrap();
    resync_times(&p.a, &p.b);
    expect(&p, &[("x1", "hardlinks")]);
}

#[test]
fn missing_and_extra_detected() {
    let p = pair();
    fs::remove_file(p.b.join("d/e/empty")).unwrap();
    fs::write(p.b.join("d/new"), b"").unwrap();
    fs::create_dir(p.b.join("newdir")).unwrap();
    fs::write(p.b.join("newdir/inner"), b"").unwrap();
    resync_times(&p.a, &p.b);
    expect(
        &p,
        &[
            ("d/e/empty", "missing"),
            ("d/new", "extra"),
            ("newdir", "extra"),
            ("newdir/inner", "extra"),
        ],
    );
    let p = pair();
    fs::remove_dir_all(p.b.join("d")).unwrap();
    resync_times(&p.a, &p.b);
    let d = compare_trees(&p.a, &p.b);
    // Every name under d is missing, and "linked" lost its second name.
    assert!(
        d.iter()
            .all(|x| x.kind_name() == "missing" || x.path == Path::new("linked")),
        "{:?}",
        kinds(&d)
    );
    assert!(d.len() >= 6, "{:?}", kinds(&d));
}

#[test]
fn file_type_detected() {
    let p = pair();
    fs::remove_file(p.b.join("fifo")).unwrap();
    fs::write(p.b.join("fifo"), b"").unwrap();
    chmod(&p.b.join("fifo"), 0o640);
    resync_times(&p.a, &p.b);
    expect(&p, &[("fifo", "type")]);
}

#[test]
fn device_numbers_detected() {
    require_root("detecting a device-number difference");
    let p = pair();
    fs::remove_file(p.b.join("null")).unwrap();
    mknod(
        &p.b.join("null"),
        libc::S_IFCHR | 0o600,
        libc::makedev(1, 5),
    )
    .unwrap();
    resync_times(&p.a, &p.b);
    expect(&p, &[("null", "rdev")]);
}

#[test]
fn content_only_mode_ignores_metadata_but_not_bytes() {
    let p = pair();
    chmod(&p.b.join("f"), 0o600);
    let m = fs::symlink_metadata(&p.b).unwrap();
    set_times(&p.b, (0, 0), (m.mtime() + 5, 0)).unwrap();
    assert!(compare_trees_with(&p.a, &p.b, CompareOpts::content_only()).is_empty());
    fs::write(p.b.join("d/e/empty"), b"x").unwrap();
    let d = compare_trees_with(&p.a, &p.b, CompareOpts::content_only());
    assert_eq!(kinds(&d), vec![("d/e/empty".to_string(), "size")]);
}

#[test]
#[should_panic(expected = "trees differ")]
fn assert_identical_panics() {
    let p = pair();
    fs::write(p.b.join("zzz"), b"").unwrap();
    tdfs_tests::assert_identical(&p.a, &p.b);
}
