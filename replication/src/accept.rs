//! What stands between an accepted TCP connection and a session: the `--allow` list, TLS
//! (client certificate required) and the shared-secret challenge-response. Only a peer that
//! gets through all of it may take the session slot or learn anything about this slave.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::security::handshake::Authenticated;
use crate::security::tls::TlsAcceptor;
use crate::security::{handshake, AllowList, Secret};
use tdfs_protocol::auth::{self, KeyId};
use tdfs_protocol::seal::Protection;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;

pub use crate::conn::{BoxRead, BoxWrite, Conn};

/// How long a peer has to finish TLS and authentication.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections allowed in the TLS/authentication phase at once; more are closed at accept,
/// so strangers cannot pile up sockets and tasks.
pub const MAX_PENDING: usize = 32;

/// The slave's security settings (all off by default).
pub struct Security {
    /// The secrets a master may prove (two during a rotation); empty: no secret exchange.
    /// Replaced at run time by SIGHUP; sessions watch it to end when theirs is retired.
    secrets: watch::Sender<Arc<Vec<Secret>>>,
    /// Require every master to encrypt its frames (`--encrypt`).
    pub encrypt: bool,
    pub tls: Option<TlsAcceptor>,
    pub allow: AllowList,
    pending: AtomicUsize,
}

impl Default for Security {
    fn default() -> Self {
        Security::new(Vec::new(), false, None, AllowList::default())
    }
}

impl Security {
    pub fn new(
        secrets: Vec<Secret>,
        encrypt: bool,
        tls: Option<TlsAcceptor>,
        allow: AllowList,
    ) -> Self {
        Security {
            secrets: watch::Sender::new(Arc::new(secrets)),
            encrypt,
            tls,
            allow,
            pending: AtomicUsize::new(0),
        }
    }

    pub fn secrets(&self) -> Arc<Vec<Secret>> {
        self.secrets.borrow().clone()
    }

    /// Changes whenever the accepted secrets do.
    pub fn watch_secrets(&self) -> watch::Receiver<Arc<Vec<Secret>>> {
        self.secrets.subscribe()
    }

    /// Replaces the accepted secrets (SIGHUP); returns whether they changed. Sessions that
    /// authenticated with a secret no longer accepted end (see [`still_accepted`]).
    pub fn set_secrets(&self, new: Vec<Secret>) -> bool {
        if **self.secrets.borrow() == new {
            return false;
        }
        self.secrets.send_replace(Arc::new(new));
        true
    }

    /// What this side expects to guard the frames of an authenticated session.
    pub fn protection(&self) -> Protection {
        if self.tls.is_some() {
            Protection::Tls
        } else if self.encrypt {
            Protection::Encrypt
        } else {
            Protection::Mac
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

/// Whether a session that authenticated with `secret` may go on under the secrets now
/// accepted.
pub fn still_accepted(secrets: &[Secret], secret: Option<KeyId>) -> bool {
    secret.is_none_or(|k| secrets.iter().any(|s| s.key_id() == k))
}

/// TLS and authentication, as configured; `None` (after a warn log) when the peer does not
/// get through.
pub async fn accept(stream: TcpStream, peer: SocketAddr, sec: &Security) -> Option<Conn> {
    if sec.tls.is_none() && sec.secrets().is_empty() {
        let (rd, wr) = stream.into_split();
        return Some(Conn::plain(Box::pin(rd), Box::pin(wr)));
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

async fn prelude(stream: TcpStream, peer: SocketAddr, sec: &Security) -> Option<Conn> {
    match &sec.tls {
        None => {
            let mut stream = stream;
            let auth = authenticate(&mut stream, peer, sec).await?;
            let (rd, wr) = stream.into_split();
            Some(conn(Box::pin(rd), Box::pin(wr), auth))
        }
        Some(tls) => {
            let mut stream = match tls.accept(stream).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("refusing connection from {peer}: TLS handshake failed: {e}");
                    return None;
                }
            };
            let auth = authenticate(&mut stream, peer, sec).await?;
            let (rd, wr) = tokio::io::split(stream);
            Some(conn(Box::pin(rd), crate::security::tls::flushing(wr), auth))
        }
    }
}

fn conn(rd: BoxRead, wr: BoxWrite, auth: Option<Authenticated>) -> Conn {
    match auth {
        Some(a) => Conn::authenticated(rd, wr, a),
        None => Conn::plain(rd, wr),
    }
}

/// `Some(None)`: no secret configured, go on; `Some(Some(_))`: authenticated.
async fn authenticate<S>(
    stream: &mut S,
    peer: SocketAddr,
    sec: &Security,
) -> Option<Option<Authenticated>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let secrets = sec.secrets();
    if secrets.is_empty() {
        return Some(None);
    }
    match handshake::accept(stream, &secrets, sec.protection()).await {
        Ok(a) => {
            tracing::info!(
                "master at {peer} authenticated with secret {}{}; frames {}",
                auth::show_key_id(&a.secret),
                if secrets.len() > 1 {
                    format!(
                        " ({} of the {} accepted)",
                        if secrets[0].key_id() == a.secret {
                            "first"
                        } else {
                            "second"
                        },
                        secrets.len()
                    )
                } else {
                    String::new()
                },
                a.protection.describe()
            );
            Some(Some(a))
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
