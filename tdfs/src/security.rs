//! The master's connection security settings (`--secret-file`, `--tls-*`), set once at
//! startup and read by [`crate::repl`]'s transport for every connection to a slave.

use std::sync::OnceLock;

use tdfs_slave::security::tls::TlsConnector;
use tdfs_slave::security::{Secret, TlsFiles};

#[derive(Default)]
pub struct Security {
    /// Prove this secret to every slave, and require each slave to prove it back.
    pub secret: Option<Secret>,
    /// Speak TLS (with our client certificate) to every slave.
    pub tls: Option<TlsConnector>,
}

static SECURITY: OnceLock<Security> = OnceLock::new();

/// Loads the files named on the command line; call once before any slave is contacted.
pub fn init(secret_file: Option<&std::path::Path>, tls: Option<TlsFiles>) -> anyhow::Result<()> {
    let secret = secret_file
        .map(Secret::load)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let tls = tls
        .as_ref()
        .map(tdfs_slave::security::tls::connector)
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

/// The settings in force (none when [`init`] was never called, as in unit tests).
pub fn get() -> &'static Security {
    SECURITY.get_or_init(Security::default)
}
