//! Config-file helpers both daemons use: TOML files whose keys are the long flag names,
//! where flags given on the command line win.

use std::path::{Path, PathBuf};

use crate::repl::SlaveConfig;

use anyhow::Context;
use serde::Deserialize;

/// Reads and parses a TOML file into `T`, naming the file in every error (an unknown key
/// is reported with its name and line).
pub fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
}

/// Whether the flag with clap id `id` was given on the command line (not defaulted).
pub fn given(m: &clap::ArgMatches, id: &str) -> bool {
    m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
}

/// The persisted slave set's file.
pub fn slaves_file(state_dir: &Path) -> PathBuf {
    state_dir.join("slaves")
}

/// The persisted slave specs (`HOST:PORT,z=N`, one a line), if the file exists.
pub fn load_persisted(state_dir: &Path) -> anyhow::Result<Option<Vec<String>>> {
    let p = slaves_file(state_dir);
    match std::fs::read_to_string(&p) {
        Ok(t) => Ok(Some(
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from)
                .collect(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// The spec a slave is persisted as.
pub fn spec(c: &SlaveConfig) -> String {
    c.spec()
}

/// Writes the current slave set to `STATE_DIR/slaves` (atomically).
pub fn persist(state_dir: &Path, slaves: &[SlaveConfig]) -> std::io::Result<()> {
    let mut text = String::from(
        "# tdfs replica set, written by `tdfs slave add/remove`, `tdfs-slave leaf add/remove`\n\
         # and SIGHUP reloads. While this file exists it is this node's set of replicas at\n\
         # startup (-c and the config file's slaves are ignored). Delete it to go back to them.\n",
    );
    for s in slaves {
        text.push_str(&spec(s));
        text.push('\n');
    }
    crate::daemon::write_atomic(&slaves_file(state_dir), text.as_bytes(), 0o600)
}

/// A key that takes one path or a list (`secret_file = "/a"` or `secret_file = ["/a", "/b"]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Paths {
    One(std::path::PathBuf),
    Many(Vec<std::path::PathBuf>),
}

impl Paths {
    pub fn into_vec(self) -> Vec<std::path::PathBuf> {
        match self {
            Paths::One(p) => vec![p],
            Paths::Many(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct F {
        secret_file: Paths,
    }

    #[test]
    fn one_path_or_several() {
        let one: F = toml::from_str("secret_file = \"/a\"").unwrap();
        assert_eq!(one.secret_file.into_vec(), vec![Path::new("/a")]);
        let two: F = toml::from_str("secret_file = [\"/a\", \"/b\"]").unwrap();
        assert_eq!(two.secret_file.into_vec().len(), 2);
    }
}
