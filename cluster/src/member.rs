//! Members, their positions, and the election rule.
//!
//! Keys under `/tdfs/CLUSTER/` in etcd:
//!
//! - `members/NAME`: `{"name","addr"}`, no lease. A node registers once and stays a member
//!   while it is down, so the master keeps a link to it (and keeps its ops for it) and
//!   `--min-replicas` counts it, as with a hand-kept `-c` list. `etcdctl del` removes one.
//! - `alive/NAME`: what the node is doing now (role, epoch, position, ...), attached to its
//!   session lease: it vanishes when the node stops renewing.
//! - `leader`: the leader's name, attached to its session lease; taken only with a
//!   transaction that succeeds when nobody holds it.
//!
//! **The election rule**: among the nodes that are alive, the one with the highest
//! (consistent, epoch, leads-its-epoch, applied) wins, ties to the lowest name. A node
//! in the middle of a sync is not consistent and never preferred. "Leads its epoch" is a
//! former master of the newest epoch it knows that was never replaced: every op of that epoch
//! came from it, so it holds at least what any replica of that epoch holds, whatever its
//! recorded position says (a master records its position only now and then).

use std::cmp::Ordering;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tdfs_protocol::msg::ack_flags;
use tdfs_replication::node::{NodeRecord, Role, STATE_FILE};
use tdfs_replication::position;

/// `members/NAME`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Where its tdfs-slave listens, as the master should dial it.
    pub addr: String,
}

/// Where a node's tree stands.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Position {
    /// Its newest epoch (0: holds nothing of any replica set).
    pub epoch: u64,
    /// A former master of that epoch that was never replaced.
    pub leads_epoch: bool,
    /// Last op applied (or issued, as master).
    pub applied: u64,
    /// Not in the middle of a sync or a stash.
    pub consistent: bool,
}

impl Position {
    fn key(&self) -> (bool, u64, bool, u64) {
        (self.consistent, self.epoch, self.leads_epoch, self.applied)
    }
}

/// `alive/NAME`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Alive {
    pub name: String,
    /// leader, replica, starting, stepping-down.
    pub role: String,
    pub position: Position,
    /// As leader: seconds of write lease left when this was written.
    #[serde(default)]
    pub lease_secs: Option<f64>,
    /// The mountpoint (the same path on every node).
    #[serde(default)]
    pub mountpoint: String,
    /// Milliseconds since the epoch when written (for display only: no decision uses
    /// another machine's clock).
    #[serde(default)]
    pub at_ms: u64,
}

/// Orders candidates: the better one is greater.
pub fn better(a: (&str, &Position), b: (&str, &Position)) -> Ordering {
    a.1.key()
        .cmp(&b.1.key())
        // The lower name wins a tie, so it compares greater.
        .then_with(|| b.0.cmp(a.0))
}

/// The winner among `candidates` (name, position). A node that holds nothing (epoch 0)
/// never wins while any candidate holds something: it would start a new replica set, and
/// every node of the existing one would refuse it.
pub fn best<'a>(candidates: impl IntoIterator<Item = (&'a str, &'a Position)>) -> Option<&'a str> {
    let all: Vec<(&str, &Position)> = candidates.into_iter().collect();
    let any_data = all.iter().any(|(_, p)| p.epoch > 0);
    all.into_iter()
        .filter(|(_, p)| p.epoch > 0 || !any_data)
        .max_by(|a, b| better(*a, *b))
        .map(|(n, _)| n)
}

/// The node's record in `node.state`, read without its lock (a daemon may hold it).
pub fn read_record(state_dir: &Path) -> anyhow::Result<NodeRecord> {
    match std::fs::read_to_string(state_dir.join(STATE_FILE)) {
        Ok(t) => NodeRecord::parse(&t).map_err(anyhow::Error::msg),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NodeRecord::default()),
        Err(e) => Err(e.into()),
    }
}

/// Whether this node may start as the master of its own epoch again, without a promotion:
/// it was that epoch's master and has heard of nothing newer.
pub fn leads_epoch(rec: &NodeRecord) -> bool {
    !rec.history.is_empty() && rec.may_lead().is_ok()
}

/// The position recorded in a state directory (no daemon needs to run).
pub fn position_from_files(state_dir: &Path) -> anyhow::Result<Position> {
    let rec = read_record(state_dir)?;
    // The epoch whose ops it holds (a newer one it only heard of does not count).
    let epoch = rec.history.last().map_or(0, |e| e.number);
    let (applied, consistent) = if rec.role == Role::Master && !rec.history.is_empty() {
        (rec.next_seq.saturating_sub(1), true)
    } else {
        let (_, applied, flags) = position::read(state_dir)?;
        (
            applied,
            flags & (ack_flags::SYNCING | ack_flags::STASHING) == 0,
        )
    };
    Ok(Position {
        epoch,
        leads_epoch: leads_epoch(&rec),
        applied,
        consistent,
    })
}

/// The position of a node whose tdfs-slave is running, from its status answer (fresher
/// than the files: the mapped position is written per op, but the flags only at barriers).
pub fn position_from_slave(state_dir: &Path, status: &serde_json::Value) -> Position {
    let rec = read_record(state_dir).unwrap_or_default();
    Position {
        epoch: status["epoch"].as_u64().unwrap_or(0),
        leads_epoch: leads_epoch(&rec),
        applied: status["last_applied"].as_u64().unwrap_or(0),
        consistent: status["syncing"].as_bool() != Some(true)
            && status["stashing"].as_bool() != Some(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(epoch: u64, leads: bool, applied: u64) -> Position {
        Position {
            epoch,
            leads_epoch: leads,
            applied,
            consistent: true,
        }
    }

    #[test]
    fn election_rule() {
        let a = p(1, false, 100);
        let b = p(1, false, 120);
        let c = p(1, false, 120);
        // Highest position wins; a tie goes to the lower name.
        assert_eq!(best([("a", &a), ("b", &b), ("c", &c)]), Some("b"));
        assert_eq!(best([("c", &c), ("b", &b)]), Some("b"));
        // A newer epoch beats any position of an older one.
        let d = p(2, false, 5);
        assert_eq!(best([("b", &b), ("d", &d)]), Some("d"));
        // The master of the epoch beats its replicas, whatever it recorded.
        let m = p(1, true, 3);
        assert_eq!(best([("b", &b), ("m", &m)]), Some("m"));
        // A replica in the middle of a sync is never preferred.
        let s = Position {
            consistent: false,
            ..p(3, false, 1000)
        };
        assert_eq!(best([("a", &a), ("s", &s)]), Some("a"));
        // An empty node never beats one that holds data, even one mid-sync...
        let fresh = p(0, false, 0);
        assert_eq!(best([("0", &fresh), ("s", &s)]), Some("s"));
        // ...but among empty nodes the lowest name starts the replica set.
        assert_eq!(best([("z", &fresh), ("y", &fresh)]), Some("y"));
        assert_eq!(best(std::iter::empty()), None);
    }
}
