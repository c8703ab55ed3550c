//! One master session: framing, handshake, applying batches in order, acknowledging.
//!
//! Nothing a peer sends may crash the slave or reach the tree unless it is a whole, valid
//! frame carrying the next expected sequence number. Anything else ends the connection (and
//! only the connection).

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tdfs_protocol::frame::{self, FrameType};
use tdfs_protocol::history::{self, Standing};
use tdfs_protocol::msg::{
    ack_flags, Ack, ApplyError, Hello, HelloAck, Refuse, RefuseCode, PROTO_MAX, PROTO_MIN,
};
use tdfs_protocol::{Epoch, History};
use tdfs_replication::node::NodeRecord;

use tdfs_protocol::{op, Compression, FrameError, Op, OpKind, WirePath, HEADER_LEN, MAX_PAYLOAD};
use tdfs_replication::position::State;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::apply::op_paths;
use crate::listener::Shared;
use tdfs_protocol::auth::{show_key_id, KeyId};
use tdfs_protocol::seal::{Rx, Tx};
use tdfs_protocol::Frame;
use tdfs_replication::accept::{BoxRead, BoxWrite, Conn};
use tdfs_replication::security::Secret;

/// The read buffer never needs more than one whole frame plus what is already parsed out.
const BUF_MAX: usize = MAX_PAYLOAD + HEADER_LEN;

const READ_CHUNK: usize = 256 * 1024;

/// Below this much spare room, a read first makes more.
const MIN_READ: usize = 64 * 1024;

const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a session ended early (logged once by [`run`]).
enum End {
    /// The peer closed the connection.
    Eof,
    /// The process is shutting down.
    Stopping,
    Io(io::Error),
    /// The peer sent something we refuse to go on with; logged at warn.
    Protocol(String),
    /// An op failed to apply; already logged at error.
    Applied,
    /// The master said goodbye.
    Bye,
    /// Another master took the slot over (see `listener::preempts`).
    Preempted,
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        End::Io(e)
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Eof => f.write_str("connection closed by master"),
            End::Stopping => f.write_str("slave shutting down"),
            End::Io(e) => write!(f, "i/o error: {e}"),
            End::Protocol(m) => f.write_str(m),
            End::Applied => f.write_str("apply error"),
            End::Bye => f.write_str("master said bye"),
            End::Preempted => f.write_str("another master took this replica over"),
        }
    }
}

struct Session {
    rd: BoxRead,
    wr: BoxWrite,
    /// Frames every frame sent, and checks every frame received (sealed, after a
    /// shared-secret exchange outside TLS).
    tx: Tx,
    rx: Rx,
    /// The secret the master proved, and the secrets accepted now: when SIGHUP retires
    /// that secret, the session ends.
    secret: Option<KeyId>,
    secrets: watch::Receiver<Arc<Vec<Secret>>>,
    /// The Hello, taken off the connection by the listener.
    first: Option<Frame>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    /// This session's claim on the tree, and the signal that another master took it over.
    ticket: u64,
    preempted: watch::Receiver<bool>,
    /// Received bytes not parsed yet. Whole frames are split off the front and frozen, so
    /// the ops decoded from them point into this allocation instead of copies.
    buf: BytesMut,
    /// The upstream's history: this tree's once a sync ends (or at once, when it was on that
    /// line already).
    upstream: History,
    /// This tree diverged from the upstream's line: the coming sync stashes first.
    diverged: bool,
    /// Sequence number the next op must carry.
    expected: u64,
    /// Whether an Ops frame fixed `expected` yet.
    started: bool,
    /// Between SyncBegin and SyncEnd: live ops that fail because the replica differs are
    /// skipped and reported, since the sync rewrites what they touch.
    syncing: bool,
    /// Highest sequence number received (acknowledged before it is applied).
    received: u64,
    /// Last applied seq from the state file at handshake, and whether it continues the
    /// upstream's line as it is (no sync needed first).
    prev: (u64, bool),
    durable: u64,
    /// Protocol version agreed at the handshake.
    proto: u16,
    /// When a relay next tells its upstream about its own replicas.
    report_at: Option<tokio::time::Instant>,
}

/// How often a relay reports its replicas upstream.
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs a session to its end; never returns an error, only logs it.
pub async fn run(
    conn: Conn,
    peer: SocketAddr,
    shared: Arc<Shared>,
    first: Frame,
    rest: Vec<u8>,
    slot: &crate::listener::SlotGuard,
) {
    let stop = shared.stop_rx();
    let secrets = shared.security().watch_secrets();
    let mut s = Session {
        rd: conn.rd,
        wr: conn.wr,
        tx: conn.tx,
        rx: conn.rx,
        secret: conn.secret,
        secrets,
        first: Some(first),
        peer,
        shared,
        stop,
        ticket: slot.ticket,
        preempted: slot.preempted.clone(),
        buf: BytesMut::from(&rest[..]),
        upstream: History::default(),
        diverged: false,
        expected: 0,
        started: false,
        syncing: false,
        received: 0,
        prev: (0, false),
        durable: 0,
        proto: PROTO_MIN,
        report_at: None,
    };
    tracing::debug!("connection from {peer}");
    let end = s.serve().await;
    s.shared.stats.connected.store(false, Ordering::Relaxed);
    if matches!(end, End::Stopping) {
        let r = Refuse::new(RefuseCode::ShuttingDown, "slave is shutting down");
        let _ = s.send(FrameType::Refuse, &r.encode()).await;
    }
    match &end {
        End::Protocol(m) => tracing::warn!("closing connection from {peer}: {m}"),
        End::Io(e) => tracing::warn!("connection from {peer} failed: {e}"),
        End::Bye | End::Eof | End::Stopping | End::Applied | End::Preempted => {
            tracing::info!("session with {peer} ended: {end}")
        }
    }
    let _ = s.wr.shutdown().await;
    if matches!(end, End::Protocol(_)) {
        tdfs_replication::conn::linger(&mut s.rd).await;
    }
}

impl Session {
    async fn send(&mut self, kind: FrameType, payload: &[u8]) -> io::Result<()> {
        let f = self.tx.encode_vec(kind, 0, payload, Compression::None);
        self.wr.write_all(&f).await
    }

    async fn refuse(&mut self, code: RefuseCode, message: String) -> End {
        let _ = self
            .send(
                FrameType::Refuse,
                &Refuse::new(code, message.clone()).encode(),
            )
            .await;
        End::Protocol(message)
    }

    /// Reads more bytes into the buffer; ends the session on EOF or shutdown.
    async fn read_more(&mut self) -> Result<(), End> {
        if self.buf.len() >= BUF_MAX {
            // Cannot happen with a valid frame (check() bounds lengths); be safe anyway.
            return Err(self
                .refuse(RefuseCode::Malformed, "read buffer overflow".into())
                .await);
        }
        // Once a frame's header is in, room is made for all of it: a new allocation then
        // copies only the part already received, and the rest arrives in place.
        let rest = match frame::frame_len(&self.buf) {
            Ok(total) => total.saturating_sub(self.buf.len()),
            Err(_) => 0,
        };
        if self.buf.capacity() - self.buf.len() < rest.max(MIN_READ) {
            self.buf.reserve(rest.max(READ_CHUNK));
        }
        let report_at = self.report_at;
        let secret = self.secret;
        let res = tokio::select! {
            // Cancel safe: on cancellation nothing was read.
            r = self.rd.read_buf(&mut self.buf) => Some(Ok(r)),
            _ = self.stop.wait_for(|s| *s) => None,
            _ = self.preempted.wait_for(|p| *p) => Some(Err(End::Preempted)),
            _ = tokio::time::sleep_until(report_at.unwrap_or_else(tokio::time::Instant::now)),
                if report_at.is_some() => Some(Ok(Ok(usize::MAX))),
            _ = self.secrets.wait_for(|s| !tdfs_replication::accept::still_accepted(s, secret)) => {
                Some(Err(End::Protocol(format!(
                    "the secret this session authenticated with ({}) is no longer accepted \
                     (secret files re-read); closing",
                    secret.map(|k| show_key_id(&k)).unwrap_or_default()
                ))))
            }
        };
        if let Some(Ok(Ok(usize::MAX))) = res {
            // Nothing read: time to report (the caller then reads again).
            return self.report_downstream().await;
        }
        let res = match res {
            Some(Err(end)) => return Err(end),
            Some(Ok(r)) => Some(r),
            None => None,
        };
        match res {
            None => Err(End::Stopping),
            Some(Ok(0)) => Err(End::Eof),
            Some(Ok(n)) => {
                self.shared
                    .stats
                    .bytes_received
                    .fetch_add(n as u64, Ordering::Relaxed);
                Ok(())
            }
            Some(Err(e)) => Err(End::Io(e)),
        }
    }

    /// A relay tells its upstream where its own replicas stand (once a second, whether or
    /// not ops flow), so the master's status shows the whole tree.
    async fn report_downstream(&mut self) -> Result<(), End> {
        let Some(at) = self.report_at else {
            return Ok(());
        };
        if tokio::time::Instant::now() < at {
            return Ok(());
        }
        self.report_at = Some(at + REPORT_EVERY);
        let Some(feeds) = self.shared.feeds().cloned() else {
            return Ok(());
        };
        let d = feeds.report();
        self.send(FrameType::Downstream, &d.encode()).await?;
        Ok(())
    }

    /// Takes every whole frame off the front of the buffer (up to a memory budget), and the
    /// framing error that stopped the scan, if any.
    fn take_frames(&mut self) -> (Vec<Received>, Option<FrameError>) {
        let mut frames = Vec::new();
        let mut budget = 0usize;
        let mut err = None;
        // Compressed frames expand; bound what one round holds in memory.
        while budget < MAX_PAYLOAD {
            // Sealed: the tag is checked (and the payload decrypted in place) first.
            let (kind, seq, wire_len, len, inflated) = match self.rx.parse(&mut self.buf) {
                Ok(f) => {
                    let len = f.payload.len();
                    let inflated = match f.payload {
                        Cow::Owned(v) => Some(v),
                        Cow::Borrowed(_) => None,
                    };
                    (f.kind, f.seq, f.wire_len, len, inflated)
                }
                Err(FrameError::Incomplete) => break,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            };
            let whole = self.buf.split_to(wire_len).freeze();
            // An uncompressed payload is the frame after its header (and before its tag).
            let payload =
                inflated.map_or_else(|| whole.slice(HEADER_LEN..HEADER_LEN + len), Bytes::from);
            budget += payload.len() + HEADER_LEN;
            frames.push(Received { kind, seq, payload });
        }
        (frames, err)
    }

    async fn malformed(&mut self, e: impl fmt::Display) -> End {
        self.refuse(RefuseCode::Malformed, format!("malformed frame: {e}"))
            .await
    }

    /// A frame failed authentication: the master is told (its own direction still holds)
    /// and the connection closes. Frames before it were genuine and stand.
    async fn forged(&mut self, e: FrameError) -> End {
        self.refuse(
            RefuseCode::Malformed,
            format!("refusing the stream: {e}; nothing of it was applied"),
        )
        .await
    }

    async fn serve(&mut self) -> End {
        // A peer that connects and never completes a Hello must not hold the one session
        // slot forever (keepalive only catches peers that are gone, not idle ones).
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return e,
            Err(_) => return End::Protocol("no Hello within the handshake timeout".into()),
        }
        loop {
            // On shutdown: what was taken off the buffer was acknowledged as received (masters
            // in `received` mode count on it) and is applied whole; what is still in the
            // buffer was not, and the master resends it.
            if self.shared.stopping.load(Ordering::SeqCst) {
                return End::Stopping;
            }
            let (frames, err) = self.take_frames();
            if frames.is_empty() && err.is_none() {
                if let Err(e) = self.read_more().await {
                    return e;
                }
                continue;
            }
            if let Err(e) = self.handle(frames).await {
                return e;
            }
            if let Err(e) = self.report_downstream().await {
                return e;
            }
            if let Some(e) = err {
                if e.is_authentication() {
                    return self.forged(e).await;
                }
                return self.malformed(e).await;
            }
        }
    }

    async fn handshake(&mut self) -> Result<(), End> {
        let f = self
            .first
            .take()
            .expect("the listener read the first frame");
        if f.kind != FrameType::Hello {
            return Err(End::Protocol(format!(
                "first frame is {:?}, not Hello",
                f.kind
            )));
        }
        let hello = match Hello::decode(&f.payload) {
            Ok(h) => h,
            Err(e) => return Err(self.malformed(format!("hello: {e}")).await),
        };
        let peer = self.peer;
        let Some(proto) = hello.common_proto() else {
            return Err(self
                .refuse(
                    RefuseCode::Version,
                    format!(
                        "no common protocol version: master speaks {}..={}, slave {}..={}",
                        hello.proto_min, hello.proto_max, PROTO_MIN, PROTO_MAX
                    ),
                )
                .await);
        };
        self.shared.set_label(self.ticket, &hello.label);
        // Judged again under the core lock (the listener judged before claiming the slot, but
        // a session may have changed this tree's line since).
        let (standing, rec, applied, flags, durable) = {
            let core = self.shared.core();
            let rec = core.node.record();
            let standing = judge(&hello, &rec, &core.state);
            (
                standing,
                rec,
                core.state.applied,
                core.state.flags,
                core.durable,
            )
        };
        match &standing {
            Standing::Fenced { newer } => {
                return Err(self.refuse_fenced(&hello, *newer).await);
            }
            Standing::Foreign { set } => {
                let m = foreign_message(&hello, set);
                tracing::warn!("refusing master {} from {peer}: {m}", hello.label);
                return Err(self.refuse(RefuseCode::Foreign, m).await);
            }
            _ => {}
        }
        let up_last = hello.history.last().copied();
        let same_line = matches!(standing, Standing::Behind);
        self.diverged =
            matches!(standing, Standing::Diverged { .. }) || flags & ack_flags::STASHING != 0;
        if let Standing::Diverged { branch } = standing {
            tracing::warn!(
                "master {} ({}) from {peer}: this tree diverged from its line after seq {branch} \
                 ({}); the sync that follows stashes whatever this tree holds that the master's \
                 line does not, before making it identical",
                hello.label,
                up_last.map_or_else(String::new, |e| e.to_string()),
                if flags & ack_flags::BEYOND_KNOWN != 0 {
                    "it was a master that did not exit cleanly: its last ops are unknown"
                        .to_string()
                } else {
                    format!("it applied up to seq {applied}")
                }
            );
        } else if rec.history.last() != up_last.as_ref() {
            tracing::info!(
                "master {} from {peer} leads {} (this tree was at seq {applied} of {})",
                hello.label,
                up_last.map_or_else(String::new, |e| e.to_string()),
                rec.history
                    .last()
                    .map_or_else(|| "no epoch yet".to_string(), |e| e.to_string())
            );
        }
        tracing::info!(
            "session with master {} ({}) from {peer}, next seq {}",
            hello.label,
            up_last.map_or_else(String::new, |e| e.short()),
            hello.next_seq
        );
        // On the master's line: this tree's history becomes the master's now (every op it
        // holds is on that line). Diverged: only once the sync has made it identical.
        if same_line && !hello.history.is_empty() {
            let shared = self.shared.clone();
            let h = hello.history.clone();
            let ticket = self.ticket;
            let r = tokio::task::spawn_blocking(move || {
                let mut core = shared.core();
                if !shared.holds(ticket) {
                    return Err(io::Error::other("another master took this replica over"));
                }
                if let Some(set) = h.set_id() {
                    core.state.set_set(set)?;
                }
                core.node.update(|r| {
                    r.history = h.clone();
                    if r.seen
                        .is_some_and(|s| h.last().is_some_and(|l| l.number >= s.number))
                    {
                        r.seen = None;
                    }
                })
            })
            .await;
            match r {
                Ok(Ok(_)) => {
                    if let Some(r) = self.shared.relay() {
                        r.relay_set_history(hello.history.clone());
                    }
                }
                Ok(Err(e)) => return Err(End::Protocol(format!("recording the history: {e}"))),
                Err(e) => return Err(End::Protocol(format!("recording the history: {e}"))),
            }
        }
        self.upstream = hello.history.clone();
        let stats = &self.shared.stats;
        stats.set_master(up_last, &hello.label, &peer.to_string());
        stats.sessions.fetch_add(1, Ordering::Relaxed);
        stats.connected.store(true, Ordering::Relaxed);
        let resumes = same_line && flags & (ack_flags::SYNCING | ack_flags::STASHING) == 0;
        self.prev = (applied, resumes);
        // Until the first Ops frame says where the master resumes, "applied" is what the state
        // file says.
        self.expected = if resumes {
            applied.saturating_add(1)
        } else {
            hello.next_seq
        };
        self.durable = durable;
        self.proto = proto;
        if proto >= 4 && self.shared.feeds().is_some() {
            self.report_at = Some(tokio::time::Instant::now());
        }
        let ack = HelloAck {
            proto,
            history: rec.history.clone(),
            seen: rec.seen,
            applied,
            flags,
            label: self.shared.own_label(),
        };
        self.send(FrameType::HelloAck, &ack.encode()).await?;
        Ok(())
    }

    async fn refuse_fenced(&mut self, hello: &Hello, newer: Epoch) -> End {
        let m = fenced_message(hello, &newer);
        tracing::warn!("refusing master {} from {}: {m}", hello.label, self.peer);
        let r = Refuse {
            code: RefuseCode::Fenced,
            message: m.clone(),
            epoch: Some(newer),
        };
        let _ = self.send(FrameType::Refuse, &r.encode()).await;
        End::Protocol(m)
    }

    /// Applies every Ops frame in `frames` in one blocking round, then acks once.
    async fn handle(&mut self, frames: Vec<Received>) -> Result<(), End> {
        let mut batches: Vec<Work> = Vec::new();
        let mut after: Option<End> = None;
        let mut expected = self.expected;
        for f in frames {
            match f.kind {
                FrameType::Ops => {
                    if !self.started && !batches.iter().any(|w| matches!(w, Work::Ops(..))) {
                        // Without a sync first, the stream must continue exactly where this
                        // tree stopped, on the master's line: anything else would skip or
                        // repeat ops.
                        let (pa, resumes) = self.prev;
                        let synced =
                            self.syncing || batches.iter().any(|w| matches!(w, Work::Begin(_)));
                        let fresh = pa == 0 && resumes;
                        if !synced && !fresh && (!resumes || f.seq != pa.saturating_add(1)) {
                            after = Some(End::Protocol(format!(
                                "first ops frame carries seq {} but this tree is at seq {pa}{}: \
                                 the master must sync it first",
                                f.seq,
                                if resumes { "" } else { " of another line" }
                            )));
                            break;
                        }
                        self.started = true;
                        self.expected = f.seq;
                        expected = f.seq;
                    }
                    if f.seq != expected {
                        after = Some(End::Protocol(format!(
                            "ops frame carries seq {}, expected {expected}",
                            f.seq
                        )));
                        break;
                    }
                    let seq = f.seq;
                    match op::decode_batch_shared(&f.payload) {
                        Ok(ops) => match expected.checked_add(ops.len() as u64) {
                            Some(next) => {
                                expected = next;
                                batches.push(Work::Ops(seq, ops));
                            }
                            None => {
                                after = Some(End::Protocol(format!(
                                    "ops frame at seq {seq} overflows the sequence space"
                                )));
                                break;
                            }
                        },
                        Err(e) => {
                            after = Some(
                                self.refuse(
                                    RefuseCode::Malformed,
                                    format!("undecodable ops frame at seq {seq}: {e}"),
                                )
                                .await,
                            );
                            break;
                        }
                    }
                }
                FrameType::Bye => {
                    after = Some(End::Bye);
                    break;
                }
                FrameType::SyncBegin => {
                    let stash = f.payload.first().copied().unwrap_or(0)
                        & tdfs_protocol::sync::SYNC_STASH
                        != 0;
                    batches.push(Work::Begin(stash || self.diverged));
                }
                FrameType::SyncEnd => {
                    // The sync leaves the replica at the master's state just before seq
                    // f.seq; live ops continue from there.
                    if !self.started {
                        self.started = true;
                        self.expected = f.seq;
                        expected = f.seq;
                    } else if f.seq != expected {
                        after = Some(End::Protocol(format!(
                            "sync ends at seq {}, expected {expected}",
                            f.seq
                        )));
                        break;
                    }
                    batches.push(Work::End(f.seq));
                }
                FrameType::SyncOps => match op::decode_batch_shared(&f.payload) {
                    Ok(ops) => batches.push(Work::Sync(ops)),
                    Err(e) => {
                        after = Some(
                            self.refuse(
                                RefuseCode::Malformed,
                                format!("undecodable sync ops frame: {e}"),
                            )
                            .await,
                        );
                        break;
                    }
                },
                FrameType::ListDir | FrameType::Checksum => {
                    match tdfs_protocol::sync::decode_path(&f.payload) {
                        Ok(p) if f.kind == FrameType::ListDir => batches.push(Work::List(f.seq, p)),
                        Ok(p) => batches.push(Work::Sum(f.seq, p)),
                        Err(e) => {
                            after = Some(self.malformed(e).await);
                            break;
                        }
                    }
                }
                FrameType::Refuse => {
                    after = Some(End::Protocol(match Refuse::decode(&f.payload) {
                        Ok(r) => format!("the master ended the session: {}", r.message),
                        Err(e) => format!("the master ended the session (bad Refuse: {e})"),
                    }));
                    break;
                }
                other => {
                    after = Some(End::Protocol(format!(
                        "unexpected {other:?} frame in session"
                    )));
                    break;
                }
            }
        }
        if !batches.is_empty() {
            // Say what arrived before applying it: masters in `received` mode wait for this.
            if self.started && expected > self.expected {
                self.received = expected - 1;
                let ack = Ack {
                    applied: self.expected.saturating_sub(1),
                    durable: self.durable,
                    received: self.received,
                };
                self.send(FrameType::Ack, &ack.encode()).await?;
            }
            self.apply(batches).await?;
        }
        match after {
            Some(End::Bye) => {
                let ack = Ack {
                    applied: self.expected.saturating_sub(1),
                    durable: self.durable,
                    received: self.expected.saturating_sub(1),
                };
                self.send(FrameType::Ack, &ack.encode()).await?;
                let shared = self.shared.clone();
                let r = tokio::task::spawn_blocking(move || shared.core().state.sync()).await;
                if let Ok(Err(e)) = r {
                    tracing::error!("syncing the state file: {e}");
                }
                Err(End::Bye)
            }
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn apply(&mut self, batches: Vec<Work>) -> Result<(), End> {
        let shared = self.shared.clone();
        let upstream = self.upstream.clone();
        let first = self.expected;
        let syncing = self.syncing;
        let ticket = self.ticket;
        let live: u64 = batches
            .iter()
            .map(|w| match w {
                Work::Ops(_, ops) => ops.len() as u64,
                _ => 0,
            })
            .sum();
        let t0 = std::time::Instant::now();
        // A round of live ops is applied right here, on the session's worker: handing it to
        // the blocking pool cost two thread switches per round, which was half of the
        // slave's CPU on small-file workloads (untar: 1.3-1.5 s of CPU for 3,000 files
        // against 0.65-0.85 s inline). Such a round is bounded (`take_frames` budget) and
        // the runtime's other worker keeps serving accept, control and metrics meanwhile.
        // Sync rounds may list large directories or checksum large files: they still go to
        // the blocking pool.
        let heavy = batches
            .iter()
            .any(|w| matches!(w, Work::Sync(_) | Work::List(..) | Work::Sum(..)));
        let res = if heavy {
            tokio::task::spawn_blocking(move || {
                apply_blocking(&shared, ticket, &upstream, first, syncing, batches)
            })
            .await
            .map_err(|e| End::Protocol(format!("apply task failed: {e}")))?
        } else {
            apply_blocking(&shared, ticket, &upstream, first, syncing, batches)
        };
        if res.preempted {
            return Err(End::Preempted);
        }
        let done = if res.failed.is_some() {
            live.min(res.next.saturating_sub(first))
        } else {
            live
        };
        self.shared
            .stats
            .round(t0, done, res.next.saturating_sub(1));
        self.expected = res.next;
        self.durable = res.durable;
        self.syncing = res.syncing;
        for chunk in res.misses.chunks(tdfs_protocol::sync::MAX_MISSES) {
            let m = tdfs_protocol::sync::Misses {
                paths: chunk.to_vec(),
            };
            self.send(FrameType::SyncMiss, &m.encode()).await?;
        }
        for (kind, id, payload) in &res.replies {
            let f = self.tx.encode_vec(*kind, *id, payload, Compression::None);
            self.wr.write_all(&f).await.map_err(End::Io)?;
        }
        if let Some(f) = &res.failed {
            self.shared.stats.error(format!(
                "{} {} (seq {}): errno {} ({})",
                f.op, f.path, f.seq, f.errno, f.message
            ));
            tracing::error!(
                "applying {} {} (seq {}) failed: errno {} ({})",
                f.op,
                f.path,
                f.seq,
                f.errno,
                f.message
            );
            let ae = ApplyError {
                seq: f.seq,
                errno: f.errno,
                op: f.op.clone(),
                path: f.path.clone(),
                message: f.message.clone(),
            };
            self.send(FrameType::ApplyError, &ae.encode()).await?;
        }
        let ack = Ack {
            applied: res.next.saturating_sub(1),
            durable: res.durable,
            // Receipt was acknowledged before applying; the master keeps the maximum.
            received: res.next.saturating_sub(1),
        };
        self.send(FrameType::Ack, &ack.encode()).await?;
        if res.failed.is_some() {
            return Err(End::Applied);
        }
        if let Some(e) = res.state_error {
            return Err(End::Protocol(format!("state file: {e}")));
        }
        Ok(())
    }
}

struct Failed {
    seq: u64,
    errno: i32,
    op: String,
    path: String,
    message: String,
}

struct BatchResult {
    /// Sequence number of the first op not applied.
    next: u64,
    durable: u64,
    failed: Option<Failed>,
    state_error: Option<io::Error>,
    /// Sync mode after this round.
    syncing: bool,
    /// Paths of live ops skipped during a sync.
    misses: Vec<WirePath>,
    /// Answers to ListDir/Checksum: (frame type, request id, payload).
    replies: Vec<(FrameType, u64, Vec<u8>)>,
    /// Another session holds the tree now: nothing was applied.
    preempted: bool,
}

/// A frame taken off the read buffer. Its payload is a slice of the buffer (an uncompressed
/// frame) or the inflated bytes, so ops decoded from it point into it instead of copying.
struct Received {
    kind: FrameType,
    seq: u64,
    payload: Bytes,
}

/// One unit of a round, in stream order.
enum Work {
    Ops(u64, Vec<Op>),
    Sync(Vec<Op>),
    /// A sync starts; `true`: stash first what it overwrites (this tree diverged).
    Begin(bool),
    End(u64),
    List(u64, WirePath),
    Sum(u64, WirePath),
}

/// Errors that mean "the replica differs here", which a running sync will repair.
fn differs(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::EEXIST | libc::ENOTDIR | libc::EISDIR | libc::ENOTEMPTY)
    )
}

/// Answers a ListDir in as many Listing frames as it takes.
pub(crate) fn listing_replies(
    root: std::os::fd::BorrowedFd<'_>,
    id: u64,
    p: &WirePath,
) -> Vec<(FrameType, u64, Vec<u8>)> {
    use tdfs_protocol::sync::{Listing, MAX_ENTRIES};
    let reply = |errno, more, entries| {
        let l = Listing {
            errno,
            more,
            entries,
        };
        (FrameType::Listing, id, l.encode())
    };
    let entries = match crate::confine::list_dir(root, p) {
        Ok(e) => e,
        Err(e) => return vec![reply(e.raw_os_error().unwrap_or(libc::EIO), false, vec![])],
    };
    let mut out = Vec::new();
    let mut rest = entries.into_iter().peekable();
    loop {
        // Up to MAX_ENTRIES per frame, and about 2 MiB.
        let mut cur = Vec::new();
        let mut bytes = 0;
        while cur.len() < MAX_ENTRIES && bytes <= (2 << 20) {
            let Some(e) = rest.next() else { break };
            bytes += 64
                + e.name.len()
                + e.target.len()
                + e.xattrs
                    .iter()
                    .map(|(a, b)| a.len() + b.len() + 8)
                    .sum::<usize>();
            cur.push(e);
        }
        let more = rest.peek().is_some();
        out.push(reply(0, more, cur));
        if !more {
            return out;
        }
    }
}

fn strerror(e: &io::Error) -> String {
    // io::Error's Display appends " (os error N)"; the master gets errno separately.
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

fn apply_blocking(
    shared: &Shared,
    ticket: u64,
    upstream: &History,
    first: u64,
    syncing: bool,
    batches: Vec<Work>,
) -> BatchResult {
    let mut core = shared.core();
    let mut res = BatchResult {
        next: first,
        durable: core.durable,
        failed: None,
        state_error: None,
        syncing,
        misses: Vec::new(),
        replies: Vec::new(),
        preempted: false,
    };
    if !shared.holds(ticket) {
        res.preempted = true;
        return res;
    }
    'outer: for work in batches {
        let (seq0, ops) = match work {
            Work::Ops(seq0, ops) => (seq0, ops),
            Work::Begin(stash) => {
                res.syncing = true;
                if let Some(r) = shared.relay() {
                    r.relay_pause();
                }
                // Durably, before the sync changes anything: a half-synced tree must never
                // read as a valid position after a crash.
                let flags = ack_flags::SYNCING | if stash { ack_flags::STASHING } else { 0 };
                let keep = core.state.flags & ack_flags::BEYOND_KNOWN;
                if let Err(e) = core.state.set_flags(flags | keep) {
                    res.state_error = Some(e);
                    break 'outer;
                }
                if stash && core.applier.stash.is_none() {
                    let header = format!(
                        "tdfs stash: what this tree held that the line of its new upstream does \
                         not\nnew upstream's line: {}\nthis tree was at seq {} of {}",
                        upstream.last().map_or_else(String::new, |e| e.to_string()),
                        core.state.applied,
                        core.node
                            .record()
                            .history
                            .last()
                            .map_or_else(|| "no epoch".to_string(), |e| e.to_string())
                    );
                    let number = upstream.last().map_or(0, |e| e.number);
                    match crate::stash::Stash::create(&core.stash_dir, number, &header) {
                        Ok(st) => {
                            tracing::warn!(
                                "stashing what this tree holds of its own into {} before the \
                                 sync overwrites it",
                                st.dir().display()
                            );
                            core.applier.stash = Some(st);
                        }
                        Err(e) => {
                            // Nothing may be overwritten without its stash.
                            res.failed = Some(Failed {
                                seq: res.next,
                                errno: e.raw_os_error().unwrap_or(libc::EIO),
                                op: "stash".into(),
                                path: core.stash_dir.display().to_string(),
                                message: format!("cannot create the stash: {}", strerror(&e)),
                            });
                            break 'outer;
                        }
                    }
                }
                continue;
            }
            Work::End(seq) => {
                res.syncing = false;
                if seq > 0 {
                    res.next = res.next.max(seq);
                }
                // The tree is identical to the upstream's at seq - 1: its line is the
                // upstream's now, and nothing of its own is left to stash.
                let set = upstream.set_id();
                let applied = seq.saturating_sub(1);
                let r = (|| -> io::Result<()> {
                    if let Some(set) = set {
                        core.state.set_set(set)?;
                    }
                    core.state.reset(applied, 0)?;
                    let h = upstream.clone();
                    core.node.update(|r| {
                        r.history = h.clone();
                        if r.seen
                            .is_some_and(|s| h.last().is_some_and(|l| l.number >= s.number))
                        {
                            r.seen = None;
                        }
                    })?;
                    Ok(())
                })();
                if let Err(e) = r {
                    res.state_error = Some(e);
                    break 'outer;
                }
                if let Some(r) = shared.relay() {
                    r.relay_reset(applied + 1, Some(upstream.clone()));
                }
                if let Some(st) = core.applier.stash.take() {
                    match st.finish() {
                        Ok(Some((dir, n, bytes))) => {
                            tracing::warn!(
                                "diverged history stashed: {n} path(s), {bytes} bytes of content, \
                                 in {} (manifest: {}/MANIFEST.tsv)",
                                dir.display(),
                                dir.display()
                            );
                            shared.stats.set_stash(dir, n);
                        }
                        Ok(None) => {
                            tracing::info!("the sync found nothing of this tree's own to stash")
                        }
                        Err(e) => tracing::error!("closing the stash manifest: {e}"),
                    }
                }
                continue;
            }
            Work::List(id, p) => {
                core.applier.clear_cache();
                let r = listing_replies(core.applier.root(), id, &p);
                res.replies.extend(r);
                continue;
            }
            Work::Sum(id, p) => {
                let d = crate::confine::digest(core.applier.root(), &p);
                res.replies.push((FrameType::Digest, id, d.encode()));
                continue;
            }
            Work::Sync(ops) => {
                for op in &ops {
                    if let Err(e) = core.applier.apply(op) {
                        if differs(&e) {
                            // A live op moved or removed what this fix was for.
                            res.misses.extend(op_paths(op));
                            continue;
                        }
                        res.failed = Some(Failed {
                            seq: res.next,
                            errno: e.raw_os_error().unwrap_or(libc::EIO),
                            op: format!("sync {}", op.name()),
                            path: op_path(op),
                            message: strerror(&e),
                        });
                        break 'outer;
                    }
                }
                continue;
            }
        };
        // A relay applies and logs each op under its own order lock (while its upstream
        // syncs it, nothing is logged: its replicas are synced afresh when that ends).
        let mut round = shared
            .relay()
            .filter(|_| !res.syncing)
            .map(|r| r.relay_round());
        for (i, op) in ops.iter().enumerate() {
            let seq = seq0 + i as u64;
            tracing::trace!(seq, op = op.name(), path = %op_path(op), touch = ?op.touch, "apply");
            let replay = core.state.is_replay(seq);
            let applier = &mut core.applier;
            let r = match round.as_mut() {
                Some(round) => round.op(seq, || applier.apply(op), || encode_op(op)),
                None => applier.apply(op),
            };
            if let Err(e) = r {
                if res.syncing && differs(&e) {
                    res.misses.extend(op_paths(op));
                } else if replay && already_done(op, &e) {
                    tracing::info!(
                        "{} {} (seq {seq}) had already taken effect before the last exit",
                        op.name(),
                        op_path(op)
                    );
                } else {
                    res.failed = Some(Failed {
                        seq,
                        errno: e.raw_os_error().unwrap_or(libc::EIO),
                        op: op.name().to_owned(),
                        path: op_path(op),
                        message: strerror(&e),
                    });
                    break 'outer;
                }
            }
            res.next = seq + 1;
            // A store into the mapped state page: an op applied is an op recorded, so a
            // killed slave replays at most the one op it was in the middle of.
            if let Err(e) = core.state.record(seq) {
                res.state_error = Some(e);
                break 'outer;
            }
            if matches!(op.kind, OpKind::Fsync { .. }) {
                // The barrier covers the record just made, so it is durable too.
                match core.state.sync() {
                    Ok(()) => {
                        res.durable = seq;
                        core.durable = seq;
                    }
                    Err(e) => {
                        res.state_error = Some(e);
                        break 'outer;
                    }
                }
            }
        }
    }
    shared
        .stats
        .flags
        .store(core.state.flags, Ordering::Relaxed);
    if res.next != first {
        if let Err(e) = core.state.record(res.next.saturating_sub(1)) {
            tracing::error!("writing the state file: {e}");
            res.state_error.get_or_insert(e);
        }
    }
    res
}

/// An op as a relay logs it for its own replicas (the same bytes its upstream encoded).
fn encode_op(op: &Op) -> Arc<[u8]> {
    let mut b = Vec::with_capacity(64 + op.data_len());
    op.encode(&mut b);
    b.into()
}

/// Whether `e` from replaying `op` just means the op had already taken effect.
fn already_done(op: &Op, e: &std::io::Error) -> bool {
    let errno = e.raw_os_error();
    match &op.kind {
        OpKind::Unlink { .. } | OpKind::Rmdir { .. } => errno == Some(libc::ENOENT),
        OpKind::Link { .. } => errno == Some(libc::EEXIST),
        OpKind::Rename { .. } => errno == Some(libc::ENOENT) || errno == Some(libc::EEXIST),
        OpKind::Mkdir { .. } => errno == Some(libc::EEXIST),
        _ => false,
    }
}

/// The path an apply error is about (both paths for two-path ops).
fn op_path(op: &Op) -> String {
    match &op.kind {
        OpKind::Link { existing, new } => format!("{existing} -> {new}"),
        OpKind::Rename { from, to, .. } => format!("{from} -> {to}"),
        OpKind::CopyRange { src, path, .. } => format!("{src} -> {path}"),
        _ => op
            .primary_path()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "/".into()),
    }
}

/// Where this replica stands with respect to the master that says `hello` (see
/// [`tdfs_protocol::history::standing`]).
pub fn judge(hello: &Hello, rec: &NodeRecord, state: &State) -> Standing {
    let s = history::standing(
        &hello.history,
        &rec.history,
        rec.seen.as_ref(),
        state.applied,
        state.flags & ack_flags::BEYOND_KNOWN != 0,
    );
    match s {
        // A stashing sync was interrupted: whatever it had not stashed yet is still
        // this tree's own.
        Standing::Behind if state.flags & ack_flags::STASHING != 0 => Standing::Diverged {
            branch: state.applied,
        },
        s => s,
    }
}

pub fn fenced_message(hello: &Hello, newer: &Epoch) -> String {
    format!(
        "it leads {} but this replica has seen {newer}: another node was promoted and that \
         master was replaced. It must stop taking writes and rejoin as a replica of the new \
         master (tdfs-slave on its directory and state dir): what only it holds is stashed \
         there, not lost",
        hello
            .history
            .last()
            .map_or_else(|| "no epoch".to_string(), |e| e.to_string())
    )
}

pub fn foreign_message(hello: &Hello, set: &[u8; 16]) -> String {
    format!(
        "this replica belongs to replica set {} and the master ({}) to {}; a tree joins \
         another replica set only from an empty state directory",
        tdfs_replication::node::hex(set),
        hello.label,
        hello
            .history
            .set_id()
            .map_or_else(|| "none".to_string(), |s| tdfs_replication::node::hex(&s))
    )
}
