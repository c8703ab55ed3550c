//! A node's place in its replica set, kept in its state directory and shared by both roles:
//! the history of epochs its ops come from, the newest epoch it has heard of, whether it
//! last ran as master or replica, and, as a master, where its sequence numbers stand.
//!
//! One state directory per node serves both daemons, so that failover is a change of role,
//! not a migration: `tdfs promote` turns a replica's state into a master's of a new epoch,
//! and `tdfs-slave` started on a former master's state knows where that master stopped
//! (exactly, after a clean exit; "at least here" after a crash) and that whatever it holds
//! past the new master's line must be stashed, not overwritten.
//!
//! The file `node.state` is a few `key=value` lines, rewritten atomically:
//!
//! ```text
//! epoch=1 5f0c...e2 1         # number, id (32 hex digits), first sequence number
//! epoch=2 a81b...07 1013
//! seen=2 a81b...07 1013       # the newest epoch heard of (may be newer than the last one)
//! role=master                 # or replica: which daemon ran last
//! master_epoch=2              # the epoch this node is master of (absent: none)
//! next_seq=1990               # as master: the next sequence number to issue
//! clean=1                     # as master: the last run exited cleanly
//! ```
//!
//! Sequence numbers must never repeat within an epoch, or a replica could take a new op for
//! one it already applied. A master saves `next_seq` periodically and at a clean exit; after
//! an unclean exit it skips far ahead of anything it could have issued.

use std::fs;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tdfs_protocol::{Epoch, History};

/// Gap skipped after an unclean exit: far more ops than can be issued between two saves.
pub const UNCLEAN_SKIP: u64 = 1 << 32;

/// The running master saves `next_seq` once it is this far past the saved one (checked every
/// second): a quarter of [`UNCLEAN_SKIP`], so even at millions of ops per second the next
/// save comes long before the skip could be overtaken.
pub const SAVE_EVERY: u64 = UNCLEAN_SKIP / 4;
const _: () = assert!(SAVE_EVERY * 2 <= UNCLEAN_SKIP);

pub const STATE_FILE: &str = "node.state";
pub const LOCK_FILE: &str = "lock";
/// The state file of masters before histories existed (migrated on first use).
const LEGACY_MASTER_FILE: &str = "master.state";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Master,
    Replica,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Replica => "replica",
        }
    }
}

/// What is persisted (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub history: History,
    pub seen: Option<Epoch>,
    pub role: Role,
    pub master_epoch: Option<u64>,
    pub next_seq: u64,
    pub clean: bool,
}

impl Default for NodeRecord {
    fn default() -> Self {
        NodeRecord {
            history: History::default(),
            seen: None,
            role: Role::Replica,
            master_epoch: None,
            next_seq: 1,
            clean: true,
        }
    }
}

pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

fn epoch_text(e: &Epoch) -> String {
    format!("{} {} {}", e.number, hex(&e.id), e.start)
}

fn parse_epoch(v: &str) -> Option<Epoch> {
    let mut it = v.split_whitespace();
    let number = it.next()?.parse().ok()?;
    let id = unhex(it.next()?)?;
    let start = it.next()?.parse().ok()?;
    Some(Epoch { number, id, start })
}

/// Sixteen random bytes (a new epoch's id).
pub fn random_id() -> io::Result<[u8; 16]> {
    let mut id = [0u8; 16];
    fs::File::open("/dev/urandom")?.read_exact(&mut id)?;
    Ok(id)
}

impl NodeRecord {
    pub fn encode(&self) -> String {
        let mut s = String::new();
        for e in &self.history.epochs {
            s.push_str(&format!("epoch={}\n", epoch_text(e)));
        }
        if let Some(e) = &self.seen {
            s.push_str(&format!("seen={}\n", epoch_text(e)));
        }
        s.push_str(&format!("role={}\n", self.role.name()));
        if let Some(m) = self.master_epoch {
            s.push_str(&format!("master_epoch={m}\n"));
        }
        s.push_str(&format!(
            "next_seq={}\nclean={}\n",
            self.next_seq,
            u8::from(self.clean)
        ));
        s
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut r = NodeRecord::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = || format!("line {}: cannot read {line:?}", n + 1);
            let (k, v) = line.split_once('=').ok_or_else(bad)?;
            let v = v.trim();
            match k.trim() {
                "epoch" => {
                    let e = parse_epoch(v).ok_or_else(bad)?;
                    if let Some(p) = r.history.last() {
                        if e.number <= p.number || e.start < p.start {
                            return Err(format!("line {}: epochs out of order", n + 1));
                        }
                    }
                    r.history.epochs.push(e);
                }
                "seen" => r.seen = Some(parse_epoch(v).ok_or_else(bad)?),
                "role" => {
                    r.role = match v {
                        "master" => Role::Master,
                        "replica" => Role::Replica,
                        _ => return Err(bad()),
                    }
                }
                "master_epoch" => r.master_epoch = Some(v.parse().map_err(|_| bad())?),
                "next_seq" => r.next_seq = v.parse().map_err(|_| bad())?,
                "clean" => r.clean = v == "1",
                _ => {} // a later version's key
            }
        }
        Ok(r)
    }

    /// The newest epoch this node knows of: its last, or one it heard of.
    pub fn newest(&self) -> Option<Epoch> {
        match (self.history.last(), &self.seen) {
            (Some(a), Some(b)) if b.number > a.number => Some(*b),
            (Some(a), _) => Some(*a),
            (None, b) => *b,
        }
    }

    /// Whether this node may run as the master of its current epoch: it is that epoch's
    /// master, and it has heard of nothing newer.
    pub fn may_lead(&self) -> Result<(), String> {
        let Some(last) = self.history.last() else {
            return Err("no history".into());
        };
        if let Some(n) = self.newest() {
            if !n.same(last) {
                return Err(format!(
                    "this node has heard of {n}, newer than its own {last}: another node was \
                     promoted, and this one was replaced (fenced). Rejoin it as a replica of the \
                     new master: tdfs-slave -m DIR --state-dir STATE_DIR ..."
                ));
            }
        }
        if self.master_epoch != Some(last.number) {
            return Err(format!(
                "this node is a replica (at {last}, whose master is another node). To make it \
                 the master of a new epoch, stop tdfs-slave and run: tdfs promote --state-dir \
                 STATE_DIR [--peer OTHER_REPLICA ...]"
            ));
        }
        Ok(())
    }
}

/// The state directory of a node: `node.state` and the lock that keeps a second daemon out.
#[derive(Debug)]
pub struct NodeState {
    pub dir: PathBuf,
    rec: Mutex<NodeRecord>,
    /// Held for the life of the process: the flock keeps any second daemon (either role) out.
    _lock: fs::File,
}

impl NodeState {
    /// Creates (mode 0700) and locks `dir`, and loads its state (an empty record in a new
    /// directory; a legacy `master.state` is migrated).
    pub fn open(dir: &Path) -> io::Result<Arc<Self>> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let lock = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(LOCK_FILE))?;
        // SAFETY: plain syscall on a live fd.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "state directory {} is in use by another tdfs daemon (lock held on {})",
                        dir.display(),
                        dir.join(LOCK_FILE).display()
                    ),
                ));
            }
            return Err(e);
        }
        let rec = Self::load(dir)?;
        Ok(Arc::new(NodeState {
            dir: dir.to_path_buf(),
            rec: Mutex::new(rec),
            _lock: lock,
        }))
    }

    fn load(dir: &Path) -> io::Result<NodeRecord> {
        let damaged = |file: &Path, why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is damaged ({why}); it records which master generation this node \
                     follows, so it is not replaced silently: restore it, or move it away to \
                     start this node afresh (a fresh node is synced from its master, and a \
                     fresh master starts a new replica set)",
                    file.display()
                ),
            )
        };
        let file = dir.join(STATE_FILE);
        match fs::read_to_string(&file) {
            Ok(text) => return NodeRecord::parse(&text).map_err(|e| damaged(&file, e)),
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            Err(_) => {}
        }
        // A master's state from before histories: its id becomes its replica set's first
        // epoch, the one its slaves (whose records name the same id) follow.
        let legacy = dir.join(LEGACY_MASTER_FILE);
        match fs::read_to_string(&legacy) {
            Ok(text) => {
                let mut id = None;
                let mut next = None;
                let mut clean = false;
                for line in text.lines() {
                    match line.split_once('=') {
                        Some(("id", v)) => id = unhex(v.trim()),
                        Some(("next_seq", v)) => next = v.trim().parse::<u64>().ok(),
                        Some(("clean", v)) => clean = v.trim() == "1",
                        _ => {}
                    }
                }
                let (Some(id), Some(next_seq)) = (id, next) else {
                    return Err(damaged(&legacy, "no id or next_seq".into()));
                };
                tracing::info!(
                    "migrating {} to {}: master {} becomes epoch 1 of its replica set",
                    legacy.display(),
                    file.display(),
                    hex(&id)
                );
                Ok(NodeRecord {
                    history: History::genesis(id, 1),
                    seen: None,
                    role: Role::Master,
                    master_epoch: Some(1),
                    next_seq,
                    clean,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(NodeRecord::default()),
            Err(e) => Err(e),
        }
    }

    pub fn record(&self) -> NodeRecord {
        self.rec.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes the record and writes it durably (temp file, fsync, rename, fsync dir).
    pub fn update(&self, f: impl FnOnce(&mut NodeRecord)) -> io::Result<NodeRecord> {
        let mut g = self.rec.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = g.clone();
        f(&mut next);
        crate::daemon::write_atomic(&self.dir.join(STATE_FILE), next.encode().as_bytes(), 0o600)?;
        *g = next.clone();
        Ok(next)
    }

    /// Records that an epoch newer than any this node knew exists (a replica refused this
    /// master, a peer said so). Returns whether it was news.
    pub fn heard_of(&self, e: &Epoch) -> io::Result<bool> {
        let cur = self.record();
        let newer = cur
            .newest()
            .is_none_or(|n| e.number > n.number || (e.number == n.number && !e.same(&n)));
        if newer {
            self.update(|r| r.seen = Some(*e))?;
        }
        Ok(newer)
    }

    /// Readies this node to run as master: checks it may lead (a new node starts a replica
    /// set), marks the run unclean until [`NodeState::save_master`] with `clean`, and
    /// returns the record as it was and the next sequence number to issue (far past the
    /// saved one after an unclean exit).
    pub fn begin_master(&self) -> Result<(NodeRecord, u64), String> {
        let mut rec = self.record();
        if rec.history.is_empty() {
            let id = random_id().map_err(|e| e.to_string())?;
            rec.history = History::genesis(id, 1);
            rec.master_epoch = Some(1);
            rec.next_seq = 1;
            rec.clean = true;
            tracing::info!(
                "new replica set {}: this node is the master of its first epoch",
                hex(&id)
            );
        }
        rec.may_lead()?;
        let next = if rec.clean {
            rec.next_seq
        } else {
            rec.next_seq.saturating_add(UNCLEAN_SKIP)
        };
        let was = rec.clone();
        self.update(|r| {
            *r = rec;
            r.role = Role::Master;
            r.next_seq = next;
            r.clean = false;
        })
        .map_err(|e| format!("writing {}: {e}", self.dir.join(STATE_FILE).display()))?;
        Ok((was, next.max(1)))
    }

    /// Durably records where a running master's sequence numbers stand.
    pub fn save_master(&self, next_seq: u64, clean: bool) -> io::Result<()> {
        self.update(|r| {
            r.next_seq = next_seq;
            r.clean = clean;
        })
        .map(drop)
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
}

/// The state directory for the tree at `canonical` (`given`, else [`default_dir`]): created
/// if missing, canonical, and refused when it lies inside the tree it describes.
pub fn prepare_dir(canonical: &Path, given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let state_dir = given.unwrap_or_else(|| default_dir(canonical));
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("state directory {}", state_dir.display()))?;
    let state_dir = state_dir.canonicalize()?;
    if state_dir.starts_with(canonical) {
        anyhow::bail!(
            "state directory {} is inside the mirrored directory {}; choose one outside it",
            state_dir.display(),
            canonical.display()
        );
    }
    Ok(state_dir)
}

/// The default state directory for a tree: one per canonical path, the same for both
/// daemons (so that a change of role finds its state), e.g. `/var/lib/tdfs/srv_www`.
pub fn default_dir(canonical: &Path) -> PathBuf {
    let name: String = canonical
        .to_string_lossy()
        .trim_start_matches('/')
        .replace('/', "_");
    let name = if name.is_empty() {
        "_root".into()
    } else {
        name
    };
    PathBuf::from("/var/lib/tdfs").join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip_and_leadership() {
        let e1 = Epoch {
            number: 1,
            id: [1; 16],
            start: 1,
        };
        let e2 = Epoch {
            number: 2,
            id: [2; 16],
            start: 50,
        };
        let r = NodeRecord {
            history: History {
                epochs: vec![e1, e2],
            },
            seen: Some(e2),
            role: Role::Master,
            master_epoch: Some(2),
            next_seq: 77,
            clean: false,
        };
        assert_eq!(NodeRecord::parse(&r.encode()).unwrap(), r);
        assert!(r.may_lead().is_ok());
        // A replica of epoch 2 may not lead it.
        let rep = NodeRecord {
            master_epoch: Some(1),
            role: Role::Replica,
            ..r.clone()
        };
        assert!(rep.may_lead().unwrap_err().contains("tdfs promote"));
        // A master of epoch 1 that heard of epoch 2 was replaced.
        let old = NodeRecord {
            history: History { epochs: vec![e1] },
            seen: Some(e2),
            master_epoch: Some(1),
            ..r.clone()
        };
        assert!(old.may_lead().unwrap_err().contains("fenced"));
        assert!(NodeRecord::parse("epoch=2 xx 1\n").is_err());
        assert!(NodeRecord::parse(&format!(
            "epoch={}\nepoch={}\n",
            epoch_text(&e2),
            epoch_text(&e1)
        ))
        .is_err());
    }

    #[test]
    fn master_state_lifecycle_and_legacy_migration() {
        let d = tempfile::tempdir().unwrap();
        {
            let n = NodeState::open(d.path()).unwrap();
            let (_, next) = n.begin_master().unwrap();
            assert_eq!(next, 1);
            assert!(NodeState::open(d.path())
                .unwrap_err()
                .to_string()
                .contains("in use"));
            n.save_master(10, false).unwrap();
        }
        {
            // Unclean: the numbers skip far ahead.
            let n = NodeState::open(d.path()).unwrap();
            let (was, next) = n.begin_master().unwrap();
            assert!(!was.clean);
            assert_eq!(next, 10 + UNCLEAN_SKIP);
            n.save_master(next + 5, true).unwrap();
        }
        let n = NodeState::open(d.path()).unwrap();
        assert_eq!(n.begin_master().unwrap().1, 15 + UNCLEAN_SKIP);
        drop(n);
        let l = tempfile::tempdir().unwrap();
        std::fs::write(
            l.path().join("master.state"),
            format!("id={}\nnext_seq=42\nclean=1\n", hex(&[7; 16])),
        )
        .unwrap();
        let n = NodeState::open(l.path()).unwrap();
        let rec = n.record();
        assert_eq!(rec.history, History::genesis([7; 16], 1));
        assert_eq!(
            (rec.next_seq, rec.clean, rec.master_epoch),
            (42, true, Some(1))
        );
    }
}
