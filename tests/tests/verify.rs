//! `tdfs verify`: names every kind of drift on a replica, exits 1, and `--repair` fixes it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use tdfs_tests::cluster::Cluster;
use tdfs_tests::util::{bin, pseudo_random, set_times};

fn verify(c: &Cluster, extra: &[&str]) -> (i32, String) {
    let out = Command::new(bin("tdfs"))
        .arg("verify")
        .arg("-m")
        .arg(&c.backing)
        .arg("-c")
        .arg(c.slaves[0].addr())
        .args(extra)
        .env("NO_COLOR", "1")
        .output()
        .expect("running tdfs verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn verify_names_drift_and_repair_fixes_it() {
    let mut c = Cluster::single("verify");
    fs::create_dir(c.at("d")).unwrap();
    fs::write(c.at("d/bytes"), pseudo_random(1, 50_000)).unwrap();
    fs::write(c.at("d/gone"), b"to be deleted on the replica").unwrap();
    fs::write(c.at("mode"), b"m").unwrap();
    fs::write(c.at("same"), b"unchanged").unwrap();
    c.wait_replicas(std::time::Duration::from_secs(60));

    // While the master is mounted and connected, verify still works and finds nothing.
    let (code, out) = verify(&c, &[]);
    assert_eq!(code, 0, "verify of an identical replica:\n{out}");
    c.finish();

    // Drift made by hand on the replica.
    let r = c.replica(0).to_path_buf();
    let f = r.join("d/bytes");
    let meta = fs::metadata(&f).unwrap();
    let mut data = fs::read(&f).unwrap();
    data[12_345] ^= 0xff;
    fs::write(&f, &data).unwrap();
    use std::os::unix::fs::MetadataExt;
    set_times(
        &f,
        (meta.atime(), meta.atime_nsec()),
        (meta.mtime(), meta.mtime_nsec()),
    )
    .unwrap();
    // Restoring mtime changed the directory's? No: only its entries' changes do.
    let dmeta = fs::metadata(r.join("d")).unwrap();
    fs::remove_file(r.join("d/gone")).unwrap();
    set_times(
        &r.join("d"),
        (dmeta.atime(), dmeta.atime_nsec()),
        (dmeta.mtime(), dmeta.mtime_nsec()),
    )
    .unwrap();
    fs::write(r.join("extra"), b"only here").unwrap();
    fs::set_permissions(r.join("mode"), fs::Permissions::from_mode(0o600)).unwrap();

    let (code, out) = verify(&c, &[]);
    assert_eq!(code, 1, "verify must fail on drift:\n{out}");
    for (kind, path) in [
        ("content", "/d/bytes"),
        ("missing", "/d/gone"),
        ("extra", "/extra"),
        ("mode", "/mode"),
    ] {
        assert!(
            out.lines()
                .any(|l| l.contains(&format!("\t{kind}\t{path}\t"))),
            "verify did not report {kind} of {path}:\n{out}"
        );
    }
    assert!(
        !out.contains("/same"),
        "verify reported an unchanged file:\n{out}"
    );

    let (code, out) = verify(&c, &["--repair"]);
    assert_eq!(code, 0, "verify --repair:\n{out}");
    let (code, out) = verify(&c, &[]);
    assert_eq!(code, 0, "verify after repair:\n{out}");
    tdfs_tests::compare::assert_identical(&c.backing, c.replica(0));
}
