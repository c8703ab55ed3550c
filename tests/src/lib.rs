//! Harness for the tdfs end-to-end tests: real FUSE mounts, real slaves on loopback, and a
//! tree comparator strict enough to fail.
//!
//! * [`compare`]: `compare_trees`, `assert_identical`, `wait_identical`.
//! * [`daemons`]: [`Slave`] and [`Master`] child processes (logs captured to files).
//! * [`cluster`]: a master with N slaves in fresh temp dirs, and `finish()` that unmounts,
//!   waits for the master to exit 0 and compares every replica with the backing dir.
//! * [`proxy`]: a fault-injecting TCP proxy (drop, stall, truncate, flip bytes, refuse) to
//!   put between a master and a slave.
//! * [`pki`]: a throwaway CA and certificates for TLS tests.
//! * [`netns`]: test hosts in network namespaces joined by a bridge, to cut one off.
//! * [`writer`]: a bounded writer thread that keeps changing a tree through a mount.
//! * [`util`]: binaries, root/FUSE checks, polling with deadlines, small syscall wrappers.

pub mod cluster;
pub mod compare;
pub mod daemons;
pub mod etcd;
pub mod netns;
pub mod pki;
pub mod proxy;
pub mod util;
pub mod writer;

pub use cluster::{Cluster, ClusterOpts, SlaveOpts};
pub use compare::{
    assert_identical, assert_same_content, compare_trees, compare_trees_with, try_wait_identical,
    wait_identical, CompareOpts, Diff,
};
pub use daemons::{Master, MasterOpts, Slave, SlaveAddr, SlaveLaunch};
pub use proxy::Proxy;
pub use util::{bin, require_root_and_fuse, temp_dir, wait_until};
