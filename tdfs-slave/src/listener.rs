//! Accepting connections and enforcing "one master at a time".

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tdfs_protocol::frame::FrameType;
use tdfs_protocol::msg::{Refuse, RefuseCode};
use tdfs_protocol::Compression;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use std::path::PathBuf;

use tdfs_protocol::msg::{Hello, PROTO_MAX, PROTO_MIN};
use tdfs_protocol::Standing;
use tdfs_replication::node::NodeState;

use crate::apply::Applier;
use crate::session;
use tdfs_protocol::seal::Tx;
use tdfs_replication::accept::{self, BoxWrite, Security};
use tdfs_replication::position::State;

/// What the apply side owns; only one session holds it at a time.
pub struct Core {
    pub applier: Applier,
    pub state: State,
    /// This node's place in its replica set (history, newest epoch heard of).
    pub node: Arc<NodeState>,
    /// Highest sequence number known durable (since this process started, for the master
    /// recorded in `state`).
    pub durable: u64,
    /// Where a diverged tree's own changes are stashed (`--stash-dir`).
    pub stash_dir: PathBuf,
}

/// Who holds the session slot: for the message a refused master gets, and to decide
/// whether a newcomer may take the slot over.
#[derive(Clone)]
struct Active {
    label: String,
    peer: SocketAddr,
    ticket: u64,
    /// The holder's epoch (from its Hello).
    epoch: Option<tdfs_protocol::Epoch>,
    /// The holder connected as a fallback upstream (a relay's second choice).
    fallback: bool,
    /// Tells the holder's session to end after the round in hand.
    preempt: watch::Sender<bool>,
}

/// Whether a master saying `hello` may take the slot from `cur`. A session can outlive its
/// master by a minute (a master cut off by a partition, or one that reconnects after a
/// blip, leaves a connection nothing closes until TCP gives up): waiting that out would
/// hold the replica away from the master that now leads.
/// - A newer epoch: the holder was replaced (it is fenced the next time it asks).
/// - The holder's own master again (same epoch, same label): its old connection is dead.
/// - Same epoch, and the holder is a fallback upstream while the newcomer is not: the
///   preferred upstream is back.
///
/// Two primaries of one epoch (a misconfiguration) never take turns: the second is refused.
fn preempts(cur: &Active, hello: &Hello) -> bool {
    let (Some(c), Some(h)) = (cur.epoch, hello.history.last()) else {
        return false;
    };
    if h.number > c.number {
        return true;
    }
    if h.number < c.number || h.id != c.id {
        return false;
    }
    let fallback = hello.flags & tdfs_protocol::msg::HELLO_FALLBACK != 0;
    hello.label == cur.label && fallback == cur.fallback || cur.fallback && !fallback
}

pub struct Shared {
    core: Mutex<Core>,
    active: Mutex<Option<Active>>,
    /// The ticket of the session allowed to change the tree. A session checks it under the
    /// core lock before each round: one whose slot was taken over applies nothing more,
    /// however late it wakes up.
    holder: std::sync::atomic::AtomicU64,
    tickets: std::sync::atomic::AtomicU64,
    slot_freed: tokio::sync::Notify,
    /// Checked between ops so a signal stops the apply loop after the op in hand.
    pub stopping: AtomicBool,
    stop_tx: watch::Sender<bool>,
    nodelay: bool,
    security: OnceLock<Security>,
    /// Counters for `tdfs-slave status` and metrics.
    pub stats: crate::stats::Stats,
    /// What this node calls itself (host and directory), for its upstream's logs and status.
    label: String,
    /// The node state (also in `Core`), readable without waiting for an apply round.
    node: Arc<NodeState>,
    /// This node's own replicas (`-c`): what it applies, it feeds to them.
    feeds: OnceLock<Arc<tdfs_replication::feeds::Feeds>>,
}

/// Poisoning only means a thread panicked while holding the lock; the data it guards is
/// still the best we have, and refusing to go on would turn one bug into an outage.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(core: Core, nodelay: bool, label: String) -> Arc<Self> {
        let node = core.node.clone();
        let (stop_tx, _) = watch::channel(false);
        Arc::new(Self {
            core: Mutex::new(core),
            active: Mutex::new(None),
            holder: std::sync::atomic::AtomicU64::new(0),
            tickets: std::sync::atomic::AtomicU64::new(0),
            slot_freed: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
            stop_tx,
            nodelay,
            security: OnceLock::new(),
            stats: crate::stats::Stats::default(),
            label,
            node,
            feeds: OnceLock::new(),
        })
    }

    /// Makes this node a relay (call once, before [`serve`]).
    pub fn set_feeds(&self, feeds: Arc<tdfs_replication::feeds::Feeds>) {
        if self.feeds.set(feeds).is_err() {
            panic!("relay engine set twice");
        }
    }

    /// The replicas this node feeds, if it was started as a relay engine.
    pub fn feeds(&self) -> Option<&Arc<tdfs_replication::feeds::Feeds>> {
        self.feeds.get()
    }

    /// The engine feeding this node's replicas.
    pub fn relay(&self) -> Option<&tdfs_replication::repl::Replicator> {
        self.feeds.get().map(|f| &f.repl)
    }

    /// One of this relay's replicas has seen `newer`: the upstream connected now, of an
    /// older epoch, was replaced. It is told to end after the round in hand; when it comes
    /// back it is refused as fenced (the epoch is recorded), which tells it so.
    pub fn drop_stale_upstream(&self, newer: &tdfs_protocol::Epoch) {
        let a = lock(&self.active);
        if let Some(cur) = a.as_ref() {
            if cur.epoch.is_some_and(|e| e.number < newer.number) {
                tracing::warn!(
                    "dropping upstream {} at {}: a replica of this relay has seen {newer}",
                    cur.label,
                    cur.peer
                );
                cur.preempt.send_replace(true);
            }
        }
    }

    pub fn node(&self) -> &Arc<NodeState> {
        &self.node
    }

    pub fn own_label(&self) -> String {
        self.label.clone()
    }

    /// Sets `--allow`, TLS and the shared secret; call before [`serve`]. Unset: all off.
    pub fn set_security(&self, sec: Security) {
        if self.security.set(sec).is_err() {
            panic!("security settings set twice");
        }
    }

    pub fn security(&self) -> &Security {
        self.security.get_or_init(Security::default)
    }

    pub fn core(&self) -> MutexGuard<'_, Core> {
        lock(&self.core)
    }

    pub fn stop_rx(&self) -> watch::Receiver<bool> {
        self.stop_tx.subscribe()
    }

    /// Asks the active session to finish the op in hand and end.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop_tx.send_replace(true);
    }

    pub fn session_active(&self) -> bool {
        lock(&self.active).is_some()
    }

    pub fn set_label(&self, ticket: u64, label: &str) {
        if let Some(a) = lock(&self.active).as_mut().filter(|a| a.ticket == ticket) {
            a.label = label.to_owned();
        }
    }

    /// Whether the session holding `ticket` may still change the tree. Check it under the
    /// core lock.
    pub fn holds(&self, ticket: u64) -> bool {
        self.holder.load(Ordering::Acquire) == ticket
    }

    /// Takes the slot for a master saying `hello` (None: not a Hello; a session then ends
    /// at its handshake). With `force`, even from a holder (which is told to end).
    fn take(
        self: &Arc<Self>,
        peer: SocketAddr,
        hello: Option<&Hello>,
        force: bool,
    ) -> Result<SlotGuard, Active> {
        let mut a = lock(&self.active);
        if let Some(cur) = a.as_ref() {
            if !force {
                return Err(cur.clone());
            }
            cur.preempt.send_replace(true);
        }
        let ticket = self.tickets.fetch_add(1, Ordering::AcqRel) + 1;
        let (tx, rx) = watch::channel(false);
        *a = Some(Active {
            label: hello.map_or_else(|| "handshake pending".into(), |h| h.label.clone()),
            peer,
            ticket,
            epoch: hello.and_then(|h| h.history.last().copied()),
            fallback: hello.is_some_and(|h| h.flags & tdfs_protocol::msg::HELLO_FALLBACK != 0),
            preempt: tx,
        });
        // Before the new session touches the core: from here on the old one applies nothing.
        self.holder.store(ticket, Ordering::Release);
        Ok(SlotGuard {
            shared: self.clone(),
            ticket,
            preempted: rx,
        })
    }

    /// The slot for `hello`: free, or taken over from a holder it [`preempts`] (which gets
    /// a few seconds to finish its round and leave; it can apply nothing more either way).
    async fn claim(
        self: &Arc<Self>,
        peer: SocketAddr,
        hello: Option<&Hello>,
    ) -> Result<SlotGuard, Active> {
        let cur = match self.take(peer, hello, false) {
            Ok(g) => return Ok(g),
            Err(cur) => cur,
        };
        let Some(h) = hello.filter(|h| preempts(&cur, h)) else {
            return Err(cur);
        };
        tracing::warn!(
            "master {} from {peer} takes this replica over from {} at {} ({})",
            h.label,
            cur.label,
            cur.peer,
            match (cur.epoch, h.history.last()) {
                (Some(c), Some(n)) if n.number > c.number =>
                    format!("{n} replaces {c}; that session is stale"),
                _ if cur.fallback => "the preferred upstream is back".to_string(),
                _ => "the same master reconnected; its old connection is dead".to_string(),
            }
        );
        cur.preempt.send_replace(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let freed = self.slot_freed.notified();
            if !self.session_active() {
                break;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                break;
            }
        }
        self.take(peer, hello, true)
    }
}

/// Frees the session slot when the session ends, however it ends (unless another session
/// took it over meanwhile).
pub struct SlotGuard {
    shared: Arc<Shared>,
    pub ticket: u64,
    /// Set when another master took the slot over: end after the round in hand.
    pub preempted: watch::Receiver<bool>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut a = lock(&self.shared.active);
        if a.as_ref().is_some_and(|c| c.ticket == self.ticket) {
            *a = None;
        }
        drop(a);
        self.shared.slot_freed.notify_waiters();
    }
}

/// Binds the listening socket (SO_REUSEADDR so a restart does not wait out TIME_WAIT).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(64)?;
    TcpListener::from_std(sock.into())
}

fn configure(stream: &TcpStream, nodelay: bool) -> io::Result<()> {
    let s = SockRef::from(stream);
    s.set_nodelay(nodelay)?;
    s.set_keepalive(true)?;
    // A master that vanished without a FIN would otherwise hold the one session slot for
    // hours (the kernel default is 2 h before the first probe).
    let ka = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    s.set_tcp_keepalive(&ka)?;
    // Acks unacknowledged for this long mean the master is gone (keepalive does not probe
    // while data is outstanding).
    s.set_tcp_user_timeout(Some(Duration::from_secs(60)))?;
    Ok(())
}

/// Accepts connections until the process ends.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !shared.security().admit(&peer) {
            drop(stream);
            continue;
        }
        if let Err(e) = configure(&stream, shared.nodelay) {
            tracing::warn!("configuring socket from {peer}: {e}");
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            // TLS and authentication come first: a peer that fails them never takes the
            // slot nor learns whether a master is connected.
            let Some(mut conn) = accept::accept(stream, peer, shared.security()).await else {
                return;
            };
            // A verifier's read-only session never takes the master's slot.
            let (first, rest) = match crate::readonly::first_frame(&mut conn).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!("connection from {peer}: {e}");
                    if conn.tx.is_sealed() {
                        // The master's own frames are fine; it may learn why we close.
                        refuse(conn.wr, &mut conn.tx, RefuseCode::Malformed, e).await;
                        tdfs_replication::conn::linger(&mut conn.rd).await;
                    }
                    return;
                }
            };
            if first.kind == FrameType::Inspect {
                crate::readonly::serve(conn, peer, shared, first, rest).await;
                return;
            }
            // A master this replica must refuse (an older epoch than one it has seen, another
            // replica set, another protocol) is told so even while another holds the slot: a
            // replaced master learns it at once, and touches nothing.
            let hello = (first.kind == FrameType::Hello)
                .then(|| Hello::decode(&first.payload).ok())
                .flatten();
            if let Some(hello) = &hello {
                if let Some((code, message, epoch)) = refusal(&shared, hello) {
                    if code == RefuseCode::Fenced {
                        shared
                            .stats
                            .fenced_refusals
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    tracing::warn!("refusing master {} from {peer}: {message}", hello.label);
                    let r = Refuse {
                        code,
                        message,
                        epoch,
                    };
                    send_refusal(conn.wr, &mut conn.tx, r).await;
                    return;
                }
            }
            match shared.claim(peer, hello.as_ref()).await {
                Ok(guard) => {
                    session::run(conn, peer, shared, first, rest, &guard).await;
                    drop(guard);
                }
                Err(cur) => {
                    let message = format!(
                        "another master ({} from {}) is already connected",
                        cur.label, cur.peer
                    );
                    let standby = hello.as_ref().is_some_and(|h| {
                        h.flags & tdfs_protocol::msg::HELLO_FALLBACK != 0 && !cur.fallback
                    });
                    if standby {
                        // A fallback upstream checking in while the primary feeds us.
                        tracing::debug!("fallback upstream from {peer} stands by: {message}");
                    } else {
                        tracing::warn!("refusing connection from {peer}: {message}");
                    }
                    refuse(conn.wr, &mut conn.tx, RefuseCode::Busy, message).await;
                }
            }
        });
    }
}

/// Why `hello` must be refused before it may take the session slot, if it must.
fn refusal(
    shared: &Shared,
    hello: &Hello,
) -> Option<(RefuseCode, String, Option<tdfs_protocol::Epoch>)> {
    if hello.common_proto().is_none() {
        return Some((
            RefuseCode::Version,
            format!(
                "no common protocol version: master speaks {}..={}, this slave {PROTO_MIN}..={PROTO_MAX} \
                 (upgrade both sides together)",
                hello.proto_min, hello.proto_max
            ),
            None,
        ));
    }
    let core = shared.core();
    match crate::session::judge(hello, &core.node.record(), &core.state) {
        Standing::Fenced { newer } => Some((
            RefuseCode::Fenced,
            crate::session::fenced_message(hello, &newer),
            Some(newer),
        )),
        Standing::Foreign { set } => Some((
            RefuseCode::Foreign,
            crate::session::foreign_message(hello, &set),
            None,
        )),
        _ => None,
    }
}

async fn send_refusal(stream: BoxWrite, tx: &mut Tx, r: Refuse) {
    send_refuse_frame(stream, tx, r.encode()).await
}

async fn refuse(stream: BoxWrite, tx: &mut Tx, code: RefuseCode, message: String) {
    send_refuse_frame(stream, tx, Refuse::new(code, message).encode()).await
}

async fn send_refuse_frame(mut stream: BoxWrite, tx: &mut Tx, payload: Vec<u8>) {
    let f = tx.encode_vec(FrameType::Refuse, 0, &payload, Compression::None);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(&f).await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tdfs_protocol::{Epoch, History};

    fn epoch(number: u64, id: u8) -> Epoch {
        Epoch {
            number,
            id: [id; 16],
            start: number * 100,
        }
    }

    fn holder(e: Epoch, label: &str, fallback: bool) -> Active {
        Active {
            label: label.into(),
            peer: "127.0.0.1:1".parse().unwrap(),
            ticket: 1,
            epoch: Some(e),
            fallback,
            preempt: watch::channel(false).0,
        }
    }

    fn hello(e: Epoch, label: &str, fallback: bool) -> Hello {
        Hello {
            proto_min: PROTO_MIN,
            proto_max: PROTO_MAX,
            history: History { epochs: vec![e] },
            next_seq: 1,
            flags: if fallback {
                tdfs_protocol::msg::HELLO_FALLBACK
            } else {
                0
            },
            label: label.into(),
        }
    }

    #[test]
    fn who_may_take_the_slot_over() {
        let e1 = epoch(1, 1);
        let e2 = epoch(2, 2);
        let rival = epoch(1, 9);
        let a = holder(e1, "a:/x", false);
        // A newer epoch replaces a stale master.
        assert!(preempts(&a, &hello(e2, "b:/x", false)));
        // The same master reconnecting.
        assert!(preempts(&a, &hello(e1, "a:/x", false)));
        // Another primary of the same epoch, or an older or rival epoch: refused.
        assert!(!preempts(&a, &hello(e1, "relay:/x", false)));
        assert!(!preempts(
            &holder(e2, "b:/x", false),
            &hello(e1, "a:/x", false)
        ));
        assert!(!preempts(&a, &hello(rival, "r:/x", false)));
        // A fallback never takes over from a primary; a primary does from a fallback.
        assert!(!preempts(&a, &hello(e1, "relay:/x", true)));
        assert!(preempts(
            &holder(e1, "relay:/x", true),
            &hello(e1, "a:/x", false)
        ));
        // A holder whose handshake has not told its epoch yet is left alone.
        let mut pending = a.clone();
        pending.epoch = None;
        assert!(!preempts(&pending, &hello(e2, "b:/x", false)));
    }
}
