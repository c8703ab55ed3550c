//! `tdfs node`: automatic failover. One supervisor per node of a replica set holds (or waits
//! for) the cluster's leader lease in etcd. The node holding it runs the master (`tdfs`,
//! mounted at the same path on every node); the others run `tdfs-slave` and are its
//! replicas. When the leader's lease expires, the most up-to-date live replica takes it with
//! an etcd transaction and promotes itself through `tdfs promote` (a new epoch: the old
//! master is fenced by it wherever it turns up).
//!
//! The supervisor is a process of its own that starts the daemons as child processes (found
//! next to its own executable), talks to them through their control sockets, and never links
//! either daemon in: a bug in one cannot take the other down, and neither daemon crate
//! depends on the other.
//!
//! - [`etcd`]: the etcd calls (session lease, renewal, the leader transaction), each bounded.
//! - [`member`]: keys, positions, the election rule.
//! - [`supervisor`]: the loop that drives the local daemon.
//! - [`status`]: the cluster view for `tdfs status` and the metrics.

pub mod etcd;
pub mod member;
pub mod status;
pub mod supervisor;

pub use status::{format_cluster, NODE_SOCKET};
pub use supervisor::{node_main, NodeCli};
