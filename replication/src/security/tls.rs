//! TLS with client certificates on both sides (rustls, ring provider).
//!
//! The slave is the TLS server: it presents `--tls-cert` and requires a client certificate
//! signed by `--tls-ca`. The master presents its own `--tls-cert` and checks the slave's
//! certificate against `--tls-ca` for the host part of the slave's address, so a slave
//! certificate must carry that name (or IP address) as a subjectAltName.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The three files behind `--tls-cert`, `--tls-key` and `--tls-ca`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// All three or none: anything in between is a mistake worth stopping for.
    pub fn from_args(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<Self>, String> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
            _ => Err("TLS needs all of --tls-cert, --tls-key and --tls-ca".into()),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let v = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("certificate file {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate file {}: {e}", path.display()))?;
    if v.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(v)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("private key file {}: {e}", path.display()))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut store = RootCertStore::empty();
    for c in certs(path)? {
        store
            .add(c)
            .map_err(|e| format!("CA file {}: {e}", path.display()))?;
    }
    Ok(Arc::new(store))
}

/// The slave's acceptor: its certificate, and client certificates required and checked
/// against the CA.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
        .build()
        .map_err(|e| format!("client certificate verifier: {e}"))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(|e| format!("{} / {}: {e}", files.cert.display(), files.key.display()))?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// The master's connector: the slave's certificate checked against the CA, and the master's
/// own certificate presented.
pub fn connector(files: &TlsFiles) -> Result<TlsConnector, String> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(|e| format!("{} / {}: {e}", files.cert.display(), files.key.display()))?;
    Ok(TlsConnector::from(Arc::new(cfg)))
}

/// The name a slave's certificate must carry: the host part of `host:port`, `[v6]:port`.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
    let host = if let Some(rest) = addr.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr)
    };
    ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} cannot be checked against a certificate: {e}"))
}

/// A writer for a TLS stream that never leaves bytes behind in it.
///
/// A TLS stream's `poll_write` may accept bytes while their records still wait in the TLS
/// layer (the socket was full), and only a later write or flush sends them. The protocol's
/// writers do not flush after every frame, so such leftovers could sit there while both
/// sides wait for each other. This copies what is written to `w` from a task that flushes
/// after every chunk. Shutting the returned writer down (or dropping it) closes `w` after
/// everything written before; once `w` fails, writes fail with a broken pipe.
pub fn flushing<W>(mut w: W) -> std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>
where
    W: tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::io::duplex(256 * 1024);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if w.write_all(&buf[..n]).await.is_err() || w.flush().await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    Box::pin(tx)
}
