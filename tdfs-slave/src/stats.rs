//! What the slave counts for `tdfs-slave status` and its metrics. Updated once per applied
//! round (not per op) and per read, with relaxed atomics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use std::path::PathBuf;

use tdfs_protocol::Epoch;

use tdfs_replication::daemon::histogram::Histogram;
use tdfs_replication::daemon::RateMeter;

#[derive(Debug)]
pub struct Stats {
    pub started: Instant,
    /// Live ops applied since start.
    pub ops_applied: AtomicU64,
    /// Apply rounds (one blocking pass over what arrived together).
    pub rounds: AtomicU64,
    pub apply_errors: AtomicU64,
    /// Master sessions that completed a handshake.
    pub sessions: AtomicU64,
    /// Masters refused because they were of an older epoch than one seen here.
    pub fenced_refusals: AtomicU64,
    pub bytes_received: AtomicU64,
    /// The last sequence number applied (from the state file at start, then per round).
    pub applied: AtomicU64,
    pub connected: AtomicBool,
    /// The state record's flags (syncing, stashing), as of the last round.
    pub flags: std::sync::atomic::AtomicU8,
    /// The master the tree follows: its epoch, label, peer address (once one connected
    /// since start).
    pub master: Mutex<(Option<Epoch>, String, String)>,
    /// The last stash made (a sync into this tree after it diverged): where, how many
    /// paths.
    pub stash: Mutex<Option<(PathBuf, u64)>>,
    /// The last apply error: op, path, errno and message.
    pub last_error: Mutex<Option<String>>,
    /// Time per apply round, seconds.
    pub apply_latency: Histogram,
    pub apply_rate: RateMeter,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            ops_applied: AtomicU64::new(0),
            rounds: AtomicU64::new(0),
            apply_errors: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            fenced_refusals: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            flags: std::sync::atomic::AtomicU8::new(0),
            master: Mutex::new((None, String::new(), String::new())),
            stash: Mutex::new(None),
            last_error: Mutex::new(None),
            apply_latency: Histogram::default(),
            apply_rate: RateMeter::default(),
        }
    }
}

impl Stats {
    pub fn set_master(&self, epoch: Option<Epoch>, label: &str, peer: &str) {
        *self.master.lock().unwrap_or_else(|p| p.into_inner()) =
            (epoch, label.to_owned(), peer.to_owned());
    }

    pub fn set_stash(&self, dir: PathBuf, paths: u64) {
        *self.stash.lock().unwrap_or_else(|p| p.into_inner()) = Some((dir, paths));
    }

    pub fn stash(&self) -> Option<(PathBuf, u64)> {
        self.stash.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn master(&self) -> (Option<Epoch>, String, String) {
        self.master
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// One apply round ended: `ops` live ops applied, the tree now at `applied`.
    pub fn round(&self, t0: Instant, ops: u64, applied: u64) {
        self.apply_latency.observe_since(t0);
        self.rounds.fetch_add(1, Ordering::Relaxed);
        self.ops_applied.fetch_add(ops, Ordering::Relaxed);
        self.applied.store(applied, Ordering::Relaxed);
    }

    pub fn error(&self, e: String) {
        self.apply_errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
