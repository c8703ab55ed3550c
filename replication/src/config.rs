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
