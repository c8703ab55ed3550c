//! Session messages: handshake, acknowledgements, errors.
//!
//! A session is: master sends `Hello`; slave answers `HelloAck` (or `Refuse` and closes);
//! master streams `Ops` frames; slave answers with `Ack` (applied and durable sequence
//! numbers) and `ApplyError`; master ends an orderly session with `Bye` once everything it
//! sent is acknowledged.

use crate::history::{Epoch, History};
use crate::wire::{DecodeError, Reader, Writer};

/// Payload encoding versions this build understands (carried in `Hello`/`HelloAck` so that a
/// later build can negotiate down; the frame header version guards the framing itself).
/// 3: histories and epochs in the handshake (failover), inode flags in listings and ops.
/// 4: relays report their replicas upstream (`Downstream`).
pub const PROTO_MIN: u16 = 3;
pub const PROTO_MAX: u16 = 4;

/// Most nodes a `Downstream` report carries (a relay's replicas and theirs, at any depth).
pub const MAX_DOWNSTREAM: usize = 4096;

/// Deepest relay chain a report describes.
pub const MAX_DEPTH: u8 = 32;

/// Longest human-readable string in a message.
pub const MAX_TEXT: usize = 4096;

/// Identity of an epoch (random, made when a master generation begins).
pub type MasterId = [u8; 16];

/// `Hello` flag: the sender is a fallback upstream for this node (a second relay, or the
/// master, configured for when the node's own relay is gone). A primary upstream that
/// connects later takes the node back.
pub const HELLO_FALLBACK: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub proto_min: u16,
    pub proto_max: u16,
    /// The epochs of the ops the sender will stream (a relay sends its upstream's).
    pub history: History,
    /// Sequence number of the next op the sender holds (its head).
    pub next_seq: u64,
    /// [`HELLO_FALLBACK`], ...
    pub flags: u8,
    /// Free text for the receiver's logs (host and directory of the sender).
    pub label: String,
}

/// `HelloAck` flags: what the receiver's position is worth.
pub mod ack_flags {
    /// A sync into this tree was interrupted: its position means nothing until a new sync
    /// completes.
    pub const SYNCING: u8 = 1;
    /// ... and that sync was stashing what this tree held of its own (it had diverged).
    pub const STASHING: u8 = 2;
    /// This node last ran as a master and did not exit cleanly: it may hold ops past its
    /// recorded position.
    pub const BEYOND_KNOWN: u8 = 4;
    /// This node relays to replicas of its own.
    pub const RELAY: u8 = 8;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    /// Version chosen by the receiver within the sender's range.
    pub proto: u16,
    /// The epochs of the ops the receiver holds.
    pub history: History,
    /// The newest epoch the receiver has heard of (it may be newer than its history's).
    pub seen: Option<Epoch>,
    /// Last sequence number the receiver applied (0: none).
    pub applied: u64,
    /// [`ack_flags`].
    pub flags: u8,
    /// Free text for the sender's logs and status (the receiver's host and directory).
    pub label: String,
}

/// Why a session is refused or ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RefuseCode {
    /// Another master is connected.
    Busy = 1,
    /// No common protocol version.
    Version = 2,
    /// A frame or op could not be decoded.
    Malformed = 3,
    /// The slave is shutting down.
    ShuttingDown = 4,
    Other = 5,
    /// The receiver has seen a newer epoch than the sender's: the sender was replaced.
    Fenced = 6,
    /// The receiver belongs to another replica set.
    Foreign = 7,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refuse {
    pub code: RefuseCode,
    pub message: String,
    /// With [`RefuseCode::Fenced`]: the newer epoch.
    pub epoch: Option<Epoch>,
}

impl Refuse {
    pub fn new(code: RefuseCode, message: impl Into<String>) -> Self {
        Refuse {
            code,
            message: message.into(),
            epoch: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ack {
    /// Every op up to and including this one has been applied.
    pub applied: u64,
    /// Every op up to and including this one is durable on the slave's disk.
    pub durable: u64,
    /// Every op up to and including this one has reached the slave (it may not be applied
    /// yet); sent as soon as frames arrive, before they are applied.
    pub received: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyError {
    pub seq: u64,
    pub errno: i32,
    pub op: String,
    pub path: String,
    pub message: String,
}

fn text(w: &mut Writer<'_>, s: &str) {
    let b = s.as_bytes();
    let b = &b[..b.len().min(MAX_TEXT)];
    // Cutting may split a UTF-8 sequence; decoding is lossy, so that is harmless.
    w.bytes(b);
}

fn read_text(r: &mut Reader<'_>, what: &'static str) -> Result<String, DecodeError> {
    Ok(String::from_utf8_lossy(&r.bytes(what, MAX_TEXT)?).into_owned())
}

impl Hello {
    /// The version a receiver answers with: the newest both this build and the sender speak,
    /// or `None` when their ranges do not meet (an empty sender range meets nothing).
    pub fn common_proto(&self) -> Option<u16> {
        let lo = self.proto_min.max(PROTO_MIN);
        let hi = self.proto_max.min(PROTO_MAX);
        (lo <= hi).then_some(hi)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer { out: &mut out };
        w.u16(self.proto_min);
        w.u16(self.proto_max);
        self.history.encode(&mut w);
        w.u64(self.next_seq);
        w.u8(self.flags);
        text(&mut w, &self.label);
        out
    }

    /// Decodes a Hello. A peer of another protocol version is still understood as far as
    /// its version range, so that the refusal can say what it speaks.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let proto_min = r.u16("proto_min")?;
        let proto_max = r.u16("proto_max")?;
        if proto_max < PROTO_MIN || proto_min > PROTO_MAX {
            return Ok(Hello {
                proto_min,
                proto_max,
                history: History::default(),
                next_seq: 0,
                flags: 0,
                label: String::new(),
            });
        }
        let h = Hello {
            proto_min,
            proto_max,
            history: History::decode(&mut r)?,
            next_seq: r.u64("next_seq")?,
            flags: r.u8("flags")?,
            label: read_text(&mut r, "label")?,
        };
        r.finish()?;
        Ok(h)
    }
}

impl HelloAck {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer { out: &mut out };
        w.u16(self.proto);
        self.history.encode(&mut w);
        match &self.seen {
            Some(e) => {
                w.u8(1);
                crate::history::encode_epoch(&mut w, e);
            }
            None => w.u8(0),
        }
        w.u64(self.applied);
        w.u8(self.flags);
        text(&mut w, &self.label);
        out
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let h = HelloAck {
            proto: r.u16("proto")?,
            history: History::decode(&mut r)?,
            seen: match r.u8("seen flag")? {
                0 => None,
                1 => Some(crate::history::decode_epoch(&mut r)?),
                _ => return Err(DecodeError::Invalid("seen flag")),
            },
            applied: r.u64("applied")?,
            flags: r.u8("flags")?,
            label: read_text(&mut r, "label")?,
        };
        r.finish()?;
        Ok(h)
    }
}

impl Refuse {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer { out: &mut out };
        w.u16(self.code as u16);
        text(&mut w, &self.message);
        if let Some(e) = &self.epoch {
            crate::history::encode_epoch(&mut w, e);
        }
        out
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let code = match r.u16("refuse code")? {
            1 => RefuseCode::Busy,
            2 => RefuseCode::Version,
            3 => RefuseCode::Malformed,
            4 => RefuseCode::ShuttingDown,
            6 => RefuseCode::Fenced,
            7 => RefuseCode::Foreign,
            _ => RefuseCode::Other,
        };
        let message = read_text(&mut r, "message")?;
        let epoch = if r.remaining() > 0 {
            Some(crate::history::decode_epoch(&mut r)?)
        } else {
            None
        };
        r.finish()?;
        Ok(Refuse {
            code,
            message,
            epoch,
        })
    }
}

impl Ack {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        let mut w = Writer { out: &mut out };
        w.u64(self.applied);
        w.u64(self.durable);
        w.u64(self.received);
        out
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let a = Ack {
            applied: r.u64("applied")?,
            durable: r.u64("durable")?,
            received: r.u64("received")?,
        };
        r.finish()?;
        Ok(a)
    }
}

impl ApplyError {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer { out: &mut out };
        w.u64(self.seq);
        w.i32(self.errno);
        text(&mut w, &self.op);
        text(&mut w, &self.path);
        text(&mut w, &self.message);
        out
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let a = ApplyError {
            seq: r.u64("seq")?,
            errno: r.i32("errno")?,
            op: read_text(&mut r, "op")?,
            path: read_text(&mut r, "path")?,
            message: read_text(&mut r, "message")?,
        };
        r.finish()?;
        Ok(a)
    }
}

/// One replica below a relay, as the relay sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DownNode {
    /// 1: the relay's own replica; 2: a replica of that one; ...
    pub depth: u8,
    /// The address the relay (or the relay above it) connects to.
    pub addr: String,
    /// What the replica calls itself (host and directory).
    pub label: String,
    /// streaming, catching up, syncing, disconnected or error.
    pub state: String,
    /// Last sequence number it applied.
    pub applied: u64,
    /// Ops behind its own upstream (the relay), and for how long, in milliseconds.
    pub lag_ops: u64,
    pub lag_ms: u64,
    pub syncs: u64,
    pub sync_bytes: u64,
    pub last_error: String,
}

/// A relay's report of its replicas, depth first (each node followed by those below it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Downstream {
    pub nodes: Vec<DownNode>,
}

impl Downstream {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer { out: &mut out };
        let n = self.nodes.len().min(MAX_DOWNSTREAM);
        w.u32(n as u32);
        for d in &self.nodes[..n] {
            w.u8(d.depth);
            text(&mut w, &d.addr);
            text(&mut w, &d.label);
            text(&mut w, &d.state);
            w.u64(d.applied);
            w.u64(d.lag_ops);
            w.u64(d.lag_ms);
            w.u64(d.syncs);
            w.u64(d.sync_bytes);
            text(&mut w, &d.last_error);
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let n = r.u32("node count")? as usize;
        if n > MAX_DOWNSTREAM {
            return Err(DecodeError::Invalid("too many downstream nodes"));
        }
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            let depth = r.u8("depth")?;
            if depth == 0 || depth > MAX_DEPTH {
                return Err(DecodeError::Invalid("downstream depth out of range"));
            }
            nodes.push(DownNode {
                depth,
                addr: read_text(&mut r, "addr")?,
                label: read_text(&mut r, "label")?,
                state: read_text(&mut r, "state")?,
                applied: r.u64("applied")?,
                lag_ops: r.u64("lag ops")?,
                lag_ms: r.u64("lag ms")?,
                syncs: r.u64("syncs")?,
                sync_bytes: r.u64("sync bytes")?,
                last_error: read_text(&mut r, "last error")?,
            });
        }
        r.finish()?;
        Ok(Downstream { nodes })
    }
}
