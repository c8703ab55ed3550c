//! tdfs slave: receives a master's ordered stream of mutations over TCP and applies them
//! beneath its own mirrored directory.
//!
//! - [`listener`]: accepting connections, one master at a time.
//! - [`readonly`]: read-only sessions of `tdfs verify` (listings and digests).
//! - [`security`]: shared-secret authentication, TLS and address allow-lists (used by the
//!   master too).
//! - [`session`]: framing, handshake, ordering and acknowledgements.
//! - [`apply`]: one op into syscalls beneath the root.
//! - [`config`], [`control`]: the config file; status and metrics of a running slave.
//! - [`confine`]: resolving paths without ever leaving the root.
//! - [`flags`]: inode flags (`chattr`) and project ids.
//! - [`daemon`]: log levels, control socket, metrics endpoint (used by the master too).
//! - [`inspect`]: listings and digests for sync and verify (used by the master too).
//! - [`transport`]: `--allow`, TLS and shared-secret authentication before a session.
//! - [`state`]: which master and sequence number the tree reflects.
//! - [`stats`]: counters for `tdfs-slave status` and metrics.

pub mod apply;
pub mod config;
pub mod confine;
pub mod control;
pub mod daemon;
pub mod flags;
pub mod inspect;
pub mod listener;
pub mod readonly;
pub mod security;
pub mod session;
pub mod state;
pub mod stats;
pub mod transport;

#[cfg(test)]
mod tests;
