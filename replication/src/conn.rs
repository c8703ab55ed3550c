//! An established connection to a peer: its two byte-stream halves and the framing the
//! handshake settled on (sealed frames after a shared-secret exchange outside TLS, plain
//! frames otherwise). Whoever reads frames goes through `rx`, whoever writes them through
//! `tx`, so every frame of the session is counted and checked in order.

use std::pin::Pin;

use tdfs_protocol::auth::KeyId;
use tdfs_protocol::seal::{self, Protection, Rx, Tx};
use tokio::io::{AsyncRead, AsyncWrite};

pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;
pub type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

pub struct Conn {
    pub rd: BoxRead,
    pub wr: BoxWrite,
    pub tx: Tx,
    pub rx: Rx,
    /// The secret the peer proved (its key id), when there was a shared-secret exchange.
    pub secret: Option<KeyId>,
    /// What guards the frames: `None` without a secret (plain frames, or TLS alone).
    pub protection: Option<Protection>,
}

impl Conn {
    /// A connection without a shared-secret exchange: plain frames (over TLS or not).
    pub fn plain(rd: BoxRead, wr: BoxWrite) -> Conn {
        let (tx, rx) = seal::plain();
        Conn {
            rd,
            wr,
            tx,
            rx,
            secret: None,
            protection: None,
        }
    }

    /// A connection after a shared-secret exchange.
    pub fn authenticated(
        rd: BoxRead,
        wr: BoxWrite,
        a: crate::security::handshake::Authenticated,
    ) -> Conn {
        Conn {
            rd,
            wr,
            tx: a.tx,
            rx: a.rx,
            secret: Some(a.secret),
            protection: Some(a.protection),
        }
    }
}

/// Reads and discards what the peer still sends until it closes (at most `LINGER`).
/// Closing a socket with received bytes unread makes the kernel reset the connection, and a
/// reset can destroy the last frame just sent (a `Refuse` saying why) before the peer has
/// read it; a side that refuses the stream shuts its writing half down, then lingers here.
pub async fn linger(rd: &mut BoxRead) {
    use tokio::io::AsyncReadExt;
    let mut scratch = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(rd.read(&mut scratch).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// How long [`linger`] waits for the peer to close.
pub const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
