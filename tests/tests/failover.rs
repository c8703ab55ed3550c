//! Failover by hand (issue 17): a master killed or cut off, a replica promoted, the old
//! master fenced and rejoined without losing what only it held, and a planned switchover.
//!
//! Each node is a directory plus a state directory, run either as `tdfs-slave` or, once
//! promoted, as `tdfs` over the same directory: what an operator does on real machines.
//! Timings are printed (`TIMELINE`, `PAUSE`) for the closing notes; nothing asserts on them.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use tdfs_tests::compare::format_diffs;
use tdfs_tests::daemons::{Master, MasterOpts, Slave, SlaveLaunch};
use tdfs_tests::netns::TestNet;
use tdfs_tests::util::{
    bin, pseudo_random, read_stash, require_root_and_fuse, stashed, temp_dir, TempDir,
};
use tdfs_tests::{compare_trees, try_wait_identical, wait_until};

const CATCH_UP: Duration = Duration::from_secs(120);

/// One machine of the replica set: a tree, its state directory, and whichever daemon runs
/// on it now.
struct Node {
    name: &'static str,
    dir: PathBuf,
    state: PathBuf,
    mnt: PathBuf,
    logs: PathBuf,
    /// Network namespace prefix and address, for nodes on a test net.
    prefix: Vec<String>,
    host: Option<String>,
    slave: Option<Slave>,
    master: Option<Master>,
    runs: usize,
}

impl Node {
    fn new(root: &Path, name: &'static str) -> Node {
        let n = Node {
            name,
            dir: root.join(name),
            state: root.join(format!("{name}-state")),
            mnt: root.join(format!("{name}-mnt")),
            logs: root.join(format!("{name}-logs")),
            prefix: Vec::new(),
            host: None,
            slave: None,
            master: None,
            runs: 0,
        };
        for d in [&n.dir, &n.state, &n.mnt, &n.logs] {
            fs::create_dir_all(d).unwrap();
        }
        n
    }

    fn on_net(mut self, net: &TestNet, i: usize) -> Node {
        self.prefix = net.prefix(i);
        self.host = Some(net.ip(i));
        self
    }

    /// Starts this node's tdfs-slave; again on the same port when it ran before (so the
    /// address other nodes were given stays right).
    fn start_slave(&mut self) {
        assert!(self.master.is_none(), "{}: master still running", self.name);
        if let Some(s) = self.slave.as_mut() {
            if !s.is_running() {
                s.restart();
            }
            return;
        }
        self.slave = Some(Slave::start_launch(
            &self.dir,
            &self.state,
            &self.logs,
            &SlaveLaunch {
                prefix: self.prefix.clone(),
                host: self.host.clone(),
                // The test net is private to this test.
                extra_args: if self.host.is_some() {
                    vec!["--insecure".into()]
                } else {
                    Vec::new()
                },
                ..Default::default()
            },
        ));
    }

    fn addr(&self) -> String {
        self.slave.as_ref().expect("slave started once").addr()
    }

    fn stop_slave(&mut self) {
        if let Some(s) = self.slave.as_mut() {
            if s.is_running() {
                s.stop();
            }
        }
    }

    fn slave_running(&mut self) -> bool {
        self.slave.as_mut().is_some_and(|s| s.is_running())
    }

    fn master_opts(&mut self, slaves: &[String], extra: &[&str]) -> MasterOpts {
        self.runs += 1;
        MasterOpts {
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            prefix: self.prefix.clone(),
            ..MasterOpts::plain(
                self.dir.clone(),
                self.mnt.clone(),
                self.state.clone(),
                self.logs.join(format!("master-{}.log", self.runs)),
                slaves,
            )
        }
    }

    fn start_master(&mut self, slaves: &[String], extra: &[&str]) {
        assert!(!self.slave_running(), "{}: slave still running", self.name);
        let o = self.master_opts(slaves, extra);
        self.master = Some(Master::start(&o));
    }

    /// kill -9 the master (its dead mount is detached).
    fn kill_master(&mut self) {
        if let Some(mut m) = self.master.take() {
            m.kill9();
        }
    }

    fn master(&mut self) -> &mut Master {
        self.master.as_mut().expect("master running")
    }

    /// Every log this node wrote (slave and master runs).
    fn all_logs(&self) -> String {
        let mut s = String::new();
        if let Some(sl) = &self.slave {
            s.push_str(&sl.log());
        }
        let mut files: Vec<PathBuf> = fs::read_dir(&self.logs)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        for f in files {
            if f.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("master")
            {
                s.push_str(&fs::read_to_string(&f).unwrap_or_default());
            }
        }
        s
    }

    fn tdfs(&self, args: &[&str]) -> Output {
        let mut cmd = tdfs_tests::util::command_under(&self.prefix, "tdfs");
        cmd.args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("run tdfs")
    }

    /// `tdfs promote` on this node's state dir, asking `peers`.
    fn promote(&self, peers: &[String], force: bool) -> Output {
        let mut args = vec!["promote", "--state-dir", self.state.to_str().unwrap()];
        for p in peers {
            args.push("--peer");
            args.push(p);
        }
        if force {
            args.push("--force");
        }
        self.tdfs(&args)
    }

    /// The running master's `tdfs status --json`.
    fn status(&self) -> Value {
        let o = self.tdfs(&[
            "status",
            "--json",
            "--state-dir",
            self.state.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "tdfs status: {}", text(&o));
        serde_json::from_slice(&o.stdout).expect("status json")
    }

    /// The running slave's `tdfs-slave status --json`.
    fn slave_status(&self) -> Value {
        let o = Command::new(bin("tdfs-slave"))
            .args(["status", "--json", "--state-dir"])
            .arg(&self.state)
            .output()
            .expect("run tdfs-slave status");
        assert!(o.status.success(), "tdfs-slave status: {}", text(&o));
        serde_json::from_slice(&o.stdout).expect("slave status json")
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tree_bytes(root: &Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                n += m.len();
            }
        }
    }
    n
}

/// What the writer puts in file `i`.
fn payload(i: u64) -> Vec<u8> {
    pseudo_random(i ^ 0x5eed, 512 + (i as usize * 7919) % 12_000)
}

/// A writer creating `w/NNNNNN` files one after another through whichever mount `target`
/// names, and remembering which writes were acknowledged (create, write and close all
/// returned success). On an error it waits and retries the same file, unless told to stop
/// at the first one.
struct Writer {
    target: Arc<Mutex<PathBuf>>,
    acked: Arc<Mutex<Vec<u64>>>,
    next: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Longest time between two acknowledged writes, and how many errors were seen.
    gap: Arc<Mutex<Duration>>,
    errors: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(mount: &Path, stop_at_error: bool) -> Writer {
        fs::create_dir_all(mount.join("w")).unwrap();
        let mut w = Writer {
            target: Arc::new(Mutex::new(mount.to_path_buf())),
            acked: Arc::default(),
            next: Arc::new(AtomicU64::new(0)),
            stop: Arc::default(),
            gap: Arc::default(),
            errors: Arc::default(),
            handle: None,
        };
        let (target, acked, next, stop, gap, errors) = (
            w.target.clone(),
            w.acked.clone(),
            w.next.clone(),
            w.stop.clone(),
            w.gap.clone(),
            w.errors.clone(),
        );
        let handle = thread::spawn(move || {
            let mut last_ok = Instant::now();
            let limit = Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Acquire) && Instant::now() < limit {
                let i = next.load(Ordering::Acquire);
                let root = target.lock().unwrap().clone();
                let p = root.join("w").join(format!("{i:06}"));
                let r = fs::File::create(&p).and_then(|mut f| f.write_all(&payload(i)));
                match r {
                    Ok(()) => {
                        let now = Instant::now();
                        let mut g = gap.lock().unwrap();
                        *g = (*g).max(now - last_ok);
                        last_ok = now;
                        acked.lock().unwrap().push(i);
                        next.store(i + 1, Ordering::Release);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if stop_at_error {
                            return;
                        }
                        thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        });
        w.handle = Some(handle);
        w
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn wait_acked(&self, n: usize) {
        assert!(
            wait_until(Duration::from_secs(120), || self.acked() >= n),
            "writer acknowledged only {} writes of {n}",
            self.acked()
        );
    }

    fn retarget(&self, mount: &Path) {
        *self.target.lock().unwrap() = mount.to_path_buf();
    }

    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            h.join().expect("writer thread");
        }
        self.acked.lock().unwrap().clone()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Every acknowledged write is in `root` with its content.
fn assert_acked_present(root: &Path, acked: &[u64], what: &str) {
    let mut missing = Vec::new();
    for &i in acked {
        let p = root.join("w").join(format!("{i:06}"));
        match fs::read(&p) {
            Ok(b) if b == payload(i) => {}
            Ok(_) => missing.push(format!("{i} (wrong content)")),
            Err(e) => missing.push(format!("{i} ({e})")),
        }
    }
    assert!(
        missing.is_empty(),
        "{what}: {} of {} acknowledged writes missing or wrong: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(20)]
    );
}

fn assert_identical_trees(a: &Path, b: &Path, what: &str, logs: impl Fn() -> String) {
    if let Err(e) = try_wait_identical(a, b, CATCH_UP) {
        panic!("{what}: {e}\nlogs:\n{}", logs());
    }
}

/// Fills the mount with `n` files of ~64 KiB in a few directories.
fn populate(mnt: &Path, n: u64) {
    for i in 0..n {
        let d = mnt.join(format!("d{}", i % 8));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(format!("f{i}")), pseudo_random(i, 65_536)).unwrap();
    }
}

fn setup(name: &str) -> (TempDir, Node, Node, Node) {
    require_root_and_fuse();
    let t = temp_dir(name);
    let a = Node::new(t.path(), "a");
    let b = Node::new(t.path(), "b");
    let c = Node::new(t.path(), "c");
    (t, a, b, c)
}

/// Promotes whichever of `b`, `c` holds the most: `b` first; if `tdfs promote` refuses
/// because `c` is ahead, `c` instead (what the runbook says to do). Both slaves are running
/// on entry; the promoted one's slave is stopped. Returns (promoted, follower).
fn promote_most_advanced<'a>(b: &'a mut Node, c: &'a mut Node) -> (&'a mut Node, &'a mut Node) {
    b.stop_slave();
    let o = b.promote(&[c.addr()], false);
    if o.status.success() {
        return (b, c);
    }
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        err.contains("refusing to promote") && err.contains(&c.addr()),
        "promote b failed for another reason than c being ahead: {}",
        text(&o)
    );
    b.start_slave();
    c.stop_slave();
    let o = c.promote(&[b.addr()], false);
    assert!(o.status.success(), "promote c (ahead of b): {}", text(&o));
    (c, b)
}

/// Kill -9 the master mid-workload, promote the replica that is ahead, let the other follow
/// it, and rejoin the old master. `sync` are the master's sync-mode flags.
fn kill_promote_follow(name: &str, sync: &[&str]) {
    let (_t, mut a, mut b, mut c) = setup(name);
    b.start_slave();
    c.start_slave();
    let mut args = vec!["--fence-check", "2"];
    args.extend_from_slice(sync);
    a.start_master(&[b.addr(), c.addr()], &args);
    populate(&a.mnt, 300);
    let w = Writer::start(&a.mnt, true);
    w.wait_acked(300);
    let t_kill = Instant::now();
    a.kill_master();
    let acked = w.finish();
    let total = tree_bytes(&a.dir);

    let (new, follower) = promote_most_advanced(&mut b, &mut c);
    let t_promoted = t_kill.elapsed();
    let follower_addr = follower.addr();
    new.start_master(
        std::slice::from_ref(&follower_addr),
        &["--fence-check", "2"],
    );
    let t_mounted = t_kill.elapsed();
    fs::write(new.mnt.join("after-failover"), b"written on the new master").unwrap();
    let t_writable = t_kill.elapsed();
    if sync.contains(&"applied") {
        // What A acknowledged had reached a replica, and the promoted one holds the most.
        assert_acked_present(&new.dir, &acked, "new master after failover (applied mode)");
    }
    let logs = || format!("{}\n{}", new.all_logs(), follower.all_logs());
    assert_identical_trees(&new.dir, &follower.dir, "follower after failover", logs);
    let t_caught_up = t_kill.elapsed();
    let st = new.status();
    let s = &st["slaves"][0];
    let moved = s["sync_bytes"].as_u64().unwrap_or(0);
    eprintln!(
        "TIMELINE {name}: promoted {} ({} acked writes before the kill) at {:.2}s, mounted \
         {:.2}s, writable {:.2}s, follower {} identical {:.2}s; sync data moved {moved} bytes \
         of a {total}-byte tree, {} bytes on the wire; last sync {}",
        new.name,
        acked.len(),
        t_promoted.as_secs_f64(),
        t_mounted.as_secs_f64(),
        t_writable.as_secs_f64(),
        follower.name,
        t_caught_up.as_secs_f64(),
        s["bytes_sent"],
        s["last_sync"]
    );
    assert_eq!(st["epoch"].as_u64(), Some(2), "new master's epoch: {st}");
    // Catching up moves what differs, never the whole tree.
    assert!(
        moved < total / 4,
        "the follower's catch-up moved {moved} bytes of a {total}-byte tree: {st}"
    );
    // The follower's view: it follows epoch 2.
    let fs_ = follower.slave_status();
    assert_eq!(fs_["epoch"].as_u64(), Some(2), "{fs_}");

    // The old master rejoins as a replica: whatever only it held is stashed, then it is
    // made identical.
    a.start_slave();
    let a_addr = a.addr();
    let o = new.tdfs(&[
        "slave",
        "add",
        "--state-dir",
        new.state.to_str().unwrap(),
        &a_addr,
    ]);
    assert!(o.status.success(), "tdfs slave add: {}", text(&o));
    assert_identical_trees(&new.dir, &a.dir, "old master after rejoining", || {
        format!("{}\n{}", new.all_logs(), a.all_logs())
    });
    let new_name = new.name;
    new.master().unmount_and_wait();
    let diffs = compare_trees(&b.dir, &c.dir);
    assert!(
        diffs.is_empty(),
        "b and c differ:\n{}",
        format_diffs(&diffs)
    );
    let diffs = compare_trees(&b.dir, &a.dir);
    assert!(
        diffs.is_empty(),
        "a differs from {new_name}:\n{}",
        format_diffs(&diffs)
    );
}

#[test]
fn kill9_master_async_promote_and_follow() {
    kill_promote_follow("failover-kill-async", &[]);
}

#[test]
fn kill9_master_applied_promote_and_follow() {
    kill_promote_follow(
        "failover-kill-applied",
        &["--sync", "applied", "--min-replicas", "1"],
    );
}

/// Every path under `root` with its inode number and ctime: any change at all (data,
/// metadata, an entry added or removed) shows.
fn touch_marks(root: &Path) -> BTreeMap<PathBuf, (u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let m = fs::symlink_metadata(&d).unwrap();
        out.insert(d.clone(), (m.ino(), m.ctime(), m.ctime_nsec()));
        for e in fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path(), (m.ino(), m.ctime(), m.ctime_nsec()));
            }
        }
    }
    out
}

fn cp_a(from: &Path, to: &Path) {
    let _ = fs::remove_dir_all(to);
    let o = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(o.status.success(), "cp -a: {}", text(&o));
}

/// The old master's start must fail with exit status 3, saying it was replaced.
fn assert_refused_start(a: &mut Node, args: &[String], extra: &[&str], what: &str) -> String {
    let o = a.master_opts(args, extra);
    let err = match Master::try_start(&o) {
        Ok(_) => panic!("{what}: the old master mounted after the promotion"),
        Err(e) => e,
    };
    assert!(
        err.contains("exited with exit status: 3"),
        "{what}: expected exit status 3: {err}"
    );
    assert!(
        err.contains("replaced") && err.contains("epoch 2"),
        "{what}: the old master's log says it was replaced, by which epoch: {err}"
    );
    err
}

/// A, B, C; A killed, B promoted and holding C. A restarted with its old arguments is
/// refused; C is not touched; both logs say why. The same with C free (B stopped). A node
/// state that remembers being replaced refuses even without asking; a master started with
/// the check off and a state from before the promotion mounts, but fences itself at C's
/// refusal: its writes fail and C is not touched.
#[test]
fn old_master_restarted_after_promotion_is_refused() {
    let (t, mut a, mut b, mut c) = setup("failover-restart");
    b.start_slave();
    c.start_slave();
    let old_args = vec![b.addr(), c.addr()];
    a.start_master(&old_args, &[]);
    populate(&a.mnt, 50);
    assert_identical_trees(&a.dir, &c.dir, "c before the kill", || c.all_logs());
    a.kill_master();
    let a_state_then = t.path().join("a-state-at-kill");
    cp_a(&a.state, &a_state_then);
    b.stop_slave();
    let o = b.promote(&[c.addr()], false);
    assert!(o.status.success(), "promote b: {}", text(&o));
    b.start_master(&[c.addr()], &[]);
    fs::write(b.mnt.join("new-on-b"), b"epoch 2").unwrap();
    assert_identical_trees(&b.dir, &c.dir, "c following b", || b.all_logs());

    // While B holds C: refused at the startup check.
    let before = touch_marks(&c.dir);
    assert_refused_start(&mut a, &old_args, &[], "while b holds c");
    let c_log = c.slave.as_ref().unwrap().log();
    assert!(
        c_log.contains("asked where this replica stands") && c_log.contains("epoch 2"),
        "c's log says a replaced master asked:\n{c_log}"
    );
    assert_eq!(
        touch_marks(&c.dir),
        before,
        "c was touched by the refused master"
    );
    // B's stream to C went on undisturbed.
    fs::write(b.mnt.join("still-streaming"), b"yes").unwrap();
    assert_identical_trees(&b.dir, &c.dir, "c still following b", || b.all_logs());

    // A's state now remembers the newer epoch: no leading even without asking.
    let before = touch_marks(&c.dir);
    assert_refused_start(
        &mut a,
        &old_args,
        &["--fence-check", "0"],
        "state remembers",
    );
    assert_eq!(touch_marks(&c.dir), before, "c touched");

    // While C is free (B stopped), from A's state as it was at the kill.
    b.master().unmount_and_wait();
    b.master = None;
    let before = touch_marks(&c.dir);
    cp_a(&a_state_then, &a.state);
    assert_refused_start(&mut a, &old_args, &[], "while c is free");
    assert_eq!(touch_marks(&c.dir), before, "c touched while free");

    // Same, with the startup check off: it mounts, C refuses its link, it fences itself.
    cp_a(&a_state_then, &a.state);
    let o = a.master_opts(&old_args, &["--fence-check", "0"]);
    a.master = Some(Master::start(&o));
    let fenced = wait_until(Duration::from_secs(30), || a.status()["fenced"].is_object());
    assert!(fenced, "a was not fenced:\n{}", a.all_logs());
    let e = fs::write(a.mnt.join("split-brain"), b"must not happen").unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EROFS),
        "write on a fenced master: {e}"
    );
    assert!(a.master().is_mounted(), "a fenced master stays mounted");
    let st = a.status();
    assert_eq!(st["fenced"]["epoch"].as_u64(), Some(2), "{st}");
    let log = a.master().log_text();
    assert!(
        log.contains("FENCED") && log.contains("tdfs-slave"),
        "a's log says it is fenced and how to rejoin:\n{log}"
    );
    assert!(
        c.slave.as_ref().unwrap().log().contains("refusing master"),
        "c's log says it refused a:\n{}",
        c.all_logs()
    );
    assert!(
        !a.dir.join("split-brain").exists(),
        "the refused write reached a's tree"
    );
    assert_eq!(
        touch_marks(&c.dir),
        before,
        "c was touched by the fenced master"
    );
    a.master().unmount_and_wait();
}

/// A partitioned from B and C (its port on the bridge down) keeps taking writes; B is
/// promoted and C follows it. When the net heals, A learns it was replaced and stops taking
/// writes; rejoined as a replica of B, it stashes everything it wrote during the partition
/// (every path it would lose is in the manifest, with its content) and ends identical to B.
#[test]
fn partitioned_master_is_fenced_and_rejoins_with_a_stash() {
    require_root_and_fuse();
    let mut net = TestNet::create();
    let (na, nb, nc) = (net.add_node(), net.add_node(), net.add_node());
    let t = temp_dir("failover-partition");
    let mut a = Node::new(t.path(), "a").on_net(&net, na);
    let mut b = Node::new(t.path(), "b").on_net(&net, nb);
    let mut c = Node::new(t.path(), "c").on_net(&net, nc);
    b.start_slave();
    c.start_slave();
    a.start_master(&[b.addr(), c.addr()], &[]);
    populate(&a.mnt, 40);
    let logs = |n: &[&Node]| {
        n.iter()
            .map(|n| n.all_logs())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_identical_trees(&a.dir, &c.dir, "c before the partition", || logs(&[&a, &c]));
    let w = Writer::start(&a.mnt, true);
    w.wait_acked(50);

    // Cut A off; what it acknowledges from now on reaches nobody.
    net.link(na, false);
    let cut_at = w.acked();
    w.wait_acked(cut_at + 100);
    let acked = w.finish();
    let partition_writes: Vec<u64> = acked[cut_at..].to_vec();
    // Edits, removals and renames of files the others hold too.
    fs::write(a.mnt.join("d0/f0"), b"edited on A during the partition").unwrap();
    fs::remove_file(a.mnt.join("d1/f1")).unwrap();
    fs::rename(a.mnt.join("d2/f2"), a.mnt.join("d2/f2-renamed-on-a")).unwrap();
    let a_f0 = fs::read(a.dir.join("d0/f0")).unwrap();
    let a_f1 = pseudo_random(1, 65_536);
    assert!(
        a.status()["fenced"].is_null(),
        "a fenced before any promotion"
    );

    // Promote B, or C if it holds more of A's ops (async: either may), start it, write
    // there. "b" below is the promoted one, "c" the other.
    let t0 = Instant::now();
    let (b, c) = promote_most_advanced(&mut b, &mut c);
    b.start_master(&[c.addr()], &[]);
    fs::write(b.mnt.join("written-on-b"), b"epoch 2").unwrap();
    fs::write(b.mnt.join("d0/f0"), b"edited on B after the promotion").unwrap();
    let b_writable = t0.elapsed();
    assert_identical_trees(&b.dir, &c.dir, "c following b during the partition", || {
        logs(&[b, c])
    });
    let c_following = t0.elapsed();

    // Heal: A's links reach C, which refuses A and tells it of epoch 2.
    net.link(na, true);
    let healed = Instant::now();
    let fenced = wait_until(Duration::from_secs(90), || a.status()["fenced"].is_object());
    assert!(fenced, "a not fenced after the heal:\n{}", a.all_logs());
    let fenced_after = healed.elapsed();
    let e = fs::write(a.mnt.join("after-heal"), b"x").unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EROFS),
        "write on fenced a: {e}"
    );
    assert!(a.master().is_mounted(), "a fenced master stays mounted");
    assert_identical_trees(&b.dir, &c.dir, "c untouched by a", || logs(&[b, c]));

    // Rejoin A as B's replica.
    a.master().unmount_and_wait();
    a.master = None;
    a.start_slave();
    let o = b.tdfs(&[
        "slave",
        "add",
        "--state-dir",
        b.state.to_str().unwrap(),
        &a.addr(),
    ]);
    assert!(o.status.success(), "tdfs slave add a: {}", text(&o));
    assert_identical_trees(&b.dir, &a.dir, "a after rejoining", || logs(&[&a, b]));
    let (stash, manifest) = read_stash(&a.state);
    let st = a.slave_status();
    assert_eq!(
        st["last_stash"]["dir"].as_str(),
        Some(stash.to_str().unwrap()),
        "status names the stash: {st}"
    );
    assert!(
        a.all_logs().contains(stash.to_str().unwrap()),
        "a's log names the stash {}",
        stash.display()
    );
    let files = stash.join("files");
    let mut missing = Vec::new();
    for i in &partition_writes {
        let rel = format!("w/{i:06}");
        if !stashed(&manifest, &rel) {
            missing.push(format!("{rel}: not in the manifest"));
        } else if fs::read(files.join(&rel)).ok() != Some(payload(*i)) {
            missing.push(format!("{rel}: stash copy missing or wrong"));
        }
    }
    for (rel, want) in [("d0/f0", Some(a_f0)), ("d2/f2-renamed-on-a", None)] {
        if !stashed(&manifest, rel) {
            missing.push(format!("{rel}: not in the manifest"));
        } else if let Some(want) = want {
            if fs::read(files.join(rel)).ok() != Some(want) {
                missing.push(format!("{rel}: stash copy wrong"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} of A's partition-time changes are not in the stash {}:\n{}\nmanifest:\n{}",
        missing.len(),
        stash.display(),
        missing.join("\n"),
        fs::read_to_string(stash.join("MANIFEST.tsv")).unwrap_or_default()
    );
    // d1/f1, removed on A, is back from B: nothing of A's to keep there.
    assert_eq!(fs::read(a.dir.join("d1/f1")).unwrap(), a_f1);
    eprintln!(
        "PARTITION: {} writes on A during the partition; B writable {:.2}s after promote, C \
         following at {:.2}s; A fenced {:.2}s after the heal; stash {} with {} manifest lines",
        partition_writes.len(),
        b_writable.as_secs_f64(),
        c_following.as_secs_f64(),
        fenced_after.as_secs_f64(),
        stash.display(),
        manifest.len()
    );
    b.master().unmount_and_wait();
    let d = compare_trees(&b.dir, &a.dir);
    assert!(d.is_empty(), "a differs from b:\n{}", format_diffs(&d));
    let d = compare_trees(&b.dir, &c.dir);
    assert!(d.is_empty(), "c differs from b:\n{}", format_diffs(&d));
}

/// Planned switchover under a running writer: fence A (writes stop, replicas drain), stop
/// it and start it as a replica, promote B, start it leading A and C, point the writer at it. No acknowledged write is
/// lost, A needs no stash, and the writer's pause is measured.
#[test]
fn planned_switchover_loses_nothing() {
    let (_t, mut a, mut b, mut c) = setup("failover-switchover");
    b.start_slave();
    c.start_slave();
    a.start_master(&[b.addr(), c.addr()], &[]);
    populate(&a.mnt, 20);
    let w = Writer::start(&a.mnt, false);
    w.wait_acked(200);

    let t0 = Instant::now();
    let o = a.tdfs(&[
        "fence",
        "--state-dir",
        a.state.to_str().unwrap(),
        "--drain",
        "60",
        "--json",
    ]);
    assert!(o.status.success(), "tdfs fence: {}", text(&o));
    let fenced: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(fenced["drained"].as_bool(), Some(true), "{fenced}");
    let last = fenced["last_seq"].as_u64().unwrap();
    let t_fenced = t0.elapsed();
    let e = fs::write(a.mnt.join("after-fence"), b"x").unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EROFS),
        "write after fence: {e}"
    );

    // A steps down and becomes a replica; B is promoted and leads A and C. A is on B's line
    // already: it resumes where it stopped, without a sync or a stash.
    a.master().unmount_and_wait();
    a.master = None;
    a.start_slave();
    b.stop_slave();
    let o = b.promote(&[c.addr(), a.addr()], false);
    assert!(o.status.success(), "promote b: {}", text(&o));
    b.start_master(&[c.addr(), a.addr()], &[]);
    w.retarget(&b.mnt);
    let before = w.acked();
    w.wait_acked(before + 1);
    let pause = t0.elapsed();
    w.wait_acked(before + 200);
    let gap = *w.gap.lock().unwrap();
    let acked = w.finish();
    assert_acked_present(&b.mnt, &acked, "b after the switchover");
    assert_identical_trees(&b.dir, &a.dir, "a rejoined", || a.all_logs());
    assert_identical_trees(&b.dir, &c.dir, "c following b", || c.all_logs());
    let st = b.status();
    for s in st["slaves"].as_array().unwrap() {
        assert_eq!(s["syncs"].as_u64(), Some(0), "a slave needed a sync: {st}");
    }
    assert!(
        !a.state.join("stash").exists(),
        "a stashed something after a planned switchover"
    );
    eprintln!(
        "PAUSE switchover: fenced and drained at seq {last} in {:.3}s; first write on B {:.3}s \
         after the fence began; longest gap between acknowledged writes {:.3}s; epoch now {}",
        t_fenced.as_secs_f64(),
        pause.as_secs_f64(),
        gap.as_secs_f64(),
        st["epoch"]
    );
    b.master().unmount_and_wait();
}

/// A lagging replica is not promoted while a peer holds more; with --force it is, and the
/// peer that was ahead stashes its extra ops when it follows.
#[test]
fn promote_refuses_a_lagging_replica_unless_forced() {
    let (_t, mut a, mut b, mut c) = setup("failover-lagging");
    b.start_slave();
    c.start_slave();
    a.start_master(&[b.addr(), c.addr()], &[]);
    populate(&a.mnt, 20);
    assert_identical_trees(&a.dir, &c.dir, "c", || c.all_logs());
    c.stop_slave();
    for i in 0..30 {
        fs::write(a.mnt.join(format!("only-a-and-b-{i}")), payload(i)).unwrap();
    }
    assert_identical_trees(&a.dir, &b.dir, "b", || b.all_logs());
    a.kill_master();

    // C is behind B: refused, naming B.
    let o = c.promote(&[b.addr()], false);
    assert!(!o.status.success(), "lagging c promoted: {}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("refusing to promote") && err.contains(&b.addr()) && err.contains("--force"),
        "the refusal names the peer ahead and the way out: {err}"
    );
    // Nothing changed: C is still a replica that B's old master line can resume.
    let st_before = fs::read(c.state.join("node.state")).unwrap();
    let o = c.promote(&[b.addr()], false);
    assert!(!o.status.success());
    assert_eq!(fs::read(c.state.join("node.state")).unwrap(), st_before);

    let o = c.promote(&[b.addr()], true);
    assert!(o.status.success(), "forced promote: {}", text(&o));
    c.start_master(&[b.addr()], &[]);
    fs::write(c.mnt.join("on-c"), b"epoch 2").unwrap();
    assert_identical_trees(&c.dir, &b.dir, "b following forced c", || {
        format!("{}\n{}", b.all_logs(), c.all_logs())
    });
    let (stash, manifest) = read_stash(&b.state);
    for i in 0..30 {
        let rel = format!("only-a-and-b-{i}");
        assert!(
            stashed(&manifest, &rel),
            "{rel} not in b's stash {}",
            stash.display()
        );
        assert_eq!(
            fs::read(stash.join("files").join(&rel)).unwrap(),
            payload(i)
        );
    }
    c.master().unmount_and_wait();
}
