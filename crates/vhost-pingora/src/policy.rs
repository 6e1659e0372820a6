//! Traffic policy on the request path: rate limiters, the client address behind trusted
//! proxies, request IDs and header-rule templates.
//!
//! Where it sits: [`Policies`] is attached to the route writer like the metrics
//! ([`vhost_routing::Attach`]): every published snapshot gets, per route, the [`Limiter`] of its
//! domain's `rate_limit` — the same limiter as before when the setting did not change, so a
//! config change elsewhere never refills anyone's bucket. `VhostProxy::request_filter` finds it
//! by route index; no lock, no allocation.

use std::any::Any;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use foldhash::fast::FixedState;
use http::HeaderValue;
use vhost_routing::{Attach, Cidr, RateLimit, RoutingTable};

/// Buckets per limiter keyed by client or header: memory is bounded whatever the number of
/// clients (8 bytes each); clients whose keys hash to the same bucket share its budget.
pub const LIMITER_BUCKETS: usize = 16_384;

/// A token bucket per key, as GCRA (one atomic timestamp per bucket): `burst` requests pass at
/// once, then one every `1 / requests_per_second`.
#[derive(Debug)]
pub struct Limiter {
    /// Nanoseconds between two requests at the sustained rate.
    interval: u64,
    /// Nanoseconds of credit a full bucket holds (`interval × burst`).
    capacity: u64,
    burst: u32,
    rps: u32,
    buckets: Box<[AtomicU64]>,
    hasher: FixedState,
    epoch: Instant,
}

/// A request over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// Seconds until one more request would pass.
    pub retry_after_secs: u64,
}

impl Limiter {
    /// A limiter for `limit`, with one bucket (`domain` key) or [`LIMITER_BUCKETS`].
    pub fn new(limit: &RateLimit, seed: u64) -> Self {
        let rps = limit.requests_per_second.max(1);
        let burst = limit.burst().max(1);
        let interval = 1_000_000_000 / u64::from(rps);
        let n = match limit.key {
            vhost_routing::RateLimitKey::Domain => 1,
            _ => LIMITER_BUCKETS,
        };
        Self {
            interval,
            capacity: interval * u64::from(burst),
            burst,
            rps,
            buckets: (0..n).map(|_| AtomicU64::new(0)).collect(),
            hasher: FixedState::with_seed(seed),
            epoch: Instant::now(),
        }
    }

    fn bucket(&self, key: &[u8]) -> &AtomicU64 {
        let i = if self.buckets.len() == 1 {
            0
        } else {
            let mut h = self.hasher.build_hasher();
            h.write(key);
            (h.finish() as usize) % self.buckets.len()
        };
        &self.buckets[i]
    }

    /// Takes one token for `key`: the tokens left, or how long until one is back.
    pub fn check(&self, key: &[u8]) -> Result<u32, Limited> {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let bucket = self.bucket(key);
        let mut current = bucket.load(Ordering::Relaxed);
        loop {
            // The theoretical arrival time after this request; a bucket is full when it is in
            // the past, and this request fits while it is at most `capacity` ahead.
            let tat = current.max(now).saturating_add(self.interval);
            let ahead = tat - now;
            if ahead > self.capacity {
                let wait = ahead - self.capacity;
                return Err(Limited {
                    retry_after_secs: wait.div_ceil(1_000_000_000).max(1),
                });
            }
            match bucket.compare_exchange_weak(current, tat, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    let left = (self.capacity - ahead) / self.interval;
                    return Ok(u32::try_from(left).unwrap_or(u32::MAX));
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers): the quota and its window.
    pub fn policy_header(&self) -> String {
        let window = u64::from(self.burst).div_ceil(u64::from(self.rps)).max(1);
        format!("\"default\";q={};w={window}", self.burst)
    }
}

/// Per snapshot: the limiter of each route, by route index.
#[derive(Debug, Default)]
pub(crate) struct PolicySlots {
    limiters: Vec<Option<Arc<Limiter>>>,
}

impl PolicySlots {
    pub(crate) fn limiter(&self, route: usize) -> Option<&Arc<Limiter>> {
        self.limiters.get(route).and_then(Option::as_ref)
    }
}

/// The policy side table's writer (see the module docs).
#[derive(Debug, Default)]
pub struct Policies {
    /// The limiters of the last snapshot, by domain, with the setting they were built for.
    registry: ArcSwap<LimiterRegistry>,
}

/// Limiters by domain, with the setting each was built for.
type LimiterRegistry = HashMap<Box<str>, (RateLimit, Arc<Limiter>)>;

impl Attach for Policies {
    fn attach(&self, table: &RoutingTable) -> Arc<dyn Any + Send + Sync> {
        let previous = self.registry.load();
        let mut registry = HashMap::new();
        let mut limiters: Vec<Option<Arc<Limiter>>> =
            (0..table.route_count()).map(|_| None).collect();
        for route in table.routes() {
            let vhost = route.vhost();
            let Some(limit) = vhost.rate_limit.as_deref() else {
                continue;
            };
            let domain: &str = vhost.domain.as_str();
            let limiter = match previous.get(domain) {
                Some((old, limiter)) if old == limit => Arc::clone(limiter),
                _ => Arc::new(Limiter::new(limit, fastrand::u64(..))),
            };
            registry.insert(domain.into(), (limit.clone(), Arc::clone(&limiter)));
            if let Some(place) = limiters.get_mut(route.index()) {
                *place = Some(limiter);
            }
        }
        self.registry.store(Arc::new(registry));
        Arc::new(PolicySlots { limiters })
    }
}

/// The client behind trusted proxies: from the right of `X-Forwarded-For`, the first address
/// that is not a trusted proxy (the peer must be one for the header to count at all).
pub fn client_behind(
    peer: IpAddr,
    forwarded_for: Option<&HeaderValue>,
    trusted: &[Cidr],
) -> IpAddr {
    if trusted.is_empty() || !vhost_routing::any_contains(trusted, peer) {
        return peer;
    }
    let Some(chain) = forwarded_for.map(HeaderValue::as_bytes) else {
        return peer;
    };
    let mut client = peer;
    for hop in chain.rsplit(|b| *b == b',') {
        let hop = hop.trim_ascii();
        let parsed = std::str::from_utf8(hop).ok().and_then(|text| {
            if hop.contains(&b':') {
                text.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)
            } else {
                text.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
            }
        });
        let Some(ip) = parsed else {
            break;
        };
        client = ip;
        if !vhost_routing::any_contains(trusted, ip) {
            break;
        }
    }
    client
}

/// A client's `X-Request-Id` worth keeping: 1–128 letters, digits and `-_.:`.
pub fn sane_request_id(value: &HeaderValue) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
}

/// Writes `ip` in its canonical text form into `buf` and returns the written part. IPv4 — the
/// common case, once per proxied request for `X-Forwarded-For` — is formatted digit by digit
/// (about a tenth of the instructions of `Display`); IPv6 goes through `Display`.
pub fn format_ip(ip: IpAddr, buf: &mut [u8; 48]) -> &[u8] {
    match ip {
        IpAddr::V4(v4) => {
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    buf[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    buf[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                buf[len] = b'0' + octet % 10;
                len += 1;
            }
            &buf[..len]
        }
        IpAddr::V6(_) => {
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            let _ = std::io::Write::write_fmt(&mut cursor, format_args!("{ip}"));
            let len = usize::try_from(cursor.position()).unwrap_or(0);
            &buf[..len]
        }
    }
}

/// A new request id: a UUID version 7 (time-ordered: 48 bits of Unix milliseconds, then random).
pub fn new_request_id() -> HeaderValue {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let rand_a = fastrand::u16(..) & 0x0fff;
    let rand_b = fastrand::u64(..) & 0x3fff_ffff_ffff_ffff;
    let hi = (ms << 16) | 0x7000 | u64::from(rand_a);
    let lo = 0x8000_0000_0000_0000 | rand_b;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&hi.to_be_bytes());
    bytes[8..].copy_from_slice(&lo.to_be_bytes());
    let mut buf = [0u8; 36];
    let mut at = 0;
    for (i, byte) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            buf[at] = b'-';
            at += 1;
        }
        buf[at] = HEX[usize::from(byte >> 4)];
        buf[at + 1] = HEX[usize::from(byte & 0xf)];
        at += 2;
    }
    // Hex digits and dashes are always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// What header-rule placeholders stand for in one request.
pub struct TemplateValues<'a> {
    /// `{client_ip}`.
    pub client_ip: Option<IpAddr>,
    /// `{request_id}`.
    pub request_id: Option<&'a HeaderValue>,
    /// `{domain}`.
    pub domain: &'a str,
    /// `{tag}`: the tag that serves.
    pub tag: &'a str,
    /// `{backend}`: the backend's id (empty before one is chosen).
    pub backend: &'a str,
}

/// `template` with its placeholders filled in (validated: braces only around known names).
pub fn expand(template: &str, values: &TemplateValues<'_>) -> Option<HeaderValue> {
    if !template.contains('{') {
        return HeaderValue::from_str(template).ok();
    }
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}')?;
        match &after[..close] {
            "client_ip" => {
                if let Some(ip) = values.client_ip {
                    use std::fmt::Write as _;
                    let _ = write!(out, "{ip}");
                }
            }
            "request_id" => {
                if let Some(id) = values.request_id.and_then(|v| v.to_str().ok()) {
                    out.push_str(id);
                }
            }
            "domain" => out.push_str(values.domain),
            "tag" => out.push_str(values.tag),
            "backend" => out.push_str(values.backend),
            _ => return None,
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    HeaderValue::from_str(&out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rps: u32, burst: u32) -> RateLimit {
        RateLimit {
            requests_per_second: rps,
            burst: Some(burst),
            key: vhost_routing::RateLimitKey::ClientIp,
        }
    }

    #[test]
    fn a_burst_passes_then_the_rate() {
        let l = Limiter::new(&limit(5, 10), 1);
        let passed = (0..30).filter(|_| l.check(b"a").is_ok()).count();
        // Ten at once (plus at most one refilled while the loop ran).
        assert!((10..=11).contains(&passed), "{passed}");
        let Err(limited) = l.check(b"a") else {
            panic!("not limited")
        };
        assert_eq!(limited.retry_after_secs, 1);
        // Another key has its own bucket.
        assert!(l.check(b"b").is_ok());
        assert_eq!(l.policy_header(), "\"default\";q=10;w=2");
    }

    #[test]
    fn only_trusted_peers_are_believed() {
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        let xff = HeaderValue::from_static("198.51.100.7, 10.1.1.1");
        let peer: IpAddr = "10.9.9.9".parse().unwrap();
        assert_eq!(
            client_behind(peer, Some(&xff), &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        let outsider: IpAddr = "203.0.113.5".parse().unwrap();
        assert_eq!(client_behind(outsider, Some(&xff), &trusted), outsider);
        assert_eq!(client_behind(peer, Some(&xff), &[]), peer);
        let junk = HeaderValue::from_static("nonsense");
        assert_eq!(client_behind(peer, Some(&junk), &trusted), peer);
    }

    #[test]
    fn request_ids_are_uuid_v7_and_sane_ones_are_kept() {
        let id = new_request_id();
        let text = id.to_str().unwrap();
        assert_eq!(text.len(), 36);
        assert_eq!(&text[14..15], "7");
        assert!(matches!(&text[19..20], "8" | "9" | "a" | "b"), "{text}");
        assert!(sane_request_id(&id));
        assert_ne!(new_request_id(), id);
        assert!(!sane_request_id(&HeaderValue::from_static("a b")));
        assert!(!sane_request_id(&HeaderValue::from_static("")));
    }

    #[test]
    fn addresses_format_like_display() {
        let mut buf = [0u8; 48];
        for text in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "192.0.2.109",
            "::1",
            "2001:db8::ff00:42:8329",
            "::ffff:192.0.2.1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(format_ip(ip, &mut buf), ip.to_string().as_bytes(), "{text}");
        }
        proptest::proptest!(|(v4: u32)| {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(v4));
            let mut buf = [0u8; 48];
            let expected = ip.to_string();
            proptest::prop_assert_eq!(format_ip(ip, &mut buf), expected.as_bytes());
        });
    }

    #[test]
    fn templates_fill_placeholders() {
        let id = HeaderValue::from_static("abc");
        let values = TemplateValues {
            client_ip: Some("192.0.2.1".parse().unwrap()),
            request_id: Some(&id),
            domain: "shop.example.com",
            tag: "b",
            backend: "web-2",
        };
        assert_eq!(
            expand(
                "{client_ip} {request_id} {domain}/{tag}/{backend}!",
                &values
            )
            .unwrap(),
            "192.0.2.1 abc shop.example.com/b/web-2!"
        );
        assert_eq!(expand("plain", &values).unwrap(), "plain");
    }
}
