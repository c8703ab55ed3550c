//! The replica's position: the last sequence number it applied, and whether a sync into it
//! is under way (its position then means nothing until the sync ends) or it diverged (it is
//! being stashed and synced). Its history of epochs lives beside it in `node.state`, shared
//! with the master role ([`crate::node`]).
//!
//! One small fixed-size record at offset 0, rewritten after every applied op (a store into a
//! shared mapping: no syscall) and fsynced on durability barriers, at the start of a sync and
//! at shutdown. A crc32 lets a torn or foreign record be detected and treated as "nothing
//! applied" instead of being trusted.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::node::{NodeState, Role};
use anyhow::{bail, Context};
use tdfs_protocol::msg::ack_flags;
use tdfs_protocol::History;

const MAGIC: [u8; 8] = *b"TDFSSLV2";
/// Records before histories: magic, master id, last applied seq, crc32.
const MAGIC_V1: [u8; 8] = *b"TDFSSLV1";
/// magic, replica set id, last applied seq, flags, crc32 of the preceding bytes.
pub const RECORD_LEN: usize = 8 + 16 + 8 + 4 + 4;

pub const STATE_FILE: &str = "state";

/// The state record lives in two slots of a page of the state file, mapped shared: recording
/// the applied sequence number after every op is a memory store (no syscall), survives the
/// process being killed (the page cache keeps it), and a store torn by a kill corrupts only the
/// slot being written, leaving the other (one op older) valid.
const SLOTS: usize = 2;
const MAP_LEN: usize = 4096;

pub struct State {
    file: File,
    map: *mut u8,
    /// The replica set this tree belongs to (its history's first epoch; zero: none yet).
    pub set: [u8; 16],
    pub applied: u64,
    /// [`ack_flags`]: SYNCING, STASHING, BEYOND_KNOWN.
    pub flags: u8,
    /// The op after `applied` may already have taken effect (applied but not yet recorded
    /// when a previous process ended): replaying it must tolerate "already done" errors.
    replay: Option<u64>,
    /// Bumped by every store, so the slot alternates.
    generation: u64,
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

fn encode(set: &[u8; 16], applied: u64, flags: u8) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0..8].copy_from_slice(&MAGIC);
    r[8..24].copy_from_slice(set);
    r[24..32].copy_from_slice(&applied.to_le_bytes());
    r[32..36].copy_from_slice(&u32::from(flags).to_le_bytes());
    let crc = crc32fast::hash(&r[..36]);
    r[36..40].copy_from_slice(&crc.to_le_bytes());
    r
}

/// (set, applied, flags, v1) of a valid record.
fn decode(r: &[u8]) -> Option<([u8; 16], u64, u8, bool)> {
    if r.len() >= RECORD_LEN && r[0..8] == MAGIC {
        let crc = u32::from_le_bytes(r[36..40].try_into().ok()?);
        if crc != crc32fast::hash(&r[..36]) {
            return None;
        }
        let set: [u8; 16] = r[8..24].try_into().ok()?;
        let applied = u64::from_le_bytes(r[24..32].try_into().ok()?);
        let flags = u32::from_le_bytes(r[32..36].try_into().ok()?) as u8;
        return Some((set, applied, flags, false));
    }
    // 36-byte records before histories.
    if r.len() >= 36 && r[0..8] == MAGIC_V1 {
        let crc = u32::from_le_bytes(r[32..36].try_into().ok()?);
        if crc != crc32fast::hash(&r[..32]) {
            return None;
        }
        let master: [u8; 16] = r[8..24].try_into().ok()?;
        let applied = u64::from_le_bytes(r[24..32].try_into().ok()?);
        return Some((master, applied, 0, true));
    }
    None
}

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

/// The default state directory for a mirrored tree: the same as the master role's
/// ([`crate::node::default_dir`]), so that a promotion or a rejoin finds its
/// state. A slave that ran before under the old default (`/var/lib/tdfs-slave/_srv_www`)
/// keeps using it.
pub fn default_dir(canonical_root: &Path) -> PathBuf {
    let name: String = canonical_root
        .to_string_lossy()
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    let legacy = Path::new("/var/lib/tdfs-slave").join(name);
    if legacy.join(STATE_FILE).exists() {
        return legacy;
    }
    crate::node::default_dir(canonical_root)
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

/// The position recorded in a replica's state directory, read without mapping or locking
/// it (the caller holds the node's lock): (replica set, applied, flags), or zeros.
pub fn read(dir: &Path) -> io::Result<([u8; 16], u64, u8)> {
    let mut buf = [0u8; RECORD_LEN * SLOTS];
    let n = match File::open(dir.join(STATE_FILE)) {
        Ok(f) => f.read_at(&mut buf, 0)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    Ok(buf[..n]
        .chunks(RECORD_LEN)
        .filter_map(decode)
        .chain(
            buf[..n.min(72)]
                .chunks(36)
                .filter_map(|c| decode(c).filter(|d| d.3)),
        )
        .max_by_key(|(_, applied, _, _)| *applied)
        .map_or(([0; 16], 0, 0), |(s, a, f, _)| (s, a, f)))
}

/// Refuses a state directory inside the mirrored tree (the master's ops would reach it).
pub fn check_outside(dir: &Path, canonical_root: &Path) -> anyhow::Result<()> {
    let inside = |d: &Path| d.starts_with(canonical_root);
    if inside(&canonical_prefix(dir)?) {
        bail!(
            "state dir {} lies inside the mirrored directory {}; choose another with --state-dir",
            dir.display(),
            canonical_root.display()
        );
    }
    Ok(())
}

impl State {
    /// Loads the record from the state directory `node` has locked, and makes it agree with
    /// `node.state`: a tree that was a master's last becomes a replica's here, at the last
    /// position that master recorded (and flagged as possibly beyond it after a crash); a
    /// record from before histories gets its history from the master id it names.
    pub fn open(node: &NodeState, canonical_root: &Path) -> anyhow::Result<State> {
        let dir = node.dir.clone();
        let canon = dir.canonicalize()?;
        if canon.starts_with(canonical_root) {
            bail!(
                "state dir {} lies inside the mirrored directory {}",
                canon.display(),
                canonical_root.display()
            );
        }
        let file = open_private(&dir.join(STATE_FILE))
            .with_context(|| format!("opening state file in {}", dir.display()))?;
        let mut buf = [0u8; RECORD_LEN * SLOTS];
        let n = file.read_at(&mut buf, 0)?;
        let best = buf[..n]
            .chunks(RECORD_LEN)
            .filter_map(decode)
            .chain(
                buf[..n.min(72)]
                    .chunks(36)
                    .filter_map(|c| decode(c).filter(|d| d.3)),
            )
            .max_by_key(|(_, applied, _, _)| *applied);
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
        let mut st = State {
            file,
            map: map.cast::<u8>(),
            set: [0; 16],
            applied: 0,
            flags: 0,
            replay: None,
            generation: 0,
        };
        let rec = node.record();
        match (rec.role, best) {
            (Role::Master, _) if !rec.history.is_empty() => {
                // This tree was a master's: its position is where that master stopped.
                let applied = rec.next_seq.saturating_sub(1);
                let flags = if rec.clean {
                    0
                } else {
                    ack_flags::BEYOND_KNOWN
                };
                if rec.clean {
                    tracing::info!(
                        "this node was the master of {} and exited cleanly after seq \
                         {applied}; it is a replica now",
                        rec.history.last().expect("not empty"),
                    );
                } else {
                    tracing::info!(
                        "this node was the master of {} and did not exit cleanly: the last ops \
                         it issued were never recorded; it is a replica now, and whatever it \
                         holds past its new master's line is stashed when it is synced",
                        rec.history.last().expect("not empty"),
                    );
                }
                st.set = rec.history.set_id().expect("not empty");
                st.store(applied, flags)?;
                st.sync()?;
                node.update(|r| r.role = Role::Replica)?;
            }
            (_, Some((set, applied, flags, true))) => {
                // A record from before histories names its master: that master's id became
                // epoch 1 of its replica set (it migrates the same way).
                if rec.history.is_empty() && set != [0; 16] {
                    node.update(|r| {
                        r.history = History::genesis(set, 1);
                        r.role = Role::Replica;
                    })?;
                }
                st.set = set;
                st.store(applied, flags)?;
                st.sync()?;
            }
            (_, Some((set, applied, flags, false))) => {
                if rec.history.set_id().is_some_and(|s| s != set) && set != [0; 16] {
                    tracing::warn!(
                        "state record of {} names another replica set than {}: starting as \
                         if nothing was applied",
                        dir.join(STATE_FILE).display(),
                        node.path().display()
                    );
                } else {
                    st.set = set;
                    st.applied = applied;
                    st.flags = flags;
                }
            }
            (_, None) => {
                if n > 0 && buf[..n].iter().any(|&b| b != 0) {
                    tracing::warn!(
                        "state file {} is unreadable or corrupt; starting as if nothing was \
                         applied",
                        dir.join(STATE_FILE).display()
                    );
                }
            }
        }
        if rec.role != Role::Replica && rec.history.is_empty() {
            node.update(|r| r.role = Role::Replica)?;
        }
        st.replay = (st.applied > 0).then(|| st.applied + 1);
        Ok(st)
    }

    fn store(&mut self, applied: u64, flags: u8) -> io::Result<()> {
        let rec = encode(&self.set, applied, flags);
        self.generation += 1;
        let slot = (self.generation as usize) % SLOTS;
        // SAFETY: the slot lies within the MAP_LEN-byte mapping; nothing else aliases it.
        unsafe {
            std::ptr::copy_nonoverlapping(rec.as_ptr(), self.map.add(slot * RECORD_LEN), RECORD_LEN)
        };
        // Both slots hold the same flags: an older slot must never look newer without them.
        let other = encode(&self.set, applied.saturating_sub(1), flags);
        // SAFETY: as above, for the other slot.
        unsafe {
            std::ptr::copy_nonoverlapping(
                other.as_ptr(),
                self.map.add(((slot + 1) % SLOTS) * RECORD_LEN),
                RECORD_LEN,
            )
        };
        self.applied = applied;
        self.flags = flags;
        Ok(())
    }

    /// Records that every op up to `applied` has taken effect; durable only after
    /// [`State::sync`], but safe against the process being killed at once.
    pub fn record(&mut self, applied: u64) -> io::Result<()> {
        if applied == self.applied {
            return Ok(());
        }
        self.store(applied, self.flags)
    }

    /// Enters or leaves a sync (durably: a tree half synced must never read as a valid
    /// position after a crash).
    pub fn set_flags(&mut self, flags: u8) -> io::Result<()> {
        self.store(self.applied, flags)?;
        self.sync()
    }

    /// The replica set this record belongs to, once known.
    pub fn set_set(&mut self, set: [u8; 16]) -> io::Result<()> {
        if self.set != set {
            self.set = set;
            self.store(self.applied, self.flags)?;
        }
        Ok(())
    }

    /// Replaces the position (a sync that ended at `applied`, with `flags`).
    pub fn reset(&mut self, applied: u64, flags: u8) -> io::Result<()> {
        self.replay = None;
        self.store(applied, flags)?;
        self.sync()
    }

    /// True (once) when `seq` is the op a previous process may have applied without
    /// recording it.
    pub fn is_replay(&mut self, seq: u64) -> bool {
        let r = self.replay == Some(seq);
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
    fn record_roundtrip_flags_and_lock() {
        let root = tempfile::tempdir_in("/tmp").unwrap();
        let sd = tempfile::tempdir_in("/tmp").unwrap();
        let croot = root.path().canonicalize().unwrap();
        let dir = sd.path().join("st");
        {
            let node = NodeState::open(&dir).unwrap();
            let mut s = State::open(&node, &croot).unwrap();
            assert_eq!((s.set, s.applied, s.flags), ([0; 16], 0, 0));
            s.set_set([7; 16]).unwrap();
            s.record(42).unwrap();
            s.set_flags(ack_flags::SYNCING).unwrap();
            let err = NodeState::open(&dir).err().unwrap().to_string();
            assert!(err.contains("in use"), "{err}");
        }
        let node = NodeState::open(&dir).unwrap();
        let mut s = State::open(&node, &croot).unwrap();
        assert_eq!(
            (s.set, s.applied, s.flags),
            ([7; 16], 42, ack_flags::SYNCING)
        );
        s.reset(40, 0).unwrap();
        drop(s);
        let s = State::open(&node, &croot).unwrap();
        assert_eq!((s.applied, s.flags), (40, 0));
        assert!(check_outside(&croot.join("x/y"), &croot).is_err());
        assert!(!croot.join("x").exists());
        // A corrupt record reads as nothing applied.
        drop(s);
        std::fs::write(dir.join(STATE_FILE), [1u8; RECORD_LEN]).unwrap();
        let s = State::open(&node, &croot).unwrap();
        assert_eq!(s.applied, 0);
    }

    #[test]
    fn legacy_record_and_former_master() {
        let root = tempfile::tempdir_in("/tmp").unwrap();
        let croot = root.path().canonicalize().unwrap();
        // A v1 record (master id, applied) becomes history epoch 1 of that id.
        let sd = tempfile::tempdir_in("/tmp").unwrap();
        let mut v1 = [0u8; 36];
        v1[0..8].copy_from_slice(&MAGIC_V1);
        v1[8..24].copy_from_slice(&[5; 16]);
        v1[24..32].copy_from_slice(&9u64.to_le_bytes());
        let crc = crc32fast::hash(&v1[..32]);
        v1[32..36].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(sd.path().join(STATE_FILE), v1).unwrap();
        let node = NodeState::open(sd.path()).unwrap();
        let s = State::open(&node, &croot).unwrap();
        assert_eq!((s.set, s.applied), ([5; 16], 9));
        assert_eq!(node.record().history, History::genesis([5; 16], 1));
        // A former master (unclean) becomes a replica at its last recorded position,
        // flagged as possibly beyond it.
        let m = tempfile::tempdir_in("/tmp").unwrap();
        let node = NodeState::open(m.path()).unwrap();
        node.begin_master().unwrap();
        node.save_master(100, false).unwrap();
        let s = State::open(&node, &croot).unwrap();
        assert_eq!((s.applied, s.flags), (99, ack_flags::BEYOND_KNOWN));
        assert_eq!(node.record().role, Role::Replica);
    }
}
