//! The shared-secret challenge-response ([`tdfs_protocol::auth`]) over a byte stream, and
//! the sealed framing ([`tdfs_protocol::seal`]) it hands the session that follows.
//!
//! Frames are read exactly (header, then the announced payload), so nothing the session
//! that follows needs is consumed here, and a peer cannot make us allocate more than
//! [`MAX_AUTH_PAYLOAD`] bytes.

use std::fmt;
use std::io;

use tdfs_protocol::auth::{
    self, AuthChallenge, AuthOk, AuthRequest, AuthResponse, KeyId, Nonce, AUTH_VERSION,
    MAX_AUTH_PAYLOAD,
};
use tdfs_protocol::frame::{self, Frame, FrameType};
use tdfs_protocol::msg::{Refuse, RefuseCode};
use tdfs_protocol::seal::{self, Protection, Role};
use tdfs_protocol::{Compression, HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::security::secret::{self, Secret};

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

/// What a successful exchange leaves: the framing of the session that follows (sealed
/// unless TLS carries it), and which secret was used.
pub struct Authenticated {
    pub tx: seal::Tx,
    pub rx: seal::Rx,
    pub secret: KeyId,
    pub protection: Protection,
}

impl fmt::Debug for Authenticated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Authenticated(secret {}, {:?})",
            auth::show_key_id(&self.secret),
            self.protection
        )
    }
}

/// Why the two sides' frame protections cannot meet, as both logs and the master are told.
pub fn mismatch(master: Protection, slave: Protection) -> String {
    match (master, slave) {
        (Protection::Encrypt, Protection::Mac) => "encryption mismatch: the master encrypts its \
             frames (--encrypt) but this slave does not; give --encrypt to both sides or to \
             neither"
            .into(),
        (Protection::Mac, Protection::Encrypt) => "encryption mismatch: this slave requires \
             encrypted frames (--encrypt) but the master does not encrypt for it; start the \
             master with --encrypt (or add ,encrypt to this slave's -c address)"
            .into(),
        (m, s) => format!(
            "frame protection mismatch: the master asks for frames {}, this slave expects them \
             {} (TLS on one side only?)",
            m.describe(),
            s.describe()
        ),
    }
}

/// Slave side: the connecting master must prove one of `secrets` (most preferred first: the
/// master's order decides among those both hold); then we prove it back. On failure the
/// master has been sent a `Refuse` and the stream shut down.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secrets: &[Secret],
    protection: Protection,
) -> Result<Authenticated, AuthError> {
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
            "authentication version {} not supported (this slave speaks {AUTH_VERSION}: since \
             version 2 every frame is authenticated, since 3 with AEGIS); upgrade both sides",
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
    let resp = match AuthResponse::decode(&f.payload) {
        Ok(r) => r,
        Err(e) => {
            refuse(s, RefuseCode::Other, FAILED_MESSAGE).await;
            return Err(AuthError::Protocol(format!("bad AuthResponse: {e}")));
        }
    };
    let ids: Vec<KeyId> = secrets.iter().map(Secret::key_id).collect();
    let Some((i, j)) = auth::choose(&resp, &ids) else {
        refuse(s, RefuseCode::Other, FAILED_MESSAGE).await;
        return Err(AuthError::Failed(format!(
            "authentication failed: wrong secret (the master offers {}, this slave accepts {})",
            resp.proofs
                .iter()
                .map(|p| auth::show_key_id(&p.key_id))
                .collect::<Vec<_>>()
                .join(", "),
            secret::describe(secrets)
        )));
    };
    let secret = &secrets[j];
    if !auth::verify_master(secret.bytes(), &ns, &resp, i) {
        refuse(s, RefuseCode::Other, FAILED_MESSAGE).await;
        return Err(AuthError::Failed(
            "authentication failed: wrong secret or replayed handshake".into(),
        ));
    }
    // Only a master that proved the secret learns what this side expects.
    if resp.protection != protection {
        let m = mismatch(resp.protection, protection);
        refuse(s, RefuseCode::Other, &m).await;
        return Err(AuthError::Failed(m));
    }
    let ok = auth::accept(secret.bytes(), &ns, &resp, i);
    send(s, FrameType::AuthOk, &ok.encode()).await?;
    let (tx, rx) = seal::framing(secret.bytes(), protection, &resp.nonce, &ns, Role::Slave);
    Ok(Authenticated {
        tx,
        rx,
        secret: secret.key_id(),
        protection,
    })
}

/// Master side: prove `secrets` (one, or two during a rotation, most preferred first) to
/// the slave, then check the slave's proof for the one it took.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secrets: &[Secret],
    protection: Protection,
) -> Result<Authenticated, AuthError> {
    let req = AuthRequest {
        version: AUTH_VERSION,
    };
    send(s, FrameType::AuthRequest, &req.encode()).await?;
    let f = match read_frame(s).await {
        Err(AuthError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(AuthError::Protocol(
                "slave closed the connection instead of answering the authentication request \
                 (is the slave missing --secret-file, or older than this master?)"
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
    let bytes: Vec<&[u8]> = secrets.iter().map(Secret::bytes).collect();
    let resp = auth::respond(&bytes, protection, &ns, &nm);
    send(s, FrameType::AuthResponse, &resp.encode()).await?;
    let f = read_frame(s).await?;
    let ok = match f.kind {
        FrameType::AuthOk => decode(AuthOk::decode(&f.payload), "AuthOk")?,
        FrameType::Refuse => return Err(refused(&f)),
        k => return Err(AuthError::Protocol(format!("expected AuthOk, got {k:?}"))),
    };
    let Some(i) = auth::verify_slave(&bytes, &ns, &resp, &ok) else {
        return Err(AuthError::Failed(
            "the slave did not prove the shared secret (wrong secret, or not the real slave)"
                .into(),
        ));
    };
    let (tx, rx) = seal::framing(bytes[i], protection, &nm, &ns, Role::Master);
    Ok(Authenticated {
        tx,
        rx,
        secret: secrets[i].key_id(),
        protection,
    })
}
