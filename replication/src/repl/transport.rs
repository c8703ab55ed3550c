//! How the master reaches a slave: the byte stream under the protocol. Everything that
//! wraps the connection (socket options, TLS, shared-secret authentication) stays in this
//! module so the link logic only sees a reader and a writer.

use std::io;
use std::time::Duration;

use crate::security::handshake::{self, Authenticated};
use crate::security::AuthError;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::SlaveConfig;
pub use crate::conn::{BoxRead, BoxWrite, Conn};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long sent data may stay unacknowledged before the connection counts as dead.
const USER_TIMEOUT: Duration = Duration::from_secs(30);
/// TLS handshake plus the shared-secret exchange.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to a slave and returns a ready-to-use connection: TLS-wrapped, authenticated
/// and with sealed framing when so configured ([`crate::outbound`]).
pub async fn connect(cfg: &SlaveConfig) -> io::Result<Conn> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&cfg.addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(cfg.nodelay)?;
    let sock = socket2::SockRef::from(&stream);
    sock.set_keepalive(true)?;
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(10))
            .with_interval(Duration::from_secs(5))
            .with_retries(3),
    )?;
    // Keepalive is silent while data is unacknowledged; without a user timeout a dead path
    // with writes outstanding is noticed only after the kernel's retries (about 15 min).
    sock.set_tcp_user_timeout(Some(USER_TIMEOUT))?;
    let sec = crate::outbound::get();
    match &sec.tls {
        None => {
            let mut stream = stream;
            let auth = authenticate(&mut stream, cfg).await?;
            let (rd, wr) = stream.into_split();
            Ok(conn(Box::pin(rd), Box::pin(wr), auth))
        }
        Some(tls) => {
            let name = crate::security::tls::server_name(&cfg.addr)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let mut stream = tokio::time::timeout(AUTH_TIMEOUT, tls.connect(name, stream))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
                .map_err(|e| {
                    tracing::error!(slave = %cfg.addr, "TLS handshake with slave {} failed: {e}", cfg.addr);
                    io::Error::new(e.kind(), format!("TLS handshake failed: {e}"))
                })?;
            let auth = authenticate(&mut stream, cfg).await?;
            let (rd, wr) = tokio::io::split(stream);
            Ok(conn(Box::pin(rd), crate::security::tls::flushing(wr), auth))
        }
    }
}

fn conn(rd: BoxRead, wr: BoxWrite, auth: Option<Authenticated>) -> Conn {
    match auth {
        Some(a) => Conn::authenticated(rd, wr, a),
        None => Conn::plain(rd, wr),
    }
}

/// The shared-secret exchange, when a secret is configured; failures are logged here (the
/// link retries with backoff).
async fn authenticate<S>(stream: &mut S, cfg: &SlaveConfig) -> io::Result<Option<Authenticated>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let sec = crate::outbound::get();
    let secrets = sec.secrets();
    if secrets.is_empty() {
        return Ok(None);
    }
    let protection = sec.protection(cfg.encrypt);
    let res = tokio::time::timeout(
        AUTH_TIMEOUT,
        handshake::connect(stream, &secrets, protection),
    )
    .await
    .unwrap_or_else(|_| {
        Err(AuthError::Protocol(
            "no answer within the authentication timeout".into(),
        ))
    });
    match res {
        Ok(a) => {
            tracing::debug!(
                slave = %cfg.addr,
                "authenticated with secret {}; frames {}",
                tdfs_protocol::auth::show_key_id(&a.secret),
                a.protection.describe()
            );
            Ok(Some(a))
        }
        Err(e) => {
            match &e {
                AuthError::Refused(m) => tracing::error!(
                    slave = %cfg.addr,
                    "slave {} refused authentication: {m}",
                    cfg.addr
                ),
                e => tracing::error!(
                    slave = %cfg.addr,
                    "authentication with slave {} failed: {e}",
                    cfg.addr
                ),
            }
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("authentication failed: {e}"),
            ))
        }
    }
}
