//! The `tdfs-slave` and `tdfs` child processes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::util::{is_fuse_mounted, lazy_unmount, tail, wait_until};

/// How long a daemon may take to start (bind / mount).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped slave may take to exit.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time the master may take to drain its queue and exit after the unmount.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(300);
/// Bytes of a log shown in failure messages.
const TAIL: usize = 6000;

fn env_secs(name: &str, default: Duration) -> Duration {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(default)
}

/// stdout and stderr appending to one log file.
pub(crate) fn log_file(path: &Path) -> (Stdio, Stdio) {
    let f = File::options()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("create log {}: {e}", path.display()));
    let g = f.try_clone().expect("dup log fd");
    (Stdio::from(f), Stdio::from(g))
}

/// Waits for `child` to exit, up to `timeout`; None on timeout.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().unwrap_or_else(|e| panic!("waitpid: {e}"));
        status.is_some()
    });
    status
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: the pid is our own un-reaped child, so it cannot have been reused.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Removes ANSI escape sequences (in case a logger colours its output).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            if it.peek() == Some(&'[') {
                it.next();
                for d in it.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Port of the last `listening on 127.0.0.1:PORT` line in a log.
pub fn parse_listening_port(log: &str) -> Option<u16> {
    let log = strip_ansi(log);
    let mut port = None;
    for line in log.lines() {
        if let Some(i) = line.find("listening on ") {
            let rest = &line[i + "listening on ".len()..];
            let tok: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
                .collect();
            if let Some(p) = tok.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) {
                port = Some(p);
            }
        }
    }
    port
}

/// A running (or stopped) `tdfs-slave`.
pub struct Slave {
    child: Option<Child>,
    /// The replica directory (`-m`).
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    log_dir: PathBuf,
    logs: Vec<PathBuf>,
    port: u16,
    nodelay_off: bool,
    /// More arguments for every run (e.g. `--secret-file F`).
    extra_args: Vec<String>,
    /// Command run in front of `tdfs-slave` (e.g. `nsenter --net=/run/netns/NS`); empty: none.
    prefix: Vec<String>,
    /// Address the slave listens on (default `127.0.0.1`).
    host: String,
}

/// How to launch a slave beyond [`Slave::start_with_args`]: in front of what, and where it
/// listens.
#[derive(Debug, Clone, Default)]
pub struct SlaveLaunch {
    /// Command `tdfs-slave` runs under, e.g. `["nsenter", "--net=/run/netns/NS"]`; empty: run
    /// it directly. It must exec the slave, so that signals reach it, and should not give the
    /// slave a mount namespace of its own (`ip netns exec` does): a long-lived copy of the
    /// mount table keeps the FUSE mounts of other tests alive after they unmount them.
    pub prefix: Vec<String>,
    /// Address to listen on (`-l HOST:0`); None: `127.0.0.1`.
    pub host: Option<String>,
    /// `-n` (TCP_NODELAY off).
    pub nodelay_off: bool,
    /// More arguments for every run (e.g. `--secret-file F`).
    pub extra_args: Vec<String>,
}

impl Slave {
    /// Starts a slave on `dir` listening on an ephemeral loopback port; logs go to files in
    /// `log_dir`.
    pub fn start(dir: &Path, state_dir: &Path, log_dir: &Path, nodelay_off: bool) -> Slave {
        Self::start_with_args(dir, state_dir, log_dir, nodelay_off, &[])
    }

    /// [`Slave::start`] with more command-line arguments.
    pub fn start_with_args(
        dir: &Path,
        state_dir: &Path,
        log_dir: &Path,
        nodelay_off: bool,
        extra_args: &[String],
    ) -> Slave {
        Self::start_launch(
            dir,
            state_dir,
            log_dir,
            &SlaveLaunch {
                nodelay_off,
                extra_args: extra_args.to_vec(),
                ..Default::default()
            },
        )
    }

    /// [`Slave::start`] under a command prefix and/or on another listen address.
    pub fn start_launch(
        dir: &Path,
        state_dir: &Path,
        log_dir: &Path,
        launch: &SlaveLaunch,
    ) -> Slave {
        let mut s = Slave {
            child: None,
            dir: dir.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
            logs: Vec::new(),
            port: 0,
            nodelay_off: launch.nodelay_off,
            extra_args: launch.extra_args.clone(),
            prefix: launch.prefix.clone(),
            host: launch.host.clone().unwrap_or_else(|| "127.0.0.1".into()),
        };
        if let Err(msg) = s.spawn(0) {
            panic!("{msg}");
        }
        s
    }

    fn spawn(&mut self, port: u16) -> Result<(), String> {
        assert!(self.child.is_none(), "slave already running");
        // Unique per process: a second Slave on the same dir and log dir must not append to
        // the first one's log (its old "listening on" line would be taken for the new one's).
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let log = self.log_dir.join(format!(
            "slave-{}-{}.log",
            self.dir.file_name().unwrap_or_default().to_string_lossy(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        ));
        self.logs.push(log.clone());
        let (out, err) = log_file(&log);
        let mut cmd = crate::util::command_under(&self.prefix, "tdfs-slave");
        cmd.arg("-m")
            .arg(&self.dir)
            .arg("-l")
            .arg(format!("{}:{port}", self.host));
        if self.nodelay_off {
            cmd.arg("-n");
        }
        cmd.args(&self.extra_args);
        cmd.arg("--state-dir")
            .arg(&self.state_dir)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot spawn {cmd:?}: {e}"))?;
        self.child = Some(child);
        let mut exited = None;
        let ok = wait_until(START_TIMEOUT, || {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                exited = Some(st);
                return true;
            }
            parse_listening_port(&std::fs::read_to_string(&log).unwrap_or_default()).is_some()
        });
        if let Some(st) = exited {
            self.child = None;
            return Err(format!(
                "tdfs-slave exited with {st} before listening; log {}:\n{}",
                log.display(),
                tail(&log, TAIL)
            ));
        }
        if !ok {
            return Err(format!(
                "tdfs-slave did not log `listening on {}:PORT` within {START_TIMEOUT:?}; \
                 log {}:\n{}",
                self.host,
                log.display(),
                tail(&log, TAIL)
            ));
        }
        let got = parse_listening_port(&std::fs::read_to_string(&log).unwrap_or_default())
            .expect("port parsed");
        if port != 0 && got != port {
            return Err(format!("slave restarted on port {got}, wanted {port}"));
        }
        self.port = got;
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `HOST:PORT` (`127.0.0.1:PORT` unless launched elsewhere).
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// SIGSTOP: the slave stays connected but stops reading and applying. Returns once the
    /// kernel reports it stopped (a signal is delivered asynchronously, and a slave still
    /// running for a moment could acknowledge one more op).
    pub fn freeze(&self) {
        let child = self.child.as_ref().expect("slave is not running");
        signal(child, libc::SIGSTOP);
        let tasks = format!("/proc/{}/task", child.id());
        // Every thread, since a group stop reaches each thread on its own.
        let stopped = wait_until(Duration::from_secs(10), || {
            std::fs::read_dir(&tasks).is_ok_and(|d| {
                d.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
                        // The state follows the parenthesised command name.
                        s.rsplit_once(") ")
                            .is_some_and(|(_, rest)| rest.starts_with('T'))
                    })
                })
            })
        });
        assert!(stopped, "slave {} did not stop after SIGSTOP", child.id());
    }

    /// SIGCONT after [`Slave::freeze`].
    pub fn thaw(&self) {
        signal(
            self.child.as_ref().expect("slave is not running"),
            libc::SIGCONT,
        );
    }

    /// SIGTERM, wait, and assert exit status 0.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("slave is not running");
        signal(&child, libc::SIGTERM);
        let st = wait_child(&mut child, env_secs("TDFS_TEST_STOP_SECS", STOP_TIMEOUT));
        match st {
            Some(st) => assert!(
                st.success(),
                "tdfs-slave exited with {st} after SIGTERM; log:\n{}",
                self.log_tail()
            ),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tdfs-slave did not exit within {STOP_TIMEOUT:?} of SIGTERM; log:\n{}",
                    self.log_tail()
                );
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the slave again on the same dir, state dir and port (retrying while the port
    /// is still in use).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart: slave still running");
        let port = self.port;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn(port) {
                Ok(()) => return,
                Err(msg) if Instant::now() >= deadline => panic!("restart failed: {msg}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Everything this slave logged, over all its runs.
    pub fn log(&self) -> String {
        let mut s = String::new();
        for l in &self.logs {
            s.push_str(&std::fs::read_to_string(l).unwrap_or_default());
        }
        s
    }

    pub fn log_tail(&self) -> String {
        let l = self.log();
        let start = l.len().saturating_sub(TAIL);
        let start = (start..l.len())
            .find(|i| l.is_char_boundary(*i))
            .unwrap_or(l.len());
        l[start..].to_string()
    }
}

impl Drop for Slave {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One `-c` argument.
#[derive(Debug, Clone)]
pub struct SlaveAddr {
    pub addr: String,
    /// Append `,z=1` (LZF for this slave only).
    pub compress: bool,
}

/// How to start a master.
#[derive(Debug, Clone)]
pub struct MasterOpts {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    pub slaves: Vec<SlaveAddr>,
    /// `-z 0|1`.
    pub global_z: Option<u8>,
    /// `-n` (TCP_NODELAY off).
    pub nodelay_off: bool,
    pub extra_args: Vec<String>,
    /// Command `tdfs` runs under (e.g. `nsenter --net=/run/netns/NS`); empty: none.
    pub prefix: Vec<String>,
}

impl MasterOpts {
    /// A master over `backing` mounted at `mountpoint`, streaming uncompressed to each of
    /// `slaves` (plain addresses) with no other flags; change the public fields for more.
    pub fn plain(
        backing: PathBuf,
        mountpoint: PathBuf,
        state_dir: PathBuf,
        log: PathBuf,
        slaves: &[String],
    ) -> MasterOpts {
        MasterOpts {
            backing,
            mountpoint,
            state_dir,
            log,
            slaves: slaves
                .iter()
                .map(|a| SlaveAddr {
                    addr: a.clone(),
                    compress: false,
                })
                .collect(),
            global_z: None,
            nodelay_off: false,
            extra_args: Vec::new(),
            prefix: Vec::new(),
        }
    }
}

/// A running `tdfs` master with its FUSE mount.
pub struct Master {
    child: Option<Child>,
    pub mountpoint: PathBuf,
    pub log: PathBuf,
    status: Option<ExitStatus>,
    watchdog_done: Arc<AtomicBool>,
}

impl Master {
    /// Starts the master and waits until the mount is up; panics with its log otherwise.
    pub fn start(opts: &MasterOpts) -> Master {
        Self::try_start(opts).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the master; Err (with its log) if it exits or fails to mount in time.
    pub fn try_start(opts: &MasterOpts) -> Result<Master, String> {
        let (out, err) = log_file(&opts.log);
        let mut cmd = crate::util::command_under(&opts.prefix, "tdfs");
        cmd.arg("-m").arg(&opts.backing);
        for s in &opts.slaves {
            let mut a = s.addr.clone();
            if s.compress {
                a.push_str(",z=1");
            }
            cmd.arg("-c").arg(a);
        }
        if let Some(z) = opts.global_z {
            cmd.arg("-z").arg(z.to_string());
        }
        if opts.nodelay_off {
            cmd.arg("-n");
        }
        cmd.arg("--state-dir").arg(&opts.state_dir);
        cmd.args(&opts.extra_args);
        cmd.arg(&opts.mountpoint)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot spawn {cmd:?}: {e}"))?;
        let done = Arc::new(AtomicBool::new(false));
        let mut m = Master {
            child: Some(child),
            mountpoint: opts.mountpoint.clone(),
            log: opts.log.clone(),
            status: None,
            watchdog_done: done.clone(),
        };
        m.start_watchdog();
        let mut exited = None;
        let mounted = wait_until(START_TIMEOUT, || {
            if is_fuse_mounted(&m.mountpoint) {
                return true;
            }
            if let Some(st) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                exited = Some(st);
                return true;
            }
            false
        });
        if let Some(st) = exited {
            m.status = Some(st);
            m.child = None;
            return Err(format!(
                "tdfs exited with {st} before mounting {}; command {cmd:?}; log:\n{}",
                m.mountpoint.display(),
                m.log_tail()
            ));
        }
        if !mounted {
            return Err(format!(
                "{} did not appear as a fuse mount in /proc/self/mountinfo within \
                 {START_TIMEOUT:?}; command {cmd:?}; log:\n{}",
                m.mountpoint.display(),
                m.log_tail()
            ));
        }
        Ok(m)
    }

    /// Kills the master (which aborts the FUSE connection, so no test thread stays blocked
    /// on the mount) if the test is still running after TDFS_TEST_WATCHDOG_SECS (default
    /// 1200 s).
    fn start_watchdog(&self) {
        let pid = self.child.as_ref().map(|c| c.id()).unwrap_or(0) as libc::pid_t;
        let done = self.watchdog_done.clone();
        let mnt = self.mountpoint.clone();
        let limit = env_secs("TDFS_TEST_WATCHDOG_SECS", Duration::from_secs(1200));
        std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                if done.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            if !done.load(Ordering::SeqCst) {
                eprintln!(
                    "watchdog: test on {} still running after {limit:?}; killing master {pid}",
                    mnt.display()
                );
                // SAFETY: plain kill(2). `done` is set right after the child is reaped, so the pid
                // can only be stale within that window, 20 minutes into a hung test.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                lazy_unmount(&mnt);
            }
        });
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, TAIL)
    }

    pub fn is_mounted(&self) -> bool {
        is_fuse_mounted(&self.mountpoint)
    }

    /// The master's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the master process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Unmounts (plain `umount`, retried while busy) and waits for the master to exit,
    /// returning its status. Panics with the log if it does not exit within
    /// TDFS_TEST_EXIT_SECS (default 300 s).
    pub fn unmount_and_wait(&mut self) -> ExitStatus {
        if let Some(st) = self.status {
            return st;
        }
        let mut last_err = String::new();
        let unmounted = wait_until(Duration::from_secs(30), || {
            if !self.is_mounted() {
                return true;
            }
            match Command::new("umount").arg(&self.mountpoint).output() {
                Ok(o) if o.status.success() => true,
                Ok(o) => {
                    last_err = String::from_utf8_lossy(&o.stderr).into_owned();
                    false
                }
                Err(e) => {
                    last_err = e.to_string();
                    false
                }
            }
        });
        assert!(
            unmounted,
            "cannot unmount {}: {last_err}; master log:\n{}",
            self.mountpoint.display(),
            self.log_tail()
        );
        self.wait_exit(env_secs("TDFS_TEST_EXIT_SECS", EXIT_TIMEOUT))
    }

    /// SIGKILL: the master dies without draining; its dead mount is detached so the same
    /// mountpoint can be used again.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, libc::SIGKILL);
            let _ = c.wait();
        }
        self.watchdog_done.store(true, Ordering::SeqCst);
        lazy_unmount(&self.mountpoint);
        let gone = wait_until(Duration::from_secs(30), || !self.is_mounted());
        assert!(
            gone,
            "dead mount {} did not go away",
            self.mountpoint.display()
        );
    }

    /// SIGTERM instead of unmounting, then wait like [`Master::unmount_and_wait`].
    pub fn terminate_and_wait(&mut self) -> ExitStatus {
        if let Some(st) = self.status {
            return st;
        }
        if let Some(c) = self.child.as_ref() {
            signal(c, libc::SIGTERM);
        }
        self.wait_exit(env_secs("TDFS_TEST_EXIT_SECS", EXIT_TIMEOUT))
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("master child");
        match wait_child(child, timeout) {
            Some(st) => {
                self.watchdog_done.store(true, Ordering::SeqCst);
                self.child = None;
                self.status = Some(st);
                st
            }
            None => panic!(
                "tdfs did not exit within {timeout:?} after the unmount/SIGTERM (slaves not \
                 acknowledging?); log:\n{}",
                self.log_tail()
            ),
        }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        self.watchdog_done.store(true, Ordering::SeqCst);
        // Only a master still running owns the mount: once it was killed, unmounted or
        // failed to start, whatever is mounted there now belongs to another (a restarted
        // master on the same mountpoint) and must be left alone.
        if let Some(mut c) = self.child.take() {
            if is_fuse_mounted(&self.mountpoint) {
                lazy_unmount(&self.mountpoint);
            }
            let _ = c.kill();
            let _ = c.wait();
            // A mount could still be there if the master was killed before we detached.
            if is_fuse_mounted(&self.mountpoint) {
                lazy_unmount(&self.mountpoint);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_listening_port;

    #[test]
    fn parses_listening_lines() {
        assert_eq!(
            parse_listening_port("2024 INFO tdfs_slave: listening on 127.0.0.1:4321\n"),
            Some(4321)
        );
        assert_eq!(
            parse_listening_port("\x1b[32m INFO\x1b[0m listening on 127.0.0.1:80, dir=/x\n"),
            Some(80)
        );
        assert_eq!(parse_listening_port("starting\n"), None);
    }
}
