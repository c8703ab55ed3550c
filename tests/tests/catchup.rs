//! No lost updates across outages: slave and master crashes, late joins, pre-existing trees,
//! journal overflow and full disks. Every test ends with a full tree comparison.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tdfs_tests::cluster::{Cluster, ClusterOpts};
use tdfs_tests::util::{pseudo_random, set_xattr, wait_log, wait_until};

/// Writes, renames and deletes files under `root` until `stop` (bounded to `max` steps);
/// stops quietly when the mount goes away (a killed master).
fn churn(root: &Path, tag: &str, max: usize, stop: &AtomicBool) -> usize {
    let dir = root.join(tag);
    if fs::create_dir(&dir).is_err() {
        return 0;
    }
    let mut n = 0;
    while n < max && !stop.load(Ordering::Relaxed) {
        let f = dir.join(format!("f{n}"));
        if fs::write(&f, pseudo_random(n as u64, 1000 + (n % 7) * 3000)).is_err() {
            break;
        }
        if n % 5 == 0 && fs::rename(&f, dir.join(format!("r{n}"))).is_err() {
            break;
        }
        if n % 7 == 3 && fs::remove_file(dir.join(format!("f{}", n - 1))).is_err() {
            // The previous file may have been renamed.
        }
        n += 1;
    }
    n
}

fn log_field(log: &str, line_has: &str, field: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains(line_has))?;
    let at = line.find(&format!("{field}="))? + field.len() + 1;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn slave_killed_mid_workload_then_restarted() {
    let mut c = Cluster::single("kill9-slave");
    let stop = Arc::new(AtomicBool::new(false));
    let mnt = c.mnt().to_path_buf();
    let w = {
        let stop = stop.clone();
        thread::spawn(move || churn(&mnt, "w", 3000, &stop))
    };
    assert!(wait_until(Duration::from_secs(30), || {
        fs::read_dir(c.replica(0).join("w")).is_ok_and(|d| d.count() > 50)
    }));
    c.slaves[0].kill9();
    // Keep writing while it is down: until the workload has made 50 more files.
    let entries = |c: &Cluster| fs::read_dir(c.backing.join("w")).map_or(0, |d| d.count());
    let at_kill = entries(&c);
    assert!(
        wait_until(Duration::from_secs(30), || entries(&c) >= at_kill + 50),
        "the workload stalled while the slave was down"
    );
    c.slaves[0].restart();
    stop.store(true, Ordering::Relaxed);
    let n = w.join().unwrap();
    assert!(n > 100, "workload made only {n} steps");
    c.finish();
}

#[test]
fn master_starts_while_slave_is_down() {
    let mut c = Cluster::start(
        "slave-down",
        ClusterOpts {
            slaves_down: true,
            ..Default::default()
        },
    );
    fs::create_dir(c.at("d")).unwrap();
    for i in 0..200 {
        fs::write(c.at(&format!("d/{i}")), pseudo_random(i, 4096)).unwrap();
    }
    c.slaves[0].restart();
    for i in 200..300 {
        fs::write(c.at(&format!("d/{i}")), pseudo_random(i, 4096)).unwrap();
    }
    c.finish();
}

#[test]
fn master_killed_mid_workload_then_restarted() {
    let mut c = Cluster::single("kill9-master");
    let stop = Arc::new(AtomicBool::new(false));
    let mnt = c.mnt().to_path_buf();
    let w = {
        let stop = stop.clone();
        thread::spawn(move || churn(&mnt, "w", 100_000, &stop))
    };
    assert!(wait_until(Duration::from_secs(30), || {
        fs::read_dir(c.backing.join("w")).is_ok_and(|d| d.count() > 200)
    }));
    c.master.kill9();
    stop.store(true, Ordering::Relaxed);
    w.join().unwrap();
    // Changes made directly in the backing dir while no master runs count too: the sync
    // after an unclean exit compares trees, it does not trust a journal.
    fs::write(c.backing.join("offline"), b"written while no master ran").unwrap();
    // The log file is appended to: look only at what the restarted master writes.
    let mark = c.master.log_text().len();
    let since_restart = |c: &Cluster| c.master.log_text()[mark..].to_string();
    // The slave is away while the master comes back: its position is not known yet.
    c.slaves[0].stop();
    c.restart_master();
    // The numbers skipped at the unclean restart are not ops: no lag, no rate from them,
    // neither before the slave is back nor after.
    let mut worst = (0u64, 0f64);
    let mut sample = |c: &Cluster| {
        let Some(v) = try_status_json(&c.master_state) else {
            return (false, u64::MAX);
        };
        let s = &v["slaves"][0];
        let lag = s["lag_ops"].as_u64().unwrap_or(u64::MAX);
        let rate = s["ops_per_sec"].as_f64().unwrap_or(f64::MAX);
        worst = (worst.0.max(lag), worst.1.max(rate));
        (s["state"] == "streaming", lag)
    };
    let (_, lag0) = sample(&c);
    assert!(
        lag0 < 100_000,
        "lag of the absent slave counts skipped numbers: {lag0}"
    );
    c.slaves[0].restart();
    assert!(
        wait_until(Duration::from_secs(60), || {
            sample(&c);
            since_restart(&c).contains("sync complete")
        }),
        "the restarted master never synced the slave:\n{}",
        since_restart(&c)
    );
    // An unclean exit means the slave cannot be trusted to resume: it was synced.
    let log = since_restart(&c);
    assert!(
        log.contains("slave missed ops this node no longer holds"),
        "the restarted master did not sync because of the unclean exit:\n{log}"
    );
    fs::write(c.at("after"), b"after the restart").unwrap();
    let settled = wait_until(Duration::from_secs(60), || sample(&c) == (true, 0));
    assert!(
        settled,
        "slave never streaming with no lag after the restart"
    );
    // Rates are sampled once a second: look at a few.
    let until = std::time::Instant::now() + Duration::from_millis(2500);
    while std::time::Instant::now() < until {
        sample(&c);
        thread::sleep(Duration::from_millis(250));
    }
    assert!(
        worst.0 < 100_000 && worst.1 < 1_000_000.0,
        "status counted skipped sequence numbers as ops: lag {} ops, {} ops/s",
        worst.0,
        worst.1
    );
    c.finish();
}

/// `tdfs status --json`, or None (with the reason on stderr) while it cannot answer.
fn try_status_json(state_dir: &Path) -> Option<serde_json::Value> {
    let out = std::process::Command::new(tdfs_tests::bin("tdfs"))
        .arg("status")
        .arg("--json")
        .arg("--state-dir")
        .arg(state_dir)
        .output()
        .expect("run tdfs status");
    if !out.status.success() {
        eprintln!("tdfs status: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn populate(root: &Path) {
    for d in 0..30 {
        let dir = root.join(format!("dir{d}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..100 {
            fs::write(
                dir.join(format!("file{f}")),
                pseudo_random((d * 1000 + f) as u64, 100 + f * 37),
            )
            .unwrap();
        }
        std::os::unix::fs::symlink(format!("file{d}"), dir.join("link")).unwrap();
    }
    fs::hard_link(root.join("dir0/file1"), root.join("dir1/hard")).unwrap();
    set_xattr(&root.join("dir2/file2"), "user.tag", b"v", 0).unwrap();
    fs::create_dir_all(root.join("deep/a/b/c/d")).unwrap();
}

#[test]
fn preexisting_tree_new_slave_then_second_run_moves_no_data() {
    let mut c = Cluster::start(
        "preexisting",
        ClusterOpts {
            populate: Some(populate),
            ..Default::default()
        },
    );
    fs::write(c.at("live"), b"written while the initial sync runs").unwrap();
    c.finish();
    let first = c.master.log_text();
    let bytes1 = log_field(&first, "sync complete", "bytes").expect("first sync logged");
    assert!(bytes1 > 300_000, "initial sync copied only {bytes1} bytes");

    // A master with a new identity is another replica set: the replica refuses it (it would
    // otherwise be overwritten by a master it never followed) and says how to re-home it.
    let fresh_state = c.scratch.join("new-master-state");
    fs::create_dir(&fresh_state).unwrap();
    c.mopts.state_dir = fresh_state;
    c.mopts.log = c.scratch.join("master2.log");
    c.restart_master();
    assert!(
        wait_until(Duration::from_secs(30), || c.slaves[0]
            .log()
            .contains("belongs to replica set")),
        "the replica did not refuse a master of another replica set:\n{}",
        c.logs()
    );
    assert!(!c.master.log_text().contains("sync complete"));
    c.master.unmount_and_wait();
    // Re-homed on purpose (its state directory emptied): everything is compared, nothing
    // copied.
    c.slaves[0].stop();
    for e in fs::read_dir(&c.slaves[0].state_dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
    c.slaves[0].restart();
    c.mopts.log = c.scratch.join("master3.log");
    c.restart_master();
    wait_log(
        "master",
        Duration::from_secs(60),
        || c.master.log_text(),
        "sync complete",
    );
    let second = c.master.log_text();
    let bytes2 = log_field(&second, "sync complete", "bytes").unwrap();
    let fixed2 = log_field(&second, "sync complete", "fixed").unwrap();
    eprintln!("initial sync: {bytes1} bytes; second sync: {bytes2} bytes, {fixed2} fixes");
    assert_eq!(bytes2, 0, "second sync copied data:\n{second}");
    assert_eq!(fixed2, 0, "second sync fixed entries:\n{second}");
    c.finish();
}

#[test]
fn outage_beyond_the_journal_falls_back_to_sync() {
    let mut c = Cluster::start(
        "journal-overflow",
        ClusterOpts {
            extra_master_args: vec![
                "--queue-size".into(),
                "1".into(),
                "--journal-size".into(),
                "2".into(),
            ],
            ..Default::default()
        },
    );
    fs::write(c.at("first"), b"1").unwrap();
    c.wait_replicas(Duration::from_secs(60));
    c.slaves[0].stop();
    for i in 0..12 {
        fs::write(c.at(&format!("big{i}")), pseudo_random(i, 1 << 20)).unwrap();
    }
    c.slaves[0].restart();
    c.wait_replicas(Duration::from_secs(120));
    c.finish();
    let log = c.master.log_text();
    assert!(log.contains("further behind than --journal-size"), "{log}");
    assert!(log.contains("sync complete"), "{log}");
}

#[test]
fn outage_within_the_journal_replays_it() {
    let mut c = Cluster::start(
        "journal-replay",
        ClusterOpts {
            extra_master_args: vec!["--queue-size".into(), "1".into()],
            ..Default::default()
        },
    );
    fs::write(c.at("first"), b"1").unwrap();
    c.wait_replicas(Duration::from_secs(60));
    c.slaves[0].stop();
    for i in 0..6 {
        fs::write(c.at(&format!("big{i}")), pseudo_random(i, 1 << 20)).unwrap();
    }
    let journal = c.master_state.join("journal");
    let on_disk: u64 = fs::read_dir(&journal)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        on_disk > 4 << 20,
        "ops did not spill to the journal ({on_disk} bytes)"
    );
    c.slaves[0].restart();
    c.wait_replicas(Duration::from_secs(120));
    c.finish();
    let log = c.master.log_text();
    // The one sync is the initial one of the (empty) new slave; the outage is replayed.
    assert_eq!(
        log.matches("sync starting").count(),
        1,
        "replay should not need another sync:\n{log}"
    );
}

/// Mounts a 1 MiB tmpfs on a replica directory (the cluster detaches it when dropped).
fn small_tmpfs(dir: &Path) {
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tdfs-test-full"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs on {}", dir.display());
}

#[test]
fn full_disk_on_slave_is_reported_then_converges() {
    let mut c = Cluster::start(
        "full-disk",
        ClusterOpts {
            replica_setup: Some(small_tmpfs),
            ..Default::default()
        },
    );
    fs::write(c.at("small"), b"fits").unwrap();
    fs::write(c.at("big"), pseudo_random(7, 3 << 20)).unwrap();
    fs::write(c.at("later"), b"after the big one").unwrap();
    wait_log(
        "master",
        Duration::from_secs(30),
        || c.master.log_text(),
        "No space left on device",
    );
    let log = c.master.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("No space left on device"))
        .unwrap();
    assert!(
        line.contains(&c.slaves[0].addr()),
        "slave not named: {line}"
    );
    assert!(line.contains("/big"), "path not named: {line}");
    assert!(line.contains("errno=28"), "errno not named: {line}");
    // Free space: the master retries and the replica converges.
    let st = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(c.replica(0))
        .status()
        .unwrap();
    assert!(st.success());
    c.wait_replicas(Duration::from_secs(60));
    c.finish();
}
