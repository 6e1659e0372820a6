//! Loading: text → [`ConfigFile`] → cross-section checks → [`Config`] holding a valid
//! [`State`]. Every error carries the file, line, column and key path it is about.

use std::fmt;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};

use thiserror::Error;
use toml_edit::{Document, Item, Table, Value};
use vhost_routing::{State, ValidationError};

use crate::schema::{
    ConfigFile, HealthCheckConfig, LetsEncryptConfig, LogOutput, LoggingConfig, MetricsConfig,
    ProxyConfig,
};

/// Largest `proxy.max_retries`: Pingora makes at most 16 attempts per request.
pub const MAX_RETRIES: u64 = 15;
/// Largest client timeout, in milliseconds.
const ONE_HOUR_MS: u64 = 3_600_000;
/// Largest backend timeout, in milliseconds.
const ONE_DAY_MS: u64 = 86_400_000;
/// Largest grace period and probe timeout, in seconds.
const ONE_HOUR_SECS: u64 = 3_600;
/// Largest probe interval and DNS refresh period, in seconds.
const ONE_DAY_SECS: u64 = 86_400;
/// Largest health-check threshold.
const MAX_THRESHOLD: u64 = 1_000;
/// Largest `proxy.threads`.
const MAX_THREADS: u64 = 1_024;
/// Smallest `proxy.max_request_header_bytes`.
pub const MIN_HEADER_BYTES: u64 = 1024;
/// Largest `proxy.max_request_header_bytes` (Pingora's own request-head limit).
pub const MAX_HEADER_BYTES: u64 = 1_048_575;
/// Largest `proxy.max_connections`.
pub const MAX_CONNECTIONS: u64 = 10_000_000;

/// A loaded, validated configuration: settings plus the routing [`State`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `[proxy]`.
    pub proxy: ProxyConfig,
    /// `[logging]`.
    pub logging: LoggingConfig,
    /// `[metrics]`.
    pub metrics: MetricsConfig,
    /// `[health_check]`.
    pub health_check: HealthCheckConfig,
    /// `[lets_encrypt]`.
    pub lets_encrypt: Option<LetsEncryptConfig>,
    /// `[notifications]`.
    pub notifications: crate::schema::NotificationsConfig,
    /// Virtual hosts and backends.
    pub state: State,
}

/// Where in the file a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file (or a label such as `<string>`).
    pub origin: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// Key path, e.g. `virtual_hosts[1].domain`.
    pub key: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.origin, self.line, self.column, self.key
        )
    }
}

/// Loading failed; nothing was applied.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not valid TOML or breaks a rule of the schema or the model.
    #[error("{location}: {message}")]
    Invalid {
        /// Where.
        location: Box<Location>,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// The location of an [`ConfigError::Invalid`] error.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Self::Invalid { location, .. } => Some(location),
            Self::Read { .. } => None,
        }
    }
}

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Where `key` (a key path such as `proxy.default_cert_path`) is in the file at `path`, for
/// problems found after loading (e.g. a certificate file that does not load). `None` if the file
/// cannot be read; the position falls back to the deepest part of the path that exists.
pub fn locate(path: &Path, key: &str) -> Option<Location> {
    let text = std::fs::read_to_string(path).ok()?;
    let origin = path.display().to_string();
    Some(
        Locator {
            text: &text,
            origin: &origin,
        }
        .location(key),
    )
}

/// Where `field` of the `[[virtual_hosts]]` entry of `domain` is in the file at `path`.
pub fn locate_vhost_key(path: &Path, domain: &str, field: &str) -> Option<Location> {
    let text = std::fs::read_to_string(path).ok()?;
    let wanted = vhost_routing::DomainName::parse(domain).ok()?;
    let doc = Document::parse(text.as_str()).ok()?;
    let index = doc
        .get("virtual_hosts")?
        .as_array_of_tables()?
        .iter()
        .position(|t| {
            t.get("domain")
                .and_then(Item::as_str)
                .and_then(|d| vhost_routing::DomainName::parse(d).ok())
                .is_some_and(|d| d == wanted)
        })?;
    let origin = path.display().to_string();
    Some(
        Locator {
            text: &text,
            origin: &origin,
        }
        .location(&format!("virtual_hosts[{index}].{field}")),
    )
}

/// Where `field` of the `[[backends]]` entry with `id` is in the file at `path`.
pub fn locate_backend_key(path: &Path, id: &str, field: &str) -> Option<Location> {
    let text = std::fs::read_to_string(path).ok()?;
    let doc = Document::parse(text.as_str()).ok()?;
    let index = doc
        .get("backends")?
        .as_array_of_tables()?
        .iter()
        .position(|t| t.get("id").and_then(Item::as_str) == Some(id))?;
    let origin = path.display().to_string();
    Some(
        Locator {
            text: &text,
            origin: &origin,
        }
        .location(&format!("backends[{index}].{field}")),
    )
}

/// Validates configuration text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let locator = Locator { text, origin };
    let deserializer = toml::Deserializer::parse(text)
        .map_err(|e| locator.error(e.span(), String::new(), e.message()))?;
    let file: ConfigFile = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        let inner = e.into_inner();
        let span = inner.span().or_else(|| locator.span_of(&key));
        locator.error(span, key, inner.message())
    })?;
    check_sections(&file).map_err(|(key, message)| locator.at_key(&key, &message))?;
    let ConfigFile {
        proxy,
        logging,
        metrics,
        health_check,
        lets_encrypt,
        notifications,
        virtual_hosts,
        backends,
    } = file;
    let state = State::new(virtual_hosts.clone(), backends.clone()).map_err(|e| {
        let key = validation_key(&virtual_hosts, &backends)(&e);
        locator.at_key(&key, &e.to_string())
    })?;
    Ok(Config {
        proxy,
        logging,
        metrics,
        health_check,
        lets_encrypt,
        notifications,
        state,
    })
}

/// Every numeric key of the settings sections with its value and its accepted range (the
/// ranges docs/configuration.md lists). Bounds keep derived durations and counts far from
/// overflow.
fn numeric_keys(file: &ConfigFile) -> [(&'static str, u64, RangeInclusive<u64>); 21] {
    let (p, h) = (&file.proxy, &file.health_check);
    [
        ("proxy.threads", p.threads as u64, 0..=MAX_THREADS),
        (
            "proxy.connect_timeout_ms",
            p.connect_timeout_ms,
            1..=ONE_HOUR_MS,
        ),
        ("proxy.read_timeout_ms", p.read_timeout_ms, 1..=ONE_DAY_MS),
        ("proxy.write_timeout_ms", p.write_timeout_ms, 1..=ONE_DAY_MS),
        ("proxy.idle_timeout_ms", p.idle_timeout_ms, 1..=ONE_DAY_MS),
        (
            "proxy.upstream_hold_ms",
            p.upstream_hold_ms,
            0..=ONE_HOUR_MS,
        ),
        (
            "proxy.upstream_h2_streams",
            p.upstream_h2_streams as u64,
            1..=1000,
        ),
        (
            "proxy.websocket_idle_timeout_secs",
            p.websocket_idle_timeout_secs,
            1..=7 * 86_400,
        ),
        ("proxy.max_retries", p.max_retries as u64, 0..=MAX_RETRIES),
        (
            "proxy.upstream_keepalive_pool_size",
            p.upstream_keepalive_pool_size as u64,
            0..=MAX_CONNECTIONS,
        ),
        (
            "proxy.grace_period_secs",
            p.grace_period_secs,
            0..=ONE_HOUR_SECS,
        ),
        (
            "proxy.dns_refresh_secs",
            p.dns_refresh_secs,
            0..=ONE_DAY_SECS,
        ),
        (
            "proxy.client_header_timeout_ms",
            p.client_header_timeout_ms,
            1..=ONE_HOUR_MS,
        ),
        (
            "proxy.client_keepalive_timeout_ms",
            p.client_keepalive_timeout_ms,
            0..=ONE_HOUR_MS,
        ),
        (
            "proxy.max_request_header_bytes",
            p.max_request_header_bytes,
            MIN_HEADER_BYTES..=MAX_HEADER_BYTES,
        ),
        (
            "proxy.max_connections",
            p.max_connections.unwrap_or(1),
            1..=MAX_CONNECTIONS,
        ),
        (
            "health_check.interval_secs",
            h.interval_secs,
            1..=ONE_DAY_SECS,
        ),
        (
            "health_check.timeout_secs",
            h.timeout_secs,
            1..=ONE_HOUR_SECS,
        ),
        (
            "health_check.unhealthy_threshold",
            u64::from(h.unhealthy_threshold),
            1..=MAX_THRESHOLD,
        ),
        (
            "health_check.healthy_threshold",
            u64::from(h.healthy_threshold),
            1..=MAX_THRESHOLD,
        ),
        (
            "health_check.passive_failure_threshold",
            u64::from(h.passive_failure_threshold),
            0..=MAX_THRESHOLD,
        ),
    ]
}

/// Rules between keys of the settings sections: `(key path, message)` of the first one broken.
fn check_sections(file: &ConfigFile) -> Result<(), (String, String)> {
    let fail = |key: &str, message: &str| Err((key.to_owned(), message.to_owned()));
    let p = &file.proxy;
    if p.listen_addr == p.listen_addr_http {
        return fail(
            "proxy.listen_addr_http",
            "listen_addr and listen_addr_http must differ",
        );
    }
    if p.default_cert_path.is_some() != p.default_key_path.is_some() {
        return fail(
            "proxy.default_cert_path",
            "set both default_cert_path and default_key_path, or neither",
        );
    }
    for (key, name) in [
        ("proxy.canary_cookie", &p.canary_cookie),
        ("proxy.canary_override_header", &p.canary_override_header),
        ("proxy.canary_override_cookie", &p.canary_override_cookie),
    ] {
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || name.len() > 64 || !name.bytes().all(token) {
            return fail(
                key,
                &format!("{name:?} is not a valid name: 1-64 letters, digits or !#$%&'*+-.^_`|~"),
            );
        }
    }
    if p.canary_cookie == p.canary_override_cookie {
        return fail(
            "proxy.canary_override_cookie",
            "canary_cookie and canary_override_cookie must differ",
        );
    }
    if p.proxy_protocol && p.trusted_proxies.is_empty() {
        return fail(
            "proxy.proxy_protocol",
            "needs proxy.trusted_proxies: PROXY headers are read only from those peers",
        );
    }
    if let Some(cb) = &p.circuit_breaker {
        if let Err(field) = cb.check() {
            return fail(
                &format!("proxy.circuit_breaker.{field}"),
                "out of range (consecutive_5xx 0-1000, min_requests 1-1000000, window_secs 1-3600, open_secs 1-86400, max_ejection_percent 0-100)",
            );
        }
    }
    if p.management_api_token.as_deref().is_some_and(str::is_empty) {
        return fail(
            "proxy.management_api_token",
            "the token is empty; remove the key to disable authentication",
        );
    }
    let h = &file.health_check;
    for (key, value, range) in numeric_keys(file) {
        if !range.contains(&value) {
            return fail(
                key,
                &format!(
                    "{value} is out of range: must be between {} and {}",
                    range.start(),
                    range.end()
                ),
            );
        }
    }
    if file.metrics.token.as_deref().is_some_and(str::is_empty) {
        return fail(
            "metrics.token",
            "the token is empty; remove the key to serve metrics without authentication",
        );
    }
    if file.logging.output == LogOutput::File && file.logging.file_path.is_none() {
        return fail(
            "logging.output",
            "output = \"file\" needs logging.file_path",
        );
    }
    if let Err(reason) =
        vhost_routing::check_probe_fields(Some(&h.path), h.host.as_deref(), Some(h.expected_status))
    {
        return fail(
            &format!("health_check.{}", reason.key()),
            &reason.to_string(),
        );
    }
    if let Some(url) = &file.notifications.webhook_url {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        let host = rest.map(|r| r.split(['/', '?', '#']).next().unwrap_or(""));
        if host.is_none_or(|h| h.is_empty() || h.contains(char::is_whitespace)) {
            return fail(
                "notifications.webhook_url",
                "must be an http:// or https:// URL with a host",
            );
        }
    }
    if let Some(le) = &file.lets_encrypt {
        if !le.email.contains('@') || le.email.contains(char::is_whitespace) {
            return fail("lets_encrypt.email", "must be an e-mail address");
        }
        if let Some(url) = &le.directory_url {
            let host = url
                .strip_prefix("https://")
                .map(|r| r.split(['/', '?', '#']).next().unwrap_or(""));
            if host.is_none_or(|h| h.is_empty() || h.contains(char::is_whitespace)) {
                return fail(
                    "lets_encrypt.directory_url",
                    "must be an https:// URL with a host (ACME requires HTTPS)",
                );
            }
        }
        if !(1..=180).contains(&le.renew_before_days) {
            return fail(
                "lets_encrypt.renew_before_days",
                "must be between 1 and 180",
            );
        }
        if le.cache_dir.as_os_str().is_empty() {
            return fail("lets_encrypt.cache_dir", "must not be empty");
        }
    }
    Ok(())
}

/// Maps a model error to the key path of the record it names.
fn validation_key<'a>(
    vhosts: &'a [vhost_routing::VirtualHost],
    backends: &'a [vhost_routing::Backend],
) -> impl Fn(&ValidationError) -> String + 'a {
    move |e| {
        let vhost_index = |domain: &vhost_routing::DomainName| {
            // For duplicates, the second occurrence is the one to point at.
            vhosts.iter().rposition(|v| &v.domain == domain)
        };
        let backend_index =
            |id: &vhost_routing::BackendId| backends.iter().rposition(|b| &b.id == id);
        let (section, index) = match e {
            ValidationError::DuplicateDomain { domain }
            | ValidationError::IncompleteTlsPair { domain }
            | ValidationError::EmptyTlsPath { domain }
            | ValidationError::AcmeWildcard { domain }
            | ValidationError::InvalidPolicy { domain, .. }
            | ValidationError::AcmeWithOwnCertificate { domain }
            | ValidationError::CanaryIsPrimary { domain, .. }
            | ValidationError::InvalidRollout { domain, .. } => {
                ("virtual_hosts", vhost_index(domain))
            }
            ValidationError::DuplicateBackend { id }
            | ValidationError::EmptyTagList { id }
            | ValidationError::DuplicateTag { id, .. }
            | ValidationError::InvalidWeight { id, .. }
            | ValidationError::InvalidProbe { id, .. }
            | ValidationError::WildcardSni { id }
            | ValidationError::TlsSniRequired { id }
            | ValidationError::InvalidBackendPolicy { id, .. }
            | ValidationError::EmptyCaPath { id }
            | ValidationError::TlsSettingWithoutTls { id, .. } => ("backends", backend_index(id)),
        };
        match index {
            Some(i) => format!("{section}[{i}].{}", e.field()),
            None => section.to_owned(),
        }
    }
}

struct Locator<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Locator<'_> {
    fn error(&self, span: Option<Range<usize>>, key: String, message: &str) -> ConfigError {
        let offset = span.map_or(0, |s| s.start);
        let (line, column) = line_column(self.text, offset);
        ConfigError::Invalid {
            location: Box::new(Location {
                origin: self.origin.to_owned(),
                line,
                column,
                key,
            }),
            message: message.trim().to_owned(),
        }
    }

    fn at_key(&self, key: &str, message: &str) -> ConfigError {
        self.error(self.span_of(key), key.to_owned(), message)
    }

    fn location(&self, key: &str) -> Location {
        let offset = self.span_of(key).map_or(0, |s| s.start);
        let (line, column) = line_column(self.text, offset);
        Location {
            origin: self.origin.to_owned(),
            line,
            column,
            key: key.to_owned(),
        }
    }

    /// The span of the deepest existing item along a key path such as `backends[2].tags`.
    fn span_of(&self, key: &str) -> Option<Range<usize>> {
        let doc = Document::parse(self.text).ok()?;
        let mut node = Node::Item(doc.as_item());
        let mut best = None;
        for segment in parse_key_path(key) {
            let Some(next) = node.child(&segment) else {
                break;
            };
            best = next.span().or(best);
            node = next;
        }
        best
    }
}

/// A position while walking a parsed document.
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn child(self, segment: &Segment<'_>) -> Option<Node<'a>> {
        match (self, segment) {
            (Node::Item(Item::Table(t)) | Node::Table(t), Segment::Key(k)) => {
                t.get(k).map(Node::Item)
            }
            (Node::Item(Item::Value(v)) | Node::Value(v), Segment::Key(k)) => {
                v.as_inline_table()?.get(k).map(Node::Value)
            }
            (Node::Item(Item::ArrayOfTables(a)), Segment::Index(i)) => a.get(*i).map(Node::Table),
            (Node::Item(Item::Value(v)) | Node::Value(v), Segment::Index(i)) => {
                v.as_array()?.get(*i).map(Node::Value)
            }
            _ => None,
        }
    }

    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(i) => i.span(),
            Node::Table(t) => t.span(),
            Node::Value(v) => v.span(),
        }
    }
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn parse_key_path(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, mut rest) = part.split_once('[').map_or((part, ""), |(n, r)| (n, r));
        if !name.is_empty() {
            out.push(Segment::Key(name));
        }
        while let Some((num, after)) = rest.split_once(']') {
            if let Ok(i) = num.parse() {
                out.push(Segment::Index(i));
            }
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    out
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}
