//! A read-only session with a replica (the `Inspect` handshake): where it stands (its
//! history and position), its directory listings and file digests. It never takes the
//! replica's master slot, so it works while a master streams to it. `tdfs verify` compares
//! trees with it; `tdfs promote` and a starting master ask replicas where they stand.

use std::time::Duration;

use anyhow::{bail, Context};
use tdfs_protocol::frame::FrameType;
use tdfs_protocol::msg::{Hello, HelloAck, Refuse, PROTO_MAX, PROTO_MIN};
use tdfs_protocol::seal::{Rx, Tx};
use tdfs_protocol::sync::{encode_path, Digest, Entry, Listing};
use tdfs_protocol::{Compression, FrameError, History, WirePath};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::transport::{self, BoxRead, BoxWrite};
use super::SlaveConfig;

pub struct Inspector {
    rd: BoxRead,
    wr: BoxWrite,
    tx: Tx,
    rx: Rx,
    buf: Vec<u8>,
    next: u64,
    /// Where the replica stood when the session opened.
    pub hello: HelloAck,
}

impl Inspector {
    /// Opens a read-only session with the replica at `cfg.addr` (`label` names this side in
    /// its log), within `timeout`.
    pub async fn connect(
        cfg: &SlaveConfig,
        label: &str,
        timeout: Duration,
    ) -> anyhow::Result<Inspector> {
        Self::connect_as(cfg, label, &History::default(), timeout).await
    }

    /// [`Inspector::connect`] saying which line this side leads (a starting master): a
    /// replica that has seen a newer epoch logs that this one was replaced.
    pub async fn connect_as(
        cfg: &SlaveConfig,
        label: &str,
        history: &History,
        timeout: Duration,
    ) -> anyhow::Result<Inspector> {
        tokio::time::timeout(timeout, Self::open(cfg, label, history))
            .await
            .map_err(|_| anyhow::anyhow!("{}: no answer within {timeout:?}", cfg.addr))?
    }

    async fn open(cfg: &SlaveConfig, label: &str, history: &History) -> anyhow::Result<Inspector> {
        let c = transport::connect(cfg)
            .await
            .with_context(|| format!("connecting to {}", cfg.addr))?;
        let mut r = Inspector {
            rd: c.rd,
            wr: c.wr,
            tx: c.tx,
            rx: c.rx,
            buf: Vec::new(),
            next: 1,
            hello: HelloAck {
                proto: 0,
                history: History::default(),
                seen: None,
                applied: 0,
                flags: 0,
                label: String::new(),
            },
        };
        let h = Hello {
            proto_min: PROTO_MIN,
            proto_max: PROTO_MAX,
            history: history.clone(),
            next_seq: 0,
            flags: 0,
            label: label.to_string(),
        };
        r.send(FrameType::Inspect, 0, &h.encode()).await?;
        let f = r.recv().await?;
        match f.kind {
            FrameType::HelloAck => r.hello = HelloAck::decode(&f.payload)?,
            FrameType::Refuse => bail!(
                "{} refused: {}",
                cfg.addr,
                Refuse::decode(&f.payload)?.message
            ),
            k => bail!("{} answered {k:?}", cfg.addr),
        }
        Ok(r)
    }

    async fn send(&mut self, kind: FrameType, seq: u64, payload: &[u8]) -> anyhow::Result<()> {
        let f = self.tx.encode_vec(kind, seq, payload, Compression::None);
        self.wr.write_all(&f).await?;
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<tdfs_protocol::Frame> {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match self.rx.parse_owned(&mut self.buf) {
                Ok(f) => {
                    self.buf.drain(..f.wire_len);
                    return Ok(f);
                }
                Err(FrameError::Incomplete) => {}
                Err(e) => bail!("bad frame from replica: {e}"),
            }
            let n = self.rd.read(&mut chunk).await?;
            if n == 0 {
                bail!("replica closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The replica's listing of `dir` (its errno when it cannot list it).
    pub async fn listing(&mut self, dir: &WirePath) -> anyhow::Result<Result<Vec<Entry>, i32>> {
        let id = self.next;
        self.next += 1;
        self.send(FrameType::ListDir, id, &encode_path(dir)).await?;
        let mut out = Vec::new();
        loop {
            let f = self.recv().await?;
            if f.kind != FrameType::Listing || f.seq != id {
                bail!("unexpected {:?} from replica", f.kind);
            }
            let l = Listing::decode(&f.payload)?;
            if l.errno != 0 {
                return Ok(Err(l.errno));
            }
            out.extend(l.entries);
            if !l.more {
                return Ok(Ok(out));
            }
        }
    }

    /// SHA-256 of the replica's file at `p`, computed there.
    pub async fn digest(&mut self, p: &WirePath) -> anyhow::Result<Digest> {
        let id = self.next;
        self.next += 1;
        self.send(FrameType::Checksum, id, &encode_path(p)).await?;
        let f = self.recv().await?;
        if f.kind != FrameType::Digest || f.seq != id {
            bail!("unexpected {:?} from replica", f.kind);
        }
        Ok(Digest::decode(&f.payload)?)
    }
}
