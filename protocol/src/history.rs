//! Epochs and histories: what makes failover safe.
//!
//! Every master generation is an **epoch**: a number that only grows (a promoted replica
//! takes a higher one than any it has seen), a random id (so that two promotions to one
//! number by mistake are never taken for one another), and the sequence number its first op
//! got. A node's **history** is the list of epochs whose ops it holds, oldest first; the
//! first epoch's id names the replica set. Sequence numbers run on across epochs, so a
//! position is one number, and the history says which master issued it.
//!
//! When an upstream node (a master, or a relay) meets a downstream one, [`standing`]
//! compares their histories (as DRBD compares generation identifiers, and Raft log terms):
//! the downstream may be **behind** on the same line (resume, or sync, and nothing it holds
//! is lost); it may have **diverged** (it applied ops after the point where the upstream's
//! line branched off: those must be stashed before it is made identical); or it may have
//! seen a **newer** epoch, in which case the upstream is stale and must stop (fencing).

use crate::wire::{DecodeError, Reader, Writer};

/// Most epochs a history carries on the wire (one per promotion: far more than any replica
/// set goes through; older ones are dropped oldest first, the genesis kept).
pub const MAX_EPOCHS: usize = 1024;

/// A master generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch {
    pub number: u64,
    pub id: [u8; 16],
    /// Sequence number of the first op of this epoch.
    pub start: u64,
}

impl Epoch {
    /// Same epoch: same number and same id (the start follows).
    pub fn same(&self, other: &Epoch) -> bool {
        self.number == other.number && self.id == other.id
    }

    /// Short form for logs: `3/1a2b3c4d`.
    pub fn short(&self) -> String {
        let id: String = self.id[..4].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}/{id}", self.number)
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "epoch {} (from seq {})", self.short(), self.start)
    }
}

/// The epochs a node's ops come from, oldest first (empty: a node that holds nothing yet).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct History {
    pub epochs: Vec<Epoch>,
}

impl History {
    /// A new replica set: its first epoch, numbered 1, starting at `start`.
    pub fn genesis(id: [u8; 16], start: u64) -> Self {
        History {
            epochs: vec![Epoch {
                number: 1,
                id,
                start,
            }],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.epochs.is_empty()
    }

    /// The current (newest) epoch.
    pub fn last(&self) -> Option<&Epoch> {
        self.epochs.last()
    }

    /// The replica set's id: the first epoch's.
    pub fn set_id(&self) -> Option<[u8; 16]> {
        self.epochs.first().map(|e| e.id)
    }

    /// Whether this history holds epoch `e`.
    pub fn contains(&self, e: &Epoch) -> bool {
        self.epochs.iter().any(|x| x.same(e))
    }

    /// The epoch that issued `seq` in this history.
    pub fn epoch_of(&self, seq: u64) -> Option<&Epoch> {
        self.epochs.iter().rev().find(|e| e.start <= seq)
    }

    /// A history that goes on with a new epoch (a promotion): numbered above both this
    /// history's and `seen` (the newest epoch heard of), starting at `start`.
    pub fn promoted(&self, id: [u8; 16], start: u64, seen: Option<&Epoch>) -> History {
        let number = self
            .last()
            .map(|e| e.number)
            .max(seen.map(|e| e.number))
            .unwrap_or(0)
            + 1;
        let mut h = self.clone();
        h.epochs.push(Epoch { number, id, start });
        h.trim();
        h
    }

    fn trim(&mut self) {
        if self.epochs.len() > MAX_EPOCHS {
            let excess = self.epochs.len() - MAX_EPOCHS;
            self.epochs.drain(1..1 + excess);
        }
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        self.encode(&mut Writer { out });
    }

    pub(crate) fn encode(&self, w: &mut Writer<'_>) {
        let n = self.epochs.len().min(MAX_EPOCHS);
        w.u16(n as u16);
        for e in &self.epochs[self.epochs.len() - n..] {
            encode_epoch(w, e);
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let n = r.u16("epoch count")? as usize;
        if n > MAX_EPOCHS {
            return Err(DecodeError::TooLarge {
                what: "history",
                len: n,
                max: MAX_EPOCHS,
            });
        }
        let mut epochs: Vec<Epoch> = Vec::with_capacity(n);
        for _ in 0..n {
            let e = decode_epoch(r)?;
            if let Some(p) = epochs.last() {
                if e.number <= p.number || e.start < p.start {
                    return Err(DecodeError::Invalid(
                        "history epochs out of order (numbers and starts must grow)",
                    ));
                }
            }
            epochs.push(e);
        }
        Ok(History { epochs })
    }
}

pub(crate) fn encode_epoch(w: &mut Writer<'_>, e: &Epoch) {
    w.u64(e.number);
    w.out.extend_from_slice(&e.id);
    w.u64(e.start);
}

pub(crate) fn decode_epoch(r: &mut Reader<'_>) -> Result<Epoch, DecodeError> {
    Ok(Epoch {
        number: r.u64("epoch number")?,
        id: r.array("epoch id")?,
        start: r.u64("epoch start")?,
    })
}

/// Where a downstream node stands with respect to an upstream one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// It holds nothing yet, or only ops of the upstream's line: it continues after its
    /// position (from the upstream's log, or by an incremental sync), and nothing it holds
    /// is lost by being made identical.
    Behind,
    /// It applied ops after seq `branch` that the upstream's line does not have (the
    /// upstream was promoted while those were in flight, or it was a master cut off from
    /// the others). Whatever it would lose must be stashed first.
    Diverged { branch: u64 },
    /// It has seen `newer`, an epoch newer than the upstream's (or another of the same
    /// number): the upstream was replaced and must stop.
    Fenced { newer: Epoch },
    /// It belongs to another replica set.
    Foreign { set: [u8; 16] },
}

/// How `down` (its history, the newest epoch it has heard of, and its position) stands
/// with respect to an upstream node whose history is `up`. `beyond_known`: the downstream's
/// position may lie past `applied` (it was a master that did not exit cleanly, so the last
/// ops it issued were never recorded).
pub fn standing(
    up: &History,
    down: &History,
    down_seen: Option<&Epoch>,
    applied: u64,
    beyond_known: bool,
) -> Standing {
    let (Some(up_last), Some(up_first)) = (up.last(), up.epochs.first()) else {
        // An upstream without a history has nothing to compare with; it never streams.
        return Standing::Behind;
    };
    if let Some(down_first) = down.epochs.first() {
        if down_first.id != up_first.id {
            return Standing::Foreign { set: down_first.id };
        }
    }
    // The newest epoch the downstream knows of, from its history or from hearsay.
    let newest = match (down.last(), down_seen) {
        (Some(a), Some(b)) => Some(if b.number > a.number { b } else { a }),
        (a, b) => a.or(b),
    };
    if let Some(n) = newest {
        if n.number > up_last.number || (n.number == up_last.number && n.id != up_last.id) {
            return Standing::Fenced { newer: *n };
        }
    }
    if down.epochs.is_empty() {
        // Holds nothing of any epoch (a new node, or one whose history was reset).
        return if applied == 0 && !beyond_known {
            Standing::Behind
        } else {
            Standing::Diverged { branch: 0 }
        };
    }
    // The newest epoch both lines hold: up to where each of them left it, they agree.
    let (di, common) = down
        .epochs
        .iter()
        .enumerate()
        .rev()
        .find(|(_, e)| up.contains(e))
        .expect("both histories start with the same genesis epoch");
    let ui = up
        .epochs
        .iter()
        .position(|e| e.same(common))
        .expect("found in up");
    let up_end = up.epochs.get(ui + 1).map_or(u64::MAX, |e| e.start - 1);
    let down_end = down.epochs.get(di + 1).map_or(u64::MAX, |e| e.start - 1);
    let branch = up_end.min(down_end);
    if beyond_known && branch < u64::MAX || applied > branch {
        Standing::Diverged { branch }
    } else {
        Standing::Behind
    }
}
