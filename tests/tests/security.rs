//! Authentication, TLS, `--allow` and safe defaults, end to end with real daemons.
//!
//! Every refusal is checked three ways: nothing reaches the replica, the slave keeps
//! running, and both sides say why in their logs.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tdfs_protocol::frame::{self, FrameType};
use tdfs_protocol::msg::{Hello, Refuse};
use tdfs_protocol::Compression;
use tdfs_tests::daemons::{Master, MasterOpts, Slave};
use tdfs_tests::util::{bin, names, require_root_and_fuse, temp_dir, wait_log, wait_until};

const SECRET_A: &str = "correct horse battery staple, one\n";
const SECRET_B: &str = "correct horse battery staple, two\n";

struct Env {
    _tmp: tdfs_tests::util::TempDir,
    root: PathBuf,
}

impl Env {
    fn new(name: &str) -> Env {
        let tmp = temp_dir(name);
        let root = tmp.path().to_path_buf();
        std::fs::create_dir(root.join("logs")).unwrap();
        Env { _tmp: tmp, root }
    }

    fn dir(&self, name: &str) -> PathBuf {
        let p = self.root.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn file(&self, name: &str, content: &str, mode: u32) -> String {
        let p = self.root.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p.to_string_lossy().into_owned()
    }

    fn slave(&self, name: &str, args: &[&str]) -> Slave {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Slave::start_with_args(
            &self.dir(&format!("{name}-mirror")),
            &self.root.join(format!("{name}-state")),
            &self.root.join("logs"),
            false,
            &args,
        )
    }

    fn master(&self, name: &str, slaves: &[String], args: &[&str]) -> Master {
        // No epoch check at startup: these tests count and record the connections a master
        // makes to its slaves, and that check is one more.
        let mut extra: Vec<String> = vec![
            "--drain-timeout".into(),
            "2".into(),
            "--fence-check".into(),
            "0".into(),
        ];
        extra.extend(args.iter().map(|s| s.to_string()));
        Master::start(&MasterOpts {
            extra_args: extra,
            ..MasterOpts::plain(
                self.dir(&format!("{name}-backing")),
                self.dir(&format!("{name}-mnt")),
                self.root.join(format!("{name}-mstate")),
                self.root.join("logs").join(format!("{name}.log")),
                slaves,
            )
        })
    }
}

/// How long a daemon gets to log a refusal.
const LOG_WAIT: Duration = Duration::from_secs(20);

fn hello_frame() -> Vec<u8> {
    let h = Hello {
        proto_min: tdfs_protocol::msg::PROTO_MIN,
        proto_max: tdfs_protocol::msg::PROTO_MAX,
        history: tdfs_protocol::History::genesis([7; 16], 1),
        next_seq: 1,
        flags: 0,
        label: "raw test client".into(),
    };
    frame::encode_vec(FrameType::Hello, 0, &h.encode(), Compression::None)
}

/// Everything the peer sends until it closes (or 10 s pass), as frames.
fn read_frames(s: &mut TcpStream) -> Vec<frame::Frame> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let mut out = Vec::new();
    let mut pos = 0;
    while let Ok(f) = frame::parse(&buf[pos..]) {
        pos += f.wire_len;
        out.push(f);
    }
    out
}

fn stop_master(mut m: Master) {
    let _ = m.unmount_and_wait();
}

#[test]
fn wrong_secret_applies_nothing_and_both_sides_say_so() {
    require_root_and_fuse();
    let env = Env::new("sec-wrong");
    let sa = env.file("a.secret", SECRET_A, 0o600);
    let sb = env.file("b.secret", SECRET_B, 0o600);
    let mut slave = env.slave("s", &["--secret-file", &sa]);
    let m = env.master("m", &[slave.addr()], &["--secret-file", &sb]);
    std::fs::write(m.mountpoint.join("f"), b"data").unwrap();
    wait_log(
        "slave",
        LOG_WAIT,
        || slave.log(),
        "authentication failed: wrong secret",
    );
    wait_log(
        "master",
        LOG_WAIT,
        || m.log_text(),
        "refused authentication: authentication failed",
    );
    assert!(slave.log().contains("refusing connection from 127.0.0.1:"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(names(&slave.dir).is_empty(), "{:?}", names(&slave.dir));
    assert!(slave.is_running());
    stop_master(m);
    slave.stop();
}

#[test]
fn slave_with_secret_refuses_master_without_one() {
    require_root_and_fuse();
    let env = Env::new("sec-none");
    let sa = env.file("a.secret", SECRET_A, 0o600);
    let mut slave = env.slave("s", &["--secret-file", &sa]);
    let m = env.master("m", &[slave.addr()], &[]);
    std::fs::write(m.mountpoint.join("f"), b"data").unwrap();
    wait_log(
        "slave",
        LOG_WAIT,
        || slave.log(),
        "master did not authenticate",
    );
    wait_log(
        "master",
        LOG_WAIT,
        || m.log_text(),
        "authentication required",
    );
    assert!(names(&slave.dir).is_empty());
    assert!(slave.is_running());
    stop_master(m);

    // A raw Hello learns nothing but "authentication required".
    let mut s = TcpStream::connect(slave.addr()).unwrap();
    s.write_all(&hello_frame()).unwrap();
    let frames = read_frames(&mut s);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].kind, FrameType::Refuse);
    let r = Refuse::decode(&frames[0].payload).unwrap();
    assert!(r.message.contains("--secret-file"), "{}", r.message);
    slave.stop();
}

/// Copies a connection both ways, recording what the master sent.
fn recording_proxy(to: String) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let rec = Arc::new(Mutex::new(Vec::new()));
    let r = rec.clone();
    std::thread::spawn(move || {
        // Only the first connection is recorded and forwarded.
        let (mut c, _) = l.accept().unwrap();
        let mut s = TcpStream::connect(&to).unwrap();
        let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
            let _ = c2.shutdown(Shutdown::Write);
        });
        let mut buf = [0u8; 65536];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    r.lock().unwrap().extend_from_slice(&buf[..n]);
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = s.shutdown(Shutdown::Write);
    });
    (port, rec)
}

#[test]
fn right_secret_replicates_and_a_replayed_handshake_fails() {
    require_root_and_fuse();
    let env = Env::new("sec-replay");
    let sa = env.file("a.secret", SECRET_A, 0o600);
    let mut slave = env.slave("s", &["--secret-file", &sa]);
    let (port, recorded) = recording_proxy(slave.addr());
    let m = env.master("m", &[format!("127.0.0.1:{port}")], &["--secret-file", &sa]);
    std::fs::write(m.mountpoint.join("f"), b"data").unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            std::fs::read(slave.dir.join("f")).ok().as_deref() == Some(&b"data"[..])
        }),
        "not replicated with the right secret; slave log:\n{}\nmaster log:\n{}",
        slave.log(),
        m.log_text()
    );

    // While that master holds the session, an unauthenticated peer learns nothing of it.
    let mut s = TcpStream::connect(slave.addr()).unwrap();
    s.write_all(&hello_frame()).unwrap();
    let frames = read_frames(&mut s);
    let r = Refuse::decode(&frames[0].payload).unwrap();
    assert!(!r.message.contains("another master"), "{}", r.message);
    stop_master(m);
    let bytes = recorded.lock().unwrap().clone();
    assert_eq!(
        bytes[5],
        FrameType::AuthRequest as u8,
        "recorded from the start"
    );

    // Replay every byte the real master sent, to the same slave and to a fresh one with
    // the same secret: the slave's new nonce makes the recorded proof worthless.
    let mut fresh = env.slave("fresh", &["--secret-file", &sa]);
    std::fs::remove_file(slave.dir.join("f")).unwrap();
    for sl in [&slave, &fresh] {
        let mut s = TcpStream::connect(sl.addr()).unwrap();
        let _ = s.write_all(&bytes);
        let frames = read_frames(&mut s);
        let kinds: Vec<_> = frames.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [FrameType::AuthChallenge, FrameType::Refuse],
            "replay got {kinds:?}"
        );
        let r = Refuse::decode(&frames[1].payload).unwrap();
        assert_eq!(r.message, "authentication failed");
    }
    for sl in [&mut slave, &mut fresh] {
        wait_log(
            "slave",
            LOG_WAIT,
            || sl.log(),
            "wrong secret or replayed handshake",
        );
        assert!(names(&sl.dir).is_empty(), "{:?}", names(&sl.dir));
        assert!(sl.is_running());
        sl.stop();
    }
}

fn pki(env: &Env, prefix: &str) -> tdfs_tests::pki::Pki {
    tdfs_tests::pki::write_pki(&env.root, prefix)
}

#[test]
fn tls_replicates_with_valid_certificates_and_refuses_others() {
    require_root_and_fuse();
    let env = Env::new("sec-tls");
    let good = pki(&env, "good");
    let other = pki(&env, "other");
    let sa = env.file("a.secret", SECRET_A, 0o600);
    let mut slave = env.slave(
        "s",
        &[
            "--tls-cert",
            &good.slave_cert,
            "--tls-key",
            &good.slave_key,
            "--tls-ca",
            &good.ca,
            "--secret-file",
            &sa,
        ],
    );
    // By name ("localhost") and by address (127.0.0.1): both are in the certificate.
    let by_name = format!("localhost:{}", slave.port());
    let m = env.master(
        "m",
        &[by_name],
        &[
            "--tls-cert",
            &good.master_cert,
            "--tls-key",
            &good.master_key,
            "--tls-ca",
            &good.ca,
            "--secret-file",
            &sa,
        ],
    );
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(m.mountpoint.join("big"), &data).unwrap();
    std::fs::create_dir(m.mountpoint.join("d")).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || {
            slave.dir.join("d").is_dir()
                && std::fs::read(slave.dir.join("big")).ok().as_deref() == Some(&data[..])
        }),
        "not replicated over TLS; slave log:\n{}\nmaster log:\n{}",
        slave.log(),
        m.log_text()
    );
    stop_master(m);

    // A plain-TCP client (no certificate at all) gets nothing applied.
    let mut s = TcpStream::connect(slave.addr()).unwrap();
    s.write_all(&hello_frame()).unwrap();
    let frames = read_frames(&mut s);
    assert!(frames.is_empty(), "{frames:?}");
    wait_log("slave", LOG_WAIT, || slave.log(), "TLS handshake failed");

    // A master whose certificate another CA signed is refused too.
    std::fs::remove_dir(slave.dir.join("d")).unwrap();
    let m = env.master(
        "m2",
        &[slave.addr()],
        &[
            "--tls-cert",
            &other.master_cert,
            "--tls-key",
            &other.master_key,
            "--tls-ca",
            &good.ca,
            "--secret-file",
            &sa,
        ],
    );
    std::fs::write(m.mountpoint.join("evil"), b"x").unwrap();
    // TLS 1.3: the slave rejects the client certificate after the master sent its
    // Finished, so the master hears the alert on its first read.
    wait_log(
        "master",
        LOG_WAIT,
        || m.log_text(),
        "received fatal alert: UnknownCA",
    );
    wait_log("slave", LOG_WAIT, || slave.log(), "TLS handshake failed");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(names(&slave.dir), ["big"]);
    assert!(slave.is_running());
    stop_master(m);
    slave.stop();
}

#[test]
fn allow_list_closes_other_addresses() {
    let env = Env::new("sec-allow");
    let mut denied = env.slave("denied", &["--allow", "10.0.0.0/8"]);
    let mut s = TcpStream::connect(denied.addr()).unwrap();
    let _ = s.write_all(&hello_frame());
    assert!(read_frames(&mut s).is_empty());
    wait_log(
        "slave",
        LOG_WAIT,
        || denied.log(),
        "refusing connection from 127.0.0.1",
    );
    assert!(denied.log().contains("not allowed by --allow"));
    assert!(denied.is_running());
    denied.stop();

    let mut allowed = env.slave("allowed", &["--allow", "127.0.0.1/32"]);
    let mut s = TcpStream::connect(allowed.addr()).unwrap();
    s.write_all(&hello_frame()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 28];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf[5], FrameType::HelloAck as u8);
    drop(s);
    allowed.stop();
}

/// `tdfs-slave` on the env's mirror and state dirs with `args`, not yet started.
fn slave_cmd(env: &Env, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("tdfs-slave"));
    cmd.arg("-m")
        .arg(env.dir("mirror"))
        .arg("--state-dir")
        .arg(env.root.join("state"))
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

#[test]
fn open_listener_needs_a_secret_or_insecure() {
    let env = Env::new("sec-open");
    let out = slave_cmd(&env, &["-l", "0.0.0.0:0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without authentication"),
        "{err}"
    );
    assert!(
        err.contains("--secret-file") && err.contains("--insecure"),
        "{err}"
    );

    // With --insecure (or a secret) it starts.
    for args in [
        vec!["-l", "0.0.0.0:0", "--insecure"],
        vec![
            "-l",
            "0.0.0.0:0",
            "--secret-file",
            &env.file("a.secret", SECRET_A, 0o600),
        ],
    ] {
        let log = env.root.join("logs").join("open.log");
        let mut child = slave_cmd(&env, &args)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let ok = wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("listening on 0.0.0.0:")
        });
        let _ = child.kill();
        let _ = child.wait();
        assert!(ok, "{args:?}: {}", std::fs::read_to_string(&log).unwrap());
    }
}

#[test]
fn secret_file_readable_by_others_is_refused() {
    let env = Env::new("sec-mode");
    let loose = env.file("loose.secret", SECRET_A, 0o644);
    let out = slave_cmd(&env, &["-l", "127.0.0.1:0", "--secret-file", &loose])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("accessible by group or others (mode 0644)"),
        "{err}"
    );
    assert!(err.contains(&format!("chmod 600 {loose}")), "{err}");

    let out = Command::new(bin("tdfs"))
        .arg("-m")
        .arg(env.dir("backing"))
        .arg("--state-dir")
        .arg(env.root.join("mstate"))
        .arg("--secret-file")
        .arg(&loose)
        .arg(env.dir("mnt"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
}
