//! One slave's link: connect (with backoff), handshake, stream ops from the log, read acks.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tdfs_protocol::frame::{self, FrameType};
use tdfs_protocol::msg::{self, Ack, ApplyError, Hello, HelloAck, Refuse};
use tdfs_protocol::{Compression, Frame, FrameError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tracing::{debug, error, info, warn};

use super::{transport, BatchResult, Shared, SlaveStatus};

/// Largest batch of ops in one frame (the frame limit is 8 MiB; one write op is ≤ 1 MiB plus
/// its path, so this always fits).
const BATCH_BYTES: usize = 2 << 20;
const BATCH_OPS: usize = 4096;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("bad message: {0}")]
    Decode(#[from] tdfs_protocol::DecodeError),
    #[error("refused by slave: {0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("slave failed to apply an op")]
    ApplyFailed,
    #[error("slave needs ops the log no longer holds")]
    Lost,
}

/// Reads one whole frame, keeping what follows it in `buf`.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<Frame>, LinkError> {
    loop {
        if !buf.is_empty() {
            match frame::parse(buf) {
                Ok(f) => {
                    buf.drain(..f.wire_len);
                    return Ok(Some(f));
                }
                Err(FrameError::Incomplete) => {}
                Err(e) => return Err(LinkError::Frame(e)),
            }
        }
        let mut chunk = [0u8; 64 * 1024];
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(LinkError::Protocol(
                "connection closed in the middle of a frame".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub(crate) async fn run(shared: Arc<Shared>, idx: usize) {
    let me = shared.slaves[idx].clone();
    let addr = me.config.addr.clone();
    let mut backoff = BACKOFF_MIN;
    let mut quiet = false;
    loop {
        if shared.closing.load(Ordering::Acquire) {
            return;
        }
        if me.lost.load(Ordering::Acquire) {
            // Without the ops it missed, streaming would apply later ops to a tree that lacks
            // earlier ones. Stay away until a resync exists for it.
            return;
        }
        match session(&shared, &me).await {
            Ok(()) => {
                info!(slave = %addr, "session ended: every op acknowledged");
                me.connected.store(false, Ordering::Release);
                shared.note_ack();
                return;
            }
            Err(e) => {
                let was = me.connected.swap(false, Ordering::AcqRel);
                shared.note_ack();
                match e {
                    LinkError::Lost => {
                        me.lost.store(true, Ordering::Release);
                        error!(slave = %addr, "slave is out of sync: it needs ops this master no longer holds");
                        return;
                    }
                    LinkError::ApplyFailed => {
                        // Logged where the error arrived; retry from what it applied.
                    }
                    e if was => warn!(slave = %addr, "link lost: {e}; reconnecting"),
                    e if !quiet => {
                        warn!(slave = %addr, "cannot reach slave: {e}; retrying with backoff");
                        quiet = true;
                    }
                    e => debug!(slave = %addr, "still cannot reach slave: {e}"),
                }
                if was {
                    backoff = BACKOFF_MIN;
                }
                // Wake early when closing so shutdown is not held by a sleeping link.
                let notified = shared.wake.notified();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = notified, if shared.closing.load(Ordering::Acquire) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn session(shared: &Arc<Shared>, me: &Arc<SlaveStatus>) -> Result<(), LinkError> {
    let cfg = &me.config;
    let (mut rd, mut wr) = transport::connect(cfg).await?;

    let hello = Hello {
        proto_min: msg::PROTO_MIN,
        proto_max: msg::PROTO_MAX,
        master_id: shared.master_id,
        next_seq: shared.head(),
        label: shared.label.clone(),
    };
    wr.write_all(&frame::encode_vec(
        FrameType::Hello,
        0,
        &hello.encode(),
        Compression::None,
    ))
    .await?;
    let mut rbuf = Vec::new();
    let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut rd, &mut rbuf))
        .await
        .map_err(|_| LinkError::Protocol("no handshake reply".into()))??
        .ok_or_else(|| LinkError::Protocol("closed during handshake".into()))?;
    let ack = match reply.kind {
        FrameType::HelloAck => HelloAck::decode(&reply.payload)?,
        FrameType::Refuse => {
            let r = Refuse::decode(&reply.payload)?;
            return Err(LinkError::Refused(format!("{:?}: {}", r.code, r.message)));
        }
        k => return Err(LinkError::Protocol(format!("expected HelloAck, got {k:?}"))),
    };
    let front = shared.front();
    let head = shared.head();
    let mut cursor = if ack.last_master == shared.master_id && ack.last_applied + 1 >= front {
        ack.last_applied + 1
    } else if ack.last_master == [0; 16] && ack.last_applied == 0 {
        // A fresh slave: it gets everything this master still holds.
        front
    } else if ack.last_master == shared.master_id {
        return Err(LinkError::Lost);
    } else {
        warn!(
            slave = %cfg.addr,
            "slave last applied seq {} from another master; streaming from seq {front} \
             (it must already hold this master's tree)",
            ack.last_applied
        );
        front
    };
    if cursor > head {
        warn!(slave = %cfg.addr, "slave claims seq {} beyond this master's head {head}; streaming from {head}", ack.last_applied);
        cursor = head;
    }
    me.applied.store(cursor - 1, Ordering::Release);
    me.durable.fetch_max(0, Ordering::Release);
    me.connected.store(true, Ordering::Release);
    info!(slave = %cfg.addr, from = cursor, head, "connected; streaming");

    // Acks and errors come back on the read half.
    let reader = {
        let me = me.clone();
        let shared = shared.clone();
        async move {
            loop {
                let Some(f) = read_frame(&mut rd, &mut rbuf).await? else {
                    return Err::<(), LinkError>(LinkError::Protocol(
                        "slave closed the connection".into(),
                    ));
                };
                match f.kind {
                    FrameType::Ack => {
                        let a = Ack::decode(&f.payload)?;
                        me.applied.fetch_max(a.applied, Ordering::AcqRel);
                        me.durable.fetch_max(a.durable, Ordering::AcqRel);
                        shared.note_ack();
                        if shared.closing.load(Ordering::Acquire) {
                            shared.wake.notify_waiters();
                        }
                    }
                    FrameType::ApplyError => {
                        let e = ApplyError::decode(&f.payload)?;
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
                    k => return Err(LinkError::Protocol(format!("unexpected {k:?} from slave"))),
                }
            }
        }
    };
    tokio::pin!(reader);

    let mut payload = Vec::new();
    let mut out = Vec::new();
    loop {
        let notified = shared.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match shared.batch_from(cursor, BATCH_BYTES, BATCH_OPS) {
            BatchResult::Lost => return Err(LinkError::Lost),
            BatchResult::Ops(first, ops) => {
                payload.clear();
                payload.extend_from_slice(&(ops.len() as u32).to_le_bytes());
                for o in &ops {
                    payload.extend_from_slice(o);
                }
                out.clear();
                frame::encode(FrameType::Ops, first, &payload, cfg.compression, &mut out);
                tokio::select! {
                    r = wr.write_all(&out) => r?,
                    r = &mut reader => return r,
                }
                cursor = first + ops.len() as u64;
                me.bytes_sent.fetch_add(out.len() as u64, Ordering::Relaxed);
                me.ops_sent.fetch_add(ops.len() as u64, Ordering::Relaxed);
                continue;
            }
            BatchResult::Empty => {}
        }
        if shared.closing.load(Ordering::Acquire)
            && me.applied.load(Ordering::Acquire) + 1 >= shared.head()
        {
            wr.write_all(&frame::encode_vec(
                FrameType::Bye,
                0,
                &[],
                Compression::None,
            ))
            .await?;
            wr.shutdown().await.ok();
            return Ok(());
        }
        tokio::select! {
            _ = &mut notified => {}
            r = &mut reader => return r,
        }
    }
}
