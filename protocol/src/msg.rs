//! Session messages: handshake, acknowledgements, errors.
//!
//! A session is: master sends `Hello`; slave answers `HelloAck` (or `Refuse` and closes);
//! master streams `Ops` frames; slave answers with `Ack` (applied and durable sequence
//! numbers) and `ApplyError`; master ends an orderly session with `Bye` once everything it
//! sent is acknowledged.

use crate::wire::{DecodeError, Reader, Writer};

/// Payload encoding versions this build understands (carried in `Hello`/`HelloAck` so that a
/// later build can negotiate down; the frame header version guards the framing itself).
pub const PROTO_MIN: u16 = 2;
pub const PROTO_MAX: u16 = 2;

/// Longest human-readable string in a message.
pub const MAX_TEXT: usize = 4096;

/// Identity of a master (random, created once per state dir).
pub type MasterId = [u8; 16];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub proto_min: u16,
    pub proto_max: u16,
    pub master_id: MasterId,
    /// Sequence number of the next op the master will send on this session.
    pub next_seq: u64,
    /// Free text for the slave's logs (host and directory of the master).
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    /// Version chosen by the slave within the master's range.
    pub proto: u16,
    /// Master whose ops the slave applied last (all zero when none).
    pub last_master: MasterId,
    /// Last sequence number the slave applied from `last_master`.
    pub last_applied: u64,
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refuse {
    pub code: RefuseCode,
    pub message: String,
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
        w.out.extend_from_slice(&self.master_id);
        w.u64(self.next_seq);
        text(&mut w, &self.label);
        out
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let h = Hello {
            proto_min: r.u16("proto_min")?,
            proto_max: r.u16("proto_max")?,
            master_id: r.array("master id")?,
            next_seq: r.u64("next_seq")?,
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
        w.out.extend_from_slice(&self.last_master);
        w.u64(self.last_applied);
        out
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let h = HelloAck {
            proto: r.u16("proto")?,
            last_master: r.array("master id")?,
            last_applied: r.u64("last_applied")?,
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
        out
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let code = match r.u16("refuse code")? {
            1 => RefuseCode::Busy,
            2 => RefuseCode::Version,
            3 => RefuseCode::Malformed,
            4 => RefuseCode::ShuttingDown,
            _ => RefuseCode::Other,
        };
        let message = read_text(&mut r, "message")?;
        r.finish()?;
        Ok(Refuse { code, message })
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
