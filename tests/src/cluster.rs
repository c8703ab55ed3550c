//! A master with N slaves, each in fresh temp dirs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::compare::{compare_trees, format_diffs, try_wait_identical};
use crate::daemons::{Master, MasterOpts, Slave, SlaveAddr, SlaveLaunch};
use crate::util::{lazy_unmount, mount_fstype, require_root_and_fuse, set_times, temp_dir};

/// Per-slave options.
#[derive(Debug, Clone, Copy, Default)]
pub struct SlaveOpts {
    /// `,z=1` after this slave's address on the master's command line.
    pub compress: bool,
    /// `-n` on the slave (TCP_NODELAY off).
    pub nodelay_off: bool,
}

/// Cluster options.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    pub slaves: Vec<SlaveOpts>,
    /// Master `-z 0|1`.
    pub global_z: Option<u8>,
    /// Master `-n`.
    pub nodelay_off: bool,
    pub extra_master_args: Vec<String>,
    /// Fills the backing directory before the master starts (a pre-existing tree).
    pub populate: Option<fn(&Path)>,
    /// Stop every slave before the master starts (they are started again with
    /// `Slave::restart`, on the same port).
    pub slaves_down: bool,
    /// Runs on each replica directory before its slave starts (e.g. to mount a small tmpfs
    /// there); the root's mode and times are set after it. Whatever it mounts on the
    /// directory is detached when the cluster is dropped (or its start fails).
    pub replica_setup: Option<fn(&Path)>,
    /// Runs on the master's backing directory before anything starts (e.g. to mount a
    /// small tmpfs there); detached like `replica_setup`'s mounts.
    pub backing_setup: Option<fn(&Path)>,
    /// Command every slave runs under (e.g. `nsenter --net=/run/netns/NS`); empty: none.
    pub slave_prefix: Vec<String>,
    /// Address every slave listens on; None: `127.0.0.1`.
    pub slave_host: Option<String>,
    /// More arguments for every slave (e.g. `--secret-file F`).
    pub slave_args: Vec<String>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            slaves: vec![SlaveOpts::default()],
            global_z: None,
            nodelay_off: false,
            extra_master_args: Vec::new(),
            populate: None,
            slaves_down: false,
            replica_setup: None,
            backing_setup: None,
            slave_prefix: Vec::new(),
            slave_host: None,
            slave_args: Vec::new(),
        }
    }
}

/// Root dirs of the backing store and every replica start with these attributes, so that
/// the roots compare equal before any op touches them.
const ROOT_MODE: u32 = 0o755;
const ROOT_TIME: (i64, i64) = (1_600_000_000, 123_456_789);

/// A running master (mounted) with its slaves. Fields drop in order: the master (unmount)
/// first, then the slaves, then what `replica_setup` mounted, then the temp dir.
pub struct Cluster {
    pub master: Master,
    /// How the master was started, to start it again.
    pub mopts: MasterOpts,
    pub slaves: Vec<Slave>,
    /// The master's backing directory (`-m`).
    pub backing: PathBuf,
    /// The FUSE mountpoint.
    pub mnt: PathBuf,
    pub master_state: PathBuf,
    /// Scratch space outside every tree (tarballs, sources, ...).
    pub scratch: PathBuf,
    pub opts: ClusterOpts,
    _replica_mounts: ReplicaMounts,
    tmp: Option<crate::util::TempDir>,
}

/// Replica dirs `ClusterOpts::replica_setup` ran on; a mount on any of them is detached on
/// drop.
struct ReplicaMounts(Vec<PathBuf>);

impl Drop for ReplicaMounts {
    fn drop(&mut self) {
        for dir in &self.0 {
            if mount_fstype(dir).is_some() {
                lazy_unmount(dir);
            }
        }
    }
}

fn mkdir(p: &Path) {
    std::fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
}

fn init_root(p: &Path) {
    mkdir(p);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(ROOT_MODE)).unwrap();
    set_times(p, ROOT_TIME, ROOT_TIME).unwrap();
}

impl Cluster {
    /// Master with one plain slave.
    pub fn single(name: &str) -> Cluster {
        Self::start(name, ClusterOpts::default())
    }

    /// Starts the slaves, then the master, and waits for the mount.
    pub fn start(name: &str, opts: ClusterOpts) -> Cluster {
        Self::start_via(name, opts, |_, addr| addr.to_string())
    }

    /// [`Cluster::start`], with the master given `via(i, addr of slave i)` as slave `i`'s
    /// address instead of the slave's own (e.g. a proxy in front of it).
    pub fn start_via(
        name: &str,
        opts: ClusterOpts,
        mut via: impl FnMut(usize, &str) -> String,
    ) -> Cluster {
        require_root_and_fuse();
        let tmp = temp_dir(name);
        let base = tmp.path().canonicalize().expect("canonicalize temp dir");
        // Dropped before `tmp`, also when a slave or the master below fails to start.
        let mut replica_mounts = ReplicaMounts(Vec::new());
        // Allow non-root callers to traverse to the mountpoint.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let backing = base.join("backing");
        let mnt = base.join("mnt");
        let master_state = base.join("master-state");
        let scratch = base.join("scratch");
        let logs = base.join("logs");
        mkdir(&backing);
        if let Some(f) = opts.backing_setup {
            replica_mounts.0.push(backing.clone());
            f(&backing);
        }
        init_root(&backing);
        mkdir(&mnt);
        mkdir(&master_state);
        mkdir(&scratch);
        mkdir(&logs);
        let mut slaves = Vec::new();
        for (i, so) in opts.slaves.iter().enumerate() {
            let dir = base.join(format!("replica{i}"));
            let state = base.join(format!("replica{i}-state"));
            mkdir(&dir);
            if let Some(f) = opts.replica_setup {
                replica_mounts.0.push(dir.clone());
                f(&dir);
            }
            init_root(&dir);
            mkdir(&state);
            slaves.push(Slave::start_launch(
                &dir,
                &state,
                &logs,
                &SlaveLaunch {
                    prefix: opts.slave_prefix.clone(),
                    host: opts.slave_host.clone(),
                    nodelay_off: so.nodelay_off,
                    extra_args: opts.slave_args.clone(),
                },
            ));
        }
        if let Some(f) = opts.populate {
            f(&backing);
        }
        if opts.slaves_down {
            for s in &mut slaves {
                s.stop();
            }
        }
        let mopts = MasterOpts {
            backing: backing.clone(),
            mountpoint: mnt.clone(),
            state_dir: master_state.clone(),
            log: logs.join("master.log"),
            slaves: slaves
                .iter()
                .zip(&opts.slaves)
                .enumerate()
                .map(|(i, (s, o))| SlaveAddr {
                    addr: via(i, &s.addr()),
                    compress: o.compress,
                })
                .collect(),
            global_z: opts.global_z,
            nodelay_off: opts.nodelay_off,
            extra_args: opts.extra_master_args.clone(),
            prefix: Vec::new(),
        };
        let master = Master::start(&mopts);
        let keep = std::env::var_os("TDFS_KEEP").is_some();
        Cluster {
            master,
            mopts,
            slaves,
            backing,
            mnt,
            master_state,
            scratch,
            opts,
            _replica_mounts: replica_mounts,
            tmp: if keep {
                eprintln!("TDFS_KEEP: leaving {}", base.display());
                let _ = tmp.keep();
                None
            } else {
                Some(tmp)
            },
        }
    }

    /// Starts the master again on the same directory, state and slaves.
    pub fn restart_master(&mut self) {
        self.master = Master::start(&self.mopts);
    }

    /// The mountpoint.
    pub fn mnt(&self) -> &Path {
        &self.mnt
    }

    /// `mnt/rel`.
    pub fn at(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Replica dir of slave `i`.
    pub fn replica(&self, i: usize) -> &Path {
        &self.slaves[i].dir
    }

    /// The backing dir followed by every replica dir: where to check what the workload
    /// wrote once the master has exited.
    pub fn roots(&self) -> Vec<PathBuf> {
        let mut v = vec![self.backing.clone()];
        v.extend(self.slaves.iter().map(|s| s.dir.clone()));
        v
    }

    /// Replica dirs only.
    pub fn replicas(&self) -> Vec<PathBuf> {
        self.slaves.iter().map(|s| s.dir.clone()).collect()
    }

    /// While mounted: polls until every replica equals the backing dir.
    pub fn wait_replicas(&self, timeout: Duration) {
        for s in &self.slaves {
            if let Err(e) = try_wait_identical(&self.backing, &s.dir, timeout) {
                panic!("{e}\n{}", self.logs());
            }
        }
    }

    /// Unmounts, asserts the master exits 0 (after every slave acknowledged every op) and
    /// that every replica is identical to the backing dir.
    #[track_caller]
    pub fn finish(&mut self) {
        let st = self.master.unmount_and_wait();
        assert!(
            st.success(),
            "tdfs exited with {st} after the unmount\n{}",
            self.logs()
        );
        for s in &self.slaves {
            let diffs = compare_trees(&self.backing, &s.dir);
            if !diffs.is_empty() {
                panic!(
                    "replica {} differs from {} after the master exited, {} difference(s):\n{}{}",
                    s.dir.display(),
                    self.backing.display(),
                    diffs.len(),
                    format_diffs(&diffs),
                    self.logs()
                );
            }
        }
    }

    /// Master log plus every slave log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = format!("--- master log ---\n{}\n", self.master.log_tail());
        for (i, sl) in self.slaves.iter().enumerate() {
            s.push_str(&format!("--- slave {i} log ---\n{}\n", sl.log_tail()));
        }
        s
    }

    /// The temp dir holding everything (None when kept with TDFS_KEEP).
    pub fn base(&self) -> Option<&Path> {
        self.tmp.as_ref().map(|t| t.path())
    }
}
