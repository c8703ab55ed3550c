//! Relays (issue 19): replicas that feed replicas of their own, with the master's epochs and
//! sequence numbers, so a replica can be taken over by another upstream and continue from
//! where it is.
//!
//! Every test builds its tree bottom-up (leaves, then relays with `-c LEAF`, then the master
//! with `-c RELAY`), runs a real workload through the mount, and compares every replica with
//! the master's backing directory on every attribute a mirror keeps. Takeover timings and
//! bytes moved are printed (`TAKEOVER`) for the closing note; the bounds asserted are loose
//! (a relay's replicas must not get a full copy), never a timing.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use tdfs_tests::daemons::{Master, MasterOpts, Slave, SlaveLaunch};
use tdfs_tests::netns::TestNet;
use tdfs_tests::util::{
    bin, http_get, metrics_port, pseudo_random, require_root_and_fuse, set_xattr, temp_dir,
    wait_log, TempDir,
};
use tdfs_tests::{compare_trees, try_wait_identical, wait_until};

const CATCH_UP: Duration = Duration::from_secs(120);

/// A replica (leaf or relay) of the test's tree.
struct Node {
    dir: PathBuf,
    state: PathBuf,
    slave: Slave,
}

impl Node {
    fn start(root: &Path, name: &str, args: &[String]) -> Node {
        Self::start_launch(
            root,
            name,
            SlaveLaunch {
                extra_args: args.to_vec(),
                ..Default::default()
            },
        )
    }

    fn start_launch(root: &Path, name: &str, launch: SlaveLaunch) -> Node {
        let dir = root.join(name);
        let state = root.join(format!("{name}-state"));
        let logs = root.join(format!("{name}-logs"));
        for d in [&dir, &state, &logs] {
            fs::create_dir_all(d).unwrap();
        }
        let slave = Slave::start_launch(&dir, &state, &logs, &launch);
        Node { dir, state, slave }
    }

    fn addr(&self) -> String {
        self.slave.addr()
    }

    fn status(&self) -> Value {
        let o = Command::new(bin("tdfs-slave"))
            .args(["status", "--json", "--state-dir"])
            .arg(&self.state)
            .output()
            .expect("run tdfs-slave status");
        assert!(
            o.status.success(),
            "tdfs-slave status: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).expect("status json")
    }
}

fn cs(addrs: &[String]) -> Vec<String> {
    addrs
        .iter()
        .flat_map(|a| ["-c".to_string(), a.clone()])
        .collect()
}

fn start_master(root: &Path, slaves: &[String], extra: &[&str]) -> Master {
    let o = MasterOpts {
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..MasterOpts::plain(
            root.join("m"),
            root.join("mnt"),
            root.join("m-state"),
            root.join("master.log"),
            slaves,
        )
    };
    for d in [&o.backing, &o.mountpoint, &o.state_dir] {
        fs::create_dir_all(d).unwrap();
    }
    Master::start(&o)
}

fn master_status(root: &Path) -> Value {
    let o = Command::new(bin("tdfs"))
        .args(["status", "--json", "--state-dir"])
        .arg(root.join("m-state"))
        .output()
        .expect("run tdfs status");
    assert!(
        o.status.success(),
        "tdfs status: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("status json")
}

/// A varied round of changes: files of several sizes, renames, links, symlinks, modes,
/// xattrs, truncates, directories made and removed.
fn churn(mnt: &Path, seed: u64, n: u64) {
    for i in 0..n {
        let k = seed * 1_000_003 + i;
        let d = mnt.join(format!("d{}", k % 7));
        fs::create_dir_all(&d).unwrap();
        let f = d.join(format!("f{k}"));
        fs::write(&f, pseudo_random(k, 100 + (k as usize * 7919) % 70_000)).unwrap();
        match k % 9 {
            0 => fs::rename(&f, d.join(format!("r{k}"))).unwrap(),
            1 => fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap(),
            2 => fs::hard_link(&f, d.join(format!("h{k}"))).unwrap(),
            3 => symlink(format!("f{k}"), d.join(format!("s{k}"))).unwrap(),
            4 => set_xattr(&f, "user.k", k.to_string().as_bytes(), 0).unwrap(),
            5 => fs::OpenOptions::new()
                .write(true)
                .open(&f)
                .unwrap()
                .set_len(17)
                .unwrap(),
            6 => fs::remove_file(&f).unwrap(),
            7 => {
                let e = d.join(format!("e{k}"));
                fs::create_dir(&e).unwrap();
                fs::write(e.join("x"), b"x").unwrap();
                if k.is_multiple_of(2) {
                    fs::remove_file(e.join("x")).unwrap();
                    fs::remove_dir(&e).unwrap();
                }
            }
            _ => {}
        }
    }
}

/// Writes files into `mnt/w` until stopped; counts them.
struct Writer {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(mnt: &Path) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, c, dir) = (stop.clone(), count.clone(), mnt.join("w"));
        fs::create_dir_all(&dir).unwrap();
        let handle = thread::spawn(move || {
            let mut i = 0u64;
            // Bounded in count and time whatever happens.
            let end = Instant::now() + Duration::from_secs(300);
            while !s.load(Ordering::Acquire) && i < 200_000 && Instant::now() < end {
                fs::write(
                    dir.join(format!("{i:06}")),
                    pseudo_random(i, 2000 + (i as usize % 30_000)),
                )
                .unwrap();
                i += 1;
                c.store(i, Ordering::Release);
            }
        });
        Writer {
            stop,
            count,
            handle: Some(handle),
        }
    }

    fn wait_for(&self, n: u64) {
        assert!(
            wait_until(Duration::from_secs(60), || self
                .count
                .load(Ordering::Acquire)
                >= n),
            "writer stuck at {}",
            self.count.load(Ordering::Acquire)
        );
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.handle.take().unwrap().join().expect("writer panicked");
        self.count.load(Ordering::Acquire)
    }
}

fn assert_all_identical(master: &Path, replicas: &[(&str, &Path)], timeout: Duration) {
    for (name, r) in replicas {
        if let Err(e) = try_wait_identical(master, r, timeout) {
            panic!(
                "{name} differs from the master: {e}\n{}",
                logs(master.parent().unwrap())
            );
        }
    }
}

/// The end of every daemon log of the test, for failure messages.
fn logs(root: &Path) -> String {
    let mut out = String::new();
    let mut files = Vec::new();
    for e in fs::read_dir(root).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() && p.to_string_lossy().ends_with("-logs") {
            files.extend(fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        } else if p.extension().is_some_and(|x| x == "log") {
            files.push(p);
        }
    }
    files.sort();
    for f in files {
        out.push_str(&format!(
            "==> {} <==\n{}\n",
            f.display(),
            tdfs_tests::util::tail(&f, 4000)
        ));
    }
    out
}

/// The master's status rows for the replicas below `relay_addr`.
fn downstream_of(st: &Value, relay_addr: &str) -> Vec<Value> {
    st["slaves"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["addr"] == relay_addr)
        .map(|s| s["downstream"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default()
}

fn verify(master_dir: &Path, node: &str) {
    let o = Command::new(bin("tdfs"))
        .args(["verify", "-q", "-m"])
        .arg(master_dir)
        .args(["-c", node])
        .output()
        .expect("run tdfs verify");
    assert!(
        o.status.success(),
        "tdfs verify against {node}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn two_relays_feed_three_leaves_each_and_status_shows_the_tree() {
    require_root_and_fuse();
    let t: TempDir = temp_dir("relay-tree");
    let root = t.path();
    let leaves: Vec<Node> = (0..6)
        .map(|i| Node::start(root, &format!("l{i}"), &[]))
        .collect();
    let la: Vec<String> = leaves.iter().map(Node::addr).collect();
    // Mixed compression per hop: l0 gets lzf, l4 lz4, the rest none.
    let mut r0_args = vec!["--metrics".to_string(), "127.0.0.1:0".into()];
    r0_args.extend(cs(&[
        format!("{},z=1", la[0]),
        la[1].clone(),
        la[2].clone(),
    ]));
    let r0 = Node::start(root, "r0", &r0_args);
    let r1 = Node::start(
        root,
        "r1",
        &cs(&[la[3].clone(), format!("{},z=2", la[4]), la[5].clone()]),
    );
    let mut m = start_master(
        root,
        &[r0.addr(), r1.addr()],
        &["-z", "1", "--metrics", "127.0.0.1:0"],
    );
    let mnt = root.join("mnt");
    churn(&mnt, 1, 400);
    let backing = root.join("m");
    let mut all: Vec<(&str, &Path)> = vec![("r0", &r0.dir), ("r1", &r1.dir)];
    let names = ["l0", "l1", "l2", "l3", "l4", "l5"];
    for (i, l) in leaves.iter().enumerate() {
        all.push((names[i], &l.dir));
    }
    assert_all_identical(&backing, &all, CATCH_UP);

    // The master sees the whole tree, every leaf at the master's own last sequence number.
    let mut st = master_status(root);
    let last = st["last_seq"].as_u64().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || {
            st = master_status(root);
            [(&r0, &la[0..3]), (&r1, &la[3..6])].iter().all(|(r, ls)| {
                let d = downstream_of(&st, &r.addr());
                d.len() == 3
                    && ls.iter().all(|a| {
                        d.iter().any(|n| {
                            n["addr"] == a.as_str()
                                && n["applied"].as_u64() == Some(last)
                                && n["depth"] == 2
                                && n["state"] == "streaming"
                        })
                    })
            })
        }),
        "master status does not show both relays' leaves caught up at seq {last}: {st:#}"
    );
    let text = Command::new(bin("tdfs"))
        .args(["status", "--state-dir"])
        .arg(root.join("m-state"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains(&format!("└ {}", la[4])), "{text}");

    // A relay's own status lists its leaves; sequence numbers are the master's.
    let rs = r0.status();
    assert_eq!(rs["last_applied"].as_u64(), Some(last), "{rs:#}");
    assert_eq!(rs["relay"]["slaves"].as_array().unwrap().len(), 3, "{rs:#}");

    // Metrics: the master exports the leaves below its relays; a relay its own leaves.
    let mm = http_get(metrics_port(&m.log_text()).unwrap(), "/metrics");
    let want = format!(
        "tdfs_slave_downstream_applied_seq{{via=\"{}\",slave=\"{}\",depth=\"2\"}} {last}",
        r0.addr(),
        la[1]
    );
    assert!(mm.contains(&want), "{want} not in master metrics:\n{mm}");
    let rm = http_get(metrics_port(&r0.slave.log()).unwrap(), "/metrics");
    let want = format!("tdfs_relay_leaf_applied_seq{{slave=\"{}\"}} {last}", la[2]);
    assert!(rm.contains(&want), "{want} not in relay metrics:\n{rm}");

    // verify works against any node of the tree.
    verify(&backing, &la[4]);
    verify(&backing, &r1.addr());

    // Runtime membership on a relay: remove a leaf, write, add it back: it catches up.
    let o = Command::new(bin("tdfs-slave"))
        .args(["leaf", "remove", &la[5], "--state-dir"])
        .arg(&r1.state)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    churn(&mnt, 2, 50);
    assert_all_identical(&backing, &all[..6], CATCH_UP);
    assert!(
        !compare_trees(&backing, &leaves[5].dir).is_empty(),
        "removed leaf still fed"
    );
    let o = Command::new(bin("tdfs-slave"))
        .args(["leaf", "add", &la[5], "--state-dir"])
        .arg(&r1.state)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_all_identical(&backing, &all, CATCH_UP);
    assert!(m.unmount_and_wait().success());
    assert_all_identical(&backing, &all, CATCH_UP);
}

/// A relay killed mid-write: its leaves, which have the master as a fallback upstream,
/// are taken over and continue from their own position (no full sync); when the relay
/// comes back it catches up and takes them back.
#[test]
fn killed_relay_leaves_are_taken_over_by_the_master_without_a_full_sync() {
    require_root_and_fuse();
    let t = temp_dir("relay-kill");
    let root = t.path();
    let leaves: Vec<Node> = (0..3)
        .map(|i| Node::start(root, &format!("l{i}"), &[]))
        .collect();
    let la: Vec<String> = leaves.iter().map(Node::addr).collect();
    let mut r = Node::start(root, "r", &cs(&la));
    let mut specs = vec![r.addr()];
    specs.extend(la.iter().map(|a| format!("{a},fallback")));
    let mut m = start_master(root, &specs, &[]);
    let mnt = root.join("mnt");
    let backing = root.join("m");
    // A tree worth a full copy, so that "no full sync" means something.
    churn(&mnt, 3, 600);
    let all: Vec<(&str, &Path)> = vec![
        ("r", &r.dir),
        ("l0", &leaves[0].dir),
        ("l1", &leaves[1].dir),
        ("l2", &leaves[2].dir),
    ];
    assert_all_identical(&backing, &all, CATCH_UP);
    let tree_mb = dir_bytes(&backing) as f64 / 1e6;

    let w = Writer::start(&mnt);
    w.wait_for(200);
    r.slave.kill9();
    let killed = Instant::now();
    let at_kill = w.count.load(Ordering::Acquire);
    w.wait_for(at_kill + 300);
    let n = w.finish();
    let leaf_dirs: Vec<(&str, &Path)> = all[1..].to_vec();
    assert_all_identical(&backing, &leaf_dirs, CATCH_UP);
    let identical = killed.elapsed();
    let st = master_status(root);
    let mut moved = 0;
    for a in &la {
        let s = st["slaves"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["addr"].as_str().is_some_and(|x| x == a.as_str()))
            .unwrap_or_else(|| panic!("{a} not in master status: {st:#}"));
        moved += s["sync_bytes"].as_u64().unwrap_or(0);
    }
    println!(
        "TAKEOVER relay killed -> its 3 leaves identical via the master: {:.2}s, {n} files \
         written, {:.1} MB moved by syncs of a {tree_mb:.1} MB tree",
        identical.as_secs_f64(),
        moved as f64 / 1e6
    );
    assert!(
        (moved as f64 / 1e6) < tree_mb / 4.0,
        "the takeover moved {moved} bytes of a {tree_mb:.1} MB tree: a full sync"
    );

    // The relay comes back: it catches up, takes its leaves back, and feeds them again.
    r.slave.restart();
    churn(&mnt, 4, 100);
    assert_all_identical(&backing, &all, CATCH_UP);
    let back = wait_until(Duration::from_secs(60), || {
        let st = master_status(root);
        let d = downstream_of(&st, &r.addr());
        // ... and the master stands by for them again.
        let standby = st["slaves"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| la.iter().any(|a| s["addr"] == a.as_str()))
            .all(|s| s["state"] == "standby");
        d.len() == 3 && d.iter().all(|n| n["state"] == "streaming") && standby
    });
    assert!(
        back,
        "relay did not take its leaves back: {:#}",
        master_status(root)
    );
    churn(&mnt, 5, 50);
    assert!(m.unmount_and_wait().success());
    assert_all_identical(&backing, &all, CATCH_UP);
}

fn dir_bytes(root: &Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let m = e.path().symlink_metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                n += m.len();
            }
        }
    }
    n
}

/// master -> relay -> relay -> leaf; a leaf killed and restarted, a middle relay restarted,
/// the master killed and restarted.
#[test]
fn depth_three_with_a_leaf_and_a_relay_restarted() {
    require_root_and_fuse();
    let t = temp_dir("relay-deep");
    let root = t.path();
    let mut leaf = Node::start(root, "leaf", &[]);
    let mut r2 = Node::start(root, "r2", &cs(&[format!("{},z=2", leaf.addr())]));
    let r1 = Node::start(root, "r1", &cs(&[r2.addr()]));
    let mut m = start_master(root, &[r1.addr()], &[]);
    let mnt = root.join("mnt");
    let backing = root.join("m");
    churn(&mnt, 6, 300);
    let all: Vec<(&str, &Path)> = vec![("r1", &r1.dir), ("r2", &r2.dir), ("leaf", &leaf.dir)];
    assert_all_identical(&backing, &all, CATCH_UP);
    let ok = wait_until(Duration::from_secs(30), || {
        let d = downstream_of(&master_status(root), &r1.addr());
        d.iter()
            .any(|n| n["addr"] == leaf.addr().as_str() && n["depth"] == 3)
    });
    assert!(
        ok,
        "depth-3 leaf missing from the master's status: {:#}",
        master_status(root)
    );

    leaf.slave.kill9();
    churn(&mnt, 7, 100);
    leaf.slave.restart();
    churn(&mnt, 8, 50);
    assert_all_identical(&backing, &all, CATCH_UP);

    r2.slave.stop();
    churn(&mnt, 9, 100);
    r2.slave.restart();
    churn(&mnt, 10, 50);
    assert_all_identical(&backing, &all, CATCH_UP);

    // The master killed and restarted: it syncs its relay, which holds its own replica
    // meanwhile and then syncs it from its tree.
    m.kill9();
    let mut m = start_master(root, &[r1.addr()], &[]);
    churn(&mnt, 16, 50);
    assert_all_identical(&backing, &all, CATCH_UP);
    let log = r1.slave.log();
    assert!(
        log.contains("upstream is syncing this relay") && log.contains("relay at a known position"),
        "the relay was not synced by its restarted master: {log}"
    );
    assert!(m.unmount_and_wait().success());
    assert_all_identical(&backing, &all, CATCH_UP);
}

/// A relay on a test network in its own namespace: its link to the master is cut and
/// restored while the master keeps writing; its leaf (on the host) follows.
#[test]
fn relay_in_a_namespace_survives_a_cut_link() {
    require_root_and_fuse();
    let t = temp_dir("relay-netns");
    let root = t.path();
    let mut net = TestNet::create();
    let i = net.add_node();
    // The leaf on the host, on the test net's host address (the relay reaches it there).
    let leaf = Node::start_launch(
        root,
        "leaf",
        SlaveLaunch {
            host: Some(net.root_ip()),
            extra_args: vec!["--insecure".into()],
            ..Default::default()
        },
    );
    let relay = Node::start_launch(
        root,
        "r",
        SlaveLaunch {
            prefix: net.prefix(i),
            host: Some(net.ip(i)),
            extra_args: {
                let mut a = vec!["--insecure".to_string()];
                a.extend(cs(&[leaf.addr()]));
                a
            },
            ..Default::default()
        },
    );
    let mut m = start_master(root, &[relay.addr()], &[]);
    let mnt = root.join("mnt");
    let backing = root.join("m");
    churn(&mnt, 11, 200);
    let all: Vec<(&str, &Path)> = vec![("relay", &relay.dir), ("leaf", &leaf.dir)];
    assert_all_identical(&backing, &all, CATCH_UP);
    net.link(i, false);
    churn(&mnt, 12, 200);
    net.link(i, true);
    churn(&mnt, 13, 20);
    assert_all_identical(&backing, &all, CATCH_UP);
    assert!(m.unmount_and_wait().success());
    assert_all_identical(&backing, &all, CATCH_UP);
}

/// Security per hop: TLS between the master and the relay, a different shared secret with
/// encrypted frames (and lz4) between the relay and its leaf; a leaf that does not know the
/// relay's secret gets nothing.
#[test]
fn tls_upstream_and_secret_downstream_on_one_relay() {
    require_root_and_fuse();
    let t = temp_dir("relay-sec");
    let root = t.path();
    let pki = tdfs_tests::pki::write_pki(root, "up");
    let secret = root.join("leaf.secret");
    fs::write(&secret, "relay to leaf secret, not the master's\n").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let wrong = root.join("wrong.secret");
    fs::write(&wrong, "another secret entirely, for the stray\n").unwrap();
    fs::set_permissions(&wrong, fs::Permissions::from_mode(0o600)).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let leaf = Node::start(
        root,
        "leaf",
        &["--secret-file".into(), s(&secret), "--encrypt".into()],
    );
    let stray = Node::start(root, "stray", &["--secret-file".into(), s(&wrong)]);
    let mut args = vec![
        "--tls-cert".to_string(),
        pki.slave_cert.clone(),
        "--tls-key".into(),
        pki.slave_key.clone(),
        "--tls-ca".into(),
        pki.ca.clone(),
        "--leaf-secret-file".into(),
        s(&secret),
        "--leaf-encrypt".into(),
    ];
    args.extend(cs(&[format!("{},z=2", leaf.addr()), stray.addr()]));
    let relay = Node::start(root, "r", &args);
    let relay_addr = format!("localhost:{}", relay.slave.port());
    let mut m = start_master(
        root,
        &[relay_addr],
        &[
            "--tls-cert",
            &pki.master_cert,
            "--tls-key",
            &pki.master_key,
            "--tls-ca",
            &pki.ca,
        ],
    );
    let mnt = root.join("mnt");
    let backing = root.join("m");
    churn(&mnt, 14, 200);
    let all: Vec<(&str, &Path)> = vec![("relay", &relay.dir), ("leaf", &leaf.dir)];
    assert_all_identical(&backing, &all, CATCH_UP);
    assert!(
        fs::read_dir(&stray.dir).unwrap().next().is_none(),
        "a leaf with the wrong secret got something"
    );
    wait_log(
        "stray leaf",
        Duration::from_secs(30),
        || stray.slave.log(),
        "authentication failed",
    );
    assert!(m.unmount_and_wait().success());
    assert_all_identical(&backing, &all, CATCH_UP);
}

fn master_opts(root: &Path, name: &str, dir: &Path, state: &Path, slaves: &[String]) -> MasterOpts {
    let mnt = root.join(format!("{name}-mnt"));
    fs::create_dir_all(&mnt).unwrap();
    MasterOpts::plain(
        dir.to_path_buf(),
        mnt,
        state.to_path_buf(),
        root.join(format!("{name}-master.log")),
        slaves,
    )
}

/// Fencing holds through a relay: a leaf taken over by a newly promoted master (epoch 2)
/// refuses the relay still following the old one; the relay records the newer epoch and
/// drops its upstream, which is then refused as fenced and stops taking writes.
#[test]
fn a_leaf_that_saw_a_newer_epoch_fences_the_old_master_through_its_relay() {
    require_root_and_fuse();
    let t = temp_dir("relay-fence");
    let root = t.path();
    let leaf = Node::start(root, "leaf", &[]);
    let relay = Node::start(root, "r", &cs(&[leaf.addr()]));
    let mut b = Node::start(root, "b", &[]);
    let a_dir = root.join("a");
    let a_state = root.join("a-state");
    fs::create_dir_all(&a_dir).unwrap();
    let mut a = Master::start(&master_opts(
        root,
        "a",
        &a_dir,
        &a_state,
        &[relay.addr(), b.addr()],
    ));
    churn(&a.mountpoint, 15, 150);
    let all: Vec<(&str, &Path)> = vec![("relay", &relay.dir), ("leaf", &leaf.dir), ("b", &b.dir)];
    assert_all_identical(&a_dir, &all, CATCH_UP);

    // B is promoted (A is alive: an operator's mistake, or a partition) and takes the leaf.
    b.slave.stop();
    let o = Command::new(bin("tdfs"))
        .args(["promote", "--force", "--state-dir"])
        .arg(&b.state)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "promote: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut bm = Master::start(&master_opts(root, "bm", &b.dir, &b.state, &[leaf.addr()]));
    fs::write(bm.mountpoint.join("from-b"), b"epoch 2").unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || leaf.dir.join("from-b").exists()),
        "the new master did not take the leaf: {}",
        logs(root)
    );

    // A learns it was replaced through the relay, and stops taking writes.
    let probe = a.mountpoint.join("probe");
    let t0 = Instant::now();
    let fenced = wait_until(Duration::from_secs(60), || match fs::write(&probe, b"x") {
        Err(e) => e.raw_os_error() == Some(libc::EROFS),
        Ok(()) => false,
    });
    assert!(fenced, "the old master still takes writes: {}", logs(root));
    println!(
        "FENCE through a relay: old master refuses writes {:.2}s after the leaf moved",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(
        relay.status()["seen_epoch"].as_u64(),
        Some(2),
        "{:#}",
        relay.status()
    );
    assert!(
        !leaf.dir.join("probe").exists(),
        "a write of the old epoch reached the leaf"
    );
    assert!(
        a.log_text().contains("FENCED"),
        "the old master does not say it was fenced: {}",
        a.log_text()
    );
    assert!(bm.unmount_and_wait().success());
    let _ = a.unmount_and_wait();
}
