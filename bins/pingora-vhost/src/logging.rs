//! `[logging]` → a `tracing` subscriber (level; text or JSON; console or file).

use std::fs::OpenOptions;
use std::sync::Arc;

use tracing_subscriber::EnvFilter;
use vhost_config::{LogFormat, LogOutput, LoggingConfig};

use crate::server::AppError;

/// Installs the global subscriber. `RUST_LOG` overrides the configured level when set.
pub(crate) fn init(config: &LoggingConfig) -> Result<(), AppError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(config.level.as_str()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let result = match (config.output, &config.file_path) {
        (LogOutput::File, Some(path)) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| AppError::LogFile {
                    path: path.clone(),
                    source,
                })?;
            let writer = Arc::new(file);
            match config.format {
                LogFormat::Json => builder
                    .json()
                    .with_writer(writer)
                    .with_ansi(false)
                    .try_init(),
                LogFormat::Text => builder.with_writer(writer).with_ansi(false).try_init(),
            }
        }
        _ => match config.format {
            LogFormat::Json => builder.json().with_writer(std::io::stdout).try_init(),
            LogFormat::Text => builder.with_writer(std::io::stdout).try_init(),
        },
    };
    // A subscriber already installed (tests running several servers) is not an error.
    let _ = result;
    Ok(())
}
