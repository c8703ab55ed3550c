//! The master's connection security settings (`--secret-file`, `--tls-*`), set once at
//! startup and read by [`crate::repl`]'s transport for every connection to a slave.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::security::tls::TlsConnector;
use crate::security::{Secret, TlsFiles};

#[derive(Default)]
pub struct Security {
    /// Prove this secret to every slave, and require each slave to prove it back.
    pub secret: Option<Secret>,
    /// Speak TLS (with our client certificate) to every slave.
    pub tls: Option<TlsConnector>,
}

static SECURITY: OnceLock<Security> = OnceLock::new();

/// How this process authenticates to the slaves: the same flags for the master and for
/// `tdfs verify`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SlaveAuthArgs {
    /// File holding the secret shared with the slaves (mode 0600 or stricter; at least 16
    /// bytes). It is proven to each slave, and each slave must prove it back.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,

    /// TLS to the slaves: this side's certificate chain (PEM), presented to every slave.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// TLS: the private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,

    /// TLS: the CA certificate(s) (PEM) that must have signed every slave's certificate. A
    /// slave's certificate must name the host part of its -c address in a subjectAltName.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl SlaveAuthArgs {
    /// Loads the files these flags name; call once before any slave is contacted.
    pub fn init(&self) -> anyhow::Result<()> {
        let tls = TlsFiles::from_args(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_ca.clone(),
        )
        .map_err(anyhow::Error::msg)?;
        let secret = self
            .secret_file
            .as_deref()
            .map(Secret::load)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let tls = tls
            .as_ref()
            .map(crate::security::tls::connector)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        match (&secret, &tls) {
            (None, None) => tracing::warn!(
                "no --secret-file and no TLS: slaves are not authenticated and the stream is \
                 plain TCP (fine on loopback or a trusted network only)"
            ),
            (s, t) => tracing::info!(
                "slave connections: shared-secret authentication {}, TLS {}",
                if s.is_some() { "on" } else { "off" },
                if t.is_some() { "on" } else { "off" }
            ),
        }
        if SECURITY.set(Security { secret, tls }).is_err() {
            anyhow::bail!("security settings initialised twice");
        }
        Ok(())
    }
}

/// The settings in force (none when [`SlaveAuthArgs::init`] was never called, as in unit
/// tests).
pub fn get() -> &'static Security {
    SECURITY.get_or_init(Security::default)
}
