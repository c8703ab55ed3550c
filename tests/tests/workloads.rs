//! Real workloads through the mount: unpacking source trees, git, sqlite, 100,000 files.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tdfs_tests::util::run;
use tdfs_tests::{assert_same_content, Cluster};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

#[test]
fn unpack_source_trees_with_tar() {
    let mut c = Cluster::single("tar");
    // System headers (several thousand files, symlinks included where present).
    let headers = c.scratch.join("headers.tar");
    let mut parts = vec!["include/linux", "include/asm-generic"];
    for extra in [
        "include/x86_64-linux-gnu",
        "include/c++",
        "include/aarch64-linux-gnu",
    ] {
        if Path::new("/usr").join(extra).is_dir() {
            parts.push(extra);
        }
    }
    run(Command::new("tar")
        .arg("-cf")
        .arg(&headers)
        .arg("-C")
        .arg("/usr")
        .args(&parts));
    // This repository's sources.
    let ws = c.scratch.join("ws.tar");
    run(Command::new("tar")
        .arg("-cf")
        .arg(&ws)
        .arg("--exclude=./target")
        .arg("--exclude=./.git")
        .arg("-C")
        .arg(workspace_root())
        .arg("."));
    fs::create_dir(c.at("ws")).unwrap();
    run(Command::new("tar")
        .arg("-xpf")
        .arg(&headers)
        .arg("-C")
        .arg(c.mnt()));
    run(Command::new("tar")
        .arg("-xpf")
        .arg(&ws)
        .arg("-C")
        .arg(c.at("ws")));
    c.finish();
    // The tarball unpacked again outside the mount, to compare the contents with.
    let check = c.scratch.join("ws-check");
    fs::create_dir(&check).unwrap();
    run(Command::new("tar")
        .arg("-xpf")
        .arg(&ws)
        .arg("-C")
        .arg(&check));
    for r in c.roots() {
        for p in &parts {
            assert_same_content(&Path::new("/usr").join(p), &r.join(p));
        }
        assert_same_content(&check, &r.join("ws"));
        assert!(r.join("ws/Cargo.toml").is_file());
    }
}

fn git(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=tdfs test",
            "-c",
            "user.email=tdfs@example.invalid",
            "-c",
            "safe.directory=*",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir);
    cmd
}

#[test]
fn git_init_add_commit_gc() {
    let mut c = Cluster::single("git");
    let repo = c.at("repo");
    fs::create_dir(&repo).unwrap();
    run(git(&repo).arg("init").arg("-q"));
    // Copy this workspace's sources in, commit in a few rounds.
    run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && tar -cf - --exclude=./target --exclude=./.git . | tar -xf - -C '{}'",
        workspace_root().display(),
        repo.display()
    )));
    run(git(&repo).args(["add", "-A"]));
    run(git(&repo).args(["commit", "-q", "-m", "initial import"]));
    for i in 0..10 {
        fs::write(repo.join(format!("change{i}.txt")), format!("change {i}\n")).unwrap();
        if i % 3 == 0 {
            fs::write(repo.join("Cargo.toml"), format!("# edit {i}\n")).unwrap();
        }
        run(git(&repo).args(["add", "-A"]));
        run(git(&repo).args(["commit", "-q", "-m", &format!("change {i}")]));
    }
    run(git(&repo).args(["gc", "-q", "--aggressive", "--prune=now"]));
    let head = run(git(&repo).args(["rev-parse", "HEAD"]));
    c.finish();
    for r in c.roots() {
        let rr = r.join("repo");
        run(git(&rr).args(["fsck", "--full", "--strict"]));
        assert_eq!(run(git(&rr).args(["rev-parse", "HEAD"])), head);
        let n = run(git(&rr).args(["rev-list", "--count", "HEAD"]));
        assert_eq!(n.trim(), "11");
        let status = run(git(&rr).args(["status", "--porcelain"]));
        assert_eq!(status, "", "working tree not clean in {}", rr.display());
    }
}

fn sqlite(db: &Path, sql: &str) -> String {
    let mut child = Command::new("sqlite3")
        .arg("-batch")
        .arg(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sqlite3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sqlite3 {} failed: {}",
        db.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn sqlite_workload(name: &str, journal: &str) {
    let mut c = Cluster::single(name);
    let db = c.at("app.db");
    let mut sql = format!(
        "PRAGMA journal_mode={journal};\nCREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT, v BLOB);\n\
         CREATE INDEX tk ON t(k);\n"
    );
    for tx in 0..300 {
        sql.push_str("BEGIN;\n");
        for j in 0..10 {
            let id = tx * 10 + j;
            sql.push_str(&format!(
                "INSERT INTO t(k, v) VALUES ('key{id}', randomblob({}));\n",
                100 + (id % 7) * 300
            ));
        }
        if tx % 10 == 9 {
            sql.push_str(&format!("DELETE FROM t WHERE id % 10 = {};\n", tx % 10));
            sql.push_str("UPDATE t SET k = k || '+' WHERE id % 13 = 0;\n");
        }
        sql.push_str("COMMIT;\n");
    }
    sqlite(&db, &sql);
    let count = sqlite(&db, "SELECT count(*) FROM t;");
    let digest = sqlite(&db, "SELECT sum(length(v)), group_concat(k) FROM t;");
    c.finish();
    for r in c.roots() {
        let d = r.join("app.db");
        assert_eq!(
            sqlite(&d, "PRAGMA integrity_check;"),
            "ok",
            "{}",
            d.display()
        );
        assert_eq!(sqlite(&d, "SELECT count(*) FROM t;"), count);
        assert_eq!(
            sqlite(&d, "SELECT sum(length(v)), group_concat(k) FROM t;"),
            digest
        );
    }
    assert!(count.parse::<u64>().unwrap() > 2000, "count {count}");
}

#[test]
fn sqlite_many_transactions() {
    sqlite_workload("sqlite", "delete");
}

#[test]
fn sqlite_many_transactions_wal() {
    sqlite_workload("sqlitewal", "wal");
}

/// Counts regular files below `root`.
fn count_files(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn hundred_thousand_files() {
    const DIRS: usize = 100;
    const PER: usize = 1000;
    let mut c = Cluster::single("100k");
    let t0 = Instant::now();
    let mnt = c.at("many");
    fs::create_dir(&mnt).unwrap();
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let mnt = mnt.clone();
            std::thread::spawn(move || {
                for d in (w..DIRS).step_by(2) {
                    let dir = mnt.join(format!("d{d:03}"));
                    fs::create_dir(&dir).unwrap();
                    for i in 0..PER {
                        fs::write(dir.join(format!("f{i:04}")), format!("{d}/{i}")).unwrap();
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    eprintln!("100k: created in {:?}", t0.elapsed());
    // List and stat everything through the mount.
    assert_eq!(count_files(&mnt), DIRS * PER);
    for d in 0..DIRS {
        for i in 0..PER {
            let m = fs::symlink_metadata(mnt.join(format!("d{d:03}/f{i:04}"))).unwrap();
            assert_eq!(m.len() as usize, format!("{d}/{i}").len());
        }
    }
    eprintln!("100k: listed and stat'ed at {:?}", t0.elapsed());
    // The replica has all of it while still mounted.
    c.wait_replicas(Duration::from_secs(600));
    eprintln!("100k: replica identical at {:?}", t0.elapsed());
    for r in c.replicas() {
        assert_eq!(count_files(&r.join("many")), DIRS * PER);
        assert_eq!(fs::read(r.join("many/d042/f0777")).unwrap(), b"42/777");
    }
    fs::remove_dir_all(&mnt).unwrap();
    eprintln!("100k: removed at {:?}", t0.elapsed());
    c.finish();
    eprintln!("100k: finished at {:?}", t0.elapsed());
    for r in c.roots() {
        assert!(!r.join("many").exists());
        assert_eq!(fs::read_dir(&r).unwrap().count(), 0);
    }
}
