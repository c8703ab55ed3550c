//! The shared secret behind `--secret-file`.

use std::fmt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Shortest secret accepted: anything shorter is guessable offline from one recorded exchange.
pub const MIN_SECRET_LEN: usize = 16;

/// The bytes of a secret file (trailing whitespace, e.g. the newline `echo` adds, removed).
/// Never printed: `Debug` shows only its length.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
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
        Ok(Secret(b))
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
}
