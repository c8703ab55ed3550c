//! Accepting connections and enforcing "one master at a time".

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tdfs_protocol::frame::{self, FrameType};
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

/// Who holds the session slot, for the message a refused master gets.
#[derive(Clone)]
struct Active {
    label: String,
    peer: SocketAddr,
}

pub struct Shared {
    core: Mutex<Core>,
    active: Mutex<Option<Active>>,
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
            stopping: AtomicBool::new(false),
            stop_tx,
            nodelay,
            security: OnceLock::new(),
            stats: crate::stats::Stats::default(),
            label,
            node,
        })
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

    fn security(&self) -> &Security {
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

    pub fn set_label(&self, label: &str) {
        if let Some(a) = lock(&self.active).as_mut() {
            a.label = label.to_owned();
        }
    }

    fn claim(self: &Arc<Self>, peer: SocketAddr) -> Result<SlotGuard, Active> {
        let mut a = lock(&self.active);
        if let Some(cur) = a.as_ref() {
            return Err(cur.clone());
        }
        *a = Some(Active {
            label: "handshake pending".into(),
            peer,
        });
        Ok(SlotGuard(self.clone()))
    }
}

/// Frees the session slot when the session ends, however it ends.
pub struct SlotGuard(Arc<Shared>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        *lock(&self.0.active) = None;
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
            let Some((rd, wr)) = accept::accept(stream, peer, shared.security()).await else {
                return;
            };
            let mut rd = rd;
            // A verifier's read-only session never takes the master's slot.
            let first = match crate::readonly::first_frame(&mut rd).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("connection from {peer}: {e}");
                    return;
                }
            };
            if first.get(5) == Some(&(FrameType::Inspect as u8)) {
                crate::readonly::serve(rd, wr, peer, shared, first).await;
                return;
            }
            // A master this replica must refuse (an older epoch than one it has seen, another
            // replica set, another protocol) is told so even while another holds the slot: a
            // replaced master learns it at once, and touches nothing.
            if let Ok(f) = frame::parse(&first) {
                if f.kind == FrameType::Hello {
                    if let Ok(hello) = Hello::decode(&f.payload) {
                        if let Some((code, message, epoch)) = refusal(&shared, &hello) {
                            tracing::warn!(
                                "refusing master {} from {peer}: {message}",
                                hello.label
                            );
                            let r = Refuse {
                                code,
                                message,
                                epoch,
                            };
                            send_refusal(wr, r).await;
                            return;
                        }
                    }
                }
            }
            match shared.claim(peer) {
                Ok(guard) => {
                    session::run(rd, wr, peer, shared, first).await;
                    drop(guard);
                }
                Err(cur) => {
                    let message = format!(
                        "another master ({} from {}) is already connected",
                        cur.label, cur.peer
                    );
                    tracing::warn!("refusing connection from {peer}: {message}");
                    refuse(wr, RefuseCode::Busy, message).await;
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

async fn send_refusal(stream: BoxWrite, r: Refuse) {
    send_refuse_frame(stream, r.encode()).await
}

async fn refuse(stream: BoxWrite, code: RefuseCode, message: String) {
    send_refuse_frame(stream, Refuse::new(code, message).encode()).await
}

async fn send_refuse_frame(mut stream: BoxWrite, payload: Vec<u8>) {
    let f = frame::encode_vec(FrameType::Refuse, 0, &payload, Compression::None);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(&f).await?;
        stream.shutdown().await
    })
    .await;
}
