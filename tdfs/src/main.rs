//! tdfs: the master. Mounts a FUSE filesystem over a backing directory and streams every
//! change, in order, to tdfs-slave daemons.

mod backing;
mod config;
mod control;
mod failover;
mod fs;
mod inode;
mod metrics;
mod ops;

mod verify;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{CommandFactory, FromArgMatches};
use fuser::{Config, MountOption, SessionACL};
use tdfs_protocol::Compression;
use tracing::{error, info, warn};

use tdfs_replication::node::NodeState;
use tdfs_replication::repl::{Origin, Policy, ReplConfig, Replicator, SlaveConfig, SyncMode};

/// A mirroring FUSE filesystem: mounts MOUNTPOINT over DIR and replicates every change, in
/// order, to tdfs-slave daemons.
///
/// Other commands (each with --help): `tdfs status` (replication status of a running
/// master), `tdfs slave add|remove HOST[:PORT]` (change its slaves without remounting),
/// `tdfs verify` (prove replicas identical), `tdfs promote` (make a replica the master of a
/// new epoch), `tdfs fence` (stop a master's writes), `tdfs node` (automatic failover: run
/// one node of a cluster whose master is chosen through etcd), `tdfs completions SHELL`,
/// `tdfs manpage [DIR]`.
#[derive(clap::Parser, Debug)]
#[command(name = "tdfs", version, about, long_about)]
struct Cli {
    /// Backing directory that holds the data. Reads are served from it; every change made
    /// through the mount is applied to it and replicated.
    #[arg(short = 'm', value_name = "DIR", required_unless_present = "config")]
    dir: Option<PathBuf>,

    /// TOML file with any of the flags by long name (dir, mountpoint, slaves = ["h:p,z=1"],
    /// compression, no_nodelay, state_dir, passthrough, cache_timeout, threads, queue_size,
    /// journal_size, sync,
    /// fsync_local, sync_timeout, min_replicas, drain_timeout, secret_file, tls_cert,
    /// tls_key, tls_ca, metrics, log_level). Flags on the command line win; unknown keys
    /// are an error. SIGHUP re-reads it (slaves, log_level and secret_file apply at once)
    /// and the secret files.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (port 0 picks one; the address
    /// is logged as "metrics at http://...").
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<String>,

    /// A slave, as HOST[:PORT] (default port 4731). Repeat for several slaves. Append ",z=1"
    /// (or ",z=0") to set compression for that slave only. Slaves may be down: the master
    /// connects (and reconnects) in the background.
    #[arg(short = 'c', value_name = "HOST[:PORT][,z=N]")]
    slaves: Vec<String>,

    /// Compression for every slave without its own ",z=": 0 = none, 1 = LZF (as TDFS r3),
    /// 2 = LZ4 (faster, similar ratio). Incompressible data is detected and sent raw.
    #[arg(short = 'z', default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    compression: u8,

    /// Disable TCP_NODELAY (Nagle's algorithm on): fewer packets, more latency.
    #[arg(short = 'n')]
    no_nodelay: bool,

    /// Where the master keeps its identity and sequence numbers (outside the mirrored tree).
    /// Default: /var/lib/tdfs/<name derived from DIR>.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Serve reads through the daemon instead of the kernel's FUSE passthrough. By default
    /// (where the kernel offers passthrough) read-only opens read the backing file directly,
    /// at native speed; writes always go through the daemon to be replicated.
    #[arg(long)]
    no_passthrough: bool,

    /// Passthrough is the default; kept so older command lines still parse.
    #[arg(long, hide = true, conflicts_with = "no_passthrough")]
    passthrough: bool,

    /// How long the kernel may cache names, negative lookups and attributes, in seconds
    /// (fractions allowed; 0 caches nothing). Every change goes through the mount, so
    /// nothing the kernel caches goes stale: only change the backing directory behind the
    /// mount's back (never supported) with a short one.
    #[arg(long, default_value_t = 86400.0, value_name = "SECONDS")]
    cache_timeout: f64,

    /// FUSE worker threads.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,

    /// Memory for ops not yet acknowledged by every slave, in MiB. What a slave further behind
    /// still needs spills to the journal (--journal-size) instead of growing the master's
    /// memory; a background thread writes it, so writers never wait for that disk unless it
    /// falls behind by an eighth of this (at least 8 MiB). The default covers the lag a local
    /// slave builds during a 1 GiB burst (up to ~90 MiB measured) and keeps the master's peak
    /// memory under 256 MiB with a frozen slave (152-204 MiB measured; 224-285 at 128).
    #[arg(long, default_value_t = 96, value_name = "MIB")]
    queue_size: usize,

    /// Disk for ops a lagging or absent slave still needs, in MiB (in the state directory).
    /// A slave further behind is brought back by an incremental sync instead.
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    journal_size: u64,

    /// When a mutation returns: async (applied locally), received (every in-sync slave has
    /// received it) or applied (every in-sync slave has applied it).
    #[arg(long = "sync", value_enum, default_value_t = SyncMode::Async)]
    sync_mode: SyncMode,

    /// fsync/fdatasync return once durable locally, without waiting for the slaves to make
    /// the data durable too (TDFS r3 behaviour).
    #[arg(long)]
    fsync_local: bool,

    /// How long a writer waits for a slave, in seconds (fractions allowed), before that
    /// slave drops out of sync and writers stop waiting for it. Also how long mutations wait
    /// for --min-replicas.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    sync_timeout: f64,

    /// Fail mutations (and fsync) with EIO when fewer than N slaves are in sync after
    /// --sync-timeout.
    #[arg(long, default_value_t = 0, value_name = "N")]
    min_replicas: usize,

    /// How long to wait at shutdown for connected slaves to acknowledge every op, in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    drain_timeout: u64,

    /// Before mounting, ask the slaves (for up to this many seconds) whether any has seen a
    /// newer epoch: if one has, another node was promoted while this one was down, and this
    /// one refuses to start (exit 3) instead of taking writes it would have to give up.
    /// Slaves that do not answer in time are not waited for. 0: do not ask.
    #[arg(long, default_value_t = 3.0, value_name = "SECONDS")]
    fence_check: f64,

    /// Writes are refused from this CLOCK_MONOTONIC instant on (nanoseconds) until the
    /// control command `lease` moves it: set by `tdfs node`, which holds the cluster's leader
    /// lease in etcd and renews this one only while it can renew that one.
    #[arg(long, hide = true, value_name = "NS")]
    lease_until: Option<u64>,

    #[command(flatten)]
    auth: tdfs_replication::outbound::SlaveAuthArgs,

    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short = 'v', action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,

    /// Log only warnings and errors. RUST_LOG overrides.
    #[arg(short = 'q')]
    quiet: bool,

    /// Where to mount the filesystem (an existing directory).
    #[arg(value_name = "MOUNTPOINT", required_unless_present = "config")]
    mountpoint: Option<PathBuf>,
}

/// What `main` learned before `run`: the config file and where settings came from.
struct Startup {
    file: Option<config::MasterFile>,
    slaves_from_flags: bool,
    level_from_flags: bool,
    secrets_from_flags: bool,
    logging: tdfs_replication::daemon::logging::Logging,
}

/// Applies the config file to every flag not given on the command line.
fn merge(cli: &mut Cli, m: &clap::ArgMatches, f: &config::MasterFile) -> anyhow::Result<()> {
    f.check()?;
    let g = |id: &str| config::given(m, id);
    macro_rules! take {
        ($field:ident, $key:ident) => {
            if !g(stringify!($field)) {
                if let Some(v) = f.$key.clone() {
                    cli.$field = v;
                }
            }
        };
        (opt $field:ident, $key:ident) => {
            if !g(stringify!($field)) && f.$key.is_some() {
                cli.$field = f.$key.clone();
            }
        };
    }
    take!(opt dir, dir);
    take!(opt mountpoint, mountpoint);
    take!(slaves, slaves);
    take!(compression, compression);
    take!(no_nodelay, no_nodelay);
    take!(opt state_dir, state_dir);
    if !g("no_passthrough") && !g("passthrough") {
        if let Some(p) = f.passthrough {
            cli.no_passthrough = !p;
        }
    }
    take!(cache_timeout, cache_timeout);
    take!(threads, threads);
    take!(queue_size, queue_size);
    take!(journal_size, journal_size);
    take!(fsync_local, fsync_local);
    take!(sync_timeout, sync_timeout);
    take!(min_replicas, min_replicas);
    take!(drain_timeout, drain_timeout);
    if let (false, Some(v)) = (g("secret_file"), &f.secret_file) {
        cli.auth.secret_file = v.clone().into_vec();
    }
    if let (false, Some(v)) = (g("encrypt"), f.encrypt) {
        cli.auth.encrypt = v;
    }
    take!(opt metrics, metrics);
    if !g("sync_mode") {
        if let Some(s) = &f.sync {
            cli.sync_mode = config::sync_mode(s)?;
        }
    }
    if !g("tls_cert") && !g("tls_key") && !g("tls_ca") {
        cli.auth.tls_cert = f.tls_cert.clone().or(cli.auth.tls_cert.take());
        cli.auth.tls_key = f.tls_key.clone().or(cli.auth.tls_key.take());
        cli.auth.tls_ca = f.tls_ca.clone().or(cli.auth.tls_ca.take());
        if [&cli.auth.tls_cert, &cli.auth.tls_key, &cli.auth.tls_ca]
            .iter()
            .any(|x| x.is_some())
            && [&cli.auth.tls_cert, &cli.auth.tls_key, &cli.auth.tls_ca]
                .iter()
                .any(|x| x.is_none())
        {
            bail!("TLS needs all of tls_cert, tls_key and tls_ca");
        }
    }
    if cli.dir.is_none() {
        bail!("no backing directory: give -m DIR or `dir = \"DIR\"` in the config file");
    }
    if cli.mountpoint.is_none() {
        bail!("no mountpoint: give MOUNTPOINT or `mountpoint = \"DIR\"` in the config file");
    }
    Ok(())
}

fn parse_slave(spec: &str, default_z: Compression, nodelay: bool) -> anyhow::Result<SlaveConfig> {
    SlaveConfig::parse(spec, default_z, nodelay)
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into())
}

fn run(mut cli: Cli, startup: Startup) -> anyhow::Result<bool> {
    let cli_dir = cli.dir.clone().expect("checked by clap or merge");
    let dir = cli_dir
        .canonicalize()
        .with_context(|| format!("backing directory {}", cli_dir.display()))?;
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let cli_mnt = cli.mountpoint.clone().expect("checked by clap or merge");
    let mountpoint = cli_mnt
        .canonicalize()
        .with_context(|| format!("mountpoint {}", cli_mnt.display()))?;
    let state_dir = tdfs_replication::node::prepare_dir(&dir, cli.state_dir.clone())?;
    // Before anything starts: a second daemon (master or slave) on this state dir stops here.
    let node = NodeState::open(&state_dir)
        .with_context(|| format!("state directory {}", state_dir.display()))?;
    let mut control_sock = tdfs_replication::daemon::control::bind(&state_dir)?;
    // The slave set: the persisted one (tdfs slave add/remove) wins over -c and the file.
    match config::load_persisted(&state_dir)? {
        Some(persisted) => {
            info!(
                "slaves from {} (written by tdfs slave add/remove; -c and the config file's \
                 slaves are ignored while it exists): {}",
                config::slaves_file(&state_dir).display(),
                if persisted.is_empty() {
                    "none".to_string()
                } else {
                    persisted.join(", ")
                }
            );
            cli.slaves = persisted;
        }
        None => info!(
            "slaves from {}: {}",
            if startup.slaves_from_flags {
                "-c"
            } else {
                "the config file"
            },
            if cli.slaves.is_empty() {
                "none".to_string()
            } else {
                cli.slaves.join(", ")
            }
        ),
    }
    let default_z = Compression::from_level(cli.compression).context("compression: 0, 1 or 2")?;
    if cli.min_replicas > cli.slaves.len() {
        bail!(
            "--min-replicas {} but only {} slave(s) given with -c",
            cli.min_replicas,
            cli.slaves.len()
        );
    }
    let slaves = cli
        .slaves
        .iter()
        .map(|s| parse_slave(s, default_z, !cli.no_nodelay))
        .collect::<anyhow::Result<Vec<_>>>()?;

    cli.auth.init()?;

    // Modes must reach the backing tree exactly as the caller asked (the kernel already
    // applied the caller's umask).
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0) };

    // This node must be the master of its current epoch (a new node starts a replica set;
    // a replica must be promoted first; a replaced master must rejoin as a replica).
    let (was, next_seq) = node.begin_master().map_err(|e| {
        anyhow::anyhow!(
            "cannot run as master with state directory {}: {e}",
            state_dir.display()
        )
    })?;
    let history = node.record().history;
    let backing =
        backing::Backing::new(&dir).with_context(|| format!("opening {}", dir.display()))?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tdfs-net")
        .enable_all()
        .build()?;
    let metrics_listener = cli
        .metrics
        .as_deref()
        .map(tdfs_replication::daemon::http::bind)
        .transpose()?;
    let label = format!("{}:{}", hostname(), dir.display());
    // Before the mount: a replica that has seen a newer epoch means this master was
    // replaced while it was down, and must not take a single write.
    if cli.fence_check > 0.0 {
        rt.block_on(fence_check(
            &node,
            &slaves,
            &history,
            &label,
            Duration::from_secs_f64(cli.fence_check.min(3600.0)),
        ))?;
    }
    let epoch = *history.last().expect("a master has an epoch");
    let journal_valid =
        was.role == tdfs_replication::node::Role::Master && was.master_epoch == Some(epoch.number);
    let repl = Replicator::start(
        rt.handle(),
        slaves,
        Origin {
            node: node.clone(),
            history,
            next_seq,
            unclean: !was.clean && journal_valid,
            journal_valid,
        },
        ReplConfig {
            label: label.clone(),
            mem_cap: cli.queue_size.max(1) << 20,
            journal_bytes: cli.journal_size.max(1) << 20,
            tree: std::sync::Arc::new(backing::BackingTree::new(backing.dup_root()?)),
            checksum_sync: false,
            policy: Policy {
                mode: cli.sync_mode,
                fsync_local: cli.fsync_local,
                timeout: Duration::from_secs_f64(cli.sync_timeout.clamp(0.001, 86400.0)),
                min_replicas: cli.min_replicas,
            },
            relay: false,
            on_fenced: None,
            paused: false,
        },
    )
    .with_context(|| format!("opening the journal in {}", state_dir.display()))?;
    if let Some(until) = cli.lease_until {
        // Before the mount: not one write without the supervisor's lease.
        repl.set_lease(until);
    }
    info!(
        epoch = %epoch,
        next_seq,
        dir = %dir.display(),
        "master starting"
    );
    let feeds = tdfs_replication::feeds::Feeds::new(
        repl.clone(),
        state_dir.clone(),
        default_z,
        !cli.no_nodelay,
    );
    let rates = feeds.rates.clone();
    control::Control {
        repl: repl.clone(),
        state_dir: state_dir.clone(),
        feeds,
        label,
    }
    .start(rt.handle(), &mut control_sock);
    info!(socket = %control_sock.path.display(), "control socket ready (tdfs status, tdfs slave add/remove)");
    if let Some(ml) = metrics_listener {
        let maddr = ml.local_addr()?;
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(metrics::MasterMetrics {
            repl: repl.clone(),
            rates,
        }));
        let reg = std::sync::Arc::new(reg);
        tdfs_replication::daemon::http::serve(
            rt.handle(),
            ml,
            std::sync::Arc::new(move || tdfs_replication::daemon::http::render(&reg)),
        );
        info!("metrics at http://{maddr}/metrics");
    }
    let mut reloader = config::Reloader {
        path: cli.config.clone(),
        slaves_from_flags: startup.slaves_from_flags,
        level_from_flags: startup.level_from_flags,
        secrets_from_flags: startup.secrets_from_flags,
        default_z,
        nodelay: !cli.no_nodelay,
        state_dir: state_dir.clone(),
        logging: startup.logging,
        repl: repl.clone(),
        last: startup.file,
    };

    // Save the sequence number before it gets near the gap a crash skips, so a crash never
    // reuses one. Not more often: each save is three fsyncs, and on a busy disk an fsync also
    // dispatches the block queue's other writeback, all charged to this process.
    {
        let repl = repl.clone();
        let node = node.clone();
        rt.spawn(async move {
            let mut last = next_seq;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let next = repl.next_seq();
                if next.saturating_sub(last) >= tdfs_replication::repl::SAVE_EVERY {
                    // Three fsyncs: on a blocking thread, so the links that share this
                    // runtime are never held behind the disk.
                    let node = node.clone();
                    let saved = tokio::task::spawn_blocking(move || node.save_master(next, false))
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                    if let Err(e) = saved {
                        error!("saving master state: {e}");
                    }
                    last = next;
                }
            }
        });
    }

    // SIGTERM/SIGINT: detach the mount; the session then ends and we drain. SIGHUP: reload.
    // The handlers are installed here, not inside the task: a signal sent right after
    // "mounted" must find them in place, or its default action kills us mid-session.
    let stop = Arc::new(Unmounter::new(&mountpoint)?);
    {
        use tokio::signal::unix::{signal, SignalKind};
        let _rt = rt.enter();
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let stop = stop.clone();
        rt.spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => { info!("SIGTERM: unmounting"); break }
                    _ = int.recv() => { info!("SIGINT: unmounting"); break }
                    _ = hup.recv() => {
                        reloader = tokio::task::spawn_blocking(move || {
                            reloader.reload();
                            reloader
                        })
                        .await
                        .expect("reload task");
                    }
                }
            }
            tdfs_replication::daemon::notify("stopping");
            stop.request();
        });
    }

    anyhow::ensure!(
        cli.cache_timeout.is_finite() && (0.0..=1e9).contains(&cli.cache_timeout),
        "--cache-timeout {}: expected seconds between 0 and 1e9",
        cli.cache_timeout
    );
    let notifier = Arc::new(std::sync::OnceLock::new());
    let fs = fs::TdfsFs::new(
        ops::Ops::new(backing, repl.clone()),
        1 << 20,
        !cli.no_passthrough,
        fs::Cache {
            ttl: Duration::from_secs_f64(cli.cache_timeout),
            notifier: notifier.clone(),
        },
    );
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("tdfs:{}", dir.display())),
        MountOption::Subtype("tdfs".into()),
        MountOption::DefaultPermissions,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(cli.threads as usize);
    config.clone_fd = true;
    let session = fuser::Session::new(fs, &mountpoint, &config)
        .with_context(|| format!("mounting {}", mountpoint.display()))?;
    // Before the first request: the INIT handshake is over, nothing else has been read.
    let _ = notifier.set(session.notifier());
    info!(mountpoint = %mountpoint.display(), "mounted");
    stop.mounted();
    tdfs_replication::daemon::notify("ready");
    let result = session.run();
    info!("unmounted; waiting for slaves to acknowledge every op");
    if let Err(e) = result {
        error!("FUSE session ended with an error: {e}");
    }

    let failed = repl.drain(Duration::from_secs(cli.drain_timeout));
    node.save_master(repl.next_seq(), true)?;
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(control_sock);
    if failed.is_empty() {
        info!(last_seq = repl.last_seq(), "clean exit");
        Ok(true)
    } else {
        error!(
            "exiting with ops not acknowledged by: {}",
            failed.join(", ")
        );
        Ok(false)
    }
}

/// Asks every slave where it stands; fails (with the rejoin instructions) when one has seen
/// an epoch newer than this master's.
async fn fence_check(
    node: &NodeState,
    slaves: &[SlaveConfig],
    history: &tdfs_protocol::History,
    label: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for cfg in slaves {
        let cfg = cfg.clone();
        let label = format!("master {label} (starting: epoch check)");
        let history = history.clone();
        tasks.push(tokio::spawn(async move {
            let r = tdfs_replication::repl::Inspector::connect_as(&cfg, &label, &history, timeout)
                .await;
            (cfg.addr, r.map(|i| i.hello))
        }));
    }
    for t in tasks {
        let Ok((addr, r)) = t.await else { continue };
        let ack = match r {
            Ok(a) => a,
            Err(e) => {
                info!(slave = %addr, "epoch check: no answer ({e:#}); not waiting for it");
                continue;
            }
        };
        let mine = history.last().expect("a master has an epoch");
        let beyond = ack.flags & tdfs_protocol::msg::ack_flags::BEYOND_KNOWN != 0;
        match tdfs_protocol::history::standing(
            history,
            &ack.history,
            ack.seen.as_ref(),
            ack.applied,
            beyond,
        ) {
            tdfs_protocol::Standing::Fenced { newer } => {
                let _ = node.heard_of(&newer);
                error!(
                    slave = %addr,
                    "{addr} has seen {newer}, newer than this node's {mine}: another node was \
                     promoted master while this one was down"
                );
                return Err(Fenced(format!(
                    "this master was replaced ({addr} follows {newer}); it takes no writes. \
                     Rejoin it as a replica of the new master: tdfs-slave -m DIR --state-dir {} \
                     ... (whatever only it holds is stashed, not lost)",
                    node.dir.display()
                ))
                .into());
            }
            tdfs_protocol::Standing::Foreign { set } => warn!(
                slave = %addr,
                "{addr} belongs to another replica set ({}): it will refuse this master",
                tdfs_replication::node::hex(&set)
            ),
            _ => {}
        }
    }
    Ok(())
}

/// The error that makes `tdfs` exit 3: this node was replaced (systemd's
/// `RestartPreventExitStatus=3` keeps it from being restarted in a loop).
#[derive(Debug)]
struct Fenced(String);

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fenced {}

/// `tdfs completions SHELL` and `tdfs manpage [DIR]`, generated from the command lines.
fn generate(args: &[String]) -> ExitCode {
    let cmd = || {
        Cli::command()
            .subcommand(
                control::StatusCli::command()
                    .name("status")
                    .about("Show a running master's replication status"),
            )
            .subcommand(
                control::SlaveCli::command()
                    .name("slave")
                    .about("Add or remove a running master's slaves"),
            )
            .subcommand(
                clap::Command::new("verify")
                    .about("Prove replicas identical (see tdfs verify --help)"),
            )
            .subcommand(
                failover::PromoteCli::command()
                    .name("promote")
                    .about("Make a replica the master of a new epoch (failover)"),
            )
            .subcommand(
                tdfs_cluster::NodeCli::command()
                    .name("node")
                    .about("Run this node of a cluster whose master is chosen through etcd"),
            )
            .subcommand(
                failover::FenceCli::command()
                    .name("fence")
                    .about("Stop a running master's writes (switchover)"),
            )
    };
    if args[1] == "manpage" {
        // One page per command into DIR, or the main page on stdout.
        let Some(dir) = args.get(2) else {
            return match clap_mangen::Man::new(cmd()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            };
        };
        let r = (|| -> std::io::Result<()> {
            let main = cmd();
            let mut pages = vec![("tdfs".to_string(), main.clone())];
            for sub in main.get_subcommands() {
                let name = format!("tdfs-{}", sub.get_name());
                // A one-shot command: leaking the page name is fine.
                let leaked: &'static str = Box::leak(name.clone().into_boxed_str());
                pages.push((name, sub.clone().name(leaked)));
            }
            for (name, c) in pages {
                let mut f = std::fs::File::create(Path::new(dir).join(format!("{name}.1")))?;
                clap_mangen::Man::new(c).render(&mut f)?;
            }
            Ok(())
        })();
        return match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tdfs manpage: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(shell) = args
        .get(2)
        .and_then(|s| s.parse::<clap_complete::Shell>().ok())
    else {
        eprintln!("usage: tdfs completions bash|zsh|fish|elvish|powershell");
        return ExitCode::from(2);
    };
    clap_complete::generate(shell, &mut cmd(), "tdfs", &mut std::io::stdout());
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("verify") {
        // The daemons' logging (stderr, info unless RUST_LOG says otherwise).
        let _ = tdfs_replication::daemon::logging::init("info");
        return verify::main(args[1..].to_vec());
    }
    match args.get(1).map(String::as_str) {
        Some("status") => return control::status_main(args[1..].to_vec()),
        Some("promote") => return failover::promote_main(args[1..].to_vec()),
        Some("fence") => return failover::fence_main(args[1..].to_vec()),
        Some("slave") => return control::slave_main(args[1..].to_vec()),
        Some("node") => return tdfs_cluster::node_main(args[1..].to_vec()),
        Some("completions" | "manpage") => return generate(&args),
        _ => {}
    }
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let file = match cli
        .config
        .as_deref()
        .map(config::load::<config::MasterFile>)
        .transpose()
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tdfs: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Some(f) = &file {
        if let Err(e) = merge(&mut cli, &matches, f) {
            eprintln!("tdfs: {e:#}");
            return ExitCode::from(2);
        }
    }
    let flag_level = tdfs_replication::daemon::logging::flag_level(cli.verbose, cli.quiet);
    let level = flag_level
        .map(String::from)
        .or_else(|| file.as_ref().and_then(|f| f.log_level.clone()))
        .unwrap_or_else(|| "info".into());
    let startup = Startup {
        slaves_from_flags: config::given(&matches, "slaves"),
        level_from_flags: flag_level.is_some(),
        secrets_from_flags: config::given(&matches, "secret_file"),
        logging: tdfs_replication::daemon::logging::init(&level),
        file,
    };
    if let Some(c) = &cli.config {
        info!("settings from {} (command-line flags win)", c.display());
    }
    match run(cli, startup) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            error!("{e:#}");
            if e.downcast_ref::<Fenced>().is_some() || e.to_string().contains("fenced") {
                ExitCode::from(3)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Unmounts on a stop signal, whenever it comes. A signal caught before the mount exists
/// must not be lost (the daemon would then run on, deaf to it) and must not unmount
/// whatever else sits on the mountpoint: it is remembered and carried out once we mount.
struct Unmounter {
    detach: Box<dyn Fn() + Send + Sync>,
    /// Under one lock, so that whichever of the two comes second detaches, exactly once.
    state: std::sync::Mutex<StopState>,
}

#[derive(Default)]
struct StopState {
    mounted: bool,
    requested: bool,
}

impl Unmounter {
    fn new(mountpoint: &Path) -> anyhow::Result<Self> {
        let mp = CString::new(mountpoint.as_os_str().as_bytes())?;
        // Not fuser's SessionUnmounter: as root it uses a plain umount(2), which fails with
        // EBUSY while any file on the mount is open.
        Ok(Self::with(move || {
            // SAFETY: mp is a valid C string; MNT_DETACH makes the unmount succeed even
            // while files are open, after which the FUSE session ends.
            if unsafe { libc::umount2(mp.as_ptr(), libc::MNT_DETACH) } != 0 {
                error!("unmount failed: {}", std::io::Error::last_os_error());
            }
        }))
    }

    fn with(detach: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            detach: Box::new(detach),
            state: Default::default(),
        }
    }

    /// A stop signal arrived.
    fn request(&self) {
        self.set(|st| st.requested = true);
    }

    /// Our mount now exists.
    fn mounted(&self) {
        self.set(|st| st.mounted = true);
    }

    fn set(&self, mark: impl FnOnce(&mut StopState)) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let done = st.mounted && st.requested;
        mark(&mut st);
        if !done && st.mounted && st.requested {
            (self.detach)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn slave_specs() {
        let s = parse_slave("host", Compression::None, true).unwrap();
        assert_eq!(s.addr, "host:4731");
        let s = parse_slave("10.0.0.1:99,z=1", Compression::None, true).unwrap();
        assert_eq!(s.addr, "10.0.0.1:99");
        assert_eq!(s.compression, Compression::Lzf);
        assert_eq!(
            parse_slave("::1", Compression::None, true).unwrap().addr,
            "[::1]:4731"
        );
        assert_eq!(
            parse_slave("[::1]:5", Compression::None, true)
                .unwrap()
                .addr,
            "[::1]:5"
        );
        assert!(parse_slave("h:notaport", Compression::None, true).is_err());
        assert!(parse_slave("h,z=7", Compression::None, true).is_err());
        assert!(parse_slave("h,q=1", Compression::None, true).is_err());
    }

    fn counted() -> (Unmounter, Arc<AtomicU32>) {
        let n = Arc::new(AtomicU32::new(0));
        let m = n.clone();
        let u = Unmounter::with(move || {
            m.fetch_add(1, Ordering::SeqCst);
        });
        (u, n)
    }

    #[test]
    fn stop_before_mount_is_carried_out_at_mount() {
        let (u, n) = counted();
        u.request();
        assert_eq!(
            n.load(Ordering::SeqCst),
            0,
            "nothing of ours to unmount yet"
        );
        u.mounted();
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn stop_after_mount_unmounts_once() {
        let (u, n) = counted();
        u.mounted();
        assert_eq!(n.load(Ordering::SeqCst), 0);
        u.request();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        u.request();
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "a second stop detaches nothing more"
        );
    }
}
