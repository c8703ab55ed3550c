//! `tdfs-slave --config FILE`: the same settings as the flags, in TOML. Flags given on the
//! command line win over the file; unknown keys are an error.
//!
//! ```toml
//! mirror = "/srv/mirror"
//! listen = "0.0.0.0:4731"
//! state_dir = "/var/lib/tdfs-slave/mirror"
//! secret_file = "/etc/tdfs/secret"   # or a list of two during a rotation
//! allow = ["10.0.0.0/8"]
//! metrics = "127.0.0.1:9731"
//! log_level = "info"      # or -v / -q on the command line
//! ```

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SlaveFile {
    pub mirror: Option<PathBuf>,
    pub listen: Option<String>,
    pub no_nodelay: Option<bool>,
    pub state_dir: Option<PathBuf>,
    /// One path, or two during a secret rotation.
    pub secret_file: Option<Paths>,
    pub encrypt: Option<bool>,
    pub allow: Option<Vec<String>>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub insecure: Option<bool>,
    pub metrics: Option<String>,
    pub log_level: Option<String>,
}

pub use tdfs_replication::config::{given, load, Paths};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, "mirror = \"/m\"\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let c: SlaveFile = load(&p).unwrap();
        assert_eq!(c.mirror.as_deref(), Some(std::path::Path::new("/m")));
        std::fs::write(&p, "mirorr = \"/m\"\n").unwrap();
        let e = load::<SlaveFile>(&p).unwrap_err().to_string();
        assert!(e.contains("mirorr") && e.contains("c.toml"), "{e}");
    }
}
