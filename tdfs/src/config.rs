//! `tdfs --config FILE` (TOML: every flag of the mount command; flags given on the command
//! line win; unknown keys are an error), the persisted slave set, and SIGHUP reloads.
//!
//! ```toml
//! dir = "/srv/www.backing"            # -m
//! mountpoint = "/srv/www"
//! slaves = ["replica1:4731", "replica2:4731,z=1"]
//! compression = 0                     # -z
//! state_dir = "/var/lib/tdfs/srv-www"
//! secret_file = "/etc/tdfs/secret"   # or a list of two during a rotation
//! metrics = "127.0.0.1:9730"
//! log_level = "info"
//! ```
//!
//! **Which slaves a master streams to.** `tdfs slave add/remove` (and a SIGHUP that
//! changes the config file's `slaves`) write the set to `STATE_DIR/slaves`. At startup, when
//! that file exists it *is* the slave set, and `-c`/`slaves` are ignored (the log says so);
//! otherwise the set is `-c` if given, else the config file's `slaves`. Delete the file to
//! go back to the command line.

use std::path::PathBuf;

use serde::Deserialize;
use tdfs_protocol::Compression;
use tdfs_replication::daemon::logging::{self, Logging};
use tracing::{error, info, warn};

use tdfs_replication::repl::{Replicator, SyncMode};

pub use tdfs_replication::config::{given, load, Paths};

/// The config file: the mount command's flags by their long names.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MasterFile {
    pub dir: Option<PathBuf>,
    pub mountpoint: Option<PathBuf>,
    pub slaves: Option<Vec<String>>,
    pub compression: Option<u8>,
    pub no_nodelay: Option<bool>,
    pub state_dir: Option<PathBuf>,
    pub passthrough: Option<bool>,
    pub cache_timeout: Option<f64>,
    pub threads: Option<u16>,
    pub queue_size: Option<usize>,
    pub journal_size: Option<u64>,
    pub sync: Option<String>,
    pub fsync_local: Option<bool>,
    pub sync_timeout: Option<f64>,
    pub min_replicas: Option<usize>,
    pub drain_timeout: Option<u64>,
    /// One path, or two during a secret rotation.
    pub secret_file: Option<Paths>,
    pub encrypt: Option<bool>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub metrics: Option<String>,
    pub log_level: Option<String>,
}

impl MasterFile {
    /// Checks values the type system does not.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(z) = self.compression {
            anyhow::ensure!(z <= 2, "compression = {z}: expected 0, 1 or 2");
        }
        if let Some(t) = self.cache_timeout {
            anyhow::ensure!(
                t.is_finite() && (0.0..=1e9).contains(&t),
                "cache_timeout = {t}: expected seconds between 0 and 1e9"
            );
        }
        if let Some(t) = self.threads {
            anyhow::ensure!((1..=64).contains(&t), "threads = {t}: expected 1..=64");
        }
        if let Some(s) = &self.sync {
            sync_mode(s)?;
        }
        if let Some(l) = &self.log_level {
            logging::check_level(l).map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }
}

pub fn sync_mode(s: &str) -> anyhow::Result<SyncMode> {
    <SyncMode as clap::ValueEnum>::from_str(s, true)
        .map_err(|_| anyhow::anyhow!("sync = {s:?}: expected async, received or applied"))
}

pub use tdfs_replication::config::{load_persisted, persist, slaves_file};

/// SIGHUP: re-reads the secret files (`paths`: the config file's list, when it names them
/// and the flag was not given). Changed secrets apply at once: every link reconnects with
/// them.
fn reload_secrets(paths: Option<Vec<PathBuf>>) {
    let sec = tdfs_replication::outbound::get();
    if sec.secrets().is_empty() && paths.is_none() {
        return;
    }
    match sec.reload_secrets(paths) {
        Ok(true) => info!(
            "SIGHUP: the shared secrets are now {}; every slave link reconnects with them",
            tdfs_replication::security::secret::describe(&sec.secrets())
        ),
        Ok(false) => info!(
            "SIGHUP: secrets unchanged ({})",
            tdfs_replication::security::secret::describe(&sec.secrets())
        ),
        Err(e) => error!("SIGHUP: {e}; keeping the current secrets"),
    }
}

/// What SIGHUP needs to re-apply the config file.
pub struct Reloader {
    pub path: Option<PathBuf>,
    /// `-c` was given: the file's `slaves` do not count.
    pub slaves_from_flags: bool,
    /// `-v`/`-q` was given: the file's `log_level` does not count.
    pub level_from_flags: bool,
    /// `--secret-file` was given: the file's `secret_file` does not count.
    pub secrets_from_flags: bool,
    pub default_z: Compression,
    pub nodelay: bool,
    pub state_dir: PathBuf,
    pub logging: Logging,
    pub repl: Replicator,
    pub last: Option<MasterFile>,
}

impl Reloader {
    /// SIGHUP: re-reads the file; applies the log level and the slave list at once, and
    /// names other changes, which need a restart.
    pub fn reload(&mut self) {
        let Some(path) = self.path.clone() else {
            reload_secrets(None);
            return;
        };
        let f: MasterFile = match load(&path).and_then(|f: MasterFile| f.check().map(|_| f)) {
            Ok(f) => f,
            Err(e) => {
                error!("SIGHUP: {e:#}; keeping the current settings");
                reload_secrets(None);
                return;
            }
        };
        reload_secrets(
            f.secret_file
                .clone()
                .filter(|_| !self.secrets_from_flags)
                .map(Paths::into_vec),
        );
        info!("SIGHUP: re-reading {}", path.display());
        if !self.level_from_flags {
            let level = f.log_level.clone().unwrap_or_else(|| "info".into());
            if let Err(e) = self.logging.set_level(&level) {
                error!("SIGHUP: {e}");
            }
        }
        match (&f.slaves, self.slaves_from_flags) {
            (Some(_), true) => {
                info!("SIGHUP: slaves given with -c on the command line; the file's slaves do not apply")
            }
            (Some(list), false) => {
                if let Err(e) = self.set_slaves(list) {
                    error!("SIGHUP: slaves: {e:#}; slave set unchanged");
                }
            }
            (None, _) => {}
        }
        let strip = |f: &MasterFile| MasterFile {
            slaves: None,
            log_level: None,
            secret_file: None,
            ..f.clone()
        };
        if let Some(old) = &self.last {
            if strip(old) != strip(&f) {
                warn!(
                    "SIGHUP: {} changed beyond slaves and log_level; those settings take effect at the next restart",
                    path.display()
                );
            }
        }
        self.last = Some(f);
    }

    /// Adds and removes slaves so the set matches `specs`; persists the result.
    fn set_slaves(&self, specs: &[String]) -> anyhow::Result<()> {
        let want = specs
            .iter()
            .map(|s| crate::parse_slave(s, self.default_z, self.nodelay))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let have = self.repl.slave_configs();
        let mut changed = false;
        for h in &have {
            if !want.iter().any(|w| w.addr == h.addr) {
                self.repl
                    .remove_slave(&h.addr)
                    .map_err(anyhow::Error::msg)?;
                changed = true;
            }
        }
        for w in want {
            if !have.iter().any(|h| h.addr == w.addr) {
                self.repl.add_slave(w).map_err(anyhow::Error::msg)?;
                changed = true;
            }
        }
        if changed {
            persist(&self.state_dir, &self.repl.slave_configs())?;
            info!(
                "SIGHUP: slave set is now {:?} (saved in {})",
                self.repl
                    .slave_configs()
                    .iter()
                    .map(|c| c.addr.clone())
                    .collect::<Vec<_>>(),
                slaves_file(&self.state_dir).display()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.toml");
        std::fs::write(
            &p,
            "dir = \"/b\"\nslaves = [\"h:1\", \"h2:2,z=1\"]\ncompression = 1\nsync = \"applied\"\n",
        )
        .unwrap();
        let f: MasterFile = load(&p).unwrap();
        f.check().unwrap();
        assert_eq!(f.slaves.as_ref().unwrap().len(), 2);
        std::fs::write(&p, "slave = [\"h:1\"]\n").unwrap();
        let e = load::<MasterFile>(&p).unwrap_err().to_string();
        assert!(e.contains("unknown field") && e.contains("slave"), "{e}");
        let bad = MasterFile {
            sync: Some("sometimes".into()),
            ..Default::default()
        };
        assert!(bad.check().is_err());
        std::fs::write(&p, "cache_timeout = 0.5\n").unwrap();
        let f: MasterFile = load(&p).unwrap();
        f.check().unwrap();
        assert_eq!(f.cache_timeout, Some(0.5));
        let bad = MasterFile {
            cache_timeout: Some(-1.0),
            ..Default::default()
        };
        assert!(bad.check().is_err());
    }

    #[test]
    fn persisted_set_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        assert!(load_persisted(d.path()).unwrap().is_none());
        let c = tdfs_replication::repl::SlaveConfig {
            addr: "h:1".into(),
            compression: Compression::Lzf,
            nodelay: true,
            fallback: true,
            encrypt: false,
        };
        persist(d.path(), &[c]).unwrap();
        assert_eq!(
            load_persisted(d.path()).unwrap().unwrap(),
            vec!["h:1,z=1,fallback"]
        );
    }
}
