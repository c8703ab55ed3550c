//! A link cut and restored while writing.
//!
//! * Through the harness's fault-injecting proxy ([`tdfs_tests::proxy`]): connections
//!   dropped, the stream stalled, a frame truncated, a byte flipped (the slave must reject
//!   the frame by its crc and apply nothing of it), new connections refused.
//! * Between two network namespaces joined by a veth pair: the slave runs in its own netns
//!   and the slave side's link is set down, then up again.
//!
//! A writer thread creates, writes, appends, renames and deletes through the mount while the
//! faults happen (bounded in steps and time); every test ends with `Cluster::finish`: unmount,
//! the master exits 0 once the slave acknowledged everything, and the replica is compared
//! with the backing dir in full.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tdfs_tests::cluster::{Cluster, ClusterOpts};
use tdfs_tests::compare::try_wait_identical;
use tdfs_tests::proxy::Proxy;
use tdfs_tests::util::{temp_dir, wait_until};
use tdfs_tests::writer::Writer;

/// How long any one thing a test waits for may take.
const WAIT: Duration = Duration::from_secs(30);
/// How long the replica may take to catch up once the link is back and the writer stopped.
const CONVERGE: Duration = Duration::from_secs(60);

/// A cluster whose master reaches its one slave through a proxy.
fn proxied(name: &str) -> (Cluster, Proxy) {
    let mut proxy = None;
    let c = Cluster::start_via(name, ClusterOpts::default(), |_, addr| {
        let p = Proxy::start(addr);
        let a = p.addr();
        proxy = Some(p);
        a
    });
    (c, proxy.expect("a proxy for the slave"))
}

#[track_caller]
fn wait_for(what: &str, c: &Cluster, p: &Proxy, cond: impl FnMut() -> bool) {
    if !wait_until(WAIT, cond) {
        panic!(
            "timed out after {WAIT:?} waiting for {what}; {}\n{}",
            p.stats(),
            c.logs()
        );
    }
}

/// Waits until the master connected again through the proxy (a connection newer than
/// `accepted_before` is open) and ops flow over it; returns how long that took.
#[track_caller]
fn wait_reconnected(c: &Cluster, p: &Proxy, accepted_before: u64, since: Instant) -> Duration {
    wait_for("the master to connect again", c, p, || {
        p.accepted() > accepted_before && p.active() > 0
    });
    let back = since.elapsed();
    let sent = p.to_slave();
    wait_for("ops to flow over the new connection", c, p, || {
        p.to_slave() > sent + 20_000
    });
    back
}

/// Runs a write workload through a proxied cluster, applies `fault` once the link carries
/// ops, keeps writing a little, then stops the writer, waits for convergence and finishes.
fn with_fault(name: &str, fault: impl FnOnce(&Cluster, &Proxy, &Writer) -> String) {
    let t_start = Instant::now();
    let (mut c, proxy) = proxied(name);
    let started = t_start.elapsed();
    let w = Writer::start(c.mnt(), "w");
    wait_for("the writer to get under way", &c, &proxy, || {
        w.steps() >= 100 && proxy.to_slave() > 200_000
    });
    let steps0 = w.steps();
    let t_fault = Instant::now();
    let what = fault(&c, &proxy, &w);
    let fault_phase = t_fault.elapsed();
    assert!(
        w.steps() > steps0,
        "the writer made no progress while the link was faulty (writes must not wait for \
         the slave); {}\n{}",
        proxy.stats(),
        c.logs()
    );
    assert!(
        w.advance(50, WAIT),
        "the writer stalled after the fault; {}\n{}",
        proxy.stats(),
        c.logs()
    );
    let steps = w.finish();
    let t_conv = Instant::now();
    if let Err(e) = try_wait_identical(&c.backing, c.replica(0), CONVERGE) {
        panic!("{e}\n{}\n{}", proxy.stats(), c.logs());
    }
    let converge = t_conv.elapsed();
    let t_fin = Instant::now();
    c.finish();
    eprintln!(
        "{name}: {what}; fault phase {fault_phase:.2?}; {steps} writer steps; replica identical \
         {converge:.2?} after the writer stopped; started in {started:.2?}, finished in {:.2?}, \
         whole test {:.2?}; {}",
        t_fin.elapsed(),
        t_start.elapsed(),
        proxy.stats()
    );
}

#[test]
fn proxy_drops_every_connection_while_writing() {
    with_fault("lf-drop", |c, p, w| {
        let mut times = Vec::new();
        for _ in 0..3 {
            wait_for("a connection to drop", c, p, || p.active() > 0);
            let before = p.accepted();
            let t = Instant::now();
            assert!(p.drop_all() > 0);
            times.push(wait_reconnected(c, p, before, t));
            assert!(w.advance(30, WAIT), "writer stalled");
        }
        format!("3 drops, reconnected after {times:.2?}")
    });
}

#[test]
fn proxy_stalls_the_stream_while_writing() {
    with_fault("lf-stall", |c, p, w| {
        let before = p.accepted();
        p.stall(true);
        // A chunk read just before the stall may still be on its way.
        thread::sleep(Duration::from_millis(200));
        let (to_slave, to_master, steps) = (p.to_slave(), p.to_master(), w.steps());
        thread::sleep(Duration::from_secs(2));
        assert_eq!(p.to_slave(), to_slave, "bytes forwarded during the stall");
        assert_eq!(p.to_master(), to_master, "bytes forwarded during the stall");
        let during = w.steps() - steps;
        assert!(during > 0, "writes waited for the stalled link");
        let t = Instant::now();
        p.stall(false);
        wait_for("ops to flow again", c, p, || {
            p.to_slave() > to_slave + 20_000
        });
        let resumed = t.elapsed();
        format!(
            "stalled 2 s while the writer took {during} steps; bytes flowed again {resumed:.2?} \
             after the stall ended; reconnections: {}",
            p.accepted() - before
        )
    });
}

#[test]
fn proxy_truncates_a_chunk_while_writing() {
    with_fault("lf-truncate", |c, p, w| {
        let mut times = Vec::new();
        for k in 1..=2 {
            let before = p.accepted();
            let t = Instant::now();
            p.truncate_next();
            wait_for("a chunk to be truncated", c, p, || p.truncated() >= k);
            times.push(wait_reconnected(c, p, before, t));
            assert!(w.advance(30, WAIT), "writer stalled");
        }
        format!("2 truncated chunks, reconnected after {times:.2?}")
    });
}

#[test]
fn proxy_flips_a_byte_and_the_slave_rejects_the_frame() {
    let slave_log = Arc::new(std::sync::Mutex::new(String::new()));
    let logged = slave_log.clone();
    with_fault("lf-flip", move |c, p, w| {
        let mut times = Vec::new();
        for k in 1..=2u64 {
            let before = p.accepted();
            let t = Instant::now();
            p.flip_next();
            wait_for("a byte to be flipped", c, p, || p.flipped() >= k);
            times.push(wait_reconnected(c, p, before, t));
            wait_for("the slave to log the crc error", c, p, || {
                c.slaves[0].log().to_lowercase().matches("crc").count() >= k as usize
            });
            assert!(w.advance(30, WAIT), "writer stalled");
        }
        *logged.lock().unwrap() = c.slaves[0].log();
        format!("2 flipped bytes, reconnected after {times:.2?}")
    });
    // Nothing of a bad frame was applied: the replica ended identical (checked by finish),
    // and the slave said why it closed the connection.
    let log = slave_log.lock().unwrap().clone();
    let line = log
        .lines()
        .find(|l| l.to_lowercase().contains("crc"))
        .expect("a crc line in the slave log");
    eprintln!("slave: {line}");
    assert!(
        !log.to_lowercase().contains("failed to apply"),
        "the slave reported an apply failure:\n{log}"
    );
}

#[test]
fn proxy_refuses_new_connections_for_a_while() {
    with_fault("lf-refuse", |c, p, w| {
        p.refuse(true);
        let before = p.accepted();
        let t = Instant::now();
        assert!(p.drop_all() > 0);
        wait_for("the master to be refused 3 times", c, p, || {
            p.refused() >= 3
        });
        assert!(w.advance(30, WAIT), "writer stalled");
        let refused_for = t.elapsed();
        let t = Instant::now();
        p.refuse(false);
        let back = wait_reconnected(c, p, before, t);
        format!(
            "{} connections refused over {refused_for:.2?}; reconnected {back:.2?} after \
             accepting again",
            p.refused()
        )
    });
}

// ---------------------------------------------------------------------------------------
// Network namespaces.

/// Runs `prefix... ip ARGS...` and returns its stdout, or stderr as the error.
fn ip_via(prefix: &[&str], args: &[&str]) -> Result<String, String> {
    let argv: Vec<&str> = prefix.iter().chain(&["ip"]).chain(args).copied().collect();
    let shown = argv.join(" ");
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| format!("cannot run `{shown}`: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{shown}` failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip ARGS...` in the root namespace.
fn ip(args: &[&str]) -> Result<String, String> {
    ip_via(&[], args)
}

#[track_caller]
fn must(r: Result<String, String>) -> String {
    r.unwrap_or_else(|e| panic!("network namespace setup: {e}"))
}

/// A network namespace holding the slave, joined to the root namespace by a veth pair with
/// addresses in a private /30 of 10.213.X.0/24. The whole /24 is made `unreachable` in both
/// namespaces before anything else, so that no packet for the test subnet can ever follow a
/// default route off the machine (e.g. once the veth, and with it its route, is gone).
/// Everything is removed on drop, also on panic.
struct NetNs {
    ns: String,
    /// The /24 guarded by an unreachable route in the root namespace (once claimed).
    subnet: Option<String>,
    ns_created: bool,
    veth_root: String,
    veth_slave: String,
    master_ip: String,
    slave_ip: String,
}

static NETNS_SEQ: AtomicUsize = AtomicUsize::new(0);

impl NetNs {
    fn create() -> NetNs {
        let pid = std::process::id();
        let n = NETNS_SEQ.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = ip(&["-V"]) {
            panic!("iproute2 is needed for the network namespace test: {e}");
        }
        if let Err(e) = Command::new("nsenter").arg("--version").output() {
            panic!("nsenter (util-linux) is needed for the network namespace test: {e}");
        }
        let mut me = NetNs {
            ns: format!("tdfs-{pid}-{n}"),
            subnet: None,
            ns_created: false,
            veth_root: String::new(),
            veth_slave: String::new(),
            master_ip: String::new(),
            slave_ip: String::new(),
        };
        // Claim a /24: adding the unreachable route is the lock (it fails with "File exists"
        // when a parallel run, or a leftover, holds it). Skip subnets in use on this host.
        let first = (pid as usize).wrapping_mul(7).wrapping_add(n * 31) % 250 + 1;
        let mut errors = Vec::new();
        for i in 0..250 {
            let x = (first + i) % 250 + 1;
            let subnet = format!("10.213.{x}.0/24");
            let inside = must(ip(&[
                "-4", "route", "show", "table", "all", "root", &subnet,
            ]));
            let addrs = must(ip(&["-4", "-o", "addr", "show"]));
            if !inside.trim().is_empty() || addrs.contains(&format!(" 10.213.{x}.")) {
                continue;
            }
            match ip(&["route", "add", "unreachable", &subnet]) {
                Ok(_) => {
                    me.subnet = Some(subnet);
                    me.master_ip = format!("10.213.{x}.1");
                    me.slave_ip = format!("10.213.{x}.2");
                    me.veth_root = format!("tdm{x}-{pid}");
                    me.veth_slave = format!("tds{x}-{pid}");
                    break;
                }
                Err(e) if e.contains("File exists") => continue,
                Err(e) => {
                    errors.push(e);
                    break;
                }
            }
        }
        let Some(subnet) = me.subnet.clone() else {
            panic!("cannot claim a free 10.213.X.0/24 with an unreachable route: {errors:?}");
        };
        must(ip(&["netns", "add", &me.ns]));
        me.ns_created = true;
        assert!(
            Path::new(&me.ns_path()).exists(),
            "`ip netns add` did not create {}",
            me.ns_path()
        );
        let in_ns = |args: &[&str]| must(me.ip_in_ns(args));
        // Inside: no default route at all, and the test subnet unreachable except for the
        // /30 on the veth.
        in_ns(&["route", "add", "unreachable", &subnet]);
        in_ns(&["link", "set", "lo", "up"]);
        must(ip(&[
            "link",
            "add",
            &me.veth_root,
            "type",
            "veth",
            "peer",
            "name",
            &me.veth_slave,
            "netns",
            &me.ns,
        ]));
        must(ip(&[
            "addr",
            "add",
            &format!("{}/30", me.master_ip),
            "dev",
            &me.veth_root,
        ]));
        must(ip(&["link", "set", &me.veth_root, "up"]));
        in_ns(&[
            "addr",
            "add",
            &format!("{}/30", me.slave_ip),
            "dev",
            &me.veth_slave,
        ]);
        in_ns(&["link", "set", &me.veth_slave, "up"]);
        let routes = in_ns(&["-4", "route", "show", "table", "all"]);
        assert!(
            !routes.contains("default"),
            "the slave's namespace has a default route:\n{routes}"
        );
        me
    }

    /// The namespace's handle, as `ip netns add` made it.
    fn ns_path(&self) -> String {
        format!("/run/netns/{}", self.ns)
    }

    /// Prefix that runs a command in the namespace's network stack only.
    ///
    /// Not `ip netns exec` (nor `ip -n`): those also unshare the mount namespace, and a
    /// long-lived process in a private copy of the mount table pins every FUSE mount of
    /// the tests running alongside (their unmount in the root namespace does not end the
    /// FUSE session while the copy lives, so their masters would wait for this test).
    fn exec_prefix(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--net={}", self.ns_path())]
    }

    /// `ip ARGS...` inside the namespace.
    fn ip_in_ns(&self, args: &[&str]) -> Result<String, String> {
        let prefix = self.exec_prefix();
        let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
        ip_via(&prefix, args)
    }

    /// Sets the slave side of the veth down or up.
    fn slave_link(&self, up: bool) {
        must(self.ip_in_ns(&[
            "link",
            "set",
            &self.veth_slave,
            if up { "up" } else { "down" },
        ]));
    }

    /// One line naming everything set up, for messages.
    fn describe(&self) -> String {
        format!(
            "netns {} ({} {} <-> {} {}), {} unreachable",
            self.ns,
            self.veth_root,
            self.master_ip,
            self.veth_slave,
            self.slave_ip,
            self.subnet.as_deref().unwrap_or("-")
        )
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.ns_created {
            // Deleting the namespace deletes the veth pair with it (no process is left in
            // it: the cluster, and with it the slave, is dropped first).
            if let Err(e) = ip(&["netns", "del", &self.ns]) {
                eprintln!("cleanup: {e}");
            }
        }
        if !self.veth_root.is_empty() && ip(&["link", "show", &self.veth_root]).is_ok() {
            // Still there (a slave process kept the namespace alive): remove it directly.
            if let Err(e) = ip(&["link", "del", &self.veth_root]) {
                eprintln!("cleanup: {e}");
            }
        }
        // The guard route goes last, once nothing of the test subnet is left.
        if let Some(subnet) = &self.subnet {
            if let Err(e) = ip(&["route", "del", "unreachable", subnet]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// A fresh 0600 file with 32 random bytes (hex-encoded) as the shared secret.
fn secret_file(dir: &Path) -> PathBuf {
    let mut raw = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
        .expect("read /dev/urandom");
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let p = dir.join("secret");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .expect("create the secret file");
    f.write_all(hex.as_bytes()).expect("write the secret file");
    p
}

#[test]
fn veth_link_down_and_up_while_writing() {
    let t_start = Instant::now();
    let net = NetNs::create();
    let secrets = temp_dir("netns-secret");
    let secret = secret_file(secrets.path());
    let secret_arg = secret.to_string_lossy().into_owned();
    let mut c = Cluster::start(
        "lf-netns",
        ClusterOpts {
            slave_prefix: net.exec_prefix(),
            slave_host: Some(net.slave_ip.clone()),
            slave_args: vec!["--secret-file".into(), secret_arg.clone()],
            extra_master_args: vec!["--secret-file".into(), secret_arg],
            ..Default::default()
        },
    );
    let slave_addr = c.slaves[0].addr();
    assert!(
        c.mopts.slaves[0].addr.starts_with(&net.slave_ip),
        "the master is not pointed at the namespace: {:?}",
        c.mopts.slaves
    );
    let w = Writer::start(c.mnt(), "w");
    let replica_w = c.replica(0).join("w");
    assert!(
        wait_until(WAIT, || {
            // d0 (or done0), d1 and journal.log: past step 100, on the replica.
            w.steps() >= 100 && fs::read_dir(&replica_w).is_ok_and(|d| d.count() >= 3)
        }),
        "nothing replicated across the veth ({}):\n{}",
        net.describe(),
        c.logs()
    );

    // Cut: the slave side goes down; the master keeps writing into its queue.
    let steps_before = w.steps();
    let t_cut = Instant::now();
    net.slave_link(false);
    // TDFS_TEST_CUT_SECS: a longer cut, to measure how recovery grows with it.
    let outage = Duration::from_secs(
        std::env::var("TDFS_TEST_CUT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
    );
    thread::sleep(outage);
    let during = w.steps() - steps_before;
    assert!(
        during > 0,
        "writes waited for the cut link ({} steps before)\n{}",
        steps_before,
        c.logs()
    );
    net.slave_link(true);
    let t_up = Instant::now();
    let cut_for = t_cut.elapsed();
    assert!(
        w.advance(50, WAIT),
        "writer stalled after the link came back"
    );
    let steps = w.finish();
    let writer_stopped = t_up.elapsed();
    if let Err(e) = try_wait_identical(&c.backing, c.replica(0), CONVERGE) {
        panic!(
            "replica not identical within {CONVERGE:?} after the link came back up ({}):\n\
             {e}\n{}",
            net.describe(),
            c.logs()
        );
    }
    let recovered = t_up.elapsed();
    c.finish();
    let log = c.master.log_text();
    let lost = log.lines().filter(|l| l.contains("link lost")).count();
    eprintln!(
        "veth: {}; slave {slave_addr}; link down {cut_for:.2?} while the writer took {during} \
         steps; {steps} steps in all, writer stopped {writer_stopped:.2?} after the link came \
         up; replica identical {recovered:.2?} after the link came up; master logged {lost} \
         `link lost`; whole test {:.2?}",
        net.describe(),
        t_start.elapsed()
    );
}
