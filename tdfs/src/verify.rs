//! `tdfs verify`: proves a replica identical to a directory, or says exactly where not.
//!
//! Walks DIR and each slave's tree side by side (the slave answers listings and content
//! digests in a read-only session, so no file crosses the network and a running master is
//! not disturbed), compares every attribute a mirror must keep, prints each difference with
//! its path and kind, and exits 1 when anything differs. `--repair` then brings the slave to
//! identical with a checksumming sync (which needs the slave's master slot: stop the master
//! first, or let the master's own sync do it).

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

use tdfs_protocol::sync::Entry;
use tdfs_protocol::{Compression, WirePath};
use tdfs_replication::tree::Tree;

use crate::backing::BackingTree;

use tdfs_replication::node::NodeState;
use tdfs_replication::repl::{
    self as repl, Inspector, Origin, ReplConfig, Replicator, SlaveConfig,
};

/// Compare a directory with its replicas on every attribute a mirror keeps (type, content,
/// size, mode, owner, mtime in ns, symlink target, hard links, xattrs, inode flags and
/// project ids, device numbers).
/// Content checksums are computed on each side, where the data lives. Exits 0 when every
/// replica is identical, 1 when anything differs, 2 on errors.
#[derive(Parser, Debug)]
#[command(name = "tdfs verify", version)]
pub struct VerifyCli {
    /// The directory to compare against (a master's backing directory).
    #[arg(short = 'm', value_name = "DIR")]
    dir: PathBuf,

    /// A slave, as HOST[:PORT]; repeat for several.
    #[arg(short = 'c', value_name = "HOST[:PORT]", required = true)]
    slaves: Vec<String>,

    /// Make the slaves identical: an incremental sync that compares content checksums. The
    /// slave must not be connected to a running master meanwhile.
    #[arg(long)]
    repair: bool,

    #[command(flatten)]
    auth: tdfs_replication::outbound::SlaveAuthArgs,

    /// Print nothing but differences and errors.
    #[arg(short = 'q')]
    quiet: bool,
}

/// One difference, for printing.
struct Diff {
    path: WirePath,
    kind: &'static str,
    detail: String,
}

struct Progress {
    tty: bool,
    files: u64,
    bytes: u64,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn tick(&mut self, force: bool) {
        if !self.tty || (!force && self.last.elapsed() < Duration::from_millis(500)) {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        eprint!(
            "\r{} files, {:.1} MiB checksummed, {:.1} MiB/s   ",
            self.files,
            self.bytes as f64 / 1048576.0,
            self.bytes as f64 / 1048576.0 / secs
        );
        let _ = std::io::stderr().flush();
    }
}

/// How long a replica has to answer a read-only session.
const CONNECT: Duration = Duration::from_secs(30);

fn verify_label() -> String {
    format!("tdfs verify on {}", crate::hostname())
}

fn errstr(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

fn type_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "directory",
        libc::S_IFREG => "file",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "char device",
        libc::S_IFBLK => "block device",
        _ => "unknown",
    }
}

/// Compares the trees; returns the differences.
async fn compare(
    root: &Arc<BackingTree>,
    remote: &mut Inspector,
    prog: &mut Progress,
) -> anyhow::Result<Vec<Diff>> {
    let mut diffs = Vec::new();
    // Hard-link groups: inode -> first path, on each side.
    let mut mine_links: HashMap<u64, WirePath> = HashMap::new();
    let mut their_links: HashMap<u64, WirePath> = HashMap::new();
    let mut stack = vec![WirePath::root()];
    while let Some(dir) = stack.pop() {
        let mine = root
            .list_dir(&dir)
            .with_context(|| format!("listing {dir} locally"))?;
        let theirs = match remote.listing(&dir).await? {
            Ok(t) => t,
            Err(e) => {
                diffs.push(Diff {
                    path: dir.clone(),
                    kind: "missing",
                    detail: format!("cannot list on replica: {}", errstr(e)),
                });
                continue;
            }
        };
        let theirs: HashMap<&[u8], &Entry> =
            theirs.iter().map(|e| (e.name.as_slice(), e)).collect();
        for m in &mine {
            let p = dir.join(&m.name)?;
            prog.files += 1;
            prog.tick(false);
            let Some(s) = theirs.get(m.name.as_slice()) else {
                diffs.push(Diff {
                    path: p,
                    kind: "missing",
                    detail: format!("{} absent on replica", type_name(m.mode)),
                });
                continue;
            };
            let mut d = |kind, detail: String| {
                diffs.push(Diff {
                    path: p.clone(),
                    kind,
                    detail,
                })
            };
            if m.kind() != s.kind() {
                d(
                    "type",
                    format!(
                        "{} here, {} on replica",
                        type_name(m.mode),
                        type_name(s.mode)
                    ),
                );
                continue;
            }
            if m.mode & 0o7777 != s.mode & 0o7777 && m.kind() != libc::S_IFLNK {
                d(
                    "mode",
                    format!(
                        "{:04o} here, {:04o} on replica",
                        m.mode & 0o7777,
                        s.mode & 0o7777
                    ),
                );
            }
            if (m.uid, m.gid) != (s.uid, s.gid) {
                d(
                    "owner",
                    format!("{}:{} here, {}:{} on replica", m.uid, m.gid, s.uid, s.gid),
                );
            }
            if m.mtime != s.mtime {
                d(
                    "mtime",
                    format!(
                        "{}.{:09} here, {}.{:09} on replica",
                        m.mtime.sec, m.mtime.nsec, s.mtime.sec, s.mtime.nsec
                    ),
                );
            }
            if m.xattrs != s.xattrs {
                d("xattr", "extended attributes differ".into());
            }
            if (m.flags, m.projid) != (s.flags, s.projid) {
                d(
                    "flags",
                    format!(
                        "inode flags {:#x} project {} here, {:#x} project {} on replica",
                        m.flags, m.projid, s.flags, s.projid
                    ),
                );
            }
            if m.target != s.target {
                d(
                    "link",
                    format!(
                        "symlink to {:?} here, to {:?} on replica",
                        String::from_utf8_lossy(&m.target),
                        String::from_utf8_lossy(&s.target)
                    ),
                );
            }
            if m.rdev != s.rdev {
                d(
                    "device",
                    format!("device {:#x} here, {:#x} on replica", m.rdev, s.rdev),
                );
            }
            if m.kind() == libc::S_IFREG {
                if m.size != s.size {
                    d(
                        "content",
                        format!("{} bytes here, {} on replica", m.size, s.size),
                    );
                } else {
                    let theirs = remote.digest(&p).await?;
                    let mine = {
                        let p = p.clone();
                        let tree = root.clone();
                        tokio::task::spawn_blocking(move || tree.digest(&p)).await?
                    };
                    prog.bytes += m.size;
                    if theirs.errno != 0 {
                        d(
                            "content",
                            format!("cannot read on replica: {}", errstr(theirs.errno)),
                        );
                    } else if mine.sha256 != theirs.sha256 {
                        d(
                            "content",
                            "same size, different bytes (sha256 differs)".into(),
                        );
                    }
                }
                // Hard links: the same group leader on both sides.
                if m.nlink > 1 || s.nlink > 1 {
                    let lm = mine_links.entry(m.ino).or_insert_with(|| p.clone()).clone();
                    let ls = their_links
                        .entry(s.ino)
                        .or_insert_with(|| p.clone())
                        .clone();
                    if lm != ls {
                        d(
                            "link",
                            format!("hard link of {lm} here, of {ls} on replica"),
                        );
                    }
                }
            }
            if m.kind() == libc::S_IFDIR {
                stack.push(p);
            }
        }
        let names: std::collections::HashSet<&[u8]> =
            mine.iter().map(|e| e.name.as_slice()).collect();
        for (name, s) in &theirs {
            if !names.contains(name) {
                diffs.push(Diff {
                    path: dir.join(name)?,
                    kind: "extra",
                    detail: format!("{} only on replica", type_name(s.mode)),
                });
            }
        }
    }
    Ok(diffs)
}

fn open_dir(dir: &std::path::Path) -> anyhow::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: valid C string; the fd is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("opening {}", dir.display()));
    }
    // SAFETY: fresh fd from open.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Repairs one slave with a checksumming sync driven from DIR.
fn repair(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    cfg: SlaveConfig,
) -> anyhow::Result<()> {
    let label = format!(
        "{}:{} (tdfs verify --repair)",
        crate::hostname(),
        dir.display()
    );
    // The repair speaks for the replica's own line (its history, from where it stands), so
    // that it is neither fenced nor taken for a diverged replica; it issues no ops, only a
    // checksumming sync, after which the replica is where it was, repaired.
    let ack = rt
        .block_on(Inspector::connect(&cfg, &label, Duration::from_secs(10)))?
        .hello;
    let state_dir = tempfile::Builder::new().prefix("tdfs-verify-").tempdir()?;
    let node = NodeState::open(state_dir.path())?;
    let r = Replicator::start(
        rt.handle(),
        vec![cfg.clone()],
        Origin {
            node,
            history: ack.history.clone(),
            next_seq: ack.applied + 1,
            unclean: true,
            journal_valid: false,
        },
        ReplConfig {
            label,
            mem_cap: 64 << 20,
            journal_bytes: 64 << 20,
            tree: Arc::new(BackingTree::new(open_dir(dir)?)),
            checksum_sync: true,
            policy: repl::Policy::default(),
            relay: false,
            on_fenced: None,
            paused: false,
        },
    )?;
    let deadline = Instant::now() + Duration::from_secs(3600);
    let s = r.slave(0);
    let mut refused_since: Option<Instant> = None;
    loop {
        if s.state() == repl::LinkState::Streaming && !s.needs_sync.load(Ordering::Acquire) {
            break;
        }
        if Instant::now() > deadline {
            bail!("repair of {} did not finish within an hour", cfg.addr);
        }
        // A slave busy with its master never lets the repair in.
        if !s.connected.load(Ordering::Acquire) {
            let t = *refused_since.get_or_insert_with(Instant::now);
            if t.elapsed() > Duration::from_secs(15) {
                bail!(
                    "cannot open a session with {} (is a master connected to it? stop the master, \
                     or restart it: its own sync repairs the slave)",
                    cfg.addr
                );
            }
        } else {
            refused_since = None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let failed = r.drain(Duration::from_secs(60));
    if !failed.is_empty() {
        bail!("repair of {} did not complete", cfg.addr);
    }
    Ok(())
}

pub fn main(args: Vec<String>) -> ExitCode {
    let cli = VerifyCli::parse_from(args);
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tdfs verify: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: VerifyCli) -> anyhow::Result<bool> {
    let dir = cli
        .dir
        .canonicalize()
        .with_context(|| format!("directory {}", cli.dir.display()))?;
    cli.auth.init()?;
    let root = Arc::new(BackingTree::new(open_dir(&dir)?));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut all_identical = true;
    for spec in &cli.slaves {
        let cfg = crate::parse_slave(spec, Compression::None, true)?;
        let mut prog = Progress {
            tty: std::io::stderr().is_terminal() && !cli.quiet,
            files: 0,
            bytes: 0,
            started: Instant::now(),
            last: Instant::now(),
        };
        let diffs = rt.block_on(async {
            let mut remote = Inspector::connect(&cfg, &verify_label(), CONNECT).await?;
            compare(&root, &mut remote, &mut prog).await
        })?;
        prog.tick(true);
        if prog.tty {
            eprintln!();
        }
        for d in &diffs {
            println!("{}\t{}\t{}\t{}", cfg.addr, d.kind, d.path, d.detail);
        }
        if diffs.is_empty() {
            if !cli.quiet {
                eprintln!(
                    "{}: identical ({} entries, {} bytes checksummed)",
                    cfg.addr, prog.files, prog.bytes
                );
            }
            continue;
        }
        eprintln!("{}: {} difference(s)", cfg.addr, diffs.len());
        if !cli.repair {
            all_identical = false;
        } else {
            repair(&rt, &dir, cfg.clone())?;
            let after = rt.block_on(async {
                let mut remote = Inspector::connect(&cfg, &verify_label(), CONNECT).await?;
                let mut p = Progress {
                    tty: false,
                    files: 0,
                    bytes: 0,
                    started: Instant::now(),
                    last: Instant::now(),
                };
                compare(&root, &mut remote, &mut p).await
            })?;
            if after.is_empty() {
                eprintln!("{}: repaired; now identical", cfg.addr);
            } else {
                for d in &after {
                    println!("{}\t{}\t{}\t{}", cfg.addr, d.kind, d.path, d.detail);
                }
                bail!("{} still differs after the repair", cfg.addr);
            }
        }
    }
    Ok(all_identical)
}
