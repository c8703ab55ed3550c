//! One slave's link: connect (with backoff), handshake, sync when needed, stream ops from the
//! log or the journal, and read acknowledgements.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tdfs_protocol::frame::{self, FrameType};
use tdfs_protocol::history::{self, Standing};
use tdfs_protocol::msg::{self, Ack, ApplyError, Hello, HelloAck, Refuse, RefuseCode};
use tdfs_protocol::seal::{Rx, Tx};
use tdfs_protocol::sync::{Digest, Listing, Misses};
use tdfs_protocol::{compress, Compression, Epoch, Frame, FrameError, WirePath};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::journal;
use super::transport::{self, BoxRead, BoxWrite};
use super::{BatchResult, LinkState, LogOp, Shared, SlaveStatus};

/// Largest batch of ops in one frame (the frame limit is 8 MiB; one write op is ≤ 1 MiB plus
/// its path, so this always fits).
pub(super) const BATCH_BYTES: usize = 2 << 20;
const BATCH_OPS: usize = 4096;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const BACKOFF_STANDBY: Duration = Duration::from_secs(1);
/// How long a relay holds a replica that is ahead of it before giving the slot back.
const CATCH_UP_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub(super) enum LinkError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("bad message: {0}")]
    Decode(#[from] tdfs_protocol::DecodeError),
    #[error("refused by slave: {0}")]
    Refused(String),
    /// Another upstream holds the slave (for a fallback: the node's own upstream is back).
    #[error("refused by slave: Busy: {0}")]
    Busy(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("slave failed to apply an op")]
    ApplyFailed,
    #[error("slave needs ops the master no longer holds")]
    Lost,
    #[error("slave has seen {0}, newer than this node's epoch")]
    Fenced(Epoch),
    /// A relay's position or line changed under the session (see `Shared::generation`).
    #[error("this relay's position changed; handshaking again")]
    Restart,
    #[error("the shared secret changed; reconnecting with the new one")]
    Rekey,
}

impl LinkError {
    /// A frame from the slave failed the session's authentication.
    fn is_authentication(&self) -> bool {
        matches!(self, LinkError::Frame(e) if e.is_authentication())
    }
}

/// What the read half reports to the link.
pub(super) enum Event {
    Listing(u64, Listing),
    Digest(u64, Digest),
    Misses(Vec<WirePath>),
    Closed(LinkError),
}

/// Reads one whole frame (checking its tag first in a sealed session), keeping what
/// follows it in `buf`.
async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut Vec<u8>,
    rx: &mut Rx,
) -> Result<Option<Frame>, LinkError> {
    loop {
        if !buf.is_empty() {
            match rx.parse_owned(buf) {
                Ok(f) => {
                    buf.drain(..f.wire_len);
                    return Ok(Some(f));
                }
                Err(FrameError::Incomplete) => {}
                Err(e) => return Err(LinkError::Frame(e)),
            }
        }
        // Straight into the buffer: a zeroed chunk and a copy per read showed up in profiles
        // of small-file workloads, where acks arrive every few ops.
        buf.reserve(ACK_READ);
        let n = r.read_buf(buf).await?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(LinkError::Protocol(
                "connection closed in the middle of a frame".into(),
            ));
        }
    }
}

/// Room made in the reply buffer before each read.
const ACK_READ: usize = 16 * 1024;

pub(crate) async fn run(shared: Arc<Shared>, me: Arc<SlaveStatus>) {
    let addr = me.config.addr.clone();
    let mut backoff = BACKOFF_MIN;
    let mut quiet = false;
    // At shutdown every link makes one more attempt at once, so a slave that came back
    // while its link was backing off still gets everything before the master exits.
    let mut last_try = false;
    loop {
        if me.removed.load(Ordering::Acquire) {
            info!(slave = %addr, "link ended: slave removed");
            return;
        }
        if shared.fenced.load(Ordering::Acquire) {
            // A replaced node streams nothing more: a replica that has not heard of the new
            // epoch yet must not keep following this one.
            me.settled.store(true, Ordering::Release);
            shared.note_ack();
            info!(slave = %addr, "link ended: this node was fenced");
            return;
        }
        if shared.closing.load(Ordering::Acquire) {
            if last_try {
                me.settled.store(true, Ordering::Release);
                shared.note_ack();
                return;
            }
            last_try = true;
        }
        if shared.paused.load(Ordering::Acquire) {
            // A relay whose tree is being rewritten by its upstream: nothing to feed yet.
            let notified = shared.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if shared.paused.load(Ordering::Acquire)
                && !shared.closing.load(Ordering::Acquire)
                && !me.removed.load(Ordering::Acquire)
            {
                let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
            }
            continue;
        }
        let r = session(&shared, &me).await;
        if r.is_ok() {
            // An orderly end (master closing or slave removed): not news. Settled before
            // it reads as disconnected, so the drain never sees it gone but unsettled.
            me.in_sync.store(false, Ordering::Release);
            me.settled.store(true, Ordering::Release);
        } else {
            shared.drop_out(&me, "disconnected");
        }
        let was = me.connected.swap(false, Ordering::AcqRel);
        me.set_state(LinkState::Disconnected);
        shared.note_ack();
        match r {
            Ok(()) => {
                info!(slave = %addr, "session ended: every op acknowledged");
                return;
            }
            Err(LinkError::Lost) => {
                shared.require_sync(&me, "it needs ops this master no longer holds");
                backoff = BACKOFF_MIN;
                continue;
            }
            Err(LinkError::Restart) => {
                info!(slave = %addr, "handshaking again: this relay's position or line changed");
                backoff = BACKOFF_MIN;
                continue;
            }
            Err(LinkError::ApplyFailed) => {
                // Logged where the error arrived; retried from what the slave applied.
            }
            Err(LinkError::Rekey) => {
                info!(slave = %addr, "reconnecting: the shared secret changed");
                backoff = BACKOFF_MIN;
                continue;
            }
            Err(LinkError::Fenced(newer)) => {
                me.set_error(format!(
                    "refused: it has seen {newer}, this node was replaced"
                ));
                shared.fence(newer, &addr);
            }
            Err(e) if me.removed.load(Ordering::Acquire) => {
                debug!(slave = %addr, "link to removed slave ended: {e}");
            }
            Err(e) if was => {
                me.set_error(format!("link lost: {e}"));
                me.reconnects.fetch_add(1, Ordering::Relaxed);
                warn!(slave = %addr, "link lost: {e}; reconnecting")
            }
            Err(LinkError::Busy(m)) if me.config.fallback => {
                // The node's own upstream feeds it: this one stands by, as configured.
                if !me.standby.swap(true, Ordering::AcqRel) {
                    info!(slave = %addr, "standing by as a fallback upstream: {m}");
                }
                me.set_error(format!("standing by: {m}"));
            }
            Err(e) if !quiet => {
                me.set_error(format!("cannot reach slave: {e}"));
                warn!(slave = %addr, "cannot reach slave: {e}; retrying with backoff");
                quiet = true;
            }
            Err(e) => debug!(slave = %addr, "still cannot reach slave: {e}"),
        }
        if was {
            backoff = BACKOFF_MIN;
            quiet = false;
        }
        // Sleep out the backoff, but wake at once when the master starts closing.
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        loop {
            let notified = shared.wake.notified();
            if shared.closing.load(Ordering::Acquire) {
                break;
            }
            tokio::select! {
                _ = &mut sleep => break,
                _ = notified => {}
            }
        }
        backoff = (backoff * 2).min(if me.standby.load(Ordering::Acquire) {
            // A fallback checks in often: the moment the node's own upstream is gone, it
            // takes over.
            BACKOFF_STANDBY
        } else {
            BACKOFF_MAX
        });
    }
}

/// A connected, handshaken link.
pub(super) struct Link {
    pub(super) shared: Arc<Shared>,
    pub(super) me: Arc<SlaveStatus>,
    wr: BoxWrite,
    /// Frames every frame sent (sealed in a session authenticated with a shared secret).
    tx: Tx,
    /// Changes when SIGHUP brings other secrets: the link then reconnects with them.
    secrets: Option<tokio::sync::watch::Receiver<Arc<Vec<crate::security::Secret>>>>,
    /// Sequence number of the next live op to send.
    pub(super) cursor: u64,
    jreader: journal::Reader,
    pub(super) events: mpsc::UnboundedReceiver<Event>,
    payload: Vec<u8>,
    out: Vec<u8>,
    pub(super) next_request: u64,
    /// `Shared::generation` at the handshake.
    gen: u64,
}

impl Link {
    /// Whether what the handshake agreed on still holds (a relay's log was not reset, its
    /// line did not change, it is not being synced itself).
    pub(super) fn check_current(&self) -> Result<(), LinkError> {
        if self.shared.generation.load(Ordering::Acquire) != self.gen
            || self.shared.paused.load(Ordering::Acquire)
        {
            return Err(LinkError::Restart);
        }
        Ok(())
    }

    pub(super) async fn send_frame(
        &mut self,
        kind: FrameType,
        seq: u64,
        payload: &[u8],
    ) -> Result<(), LinkError> {
        self.out.clear();
        self.tx.encode(
            kind,
            seq,
            payload,
            self.me.config.compression,
            &mut self.out,
        );
        self.wr.write_all(&self.out).await?;
        self.count_sent(self.out.len(), payload.len() + tdfs_protocol::HEADER_LEN);
        Ok(())
    }

    /// Counts a frame sent: `wire` bytes on the connection for `raw` before compression.
    fn count_sent(&self, wire: usize, raw: usize) {
        self.me.bytes_sent.fetch_add(wire as u64, Ordering::Relaxed);
        self.me
            .raw_bytes_sent
            .fetch_add(raw as u64, Ordering::Relaxed);
    }

    async fn send_ops<O: WireOp>(
        &mut self,
        kind: FrameType,
        seq: u64,
        ops: &[O],
    ) -> Result<(), LinkError> {
        let count = (ops.len() as u32).to_le_bytes();
        let header;
        // The frame as it goes out raw: its header (made below), the op count, each op.
        let mut parts: Vec<&[u8]> = Vec::with_capacity(ops.len() + 2);
        parts.extend([&[][..], &count[..]]);
        parts.extend(ops.iter().map(|o| o.bytes()));
        let comp = self.me.config.compression;
        let raw =
            comp == Compression::None || compress::sample_is_incompressible(comp, &parts[1..]);
        if raw && self.tx.is_sealed() {
            return self.send_sealed_parts(kind, seq, parts).await;
        }
        if raw {
            // Header, count and each encoded op go out in vectored writes: no copy of the
            // data into a frame buffer. With compression on, so does a batch whose sample
            // does not shrink: it would go raw anyway, after a copy into the frame buffer and
            // a second checksum of every byte.
            let mut crc = crc32fast::Hasher::new();
            crc.update(&count);
            for o in ops {
                o.add_crc(&mut crc);
            }
            let len = parts[1..].iter().map(|p| p.len()).sum();
            header = frame::header_with_crc(kind, seq, len, &crc);
            parts[0] = &header;
            let total = tdfs_protocol::HEADER_LEN + len;
            write_all_parts(&mut self.wr, &parts).await?;
            self.count_sent(total, total);
            return Ok(());
        }
        let mut payload = std::mem::take(&mut self.payload);
        payload.clear();
        for p in &parts[1..] {
            payload.extend_from_slice(p);
        }
        let r = self.send_frame(kind, seq, &payload).await;
        self.payload = payload;
        r
    }

    /// [`Link::send_ops`] in a sealed session: header, parts and tag in vectored writes
    /// under a MAC; encrypted in the link's own buffer (the parts are shared with other
    /// links) under `--encrypt`. `parts[0]` is the header's place.
    async fn send_sealed_parts(
        &mut self,
        kind: FrameType,
        seq: u64,
        mut parts: Vec<&[u8]>,
    ) -> Result<(), LinkError> {
        let sealer = self.tx.sealer().expect("sealed session");
        let total;
        if let Some((header, tag)) = sealer.seal_parts(kind, seq, &parts[1..]) {
            parts[0] = &header;
            parts.push(&tag);
            total = parts.iter().map(|p| p.len()).sum::<usize>();
            write_all_parts(&mut self.wr, &parts).await?;
        } else {
            self.out.clear();
            sealer.encode_parts(kind, seq, &parts[1..], &mut self.out);
            total = self.out.len();
            self.wr.write_all(&self.out).await?;
        }
        self.count_sent(total, total);
        Ok(())
    }

    /// Ends the session for a reconnect with new secrets. Bye first: the slave applies and
    /// acknowledges what it was sent, saves its position and closes, and the next session
    /// resumes from there instead of cutting a round (or a sync) in the middle.
    async fn hand_over(&mut self) -> LinkError {
        if self.send_frame(FrameType::Bye, 0, &[]).await.is_ok() {
            let _ = self.wr.shutdown().await;
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Some(ev) = self.events.recv().await {
                    if matches!(ev, Event::Closed(_)) {
                        break;
                    }
                }
            })
            .await;
        }
        LinkError::Rekey
    }

    /// Tells the slave, before the connection closes, that one of its frames failed
    /// authentication here: it can only see the connection end otherwise.
    async fn report_forgery(&mut self, e: &LinkError) {
        let r = Refuse::new(
            RefuseCode::Malformed,
            format!("the master refused a frame from this slave: {e}"),
        );
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.send_frame(FrameType::Refuse, 0, &r.encode()),
        )
        .await;
        let _ = self.wr.shutdown().await;
    }

    /// Sends sync ops (already encoded), in frames of bounded size.
    pub(super) async fn send_sync(&mut self, ops: Vec<Arc<[u8]>>) -> Result<(), LinkError> {
        let mut start = 0;
        while start < ops.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < ops.len() && (end == start || bytes + ops[end].len() <= BATCH_BYTES) {
                bytes += ops[end].len();
                end += 1;
            }
            self.send_ops(FrameType::SyncOps, 0, &ops[start..end])
                .await?;
            start = end;
        }
        Ok(())
    }

    /// Sends live ops from the cursor up to (not including) `stop`.
    pub(super) async fn send_live(&mut self, stop: u64) -> Result<(), LinkError> {
        while self.cursor < stop {
            match self.shared.batch_from(self.cursor, BATCH_BYTES, BATCH_OPS) {
                BatchResult::Lost => return Err(LinkError::Lost),
                BatchResult::Empty => break,
                BatchResult::Ops(first, mut ops) => {
                    ops.truncate((stop - first) as usize);
                    self.send_ops(FrameType::Ops, first, &ops).await?;
                    self.cursor = first + ops.len() as u64;
                    self.me
                        .ops_sent
                        .fetch_add(ops.len() as u64, Ordering::Relaxed);
                }
                BatchResult::Journal(view, mem_front) => {
                    let from = self.cursor;
                    let until = stop.min(mem_front);
                    let mut reader = std::mem::take(&mut self.jreader);
                    let r = tokio::task::spawn_blocking(move || {
                        let r = reader.read(&view, from, until, BATCH_BYTES);
                        (reader, r)
                    })
                    .await
                    .map_err(|e| LinkError::Protocol(format!("journal reader: {e}")))?;
                    self.jreader = r.0;
                    let ops = match r.1? {
                        None => return Err(LinkError::Lost),
                        Some(ops) if ops.is_empty() => {
                            // Being appended right now; the memory log has moved on. Retry.
                            tokio::task::yield_now().await;
                            continue;
                        }
                        Some(ops) => ops,
                    };
                    self.send_ops(FrameType::Ops, from, &ops).await?;
                    self.cursor = from + ops.len() as u64;
                    self.me
                        .ops_sent
                        .fetch_add(ops.len() as u64, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Waits for the next event from the slave.
    pub(super) async fn event(&mut self) -> Result<Event, LinkError> {
        match self.events.recv().await {
            Some(Event::Closed(e)) => Err(e),
            Some(ev) => Ok(ev),
            None => Err(LinkError::Protocol("reader ended".into())),
        }
    }

    /// Streams live ops until the master closes and the slave has everything.
    async fn stream(&mut self) -> Result<(), LinkError> {
        let shared = self.shared.clone();
        loop {
            let notified = shared.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if shared.fenced.load(Ordering::Acquire) {
                self.send_frame(FrameType::Bye, 0, &[]).await?;
                self.wr.shutdown().await.ok();
                return Err(LinkError::Protocol("this node was fenced".into()));
            }
            self.check_current()?;
            if self
                .secrets
                .as_ref()
                .is_some_and(|s| s.has_changed().unwrap_or(false))
            {
                return Err(self.hand_over().await);
            }
            let head = self.shared.head();
            if self.cursor < head {
                match self.send_live(head).await {
                    Ok(()) => {}
                    // Too far behind for the journal: resync on this same connection (the
                    // slave may still be busy with what it was sent; it must not be made to
                    // refuse a second session).
                    Err(LinkError::Lost) => {
                        let checksums = self.shared.checksum_sync;
                        self.sync(
                            "it fell further behind than --journal-size",
                            checksums,
                            false,
                        )
                        .await?;
                    }
                    Err(e) => return Err(e),
                }
                continue;
            }
            if self.me.removed.load(Ordering::Acquire) {
                self.send_frame(FrameType::Bye, 0, &[]).await?;
                self.wr.shutdown().await.ok();
                return Ok(());
            }
            if self.shared.closing.load(Ordering::Acquire)
                && self.me.applied.load(Ordering::Acquire) + 1 >= head
            {
                self.send_frame(FrameType::Bye, 0, &[]).await?;
                self.wr.shutdown().await.ok();
                return Ok(());
            }
            let rekey = async {
                match self.secrets.as_mut() {
                    Some(s) => {
                        let _ = s.changed().await;
                    }
                    None => std::future::pending().await,
                }
            };
            // `changed()` marks the new secrets seen: remember that they came.
            let mut rekeyed = false;
            tokio::select! {
                _ = &mut notified => {}
                _ = rekey => rekeyed = true,
                ev = self.events.recv() => match ev {
                    Some(Event::Closed(e)) => return Err(e),
                    None => return Err(LinkError::Protocol("reader ended".into())),
                    // Late replies or misses after a sync: nothing to do.
                    Some(_) => {}
                },
            }
            if rekeyed {
                return Err(self.hand_over().await);
            }
        }
    }
}

/// Below this size, an op's bytes are checksummed in place: combining crc states costs
/// about as much as checksumming a few KiB.
pub(super) const COMBINE_MIN: usize = 16 * 1024;

/// An encoded op as a link sends it.
pub(super) trait WireOp {
    fn bytes(&self) -> &[u8];
    /// Adds this op's bytes to a frame's running crc.
    fn add_crc(&self, crc: &mut crc32fast::Hasher);
}

/// Sync and journal ops: each goes to one slave only.
impl WireOp for Arc<[u8]> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn add_crc(&self, crc: &mut crc32fast::Hasher) {
        crc.update(self);
    }
}

/// Live ops from the log, which go to every slave.
impl WireOp for Arc<LogOp> {
    fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    fn add_crc(&self, crc: &mut crc32fast::Hasher) {
        match &self.crc {
            Some(h) => crc.combine(h),
            None => crc.update(&self.bytes),
        }
    }
}

/// Writes every byte of `parts`, in vectored writes of up to 64 slices.
async fn write_all_parts(wr: &mut BoxWrite, parts: &[&[u8]]) -> std::io::Result<()> {
    let (mut i, mut off) = (0usize, 0usize);
    while i < parts.len() {
        let mut slices = Vec::with_capacity(64);
        slices.push(std::io::IoSlice::new(&parts[i][off..]));
        slices.extend(
            parts[i + 1..]
                .iter()
                .take(63)
                .map(|p| std::io::IoSlice::new(p)),
        );
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && i < parts.len() {
            let left = parts[i].len() - off;
            if n >= left {
                n -= left;
                i += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
        while i < parts.len() && parts[i].len() == off {
            i += 1;
            off = 0;
        }
    }
    Ok(())
}

/// Reads acks, errors and replies; updates the slave's status; forwards the rest.
async fn reader(
    mut rd: BoxRead,
    mut rbuf: Vec<u8>,
    mut rx: Rx,
    shared: Arc<Shared>,
    me: Arc<SlaveStatus>,
    tx: mpsc::UnboundedSender<Event>,
) {
    let r: Result<(), LinkError> = async {
        loop {
            let Some(f) = read_frame(&mut rd, &mut rbuf, &mut rx).await? else {
                return Err(LinkError::Protocol("slave closed the connection".into()));
            };
            match f.kind {
                FrameType::Ack => {
                    let a = Ack::decode(&f.payload)?;
                    me.applied.fetch_max(a.applied, Ordering::AcqRel);
                    me.durable.fetch_max(a.durable, Ordering::AcqRel);
                    me.received.fetch_max(a.received, Ordering::AcqRel);
                    if me.state() == LinkState::Streaming {
                        shared.set_need(&me, a.applied + 1);
                        shared.check_in_sync(&me);
                    }
                    shared.note_ack();
                    if shared.closing.load(Ordering::Acquire) {
                        shared.wake.notify_waiters();
                    }
                }
                FrameType::ApplyError => {
                    let e = ApplyError::decode(&f.payload)?;
                    me.apply_errors.fetch_add(1, Ordering::Relaxed);
                    me.set_error(format!(
                        "seq {} {} {}: {} (errno {})",
                        e.seq, e.op, e.path, e.message, e.errno
                    ));
                    error!(
                        slave = %me.config.addr,
                        seq = e.seq,
                        op = %e.op,
                        path = %e.path,
                        errno = e.errno,
                        "slave failed to apply: {}; it is out of sync until the op applies",
                        e.message
                    );
                    return Err(LinkError::ApplyFailed);
                }
                FrameType::Refuse => {
                    let r = Refuse::decode(&f.payload)?;
                    return Err(LinkError::Refused(r.message));
                }
                FrameType::Listing => {
                    let _ = tx.send(Event::Listing(f.seq, Listing::decode(&f.payload)?));
                }
                FrameType::Digest => {
                    let _ = tx.send(Event::Digest(f.seq, Digest::decode(&f.payload)?));
                }
                FrameType::SyncMiss => {
                    let _ = tx.send(Event::Misses(Misses::decode(&f.payload)?.paths));
                }
                FrameType::Downstream => {
                    let d = msg::Downstream::decode(&f.payload)?;
                    *me.downstream.lock().unwrap_or_else(|p| p.into_inner()) = d.nodes;
                }
                k => return Err(LinkError::Protocol(format!("unexpected {k:?} from slave"))),
            }
        }
    }
    .await;
    if let Err(e) = r {
        let forged = e.is_authentication();
        let _ = tx.send(Event::Closed(e));
        if forged {
            // The link tells the slave why; no reset may destroy that before it is read.
            crate::conn::linger(&mut rd).await;
        }
    }
}

async fn session(shared: &Arc<Shared>, me: &Arc<SlaveStatus>) -> Result<(), LinkError> {
    let cfg = &me.config;
    let gen = shared.generation.load(Ordering::Acquire);
    // Watched from before the handshake, so secrets that change during it count as new.
    let secrets = {
        let sec = crate::outbound::get();
        (!sec.secrets().is_empty()).then(|| {
            let mut w = sec.watch_secrets();
            w.mark_unchanged();
            w
        })
    };
    let transport::Conn {
        mut rd,
        mut wr,
        mut tx,
        mut rx,
        ..
    } = transport::connect(cfg).await?;
    let history = shared.history();
    let hello = Hello {
        proto_min: msg::PROTO_MIN,
        proto_max: msg::PROTO_MAX,
        history: history.clone(),
        next_seq: shared.head(),
        flags: if cfg.fallback { msg::HELLO_FALLBACK } else { 0 },
        label: shared.label.clone(),
    };
    wr.write_all(&tx.encode_vec(FrameType::Hello, 0, &hello.encode(), Compression::None))
        .await?;
    let mut rbuf = Vec::new();
    let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut rd, &mut rbuf, &mut rx))
        .await
        .map_err(|_| LinkError::Protocol("no handshake reply".into()))??
        .ok_or_else(|| LinkError::Protocol("closed during handshake".into()))?;
    let ack = match reply.kind {
        FrameType::HelloAck => HelloAck::decode(&reply.payload)?,
        FrameType::Refuse => {
            let r = Refuse::decode(&reply.payload)?;
            if let (RefuseCode::Fenced, Some(e)) = (r.code, r.epoch) {
                return Err(LinkError::Fenced(e));
            }
            if r.code == RefuseCode::Busy {
                return Err(LinkError::Busy(r.message));
            }
            return Err(LinkError::Refused(format!("{:?}: {}", r.code, r.message)));
        }
        k => return Err(LinkError::Protocol(format!("expected HelloAck, got {k:?}"))),
    };
    let beyond = ack.flags & msg::ack_flags::BEYOND_KNOWN != 0;
    let standing = history::standing(
        &history,
        &ack.history,
        ack.seen.as_ref(),
        ack.applied,
        beyond,
    );
    match &standing {
        Standing::Fenced { newer } => return Err(LinkError::Fenced(*newer)),
        Standing::Foreign { set } => {
            return Err(LinkError::Refused(format!(
                "it belongs to another replica set ({}); a replica of this one must start from \
                 an empty state directory",
                crate::node::hex(set)
            )))
        }
        _ => {}
    }
    me.set_peer_label(&ack.label);

    let (events_tx, events) = mpsc::unbounded_channel();
    tokio::spawn(reader(rd, rbuf, rx, shared.clone(), me.clone(), events_tx));
    let mut link = Link {
        shared: shared.clone(),
        me: me.clone(),
        wr,
        tx,
        secrets,
        cursor: 0,
        jreader: journal::Reader::default(),
        events,
        payload: Vec::new(),
        out: Vec::new(),
        next_request: 1,
        gen,
    };
    me.connected.store(true, Ordering::Release);
    me.standby.store(false, Ordering::Release);

    let applied = ack.applied;
    if shared.relay && matches!(standing, Standing::Behind) && applied > 0 {
        // A replica ahead of this relay on the relay's own line (another upstream fed it
        // while this relay was away): hold it until this relay catches up, rather than
        // syncing it back to an older state.
        let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
        let mut said = false;
        loop {
            let notified = shared.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            link.check_current()?;
            if shared.head() > applied || shared.closing.load(Ordering::Acquire) {
                break;
            }
            if !said {
                info!(slave = %cfg.addr, applied, head = shared.head(), "replica is ahead of this relay; waiting for the relay to catch up");
                said = true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(LinkError::Protocol(format!(
                    "replica stays ahead of this relay (it applied {applied}, the relay holds up to {})",
                    shared.head().saturating_sub(1)
                )));
            }
        }
    }
    // Resume where the slave stopped if it is on this node's line and everything after its
    // position is still held here; otherwise bring it back by a sync, which stashes first
    // whatever the slave holds that this line does not.
    let (front, head) = {
        let log = shared.lock();
        (log.front(), log.next_seq)
    };
    let syncing = ack.flags & msg::ack_flags::SYNCING != 0;
    let stashing = ack.flags & msg::ack_flags::STASHING != 0;
    let diverged = match standing {
        Standing::Diverged { branch } => Some(branch),
        // A master's replica ahead of the master on the master's own line: the master's
        // state went back (restored from a backup, say). What the replica holds past the
        // master's head is on no line the master knows.
        Standing::Behind if applied >= head && !shared.relay && applied > 0 => Some(head - 1),
        _ => None,
    };
    // A replica that never followed any line (empty history) holds a tree nobody knows:
    // it is synced, whatever its position says.
    let resumable = diverged.is_none()
        && !ack.history.is_empty()
        && !syncing
        && !me.needs_sync.load(Ordering::Acquire)
        && applied + 1 >= front
        && applied < head;
    if resumable {
        link.cursor = applied + 1;
        me.applied.store(applied, Ordering::Release);
        me.received.store(applied, Ordering::Release);
        me.durable.store(0, Ordering::Release);
        shared.set_need(me, link.cursor);
        me.set_state(LinkState::Streaming);
        shared.check_in_sync(me);
        info!(slave = %cfg.addr, from = link.cursor, head, "connected; streaming");
    } else {
        let stash = diverged.is_some() || stashing;
        let why = if let Some(branch) = diverged {
            warn!(
                slave = %cfg.addr,
                applied,
                branch,
                "slave diverged: it applied ops after seq {branch} that are not on this node's \
                 line ({}); they will be stashed on it, then it is made identical",
                history.last().map_or_else(String::new, |e| e.to_string())
            );
            format!("slave diverged after seq {branch} (it applied {applied})")
        } else if syncing {
            format!(
                "a sync into the slave was interrupted{}",
                if stashing { " (it was stashing)" } else { "" }
            )
        } else if ack.history.is_empty() && applied == 0 {
            "new or empty slave".to_string()
        } else if me.needs_sync.load(Ordering::Acquire) {
            "slave missed ops this node no longer holds".to_string()
        } else {
            format!("slave applied seq {applied} but this node holds {front}..{head}")
        };
        // A sync cut short leaves files whose size and times agree with this node's while
        // their content does not (live writes applied beyond a part not copied yet): the
        // next one compares content.
        let r = link
            .sync(&why, shared.checksum_sync || syncing, stash)
            .await;
        if let Err(e) = r {
            return Err(link.closing(e).await);
        }
    }
    let r = link.stream().await;
    match r {
        Err(e) => Err(link.closing(e).await),
        ok => ok,
    }
}

impl Link {
    /// The session ends with `e`: a slave whose frame failed authentication is told so.
    async fn closing(&mut self, e: LinkError) -> LinkError {
        if e.is_authentication() {
            error!(
                slave = %self.me.config.addr,
                "closing the connection to slave {}: {e}",
                self.me.config.addr
            );
            self.report_forgery(&e).await;
        }
        e
    }
}
