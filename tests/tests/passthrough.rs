//! Kernel FUSE passthrough for read-only opens (`--passthrough`): reads bypass the daemon,
//! writes never do, and the replica stays exact under concurrent readers and writers.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tdfs_tests::cluster::{Cluster, ClusterOpts};
use tdfs_tests::util::{pseudo_random, wait_until};

fn cluster(name: &str) -> Cluster {
    let c = Cluster::start(
        name,
        ClusterOpts {
            extra_master_args: vec!["--passthrough".into()],
            ..Default::default()
        },
    );
    assert!(
        wait_until(Duration::from_secs(10), || c
            .master
            .log_text()
            .contains("passthrough")),
        "no passthrough line in the log:\n{}",
        c.master.log_text()
    );
    c
}

#[test]
fn writer_waits_for_passthrough_readers_and_is_replicated() {
    let mut c = cluster("pt-writer");
    fs::write(c.at("f"), pseudo_random(1, 100_000)).unwrap();
    let reader = fs::File::open(c.at("f")).unwrap();
    let mut head = [0u8; 16];
    reader.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head[..], &pseudo_random(1, 100_000)[..16]);
    // A writer cannot share the inode with passthrough readers: it waits, then ETXTBSY.
    let t = Instant::now();
    let e = OpenOptions::new()
        .write(true)
        .open(c.at("f"))
        .expect_err("writable open while a passthrough reader holds the file");
    assert_eq!(e.raw_os_error(), Some(libc::ETXTBSY), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(1500));
    drop(reader);
    // Readers gone: the writer opens, and its write goes through the daemon (replicated).
    let w = OpenOptions::new().write(true).open(c.at("f")).unwrap();
    w.write_all_at(b"written after the readers closed", 1000)
        .unwrap();
    // A reader while the writer is open shares the page cache (not passthrough): coherent.
    let mut r = fs::File::open(c.at("f")).unwrap();
    let mut all = Vec::new();
    r.read_to_end(&mut all).unwrap();
    assert_eq!(&all[1000..1032], b"written after the readers closed");
    drop(r);
    drop(w);
    c.finish();
}

#[test]
fn concurrent_passthrough_readers_and_a_writer() {
    let mut c = cluster("pt-concurrent");
    let size = 64 * 1024;
    fs::write(c.at("v"), vec![0u8; size]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (p, stop, reads) = (c.at("v"), stop.clone(), reads.clone());
            thread::spawn(move || {
                let mut buf = vec![0u8; size];
                for _ in 0..5000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let mut f = fs::File::open(&p).unwrap();
                    f.read_exact(&mut buf).unwrap();
                    reads.fetch_add(1, Ordering::Relaxed);
                    drop(f);
                    thread::sleep(Duration::from_micros(200));
                }
            })
        })
        .collect();
    let mut written = 0u8;
    let mut busy = 0;
    for v in 1..=40u8 {
        match OpenOptions::new().write(true).open(c.at("v")) {
            Ok(mut f) => {
                f.write_all(&vec![v; size]).unwrap();
                written = v;
            }
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => busy += 1,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("writable open: {e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    eprintln!(
        "{} passthrough reads; {} of 40 writes done, {busy} refused with ETXTBSY",
        reads.load(Ordering::Relaxed),
        written
    );
    assert!(written > 0, "every writable open was refused");
    // What the readers see now is the last write, on the master and the replica.
    let mut f = fs::File::open(c.at("v")).unwrap();
    let mut now = Vec::new();
    f.read_to_end(&mut now).unwrap();
    assert_eq!(now, vec![written; size]);
    drop(f);
    c.finish();
    assert_eq!(
        fs::read(c.replica(0).join("v")).unwrap(),
        vec![written; size]
    );
}

#[test]
fn passthrough_file_replaced_by_rename_is_never_blocked() {
    let mut c = cluster("pt-rename");
    fs::write(c.at("page.html"), b"v1").unwrap();
    let held = fs::File::open(c.at("page.html")).unwrap();
    // The web-farm pattern: write a temp file, rename it over the one being served.
    for i in 2..50 {
        let tmp = c.at(".page.tmp");
        let mut f = fs::File::create(&tmp).unwrap();
        write!(f, "v{i}").unwrap();
        drop(f);
        fs::rename(&tmp, c.at("page.html")).unwrap();
    }
    drop(held);
    assert_eq!(fs::read(c.at("page.html")).unwrap(), b"v49");
    c.finish();
}
