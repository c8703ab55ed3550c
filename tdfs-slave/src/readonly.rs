//! Read-only sessions for `tdfs verify`: directory listings and content digests of the
//! replica, computed here where the data lives. They may run while a master is connected
//! (they never take its slot) and can change nothing.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tdfs_protocol::frame::{self, Frame, FrameType};
use tdfs_protocol::msg::{Hello, HelloAck, Refuse, RefuseCode};
use tdfs_protocol::seal::Tx;
use tdfs_protocol::{Compression, FrameError, HEADER_LEN, MAX_PAYLOAD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::listener::Shared;
use tdfs_replication::accept::{BoxWrite, Conn};

const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the connection's first frame (checked like every other: in a sealed session its
/// tag first); returns it and whatever arrived after it.
pub async fn first_frame(conn: &mut Conn) -> Result<(Frame, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    let r = tokio::time::timeout(FIRST_FRAME_TIMEOUT, async {
        loop {
            match frame::frame_len(&buf) {
                Ok(n) if buf.len() >= n => {
                    let f = conn.rx.parse_owned(&mut buf).map_err(|e| {
                        if e.is_authentication() {
                            format!("refusing the stream: {e}; nothing of it was applied")
                        } else {
                            format!("bad first frame: {e}")
                        }
                    })?;
                    return Ok((f, buf[n..].to_vec()));
                }
                Ok(_) | Err(FrameError::Incomplete) => {}
                Err(e) => return Err(format!("bad first frame: {e}")),
            }
            if buf.len() > MAX_PAYLOAD + HEADER_LEN + tdfs_protocol::seal::TAG_LEN {
                return Err("first frame too large".into());
            }
            let n = conn.rd.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before the first frame".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    match r {
        Ok(r) => r,
        Err(_) => Err("no first frame within the timeout".into()),
    }
}

async fn send(
    wr: &mut BoxWrite,
    tx: &mut Tx,
    kind: FrameType,
    seq: u64,
    payload: &[u8],
) -> std::io::Result<()> {
    wr.write_all(&tx.encode_vec(kind, seq, payload, Compression::None))
        .await
}

/// Serves one verifier until it disconnects.
pub async fn serve(
    conn: Conn,
    peer: SocketAddr,
    shared: Arc<Shared>,
    first: Frame,
    mut buf: Vec<u8>,
) {
    let Conn {
        mut rd,
        mut wr,
        mut tx,
        mut rx,
        ..
    } = conn;
    let mut first = Some(first);
    let root: OwnedFd = match shared.core().applier.root().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!("verifier from {peer}: cannot open the mirror root: {e}");
            return;
        }
    };
    let root = Arc::new(root);
    let r: Result<(), String> = async {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut greeted = false;
        loop {
            let f = loop {
                if let Some(f) = first.take() {
                    break f;
                }
                match rx.parse_owned(&mut buf) {
                    Ok(f) => {
                        buf.drain(..f.wire_len);
                        break f;
                    }
                    Err(FrameError::Incomplete) => {}
                    Err(e) => return Err(format!("bad frame: {e}")),
                }
                let n = rd.read(&mut chunk).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            match (greeted, f.kind) {
                (false, FrameType::Inspect) => {
                    let h = Hello::decode(&f.payload).map_err(|e| e.to_string())?;
                    let Some(proto) = h.common_proto() else {
                        let r = Refuse::new(RefuseCode::Version, "no common protocol version");
                        let _ = send(&mut wr, &mut tx, FrameType::Refuse, 0, &r.encode()).await;
                        return Err("no common protocol version".into());
                    };
                    tracing::info!("verifier {} from {peer} connected", h.label);
                    // Where this replica stands (`tdfs promote` compares replicas with it).
                    let ack = {
                        let c = shared.core();
                        let rec = c.node.record();
                        // A starting master asks with its own history: one that was replaced
                        // learns it from the answer, and this log says so too.
                        if !h.history.is_empty() {
                            if let tdfs_protocol::Standing::Fenced { newer } =
                                crate::session::judge(&h, &rec, &c.state)
                            {
                                shared
                                    .stats
                                    .fenced_refusals
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                tracing::warn!(
                                    "{} from {peer} asked where this replica stands: {}",
                                    h.label,
                                    crate::session::fenced_message(&h, &newer)
                                );
                            }
                        }
                        HelloAck {
                            proto,
                            history: rec.history,
                            seen: rec.seen,
                            applied: c.state.applied,
                            flags: c.state.flags,
                            label: shared.own_label(),
                        }
                    };
                    send(&mut wr, &mut tx, FrameType::HelloAck, 0, &ack.encode())
                        .await
                        .map_err(|e| e.to_string())?;
                    greeted = true;
                }
                (true, FrameType::ListDir) | (true, FrameType::Checksum) => {
                    let p =
                        tdfs_protocol::sync::decode_path(&f.payload).map_err(|e| e.to_string())?;
                    let root = root.clone();
                    let list = f.kind == FrameType::ListDir;
                    let id = f.seq;
                    let replies = tokio::task::spawn_blocking(move || {
                        if list {
                            crate::session::listing_replies(root.as_fd(), id, &p)
                        } else {
                            let d = crate::confine::digest(root.as_fd(), &p);
                            vec![(FrameType::Digest, id, d.encode())]
                        }
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                    for (k, id, payload) in replies {
                        send(&mut wr, &mut tx, k, id, &payload)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                }
                (_, k) => {
                    let r = Refuse::new(
                        RefuseCode::Malformed,
                        format!("{k:?} is not allowed in a read-only session"),
                    );
                    let _ = send(&mut wr, &mut tx, FrameType::Refuse, 0, &r.encode()).await;
                    return Err(format!("{k:?} in a read-only session"));
                }
            }
        }
    }
    .await;
    match r {
        Ok(()) => tracing::info!("verifier from {peer} done"),
        Err(e) => tracing::warn!("verifier from {peer}: {e}"),
    }
    let _ = wr.shutdown().await;
}
