//! `tdfs promote` and `tdfs fence`: failover and planned switchover by hand.
//!
//! Promotion makes a replica the master of a new epoch, numbered above any it has seen,
//! starting right after the last op it applied. Its replicas then follow it: those on its
//! line continue from where they are; one that holds ops past the promotion point (a replica
//! that was ahead, the old master) is stashed and synced. The old master, told by any replica
//! that a newer epoch exists, stops taking writes at once (fencing).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::json;
use tdfs_protocol::history::{standing, Standing};
use tdfs_protocol::msg::ack_flags;
use tdfs_replication::daemon::control;
use tdfs_replication::node::{self, NodeState, Role};
use tdfs_replication::position;
use tdfs_replication::repl::Inspector;

use crate::control::Target;

/// Make this replica the master of a new epoch (failover).
///
/// Run it on the replica to promote, with its tdfs-slave stopped (the state directory is
/// locked while a daemon runs). Every replica given with --peer is asked where it stands
/// first: if one holds ops this replica lacks, the promotion is refused and the one that
/// is ahead is named (promote that one instead, or --force: its extra ops are then stashed
/// on it when it follows). Then start the master: tdfs -m DIR --state-dir STATE_DIR -c ...
#[derive(Parser, Debug)]
#[command(name = "tdfs promote")]
pub struct PromoteCli {
    #[command(flatten)]
    pub target: Target,

    /// Another replica of the set, HOST[:PORT]; repeat for each one reachable. Replicas not
    /// listed, or not answering, are not compared.
    #[arg(long = "peer", value_name = "HOST[:PORT]")]
    pub peers: Vec<String>,

    /// Promote even when a peer is ahead, or this replica's last sync was interrupted.
    #[arg(long)]
    pub force: bool,

    /// How long each peer has to answer, in seconds.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub peer_timeout: f64,

    #[command(flatten)]
    pub auth: tdfs_replication::outbound::SlaveAuthArgs,
}

/// Stop a running master's writes (planned switchover; before a promotion elsewhere).
///
/// From now on every mutation through its mount fails with EROFS (reads go on). With
/// --drain, then waits until every connected slave has applied and made durable every op,
/// and prints where each one stands: a slave that has them all can be promoted with nothing
/// lost. The master stays mounted and fenced until it is stopped.
#[derive(Parser, Debug)]
#[command(name = "tdfs fence")]
pub struct FenceCli {
    #[command(flatten)]
    pub target: Target,

    /// Wait up to this many seconds for the slaves to have everything durable.
    #[arg(long, value_name = "SECONDS")]
    pub drain: Option<f64>,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn promote_main(args: Vec<String>) -> ExitCode {
    let cli = PromoteCli::parse_from(args);
    match promote(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tdfs promote: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn fence_main(args: Vec<String>) -> ExitCode {
    let cli = FenceCli::parse_from(args);
    match fence(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tdfs fence: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn fence(cli: FenceCli) -> anyhow::Result<bool> {
    let dir = cli.target.state_dir()?;
    let mut req = json!({"cmd": "fence"});
    if let Some(d) = cli.drain {
        req["drain_secs"] = json!(d);
    }
    let v = control::request(&dir, &req)?;
    if !v["ok"].as_bool().unwrap_or(false) {
        bail!("{}", v["error"].as_str().unwrap_or("refused"));
    }
    let drained = v["drained"].as_bool();
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "writes stopped at seq {} (they fail with EROFS now)",
            v["last_seq"].as_u64().unwrap_or(0)
        );
        let empty = Vec::new();
        for s in v["status"]["slaves"].as_array().unwrap_or(&empty) {
            println!(
                "  {}: {} applied {} durable {}",
                s["addr"].as_str().unwrap_or(""),
                s["state"].as_str().unwrap_or(""),
                s["applied"].as_u64().unwrap_or(0),
                s["durable"].as_u64().unwrap_or(0)
            );
        }
        match drained {
            Some(true) => println!("every connected slave has every op durable"),
            Some(false) => println!("NOT every slave has every op durable yet (see above)"),
            None => {}
        }
    }
    Ok(drained != Some(false))
}

fn promote(cli: PromoteCli) -> anyhow::Result<()> {
    let dir: PathBuf = cli.target.state_dir()?;
    if !dir.join(node::STATE_FILE).exists() && !dir.join(position::STATE_FILE).exists() {
        bail!(
            "{} holds no replica state: nothing to promote (is it the right --state-dir?)",
            dir.display()
        );
    }
    let node = NodeState::open(&dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            anyhow::anyhow!("{e}: stop this node's tdfs-slave (or tdfs) first")
        } else {
            anyhow::Error::from(e).context(format!("state directory {}", dir.display()))
        }
    })?;
    let rec = node.record();
    if rec.role == Role::Master && rec.may_lead().is_ok() {
        println!(
            "{} is already the master of {}: nothing to promote",
            dir.display(),
            rec.history.last().expect("a master has an epoch")
        );
        return Ok(());
    }
    let (_, applied, flags) = if rec.role == Role::Master {
        // A former master that was fenced: where it stopped.
        (
            [0; 16],
            rec.next_seq.saturating_sub(1),
            if rec.clean {
                0
            } else {
                ack_flags::BEYOND_KNOWN
            },
        )
    } else {
        position::read(&dir)?
    };
    let Some(last) = rec.history.last().copied() else {
        bail!(
            "this replica holds nothing of any replica set yet (it never followed a master): \
             nothing to promote"
        );
    };
    if flags & (ack_flags::SYNCING | ack_flags::STASHING) != 0 && !cli.force {
        bail!(
            "a sync into this replica was interrupted (it is at seq {applied} of {last} but its \
             tree is only partly synced): it is not a consistent copy to promote. Promote \
             another replica, or pass --force"
        );
    }
    cli.auth.init()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let label = format!("tdfs promote on {}", crate::hostname());
    let mut ahead = Vec::new();
    let mut unknown = Vec::new();
    for spec in &cli.peers {
        let cfg = crate::parse_slave(spec, tdfs_protocol::Compression::None, true)?;
        let r = rt.block_on(Inspector::connect(
            &cfg,
            &label,
            Duration::from_secs_f64(cli.peer_timeout.clamp(0.1, 600.0)),
        ));
        let peer = match r {
            Ok(i) => i.hello,
            Err(e) => {
                eprintln!("peer {}: not compared ({e:#})", cfg.addr);
                unknown.push(cfg.addr.clone());
                continue;
            }
        };
        let beyond = peer.flags & ack_flags::BEYOND_KNOWN != 0;
        let st = standing(
            &rec.history,
            &peer.history,
            peer.seen.as_ref(),
            peer.applied,
            beyond,
        );
        let why = match st {
            Standing::Fenced { newer } => Some(format!(
                "it has seen {newer}, newer than this replica's {last}: another promotion \
                 happened already; promoting this one too would split the replica set"
            )),
            Standing::Foreign { .. } => {
                eprintln!("peer {}: belongs to another replica set; ignored", cfg.addr);
                None
            }
            Standing::Diverged { branch } => Some(format!(
                "it holds ops this replica lacks (after seq {branch}; it is at {})",
                peer.applied
            )),
            Standing::Behind if peer.applied > applied => Some(format!(
                "it applied up to seq {}, this replica up to {applied}",
                peer.applied
            )),
            Standing::Behind => {
                eprintln!(
                    "peer {}: at seq {} (this replica: {applied}): not ahead",
                    cfg.addr, peer.applied
                );
                None
            }
        };
        if let Some(w) = why {
            ahead.push(format!("{} ({w})", cfg.addr));
        }
    }
    if !ahead.is_empty() {
        if !cli.force {
            bail!(
                "refusing to promote: {} {} ahead of this replica: {}. Promote the one that is \
                 ahead instead, or pass --force (what it holds beyond this replica is then \
                 stashed on it when it follows)",
                ahead.len(),
                if ahead.len() == 1 {
                    "peer is"
                } else {
                    "peers are"
                },
                ahead.join("; ")
            );
        }
        eprintln!("--force: promoting although {}", ahead.join("; "));
    }
    let id = node::random_id()?;
    let start = applied + 1;
    let history = rec.history.promoted(id, start, rec.seen.as_ref());
    let epoch = *history.last().expect("just pushed");
    node.update(|r| {
        r.history = history.clone();
        r.seen = None;
        r.master_epoch = Some(epoch.number);
        r.next_seq = start;
        r.clean = true;
        // Still a replica's tree until the master starts on it: a stale journal is dropped
        // then, and a tdfs-slave started by mistake serves this epoch's line.
        r.role = Role::Replica;
    })
    .with_context(|| format!("writing {}", node.path().display()))?;
    println!(
        "promoted: this node is the master of {epoch}, after seq {applied}.{}\nStart it: \
         tdfs -m DIR --state-dir {} -c REPLICA ... MOUNTPOINT\nIts replicas follow it from \
         where they are; the old master, once stopped, rejoins with tdfs-slave on its own \
         directory and state dir (what only it holds is stashed there, not lost).",
        if unknown.is_empty() {
            String::new()
        } else {
            format!(" Not compared (no answer): {}.", unknown.join(", "))
        },
        dir.display()
    );
    Ok(())
}
