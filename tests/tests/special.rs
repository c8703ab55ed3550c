//! End-to-end scenarios beyond single ops: callers' credentials, unlinked-but-open files,
//! atomic replace, mmap, concurrency, several slaves, compression, TCP_NODELAY off,
//! slave restarts, SIGTERM.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tdfs_tests::util::{names, pseudo_random, run, SharedMap};
use tdfs_tests::{Cluster, ClusterOpts, SlaveOpts};

fn as_nobody(script: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "sh",
        "-c",
        script,
    ]);
    // Untranslated error messages, for the tests to match.
    cmd.env("LC_ALL", "C");
    cmd
}

#[test]
fn nonroot_caller_owns_what_it_creates() {
    let mut c = Cluster::single("nonroot");
    fs::create_dir(c.at("pub")).unwrap();
    fs::set_permissions(c.at("pub"), fs::Permissions::from_mode(0o777)).unwrap();
    let dir = c.at("pub");
    let script = format!(
        "set -e; cd '{}'; touch file; echo hello > written; mkdir sub; ln -s file link; \
         mkfifo fifo; ln file hard",
        dir.display()
    );
    let out = as_nobody(&script).output().expect("run setpriv");
    assert!(
        out.status.success(),
        "creating files as uid 65534 on the mount failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    // Root-created file in the same dir stays root's.
    fs::write(c.at("pub/rootfile"), b"r").unwrap();
    c.finish();
    for r in c.roots() {
        for n in ["file", "written", "sub", "link", "fifo", "hard"] {
            let m = fs::symlink_metadata(r.join("pub").join(n)).unwrap();
            assert_eq!(
                (m.uid(), m.gid()),
                (65534, 65534),
                "{n} in {} has the wrong owner",
                r.display()
            );
        }
        let m = fs::symlink_metadata(r.join("pub/rootfile")).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0));
        assert_eq!(fs::read(r.join("pub/written")).unwrap(), b"hello\n");
    }
}

#[test]
fn nonroot_caller_is_denied_by_permissions() {
    let mut c = Cluster::single("perm");
    fs::create_dir(c.at("closed")).unwrap();
    fs::set_permissions(c.at("closed"), fs::Permissions::from_mode(0o755)).unwrap();
    let out = as_nobody(&format!("touch '{}'", c.at("closed/nope").display()))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "uid 65534 could create a file in a root-owned 0755 directory"
    );
    // Refused by the permission check, not failed for some other reason (setpriv, sh).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Permission denied"),
        "touch as uid 65534 did not fail with EACCES: {err}"
    );
    c.finish();
    for r in c.roots() {
        assert!(names(&r.join("closed")).is_empty());
    }
}

#[test]
fn open_unlink_write() {
    let mut c = Cluster::single("openunlink");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(c.at("tmpfile"))
        .unwrap();
    f.write_all(b"before unlink;").unwrap();
    fs::remove_file(c.at("tmpfile")).unwrap();
    f.write_all(b"after unlink")
        .expect("write to an open, unlinked file");
    f.sync_all().unwrap();
    let mut buf = vec![0u8; 26];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"before unlink;after unlink");
    // A new file under the same name is a different file.
    fs::write(c.at("tmpfile"), b"new").unwrap();
    f.write_all(b"!").unwrap();
    drop(f);
    // Also: unlink while open, then close without writing.
    let g = File::create(c.at("other")).unwrap();
    fs::remove_file(c.at("other")).unwrap();
    drop(g);
    c.finish();
    for r in c.roots() {
        assert_eq!(names(&r), vec!["tmpfile"], "in {}", r.display());
        assert_eq!(fs::read(r.join("tmpfile")).unwrap(), b"new");
    }
}

#[test]
fn write_temp_then_rename() {
    let mut c = Cluster::single("atomic");
    fs::create_dir(c.at("site")).unwrap();
    for gen in 0..30 {
        let tmp = c.at(&format!("site/.index.html.tmp{gen}"));
        let mut f = File::create(&tmp).unwrap();
        f.write_all(format!("<html>generation {gen}</html>").as_bytes())
            .unwrap();
        f.sync_all().unwrap();
        drop(f);
        fs::rename(&tmp, c.at("site/index.html")).unwrap();
    }
    c.finish();
    for r in c.roots() {
        assert_eq!(names(&r.join("site")), vec!["index.html"]);
        assert_eq!(
            fs::read(r.join("site/index.html")).unwrap(),
            b"<html>generation 29</html>"
        );
    }
}

#[test]
fn mmap_shared_writes() {
    let mut c = Cluster::single("mmap");
    let len = 3 * 4096 + 100;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(c.at("mapped"))
        .unwrap();
    f.set_len(len as u64).unwrap();
    let mut map = SharedMap::new(&f, len);
    let s = map.bytes();
    s[..5].copy_from_slice(b"first");
    s[4096..4096 + 6].copy_from_slice(b"second");
    s[len - 4..].copy_from_slice(b"last");
    map.sync();
    map.bytes()[8192] = b'Z';
    map.unmap();
    drop(f);
    c.finish();
    let mut want = vec![0u8; len];
    want[..5].copy_from_slice(b"first");
    want[4096..4102].copy_from_slice(b"second");
    want[8192] = b'Z';
    want[len - 4..].copy_from_slice(b"last");
    for r in c.roots() {
        assert!(
            fs::read(r.join("mapped")).unwrap() == want,
            "mmap content differs in {}",
            r.display()
        );
    }
}

#[test]
fn concurrent_writers_different_files() {
    let mut c = Cluster::single("concfiles");
    let mnt = c.mnt().to_path_buf();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let mnt = mnt.clone();
            std::thread::spawn(move || {
                fs::create_dir(mnt.join(format!("t{t}"))).unwrap();
                for i in 0..50 {
                    let mut f = File::create(mnt.join(format!("t{t}/f{i}"))).unwrap();
                    for k in 0..8 {
                        f.write_all(&pseudo_random((t * 1000 + i * 10 + k) as u64, 3000))
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    c.finish();
    for r in c.roots() {
        for t in 0..4 {
            for i in [0, 17, 49] {
                let got = fs::read(r.join(format!("t{t}/f{i}"))).unwrap();
                let mut want = Vec::new();
                for k in 0..8 {
                    want.extend(pseudo_random((t * 1000 + i * 10 + k) as u64, 3000));
                }
                assert!(got == want, "t{t}/f{i} differs in {}", r.display());
            }
        }
    }
}

#[test]
fn concurrent_writers_one_file_disjoint_ranges() {
    let mut c = Cluster::single("concone");
    const CHUNK: usize = 65_536;
    const PER: usize = 16;
    let f = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(c.at("shared"))
            .unwrap(),
    );
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                // Thread t owns chunks t, t+4, t+8, ...; interleaved with the others.
                for j in 0..PER {
                    let idx = j * 4 + t;
                    f.write_all_at(&pseudo_random(idx as u64, CHUNK), (idx * CHUNK) as u64)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop(f);
    c.finish();
    let mut want = Vec::new();
    for idx in 0..PER * 4 {
        want.extend(pseudo_random(idx as u64, CHUNK));
    }
    for r in c.roots() {
        assert!(
            fs::read(r.join("shared")).unwrap() == want,
            "shared differs in {}",
            r.display()
        );
    }
}

fn mixed_workload(c: &Cluster) {
    fs::create_dir_all(c.at("a/b")).unwrap();
    // Compressible and incompressible data, small and large.
    fs::write(c.at("a/text"), "all work and no play\n".repeat(100_000)).unwrap();
    fs::write(c.at("a/random"), pseudo_random(77, 5 << 20)).unwrap();
    for i in 0..200 {
        fs::write(c.at(&format!("a/b/s{i}")), format!("small {i}")).unwrap();
    }
    fs::rename(c.at("a/b/s0"), c.at("a/renamed")).unwrap();
    fs::remove_file(c.at("a/b/s1")).unwrap();
}

fn check_mixed(r: &Path) {
    assert_eq!(
        fs::read(r.join("a/text")).unwrap(),
        "all work and no play\n".repeat(100_000).as_bytes()
    );
    assert!(fs::read(r.join("a/random")).unwrap() == pseudo_random(77, 5 << 20));
    assert_eq!(fs::read(r.join("a/renamed")).unwrap(), b"small 0");
    assert_eq!(fs::read(r.join("a/b/s199")).unwrap(), b"small 199");
    assert!(!r.join("a/b/s1").exists());
    assert_eq!(names(&r.join("a/b")).len(), 198);
}

#[test]
fn two_slaves_one_compressed() {
    let mut c = Cluster::start(
        "twoslaves",
        ClusterOpts {
            slaves: vec![
                SlaveOpts::default(),
                SlaveOpts {
                    compress: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        },
    );
    mixed_workload(&c);
    c.finish();
    assert_eq!(c.roots().len(), 3);
    for r in c.roots() {
        check_mixed(&r);
    }
}

#[test]
fn compression_for_all_slaves() {
    for z in [1, 2] {
        let mut c = Cluster::start(
            &format!("zall{z}"),
            ClusterOpts {
                global_z: Some(z),
                ..Default::default()
            },
        );
        mixed_workload(&c);
        // Large compressible and incompressible writes (probed, sent raw).
        std::fs::write(c.at("text"), b"tdfs compresses text ".repeat(200_000)).unwrap();
        std::fs::write(c.at("noise"), pseudo_random(9, 3 << 20)).unwrap();
        c.finish();
        for r in c.roots() {
            check_mixed(&r);
        }
    }
}

#[test]
fn tcp_nodelay_off() {
    let mut c = Cluster::start(
        "nodelay",
        ClusterOpts {
            nodelay_off: true,
            slaves: vec![SlaveOpts {
                nodelay_off: true,
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    mixed_workload(&c);
    // Many tiny synchronous ops, where Nagle would hurt most.
    for i in 0..300 {
        let mut f = File::create(c.at(&format!("tiny{i}"))).unwrap();
        f.write_all(b"t").unwrap();
        f.sync_all().unwrap();
    }
    c.finish();
    for r in c.roots() {
        check_mixed(&r);
        assert_eq!(fs::read(r.join("tiny299")).unwrap(), b"t");
    }
}

#[test]
fn slave_killed_and_restarted_catches_up() {
    let mut c = Cluster::single("restart");
    fs::write(c.at("before"), b"before the crash").unwrap();
    c.wait_replicas(Duration::from_secs(60));
    c.slaves[0].kill9();
    fs::write(c.at("during"), b"while the slave was down").unwrap();
    fs::create_dir(c.at("dir")).unwrap();
    fs::rename(c.at("before"), c.at("dir/before")).unwrap();
    c.slaves[0].restart();
    fs::write(c.at("after"), b"after the restart").unwrap();
    c.wait_replicas(Duration::from_secs(120));
    c.finish();
    for r in c.roots() {
        assert_eq!(fs::read(r.join("dir/before")).unwrap(), b"before the crash");
        assert_eq!(
            fs::read(r.join("during")).unwrap(),
            b"while the slave was down"
        );
        assert_eq!(fs::read(r.join("after")).unwrap(), b"after the restart");
    }
}

#[test]
fn slave_stops_cleanly_on_sigterm() {
    let mut c = Cluster::single("slaveterm");
    fs::write(c.at("x"), b"x").unwrap();
    c.finish();
    c.slaves[0].stop();
    assert_eq!(fs::read(c.replica(0).join("x")).unwrap(), b"x");
}

#[test]
fn master_catches_stop_signals_once_mounted() {
    let mut c = Cluster::single("mastersig");
    let pid = c.master.pid().expect("master running");
    // Checked the moment the mount is visible: a stop sent then must be caught, not fatal.
    for (sig, name) in [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGHUP, "SIGHUP"),
    ] {
        assert!(
            tdfs_tests::util::catches_signal(pid, sig),
            "{name} not caught once mounted"
        );
    }
    let st = c.master.terminate_and_wait();
    assert!(st.success(), "tdfs exited with {st} on SIGTERM");
}

#[test]
fn master_sigterm_drains_and_unmounts() {
    let mut c = Cluster::single("masterterm");
    for i in 0..100 {
        fs::write(c.at(&format!("f{i}")), pseudo_random(i, 10_000)).unwrap();
    }
    let st = c.master.terminate_and_wait();
    assert!(
        st.success(),
        "tdfs exited with {st} on SIGTERM; log:\n{}",
        c.master.log_tail()
    );
    assert!(
        !c.master.is_mounted(),
        "mount still present after the master exited"
    );
    tdfs_tests::assert_identical(&c.backing, c.replica(0));
    for r in c.roots() {
        assert!(fs::read(r.join("f42")).unwrap() == pseudo_random(42, 10_000));
    }
}

#[test]
fn shell_tools_on_the_mount() {
    // cp -a, mv, rm -r, ln, chmod -R through ordinary tools.
    let mut c = Cluster::single("shell");
    let mnt = c.mnt().display().to_string();
    run(Command::new("sh").arg("-c").arg(format!(
        "set -e; cd '{mnt}'; mkdir -p x/y/z; echo one > x/y/z/1; cp -a x x2; mv x2 x3; \
         ln -s y/z x/zl; chmod -R go-rwx x3; rm -r x3/y; touch -d '2001-02-03 04:05:06.789' x/y"
    )));
    c.finish();
    for r in c.roots() {
        assert_eq!(fs::read(r.join("x/y/z/1")).unwrap(), b"one\n");
        assert_eq!(fs::read(r.join("x/zl/1")).unwrap(), b"one\n");
        assert_eq!(names(&r.join("x3")), Vec::<String>::new());
        assert_eq!(
            fs::metadata(r.join("x/y")).unwrap().mtime_nsec(),
            789_000_000
        );
    }
}
