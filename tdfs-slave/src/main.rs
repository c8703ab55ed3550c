//! `tdfs-slave`: command line, signals, and wiring of the listener to the applier.

use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use tdfs_protocol::DEFAULT_PORT;
use tdfs_slave::apply::Applier;
use tdfs_slave::listener::{self, Core, Shared};
use tdfs_slave::security::{AllowList, Secret, TlsFiles};
use tdfs_slave::state::{self, State};
use tdfs_slave::transport::Security;
use tokio::signal::unix::{signal, SignalKind};

/// Receive a tdfs master's stream of filesystem mutations and apply them to DIR.
///
/// Runs in the foreground and logs to stderr (RUST_LOG selects the level; default info).
/// SIGTERM or SIGINT finishes the op in hand, makes the state durable and exits 0.
#[derive(Parser, Debug)]
#[command(name = "tdfs-slave", version)]
struct Cli {
    /// Directory to keep as a mirror of the master's tree. Every path the master sends is
    /// resolved beneath it, never through a symlink.
    #[arg(short = 'm', long = "mirror", value_name = "DIR")]
    mirror: PathBuf,

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

    /// Directory for the slave's state (last applied sequence number, master id, lock file).
    /// Created with mode 0700; must not lie inside DIR. Default:
    /// /var/lib/tdfs-slave/<canonical path of DIR with '/' replaced by '_'>.
    #[arg(long = "state-dir", value_name = "STATE_DIR")]
    state_dir: Option<PathBuf>,

    /// File holding the secret shared with the master (mode 0600 or stricter; at least 16
    /// bytes). A master must prove it before anything it sends is applied, and this slave
    /// proves it back.
    #[arg(long = "secret-file", value_name = "FILE")]
    secret_file: Option<PathBuf>,

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
}

/// Loads the security settings, refusing an unauthenticated listener beyond loopback.
fn security(cli: &Cli) -> anyhow::Result<Security> {
    let secret = cli
        .secret_file
        .as_deref()
        .map(Secret::load)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let tls = TlsFiles::from_args(
        cli.tls_cert.clone(),
        cli.tls_key.clone(),
        cli.tls_ca.clone(),
    )
    .map_err(anyhow::Error::msg)?
    .map(|f| tdfs_slave::security::tls::acceptor(&f))
    .transpose()
    .map_err(anyhow::Error::msg)?;
    let allow = AllowList::parse(&cli.allow).map_err(anyhow::Error::msg)?;
    let authenticated = secret.is_some() || tls.is_some();
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
        "master connections: shared-secret authentication {}, TLS {}, --allow {}",
        if secret.is_some() { "on" } else { "off" },
        if tls.is_some() {
            "on (client certificate required)"
        } else {
            "off"
        },
        if allow.is_empty() {
            "any address".to_string()
        } else {
            cli.allow.join(", ")
        }
    );
    Ok(Security::new(secret, tls, allow))
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Modes from the master must come out exactly, not masked.
    // SAFETY: umask cannot fail and has no memory-safety preconditions.
    unsafe { libc::umask(0) };
    let security = security(&cli)?;
    let root = cli
        .mirror
        .canonicalize()
        .with_context(|| format!("mirror directory {}", cli.mirror.display()))?;
    if !root.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let state_dir = cli
        .state_dir
        .clone()
        .unwrap_or_else(|| state::default_dir(&root));
    let state = State::open(&state_dir, &root)?;
    let applier = Applier::open(&root).with_context(|| format!("opening {}", root.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let core = Core {
            applier,
            state,
            durable: 0,
        };
        let shared = Shared::new(core, !cli.no_nodelay);
        shared.set_security(security);
        let l =
            listener::bind(cli.listen).with_context(|| format!("listening on {}", cli.listen))?;
        let addr = l.local_addr()?;
        tracing::info!(
            "mirroring into {} (state in {}); listening on {addr}",
            root.display(),
            state_dir.display()
        );
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let serve = tokio::spawn(listener::serve(l, shared.clone()));
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
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
