//! Frames authenticated (and encrypted) after the shared-secret handshake, end to end: an
//! attacker on the path between master and slave, played by the harness's framed proxy,
//! changes, injects, replays, drops or reorders frames of a live, authenticated session.
//! Each must be detected before anything of the frame is applied, both logs must name the
//! failure, a canary file must never take forged content, and once the link has recovered
//! (reconnect, resume from the slave's position) the replica must be identical.
//!
//! Also: `--encrypt` keeps a known file's content off the wire, a mismatch of `--encrypt`
//! between the sides is a clear error, and the secret can be rotated without a pause beyond
//! a reconnect (a third secret refused).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tdfs_protocol::frame::{self, FrameType};
use tdfs_protocol::op::{self, Op, OpKind};
use tdfs_protocol::{Compression, WirePath};
use tdfs_tests::cluster::{Cluster, ClusterOpts};
use tdfs_tests::compare::try_wait_identical;
use tdfs_tests::proxy::{Dir, FrameFault, Proxy};
use tdfs_tests::util::{bin, temp_dir, wait_until, TempDir};
use tdfs_tests::writer::Writer;

const WAIT: Duration = Duration::from_secs(30);
const CONVERGE: Duration = Duration::from_secs(60);
const CANARY: &[u8] = b"the genuine canary\n";
const FORGED: &[u8] = b"FORGED by someone on the path\n";

/// A 0600 secret file.
fn secret(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p.to_string_lossy().into_owned()
}

fn key_id(text: &str) -> String {
    tdfs_protocol::auth::show_key_id(&tdfs_protocol::auth::key_id(text.trim_end().as_bytes()))
}

/// A cluster whose master and one slave share a secret (and `--encrypt` on the sides
/// asked for), the master reaching the slave through a framed proxy.
struct Sealed {
    c: Cluster,
    p: Proxy,
    _secrets: TempDir,
}

fn sealed(name: &str, master_encrypt: bool, slave_encrypt: bool) -> Sealed {
    let secrets = temp_dir(&format!("{name}-secret"));
    let s = secret(
        secrets.path(),
        "secret",
        "a shared secret of enough bytes\n",
    );
    let mut opts = ClusterOpts {
        slave_args: vec!["--secret-file".into(), s.clone()],
        extra_master_args: vec![
            "--secret-file".into(),
            s,
            "--drain-timeout".into(),
            "5".into(),
        ],
        ..ClusterOpts::default()
    };
    if slave_encrypt {
        opts.slave_args.push("--encrypt".into());
    }
    if master_encrypt {
        opts.extra_master_args.push("--encrypt".into());
    }
    let mut proxy = None;
    let c = Cluster::start_via(name, opts, |_, addr| {
        let p = Proxy::start_framed(addr);
        let a = p.addr();
        proxy = Some(p);
        a
    });
    Sealed {
        c,
        p: proxy.expect("a proxy"),
        _secrets: secrets,
    }
}

#[track_caller]
fn wait_for(what: &str, s: &Sealed, cond: impl FnMut() -> bool) {
    if !wait_until(WAIT, cond) {
        panic!(
            "timed out after {WAIT:?} waiting for {what}; {}\n{}",
            s.p.stats(),
            s.c.logs()
        );
    }
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// An `Ops` frame as the protocol crate builds it, well-formed (valid crc, the sequence
/// number the slave expects next) and writing forged content into the canary.
fn forged_frame(seq: u64) -> Vec<u8> {
    let op = Op::new(OpKind::Write {
        path: WirePath::parse(b"canary").unwrap(),
        offset: 0,
        data: FORGED.to_vec().into(),
    });
    let mut payload = Vec::new();
    op::encode_batch([&op], &mut payload);
    frame::encode_vec(FrameType::Ops, seq, &payload, Compression::None)
}

/// Runs a write workload through a sealed, proxied cluster; with a canary in place, arms
/// `fault` for the next op frame going `dir`, then checks detection, both logs, recovery
/// and that the replica never took anything forged.
fn tamper(name: &str, dir: Dir, fault: FrameFault) {
    let t0 = Instant::now();
    let mut s = sealed(name, false, false);
    let w = Writer::start(s.c.mnt(), "w");
    wait_for("the writer to get under way", &s, || {
        w.steps() >= 100 && s.p.to_slave() > 200_000
    });
    fs::write(s.c.mnt().join("canary"), CANARY).unwrap();
    let replica_canary = s.c.replica(0).join("canary");
    wait_for("the canary on the replica", &s, || {
        fs::read(&replica_canary).is_ok_and(|b| b == CANARY)
    });
    let what = format!("{fault:?}");
    let (accepted, slave_before, master_before) = (
        s.p.accepted(),
        count(&s.c.slaves[0].log(), "failed authentication"),
        count(&s.c.master.log_text(), "failed authentication"),
    );
    s.p.frame_fault(dir, fault);
    let t_fault = Instant::now();
    wait_for("the fault to be carried out", &s, || {
        s.p.frame_faults() >= 1
    });
    wait_for("the slave to log the failure", &s, || {
        count(&s.c.slaves[0].log(), "failed authentication") > slave_before
    });
    wait_for("the master to log the failure", &s, || {
        count(&s.c.master.log_text(), "failed authentication") > master_before
    });
    let detected = t_fault.elapsed();
    // The link comes back by itself and ops flow over the new connection.
    wait_for("the master to connect again", &s, || {
        s.p.accepted() > accepted && s.p.active() > 0
    });
    let sent = s.p.to_slave();
    wait_for("ops to flow over the new connection", &s, || {
        s.p.to_slave() > sent + 20_000
    });
    let recovered = t_fault.elapsed();
    assert!(w.advance(50, WAIT), "the writer stalled after the fault");
    let steps = w.finish();
    if let Err(e) = try_wait_identical(&s.c.backing, s.c.replica(0), CONVERGE) {
        panic!("{e}\n{}\n{}", s.p.stats(), s.c.logs());
    }
    assert_eq!(fs::read(&replica_canary).unwrap(), CANARY, "forged canary");
    let (slog, mlog) = (s.c.slaves[0].log(), s.c.master.log_text());
    assert!(
        !slog.contains("failed to apply"),
        "the slave applied something it could not:\n{slog}"
    );
    let line = |log: &str| {
        log.lines()
            .find(|l| l.contains("failed authentication"))
            .unwrap_or_default()
            .to_string()
    };
    eprintln!(
        "{name}: {what} {dir:?}: detected in {detected:.2?}, streaming again {recovered:.2?} \
         after the fault; {steps} writer steps; whole test {:.2?}\n  slave:  {}\n  master: {}",
        t0.elapsed(),
        line(&slog),
        line(&mlog)
    );
    s.c.finish();
}

#[test]
fn a_flipped_payload_byte_is_refused() {
    tamper("mac-flip-payload", Dir::ToSlave, FrameFault::FlipPayload);
}

#[test]
fn a_flipped_header_byte_is_refused() {
    tamper("mac-flip-header", Dir::ToSlave, FrameFault::FlipHeader);
}

#[test]
fn an_injected_frame_is_refused() {
    tamper(
        "mac-inject",
        Dir::ToSlave,
        FrameFault::Inject(Box::new(forged_frame)),
    );
}

#[test]
fn a_replayed_frame_is_refused() {
    tamper("mac-replay", Dir::ToSlave, FrameFault::Replay);
}

#[test]
fn a_dropped_frame_is_noticed() {
    tamper("mac-drop", Dir::ToSlave, FrameFault::Drop);
}

#[test]
fn reordered_frames_are_refused() {
    tamper("mac-reorder", Dir::ToSlave, FrameFault::Reorder);
}

#[test]
fn a_forged_acknowledgement_is_refused_by_the_master() {
    tamper("mac-flip-ack", Dir::ToMaster, FrameFault::FlipPayload);
}

/// A file whose content is easy to spot on the wire.
fn marker_file() -> Vec<u8> {
    b"tdfs plaintext marker 0123456789abcdef\n".repeat(8192)
}

/// Writes the marker file through a sealed cluster while the proxy records; returns what
/// the master sent.
fn wire_of_marker(name: &str, encrypt: bool) -> Vec<u8> {
    let mut s = sealed(name, encrypt, encrypt);
    s.p.record(true);
    fs::write(s.c.mnt().join("marker"), marker_file()).unwrap();
    if let Err(e) = try_wait_identical(&s.c.backing, s.c.replica(0), CONVERGE) {
        panic!("{e}\n{}", s.c.logs());
    }
    let wire = s.p.recorded();
    let slog = s.c.slaves[0].log();
    let mode = if encrypt {
        "encrypted and authenticated"
    } else {
        "authenticated (MAC)"
    };
    assert!(
        slog.contains(mode),
        "slave log does not say {mode:?}:\n{slog}"
    );
    s.c.finish();
    wire
}

#[test]
fn encrypt_replicates_and_the_wire_shows_no_plaintext() {
    let marker = &marker_file()[..39];
    let encrypted = wire_of_marker("enc-wire", true);
    let mac_only = wire_of_marker("mac-wire", false);
    assert!(
        encrypted.len() > marker_file().len(),
        "recorded {} bytes",
        encrypted.len()
    );
    let holds = |w: &[u8]| w.windows(marker.len()).any(|x| x == marker);
    // The check finds the content where it travels in the clear ...
    assert!(
        holds(&mac_only),
        "the marker never crossed the MAC-only wire"
    );
    // ... and not where it is encrypted.
    assert!(!holds(&encrypted), "plaintext on the encrypted wire");
    eprintln!(
        "marker file of {} bytes: {} bytes on the encrypted wire, {} on the MAC-only one",
        marker_file().len(),
        encrypted.len(),
        mac_only.len()
    );
}

#[test]
fn an_encrypt_mismatch_is_a_clear_error_on_both_sides() {
    for (name, master, slave, needle) in [
        (
            "enc-mismatch-m",
            true,
            false,
            "the master encrypts its frames",
        ),
        ("enc-mismatch-s", false, true, "requires encrypted frames"),
    ] {
        let s = sealed(name, master, slave);
        fs::write(s.c.mnt().join("f"), b"data").unwrap();
        wait_for("the slave to refuse", &s, || {
            s.c.slaves[0].log().contains(needle)
        });
        wait_for("the master to log the refusal", &s, || {
            let m = s.c.master.log_text();
            m.contains("refused authentication") && m.contains(needle)
        });
        assert!(!s.c.replica(0).join("f").exists());
        let line =
            s.c.master
                .log_text()
                .lines()
                .find(|l| l.contains(needle))
                .unwrap_or_default()
                .to_string();
        eprintln!("{name}: master: {line}");
    }
    // One slave's `,encrypt` on the master meets the slave's --encrypt.
    let secrets = temp_dir("enc-per-slave-secret");
    let k = secret(
        secrets.path(),
        "secret",
        "a shared secret of enough bytes\n",
    );
    let mut c = Cluster::start_via(
        "enc-per-slave",
        ClusterOpts {
            slave_args: vec!["--secret-file".into(), k.clone(), "--encrypt".into()],
            extra_master_args: vec!["--secret-file".into(), k],
            ..ClusterOpts::default()
        },
        |_, addr| format!("{addr},encrypt"),
    );
    fs::write(c.mnt().join("f"), b"data").unwrap();
    c.wait_replicas(CONVERGE);
    assert!(c.slaves[0].log().contains("encrypted and authenticated"));
    c.finish();
}

fn sighup(pid: u32) {
    // SAFETY: kill(2) with a pid we started and a valid signal number.
    let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    assert_eq!(r, 0, "kill -HUP {pid}");
}

/// Writes `name` through the mount and returns how long until the replica has it.
fn replicated_in(c: &Cluster, name: &str) -> Option<Duration> {
    let t = Instant::now();
    fs::write(c.mnt().join(name), name.as_bytes()).unwrap();
    let there = c.replica(0).join(name);
    wait_until(WAIT, || {
        fs::read(&there).is_ok_and(|b| b == name.as_bytes())
    })
    .then(|| t.elapsed())
}

#[test]
fn rotating_the_secret_pauses_replication_no_longer_than_a_reconnect() {
    let tmp = temp_dir("rotate-secrets");
    let (old, new, third) = (
        "the old shared secret, in use\n",
        "the new shared secret, rotated in\n",
        "a third secret nobody accepts\n",
    );
    let a = secret(tmp.path(), "old", old);
    let b = secret(tmp.path(), "new", new);
    // The master's file: the old secret now, rewritten in place later.
    let m = secret(tmp.path(), "master", old);
    let mut c = Cluster::start(
        "rotate",
        ClusterOpts {
            // The slave accepts both for the rotation window.
            slave_args: vec![
                "--secret-file".into(),
                a.clone(),
                "--secret-file".into(),
                b.clone(),
            ],
            extra_master_args: vec!["--secret-file".into(), m.clone()],
            ..ClusterOpts::default()
        },
    );
    let pid = c.master.pid().expect("master running");
    let w = Writer::start(c.mnt(), "w");
    let before = replicated_in(&c, "before").expect("replicated with the old secret");
    let slave_has = |needle: &str| c.slaves[0].log().contains(needle);
    assert!(slave_has(&format!(
        "authenticated with secret {}",
        key_id(old)
    )));

    // The master moves to the new secret: one reconnect, nothing else.
    secret(tmp.path(), "master", new);
    sighup(pid);
    assert!(
        wait_until(WAIT, || slave_has(&format!(
            "authenticated with secret {}",
            key_id(new)
        ))),
        "the master never came back with the new secret\n{}",
        c.logs()
    );
    let after = replicated_in(&c, "after").expect("replicated with the new secret");
    assert!(
        after < Duration::from_secs(5),
        "replication paused {after:.2?} after the rotation\n{}",
        c.logs()
    );
    assert!(c
        .master
        .log_text()
        .contains("every slave link reconnects with them"));

    // A third secret is refused: nothing more lands until the master is fixed.
    let refused = count(&c.slaves[0].log(), "wrong secret");
    secret(tmp.path(), "master", third);
    sighup(pid);
    assert!(
        wait_until(WAIT, || count(&c.slaves[0].log(), "wrong secret")
            >= refused + 2),
        "the slave did not refuse the third secret\n{}",
        c.logs()
    );
    fs::write(c.mnt().join("during"), b"written while refused").unwrap();
    assert!(
        wait_until(WAIT, || count(&c.slaves[0].log(), "wrong secret")
            >= refused + 3),
        "{}",
        c.logs()
    );
    assert!(!c.replica(0).join("during").exists());
    assert!(c.master.log_text().contains("refused authentication"));

    secret(tmp.path(), "master", new);
    sighup(pid);
    let steps = w.finish();
    if let Err(e) = try_wait_identical(&c.backing, c.replica(0), CONVERGE) {
        panic!("{e}\n{}", c.logs());
    }
    eprintln!(
        "rotation: a file written before took {before:.2?} to replicate, one written right \
         after the SIGHUP {after:.2?}; {steps} writer steps"
    );
    c.finish();

    // No daemon holds more than two secrets.
    let out = Command::new(bin("tdfs-slave"))
        .args(["-m", tmp.path().to_str().unwrap(), "-l", "127.0.0.1:0"])
        .args([
            "--secret-file",
            &a,
            "--secret-file",
            &b,
            "--secret-file",
            &m,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("at most 2"), "{err}");
}
