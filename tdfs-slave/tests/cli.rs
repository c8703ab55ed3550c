//! The binary: startup checks, the "listening on" line, and clean exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tdfs-slave");

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir_in("/tmp").unwrap()
}

#[test]
fn listens_and_exits_zero_on_sigterm() {
    let root = tmp();
    let sd = tmp();
    let state = sd.path().join("state");
    let mut child = Command::new(BIN)
        .arg("-m")
        .arg(root.path())
        .args(["-l", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "exited before listening"
        );
        if let Some(i) = line.find("listening on ") {
            break line[i + "listening on ".len()..].trim().to_owned();
        }
    };
    // The moment it says it listens, a stop signal must be caught, not fatal.
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        assert!(
            tdfs_tests::util::catches_signal(child.id(), sig),
            "signal {sig} not caught once listening"
        );
    }
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    assert_ne!(addr.port(), 0);
    assert!(std::net::TcpStream::connect(addr).is_ok());

    // A second slave on the same state dir is refused with a clear message.
    let out = Command::new(BIN)
        .arg("-m")
        .arg(root.path())
        .args(["-l", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another tdfs daemon"));

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "slave did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let st = std::fs::metadata(&state).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(st.permissions().mode() & 0o777, 0o700);
}

#[test]
fn refuses_state_dir_inside_mirror() {
    let root = tmp();
    let out = Command::new(BIN)
        .arg("-m")
        .arg(root.path())
        .args(["-l", "127.0.0.1:0", "--state-dir"])
        .arg(root.path().join("st"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("inside the mirrored directory"));
    assert!(!root.path().join("st").exists());
}

#[test]
fn bad_listen_address_is_a_usage_error() {
    let root = tmp();
    let out = Command::new(BIN)
        .arg("-m")
        .arg(root.path())
        .args(["-l", "not an address"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
