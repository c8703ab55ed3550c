//! A thread that keeps changing a tree through a mount (new files, appends, renames,
//! deletes, overwrites, chmods, directory renames), bounded in steps, time and pace, for
//! tests that break the link underneath it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::util::{pseudo_random, wait_until};

/// The writer never takes more steps than this ...
const WRITER_MAX_STEPS: usize = 40_000;
/// ... nor runs longer than this ...
const WRITER_MAX_TIME: Duration = Duration::from_secs(120);
/// ... nor more steps per second than this (about 4 MB/s), so that its bounds hold for
/// a minute whatever the machine.
const WRITER_PACE: usize = 500;

/// A thread changing the tree under `root/tag` until stopped (or its bounds are reached).
pub struct Writer {
    stop: Arc<AtomicBool>,
    steps: Arc<AtomicUsize>,
    handle: Option<JoinHandle<Result<usize, String>>>,
}

/// One step of the workload: a new file every step, and appends, renames, deletes,
/// overwrites, chmods and directory renames along the way. Any error fails the test: with
/// asynchronous replication a link fault must never be visible through the mount.
fn step(dir: &Path, n: usize) -> Result<(), String> {
    let at = |what: &str, e: std::io::Error| format!("step {n}: {what}: {e}");
    let sub = dir.join(format!("d{}", n / 100));
    if n.is_multiple_of(100) {
        fs::create_dir(&sub).map_err(|e| at("mkdir", e))?;
        if n > 0 {
            let prev = n / 100 - 1;
            fs::rename(
                dir.join(format!("d{prev}")),
                dir.join(format!("done{prev}")),
            )
            .map_err(|e| at("rename dir", e))?;
        }
    }
    let f = sub.join(format!("f{n}"));
    fs::write(&f, pseudo_random(n as u64, 512 + (n % 17) * 1000)).map_err(|e| at("write", e))?;
    if n.is_multiple_of(3) {
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("journal.log"))
            .map_err(|e| at("open append", e))?;
        writeln!(log, "step {n}").map_err(|e| at("append", e))?;
    }
    if n.is_multiple_of(11) {
        let h = fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .map_err(|e| at("open for overwrite", e))?;
        h.write_all_at(&pseudo_random(!(n as u64), 300), 200)
            .map_err(|e| at("overwrite", e))?;
    }
    if n.is_multiple_of(13) {
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).map_err(|e| at("chmod", e))?;
    }
    if n.is_multiple_of(5) {
        fs::rename(&f, sub.join(format!("r{n}"))).map_err(|e| at("rename", e))?;
    }
    // Delete the file of the step before, unless it was renamed or is in another dir.
    if n % 7 == 3 && !(n - 1).is_multiple_of(5) && (n - 1) / 100 == n / 100 {
        fs::remove_file(sub.join(format!("f{}", n - 1))).map_err(|e| at("unlink", e))?;
    }
    Ok(())
}

impl Writer {
    pub fn start(mnt: &Path, tag: &str) -> Writer {
        let dir = mnt.join(tag);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let steps = Arc::new(AtomicUsize::new(0));
        let handle = {
            let (stop, steps) = (stop.clone(), steps.clone());
            thread::spawn(move || {
                let t0 = Instant::now();
                let mut n = 0;
                while n < WRITER_MAX_STEPS
                    && t0.elapsed() < WRITER_MAX_TIME
                    && !stop.load(Ordering::Relaxed)
                {
                    let due = t0.elapsed().as_millis() as usize * WRITER_PACE / 1000;
                    if n > due + 10 {
                        thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    step(&dir, n)?;
                    n += 1;
                    steps.store(n, Ordering::Relaxed);
                }
                Ok(n)
            })
        };
        Writer {
            stop,
            steps,
            handle: Some(handle),
        }
    }

    pub fn steps(&self) -> usize {
        self.steps.load(Ordering::Relaxed)
    }

    /// Waits until the writer has taken `more` steps beyond where it is now.
    pub fn advance(&self, more: usize, timeout: Duration) -> bool {
        let want = self.steps() + more;
        wait_until(timeout, || {
            self.steps() >= want || self.handle.as_ref().is_some_and(|h| h.is_finished())
        }) && self.steps() >= want
    }

    /// Stops the writer and returns how many steps it took; fails on a write error.
    pub fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let h = self.handle.take().expect("writer running");
        match h.join() {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => panic!("writer failed: {e}"),
            Err(_) => panic!("writer panicked"),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Not joined here: on a failing test the mount may be stuck; the thread is bounded
        // and ends on its own once the master is gone.
        self.stop.store(true, Ordering::Relaxed);
    }
}
