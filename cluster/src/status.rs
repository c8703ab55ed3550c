//! The cluster as one node's supervisor sees it: for `tdfs status` (through the supervisor's
//! socket `STATE_DIR/node.sock`) and the metrics endpoint.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use serde_json::Value;
use tdfs_replication::daemon::http::{self, Labels};

/// The supervisor's control socket, beside the daemon's `control.sock`.
pub const NODE_SOCKET: &str = "node.sock";

fn secs(v: &Value) -> String {
    match v.as_f64() {
        Some(s) if s > 0.0 => format!("{s:.1}s"),
        Some(_) => "expired".into(),
        None => "-".into(),
    }
}

/// The table `tdfs status` prints for a node run by `tdfs node`.
pub fn format_cluster(v: &Value) -> String {
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or("-").to_string();
    let mut out = format!(
        "cluster {} (etcd {}): leader {}, lease {} left; this node {} is {}\n",
        s(v, "cluster"),
        if v["etcd_ok"].as_bool() == Some(true) {
            "reachable"
        } else {
            "UNREACHABLE"
        },
        v["leader"].as_str().unwrap_or("NONE"),
        secs(&v["lease_secs"]),
        s(v, "node"),
        s(v, "role"),
    );
    if let Some(w) = v["note"].as_str() {
        out.push_str(&format!("{w}\n"));
    }
    let header = [
        "MEMBER", "ADDR", "ALIVE", "ROLE", "EPOCH", "POSITION", "LAG OPS",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    let empty = Vec::new();
    for m in v["members"].as_array().unwrap_or(&empty) {
        rows.push(vec![
            s(m, "name"),
            s(m, "addr"),
            if m["alive"].as_bool() == Some(true) {
                "yes".into()
            } else {
                "no".into()
            },
            s(m, "role"),
            m["epoch"]
                .as_u64()
                .map_or_else(|| "-".into(), |e| e.to_string()),
            m["applied"]
                .as_u64()
                .map_or_else(|| "-".into(), |e| e.to_string()),
            m["lag_ops"]
                .as_u64()
                .map_or_else(|| "-".into(), |e| e.to_string()),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The supervisor's metrics, read from its latest view at each scrape.
pub struct ClusterMetrics(pub Arc<Mutex<Value>>);

impl std::fmt::Debug for ClusterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cluster metrics")
    }
}

impl Collector for ClusterMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let v = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let none = || -> Labels { Vec::new() };
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        http::gauges(
            &mut enc,
            "tdfs_cluster_is_leader",
            "1 while this node holds the cluster's leader lease and runs the master",
            &[(none(), flag(v["role"] == "leader"))],
        )?;
        http::gauges(
            &mut enc,
            "tdfs_cluster_has_leader",
            "1 while some node holds the leader lease (as last read from etcd)",
            &[(none(), flag(v["leader"].is_string()))],
        )?;
        http::gauges(
            &mut enc,
            "tdfs_cluster_etcd_reachable",
            "1 while this node's last etcd request succeeded",
            &[(none(), flag(v["etcd_ok"].as_bool() == Some(true)))],
        )?;
        http::gauges(
            &mut enc,
            "tdfs_cluster_lease_seconds",
            "Seconds left on the leader's lease (as leader: on its write lease)",
            &[(none(), v["lease_secs"].as_f64().unwrap_or(0.0))],
        )?;
        for (name, help) in [
            ("elections", "Elections this node won"),
            ("demotions", "Times this node stepped down as leader"),
        ] {
            http::counters(
                &mut enc,
                &format!("tdfs_cluster_{name}"),
                help,
                &[(none(), v[name].as_u64().unwrap_or(0))],
            )?;
        }
        let empty = Vec::new();
        let members = v["members"].as_array().unwrap_or(&empty);
        let rows = |f: &dyn Fn(&Value) -> Option<f64>| -> Vec<(Labels, f64)> {
            members
                .iter()
                .filter_map(|m| {
                    let val = f(m)?;
                    Some((
                        vec![("member", m["name"].as_str().unwrap_or("").to_string())],
                        val,
                    ))
                })
                .collect()
        };
        http::gauges(
            &mut enc,
            "tdfs_cluster_member_alive",
            "1 while the member renews its session in etcd",
            &rows(&|m| Some(flag(m["alive"].as_bool() == Some(true)))),
        )?;
        http::gauges(
            &mut enc,
            "tdfs_cluster_member_leader",
            "1 for the member that holds the leader lease",
            &rows(&|m| Some(flag(m["role"] == "leader"))),
        )?;
        http::gauges(
            &mut enc,
            "tdfs_cluster_member_epoch",
            "The epoch each live member is on",
            &rows(&|m| m["epoch"].as_u64().map(|e| e as f64)),
        )?;
        http::gauges(
            &mut enc,
            "tdfs_cluster_member_position",
            "Last op each live member applied (the leader: issued)",
            &rows(&|m| m["applied"].as_u64().map(|e| e as f64)),
        )?;
        http::gauges(
            &mut enc,
            "tdfs_cluster_member_lag_ops",
            "Ops each live replica of the leader's epoch has not applied yet",
            &rows(&|m| m["lag_ops"].as_u64().map(|e| e as f64)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table() {
        let v = json!({
            "cluster": "web", "etcd_ok": true, "leader": "a", "lease_secs": 3.5,
            "node": "b", "role": "replica",
            "members": [
                {"name": "a", "addr": "10.0.0.1:4731", "alive": true, "role": "leader",
                 "epoch": 2, "applied": 90},
                {"name": "b", "addr": "10.0.0.2:4731", "alive": true, "role": "replica",
                 "epoch": 2, "applied": 80, "lag_ops": 10},
                {"name": "c", "addr": "10.0.0.3:4731", "alive": false}
            ]
        });
        let t = format_cluster(&v);
        assert!(t.contains("leader a, lease 3.5s left"), "{t}");
        assert!(
            t.contains("b       10.0.0.2:4731  yes    replica  2      80        10"),
            "{t}"
        );
        assert!(t.contains("c       10.0.0.3:4731  no"), "{t}");
    }
}
