//! The shared secret behind `--secret-file`.

use std::fmt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tdfs_protocol::auth::{self, KeyId, MAX_SECRETS};

/// Shortest secret accepted: anything shorter is guessable offline from one recorded exchange.
pub const MIN_SECRET_LEN: usize = 16;

/// The bytes of a secret file (trailing whitespace, e.g. the newline `echo` adds, removed).
/// Never printed: `Debug` shows only its length and key id.
#[derive(Clone)]
pub struct Secret(Vec<u8>, KeyId);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes, id {})", self.0.len(), self.id())
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.1 == other.1
    }
}

impl Secret {
    pub fn from_bytes(mut b: Vec<u8>) -> Result<Self, String> {
        while b.last().is_some_and(|c| c.is_ascii_whitespace()) {
            b.pop();
        }
        if b.len() < MIN_SECRET_LEN {
            return Err(format!(
                "the secret must be at least {MIN_SECRET_LEN} bytes (it is {}); \
                 make one with `head -c 32 /dev/urandom | base64 > FILE`",
                b.len()
            ));
        }
        let id = auth::key_id(&b);
        Ok(Secret(b, id))
    }

    /// Reads a secret file. Refuses a file whose mode lets its group or others read or write
    /// it, with a message saying how to fix that.
    pub fn load(path: &Path) -> Result<Self, String> {
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| format!("secret file {shown}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("secret file {shown} is not a regular file"));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "secret file {shown} is accessible by group or others (mode {mode:04o}); \
                 refusing to use it: run `chmod 600 {shown}` (owner uid {})",
                meta.uid()
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("secret file {shown}: {e}"))?;
        Self::from_bytes(bytes).map_err(|e| format!("secret file {shown}: {e}"))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The secret's public name (see [`auth::key_id`]).
    pub fn key_id(&self) -> KeyId {
        self.1
    }

    /// The key id as logs show it.
    pub fn id(&self) -> String {
        auth::show_key_id(&self.1)
    }

    /// Loads every `--secret-file`: at most [`MAX_SECRETS`] (the current one and, during a
    /// rotation, the next or the previous one), all different.
    pub fn load_all(paths: &[PathBuf]) -> Result<Vec<Secret>, String> {
        if paths.len() > MAX_SECRETS {
            return Err(format!(
                "{} secret files given; at most {MAX_SECRETS} (the current secret and, during a \
                 rotation, one more)",
                paths.len()
            ));
        }
        let all = paths
            .iter()
            .map(|p| Self::load(p))
            .collect::<Result<Vec<_>, _>>()?;
        if all.len() == 2 && all[0] == all[1] {
            return Err(format!(
                "secret files {} and {} hold the same secret",
                paths[0].display(),
                paths[1].display()
            ));
        }
        Ok(all)
    }
}

/// The key ids of `secrets`, for a log line.
pub fn describe(secrets: &[Secret]) -> String {
    secrets
        .iter()
        .map(Secret::id)
        .collect::<Vec<_>>()
        .join(", ")
}
