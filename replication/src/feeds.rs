//! What a feeding node (the master, or a relaying replica) says and does about the replicas
//! it feeds: their status rows (with the tree below each relay), the `add` and `remove`
//! control commands and the persisted replica set, per-replica rates, and the report a relay
//! sends upstream. One implementation for both daemons, so a relay's `status` reads like
//! the master's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tdfs_protocol::msg::{DownNode, Downstream, MAX_DEPTH, MAX_DOWNSTREAM};
use tdfs_protocol::Compression;
use tracing::info;

use crate::daemon::control;
use crate::daemon::http::{self, Labels};
use crate::daemon::{human_bytes, RateMeter};
use crate::repl::Status;
use crate::repl::{Replicator, SlaveConfig, SlaveSnapshot};
use prometheus_client::encoding::DescriptorEncoder;

/// Throughput per replica (ops streamed/s, bytes sent/s), sampled once a second.
#[derive(Debug, Default)]
pub struct Rates {
    by_addr: Mutex<HashMap<String, ReplicaRates>>,
}

/// Ops streamed and bytes sent, per second.
type ReplicaRates = (Arc<RateMeter>, Arc<RateMeter>);

impl Rates {
    fn sample(&self, repl: &Replicator) {
        let st = repl.status();
        let mut m = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|a, _| st.slaves.iter().any(|s| &s.addr == a));
        for s in &st.slaves {
            let (ops, bytes) = m.entry(s.addr.clone()).or_default();
            // Ops streamed, not the applied position: a sync (after an unclean restart, say)
            // moves that by billions of numbers that were skipped, never issued.
            ops.sample(s.ops_sent);
            bytes.sample(s.bytes_sent);
        }
    }

    /// (ops/s, bytes/s) for a replica.
    pub fn get(&self, addr: &str) -> (f64, f64) {
        let m = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        m.get(addr)
            .map_or((0.0, 0.0), |(o, b)| (o.rate(), b.rate()))
    }
}

/// The replicas a node feeds, as its control socket serves them.
pub struct Feeds {
    pub repl: Replicator,
    pub state_dir: PathBuf,
    /// Compression of a replica added without `z=`.
    pub default_z: Compression,
    pub nodelay: bool,
    pub rates: Arc<Rates>,
    /// Serialises membership changes and their persisting.
    membership: Mutex<()>,
}

impl Feeds {
    pub fn new(
        repl: Replicator,
        state_dir: PathBuf,
        default_z: Compression,
        nodelay: bool,
    ) -> Arc<Self> {
        Arc::new(Feeds {
            repl,
            state_dir,
            default_z,
            nodelay,
            rates: Arc::default(),
            membership: Mutex::new(()),
        })
    }

    /// Samples the rates once a second.
    pub fn start_sampler(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        let me = self.clone();
        rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                me.rates.sample(&me.repl);
            }
        });
    }

    /// One JSON object per replica, each with the tree below it (`downstream`, depth first)
    /// when it relays. `head`: the sequence number the next op gets at the top of the tree
    /// (this node's own for a master), so lag at every level is counted from the same place.
    pub fn slaves_json(&self, slaves: &[SlaveSnapshot], head: u64) -> Vec<Value> {
        let kinds: HashMap<String, Compression> = self
            .repl
            .slave_configs()
            .into_iter()
            .map(|c| (c.addr, c.compression))
            .collect();
        slaves
            .iter()
            .map(|s| {
                let (ops_rate, bytes_rate) = self.rates.get(&s.addr);
                let ratio = if s.bytes_sent > 0 && s.raw_bytes_sent > 0 {
                    s.raw_bytes_sent as f64 / s.bytes_sent as f64
                } else {
                    1.0
                };
                let downstream: Vec<Value> = s
                    .downstream
                    .iter()
                    .map(|d| {
                        json!({
                            "depth": d.depth + 1,
                            "addr": d.addr,
                            "label": d.label,
                            "state": d.state,
                            "applied": d.applied,
                            "lag_ops": head.saturating_sub(d.applied + 1),
                            "hop_lag_ops": d.lag_ops,
                            "hop_lag_secs": d.lag_ms as f64 / 1000.0,
                            "syncs": d.syncs,
                            "sync_bytes": d.sync_bytes,
                            "last_error": (!d.last_error.is_empty()).then(|| d.last_error.clone()),
                        })
                    })
                    .collect();
                json!({
                    "addr": s.addr,
                    "label": s.label,
                    "state": s.state,
                    "in_sync": s.in_sync,
                    "applied": s.applied,
                    "durable": s.durable,
                    "lag_ops": s.lag_ops,
                    "lag_bytes": s.lag_bytes,
                    "lag_secs": s.lag_secs,
                    "ops_per_sec": ops_rate,
                    "bytes_per_sec": bytes_rate,
                    "ops_sent": s.ops_sent,
                    "bytes_sent": s.bytes_sent,
                    "raw_bytes_sent": s.raw_bytes_sent,
                    "compression": match kinds.get(&s.addr) {
                        Some(Compression::Lzf) => "lzf",
                        Some(Compression::Lz4) => "lz4",
                        _ if s.compressed => "yes",
                        _ => "none",
                    },
                    "compression_ratio": ratio,
                    "reconnects": s.reconnects,
                    "apply_errors": s.apply_errors,
                    "last_error": s.last_error,
                    "syncs": s.syncs,
                    "sync_bytes": s.sync_bytes,
                    "last_sync": s.last_sync.as_ref().map(|r| json!({
                        "why": r.why,
                        "entries": r.entries,
                        "fixed": r.fixed,
                        "bytes": r.bytes,
                        "secs": r.secs,
                        "stashed": r.stashed,
                        "resumed_at": r.resumed_at,
                    })),
                    "downstream": downstream,
                })
            })
            .collect()
    }

    /// What a relay tells its upstream about the replicas below it: each of its own (depth
    /// 1) followed by what that one reported, one level deeper.
    pub fn report(&self) -> Downstream {
        let st = self.repl.status();
        let mut nodes = Vec::new();
        for s in &st.slaves {
            if nodes.len() >= MAX_DOWNSTREAM {
                break;
            }
            nodes.push(DownNode {
                depth: 1,
                addr: s.addr.clone(),
                label: s.label.clone(),
                state: s.state.to_string(),
                applied: s.applied,
                lag_ops: s.lag_ops,
                lag_ms: (s.lag_secs * 1000.0) as u64,
                syncs: s.syncs,
                sync_bytes: s.sync_bytes,
                last_error: s.last_error.clone().unwrap_or_default(),
            });
            for d in &s.downstream {
                if nodes.len() >= MAX_DOWNSTREAM || d.depth >= MAX_DEPTH {
                    continue;
                }
                nodes.push(DownNode {
                    depth: d.depth + 1,
                    ..d.clone()
                });
            }
        }
        Downstream { nodes }
    }

    fn persist(&self) -> Result<(), String> {
        crate::config::persist(&self.state_dir, &self.repl.slave_configs()).map_err(|e| {
            format!(
                "saving {}: {e}",
                crate::config::slaves_file(&self.state_dir).display()
            )
        })
    }

    /// The `add` control command: a new replica gets a sync, then streams; saved in the
    /// state directory.
    pub fn add(&self, spec: &str) -> Value {
        let _g = self.membership.lock().unwrap_or_else(|p| p.into_inner());
        let c = match SlaveConfig::parse(spec, self.default_z, self.nodelay) {
            Ok(c) => c,
            Err(e) => return control::error(format!("{e:#}")),
        };
        let addr = c.addr.clone();
        if let Err(e) = self.repl.add_slave(c) {
            return control::error(e);
        }
        if let Err(e) = self.persist() {
            return control::error(format!("{addr} added, but {e}"));
        }
        info!(slave = %addr, "replica added through the control socket (saved in the state directory)");
        json!({"ok": true, "slave": addr})
    }

    /// The `remove` control command.
    pub fn remove(&self, spec: &str) -> Value {
        let _g = self.membership.lock().unwrap_or_else(|p| p.into_inner());
        let addr = match SlaveConfig::parse(spec, self.default_z, self.nodelay) {
            Ok(c) => c.addr,
            Err(e) => return control::error(format!("{e:#}")),
        };
        if let Err(e) = self.repl.remove_slave(&addr) {
            return control::error(e);
        }
        if let Err(e) = self.persist() {
            return control::error(format!("{addr} removed, but {e}"));
        }
        info!(slave = %addr, "replica removed through the control socket (saved in the state directory)");
        json!({"ok": true, "slave": addr})
    }
}

fn slave(addr: &str) -> Labels {
    vec![("slave", addr.to_string())]
}

/// The per-replica metric families of a feeding node, named `PREFIX_...` (`tdfs_slave` on
/// the master, `tdfs_relay_leaf` on a relay, whose own `tdfs_slave_*` describe itself), and
/// the nodes below its relays (`PREFIX_downstream_*`, labelled by the relay they are
/// behind, their address and depth).
pub fn encode_metrics(
    enc: &mut DescriptorEncoder,
    prefix: &str,
    st: &Status,
    rates: &Rates,
) -> std::fmt::Result {
    let per = |f: &dyn Fn(&SlaveSnapshot) -> u64| -> Vec<(Labels, u64)> {
        st.slaves.iter().map(|s| (slave(&s.addr), f(s))).collect()
    };
    let perf = |f: &dyn Fn(&SlaveSnapshot) -> f64| -> Vec<(Labels, f64)> {
        st.slaves.iter().map(|s| (slave(&s.addr), f(s))).collect()
    };
    http::counters(
        enc,
        &format!("{prefix}_ops_sent"),
        "Ops sent to each slave",
        &per(&|s| s.ops_sent),
    )?;
    http::counters(
        enc,
        &format!("{prefix}_sent_bytes"),
        "Bytes sent to each slave (on the wire, after compression)",
        &per(&|s| s.bytes_sent),
    )?;
    http::counters(
        enc,
        &format!("{prefix}_raw_bytes"),
        "Bytes of frame payload sent to each slave before compression",
        &per(&|s| s.raw_bytes_sent),
    )?;
    http::counters(
        enc,
        &format!("{prefix}_reconnects"),
        "Connections (re)established to each slave",
        &per(&|s| s.reconnects),
    )?;
    http::counters(
        enc,
        &format!("{prefix}_syncs"),
        "Syncs completed into each slave (instead of resuming its stream)",
        &per(&|s| s.syncs),
    )?;
    http::counters(
        enc,
        &format!("{prefix}_sync_bytes"),
        "File data sent to each slave by syncs, bytes",
        &per(&|s| s.sync_bytes),
    )?;
    let errors: Vec<(Labels, u64)> = st
        .slaves
        .iter()
        .map(|s| {
            (
                vec![("slave", s.addr.clone()), ("kind", "apply".to_string())],
                s.apply_errors,
            )
        })
        .collect();
    http::counters(
        enc,
        &format!("{prefix}_errors"),
        "Errors by slave and kind (apply: an op the slave could not apply)",
        &errors,
    )?;
    http::gauges(
        enc,
        &format!("{prefix}_applied_seq"),
        "Last sequence number each slave has applied",
        &perf(&|s| s.applied as f64),
    )?;
    http::gauges(
        enc,
        &format!("{prefix}_lag_ops"),
        "Ops issued that the slave has not applied",
        &perf(&|s| s.lag_ops as f64),
    )?;
    http::gauges(
        enc,
        &format!("{prefix}_lag_bytes"),
        "Bytes of ops the slave has not applied",
        &perf(&|s| s.lag_bytes as f64),
    )?;
    http::gauges(
        enc,
        &format!("{prefix}_lag_seconds"),
        "Age of the oldest op the slave has not applied",
        &perf(&|s| s.lag_secs),
    )?;
    http::gauges(
        enc,
        &format!("{prefix}_in_sync"),
        "1 when writers wait for this slave (connected, streaming, keeping up)",
        &perf(&|s| s.in_sync as u8 as f64),
    )?;
    http::gauges(
        enc,
        &format!("{prefix}_connected"),
        "1 while the slave is connected (streaming, catching up or syncing)",
        &perf(&|s| matches!(s.state, "streaming" | "catching up" | "syncing") as u8 as f64),
    )?;
    http::gauges(
        enc,
        &format!("{prefix}_apply_rate"),
        "Ops per second the slave has applied, over the last few seconds",
        &perf(&|s| rates.get(&s.addr).0),
    )?;
    let below: Vec<(Labels, &DownNode)> = st
        .slaves
        .iter()
        .flat_map(|s| {
            s.downstream.iter().map(move |d| {
                (
                    vec![
                        ("via", s.addr.clone()),
                        ("slave", d.addr.clone()),
                        ("depth", (d.depth + 1).to_string()),
                    ],
                    d,
                )
            })
        })
        .collect();
    if !below.is_empty() {
        let g = |f: &dyn Fn(&DownNode) -> f64| -> Vec<(Labels, f64)> {
            below.iter().map(|(l, d)| (l.clone(), f(d))).collect()
        };
        http::gauges(
            enc,
            &format!("{prefix}_downstream_applied_seq"),
            "Last sequence number each replica below a relay has applied (as its relay last \
             reported it)",
            &g(&|d| d.applied as f64),
        )?;
        http::gauges(
            enc,
            &format!("{prefix}_downstream_lag_ops"),
            "Ops issued here that each replica below a relay has not applied",
            &g(&|d| st.head.saturating_sub(d.applied + 1) as f64),
        )?;
        http::gauges(
            enc,
            &format!("{prefix}_downstream_streaming"),
            "1 while the replica below a relay is streaming from it",
            &g(&|d| (d.state == "streaming") as u8 as f64),
        )?;
    }
    Ok(())
}

fn secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{s:.0}s")
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}

/// The replica table of `tdfs status` and `tdfs-slave status` (from [`Feeds::slaves_json`]):
/// one row per replica, the replicas of a relay indented below it, then the last sync into
/// each.
pub fn format_slaves(slaves: &[Value]) -> String {
    let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let header = [
        "SLAVE",
        "STATE",
        "APPLIED",
        "LAG OPS",
        "LAG BYTES",
        "LAG",
        "OPS/S",
        "SENT/S",
        "RATIO",
        "LAST ERROR",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for s in slaves {
        rows.push(vec![
            s["addr"].as_str().unwrap_or("").to_string(),
            s["state"].as_str().unwrap_or("").to_string(),
            u(s, "applied").to_string(),
            u(s, "lag_ops").to_string(),
            human_bytes(u(s, "lag_bytes") as f64),
            secs(f(s, "lag_secs")),
            format!("{:.1}", f(s, "ops_per_sec")),
            format!("{}/s", human_bytes(f(s, "bytes_per_sec"))),
            if s["compression"] == "none" {
                "-".into()
            } else {
                format!("{:.2}", f(s, "compression_ratio"))
            },
            s["last_error"].as_str().unwrap_or("-").to_string(),
        ]);
        for d in s["downstream"].as_array().into_iter().flatten() {
            let depth = u(d, "depth").max(2) as usize;
            rows.push(vec![
                format!(
                    "{}└ {}",
                    "  ".repeat(depth - 2),
                    d["addr"].as_str().unwrap_or("")
                ),
                d["state"].as_str().unwrap_or("").to_string(),
                u(d, "applied").to_string(),
                format!("{} (hop {})", u(d, "lag_ops"), u(d, "hop_lag_ops")),
                "-".into(),
                secs(f(d, "hop_lag_secs")),
                "-".into(),
                "-".into(),
                "-".into(),
                d["last_error"].as_str().unwrap_or("-").to_string(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if slaves.is_empty() {
        out.push_str("(no slaves)\n");
    }
    for s in slaves {
        let r = &s["last_sync"];
        if r.is_object() {
            out.push_str(&format!(
                "last sync into {}: {} entries compared, {} fixed, {} moved in {}{} ({})\n",
                s["addr"].as_str().unwrap_or(""),
                u(r, "entries"),
                u(r, "fixed"),
                human_bytes(u(r, "bytes") as f64),
                secs(f(r, "secs")),
                if r["stashed"].as_bool() == Some(true) {
                    ", the slave stashed what it replaced"
                } else {
                    ""
                },
                r["why"].as_str().unwrap_or("")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_with_a_relay() {
        let v = json!([{"addr": "127.0.0.1:1", "state": "disconnected", "applied": 3,
        "lag_ops": 4, "lag_bytes": 2048, "lag_secs": 12.5, "ops_per_sec": 0.0,
        "bytes_per_sec": 0.0, "compression": "lzf", "compression_ratio": 2.5,
        "last_error": "mkdir a: errno 28 (No space left on device)",
        "downstream": [
            {"depth": 2, "addr": "leaf1:4731", "state": "streaming",
             "applied": 2, "lag_ops": 5, "hop_lag_ops": 1, "hop_lag_secs": 0.2},
            {"depth": 3, "addr": "leaf2:4731", "state": "syncing",
             "applied": 0, "lag_ops": 7, "hop_lag_ops": 2, "hop_lag_secs": 0.0}
        ]}]);
        let t = format_slaves(v.as_array().unwrap());
        let row = |name: &str| {
            t.lines()
                .find(|l| l.contains(name))
                .unwrap_or("")
                .to_string()
        };
        assert!(row("127.0.0.1:1").contains("disconnected"), "{t}");
        assert!(row("leaf2:4731").contains("syncing"), "{t}");
        assert!(
            t.contains("2.0 KiB") && t.contains("2.50") && t.contains("errno 28"),
            "{t}"
        );
        assert!(t.contains("└ leaf1:4731") && t.contains("5 (hop 1)"), "{t}");
        assert!(t.contains("  └ leaf2:4731"), "{t}");
    }
}
