//! Validated names: the vocabulary every other layer speaks.
//!
//! Sits at the very bottom of the data flow: the config loader and the admin API parse user text
//! into these newtypes (serde calls the same constructors), so a value of one of these types is
//! always valid and every later layer can rely on it without re-checking.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest domain name accepted, in bytes (RFC 1035 §2.3.4, without the trailing dot).
pub const MAX_DOMAIN_LEN: usize = 253;
/// Longest label of a domain name, in bytes (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest tag accepted, in bytes.
pub const MAX_TAG_LEN: usize = 64;
/// Longest backend id accepted, in bytes.
pub const MAX_BACKEND_ID_LEN: usize = 128;

/// Why a domain name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DomainNameError {
    /// The name is empty.
    #[error("domain name is empty")]
    Empty,
    /// The name is longer than [`MAX_DOMAIN_LEN`].
    #[error("domain name is {len} bytes long, the limit is {MAX_DOMAIN_LEN}")]
    TooLong {
        /// Length of the rejected name.
        len: usize,
    },
    /// Two dots in a row, or a leading dot.
    #[error("domain name {name:?} has an empty label")]
    EmptyLabel {
        /// The rejected name.
        name: String,
    },
    /// A label longer than [`MAX_LABEL_LEN`].
    #[error("label {label:?} is {len} bytes long, the limit is {MAX_LABEL_LEN}")]
    LabelTooLong {
        /// The offending label.
        label: String,
        /// Its length.
        len: usize,
    },
    /// A character outside `a-z`, `0-9` and `-`.
    #[error("label {label:?} contains {ch:?}; only letters, digits and '-' are allowed")]
    InvalidChar {
        /// The offending label.
        label: String,
        /// The first invalid character.
        ch: char,
    },
    /// A label that starts or ends with `-`.
    #[error("label {label:?} starts or ends with '-'")]
    HyphenAtEdge {
        /// The offending label.
        label: String,
    },
    /// `*` anywhere but as the whole leftmost label of a name with at least two more labels.
    #[error("wildcard '*' is only allowed as the whole leftmost label, as in \"*.example.com\"")]
    MisplacedWildcard,
    /// A name whose last label is all digits (it would look like an IP address).
    #[error("domain name {name:?} ends in an all-numeric label")]
    NumericTld {
        /// The rejected name.
        name: String,
    },
}

/// A fully-qualified domain name, lowercase, without a trailing dot; possibly a wildcard
/// (`*.example.com`, matching exactly one extra label).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DomainName(Box<str>);

impl DomainName {
    /// Parses and normalises (lowercase, trailing dot removed) a domain name.
    /// The limit of [`MAX_DOMAIN_LEN`] bytes applies to the text as given, a trailing dot
    /// included (so that the API's `maxLength` says exactly the same).
    pub fn parse(input: &str) -> Result<Self, DomainNameError> {
        if input.len() > MAX_DOMAIN_LEN {
            return Err(DomainNameError::TooLong { len: input.len() });
        }
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if trimmed.is_empty() {
            return Err(DomainNameError::Empty);
        }
        let lower = trimmed.to_ascii_lowercase();
        let (is_wildcard, rest) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let mut labels = 0usize;
        let mut last = "";
        for label in rest.split('.') {
            validate_label(label, &lower)?;
            labels += 1;
            last = label;
        }
        if is_wildcard && labels < 2 {
            return Err(DomainNameError::MisplacedWildcard);
        }
        if last.bytes().all(|b| b.is_ascii_digit()) {
            return Err(DomainNameError::NumericTld { name: lower });
        }
        Ok(Self(lower.into_boxed_str()))
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for `*.example.com`.
    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }

    /// For a wildcard, the part after `*.`; `None` for an exact name.
    pub fn wildcard_suffix(&self) -> Option<&str> {
        self.0.strip_prefix("*.")
    }

    /// True if this name (exact or wildcard) covers `host`, a normalised host name.
    pub fn matches(&self, host: &str) -> bool {
        match self.wildcard_suffix() {
            None => *self.0 == *host,
            Some(suffix) => host
                .split_once('.')
                .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
        }
    }
}

fn validate_label(label: &str, name: &str) -> Result<(), DomainNameError> {
    if label.is_empty() {
        return Err(DomainNameError::EmptyLabel {
            name: name.to_owned(),
        });
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(DomainNameError::LabelTooLong {
            label: label.to_owned(),
            len: label.len(),
        });
    }
    if label.contains('*') {
        return Err(DomainNameError::MisplacedWildcard);
    }
    if let Some(ch) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(DomainNameError::InvalidChar {
            label: label.to_owned(),
            ch,
        });
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(DomainNameError::HyphenAtEdge {
            label: label.to_owned(),
        });
    }
    Ok(())
}

/// Why a tag was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TagError {
    /// The tag is empty.
    #[error("tag is empty")]
    Empty,
    /// The tag is longer than [`MAX_TAG_LEN`].
    #[error("tag is {len} bytes long, the limit is {MAX_TAG_LEN}")]
    TooLong {
        /// Length of the rejected tag.
        len: usize,
    },
    /// A character outside `A-Z a-z 0-9 . _ -`.
    #[error("tag {tag:?} contains {ch:?}; only letters, digits, '.', '_' and '-' are allowed")]
    InvalidChar {
        /// The rejected tag.
        tag: String,
        /// The first invalid character.
        ch: char,
    },
}

/// A backend tag such as `a`, `b`, `stable` or `canary` (case-sensitive).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tag(Box<str>);

impl Tag {
    /// Validates a tag.
    pub fn parse(input: &str) -> Result<Self, TagError> {
        if input.is_empty() {
            return Err(TagError::Empty);
        }
        if input.len() > MAX_TAG_LEN {
            return Err(TagError::TooLong { len: input.len() });
        }
        if let Some(ch) = input.chars().find(|c| !is_token_char(*c)) {
            return Err(TagError::InvalidChar {
                tag: input.to_owned(),
                ch,
            });
        }
        Ok(Self(input.into()))
    }

    /// The tag text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a backend id was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BackendIdError {
    /// The id is empty.
    #[error("backend id is empty")]
    Empty,
    /// The id is longer than [`MAX_BACKEND_ID_LEN`].
    #[error("backend id is {len} bytes long, the limit is {MAX_BACKEND_ID_LEN}")]
    TooLong {
        /// Length of the rejected id.
        len: usize,
    },
    /// A character outside `A-Z a-z 0-9 . _ -` (ids appear in URL paths).
    #[error(
        "backend id {id:?} contains {ch:?}; only letters, digits, '.', '_' and '-' are allowed"
    )]
    InvalidChar {
        /// The rejected id.
        id: String,
        /// The first invalid character.
        ch: char,
    },
    /// `.` or `..`: URL clients rewrite these path segments, so `/api/v1/backends/..` could
    /// never address the backend.
    #[error("backend id {id:?} is a URL dot-segment; use another name")]
    DotSegment {
        /// The rejected id.
        id: String,
    },
}

/// A backend's unique identifier (case-sensitive; used in `/api/v1/backends/:id`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackendId(Box<str>);

impl BackendId {
    /// Validates a backend id.
    pub fn parse(input: &str) -> Result<Self, BackendIdError> {
        if input.is_empty() {
            return Err(BackendIdError::Empty);
        }
        if input.len() > MAX_BACKEND_ID_LEN {
            return Err(BackendIdError::TooLong { len: input.len() });
        }
        if let Some(ch) = input.chars().find(|c| !is_token_char(*c)) {
            return Err(BackendIdError::InvalidChar {
                id: input.to_owned(),
                ch,
            });
        }
        if matches!(input, "." | "..") {
            return Err(BackendIdError::DotSegment {
                id: input.to_owned(),
            });
        }
        Ok(Self(input.into()))
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Why a backend address was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddressError {
    /// No `:port` part.
    #[error("address {addr:?} has no port; expected host:port")]
    MissingPort {
        /// The rejected address.
        addr: String,
    },
    /// The port is not a number in 1..=65535 (written without leading zeros).
    #[error(
        "address {addr:?} has port {port:?}; expected a number from 1 to 65535 without leading zeros"
    )]
    InvalidPort {
        /// The rejected address.
        addr: String,
        /// The port text.
        port: String,
    },
    /// The host is neither an IP address nor a valid host name.
    #[error("address {addr:?} has an invalid host: {reason}")]
    InvalidHost {
        /// The rejected address.
        addr: String,
        /// Why the host is invalid.
        reason: String,
    },
}

/// The host part of a backend address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IPv4 or IPv6 literal.
    Ip(IpAddr),
    /// A DNS name, resolved by the embedding application (see [`crate::Resolve`]).
    Name(Box<str>),
}

/// A backend address `host:port`: IPv4 (`10.0.0.1:80`), bracketed IPv6 (`[::1]:80`) or a host name
/// (`localhost:3001`). Keeps the text as the user wrote it for round-tripping.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackendAddress {
    text: Box<str>,
    host: Host,
    port: u16,
}

impl BackendAddress {
    /// Parses `host:port`.
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        let (host_text, port_text) = if let Some(rest) = input.strip_prefix('[') {
            let (inside, after) =
                rest.split_once(']')
                    .ok_or_else(|| AddressError::InvalidHost {
                        addr: input.to_owned(),
                        reason: "missing ']' after an IPv6 address".to_owned(),
                    })?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| AddressError::MissingPort {
                    addr: input.to_owned(),
                })?;
            (inside, port)
        } else {
            input
                .rsplit_once(':')
                .ok_or_else(|| AddressError::MissingPort {
                    addr: input.to_owned(),
                })?
        };
        let port = match port_text.parse::<u16>() {
            Ok(p)
                if p != 0
                    && !port_text.starts_with('0')
                    && port_text.bytes().all(|b| b.is_ascii_digit()) =>
            {
                p
            }
            _ => {
                return Err(AddressError::InvalidPort {
                    addr: input.to_owned(),
                    port: port_text.to_owned(),
                })
            }
        };
        let host = if input.starts_with('[') {
            let ip = Ipv6Addr::from_str(host_text).map_err(|e| AddressError::InvalidHost {
                addr: input.to_owned(),
                reason: format!("{host_text:?} is not an IPv6 address ({e})"),
            })?;
            Host::Ip(IpAddr::V6(ip))
        } else if let Ok(ip) = host_text.parse::<std::net::Ipv4Addr>() {
            Host::Ip(IpAddr::V4(ip))
        } else if host_text.contains(':') {
            return Err(AddressError::InvalidHost {
                addr: input.to_owned(),
                reason: "IPv6 addresses must be written in brackets, as in [::1]:8080".to_owned(),
            });
        } else {
            match DomainName::parse(host_text) {
                Ok(n) if !n.is_wildcard() => Host::Name(n.0),
                Ok(_) => {
                    return Err(AddressError::InvalidHost {
                        addr: input.to_owned(),
                        reason: "a backend host cannot be a wildcard".to_owned(),
                    })
                }
                Err(DomainNameError::NumericTld { .. }) => {
                    return Err(AddressError::InvalidHost {
                        addr: input.to_owned(),
                        reason: format!("{host_text:?} is neither an IPv4 address nor a host name"),
                    })
                }
                Err(e) => {
                    return Err(AddressError::InvalidHost {
                        addr: input.to_owned(),
                        reason: e.to_string(),
                    })
                }
            }
        };
        Ok(Self {
            text: input.into(),
            host,
            port,
        })
    }

    /// The address as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The host part.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket address when the host is an IP literal (no resolution needed).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self.host {
            Host::Ip(ip) => Some(SocketAddr::new(ip, self.port)),
            Host::Name(_) => None,
        }
    }
}

macro_rules! string_newtype_impls {
    ($ty:ident, $err:ty) => {
        impl TryFrom<String> for $ty {
            type Error = $err;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(&value)
            }
        }
        impl From<$ty> for String {
            fn from(value: $ty) -> String {
                value.as_str().to_owned()
            }
        }
        impl FromStr for $ty {
            type Err = $err;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self.as_str(), f)
            }
        }
        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
    };
}

string_newtype_impls!(DomainName, DomainNameError);
string_newtype_impls!(Tag, TagError);
string_newtype_impls!(BackendId, BackendIdError);
string_newtype_impls!(BackendAddress, AddressError);

/// One DNS label: 1–63 letters, digits and inner hyphens.
const LABEL: &str = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?";

/// The exact set of texts [`DomainName::parse`] accepts, as an ECMA-262 / Python regular
/// expression (with [`MAX_DOMAIN_LEN`] as the length limit): the API document states it, and a
/// test checks that parser and pattern agree.
pub fn domain_pattern() -> String {
    format!(r"^(?:\*\.(?:{LABEL}\.)+|(?:{LABEL}\.)*)(?![0-9]+\.?$){LABEL}\.?$")
}

/// The exact set of texts [`DomainName::parse`] accepts that are not wildcards: host names
/// (e.g. a TLS server name).
pub fn host_name_pattern() -> String {
    format!(r"^(?:{LABEL}\.)*(?![0-9]+\.?$){LABEL}\.?$")
}

/// The exact set of texts [`Tag::parse`] accepts (see [`domain_pattern`]).
pub fn tag_pattern() -> String {
    format!("^[A-Za-z0-9._-]{{1,{MAX_TAG_LEN}}}$")
}

/// The exact set of texts [`BackendId::parse`] accepts (see [`domain_pattern`]).
pub fn backend_id_pattern() -> String {
    format!(r"^(?!\.\.?$)[A-Za-z0-9._-]{{1,{MAX_BACKEND_ID_LEN}}}$")
}

/// The exact set of texts [`BackendAddress::parse`] accepts (see [`domain_pattern`]): a
/// bracketed IPv6 address, an IPv4 address or a host name, then `:` and a port 1–65535.
pub fn address_pattern() -> String {
    let (v4, v6) = ip_patterns();
    let port =
        "(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])";
    let name = format!(r"(?=[^:]{{1,{MAX_DOMAIN_LEN}}}:)(?:{LABEL}\.)*(?![0-9]+\.?:){LABEL}\.?");
    format!(r"^(?:\[(?:{v6})\]|{v4}|{name}):{port}$")
}

/// The exact set of texts [`crate::Cidr::parse`] accepts: an IPv4 address with an optional
/// `/0`–`/32`, or an IPv6 address with an optional `/0`–`/128` (no leading zeros).
pub fn cidr_pattern() -> String {
    let (v4, v6) = ip_patterns();
    let p4 = "(?:3[0-2]|[12]?[0-9])";
    let p6 = "(?:12[0-8]|1[01][0-9]|[1-9]?[0-9])";
    format!(r"^(?:{v4}(?:/{p4})?|(?:{v6})(?:/{p6})?)$")
}

/// What std's IPv4 and IPv6 parsers accept (the IPv6 one as an alternation).
fn ip_patterns() -> (String, String) {
    const H: &str = "[0-9A-Fa-f]{1,4}";
    let octet = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
    let v4 = format!(r"{octet}(?:\.{octet}){{3}}");
    // What std's IPv6 parser accepts: 8 groups, or 6 groups and an IPv4 address, or `h` groups,
    // `::`, and up to `7 - h` more groups of which the last two may be an IPv4 address.
    let mut v6 = vec![format!("(?:{H}:){{7}}{H}"), format!("(?:{H}:){{6}}{v4}")];
    for head in 0..=7usize {
        let left = match head {
            0 => String::new(),
            n => format!("(?:{H}:){{{}}}{H}", n - 1),
        };
        let room = 7 - head;
        let mut tails = Vec::new();
        if room >= 2 {
            tails.push(format!("(?:{H}:){{0,{}}}{v4}", room - 2));
        }
        tails.push(match room {
            0 => String::new(),
            1 => format!("(?:{H})?"),
            n => format!("(?:{H}(?::{H}){{0,{}}})?", n - 1),
        });
        v6.push(format!("{left}::(?:{})", tails.join("|")));
    }
    (v4, v6.join("|"))
}

#[cfg(feature = "openapi")]
pub(crate) mod schema {
    //! OpenAPI schemas of the names: strings with the exact pattern and length limits of their
    //! parsers, so that the admin API's document tells clients what is accepted.
    use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
    use utoipa::openapi::RefOr;

    use super::*;

    fn string(pattern: String, max: usize, description: &str, example: &str) -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(max))
            .pattern(Some(pattern))
            .description(Some(description))
            .examples([example])
            .into()
    }

    impl utoipa::PartialSchema for DomainName {
        fn schema() -> RefOr<Schema> {
            string(
                domain_pattern(),
                MAX_DOMAIN_LEN,
                "A domain name (case-insensitive, stored lowercase), or a `*.example.com` wildcard matching one more label",
                "example.com",
            )
        }
    }
    impl utoipa::ToSchema for DomainName {}

    /// An optional host name (a [`DomainName`] that is not a wildcard), or null.
    pub(crate) fn optional_host_name() -> RefOr<Schema> {
        use utoipa::openapi::schema::SchemaType;
        ObjectBuilder::new()
            .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
            .min_length(Some(1))
            .max_length(Some(MAX_DOMAIN_LEN))
            .pattern(Some(host_name_pattern()))
            .description(Some("A host name (no wildcard)"))
            .examples(["api.internal"])
            .into()
    }

    impl utoipa::PartialSchema for Tag {
        fn schema() -> RefOr<Schema> {
            string(
                tag_pattern(),
                MAX_TAG_LEN,
                "A backend tag (case-sensitive)",
                "a",
            )
        }
    }
    impl utoipa::ToSchema for Tag {}

    impl utoipa::PartialSchema for BackendId {
        fn schema() -> RefOr<Schema> {
            string(
                backend_id_pattern(),
                MAX_BACKEND_ID_LEN,
                "A backend's unique id (case-sensitive; not `.` or `..`)",
                "web-v1",
            )
        }
    }
    impl utoipa::ToSchema for BackendId {}

    impl utoipa::PartialSchema for BackendAddress {
        fn schema() -> RefOr<Schema> {
            string(
                address_pattern(),
                // `[` + the longest IPv6 text (45) + `]:65535`, or a host name and a port.
                MAX_DOMAIN_LEN + 6,
                "`host:port`: an IPv4 address, a bracketed IPv6 address or a host name (resolved by the proxy)",
                "127.0.0.1:3001",
            )
        }
    }
    impl utoipa::ToSchema for BackendAddress {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_normalises_case_and_trailing_dot() {
        let d = DomainName::parse("WWW.Example.COM.").unwrap();
        assert_eq!(d.as_str(), "www.example.com");
        assert!(!d.is_wildcard());
    }

    #[test]
    fn domain_rejections_name_the_problem() {
        assert_eq!(DomainName::parse(""), Err(DomainNameError::Empty));
        assert_eq!(DomainName::parse("."), Err(DomainNameError::Empty));
        assert!(matches!(
            DomainName::parse("a..com"),
            Err(DomainNameError::EmptyLabel { .. })
        ));
        assert!(matches!(
            DomainName::parse(".a.com"),
            Err(DomainNameError::EmptyLabel { .. })
        ));
        assert!(matches!(
            DomainName::parse(&format!("{}.com", "a".repeat(64))),
            Err(DomainNameError::LabelTooLong { len: 64, .. })
        ));
        let long = vec!["abcdefghi"; 26].join(".");
        assert!(matches!(
            DomainName::parse(&long),
            Err(DomainNameError::TooLong { .. })
        ));
        assert_eq!(
            DomainName::parse("ex_ample.com"),
            Err(DomainNameError::InvalidChar {
                label: "ex_ample".into(),
                ch: '_'
            })
        );
        assert!(matches!(
            DomainName::parse("-a.com"),
            Err(DomainNameError::HyphenAtEdge { .. })
        ));
        assert!(matches!(
            DomainName::parse("a-.com"),
            Err(DomainNameError::HyphenAtEdge { .. })
        ));
        assert!(matches!(
            DomainName::parse("1.2.3.4"),
            Err(DomainNameError::NumericTld { .. })
        ));
    }

    #[test]
    fn wildcard_only_leftmost_and_whole_label() {
        let w = DomainName::parse("*.Example.com").unwrap();
        assert!(w.is_wildcard());
        assert_eq!(w.wildcard_suffix(), Some("example.com"));
        for bad in ["a.*.com", "*a.example.com", "*", "*.com", "**.example.com"] {
            assert!(
                matches!(
                    DomainName::parse(bad),
                    Err(DomainNameError::MisplacedWildcard)
                ),
                "{bad} should be rejected as a misplaced wildcard"
            );
        }
    }

    #[test]
    fn wildcard_matches_exactly_one_label() {
        let w = DomainName::parse("*.example.com").unwrap();
        assert!(w.matches("a.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("a.b.example.com"));
        assert!(!w.matches(".example.com"));
        let e = DomainName::parse("example.com").unwrap();
        assert!(e.matches("example.com"));
        assert!(!e.matches("a.example.com"));
    }

    #[test]
    fn tags_and_ids() {
        assert_eq!(Tag::parse(""), Err(TagError::Empty));
        assert!(matches!(
            Tag::parse("a b"),
            Err(TagError::InvalidChar { ch: ' ', .. })
        ));
        assert!(matches!(
            Tag::parse(&"x".repeat(65)),
            Err(TagError::TooLong { len: 65 })
        ));
        assert_eq!(Tag::parse("canary-2").unwrap().as_str(), "canary-2");
        assert_eq!(BackendId::parse(""), Err(BackendIdError::Empty));
        assert!(matches!(
            BackendId::parse("web/1"),
            Err(BackendIdError::InvalidChar { ch: '/', .. })
        ));
        assert!(matches!(
            BackendId::parse(&"x".repeat(129)),
            Err(BackendIdError::TooLong { len: 129 })
        ));
        assert_eq!(BackendId::parse("web-v1").unwrap().as_str(), "web-v1");
    }

    #[test]
    fn addresses() {
        let a = BackendAddress::parse("127.0.0.1:3001").unwrap();
        assert_eq!(a.socket_addr(), Some("127.0.0.1:3001".parse().unwrap()));
        let b = BackendAddress::parse("[::1]:80").unwrap();
        assert_eq!(b.socket_addr(), Some("[::1]:80".parse().unwrap()));
        let c = BackendAddress::parse("localhost:3001").unwrap();
        assert_eq!(c.host(), &Host::Name("localhost".into()));
        assert_eq!(c.port(), 3001);
        assert_eq!(c.socket_addr(), None);
        assert_eq!(c.as_str(), "localhost:3001");

        assert!(matches!(
            BackendAddress::parse("localhost"),
            Err(AddressError::MissingPort { .. })
        ));
        for bad_port in ["h:0", "h:65536", "h:", "h:+80", "h:port"] {
            assert!(
                matches!(
                    BackendAddress::parse(bad_port),
                    Err(AddressError::InvalidPort { .. })
                ),
                "{bad_port}"
            );
        }
        assert!(BackendAddress::parse("h:65535").is_ok());
        assert!(BackendAddress::parse("h:1").is_ok());
        for bad_host in [
            "::1:80",
            "[::1:80",
            "[zz]:80",
            "bad_host:80",
            "*.x.com:80",
            ":80",
            "1.2.3:80",
        ] {
            assert!(
                BackendAddress::parse(bad_host).is_err(),
                "{bad_host} should be rejected"
            );
        }
    }

    #[test]
    fn serde_runs_validation() {
        let d: Result<DomainName, _> = serde_json::from_str("\"bad..name\"");
        assert!(d.unwrap_err().to_string().contains("empty label"));
        let t: Tag = serde_json::from_str("\"b\"").unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"b\"");
    }

    mod patterns {
        //! The API document's patterns accept exactly what the parsers accept.
        use super::super::*;
        use proptest::prelude::*;

        /// The pattern, compiled once per test thread, with the schema's `maxLength`.
        fn agree(
            pattern: fn() -> String,
            max: usize,
            text: &str,
            parses: bool,
        ) -> Result<(), TestCaseError> {
            thread_local! {
                static COMPILED: std::cell::RefCell<Vec<(usize, fancy_regex::Regex)>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            let key = pattern as usize;
            let matches = COMPILED.with(|cache| {
                let mut cache = cache.borrow_mut();
                if !cache.iter().any(|(k, _)| *k == key) {
                    let re = fancy_regex::Regex::new(&pattern())
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    cache.push((key, re));
                }
                let (_, re) = cache
                    .iter()
                    .find(|(k, _)| *k == key)
                    .ok_or_else(|| TestCaseError::fail("cache"))?;
                re.is_match(text)
                    .map_err(|e| TestCaseError::fail(e.to_string()))
            })? && text.len() <= max;
            prop_assert_eq!(
                matches,
                parses,
                "{:?}: pattern says {}, parser says {}",
                text,
                matches,
                parses
            );
            Ok(())
        }

        fn label() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-zA-Z0-9*_-]{0,4}",
                "[a-z0-9-]{60,66}",
                "[0-9]{1,3}",
                Just("-".to_owned()),
            ]
        }

        fn domainish() -> impl Strategy<Value = String> {
            (
                proptest::collection::vec(label(), 1..6),
                any::<bool>(),
                0usize..5,
            )
                .prop_map(|(labels, dot, pad)| {
                    let mut s = labels.join(".");
                    if pad == 0 {
                        s = format!("{}.{s}", vec!["abcdefghij".repeat(6); 4].join("."));
                    }
                    if dot {
                        s.push('.');
                    }
                    s
                })
        }

        fn v6ish() -> impl Strategy<Value = String> {
            prop_oneof![
                "[0-9a-fA-F:]{0,40}",
                proptest::collection::vec(prop_oneof!["[0-9a-f]{0,5}", Just(String::new())], 1..10)
                    .prop_map(|g| g.join(":")),
                (
                    proptest::collection::vec("[0-9a-f]{1,4}", 0..8),
                    "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
                    0usize..8,
                    any::<bool>()
                )
                    .prop_map(|(g, v4, cut, compress)| {
                        let cut = cut.min(g.len());
                        let (l, r) = g.split_at(cut);
                        let sep = if compress { "::" } else { ":" };
                        let mut s = format!("{}{sep}{}", l.join(":"), r.join(":"));
                        if !r.is_empty() || compress {
                            s.push(':');
                        }
                        s.push_str(&v4);
                        s
                    }),
            ]
        }

        fn port() -> impl Strategy<Value = String> {
            prop_oneof![
                "[0-9]{0,6}",
                Just("65535".to_owned()),
                Just("65536".to_owned()),
                Just("0".to_owned()),
                Just("08".to_owned())
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            #[test]
            fn domain(text in prop_oneof![domainish(), "\\*\\.[a-z0-9.*]{0,8}", "[a-zA-Z0-9.*_ -]{0,12}"]) {
                agree(domain_pattern, MAX_DOMAIN_LEN, &text, DomainName::parse(&text).is_ok())?;
            }

            #[test]
            fn host_name(text in prop_oneof![domainish(), "\\*\\.[a-z0-9.*]{0,8}", "[a-zA-Z0-9.*_ -]{0,12}"]) {
                let accepted = DomainName::parse(&text).is_ok_and(|d| d.wildcard_suffix().is_none());
                agree(host_name_pattern, MAX_DOMAIN_LEN, &text, accepted)?;
            }

            #[test]
            fn tag_and_id(text in prop_oneof!["[a-zA-Z0-9._ /-]{0,8}", "[a-z]{60,130}", "\\.{1,3}"]) {
                agree(tag_pattern, MAX_TAG_LEN, &text, Tag::parse(&text).is_ok())?;
                agree(backend_id_pattern, MAX_BACKEND_ID_LEN, &text, BackendId::parse(&text).is_ok())?;
            }

            #[test]
            fn address(host in prop_oneof![
                domainish(),
                v6ish().prop_map(|h| format!("[{h}]")),
                v6ish(),
                "[0-9]{1,4}\\.[0-9]{1,4}\\.[0-9]{1,3}\\.[0-9]{1,3}",
            ], port in port()) {
                let text = format!("{host}:{port}");
                agree(address_pattern, MAX_DOMAIN_LEN + 6, &text, BackendAddress::parse(&text).is_ok())?;
            }
        }

        #[test]
        fn known_cases() {
            for text in [
                "[::]:1",
                "[::1]:80",
                "[1:2:3:4:5:6:7:8]:80",
                "[1:2:3:4:5:6:7::]:80",
                "[::ffff:1.2.3.4]:80",
                "[1:2:3:4:5:6:1.2.3.4]:80",
                "[1::1.2.3.4]:80",
                "[1:2:3:4:5::1.2.3.4]:80",
                "[1:2:3:4:5:6::1.2.3.4]:80",
                "[0001::]:80",
                "[00001::]:80",
                "[1:2:3:4:5:6:7:8:9]:80",
                "[1.2.3.4]:80",
                "[::1.2.3.04]:80",
                "localhost:3001",
                "localhost.:1",
                "01.2.3.4:80",
                "1.2.3.4:80",
                "1.2.3.256:80",
                "a.1b:9",
                "h:080",
            ] {
                agree(
                    address_pattern,
                    MAX_DOMAIN_LEN + 6,
                    text,
                    BackendAddress::parse(text).is_ok(),
                )
                .unwrap();
            }
            let long = format!("{}.com", vec!["a".repeat(60); 4].join("."));
            for text in [
                long.as_str(),
                "a.com.",
                "*.com",
                "*.a.com",
                "1.2.3.4",
                "a.1-2",
                "A.B",
            ] {
                agree(
                    domain_pattern,
                    MAX_DOMAIN_LEN,
                    text,
                    DomainName::parse(text).is_ok(),
                )
                .unwrap();
            }
        }
    }
}
