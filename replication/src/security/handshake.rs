//! The shared-secret challenge-response ([`tdfs_protocol::auth`]) over a byte stream.
//!
//! Frames are read exactly (header, then the announced payload), so nothing the session
//! that follows needs is consumed here, and a peer cannot make us allocate more than
//! [`MAX_AUTH_PAYLOAD`] bytes.

use std::fmt;
use std::io;

use tdfs_protocol::auth::{
    self, AuthChallenge, AuthOk, AuthRequest, AuthResponse, Nonce, AUTH_VERSION, MAX_AUTH_PAYLOAD,
};
use tdfs_protocol::frame::{self, Frame, FrameType};
use tdfs_protocol::msg::{Refuse, RefuseCode};
use tdfs_protocol::{Compression, HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::security::Secret;

/// What the slave says to a master that does not prove the secret.
pub const FAILED_MESSAGE: &str = "authentication failed";

#[derive(Debug)]
pub enum AuthError {
    Io(io::Error),
    /// The other side refused us (its message).
    Refused(String),
    /// The other side did not prove the secret (or did not try).
    Failed(String),
    /// Not the exchange we expect.
    Protocol(String),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                f.write_str("connection closed during authentication")
            }
            AuthError::Io(e) => write!(f, "i/o error during authentication: {e}"),
            AuthError::Refused(m) => write!(f, "refused: {m}"),
            AuthError::Failed(m) | AuthError::Protocol(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for AuthError {}

impl From<io::Error> for AuthError {
    fn from(e: io::Error) -> Self {
        AuthError::Io(e)
    }
}

fn nonce() -> Result<Nonce, AuthError> {
    let mut n = [0u8; 32];
    getrandom::getrandom(&mut n)
        .map_err(|e| AuthError::Io(io::Error::other(format!("no randomness: {e}"))))?;
    Ok(n)
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, kind: FrameType, payload: &[u8]) -> io::Result<()> {
    s.write_all(&frame::encode_vec(kind, 0, payload, Compression::None))
        .await?;
    s.flush().await
}

async fn refuse<S: AsyncWrite + Unpin>(s: &mut S, code: RefuseCode, message: &str) {
    let r = Refuse::new(code, message);
    let _ = send(s, FrameType::Refuse, &r.encode()).await;
    let _ = s.shutdown().await;
}

/// Reads one small frame exactly. A `Hello` (or any other non-auth frame) is returned by its
/// type with an empty payload, unread: the caller refuses it anyway.
async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> Result<Frame, AuthError> {
    let mut buf = vec![0u8; HEADER_LEN];
    s.read_exact(&mut buf).await?;
    match frame::check(&buf) {
        Ok(_) | Err(tdfs_protocol::FrameError::Incomplete) => {}
        Err(e) => return Err(AuthError::Protocol(format!("bad frame: {e}"))),
    }
    let kind = FrameType::from_u8(buf[5]).expect("checked");
    let auth_frame = matches!(
        kind,
        FrameType::AuthRequest
            | FrameType::AuthChallenge
            | FrameType::AuthResponse
            | FrameType::AuthOk
            | FrameType::Refuse
    );
    if !auth_frame {
        return Ok(Frame {
            kind,
            seq: 0,
            payload: Vec::new(),
            wire_len: HEADER_LEN,
        });
    }
    let wire_len = u32::from_le_bytes(buf[16..20].try_into().expect("4 bytes")) as usize;
    if wire_len > MAX_AUTH_PAYLOAD {
        return Err(AuthError::Protocol(format!(
            "{kind:?} frame of {wire_len} bytes during authentication"
        )));
    }
    buf.resize(HEADER_LEN + wire_len, 0);
    s.read_exact(&mut buf[HEADER_LEN..]).await?;
    frame::parse(&buf).map_err(|e| AuthError::Protocol(format!("bad frame: {e}")))
}

fn decode<T>(r: Result<T, tdfs_protocol::DecodeError>, what: &str) -> Result<T, AuthError> {
    r.map_err(|e| AuthError::Protocol(format!("bad {what}: {e}")))
}

fn refused(f: &Frame) -> AuthError {
    match Refuse::decode(&f.payload) {
        Ok(r) => AuthError::Refused(r.message),
        Err(e) => AuthError::Protocol(format!("bad Refuse: {e}")),
    }
}

/// Slave side: the connecting master must prove the secret; then we prove it back.
/// On failure the master has been sent a `Refuse` and the stream shut down.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secret: &Secret,
) -> Result<(), AuthError> {
    let f = read_frame(s).await?;
    match f.kind {
        FrameType::AuthRequest => {}
        FrameType::Hello => {
            refuse(
                s,
                RefuseCode::Other,
                "authentication required: this slave has a shared secret; \
                 start the master with --secret-file",
            )
            .await;
            return Err(AuthError::Failed(
                "master did not authenticate (Hello without the shared-secret exchange; \
                 is the master missing --secret-file?)"
                    .into(),
            ));
        }
        k => {
            refuse(s, RefuseCode::Other, "authentication required").await;
            return Err(AuthError::Protocol(format!(
                "expected AuthRequest, got {k:?}"
            )));
        }
    }
    let req = decode(AuthRequest::decode(&f.payload), "AuthRequest")?;
    if req.version != AUTH_VERSION {
        let m = format!(
            "authentication version {} not supported (this slave speaks {AUTH_VERSION})",
            req.version
        );
        refuse(s, RefuseCode::Version, &m).await;
        return Err(AuthError::Protocol(m));
    }
    let ns = nonce()?;
    send(
        s,
        FrameType::AuthChallenge,
        &AuthChallenge { nonce: ns }.encode(),
    )
    .await?;
    let f = read_frame(s).await?;
    if f.kind != FrameType::AuthResponse {
        refuse(s, RefuseCode::Other, FAILED_MESSAGE).await;
        return Err(AuthError::Protocol(format!(
            "expected AuthResponse, got {:?}",
            f.kind
        )));
    }
    let resp = decode(AuthResponse::decode(&f.payload), "AuthResponse")?;
    if !auth::verify_master(secret.bytes(), &ns, &resp) {
        refuse(s, RefuseCode::Other, FAILED_MESSAGE).await;
        return Err(AuthError::Failed(
            "authentication failed: wrong secret or replayed handshake".into(),
        ));
    }
    let ok = AuthOk {
        mac: auth::slave_mac(secret.bytes(), &resp.nonce, &ns),
    };
    send(s, FrameType::AuthOk, &ok.encode()).await?;
    Ok(())
}

/// Master side: prove the secret to the slave, then check the slave's proof.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secret: &Secret,
) -> Result<(), AuthError> {
    let req = AuthRequest {
        version: AUTH_VERSION,
    };
    send(s, FrameType::AuthRequest, &req.encode()).await?;
    let f = match read_frame(s).await {
        Err(AuthError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(AuthError::Protocol(
                "slave closed the connection instead of answering the authentication request \
                 (is the slave missing --secret-file?)"
                    .into(),
            ))
        }
        r => r?,
    };
    let ns = match f.kind {
        FrameType::AuthChallenge => decode(AuthChallenge::decode(&f.payload), "AuthChallenge")?,
        FrameType::Refuse => return Err(refused(&f)),
        k => {
            return Err(AuthError::Protocol(format!(
                "expected AuthChallenge, got {k:?}"
            )))
        }
    }
    .nonce;
    let nm = nonce()?;
    let resp = AuthResponse {
        nonce: nm,
        mac: auth::master_mac(secret.bytes(), &ns, &nm),
    };
    send(s, FrameType::AuthResponse, &resp.encode()).await?;
    let f = read_frame(s).await?;
    let ok = match f.kind {
        FrameType::AuthOk => decode(AuthOk::decode(&f.payload), "AuthOk")?,
        FrameType::Refuse => return Err(refused(&f)),
        k => return Err(AuthError::Protocol(format!("expected AuthOk, got {k:?}"))),
    };
    if !auth::verify_slave(secret.bytes(), &nm, &ns, &ok) {
        return Err(AuthError::Failed(
            "the slave did not prove the shared secret (wrong secret, or not the real slave)"
                .into(),
        ));
    }
    Ok(())
}
