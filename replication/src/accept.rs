//! What stands between an accepted TCP connection and a session: the `--allow` list, TLS
//! (client certificate required) and the shared-secret challenge-response. Only a peer that
//! gets through all of it may take the session slot or learn anything about this slave.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::security::tls::TlsAcceptor;
use crate::security::{handshake, AllowList, Secret};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;
pub type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

/// How long a peer has to finish TLS and authentication.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections allowed in the TLS/authentication phase at once; more are closed at accept,
/// so strangers cannot pile up sockets and tasks.
pub const MAX_PENDING: usize = 32;

/// The slave's security settings (all off by default).
#[derive(Default)]
pub struct Security {
    pub secret: Option<Secret>,
    pub tls: Option<TlsAcceptor>,
    pub allow: AllowList,
    pending: AtomicUsize,
}

impl Security {
    pub fn new(secret: Option<Secret>, tls: Option<TlsAcceptor>, allow: AllowList) -> Self {
        Security {
            secret,
            tls,
            allow,
            pending: AtomicUsize::new(0),
        }
    }

    /// Whether a connection from `peer` may go on to TLS/authentication. Logs refusals.
    pub fn admit(&self, peer: &SocketAddr) -> bool {
        if !self.allow.allows(peer.ip()) {
            tracing::warn!("refusing connection from {peer}: address not allowed by --allow");
            return false;
        }
        true
    }
}

struct Pending<'a>(&'a AtomicUsize);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// TLS and authentication, as configured; `None` (after a warn log) when the peer does not
/// get through.
pub async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    sec: &Security,
) -> Option<(BoxRead, BoxWrite)> {
    if sec.tls.is_none() && sec.secret.is_none() {
        let (rd, wr) = stream.into_split();
        return Some((Box::pin(rd), Box::pin(wr)));
    }
    if sec.pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
        sec.pending.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!(
            "refusing connection from {peer}: {MAX_PENDING} connections already authenticating"
        );
        return None;
    }
    let _pending = Pending(&sec.pending);
    match tokio::time::timeout(AUTH_TIMEOUT, prelude(stream, peer, sec)).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(
                "refusing connection from {peer}: TLS/authentication not done within {AUTH_TIMEOUT:?}"
            );
            None
        }
    }
}

async fn prelude(
    stream: TcpStream,
    peer: SocketAddr,
    sec: &Security,
) -> Option<(BoxRead, BoxWrite)> {
    match &sec.tls {
        None => {
            let mut stream = stream;
            authenticate(&mut stream, peer, sec).await?;
            let (rd, wr) = stream.into_split();
            Some((Box::pin(rd), Box::pin(wr)))
        }
        Some(tls) => {
            let mut stream = match tls.accept(stream).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("refusing connection from {peer}: TLS handshake failed: {e}");
                    return None;
                }
            };
            authenticate(&mut stream, peer, sec).await?;
            let (rd, wr) = tokio::io::split(stream);
            Some((Box::pin(rd), crate::security::tls::flushing(wr)))
        }
    }
}

async fn authenticate<S>(stream: &mut S, peer: SocketAddr, sec: &Security) -> Option<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(secret) = &sec.secret else {
        return Some(());
    };
    match handshake::accept(stream, secret).await {
        Ok(()) => {
            tracing::debug!("master at {peer} authenticated");
            Some(())
        }
        Err(e @ crate::security::AuthError::Failed(_)) => {
            tracing::warn!("refusing connection from {peer}: {e}");
            None
        }
        Err(e) => {
            tracing::warn!("refusing connection from {peer}: authentication failed: {e}");
            None
        }
    }
}
