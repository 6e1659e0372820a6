//! Request metrics without locks or allocation on the request path.
//!
//! The `metrics` facade resolves a metric by building its key and looking it up in the recorder's
//! registry (which takes a lock); doing that per request would put a lock and allocations on the
//! hot path. Instead, handles are resolved once and kept in a side table per routing snapshot:
//! one slot per route (domain), created on its first request, holding the route's latency
//! histogram and, per pool member, its request counters by status class; one slot per backend
//! for connection failures. Reading a slot is an atomic load (`OnceLock`); the table of a new
//! snapshot replaces the old one on the first request that sees the new generation (or earlier,
//! when the writer calls [`ProxyMetrics::prepare`]).

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use metrics::{counter, histogram, Counter, Histogram};
use vhost_routing::{BackendEntry, Route, RoutingTable};

use crate::proxy::LocalReason;

/// Label value used for requests whose host matches no configured domain (never the raw Host).
pub const UNKNOWN_DOMAIN: &str = "_unknown";
/// Label value for "no backend" (requests answered by the proxy itself).
pub const NO_BACKEND: &str = "_none";

/// Status classes: index = first digit - 1; "none" when no response was sent (client gone).
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

fn class_index(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100) - 1,
        _ => 5,
    }
}

/// `proxy_requests_total` of one (domain, tag, backend), by status class, each registered on
/// first use (so classes never seen do not appear as zero series).
#[derive(Default)]
struct ClassCounters([OnceLock<Counter>; 6]);

impl ClassCounters {
    fn increment(&self, class: usize, domain: &str, tag: &str, backend: &str) {
        if let Some(slot) = self.0.get(class) {
            slot.get_or_init(|| {
                counter!(
                    "proxy_requests_total",
                    "domain" => domain.to_owned(),
                    "tag" => tag.to_owned(),
                    "backend" => backend.to_owned(),
                    "status" => CLASSES[class]
                )
            })
            .increment(1);
        }
    }
}

struct RouteSlot {
    latency: Histogram,
    retries: Counter,
    /// By pool member index.
    members: Box<[ClassCounters]>,
    /// Requests of this domain answered by the proxy itself.
    local: ClassCounters,
}

struct Slots {
    generation: u64,
    routes: Box<[OnceLock<RouteSlot>]>,
    /// By backend index.
    connect_failures: Box<[OnceLock<Counter>]>,
}

impl Slots {
    fn new(table: &RoutingTable) -> Self {
        Self {
            generation: table.generation(),
            routes: (0..table.route_count()).map(|_| OnceLock::new()).collect(),
            connect_failures: (0..table.backend_count())
                .map(|_| OnceLock::new())
                .collect(),
        }
    }
}

/// Registers the descriptions (Prometheus `# HELP`) of the proxy's metrics with the installed
/// recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "proxy_requests_total",
        "Requests by domain, active tag, backend (_none: answered by the proxy) and status class (domain _unknown: no configured domain matched)"
    );
    describe_histogram!(
        "proxy_latency_seconds",
        Unit::Seconds,
        "Time from request start to the end of the response, by domain and tag"
    );
    describe_counter!(
        "proxy_local_responses_total",
        "Responses the proxy gave itself, by reason: unknown_host (404), misdirected (421), no_backend (503), redirect (308), upstream_timeout (504), upstream_error (502), overloaded (503: out of descriptors or ports)"
    );
    describe_counter!(
        "proxy_client_errors_total",
        "Requests ended by their client: disconnects and resets in the middle of a request, malformed requests"
    );
    describe_counter!(
        "proxy_retries_total",
        "Requests retried on another backend after a connection failure, by domain and tag"
    );
    describe_counter!(
        "proxy_upstream_connect_failures_total",
        "Failed connection attempts to a backend"
    );
    describe_gauge!("proxy_requests_in_flight", "Requests being handled now");
}

/// Handles for the fixed-label series.
struct Fixed {
    unknown_host: ClassCounters,
    local: [Counter; LOCAL_REASONS.len()],
    client_errors: Counter,
}

const LOCAL_REASONS: [LocalReason; 7] = [
    LocalReason::Redirect,
    LocalReason::UnknownHost,
    LocalReason::Misdirected,
    LocalReason::NoBackend,
    LocalReason::UpstreamTimeout,
    LocalReason::UpstreamError,
    LocalReason::Overloaded,
];

/// The proxy's metric handles (see the module docs).
pub struct ProxyMetrics {
    slots: ArcSwap<Slots>,
    fixed: Fixed,
}

impl std::fmt::Debug for ProxyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyMetrics")
            .field("generation", &self.slots.load().generation)
            .finish_non_exhaustive()
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn local_counter(reason: LocalReason) -> Counter {
    counter!("proxy_local_responses_total", "reason" => reason.as_str())
}

impl ProxyMetrics {
    /// Handles registered with the global recorder installed now (a no-op recorder if none).
    pub fn new() -> Self {
        Self {
            slots: ArcSwap::from_pointee(Slots {
                generation: u64::MAX,
                routes: Box::new([]),
                connect_failures: Box::new([]),
            }),
            fixed: Fixed {
                unknown_host: ClassCounters::default(),
                local: LOCAL_REASONS.map(local_counter),
                client_errors: counter!("proxy_client_errors_total"),
            },
        }
    }

    /// Builds the side table of `table` now (off the request path).
    pub fn prepare(&self, table: &RoutingTable) {
        if self.slots.load().generation != table.generation() {
            self.slots.store(Arc::new(Slots::new(table)));
        }
    }

    /// Runs `f` on the side table of `table` (a guard load, no reference-count traffic).
    fn with_slots<R>(&self, table: &RoutingTable, f: impl FnOnce(&Slots) -> R) -> R {
        let current = self.slots.load();
        if current.generation == table.generation() {
            return f(&current);
        }
        // First request on a new snapshot that nobody prepared: build it once.
        let fresh = Arc::new(Slots::new(table));
        self.slots.store(Arc::clone(&fresh));
        f(&fresh)
    }

    /// Records one finished request.
    pub(crate) fn record(&self, done: &Finished<'_>) {
        if let Some(reason) = done.local {
            if let Some(i) = LOCAL_REASONS.iter().position(|r| *r == reason) {
                self.fixed.local[i].increment(1);
            }
        }
        let class = class_index(done.status);
        let (Some(table), Some(route)) = (done.table, done.route) else {
            self.fixed
                .unknown_host
                .increment(class, UNKNOWN_DOMAIN, "", NO_BACKEND);
            return;
        };
        self.with_slots(table, |slots| {
            if let Some(slot) = slots.routes.get(route.index()) {
                record_route(slot, route, done, class);
            }
        });
    }

    /// Counts a request ended by its client.
    pub(crate) fn client_error(&self) {
        self.fixed.client_errors.increment(1);
    }

    /// Records a failed connection to `backend`.
    pub(crate) fn connect_failure(&self, table: &RoutingTable, backend: &BackendEntry) {
        self.with_slots(table, |slots| {
            if let Some(slot) = slots.connect_failures.get(backend.index()) {
                slot.get_or_init(|| {
                    counter!("proxy_upstream_connect_failures_total", "backend" => backend.id().to_string())
                })
                .increment(1);
            }
        });
    }
}

/// Records a request of `route` in its slot (registering the handles on first use).
fn record_route(slot: &OnceLock<RouteSlot>, route: &Route, done: &Finished<'_>, class: usize) {
    let v = route.vhost();
    let (domain, tag) = (v.domain.as_str(), v.enabled_backends_tag.as_str());
    let slot = slot.get_or_init(|| RouteSlot {
        latency: histogram!("proxy_latency_seconds", "domain" => domain.to_owned(), "tag" => tag.to_owned()),
        retries: counter!("proxy_retries_total", "domain" => domain.to_owned(), "tag" => tag.to_owned()),
        members: (0..route.pool().map_or(0, |p| p.members().len()))
            .map(|_| ClassCounters::default())
            .collect(),
        local: ClassCounters::default(),
    });
    slot.latency.record(done.seconds);
    if done.attempts > 1 {
        slot.retries.increment((done.attempts - 1) as u64);
    }
    match (done.member, done.backend) {
        (Some(i), Some(b)) if done.local.is_none_or(|r| !r.before_backend()) => {
            if let Some(c) = slot.members.get(i) {
                c.increment(class, domain, tag, b.id().as_str());
            }
        }
        _ => slot.local.increment(class, domain, tag, NO_BACKEND),
    }
}

/// What [`ProxyMetrics::record`] needs to know about a finished request.
pub(crate) struct Finished<'a> {
    pub(crate) table: Option<&'a RoutingTable>,
    pub(crate) route: Option<&'a Route>,
    pub(crate) backend: Option<&'a BackendEntry>,
    pub(crate) member: Option<usize>,
    pub(crate) local: Option<LocalReason>,
    pub(crate) status: u16,
    pub(crate) attempts: usize,
    pub(crate) seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

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
