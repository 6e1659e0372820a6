//! `pingora-vhost`: the binary. Command-line parsing and logging set-up, then one call into
//! [`vhost_server`], which builds and runs the whole proxy (see its docs for the data flow).

mod logging;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc malloc: Pingora allocates and frees many small buffers per request,
/// and glibc's allocator was ~17 % of the proxy's CPU profile (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A runtime-configurable virtual-host reverse proxy on Cloudflare Pingora.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file.
    #[arg(short, long, default_value = "config.toml")]
    config: PathBuf,
    /// Validate the configuration exactly as start-up does (file, certificates, exposure rules)
    /// and exit: 0 if valid (warnings on stderr), 1 if not.
    #[arg(long)]
    check: bool,
    /// Take the listening sockets over from the running process (zero-downtime binary
    /// upgrade over `[proxy] upgrade_sock`): start this, then send the old process SIGQUIT.
    #[arg(long, conflicts_with = "check")]
    upgrade: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a self-contained demo: two built-in backends (tags "a" and "b") on loopback and the
    /// proxy on unprivileged ports; prints curl lines to try.
    Demo {
        /// Directory for the demo's config and certificate (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// HTTP port of the proxy; the demo also uses this port +80 (admin API), +443 (HTTPS)
        /// and +1090 (metrics).
        #[arg(long, default_value_t = 8000)]
        http_port: u16,
    },
}

/// Why the process failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Server(#[from] vhost_server::ServerError),
    #[error(transparent)]
    Config(#[from] vhost_config::ConfigError),
    #[error(transparent)]
    Log(#[from] logging::LogFileError),
}

#[allow(clippy::print_stdout)]
fn demo(dir: Option<PathBuf>, http_port: u16) -> Result<(), Failure> {
    let demo = vhost_server::demo::Demo::prepare(dir, http_port)?;
    let _log_guard = logging::init(&demo.config().logging)?;
    println!("{}", demo.banner());
    Ok(demo.run()?)
}

#[allow(clippy::print_stderr, clippy::print_stdout)]
fn check(config: &std::path::Path) -> Result<(), Failure> {
    let report = vhost_server::check(config)?;
    for warning in report.warnings {
        eprintln!("warning: {warning}");
    }
    println!("{}: OK ({})", config.display(), report.summary);
    Ok(())
}

fn serve(path: &std::path::Path, upgrade: bool) -> Result<(), Failure> {
    let config = vhost_config::load(path)?;
    let _log_guard = logging::init(&config.logging)?;
    let start = if upgrade {
        vhost_server::Start::Upgrade
    } else {
        vhost_server::Start::Fresh
    };
    Ok(vhost_server::run_with(
        config,
        path,
        vhost_server::Signals::Process,
        start,
    )?)
}

#[allow(clippy::print_stderr)]
fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Demo { dir, http_port }) => demo(dir, http_port),
        None if cli.check => check(&cli.config),
        None => serve(&cli.config, cli.upgrade),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pingora-vhost: {e}");
            ExitCode::FAILURE
        }
    }
}
