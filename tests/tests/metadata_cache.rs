//! The kernel caches names, negative lookups, attributes, directory listings and ACLs of
//! the mount for a day (issue #20): what the mount shows must still never be stale. Each
//! test primes the caches (every name looked up and listed), changes something while other
//! threads keep looking up, listing and stat'ing the same names (so that their answers race
//! with the change), and then checks every name at once, from this process and from
//! another one (`stat`), against the backing directory, which holds the truth.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tdfs_tests::util::{
    assert_errno, get_xattr, inode_flags, lchown, remove_xattr, set_inode_flags, set_times,
    set_xattr, wait_log, wait_until, SharedMap,
};
use tdfs_tests::Cluster;

/// What a stat shows that must be current (atime aside: reads move it lazily).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    ino: u64,
    mode: u32,
    nlink: u64,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn meta(p: &Path) -> Option<Meta> {
    match fs::symlink_metadata(p) {
        Ok(m) => Some(Meta {
            ino: m.ino(),
            mode: m.mode(),
            nlink: m.nlink(),
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
        Err(e) => panic!("lstat {}: {e}", p.display()),
    }
}

/// `sec.nsec` as `stat %.9Y` prints it.
fn parse_time(s: &str) -> (i64, i64) {
    let (a, b) = s.split_once('.').expect("sec.nsec");
    (a.parse().unwrap(), b.parse().unwrap())
}

/// The same names stat'ed by another process (coreutils `stat`); missing names are absent.
fn meta_elsewhere(paths: &[PathBuf]) -> BTreeMap<PathBuf, Meta> {
    let out = Command::new("stat")
        .arg("-c")
        .arg("%n|%i|%f|%h|%u|%g|%s|%.9Y|%.9Z")
        .arg("--")
        .args(paths)
        .env("LC_ALL", "C")
        .output()
        .expect("run stat");
    let mut m = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let f: Vec<&str> = line.rsplitn(9, '|').collect();
        let f: Vec<&str> = f.into_iter().rev().collect();
        m.insert(
            PathBuf::from(f[0]),
            Meta {
                ino: f[1].parse().unwrap(),
                mode: u32::from_str_radix(f[2], 16).unwrap(),
                nlink: f[3].parse().unwrap(),
                uid: f[4].parse().unwrap(),
                gid: f[5].parse().unwrap(),
                size: f[6].parse().unwrap(),
                mtime: parse_time(f[7]),
                ctime: parse_time(f[8]),
            },
        );
    }
    m
}

/// Every name in `rels` looks through the mount, from this process and from another, as it
/// is in the backing directory (present or absent, every attribute of [`Meta`]).
#[track_caller]
fn assert_fresh(c: &Cluster, rels: &[&str], what: &str) {
    let mounted: Vec<PathBuf> = rels.iter().map(|r| c.at(r)).collect();
    let elsewhere = meta_elsewhere(&mounted);
    for (rel, mp) in rels.iter().zip(&mounted) {
        let truth = meta(&c.backing.join(rel));
        let here = meta(mp);
        assert_eq!(
            here, truth,
            "{what}: {rel} through the mount (this process) differs from the backing dir"
        );
        assert_eq!(
            elsewhere.get(mp),
            truth.as_ref(),
            "{what}: {rel} through the mount (another process) differs from the backing dir"
        );
    }
}

/// Raw listing of a directory: name → d_ino, `.` and `..` included.
fn listing(dir: &Path) -> BTreeMap<Vec<u8>, u64> {
    let c = CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid path; the DIR* is closed below and not used after.
    let d = unsafe { libc::opendir(c.as_ptr()) };
    assert!(!d.is_null(), "opendir {}", dir.display());
    let mut out = BTreeMap::new();
    loop {
        // SAFETY: `d` is a live DIR*; the entry is copied out before the next call.
        let e = unsafe { libc::readdir64(d) };
        if e.is_null() {
            break;
        }
        // SAFETY: non-null entry with a NUL-terminated name.
        let (name, ino) = unsafe {
            (
                std::ffi::CStr::from_ptr((*e).d_name.as_ptr())
                    .to_bytes()
                    .to_vec(),
                (*e).d_ino,
            )
        };
        out.insert(name, ino);
    }
    // SAFETY: opened above, closed once.
    unsafe { libc::closedir(d) };
    out
}

/// The directory lists the same names with the same inode numbers through the mount as in
/// the backing directory (the backing root's number shows as the mount root's, 1).
#[track_caller]
fn assert_listing(c: &Cluster, rel: &str, what: &str) {
    let root = meta(&c.backing).unwrap().ino;
    let mut truth = listing(&c.backing.join(rel));
    for ino in truth.values_mut() {
        if *ino == root {
            *ino = 1;
        }
    }
    let seen = listing(&c.at(rel));
    assert_eq!(
        seen, truth,
        "{what}: the listing of {rel} through the mount differs from the backing dir"
    );
}

/// Threads that look up, list and stat everything under `dir` until stopped, so that
/// lookups, listings and getattrs race with the changes a test makes.
struct Churn {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Churn {
    fn start(dir: PathBuf, n: usize) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|_| {
                let (dir, stop, rounds) = (dir.clone(), stop.clone(), rounds.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        walk(&dir);
                        rounds.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let churn = Churn {
            stop,
            rounds,
            threads,
        };
        // Each thread has been through the tree once: everything is cached.
        let want = n as u64;
        assert!(
            wait_until(Duration::from_secs(60), || churn.rounds() >= want),
            "the churn threads did not get through the tree"
        );
        churn
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Waits until every thread has started another full pass, so that the last change is
    /// raced by at least one of them.
    fn another_round(&self) {
        let want = self.rounds() + self.threads.len() as u64;
        assert!(
            wait_until(Duration::from_secs(60), || self.rounds() >= want),
            "the churn threads stopped"
        );
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("churn thread panicked");
        }
    }
}

fn walk(dir: &Path) {
    let _ = fs::symlink_metadata(dir);
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if let Ok(m) = fs::symlink_metadata(&p) {
            if m.is_dir() {
                walk(&p);
            } else if m.file_type().is_symlink() {
                let _ = fs::read_link(&p);
            }
        }
    }
}

fn write(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

#[test]
fn rename_over_an_existing_name_shows_at_once() {
    let mut c = Cluster::single("mc-rename");
    fs::create_dir_all(c.at("d/sub")).unwrap();
    write(&c.at("d/old"), b"the old content");
    fs::hard_link(c.at("d/old"), c.at("d/old-link")).unwrap();
    write(&c.at("d/new"), b"new");
    fs::create_dir(c.at("d/emptydir")).unwrap();
    fs::create_dir(c.at("d/fulldir")).unwrap();
    write(&c.at("d/fulldir/x"), b"x");
    let names = [
        "d",
        "d/old",
        "d/old-link",
        "d/new",
        "d/sub",
        "d/emptydir",
        "d/fulldir",
        "d/fulldir/x",
    ];
    let churn = Churn::start(c.at("d"), 2);
    assert_fresh(&c, &names, "primed");
    // The replaced file keeps a name: its link count drops on that name at once.
    fs::rename(c.at("d/new"), c.at("d/old")).unwrap();
    assert_fresh(&c, &names, "rename over a hard-linked file");
    assert_eq!(fs::read(c.at("d/old")).unwrap(), b"new");
    assert_eq!(meta(&c.at("d/old-link")).unwrap().nlink, 1);
    assert_listing(&c, "d", "rename over a hard-linked file");
    churn.another_round();
    assert_fresh(&c, &names, "rename over a hard-linked file, raced");
    // A directory over an empty one, from another parent: both parents' link counts and
    // times, and the moved directory's `..`.
    fs::rename(c.at("d/fulldir"), c.at("d/sub/fulldir")).unwrap();
    fs::rename(c.at("d/sub/fulldir"), c.at("d/emptydir")).unwrap();
    let names2 = ["d", "d/sub", "d/emptydir", "d/emptydir/x", "d/fulldir"];
    assert_fresh(&c, &names2, "rename of a directory over an empty one");
    assert_listing(&c, "d", "rename of a directory");
    assert_listing(&c, "d/emptydir", "rename of a directory");
    churn.another_round();
    assert_fresh(&c, &names2, "rename of a directory, raced");
    churn.stop();
    c.finish();
}

#[test]
fn unlink_of_an_open_file_shows_at_once() {
    let mut c = Cluster::single("mc-unlink-open");
    fs::create_dir(c.at("d")).unwrap();
    write(&c.at("d/f"), b"open and unlinked");
    write(&c.at("d/g"), b"g");
    let churn = Churn::start(c.at("d"), 2);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(c.at("d/f"))
        .unwrap();
    assert_eq!(f.metadata().unwrap().nlink(), 1);
    fs::remove_file(c.at("d/f")).unwrap();
    assert_fresh(&c, &["d", "d/f", "d/g"], "unlink of an open file");
    assert_eq!(f.metadata().unwrap().nlink(), 0, "fstat of the open file");
    assert_listing(&c, "d", "unlink of an open file");
    // It is still usable, and its size shows through the handle.
    f.write_all_at(b"more", 100).unwrap();
    assert_eq!(f.metadata().unwrap().size(), 104);
    churn.another_round();
    assert_fresh(&c, &["d", "d/f", "d/g"], "unlink of an open file, raced");
    drop(f);
    churn.stop();
    c.finish();
}

#[test]
fn link_counts_show_on_every_name() {
    let mut c = Cluster::single("mc-links");
    fs::create_dir_all(c.at("a")).unwrap();
    fs::create_dir_all(c.at("b")).unwrap();
    write(&c.at("a/f"), b"linked");
    let names = ["a", "b", "a/f", "a/g", "b/h", "b/i"];
    let churn = Churn::start(c.mnt().to_path_buf(), 2);
    fs::hard_link(c.at("a/f"), c.at("a/g")).unwrap();
    assert_fresh(&c, &names, "link in the same directory");
    fs::hard_link(c.at("a/g"), c.at("b/h")).unwrap();
    assert_fresh(&c, &names, "link in another directory");
    assert_eq!(meta(&c.at("a/f")).unwrap().nlink, 3);
    // Another process adds and removes names.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ln '{0}/b/h' '{0}/b/i' && rm '{0}/a/g'",
            c.mnt().display()
        ))
        .status()
        .unwrap();
    assert!(out.success());
    assert_fresh(&c, &names, "link and unlink by another process");
    assert_eq!(meta(&c.at("a/f")).unwrap().nlink, 3);
    fs::remove_file(c.at("b/h")).unwrap();
    fs::remove_file(c.at("b/i")).unwrap();
    assert_fresh(&c, &names, "unlink of two names");
    assert_eq!(meta(&c.at("a/f")).unwrap().nlink, 1);
    churn.another_round();
    assert_fresh(&c, &names, "links, raced");
    churn.stop();
    c.finish();
}

#[test]
fn attribute_changes_show_at_once() {
    let mut c = Cluster::single("mc-setattr");
    fs::create_dir(c.at("d")).unwrap();
    write(&c.at("d/f"), &[7u8; 10_000]);
    symlink("f", c.at("d/l")).unwrap();
    let names = ["d", "d/f", "d/l"];
    let churn = Churn::start(c.at("d"), 2);
    fs::set_permissions(c.at("d/f"), fs::Permissions::from_mode(0o4750)).unwrap();
    assert_fresh(&c, &names, "chmod");
    lchown(&c.at("d/f"), 1234, 5678).unwrap();
    assert_fresh(&c, &names, "chown (clears setuid)");
    lchown(&c.at("d/l"), 42, 43).unwrap();
    assert_fresh(&c, &names, "chown of a symlink");
    set_times(
        &c.at("d/f"),
        (1_000_000_000, 1),
        (1_234_567_890, 987_654_321),
    )
    .unwrap();
    assert_fresh(&c, &names, "utimes");
    set_times(&c.at("d/l"), (5, 0), (6, 7)).unwrap();
    assert_fresh(&c, &names, "utimes of a symlink");
    fs::set_permissions(c.at("d"), fs::Permissions::from_mode(0o700)).unwrap();
    assert_fresh(&c, &names, "chmod of the directory");
    OpenOptions::new()
        .write(true)
        .open(c.at("d/f"))
        .unwrap()
        .set_len(123)
        .unwrap();
    assert_fresh(&c, &names, "truncate");
    churn.another_round();
    assert_fresh(&c, &names, "attributes, raced");
    churn.stop();
    c.finish();
}

#[test]
fn writes_and_truncates_by_another_process_show_at_once() {
    let mut c = Cluster::single("mc-writes");
    fs::create_dir(c.at("d")).unwrap();
    write(&c.at("d/f"), b"0123456789");
    let names = ["d", "d/f"];
    let churn = Churn::start(c.at("d"), 2);
    // This process holds the file open (and has read it: its attributes are cached).
    let mut f = File::open(c.at("d/f")).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    let f_path = c.at("d/f");
    let sh = |script: &str| {
        let st = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(&f_path)
            .status()
            .unwrap();
        assert!(st.success(), "{script}");
    };
    sh("printf appended >> \"$1\"");
    assert_fresh(&c, &names, "append by another process");
    assert_eq!(f.metadata().unwrap().size(), 18, "fstat after the append");
    sh("truncate -s 4 \"$1\"");
    assert_fresh(&c, &names, "truncate by another process");
    assert_eq!(f.metadata().unwrap().size(), 4, "fstat after the truncate");
    let mut now = String::new();
    File::open(c.at("d/f"))
        .unwrap()
        .read_to_string(&mut now)
        .unwrap();
    assert_eq!(now, "0123");
    sh("dd if=/dev/zero of=\"$1\" bs=1k count=64 conv=notrunc status=none");
    assert_fresh(&c, &names, "overwrite by another process");
    sh("truncate -s 0 \"$1\"");
    assert_fresh(&c, &names, "truncate to zero");
    churn.another_round();
    assert_fresh(&c, &names, "writes, raced");
    drop(f);
    churn.stop();
    c.finish();
}

/// An access ACL in the kernel's xattr format: (tag, perm, id) entries.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
const NO_ID: u32 = u32::MAX;

fn as_uid(uid: u32, script: &str) -> std::process::Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .env("LC_ALL", "C")
        .output()
        .expect("run setpriv")
}

#[test]
fn xattr_and_acl_changes_show_at_once() {
    let mut c = Cluster::single("mc-xattr");
    fs::create_dir(c.at("d")).unwrap();
    fs::set_permissions(c.at("d"), fs::Permissions::from_mode(0o755)).unwrap();
    write(&c.at("d/f"), b"secret");
    fs::set_permissions(c.at("d/f"), fs::Permissions::from_mode(0o600)).unwrap();
    let names = ["d", "d/f"];
    let churn = Churn::start(c.at("d"), 2);
    let f = c.at("d/f");
    assert_eq!(get_xattr(&f, "user.a").unwrap(), None);
    set_xattr(&f, "user.a", b"1", 0).unwrap();
    assert_fresh(&c, &names, "setxattr (ctime)");
    assert_eq!(get_xattr(&f, "user.a").unwrap().as_deref(), Some(&b"1"[..]));
    set_xattr(&f, "user.a", b"22", 0).unwrap();
    assert_eq!(
        get_xattr(&f, "user.a").unwrap().as_deref(),
        Some(&b"22"[..])
    );
    remove_xattr(&f, "user.a").unwrap();
    assert_fresh(&c, &names, "removexattr (ctime)");
    assert_eq!(get_xattr(&f, "user.a").unwrap(), None);
    // uid 1234 may not read the file (mode 0600)...
    let read = format!("cat '{}'", f.display());
    assert!(!as_uid(1234, &read).status.success(), "read before the ACL");
    // ... until an ACL lets it: the ACL moves the mode's group bits (to the mask, r--),
    // which must show at once, and the kernel must see the ACL in its permission check.
    let a = acl(&[
        (ACL_USER_OBJ, 6, NO_ID),
        (ACL_USER, 4, 1234),
        (ACL_GROUP_OBJ, 0, NO_ID),
        (ACL_MASK, 4, NO_ID),
        (ACL_OTHER, 0, NO_ID),
    ]);
    set_xattr(&f, "system.posix_acl_access", &a, 0).unwrap();
    assert_fresh(&c, &names, "setting an ACL");
    assert_eq!(meta(&c.at("d/f")).unwrap().mode & 0o777, 0o640);
    let out = as_uid(1234, &read);
    assert!(
        out.status.success() && out.stdout == b"secret",
        "uid 1234 could not read through its ACL entry: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !as_uid(1235, &read).status.success(),
        "uid 1235 has no entry"
    );
    // chmod rewrites the ACL's mask: the cached ACL must go with it.
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    assert_fresh(&c, &names, "chmod of a file with an ACL");
    assert!(
        !as_uid(1234, &read).status.success(),
        "uid 1234 still reads after chmod cleared the mask"
    );
    remove_xattr(&f, "system.posix_acl_access").unwrap();
    assert_fresh(&c, &names, "removing the ACL");
    assert_eq!(get_xattr(&f, "system.posix_acl_access").unwrap(), None);
    churn.another_round();
    assert_fresh(&c, &names, "xattrs, raced");
    churn.stop();
    c.finish();
    for r in c.replicas() {
        assert_eq!(
            get_xattr(&r.join("d/f"), "system.posix_acl_access").unwrap(),
            None
        );
    }
}

/// The daemon answers xattr queries of a file it knows to have none without a syscall:
/// an xattr set while others query the file must show at once all the same, and a file
/// created in a directory with a default ACL has one from the start.
#[test]
fn xattrs_set_while_others_query_them() {
    let mut c = Cluster::single("mc-xattr-race");
    fs::create_dir(c.at("d")).unwrap();
    write(&c.at("d/f"), b"f");
    let stop = Arc::new(AtomicBool::new(false));
    let queriers: Vec<_> = (0..2)
        .map(|_| {
            let (f, stop) = (c.at("d/f"), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = get_xattr(&f, "user.x");
                    let _ = tdfs_tests::util::list_xattrs(&f);
                }
            })
        })
        .collect();
    let f = c.at("d/f");
    for i in 0..300u32 {
        let v = i.to_string();
        set_xattr(&f, "user.x", v.as_bytes(), 0).unwrap();
        assert_eq!(
            get_xattr(&f, "user.x").unwrap().as_deref(),
            Some(v.as_bytes()),
            "round {i}: the xattr just set"
        );
        remove_xattr(&f, "user.x").unwrap();
        assert_eq!(get_xattr(&f, "user.x").unwrap(), None, "round {i}: removed");
        assert!(tdfs_tests::util::list_xattrs(&f).unwrap().is_empty());
    }
    stop.store(true, Ordering::Relaxed);
    for q in queriers {
        q.join().unwrap();
    }
    // Inherited at creation from the directory's default ACL.
    let default = acl(&[
        (ACL_USER_OBJ, 7, NO_ID),
        (ACL_USER, 5, 1234),
        (ACL_GROUP_OBJ, 5, NO_ID),
        (ACL_MASK, 5, NO_ID),
        (ACL_OTHER, 5, NO_ID),
    ]);
    assert_eq!(
        get_xattr(&c.at("d"), "system.posix_acl_default").unwrap(),
        None
    );
    set_xattr(&c.at("d"), "system.posix_acl_default", &default, 0).unwrap();
    write(&c.at("d/inherits"), b"i");
    fs::create_dir(c.at("d/subdir")).unwrap();
    for n in ["d/inherits", "d/subdir"] {
        assert_eq!(
            get_xattr(&c.at(n), "system.posix_acl_access").unwrap(),
            get_xattr(&c.backing.join(n), "system.posix_acl_access").unwrap(),
            "{n}: its inherited ACL"
        );
        assert!(get_xattr(&c.at(n), "system.posix_acl_access")
            .unwrap()
            .is_some());
    }
    assert_fresh(
        &c,
        &["d", "d/f", "d/inherits", "d/subdir"],
        "after the xattrs",
    );
    c.finish();
}

#[test]
fn inode_flags_move_the_ctime_at_once() {
    const FS_NODUMP_FL: u32 = 0x40;
    let mut c = Cluster::single("mc-chattr");
    fs::create_dir(c.at("d")).unwrap();
    write(&c.at("d/f"), b"f");
    let names = ["d", "d/f"];
    let churn = Churn::start(c.at("d"), 2);
    let before = meta(&c.at("d/f")).unwrap();
    // The ctime moves by at least a clock tick.
    assert!(wait_until(Duration::from_secs(5), || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            > (before.ctime.0 as u128) * 1_000_000_000 + before.ctime.1 as u128 + 20_000_000
    }));
    set_inode_flags(&c.at("d/f"), FS_NODUMP_FL).unwrap();
    assert_fresh(&c, &names, "chattr +d");
    assert_ne!(meta(&c.at("d/f")).unwrap().ctime, before.ctime);
    assert_eq!(inode_flags(&c.at("d/f")).unwrap().0, FS_NODUMP_FL);
    set_inode_flags(&c.at("d/f"), 0).unwrap();
    assert_fresh(&c, &names, "chattr -d");
    churn.another_round();
    assert_fresh(&c, &names, "chattr, raced");
    churn.stop();
    c.finish();
}

#[test]
fn a_moved_directory_lists_its_new_parent() {
    let mut c = Cluster::single("mc-dotdot");
    fs::create_dir_all(c.at("p1/d/inner")).unwrap();
    fs::create_dir(c.at("p2")).unwrap();
    write(&c.at("p1/d/f"), b"f");
    let churn = Churn::start(c.mnt().to_path_buf(), 1);
    // Cached listing of d: `..` is p1.
    assert_listing(&c, "p1/d", "before the move");
    fs::rename(c.at("p1/d"), c.at("p2/d")).unwrap();
    assert_listing(&c, "p2/d", "after the move to another parent");
    assert_eq!(
        listing(&c.at("p2/d"))[&b".."[..]],
        meta(&c.at("p2")).unwrap().ino,
        "`..` of the moved directory"
    );
    assert_fresh(&c, &["p1", "p2", "p2/d", "p2/d/inner"], "moved directory");
    // An exchange of two directories in different parents.
    fs::create_dir(c.at("p1/e")).unwrap();
    assert_listing(&c, "p1/e", "before the exchange");
    assert_listing(&c, "p2/d", "before the exchange");
    tdfs_tests::util::rename2(&c.at("p1/e"), &c.at("p2/d"), libc::RENAME_EXCHANGE).unwrap();
    assert_listing(&c, "p1/e", "after the exchange");
    assert_listing(&c, "p2/d", "after the exchange");
    assert_fresh(&c, &["p1", "p2", "p1/e", "p2/d"], "exchange");
    churn.stop();
    c.finish();
}

#[test]
fn negative_lookups_and_listings_follow_creations() {
    let mut c = Cluster::single("mc-negative");
    fs::create_dir(c.at("d")).unwrap();
    let names = ["d", "d/a", "d/b", "d/c", "d/s", "d/sub", "d/h", "d/n"];
    let churn = Churn::start(c.at("d"), 2);
    // Every name is looked up and missing (cached as negative entries).
    assert_fresh(&c, &names, "nothing yet");
    assert_listing(&c, "d", "empty");
    write(&c.at("d/a"), b"a");
    fs::create_dir(c.at("d/sub")).unwrap();
    symlink("a", c.at("d/s")).unwrap();
    fs::hard_link(c.at("d/a"), c.at("d/h")).unwrap();
    tdfs_tests::util::mknod(&c.at("d/n"), libc::S_IFIFO | 0o644, 0).unwrap();
    assert_fresh(&c, &names, "created here");
    assert_listing(&c, "d", "created here");
    // Another process creates and renames into names looked up as missing.
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && echo b > b && echo c > tmp && mv tmp c && rm a && mkdir a && rmdir a",
            c.at("d").display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    assert_fresh(&c, &names, "created by another process");
    assert_listing(&c, "d", "created by another process");
    assert_eq!(fs::read_link(c.at("d/s")).unwrap(), Path::new("a"));
    assert_errno(fs::read(c.at("d/s")), libc::ENOENT, "dangling symlink");
    // A symlink replaced by another one shows its new target.
    symlink("b", c.at("d/s2")).unwrap();
    fs::rename(c.at("d/s2"), c.at("d/s")).unwrap();
    assert_eq!(fs::read_link(c.at("d/s")).unwrap(), Path::new("b"));
    assert_eq!(fs::read(c.at("d/s")).unwrap(), b"b\n");
    churn.another_round();
    assert_fresh(&c, &names, "creations, raced");
    assert_listing(&c, "d", "creations, raced");
    churn.stop();
    c.finish();
}

/// Creations, renames and removals in one directory while others stat it and look its
/// names up: the directory's times and link count must end up current, not those of a
/// getattr answered in the middle.
#[test]
fn directory_attributes_under_concurrent_changes() {
    let mut c = Cluster::single("mc-dirattr");
    fs::create_dir(c.at("d")).unwrap();
    let churn = Churn::start(c.at("d"), 3);
    for i in 0..300 {
        let n = format!("d/f{}", i % 17);
        match i % 5 {
            0 => write(&c.at(&n), b"x"),
            1 => {
                let _ = fs::create_dir(c.at(&format!("d/sub{}", i % 7)));
            }
            2 => {
                let _ = fs::remove_dir(c.at(&format!("d/sub{}", (i + 3) % 7)));
            }
            3 => {
                let _ = fs::rename(c.at(&n), c.at(&format!("d/f{}", (i + 1) % 17)));
            }
            _ => {
                let _ = fs::remove_file(c.at(&n));
            }
        }
        if i % 50 == 49 {
            assert_fresh(&c, &["d"], &format!("after {} changes", i + 1));
        }
    }
    churn.another_round();
    assert_fresh(&c, &["d"], "at the end");
    assert_listing(&c, "d", "at the end");
    let names: Vec<String> = (0..17)
        .map(|i| format!("d/f{i}"))
        .chain((0..7).map(|i| format!("d/sub{i}")))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_fresh(&c, &names, "every name at the end");
    churn.stop();
    c.finish();
}

/// A writer beside passthrough readers maps the backing file itself: its stores move the
/// file's times without the daemon. While it is open, the attributes are not cached.
#[test]
fn shared_mapping_beside_passthrough_readers_keeps_times_current() {
    let mut c = Cluster::single("mc-ptmmap");
    wait_log(
        "master",
        Duration::from_secs(10),
        || c.master.log_text(),
        "kernel FUSE passthrough on",
    );
    write(&c.at("m"), &vec![1u8; 8192]);
    let reader = File::open(c.at("m")).unwrap();
    let mut b = [0u8; 1];
    reader.read_exact_at(&mut b, 0).unwrap();
    let w = OpenOptions::new()
        .read(true)
        .write(true)
        .open(c.at("m"))
        .unwrap();
    assert_fresh(&c, &["m"], "writer opened");
    let before = meta(&c.at("m")).unwrap();
    let mut map = SharedMap::new(&w, 8192);
    // Each store to a clean page moves the backing file's times (at the page fault); wait
    // until one does (the clock may not have ticked yet), then it must show at once.
    let mut i = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            i += 1;
            map.bytes()[(i * 4096) % 8192] = i as u8;
            map.sync();
            meta(&c.backing.join("m")).unwrap().mtime != before.mtime
        }),
        "stores through the mapping never moved the backing file's mtime"
    );
    assert_fresh(&c, &["m"], "after stores through the shared mapping");
    map.unmap();
    drop(w);
    drop(reader);
    c.wait_replicas(Duration::from_secs(30));
    assert_fresh(&c, &["m"], "after the writer closed");
    c.finish();
}

/// `ls -l` of a directory larger than one readdirplus reply (the rest of a page the kernel
/// could not take is handed back), then every entry used through what the kernel cached,
/// while entries are renamed meanwhile.
#[test]
fn large_directory_listed_with_attributes() {
    let mut c = Cluster::single("mc-bigdir");
    fs::create_dir(c.at("big")).unwrap();
    for i in 0..2000 {
        write(
            &c.at(&format!("big/file-with-a-longish-name-{i:05}")),
            &[b'x'; 10],
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let renamer = {
        let (dir, stop) = (c.at("big"), stop.clone());
        thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let a = dir.join(format!("file-with-a-longish-name-{:05}", i % 2000));
                let b = dir.join(format!("renamed-{:05}", i % 2000));
                let _ = fs::rename(&a, &b);
                let _ = fs::rename(&b, &a);
                i += 1;
            }
        })
    };
    for _ in 0..3 {
        // It may miss a name that is being renamed: only the lookups it counts matter.
        Command::new("ls")
            .args(["-l", "--color=never"])
            .arg(c.at("big"))
            .output()
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    renamer.join().unwrap();
    assert_listing(&c, "big", "after ls -l");
    for i in 0..2000 {
        let p = c.at(&format!("big/file-with-a-longish-name-{i:05}"));
        set_xattr(&p, "user.i", i.to_string().as_bytes(), 0).unwrap();
        assert_eq!(fs::read(&p).unwrap(), [b'x'; 10]);
    }
    c.finish();
}
