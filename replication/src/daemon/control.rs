//! The control socket: a Unix stream socket in the daemon's state directory (mode 0600)
//! through which `tdfs status`, `tdfs slave add/remove` and `tdfs-slave status` talk to a
//! running daemon.
//!
//! Protocol: the client sends one JSON object on one line (`{"cmd":"status"}`); the daemon
//! answers with one JSON object on one line — `{"ok":true,...}` or
//! `{"ok":false,"error":"..."}` — and closes the connection.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// The socket's name in a state directory.
pub const SOCKET_NAME: &str = "control.sock";

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

/// The bound socket; removes its file when dropped (at exit).
pub struct ControlSocket {
    pub path: PathBuf,
    listener: Option<std::os::unix::net::UnixListener>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `STATE_DIR/control.sock` with mode 0600. A stale socket left by a crash is
/// replaced; a socket a live daemon answers on is an error (two daemons on one state dir).
pub fn bind(state_dir: &Path) -> anyhow::Result<ControlSocket> {
    bind_named(state_dir, SOCKET_NAME)
}

/// [`bind`] under another name in the state directory (the node supervisor's socket sits
/// beside the daemon it runs).
pub fn bind_named(state_dir: &Path, name: &str) -> anyhow::Result<ControlSocket> {
    let path = state_dir.join(name);
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            bail!(
                "another daemon answers on {} (is one already running with this state directory?)",
                path.display()
            );
        }
        tracing::debug!("replacing stale control socket {}", path.display());
    }
    // Bound under a temporary name and made private before it takes the real name, so
    // nobody can connect while it is still open to everyone (the daemons run with umask 0).
    let tmp = state_dir.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let l = std::os::unix::net::UnixListener::bind(&tmp)
        .with_context(|| format!("binding the control socket {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    if let Err(e) = std::fs::rename(&tmp, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("creating {}", path.display()));
    }
    l.set_nonblocking(true)?;
    Ok(ControlSocket {
        path,
        listener: Some(l),
    })
}

/// Answers requests on `sock` until the runtime ends. `handler` runs on a blocking thread
/// and gets the parsed request.
pub fn serve<F>(rt: &tokio::runtime::Handle, sock: &mut ControlSocket, handler: F)
where
    F: Fn(Value) -> Value + Send + Sync + 'static,
{
    let Some(std_l) = sock.listener.take() else {
        return;
    };
    let handler = Arc::new(handler);
    rt.spawn(async move {
        let l = match tokio::net::UnixListener::from_std(std_l) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("control socket: {e}");
                return;
            }
        };
        loop {
            let stream = match l.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut rd = tokio::io::BufReader::new(rd).take(MAX_REQUEST as u64);
                let mut line = String::new();
                let read =
                    tokio::time::timeout(Duration::from_secs(10), rd.read_line(&mut line)).await;
                let reply = match read {
                    Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Value>(&line) {
                        Ok(req) => tokio::task::spawn_blocking(move || handler(req))
                            .await
                            .unwrap_or_else(|e| error(format!("request failed: {e}"))),
                        Err(e) => error(format!("bad request: {e}")),
                    },
                    _ => return,
                };
                let mut out = reply.to_string();
                out.push('\n');
                let _ = tokio::time::timeout(Duration::from_secs(10), wr.write_all(out.as_bytes()))
                    .await;
            });
        }
    });
}

/// `{"ok":false,"error":msg}`.
pub fn error(msg: impl Into<String>) -> Value {
    json!({"ok": false, "error": msg.into()})
}

/// Sends one request to the daemon whose state directory is `state_dir` and returns its
/// answer (an error when it says `ok: false`).
pub fn request(state_dir: &Path, req: &Value) -> anyhow::Result<Value> {
    request_at(&state_dir.join(SOCKET_NAME), req, Duration::from_secs(30))
}

/// Sends one request to the socket at `path`, waiting at most `timeout` for each read and
/// write (a supervisor polling its daemon must not hang on it).
pub fn request_at(path: &Path, req: &Value, timeout: Duration) -> anyhow::Result<Value> {
    let mut s = UnixStream::connect(path).with_context(|| {
        format!(
            "cannot reach the daemon's control socket {} (is it running with this state \
             directory? give --state-dir DIR or -m DIR)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .context("reading the daemon's answer")?;
    if answer.is_empty() {
        bail!("the daemon closed the control connection without answering");
    }
    let v: Value = serde_json::from_str(&answer).context("the daemon's answer is not JSON")?;
    if v.get("ok") != Some(&Value::Bool(true)) {
        bail!(
            "{}",
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("the daemon refused the request")
        );
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_stale_socket() {
        let d = tempfile::tempdir().unwrap();
        // A stale socket (nobody listening) is replaced.
        drop(std::os::unix::net::UnixListener::bind(d.path().join(SOCKET_NAME)).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut sock = bind(d.path()).unwrap();
        let mode = std::fs::metadata(&sock.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        serve(rt.handle(), &mut sock, |req| {
            if req["cmd"] == "hello" {
                json!({"ok": true, "hi": 1})
            } else {
                error("unknown command")
            }
        });
        let v = request(d.path(), &json!({"cmd": "hello"})).unwrap();
        assert_eq!(v["hi"], 1);
        let e = request(d.path(), &json!({"cmd": "nope"})).unwrap_err();
        assert!(e.to_string().contains("unknown command"), "{e}");
        // A live daemon's socket is not taken over.
        assert!(bind(d.path()).is_err());
        let path = sock.path.clone();
        drop(sock);
        assert!(!path.exists());
    }
}
