//! The connecting side's security settings (`--secret-file`, `--encrypt`, `--tls-*`), set
//! once at startup and read by [`crate::repl`]'s transport for every connection to a slave.
//! The secrets can be re-read at run time (SIGHUP): links then reconnect with them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use tdfs_protocol::seal::Protection;
use tokio::sync::watch;

use crate::security::tls::TlsConnector;
use crate::security::{secret, Secret, TlsFiles};

pub struct Security {
    /// Proven to every slave (all of them, most preferred first: during a rotation each
    /// slave takes the first it knows), and each slave must prove back the one it took.
    secrets: watch::Sender<Arc<Vec<Secret>>>,
    /// Where they were read from, to read them again.
    paths: Mutex<Vec<PathBuf>>,
    /// Encrypt the frames to every slave (`--encrypt`); one slave's `,encrypt` does it for
    /// that slave only.
    pub encrypt: bool,
    /// Speak TLS (with our client certificate) to every slave.
    pub tls: Option<TlsConnector>,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            secrets: watch::Sender::new(Arc::new(Vec::new())),
            paths: Mutex::new(Vec::new()),
            encrypt: false,
            tls: None,
        }
    }
}

impl Security {
    /// The secrets in force now (empty: no shared-secret exchange).
    pub fn secrets(&self) -> Arc<Vec<Secret>> {
        self.secrets.borrow().clone()
    }

    /// Changes whenever the secrets do.
    pub fn watch_secrets(&self) -> watch::Receiver<Arc<Vec<Secret>>> {
        self.secrets.subscribe()
    }

    /// What guards the frames to a slave (`encrypt`: its own `,encrypt`). Under TLS the
    /// frames are not sealed again: TLS authenticates and encrypts every byte already.
    pub fn protection(&self, encrypt: bool) -> Protection {
        if self.tls.is_some() {
            Protection::Tls
        } else if self.encrypt || encrypt {
            Protection::Encrypt
        } else {
            Protection::Mac
        }
    }

    /// Reads the secret files again (`paths`: the files named now, when they changed).
    /// Returns whether the secrets changed; on an error the old ones stay in force.
    pub fn reload_secrets(&self, paths: Option<Vec<PathBuf>>) -> Result<bool, String> {
        let mut cur = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        let paths = paths.unwrap_or_else(|| cur.clone());
        let old = self.secrets();
        if paths.is_empty() != old.is_empty() {
            return Err(
                "secret files cannot be added or removed altogether at run time (restart for \
                 that); keeping the current ones"
                    .into(),
            );
        }
        let new = Secret::load_all(&paths)?;
        *cur = paths;
        if *new == *old {
            return Ok(false);
        }
        self.secrets.send_replace(Arc::new(new));
        Ok(true)
    }
}

static SECURITY: OnceLock<Security> = OnceLock::new();

/// How this process authenticates to the slaves: the same flags for the master and for
/// `tdfs verify`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SlaveAuthArgs {
    /// File holding the secret shared with the slaves (mode 0600 or stricter; at least 16
    /// bytes). It is proven to each slave, each slave must prove it back, and every frame
    /// after that carries a MAC under keys derived from it. Give it twice during a secret
    /// rotation: both are offered, the first preferred. SIGHUP re-reads the files.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Vec<PathBuf>,

    /// Encrypt every frame to every slave (AEGIS-256X2 under keys derived from the shared
    /// secret; needs --secret-file, and --encrypt on the slaves). `,encrypt` after one
    /// slave's address does it for that slave only. Redundant under TLS, which encrypts
    /// already.
    #[arg(long)]
    pub encrypt: bool,

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
        let secrets = Secret::load_all(&self.secret_file).map_err(anyhow::Error::msg)?;
        if self.encrypt && secrets.is_empty() {
            anyhow::bail!("--encrypt needs --secret-file: the keys come from the shared secret");
        }
        let tls = tls
            .as_ref()
            .map(crate::security::tls::connector)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        match (secrets.is_empty(), &tls) {
            (true, None) => tracing::warn!(
                "no --secret-file and no TLS: slaves are not authenticated and the stream is \
                 plain TCP (fine on loopback or a trusted network only)"
            ),
            (no_secret, t) => tracing::info!(
                "slave connections: shared-secret authentication {}, TLS {}; frames {}",
                if no_secret {
                    "off".to_string()
                } else {
                    format!("on (secret {})", secret::describe(&secrets))
                },
                if t.is_some() { "on" } else { "off" },
                match (no_secret, t.is_some(), self.encrypt) {
                    (_, true, _) => "protected by TLS (no MAC or encryption of tdfs's own)",
                    (true, false, _) => "plain",
                    (false, false, true) => "encrypted and authenticated (--encrypt)",
                    (false, false, false) =>
                        "authenticated (MAC), not encrypted (except to slaves with ,encrypt)",
                }
            ),
        }
        let sec = Security {
            secrets: watch::Sender::new(Arc::new(secrets)),
            paths: Mutex::new(self.secret_file.clone()),
            encrypt: self.encrypt,
            tls,
        };
        if SECURITY.set(sec).is_err() {
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
