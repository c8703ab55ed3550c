//! Connection security shared by the tdfs master and slave:
//!
//! - [`secret`]: loading the shared secret (`--secret-file`), refusing files others can read;
//! - [`handshake`]: the HMAC challenge-response of [`tdfs_protocol::auth`] over a stream,
//!   for both sides;
//! - [`tls`]: rustls configurations with client certificates on both sides (`--tls-cert`,
//!   `--tls-key`, `--tls-ca`);
//! - [`allow`]: the slave's `--allow HOST/CIDR` list.

pub mod allow;
pub mod handshake;
pub mod secret;
pub mod tls;

pub use allow::AllowList;
pub use handshake::AuthError;
pub use secret::Secret;
pub use tls::TlsFiles;

#[cfg(test)]
mod tests;
