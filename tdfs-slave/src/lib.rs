//! tdfs slave: receives a master's ordered stream of mutations over TCP and applies them
//! beneath its own mirrored directory.
//!
//! - [`listener`]: accepting connections, one master at a time.
//! - [`readonly`]: read-only sessions of `tdfs verify` (listings and digests).
//! - [`session`]: framing, handshake, ordering and acknowledgements.
//! - [`apply`]: one op into syscalls beneath the root.
//! - [`config`], [`control`]: the config file; status and metrics of a running slave.
//! - [`confine`]: resolving paths without ever leaving the root; the replica's tree as the
//!   replication engine reads it.

//! - [`stash`]: what a diverged replica held of its own, kept before a sync overwrites it.
//! - [`stats`]: counters for `tdfs-slave status` and metrics.
//!
//! What both daemons share (security, the log and links, inspection of trees, operations
//! plumbing) is the replication engine, `tdfs-replication`.

pub mod apply;
pub mod config;
pub mod confine;
pub mod control;
pub mod listener;
pub mod readonly;
pub mod session;
pub mod stash;

pub mod stats;

#[cfg(test)]
mod tests;
