//! The node supervisor's loop.
//!
//! Timing (TTL = `--ttl`, default 6 s): the session lease is renewed every TTL/6. A renewal
//! sent at instant `t` proves the lease valid in etcd until at least `t + TTL` (etcd extends
//! it from when it receives the request, which is after `t`). The leader hands its master a
//! write lease until `t + renew deadline` (default 2/3 TTL): when renewals stop getting
//! through, the master refuses writes (EROFS) at least TTL - deadline before etcd can let
//! anyone else take over. Replicas only ever take over through an etcd transaction, so with
//! etcd unreachable nobody is promoted, and the master stops once its lease is not provable.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Value};
use tdfs_replication::daemon::control;
use tdfs_replication::repl::monotonic_ns;
use tracing::{debug, error, info, warn};

use crate::etcd::{Etcd, Renewal};
use crate::member::{self, Alive, Member, Position};
use crate::status::{ClusterMetrics, NODE_SOCKET};

/// Run this node of a replica set whose master is chosen through etcd (automatic failover).
///
/// Every node runs one `tdfs node` with the same --etcd, --cluster and --mountpoint. The node
/// holding the cluster's leader lease runs the master (`tdfs`, mounted at MOUNTPOINT, streaming
/// to every other member); the others run `tdfs-slave` on their DIR. When the leader's lease
/// expires (it died, or lost etcd), the most up-to-date live replica takes the lease, is
/// promoted to a new epoch and mounts; the others follow it. A leader that cannot renew its
/// lease stops taking writes before the lease can expire; one that finds it lost steps down
/// and rejoins as a replica (what only it held is stashed).
#[derive(Parser, Debug, Clone)]
#[command(name = "tdfs node")]
pub struct NodeCli {
    /// etcd endpoints, e.g. http://10.0.0.1:2379,http://10.0.0.2:2379.
    #[arg(
        long,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        required = true
    )]
    pub etcd: Vec<String>,

    /// Name of the replica set: its keys live under /tdfs/NAME/ in etcd.
    #[arg(long, value_name = "NAME")]
    pub cluster: String,

    /// This node's name in the cluster (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// The tree this node holds: the backing directory while it leads, the mirror while it
    /// follows.
    #[arg(short = 'm', long = "dir", value_name = "DIR")]
    pub dir: PathBuf,

    /// State directory (shared by both roles). Default: /var/lib/tdfs/<name derived from DIR>.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Where the leader mounts the filesystem: the same path on every node.
    #[arg(long, value_name = "DIR")]
    pub mountpoint: PathBuf,

    /// Where this node's tdfs-slave listens, [ADDR:]PORT (port 0: any free port).
    #[arg(
        short = 'l',
        long,
        value_name = "[ADDR:]PORT",
        default_value = "0.0.0.0:4731"
    )]
    pub listen: String,

    /// The address the other nodes dial to reach this node's tdfs-slave, HOST:PORT
    /// (default: the listen address; required when it listens on every address).
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,

    /// Seconds a leader lease lives without renewal: how long a dead leader holds the cluster
    /// up before a replica takes over.
    #[arg(long, default_value_t = 6, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(2..=300))]
    pub ttl: u64,

    /// The leader's master refuses writes once this long has passed since the last renewal
    /// that reached etcd (default: 2/3 of --ttl; must be below it).
    #[arg(long, value_name = "SECONDS")]
    pub renew_deadline: Option<f64>,

    /// After starting, wait this long before taking part in an election, so that after a
    /// restart of the whole cluster every node has said where it stands (default: --ttl).
    #[arg(long, value_name = "SECONDS")]
    pub election_wait: Option<f64>,

    /// The master's --sync mode: async, received or applied.
    #[arg(long = "sync", default_value = "async", value_name = "MODE")]
    pub sync_mode: String,

    /// The master's --min-replicas. A node leads only once this many other members are
    /// registered.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub min_replicas: usize,

    /// Shared secret for the replication links (given to both daemons).
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,

    /// One more argument for the master (repeat; e.g. --master-arg=-z --master-arg=1).
    #[arg(long = "master-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub master_args: Vec<String>,

    /// One more argument for tdfs-slave (repeat; e.g. --slave-arg=--insecure).
    #[arg(long = "slave-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub slave_args: Vec<String>,

    /// Command run (by sh) once this node leads and its mount is up, with the arguments
    /// `on_promote leader CLUSTER` and TDFS_* variables (e.g. to move a virtual IP).
    #[arg(long, value_name = "CMD")]
    pub on_promote: Option<String>,

    /// Command run once this node stopped leading (its master stopped), with the arguments
    /// `on_demote replica CLUSTER`.
    #[arg(long, value_name = "CMD")]
    pub on_demote: Option<String>,

    /// Serve the cluster's metrics at http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,

    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short = 'v', action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Log only warnings and errors.
    #[arg(short = 'q')]
    pub quiet: bool,
}

/// `tdfs node ...` (args[0] is "node").
pub fn node_main(args: Vec<String>) -> ExitCode {
    let cli = NodeCli::parse_from(
        std::iter::once("tdfs node".to_string()).chain(args.into_iter().skip(1)),
    );
    let level =
        tdfs_replication::daemon::logging::flag_level(cli.verbose, cli.quiet).unwrap_or("info");
    let _log = tdfs_replication::daemon::logging::init(level);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How often the view of the cluster is read from etcd.
const POLL: Duration = Duration::from_millis(250);
/// How often this node's record is rewritten and its daemon asked where it stands.
const PUBLISH: Duration = Duration::from_secs(1);
/// How long a daemon may take to start or stop.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);
/// The master's --drain-timeout when it steps down (its replicas may be gone).
const STEP_DOWN_DRAIN: u64 = 10;

enum Local {
    Replica {
        child: Child,
    },
    Leader {
        child: Child,
        mounted: bool,
    },
    /// No daemon runs (between two roles, or a daemon that failed to start).
    Idle {
        retry_at: Instant,
    },
}

#[derive(Default, Clone)]
struct View {
    leader: Option<(String, i64)>,
    members: Vec<Member>,
    alive: Vec<Alive>,
}

/// The session lease's renewals, made by a task of their own so that nothing the loop waits
/// for (a daemon stopping, a promotion) delays them; each one also moves the master's write
/// lease while this node leads.
struct Renewer {
    /// CLOCK_MONOTONIC (ns) at which the last successful renewal was sent; 0: none.
    renewed_ns: AtomicU64,
    /// The last renewal got an answer.
    ok: AtomicBool,
    /// etcd said the lease is gone.
    lost: AtomicBool,
    /// The master's control socket while this node leads.
    master_sock: Mutex<Option<PathBuf>>,
    deadline: Duration,
}

impl Renewer {
    fn deadline_ns(&self) -> u64 {
        self.renewed_ns.load(Ordering::Acquire) + self.deadline.as_nanos() as u64
    }

    fn lead(&self, sock: Option<PathBuf>) {
        *self.master_sock.lock().unwrap_or_else(|p| p.into_inner()) = sock;
    }

    fn start(self: &Arc<Self>, rt: &tokio::runtime::Runtime, etcd: Arc<Etcd>, every: Duration) {
        let me = self.clone();
        rt.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut logged: Option<Instant> = None;
            loop {
                tick.tick().await;
                if etcd.lease().is_none() {
                    continue;
                }
                let sent = monotonic_ns();
                match etcd.keep_alive().await {
                    Renewal::Renewed => {
                        me.renewed_ns.store(sent, Ordering::Release);
                        me.ok.store(true, Ordering::Release);
                        let me2 = me.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            // Under the lock: once `lead(None)` has returned, no renewal
                            // can hand the master a lease any more.
                            let g = me2.master_sock.lock().unwrap_or_else(|p| p.into_inner());
                            if let Some(sock) = &*g {
                                if let Err(e) = control::request_at(
                                    sock,
                                    &json!({"cmd": "lease", "until_ns": me2.deadline_ns()}),
                                    Duration::from_secs(1),
                                ) {
                                    debug!("renewing the master's write lease: {e:#}");
                                }
                            }
                        })
                        .await;
                    }
                    Renewal::Lost => {
                        me.ok.store(true, Ordering::Release);
                        me.lost.store(true, Ordering::Release);
                    }
                    Renewal::Failed(e) => {
                        me.ok.store(false, Ordering::Release);
                        if logged.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            warn!("etcd: {e}");
                            logged = Some(Instant::now());
                        }
                    }
                }
            }
        });
    }
}

struct Sup {
    cli: NodeCli,
    name: String,
    dir: PathBuf,
    state_dir: PathBuf,
    mountpoint: PathBuf,
    prefix: String,
    listen: String,
    /// This node's tdfs-slave address as registered.
    addr: Option<String>,
    rt: tokio::runtime::Runtime,
    etcd: Arc<Etcd>,
    renewer: Arc<Renewer>,
    etcd_ok: bool,
    local: Local,
    ttl: Duration,
    renew_every: Duration,
    renew_deadline: Duration,
    election_wait: Duration,
    view: View,
    /// Read in this pass of the loop (only a fresh view may start an election).
    view_fresh: bool,
    poll_due: Instant,
    publish_due: Instant,
    /// When to try for a session again, and how long to wait after the next failure.
    session_due: Instant,
    session_backoff: Duration,
    started: Instant,
    no_campaign_until: Instant,
    /// The leader's lease as etcd last reported it (replicas), seconds.
    leader_ttl: Option<f64>,
    position: Position,
    /// What the local master said last (leader).
    master_status: Value,
    elections: u64,
    demotions: u64,
    leaderless_logged: bool,
    last_etcd_error: Option<Instant>,
    snapshot: Arc<Mutex<Value>>,
    stop: Arc<AtomicBool>,
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "node".into())
}

/// Whether a tdfs FUSE mount sits on `mp` (from /proc/self/mountinfo).
fn tdfs_mounted(mp: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| tdfs_mount_in(&info, mp))
}

fn tdfs_mount_in(info: &str, mp: &Path) -> bool {
    let want = mp.to_string_lossy().replace(' ', "\\040");
    info.lines().any(|l| {
        let mut halves = l.splitn(2, " - ");
        let left = halves.next().unwrap_or("");
        let right = halves.next().unwrap_or("");
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let source = r.next().unwrap_or("");
        // The master names its mount "tdfs:DIR"; the type is fuse, or fuse.tdfs where the
        // subtype is kept.
        left.split(' ').nth(4) == Some(want.as_str())
            && fstype.starts_with("fuse")
            && source.starts_with("tdfs:")
    })
}

fn lazy_unmount(mp: &Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(c) = std::ffi::CString::new(mp.as_os_str().as_bytes()) {
        // SAFETY: a valid C string; MNT_DETACH only detaches the mount.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// A child that ends with the supervisor (it is spawned from the main thread, which lives
/// as long as the process): a supervisor killed outright leaves no daemon behind holding
/// the state directory or the mount.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

fn signal_child(child: &Child, sig: libc::c_int) {
    // SAFETY: plain kill(2) on our own, not yet reaped child.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
}

/// SIGTERM, then up to `timeout` for the exit, then SIGKILL.
fn stop_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    signal_child(child, libc::SIGTERM);
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

fn exe_beside(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("finding this executable")?;
    let p = me.parent().map(|d| d.join(name)).unwrap_or_default();
    if !p.exists() {
        bail!(
            "{} not found next to {}: install both daemons in one directory",
            p.display(),
            me.display()
        );
    }
    Ok(p)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn run(cli: NodeCli) -> anyhow::Result<()> {
    let name = cli.name.clone().unwrap_or_else(hostname);
    if name.is_empty() || name.contains('/') {
        bail!("--name {name:?}: a node name must be non-empty and contain no '/'");
    }
    let dir = cli
        .dir
        .canonicalize()
        .with_context(|| format!("directory {}", cli.dir.display()))?;
    let mountpoint = cli
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mountpoint {}", cli.mountpoint.display()))?;
    let state_dir = tdfs_replication::node::prepare_dir(&dir, cli.state_dir.clone())?;
    let ttl = Duration::from_secs(cli.ttl);
    let renew_deadline = Duration::from_secs_f64(
        cli.renew_deadline
            .unwrap_or(cli.ttl as f64 * 2.0 / 3.0)
            .max(0.0),
    );
    let renew_every = (ttl / 6).max(Duration::from_millis(200));
    if renew_deadline >= ttl || renew_deadline < renew_every * 2 {
        bail!(
            "--renew-deadline {:.1}s must be below --ttl ({}s) and at least two renewal \
             intervals ({:.1}s)",
            renew_deadline.as_secs_f64(),
            cli.ttl,
            (renew_every * 2).as_secs_f64()
        );
    }
    let election_wait = Duration::from_secs_f64(
        cli.election_wait
            .unwrap_or(cli.ttl as f64)
            .clamp(0.0, 3600.0),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tdfs-node")
        .enable_all()
        .build()?;
    let snapshot = Arc::new(Mutex::new(json!({"ok": true, "role": "starting"})));
    let mut sock = control::bind_named(&state_dir, NODE_SOCKET)?;
    {
        let snap = snapshot.clone();
        control::serve(rt.handle(), &mut sock, move |req| {
            match req["cmd"].as_str() {
                Some("status") => snap.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                other => control::error(format!(
                    "unknown command {other:?} (tdfs node knows: status)"
                )),
            }
        });
    }
    if let Some(m) = &cli.metrics {
        let l = tdfs_replication::daemon::http::bind(m)?;
        let maddr = l.local_addr()?;
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(ClusterMetrics(snapshot.clone())));
        let reg = Arc::new(reg);
        tdfs_replication::daemon::http::serve(
            rt.handle(),
            l,
            Arc::new(move || tdfs_replication::daemon::http::render(&reg)),
        );
        info!("metrics at http://{maddr}/metrics");
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        use tokio::signal::unix::{signal, SignalKind};
        let _g = rt.enter();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // Caught so that a reload (systemctl reload, a closed terminal) does not kill the
        // node with its default action.
        let mut hup = signal(SignalKind::hangup())?;
        let stop = stop.clone();
        rt.spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => { info!("SIGTERM: leaving the cluster"); break }
                    _ = int.recv() => { info!("SIGINT: leaving the cluster"); break }
                    _ = hup.recv() => info!("SIGHUP: tdfs node has nothing to re-read; ignored"),
                }
            }
            stop.store(true, Ordering::Release);
        });
    }
    let timeout = renew_every.clamp(Duration::from_millis(500), Duration::from_secs(2));
    let now = Instant::now();
    let etcd = Arc::new(Etcd::new(cli.etcd.clone(), cli.ttl as i64, timeout));
    let renewer = Arc::new(Renewer {
        renewed_ns: AtomicU64::new(0),
        ok: AtomicBool::new(false),
        lost: AtomicBool::new(false),
        master_sock: Mutex::new(None),
        deadline: renew_deadline,
    });
    renewer.start(&rt, etcd.clone(), renew_every);
    let mut sup = Sup {
        prefix: format!("/tdfs/{}/", cli.cluster),
        listen: cli.listen.clone(),
        etcd,
        renewer,
        cli,
        name,
        dir,
        state_dir,
        mountpoint,
        addr: None,
        rt,
        etcd_ok: false,
        local: Local::Idle { retry_at: now },
        ttl,
        renew_every,
        renew_deadline,
        election_wait,
        view: View::default(),
        view_fresh: false,
        poll_due: now,
        publish_due: now,
        session_due: now,
        session_backoff: Duration::from_millis(100),
        started: now,
        no_campaign_until: now,
        leader_ttl: None,
        position: Position::default(),
        master_status: Value::Null,
        elections: 0,
        demotions: 0,
        leaderless_logged: false,
        last_etcd_error: None,
        snapshot,
        stop,
    };
    info!(
        node = %sup.name,
        cluster = %sup.cli.cluster,
        "tdfs node: etcd {}, lease TTL {}s renewed every {:.1}s, writes stop {:.1}s after the \
         last renewal, elections after {:.1}s",
        sup.cli.etcd.join(","),
        sup.cli.ttl,
        sup.renew_every.as_secs_f64(),
        sup.renew_deadline.as_secs_f64(),
        sup.election_wait.as_secs_f64()
    );
    sup.start_replica();
    let r = sup.run_loop();
    sup.shutdown();
    drop(sock);
    r
}

impl Sup {
    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn etcd_failed(&mut self, what: &str, e: impl std::fmt::Display) {
        self.etcd_ok = false;
        // Once every 10 s at most: a long outage must not flood the log.
        if self
            .last_etcd_error
            .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
        {
            warn!("etcd: {what}: {e}");
            self.last_etcd_error = Some(Instant::now());
        }
    }

    fn is_leader(&self) -> bool {
        matches!(self.local, Local::Leader { .. })
    }

    fn role_name(&self) -> &'static str {
        match self.local {
            Local::Leader { .. } => "leader",
            Local::Replica { .. } => "replica",
            Local::Idle { .. } => "idle",
        }
    }

    fn run_loop(&mut self) -> anyhow::Result<()> {
        while !self.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            self.view_fresh = false;
            if self.renewer.lost.swap(false, Ordering::AcqRel) {
                warn!(
                    "etcd no longer has this node's session lease (it expired while this node \
                     could not renew it)"
                );
                if self.is_leader() {
                    self.step_down("the leader lease expired while this node could not renew it");
                }
            }
            if self.etcd.lease().is_none() && now >= self.session_due {
                self.new_session();
            }
            if self.etcd.lease().is_some() && now >= self.poll_due {
                self.poll_due = now + POLL;
                self.read_view();
            }
            self.watch_local();
            if now >= self.publish_due {
                self.publish_due = now + PUBLISH;
                self.publish();
            }
            if !self.is_leader() {
                self.maybe_campaign();
            }
            self.update_snapshot();
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// A new session: a lease, this node's member and liveness records.
    fn new_session(&mut self) {
        let sent = monotonic_ns();
        let r = self.rt.block_on(self.etcd.grant());
        match r {
            Ok(id) => {
                self.renewer.renewed_ns.store(sent, Ordering::Release);
                self.session_backoff = Duration::from_millis(100);
                self.etcd_ok = true;
                info!("etcd session {id:x} (lease TTL {}s)", self.cli.ttl);
                self.register();
                self.publish();
            }
            Err(e) => {
                // With etcd down, try again after 0.1 s, 0.2 s, ... at most every 2 s.
                self.session_due = Instant::now() + self.session_backoff;
                self.session_backoff = (self.session_backoff * 2).min(Duration::from_secs(2));
                self.etcd_failed("starting a session", format!("{e:#}"))
            }
        }
    }

    fn register(&mut self) {
        let Some(addr) = self.addr.clone() else {
            return;
        };
        let m = Member {
            name: self.name.clone(),
            addr,
        };
        let key = self.key(&format!("members/{}", self.name));
        let v = serde_json::to_vec(&m).expect("json");
        if let Err(e) = self.rt.block_on(self.etcd.put(&key, v, false)) {
            self.etcd_failed("registering this member", format!("{e:#}"));
        }
    }

    /// The write deadline the master may use: the last renewal plus the renew deadline.
    fn lease_deadline_ns(&self) -> u64 {
        self.renewer.deadline_ns()
    }

    fn read_view(&mut self) {
        let prefix = self.prefix.clone();
        let kvs = match self.rt.block_on(self.etcd.get_prefix(&prefix)) {
            Ok(k) => k,
            Err(e) => {
                self.etcd_failed("reading the cluster", format!("{e:#}"));
                return;
            }
        };
        self.etcd_ok = true;
        let mut v = View::default();
        for kv in kvs {
            let Some(rest) = kv.key.strip_prefix(&prefix) else {
                continue;
            };
            if rest == "leader" {
                v.leader = Some((String::from_utf8_lossy(&kv.value).into_owned(), kv.lease));
            } else if rest.starts_with("members/") {
                match serde_json::from_slice::<Member>(&kv.value) {
                    Ok(m) => v.members.push(m),
                    Err(e) => debug!("ignoring {}: {e}", kv.key),
                }
            } else if rest.starts_with("alive/") {
                match serde_json::from_slice::<Alive>(&kv.value) {
                    Ok(a) => v.alive.push(a),
                    Err(e) => debug!("ignoring {}: {e}", kv.key),
                }
            }
        }
        if v.leader.is_some() {
            self.leaderless_logged = false;
        }
        self.view = v;
        self.view_fresh = true;
    }

    /// This node's position, from its daemon if one runs.
    fn my_position(&mut self) -> Position {
        let sock = self.state_dir.join(control::SOCKET_NAME);
        match &self.local {
            Local::Replica { .. } => {
                match control::request_at(&sock, &json!({"cmd": "status"}), Duration::from_secs(2))
                {
                    Ok(st) => member::position_from_slave(&self.state_dir, &st),
                    Err(_) => self.position,
                }
            }
            Local::Leader { .. } => {
                let st = &self.master_status;
                Position {
                    epoch: st["epoch"].as_u64().unwrap_or(self.position.epoch),
                    leads_epoch: true,
                    applied: st["last_seq"].as_u64().unwrap_or(self.position.applied),
                    consistent: true,
                }
            }
            Local::Idle { .. } => {
                member::position_from_files(&self.state_dir).unwrap_or(self.position)
            }
        }
    }

    fn publish(&mut self) {
        if self.is_leader() {
            if let Ok(st) = control::request_at(
                &self.state_dir.join(control::SOCKET_NAME),
                &json!({"cmd": "status"}),
                Duration::from_secs(2),
            ) {
                self.master_status = st;
            }
            self.leader_duties();
        } else if self.etcd_ok {
            if let Some((_, lease)) = self.view.leader.clone() {
                self.leader_ttl = self
                    .rt
                    .block_on(self.etcd.ttl_of(lease))
                    .ok()
                    .map(|t| t as f64);
            } else {
                self.leader_ttl = None;
            }
        }
        self.position = self.my_position();
        if self.etcd.lease().is_none() {
            return;
        }
        let a = Alive {
            name: self.name.clone(),
            role: self.role_name().to_string(),
            position: self.position,
            lease_secs: self.is_leader().then(|| self.lease_left()),
            mountpoint: self.mountpoint.display().to_string(),
            at_ms: unix_ms(),
        };
        let key = self.key(&format!("alive/{}", self.name));
        let v = serde_json::to_vec(&a).expect("json");
        if let Err(e) = self.rt.block_on(self.etcd.put(&key, v, true)) {
            self.etcd_failed("publishing this node's state", format!("{e:#}"));
        }
    }

    fn lease_left(&self) -> f64 {
        (self.lease_deadline_ns() as f64 - monotonic_ns() as f64) / 1e9
    }

    /// As leader: the master's replicas are the registered members; a fenced master (a newer
    /// epoch exists) steps down.
    fn leader_duties(&mut self) {
        if let Some(f) = self.master_status["fenced"].as_object() {
            let by = f
                .get("by")
                .and_then(|b| b.as_str())
                .unwrap_or("?")
                .to_string();
            self.step_down(&format!(
                "the master was fenced by {by}: a newer epoch exists"
            ));
            return;
        }
        if !self.view_fresh && self.view.members.is_empty() {
            return;
        }
        let want: Vec<String> = self
            .view
            .members
            .iter()
            .filter(|m| m.name != self.name)
            .map(|m| m.addr.clone())
            .collect();
        let have: Vec<String> = self.master_status["slaves"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["addr"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if self.master_status.is_null() {
            return;
        }
        let sock = self.state_dir.join(control::SOCKET_NAME);
        for a in want.iter().filter(|a| !have.contains(a)) {
            match control::request_at(
                &sock,
                &json!({"cmd": "add", "slave": a}),
                Duration::from_secs(2),
            ) {
                Ok(_) => info!("replica {a} added (registered in etcd)"),
                Err(e) => warn!("adding replica {a}: {e:#}"),
            }
        }
        for a in have.iter().filter(|a| !want.contains(a)) {
            match control::request_at(
                &sock,
                &json!({"cmd": "remove", "slave": a}),
                Duration::from_secs(2),
            ) {
                Ok(_) => info!("replica {a} removed (no longer a member in etcd)"),
                Err(e) => warn!("removing replica {a}: {e:#}"),
            }
        }
    }

    /// Keeps the local daemon in the state its role needs.
    fn watch_local(&mut self) {
        let now = Instant::now();
        let mut step_down = None;
        let mut just_mounted = false;
        let mut restart_at = None;
        match &mut self.local {
            Local::Leader { child, mounted } => {
                if let Ok(Some(st)) = child.try_wait() {
                    step_down = Some(format!("the master exited ({st})"));
                } else if !*mounted && tdfs_mounted(&self.mountpoint) {
                    *mounted = true;
                    just_mounted = true;
                }
            }
            Local::Replica { child } => {
                if let Ok(Some(st)) = child.try_wait() {
                    error!("tdfs-slave exited ({st}); starting it again in 1 s");
                    restart_at = Some(now + Duration::from_secs(1));
                }
            }
            Local::Idle { retry_at } => {
                if now >= *retry_at {
                    restart_at = Some(now);
                }
            }
        }
        if just_mounted {
            info!(
                mountpoint = %self.mountpoint.display(),
                "leading: mounted and taking writes"
            );
            self.hook(self.cli.on_promote.clone(), "on_promote", "leader");
        }
        if step_down.is_none() && self.is_leader() && self.view_fresh {
            let mine = self.etcd.lease();
            let holder = self.view.leader.clone();
            let still = holder
                .as_ref()
                .is_some_and(|(n, l)| n == &self.name && Some(*l) == mine);
            if !still {
                let who = holder.map_or_else(|| "nobody".to_string(), |(n, _)| n);
                step_down = Some(format!(
                    "etcd says the leader is {who}, not this node's session"
                ));
            }
        }
        if let Some(why) = step_down {
            self.step_down(&why);
            return;
        }
        match restart_at {
            Some(t) if t <= now => self.start_replica(),
            Some(t) => self.local = Local::Idle { retry_at: t },
            None => {}
        }
    }

    /// Starts this node's tdfs-slave and learns the address it listens on.
    fn start_replica(&mut self) {
        match self.spawn_slave() {
            Ok(child) => {
                self.local = Local::Replica { child };
                self.register();
            }
            Err(e) => {
                error!("starting tdfs-slave: {e:#}; trying again in 2 s");
                self.local = Local::Idle {
                    retry_at: Instant::now() + Duration::from_secs(2),
                };
            }
        }
    }

    fn spawn_slave(&mut self) -> anyhow::Result<Child> {
        let mut cmd = Command::new(exe_beside("tdfs-slave")?);
        cmd.arg("-m")
            .arg(&self.dir)
            .arg("-l")
            .arg(&self.listen)
            .arg("--state-dir")
            .arg(&self.state_dir);
        if let Some(s) = &self.cli.secret_file {
            cmd.arg("--secret-file").arg(s);
        }
        cmd.args(&self.cli.slave_args).stdin(Stdio::null());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().context("spawning tdfs-slave")?;
        let sock = self.state_dir.join(control::SOCKET_NAME);
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        let st = loop {
            if let Ok(Some(st)) = child.try_wait() {
                bail!("tdfs-slave exited at once ({st})");
            }
            if let Ok(st) =
                control::request_at(&sock, &json!({"cmd": "status"}), Duration::from_secs(2))
            {
                if st["role"] == "replica" {
                    break st;
                }
            }
            if Instant::now() >= deadline {
                let _ = stop_child(&mut child, Duration::from_secs(5));
                bail!("tdfs-slave did not answer on {} in time", sock.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let listen = st["listen"].as_str().unwrap_or("").to_string();
        // The same port on every restart: the address others were given stays right.
        if let Ok(sa) = listen.parse::<std::net::SocketAddr>() {
            if let Some((host, _)) = self.listen.rsplit_once(':') {
                self.listen = format!("{host}:{}", sa.port());
            } else {
                self.listen = format!("0.0.0.0:{}", sa.port());
            }
            let addr = match &self.cli.advertise {
                Some(a) => a.clone(),
                None if sa.ip().is_unspecified() => {
                    format!("{}:{}", hostname(), sa.port())
                }
                None => sa.to_string(),
            };
            if self.addr.as_deref() != Some(addr.as_str()) {
                info!("replica address {addr} (tdfs-slave listens on {sa})");
                self.addr = Some(addr);
            }
        }
        self.position = member::position_from_slave(&self.state_dir, &st);
        Ok(child)
    }

    /// When no node leads: whether this one is the one to, and if so, taking the lease.
    fn maybe_campaign(&mut self) {
        if !self.view_fresh || self.view.leader.is_some() || self.etcd.lease().is_none() {
            return;
        }
        let now = Instant::now();
        if now < self.started + self.election_wait || now < self.no_campaign_until {
            return;
        }
        if !matches!(self.local, Local::Replica { .. }) {
            return;
        }
        let others = self
            .view
            .members
            .iter()
            .filter(|m| m.name != self.name)
            .count();
        if others < self.cli.min_replicas {
            if !self.leaderless_logged {
                warn!(
                    "no leader, and only {others} other member(s) registered: with \
                     --min-replicas {} this node does not lead",
                    self.cli.min_replicas
                );
                self.leaderless_logged = true;
            }
            return;
        }
        self.position = self.my_position();
        let mut cands: Vec<(String, Position)> = self
            .view
            .alive
            .iter()
            .filter(|a| a.name != self.name)
            .map(|a| (a.name.clone(), a.position))
            .collect();
        cands.push((self.name.clone(), self.position));
        let best = member::best(cands.iter().map(|(n, p)| (n.as_str(), p)))
            .unwrap_or_default()
            .to_string();
        if best != self.name {
            if !self.leaderless_logged {
                info!(
                    "no leader: {best} is the most up-to-date live node ({:?}); this node is at \
                     {:?}",
                    cands.iter().find(|(n, _)| *n == best).map(|(_, p)| p),
                    self.position
                );
                self.leaderless_logged = true;
            }
            return;
        }
        let key = self.key("leader");
        let name = self.name.clone();
        match self.rt.block_on(self.etcd.campaign(&key, &name)) {
            Ok(true) => {
                info!(
                    "no leader: this node is the most up-to-date live one ({:?}) and took the \
                     leader lease",
                    self.position
                );
                self.become_leader();
            }
            Ok(false) => debug!("another node took the leader lease first"),
            Err(e) => self.etcd_failed("campaigning", format!("{e:#}")),
        }
    }

    fn become_leader(&mut self) {
        self.elections += 1;
        if let Local::Replica { child } = &mut self.local {
            if stop_child(child, DAEMON_TIMEOUT).is_none_or(|s| !s.success()) {
                warn!("tdfs-slave did not stop cleanly");
            }
        }
        self.local = Local::Idle {
            retry_at: Instant::now() + Duration::from_secs(3600),
        };
        let rec = member::read_record(&self.state_dir).unwrap_or_default();
        let alive_peers: Vec<String> = self
            .view
            .alive
            .iter()
            .filter(|a| a.name != self.name)
            .filter_map(|a| {
                self.view
                    .members
                    .iter()
                    .find(|m| m.name == a.name)
                    .map(|m| m.addr.clone())
            })
            .collect();
        if rec.history.is_empty() {
            info!("no node holds anything yet: this one starts a new replica set");
        } else if member::leads_epoch(&rec) {
            info!(
                "this node was the master of {} and was never replaced: it leads that epoch on",
                rec.history.last().expect("not empty")
            );
        } else if let Err(e) = self.promote(&alive_peers) {
            error!("promotion refused: {e:#}; giving the leader lease back");
            self.resign();
            self.no_campaign_until = Instant::now() + self.ttl * 2;
            self.start_replica();
            return;
        }
        self.renewer
            .lead(Some(self.state_dir.join(control::SOCKET_NAME)));
        match self.spawn_master() {
            Ok(child) => {
                self.local = Local::Leader {
                    child,
                    mounted: false,
                }
            }
            Err(e) => {
                self.renewer.lead(None);
                error!("starting the master: {e:#}; giving the leader lease back");
                self.resign();
                self.no_campaign_until = Instant::now() + self.ttl * 2;
                self.start_replica();
            }
        }
        self.publish_due = Instant::now();
    }

    /// `tdfs promote` on this node's state dir, comparing with the live peers: it refuses
    /// if one of them holds ops this node lacks.
    fn promote(&self, peers: &[String]) -> anyhow::Result<()> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("promote")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--peer-timeout", "1"]);
        for p in peers {
            cmd.arg("--peer").arg(p);
        }
        if let Some(s) = &self.cli.secret_file {
            cmd.arg("--secret-file").arg(s);
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .context("running tdfs promote")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("tdfs promote: {}", text.trim());
        }
        info!("{}", text.trim());
        Ok(())
    }

    fn spawn_master(&mut self) -> anyhow::Result<Child> {
        if tdfs_mounted(&self.mountpoint) {
            // A dead master's mount (this supervisor's earlier run was killed).
            warn!(
                "{}: detaching a stale tdfs mount",
                self.mountpoint.display()
            );
            lazy_unmount(&self.mountpoint);
        }
        // The replicas come from etcd, not from what an earlier run saved.
        let _ = std::fs::remove_file(self.state_dir.join("slaves"));
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("-m")
            .arg(&self.dir)
            .arg("--state-dir")
            .arg(&self.state_dir);
        for m in self.view.members.iter().filter(|m| m.name != self.name) {
            cmd.arg("-c").arg(&m.addr);
        }
        cmd.arg("--lease-until")
            .arg(self.lease_deadline_ns().to_string())
            .args(["--fence-check", "1"])
            .args(["--drain-timeout", &STEP_DOWN_DRAIN.to_string()])
            .args(["--sync", &self.cli.sync_mode])
            .args(["--min-replicas", &self.cli.min_replicas.to_string()]);
        if let Some(s) = &self.cli.secret_file {
            cmd.arg("--secret-file").arg(s);
        }
        cmd.args(&self.cli.master_args)
            .arg(&self.mountpoint)
            .stdin(Stdio::null());
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("spawning tdfs")?;
        info!("master started (pid {})", child.id());
        Ok(child)
    }

    fn resign(&mut self) {
        let key = self.key("leader");
        let name = self.name.clone();
        if let Err(e) = self.rt.block_on(self.etcd.resign(&key, &name)) {
            self.etcd_failed("giving up the leader key", format!("{e:#}"));
        }
    }

    /// Stops leading: the master stops (it unmounts and drains what it can), the hook runs,
    /// the leader key is given up if still held, and the node rejoins as a replica.
    fn step_down(&mut self, why: &str) {
        warn!("stepping down: {why}");
        self.demotions += 1;
        self.renewer.lead(None);
        let old = std::mem::replace(
            &mut self.local,
            Local::Idle {
                retry_at: Instant::now(),
            },
        );
        if let Local::Leader { mut child, .. } = old {
            if let Ok(None) = child.try_wait() {
                // Writes stop now, not when the master gets to its unmount: another node
                // may be about to lead (the lease it was given would otherwise run on).
                if let Err(e) = control::request_at(
                    &self.state_dir.join(control::SOCKET_NAME),
                    &json!({"cmd": "lease", "until_ns": 0}),
                    Duration::from_secs(1),
                ) {
                    debug!("withdrawing the master's write lease: {e:#}");
                }
                let st = stop_child(&mut child, Duration::from_secs(STEP_DOWN_DRAIN + 20));
                info!("master stopped ({st:?})");
            }
        }
        if tdfs_mounted(&self.mountpoint) {
            lazy_unmount(&self.mountpoint);
        }
        self.hook(self.cli.on_demote.clone(), "on_demote", "replica");
        self.resign();
        self.master_status = Value::Null;
        self.start_replica();
        self.publish_due = Instant::now();
    }

    /// Runs a role-change hook in the background (`sh -c CMD` with action, role and cluster
    /// as arguments, as Patroni's callbacks); it is reaped, or killed after a minute.
    fn hook(&self, cmd: Option<String>, action: &str, role: &str) {
        let Some(cmd) = cmd else {
            return;
        };
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!("{cmd} \"$@\""))
            .arg("tdfs-hook")
            .args([action, role, &self.cli.cluster])
            .env("TDFS_ACTION", action)
            .env("TDFS_ROLE", role)
            .env("TDFS_CLUSTER", &self.cli.cluster)
            .env("TDFS_NODE", &self.name)
            .env("TDFS_MOUNTPOINT", &self.mountpoint)
            .stdin(Stdio::null());
        match c.spawn() {
            Ok(mut child) => {
                info!("{action} hook started: {cmd}");
                let action = action.to_string();
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        match child.try_wait() {
                            Ok(Some(st)) => {
                                if !st.success() {
                                    warn!("{action} hook exited with {st}");
                                }
                                return;
                            }
                            Ok(None) if Instant::now() < deadline => {
                                std::thread::sleep(Duration::from_millis(50))
                            }
                            _ => {
                                warn!("{action} hook still running after 60 s: killed");
                                let _ = child.kill();
                                let _ = child.wait();
                                return;
                            }
                        }
                    }
                });
            }
            Err(e) => error!("{action} hook: {e}"),
        }
    }

    fn update_snapshot(&mut self) {
        let leader = self.view.leader.as_ref().map(|(n, _)| n.clone());
        let leader_pos = self
            .view
            .alive
            .iter()
            .find(|a| Some(&a.name) == leader.as_ref())
            .map(|a| a.position);
        let mut names: Vec<String> = self.view.members.iter().map(|m| m.name.clone()).collect();
        for a in &self.view.alive {
            if !names.contains(&a.name) {
                names.push(a.name.clone());
            }
        }
        names.sort();
        let members: Vec<Value> = names
            .iter()
            .map(|n| {
                let m = self.view.members.iter().find(|m| &m.name == n);
                let a = self.view.alive.iter().find(|a| &a.name == n);
                let role = if leader.as_ref() == Some(n) {
                    "leader".to_string()
                } else {
                    a.map_or_else(|| "down".to_string(), |a| a.role.clone())
                };
                let lag = match (a, leader_pos) {
                    (Some(a), Some(l)) if a.position.epoch == l.epoch && role != "leader" => {
                        Some(l.applied.saturating_sub(a.position.applied))
                    }
                    _ => None,
                };
                json!({
                    "name": n,
                    "addr": m.map(|m| m.addr.clone()),
                    "alive": a.is_some(),
                    "role": role,
                    "epoch": a.map(|a| a.position.epoch),
                    "applied": a.map(|a| a.position.applied),
                    "consistent": a.map(|a| a.position.consistent),
                    "lag_ops": lag,
                })
            })
            .collect();
        let lease = if self.is_leader() {
            Some(self.lease_left())
        } else {
            self.leader_ttl
        };
        let note = if self.is_leader() && self.lease_left() <= 0.0 {
            Some("write lease expired: etcd unreachable, the master refuses writes (EROFS)")
        } else if leader.is_none() && self.etcd_ok {
            Some("no leader: an election is due")
        } else {
            None
        };
        let v = json!({
            "ok": true,
            "cluster": self.cli.cluster,
            "node": self.name,
            "role": self.role_name(),
            "leader": leader,
            "etcd_ok": self.etcd_ok && self.renewer.ok.load(Ordering::Acquire),
            "lease_secs": lease,
            "note": note,
            "mountpoint": self.mountpoint.display().to_string(),
            "position": self.position,
            "members": members,
            "elections": self.elections,
            "demotions": self.demotions,
        });
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }

    /// A clean exit: a leader stops its master and gives up the lease at once, so another
    /// node takes over without waiting for the TTL.
    fn shutdown(&mut self) {
        let old = std::mem::replace(
            &mut self.local,
            Local::Idle {
                retry_at: Instant::now(),
            },
        );
        match old {
            Local::Leader { mut child, .. } => {
                self.renewer.lead(None);
                info!("stopping the master");
                let st = stop_child(&mut child, Duration::from_secs(STEP_DOWN_DRAIN + 20));
                info!("master stopped ({st:?})");
                self.hook(self.cli.on_demote.clone(), "on_demote", "replica");
                self.resign();
            }
            Local::Replica { mut child } => {
                let st = stop_child(&mut child, DAEMON_TIMEOUT);
                info!("tdfs-slave stopped ({st:?})");
            }
            Local::Idle { .. } => {}
        }
        self.rt.block_on(self.etcd.revoke());
        info!("left the cluster");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tdfs_mounts_only() {
        let info = "45 27 0:40 / /tmp/a\\040b rw,nosuid - fuse tdfs:/srv/a rw,user_id=0\n\
                    46 27 0:41 / /mnt/x rw - fuse sshfs#h:/ rw\n\
                    47 27 0:42 / /mnt/y rw - fuse.tdfs tdfs:/srv/y rw\n";
        assert!(tdfs_mount_in(info, Path::new("/tmp/a b")));
        assert!(!tdfs_mount_in(info, Path::new("/mnt/x")));
        assert!(tdfs_mount_in(info, Path::new("/mnt/y")));
        assert!(!tdfs_mount_in(info, Path::new("/tmp/a")));
    }
}
