//! `pingora-vhost`: the binary. Wiring only — it loads the config ([`vhost_config`]), publishes
//! the routing snapshot ([`vhost_routing`]), loads certificates and starts the Pingora proxy
//! service ([`vhost_pingora`]), then waits for signals: SIGHUP reloads the config, SIGTERM and
//! SIGINT drain in-flight requests and exit.

mod checks;
mod demo;
mod logging;
mod memory;
mod metrics;
mod reload;
mod server;

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
    #[arg(short, long, default_value = "config.toml", global = true)]
    config: PathBuf,
    /// Validate the configuration exactly as start-up does (file, certificates, exposure rules)
    /// and exit: 0 if valid (warnings on stderr), 1 if not.
    #[arg(long)]
    check: bool,
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
        /// HTTP port of the proxy (default 8000).
        #[arg(long, default_value_t = 8000)]
        http_port: u16,
    },
}

#[allow(clippy::print_stderr, clippy::print_stdout)]
fn main() -> ExitCode {
    memory::release_freed_pages_promptly();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Demo { dir, http_port }) => demo::run(dir, http_port),
        None if cli.check => match server::check(&cli.config) {
            Ok((summary, warnings)) => {
                for warning in warnings {
                    eprintln!("warning: {warning}");
                }
                println!("{}: OK ({summary})", cli.config.display());
                return ExitCode::SUCCESS;
            }
            Err(e) => Err(e),
        },
        None => server::run(&cli.config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pingora-vhost: {e}");
            ExitCode::FAILURE
        }
    }
}
