//! The tdfs replication engine, shared by both daemons.
//!
//! Whatever feeds replicas runs on this: the master (fed by its FUSE mount) and a relaying
//! slave (fed by what it applies from its own upstream). And whatever a replica needs
//! beyond applying ops is here too.
//!
//! - [`node`]: a node's place in its replica set (history of epochs, role, fencing), kept
//!   in its state directory for both roles.
//! - [`position`]: a replica's position (last applied op, sync and stash flags), recorded
//!   per op in a mapped page.
//! - [`repl`]: the ordered log (memory, then the on-disk journal), one link per downstream
//!   node (connect with backoff, handshake, resume or incremental sync, stream, acks), the
//!   catch-up sync, the persistent state of a feeding node, status snapshots.
//! - [`tree`], [`inspect`], [`flags`], [`fsio`]: reading a tree the way a mirror compares
//!   it (listings, entries, digests, inode flags), on file descriptors; how a path becomes
//!   one is each daemon's business.
//! - [`security`], [`outbound`], [`accept`]: shared-secret authentication, TLS and address
//!   allow-lists, for the connecting and the accepting side.
//! - [`daemon`], [`config`]: what running a daemon takes: log levels that SIGHUP changes, the
//!   Unix control socket, the Prometheus endpoint, latency histograms, systemd readiness,
//!   config-file helpers.

pub mod accept;
pub mod config;
pub mod conn;
pub mod daemon;
pub mod feeds;
pub mod flags;
pub mod fsio;
pub mod inspect;
pub mod node;
pub mod outbound;
pub mod position;
pub mod repl;
pub mod security;
pub mod tree;
