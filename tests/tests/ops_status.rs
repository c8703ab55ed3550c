//! Operating a running cluster: `tdfs status` (table and JSON), the Prometheus endpoints,
//! `tdfs slave add/remove` at runtime, `--config` files, and SIGHUP reloads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tdfs_tests::util::{http_get, metrics_port};
use tdfs_tests::util::{run, set_times};
use tdfs_tests::{
    assert_identical, bin, require_root_and_fuse, temp_dir, wait_identical, wait_until, Cluster,
    ClusterOpts, Master, MasterOpts, Slave, SlaveOpts,
};

const T: Duration = Duration::from_secs(60);

fn status_json(state_dir: &Path) -> Value {
    let out = run(Command::new(bin("tdfs"))
        .arg("status")
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--json"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON: {e}\n{out}"))
}

fn slave_row(v: &Value, addr: &str) -> Value {
    v["slaves"]
        .as_array()
        .expect("slaves array")
        .iter()
        .find(|s| s["addr"] == addr)
        .cloned()
        .unwrap_or_else(|| panic!("no row for {addr} in {v:#}"))
}

fn addrs(v: &Value) -> Vec<String> {
    let mut a: Vec<String> = v["slaves"]
        .as_array()
        .expect("slaves array")
        .iter()
        .map(|s| s["addr"].as_str().unwrap().to_string())
        .collect();
    a.sort();
    a
}

fn write_files(dir: &Path, prefix: &str, n: usize) {
    for i in 0..n {
        std::fs::write(dir.join(format!("{prefix}{i}")), format!("{prefix} {i}\n")).unwrap();
    }
}

/// A master with two slaves; one is stopped: its row says disconnected with growing lag,
/// and streaming again after a restart. Metrics show the same, and only GET /metrics is
/// served.
#[test]
fn status_and_metrics_follow_a_stopped_slave() {
    let mut c = Cluster::start(
        "ops-status",
        ClusterOpts {
            slaves: vec![
                SlaveOpts::default(),
                SlaveOpts {
                    compress: true,
                    ..Default::default()
                },
            ],
            extra_master_args: vec!["--metrics".into(), "127.0.0.1:0".into()],
            ..Default::default()
        },
    );
    let state = c.master_state.clone();
    write_files(c.mnt(), "a", 20);
    c.wait_replicas(T);
    let (a0, a1) = (c.slaves[0].addr(), c.slaves[1].addr());
    assert!(wait_until(T, || {
        let v = status_json(&state);
        slave_row(&v, &a0)["state"] == "streaming" && slave_row(&v, &a1)["state"] == "streaming"
    }));
    let v = status_json(&state);
    assert_eq!(slave_row(&v, &a1)["compression"], "lzf");
    assert!(slave_row(&v, &a1)["compression_ratio"].as_f64().unwrap() > 0.0);
    assert_eq!(slave_row(&v, &a0)["lag_ops"], 0);

    // The table names both slaves.
    let table = run(Command::new(bin("tdfs"))
        .args(["status", "--state-dir"])
        .arg(&state));
    assert!(
        table.contains("SLAVE") && table.contains(&a0) && table.contains(&a1),
        "{table}"
    );

    c.slaves[1].stop();
    write_files(c.mnt(), "b", 10);
    assert!(
        wait_until(T, || {
            let r = slave_row(&status_json(&state), &a1);
            r["state"] == "disconnected" && r["lag_ops"].as_u64().unwrap() >= 10
        }),
        "stopped slave not shown as disconnected with lag: {:#}",
        status_json(&state)
    );
    let lag1 = slave_row(&status_json(&state), &a1)["lag_ops"]
        .as_u64()
        .unwrap();
    write_files(c.mnt(), "c", 10);
    let r = slave_row(&status_json(&state), &a1);
    assert!(
        r["lag_ops"].as_u64().unwrap() >= lag1 + 10,
        "lag did not grow: {r:#}"
    );
    assert!(r["lag_bytes"].as_u64().unwrap() > 0, "{r:#}");

    let port = metrics_port(&c.master.log_text()).expect("metrics address in the master log");
    let m = http_get(port, "/metrics");
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(
        m.contains(&format!("tdfs_slave_lag_ops{{slave=\"{a1}\"}}")),
        "no lag series for {a1}:\n{m}"
    );
    assert!(
        m.contains("tdfs_fuse_op_duration_seconds_count{op=\"write\"}"),
        "{m}"
    );
    assert!(m.contains("tdfs_slave_ops_sent_total"), "{m}");
    assert!(m.contains("tdfs_queue_bytes"), "{m}");
    assert!(http_get(port, "/").starts_with("HTTP/1.1 404"));

    c.slaves[1].restart();
    assert!(
        wait_until(T, || {
            let r = slave_row(&status_json(&state), &a1);
            r["state"] == "streaming" && r["lag_ops"] == 0
        }),
        "restarted slave not streaming: {:#}",
        status_json(&state)
    );
    c.finish();
}

/// `tdfs slave add` of an empty slave: initial sync, then streaming, identical at the end;
/// the change survives in STATE_DIR/slaves. `slave remove` takes it out again.
#[test]
fn slave_add_brings_an_empty_slave_in_and_remove_takes_it_out() {
    let mut c = Cluster::single("ops-add");
    let state = c.master_state.clone();
    write_files(c.mnt(), "pre", 30);
    std::fs::create_dir(c.at("d")).unwrap();
    write_files(&c.at("d"), "x", 5);
    c.wait_replicas(T);

    let dir = c.scratch.join("added");
    let sdir = c.scratch.join("added-state");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&sdir).unwrap();
    set_times(&dir, (1_600_000_000, 0), (1_600_000_000, 0)).unwrap();
    let mut added = Slave::start(&dir, &sdir, &c.scratch, false);
    let out = run(Command::new(bin("tdfs"))
        .args(["slave", "add", &added.addr(), "--state-dir"])
        .arg(&state));
    assert!(out.contains("added"), "{out}");
    // Adding it twice is refused.
    let again = Command::new(bin("tdfs"))
        .args(["slave", "add", &added.addr(), "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!again.status.success());
    let persisted = std::fs::read_to_string(state.join("slaves")).unwrap();
    assert!(persisted.contains(&added.addr()), "{persisted}");
    assert!(persisted.contains(&c.slaves[0].addr()), "{persisted}");

    write_files(c.mnt(), "post", 10);
    wait_identical(&c.backing, &dir, T);
    assert!(wait_until(T, || {
        slave_row(&status_json(&state), &added.addr())["state"] == "streaming"
    }));

    run(Command::new(bin("tdfs"))
        .args(["slave", "remove", &added.addr(), "--state-dir"])
        .arg(&state));
    let v = status_json(&state);
    assert_eq!(addrs(&v), vec![c.slaves[0].addr()]);
    let persisted = std::fs::read_to_string(state.join("slaves")).unwrap();
    assert!(!persisted.contains(&added.addr()), "{persisted}");
    c.finish();
    assert_identical(&c.backing, &dir);
    added.stop();
}

/// With no slave configured the master skips building ops for writes (nobody would read
/// them); a slave added later must still end up with everything, through its sync.
#[test]
fn writes_made_with_no_slave_reach_a_slave_added_later() {
    use std::os::unix::fs::FileExt;
    let mut c = Cluster::start(
        "ops-none",
        ClusterOpts {
            slaves: Vec::new(),
            ..Default::default()
        },
    );
    let state = c.master_state.clone();
    std::fs::write(c.at("big"), tdfs_tests::util::pseudo_random(3, 5 << 20)).unwrap();
    write_files(c.mnt(), "pre", 20);

    let dir = c.scratch.join("added");
    let sdir = c.scratch.join("added-state");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&sdir).unwrap();
    let mut added = Slave::start(&dir, &sdir, &c.scratch, false);
    run(Command::new(bin("tdfs"))
        .args(["slave", "add", &added.addr(), "--state-dir"])
        .arg(&state));
    // Writes racing the added slave's sync, then after it.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(c.at("big"))
        .unwrap();
    for i in 0..50u64 {
        f.write_all_at(&[i as u8; 4096], i * 100_000).unwrap();
    }
    drop(f);
    write_files(c.mnt(), "post", 10);
    wait_identical(&c.backing, &dir, T);
    c.finish();
    assert_identical(&c.backing, &dir);
    added.stop();
}

/// Directories for a master started by hand (not through Cluster).
struct Box1 {
    _tmp: tdfs_tests::util::TempDir,
    base: PathBuf,
}

impl Box1 {
    fn new(name: &str) -> Box1 {
        require_root_and_fuse();
        let tmp = temp_dir(name);
        let base = tmp.path().canonicalize().unwrap();
        for d in ["backing", "mnt", "mstate", "logs", "r0", "r0s", "r1", "r1s"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        for d in ["backing", "r0", "r1"] {
            set_times(&base.join(d), (1_600_000_000, 0), (1_600_000_000, 0)).unwrap();
        }
        Box1 { _tmp: tmp, base }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.base.join(rel)
    }

    fn slave(&self, i: usize) -> Slave {
        Slave::start(
            &self.p(&format!("r{i}")),
            &self.p(&format!("r{i}s")),
            &self.p("logs"),
            false,
        )
    }

    /// A master whose only settings besides the dirs come from `config`.
    fn master(&self, config: &Path) -> Master {
        Master::start(&MasterOpts {
            extra_args: vec!["--config".into(), config.display().to_string()],
            ..MasterOpts::plain(
                self.p("backing"),
                self.p("mnt"),
                self.p("mstate"),
                self.p("logs/master.log"),
                &[],
            )
        })
    }
}

/// A master configured by file behaves as with the same flags: the file's slaves (with
/// their compression) are streamed to, and `tdfs status` finds it through the file too.
#[test]
fn config_file_gives_what_flags_give() {
    let b = Box1::new("ops-config");
    let s0 = b.slave(0);
    let cfg = b.p("tdfs.toml");
    std::fs::write(
        &cfg,
        format!(
            "slaves = [\"{}\"]\ncompression = 1\nsync = \"received\"\nthreads = 2\n\
             log_level = \"info\"\nstate_dir = \"{}\"\n",
            s0.addr(),
            b.p("mstate").display()
        ),
    )
    .unwrap();
    let mut m = b.master(&cfg);
    write_files(&b.p("mnt"), "f", 20);
    wait_identical(&b.p("backing"), &b.p("r0"), T);
    let v = status_json(&b.p("mstate"));
    assert_eq!(addrs(&v), vec![s0.addr()]);
    let r = slave_row(&v, &s0.addr());
    assert_eq!(r["compression"], "lzf", "{r:#}");
    // `tdfs status --config FILE` finds the state dir through the file.
    let out = run(Command::new(bin("tdfs"))
        .args(["status", "--json", "--config"])
        .arg(&cfg));
    let v2: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v2["epoch_id"], v["epoch_id"]);
    assert!(v["epoch_id"].is_string(), "{v:#}");
    assert!(m.log_text().contains("slaves from the config file"));
    assert!(m.unmount_and_wait().success(), "{}", m.log_tail());
    assert_identical(&b.p("backing"), &b.p("r0"));
    assert!(
        !b.p("mstate/control.sock").exists(),
        "control socket left behind"
    );
}

/// An unknown key in the config file is a clear error, before anything starts.
#[test]
fn config_file_unknown_key_is_an_error() {
    let tmp = temp_dir("ops-badcfg");
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "dir = \"/nonexistent\"\nmountpoint = \"/x\"\nslave = [\"h\"]\n",
    )
    .unwrap();
    let out = Command::new(bin("tdfs"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown field") && err.contains("slave"),
        "{err}"
    );
    let out = Command::new(bin("tdfs-slave"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"));
}

/// SIGHUP re-reads the config file: a new slave list is applied (and persisted).
#[test]
fn sighup_applies_a_new_slave_list() {
    let b = Box1::new("ops-hup");
    let s0 = b.slave(0);
    let s1 = b.slave(1);
    let cfg = b.p("tdfs.toml");
    std::fs::write(&cfg, format!("slaves = [\"{}\"]\n", s0.addr())).unwrap();
    let mut m = b.master(&cfg);
    write_files(&b.p("mnt"), "f", 10);
    wait_identical(&b.p("backing"), &b.p("r0"), T);
    assert_eq!(addrs(&status_json(&b.p("mstate"))), vec![s0.addr()]);

    std::fs::write(
        &cfg,
        format!("slaves = [\"{}\"]\nlog_level = \"debug\"\n", s1.addr()),
    )
    .unwrap();
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(m.pid().unwrap() as libc::pid_t, libc::SIGHUP) };
    assert!(
        wait_until(T, || addrs(&status_json(&b.p("mstate"))) == vec![s1.addr()]),
        "slave list not reloaded: {:#}\n{}",
        status_json(&b.p("mstate")),
        m.log_tail()
    );
    write_files(&b.p("mnt"), "g", 10);
    wait_identical(&b.p("backing"), &b.p("r1"), T);
    let persisted = std::fs::read_to_string(b.p("mstate/slaves")).unwrap();
    assert!(persisted.contains(&s1.addr()) && !persisted.contains(&s0.addr()));
    assert!(
        m.log_text().contains("log level is now debug"),
        "{}",
        m.log_tail()
    );
    assert!(m.unmount_and_wait().success(), "{}", m.log_tail());
    assert_identical(&b.p("backing"), &b.p("r1"));
}

/// `tdfs-slave status` answers through the slave's own control socket.
#[test]
fn slave_status_names_its_master() {
    let mut c = Cluster::single("ops-slave-status");
    write_files(c.mnt(), "f", 10);
    c.wait_replicas(T);
    let sdir = c.slaves[0].state_dir.clone();
    let v: Value = serde_json::from_str(&run(Command::new(bin("tdfs-slave"))
        .args(["status", "--json", "--state-dir"])
        .arg(&sdir)))
    .unwrap();
    assert_eq!(v["connected"], true, "{v:#}");
    assert!(v["last_applied"].as_u64().unwrap() >= 20, "{v:#}");
    assert!(
        v["master_label"].as_str().unwrap().contains("backing"),
        "{v:#}"
    );
    let table = run(Command::new(bin("tdfs-slave"))
        .args(["status", "--state-dir"])
        .arg(&sdir));
    assert!(table.contains("last applied"), "{table}");
    c.finish();
}
