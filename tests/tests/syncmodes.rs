//! Replication guarantees: --sync async|received|applied, fsync as a barrier, slaves that
//! drop out of sync, --min-replicas, and bounded memory with a frozen slave.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use tdfs_tests::cluster::{Cluster, ClusterOpts};
use tdfs_tests::util::{pseudo_random, wait_until};

fn with_args(name: &str, args: &[&str]) -> Cluster {
    let c = Cluster::start(
        name,
        ClusterOpts {
            extra_master_args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
    );
    wait_in_sync(&c, 1);
    c
}

/// Waits until the master has logged `n` "slave is in sync" lines.
fn wait_in_sync(c: &Cluster, n: usize) {
    assert!(
        wait_until(Duration::from_secs(60), || c
            .master
            .log_text()
            .matches("slave is in sync")
            .count()
            >= n),
        "slave never got in sync:\n{}",
        c.logs()
    );
}

#[test]
fn applied_mode_every_write_is_on_the_slave_when_it_returns() {
    let mut c = with_args("sync-applied", &["--sync", "applied"]);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(c.at("f"))
        .unwrap();
    let replica = c.replica(0).join("f");
    for i in 0..300u64 {
        let off = (i * 7919) % 200_000;
        let data = pseudo_random(i, 1 + (i as usize * 13) % 5000);
        f.write_all_at(&data, off).unwrap();
        // No sleep, no polling: the write returned, so the slave has applied it.
        let r = fs::File::open(&replica).unwrap();
        let mut got = vec![0u8; data.len()];
        r.read_exact_at(&mut got, off).unwrap();
        assert_eq!(
            got, data,
            "write {i} at {off} not on the slave when write() returned"
        );
    }
    drop(f);
    c.finish();
}

fn frozen_slave_does_not_hold_writers(mode: &str) {
    let mut c = with_args(
        &format!("frozen-{mode}"),
        &["--sync", mode, "--sync-timeout", "1"],
    );
    fs::write(c.at("before"), b"b").unwrap();
    c.slaves[0].freeze();
    let t = Instant::now();
    fs::write(c.at("first"), b"1").unwrap();
    let first = t.elapsed();
    let t = Instant::now();
    for i in 0..20 {
        fs::write(c.at(&format!("next{i}")), b"n").unwrap();
    }
    let rest = t.elapsed();
    c.slaves[0].thaw();
    // The first write after the freeze waits at most about the timeout; after that the
    // slave is out of sync and nobody waits for it.
    assert!(
        first < Duration::from_secs(4),
        "{mode}: first write took {first:?}"
    );
    if mode == "async" {
        assert!(first < Duration::from_millis(900), "async waited {first:?}");
    } else {
        assert!(
            first >= Duration::from_millis(900),
            "{mode}: the first write did not wait for the slave ({first:?})"
        );
        assert!(c.master.log_text().contains("slower than --sync-timeout"));
    }
    assert!(
        rest < Duration::from_secs(3),
        "{mode}: 20 writes took {rest:?}"
    );
    // Once thawed it catches up and is waited for again (in async mode it never left).
    wait_in_sync(&c, if mode == "async" { 1 } else { 2 });
    c.finish();
}

#[test]
fn received_mode_frozen_slave_does_not_block_beyond_timeout() {
    frozen_slave_does_not_hold_writers("received");
}

#[test]
fn applied_mode_frozen_slave_does_not_block_beyond_timeout() {
    frozen_slave_does_not_hold_writers("applied");
}

#[test]
fn async_mode_never_waits_for_a_frozen_slave() {
    frozen_slave_does_not_hold_writers("async");
}

#[test]
fn fsync_is_a_replication_barrier() {
    let mut c = with_args("fsync-barrier", &[]);
    for i in 0..50u64 {
        let name = format!("f{i}");
        let data = pseudo_random(i, 10_000);
        let mut f = fs::File::create(c.at(&name)).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        // fsync returned: the replica has the content, durably.
        assert_eq!(fs::read(c.replica(0).join(&name)).unwrap(), data);
    }
    c.finish();
}

fn fsync_with_frozen_slave(args: &[&str]) -> Duration {
    let mut c = with_args("fsync-frozen", args);
    let mut f = fs::File::create(c.at("f")).unwrap();
    f.write_all(b"data").unwrap();
    c.slaves[0].freeze();
    let t = Instant::now();
    f.sync_all().unwrap();
    let took = t.elapsed();
    c.slaves[0].thaw();
    drop(f);
    c.finish();
    took
}

#[test]
fn fsync_local_does_not_wait_for_slaves() {
    let waited = fsync_with_frozen_slave(&["--sync-timeout", "2"]);
    assert!(
        waited >= Duration::from_millis(1900),
        "fsync did not wait: {waited:?}"
    );
    let local = fsync_with_frozen_slave(&["--sync-timeout", "2", "--fsync-local"]);
    assert!(
        local < Duration::from_millis(1500),
        "--fsync-local waited {local:?}"
    );
}

#[test]
fn min_replicas_fails_with_eio_when_slave_is_down() {
    let mut c = Cluster::start(
        "min-replicas",
        ClusterOpts {
            slaves_down: true,
            extra_master_args: vec![
                "--min-replicas".into(),
                "1".into(),
                "--sync-timeout".into(),
                "1".into(),
            ],
            ..Default::default()
        },
    );
    let t = Instant::now();
    let e = fs::write(c.at("refused"), b"x").expect_err("write must fail with no replica");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "failed before the timeout"
    );
    assert!(
        !c.backing.join("refused").exists(),
        "a refused create reached the disk"
    );
    c.slaves[0].restart();
    wait_in_sync(&c, 1);
    fs::write(c.at("accepted"), b"y").unwrap();
    c.finish();
    assert_eq!(fs::read(c.replica(0).join("accepted")).unwrap(), b"y");
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn frozen_slave_2gib_bounded_master_memory() {
    // A small queue, so that the bound below is far under the 2 GiB written: memory must
    // follow --queue-size, not the data (the default of 256 MiB peaks near 370 MiB).
    let mut c = with_args("frozen-2g", &["--queue-size", "64"]);
    c.slaves[0].freeze();
    let block = pseudo_random(42, 1 << 20);
    let mut f = fs::File::create(c.at("big")).unwrap();
    for _ in 0..2048 {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("write: {e}"),
        }
    }
    drop(f);
    let hwm = vm_hwm_kib(c.master.pid().unwrap());
    eprintln!(
        "master VmHWM after 2 GiB with a frozen slave: {} MiB",
        hwm / 1024
    );
    c.slaves[0].thaw();
    assert!(hwm < 256 * 1024, "master peak RSS {} MiB", hwm / 1024);
    c.finish();
}
