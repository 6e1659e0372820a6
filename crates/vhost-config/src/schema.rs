//! The TOML schema: the seed's sections and keys, every optional key with a default.
//!
//! First stage of the File → Config pipeline: text is deserialised into [`ConfigFile`] (unknown
//! keys rejected everywhere), then [`crate::load`] checks the cross-section rules and builds the
//! model's [`vhost_routing::State`].

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vhost_routing::{Backend, ProbeKind, VirtualHost};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Listeners, timeouts, certificates and the admin API.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Application and access logs.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Active health checks.
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    /// Let's Encrypt (ACME) settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lets_encrypt: Option<LetsEncryptConfig>,
    /// Where rollout decisions are sent.
    #[serde(default)]
    pub notifications: NotificationsConfig,
    /// Domains served.
    #[serde(default)]
    pub virtual_hosts: Vec<VirtualHost>,
    /// Upstream servers.
    #[serde(default)]
    pub backends: Vec<Backend>,
}

/// `[proxy]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// HTTPS listener (default `0.0.0.0:443`); started when at least one certificate is configured.
    pub listen_addr: SocketAddr,
    /// Plain-HTTP listener (default `0.0.0.0:80`).
    pub listen_addr_http: SocketAddr,
    /// Admin REST API (default `127.0.0.1:8080`).
    pub management_api_addr: SocketAddr,
    /// Bearer token required by the admin API (also read from `PINGORA_VHOST_API_TOKEN`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub management_api_token: Option<String>,
    /// Certificate for clients whose SNI matches no domain certificate (PEM, chain allowed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_cert_path: Option<PathBuf>,
    /// Key of `default_cert_path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_key_path: Option<PathBuf>,
    /// Worker threads of the proxy service (default 0 = one per CPU core).
    pub threads: usize,
    /// TCP connect timeout to a backend, in milliseconds (default 3000).
    pub connect_timeout_ms: u64,
    /// Timeout for each read from a backend, in milliseconds (default 60000).
    pub read_timeout_ms: u64,
    /// Timeout for each write to a backend, in milliseconds (default 60000).
    pub write_timeout_ms: u64,
    /// How long an idle upstream keep-alive connection is kept, in milliseconds (default 60000).
    pub idle_timeout_ms: u64,
    /// Other backends of the same tag tried after a connection failure (default 2, at most 15).
    pub max_retries: usize,
    /// Idle upstream connections kept per proxy process (default 128).
    pub upstream_keepalive_pool_size: usize,
    /// On SIGTERM, how long in-flight requests get to finish, in seconds (default 10).
    pub grace_period_secs: u64,
    /// How often backend host names are re-resolved, in seconds (default 30; 0 disables).
    pub dns_refresh_secs: u64,
    /// Longest time a client gets to deliver a request head, in milliseconds: from accepting the
    /// connection (TLS handshake included) for its first request, from the first byte for the
    /// next ones (default 10000).
    pub client_header_timeout_ms: u64,
    /// Longest idle time between two requests on a client connection, in milliseconds (default
    /// 60000; 0 closes every connection after its first response).
    pub client_keepalive_timeout_ms: u64,
    /// Most client connections open at once; more are closed as soon as they are accepted
    /// (default: derived from the file-descriptor limit, see docs/security.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
    /// Largest request head (request line and headers) accepted, in bytes; larger ones get 431
    /// (default 32768).
    pub max_request_header_bytes: u64,
    /// Cookie that keeps a client's canary bucket (`sticky_key = "cookie"`; default
    /// `vhost_bucket`).
    pub canary_cookie: String,
    /// Request header forcing a side of a canary: `always` or `never` (default `X-Canary`).
    pub canary_override_header: String,
    /// Cookie forcing a side of a canary: `always` or `never` (default `canary`).
    pub canary_override_cookie: String,
    /// Add `X-Served-Tag: <tag>` to responses of domains with a canary, naming the tag that
    /// served (default false).
    pub expose_served_tag: bool,
    /// Concurrent streams per HTTP/2 connection to an `h2`/`h2c` backend (default 100).
    pub upstream_h2_streams: usize,
    /// Longest silence on an upgraded (WebSocket) connection, in seconds (default 3600).
    pub websocket_idle_timeout_secs: u64,
    /// Serve HTTP/2 with prior knowledge (h2c, gRPC without TLS) on the plain-HTTP listener
    /// (default true).
    pub h2c: bool,
    /// Networks of the proxies and load balancers in front of this one: only their
    /// `X-Forwarded-For` is believed for the client address (default: none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<vhost_routing::Cidr>,
    /// Read a PROXY protocol v2 header at the start of connections from `trusted_proxies`
    /// (default false); it names the client (HTTP/1.x requests).
    pub proxy_protocol: bool,
    /// Keep or make an `X-Request-Id` per request, send it to the backend and the client, and
    /// log it (default true).
    pub request_id: bool,
    /// Serve plain HTTP/1.1 requests to HTTP/1 backends on the fast path (default true; see
    /// docs/performance.md). `false`: every request takes Pingora's general proxy path.
    pub h1_fast_path: bool,
    /// How long an idle client connection keeps the backend connections of its fast-path
    /// requests before they go back to the shared pool, in milliseconds (default 1000; 0: back
    /// after every request; at most `idle_timeout_ms` applies).
    pub upstream_hold_ms: u64,
    /// Unix socket over which a new process started with `--upgrade` takes the listening
    /// sockets from this one (on SIGQUIT); absent: no zero-downtime upgrade.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade_sock: Option<PathBuf>,
    /// Outlier detection for every backend (absent: off); each field optional.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<vhost_routing::CircuitBreaker>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([0, 0, 0, 0], 443)),
            listen_addr_http: SocketAddr::from(([0, 0, 0, 0], 80)),
            management_api_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            management_api_token: None,
            default_cert_path: None,
            default_key_path: None,
            threads: 0,
            connect_timeout_ms: 3_000,
            read_timeout_ms: 60_000,
            write_timeout_ms: 60_000,
            idle_timeout_ms: 60_000,
            max_retries: 2,
            upstream_keepalive_pool_size: 128,
            grace_period_secs: 10,
            dns_refresh_secs: 30,
            client_header_timeout_ms: 10_000,
            client_keepalive_timeout_ms: 60_000,
            max_connections: None,
            max_request_header_bytes: 32 * 1024,
            canary_cookie: "vhost_bucket".to_owned(),
            canary_override_header: "X-Canary".to_owned(),
            canary_override_cookie: "canary".to_owned(),
            expose_served_tag: false,
            upstream_h2_streams: 100,
            websocket_idle_timeout_secs: 3600,
            h2c: true,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            request_id: true,
            h1_fast_path: true,
            upstream_hold_ms: 1_000,
            circuit_breaker: None,
            upgrade_sock: None,
        }
    }
}

/// Log verbosity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Everything.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation (default).
    #[default]
    Info,
    /// Problems worth a look.
    Warn,
    /// Failures only.
    Error,
}

impl LogLevel {
    /// The level's name as `tracing` filters spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where logs go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogOutput {
    /// Standard output (default).
    #[default]
    Console,
    /// The file at `file_path` (appended to).
    File,
}

/// `[logging]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Verbosity (default `info`).
    pub level: LogLevel,
    /// `text` (default) or `json`.
    pub format: LogFormat,
    /// `console` (default) or `file`.
    pub output: LogOutput,
    /// Log file, required when `output = "file"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_path: Option<PathBuf>,
    /// One access-log event per proxied request (target `access`; default true).
    pub access_log: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: LogLevel::default(),
            format: LogFormat::default(),
            output: LogOutput::default(),
            file_path: None,
            access_log: true,
        }
    }
}

/// `[notifications]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsConfig {
    /// `http://` or `https://` URL that receives each rollout event (step, abort, promotion)
    /// as a JSON `POST`; none by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Record metrics and serve them (default true).
    pub enabled: bool,
    /// Prometheus listener (default `127.0.0.1:9090`), serving `/metrics` and `/api/v1/metrics`.
    pub listen_addr: SocketAddr,
    /// Bearer token a scraper must send (also read from `PINGORA_VHOST_METRICS_TOKEN`); none by
    /// default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 9090)),
            token: None,
        }
    }
}

/// `[health_check]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// Seconds between probes of one backend (default 10).
    pub interval_secs: u64,
    /// Seconds before a probe counts as failed (default 5).
    pub timeout_secs: u64,
    /// Consecutive failures that mark a backend down (default 3).
    pub unhealthy_threshold: u32,
    /// Consecutive successes that mark a backend up again (default 2).
    pub healthy_threshold: u32,
    /// Probe kind: `tcp` (connect, default) or `http` (`GET path`).
    pub kind: ProbeKind,
    /// Path of HTTP probes (default `/`).
    pub path: String,
    /// `Host` header of HTTP probes (default: the backend address's host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Inclusive range of healthy HTTP statuses (default `[200, 399]`).
    pub expected_status: [u16; 2],
    /// Consecutive connection failures seen by the proxy that eject a backend until an active
    /// probe succeeds again (default 5; 0 disables passive ejection).
    pub passive_failure_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            interval_secs: 10,
            timeout_secs: 5,
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            kind: ProbeKind::Tcp,
            path: "/".to_owned(),
            host: None,
            expected_status: [200, 399],
            passive_failure_threshold: 5,
        }
    }
}

/// `[lets_encrypt]`: automatic certificates from an ACME CA (see docs/acme.md). Every domain
/// without `tls_cert_path` (and without `acme = false`) gets one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LetsEncryptConfig {
    /// ACME account e-mail.
    pub email: String,
    /// Use Let's Encrypt's staging directory instead of production (default true; ignored
    /// when `directory_url` is set).
    #[serde(default = "default_true")]
    pub staging: bool,
    /// Where the account, certificates and keys are kept (default
    /// `/var/lib/pingora-vhost/acme`; created 0700, files 0600).
    #[serde(default = "default_acme_cache_dir")]
    pub cache_dir: PathBuf,
    /// Directory URL of any ACME CA (`https://...`); overrides `staging`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory_url: Option<String>,
    /// PEM file of CA certificates trusted for the directory's own HTTPS (private or test CAs);
    /// the system's roots are trusted too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory_ca_path: Option<PathBuf>,
    /// How domains are validated (default `http-01`).
    #[serde(default)]
    pub challenge: AcmeChallenge,
    /// Renew this many days before expiry (default 30; 1 to 180).
    #[serde(default = "default_renew_before_days")]
    pub renew_before_days: u32,
}

/// The ACME challenge type used to prove control of a domain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AcmeChallenge {
    /// A token served at `/.well-known/acme-challenge/<token>` on the HTTP listener (port 80).
    #[default]
    #[serde(rename = "http-01")]
    Http01,
    /// A certificate presented for the `acme-tls/1` ALPN on the HTTPS listener (port 443).
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT_PRODUCTION: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory.
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

impl LetsEncryptConfig {
    /// The directory URL in effect: `directory_url`, else Let's Encrypt staging or production.
    pub fn directory(&self) -> &str {
        match &self.directory_url {
            Some(url) => url,
            None if self.staging => LETS_ENCRYPT_STAGING,
            None => LETS_ENCRYPT_PRODUCTION,
        }
    }
}

fn default_acme_cache_dir() -> PathBuf {
    PathBuf::from("/var/lib/pingora-vhost/acme")
}

fn default_renew_before_days() -> u32 {
    30
}

fn default_true() -> bool {
    true
}
