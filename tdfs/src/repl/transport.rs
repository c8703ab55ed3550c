//! How the master reaches a slave: the byte stream under the protocol. Everything that
//! wraps the connection (socket options today; authentication and TLS belong here too)
//! stays in this module so the link logic only sees a reader and a writer.

use std::io;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::SlaveConfig;

pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;
pub type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to a slave and returns the two halves of a ready-to-use stream.
pub async fn connect(cfg: &SlaveConfig) -> io::Result<(BoxRead, BoxWrite)> {
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
    let (rd, wr) = stream.into_split();
    Ok((Box::pin(rd), Box::pin(wr)))
}
