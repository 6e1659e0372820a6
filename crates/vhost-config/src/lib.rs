//! # vhost-config
//!
//! pingora-vhost's configuration file: the TOML schema of the seed ([`schema`]), loading with
//! errors that name file, line, column and key ([`load`](mod@load)), and crash-safe write-back of
//! runtime changes that keeps the user's comments and formatting ([`persist`]).
//!
//! Data flow: file text → [`ConfigFile`] (serde, unknown keys rejected) → cross-section checks →
//! [`Config`] with a valid [`vhost_routing::State`] → the binary publishes it through
//! [`vhost_routing::RouteWriter`]. At runtime, the admin API's [`vhost_routing::Change`]s come
//! back here through [`ConfigWriter::persist`].

pub mod load;
pub mod persist;
pub mod schema;

pub use load::{
    load, locate, locate_backend_key, locate_vhost_key, parse, Config, ConfigError, Location,
};
pub use persist::{write_atomically, ConfigWriter, PersistError};
pub use schema::{
    AcmeChallenge, ConfigFile, HealthCheckConfig, LetsEncryptConfig, LogFormat, LogLevel,
    LogOutput, LoggingConfig, MetricsConfig, NotificationsConfig, ProxyConfig,
};
