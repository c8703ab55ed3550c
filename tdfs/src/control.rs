//! The master's control socket (`STATE_DIR/control.sock`): `tdfs status` and
//! `tdfs slave add/remove` talk to a running master through it.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use tdfs_replication::daemon::control::{self, ControlSocket};
use tdfs_replication::daemon::human_bytes;
use tdfs_replication::feeds::{format_slaves, Feeds};
use tracing::info;

use tdfs_replication::repl::Replicator;

/// What the control handler needs.
pub struct Control {
    pub repl: Replicator,
    pub state_dir: PathBuf,
    /// The slaves: status rows, add and remove (shared with relays).
    pub feeds: Arc<Feeds>,
    pub label: String,
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl Control {
    /// Starts the rate sampler and answers requests on `sock`.
    pub fn start(self, rt: &tokio::runtime::Handle, sock: &mut ControlSocket) {
        let me = Arc::new(self);
        me.feeds.start_sampler(rt);
        control::serve(rt, sock, move |req| me.handle(&req));
    }

    fn handle(&self, req: &Value) -> Value {
        match req["cmd"].as_str() {
            Some("status") => self.status(),
            Some("add") => self.feeds.add(req["slave"].as_str().unwrap_or("")),
            Some("remove") => self.feeds.remove(req["slave"].as_str().unwrap_or("")),
            Some("fence") => self.fence(req["drain_secs"].as_f64()),
            Some("lease") => match req["until_ns"].as_u64() {
                Some(until) => {
                    self.repl.set_lease(until);
                    json!({"ok": true})
                }
                None => control::error("lease needs until_ns (CLOCK_MONOTONIC nanoseconds)"),
            },
            other => control::error(format!(
                "unknown command {other:?} (the master knows: status, add, remove, fence, lease)"
            )),
        }
    }

    pub fn status(&self) -> Value {
        let st = self.repl.status();
        let slaves = self.feeds.slaves_json(&st.slaves, st.head);
        json!({
            "ok": true,
            "role": "master",
            "label": self.label,
            "epoch": st.history.last().map(|e| e.number),
            "epoch_id": st.history.last().map(|e| hex(&e.id)),
            "epoch_start": st.history.last().map(|e| e.start),
            "replica_set": st.history.set_id().map(|s| hex(&s)),
            "fenced": st.fence.as_ref().map(|f| json!({
                "by": f.by,
                "epoch": f.newer.number,
                "epoch_id": hex(&f.newer.id),
            })),
            "lease_secs": st.lease_left,
            "head": st.head,
            "last_seq": st.head.saturating_sub(1),
            "queue_bytes": st.queue_bytes,
            "journal_bytes": st.journal_bytes,
            "state_dir": self.state_dir.display().to_string(),
            "slaves": slaves,
        })
    }

    /// `tdfs fence`: stops writes now (they fail with EROFS); with `drain_secs`, then waits
    /// up to that long until every connected slave has applied and made durable every op,
    /// and says where each one stands (a planned switchover promotes one that has all).
    fn fence(&self, drain_secs: Option<f64>) -> Value {
        self.repl.stop_writes();
        info!("tdfs fence: writes stopped (EROFS from now on)");
        let last = self.repl.last_seq();
        let drained = drain_secs.map(|secs| {
            self.repl
                .wait_durable(last, Duration::from_secs_f64(secs.clamp(0.0, 86400.0)))
        });
        json!({
            "ok": true,
            "last_seq": last,
            "drained": drained,
            "status": self.status(),
        })
    }
}

/// How the client commands find a running master's state directory.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// The master's state directory (where its control socket is).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// The master's backing directory, to find its default state directory
    /// (/var/lib/tdfs/<name derived from DIR>).
    #[arg(short = 'm', value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// The master's config file, to find its state directory (state_dir or dir in it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl Target {
    pub fn state_dir(&self) -> anyhow::Result<PathBuf> {
        if let Some(d) = &self.state_dir {
            return Ok(d.clone());
        }
        let mut dir = self.dir.clone();
        if let Some(c) = &self.config {
            let f: crate::config::MasterFile = crate::config::load(c)?;
            if let Some(d) = f.state_dir {
                return Ok(d);
            }
            dir = dir.or(f.dir);
        }
        let Some(dir) = dir else {
            anyhow::bail!("which master? give --state-dir DIR, -m BACKING_DIR or --config FILE");
        };
        let dir = dir
            .canonicalize()
            .map_err(|e| anyhow::anyhow!("backing directory {}: {e}", dir.display()))?;
        Ok(tdfs_replication::node::default_dir(&dir))
    }
}

/// Show a running master's replication status: one row per slave.
///
/// STATE is streaming (in sync), catching up (connected, behind), syncing (initial or
/// incremental sync), disconnected, or error (the slave failed to apply an op). LAG is what
/// the slave has not applied yet; RATE is ops applied and bytes sent per second over the
/// last few seconds; RATIO is bytes before compression / bytes sent.
#[derive(Parser, Debug)]
#[command(name = "tdfs status")]
pub struct StatusCli {
    #[command(flatten)]
    pub target: Target,

    /// Print JSON (for scripts) instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Refresh every --interval seconds until Ctrl-C (or --count refreshes).
    #[arg(long)]
    pub watch: bool,

    /// Seconds between refreshes with --watch.
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    pub interval: f64,

    /// Stop after this many refreshes with --watch (default: until Ctrl-C).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

/// Change a running master's slaves without remounting; the change is saved in its state
/// directory (STATE_DIR/slaves) and kept across restarts.
#[derive(Parser, Debug)]
#[command(name = "tdfs slave")]
pub struct SlaveCli {
    #[command(subcommand)]
    pub cmd: SlaveCmd,
}

#[derive(Subcommand, Debug)]
pub enum SlaveCmd {
    /// Add a slave: it gets an initial sync, then streams.
    Add {
        /// HOST[:PORT][,z=N] (default port 4731; z as with -c).
        #[arg(value_name = "HOST[:PORT][,z=N]")]
        slave: String,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a slave: its link ends and writers no longer wait for it.
    Remove {
        /// HOST[:PORT] as it was added (default port 4731).
        #[arg(value_name = "HOST[:PORT]")]
        slave: String,
        #[command(flatten)]
        target: Target,
    },
}

fn exit(r: anyhow::Result<()>, what: &str) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{what}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `tdfs slave add|remove ...` (args[0] is "slave").
pub fn slave_main(args: Vec<String>) -> ExitCode {
    // Help and errors say "tdfs slave", not "slave".
    let cli = SlaveCli::parse_from(
        std::iter::once("tdfs slave".to_string()).chain(args.into_iter().skip(1)),
    );
    let r = (|| {
        let (cmd, spec, target) = match &cli.cmd {
            SlaveCmd::Add { slave, target } => ("add", slave, target),
            SlaveCmd::Remove { slave, target } => ("remove", slave, target),
        };
        let v = control::request(&target.state_dir()?, &json!({"cmd": cmd, "slave": spec}))?;
        println!(
            "{} {}",
            if cmd == "add" { "added" } else { "removed" },
            v["slave"].as_str().unwrap_or(spec)
        );
        Ok(())
    })();
    exit(r, "tdfs slave")
}

/// `tdfs status ...` (args[0] is "status").
pub fn status_main(args: Vec<String>) -> ExitCode {
    // Help and errors say "tdfs status", not "status".
    let cli = StatusCli::parse_from(
        std::iter::once("tdfs status".to_string()).chain(args.into_iter().skip(1)),
    );
    exit(status_cmd(&cli), "tdfs status")
}

/// The status of the node at `dir`: its daemon's, with the cluster view of its `tdfs node`
/// supervisor under "cluster" when one runs there.
fn node_status(dir: &std::path::Path) -> anyhow::Result<Value> {
    let sup = dir.join(tdfs_cluster::NODE_SOCKET);
    let cluster = if sup.exists() {
        control::request_at(&sup, &json!({"cmd": "status"}), Duration::from_secs(10)).ok()
    } else {
        None
    };
    let daemon = control::request(dir, &json!({"cmd": "status"}));
    match (daemon, cluster) {
        (Ok(mut v), Some(c)) => {
            v["cluster"] = c;
            Ok(v)
        }
        (Ok(v), None) => Ok(v),
        // Between two roles no daemon answers, but the supervisor does.
        (Err(_), Some(c)) => Ok(json!({"ok": true, "role": "none", "cluster": c})),
        (Err(e), None) => Err(e),
    }
}

/// Text for a status answer: the cluster (under `tdfs node`), then the master's table, or
/// one line for a replica.
fn format_any(v: &Value) -> String {
    let mut out = String::new();
    if v["cluster"].is_object() {
        out.push_str(&tdfs_cluster::format_cluster(&v["cluster"]));
        out.push('\n');
    }
    match v["role"].as_str() {
        Some("master") => out.push_str(&format_status(v)),
        Some("replica") => out.push_str(&format!(
            "replica of {} (epoch {}), last applied seq {}{}\n",
            v["master_label"]
                .as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or("no master yet"),
            v["epoch"]
                .as_u64()
                .map_or_else(|| "-".to_string(), |e| e.to_string()),
            v["last_applied"].as_u64().unwrap_or(0),
            if v["syncing"].as_bool() == Some(true) {
                ", syncing"
            } else {
                ""
            }
        )),
        _ => out.push_str("no daemon runs on this node right now\n"),
    }
    out
}

fn status_cmd(cli: &StatusCli) -> anyhow::Result<()> {
    let dir = cli.target.state_dir()?;
    let render = |v: &Value| {
        if cli.json {
            serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
        } else {
            format_any(v)
        }
    };
    let mut out = std::io::stdout();
    if !cli.watch {
        let v = node_status(&dir)?;
        let _ = out.write_all(render(&v).as_bytes());
        return Ok(());
    }
    let tty = out.is_terminal();
    let interval = Duration::from_secs_f64(cli.interval.clamp(0.1, 3600.0));
    let mut n = 0u64;
    loop {
        let text = match node_status(&dir) {
            Ok(v) => render(&v),
            Err(e) => format!("tdfs status: {e:#}\n"),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let screen = if tty {
            // Home and clear, then the table: one screen that refreshes in place.
            format!(
                "\x1b[H\x1b[2J{} (every {:.1}s, Ctrl-C to quit; unix time {now})\n\n{text}",
                dir.display(),
                interval.as_secs_f64()
            )
        } else {
            format!("--- {now}\n{text}")
        };
        if out.write_all(screen.as_bytes()).is_err() || out.flush().is_err() {
            return Ok(());
        }
        n += 1;
        if cli.count.is_some_and(|c| n >= c) {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

/// The table `tdfs status` prints.
pub fn format_status(v: &Value) -> String {
    let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let mut out = format!(
        "master {}, epoch {}, last seq {}, queue {}, journal {}\n",
        v["label"].as_str().unwrap_or(""),
        v["epoch"]
            .as_u64()
            .map_or_else(|| "-".to_string(), |e| e.to_string()),
        u(v, "last_seq"),
        human_bytes(u(v, "queue_bytes") as f64),
        human_bytes(u(v, "journal_bytes") as f64),
    );
    if let Some(f) = v["fenced"].as_object() {
        out.push_str(&format!(
            "FENCED: {} has seen epoch {}: this master was replaced; writes fail (EROFS)\n",
            f.get("by").and_then(|b| b.as_str()).unwrap_or("?"),
            f.get("epoch").and_then(|e| e.as_u64()).unwrap_or(0)
        ));
    }
    if let Some(l) = v["lease_secs"].as_f64() {
        if l > 0.0 {
            out.push_str(&format!("write lease: {l:.1}s left\n"));
        } else {
            out.push_str("write lease: expired or withdrawn; writes fail (EROFS)\n");
        }
    }
    let empty = Vec::new();
    out.push_str(&format_slaves(v["slaves"].as_array().unwrap_or(&empty)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let v = json!({
            "label": "h:/b", "epoch": 2, "last_seq": 7, "queue_bytes": 0,
            "journal_bytes": 0,
            "slaves": [{"addr": "127.0.0.1:1", "state": "disconnected", "applied": 3,
                        "lag_ops": 4, "lag_bytes": 2048, "lag_secs": 12.5, "ops_per_sec": 0.0,
                        "bytes_per_sec": 0.0, "compression": "lzf", "compression_ratio": 2.5,
                        "last_error": "mkdir a: errno 28 (No space left on device)"}]
        });
        let t = format_status(&v);
        assert!(t.contains("127.0.0.1:1  disconnected"), "{t}");
        assert!(
            t.contains("2.0 KiB") && t.contains("2.50") && t.contains("errno 28"),
            "{t}"
        );
    }
}
