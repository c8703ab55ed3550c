//! The master's metrics: FUSE ops by type with latency histograms (timed in `fs.rs` with
//! lock-free atomics), and replication per slave, read from [`Replicator::status`] at each
//! scrape.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use tdfs_replication::daemon::histogram::Histogram;
use tdfs_replication::daemon::http::{self, Labels};

use tdfs_replication::feeds::Rates;
use tdfs_replication::repl::Replicator;

macro_rules! fuse_ops {
    ($($v:ident => $n:literal),* $(,)?) => {
        /// The FUSE requests that are timed.
        #[derive(Debug, Clone, Copy)]
        pub enum FuseOp { $($v),* }
        /// Their names, as the `op` label.
        const FUSE_OPS: &[&str] = &[$($n),*];
    };
}

fuse_ops! {
    Lookup => "lookup", Forget => "forget", Getattr => "getattr", Setattr => "setattr",
    Readlink => "readlink", Mknod => "mknod", Mkdir => "mkdir", Unlink => "unlink",
    Rmdir => "rmdir", Symlink => "symlink", Rename => "rename", Link => "link",
    Open => "open", Read => "read", Write => "write", Flush => "flush",
    Release => "release", Fsync => "fsync", Opendir => "opendir", Readdir => "readdir",
    Readdirplus => "readdirplus", Releasedir => "releasedir", Fsyncdir => "fsyncdir",
    Statfs => "statfs",
    Setxattr => "setxattr", Getxattr => "getxattr", Listxattr => "listxattr",
    Removexattr => "removexattr", Access => "access", Create => "create",
    Fallocate => "fallocate", Lseek => "lseek", CopyFileRange => "copy_file_range",
    Ioctl => "ioctl",
}

/// One histogram per FUSE op type.
#[derive(Debug)]
pub struct FuseMetrics {
    ops: Box<[Histogram]>,
}

impl Default for FuseMetrics {
    fn default() -> Self {
        FuseMetrics {
            ops: FUSE_OPS.iter().map(|_| Histogram::default()).collect(),
        }
    }
}

/// Records the time from its creation to its drop.
pub struct Timer<'a> {
    h: &'a Histogram,
    t0: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.h.observe_since(self.t0);
    }
}

/// The FUSE timings of this process (a static, so the FUSE adapter needs no plumbing).
pub static FUSE: std::sync::LazyLock<FuseMetrics> = std::sync::LazyLock::new(FuseMetrics::default);

/// Times one FUSE request (until the returned guard drops): an `Instant::now()` and three
/// relaxed atomic adds.
#[inline]
pub fn time(op: FuseOp) -> Timer<'static> {
    Timer {
        h: &FUSE.ops[op as usize],
        t0: Instant::now(),
    }
}

/// Everything the master exports.
pub struct MasterMetrics {
    pub repl: Replicator,
    pub rates: Arc<Rates>,
}

impl std::fmt::Debug for MasterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("master metrics")
    }
}

impl Collector for MasterMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let fuse: Vec<(Labels, &Histogram)> = FUSE_OPS
            .iter()
            .zip(FUSE.ops.iter())
            .filter(|(_, h)| h.count() > 0)
            .map(|(n, h)| (vec![("op", n.to_string())], h))
            .collect();
        http::histograms(
            &mut enc,
            "tdfs_fuse_op_duration_seconds",
            "FUSE requests by type: time from request to reply, seconds",
            &fuse,
        )?;
        let st = self.repl.status();
        let none = Vec::new;
        http::gauges(
            &mut enc,
            "tdfs_head_seq",
            "Sequence number the next replicated op gets",
            &[(none(), st.head as f64)],
        )?;
        http::gauges(
            &mut enc,
            "tdfs_epoch",
            "The epoch this master writes in (a promotion starts a higher one)",
            &[(none(), st.history.last().map_or(0.0, |e| e.number as f64))],
        )?;
        http::gauges(
            &mut enc,
            "tdfs_fenced",
            "1 when a replica has seen a newer epoch: this master was replaced; writes fail",
            &[(none(), st.fence.is_some() as u8 as f64)],
        )?;
        if let Some(l) = st.lease_left {
            http::gauges(
                &mut enc,
                "tdfs_lease_seconds",
                "Time left on the write lease (0 or less: writes fail)",
                &[(none(), l)],
            )?;
        }
        http::gauges(
            &mut enc,
            "tdfs_queue_bytes",
            "Bytes of ops held in memory for slaves that have not acknowledged them",
            &[(none(), st.queue_bytes as f64)],
        )?;
        http::gauges(
            &mut enc,
            "tdfs_journal_bytes",
            "Bytes of ops in the on-disk journal (for lagging or absent slaves)",
            &[(none(), st.journal_bytes as f64)],
        )?;
        tdfs_replication::feeds::encode_metrics(&mut enc, "tdfs_slave", &st, &self.rates)?;
        Ok(())
    }
}
