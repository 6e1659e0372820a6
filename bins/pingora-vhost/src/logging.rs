//! `[logging]` → a `tracing` subscriber: level; text or JSON lines; console or file. Lines are
//! written by a background thread (non-blocking writer), so logging never blocks a proxy thread
//! on the terminal or the disk. Access-log events have the target `access`.

use std::fs::OpenOptions;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;
use vhost_config::{LogFormat, LogOutput, LoggingConfig};

/// Pingora's own lifecycle chatter, which the binary replaces with lines of its own (the signal
/// actually received, requests drained or cut): only its warnings and errors are kept.
const QUIET_TARGETS: &str = "pingora_core::server=warn,pingora_core::services=warn";

/// The log file cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open log file {}: {source}", path.display())]
pub(crate) struct LogFileError {
    path: std::path::PathBuf,
    source: std::io::Error,
}

/// Installs the global subscriber. `RUST_LOG` overrides the configured level when set. Keep the
/// returned guard alive: dropping it flushes and stops the writer.
pub(crate) fn init(config: &LoggingConfig) -> Result<WorkerGuard, LogFileError> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},{QUIET_TARGETS}", config.level.as_str())));
    let (writer, guard) = match (config.output, &config.file_path) {
        (LogOutput::File, Some(path)) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| LogFileError {
                    path: path.clone(),
                    source,
                })?;
            tracing_appender::non_blocking(file)
        }
        _ => tracing_appender::non_blocking(std::io::stdout()),
    };
    let ansi = config.output == LogOutput::Console && config.format == LogFormat::Text;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_writer(writer)
        .with_ansi(ansi);
    // A subscriber already installed (embedding, tests) is not an error: events go there.
    let _ = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Ok(guard)
}
