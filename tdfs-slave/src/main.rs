//! `tdfs-slave`: command line, signals, and wiring of the listener to the applier.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{CommandFactory, FromArgMatches, Parser};
use tdfs_protocol::DEFAULT_PORT;
use tdfs_replication::accept::Security;
use tdfs_replication::daemon::{self, logging};
use tdfs_replication::node::NodeState;
use tdfs_replication::position::{self as state, State};
use tdfs_replication::security::{AllowList, Secret, TlsFiles};
use tdfs_slave::apply::Applier;
use tdfs_slave::config::{self, SlaveFile};
use tdfs_slave::listener::{self, Core, Shared};
use tokio::signal::unix::{signal, SignalKind};

/// Receive a tdfs master's stream of filesystem mutations and apply them to DIR.
///
/// Runs in the foreground and logs to stderr (default level info; -v, -q, the config
/// file's log_level or RUST_LOG change it). SIGTERM or SIGINT finishes the op in hand,
/// makes the state durable and exits 0; SIGHUP re-reads --config (log level) and the
/// secret files.
///
/// Other commands: `tdfs-slave status [--state-dir DIR | -m DIR] [--json]` asks a running
/// slave; `tdfs-slave completions SHELL` and `tdfs-slave manpage` print shell completions
/// and a man page.
#[derive(Parser, Debug)]
#[command(name = "tdfs-slave", version)]
struct Cli {
    /// Directory to keep as a mirror of the master's tree. Every path the master sends is
    /// resolved beneath it, never through a symlink.
    #[arg(
        short = 'm',
        long = "mirror",
        value_name = "DIR",
        required_unless_present = "config"
    )]
    mirror: Option<PathBuf>,

    /// TOML file with any of the settings below (keys: mirror, listen, no_nodelay,
    /// state_dir, secret_file, allow, tls_cert, tls_key, tls_ca, insecure, metrics,
    /// log_level; a relay's: slaves = ["HOST:PORT,z=N"], compression, queue_size,
    /// journal_size, leaf_secret_file, leaf_encrypt, leaf_tls_cert, leaf_tls_key, leaf_tls_ca,
    /// leaf_insecure). Flags given on the command line win. SIGHUP re-reads it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (port 0 picks one; the address
    /// is logged as "metrics at http://...").
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<String>,

    /// Log more (-v: debug, -vv: trace).
    #[arg(short = 'v', action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,

    /// Log only warnings and errors.
    #[arg(short = 'q')]
    quiet: bool,

    /// Address to accept the master on: [ADDR:]PORT. A bare PORT listens on all IPv4
    /// addresses; port 0 picks a free port (the bound address is logged as
    /// "listening on ADDR:PORT").
    #[arg(
        short = 'l',
        long = "listen",
        value_name = "[ADDR:]PORT",
        default_value = "0.0.0.0:4731",
        value_parser = parse_listen
    )]
    listen: SocketAddr,

    /// Disable TCP_NODELAY on master connections (it is on by default so acknowledgements
    /// are not held back by Nagle's algorithm).
    #[arg(short = 'n', long = "no-nodelay")]
    no_nodelay: bool,

    /// Directory for this node's state (its history of epochs, last applied sequence number,
    /// lock file), shared with the master role: a promotion or a rejoin finds it there.
    /// Created with mode 0700; must not lie inside DIR. Default:
    /// /var/lib/tdfs/<canonical path of DIR without its leading '/', '/' replaced by '_'>
    /// (or the older /var/lib/tdfs-slave/_srv_www where that already holds a state).
    #[arg(long = "state-dir", value_name = "STATE_DIR")]
    state_dir: Option<PathBuf>,

    /// Where a diverged tree's own changes are kept before a sync overwrites them (a former
    /// master's writes that the new master never got). Default: STATE_DIR/stash. Best on the
    /// same filesystem as DIR, outside it.
    #[arg(long = "stash-dir", value_name = "DIR")]
    stash_dir: Option<PathBuf>,

    /// File holding the secret shared with the master (mode 0600 or stricter; at least 16
    /// bytes). A master must prove it before anything it sends is applied, this slave proves
    /// it back, and every frame after that carries a MAC under keys derived from it. Give it
    /// twice during a secret rotation: a master may then prove either. SIGHUP re-reads the
    /// files; a session whose secret is no longer accepted then ends.
    #[arg(long = "secret-file", value_name = "FILE")]
    secret_file: Vec<PathBuf>,

    /// Require every master to encrypt its frames (AEGIS-256X2 under keys derived from the
    /// shared secret; needs --secret-file). A master that does not is refused with a clear
    /// error, and so is one that does when this flag is absent. Redundant under TLS.
    #[arg(long = "encrypt")]
    encrypt: bool,

    /// Accept connections only from this address, network (ADDR/PREFIX) or host name.
    /// Repeat for more. Others are closed right after accept.
    #[arg(long = "allow", value_name = "HOST/CIDR")]
    allow: Vec<String>,

    /// TLS: this slave's certificate chain (PEM). It must name the host (or IP address) the
    /// master uses in -c as a subjectAltName.
    #[arg(long = "tls-cert", value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,

    /// TLS: the private key (PEM) of --tls-cert.
    #[arg(long = "tls-key", value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,

    /// TLS: the CA certificate(s) (PEM) that must have signed the master's client
    /// certificate (required with TLS).
    #[arg(long = "tls-ca", value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,

    /// Allow listening beyond loopback with no authentication at all (no --secret-file and
    /// no TLS): anyone who can reach the port can then change DIR. For trusted networks only.
    #[arg(long = "insecure")]
    insecure: bool,

    /// Relay: feed what this replica applies to a replica of its own, as
    /// HOST[:PORT][,z=N][,fallback] (the master's -c syntax; repeat for more). Its replicas
    /// get the master's ops with the master's epochs and sequence numbers, so any of them
    /// can be taken over by another relay or the master (give them as `,fallback` upstreams
    /// there). `tdfs-slave leaf add|remove` changes the set at runtime (saved in
    /// STATE_DIR/slaves, which then wins over -c).
    #[arg(
        short = 'c',
        long = "slave",
        value_name = "HOST[:PORT][,z=N][,fallback]"
    )]
    slaves: Vec<String>,

    /// Relay: compression towards this node's replicas (0 none, 1 lzf, 2 lz4), unless a -c
    /// says otherwise.
    #[arg(short = 'z', long, default_value_t = 0, value_name = "N")]
    compression: u8,

    /// Relay: memory for ops not yet acknowledged by every replica of this node, in MiB
    /// (beyond it they spill to the journal, as on the master).
    #[arg(long, default_value_t = 96, value_name = "MIB")]
    queue_size: usize,

    /// Relay: disk for ops a lagging replica of this node still needs, in MiB (in the state
    /// directory); one further behind is synced from this node's tree.
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    journal_size: u64,

    /// Relay: the secret proven to this node's replicas. Without any --leaf-* flag, a relay
    /// uses towards its replicas the same --secret-file and TLS files as towards its
    /// upstream; with one, only what the --leaf-* flags say.
    /// Give it twice during a rotation, as --secret-file.
    #[arg(long = "leaf-secret-file", value_name = "FILE")]
    leaf_secret_file: Vec<PathBuf>,

    /// Relay: encrypt the frames to this node's replicas (AEGIS-256X2 under keys derived
    /// from --leaf-secret-file); without any --leaf-* flag, --encrypt applies to both sides.
    #[arg(long = "leaf-encrypt")]
    leaf_encrypt: bool,

    /// Relay: TLS towards this node's replicas: the certificate chain presented to them.
    #[arg(long = "leaf-tls-cert", value_name = "FILE", requires_all = ["leaf_tls_key", "leaf_tls_ca"])]
    leaf_tls_cert: Option<PathBuf>,

    /// Relay: the private key of --leaf-tls-cert.
    #[arg(long = "leaf-tls-key", value_name = "FILE", requires_all = ["leaf_tls_cert", "leaf_tls_ca"])]
    leaf_tls_key: Option<PathBuf>,

    /// Relay: the CA that must have signed every replica's certificate.
    #[arg(long = "leaf-tls-ca", value_name = "FILE", requires_all = ["leaf_tls_cert", "leaf_tls_key"])]
    leaf_tls_ca: Option<PathBuf>,

    /// Relay: plain TCP towards this node's replicas even though this node's own upstream
    /// link uses a secret or TLS (for replicas on loopback or a trusted network).
    #[arg(long = "leaf-insecure")]
    leaf_insecure: bool,
}

impl Cli {
    /// How a relay authenticates to its own replicas: the --leaf-* flags, else the same
    /// secret and TLS files as towards its upstream.
    fn leaf_auth(&self) -> tdfs_replication::outbound::SlaveAuthArgs {
        let mut a = tdfs_replication::outbound::SlaveAuthArgs::default();
        if self.leaf_insecure {
            return a;
        }
        if !self.leaf_secret_file.is_empty() || self.leaf_tls_cert.is_some() || self.leaf_encrypt {
            // Set per hop: only what the --leaf-* flags say.
            a.secret_file = self.leaf_secret_file.clone();
            a.encrypt = self.leaf_encrypt;
            a.tls_cert = self.leaf_tls_cert.clone();
            a.tls_key = self.leaf_tls_key.clone();
            a.tls_ca = self.leaf_tls_ca.clone();
        } else {
            a.secret_file = self.secret_file.clone();
            a.encrypt = self.encrypt;
            a.tls_cert = self.tls_cert.clone();
            a.tls_key = self.tls_key.clone();
            a.tls_ca = self.tls_ca.clone();
        }
        a
    }
}

/// Loads the security settings, refusing an unauthenticated listener beyond loopback.
fn security(cli: &Cli) -> anyhow::Result<Security> {
    let secrets = Secret::load_all(&cli.secret_file).map_err(anyhow::Error::msg)?;
    if cli.encrypt && secrets.is_empty() {
        bail!("--encrypt needs --secret-file: the keys come from the shared secret");
    }
    let tls = TlsFiles::from_args(
        cli.tls_cert.clone(),
        cli.tls_key.clone(),
        cli.tls_ca.clone(),
    )
    .map_err(anyhow::Error::msg)?
    .map(|f| tdfs_replication::security::tls::acceptor(&f))
    .transpose()
    .map_err(anyhow::Error::msg)?;
    let allow = AllowList::parse(&cli.allow).map_err(anyhow::Error::msg)?;
    let authenticated = !secrets.is_empty() || tls.is_some();
    if !authenticated {
        if !cli.listen.ip().is_loopback() && !cli.insecure {
            bail!(
                "refusing to listen on {} without authentication: anyone who can reach it could \
                 rewrite the mirror. Give --secret-file FILE (the same secret as the master's \
                 --secret-file; mode 0600), and/or TLS (--tls-cert, --tls-key, --tls-ca), or \
                 listen on loopback only (-l 127.0.0.1:PORT), or pass --insecure on a trusted \
                 network",
                cli.listen
            );
        }
        if !cli.listen.ip().is_loopback() {
            tracing::warn!(
                "--insecure: accepting unauthenticated masters on {}; anyone who can reach it \
                 can change the mirror",
                cli.listen
            );
        }
    }
    tracing::info!(
        "master connections: shared-secret authentication {}, TLS {}, --allow {}; frames {}",
        if secrets.is_empty() {
            "off".to_string()
        } else {
            format!(
                "on (secret {})",
                tdfs_replication::security::secret::describe(&secrets)
            )
        },
        if tls.is_some() {
            "on (client certificate required)"
        } else {
            "off"
        },
        if allow.is_empty() {
            "any address".to_string()
        } else {
            cli.allow.join(", ")
        },
        match (secrets.is_empty(), tls.is_some(), cli.encrypt) {
            (_, true, _) => "protected by TLS (no MAC or encryption of tdfs's own)",
            (true, false, _) => "plain",
            (false, false, true) => "encrypted and authenticated (--encrypt required)",
            (false, false, false) => "authenticated (MAC), not encrypted",
        }
    );
    Ok(Security::new(secrets, cli.encrypt, tls, allow))
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    match s.to_socket_addrs() {
        Ok(mut it) => it
            .next()
            .ok_or_else(|| format!("{s} resolves to no address")),
        Err(e) => Err(format!(
            "expected [ADDR:]PORT (e.g. {DEFAULT_PORT} or 127.0.0.1:{DEFAULT_PORT}): {e}"
        )),
    }
}

/// Applies the config file's settings to every flag not given on the command line.
fn merge(cli: &mut Cli, m: &clap::ArgMatches, f: SlaveFile) -> anyhow::Result<()> {
    let g = |id: &str| config::given(m, id);
    if !g("mirror") {
        cli.mirror = f.mirror.or(cli.mirror.take());
    }
    if let (false, Some(l)) = (g("listen"), f.listen) {
        cli.listen = parse_listen(&l).map_err(|e| anyhow::anyhow!("config listen: {e}"))?;
    }
    if let (false, Some(v)) = (g("no_nodelay"), f.no_nodelay) {
        cli.no_nodelay = v;
    }
    if !g("state_dir") && f.state_dir.is_some() {
        cli.state_dir = f.state_dir;
    }
    if let (false, Some(v)) = (g("secret_file"), f.secret_file) {
        cli.secret_file = v.into_vec();
    }
    if let (false, Some(v)) = (g("encrypt"), f.encrypt) {
        cli.encrypt = v;
    }
    if let (false, Some(v)) = (g("allow"), f.allow) {
        cli.allow = v;
    }
    if !g("tls_cert") && !g("tls_key") && !g("tls_ca") {
        cli.tls_cert = f.tls_cert.or(cli.tls_cert.take());
        cli.tls_key = f.tls_key.or(cli.tls_key.take());
        cli.tls_ca = f.tls_ca.or(cli.tls_ca.take());
    }
    if let (false, Some(v)) = (g("insecure"), f.insecure) {
        cli.insecure = v;
    }
    if !g("metrics") && f.metrics.is_some() {
        cli.metrics = f.metrics;
    }
    if let (false, Some(v)) = (g("slaves"), f.slaves) {
        cli.slaves = v;
    }
    if let (false, Some(v)) = (g("compression"), f.compression) {
        cli.compression = v;
    }
    if let (false, Some(v)) = (g("queue_size"), f.queue_size) {
        cli.queue_size = v;
    }
    if let (false, Some(v)) = (g("journal_size"), f.journal_size) {
        cli.journal_size = v;
    }
    if let (false, Some(v)) = (g("leaf_secret_file"), f.leaf_secret_file) {
        cli.leaf_secret_file = v.into_vec();
    }
    if let (false, Some(v)) = (g("leaf_encrypt"), f.leaf_encrypt) {
        cli.leaf_encrypt = v;
    }
    if !g("leaf_tls_cert") && !g("leaf_tls_key") && !g("leaf_tls_ca") {
        cli.leaf_tls_cert = f.leaf_tls_cert.or(cli.leaf_tls_cert.take());
        cli.leaf_tls_key = f.leaf_tls_key.or(cli.leaf_tls_key.take());
        cli.leaf_tls_ca = f.leaf_tls_ca.or(cli.leaf_tls_ca.take());
    }
    if let (false, Some(v)) = (g("leaf_insecure"), f.leaf_insecure) {
        cli.leaf_insecure = v;
    }
    if cli.mirror.is_none() {
        bail!("no mirror directory: give -m DIR or `mirror = \"DIR\"` in the config file");
    }
    Ok(())
}

/// The log level: -v/-q, else the config file's, else info.
fn level(cli: &Cli, f: Option<&SlaveFile>) -> anyhow::Result<String> {
    if let Some(l) = logging::flag_level(cli.verbose, cli.quiet) {
        return Ok(l.into());
    }
    match f.and_then(|f| f.log_level.clone()) {
        Some(l) => {
            logging::check_level(&l).map_err(anyhow::Error::msg)?;
            Ok(l)
        }
        None => Ok("info".into()),
    }
}

/// `completions SHELL` / `manpage`: generated from the command line definition.
fn generate(args: &[String]) -> ExitCode {
    let mut cmd = Cli::command().subcommand(
        tdfs_slave::control::StatusCli::command()
            .name("status")
            .about("Show a running slave's status (through its control socket)"),
    );
    if args[1] == "manpage" {
        let r = clap_mangen::Man::new(cmd).render(&mut std::io::stdout());
        return if r.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let Some(shell) = args
        .get(2)
        .and_then(|s| s.parse::<clap_complete::Shell>().ok())
    else {
        eprintln!("usage: tdfs-slave completions bash|zsh|fish|elvish|powershell");
        return ExitCode::from(2);
    };
    clap_complete::generate(shell, &mut cmd, "tdfs-slave", &mut std::io::stdout());
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("status") => {
            return tdfs_slave::control::status_main(
                std::env::args_os().skip(1).collect::<Vec<_>>(),
            )
        }
        Some("leaf") => {
            return tdfs_slave::control::leaf_main(std::env::args_os().skip(1).collect::<Vec<_>>())
        }
        Some("completions" | "manpage") => return generate(&args),
        _ => {}
    }
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let file = match cli
        .config
        .as_deref()
        .map(config::load::<SlaveFile>)
        .transpose()
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tdfs-slave: {e:#}");
            return ExitCode::from(2);
        }
    };
    let level = match level(&cli, file.as_ref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tdfs-slave: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Some(f) = file.clone() {
        if let Err(e) = merge(&mut cli, &matches, f) {
            eprintln!("tdfs-slave: {e:#}");
            return ExitCode::from(2);
        }
    }
    let log = logging::init(&level);
    if let Some(c) = &cli.config {
        tracing::info!("settings from {} (command-line flags win)", c.display());
    }
    match run(cli, matches, log, file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP: re-reads the secret files (the config file's `secret_file` list when the flag
/// was not given): they apply at once, to the connections that follow; a session whose
/// secret is no longer accepted ends.
fn reload_secrets(cli: &Cli, m: &clap::ArgMatches, f: Option<&SlaveFile>, shared: &Shared) {
    let paths = match f.and_then(|f| f.secret_file.clone()) {
        Some(p) if !config::given(m, "secret_file") => p.into_vec(),
        _ => cli.secret_file.clone(),
    };
    let sec = shared.security();
    if paths.is_empty() {
        if !sec.secrets().is_empty() {
            tracing::error!(
                "SIGHUP: no secret file any more; keeping the current secrets (turning \
                 authentication off needs a restart)"
            );
        }
        return;
    }
    if sec.secrets().is_empty() {
        tracing::error!("SIGHUP: turning shared-secret authentication on needs a restart");
        return;
    }
    match Secret::load_all(&paths) {
        Ok(new) => {
            let ids = tdfs_replication::security::secret::describe(&new);
            if sec.set_secrets(new) {
                tracing::info!(
                    "SIGHUP: the accepted secrets are now {ids}; sessions authenticated with \
                     another end"
                );
            } else {
                tracing::info!("SIGHUP: secrets unchanged ({ids})");
            }
        }
        Err(e) => tracing::error!("SIGHUP: {e}; keeping the current secrets"),
    }
}

/// SIGHUP: re-reads the config file; the log level and the secrets change at once, other
/// settings need a restart (and are named in the log).
fn reload(
    cli: &Cli,
    m: &clap::ArgMatches,
    log: &logging::Logging,
    old: &mut Option<SlaveFile>,
    shared: &Shared,
) {
    let Some(path) = cli.config.as_deref() else {
        reload_secrets(cli, m, None, shared);
        return;
    };
    let f: SlaveFile = match config::load(path) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("SIGHUP: {e:#}; keeping the current settings");
            reload_secrets(cli, m, old.as_ref(), shared);
            return;
        }
    };
    reload_secrets(cli, m, Some(&f), shared);
    match level(cli, Some(&f)) {
        Ok(l) => {
            if let Err(e) = log.set_level(&l) {
                tracing::error!("SIGHUP: {e}");
            }
        }
        Err(e) => tracing::error!("SIGHUP: {e:#}"),
    }
    let before = SlaveFile {
        log_level: None,
        secret_file: None,
        ..old.clone().unwrap_or_default()
    };
    let after = SlaveFile {
        log_level: None,
        secret_file: None,
        ..f.clone()
    };
    if before != after {
        tracing::warn!(
            "SIGHUP: {} changed beyond log_level; those settings take effect at the next restart",
            path.display()
        );
    }
    tracing::info!("SIGHUP: re-read {}", path.display());
    *old = Some(f);
}

fn run(
    cli: Cli,
    matches: clap::ArgMatches,
    log: logging::Logging,
    mut file: Option<SlaveFile>,
) -> anyhow::Result<()> {
    // Modes from the master must come out exactly, not masked.
    // SAFETY: umask cannot fail and has no memory-safety preconditions.
    unsafe { libc::umask(0) };
    let security = security(&cli)?;
    let mirror = cli.mirror.clone().expect("checked by merge/clap");
    let root = mirror
        .canonicalize()
        .with_context(|| format!("mirror directory {}", mirror.display()))?;
    if !root.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let state_dir = cli
        .state_dir
        .clone()
        .unwrap_or_else(|| state::default_dir(&root));
    state::check_outside(&state_dir, &root)?;
    let node = NodeState::open(&state_dir)
        .with_context(|| format!("state directory {}", state_dir.display()))?;
    let state = State::open(&node, &root)?;
    // After the state dir's lock: a second daemon on this state dir has already been refused.
    let mut control = daemon::control::bind(&state_dir)?;
    let metrics = cli.metrics.as_deref().map(daemon::http::bind).transpose()?;
    let applied0 = state.applied;
    let rec0 = node.record();
    let stash_dir = cli
        .stash_dir
        .clone()
        .unwrap_or_else(|| state_dir.join("stash"));
    if stash_dir.starts_with(&root) {
        bail!(
            "--stash-dir {} lies inside the mirrored directory {}; choose one outside it",
            stash_dir.display(),
            root.display()
        );
    }
    let applier = Applier::open(&root).with_context(|| format!("opening {}", root.display()))?;
    let default_z = tdfs_protocol::Compression::from_level(cli.compression)
        .context("--compression: 0, 1 or 2")?;
    // The persisted set (tdfs-slave leaf add/remove) wins over -c, as on the master.
    let leaf_specs = match tdfs_replication::config::load_persisted(&state_dir)? {
        Some(v) => {
            if !cli.slaves.is_empty() {
                tracing::info!(
                    "replicas from {} (written by `tdfs-slave leaf add/remove`; -c and the \
                     config file's slaves are ignored while it exists)",
                    tdfs_replication::config::slaves_file(&state_dir).display()
                );
            }
            v
        }
        None => cli.slaves.clone(),
    };
    let leaves = leaf_specs
        .iter()
        .map(|s| tdfs_replication::repl::SlaveConfig::parse(s, default_z, !cli.no_nodelay))
        .collect::<anyhow::Result<Vec<_>>>()?;
    cli.leaf_auth().init()?;
    let relay_tree = tdfs_slave::confine::ConfinedTree::new(
        std::fs::File::open(&root)
            .map(std::os::fd::OwnedFd::from)
            .with_context(|| format!("opening {}", root.display()))?,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let handle = rt.handle().clone();
    rt.block_on(async move {
        let flags0 = state.flags;
        let core = Core {
            applier,
            state,
            node,
            durable: 0,
            stash_dir,
        };
        let label = format!(
            "{}:{}",
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "?".into()),
            root.display()
        );
        let shared = Shared::new(core, !cli.no_nodelay, label.clone());
        shared.set_security(security);
        // The relay engine: always there (replicas can be added at runtime), idle without
        // any. Its tree is at a known position once it follows a line and no sync into it
        // was interrupted.
        let weak = Arc::downgrade(&shared);
        let repl = tdfs_replication::repl::Replicator::start(
            &handle,
            leaves,
            tdfs_replication::repl::Origin {
                node: shared.node().clone(),
                history: rec0.history.clone(),
                next_seq: applied0 + 1,
                unclean: false,
                journal_valid: true,
            },
            tdfs_replication::repl::ReplConfig {
                label,
                mem_cap: cli.queue_size.max(1) << 20,
                journal_bytes: cli.journal_size.max(1) << 20,
                tree: Arc::new(relay_tree),
                checksum_sync: false,
                policy: Default::default(),
                relay: true,
                on_fenced: Some(Arc::new(move |newer, _by| {
                    if let Some(s) = weak.upgrade() {
                        s.drop_stale_upstream(&newer);
                    }
                })),
                paused: rec0.history.is_empty()
                    || flags0 & (tdfs_protocol::msg::ack_flags::SYNCING) != 0,
            },
        )
        .with_context(|| format!("opening the relay journal in {}", state_dir.display()))?;
        let feeds = tdfs_replication::feeds::Feeds::new(
            repl,
            state_dir.clone(),
            default_z,
            !cli.no_nodelay,
        );
        feeds.start_sampler(&handle);
        shared.set_feeds(feeds);
        shared
            .stats
            .set_master(rec0.history.last().copied(), "", "");
        shared
            .stats
            .flags
            .store(flags0, std::sync::atomic::Ordering::Relaxed);
        shared
            .stats
            .applied
            .store(applied0, std::sync::atomic::Ordering::Relaxed);
        // Before anything announces us: a SIGTERM sent the moment "listening on" or
        // "ready" appears must find its handler, not the default action.
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let l =
            listener::bind(cli.listen).with_context(|| format!("listening on {}", cli.listen))?;
        let addr = l.local_addr()?;
        tdfs_slave::control::serve(
            &handle,
            &mut control,
            shared.clone(),
            root.display().to_string(),
            addr.to_string(),
        );
        tdfs_slave::control::start_sampler(&handle, shared.clone());
        if let Some(ml) = metrics {
            let maddr = ml.local_addr()?;
            let mut reg = prometheus_client::registry::Registry::default();
            reg.register_collector(Box::new(tdfs_slave::control::Metrics(shared.clone())));
            let reg = Arc::new(reg);
            daemon::http::serve(&handle, ml, Arc::new(move || daemon::http::render(&reg)));
            tracing::info!("metrics at http://{maddr}/metrics");
        }
        tracing::info!(
            "mirroring into {} (state in {}, control socket {}); listening on {addr}",
            root.display(),
            state_dir.display(),
            control.path.display()
        );
        daemon::notify("ready");
        let serve = tokio::spawn(listener::serve(l, shared.clone()));
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
                _ = hup.recv() => reload(&cli, &matches, &log, &mut file, &shared),
            }
        }
        daemon::notify("stopping");
        serve.abort();
        shared.stop();
        let deadline = Instant::now() + Duration::from_secs(30);
        while shared.session_active() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = shared.clone();
        let sync = tokio::task::spawn_blocking(move || s.core().state.sync());
        match tokio::time::timeout(Duration::from_secs(30), sync).await {
            Ok(Ok(Ok(()))) => tracing::info!("state saved; bye"),
            Ok(Ok(Err(e))) => bail!("syncing the state file: {e}"),
            _ => bail!("timed out waiting for the apply thread to save state"),
        }
        Ok(())
    })?;
    // Blocking tasks still parked on a dead connection must not hold the exit up.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
