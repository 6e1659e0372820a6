//! Virtual hosts and backends: the records users write in the config file and send to the API.
//!
//! These are plain data with serde derives (the config's and the API's vocabulary). Their fields
//! are validated newtypes; the few cross-field rules (weight range, non-empty tag list, TLS file
//! pairs) are checked by [`VirtualHost::validate`] / [`Backend::validate`], which
//! [`crate::State`] runs on every record it accepts.

use serde::{Deserialize, Serialize};

use crate::canary::Canary;
use crate::error::{ProbeFieldError, ValidationError};
use crate::names::{BackendAddress, BackendId, DomainName, Tag};
use crate::policy::{Cidr, CircuitBreakerOverride, HeaderRules, RateLimit};

/// Largest accepted backend weight (as in HAProxy); the default is 1.
pub const MAX_WEIGHT: u16 = 256;

fn default_weight() -> u16 {
    1
}

/// Integers that may arrive written as whole floats (`2.0`): JSON Schema, which the API document
/// speaks, counts `2.0` as an integer, so the API accepts it too.
pub(crate) mod whole {
    use serde::de::{Deserializer, Error, Unexpected, Visitor};
    use serde::Deserialize;
    use std::fmt;

    /// 2^53: the largest range where every whole float is an exact integer.
    const EXACT: u64 = 1 << 53;

    /// An integer from 0 to `MAX` written as an integer or a whole float.
    pub(crate) struct Whole<const MAX: u64>(pub(crate) u64);

    impl<'de, const MAX: u64> Deserialize<'de> for Whole<MAX> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<const MAX: u64>;
            impl<const MAX: u64> Visitor<'_> for V<MAX> {
                type Value = Whole<MAX>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    write!(f, "an integer from 0 to {MAX}")
                }
                fn visit_u64<E: Error>(self, v: u64) -> Result<Whole<MAX>, E> {
                    if v <= MAX {
                        Ok(Whole(v))
                    } else {
                        Err(E::invalid_value(Unexpected::Unsigned(v), &self))
                    }
                }
                fn visit_i64<E: Error>(self, v: i64) -> Result<Whole<MAX>, E> {
                    match u64::try_from(v) {
                        Ok(v) if v <= MAX => Ok(Whole(v)),
                        _ => Err(E::invalid_value(Unexpected::Signed(v), &self)),
                    }
                }
                fn visit_f64<E: Error>(self, v: f64) -> Result<Whole<MAX>, E> {
                    // Bounded by 2^53 (and MAX): the conversion is exact.
                    #[allow(clippy::cast_precision_loss)]
                    let limit = MAX.min(EXACT) as f64;
                    if v.fract() == 0.0 && (0.0..=limit).contains(&v) {
                        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                        Ok(Whole(v as u64))
                    } else {
                        Err(E::invalid_value(Unexpected::Float(v), &self))
                    }
                }
            }
            d.deserialize_any(V::<MAX>)
        }
    }

    type U16 = Whole<{ u16::MAX as u64 }>;
    type U32 = Whole<{ u32::MAX as u64 }>;
    type U64 = Whole<{ u64::MAX }>;

    /// The bound makes the narrowing exact.
    #[allow(clippy::cast_possible_truncation)]
    fn narrow16(w: U16) -> u16 {
        w.0 as u16
    }

    pub(crate) fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        U64::deserialize(d).map(|w| w.0)
    }

    pub(crate) fn option_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Option::<U64>::deserialize(d).map(|o| o.map(|w| w.0))
    }

    pub(crate) fn usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let v = U64::deserialize(d)?.0;
        usize::try_from(v).map_err(|_| D::Error::custom(format!("{v} is too large")))
    }

    pub(crate) fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        #[allow(clippy::cast_possible_truncation)] // bounded by u32::MAX
        U32::deserialize(d).map(|w| w.0 as u32)
    }

    pub(crate) fn option_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        #[allow(clippy::cast_possible_truncation)] // bounded by u32::MAX
        Option::<U32>::deserialize(d).map(|o| o.map(|w| w.0 as u32))
    }

    pub(super) fn u16<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
        U16::deserialize(d).map(narrow16)
    }

    pub(super) fn option_u16<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
        Option::<U16>::deserialize(d).map(|o| o.map(narrow16))
    }

    pub(super) fn option_pair<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<[u16; 2]>, D::Error> {
        Option::<[U16; 2]>::deserialize(d).map(|o| o.map(|[a, b]| [narrow16(a), narrow16(b)]))
    }
}

fn is_default_weight(w: &u16) -> bool {
    *w == 1
}

/// A domain served by the proxy and the tag of the backends it currently sends traffic to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VirtualHost {
    /// The domain (exact, or a `*.example.com` wildcard).
    pub domain: DomainName,
    /// Requests go to the backends carrying this tag.
    pub enabled_backends_tag: Tag,
    /// Answer plain-HTTP requests with a 308 redirect to HTTPS.
    #[serde(default)]
    pub http_to_https: bool,
    /// PEM certificate (chain allowed) presented for this domain's SNI; set together with
    /// `tls_key_path`.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_path: Option<String>,
    /// PEM private key matching `tls_cert_path`.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_path: Option<String>,
    /// A share of traffic sent to a second tag (change it with
    /// `PUT /api/v1/domains/{domain}/canary`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Box<Canary>>,
    /// Automatic (ACME) certificate: absent → one is obtained when `[lets_encrypt]` is
    /// configured and the domain has no `tls_cert_path`; `false` opts out; `true` insists (an
    /// error for wildcard domains and domains with their own certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<bool>,
    /// Requests per client (or per domain, or per header value) beyond which the proxy answers
    /// 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<Box<RateLimit>>,
    /// Client networks allowed (empty: everyone); others get 403.
    #[cfg_attr(feature = "openapi", schema(schema_with = cidr_list_schema))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Cidr>,
    /// Client networks refused with 403 (wins over `allow`).
    #[cfg_attr(feature = "openapi", schema(schema_with = cidr_list_schema))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Cidr>,
    /// Changes to the request headers sent to the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<Box<HeaderRules>>,
    /// Changes to the response headers sent to the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<Box<HeaderRules>>,
}

/// A list of IP networks, for the API document.
#[cfg(feature = "openapi")]
fn cidr_list_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(crate::names::cidr_pattern()))
                .examples(["10.0.0.0/8"]),
        )
        .max_items(Some(crate::policy::MAX_CIDRS))
        .build()
}

/// An optional list of IP networks (update), for the API document.
#[cfg(feature = "openapi")]
fn optional_cidr_list_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{SchemaType, Type};
    let mut schema = cidr_list_schema();
    schema.schema_type = SchemaType::from_iter([Type::Array, Type::Null]);
    schema
}

impl VirtualHost {
    /// A virtual host with the given domain and tag, no redirect and no own certificate.
    pub fn new(domain: DomainName, tag: Tag) -> Self {
        Self {
            domain,
            enabled_backends_tag: tag,
            http_to_https: false,
            tls_cert_path: None,
            tls_key_path: None,
            canary: None,
            acme: None,
            rate_limit: None,
            allow: Vec::new(),
            deny: Vec::new(),
            request_headers: None,
            response_headers: None,
        }
    }

    /// Whether this domain gets an ACME certificate when ACME is configured: no own
    /// certificate, not a wildcard, not opted out.
    pub fn wants_acme(&self) -> bool {
        self.acme != Some(false)
            && self.tls_cert_path.is_none()
            && self.domain.wildcard_suffix().is_none()
    }

    /// Checks the cross-field rules.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Some(canary) = &self.canary {
            if canary.tag == self.enabled_backends_tag {
                return Err(ValidationError::CanaryIsPrimary {
                    domain: self.domain.clone(),
                    tag: canary.tag.clone(),
                });
            }
            canary
                .check()
                .map_err(|reason| ValidationError::InvalidRollout {
                    domain: self.domain.clone(),
                    reason,
                })?;
        }
        let policy = |field: &'static str, reason: String| ValidationError::InvalidPolicy {
            domain: self.domain.clone(),
            field,
            reason,
        };
        if let Some(limit) = &self.rate_limit {
            limit.check().map_err(|field| {
                policy(
                    if field == "burst" {
                        "rate_limit.burst"
                    } else {
                        "rate_limit.requests_per_second"
                    },
                    "out of range (requests_per_second 1-1000000, burst 1-10000000)".to_owned(),
                )
            })?;
        }
        for (field, list) in [("allow", &self.allow), ("deny", &self.deny)] {
            if list.len() > crate::policy::MAX_CIDRS {
                return Err(policy(
                    field,
                    format!("at most {} networks", crate::policy::MAX_CIDRS),
                ));
            }
        }
        for (field, rules) in [
            ("request_headers", &self.request_headers),
            ("response_headers", &self.response_headers),
        ] {
            if let Some(rules) = rules {
                rules.check().map_err(|e| policy(field, e.to_string()))?;
            }
        }
        if self.acme == Some(true) {
            if self.domain.wildcard_suffix().is_some() {
                return Err(ValidationError::AcmeWildcard {
                    domain: self.domain.clone(),
                });
            }
            if self.tls_cert_path.is_some() {
                return Err(ValidationError::AcmeWithOwnCertificate {
                    domain: self.domain.clone(),
                });
            }
        }
        match (&self.tls_cert_path, &self.tls_key_path) {
            (Some(c), Some(k)) if c.is_empty() || k.is_empty() => {
                Err(ValidationError::EmptyTlsPath {
                    domain: self.domain.clone(),
                })
            }
            (Some(_), None) | (None, Some(_)) => Err(ValidationError::IncompleteTlsPair {
                domain: self.domain.clone(),
            }),
            _ => Ok(()),
        }
    }
}

/// How a backend is probed by active health checking.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// A TCP connect succeeds (default).
    #[default]
    Tcp,
    /// `GET path` answers a status in the expected range (HTTP/1.1, or HTTP/2 for `h2`/`h2c`
    /// backends; over TLS for `https`/`h2` ones).
    Http,
    /// The gRPC health service (`grpc.health.v1.Health/Check`, service `""`) answers `SERVING`
    /// (HTTP/2; over TLS for `https`/`h2` backends).
    Grpc,
}

/// `expected_status`: two HTTP status codes (or null).
#[cfg(feature = "openapi")]
fn status_range_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, SchemaType, Type};
    ArrayBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
        .items(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(100))
                .maximum(Some(599)),
        )
        .min_items(Some(2))
        .max_items(Some(2))
        .build()
}

/// `tags`: at least one tag, none repeated.
#[cfg(feature = "openapi")]
fn tags_schema() -> utoipa::openapi::schema::Array {
    use utoipa::PartialSchema;
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(<Tag as PartialSchema>::schema())
        .min_items(Some(1))
        .unique_items(true)
        .build()
}

/// `tags` of an update: absent, null, or as in [`tags_schema`].
#[cfg(feature = "openapi")]
fn optional_tags_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{SchemaType, Type};
    let mut schema = tags_schema();
    schema.schema_type = SchemaType::from_iter([Type::Array, Type::Null]);
    schema
}

/// Per-backend overrides of the `[health_check]` probe settings; absent fields use the global ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ProbeOverride {
    /// `tcp`, `http` or `grpc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ProbeKind>,
    /// HTTP probe path, starting with `/`, without spaces or control characters.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^/[^\x00-\x20\x7f]*$", example = "/healthz")
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `Host` header of HTTP probes (default: the backend address's host); no spaces or
    /// control characters.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[^\x00-\x20\x7f]+$"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Inclusive range of healthy HTTP status codes, e.g. `[200, 399]` (low first).
    #[cfg_attr(feature = "openapi", schema(schema_with = status_range_schema))]
    #[serde(
        default,
        deserialize_with = "whole::option_pair",
        skip_serializing_if = "Option::is_none"
    )]
    pub expected_status: Option<[u16; 2]>,
}

impl ProbeOverride {
    /// Checks path, host and status range.
    pub fn check(&self) -> Result<(), ProbeFieldError> {
        check_probe_fields(
            self.path.as_deref(),
            self.host.as_deref(),
            self.expected_status,
        )
    }
}

/// Shared rules of probe settings (global and per backend).
pub fn check_probe_fields(
    path: Option<&str>,
    host: Option<&str>,
    expected_status: Option<[u16; 2]>,
) -> Result<(), ProbeFieldError> {
    if let Some(path) = path {
        if !path.starts_with('/')
            || path
                .chars()
                .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
        {
            return Err(ProbeFieldError::Path(path.to_owned()));
        }
    }
    if let Some(host) = host {
        if host.is_empty()
            || host
                .chars()
                .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
        {
            return Err(ProbeFieldError::Host(host.to_owned()));
        }
    }
    if let Some([lo, hi]) = expected_status {
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            return Err(ProbeFieldError::ExpectedStatus(lo, hi));
        }
    }
    Ok(())
}

/// An upstream server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// Unique id.
    pub id: BackendId,
    /// `host:port` to connect to.
    pub address: BackendAddress,
    /// Tags grouping this backend into pools (at least one, no repeats).
    #[cfg_attr(feature = "openapi", schema(schema_with = tags_schema))]
    pub tags: Vec<Tag>,
    /// Relative share of its pools' traffic, 1..=256 (default 1).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 256, default = 1))]
    #[serde(
        default = "default_weight",
        deserialize_with = "whole::u16",
        skip_serializing_if = "is_default_weight"
    )]
    pub weight: u16,
    /// Probe settings overriding `[health_check]` for this backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<ProbeOverride>,
    /// How requests are sent: `http` (HTTP/1.1, default), `https` (HTTP/1.1 over TLS), `h2c`
    /// (HTTP/2 in clear text, prior knowledge), `h2` (HTTP/2 over TLS).
    #[serde(default, skip_serializing_if = "BackendProtocol::is_default")]
    pub protocol: BackendProtocol,
    /// `https`/`h2`: verify the backend's certificate and name (default true).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub tls_verify: bool,
    /// `https`/`h2`: the server name sent (SNI) and verified (default: the host of `address`).
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::names::schema::optional_host_name))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_sni: Option<DomainName>,
    /// `https`/`h2`: PEM file of the CA certificates trusted for this backend (default: the
    /// system's roots).
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_path: Option<String>,
    /// Changes to `[proxy] circuit_breaker` for this backend (when the breaker is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerOverride>,
    /// Requests in flight to this backend beyond which others are answered 503 at once
    /// (1–1000000; default: no limit).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1_000_000))]
    #[serde(
        default,
        deserialize_with = "whole::option_u32",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_concurrent_requests: Option<u32>,
}

fn default_true() -> bool {
    true
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_true(b: &bool) -> bool {
    *b
}

/// The protocol spoken to a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    /// HTTP/1.1 in clear text.
    #[default]
    Http,
    /// HTTP/1.1 over TLS.
    Https,
    /// HTTP/2 in clear text (prior knowledge), e.g. gRPC servers without TLS.
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`).
    H2,
}

impl BackendProtocol {
    /// True for `http`.
    pub fn is_default(&self) -> bool {
        *self == Self::Http
    }

    /// Whether the connection is TLS.
    pub fn tls(self) -> bool {
        matches!(self, Self::Https | Self::H2)
    }

    /// Whether requests go as HTTP/2.
    pub fn h2(self) -> bool {
        matches!(self, Self::H2c | Self::H2)
    }

    /// The name used in the config and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
            Self::H2c => "h2c",
            Self::H2 => "h2",
        }
    }
}

impl Backend {
    /// A backend with weight 1.
    pub fn new(id: BackendId, address: BackendAddress, tags: Vec<Tag>) -> Self {
        Self {
            id,
            address,
            tags,
            weight: 1,
            health_check: None,
            protocol: BackendProtocol::Http,
            tls_verify: true,
            tls_sni: None,
            tls_ca_path: None,
            circuit_breaker: None,
            max_concurrent_requests: None,
        }
    }

    /// The server name sent to a TLS backend: `tls_sni`, else the host of its address (an IP
    /// address gives no SNI, and the certificate is then verified against the IP).
    pub fn sni(&self) -> String {
        match (&self.tls_sni, self.address.host()) {
            (Some(name), _) => name.as_str().to_owned(),
            (None, crate::names::Host::Name(name)) => name.to_string(),
            (None, crate::names::Host::Ip(_)) => String::new(),
        }
    }

    /// Checks the cross-field rules.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.tags.is_empty() {
            return Err(ValidationError::EmptyTagList {
                id: self.id.clone(),
            });
        }
        for (i, tag) in self.tags.iter().enumerate() {
            if self.tags[..i].contains(tag) {
                return Err(ValidationError::DuplicateTag {
                    id: self.id.clone(),
                    tag: tag.clone(),
                });
            }
        }
        if self.weight == 0 || self.weight > MAX_WEIGHT {
            return Err(ValidationError::InvalidWeight {
                id: self.id.clone(),
                weight: self.weight,
            });
        }
        if let Some(probe) = &self.health_check {
            probe
                .check()
                .map_err(|reason| ValidationError::InvalidProbe {
                    id: self.id.clone(),
                    reason,
                })?;
        }
        if self
            .tls_sni
            .as_ref()
            .is_some_and(|n| n.wildcard_suffix().is_some())
        {
            return Err(ValidationError::WildcardSni {
                id: self.id.clone(),
            });
        }
        if self.tls_ca_path.as_deref() == Some("") {
            return Err(ValidationError::EmptyCaPath {
                id: self.id.clone(),
            });
        }
        if self
            .max_concurrent_requests
            .is_some_and(|m| !(1..=1_000_000).contains(&m))
        {
            return Err(ValidationError::InvalidBackendPolicy {
                id: self.id.clone(),
                field: "max_concurrent_requests",
            });
        }
        if let Some(cb) = &self.circuit_breaker {
            crate::policy::CircuitBreaker::default()
                .with(Some(cb))
                .check()
                .map_err(|field| ValidationError::InvalidBackendPolicy {
                    id: self.id.clone(),
                    field: match field {
                        "consecutive_5xx" => "circuit_breaker.consecutive_5xx",
                        "min_requests" => "circuit_breaker.min_requests",
                        "window_secs" => "circuit_breaker.window_secs",
                        _ => "circuit_breaker.open_secs",
                    },
                })?;
        }
        let ip_literal = matches!(self.address.host(), crate::names::Host::Ip(_));
        if self.protocol.tls() && self.tls_verify && self.tls_sni.is_none() && ip_literal {
            return Err(ValidationError::TlsSniRequired {
                id: self.id.clone(),
            });
        }
        if !self.protocol.tls() {
            let field = if self.tls_sni.is_some() {
                Some("tls_sni")
            } else if self.tls_ca_path.is_some() {
                Some("tls_ca_path")
            } else if !self.tls_verify {
                Some("tls_verify")
            } else {
                None
            };
            if let Some(field) = field {
                return Err(ValidationError::TlsSettingWithoutTls {
                    id: self.id.clone(),
                    field,
                    protocol: self.protocol.as_str(),
                });
            }
        }
        Ok(())
    }

    /// True if this backend carries `tag`.
    pub fn has_tag(&self, tag: &Tag) -> bool {
        self.tags.contains(tag)
    }
}

/// A partial change to a virtual host (`PUT /api/v1/domains/:domain`): absent fields keep their
/// value. `tls_cert_path`/`tls_key_path` set to `""` remove the domain's own certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VirtualHostUpdate {
    /// New active tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled_backends_tag: Option<Tag>,
    /// New redirect setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_to_https: Option<bool>,
    /// New certificate path (`""` clears it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_path: Option<String>,
    /// New key path (`""` clears it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_path: Option<String>,
    /// New automatic-certificate setting (see [`VirtualHost::acme`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<bool>,
    /// New rate limit; `null` removes it.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub rate_limit: Option<Option<RateLimit>>,
    /// New allow list (`[]` allows everyone).
    #[cfg_attr(feature = "openapi", schema(schema_with = optional_cidr_list_schema))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<Cidr>>,
    /// New deny list (`[]` denies no one).
    #[cfg_attr(feature = "openapi", schema(schema_with = optional_cidr_list_schema))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<Vec<Cidr>>,
    /// New request header rules (`{}` removes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderRules>,
    /// New response header rules (`{}` removes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderRules>,
}

/// A field that is present (`Some(None)` when it is `null`), for updates that can remove.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl VirtualHostUpdate {
    /// The virtual host after this update.
    pub fn applied_to(&self, current: &VirtualHost) -> VirtualHost {
        let mut next = current.clone();
        if let Some(tag) = &self.enabled_backends_tag {
            next.enabled_backends_tag = tag.clone();
            // The canary's tag becoming the primary ends the canary (as a promotion does).
            if next.canary.as_ref().is_some_and(|c| c.tag == *tag) {
                next.canary = None;
            }
        }
        if let Some(redirect) = self.http_to_https {
            next.http_to_https = redirect;
        }
        if let Some(cert) = &self.tls_cert_path {
            next.tls_cert_path = (!cert.is_empty()).then(|| cert.clone());
        }
        if let Some(key) = &self.tls_key_path {
            next.tls_key_path = (!key.is_empty()).then(|| key.clone());
        }
        if let Some(acme) = self.acme {
            next.acme = Some(acme);
        }
        if let Some(limit) = &self.rate_limit {
            next.rate_limit = limit.clone().map(Box::new);
        }
        if let Some(allow) = &self.allow {
            next.allow = allow.clone();
        }
        if let Some(deny) = &self.deny {
            next.deny = deny.clone();
        }
        if let Some(rules) = &self.request_headers {
            next.request_headers = (!rules.is_empty()).then(|| Box::new(rules.clone()));
        }
        if let Some(rules) = &self.response_headers {
            next.response_headers = (!rules.is_empty()).then(|| Box::new(rules.clone()));
        }
        next
    }
}

/// A partial change to a backend (`PUT /api/v1/backends/:id`): absent fields keep their value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BackendUpdate {
    /// New address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<BackendAddress>,
    /// New tag list (replaces the old one; at least one, no repeats).
    #[cfg_attr(feature = "openapi", schema(schema_with = optional_tags_schema))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<Tag>>,
    /// New weight, 1..=256.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 256))]
    #[serde(
        default,
        deserialize_with = "whole::option_u16",
        skip_serializing_if = "Option::is_none"
    )]
    pub weight: Option<u16>,
    /// New probe overrides (`{}` removes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<ProbeOverride>,
    /// New protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<BackendProtocol>,
    /// New certificate-verification setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_verify: Option<bool>,
    /// New server name (to go back to the default, set the address's host).
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::names::schema::optional_host_name))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_sni: Option<DomainName>,
    /// New CA file (`""` clears it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_path: Option<String>,
    /// New circuit-breaker changes (`{}` removes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerOverride>,
    /// New concurrency limit; `null` removes it.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u32>, minimum = 1, maximum = 1_000_000))]
    #[serde(
        default,
        deserialize_with = "present_u32",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_concurrent_requests: Option<Option<u32>>,
}

/// A present integer field (`Some(None)` for `null`), whole floats accepted.
fn present_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u32>>, D::Error> {
    whole::option_u32(d).map(Some)
}

impl BackendUpdate {
    /// The backend after this update.
    pub fn applied_to(&self, current: &Backend) -> Backend {
        let mut next = current.clone();
        if let Some(address) = &self.address {
            next.address = address.clone();
        }
        if let Some(tags) = &self.tags {
            next.tags = tags.clone();
        }
        if let Some(weight) = self.weight {
            next.weight = weight;
        }
        if let Some(probe) = &self.health_check {
            next.health_check = (*probe != ProbeOverride::default()).then(|| probe.clone());
        }
        if let Some(protocol) = self.protocol {
            next.protocol = protocol;
        }
        if let Some(verify) = self.tls_verify {
            next.tls_verify = verify;
        }
        if let Some(sni) = &self.tls_sni {
            next.tls_sni = Some(sni.clone());
        }
        if let Some(ca) = &self.tls_ca_path {
            next.tls_ca_path = (!ca.is_empty()).then(|| ca.clone());
        }
        if let Some(cb) = &self.circuit_breaker {
            next.circuit_breaker = (*cb != CircuitBreakerOverride::default()).then_some(*cb);
        }
        if let Some(max) = self.max_concurrent_requests {
            next.max_concurrent_requests = max;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_floats_count_as_integers() {
        let b: Backend = serde_json::from_str(
            r#"{"id":"x","address":"h:1","tags":["a"],"weight":2.0,"health_check":{"expected_status":[200.0,399]}}"#,
        )
        .unwrap();
        assert_eq!(b.weight, 2);
        assert_eq!(b.health_check.unwrap().expected_status, Some([200, 399]));
        let u: BackendUpdate = serde_json::from_str(r#"{"weight":3.0}"#).unwrap();
        assert_eq!(u.weight, Some(3));
        for bad in [
            r#"{"weight":2.5}"#,
            r#"{"weight":-1}"#,
            r#"{"weight":70000}"#,
            r#"{"weight":"2"}"#,
        ] {
            let e = serde_json::from_str::<BackendUpdate>(bad)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("expected an integer from 0 to 65535"),
                "{bad}: {e}"
            );
        }
    }

    fn backend(tags: &[&str], weight: u16) -> Backend {
        let mut b = Backend::new(
            BackendId::parse("b1").unwrap(),
            BackendAddress::parse("127.0.0.1:1").unwrap(),
            tags.iter().map(|t| Tag::parse(t).unwrap()).collect(),
        );
        b.weight = weight;
        b
    }

    #[test]
    fn tls_settings_need_a_tls_protocol() {
        let mut b = backend(&["a"], 1);
        b.tls_verify = false;
        let e = b.validate().unwrap_err();
        assert_eq!(e.field(), "tls_verify");
        b.protocol = BackendProtocol::H2;
        b.validate().unwrap();
        b.tls_sni = Some(DomainName::parse("*.example.com").unwrap());
        assert_eq!(b.validate().unwrap_err().field(), "tls_sni");
        b.tls_sni = Some(DomainName::parse("api.internal").unwrap());
        assert_eq!(b.sni(), "api.internal");
        b.tls_sni = None;
        b.tls_verify = true;
        // An IP address gives no SNI: verification needs the name the certificate carries.
        assert_eq!(b.validate().unwrap_err().field(), "tls_sni");
        assert_eq!(b.sni(), "");
        b.tls_verify = false;
        b.validate().unwrap();
        b.tls_verify = true;
        b.address = BackendAddress::parse("api.internal:443").unwrap();
        assert_eq!(b.sni(), "api.internal");
        b.protocol = BackendProtocol::H2c;
        b.tls_verify = true;
        b.tls_ca_path = Some("/ca.pem".into());
        assert_eq!(b.validate().unwrap_err().field(), "tls_ca_path");
        let parsed: Backend = serde_json::from_str(
            r#"{"id":"g","address":"127.0.0.1:50051","tags":["a"],"protocol":"h2c"}"#,
        )
        .unwrap();
        assert_eq!(parsed.protocol, BackendProtocol::H2c);
        assert!(parsed.tls_verify);
        assert_eq!(
            serde_json::to_string(&parsed).unwrap(),
            r#"{"id":"g","address":"127.0.0.1:50051","tags":["a"],"protocol":"h2c"}"#
        );
    }

    #[test]
    fn probe_overrides_are_checked() {
        let mut b = backend(&["a"], 1);
        b.health_check = Some(ProbeOverride {
            kind: Some(ProbeKind::Http),
            path: Some("/healthz".into()),
            expected_status: Some([200, 299]),
            ..Default::default()
        });
        assert!(b.validate().is_ok());
        for bad in [
            ProbeOverride {
                path: Some("healthz".into()),
                ..Default::default()
            },
            ProbeOverride {
                path: Some("/a b".into()),
                ..Default::default()
            },
            ProbeOverride {
                host: Some(String::new()),
                ..Default::default()
            },
            ProbeOverride {
                expected_status: Some([300, 200]),
                ..Default::default()
            },
            ProbeOverride {
                expected_status: Some([99, 200]),
                ..Default::default()
            },
        ] {
            b.health_check = Some(bad.clone());
            assert!(
                matches!(b.validate(), Err(ValidationError::InvalidProbe { .. })),
                "{bad:?}"
            );
        }
        let json: Backend = serde_json::from_str(
            r#"{"id":"x","address":"h:1","tags":["a"],"health_check":{"kind":"http","path":"/h"}}"#,
        )
        .unwrap();
        assert_eq!(json.health_check.unwrap().kind, Some(ProbeKind::Http));
        let clear = BackendUpdate {
            health_check: Some(ProbeOverride::default()),
            ..Default::default()
        };
        let mut with = backend(&["a"], 1);
        with.health_check = Some(ProbeOverride {
            path: Some("/h".into()),
            ..Default::default()
        });
        assert_eq!(clear.applied_to(&with).health_check, None);
    }

    #[test]
    fn backend_rules() {
        assert!(backend(&["a"], 1).validate().is_ok());
        assert!(matches!(
            backend(&[], 1).validate(),
            Err(ValidationError::EmptyTagList { .. })
        ));
        assert!(matches!(
            backend(&["a", "a"], 1).validate(),
            Err(ValidationError::DuplicateTag { .. })
        ));
        assert!(matches!(
            backend(&["a"], 0).validate(),
            Err(ValidationError::InvalidWeight { weight: 0, .. })
        ));
        assert!(matches!(
            backend(&["a"], 257).validate(),
            Err(ValidationError::InvalidWeight { weight: 257, .. })
        ));
        assert!(backend(&["a"], 256).validate().is_ok());
    }

    #[test]
    fn vhost_tls_pair_rules() {
        let mut v = VirtualHost::new(
            DomainName::parse("a.com").unwrap(),
            Tag::parse("a").unwrap(),
        );
        assert!(v.validate().is_ok());
        v.tls_cert_path = Some("c.pem".into());
        assert!(matches!(
            v.validate(),
            Err(ValidationError::IncompleteTlsPair { .. })
        ));
        v.tls_key_path = Some(String::new());
        assert!(matches!(
            v.validate(),
            Err(ValidationError::EmptyTlsPath { .. })
        ));
        v.tls_key_path = Some("k.pem".into());
        assert!(v.validate().is_ok());
    }

    #[test]
    fn json_shapes_match_the_seed() {
        let v: VirtualHost = serde_json::from_str(
            r#"{"domain":"example.com","enabled_backends_tag":"a","http_to_https":true}"#,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&v).unwrap(),
            serde_json::json!({"domain":"example.com","enabled_backends_tag":"a","http_to_https":true})
        );
        let b: Backend =
            serde_json::from_str(r#"{"id":"web-v1","address":"localhost:3001","tags":["a"]}"#)
                .unwrap();
        assert_eq!(b.weight, 1);
        assert_eq!(
            serde_json::to_value(&b).unwrap(),
            serde_json::json!({"id":"web-v1","address":"localhost:3001","tags":["a"]})
        );
        let unknown: Result<Backend, _> =
            serde_json::from_str(r#"{"id":"x","address":"h:1","tags":["a"],"colour":1}"#);
        assert!(unknown.unwrap_err().to_string().contains("unknown field"));
    }

    #[test]
    fn updates_are_partial() {
        let v = VirtualHost {
            tls_cert_path: Some("c".into()),
            tls_key_path: Some("k".into()),
            ..VirtualHost::new(
                DomainName::parse("a.com").unwrap(),
                Tag::parse("a").unwrap(),
            )
        };
        let u: VirtualHostUpdate =
            serde_json::from_str(r#"{"enabled_backends_tag":"b","http_to_https":false}"#).unwrap();
        let next = u.applied_to(&v);
        assert_eq!(next.enabled_backends_tag.as_str(), "b");
        assert_eq!(next.tls_cert_path.as_deref(), Some("c"));
        let clear = VirtualHostUpdate {
            tls_cert_path: Some(String::new()),
            tls_key_path: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(clear.applied_to(&v).tls_cert_path, None);

        let b = backend(&["a"], 3);
        let u: BackendUpdate =
            serde_json::from_str(r#"{"address":"localhost:3003","tags":["a","b"]}"#).unwrap();
        let next = u.applied_to(&b);
        assert_eq!(next.address.as_str(), "localhost:3003");
        assert_eq!(next.tags.len(), 2);
        assert_eq!(next.weight, 3);
    }
}
