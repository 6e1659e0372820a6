//! Traffic policy records of a virtual host: access lists ([`Cidr`]), rate limits
//! ([`RateLimit`]) and header rules ([`HeaderRules`]). Pure data with their parsers and rules;
//! the Pingora adapter enforces them on the request path.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest header name accepted in policies.
pub const MAX_POLICY_HEADER_NAME_LEN: usize = 64;
/// Longest header value (template) accepted in header rules.
pub const MAX_HEADER_VALUE_LEN: usize = 1024;
/// Most rules per header map.
pub const MAX_HEADER_RULES: usize = 32;
/// Most networks per access list.
pub const MAX_CIDRS: usize = 256;

/// A policy value is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    /// Not an IP address or network.
    #[error("{0:?} is not an IP address or network (e.g. 10.0.0.0/8, 2001:db8::/32, 192.0.2.7)")]
    Cidr(String),
    /// Not a rate-limit key.
    #[error("rate limit key {0:?} must be client_ip, domain or header:<Name>")]
    Key(String),
    /// A header name that is not an HTTP token.
    #[error("{0:?} is not a header name (1-64 letters, digits or !#$%&'*+-.^_`|~)")]
    HeaderName(String),
    /// A header the proxy manages itself.
    #[error("header {0:?} cannot be changed by rules: Host, hop-by-hop and framing headers are the proxy's")]
    ProtectedHeader(String),
    /// A header value with forbidden characters or an unknown placeholder.
    #[error("header value {0:?} must be visible ASCII (no CR/LF), at most 1024 bytes, with braces only in {{client_ip}}, {{request_id}}, {{domain}}, {{tag}} or {{backend}}")]
    HeaderValue(String),
    /// Too many entries.
    #[error("at most {max} {what}")]
    TooMany {
        /// What.
        what: &'static str,
        /// The limit.
        max: usize,
    },
}

/// An IP network (address and prefix length); a bare address is a single-host network. Host
/// bits are cleared (`10.1.2.3/8` is `10.0.0.0/8`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `2001:db8::/32`, `192.0.2.7` (prefix without leading zeros).
    pub fn parse(input: &str) -> Result<Self, PolicyError> {
        let err = || PolicyError::Cidr(input.to_owned());
        let (addr, prefix) = match input.split_once('/') {
            Some((addr, prefix)) => {
                let valid_digits = !prefix.is_empty()
                    && prefix.len() <= 3
                    && prefix.bytes().all(|b| b.is_ascii_digit())
                    && (prefix == "0" || !prefix.starts_with('0'));
                if !valid_digits {
                    return Err(err());
                }
                (addr, Some(prefix.parse::<u8>().map_err(|_| err())?))
            }
            None => (input, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(err());
        }
        Ok(Self {
            network: mask(addr, prefix),
            prefix,
        })
    }

    /// Whether `ip` is in this network (IPv4-mapped IPv6 addresses count as IPv4).
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let m = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(ip) & m == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => match ip.to_ipv4_mapped() {
                Some(_) => false,
                None => {
                    let m = u128::MAX
                        .checked_shl(128 - u32::from(self.prefix))
                        .unwrap_or(0);
                    u128::from(ip) & m == u128::from(net)
                }
            },
            (IpAddr::V4(_), IpAddr::V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(IpAddr::V4(v4))),
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((bits & m).into())
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Whether `ip` is in any of `nets`.
pub fn any_contains(nets: &[Cidr], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

/// What a rate limit counts by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum RateLimitKey {
    /// The client's address (after `trusted_proxies`).
    #[default]
    ClientIp,
    /// The whole domain: one budget for everyone.
    Domain,
    /// The value of a request header (lowercase name); requests without it share one budget.
    Header(Box<str>),
}

impl RateLimitKey {
    /// Parses `client_ip`, `domain` or `header:<Name>`.
    pub fn parse(input: &str) -> Result<Self, PolicyError> {
        match input {
            "client_ip" => Ok(Self::ClientIp),
            "domain" => Ok(Self::Domain),
            _ => {
                let name = input
                    .strip_prefix("header:")
                    .filter(|n| is_token(n))
                    .ok_or_else(|| PolicyError::Key(input.to_owned()))?;
                Ok(Self::Header(name.to_ascii_lowercase().into()))
            }
        }
    }

    /// The text form.
    pub fn as_text(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Self::ClientIp => "client_ip".into(),
            Self::Domain => "domain".into(),
            Self::Header(name) => format!("header:{name}").into(),
        }
    }
}

impl Serialize for RateLimitKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_text())
    }
}

impl<'de> Deserialize<'de> for RateLimitKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// RFC 9110 token of at most [`MAX_POLICY_HEADER_NAME_LEN`] bytes.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_POLICY_HEADER_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The pattern of a rate-limit key (agrees with [`RateLimitKey::parse`]).
pub fn rate_limit_key_pattern() -> String {
    format!(
        "^(client_ip|domain|header:[A-Za-z0-9!#$%&'*+.^_`|~-]{{1,{MAX_POLICY_HEADER_NAME_LEN}}})$"
    )
}

/// A token bucket per key: `burst` requests pass at once, then `requests_per_second`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate, 1–1,000,000 requests per second.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1_000_000))]
    #[serde(deserialize_with = "crate::model::whole::u32")]
    pub requests_per_second: u32,
    /// Bucket size, 1–10,000,000 (default: `requests_per_second`).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 10_000_000))]
    #[serde(
        default,
        deserialize_with = "crate::model::whole::option_u32",
        skip_serializing_if = "Option::is_none"
    )]
    pub burst: Option<u32>,
    /// `client_ip` (default), `domain` or `header:<Name>`.
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^(client_ip|domain|header:[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64})$"))]
    #[serde(default)]
    pub key: RateLimitKey,
}

impl RateLimit {
    /// The bucket size in force.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.requests_per_second)
    }

    /// Checks the ranges.
    pub fn check(&self) -> Result<(), &'static str> {
        if !(1..=1_000_000).contains(&self.requests_per_second) {
            return Err("requests_per_second");
        }
        if self.burst.is_some_and(|b| !(1..=10_000_000).contains(&b)) {
            return Err("burst");
        }
        Ok(())
    }
}

/// Placeholders a header rule value may use.
pub const PLACEHOLDERS: [&str; 5] = ["client_ip", "request_id", "domain", "tag", "backend"];

/// Request headers rules may not touch: routing (`Host`), hop-by-hop and framing.
const PROTECTED_REQUEST: [&str; 10] = [
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "expect",
];

/// Changes to headers: `set` replaces (or adds), `add` appends, `remove` deletes; applied in
/// that order: remove, set, add.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HeaderRules {
    /// Headers set to a value (replacing any).
    #[cfg_attr(feature = "openapi", schema(schema_with = header_map_schema))]
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Headers added (kept beside existing ones).
    #[cfg_attr(feature = "openapi", schema(schema_with = header_map_schema))]
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    /// Headers removed.
    #[cfg_attr(feature = "openapi", schema(schema_with = header_list_schema))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderRules {
    /// Checks names (tokens, not protected) and values (visible ASCII, known placeholders).
    pub fn check(&self) -> Result<(), PolicyError> {
        if self.set.len() > MAX_HEADER_RULES
            || self.add.len() > MAX_HEADER_RULES
            || self.remove.len() > MAX_HEADER_RULES
        {
            return Err(PolicyError::TooMany {
                what: "header rules of each kind",
                max: MAX_HEADER_RULES,
            });
        }
        let names = self
            .set
            .keys()
            .chain(self.add.keys())
            .chain(self.remove.iter());
        for name in names {
            if !is_token(name) {
                return Err(PolicyError::HeaderName(name.clone()));
            }
            if is_protected(name) {
                return Err(PolicyError::ProtectedHeader(name.clone()));
            }
        }
        for value in self.set.values().chain(self.add.values()) {
            if !valid_template(value) {
                return Err(PolicyError::HeaderValue(value.clone()));
            }
        }
        Ok(())
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// Whether rules may not touch `name` (case-insensitive).
pub fn is_protected(name: &str) -> bool {
    PROTECTED_REQUEST
        .iter()
        .any(|p| p.eq_ignore_ascii_case(name))
}

/// Visible ASCII, space and tab, at most [`MAX_HEADER_VALUE_LEN`] bytes, braces only around a
/// known placeholder.
fn valid_template(value: &str) -> bool {
    if value.len() > MAX_HEADER_VALUE_LEN {
        return false;
    }
    let mut rest = value;
    while let Some(i) = rest.find(['{', '}']) {
        if !plain(&rest[..i]) {
            return false;
        }
        let after = &rest[i..];
        let Some(close) = after.find('}').filter(|_| after.starts_with('{')) else {
            return false;
        };
        if !PLACEHOLDERS.contains(&&after[1..close]) {
            return false;
        }
        rest = &after[close + 1..];
    }
    plain(rest)
}

fn plain(text: &str) -> bool {
    text.bytes()
        .all(|b| b == b'\t' || (0x20..=0x7e).contains(&b) && b != b'{' && b != b'}')
}

/// The pattern of a header-rule value (agrees with [`HeaderRules::check`]).
pub fn header_value_pattern() -> String {
    format!(
        r"^(?:[\t\x20-\x7a\x7c\x7e]|\{{(?:{})\}})*$",
        PLACEHOLDERS.join("|")
    )
}

/// The pattern of a header name rules may change (a token that is not protected).
pub fn header_name_pattern() -> String {
    let protected: Vec<String> = PROTECTED_REQUEST
        .iter()
        .map(|name| {
            name.chars()
                .map(|c| {
                    if c.is_ascii_alphabetic() {
                        format!("[{}{}]", c.to_ascii_uppercase(), c)
                    } else {
                        format!("\\{c}")
                    }
                })
                .collect()
        })
        .collect();
    format!(
        "^(?!(?:{})$)[A-Za-z0-9!#$%&'*+.^_`|~-]{{1,{MAX_POLICY_HEADER_NAME_LEN}}}$",
        protected.join("|")
    )
}

#[cfg(feature = "openapi")]
fn header_map_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};
    let value = ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(MAX_HEADER_VALUE_LEN))
        .pattern(Some(header_value_pattern()));
    let name = ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(header_name_pattern()));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(name))
        .additional_properties(Some(AdditionalProperties::RefOr(value.into())))
        .max_properties(Some(MAX_HEADER_RULES))
        .build()
}

#[cfg(feature = "openapi")]
fn header_list_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(header_name_pattern())),
        )
        .max_items(Some(MAX_HEADER_RULES))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_and_contain() {
        let n = Cidr::parse("10.1.2.3/8").unwrap();
        assert_eq!(n.to_string(), "10.0.0.0/8");
        assert!(n.contains("10.200.0.1".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        // IPv4-mapped IPv6 counts as IPv4.
        assert!(n.contains("::ffff:10.0.0.9".parse().unwrap()));
        let host = Cidr::parse("192.0.2.7").unwrap();
        assert_eq!(host.to_string(), "192.0.2.7/32");
        assert!(host.contains("192.0.2.7".parse().unwrap()));
        assert!(!host.contains("192.0.2.8".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/08",
            "10.0.0.0/",
            "10.0.0/8",
            "::/129",
            "x",
            "",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn header_rules_refuse_protected_names_and_unknown_placeholders() {
        let mut rules = HeaderRules::default();
        rules
            .set
            .insert("X-Env".into(), "prod {domain}/{tag}".into());
        rules.remove.push("X-Debug".into());
        rules.check().unwrap();
        for name in ["Host", "connection", "Transfer-Encoding", "content-length"] {
            let mut r = HeaderRules::default();
            r.add.insert(name.into(), "x".into());
            assert!(
                matches!(r.check(), Err(PolicyError::ProtectedHeader(_))),
                "{name}"
            );
        }
        for value in ["{nope}", "a{", "}", "line\r\nbreak", "{client_ip"] {
            let mut r = HeaderRules::default();
            r.set.insert("X-A".into(), value.into());
            assert!(
                matches!(r.check(), Err(PolicyError::HeaderValue(_))),
                "{value:?}"
            );
        }
        let mut r = HeaderRules::default();
        r.set.insert("bad name".into(), "x".into());
        assert!(matches!(r.check(), Err(PolicyError::HeaderName(_))));
    }

    #[test]
    fn rate_limit_keys_round_trip() {
        for text in ["client_ip", "domain", "header:x-api-key"] {
            assert_eq!(RateLimitKey::parse(text).unwrap().as_text(), text);
        }
        assert_eq!(
            RateLimitKey::parse("header:X-Api-Key").unwrap(),
            RateLimitKey::Header("x-api-key".into())
        );
        assert!(RateLimitKey::parse("cookie").is_err());
    }

    #[cfg(feature = "openapi")]
    mod patterns {
        use super::super::*;
        use proptest::prelude::*;

        fn agree(pattern: &str, text: &str, accepted: bool) -> Result<(), TestCaseError> {
            let re = fancy_regex::Regex::new(pattern).unwrap();
            prop_assert_eq!(re.is_match(text).unwrap(), accepted, "{:?}", text);
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(500))]
            #[test]
            fn cidr(text in prop_oneof![
                "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(/[0-9]{1,3})?",
                "[0-9a-f:]{2,12}(/[0-9]{1,3})?",
                "[0-9./:]{0,10}",
            ]) {
                agree(&crate::names::cidr_pattern(), &text, Cidr::parse(&text).is_ok())?;
            }

            #[test]
            fn header_value(text in prop_oneof![
                "[ -~\t]{0,12}",
                "(\\{(client_ip|domain|tag|nope)\\}|[a-z{}]){0,4}",
            ]) {
                let mut r = HeaderRules::default();
                r.set.insert("X-A".into(), text.clone());
                agree(&header_value_pattern(), &text, r.check().is_ok())?;
            }

            #[test]
            fn header_name(text in prop_oneof![
                "[A-Za-z-]{1,8}",
                "(Host|HOST|te|Te|Upgrade|Content-Length|x y)",
            ]) {
                let mut r = HeaderRules::default();
                r.remove.push(text.clone());
                agree(&header_name_pattern(), &text, r.check().is_ok())?;
            }
        }
    }
}

/// Milliseconds on the process's monotonic clock (the circuit breakers' time base, shared by the
/// data plane that records outcomes and the admin API that shows states).
pub fn monotonic_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A share from 0 (exclusive) to 1, e.g. a failure ratio.
#[derive(Debug, Clone, Copy, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Ratio(f64);

impl Ratio {
    /// `value` if it is in (0, 1].
    pub fn new(value: f64) -> Option<Self> {
        (value > 0.0 && value <= 1.0).then_some(Self(value))
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl PartialEq for Ratio {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Ratio {}

impl std::hash::Hash for Ratio {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

impl TryFrom<f64> for Ratio {
    type Error = String;
    fn try_from(value: f64) -> Result<Self, String> {
        Self::new(value).ok_or_else(|| format!("{value} is not a ratio above 0 and at most 1"))
    }
}

impl From<Ratio> for f64 {
    fn from(r: Ratio) -> f64 {
        r.0
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Ratio {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::Number)
            .exclusive_minimum(Some(0))
            .maximum(Some(1))
            .examples([0.5])
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Ratio {}

/// Outlier detection (Envoy-style): a backend answering 5xx or refusing connections is ejected
/// for `open_secs`, then one trial request decides whether it comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreaker {
    /// Ejected after this many 5xx answers or connection failures in a row (0: never for that).
    pub consecutive_5xx: u32,
    /// Ejected when its failure share over the window exceeds this...
    pub failure_ratio: Ratio,
    /// ...with at least this many requests in the window.
    pub min_requests: u32,
    /// The window of the failure ratio, in seconds.
    pub window_secs: u32,
    /// How long an ejection lasts before a trial request, in seconds.
    pub open_secs: u32,
    /// Never more than this percentage of a tag's backends ejected at once.
    pub max_ejection_percent: u8,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            failure_ratio: Ratio(0.5),
            min_requests: 20,
            window_secs: 10,
            open_secs: 30,
            max_ejection_percent: 50,
        }
    }
}

/// A backend's changes to the global `[proxy] circuit_breaker` (absent fields keep it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerOverride {
    /// See [`CircuitBreaker::consecutive_5xx`] (0–1000).
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1000))]
    #[serde(
        default,
        deserialize_with = "crate::model::whole::option_u32",
        skip_serializing_if = "Option::is_none"
    )]
    pub consecutive_5xx: Option<u32>,
    /// See [`CircuitBreaker::failure_ratio`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_ratio: Option<Ratio>,
    /// See [`CircuitBreaker::min_requests`] (1–1000000).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1_000_000))]
    #[serde(
        default,
        deserialize_with = "crate::model::whole::option_u32",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_requests: Option<u32>,
    /// See [`CircuitBreaker::window_secs`] (1–3600).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 3600))]
    #[serde(
        default,
        deserialize_with = "crate::model::whole::option_u32",
        skip_serializing_if = "Option::is_none"
    )]
    pub window_secs: Option<u32>,
    /// See [`CircuitBreaker::open_secs`] (1–86400).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86_400))]
    #[serde(
        default,
        deserialize_with = "crate::model::whole::option_u32",
        skip_serializing_if = "Option::is_none"
    )]
    pub open_secs: Option<u32>,
}

impl CircuitBreaker {
    /// The settings of a backend with `o` over these.
    pub fn with(mut self, o: Option<&CircuitBreakerOverride>) -> Self {
        if let Some(o) = o {
            self.consecutive_5xx = o.consecutive_5xx.unwrap_or(self.consecutive_5xx);
            self.failure_ratio = o.failure_ratio.unwrap_or(self.failure_ratio);
            self.min_requests = o.min_requests.unwrap_or(self.min_requests);
            self.window_secs = o.window_secs.unwrap_or(self.window_secs);
            self.open_secs = o.open_secs.unwrap_or(self.open_secs);
        }
        self
    }

    /// The first setting out of range, if any.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.consecutive_5xx > 1000 {
            return Err("consecutive_5xx");
        }
        if !(1..=1_000_000).contains(&self.min_requests) {
            return Err("min_requests");
        }
        if !(1..=3600).contains(&self.window_secs) {
            return Err("window_secs");
        }
        if !(1..=86_400).contains(&self.open_secs) {
            return Err("open_secs");
        }
        if self.max_ejection_percent > 100 {
            return Err("max_ejection_percent");
        }
        Ok(())
    }
}
