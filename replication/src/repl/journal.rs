//! The on-disk journal: where ops go when a slave needs them and memory is full.
//!
//! Ops live in memory while every slave keeps up, so a healthy mirror costs no extra disk
//! I/O. When the in-memory log reaches its cap and some slave still needs its oldest ops,
//! they spill here, into segment files in the state dir, as checksummed records:
//!
//! ```text
//! len u32 | seq u64 | crc32(seq bytes ++ payload) u32 | payload (an encoded op)
//! ```
//!
//! The journal holds one contiguous run of sequence numbers. Its size is bounded
//! (`--journal-size`): the oldest segments are deleted when it grows past the bound, and a
//! slave that needed them falls back to an incremental sync. Readers (slave links) read
//! segment files directly, without the order lock; a record being appended at the tail reads
//! as incomplete and is simply read again later.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

const HEADER: usize = 16;
/// Largest record payload accepted when reading back (an op is far smaller).
const MAX_RECORD: usize = 16 << 20;
/// Appended records are written out once this many bytes are buffered (and at each flush).
const FLUSH_AT: usize = 1 << 20;

#[derive(Debug, Clone)]
struct Segment {
    first: u64,
    /// Sequence number after the last record (== first when empty).
    end: u64,
    path: PathBuf,
    bytes: u64,
}

#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    max_bytes: u64,
    seg_bytes: u64,
    segs: VecDeque<Segment>,
    cur: Option<File>,
    total: u64,
    /// Records appended but not written yet (one write per batch, not per op). Readers
    /// learn of records only through [`Journal::view`], taken after [`Journal::flush`].
    buf: Vec<u8>,
}

/// What a link needs to read records without holding the journal's lock.
#[derive(Debug, Clone)]
pub struct SegmentView {
    pub first: u64,
    pub end: u64,
    pub path: PathBuf,
}

fn seg_name(first: u64) -> String {
    format!("{first:020}.tdj")
}

/// Reads the record at `off`; `Ok(None)` at a clean end or an incomplete/torn tail.
fn read_record(f: &File, off: u64) -> io::Result<Option<(u64, Vec<u8>, u64)>> {
    let mut h = [0u8; HEADER];
    let n = read_full(f, &mut h, off)?;
    if n < HEADER {
        return Ok(None);
    }
    let len = u32::from_le_bytes(h[0..4].try_into().expect("4")) as usize;
    let seq = u64::from_le_bytes(h[4..12].try_into().expect("8"));
    let crc = u32::from_le_bytes(h[12..16].try_into().expect("4"));
    if len > MAX_RECORD {
        return Ok(None);
    }
    let mut data = vec![0u8; len];
    if read_full(f, &mut data, off + HEADER as u64)? < len {
        return Ok(None);
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&h[4..12]);
    hasher.update(&data);
    if hasher.finalize() != crc {
        return Ok(None);
    }
    Ok(Some((seq, data, off + (HEADER + len) as u64)))
}

fn read_full(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

impl Journal {
    /// Opens the journal in `dir`, keeping the longest valid contiguous run of records that
    /// ends at the newest segment and cutting a torn tail.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut names: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let first = name.strip_suffix(".tdj")?.parse::<u64>().ok()?;
                Some((first, e.path()))
            })
            .collect();
        names.sort();
        let mut segs: VecDeque<Segment> = VecDeque::new();
        for (first, path) in names {
            let f = File::open(&path)?;
            let mut off = 0;
            let mut end = first;
            while let Some((seq, _, next)) = read_record(&f, off)? {
                if seq != end {
                    break;
                }
                end += 1;
                off = next;
            }
            if f.metadata()?.len() != off {
                warn!(segment = %path.display(), "journal segment has a torn or damaged tail; cutting it at {off} bytes");
                OpenOptions::new().write(true).open(&path)?.set_len(off)?;
            }
            if segs.back().is_some_and(|s| s.end != first) {
                // A gap: what came before cannot be replayed in order; drop it.
                for s in segs.drain(..) {
                    let _ = fs::remove_file(&s.path);
                }
            }
            segs.push_back(Segment {
                first,
                end,
                path,
                bytes: off,
            });
        }
        let total = segs.iter().map(|s| s.bytes).sum();
        let j = Journal {
            dir: dir.to_path_buf(),
            max_bytes,
            seg_bytes: (max_bytes / 8).clamp(1 << 20, 256 << 20),
            segs,
            cur: None,
            total,
            buf: Vec::new(),
        };
        if let (Some(a), Some(b)) = (j.front(), j.end()) {
            info!(from = a, to = b - 1, bytes = j.total, "journal holds ops");
        }
        Ok(j)
    }

    /// First sequence number held, if any.
    pub fn front(&self) -> Option<u64> {
        self.segs.iter().find(|s| s.end > s.first).map(|s| s.first)
    }

    /// Sequence number after the last one held, if any.
    pub fn end(&self) -> Option<u64> {
        self.segs.back().filter(|s| s.end > s.first).map(|s| s.end)
    }

    pub fn bytes(&self) -> u64 {
        self.total
    }

    /// Deletes everything (e.g. after an unclean restart, when the journal may have gaps
    /// relative to what the slaves saw).
    pub fn clear(&mut self) -> io::Result<()> {
        self.buf.clear();
        self.cur = None;
        for s in self.segs.drain(..) {
            fs::remove_file(&s.path).or_else(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
        }
        self.total = 0;
        Ok(())
    }

    /// Appends one record. `seq` must follow the last one held; otherwise the journal
    /// restarts at `seq` (older records could no longer be replayed in order).
    /// Returns the sequence number below which records were deleted to stay in bounds.
    pub fn append(&mut self, seq: u64, data: &[u8]) -> io::Result<Option<u64>> {
        if self.end().is_some_and(|e| e != seq) {
            self.clear()?;
        }
        let need_new = match self.segs.back() {
            None => true,
            Some(s) => s.bytes >= self.seg_bytes || self.cur.is_none(),
        };
        if need_new {
            // What is buffered belongs to the segment being closed.
            self.flush()?;
            let reuse = self
                .segs
                .back()
                .is_some_and(|s| s.end == s.first && s.first == seq);
            if !reuse {
                let path = self.dir.join(seg_name(seq));
                let f = OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .open(&path)?;
                // Make the segment's name durable with the directory.
                File::open(&self.dir)?.sync_all()?;
                self.segs.push_back(Segment {
                    first: seq,
                    end: seq,
                    path,
                    bytes: 0,
                });
                self.cur = Some(f);
            } else if self.cur.is_none() {
                let s = self.segs.back().expect("checked");
                self.cur = Some(OpenOptions::new().append(true).open(&s.path)?);
            }
        }
        let len = HEADER + data.len();
        self.buf
            .extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&seq.to_le_bytes());
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&seq.to_le_bytes());
        hasher.update(data);
        self.buf.extend_from_slice(&hasher.finalize().to_le_bytes());
        self.buf.extend_from_slice(data);
        if self.buf.len() >= FLUSH_AT {
            self.flush()?;
        }
        let s = self.segs.back_mut().expect("segment exists");
        s.end = seq + 1;
        s.bytes += len as u64;
        self.total += len as u64;
        // Stay in bounds by deleting whole old segments (never the one being written).
        let mut dropped_below = None;
        while self.total > self.max_bytes && self.segs.len() > 1 {
            let s = self.segs.pop_front().expect("len > 1");
            self.total -= s.bytes;
            let _ = fs::remove_file(&s.path);
            dropped_below = Some(s.end);
        }
        Ok(dropped_below)
    }

    /// Writes out what [`Journal::append`] buffered.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = self
            .cur
            .as_mut()
            .expect("a buffered record has an open segment")
            .write_all(&self.buf);
        self.buf.clear();
        r
    }

    /// The segments, for a reader to use without the lock (flush first).
    pub fn view(&self) -> Vec<SegmentView> {
        debug_assert!(self.buf.is_empty(), "journal view taken before a flush");
        self.segs
            .iter()
            .filter(|s| s.end > s.first)
            .map(|s| SegmentView {
                first: s.first,
                end: s.end,
                path: s.path.clone(),
            })
            .collect()
    }

    /// Makes what was appended durable (at a clean exit, for slaves that were away).
    pub fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        if let Some(f) = &self.cur {
            f.sync_data()?;
        }
        Ok(())
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            warn!("writing the journal's last records: {e}");
        }
    }
}

/// A slave link's position in the journal: reads forward through segment files.
#[derive(Debug, Default)]
pub struct Reader {
    file: Option<(u64, File)>,
    /// Byte offset of the record with sequence number `next` in the open segment.
    off: u64,
    next: u64,
}

impl Reader {
    /// Reads records from `from` on, up to about `max_bytes`, never past `stop`.
    /// Returns `None` when `from` is not in the journal any more.
    pub fn read(
        &mut self,
        view: &[SegmentView],
        from: u64,
        stop: u64,
        max_bytes: usize,
    ) -> io::Result<Option<Vec<Arc<[u8]>>>> {
        let Some(seg) = view.iter().find(|s| s.first <= from && from < s.end) else {
            return Ok(None);
        };
        let reopen = match &self.file {
            Some((first, _)) => *first != seg.first || self.next != from,
            None => true,
        };
        if reopen {
            let f = match File::open(&seg.path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            // Skip to `from` (only when a reader starts or jumps; sequential reads continue).
            let mut off = 0;
            let mut seq = seg.first;
            while seq < from {
                match read_record(&f, off)? {
                    Some((s, _, next)) if s == seq => {
                        seq += 1;
                        off = next;
                    }
                    _ => return Ok(None),
                }
            }
            self.file = Some((seg.first, f));
            self.off = off;
            self.next = from;
        }
        let (_, f) = self.file.as_ref().expect("opened above");
        let mut out = Vec::new();
        let mut bytes = 0;
        while self.next < stop.min(seg.end) && (out.is_empty() || bytes < max_bytes) {
            match read_record(f, self.off)? {
                Some((s, data, next)) if s == self.next => {
                    bytes += data.len();
                    out.push(Arc::from(data));
                    self.off = next;
                    self.next += 1;
                }
                _ => break,
            }
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_read_reopen_and_bound() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path(), 4 << 20).unwrap();
        assert_eq!(j.front(), None);
        for seq in 10..2010u64 {
            j.append(seq, &vec![(seq % 251) as u8; 3000]).unwrap();
        }
        // Bounded: about 4 MiB of 3 KB records, oldest dropped.
        assert!(j.bytes() <= 4 << 20);
        let front = j.front().unwrap();
        assert!(front > 10);
        assert_eq!(j.end(), Some(2010));
        let mut r = Reader::default();
        j.flush().unwrap();
        let v = j.view();
        assert!(r.read(&v, 10, 2010, 1 << 20).unwrap().is_none());
        let mut seq = front;
        while seq < 2010 {
            let recs = r.read(&v, seq, 2010, 64 << 10).unwrap().unwrap();
            assert!(!recs.is_empty());
            for rec in recs {
                assert_eq!(rec[0], (seq % 251) as u8);
                seq += 1;
            }
        }
        drop(j);
        // Tear the tail of the newest segment: reopening cuts it and keeps the rest.
        let newest = v.last().unwrap().path.clone();
        let len = fs::metadata(&newest).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&newest)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
        let mut j = Journal::open(d.path(), 4 << 20).unwrap();
        assert_eq!(j.end(), Some(2009));
        assert_eq!(j.front(), Some(front));
        j.append(2009, b"again").unwrap();
        assert_eq!(j.end(), Some(2010));
        // A non-contiguous append restarts the journal.
        j.append(5000, b"x").unwrap();
        assert_eq!(j.front(), Some(5000));
    }

    #[test]
    fn corrupt_record_is_not_returned() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path(), 64 << 20).unwrap();
        for seq in 1..=3u64 {
            j.append(seq, b"payload").unwrap();
        }
        j.flush().unwrap();
        let v = j.view();
        // Flip a payload byte of the second record.
        let f = OpenOptions::new().write(true).open(&v[0].path).unwrap();
        f.write_at(b"X", (HEADER + 7 + HEADER + 2) as u64).unwrap();
        let mut r = Reader::default();
        let recs = r.read(&v, 1, 4, 1 << 20).unwrap().unwrap();
        assert_eq!(recs.len(), 1, "reading stops at the damaged record");
    }
}
