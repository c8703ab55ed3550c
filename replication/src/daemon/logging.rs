//! Logging to stderr with a level that SIGHUP can change.
//!
//! Precedence: `RUST_LOG` (when set) over `-v`/`-q` over the config file's `log_level` over
//! the default, `info`. At `info` each meaningful event is one line; nothing is logged per
//! filesystem op.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The level from the command line: `-q` (warn), none (None: config file or info), `-v`
/// (debug), `-vv` (trace).
pub fn flag_level(verbose: u8, quiet: bool) -> Option<&'static str> {
    match (quiet, verbose) {
        (true, _) => Some("warn"),
        (false, 0) => None,
        (false, 1) => Some("debug"),
        (false, _) => Some("trace"),
    }
}

/// Checks a level or filter directive (`info`, `debug`, `tdfs=debug,info`, …).
pub fn check_level(level: &str) -> Result<(), String> {
    EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|e| format!("bad log level {level:?}: {e}"))
}

/// Handle on the installed subscriber's filter.
pub struct Logging {
    handle: reload::Handle<EnvFilter, Registry>,
    /// RUST_LOG was set: it wins over every later change.
    from_env: bool,
    current: std::sync::Mutex<String>,
}

/// Installs the subscriber (stderr, colours only on a terminal) at `level` unless RUST_LOG
/// says otherwise.
pub fn init(level: &str) -> Logging {
    let env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| EnvFilter::try_new(v).ok());
    let from_env = env.is_some();
    let filter = env.unwrap_or_else(|| EnvFilter::try_new(level).unwrap_or_else(|_| "info".into()));
    let (layer, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(layer)
        .with(fmt)
        .try_init();
    Logging {
        handle,
        from_env,
        current: std::sync::Mutex::new(level.to_string()),
    }
}

impl Logging {
    /// Changes the level (SIGHUP). RUST_LOG, when set, keeps precedence.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if *cur == level {
            return Ok(());
        }
        if self.from_env {
            tracing::info!("log level stays as RUST_LOG says (asked for {level})");
            return Ok(());
        }
        let f = EnvFilter::try_new(level).map_err(|e| format!("bad log level {level:?}: {e}"))?;
        self.handle
            .reload(f)
            .map_err(|e| format!("changing the log level: {e}"))?;
        tracing::info!("log level is now {level} (was {cur})");
        *cur = level.to_string();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(flag_level(0, false), None);
        assert_eq!(flag_level(0, true), Some("warn"));
        assert_eq!(flag_level(1, false), Some("debug"));
        assert_eq!(flag_level(3, false), Some("trace"));
        assert!(check_level("debug").is_ok());
        assert!(check_level("tdfs=debug,info").is_ok());
        assert!(check_level("lo=ud=er").is_err());
    }
}
