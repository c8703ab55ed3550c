//! Replication: one total order of mutations, a bounded log, and one link per slave.
//!
//! [`Replicator::mutate`] is the only way a mutation reaches the backing tree. It holds the
//! order lock across the local syscall *and* the append to the log, so the sequence numbers
//! are exactly the order in which the mutations took effect on the master, whatever the number
//! of FUSE threads: a write and a rename can never be reordered on a slave.
//!
//! The log keeps encoded ops until every slave has acknowledged them, so a slave that drops its
//! connection is resent what it missed when it comes back. Its size is capped: a slave that
//! falls further behind than the cap is marked as needing a full resync instead of making the
//! master's memory grow, and the master's writers never wait for a slow or dead slave.

mod link;
mod state;
mod transport;

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tdfs_protocol::msg::MasterId;
use tdfs_protocol::{Compression, Op};
use tokio::sync::Notify;
use tracing::{error, info, warn};

pub use state::MasterState;

/// A slave as configured on the command line.
#[derive(Debug, Clone)]
pub struct SlaveConfig {
    /// `host:port` as given (resolved at each connection attempt).
    pub addr: String,
    pub compression: Compression,
    pub nodelay: bool,
}

/// Live state of one slave, shared between its link task and the rest of the master.
#[derive(Debug)]
pub struct SlaveStatus {
    pub config: SlaveConfig,
    /// Highest sequence number the slave has applied (0: none yet).
    pub applied: AtomicU64,
    /// Highest sequence number durable on the slave.
    pub durable: AtomicU64,
    pub connected: AtomicBool,
    /// Set when the slave missed ops the log no longer holds: it needs a full resync.
    pub lost: AtomicBool,
    pub bytes_sent: AtomicU64,
    pub ops_sent: AtomicU64,
}

struct Entry {
    seq: u64,
    data: Arc<[u8]>,
}

struct Log {
    /// Sequence number the next mutation gets.
    next_seq: u64,
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl Log {
    fn front_seq(&self) -> u64 {
        self.entries.front().map_or(self.next_seq, |e| e.seq)
    }
}

pub(crate) struct Shared {
    log: Mutex<Log>,
    /// Wakes link tasks when the log grows, a slave acknowledges, or the master closes.
    wake: Notify,
    pub slaves: Vec<Arc<SlaveStatus>>,
    cap: usize,
    master_id: MasterId,
    label: String,
    closing: AtomicBool,
    /// Signalled on every acknowledgement, for [`Replicator::drain`].
    acked: (Mutex<()>, Condvar),
}

impl Shared {
    /// Entries with `seq >= from`, at most about `max_bytes` (at least one entry).
    fn batch_from(&self, from: u64, max_bytes: usize, max_ops: usize) -> BatchResult {
        let log = self.log.lock().expect("log poisoned");
        if from < log.front_seq() {
            return BatchResult::Lost;
        }
        let Some(first) = log.entries.front() else {
            return BatchResult::Empty;
        };
        let start = (from - first.seq) as usize;
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in log.entries.iter().skip(start) {
            if !out.is_empty() && (bytes + e.data.len() > max_bytes || out.len() >= max_ops) {
                break;
            }
            bytes += e.data.len();
            out.push(e.data.clone());
        }
        if out.is_empty() {
            BatchResult::Empty
        } else {
            BatchResult::Ops(from, out)
        }
    }

    fn head(&self) -> u64 {
        self.log.lock().expect("log poisoned").next_seq
    }

    fn front(&self) -> u64 {
        self.log.lock().expect("log poisoned").front_seq()
    }

    fn note_ack(&self) {
        let _g = self.acked.0.lock().expect("ack lock poisoned");
        self.acked.1.notify_all();
    }
}

enum BatchResult {
    Empty,
    Ops(u64, Vec<Arc<[u8]>>),
    /// The slave needs ops from before this sequence number, which the log dropped.
    Lost,
}

/// The handle the filesystem uses.
#[derive(Clone)]
pub struct Replicator {
    shared: Arc<Shared>,
}

impl Replicator {
    /// Starts one link task per slave on `rt`.
    pub fn start(
        rt: &tokio::runtime::Handle,
        slaves: Vec<SlaveConfig>,
        state: &MasterState,
        label: String,
        cap: usize,
    ) -> Self {
        let slaves: Vec<_> = slaves
            .into_iter()
            .map(|config| {
                Arc::new(SlaveStatus {
                    config,
                    applied: AtomicU64::new(0),
                    durable: AtomicU64::new(0),
                    connected: AtomicBool::new(false),
                    lost: AtomicBool::new(false),
                    bytes_sent: AtomicU64::new(0),
                    ops_sent: AtomicU64::new(0),
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            log: Mutex::new(Log {
                next_seq: state.next_seq,
                entries: VecDeque::new(),
                bytes: 0,
            }),
            wake: Notify::new(),
            slaves,
            cap,
            master_id: state.id,
            label,
            closing: AtomicBool::new(false),
            acked: (Mutex::new(()), Condvar::new()),
        });
        for (i, _) in shared.slaves.iter().enumerate() {
            rt.spawn(link::run(shared.clone(), i));
        }
        Replicator { shared }
    }

    /// Runs `f` (a mutation of the backing tree) under the order lock; if it succeeds and
    /// yields an op, the op gets the next sequence number and goes to every slave.
    pub fn mutate<T>(&self, f: impl FnOnce() -> io::Result<(T, Option<Op>)>) -> io::Result<T> {
        let mut log = self.shared.log.lock().expect("log poisoned");
        let (value, op) = f()?;
        if let Some(op) = op {
            let mut buf = Vec::with_capacity(64 + op.data_len());
            op.encode(&mut buf);
            let seq = log.next_seq;
            log.next_seq += 1;
            log.bytes += buf.len();
            log.entries.push_back(Entry {
                seq,
                data: buf.into(),
            });
            self.trim(&mut log);
            drop(log);
            self.shared.wake.notify_waiters();
        }
        Ok(value)
    }

    /// Drops what every slave has applied, then (over the cap) what a lagging slave still
    /// needs, marking that slave lost rather than growing without bound.
    fn trim(&self, log: &mut Log) {
        let min_applied = self
            .shared
            .slaves
            .iter()
            .filter(|s| !s.lost.load(Ordering::Relaxed))
            .map(|s| s.applied.load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX);
        while let Some(e) = log.entries.front() {
            if e.seq <= min_applied || log.bytes > self.shared.cap {
                let seq = e.seq;
                log.bytes -= e.data.len();
                log.entries.pop_front();
                if seq > min_applied {
                    for s in &self.shared.slaves {
                        if s.applied.load(Ordering::Acquire) < seq
                            && !s.lost.swap(true, Ordering::AcqRel)
                        {
                            error!(
                                slave = %s.config.addr,
                                "slave fell more than {} MiB behind (needs seq {}, log now starts after it); \
                                 it is out of sync and needs a full resync",
                                self.shared.cap >> 20,
                                s.applied.load(Ordering::Acquire) + 1
                            );
                        }
                    }
                }
            } else {
                break;
            }
        }
    }

    /// Sequence number of the last op issued (0 when none).
    pub fn last_seq(&self) -> u64 {
        self.shared.head().saturating_sub(1)
    }

    pub fn next_seq(&self) -> u64 {
        self.shared.head()
    }

    /// Stops accepting the idea of more ops, waits until every connected slave has applied
    /// everything (or `timeout` passes), and ends the sessions. Returns the slaves that could
    /// not finish.
    pub fn drain(&self, timeout: Duration) -> Vec<String> {
        let last = self.last_seq();
        let deadline = Instant::now() + timeout;
        self.shared.closing.store(true, Ordering::Release);
        self.shared.wake.notify_waiters();
        let pending = |s: &SlaveStatus| {
            s.connected.load(Ordering::Acquire)
                && !s.lost.load(Ordering::Acquire)
                && s.applied.load(Ordering::Acquire) < last
        };
        let mut g = self.shared.acked.0.lock().expect("ack lock poisoned");
        loop {
            let waiting: Vec<_> = self.shared.slaves.iter().filter(|s| pending(s)).collect();
            if waiting.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self
                .shared
                .acked
                .1
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(200)))
                .expect("ack lock poisoned")
                .0;
        }
        drop(g);
        let mut failed = Vec::new();
        for s in &self.shared.slaves {
            let applied = s.applied.load(Ordering::Acquire);
            if s.lost.load(Ordering::Acquire) {
                error!(slave = %s.config.addr, "slave is out of sync (missed ops the log no longer holds)");
                failed.push(s.config.addr.clone());
            } else if !s.connected.load(Ordering::Acquire) {
                if applied < last {
                    warn!(slave = %s.config.addr, applied, last, "slave is disconnected and has not applied every op");
                }
            } else if applied < last {
                error!(slave = %s.config.addr, applied, last, "slave did not acknowledge every op before the deadline");
                failed.push(s.config.addr.clone());
            } else {
                info!(slave = %s.config.addr, applied, "slave has applied every op");
            }
        }
        // Give the links a moment to say Bye so the slaves log an orderly end.
        let bye_deadline = Instant::now() + Duration::from_secs(2);
        while self
            .shared
            .slaves
            .iter()
            .any(|s| s.connected.load(Ordering::Acquire))
            && Instant::now() < bye_deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        failed
    }
}
