//! A real single-member etcd for a test (Debian's `etcd-server`), with its own data dir and
//! ports, and `tdfs node` supervisors that use it.
//!
//! Ports are picked by binding port 0 and releasing it; etcd is started again on new ports
//! if one was taken meanwhile. Everything is stopped on drop, also on panic: each node's
//! whole process group (the supervisor and the daemon it runs), its mount, then etcd.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{bin, is_fuse_mounted, lazy_unmount, tail, wait_until};

/// A free TCP port on `host` (bound and released: another process could take it before it
/// is used, so users retry).
pub fn free_port(host: &str) -> u16 {
    TcpListener::bind((host, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on {host}: {e}"))
}

pub struct EtcdServer {
    child: Option<Child>,
    data_dir: PathBuf,
    log: PathBuf,
    host: String,
    client_port: u16,
    peer_port: u16,
}

impl EtcdServer {
    /// Starts etcd listening for clients on `host` (loopback, or the root namespace's
    /// address on a test net), its data and log under `dir`.
    pub fn start(dir: &Path, host: &str) -> EtcdServer {
        if Command::new("etcd").arg("--version").output().is_err() {
            panic!("etcd is needed for the automatic failover tests: apt-get install etcd-server");
        }
        std::fs::create_dir_all(dir).unwrap();
        let mut e = EtcdServer {
            child: None,
            data_dir: dir.join("etcd-data"),
            log: dir.join("etcd.log"),
            host: host.to_string(),
            client_port: 0,
            peer_port: 0,
        };
        let mut last = String::new();
        for _ in 0..5 {
            e.client_port = free_port(host);
            e.peer_port = free_port("127.0.0.1");
            match e.spawn() {
                Ok(()) => return e,
                Err(msg) => {
                    last = msg;
                    let _ = std::fs::remove_dir_all(&e.data_dir);
                }
            }
        }
        panic!("etcd did not start: {last}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let (out, err) = crate::daemons::log_file(&self.log);
        let client = format!("http://{}:{}", self.host, self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawning etcd: {e}"))?;
        let mut exited = None;
        let ok = wait_until(Duration::from_secs(30), || {
            if let Ok(Some(st)) = child.try_wait() {
                exited = Some(st);
                return true;
            }
            self.healthy()
        });
        if let Some(st) = exited {
            return Err(format!(
                "etcd exited with {st}; log:\n{}",
                tail(&self.log, 3000)
            ));
        }
        if !ok {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "etcd not healthy within 30 s; log:\n{}",
                tail(&self.log, 3000)
            ));
        }
        self.child = Some(child);
        Ok(())
    }

    /// GET /health answers `"health":"true"`.
    pub fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect((self.host.as_str(), self.client_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut buf = Vec::new();
        let _ = s.take(4096).read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).contains("\"health\":\"true\"")
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.client_port)
    }

    /// SIGTERM and wait (etcd keeps its data: [`EtcdServer::restart`] brings it back).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: our own unreaped child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let done = wait_until(Duration::from_secs(30), || {
                c.try_wait().ok().flatten().is_some()
            });
            if !done {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd still running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => panic!("etcd restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 4000)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One node of an automatic-failover cluster: a `tdfs node` supervisor in its own process
/// group (so that killing the group kills the node: supervisor and daemon).
pub struct ClusterNode {
    pub name: String,
    pub dir: PathBuf,
    pub state: PathBuf,
    pub mnt: PathBuf,
    logs_dir: PathBuf,
    logs: Vec<PathBuf>,
    args: Vec<String>,
    prefix: Vec<String>,
    child: Option<Child>,
}

impl ClusterNode {
    /// A node under `root` (its tree, state dir, mountpoint and logs there); `args` are the
    /// `tdfs node` arguments beyond --name, -m, --state-dir and --mountpoint; `prefix` runs
    /// it in a network namespace.
    pub fn new(root: &Path, name: &str, args: Vec<String>, prefix: Vec<String>) -> ClusterNode {
        let n = ClusterNode {
            name: name.to_string(),
            dir: root.join(name),
            state: root.join(format!("{name}-state")),
            mnt: root.join(format!("{name}-mnt")),
            logs_dir: root.join(format!("{name}-logs")),
            logs: Vec::new(),
            args,
            prefix,
            child: None,
        };
        for d in [&n.dir, &n.state, &n.mnt, &n.logs_dir] {
            std::fs::create_dir_all(d).unwrap();
        }
        n
    }

    pub fn start(&mut self) {
        use std::os::unix::process::CommandExt;
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = self.logs_dir.join(format!("node-{}.log", self.logs.len()));
        self.logs.push(log.clone());
        let (out, err) = crate::daemons::log_file(&log);
        let mut cmd = crate::util::command_under(&self.prefix, "tdfs");
        cmd.arg("node")
            .args(["--name", &self.name])
            .arg("-m")
            .arg(&self.dir)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--mountpoint")
            .arg(&self.mnt)
            .args(&self.args)
            .env("NO_COLOR", "1")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")));
    }

    /// kill -9 of the whole node (supervisor and daemon at once); its dead mount is
    /// detached.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: the group of our own unreaped child (its leader).
            unsafe { libc::kill(-(c.id() as libc::pid_t), libc::SIGKILL) };
            let _ = c.wait();
            // The daemon may outlive the leader for a moment.
            wait_until(Duration::from_secs(10), || {
                // SAFETY: signal 0 only asks whether the group still has members.
                unsafe { libc::kill(-(c.id() as libc::pid_t), 0) != 0 }
            });
        }
        if is_fuse_mounted(&self.mnt) {
            lazy_unmount(&self.mnt);
        }
    }

    /// SIGTERM to the supervisor (it stops its daemon and leaves the cluster) and wait.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: our own unreaped child.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let mut st = None;
        wait_until(Duration::from_secs(90), || {
            st = c.try_wait().ok().flatten();
            st.is_some()
        });
        if st.is_none() {
            // SAFETY: as in kill9.
            unsafe { libc::kill(-(c.id() as libc::pid_t), libc::SIGKILL) };
            let _ = c.wait();
        }
        if is_fuse_mounted(&self.mnt) {
            lazy_unmount(&self.mnt);
        }
        st
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// `tdfs status --json` of this node (None while nothing answers).
    pub fn status(&self) -> Option<serde_json::Value> {
        let o = Command::new(bin("tdfs"))
            .args(["status", "--json", "--state-dir"])
            .arg(&self.state)
            .output()
            .ok()?;
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// `tdfs status` as text.
    pub fn status_text(&self) -> String {
        let o = Command::new(bin("tdfs"))
            .args(["status", "--state-dir"])
            .arg(&self.state)
            .output()
            .expect("tdfs status");
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// Whether this node leads and its mount is up.
    pub fn leads(&self) -> bool {
        is_fuse_mounted(&self.mnt)
            && self
                .status()
                .is_some_and(|v| v["cluster"]["role"] == "leader" && v["role"] == "master")
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        for l in &self.logs {
            s.push_str(&std::fs::read_to_string(l).unwrap_or_default());
        }
        s
    }

    pub fn log_tail(&self) -> String {
        let l = self.log();
        let start = l.len().saturating_sub(8000);
        let start = (start..l.len())
            .find(|i| l.is_char_boundary(*i))
            .unwrap_or(l.len());
        format!("--- node {} ---\n{}", self.name, &l[start..])
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.kill9();
    }
}
