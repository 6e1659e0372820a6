//! Weighted, sticky canaries: a share of a domain's traffic goes to a second tag.
//!
//! Sits in the model, beside [`crate::VirtualHost`]: the admin API and the config file set a
//! [`Canary`] on a virtual host; the routing snapshot turns it into a [`CanaryRoute`]; the
//! data plane computes a request's [bucket](bucket_of) (from a cookie, a header or the client
//! address) and asks the route which [`Side`] serves it. Pure: no clock, no randomness (the
//! caller supplies a random bucket when the request has no key), no I/O.
//!
//! Every key falls in one of [`BUCKETS`] buckets; buckets below `weight × 100` go to the canary.
//! So raising the weight keeps every key that was on the canary there, lowering it moves back
//! only the keys above the new cut, and returning to an earlier weight gives back exactly the
//! earlier set.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::names::Tag;
use crate::rollout::{check_plan, Analysis, RolloutError, RolloutState};

/// Number of buckets keys are hashed into; a weight has a resolution of one bucket (0.01 %).
pub const BUCKETS: u16 = 10_000;

/// Longest header name accepted in `sticky_key = "header:<Name>"`.
pub const MAX_HEADER_NAME_LEN: usize = 64;

/// A virtual host's canary: `weight` percent of its traffic goes to `tag`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Canary {
    /// The canary tag (not the domain's primary `enabled_backends_tag`).
    pub tag: Tag,
    /// Percent of traffic sent to the canary tag, 0–100 in steps of 0.01.
    pub weight: CanaryWeight,
    /// What keeps a client on its side: `cookie` (default), `header:<Name>`, `client_ip` or
    /// `none` (each request drawn anew).
    #[serde(default)]
    pub sticky_key: StickyKey,
    /// Weights a rollout walks through, increasing (`[1, 5, 25, 50, 100]`): after the last one
    /// the canary is promoted. Empty: the weight changes only by hand (and an `analysis` only
    /// guards it).
    #[cfg_attr(feature = "openapi", schema(max_items = 20))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<CanaryWeight>,
    /// Seconds each step lasts at least (with an analysis: until a passing check after that).
    #[cfg_attr(
        feature = "openapi",
        schema(minimum = 1, maximum = 86400, default = 60)
    )]
    #[serde(
        default = "default_step_interval",
        deserialize_with = "crate::model::whole::u64",
        skip_serializing_if = "is_default_step_interval"
    )]
    pub step_interval_secs: u64,
    /// Checks of the canary against the primary that abort the rollout when they keep failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<Analysis>,
    /// Where the rollout stands: `progressing` (default), `paused` or `aborted`.
    #[serde(default, skip_serializing_if = "is_progressing")]
    pub state: RolloutState,
    /// Index of the current step in `steps` (`weight` is `steps[step]`).
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 19))]
    #[serde(
        default,
        deserialize_with = "crate::model::whole::usize",
        skip_serializing_if = "is_zero"
    )]
    pub step: usize,
    /// Why the rollout was aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_reason: Option<String>,
}

fn default_step_interval() -> u64 {
    60
}
fn is_default_step_interval(v: &u64) -> bool {
    *v == 60
}
fn is_progressing(s: &RolloutState) -> bool {
    *s == RolloutState::Progressing
}
fn is_zero(v: &usize) -> bool {
    *v == 0
}

impl Canary {
    /// A canary sending `weight` to `tag`, without a rollout plan.
    pub fn new(tag: Tag, weight: CanaryWeight, sticky_key: StickyKey) -> Self {
        Self {
            tag,
            weight,
            sticky_key,
            steps: Vec::new(),
            step_interval_secs: default_step_interval(),
            analysis: None,
            state: RolloutState::Progressing,
            step: 0,
            abort_reason: None,
        }
    }

    /// True if the proxy moves or guards this canary on its own (steps or an analysis) and it
    /// is running.
    pub fn is_running(&self) -> bool {
        self.state == RolloutState::Progressing
            && (!self.steps.is_empty() || self.analysis.is_some())
    }

    /// Checks the rollout plan.
    pub fn check(&self) -> Result<(), RolloutError> {
        check_plan(
            &self.steps,
            self.step,
            self.weight,
            self.state,
            self.step_interval_secs,
            self.analysis.as_ref(),
        )
    }
}

/// Why a canary setting was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CanaryError {
    /// The weight is not a number from 0 to 100 with at most two decimals.
    #[error("canary weight {0} must be a number from 0 to 100 with at most two decimals")]
    Weight(String),
    /// The sticky key is none of the known forms.
    #[error("sticky_key {0:?} must be \"cookie\", \"client_ip\", \"none\" or \"header:<Name>\" (an HTTP header name of 1-64 characters)")]
    StickyKey(String),
}

/// A canary weight in hundredths of a percent (0..=10 000); written as a percentage (`12.5`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct CanaryWeight(u16);

impl CanaryWeight {
    /// No traffic to the canary.
    pub const ZERO: Self = Self(0);

    /// From a percentage with at most two decimals (`10.0`, `0.25`).
    pub fn from_percent(percent: f64) -> Result<Self, CanaryError> {
        let hundredths = percent * 100.0;
        let rounded = hundredths.round();
        if !(0.0..=f64::from(BUCKETS)).contains(&rounded) || (hundredths - rounded).abs() > 1e-6 {
            return Err(CanaryError::Weight(percent.to_string()));
        }
        // In 0..=10 000 and whole: exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Ok(Self(rounded as u16))
    }

    /// From hundredths of a percent (0..=10 000).
    pub fn from_hundredths(hundredths: u16) -> Result<Self, CanaryError> {
        if hundredths > BUCKETS {
            return Err(CanaryError::Weight(format!(
                "{}",
                f64::from(hundredths) / 100.0
            )));
        }
        Ok(Self(hundredths))
    }

    /// The weight in hundredths of a percent: the number of buckets on the canary side.
    pub fn hundredths(self) -> u16 {
        self.0
    }

    /// The weight as a percentage.
    pub fn percent(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

impl fmt::Display for CanaryWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.percent())
    }
}

impl Serialize for CanaryWeight {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.percent())
    }
}

impl<'de> Deserialize<'de> for CanaryWeight {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = CanaryWeight;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a percentage from 0 to 100 with at most two decimals")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<CanaryWeight, E> {
                CanaryWeight::from_percent(v).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<CanaryWeight, E> {
                match u16::try_from(v) {
                    Ok(p) if p <= 100 => Ok(CanaryWeight(p * 100)),
                    _ => Err(E::custom(CanaryError::Weight(v.to_string()))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<CanaryWeight, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(CanaryError::Weight(v.to_string()))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// What keeps a client on the same side of a canary.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum StickyKey {
    /// A bucket cookie issued on the first response (see the proxy's `canary_cookie`).
    #[default]
    Cookie,
    /// The value of a request header (e.g. a user id set by an authenticating layer); requests
    /// without it are drawn at random. The name is kept lowercase.
    Header(Box<str>),
    /// The client's IP address.
    ClientIp,
    /// Nothing: every request is drawn anew.
    None,
}

impl StickyKey {
    /// Parses `cookie`, `header:<Name>`, `client_ip` or `none`.
    pub fn parse(input: &str) -> Result<Self, CanaryError> {
        match input {
            "cookie" => Ok(Self::Cookie),
            "client_ip" => Ok(Self::ClientIp),
            "none" => Ok(Self::None),
            _ => {
                let name = input
                    .strip_prefix("header:")
                    .filter(|n| {
                        !n.is_empty()
                            && n.len() <= MAX_HEADER_NAME_LEN
                            && n.bytes().all(is_header_name_byte)
                    })
                    .ok_or_else(|| CanaryError::StickyKey(input.to_owned()))?;
                Ok(Self::Header(name.to_ascii_lowercase().into()))
            }
        }
    }

    /// The text form.
    pub fn as_text(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Self::Cookie => "cookie".into(),
            Self::Header(name) => format!("header:{name}").into(),
            Self::ClientIp => "client_ip".into(),
            Self::None => "none".into(),
        }
    }
}

/// RFC 9110 token characters.
fn is_header_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The pattern of `sticky_key`, for the API document (agrees with [`StickyKey::parse`]).
pub fn sticky_key_pattern() -> String {
    format!(
        "^(cookie|client_ip|none|header:[A-Za-z0-9!#$%&'*+.^_`|~-]{{1,{MAX_HEADER_NAME_LEN}}})$"
    )
}

impl Serialize for StickyKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_text())
    }
}

impl<'de> Deserialize<'de> for StickyKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "openapi")]
mod schema {
    use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
    use utoipa::openapi::RefOr;

    use super::*;

    impl utoipa::PartialSchema for CanaryWeight {
        fn schema() -> RefOr<Schema> {
            ObjectBuilder::new()
                .schema_type(Type::Number)
                .minimum(Some(0))
                .maximum(Some(100))
                .multiple_of(Some(0.01))
                .description(Some(
                    "Percent of traffic to the canary tag, 0-100 in steps of 0.01",
                ))
                .examples([10.0])
                .into()
        }
    }
    impl utoipa::ToSchema for CanaryWeight {}

    impl utoipa::PartialSchema for StickyKey {
        fn schema() -> RefOr<Schema> {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(sticky_key_pattern()))
                .default(Some("cookie".into()))
                .description(Some("What keeps a client on its side: `cookie`, `header:<Name>`, `client_ip` or `none`"))
                .examples(["cookie"])
                .into()
        }
    }
    impl utoipa::ToSchema for StickyKey {}
}

/// Which tag serves a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Side {
    /// The domain's `enabled_backends_tag`.
    #[default]
    Primary,
    /// The canary's tag.
    Canary,
}

impl Side {
    /// The other side.
    pub fn other(self) -> Self {
        match self {
            Self::Primary => Self::Canary,
            Self::Canary => Self::Primary,
        }
    }
}

/// A forced side (`X-Canary: always|never`, cookie `canary=always|never`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Override {
    /// Always the canary.
    Always,
    /// Never the canary.
    Never,
}

impl Override {
    /// `always` / `never` (ASCII case-insensitive); anything else is no override.
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.eq_ignore_ascii_case(b"always") {
            Some(Self::Always)
        } else if value.eq_ignore_ascii_case(b"never") {
            Some(Self::Never)
        } else {
            None
        }
    }
}

/// The bucket (0..[`BUCKETS`]) of `key` for a domain whose seed is `seed` (see
/// [`domain_seed`]): a fixed function (FNV-1a then a SplitMix64 finaliser), the same in every
/// process and version, so a client keeps its bucket across restarts and reloads.
pub fn bucket_of(seed: u64, key: &[u8]) -> u16 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    // < 10 000: fits.
    #[allow(clippy::cast_possible_truncation)]
    let bucket = (h % u64::from(BUCKETS)) as u16;
    bucket
}

/// The per-domain seed of [`bucket_of`]: different domains split the same clients differently.
pub fn domain_seed(domain: &str) -> u64 {
    let mut h = 0x8422_2325_cbf2_9ce4u64;
    for &b in domain.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Parses a bucket cookie's value: a decimal number below [`BUCKETS`], nothing else.
pub fn parse_bucket(value: &[u8]) -> Option<u16> {
    if value.is_empty() || value.len() > 5 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = value
        .iter()
        .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    u16::try_from(n).ok().filter(|n| *n < BUCKETS)
}

/// Which side a request with `bucket` and `forced` goes to, before health is considered.
pub fn side_for(weight: CanaryWeight, bucket: u16, forced: Option<Override>) -> Side {
    match forced {
        Some(Override::Always) => Side::Canary,
        Some(Override::Never) => Side::Primary,
        None if bucket < weight.hundredths() => Side::Canary,
        None => Side::Primary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn weights_parse_with_two_decimals() {
        assert_eq!(CanaryWeight::from_percent(10.0).unwrap().hundredths(), 1000);
        assert_eq!(CanaryWeight::from_percent(0.07).unwrap().hundredths(), 7);
        assert_eq!(
            CanaryWeight::from_percent(100.0).unwrap().hundredths(),
            10_000
        );
        for bad in [-0.01, 100.01, 10.005, f64::NAN, f64::INFINITY] {
            assert!(CanaryWeight::from_percent(bad).is_err(), "{bad}");
        }
        let w: CanaryWeight = serde_json::from_str("25").unwrap();
        assert_eq!(w.hundredths(), 2500);
        assert_eq!(serde_json::to_string(&w).unwrap(), "25.0");
        assert!(serde_json::from_str::<CanaryWeight>("101").is_err());
        assert!(serde_json::from_str::<CanaryWeight>("\"10\"").is_err());
    }

    #[test]
    fn sticky_keys_round_trip() {
        for text in ["cookie", "client_ip", "none", "header:x-user-id"] {
            assert_eq!(StickyKey::parse(text).unwrap().as_text(), text);
        }
        assert_eq!(
            StickyKey::parse("header:X-User").unwrap(),
            StickyKey::Header("x-user".into())
        );
        for bad in ["", "Cookie", "header:", "header:a b", "header:é", "ip"] {
            assert!(StickyKey::parse(bad).is_err(), "{bad}");
        }
        let c: Canary = serde_json::from_str(r#"{"tag":"b","weight":10}"#).unwrap();
        assert_eq!(c.sticky_key, StickyKey::Cookie);
    }

    #[test]
    fn bucket_cookie_values() {
        assert_eq!(parse_bucket(b"0"), Some(0));
        assert_eq!(parse_bucket(b"9999"), Some(9999));
        for bad in [&b""[..], b"10000", b"-1", b"12a", b"000001", b" 1"] {
            assert_eq!(parse_bucket(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        // Fixed values: a change of the function would move every sticky client.
        let seed = domain_seed("app.example.com");
        assert_eq!(bucket_of(seed, b"user-1"), bucket_of(seed, b"user-1"));
        let on_canary = (0..3000)
            .filter(|i| bucket_of(seed, format!("user-{i}").as_bytes()) < 1000)
            .count();
        assert!(
            (255..=345).contains(&on_canary),
            "{on_canary} of 3000 at 10 %"
        );
        assert_ne!(
            (0..50).map(|i| bucket_of(seed, &[i])).collect::<Vec<_>>(),
            (0..50)
                .map(|i| bucket_of(domain_seed("other.example.com"), &[i]))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn overrides_win() {
        let w = CanaryWeight::from_percent(50.0).unwrap();
        assert_eq!(side_for(w, 0, Some(Override::Never)), Side::Primary);
        assert_eq!(side_for(w, 9999, Some(Override::Always)), Side::Canary);
        assert_eq!(Override::parse(b"ALWAYS"), Some(Override::Always));
        assert_eq!(Override::parse(b"sometimes"), None);
    }

    proptest! {
        /// Raising the weight never moves a key off the canary; lowering it moves back only
        /// the keys above the new cut; the set at a weight depends on nothing else.
        #[test]
        fn weight_changes_are_monotonic(keys in proptest::collection::vec(any::<u64>(), 1..200), a in 0u16..=10_000, b in 0u16..=10_000) {
            let seed = domain_seed("d.test");
            let (lo, hi) = (CanaryWeight(a.min(b)), CanaryWeight(a.max(b)));
            for k in keys {
                let bucket = bucket_of(seed, &k.to_le_bytes());
                if side_for(lo, bucket, None) == Side::Canary {
                    prop_assert_eq!(side_for(hi, bucket, None), Side::Canary);
                }
                if side_for(hi, bucket, None) == Side::Primary {
                    prop_assert_eq!(side_for(lo, bucket, None), Side::Primary);
                }
            }
        }
    }
}
