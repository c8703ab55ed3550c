//! The slave's operations surface: `tdfs-slave status` through the control socket, and the
//! Prometheus metrics.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use clap::Parser;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use serde_json::{json, Value};

use crate::listener::Shared;
use tdfs_protocol::msg::ack_flags;
use tdfs_replication::daemon::http::{self, Labels};
use tdfs_replication::daemon::{control, human_bytes};
use tdfs_replication::node::hex;

/// The answer to `{"cmd":"status"}`.
pub fn status(shared: &Shared, mirror: &str, listen: &str) -> Value {
    let st = &shared.stats;
    let (epoch, label, peer) = st.master();
    let rec = shared.node().record();
    let flags = st.flags.load(Ordering::Relaxed);
    let relay = shared.feeds().map(|f| {
        let rs = f.repl.status();
        json!({
            "head": rs.head,
            "paused": rs.paused,
            "queue_bytes": rs.queue_bytes,
            "journal_bytes": rs.journal_bytes,
            "slaves": f.slaves_json(&rs.slaves, rs.head),
        })
    });
    json!({
        "ok": true,
        "role": "replica",
        "mirror": mirror,
        "listen": listen,
        "connected": st.connected.load(Ordering::Relaxed),
        "epoch": rec.history.last().map(|e| e.number),
        "epoch_id": rec.history.last().map(|e| hex(&e.id)),
        "replica_set": rec.history.set_id().map(|s| hex(&s)),
        "seen_epoch": rec.seen.map(|e| e.number),
        "master_epoch": epoch.map(|e| e.number),
        "master_label": label,
        "master_addr": peer,
        "last_applied": st.applied.load(Ordering::Relaxed),
        "syncing": flags & ack_flags::SYNCING != 0,
        "stashing": flags & ack_flags::STASHING != 0,
        "last_stash": st.stash().map(|(d, n)| json!({"dir": d.display().to_string(), "paths": n})),
        "ops_applied": st.ops_applied.load(Ordering::Relaxed),
        "apply_rate": st.apply_rate.rate(),
        "bytes_received": st.bytes_received.load(Ordering::Relaxed),
        "sessions": st.sessions.load(Ordering::Relaxed),
        "apply_errors": st.apply_errors.load(Ordering::Relaxed),
        "last_error": st.last_error(),
        "fenced_masters": st.fenced_refusals.load(Ordering::Relaxed),
        "uptime_secs": st.started.elapsed().as_secs_f64(),
        "relay": relay,
    })
}

/// Serves the control socket: `status` only.
pub fn serve(
    rt: &tokio::runtime::Handle,
    sock: &mut control::ControlSocket,
    shared: Arc<Shared>,
    mirror: String,
    listen: String,
) {
    control::serve(rt, sock, move |req| {
        match (req["cmd"].as_str(), shared.feeds()) {
            (Some("status"), _) => status(&shared, &mirror, &listen),
            (Some("add"), Some(f)) => f.add(req["slave"].as_str().unwrap_or("")),
            (Some("remove"), Some(f)) => f.remove(req["slave"].as_str().unwrap_or("")),
            (other, _) => control::error(format!(
                "unknown command {other:?} (the slave knows: status, add, remove)"
            )),
        }
    });
}

/// Samples the apply rate once a second.
pub fn start_sampler(rt: &tokio::runtime::Handle, shared: Arc<Shared>) {
    rt.spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            let st = &shared.stats;
            st.apply_rate.sample(st.ops_applied.load(Ordering::Relaxed));
        }
    });
}

/// The slave's metrics, read at each scrape.
pub struct Metrics(pub Arc<Shared>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("slave metrics")
    }
}

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let st = &self.0.stats;
        let none = || -> Labels { Vec::new() };
        let c = |v: &std::sync::atomic::AtomicU64| vec![(none(), v.load(Ordering::Relaxed))];
        http::counters(
            &mut enc,
            "tdfs_slave_ops_applied",
            "Replicated ops applied to the mirror",
            &c(&st.ops_applied),
        )?;
        http::counters(
            &mut enc,
            "tdfs_slave_apply_errors",
            "Ops that failed to apply (the slave stops at such an op until the master resends it)",
            &c(&st.apply_errors),
        )?;
        http::counters(
            &mut enc,
            "tdfs_slave_sessions",
            "Master sessions (handshakes completed); more than one means reconnects",
            &c(&st.sessions),
        )?;
        http::counters(
            &mut enc,
            "tdfs_slave_received_bytes",
            "Bytes received from masters (after TLS, before decompression)",
            &c(&st.bytes_received),
        )?;
        http::gauges(
            &mut enc,
            "tdfs_slave_last_applied_seq",
            "Sequence number of the last op applied",
            &[(none(), st.applied.load(Ordering::Relaxed) as f64)],
        )?;
        let rec = self.0.node().record();
        let flags = st.flags.load(Ordering::Relaxed);
        http::gauges(
            &mut enc,
            "tdfs_slave_epoch",
            "Epoch of the master line this replica follows (0: none yet)",
            &[(none(), rec.history.last().map_or(0.0, |e| e.number as f64))],
        )?;
        http::gauges(
            &mut enc,
            "tdfs_slave_seen_epoch",
            "Newest epoch this replica has heard of; masters of older epochs are refused",
            &[(
                none(),
                rec.seen
                    .or(rec.history.last().copied())
                    .map_or(0.0, |e| e.number as f64),
            )],
        )?;
        http::gauges(
            &mut enc,
            "tdfs_slave_syncing",
            "1 while a sync into this replica is under way or was interrupted (not consistent)",
            &[(none(), (flags & ack_flags::SYNCING != 0) as u8 as f64)],
        )?;
        http::counters(
            &mut enc,
            "tdfs_slave_fenced_masters",
            "Handshakes refused because the master's epoch was older than one seen here",
            &c(&st.fenced_refusals),
        )?;
        http::gauges(
            &mut enc,
            "tdfs_slave_connected",
            "1 while a master session is up",
            &[(none(), st.connected.load(Ordering::Relaxed) as u8 as f64)],
        )?;
        http::gauges(
            &mut enc,
            "tdfs_slave_apply_rate",
            "Ops applied per second over the last few seconds",
            &[(none(), st.apply_rate.rate())],
        )?;
        http::histograms(
            &mut enc,
            "tdfs_slave_apply_duration_seconds",
            "Time to apply one round of ops (what arrived together), seconds",
            &[(none(), &st.apply_latency)],
        )?;
        if let Some(f) = self.0.feeds() {
            let st = f.repl.status();
            if !st.slaves.is_empty() {
                tdfs_replication::feeds::encode_metrics(
                    &mut enc,
                    "tdfs_relay_leaf",
                    &st,
                    &f.rates,
                )?;
            }
        }
        Ok(())
    }
}

/// `tdfs-slave leaf add|remove`: changes a running relay's own replicas; saved in its state
/// directory (STATE_DIR/slaves) and kept across restarts.
#[derive(Parser, Debug)]
#[command(name = "tdfs-slave leaf")]
pub struct LeafCli {
    /// add: a new replica of this node (it is synced from this node's tree, then streams);
    /// remove: its link ends.
    #[arg(value_parser = ["add", "remove"])]
    pub action: String,

    /// HOST[:PORT][,z=N][,fallback], as with -c.
    #[arg(value_name = "HOST[:PORT][,z=N][,fallback]")]
    pub leaf: String,

    #[command(flatten)]
    pub target: StatusCli,
}

/// Runs `tdfs-slave leaf ...` (args[0] is "leaf").
pub fn leaf_main(args: Vec<std::ffi::OsString>) -> std::process::ExitCode {
    let cli = LeafCli::parse_from(
        std::iter::once(std::ffi::OsString::from("tdfs-slave leaf"))
            .chain(args.into_iter().skip(1)),
    );
    let r = (|| {
        let dir = state_dir_of(&cli.target)?;
        let v = control::request(&dir, &json!({"cmd": cli.action, "slave": cli.leaf}))?;
        println!(
            "{} {}",
            if cli.action == "add" {
                "added"
            } else {
                "removed"
            },
            v["slave"].as_str().unwrap_or(&cli.leaf)
        );
        anyhow::Ok(())
    })();
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tdfs-slave leaf: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `tdfs-slave status`: asks a running slave through the control socket in its state
/// directory.
#[derive(Parser, Debug, Clone)]
#[command(name = "tdfs-slave status")]
pub struct StatusCli {
    /// The slave's state directory (where its control socket is).
    #[arg(long, value_name = "DIR", conflicts_with = "mirror")]
    pub state_dir: Option<PathBuf>,

    /// The slave's mirror directory, to find its default state directory.
    #[arg(short = 'm', long = "mirror", value_name = "DIR")]
    pub mirror: Option<PathBuf>,

    /// The slave's config file, to find its state directory.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print JSON (for scripts) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `tdfs-slave status` with `args` (args[0] is "status").
pub fn status_main(args: Vec<std::ffi::OsString>) -> std::process::ExitCode {
    // Help and errors say "tdfs-slave status", not "status".
    let cli = StatusCli::parse_from(
        std::iter::once(std::ffi::OsString::from("tdfs-slave status"))
            .chain(args.into_iter().skip(1)),
    );
    match status_cmd(&cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tdfs-slave status: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn state_dir_of(cli: &StatusCli) -> anyhow::Result<PathBuf> {
    if let Some(d) = &cli.state_dir {
        return Ok(d.clone());
    }
    let mut mirror = cli.mirror.clone();
    if let Some(c) = &cli.config {
        let f: crate::config::SlaveFile = crate::config::load(c)?;
        if let Some(d) = f.state_dir {
            return Ok(d);
        }
        mirror = mirror.or(f.mirror);
    }
    let Some(m) = mirror else {
        anyhow::bail!("give --state-dir DIR, -m MIRROR_DIR or --config FILE");
    };
    let root = m
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("mirror directory {}: {e}", m.display()))?;
    Ok(tdfs_replication::position::default_dir(&root))
}

fn status_cmd(cli: &StatusCli) -> anyhow::Result<()> {
    let dir = state_dir_of(cli)?;
    let v = control::request(&dir, &json!({"cmd": "status"}))?;
    let text = if cli.json {
        serde_json::to_string_pretty(&v)? + "\n"
    } else {
        format_status(&v)
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
    Ok(())
}

/// The table `tdfs-slave status` prints.
pub fn format_status(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    let mut out = String::new();
    let connected = v["connected"].as_bool().unwrap_or(false);
    out.push_str(&format!("mirror        {}\n", s("mirror")));
    out.push_str(&format!("listen        {}\n", s("listen")));
    let label = s("master_label");
    out.push_str(&format!(
        "role          replica, epoch {}{}\n",
        v["epoch"]
            .as_u64()
            .map_or_else(|| "none yet".to_string(), |e| e.to_string()),
        v["seen_epoch"]
            .as_u64()
            .map(|e| format!(" (has heard of epoch {e})"))
            .unwrap_or_default()
    ));
    out.push_str(&format!(
        "master        {} {}{}\n",
        if label.is_empty() { "-" } else { &label },
        v["master_epoch"]
            .as_u64()
            .map(|e| format!("epoch {e}"))
            .unwrap_or_default(),
        if connected {
            format!(" (connected from {})", s("master_addr"))
        } else {
            " (not connected)".into()
        }
    ));
    out.push_str(&format!(
        "last applied  {}{}\n",
        u("last_applied"),
        if v["stashing"].as_bool().unwrap_or(false) {
            " (a stashing sync is under way or was interrupted)"
        } else if v["syncing"].as_bool().unwrap_or(false) {
            " (a sync is under way or was interrupted)"
        } else {
            ""
        }
    ));
    if let Some(d) = v["last_stash"]["dir"].as_str() {
        out.push_str(&format!(
            "stash         {} path(s) in {d}\n",
            v["last_stash"]["paths"].as_u64().unwrap_or(0)
        ));
    }
    out.push_str(&format!(
        "applied       {} ops since start, {:.1} ops/s now\n",
        u("ops_applied"),
        v["apply_rate"].as_f64().unwrap_or(0.0)
    ));
    out.push_str(&format!(
        "received      {}\n",
        human_bytes(u("bytes_received") as f64)
    ));
    out.push_str(&format!("sessions      {}\n", u("sessions")));
    out.push_str(&format!(
        "errors        {}{}\n",
        u("apply_errors"),
        v["last_error"]
            .as_str()
            .map(|e| format!(" (last: {e})"))
            .unwrap_or_default()
    ));
    let relay = &v["relay"];
    if let Some(slaves) = relay["slaves"].as_array().filter(|s| !s.is_empty()) {
        out.push_str(&format!(
            "relaying     to {} replica(s), queue {}, journal {}{}\n",
            slaves.len(),
            human_bytes(relay["queue_bytes"].as_u64().unwrap_or(0) as f64),
            human_bytes(relay["journal_bytes"].as_u64().unwrap_or(0) as f64),
            if relay["paused"].as_bool() == Some(true) {
                " (held: this node is being synced)"
            } else {
                ""
            }
        ));
        out.push_str(&tdfs_replication::feeds::format_slaves(slaves));
    }
    out
}
