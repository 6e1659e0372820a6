//! Request metrics without locks or allocation on the request path.
//!
//! Series labelled by domain, tag and backend are [`vhost_metrics`] counters and histograms this
//! module owns and renders ([`ProxyMetrics::render`]), not `metrics`-facade series: the facade's
//! recorder never forgets a series, and these must leave `/metrics` when their domain or backend
//! leaves the configuration. They live in a registry keyed by labels, which the
//! [`RouteWriter`](vhost_routing::RouteWriter) updates before it publishes a snapshot
//! ([`Attach`]): series of deleted domains and backends are dropped, new ones created, and the
//! snapshot gets a side table of the handles its requests need, indexed by route and backend.
//! A request records into the side table of the very snapshot it loaded (an index and an
//! atomic add); nothing is built or registered on the request path, and a request finishing
//! on an old snapshot never replaces a newer table. A series whose domain and backend still
//! exist keeps counting across snapshots (a tag switch keeps the old tag's series).
//!
//! Fixed-label series (local responses by reason, client errors) stay on the `metrics` facade.

use std::any::Any;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use metrics::{counter, Counter as FacadeCounter};
use vhost_metrics::{Counter, Exposition, Histogram, Kind};
use vhost_routing::{Attach, BackendEntry, Route, RoutingTable, Side};

use crate::proxy::LocalReason;

/// Label value used for requests whose host matches no configured domain (never the raw Host).
pub const UNKNOWN_DOMAIN: &str = "_unknown";
/// Label value for "no backend" (requests answered by the proxy itself).
pub const NO_BACKEND: &str = "_none";

/// Status classes: index = first digit - 1; "none" when no response was sent (client gone).
const CLASSES: [&str; 7] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none", "grpc_error"];

/// The class of gRPC calls answered with a non-zero `grpc-status` (HTTP 200 otherwise).
const GRPC_ERROR: usize = 6;

fn class_index(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100) - 1,
        _ => 5,
    }
}

/// `proxy_requests_total` of one (domain, tag, backend), by status class (classes never seen
/// are not rendered).
#[derive(Debug, Default)]
struct StatusCounts([Counter; 7]);

impl StatusCounts {
    fn increment(&self, class: usize) {
        if let Some(c) = self.0.get(class) {
            c.add(1);
        }
    }
}

type Name = Arc<str>;

/// Every configuration-labelled series that is still rendered.
#[derive(Debug, Default, Clone)]
struct Registry {
    /// By (domain, tag, backend or [`NO_BACKEND`]).
    requests: BTreeMap<(Name, Name, Name), Arc<StatusCounts>>,
    /// By (domain, tag).
    latency: BTreeMap<(Name, Name), Arc<Histogram>>,
    /// By (domain, tag).
    retries: BTreeMap<(Name, Name), Arc<Counter>>,
    /// By backend.
    connect_failures: BTreeMap<Name, Arc<Counter>>,
    /// By domain: requests whose canary side had no available backend.
    fallbacks: BTreeMap<Name, Arc<Counter>>,
}

/// The handles of one side (tag) of a route.
struct SideSlot {
    latency: Arc<Histogram>,
    retries: Arc<Counter>,
    /// By pool member index.
    members: Box<[Arc<StatusCounts>]>,
}

/// The handles of one route.
struct RouteSlot {
    primary: SideSlot,
    /// The canary tag's, when the route has a canary.
    canary: Option<SideSlot>,
    /// Requests of this domain answered by the proxy itself.
    local: Arc<StatusCounts>,
    /// `canary_fallbacks_total` of the domain, when the route has a canary.
    fallbacks: Option<Arc<Counter>>,
}

/// The side table attached to one snapshot.
struct Slots {
    /// By route index.
    routes: Box<[Option<RouteSlot>]>,
    /// By backend index.
    connect_failures: Box<[Arc<Counter>]>,
}

/// Registers the descriptions (Prometheus `# HELP`) of the proxy's facade metrics with the
/// installed recorder (the configuration-labelled ones are described by [`ProxyMetrics::render`]).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "proxy_local_responses_total",
        "Responses the proxy gave itself, by reason: unknown_host (404), misdirected (421), no_backend (503), redirect (308), upstream_timeout (504), upstream_error (502), overloaded (503: out of descriptors or ports), acme_challenge (ACME HTTP-01 answers), forbidden (403: access lists), rate_limited (429), saturated (503: backends at max_concurrent_requests)"
    );
    describe_counter!(
        "proxy_client_errors_total",
        "Requests ended by their client: disconnects and resets in the middle of a request, malformed requests"
    );
    describe_gauge!("proxy_requests_in_flight", "Requests being handled now");
    describe_counter!(
        "proxy_rate_limited_total",
        "Requests refused with 429 by a domain's rate limit, by domain"
    );
    describe_gauge!(
        "proxy_upgraded_connections",
        "Client connections switched to another protocol (WebSocket) and open now"
    );
}

/// Handles for the fixed-label series.
struct Fixed {
    local: [FacadeCounter; LOCAL_REASONS.len()],
    client_errors: FacadeCounter,
}

const LOCAL_REASONS: [LocalReason; 11] = [
    LocalReason::Redirect,
    LocalReason::UnknownHost,
    LocalReason::Misdirected,
    LocalReason::NoBackend,
    LocalReason::UpstreamTimeout,
    LocalReason::UpstreamError,
    LocalReason::Overloaded,
    LocalReason::AcmeChallenge,
    LocalReason::Forbidden,
    LocalReason::RateLimited,
    LocalReason::Saturated,
];

/// The proxy's metrics (see the module docs). Attach it to the route writer
/// ([`VhostProxy::new`](crate::VhostProxy::new) does).
pub struct ProxyMetrics {
    registry: ArcSwap<Registry>,
    /// Requests for hosts that match no domain.
    unknown_host: StatusCounts,
    fixed: Fixed,
}

impl std::fmt::Debug for ProxyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyMetrics")
            .field("request_series", &self.registry.load().requests.len())
            .finish_non_exhaustive()
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn local_counter(reason: LocalReason) -> FacadeCounter {
    counter!("proxy_local_responses_total", "reason" => reason.as_str())
}

fn entry<K: Ord, V: Default>(map: &mut BTreeMap<K, Arc<V>>, key: K) -> Arc<V> {
    Arc::clone(map.entry(key).or_default())
}

impl Attach for ProxyMetrics {
    /// Drops the series of domains and backends `table` no longer has, creates those it needs
    /// and returns its side table. Called by the single route writer, in publication order.
    fn attach(&self, table: &RoutingTable) -> Arc<dyn Any + Send + Sync> {
        let mut registry = Registry::clone(&self.registry.load());
        let domains: HashSet<&str> = table.state().vhosts().map(|v| v.domain.as_str()).collect();
        let backends: HashSet<&str> = table.backends().map(|b| b.id().as_str()).collect();
        registry.requests.retain(|(d, _, b), _| {
            domains.contains(&**d) && (&**b == NO_BACKEND || backends.contains(&**b))
        });
        registry.latency.retain(|(d, _), _| domains.contains(&**d));
        registry.retries.retain(|(d, _), _| domains.contains(&**d));
        registry
            .connect_failures
            .retain(|b, _| backends.contains(&**b));
        registry.fallbacks.retain(|d, _| domains.contains(&**d));

        let mut routes: Vec<Option<RouteSlot>> = (0..table.route_count()).map(|_| None).collect();
        for route in table.routes() {
            let v = route.vhost();
            let domain: Name = Arc::from(v.domain.as_str());
            let primary = side_slot(&mut registry, route, Side::Primary, &domain);
            let canary = route
                .canary()
                .map(|_| side_slot(&mut registry, route, Side::Canary, &domain));
            let fallbacks = route
                .canary()
                .map(|_| entry(&mut registry.fallbacks, Arc::clone(&domain)));
            let tag: Name = Arc::from(v.enabled_backends_tag.as_str());
            let slot = RouteSlot {
                primary,
                canary,
                local: entry(&mut registry.requests, (domain, tag, Arc::from(NO_BACKEND))),
                fallbacks,
            };
            if let Some(place) = routes.get_mut(route.index()) {
                *place = Some(slot);
            }
        }
        let mut connect_failures: Vec<(usize, Arc<Counter>)> = table
            .backends()
            .map(|b| {
                let counter = entry(&mut registry.connect_failures, Arc::from(b.id().as_str()));
                (b.index(), counter)
            })
            .collect();
        connect_failures.sort_by_key(|(i, _)| *i);
        self.registry.store(Arc::new(registry));
        Arc::new(Slots {
            routes: routes.into_boxed_slice(),
            connect_failures: connect_failures.into_iter().map(|(_, c)| c).collect(),
        })
    }
}

/// Everything counted so far for one (domain, tag): the cumulative numbers a rollout analysis
/// takes differences of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SideTotals {
    /// Requests answered (any status, the proxy's own answers included).
    pub requests: u64,
    /// Of which 5xx.
    pub errors: u64,
    /// Latency observations per bucket of [`vhost_metrics::LATENCY_BUCKETS`] (the last one
    /// above every bound).
    pub latency: Vec<u64>,
}

impl SideTotals {
    /// `self − earlier`, counter by counter (a counter that went down, after its series was
    /// recreated, counts from zero).
    pub fn since(&self, earlier: &SideTotals) -> SideTotals {
        let latency = self
            .latency
            .iter()
            .enumerate()
            .map(|(i, now)| now.saturating_sub(earlier.latency.get(i).copied().unwrap_or(0)))
            .collect();
        SideTotals {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            latency,
        }
    }
}

impl ProxyMetrics {
    /// The cumulative numbers of `domain`'s requests served by `tag` (off the request path:
    /// reads the registry).
    pub fn side_totals(&self, domain: &str, tag: &str) -> SideTotals {
        let registry = self.registry.load();
        let mut totals = SideTotals::default();
        for ((d, t, _), counts) in registry.requests.iter() {
            if &**d == domain && &**t == tag {
                // "none" (the client left before an answer) is not a request answered.
                totals.requests += counts.0[..5].iter().map(Counter::get).sum::<u64>();
                totals.errors += counts.0[4].get() + counts.0[GRPC_ERROR].get();
            }
        }
        let key = (Arc::from(domain), Arc::from(tag));
        totals.latency = registry
            .latency
            .get(&key)
            .map(|h| h.bucket_counts().to_vec())
            .unwrap_or_else(|| vec![0; vhost_metrics::LATENCY_BUCKETS.len() + 1]);
        totals
    }

    /// Metrics with facade handles registered with the global recorder installed now (a no-op
    /// recorder if none).
    pub fn new() -> Self {
        Self {
            registry: ArcSwap::default(),
            unknown_host: StatusCounts::default(),
            fixed: Fixed {
                local: LOCAL_REASONS.map(local_counter),
                client_errors: counter!("proxy_client_errors_total"),
            },
        }
    }

    /// Records one finished request.
    pub(crate) fn record(&self, done: &Finished<'_>) {
        if let Some(reason) = done.local {
            if let Some(i) = LOCAL_REASONS.iter().position(|r| *r == reason) {
                self.fixed.local[i].increment(1);
            }
        }
        let class = if done.grpc_error {
            GRPC_ERROR
        } else {
            class_index(done.status)
        };
        let (Some(table), Some(route)) = (done.table, done.route) else {
            self.unknown_host.increment(class);
            return;
        };
        let slot = table
            .attachment::<Slots>()
            .and_then(|slots| slots.routes.get(route.index()))
            .and_then(Option::as_ref);
        if let Some(slot) = slot {
            record_route(slot, done, class);
        }
    }

    /// Counts a request of `route` whose canary side had no available backend and went to the
    /// other side.
    pub(crate) fn canary_fallback(&self, table: &RoutingTable, route: &Route) {
        if let Some(c) = table
            .attachment::<Slots>()
            .and_then(|slots| slots.routes.get(route.index()))
            .and_then(Option::as_ref)
            .and_then(|slot| slot.fallbacks.as_ref())
        {
            c.add(1);
        }
    }

    /// Counts a request ended by its client.
    pub(crate) fn client_error(&self) {
        self.fixed.client_errors.increment(1);
    }

    /// Records a failed connection to `backend`.
    pub(crate) fn connect_failure(&self, table: &RoutingTable, backend: &BackendEntry) {
        if let Some(c) = table
            .attachment::<Slots>()
            .and_then(|slots| slots.connect_failures.get(backend.index()))
        {
            c.add(1);
        }
    }

    /// Appends the configuration-labelled series to a Prometheus text exposition.
    pub fn render(&self, out: &mut String) {
        let registry = self.registry.load();
        let mut e = Exposition::new(out);
        e.family(
            "proxy_requests_total",
            Kind::Counter,
            "Requests by domain, active tag, backend (_none: answered by the proxy) and status class (1xx-5xx, none: no response, grpc_error: non-zero grpc-status; domain _unknown: no configured domain matched)",
        );
        let unknown = (UNKNOWN_DOMAIN.into(), "".into(), NO_BACKEND.into());
        let all = std::iter::once((&unknown, &self.unknown_host))
            .chain(registry.requests.iter().map(|(k, v)| (k, &**v)));
        for ((domain, tag, backend), counts) in all {
            for (class, c) in CLASSES.iter().zip(&counts.0) {
                let n = c.get();
                if n > 0 {
                    e.sample(
                        "proxy_requests_total",
                        &[
                            ("domain", domain),
                            ("tag", tag),
                            ("backend", backend),
                            ("status", class),
                        ],
                        n,
                    );
                }
            }
        }
        e.family(
            "proxy_latency_seconds",
            Kind::Histogram,
            "Time from request start to the end of the response, by domain and tag",
        );
        for ((domain, tag), h) in &registry.latency {
            if h.count() > 0 {
                e.histogram(
                    "proxy_latency_seconds",
                    &[("domain", domain), ("tag", tag)],
                    h,
                );
            }
        }
        e.family(
            "proxy_retries_total",
            Kind::Counter,
            "Requests retried on another backend after a connection failure, by domain and tag",
        );
        for ((domain, tag), c) in &registry.retries {
            if c.get() > 0 {
                e.sample(
                    "proxy_retries_total",
                    &[("domain", domain), ("tag", tag)],
                    c.get(),
                );
            }
        }
        e.family(
            "canary_fallbacks_total",
            Kind::Counter,
            "Requests of a domain with a canary whose side (primary or canary tag) had no available backend and were served by the other side",
        );
        for (domain, c) in &registry.fallbacks {
            e.sample("canary_fallbacks_total", &[("domain", domain)], c.get());
        }
        e.family(
            "proxy_upstream_connect_failures_total",
            Kind::Counter,
            "Failed connection attempts to a backend",
        );
        for (backend, c) in &registry.connect_failures {
            if c.get() > 0 {
                e.sample(
                    "proxy_upstream_connect_failures_total",
                    &[("backend", backend)],
                    c.get(),
                );
            }
        }
    }
}

/// The handles of `route`'s `side`, created in `registry` if new.
fn side_slot(registry: &mut Registry, route: &Route, side: Side, domain: &Name) -> SideSlot {
    let tag: Name = Arc::from(route.tag_on(side).as_str());
    let key = (Arc::clone(domain), Arc::clone(&tag));
    let members = route
        .pool_on(side)
        .map(|pool| {
            pool.members()
                .iter()
                .map(|m| {
                    let backend = Arc::from(m.id().as_str());
                    entry(
                        &mut registry.requests,
                        (Arc::clone(domain), Arc::clone(&tag), backend),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    SideSlot {
        latency: entry(&mut registry.latency, key.clone()),
        retries: entry(&mut registry.retries, key),
        members,
    }
}

/// Records a request of `route` in its slot.
fn record_route(slot: &RouteSlot, done: &Finished<'_>, class: usize) {
    let side = match done.side {
        Side::Canary => slot.canary.as_ref().unwrap_or(&slot.primary),
        Side::Primary => &slot.primary,
    };
    side.latency.observe(done.seconds);
    if done.attempts > 1 {
        side.retries.add((done.attempts - 1) as u64);
    }
    match (done.member, done.backend) {
        (Some(i), Some(_)) if done.local.is_none_or(|r| !r.before_backend()) => {
            if let Some(c) = side.members.get(i) {
                c.increment(class);
            }
        }
        _ => slot.local.increment(class),
    }
}

/// What [`ProxyMetrics::record`] needs to know about a finished request.
pub(crate) struct Finished<'a> {
    pub(crate) table: Option<&'a RoutingTable>,
    pub(crate) route: Option<&'a Route>,
    pub(crate) backend: Option<&'a BackendEntry>,
    pub(crate) member: Option<usize>,
    pub(crate) side: Side,
    pub(crate) local: Option<LocalReason>,
    pub(crate) status: u16,
    pub(crate) attempts: usize,
    pub(crate) seconds: f64,
    /// A gRPC call that ended with a non-zero `grpc-status`.
    pub(crate) grpc_error: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost_routing::{
        Backend, BackendAddress, BackendId, BuildOptions, Command, DomainName, LiteralOnly,
        RouteWriter, State, Tag, VirtualHost,
    };

    fn state(domains: &[&str], backends: &[(&str, &str)]) -> State {
        State::new(
            domains
                .iter()
                .map(|d| VirtualHost::new(DomainName::parse(d).unwrap(), Tag::parse("a").unwrap()))
                .collect(),
            backends
                .iter()
                .enumerate()
                .map(|(i, (id, tag))| {
                    Backend::new(
                        BackendId::parse(id).unwrap(),
                        BackendAddress::parse(&format!("127.0.0.1:{}", 1000 + i)).unwrap(),
                        vec![Tag::parse(tag).unwrap()],
                    )
                })
                .collect(),
        )
        .unwrap()
    }

    fn ok_request(metrics: &ProxyMetrics, table: &RoutingTable, host: &str) {
        let route = table.lookup(host.as_bytes()).unwrap();
        let backend = route.select().unwrap();
        let member = route
            .pool()
            .unwrap()
            .members()
            .iter()
            .position(|m| m.id() == backend.id());
        metrics.record(&Finished {
            table: Some(table),
            route: Some(route),
            backend: Some(backend),
            member,
            side: Side::Primary,
            local: None,
            status: 200,
            attempts: 1,
            seconds: 0.002,
            grpc_error: false,
        });
    }

    fn rendered(metrics: &ProxyMetrics) -> String {
        let mut out = String::new();
        metrics.render(&mut out);
        out
    }

    #[test]
    fn requests_record_into_their_own_snapshot_and_deleted_series_leave() {
        let (store, mut writer) = RouteWriter::new(
            state(&["a.test", "b.test"], &[("one", "a")]),
            Box::new(LiteralOnly),
            BuildOptions::default(),
        );
        let metrics = Arc::new(ProxyMetrics::new());
        writer.attach(Arc::clone(&metrics) as Arc<dyn Attach>);
        let old = store.load_full();
        ok_request(&metrics, &old, "a.test");

        // A new snapshot (a backend added): the old one keeps its own side table, and both
        // count into the same series.
        let (next, _) = old
            .state()
            .apply(Command::AddBackend(Backend::new(
                BackendId::parse("two").unwrap(),
                BackendAddress::parse("127.0.0.1:2000").unwrap(),
                vec![Tag::parse("b").unwrap()],
            )))
            .unwrap();
        let new = writer.publish(next);
        ok_request(&metrics, &old, "a.test");
        ok_request(&metrics, &new, "a.test");
        ok_request(&metrics, &new, "b.test");
        let text = rendered(&metrics);
        let series = r#"proxy_requests_total{domain="a.test",tag="a",backend="one",status="2xx"}"#;
        assert!(text.contains(&format!("{series} 3\n")), "{text}");
        assert!(
            text.contains(r#"proxy_latency_seconds_count{domain="a.test",tag="a"} 3"#),
            "{text}"
        );
        assert!(text.contains(r#"domain="b.test""#), "{text}");

        // b.test deleted: its series leave; a request still finishing on the old snapshot
        // records into its own (now unlisted) handles and brings nothing back.
        let (next, _) = new
            .state()
            .apply(Command::DeleteDomain(DomainName::parse("b.test").unwrap()))
            .unwrap();
        writer.publish(next);
        ok_request(&metrics, &new, "b.test");
        let text = rendered(&metrics);
        assert!(!text.contains(r#"domain="b.test""#), "{text}");
        assert!(text.contains(&format!("{series} 3\n")), "{text}");
    }

    #[test]
    fn status_classes() {
        assert_eq!(CLASSES[class_index(200)], "2xx");
        assert_eq!(CLASSES[class_index(308)], "3xx");
        assert_eq!(CLASSES[class_index(421)], "4xx");
        assert_eq!(CLASSES[class_index(503)], "5xx");
        assert_eq!(CLASSES[class_index(101)], "1xx");
        assert_eq!(CLASSES[class_index(0)], "none");
        assert_eq!(CLASSES[class_index(999)], "none");
    }
}
