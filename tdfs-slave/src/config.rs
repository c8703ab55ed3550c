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
    pub slaves: Option<Vec<String>>,
    pub compression: Option<u8>,
    pub queue_size: Option<usize>,
    pub journal_size: Option<u64>,
    pub leaf_secret_file: Option<Paths>,
    pub leaf_encrypt: Option<bool>,
    pub leaf_tls_cert: Option<PathBuf>,
    pub leaf_tls_key: Option<PathBuf>,
    pub leaf_tls_ca: Option<PathBuf>,
    pub leaf_insecure: Option<bool>,
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

    #[test]
    fn relay_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(
            &p,
            "mirror = \"/m\"\nslaves = [\"web1:4731,z=2\", \"web2\"]\ncompression = 1\n\
             queue_size = 64\njournal_size = 512\nleaf_secret_file = \"/etc/tdfs/leaf\"\n\
             leaf_insecure = false\n",
        )
        .unwrap();
        let c: SlaveFile = load(&p).unwrap();
        assert_eq!(
            c.slaves.as_deref(),
            Some(&["web1:4731,z=2".to_string(), "web2".to_string()][..])
        );
        assert_eq!(
            (c.compression, c.queue_size, c.journal_size),
            (Some(1), Some(64), Some(512))
        );
        assert_eq!(
            c.leaf_secret_file.map(Paths::into_vec),
            Some(vec![std::path::PathBuf::from("/etc/tdfs/leaf")])
        );
    }
}
