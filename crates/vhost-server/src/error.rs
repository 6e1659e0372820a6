//! Why the proxy could not start, or stopped abnormally. Every variant keeps its cause as the
//! error source and says where it comes from (config key, file position, listener).

use std::net::SocketAddr;

use thiserror::Error;
use vhost_config::{ConfigError, PersistError};

use crate::checks::LocatedCertError;
use crate::demo::DemoError;

/// A failure to start or run the proxy.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The config file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A certificate file is unusable (with the position of the key that names it).
    #[error(transparent)]
    Cert(Box<LocatedCertError>),
    /// The config file cannot be opened for write-back.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// A binary upgrade cannot proceed.
    #[error("upgrade: {0}")]
    Upgrade(String),
    /// The `[lets_encrypt]` settings cannot be used (e.g. an unreadable `directory_ca_path`).
    #[error("{0}")]
    Acme(String),
    /// The admin API would be exposed without authentication.
    #[error(transparent)]
    Exposure(#[from] vhost_admin::ExposureError),
    /// A listener address cannot be bound.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The config key it comes from.
        key: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Pingora refused the proxy service.
    #[error("proxy setup failed: {0}")]
    Setup(#[source] Box<pingora_error::Error>),
    /// The metrics recorder cannot be built.
    #[error("metrics: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    /// A thread or runtime of the process cannot be started.
    #[error("cannot start the {what}: {source}")]
    Start {
        /// Which thread or runtime.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A signal cannot be watched.
    #[error("cannot watch {signal}: {source}")]
    Signal {
        /// The signal's name.
        signal: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The Pingora server thread ended while it should have been serving.
    #[error("the proxy server stopped unexpectedly")]
    Stopped,
    /// The demo could not be set up.
    #[error(transparent)]
    Demo(#[from] DemoError),
}

impl From<LocatedCertError> for ServerError {
    fn from(e: LocatedCertError) -> Self {
        Self::Cert(Box::new(e))
    }
}
