//! A fault-injecting TCP proxy to put between a master and a slave.
//!
//! [`Proxy::start`] listens on `127.0.0.1:0` and forwards every connection it accepts to a
//! target (the slave), two plain threads per connection. While it runs, a test can:
//!
//! * [`Proxy::drop_all`]: close every current connection (both sides), and keep accepting;
//! * [`Proxy::stall`]: stop forwarding bytes (either way) but keep the connections open;
//! * [`Proxy::truncate_next`]: forward only the first half of the next master→slave chunk,
//!   then close that connection;
//! * [`Proxy::flip_next`]: flip one byte inside the payload of the next master→slave `Ops`
//!   (or `SyncOps`) frame, so that the frame's crc no longer matches;
//! * [`Proxy::refuse`]: close new connections right after accepting them.
//!
//! A proxy started with [`Proxy::start_framed`] forwards whole frames only, and can play an
//! attacker on the path who sees frame boundaries ([`Proxy::frame_fault`]): change a byte of
//! the next op frame's payload or header (fixing the crc where there is one), inject a
//! frame before it, replay an earlier one after it, drop it, or swap it with the frame after
//! it; and it can record what the master sends ([`Proxy::recorded`]).
//!
//! It counts bytes forwarded each way and every fault it injected. Every thread ends when
//! the proxy is dropped: sockets poll with short timeouts and are shut down on drop.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tdfs_protocol::frame::{self, FrameType, HEADER_LEN, MAGIC};

/// How long a blocked read or accept waits before looking at the controls again.
const POLL: Duration = Duration::from_millis(20);
/// How long connecting to the target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CHUNK: usize = 64 * 1024;

/// One forwarded connection: both sockets (clones, to shut them down from any thread).
struct Conn {
    client: TcpStream,
    upstream: TcpStream,
    /// Forwarding threads still running for this connection (0..=2).
    pumps: AtomicU8,
}

impl Conn {
    fn close(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }
}

/// What an attacker on the path does to the next op frame (`Ops` towards the slave, `Ack`
/// towards the master) of a stream, after the handshake.
pub enum FrameFault {
    /// Flip a byte in the middle of its payload.
    FlipPayload,
    /// Flip a byte of its header (the sequence number).
    FlipHeader,
    /// Send these bytes just before it; the function gets its header's sequence number.
    Inject(Box<dyn FnOnce(u64) -> Vec<u8> + Send>),
    /// Send the op frame before it again, right after it.
    Replay,
    /// Do not send it.
    Drop,
    /// Send the frame after it first.
    Reorder,
}

impl std::fmt::Debug for FrameFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FrameFault::FlipPayload => "FlipPayload",
            FrameFault::FlipHeader => "FlipHeader",
            FrameFault::Inject(_) => "Inject",
            FrameFault::Replay => "Replay",
            FrameFault::Drop => "Drop",
            FrameFault::Reorder => "Reorder",
        })
    }
}

#[derive(Default)]
struct Inner {
    closing: AtomicBool,
    /// Forward whole frames only ([`Proxy::start_framed`]).
    framed: bool,
    /// A frame fault waiting for its frame, and the direction it applies to.
    frame_fault: Mutex<Option<(Dir, FrameFault)>>,
    frame_faults: AtomicU64,
    /// What the master sent, while recording.
    recording: Mutex<Option<Vec<u8>>>,
    stalled: AtomicBool,
    refusing: AtomicBool,
    truncate: AtomicBool,
    flip: AtomicBool,
    to_slave: AtomicU64,
    to_master: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    upstream_failures: AtomicU64,
    dropped: AtomicU64,
    truncated: AtomicU64,
    flipped: AtomicU64,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().expect("proxy connection table poisoned")
    }

    fn close(&self, id: u64) {
        if let Some(c) = self.conns().remove(&id) {
            c.close();
        }
    }
}

/// A running proxy; dropping it closes every connection and joins every thread.
pub struct Proxy {
    inner: Arc<Inner>,
    addr: SocketAddr,
    target: String,
    acceptor: Option<JoinHandle<()>>,
}

/// Which way bytes flow through a forwarding thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    ToSlave,
    ToMaster,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards to `target` (`HOST:PORT`).
    pub fn start(target: &str) -> Proxy {
        Self::start_with(target, false)
    }

    /// [`Proxy::start`], forwarding whole frames only (a stream that is not made of frames,
    /// TLS for one, is forwarded as it comes), so that [`Proxy::frame_fault`] can work.
    pub fn start_framed(target: &str) -> Proxy {
        Self::start_with(target, true)
    }

    fn start_with(target: &str, framed: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy: bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("proxy: non-blocking listener");
        let addr = listener.local_addr().expect("proxy: local address");
        let inner = Arc::new(Inner {
            framed,
            ..Inner::default()
        });
        let acceptor = {
            let inner = inner.clone();
            let target = target.to_string();
            std::thread::Builder::new()
                .name("proxy-accept".into())
                .spawn(move || accept_loop(listener, &target, &inner))
                .expect("proxy: spawn the accept thread")
        };
        Proxy {
            inner,
            addr,
            target: target.to_string(),
            acceptor: Some(acceptor),
        }
    }

    /// `127.0.0.1:PORT`: what to give the master instead of the slave's address.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Where connections are forwarded.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Closes every current connection (both sides); returns how many. New connections are
    /// still accepted.
    pub fn drop_all(&self) -> usize {
        let all: Vec<Arc<Conn>> = self.inner.conns().drain().map(|(_, c)| c).collect();
        for c in &all {
            c.close();
        }
        self.inner
            .dropped
            .fetch_add(all.len() as u64, Ordering::SeqCst);
        all.len()
    }

    /// Stops (true) or resumes (false) forwarding bytes, both ways; connections stay open,
    /// and what the peers send meanwhile waits in the socket buffers.
    pub fn stall(&self, on: bool) {
        self.inner.stalled.store(on, Ordering::SeqCst);
    }

    /// The next master→slave chunk is forwarded only in part, then its connection closes.
    pub fn truncate_next(&self) {
        self.inner.truncate.store(true, Ordering::SeqCst);
    }

    /// Flips one byte in the payload of the next master→slave `Ops` or `SyncOps` frame (the
    /// header is left alone, so the receiver sees a well-formed frame whose crc does not
    /// match).
    pub fn flip_next(&self) {
        self.inner.flip.store(true, Ordering::SeqCst);
    }

    /// Arms `fault` for the next op frame going `dir` (a framed proxy only). Replaces a
    /// fault still waiting.
    pub fn frame_fault(&self, dir: Dir, fault: FrameFault) {
        assert!(self.inner.framed, "frame faults need Proxy::start_framed");
        *self.inner.frame_fault.lock().expect("fault") = Some((dir, fault));
    }

    /// Frame faults carried out so far (a reorder counts once both frames went out).
    pub fn frame_faults(&self) -> u64 {
        self.inner.frame_faults.load(Ordering::SeqCst)
    }

    /// Starts (true) or stops recording what the master sends (framed proxies only).
    pub fn record(&self, on: bool) {
        *self.inner.recording.lock().expect("recording") = on.then(Vec::new);
    }

    /// What the master sent since recording started.
    pub fn recorded(&self) -> Vec<u8> {
        self.inner
            .recording
            .lock()
            .expect("recording")
            .clone()
            .unwrap_or_default()
    }

    /// Closes (true) new connections right after accepting them, or forwards them again
    /// (false). Current connections are not touched.
    pub fn refuse(&self, on: bool) {
        self.inner.refusing.store(on, Ordering::SeqCst);
    }

    /// Bytes forwarded master→slave (counted as each chunk is handed on, so a chunk whose write
    /// failed as the connection died is counted too).
    pub fn to_slave(&self) -> u64 {
        self.inner.to_slave.load(Ordering::SeqCst)
    }

    /// Bytes forwarded slave→master (counted as each chunk is handed on, so a chunk whose write
    /// failed as the connection died is counted too).
    pub fn to_master(&self) -> u64 {
        self.inner.to_master.load(Ordering::SeqCst)
    }

    /// Connections accepted and forwarded (refused ones not counted).
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    /// Connections closed right after accept by [`Proxy::refuse`].
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::SeqCst)
    }

    /// Accepted connections closed because the target could not be reached.
    pub fn upstream_failures(&self) -> u64 {
        self.inner.upstream_failures.load(Ordering::SeqCst)
    }

    /// Connections closed by [`Proxy::drop_all`].
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::SeqCst)
    }

    /// Chunks cut short by [`Proxy::truncate_next`].
    pub fn truncated(&self) -> u64 {
        self.inner.truncated.load(Ordering::SeqCst)
    }

    /// Bytes flipped by [`Proxy::flip_next`].
    pub fn flipped(&self) -> u64 {
        self.inner.flipped.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn active(&self) -> usize {
        self.inner.conns().len()
    }

    /// One line with every counter, for test output.
    pub fn stats(&self) -> String {
        format!(
            "proxy {} -> {}: {} bytes to the slave, {} to the master; {} connections \
             forwarded, {} refused, {} upstream failures, {} dropped, {} truncated, {} flipped",
            self.addr,
            self.target,
            self.to_slave(),
            self.to_master(),
            self.accepted(),
            self.refused(),
            self.upstream_failures(),
            self.dropped(),
            self.truncated(),
            self.flipped()
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        // The acceptor is gone, so no thread is added from here on.
        self.drop_all();
        let threads = std::mem::take(&mut *self.inner.threads.lock().expect("threads"));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target: &str, inner: &Arc<Inner>) {
    while !inner.closing.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(POLL);
                continue;
            }
            Err(e) => {
                eprintln!("proxy: accept failed: {e}");
                std::thread::sleep(POLL);
                continue;
            }
        };
        if inner.refusing.load(Ordering::SeqCst) {
            inner.refused.fetch_add(1, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        match connect(target) {
            Ok(upstream) => forward(client, upstream, inner),
            Err(e) => {
                inner.upstream_failures.fetch_add(1, Ordering::SeqCst);
                eprintln!("proxy: cannot reach {target}: {e}");
                let _ = client.shutdown(Shutdown::Both);
            }
        }
        // Forget threads that are done, so a long run does not pile up handles.
        let mut threads = inner.threads.lock().expect("threads");
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut *threads)
            .into_iter()
            .partition(|t| t.is_finished());
        *threads = running;
        drop(threads);
        for t in done {
            let _ = t.join();
        }
    }
}

fn connect(target: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in target.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn forward(client: TcpStream, upstream: TcpStream, inner: &Arc<Inner>) {
    let setup = || -> io::Result<[TcpStream; 4]> {
        client.set_nonblocking(false)?;
        for s in [&client, &upstream] {
            s.set_read_timeout(Some(POLL))?;
            s.set_nodelay(true)?;
        }
        Ok([
            client.try_clone()?,
            upstream.try_clone()?,
            upstream.try_clone()?,
            client.try_clone()?,
        ])
    };
    let [c_rd, u_wr, u_rd, c_wr] = match setup() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("proxy: setting up a connection: {e}");
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
            return;
        }
    };
    let id = inner.next_id.fetch_add(1, Ordering::SeqCst);
    let conn = Arc::new(Conn {
        client,
        upstream,
        pumps: AtomicU8::new(2),
    });
    inner.conns().insert(id, conn.clone());
    inner.accepted.fetch_add(1, Ordering::SeqCst);
    let mut threads = inner.threads.lock().expect("threads");
    for (dir, from, to) in [(Dir::ToSlave, c_rd, u_wr), (Dir::ToMaster, u_rd, c_wr)] {
        let shared = inner.clone();
        let conn = conn.clone();
        let t = std::thread::Builder::new()
            .name(format!("proxy-{id}-{dir:?}"))
            .spawn(move || {
                if shared.framed {
                    pump_frames(dir, from, to, id, &shared);
                } else {
                    pump(dir, from, to, id, &shared);
                }
                if conn.pumps.fetch_sub(1, Ordering::SeqCst) == 1 {
                    // Both directions are done.
                    shared.close(id);
                }
            });
        match t {
            Ok(t) => threads.push(t),
            Err(e) => {
                eprintln!("proxy: cannot spawn a forwarding thread: {e}");
                drop(threads);
                inner.close(id);
                return;
            }
        }
    }
}

/// What one read of a pump gave.
enum Pumped {
    Got(usize),
    /// Nothing yet (stalled, timed out, interrupted): read again.
    Again,
    /// The pump is done: EOF (passed on as a half-close), an error, or the proxy closing.
    End,
}

/// One read for [`pump`] and [`pump_frames`], honouring stalls and closing.
fn read_some(
    from: &mut TcpStream,
    to: &mut TcpStream,
    buf: &mut [u8],
    id: u64,
    inner: &Inner,
) -> Pumped {
    if inner.closing.load(Ordering::SeqCst) {
        return Pumped::End;
    }
    if inner.stalled.load(Ordering::SeqCst) {
        std::thread::sleep(POLL);
        return Pumped::Again;
    }
    match from.read(buf) {
        Ok(0) => {
            let _ = to.shutdown(Shutdown::Write);
            Pumped::End
        }
        Ok(n) => Pumped::Got(n),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) =>
        {
            Pumped::Again
        }
        Err(_) => {
            inner.close(id);
            Pumped::End
        }
    }
}

/// Copies `from` to `to` until EOF (passed on as a half-close), an error, a fault or the
/// proxy closing.
fn pump(dir: Dir, mut from: TcpStream, mut to: TcpStream, id: u64, inner: &Inner) {
    let mut buf = vec![0u8; CHUNK];
    let mut frames = FrameTracker::default();
    loop {
        let n = match read_some(&mut from, &mut to, &mut buf, id, inner) {
            Pumped::Got(n) => n,
            Pumped::Again => continue,
            Pumped::End => return,
        };
        let chunk = &mut buf[..n];
        let mut len = n;
        let mut cut = false;
        if dir == Dir::ToSlave {
            let payload_at = frames.feed(chunk);
            if let Some(i) = payload_at {
                if inner.flip.swap(false, Ordering::SeqCst) {
                    chunk[i] ^= 0x5a;
                    inner.flipped.fetch_add(1, Ordering::SeqCst);
                }
            }
            if inner.truncate.swap(false, Ordering::SeqCst) {
                len = n / 2;
                cut = true;
                inner.truncated.fetch_add(1, Ordering::SeqCst);
            }
        }
        // Counted before the write: whoever reads the bytes at the other end must find them
        // counted already (counting after let a test see its echo before the count).
        let counter = match dir {
            Dir::ToSlave => &inner.to_slave,
            Dir::ToMaster => &inner.to_master,
        };
        counter.fetch_add(len as u64, Ordering::SeqCst);
        if to.write_all(&chunk[..len]).is_err() {
            inner.close(id);
            return;
        }
        if cut {
            inner.close(id);
            return;
        }
    }
}

/// What a framed pump holds between frames.
#[derive(Default)]
struct FramePump {
    buf: Vec<u8>,
    /// Not a frame stream: forward bytes as they come.
    raw: bool,
    /// The last op frame forwarded (for a replay).
    last_op: Option<Vec<u8>>,
    /// An op frame held back until the next frame has gone out (a reorder).
    held: Option<Vec<u8>>,
}

/// Recomputes the crc of a plain frame after a change (a sealed frame has none: its tag
/// cannot be fixed up by anyone without the keys).
fn fix_crc(f: &mut [u8]) {
    if frame::is_sealed(f) {
        return;
    }
    let wire_len = u32::from_le_bytes(f[16..20].try_into().expect("4 bytes")) as usize;
    let mut h = crc32fast::Hasher::new();
    h.update(&f[..24]);
    h.update(&f[HEADER_LEN..HEADER_LEN + wire_len]);
    let crc = h.finalize();
    f[24..28].copy_from_slice(&crc.to_le_bytes());
}

/// [`pump`] for a framed proxy: forwards whole frames, applying a frame fault to the first
/// op frame going this way once one is armed.
fn pump_frames(dir: Dir, mut from: TcpStream, mut to: TcpStream, id: u64, inner: &Inner) {
    let mut chunk = vec![0u8; CHUNK];
    let mut st = FramePump::default();
    loop {
        let n = match read_some(&mut from, &mut to, &mut chunk, id, inner) {
            Pumped::Got(n) => n,
            Pumped::Again => continue,
            Pumped::End => return,
        };
        st.buf.extend_from_slice(&chunk[..n]);
        let mut out: Vec<Vec<u8>> = Vec::new();
        if st.raw {
            out.push(std::mem::take(&mut st.buf));
        } else {
            loop {
                match frame::frame_len(&st.buf) {
                    Ok(len) if st.buf.len() >= len => {
                        let f: Vec<u8> = st.buf.drain(..len).collect();
                        on_frame(dir, f, &mut st, inner, &mut out);
                    }
                    Ok(_) | Err(tdfs_protocol::FrameError::Incomplete) => break,
                    Err(_) => {
                        st.raw = true;
                        out.push(std::mem::take(&mut st.buf));
                        break;
                    }
                }
            }
        }
        for piece in out {
            let counter = match dir {
                Dir::ToSlave => &inner.to_slave,
                Dir::ToMaster => &inner.to_master,
            };
            counter.fetch_add(piece.len() as u64, Ordering::SeqCst);
            if dir == Dir::ToSlave {
                if let Some(r) = inner.recording.lock().expect("recording").as_mut() {
                    if r.len() < 256 << 20 {
                        r.extend_from_slice(&piece);
                    }
                }
            }
            if to.write_all(&piece).is_err() {
                inner.close(id);
                return;
            }
        }
    }
}

/// One whole frame arrived: decides what goes out in its place.
fn on_frame(dir: Dir, mut f: Vec<u8>, st: &mut FramePump, inner: &Inner, out: &mut Vec<Vec<u8>>) {
    if let Some(h) = st.held.take() {
        out.push(f);
        out.push(h);
        inner.frame_faults.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let op_kind = match dir {
        Dir::ToSlave => FrameType::Ops,
        Dir::ToMaster => FrameType::Ack,
    };
    if f[5] != op_kind as u8 {
        out.push(f);
        return;
    }
    let fault = {
        let mut g = inner.frame_fault.lock().expect("fault");
        match g.take() {
            Some((d, FrameFault::Replay)) if d == dir && st.last_op.is_none() => {
                // Nothing to replay yet: wait for one more op frame.
                *g = Some((d, FrameFault::Replay));
                None
            }
            Some((d, fault)) if d == dir => Some(fault),
            other => {
                *g = other;
                None
            }
        }
    };
    let seq = u64::from_le_bytes(f[8..16].try_into().expect("8 bytes"));
    let mut done = true;
    match fault {
        None => {
            done = false;
            out.push(f.clone());
        }
        Some(FrameFault::FlipPayload) => {
            let wire_len = u32::from_le_bytes(f[16..20].try_into().expect("4 bytes")) as usize;
            f[HEADER_LEN + wire_len / 2] ^= 0x5a;
            fix_crc(&mut f);
            out.push(f.clone());
        }
        Some(FrameFault::FlipHeader) => {
            f[8] ^= 0x01;
            fix_crc(&mut f);
            out.push(f.clone());
        }
        Some(FrameFault::Inject(build)) => {
            out.push(build(seq));
            out.push(f.clone());
        }
        Some(FrameFault::Replay) => {
            out.push(f.clone());
            out.push(st.last_op.clone().expect("checked above"));
        }
        Some(FrameFault::Drop) => {}
        Some(FrameFault::Reorder) => {
            st.held = Some(f.clone());
            done = false;
        }
    }
    if done {
        inner.frame_faults.fetch_add(1, Ordering::SeqCst);
    }
    st.last_op = Some(f);
}

/// Follows the frames of one master→slave stream (plain frames from its first byte: no TLS,
/// no shared secret), to find bytes that belong to the payload of an op frame.
#[derive(Default)]
struct FrameTracker {
    header: Vec<u8>,
    kind: u8,
    payload_left: usize,
    /// Not a frame stream (or out of step): stop looking.
    lost: bool,
}

impl FrameTracker {
    /// Feeds the next chunk of the stream; returns the index (in `chunk`) of a byte in the
    /// payload of an `Ops` or `SyncOps` frame, if the chunk holds one.
    fn feed(&mut self, chunk: &[u8]) -> Option<usize> {
        let mut found = None;
        let mut i = 0;
        while i < chunk.len() && !self.lost {
            if self.payload_left > 0 {
                let n = self.payload_left.min(chunk.len() - i);
                let op_frame =
                    self.kind == FrameType::Ops as u8 || self.kind == FrameType::SyncOps as u8;
                if found.is_none() && op_frame {
                    found = Some(i + n / 2);
                }
                self.payload_left -= n;
                i += n;
            } else {
                let n = (HEADER_LEN - self.header.len()).min(chunk.len() - i);
                self.header.extend_from_slice(&chunk[i..i + n]);
                i += n;
                if self.header.len() == HEADER_LEN {
                    if self.header[..4] != MAGIC {
                        self.lost = true;
                        break;
                    }
                    self.kind = self.header[5];
                    let wire_len = u32::from_le_bytes(
                        self.header[16..20].try_into().expect("4 bytes of length"),
                    );
                    self.payload_left = wire_len as usize;
                    self.header.clear();
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tdfs_protocol::frame;
    use tdfs_protocol::Compression;

    #[test]
    fn tracker_finds_op_payload_across_chunks() {
        let mut wire = frame::encode_vec(FrameType::Hello, 0, b"hello payload", Compression::None);
        let ops_at = wire.len();
        wire.extend(frame::encode_vec(
            FrameType::Ops,
            1,
            &[7u8; 100],
            Compression::None,
        ));
        // Split inside the Ops header: only the second chunk holds op payload.
        let split = ops_at + 10;
        let mut t = FrameTracker::default();
        assert_eq!(t.feed(&wire[..split]), None);
        let i = t.feed(&wire[split..]).expect("op payload found");
        let abs = split + i;
        assert!(abs >= ops_at + HEADER_LEN && abs < wire.len(), "{abs}");
        assert!(!t.lost);
        // A flipped payload byte is caught by the crc.
        let mut bad = wire[ops_at..].to_vec();
        bad[abs - ops_at] ^= 0x5a;
        let err = frame::parse(&bad).unwrap_err();
        assert!(format!("{err}").contains("crc"), "{err}");
    }

    #[test]
    fn forwards_counts_and_drops() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap().to_string();
        let echo = std::thread::spawn(move || {
            // Echo two connections, then stop.
            for _ in 0..2 {
                let (mut s, _) = server.accept().unwrap();
                let mut b = [0u8; 1024];
                loop {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&b[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        let p = Proxy::start(&target);
        let mut c = TcpStream::connect(p.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        assert_eq!(p.to_slave(), 4);
        assert_eq!(p.to_master(), 4);
        assert_eq!(p.drop_all(), 1);
        // The client sees the connection end.
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        assert!(rest.is_empty());
        // Refused connections are closed at once.
        p.refuse(true);
        let mut r = TcpStream::connect(p.addr()).unwrap();
        r.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(r.read(&mut b), Ok(0) | Err(_)));
        assert!(crate::util::wait_until(Duration::from_secs(10), || p
            .refused()
            == 1));
        p.refuse(false);
        // Truncation forwards half of the next chunk and closes.
        let mut c2 = TcpStream::connect(p.addr()).unwrap();
        c2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert!(crate::util::wait_until(Duration::from_secs(10), || p
            .accepted()
            == 2));
        let before = p.to_slave();
        p.truncate_next();
        c2.write_all(b"12345678").unwrap();
        let mut back = Vec::new();
        let _ = c2.read_to_end(&mut back);
        assert_eq!(p.to_slave() - before, 4);
        assert_eq!(p.truncated(), 1);
        drop(p);
        echo.join().unwrap();
    }
}
