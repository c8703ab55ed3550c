//! The master's persistent state: its identity and where its sequence numbers stand.
//!
//! Sequence numbers must never repeat for one master identity, or a slave could take a new op
//! for one it already applied. The next sequence number is saved periodically and at a clean
//! exit; after an unclean exit the master skips far ahead of anything it could have issued.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tdfs_protocol::msg::MasterId;

/// Gap skipped after an unclean exit: far more ops than can be issued between two saves.
const UNCLEAN_SKIP: u64 = 1 << 32;

/// The running master saves `next_seq` once it is this far past the saved one (checked every
/// second): a quarter of [`UNCLEAN_SKIP`], so even at millions of ops per second the next
/// save comes long before the skip could be overtaken.
pub const SAVE_EVERY: u64 = UNCLEAN_SKIP / 4;
const _: () = assert!(SAVE_EVERY * 2 <= UNCLEAN_SKIP);

#[derive(Debug, Clone)]
pub struct MasterState {
    pub dir: PathBuf,
    pub id: MasterId,
    pub next_seq: u64,
    /// The previous run did not exit cleanly (crash, kill -9, power loss).
    pub was_unclean: bool,
    /// Serialises saves: the periodic saver and the final save share one temp file name.
    save_lock: Arc<Mutex<()>>,
}

fn hex(id: &MasterId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<MasterId> {
    if s.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

impl MasterState {
    /// Loads (or creates) the state in `dir` and marks it as in use (unclean until
    /// [`MasterState::save`] with `clean`).
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let file = dir.join("master.state");
        let mut st = match fs::read_to_string(&file) {
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
                let (Some(id), Some(next)) = (id, next) else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} is damaged; move it away to start a new master identity",
                            file.display()
                        ),
                    ));
                };
                let next_seq = if clean { next } else { next + UNCLEAN_SKIP };
                MasterState {
                    dir: dir.to_path_buf(),
                    id,
                    next_seq,
                    was_unclean: !clean,
                    save_lock: Arc::default(),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut id = [0u8; 16];
                fs::File::open("/dev/urandom")?.read_exact(&mut id)?;
                MasterState {
                    dir: dir.to_path_buf(),
                    id,
                    next_seq: 1,
                    was_unclean: false,
                    save_lock: Arc::default(),
                }
            }
            Err(e) => return Err(e),
        };
        st.save(st.next_seq, false)?;
        st.next_seq = st.next_seq.max(1);
        Ok(st)
    }

    /// Durably records `next_seq` (write, fsync, rename, fsync dir).
    pub fn save(&self, next_seq: u64, clean: bool) -> io::Result<()> {
        let _g = self.save_lock.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = self.dir.join("master.state.tmp");
        let mut f = fs::File::create(&tmp)?;
        write!(
            f,
            "id={}\nnext_seq={}\nclean={}\n",
            hex(&self.id),
            next_seq,
            u8::from(clean)
        )?;
        f.sync_all()?;
        fs::rename(&tmp, self.dir.join("master.state"))?;
        fs::File::open(&self.dir)?.sync_all()
    }

    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }
}
