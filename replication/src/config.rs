//! Config-file helpers both daemons use: TOML files whose keys are the long flag names,
//! where flags given on the command line win.

use std::path::Path;

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
