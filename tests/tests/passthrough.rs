//! Kernel FUSE passthrough for read-only opens (the default): reads bypass the daemon,
//! writes never do, and the replica stays exact under concurrent readers and writers, even
//! for a writer's shared mmap (which the kernel maps to the backing file).

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tdfs_tests::cluster::Cluster;
use tdfs_tests::util::{pseudo_random, wait_log, wait_until, SharedMap};

fn cluster(name: &str) -> Cluster {
    let c = Cluster::single(name);
    wait_log(
        "master",
        Duration::from_secs(10),
        || c.master.log_text(),
        "kernel FUSE passthrough on",
    );
    // fsync waits for the slaves in sync: the tests that check a replica right after one
    // need the slave in sync first (on a loaded box its first sync may still be running
    // when the mount appears).
    wait_log(
        "master",
        Duration::from_secs(30),
        || c.master.log_text(),
        "slave is in sync",
    );
    c
}

#[test]
fn writer_beside_passthrough_readers_is_replicated() {
    let mut c = cluster("pt-writer");
    fs::write(c.at("f"), pseudo_random(1, 100_000)).unwrap();
    let reader = fs::File::open(c.at("f")).unwrap();
    let mut head = [0u8; 16];
    reader.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head[..], &pseudo_random(1, 100_000)[..16]);
    // A writer shares the inode with the passthrough reader (FOPEN_DIRECT_IO): it opens at
    // once, and its write goes through the daemon (replicated).
    let w = OpenOptions::new()
        .read(true)
        .write(true)
        .open(c.at("f"))
        .expect("writable open while a passthrough reader holds the file");
    w.write_all_at(b"written beside a passthrough reader", 1000)
        .unwrap();
    // The reader (reading the backing file) sees it at once, and so does the writer's read.
    let mut got = [0u8; 35];
    reader.read_exact_at(&mut got, 1000).unwrap();
    assert_eq!(&got, b"written beside a passthrough reader");
    w.read_exact_at(&mut got, 1000).unwrap();
    assert_eq!(&got, b"written beside a passthrough reader");
    // A new reader while both are open joins the passthrough backing file: coherent too.
    let mut all = Vec::new();
    fs::File::open(c.at("f"))
        .unwrap()
        .read_to_end(&mut all)
        .unwrap();
    assert_eq!(&all[1000..1035], b"written beside a passthrough reader");
    drop(w);
    drop(reader);
    // Readers gone: a writer gets the ordinary page-cached open.
    let w = OpenOptions::new().write(true).open(c.at("f")).unwrap();
    w.write_all_at(b"and after the readers closed", 5000)
        .unwrap();
    drop(w);
    let master = fs::read(c.at("f")).unwrap();
    assert_eq!(&master[5000..5028], b"and after the readers closed");
    c.finish();
    assert_eq!(fs::read(c.replica(0).join("f")).unwrap(), master);
}

/// The one way around the daemon the kernel leaves a writer that shares the readers'
/// backing file: a shared mapping. The daemon notices the file changed behind its back
/// (ctime) when that writer closes, and sends the content.
#[test]
fn shared_mmap_beside_passthrough_readers_is_replicated() {
    let mut c = cluster("pt-mmap");
    let size = 3 * 1024 * 1024 + 123;
    fs::write(c.at("m"), pseudo_random(2, size)).unwrap();
    let reader = fs::File::open(c.at("m")).unwrap();
    let mut b = [0u8; 1];
    reader.read_exact_at(&mut b, 0).unwrap();
    let w = OpenOptions::new()
        .read(true)
        .write(true)
        .open(c.at("m"))
        .unwrap();
    let replica = c.replica(0).join("m");
    let mut map = SharedMap::new(&w, size);
    let s = map.bytes();
    s[10..20].copy_from_slice(b"first one!");
    // fsync of that writer is a replication barrier for its mapping too.
    w.sync_all().unwrap();
    let r = fs::read(&replica).unwrap();
    assert_eq!(
        &r[10..20],
        b"first one!",
        "fsync returned before the replica had it"
    );
    // The same page again: it must fault again (and so be noticed) after the resend.
    s[10..20].copy_from_slice(b"via mmap!!");
    s[size - 5..].copy_from_slice(b"tail!");
    map.unmap();
    drop(w);
    drop(reader);
    let master = fs::read(c.at("m")).unwrap();
    assert_eq!(&master[10..20], b"via mmap!!");
    assert_eq!(&master[size - 5..], b"tail!");
    // The writer's release reaches the daemon asynchronously after close().
    assert!(
        wait_until(Duration::from_secs(20), || fs::read(&replica)
            .is_ok_and(|r| r == master)),
        "the replica never got the stores made through the shared mapping"
    );
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
    for v in 1..=40u8 {
        let mut f = OpenOptions::new()
            .write(true)
            .open(c.at("v"))
            .unwrap_or_else(|e| panic!("writable open beside passthrough readers: {e}"));
        f.write_all(&vec![v; size]).unwrap();
        written = v;
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    eprintln!("{} passthrough reads", reads.load(Ordering::Relaxed));
    assert!(
        reads.load(Ordering::Relaxed) > 0,
        "no reader ran beside the writer"
    );
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

/// A write-only open made first gets direct I/O (no FUSE page cache), and readers opened
/// beside it join that mode: every read(), and a reader's shared mapping, sees each write
/// the moment it returns; nothing stale is cached for later readers.
#[test]
fn readers_beside_a_direct_writer_see_every_write() {
    let mut c = cluster("direct-coherent");
    let size = 64 * 1024;
    fs::write(c.at("d"), vec![0u8; size]).unwrap();
    let w = OpenOptions::new().write(true).open(c.at("d")).unwrap();
    let r = fs::File::open(c.at("d")).unwrap();
    let map = SharedMap::new_read_only(&r, size);
    let mut buf = vec![0u8; size];
    for v in 1..=40u8 {
        w.write_all_at(&vec![v; size], 0).unwrap();
        r.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == v), "read() stale after write {v}");
        assert!(
            [0, size / 2, size - 1].iter().all(|&i| map.byte(i) == v),
            "the reader's mapping is stale after write {v}"
        );
        // A reader opened now, beside the writer, reads what was just written too.
        assert_eq!(
            fs::read(c.at("d")).unwrap(),
            vec![v; size],
            "new reader, write {v}"
        );
    }
    drop(map);
    drop(r);
    drop(w);
    // With the writer gone a reader passes through again; it still sees the last write.
    assert_eq!(fs::read(c.at("d")).unwrap(), vec![40u8; size]);
    c.finish();
    assert_eq!(fs::read(c.replica(0).join("d")).unwrap(), vec![40u8; size]);
}

/// A read-write open beside a write-only one joins its direct I/O, and may still map the
/// file shared (FUSE_DIRECT_IO_ALLOW_MMAP): its stores reach the daemon by writeback, so
/// they are replicated, and a reader that opens while the mapping lives reads them (a
/// direct read writes dirty pages back first).
#[test]
fn shared_mmap_of_a_direct_writer_is_replicated() {
    let mut c = cluster("direct-mmap");
    let size = 2 * 1024 * 1024 + 77;
    fs::write(c.at("m"), pseudo_random(3, size)).unwrap();
    let first = OpenOptions::new().write(true).open(c.at("m")).unwrap();
    let w = OpenOptions::new()
        .read(true)
        .write(true)
        .open(c.at("m"))
        .unwrap();
    let mut map = SharedMap::new(&w, size);
    let s = map.bytes();
    s[100..110].copy_from_slice(b"mapped in!");
    s[size - 4..].copy_from_slice(b"end!");
    // A reader opened beside the live mapping: the open succeeds and the read sees it.
    let r = fs::File::open(c.at("m")).expect("read-only open beside a writer's mapping");
    let mut got = [0u8; 10];
    r.read_exact_at(&mut got, 100).unwrap();
    assert_eq!(&got, b"mapped in!");
    w.sync_all().unwrap();
    assert_eq!(
        &fs::read(c.replica(0).join("m")).unwrap()[100..110],
        b"mapped in!",
        "fsync returned before the replica had the mapped store"
    );
    map.unmap();
    drop(r);
    drop(w);
    drop(first);
    let master = fs::read(c.at("m")).unwrap();
    assert_eq!(&master[size - 4..], b"end!");
    c.finish();
    assert_eq!(fs::read(c.replica(0).join("m")).unwrap(), master);
}

/// Under concurrency: readers that open and read while a direct-I/O writer rewrites the
/// file never see a version older than the last write that had returned when their read
/// began (versions only grow, so every byte must be at least that one).
#[test]
fn concurrent_readers_beside_a_direct_writer_never_read_stale() {
    let mut c = cluster("direct-concurrent");
    let size = 128 * 1024;
    fs::write(c.at("v"), vec![0u8; size]).unwrap();
    let w = OpenOptions::new().write(true).open(c.at("v")).unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|k| {
            let (p, done, stop) = (c.at("v"), done.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = vec![0u8; size];
                let mut reads = 0u32;
                // A long-lived reader for one thread, a fresh open per read for the others.
                let held = (k == 0).then(|| fs::File::open(&p).unwrap());
                while !stop.load(Ordering::Acquire) && reads < 20_000 {
                    let before = done.load(Ordering::Acquire) as u8;
                    let fresh;
                    let f = match &held {
                        Some(f) => f,
                        None => {
                            fresh = fs::File::open(&p).unwrap();
                            &fresh
                        }
                    };
                    f.read_exact_at(&mut buf, 0).unwrap();
                    if let Some(i) = buf.iter().position(|&b| b < before) {
                        panic!("reader {k}: byte {i} is {} after write {before}", buf[i]);
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for v in 1..=200u8 {
        w.write_all_at(&vec![v; size], 0).unwrap();
        done.store(v as u64, Ordering::Release);
    }
    stop.store(true, Ordering::Release);
    let reads: Vec<u32> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    eprintln!("reads per reader: {reads:?}");
    assert!(
        reads.iter().all(|&n| n > 0),
        "a reader never ran: {reads:?}"
    );
    drop(w);
    c.finish();
    assert_eq!(fs::read(c.replica(0).join("v")).unwrap(), vec![200u8; size]);
}

/// A read-write open made first (a database's) keeps the page cache: what it reads back is
/// served by the kernel, and writers and readers opened beside it share that cache, so
/// they stay coherent with it, on the master and the replica.
#[test]
fn read_write_open_keeps_the_page_cache_coherent() {
    let mut c = cluster("rw-cached");
    let size = 256 * 1024;
    fs::write(c.at("db"), vec![0u8; size]).unwrap();
    let db = OpenOptions::new()
        .read(true)
        .write(true)
        .open(c.at("db"))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    for v in 1..=30u8 {
        let off = (v as u64 * 7919 % 60) * 4096;
        db.write_all_at(&[v; 4096], off).unwrap();
        db.read_exact_at(&mut buf, off).unwrap();
        assert!(buf.iter().all(|&b| b == v), "read-back of page write {v}");
        // A write-only open beside it joins the cache; the database reads its write.
        let w = OpenOptions::new().write(true).open(c.at("db")).unwrap();
        w.write_all_at(&[v; 100], 4096 * 63).unwrap();
        drop(w);
        db.read_exact_at(&mut buf[..100], 4096 * 63).unwrap();
        assert_eq!(&buf[..100], &[v; 100][..], "write-only open's write {v}");
        // So does a reader.
        let r = fs::File::open(c.at("db")).unwrap();
        r.read_exact_at(&mut buf, off).unwrap();
        assert!(buf.iter().all(|&b| b == v), "reader beside it, write {v}");
    }
    drop(db);
    let master = fs::read(c.at("db")).unwrap();
    c.finish();
    assert_eq!(fs::read(c.replica(0).join("db")).unwrap(), master);
}
