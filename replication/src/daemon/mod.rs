//! Plumbing both daemons share for being operated: log levels that SIGHUP can change, the
//! Unix control socket (`tdfs status`, `tdfs slave add`), the Prometheus endpoint, lock-free
//! latency histograms, systemd readiness, and atomic small-file writes.

pub mod control;
pub mod histogram;
pub mod http;
pub mod logging;

use std::io::Write;
use std::path::Path;

/// Writes `data` to `path` atomically (temp file in the same directory, fsync, rename,
/// fsync of the directory), with mode `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Tells systemd (when started by it with `Type=notify`) that the daemon is ready
/// (`ready`) or stopping (`stopping`). A no-op outside systemd.
pub fn notify(state: &str) {
    let st = match state {
        "ready" => sd_notify::NotifyState::Ready,
        "stopping" => sd_notify::NotifyState::Stopping,
        _ => return,
    };
    if let Err(e) = sd_notify::notify(&[st]) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// Formats a byte count for people (1536 → "1.5 KiB").
pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_for_people() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(3.0 * 1024.0 * 1024.0), "3.0 MiB");
    }

    #[test]
    fn atomic_write_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}

/// A rate (per second) over the last few seconds of a growing counter, sampled about once
/// a second by the daemon.
#[derive(Debug, Default)]
pub struct RateMeter {
    samples: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, u64)>>,
}

/// Samples kept: the rate spans about this many seconds.
const RATE_WINDOW: usize = 5;

impl RateMeter {
    pub fn sample(&self, value: u64) {
        self.sample_at(std::time::Instant::now(), value);
    }

    fn sample_at(&self, t: std::time::Instant, value: u64) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.push_back((t, value));
        while s.len() > RATE_WINDOW + 1 {
            s.pop_front();
        }
    }

    /// Units per second between the oldest and newest sample (0 until there are two).
    pub fn rate(&self) -> f64 {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        match (s.front(), s.back()) {
            (Some(&(t0, v0)), Some(&(t1, v1))) if t1 > t0 => {
                v1.saturating_sub(v0) as f64 / (t1 - t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn rate_over_window() {
        let r = RateMeter::default();
        assert_eq!(r.rate(), 0.0);
        let t = Instant::now();
        for i in 0..10u64 {
            r.sample_at(t + Duration::from_secs(i), i * 100);
        }
        assert!((r.rate() - 100.0).abs() < 1e-9);
    }
}
