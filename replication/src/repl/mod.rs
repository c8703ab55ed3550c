//! Replication: one total order of mutations, a bounded log, and one link per slave.
//!
//! [`Replicator::mutate`] is the only way a mutation reaches the backing tree. It holds the
//! order lock across the local syscall *and* the append to the log, so the sequence numbers
//! are exactly the order in which the mutations took effect on the master, whatever the number
//! of FUSE threads: a write and a rename can never be reordered on a slave.
//!
//! The log keeps encoded ops in memory until every slave has them. When it reaches its cap
//! and a slave still needs its oldest ops (it is slow, frozen or away), they spill to the
//! on-disk journal ([`journal`]), bounded by `--journal-size`. A slave whose next op is no
//! longer held anywhere, a new slave, and every slave after an unclean restart of the master
//! are brought back by an incremental sync ([`sync`]) instead. Memory and disk stay bounded
//! whatever the lag, and the master's writers never wait for a slow or dead slave.
//!
//! Lock order: the log (order) lock, then the inode table's lock; the ack lock is never held
//! with either.

mod inspector;
mod journal;
mod link;
mod sync;
mod transport;

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tdfs_protocol::{Compression, Epoch, History, Op, DEFAULT_PORT};
use tokio::sync::Notify;
use tracing::{error, info, warn};

use journal::{Journal, SegmentView};

use crate::node::NodeState;
pub use crate::node::SAVE_EVERY;
use crate::tree::Tree;
pub use inspector::Inspector;
pub use transport::{connect, BoxRead, BoxWrite};

/// A slave as configured on the command line.
#[derive(Debug, Clone)]
pub struct SlaveConfig {
    /// `host:port` as given (resolved at each connection attempt).
    pub addr: String,
    pub compression: Compression,
    pub nodelay: bool,
    /// A fallback upstream for this node (`,fallback`): it takes the node only while the
    /// node's own upstream is gone, and gives it back when that one returns.
    pub fallback: bool,
    /// Encrypt the frames to this node (`,encrypt`; `--encrypt` does it for every node).
    pub encrypt: bool,
}

impl SlaveConfig {
    /// Parses `HOST[:PORT][,z=N][,fallback][,encrypt]` (the `-c` syntax of both daemons;
    /// default port 4731, compression `default_z` unless `z=` says otherwise).
    pub fn parse(spec: &str, default_z: Compression, nodelay: bool) -> anyhow::Result<SlaveConfig> {
        let (addr, opts) = match spec.split_once(',') {
            Some((a, o)) => (a, Some(o)),
            None => (spec, None),
        };
        let mut compression = default_z;
        let mut fallback = false;
        let mut encrypt = false;
        if let Some(opts) = opts {
            for o in opts.split(',') {
                match o.split_once('=') {
                    Some(("z", v)) => {
                        compression = v
                            .parse::<u8>()
                            .ok()
                            .and_then(Compression::from_level)
                            .with_context(|| {
                                format!("bad compression level in slave spec {spec:?}")
                            })?;
                    }
                    None if o == "fallback" => fallback = true,
                    None if o == "encrypt" => encrypt = true,
                    _ => {
                        bail!(
                            "unknown option {o:?} in slave spec {spec:?} (expected z=0, z=1, z=2, \
                             fallback or encrypt)"
                        )
                    }
                }
            }
        }
        if addr.is_empty() {
            bail!("empty slave address in {spec:?}");
        }
        // HOST, HOST:PORT, [V6], [V6]:PORT, or a bare V6 address.
        let addr = if addr.starts_with('[') {
            if addr.ends_with(']') {
                format!("{addr}:{DEFAULT_PORT}")
            } else {
                addr.to_string()
            }
        } else if addr.matches(':').count() > 1 {
            format!("[{addr}]:{DEFAULT_PORT}")
        } else if addr.contains(':') {
            let (_, port) = addr.rsplit_once(':').expect("has colon");
            port.parse::<u16>()
                .with_context(|| format!("bad port in slave address {addr:?}"))?;
            addr.to_string()
        } else {
            format!("{addr}:{DEFAULT_PORT}")
        };
        Ok(SlaveConfig {
            addr,
            compression,
            nodelay,
            fallback,
            encrypt,
        })
    }

    /// The spec that parses back into this configuration.
    pub fn spec(&self) -> String {
        let z = match self.compression {
            Compression::None => 0,
            Compression::Lzf => 1,
            Compression::Lz4 => 2,
        };
        format!(
            "{},z={z}{}{}",
            self.addr,
            if self.fallback { ",fallback" } else { "" },
            if self.encrypt { ",encrypt" } else { "" }
        )
    }
}

/// When a mutation may return (`--sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncMode {
    /// Once applied locally (TDFS r3 behaviour).
    Async,
    /// Once every in-sync slave has received it.
    Received,
    /// Once every in-sync slave has applied it.
    Applied,
}

/// Which acknowledgement a writer waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckKind {
    Received,
    Applied,
    Durable,
}

/// What a link is doing, for logs and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LinkState {
    Disconnected = 0,
    Streaming = 1,
    Syncing = 2,
}

/// `need_from` of a slave that needs nothing old: it will be synced from the head.
const NEEDS_NOTHING: u64 = u64::MAX;

/// Live state of one slave, shared between its link task and the rest of the master.
#[derive(Debug)]
pub struct SlaveStatus {
    pub config: SlaveConfig,
    /// Highest sequence number the slave has applied (0: none yet).
    pub applied: AtomicU64,
    /// Highest sequence number durable on the slave.
    pub durable: AtomicU64,
    pub connected: AtomicBool,
    /// The oldest op this slave may still need; the log and journal keep everything from
    /// here on. [`NEEDS_NOTHING`] when the slave will be synced instead.
    need_from: AtomicU64,
    /// The slave must be brought back by a sync before it can stream again.
    pub needs_sync: AtomicBool,
    state: AtomicU8,
    /// The link task has ended (after the master began closing).
    settled: AtomicBool,
    /// Writers wait for this slave (`--sync received|applied`, fsync barriers): it is
    /// connected, streaming, and has kept up within `--sync-timeout`.
    pub in_sync: AtomicBool,
    /// Highest sequence number the slave has received (maybe not applied yet).
    pub received: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Bytes of frames before compression (for the compression ratio).
    pub raw_bytes_sent: AtomicU64,
    pub ops_sent: AtomicU64,
    pub reconnects: AtomicU64,
    pub apply_errors: AtomicU64,
    /// Taken out of the configuration (`tdfs slave remove`): the link ends.
    pub removed: AtomicBool,
    /// The last error seen for this slave (apply error with path and errno, or link error).
    pub last_error: Mutex<Option<String>>,
    /// What the slave calls itself (host and directory), from its handshake.
    pub peer_label: Mutex<String>,
    /// Syncs completed into this slave, and the file data they moved.
    pub syncs: AtomicU64,
    pub sync_bytes: AtomicU64,
    /// The last completed sync.
    pub last_sync: Mutex<Option<SyncReport>>,
    /// When the slave relays: its own replicas and theirs, as it last reported them.
    pub downstream: Mutex<Vec<tdfs_protocol::msg::DownNode>>,
    /// A fallback upstream refused because the node's own upstream holds it.
    pub standby: AtomicBool,
}

/// What one sync into a slave did.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    /// Why it ran (diverged, journal gone, new slave, ...).
    pub why: String,
    /// Entries compared, entries fixed, and file data sent, bytes.
    pub entries: u64,
    pub fixed: u64,
    pub bytes: u64,
    pub secs: f64,
    /// The slave preserved what the sync replaced (it held ops of another line).
    pub stashed: bool,
    /// Sequence number streaming resumed from.
    pub resumed_at: u64,
}

impl SlaveStatus {
    fn new(config: SlaveConfig, need_from: u64, needs_sync: bool) -> Self {
        SlaveStatus {
            config,
            applied: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            need_from: AtomicU64::new(need_from),
            needs_sync: AtomicBool::new(needs_sync),
            state: AtomicU8::new(LinkState::Disconnected as u8),
            settled: AtomicBool::new(false),
            in_sync: AtomicBool::new(false),
            received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            raw_bytes_sent: AtomicU64::new(0),
            ops_sent: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            apply_errors: AtomicU64::new(0),
            removed: AtomicBool::new(false),
            last_error: Mutex::new(None),
            peer_label: Mutex::new(String::new()),
            syncs: AtomicU64::new(0),
            sync_bytes: AtomicU64::new(0),
            last_sync: Mutex::new(None),
            downstream: Mutex::new(Vec::new()),
            standby: AtomicBool::new(false),
        }
    }

    pub fn set_peer_label(&self, l: &str) {
        *self.peer_label.lock().unwrap_or_else(|p| p.into_inner()) = l.to_string();
    }

    pub fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    pub fn state(&self) -> LinkState {
        match self.state.load(Ordering::Acquire) {
            1 => LinkState::Streaming,
            2 => LinkState::Syncing,
            _ => LinkState::Disconnected,
        }
    }

    fn set_state(&self, s: LinkState) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// At shutdown, whether the master should still wait for this slave to reach `last`.
    /// Decided from what the slave has applied first: a slave holding every op is done
    /// whatever its link does next (it may end its session between the drain's wait and
    /// its report, and must not then be called late).
    fn pending_at_close(&self, last: u64) -> bool {
        let done = self.applied.load(Ordering::Acquire) >= last
            && self.state() != LinkState::Syncing
            && !self.needs_sync.load(Ordering::Acquire);
        if done {
            false
        } else if self.connected.load(Ordering::Acquire) {
            true
        } else {
            // Its last connection attempt is still under way.
            !self.settled.load(Ordering::Acquire)
        }
    }
}

/// An encoded op in the log. A big op's crc32 state is worked out once, when it is logged,
/// and combined by every link into its frame's crc: with N slaves, a byte is checksummed once
/// instead of N times.
pub(crate) struct LogOp {
    pub(crate) bytes: Arc<[u8]>,
    /// The crc32 state of `bytes`, for an op of at least [`link::COMBINE_MIN`] bytes (a
    /// smaller one is checksummed in place). Worked out while the encoder's copy is still in
    /// this core's cache: a link thread would read it back from memory (measured: 0.09 s per
    /// GiB there).
    pub(crate) crc: Option<crc32fast::Hasher>,
}

impl LogOp {
    /// `precrc`: whether links checksum frames (see `Shared::precrc`).
    fn new(bytes: Arc<[u8]>, precrc: bool) -> Self {
        let crc = (precrc && bytes.len() >= link::COMBINE_MIN).then(|| {
            let mut h = crc32fast::Hasher::new();
            h.update(&bytes);
            h
        });
        Self { bytes, crc }
    }
}

struct Entry {
    seq: u64,
    data: Arc<LogOp>,
    /// When the op was issued, for lag in seconds.
    at: Instant,
}

pub(crate) struct Log {
    /// Sequence number the next mutation gets.
    next_seq: u64,
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Ops below this number are in the journal too: memory may let them go.
    spilled_to: u64,
    /// The journal as of its last change (the journal itself has its own lock, held while
    /// it is written, which the order lock never waits for).
    jview: JournalView,
}

/// What the order lock needs to know of the journal.
#[derive(Debug, Clone, Default)]
struct JournalView {
    front: Option<u64>,
    end: Option<u64>,
    bytes: u64,
    segs: Vec<SegmentView>,
}

impl JournalView {
    fn of(j: &Journal) -> Self {
        JournalView {
            front: j.front(),
            end: j.end(),
            bytes: j.bytes(),
            segs: j.view(),
        }
    }
}

impl Log {
    fn mem_front(&self) -> u64 {
        self.entries.front().map_or(self.next_seq, |e| e.seq)
    }

    /// The oldest op still held, in memory or in the journal.
    fn front(&self) -> u64 {
        match (self.jview.front, self.jview.end) {
            // The journal counts only while it joins up with memory.
            (Some(f), Some(e)) if e >= self.mem_front() => f.min(self.mem_front()),
            _ => self.mem_front(),
        }
    }
}

pub(crate) struct Shared {
    log: Mutex<Log>,
    /// The on-disk journal. Written by the spiller thread without the order lock (lock
    /// order: the log lock, then this one; the spiller never holds both).
    journal: Mutex<Journal>,
    /// Set (with a notify) when memory is over `mem_cap` and the spiller should write.
    spill: (Mutex<bool>, Condvar),
    /// `Log::bytes`, readable without the order lock: writers wait before taking it while
    /// memory is over the hard cap (the spiller is behind).
    mem_bytes: std::sync::atomic::AtomicUsize,
    room: (Mutex<()>, Condvar),
    /// Wakes link tasks when the log grows, a slave acknowledges, or the master closes.
    wake: Notify,
    /// The slaves; changed at runtime by `tdfs slave add/remove`.
    slaves: RwLock<Vec<Arc<SlaveStatus>>>,
    mem_cap: usize,
    /// Where this node's fencing and history live.
    node: Arc<NodeState>,
    /// The epochs of the ops this node feeds.
    history: RwLock<History>,
    /// First sequence number of this run: numbers before it that no slave holds were
    /// skipped (an unclean restart), not issued, and are no lag.
    base_seq: AtomicU64,
    /// Set once a replica reported a newer epoch: this master was replaced, and every
    /// mutation fails with EROFS from then on.
    fenced: AtomicBool,
    fence: Mutex<Option<Fence>>,
    /// Mutations are allowed until this CLOCK_MONOTONIC instant, in ns (u64::MAX: no lease).
    /// A node supervisor holding a leader lease in etcd keeps moving it; if the supervisor
    /// stops (cut off, stuck), writes stop by themselves before the lease can expire.
    lease_until: AtomicU64,
    label: String,
    closing: AtomicBool,
    /// Signalled on every acknowledgement, for [`Replicator::drain`].
    acked: (Mutex<()>, Condvar),
    /// The tree this node serves, for syncs to read.
    tree: Arc<dyn Tree>,
    /// Directory renames so far: a sync pass during which one happened walks again, since a
    /// directory may have moved from where the walk had yet to go to where it had been.
    dir_renames: AtomicU64,
    checksum_sync: bool,
    policy: Policy,
    /// This node relays what it applies from its own upstream: a replica ahead of it on its
    /// line waits for it to catch up, instead of being taken as diverged.
    relay: bool,
    /// A relay whose tree is at no known position (its upstream is syncing it, or it never
    /// followed any line yet): links neither connect nor stream until it is.
    paused: AtomicBool,
    /// Bumped when what a link agreed on at its handshake stops being true (a relay's line
    /// or log was reset): links of an older generation end and handshake again.
    generation: AtomicU64,
    /// A relay's answer to a replica that has seen a newer epoch: its upstream is stale.
    on_fenced: Option<FenceHook>,
    /// Links checksum their frames with crc32, so large ops get their crc state worked out
    /// once, when logged. Not with a shared secret and no TLS: every link then seals its
    /// frames with a MAC and sends no crc. (Rotation never takes the secret away.)
    precrc: bool,
}

/// Called with the newer epoch and the replica that reported it.
pub type FenceHook = Arc<dyn Fn(Epoch, &str) + Send + Sync>;

/// What writers wait for, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub mode: SyncMode,
    /// fsync returns once durable locally, without waiting for slaves.
    pub fsync_local: bool,
    /// How long a writer waits for a slave before that slave drops out of sync.
    pub timeout: Duration,
    /// Mutations fail with EIO when fewer slaves than this are in sync (after `timeout`).
    pub min_replicas: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            mode: SyncMode::Async,
            fsync_local: false,
            timeout: Duration::from_secs(5),
            min_replicas: 0,
        }
    }
}

/// The ops a mutation emits, in order (see [`Replicator::mutate_with`]).
#[derive(Default)]
pub struct Emit {
    ops: Vec<Arc<[u8]>>,
}

impl Emit {
    pub fn op(&mut self, op: Op) {
        let mut buf = Vec::with_capacity(64 + op.data_len());
        op.encode(&mut buf);
        self.ops.push(Arc::from(buf));
    }

    /// An op already encoded (or [`Replicator::seq_only`]).
    pub fn encoded(&mut self, data: Arc<[u8]>) {
        self.ops.push(data);
    }
}

/// What a link should send next.
pub(crate) enum BatchResult {
    Empty,
    /// Encoded ops from the given sequence number, from memory.
    Ops(u64, Vec<Arc<LogOp>>),
    /// The next ops are in the journal (read them without the lock), up to `stop`.
    Journal(Vec<SegmentView>, u64),
    /// The slave needs ops that are held nowhere any more.
    Lost,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().expect("log poisoned")
    }

    /// The current slaves (lock order: after the log lock).
    fn slaves(&self) -> RwLockReadGuard<'_, Vec<Arc<SlaveStatus>>> {
        self.slaves.read().expect("slave list poisoned")
    }

    /// What comes next for a link whose next op is `from`.
    fn batch_from(&self, from: u64, max_bytes: usize, max_ops: usize) -> BatchResult {
        let log = self.lock();
        let mem_front = log.mem_front();
        if from < mem_front {
            return match (log.jview.front, log.jview.end) {
                (Some(f), Some(e)) if f <= from && e >= mem_front => {
                    BatchResult::Journal(log.jview.segs.clone(), mem_front)
                }
                _ => BatchResult::Lost,
            };
        }
        let Some(first) = log.entries.front() else {
            return BatchResult::Empty;
        };
        let start = (from - first.seq) as usize;
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in log.entries.iter().skip(start) {
            let len = e.data.bytes.len();
            if !out.is_empty() && (bytes + len > max_bytes || out.len() >= max_ops) {
                break;
            }
            bytes += len;
            out.push(e.data.clone());
        }
        if out.is_empty() {
            BatchResult::Empty
        } else {
            BatchResult::Ops(from, out)
        }
    }

    fn head(&self) -> u64 {
        self.lock().next_seq
    }

    pub(crate) fn history(&self) -> History {
        self.history.read().expect("history poisoned").clone()
    }

    /// Whether mutations may go on: not fenced, and within the lease (if any).
    fn may_write(&self) -> io::Result<()> {
        if self.fenced.load(Ordering::Acquire) {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let until = self.lease_until.load(Ordering::Acquire);
        if until != u64::MAX && monotonic_ns() >= until {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        Ok(())
    }

    /// Whether the write lease (if any) still holds now.
    fn within_lease(&self) -> bool {
        let until = self.lease_until.load(Ordering::Acquire);
        until == u64::MAX || monotonic_ns() < until
    }

    /// A downstream node (`by`) reported `newer`, an epoch newer than this node's: another
    /// node was promoted, and this one must stop at once. Recorded in the state directory,
    /// so that this node never leads again without being made a replica first.
    pub(crate) fn fence(&self, newer: Epoch, by: &str) {
        if self.relay {
            // A relay takes no writes: its upstream is what was replaced. It records the
            // epoch (so that upstream is refused from now on) and lets it go; the links to
            // its replicas go on with whatever upstream comes next.
            if let Err(e) = self.node.heard_of(&newer) {
                error!("recording {newer} in {}: {e}", self.node.path().display());
            }
            warn!(
                slave = %by,
                "{by} has seen {newer}, newer than the line this relay follows: its upstream \
                 was replaced; dropping it until the new master connects"
            );
            if let Some(hook) = &self.on_fenced {
                hook(newer, by);
            }
            return;
        }
        // The flag first: whoever sees the fence recorded (status) must also find writes
        // refused.
        let first = !self.fenced.swap(true, Ordering::AcqRel);
        {
            let mut f = self.fence.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_none() {
                *f = Some(Fence {
                    newer,
                    by: by.to_string(),
                });
            }
        }
        if first {
            let mine = self.history().last().copied();
            error!(
                slave = %by,
                "FENCED: {by} has seen {newer}, newer than this node's {}: another node was \
                 promoted master, and this one stops taking writes (they fail with EROFS) and \
                 stops streaming. To rejoin as a replica of the new master: unmount, then run \
                 tdfs-slave on this directory with this --state-dir (whatever only this node \
                 holds will be stashed, not lost).",
                mine.map_or_else(|| "none".to_string(), |e| e.to_string())
            );
            for s in self.slaves().iter() {
                s.in_sync.store(false, Ordering::Release);
            }
            self.wake.notify_waiters();
            self.note_ack();
        }
        if let Err(e) = self.node.heard_of(&newer) {
            error!("recording {newer} in {}: {e}", self.node.path().display());
        }
    }

    /// Waits until `done()` holds or `deadline` passes, re-checking on every acknowledgement
    /// (and at least every 100 ms); returns whether `done()` held.
    fn wait_acked(&self, deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
        let mut g = self.acked.0.lock().expect("ack lock poisoned");
        loop {
            if done() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .acked
                .1
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(100)))
                .expect("ack lock poisoned")
                .0;
        }
    }

    fn note_ack(&self) {
        let _g = self.acked.0.lock().expect("ack lock poisoned");
        self.acked.1.notify_all();
    }

    /// Moves a slave's need point (ops before it may be dropped).
    fn set_need(&self, s: &SlaveStatus, from: u64) {
        s.need_from.store(from, Ordering::Release);
    }

    /// A slave that is streaming and has applied everything up to `head - 1` is back in
    /// sync: writers wait for it again.
    fn check_in_sync(&self, s: &SlaveStatus) {
        if s.in_sync.load(Ordering::Acquire) || s.state() != LinkState::Streaming {
            return;
        }
        let head = self.lock().next_seq;
        if s.applied.load(Ordering::Acquire) + 1 >= head && !s.in_sync.swap(true, Ordering::AcqRel)
        {
            info!(slave = %s.config.addr, "slave is in sync");
            self.note_ack();
        }
    }

    fn drop_out(&self, s: &SlaveStatus, why: &str) {
        if s.in_sync.swap(false, Ordering::AcqRel) {
            warn!(slave = %s.config.addr, "slave is out of sync ({why}); writers no longer wait for it");
        }
    }

    /// Marks a slave as needing a sync (its missing ops are not held any more).
    fn require_sync(&self, s: &SlaveStatus, why: &str) {
        if !s.needs_sync.swap(true, Ordering::AcqRel) {
            warn!(slave = %s.config.addr, "slave will be brought back by an incremental sync: {why}");
        }
        s.need_from.store(NEEDS_NOTHING, Ordering::Release);
    }

    /// Drops what no slave needs and what the journal holds already; when memory is still
    /// over its cap, asks the spiller to write the oldest ops out. Never writes itself: it
    /// runs under the order lock, and the journal's disk writes must not hold up writers.
    fn trim(&self, log: &mut Log) {
        let need = self.need();
        while let Some(e) = log.entries.front() {
            if e.seq < need || (log.bytes > self.mem_cap && e.seq < log.spilled_to) {
                log.bytes -= e.data.bytes.len();
                log.entries.pop_front();
            } else {
                break;
            }
        }
        self.mem_bytes.store(log.bytes, Ordering::Release);
        if log.bytes > self.mem_cap {
            let mut req = self.spill.0.lock().unwrap_or_else(|p| p.into_inner());
            if !*req {
                *req = true;
                self.spill.1.notify_one();
            }
        }
    }

    /// Empties the log and the journal and restarts the numbering at `next_seq` (a relay's
    /// tree moved to a position its log cannot lead to). Links handshake again.
    fn reset_locked(&self, log: &mut Log, next_seq: u64) {
        // Before the journal is cleared: a spill pass under way sees it and writes nothing.
        self.generation.fetch_add(1, Ordering::AcqRel);
        log.entries.clear();
        log.bytes = 0;
        self.mem_bytes.store(0, Ordering::Release);
        log.spilled_to = 0;
        log.next_seq = next_seq;
        {
            let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = j.clear() {
                error!("clearing the journal: {e}");
            }
            log.jview = JournalView::of(&j);
        }
        self.base_seq.store(next_seq, Ordering::Release);
        for s in self.slaves().iter() {
            s.need_from.store(next_seq, Ordering::Release);
        }
        self.room.1.notify_all();
    }

    /// The oldest op any slave may still need.
    fn need(&self) -> u64 {
        self.slaves()
            .iter()
            .map(|s| s.need_from.load(Ordering::Acquire))
            .min()
            .unwrap_or(NEEDS_NOTHING)
    }

    /// Memory may grow past `mem_cap` by this much while the spiller catches up; beyond it,
    /// writers wait for the disk.
    fn hard_cap(&self) -> usize {
        self.mem_cap + (self.mem_cap / 8).max(8 << 20)
    }

    /// Called before a mutation takes the order lock: waits while memory is over the hard
    /// cap (a slave is far behind and the journal's disk is slower than the writers).
    fn wait_room(&self) {
        if self.mem_bytes.load(Ordering::Acquire) <= self.hard_cap() {
            return;
        }
        let mut g = self.room.0.lock().unwrap_or_else(|p| p.into_inner());
        while self.mem_bytes.load(Ordering::Acquire) > self.hard_cap()
            && !self.closing.load(Ordering::Acquire)
        {
            g = self
                .room
                .1
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// One pass of the spiller: writes the oldest ops that memory cannot keep to the journal,
    /// a batch at a time, taking the order lock only to pick a batch and to let it go.
    fn spill_pass(&self) {
        const BATCH: usize = 16 << 20;
        loop {
            let gen = self.generation.load(Ordering::Acquire);
            let batch: Vec<(u64, Arc<LogOp>)> = {
                let log = self.lock();
                if log.bytes <= self.mem_cap {
                    return;
                }
                let from = log.spilled_to.max(self.need());
                let mut bytes = 0;
                let mut out = Vec::new();
                for e in log.entries.iter().filter(|e| e.seq >= from) {
                    if bytes >= BATCH {
                        break;
                    }
                    bytes += e.data.bytes.len();
                    out.push((e.seq, e.data.clone()));
                }
                out
            };
            let Some(&(last, _)) = batch.last() else {
                return;
            };
            let mut dropped_below = None;
            let mut failed = None;
            let view = {
                let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
                if self.generation.load(Ordering::Acquire) != gen {
                    // A relay's log was reset since the batch was picked: it is of no line
                    // any more.
                    return;
                }
                for (seq, op) in &batch {
                    match j.append(*seq, &op.bytes) {
                        Ok(Some(below)) => dropped_below = Some(below),
                        Ok(None) => {}
                        Err(e) => {
                            failed = Some((*seq, e));
                            break;
                        }
                    }
                }
                if failed.is_none() {
                    if let Err(e) = j.flush() {
                        failed = Some((batch[0].0, e));
                    }
                }
                if failed.is_some() {
                    let _ = j.clear();
                }
                JournalView::of(&j)
            };
            let mut log = self.lock();
            if self.generation.load(Ordering::Acquire) != gen {
                // Reset meanwhile: the reset cleared what was just written.
                return;
            }
            log.jview = view;
            if let Some(below) = dropped_below {
                for s in self.slaves().iter() {
                    if s.need_from.load(Ordering::Acquire) < below {
                        self.require_sync(s, "it is further behind than --journal-size");
                    }
                }
            }
            if let Some((at, err)) = failed {
                error!("writing the journal: {err}; slaves that need these ops will be synced");
                log.spilled_to = 0;
                for s in self.slaves().iter() {
                    if s.need_from.load(Ordering::Acquire) <= at.max(last) {
                        self.require_sync(s, "the journal could not be written");
                    }
                }
            } else {
                log.spilled_to = last + 1;
            }
            self.trim(&mut log);
            drop(log);
            self.room.1.notify_all();
        }
    }
}

/// See [`Replicator::relay_round`].
pub struct RelayRound<'a> {
    shared: &'a Shared,
    /// Whether anyone reads the log (else numbers are only used up, as on a master).
    keep: bool,
}

impl RelayRound<'_> {
    /// Applies op `seq` with `apply` and, once it succeeded, logs `data()` (its encoding)
    /// for this relay's replicas, both under the order lock, which is taken per op: a link
    /// sends op N while op N+1 applies, as on the master. An op below the head was applied
    /// before the last exit (a replay): it is applied, not logged again.
    pub fn op<T>(
        &mut self,
        seq: u64,
        apply: impl FnOnce() -> io::Result<T>,
        data: impl FnOnce() -> Arc<[u8]>,
    ) -> io::Result<T> {
        // Encoded (and checksummed) before the lock: only a failed op wastes it.
        let entry = self
            .keep
            .then(|| Arc::new(LogOp::new(data(), self.shared.precrc)));
        let mut log = self.shared.lock();
        if seq < log.next_seq {
            return apply();
        }
        if seq > log.next_seq {
            // The upstream streams without gaps and a sync resets the log first, so this is
            // a number skipped somewhere above: the ops in between are held nowhere here.
            warn!(
                seq,
                head = log.next_seq,
                "relay: upstream skipped sequence numbers; its replicas will be synced"
            );
            self.shared.reset_locked(&mut log, seq);
        }
        let v = apply()?;
        log.next_seq = seq + 1;
        if let Some(data) = entry {
            log.bytes += data.bytes.len();
            log.entries.push_back(Entry {
                seq,
                data,
                at: Instant::now(),
            });
            self.shared.trim(&mut log);
            drop(log);
            self.shared.wake.notify_waiters();
        }
        Ok(v)
    }
}

/// The spiller: a thread per engine that writes ops to the journal when memory is full,
/// so the writers' order lock never waits for the disk. Ends when the engine is dropped.
fn spawn_spiller(shared: &Arc<Shared>) {
    let weak = Arc::downgrade(shared);
    let r = std::thread::Builder::new()
        .name("tdfs-spill".into())
        .spawn(move || loop {
            let Some(shared) = weak.upgrade() else {
                return;
            };
            let requested = {
                let mut req = shared.spill.0.lock().unwrap_or_else(|p| p.into_inner());
                if !*req {
                    req = shared
                        .spill
                        .1
                        .wait_timeout(req, Duration::from_millis(500))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                std::mem::take(&mut *req)
            };
            if requested {
                shared.spill_pass();
            }
        });
    if let Err(e) = r {
        error!(
            "cannot start the journal spiller thread: {e}; ops beyond --queue-size stay in memory"
        );
    }
}

/// One slave in a [`Status`].
#[derive(Debug, Clone)]
pub struct SlaveSnapshot {
    pub addr: String,
    /// What the slave calls itself (from its handshake; empty before the first one).
    pub label: String,
    /// A relay's replicas, as it last reported them.
    pub downstream: Vec<tdfs_protocol::msg::DownNode>,
    /// streaming, catching up, syncing, disconnected or error.
    pub state: &'static str,
    pub in_sync: bool,
    pub applied: u64,
    pub durable: u64,
    pub lag_ops: u64,
    pub lag_bytes: u64,
    pub lag_secs: f64,
    pub bytes_sent: u64,
    pub raw_bytes_sent: u64,
    pub ops_sent: u64,
    pub reconnects: u64,
    pub apply_errors: u64,
    pub compressed: bool,
    pub last_error: Option<String>,
    pub syncs: u64,
    pub sync_bytes: u64,
    pub last_sync: Option<SyncReport>,
}

/// The replication state at one instant.
#[derive(Debug, Clone)]
pub struct Status {
    /// The epochs of the ops this node feeds (the last one is its current epoch).
    pub history: History,
    /// Set when a replica reported a newer epoch: writes fail, streaming stopped.
    pub fence: Option<Fence>,
    /// Time left on the write lease, when a node supervisor holds one (seconds; negative:
    /// expired, writes refused).
    pub lease_left: Option<f64>,
    /// Sequence number the next op gets.
    pub head: u64,
    /// Bytes of ops held in memory.
    pub queue_bytes: u64,
    /// Bytes of ops in the on-disk journal.
    pub journal_bytes: u64,
    pub slaves: Vec<SlaveSnapshot>,
    /// A relay's links are held while its own upstream syncs it.
    pub paused: bool,
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock a lease deadline is given in (the same
/// for every process on the machine, so a supervisor can hand its deadline to the master).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs a slave's link, and runs it again if it panics: a bug in one link (once, a codec
/// indexing past its buffer) must not end replication to that slave for good while the
/// master runs on as if nothing happened. The restarted link reconnects and resumes from
/// where the slave says it is.
fn spawn_link(rt: &tokio::runtime::Handle, shared: Arc<Shared>, s: Arc<SlaveStatus>) {
    rt.spawn(async move {
        loop {
            let r = tokio::spawn(link::run(shared.clone(), s.clone())).await;
            let Err(e) = r else { return };
            if !e.is_panic() {
                return; // cancelled: the runtime is shutting down
            }
            let payload = e.into_panic();
            let what = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|m| m.to_string()))
                .unwrap_or_else(|| "(no message)".into());
            error!(slave = %s.config.addr, "link task panicked ({what}); restarting it");
            s.set_error(format!("link task panicked: {what}"));
            s.connected.store(false, Ordering::Release);
            s.set_state(LinkState::Disconnected);
            shared.drop_out(&s, "its link failed");
            shared.note_ack();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// The handle the filesystem uses.
#[derive(Clone)]
pub struct Replicator {
    shared: Arc<Shared>,
    rt: tokio::runtime::Handle,
}

/// Where a feeding node's stream comes from: its state, its line of epochs, and where its
/// sequence numbers stand.
pub struct Origin {
    pub node: Arc<NodeState>,
    pub history: History,
    /// Sequence number of the next op.
    pub next_seq: u64,
    /// The previous run did not exit cleanly: ops before `next_seq` may be held nowhere, so
    /// every slave is synced.
    pub unclean: bool,
    /// The journal in the state directory holds ops of this line (else it is dropped).
    pub journal_valid: bool,
}

/// Why a master stopped taking writes: a replica reported a newer epoch.
#[derive(Debug, Clone)]
pub struct Fence {
    pub newer: Epoch,
    /// Which downstream node said so.
    pub by: String,
}

/// Sizes and files of the replication layer.
pub struct ReplConfig {
    pub label: String,
    /// In-memory log cap, bytes.
    pub mem_cap: usize,
    /// On-disk journal bound, bytes.
    pub journal_bytes: u64,
    /// The tree this node serves, for syncs.
    pub tree: Arc<dyn Tree>,
    /// Syncs compare content checksums even where metadata agree (`tdfs verify --repair`).
    pub checksum_sync: bool,
    pub policy: Policy,
    /// A relaying slave's engine (see `Shared::relay`).
    pub relay: bool,
    /// A relay: what to do when a replica reports a newer epoch than the relay's upstream
    /// (drop that upstream: it was replaced). A master fences itself instead.
    pub on_fenced: Option<FenceHook>,
    /// A relay whose tree is at no known position yet starts with its links held (see
    /// [`Replicator::relay_pause`]).
    pub paused: bool,
}

impl Replicator {
    /// Opens the journal and starts one link task per slave on `rt`.
    pub fn start(
        rt: &tokio::runtime::Handle,
        slaves: Vec<SlaveConfig>,
        origin: Origin,
        cfg: ReplConfig,
    ) -> io::Result<Self> {
        let mut journal = Journal::open(&origin.node.dir.join("journal"), cfg.journal_bytes)?;
        let mut next_seq = origin.next_seq;
        let sync_all = origin.unclean;
        if sync_all || !origin.journal_valid {
            // Ops issued just before a crash may be in no journal and on no slave; only
            // comparing trees can tell what the slaves lack. A journal left from another
            // role or epoch holds ops of another line.
            if journal.front().is_some() {
                info!(
                    "dropping the journal ({})",
                    if sync_all {
                        "the previous run ended uncleanly; every slave will be synced"
                    } else {
                        "it holds ops of an earlier epoch or role"
                    }
                );
            }
            journal.clear()?;
        } else if cfg.relay && journal.end().is_some_and(|e| e > next_seq) {
            // A relay logs an op only once it is applied and recorded: a journal past the
            // recorded position is from before a crash that lost the position's last
            // stores, and cannot be trusted to match this tree.
            journal.clear()?;
        } else if let Some(end) = journal.end() {
            next_seq = next_seq.max(end);
        }
        let front = journal
            .front()
            .filter(|_| journal.end() == Some(next_seq))
            .unwrap_or(next_seq);
        let slaves: Vec<_> = slaves
            .into_iter()
            .map(|config| {
                // Until a slave says where it is, keep everything the journal has.
                let need = if sync_all { NEEDS_NOTHING } else { front };
                Arc::new(SlaveStatus::new(config, need, sync_all))
            })
            .collect();
        let shared = Arc::new(Shared {
            log: Mutex::new(Log {
                next_seq,
                entries: VecDeque::new(),
                bytes: 0,
                spilled_to: 0,
                jview: JournalView::of(&journal),
            }),
            journal: Mutex::new(journal),
            spill: (Mutex::new(false), Condvar::new()),
            mem_bytes: std::sync::atomic::AtomicUsize::new(0),
            room: (Mutex::new(()), Condvar::new()),
            wake: Notify::new(),
            slaves: RwLock::new(slaves),
            mem_cap: cfg.mem_cap,
            node: origin.node,
            history: RwLock::new(origin.history),
            base_seq: AtomicU64::new(next_seq),
            fenced: AtomicBool::new(false),
            fence: Mutex::new(None),
            lease_until: AtomicU64::new(u64::MAX),
            label: cfg.label,
            closing: AtomicBool::new(false),
            acked: (Mutex::new(()), Condvar::new()),
            tree: cfg.tree,
            dir_renames: AtomicU64::new(0),
            checksum_sync: cfg.checksum_sync,
            policy: cfg.policy,
            relay: cfg.relay,
            paused: AtomicBool::new(cfg.paused),
            generation: AtomicU64::new(0),
            on_fenced: cfg.on_fenced,
            precrc: {
                let sec = crate::outbound::get();
                sec.tls.is_some() || sec.secrets().is_empty()
            },
        });
        spawn_spiller(&shared);
        for s in shared.slaves().iter() {
            spawn_link(rt, shared.clone(), s.clone());
        }
        Ok(Replicator {
            shared,
            rt: rt.clone(),
        })
    }

    /// Runs `f` (a mutation of the backing tree) under the order lock; if it succeeds and
    /// yields an op, the op gets the next sequence number and goes to every slave. Then,
    /// per `--sync`, waits for the in-sync slaves to receive or apply it.
    pub fn mutate<T>(&self, f: impl FnOnce() -> io::Result<(T, Option<Op>)>) -> io::Result<T> {
        self.mutate_seq(f).map(|(v, _)| v)
    }

    /// [`Replicator::mutate`], also returning the op's sequence number.
    pub fn mutate_seq<T>(
        &self,
        f: impl FnOnce() -> io::Result<(T, Option<Op>)>,
    ) -> io::Result<(T, Option<u64>)> {
        self.mutate_with(|emit| {
            let (value, op) = f()?;
            if let Some(op) = op {
                emit.op(op);
            }
            Ok(value)
        })
    }

    /// [`Replicator::mutate_seq`] for an op already encoded (the write path encodes its data
    /// straight into the shared buffer, see `tdfs_protocol::op::encode_write`).
    pub fn mutate_encoded<T>(
        &self,
        f: impl FnOnce() -> io::Result<(T, Option<Arc<[u8]>>)>,
    ) -> io::Result<(T, Option<u64>)> {
        self.mutate_with(|emit| {
            let (value, data) = f()?;
            if let Some(data) = data {
                emit.encoded(data);
            }
            Ok(value)
        })
    }

    /// Runs `f` (a mutation of the backing tree) under the order lock. Every op `f` emits
    /// gets the next sequence number, in the order emitted, and goes to every slave, *also
    /// when `f` then fails*: a syscall that fails after changing something (ext4 moves a
    /// file's times before it rejects a direct write, a multi-step setattr fails at its last
    /// step) must leave the replicas as it left the backing tree. On success, waits per
    /// `--sync` for the in-sync slaves. Returns the last op's sequence number.
    pub fn mutate_with<T>(
        &self,
        f: impl FnOnce(&mut Emit) -> io::Result<T>,
    ) -> io::Result<(T, Option<u64>)> {
        let policy = self.shared.policy;
        if policy.min_replicas > 0 {
            self.wait_replicas()?;
        }
        self.shared.wait_room();
        let mut emit = Emit::default();
        let mut log = self.shared.lock();
        // Under the order lock: once fenced (or once the lease ran out), no mutation reaches
        // the backing tree, not even one that was already waiting for the lock.
        self.shared.may_write()?;
        let result = f(&mut emit);
        if emit.ops.is_empty() {
            return result.map(|v| (v, None));
        }
        let mut last = 0;
        let mut logged = false;
        for data in emit.ops {
            let seq = log.next_seq;
            log.next_seq += 1;
            last = seq;
            if tracing::enabled!(tracing::Level::TRACE) {
                match Op::decode(&data) {
                    Ok(op) => {
                        tracing::trace!(seq, op = op.name(), path = ?op.primary_path(), kind = ?op.kind, touch = ?op.touch, failed = result.is_err(), "emit")
                    }
                    Err(_) => tracing::trace!(seq, "emit (sequence number only)"),
                }
            }
            if data.is_empty() {
                // Nobody to send it to (see `replicating`): the number is still used up, so a
                // slave that comes back later knows it missed something and is synced.
                continue;
            }
            log.bytes += data.len();
            log.entries.push_back(Entry {
                seq,
                data: Arc::new(LogOp::new(data, self.shared.precrc)),
                at: Instant::now(),
            });
            logged = true;
        }
        if logged {
            self.shared.trim(&mut log);
        }
        drop(log);
        if logged {
            self.shared.wake.notify_waiters();
        }
        let value = result?;
        if logged {
            match policy.mode {
                SyncMode::Async => {}
                SyncMode::Received => self.wait_acks(last, AckKind::Received)?,
                SyncMode::Applied => self.wait_acks(last, AckKind::Applied)?,
            }
            if policy.mode != SyncMode::Async && !self.shared.within_lease() {
                // The replicas confirmed it only after the write lease ran out: by then a
                // node supervisor elsewhere may be comparing the replicas' positions to pick
                // a new master, so this write may not be counted. It is not acknowledged:
                // an acknowledged write is one a replica held while this node could still
                // prove it was the master.
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        Ok((value, Some(last)))
    }

    /// An op for [`Replicator::mutate_encoded`] that only uses up a sequence number.
    pub fn seq_only() -> Arc<[u8]> {
        Arc::from(Vec::new())
    }

    /// Whether any slave is configured. Called under the order lock by a mutation that
    /// may skip encoding its op when nobody would read it (it then yields
    /// [`Replicator::seq_only`]). A slave added meanwhile is safe: it starts with a
    /// sync from the head it reads under this lock, after that mutation.
    pub fn replicating(&self) -> bool {
        !self.shared.slaves().is_empty()
    }

    /// A relay's round of ops from its upstream: each is applied and logged under the order
    /// lock, so a sync this relay feeds reads its tree exactly as of the ops it has sent (as
    /// a master's syncs do). Ops keep the upstream's
    /// sequence numbers: a position means the same thing at every level of the tree.
    pub fn relay_round(&self) -> RelayRound<'_> {
        self.shared.wait_room();
        RelayRound {
            keep: !self.shared.slaves().is_empty(),
            shared: &self.shared,
        }
    }

    /// A relay's tree was just made identical to its upstream's as of `next_seq - 1` (a
    /// sync ended), or follows another line from here (`history`): what the log held means
    /// nothing any more. Every link handshakes again; replicas at exactly this position
    /// resume, the others are synced from this relay's tree.
    pub fn relay_reset(&self, next_seq: u64, history: Option<History>) {
        let mut log = self.shared.lock();
        self.shared.reset_locked(&mut log, next_seq);
        if let Some(h) = history {
            *self.shared.history.write().expect("history poisoned") = h;
        }
        drop(log);
        self.relay_resume();
    }

    /// A relay's upstream changed its line without a sync (the relay was behind on the new
    /// master's line): links handshake again, so every replica learns the new epoch.
    pub fn relay_set_history(&self, history: History) {
        let changed = {
            let _log = self.shared.lock();
            let mut h = self.shared.history.write().expect("history poisoned");
            let changed = *h != history;
            *h = history;
            changed
        };
        if changed {
            self.shared.generation.fetch_add(1, Ordering::AcqRel);
            self.shared.wake.notify_waiters();
        }
    }

    /// A relay's tree is about to be rewritten by a sync from its upstream: nothing in it
    /// may be fed to its replicas until that ends ([`Replicator::relay_reset`]). Links end,
    /// and a sync they were feeding is abandoned before its end (the replica stays marked
    /// as syncing, so it is synced again).
    pub fn relay_pause(&self) {
        if !self.shared.paused.swap(true, Ordering::AcqRel) {
            info!("upstream is syncing this relay: its replicas wait until it is done");
        }
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        self.shared.wake.notify_waiters();
    }

    fn relay_resume(&self) {
        if self.shared.paused.swap(false, Ordering::AcqRel) {
            info!("relay at a known position again: feeding its replicas");
        }
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        self.shared.wake.notify_waiters();
        self.shared.note_ack();
    }

    /// Whether the links are held (see [`Replicator::relay_pause`]).
    pub fn paused(&self) -> bool {
        self.shared.paused.load(Ordering::Acquire)
    }

    /// The fsync barrier: every in-sync slave has made everything up to `seq` durable
    /// (unless `--fsync-local`).
    pub fn fsync_barrier(&self, seq: u64) -> io::Result<()> {
        if self.shared.policy.fsync_local {
            return Ok(());
        }
        self.wait_acks(seq, AckKind::Durable)
    }

    fn in_sync_count(&self) -> usize {
        self.shared
            .slaves()
            .iter()
            .filter(|s| s.in_sync.load(Ordering::Acquire))
            .count()
    }

    /// Waits (up to `--sync-timeout`) until `--min-replicas` slaves are in sync; EIO if not.
    fn wait_replicas(&self) -> io::Result<()> {
        let p = self.shared.policy;
        if self.in_sync_count() >= p.min_replicas {
            return Ok(());
        }
        let deadline = Instant::now() + p.timeout;
        if self
            .shared
            .wait_acked(deadline, || self.in_sync_count() >= p.min_replicas)
        {
            return Ok(());
        }
        warn!(
            in_sync = self.in_sync_count(),
            required = p.min_replicas,
            "fewer slaves in sync than --min-replicas: failing the mutation with EIO"
        );
        Err(io::Error::from_raw_os_error(libc::EIO))
    }

    /// Waits until every in-sync slave has acknowledged `seq` as `kind`. A slave that takes
    /// longer than `--sync-timeout` drops out of sync instead of holding writers.
    fn wait_acks(&self, seq: u64, kind: AckKind) -> io::Result<()> {
        let p = self.shared.policy;
        let value = |s: &SlaveStatus| match kind {
            AckKind::Received => s
                .received
                .load(Ordering::Acquire)
                .max(s.applied.load(Ordering::Acquire)),
            AckKind::Applied => s.applied.load(Ordering::Acquire),
            AckKind::Durable => s.durable.load(Ordering::Acquire),
        };
        let deadline = Instant::now() + p.timeout;
        let waiting = || -> Vec<Arc<SlaveStatus>> {
            self.shared
                .slaves()
                .iter()
                .filter(|s| s.in_sync.load(Ordering::Acquire) && value(s) < seq)
                .cloned()
                .collect()
        };
        if !self.shared.wait_acked(deadline, || waiting().is_empty()) {
            for s in &waiting() {
                self.shared.drop_out(s, "slower than --sync-timeout");
            }
        }
        if self.in_sync_count() < p.min_replicas {
            warn!(
                seq,
                in_sync = self.in_sync_count(),
                required = p.min_replicas,
                "mutation not confirmed by --min-replicas slaves: EIO"
            );
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    /// Called (under the order lock, from a mutation) when a directory was renamed.
    pub fn note_dir_rename(&self) {
        self.shared.dir_renames.fetch_add(1, Ordering::AcqRel);
    }

    /// Adds a slave at runtime: it gets an initial sync, then streams.
    pub fn add_slave(&self, config: SlaveConfig) -> Result<(), String> {
        let mut list = self.shared.slaves.write().expect("slave list poisoned");
        if list.iter().any(|s| s.config.addr == config.addr) {
            return Err(format!("{} is already a slave", config.addr));
        }
        let s = Arc::new(SlaveStatus::new(config, NEEDS_NOTHING, true));
        info!(slave = %s.config.addr, "slave added");
        list.push(s.clone());
        drop(list);
        spawn_link(&self.rt, self.shared.clone(), s);
        Ok(())
    }

    /// Removes a slave at runtime: its link ends and nothing waits for it any more.
    pub fn remove_slave(&self, addr: &str) -> Result<(), String> {
        let mut list = self.shared.slaves.write().expect("slave list poisoned");
        let Some(i) = list.iter().position(|s| s.config.addr == addr) else {
            return Err(format!("{addr} is not a slave"));
        };
        let s = list.remove(i);
        drop(list);
        s.removed.store(true, Ordering::Release);
        s.in_sync.store(false, Ordering::Release);
        self.shared.wake.notify_waiters();
        self.shared.note_ack();
        info!(slave = %addr, "slave removed");
        Ok(())
    }

    /// The slaves' configurations, in order.
    pub fn slave_configs(&self) -> Vec<SlaveConfig> {
        self.shared
            .slaves()
            .iter()
            .map(|s| s.config.clone())
            .collect()
    }

    /// A snapshot for `tdfs status` and metrics.
    pub fn status(&self) -> Status {
        let slaves: Vec<Arc<SlaveStatus>> = self.shared.slaves().clone();
        let log = self.shared.lock();
        let head = log.next_seq;
        let mem_front = log.mem_front();
        let journal_bytes = log.jview.bytes;
        let snaps = slaves
            .iter()
            .map(|s| {
                let applied = s.applied.load(Ordering::Acquire);
                let connected = s.connected.load(Ordering::Acquire);
                let state = s.state();
                // Numbers skipped at an unclean restart were never issued: they are no lag.
                let lag_ops = head.saturating_sub(
                    (applied + 1).max(self.shared.base_seq.load(Ordering::Acquire)),
                );
                let (mut lag_bytes, mut oldest) = (0u64, None);
                for e in log.entries.iter().filter(|e| e.seq > applied) {
                    lag_bytes += e.data.bytes.len() as u64;
                    oldest.get_or_insert(e.at);
                }
                if applied + 1 < mem_front {
                    lag_bytes += journal_bytes;
                }
                let lag_secs = if lag_ops == 0 {
                    0.0
                } else {
                    oldest
                        .or_else(|| log.entries.front().map(|e| e.at))
                        .map_or(0.0, |t| t.elapsed().as_secs_f64())
                };
                let last_error = s
                    .last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let state_name = match (connected, state) {
                    (true, LinkState::Syncing) => "syncing",
                    (true, LinkState::Streaming) if s.in_sync.load(Ordering::Acquire) => {
                        "streaming"
                    }
                    (true, _) => "catching up",
                    (false, _) if s.standby.load(Ordering::Acquire) => "standby",
                    (false, _)
                        if last_error.is_some() && s.apply_errors.load(Ordering::Relaxed) > 0 =>
                    {
                        "error"
                    }
                    (false, _) => "disconnected",
                };
                SlaveSnapshot {
                    addr: s.config.addr.clone(),
                    label: s
                        .peer_label
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                    downstream: s
                        .downstream
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                    state: state_name,
                    in_sync: s.in_sync.load(Ordering::Acquire),
                    applied,
                    durable: s.durable.load(Ordering::Acquire),
                    lag_ops,
                    lag_bytes,
                    lag_secs,
                    bytes_sent: s.bytes_sent.load(Ordering::Relaxed),
                    raw_bytes_sent: s.raw_bytes_sent.load(Ordering::Relaxed),
                    ops_sent: s.ops_sent.load(Ordering::Relaxed),
                    reconnects: s.reconnects.load(Ordering::Relaxed),
                    apply_errors: s.apply_errors.load(Ordering::Relaxed),
                    compressed: s.config.compression != Compression::None,
                    last_error,
                    syncs: s.syncs.load(Ordering::Relaxed),
                    sync_bytes: s.sync_bytes.load(Ordering::Relaxed),
                    last_sync: s
                        .last_sync
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                }
            })
            .collect();
        Status {
            history: self.shared.history(),
            fence: self
                .shared
                .fence
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            lease_left: {
                let until = self.shared.lease_until.load(Ordering::Acquire);
                (until != u64::MAX).then(|| (until as f64 - monotonic_ns() as f64) / 1e9)
            },
            head,
            queue_bytes: log.bytes as u64,
            journal_bytes,
            slaves: snaps,
            paused: self.shared.paused.load(Ordering::Acquire),
        }
    }

    /// Allows mutations until `until` (CLOCK_MONOTONIC ns; u64::MAX: no lease).
    pub fn set_lease(&self, until: u64) {
        self.shared.lease_until.store(until, Ordering::Release);
    }

    /// Stops mutations now (`tdfs fence`, a planned switchover, a supervisor losing its
    /// lease): they fail with EROFS. Reads go on.
    /// Once this returns, no mutation is in flight: one that passed the check before the
    /// store has emitted its ops (it held the order lock throughout), so `last_seq()` is
    /// final. Blocks on the order lock: call it from a blocking thread.
    pub fn stop_writes(&self) {
        self.shared.lease_until.store(0, Ordering::Release);
        drop(self.shared.lock());
    }

    /// Whether a replica reported a newer epoch (this master was replaced).
    pub fn fenced(&self) -> Option<Fence> {
        self.shared
            .fence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The epochs of the ops this node feeds.
    pub fn history(&self) -> History {
        self.shared.history()
    }

    /// The status of the `i`th slave.
    pub fn slave(&self, i: usize) -> Arc<SlaveStatus> {
        self.shared.slaves()[i].clone()
    }

    /// Sequence number of the last op issued (0 when none).
    pub fn last_seq(&self) -> u64 {
        self.shared.head().saturating_sub(1)
    }

    pub fn next_seq(&self) -> u64 {
        self.shared.head()
    }

    /// Waits until every connected slave has applied and made durable everything up to
    /// `seq` (or `timeout` passes); true when they all did. A slave that is away counts as
    /// not done.
    pub fn wait_durable(&self, seq: u64, timeout: Duration) -> bool {
        if seq == 0 {
            return true;
        }
        // A durability barrier for what is applied but not yet durable: a sequence number
        // used up by nothing else (writes are stopped), streamed as an fsync of the whole
        // tree.
        let barrier = {
            let mut log = self.shared.lock();
            let seq = log.next_seq;
            log.next_seq += 1;
            let mut buf = Vec::new();
            Op::new(tdfs_protocol::OpKind::Fsync {
                path: None,
                datasync: false,
            })
            .encode(&mut buf);
            log.bytes += buf.len();
            log.entries.push_back(Entry {
                seq,
                data: Arc::new(LogOp::new(Arc::from(buf), self.shared.precrc)),
                at: Instant::now(),
            });
            seq
        };
        self.shared.wake.notify_waiters();
        let deadline = Instant::now() + timeout;
        self.shared.wait_acked(deadline, || {
            self.shared
                .slaves()
                .iter()
                .all(|s| s.durable.load(Ordering::Acquire) >= barrier.max(seq))
        })
    }

    /// Waits until every connected slave has applied everything (or `timeout` passes), ends
    /// the sessions, and keeps on disk what absent slaves still need. Returns the slaves that
    /// could not finish.
    pub fn drain(&self, timeout: Duration) -> Vec<String> {
        let last = self.last_seq();
        let deadline = Instant::now() + timeout;
        self.shared.closing.store(true, Ordering::Release);
        self.shared.wake.notify_waiters();
        self.shared.wait_acked(deadline, || {
            !self
                .shared
                .slaves()
                .iter()
                .any(|s| s.pending_at_close(last))
        });
        let mut failed = Vec::new();
        for s in self.shared.slaves().iter() {
            let applied = s.applied.load(Ordering::Acquire);
            if s.pending_at_close(last) {
                error!(slave = %s.config.addr, applied, last, "slave did not acknowledge every op before the deadline");
                failed.push(s.config.addr.clone());
            } else if !s.connected.load(Ordering::Acquire) && applied < last {
                warn!(slave = %s.config.addr, applied, last, "slave is away; it will catch up when the master runs again");
            } else if applied >= last {
                info!(slave = %s.config.addr, applied, "slave has applied every op");
            }
        }
        // What absent slaves still need goes to the journal, so a restart resumes them.
        {
            let mut log = self.shared.lock();
            let need = self
                .shared
                .slaves()
                .iter()
                .map(|s| s.need_from.load(Ordering::Acquire))
                .min()
                .unwrap_or(NEEDS_NOTHING);
            let entries: Vec<Entry> = log.entries.drain(..).collect();
            log.bytes = 0;
            let mut j = self
                .shared
                .journal
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // What the spiller wrote already is there (memory kept a copy of it).
            let held = j.end().unwrap_or(0);
            for e in entries.into_iter().filter(|e| e.seq >= need.max(held)) {
                if let Err(err) = j.append(e.seq, &e.data.bytes) {
                    error!("writing the journal at exit: {err}");
                    break;
                }
            }
            if let Err(err) = j.sync() {
                error!("syncing the journal at exit: {err}");
            }
            log.jview = JournalView::of(&j);
        }
        // Give the links a moment to say Bye so the slaves log an orderly end (a link
        // signals the ack condvar when its connection ends).
        self.shared
            .wait_acked(Instant::now() + Duration::from_secs(2), || {
                !self
                    .shared
                    .slaves()
                    .iter()
                    .any(|s| s.connected.load(Ordering::Acquire))
            });
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slave() -> SlaveStatus {
        SlaveStatus::new(
            SlaveConfig {
                addr: "127.0.0.1:1".into(),
                compression: Compression::None,
                nodelay: true,
                fallback: false,
                encrypt: false,
            },
            1,
            false,
        )
    }

    #[test]
    fn caught_up_slave_is_not_pending_while_its_session_ends() {
        let s = slave();
        s.connected.store(true, Ordering::Release);
        s.set_state(LinkState::Streaming);
        s.applied.store(415, Ordering::Release);
        assert!(!s.pending_at_close(415));
        // The link has just ended its session and not yet marked itself settled: the
        // state a drain once read between its wait and its report.
        s.connected.store(false, Ordering::Release);
        s.set_state(LinkState::Disconnected);
        assert!(!s.pending_at_close(415));
    }

    #[test]
    fn behind_slave_is_pending_until_its_link_settles() {
        let s = slave();
        s.connected.store(true, Ordering::Release);
        s.applied.store(10, Ordering::Release);
        assert!(s.pending_at_close(11));
        s.connected.store(false, Ordering::Release);
        assert!(s.pending_at_close(11), "its last attempt is under way");
        s.settled.store(true, Ordering::Release);
        assert!(
            !s.pending_at_close(11),
            "gave up: reported as away, not waited for"
        );
    }

    #[test]
    fn syncing_or_sync_needing_slave_is_pending_though_applied_is_high() {
        let s = slave();
        s.connected.store(true, Ordering::Release);
        s.applied.store(20, Ordering::Release);
        s.set_state(LinkState::Syncing);
        assert!(s.pending_at_close(20));
        s.set_state(LinkState::Streaming);
        s.needs_sync.store(true, Ordering::Release);
        assert!(s.pending_at_close(20));
    }
}
