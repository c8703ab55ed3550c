//! The state file: which master the slave follows and the last sequence number it applied.
//!
//! One small fixed-size record at offset 0, rewritten with a single `pwrite` after every
//! applied batch (cheap: no fsync) and fsynced on durability barriers and at shutdown. A
//! crc32 lets a torn or foreign file be detected and treated as "nothing applied" instead of
//! being trusted.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tdfs_protocol::msg::MasterId;

const MAGIC: [u8; 8] = *b"TDFSSLV1";
/// magic, master id, last applied seq, crc32 of the preceding bytes.
pub const RECORD_LEN: usize = 8 + 16 + 8 + 4;

pub const STATE_FILE: &str = "state";
pub const LOCK_FILE: &str = "lock";

/// The state record lives in two slots of a page of the state file, mapped shared: recording
/// the applied sequence number after every op is a memory store (no syscall), survives the
/// process being killed (the page cache keeps it), and a store torn by a kill corrupts only the
/// slot being written, leaving the other (one op older) valid.
const SLOTS: usize = 2;
const MAP_LEN: usize = 4096;

pub struct State {
    file: File,
    /// Held for the life of the process: the flock on it keeps a second slave out.
    _lock: File,
    map: *mut u8,
    pub master: MasterId,
    pub applied: u64,
    /// The op after `applied` may already have taken effect (applied but not yet recorded
    /// when a previous process ended): replaying it must tolerate "already done" errors.
    replay: Option<u64>,
}

// SAFETY: the mapping is owned by State and only touched through &mut self (or &self for
// msync), so moving State between threads is sound.
unsafe impl Send for State {}

impl Drop for State {
    fn drop(&mut self) {
        // SAFETY: map came from a successful mmap of MAP_LEN bytes and is unmapped once.
        unsafe { libc::munmap(self.map.cast(), MAP_LEN) };
    }
}

fn encode(master: &MasterId, applied: u64) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0..8].copy_from_slice(&MAGIC);
    r[8..24].copy_from_slice(master);
    r[24..32].copy_from_slice(&applied.to_le_bytes());
    let crc = crc32fast::hash(&r[..32]);
    r[32..36].copy_from_slice(&crc.to_le_bytes());
    r
}

fn decode(r: &[u8]) -> Option<(MasterId, u64)> {
    if r.len() < RECORD_LEN || r[0..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(r[32..36].try_into().ok()?);
    if crc != crc32fast::hash(&r[..32]) {
        return None;
    }
    let master: MasterId = r[8..24].try_into().ok()?;
    let applied = u64::from_le_bytes(r[24..32].try_into().ok()?);
    Some((master, applied))
}

/// The default state directory for a mirrored tree: one per canonical path, so that two
/// slaves of different trees on one host never share state.
/// Opens (creating if needed, never truncating) a file only the owner may use.
fn open_private(p: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(p)
}

pub fn default_dir(canonical_root: &Path) -> PathBuf {
    let name: String = canonical_root
        .to_string_lossy()
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    Path::new("/var/lib/tdfs-slave").join(name)
}

/// Canonicalizes as much of `p` as exists and appends the rest, so a not-yet-created state
/// dir can be compared with the root before anything is created.
fn canonical_prefix(p: &Path) -> io::Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        match cur.canonicalize() {
            Ok(mut c) => {
                for part in rest.iter().rev() {
                    c.push(part);
                }
                return Ok(c);
            }
            Err(_) => match (cur.parent(), cur.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_owned());
                    cur = parent;
                }
                _ => return Ok(abs),
            },
        }
    }
}

impl State {
    /// Creates (0700) and locks the state dir, and loads the record.
    pub fn open(dir: &Path, canonical_root: &Path) -> anyhow::Result<State> {
        let inside = |d: &Path| d.starts_with(canonical_root);
        if inside(&canonical_prefix(dir)?) {
            bail!(
                "state dir {} lies inside the mirrored directory {}; choose another with --state-dir",
                dir.display(),
                canonical_root.display()
            );
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating state dir {}", dir.display()))?;
        let canon = dir.canonicalize()?;
        if inside(&canon) {
            bail!(
                "state dir {} lies inside the mirrored directory {}",
                canon.display(),
                canonical_root.display()
            );
        }
        let lock = open_private(&dir.join(LOCK_FILE))
            .with_context(|| format!("opening lock file in {}", dir.display()))?;
        // SAFETY: plain syscall on a live fd.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!(
                    "state dir {} is in use by another tdfs-slave (lock held on {})",
                    dir.display(),
                    dir.join(LOCK_FILE).display()
                );
            }
            return Err(e).context("locking the state dir");
        }
        let file = open_private(&dir.join(STATE_FILE))
            .with_context(|| format!("opening state file in {}", dir.display()))?;
        let mut buf = [0u8; RECORD_LEN * SLOTS];
        let n = file.read_at(&mut buf, 0)?;
        let best = buf[..n]
            .chunks(RECORD_LEN)
            .filter_map(decode)
            .max_by_key(|(_, applied)| *applied);
        if file.metadata()?.len() < MAP_LEN as u64 {
            file.set_len(MAP_LEN as u64)?;
        }
        // SAFETY: mapping MAP_LEN bytes of a file at least that long, shared and writable;
        // the result is checked against MAP_FAILED before use.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAP_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()).context("mapping the state file");
        }
        let map = map.cast::<u8>();
        let (master, applied) = match best {
            Some(v) => v,
            None => {
                if n > 0 && buf[..n].iter().any(|&b| b != 0) {
                    tracing::warn!(
                        "state file {} is unreadable or corrupt; starting as if nothing was applied",
                        dir.join(STATE_FILE).display()
                    );
                }
                ([0u8; 16], 0)
            }
        };
        Ok(State {
            file,
            _lock: lock,
            map,
            master,
            applied,
            replay: (applied > 0).then(|| applied + 1),
        })
    }

    /// Records that every op up to `applied` from `master` has taken effect; durable only
    /// after [`State::sync`], but safe against the process being killed at once.
    pub fn record(&mut self, master: MasterId, applied: u64) -> io::Result<()> {
        if master == self.master && applied == self.applied {
            return Ok(());
        }
        let rec = encode(&master, applied);
        let slot = (applied as usize) % SLOTS;
        // SAFETY: the slot lies within the MAP_LEN-byte mapping; nothing else aliases it.
        unsafe {
            std::ptr::copy_nonoverlapping(rec.as_ptr(), self.map.add(slot * RECORD_LEN), RECORD_LEN)
        };
        if master != self.master {
            self.replay = None;
        }
        self.master = master;
        self.applied = applied;
        Ok(())
    }

    /// True (once) when `seq` is the op a previous process may have applied without
    /// recording it.
    pub fn is_replay(&mut self, master: &MasterId, seq: u64) -> bool {
        let r = self.replay == Some(seq) && *master == self.master;
        if self.replay.is_some_and(|s| seq >= s) {
            self.replay = None;
        }
        r
    }

    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: msync of our own mapping; then the file's data is made durable.
        if unsafe { libc::msync(self.map.cast(), MAP_LEN, libc::MS_SYNC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip_and_lock() {
        let root = tempfile::tempdir_in("/tmp").unwrap();
        let sd = tempfile::tempdir_in("/tmp").unwrap();
        let croot = root.path().canonicalize().unwrap();
        let dir = sd.path().join("st");
        {
            let mut s = State::open(&dir, &croot).unwrap();
            assert_eq!((s.master, s.applied), ([0; 16], 0));
            s.record([7; 16], 42).unwrap();
            s.sync().unwrap();
            let err = State::open(&dir, &croot).err().unwrap().to_string();
            assert!(err.contains("in use"), "{err}");
        }
        let s = State::open(&dir, &croot).unwrap();
        assert_eq!((s.master, s.applied), ([7; 16], 42));
        assert!(State::open(&croot.join("x/y"), &croot).is_err());
        assert!(!croot.join("x").exists());
        // A corrupt record reads as nothing applied.
        drop(s);
        std::fs::write(dir.join(STATE_FILE), [1u8; RECORD_LEN]).unwrap();
        let s = State::open(&dir, &croot).unwrap();
        assert_eq!(s.applied, 0);
        assert_eq!(
            default_dir(Path::new("/srv/www")),
            Path::new("/var/lib/tdfs-slave/_srv_www")
        );
    }
}
