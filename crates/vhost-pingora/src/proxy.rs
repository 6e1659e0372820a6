//! The `ProxyHttp` implementation: listener → host/SNI → snapshot → tag → backend.
//!
//! Per request: one lock-free [`RouteStore::load_full`] in `request_filter`, a host lookup, the
//! redirect / 404 / 421 / 503 answers the proxy gives itself, and the first weighted pick of the
//! active tag's healthy backends. `upstream_peer` turns the pick into an `HttpPeer`; a failed
//! connection is retried (bounded) on another backend of the same tag, so one dead backend costs
//! the client nothing while a sibling is up. The same service serves the HTTP and the HTTPS
//! listener; the connection's TLS digest tells them apart.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora_core::protocols::Digest;
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};
use vhost_health::LogLimiter;
use vhost_routing::{
    any_contains, bucket_of, normalize_host, parse_bucket, Admission, BackendEntry,
    BackendProtocol, CanaryRoute, Cidr, CircuitBreaker, HeaderRules, Override, RateLimitKey, Route,
    RouteStore, RouteWriter, RoutingTable, Side, StickyKey, Transition, BUCKETS, MAX_DOMAIN_LEN,
};

use crate::acme::{AcmeChallenges, HTTP01_PREFIX};
use crate::certs::CertStore;
use crate::certs::ClientSni;
use crate::metrics::{Finished, ProxyMetrics};
use crate::policy::{
    client_behind, expand, format_ip, new_request_id, sane_request_id, Policies, PolicySlots,
    TemplateValues,
};

// Header names looked up on every request, parsed once (a `&str` key is parsed per lookup).
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Timeouts and limits of the data plane.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// TCP connect timeout to a backend.
    pub connect_timeout: Duration,
    /// Timeout of each read from a backend.
    pub read_timeout: Duration,
    /// Timeout of each write to a backend.
    pub write_timeout: Duration,
    /// How long idle upstream connections stay pooled.
    pub idle_timeout: Duration,
    /// Other backends tried after a connection failure.
    pub max_retries: usize,
    /// Port that HTTP→HTTPS redirects point to (443 is left out of the URL).
    pub https_port: u16,
    /// `Retry-After` seconds sent with 503 when no backend is available.
    pub retry_after_secs: u32,
    /// Consecutive connection failures that eject a backend until an active probe succeeds
    /// (0 disables passive ejection).
    pub passive_failure_threshold: u32,
    /// Emit one `access` log event per request.
    pub access_log: bool,
    /// Keep client connections open between requests (HTTP/1.1 keep-alive); `false` closes
    /// each connection after its response.
    pub client_keepalive: bool,
    /// Names used by canaries.
    pub canary: CanaryOptions,
    /// Pending ACME challenges to answer (`None`: ACME is off, and
    /// `/.well-known/acme-challenge/` requests are routed like any other).
    pub acme: Option<Arc<AcmeChallenges>>,
    /// Where the CA bundles of TLS backends (`tls_ca_path`) are loaded (`None`: such backends
    /// fail to connect).
    pub certs: Option<Arc<CertStore>>,
    /// Concurrent streams per HTTP/2 connection to an `h2`/`h2c` backend.
    pub upstream_h2_streams: usize,
    /// Longest silence on an upgraded (WebSocket) connection, both directions.
    pub websocket_idle_timeout: Duration,
    /// Serve HTTP/2 with prior knowledge (h2c, e.g. gRPC without TLS) on the plain-HTTP
    /// listener, beside HTTP/1.1.
    pub h2c: bool,
    /// Peers whose `X-Forwarded-For` is believed (for the client address of access lists, rate
    /// limits, logs and the forwarded headers). Empty: nobody's; the chain is appended to.
    pub trusted_proxies: Vec<Cidr>,
    /// Keep a client's sane `X-Request-Id` or make one, send it to the backend, return it.
    pub request_id: bool,
    /// Serve plain HTTP/1.1 requests to HTTP/1 backends on the fast path (see `fast.rs`).
    pub h1_fast_path: bool,
    /// How long an idle client connection keeps the backend connections its fast-path requests
    /// used, before they go back to the shared pool (zero: back after every request).
    pub upstream_hold: Duration,
    /// Accept a PROXY protocol v2 header at the start of connections from `trusted_proxies`.
    pub proxy_protocol: bool,
    /// Outlier detection (`None`: off).
    pub circuit_breaker: Option<CircuitBreaker>,
}

/// The fields a request gets on its way to the backend (see [`VhostProxy::forwarded`]), written
/// under lowercase names as Pingora writes fields inserted by name.
#[derive(Debug)]
pub(crate) struct Forwarded {
    /// Leave out the client's `X-Forwarded-For` fields (from a peer not trusted to send one).
    pub(crate) drop_client_chain: bool,
    /// `x-forwarded-for`, replacing the client's fields (`None`: no client address known).
    pub(crate) for_: Option<ForwardedFor>,
    /// `x-request-id`, replacing the client's fields (`None`: ids are off, or the client's own
    /// is kept).
    pub(crate) request_id: Option<HeaderValue>,
    /// `x-forwarded-proto`, replacing the client's fields.
    pub(crate) proto: HeaderValue,
    /// `x-forwarded-host`, replacing the client's fields; also the `Host` when the request has
    /// none (an HTTP/2 request's authority).
    pub(crate) host: Option<HeaderValue>,
}

/// An `X-Forwarded-For` value: the chain the client sent (if believed) and the address it came
/// from, kept apart so that a head writer can copy them without building a field value.
#[derive(Debug)]
pub(crate) struct ForwardedFor {
    /// The client's first `X-Forwarded-For` field, as `upstream_request_filter` always extended.
    prev: Option<HeaderValue>,
    /// The client address in text form (`ip[..len]`).
    ip: [u8; 48],
    len: usize,
}

impl ForwardedFor {
    /// The value's two parts: the chain so far (if any) and the address appended to it.
    pub(crate) fn parts(&self) -> (Option<&[u8]>, &[u8]) {
        (
            self.prev.as_ref().map(HeaderValue::as_bytes),
            &self.ip[..self.len],
        )
    }

    /// The value as one field value: `prev, ip` or `ip`.
    pub(crate) fn value(&self) -> Result<HeaderValue> {
        let value = match self.parts() {
            (Some(prev), ip) => {
                let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
                v.extend_from_slice(prev);
                v.extend_from_slice(b", ");
                v.extend_from_slice(ip);
                HeaderValue::from_bytes(&v)
            }
            (None, ip) => HeaderValue::from_bytes(ip),
        };
        value.map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "x-forwarded-for", e))
    }
}

/// Cookie and header names of canaries (see docs/canary.md).
#[derive(Debug, Clone)]
pub struct CanaryOptions {
    /// Cookie holding a client's bucket (`sticky_key = "cookie"`).
    pub bucket_cookie: String,
    /// Request header forcing a side (`always` / `never`); parsed once, not per request.
    pub override_header: http::HeaderName,
    /// Cookie forcing a side (`always` / `never`).
    pub override_cookie: String,
    /// Add `X-Served-Tag` to responses of domains with a canary.
    pub expose_served_tag: bool,
}

impl Default for CanaryOptions {
    fn default() -> Self {
        Self {
            bucket_cookie: "vhost_bucket".to_owned(),
            override_header: http::HeaderName::from_static("x-canary"),
            override_cookie: "canary".to_owned(),
            expose_served_tag: false,
        }
    }
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            read_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_retries: 2,
            https_port: 443,
            retry_after_secs: 5,
            passive_failure_threshold: 5,
            access_log: true,
            client_keepalive: true,
            canary: CanaryOptions::default(),
            acme: None,
            certs: None,
            upstream_h2_streams: 100,
            websocket_idle_timeout: Duration::from_secs(3600),
            h2c: true,
            trusted_proxies: Vec::new(),
            request_id: true,
            h1_fast_path: true,
            upstream_hold: Duration::from_secs(1),
            proxy_protocol: false,
            circuit_breaker: None,
        }
    }
}

/// Why the proxy answered a request itself instead of forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalReason {
    /// 308 to HTTPS.
    Redirect,
    /// 404: no configured domain matches the host.
    UnknownHost,
    /// 421: the host names another configured domain than the TLS SNI.
    Misdirected,
    /// 503: the active tag has no backend, or none is healthy.
    NoBackend,
    /// 504: the backend did not answer (or accept the request) in time.
    UpstreamTimeout,
    /// 502: the backend could not be reached, or failed in the middle of the exchange.
    UpstreamError,
    /// 503: this host ran out of a resource (file descriptors, ports) to reach the backend.
    Overloaded,
    /// An ACME HTTP-01 challenge answered (200) or an unknown token (404).
    AcmeChallenge,
    /// 403: the client's address is denied, or not allowed, by the domain's access lists.
    Forbidden,
    /// 429: over the domain's rate limit.
    RateLimited,
    /// 503: every backend that could serve is at its `max_concurrent_requests`.
    Saturated,
}

impl LocalReason {
    /// A stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redirect => "redirect",
            Self::UnknownHost => "unknown_host",
            Self::Misdirected => "misdirected",
            Self::NoBackend => "no_backend",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamError => "upstream_error",
            Self::Overloaded => "overloaded",
            Self::AcmeChallenge => "acme_challenge",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
            Self::Saturated => "saturated",
        }
    }

    /// Whether the proxy answered before choosing a backend (the request never reached one).
    pub fn before_backend(self) -> bool {
        matches!(
            self,
            Self::Redirect
                | Self::UnknownHost
                | Self::Misdirected
                | Self::NoBackend
                | Self::AcmeChallenge
                | Self::Forbidden
                | Self::RateLimited
                | Self::Saturated
        )
    }
}

/// Number of requests being handled, for draining on shutdown.
#[derive(Debug, Default)]
pub struct Inflight {
    active: AtomicUsize,
    cut: AtomicUsize,
}

impl Inflight {
    /// Requests in progress now.
    pub fn get(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Requests dropped before they finished (cut when the runtime stopped at the end of the
    /// shutdown grace period).
    pub fn cut(&self) -> usize {
        self.cut.load(Ordering::Acquire)
    }
}

/// Counts one request while alive.
#[derive(Debug)]
struct InflightGuard(Arc<Inflight>);

impl InflightGuard {
    fn new(counter: &Arc<Inflight>) -> Self {
        counter.active.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(counter))
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per-request state.
#[derive(Debug, Default)]
pub struct RequestCtx {
    _inflight: Option<InflightGuard>,
    /// The snapshot this request uses from start to end.
    table: Option<Arc<RoutingTable>>,
    /// The matched route's index in `table` (borrowed from the table, not cloned: a clone would
    /// write the route's shared reference counts on every request).
    route: Option<usize>,
    /// The position in its side's pool of the backend currently tried (see
    /// [`RequestCtx::backend`]).
    member: Option<usize>,
    /// The side of the route's canary that serves (primary without a canary).
    side: Side,
    /// A bucket cookie to set on the response (a client without a valid one).
    issue_bucket: Option<u16>,
    /// When the request started.
    start: Option<Instant>,
    /// Backends whose connection failed during this request.
    failed: Vec<SocketAddr>,
    /// Connection attempts so far.
    attempts: usize,
    /// Set when the proxy answered itself.
    local: Option<LocalReason>,
    /// Downstream is TLS.
    tls: bool,
    /// The client's address (behind trusted proxies: the client they name).
    client: Option<IpAddr>,
    /// The address this hop appends to `X-Forwarded-For`: the peer, or the client a PROXY
    /// protocol header announced.
    peer: Option<IpAddr>,
    /// The client's own `X-Request-Id` is kept: the upstream request already carries it.
    request_id_given: bool,
    /// The request line, kept to write the access-log line of a request cut short (see `Drop`).
    request_line: Option<RequestLine>,
    /// Whether to write access-log lines.
    access_log: bool,
    /// `logging` ran (the request finished and was logged).
    logged: bool,
    /// The response switched protocols (101): counted in the upgraded-connections gauge.
    upgraded: bool,
    /// A gRPC call answered with a non-zero `grpc-status`.
    grpc_error: bool,
    /// This request's id (`X-Request-Id`), when request ids are on.
    request_id: Option<HeaderValue>,
    /// The request is the half-open trial of its backend's circuit breaker.
    trial: bool,
    /// Counts this request in its backend's in-flight requests (limits and breaker on).
    slot: Option<InFlight>,
    /// The status of an answer the HTTP/1.1 fast path wrote to the client itself (not through
    /// Pingora's session, whose `response_written` then knows nothing of it).
    answered: Option<u16>,
    /// Body bytes of that answer written so far.
    answered_bytes: usize,
}

/// One request in flight to a backend; leaves the count when dropped.
#[derive(Debug)]
struct InFlight(Arc<BackendEntry>);

impl InFlight {
    fn enter(backend: &Arc<BackendEntry>) -> Self {
        backend.health().enter();
        Self(Arc::clone(backend))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.health().leave();
    }
}

/// A backend choice: (side, member index, backend), whether it is a breaker trial, and
/// whether some backend was skipped for its concurrency limit.
struct Pick<'r> {
    chosen: Option<(Side, usize, &'r Arc<BackendEntry>)>,
    trial: bool,
    saturated: bool,
}

/// What a request asked for, kept cheaply for the access log of a request that never finishes.
#[derive(Debug)]
enum RequestLine {
    /// The HTTP/1 request head as received (shares the session's buffer).
    Raw(Bytes),
    /// Method and target of an HTTP/2 request.
    Parts(http::Method, Option<http::uri::PathAndQuery>),
}

impl RequestLine {
    fn capture(session: &Session) -> Self {
        match session.as_http1() {
            Some(h1) => Self::Raw(h1.get_headers_raw_bytes()),
            None => {
                let req = session.req_header();
                Self::Parts(req.method.clone(), req.uri.path_and_query().cloned())
            }
        }
    }

    /// `(method, target)`.
    fn parts(&self) -> (String, String) {
        match self {
            Self::Raw(head) => {
                let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
                let line = String::from_utf8_lossy(line);
                let mut words = line.split_ascii_whitespace();
                (
                    words.next().unwrap_or("").to_owned(),
                    words.next().unwrap_or("").to_owned(),
                )
            }
            Self::Parts(method, path) => (
                method.as_str().to_owned(),
                path.as_ref().map_or("/", |p| p.as_str()).to_owned(),
            ),
        }
    }
}

/// Requests dropped before they finished (the runtime shut down at the grace deadline): they
/// still get an access-log line, with status 0 and `local = "cut"`.
impl Drop for RequestCtx {
    fn drop(&mut self) {
        if self.trial {
            // A trial without an outcome: the next request tries again.
            if let Some(backend) = self.backend() {
                backend.health().abandon_trial();
            }
        }
        if self.logged || self.start.is_none() {
            return;
        }
        if let Some(guard) = &self._inflight {
            guard.0.cut.fetch_add(1, Ordering::AcqRel);
        }
        if !self.access_log {
            return;
        }
        let (method, path) = self
            .request_line
            .as_ref()
            .map(RequestLine::parts)
            .unwrap_or_default();
        access_log(&AccessLine {
            domain: domain_label(self.route()),
            tag: tag_label(self.route(), self.side),
            backend: backend_label(self.backend().map(|b| &**b), self.local),
            method: &method,
            path: &path,
            status: 0,
            bytes: 0,
            elapsed: self.start.map_or(Duration::ZERO, |s| s.elapsed()),
            client: self.client,
            local: "cut",
            request_id: self.request_id.as_ref(),
        });
    }
}

/// One line of the access log (target `access`).
struct AccessLine<'a> {
    domain: &'a str,
    tag: &'a str,
    backend: &'a str,
    method: &'a str,
    path: &'a str,
    status: u16,
    bytes: usize,
    elapsed: Duration,
    client: Option<IpAddr>,
    local: &'a str,
    request_id: Option<&'a HeaderValue>,
}

fn access_log(line: &AccessLine<'_>) {
    tracing::info!(
        target: "access",
        domain = line.domain,
        tag = line.tag,
        backend = line.backend,
        method = line.method,
        path = line.path,
        status = line.status,
        bytes = line.bytes,
        duration_ms = line.elapsed.as_secs_f64() * 1000.0,
        client = %line.client.map_or_else(String::new, |c| c.to_string()),
        local = line.local,
        request_id = line.request_id.and_then(|v| v.to_str().ok()).unwrap_or(""),
    );
}

fn domain_label(route: Option<&Route>) -> &str {
    route.map_or(crate::metrics::UNKNOWN_DOMAIN, |r| {
        r.vhost().domain.as_str()
    })
}

fn tag_label(route: Option<&Route>, side: Side) -> &str {
    route.map_or("", |r| r.tag_on(side).as_str())
}

fn backend_label(backend: Option<&BackendEntry>, local: Option<LocalReason>) -> &str {
    match (backend, local) {
        (Some(b), None) => b.id().as_str(),
        (Some(b), Some(reason)) if !reason.before_backend() => b.id().as_str(),
        _ => crate::metrics::NO_BACKEND,
    }
}

impl RequestCtx {
    /// The fast path wrote the head of an answer with `status` to the client itself.
    pub(crate) fn set_answered(&mut self, status: u16) {
        self.answered = Some(status);
    }

    /// Whether the fast path already wrote an answer's head to the client.
    pub(crate) fn answered(&self) -> bool {
        self.answered.is_some()
    }

    /// Counts `n` body bytes of the fast path's answer.
    pub(crate) fn add_answered_bytes(&mut self, n: usize) {
        self.answered_bytes += n;
    }

    /// The matched route, if any.
    pub fn route(&self) -> Option<&Route> {
        self.table.as_ref()?.route(self.route?)
    }

    /// The backend the request went to (the last one tried).
    pub fn backend(&self) -> Option<&Arc<BackendEntry>> {
        self.route()?
            .pool_on(self.side)?
            .members()
            .get(self.member?)
    }

    /// Why the proxy answered itself, if it did.
    pub fn local_reason(&self) -> Option<LocalReason> {
        self.local
    }

    /// Connection attempts made (1 + retries).
    pub fn attempts(&self) -> usize {
        self.attempts
    }

    /// The snapshot used.
    pub fn table(&self) -> Option<&Arc<RoutingTable>> {
        self.table.as_ref()
    }
}

/// Limits on the log lines failed requests produce.
#[derive(Debug)]
struct LogLimits {
    /// Requests ended by their client: a summary once a minute.
    client: LogLimiter,
    /// Other failures: one warning per second.
    proxy: LogLimiter,
}

/// The virtual-host reverse proxy over a [`RouteStore`].
#[derive(Debug, Clone)]
pub struct VhostProxy {
    store: Arc<RouteStore>,
    options: Arc<ProxyOptions>,
    inflight: Arc<Inflight>,
    metrics: Arc<ProxyMetrics>,
    log_limits: Arc<LogLimits>,
    /// `proxy_upgraded_connections`: connections switched to another protocol (WebSocket).
    upgraded: metrics::Gauge,
}

impl VhostProxy {
    /// A proxy routing with the snapshots `writer` publishes. Its metrics are attached to the
    /// writer (every snapshot gets their side table before it is published; see
    /// [`crate::metrics`]); the current snapshot is republished with it.
    pub fn new(writer: &mut RouteWriter, options: ProxyOptions) -> Self {
        let metrics = Arc::new(ProxyMetrics::new());
        writer.attach(Arc::clone(&metrics) as Arc<dyn vhost_routing::Attach>);
        writer.attach(Arc::new(Policies::default()) as Arc<dyn vhost_routing::Attach>);
        Self {
            store: Arc::clone(writer.store()),
            options: Arc::new(options),
            inflight: Arc::default(),
            metrics,
            log_limits: Arc::new(LogLimits {
                client: LogLimiter::new(Duration::from_secs(60)),
                proxy: LogLimiter::new(Duration::from_secs(1)),
            }),
            upgraded: metrics::gauge!("proxy_upgraded_connections"),
        }
    }

    /// Milliseconds on the circuit breakers' clock.
    fn now_ms(&self) -> u64 {
        vhost_routing::monotonic_ms()
    }

    /// The next backend of `route` for `wanted` that `accept` takes and that its breaker and
    /// concurrency limit admit.
    fn pick<'r>(
        &self,
        route: &'r Route,
        wanted: Side,
        mut accept: impl FnMut(&BackendEntry) -> bool,
    ) -> Pick<'r> {
        let breaker = self.options.circuit_breaker.is_some();
        let now = if breaker { self.now_ms() } else { 0 };
        let (mut trial, mut saturated) = (false, false);
        let chosen = route.select_on(wanted, |b| {
            if !accept(b) {
                return false;
            }
            let max = b.backend().max_concurrent_requests;
            if !breaker && max.is_none() {
                return true;
            }
            match b.health().admit(now, max) {
                Admission::Yes { trial: t } => {
                    trial = t;
                    true
                }
                Admission::Ejected => false,
                Admission::Saturated => {
                    saturated = true;
                    false
                }
            }
        });
        Pick {
            chosen,
            trial,
            saturated,
        }
    }

    /// Counts a request in `backend`'s in-flight requests when a concurrency limit or the
    /// breaker needs the count.
    fn in_flight_slot(&self, backend: &Arc<BackendEntry>) -> Option<InFlight> {
        let counted = self.options.circuit_breaker.is_some()
            || backend.backend().max_concurrent_requests.is_some();
        counted.then(|| InFlight::enter(backend))
    }

    /// Records a request's outcome in its backend's circuit breaker.
    fn record_outcome(&self, ctx: &RequestCtx, backend: &BackendEntry, failed: bool) {
        let Some(settings) = &self.options.circuit_breaker else {
            return;
        };
        let settings = settings.with(backend.backend().circuit_breaker.as_ref());
        let may_eject = || {
            let Some(pool) = ctx.route().and_then(|r| r.pool_on(ctx.side)) else {
                return false;
            };
            let members = pool.members();
            let ejected = members.iter().filter(|m| m.health().is_ejected()).count();
            let allowed = members.len() * usize::from(settings.max_ejection_percent) / 100;
            ejected < allowed
        };
        let now = self.now_ms();
        match backend
            .health()
            .record(now, failed, ctx.trial, &settings, may_eject)
        {
            Transition::Ejected => tracing::warn!(
                backend = backend.id().as_str(),
                open_secs = settings.open_secs,
                "backend ejected by the circuit breaker"
            ),
            Transition::Restored => tracing::info!(
                backend = backend.id().as_str(),
                "backend restored by the circuit breaker (trial request succeeded)"
            ),
            Transition::None => {}
        }
    }

    /// Whether the HTTP/1 fast path is on and no backend of the current snapshot speaks HTTP/2
    /// (see [`crate::fast`]).
    pub(crate) fn http1_only(&self) -> bool {
        self.options.h1_fast_path && self.store.load().http1_only()
    }

    /// The proxy's metrics (render them with [`ProxyMetrics::render`]).
    pub fn metrics(&self) -> Arc<ProxyMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The peers whose PROXY protocol headers are read, when that is on.
    pub fn proxy_protocol_peers(&self) -> Option<Vec<Cidr>> {
        self.options
            .proxy_protocol
            .then(|| self.options.trusted_proxies.clone())
    }

    /// Whether h2c (prior knowledge) is served on the plain-HTTP listener.
    pub fn h2c(&self) -> bool {
        self.options.h2c
    }

    /// How long an idle client connection keeps its backend connections on the HTTP/1.1 fast
    /// path: `upstream_hold`, at most the upstream idle timeout.
    pub fn upstream_hold(&self) -> Duration {
        self.options.upstream_hold.min(self.options.idle_timeout)
    }

    /// The ACME challenges this proxy answers, if ACME is on.
    pub fn acme_challenges(&self) -> Option<Arc<AcmeChallenges>> {
        self.options.acme.clone()
    }

    /// The counter of requests in progress (shared by every clone of this proxy).
    pub fn inflight(&self) -> Arc<Inflight> {
        Arc::clone(&self.inflight)
    }

    /// The side of `canary` this request is on: an override (header, then cookie) wins, else
    /// the bucket of its sticky key; a request without a key draws a random bucket, and with
    /// `sticky_key = "cookie"` gets it as a cookie on the response.
    fn canary_side(&self, session: &Session, canary: &CanaryRoute, ctx: &mut RequestCtx) -> Side {
        let names = &self.options.canary;
        let headers = &session.req_header().headers;
        let forced = headers
            .get(&names.override_header)
            .and_then(|v| Override::parse(v.as_bytes()))
            .or_else(|| cookie_value(headers, &names.override_cookie).and_then(Override::parse));
        let keyed = match &canary.canary().sticky_key {
            StickyKey::Cookie => cookie_value(headers, &names.bucket_cookie).and_then(parse_bucket),
            StickyKey::Header(name) => headers
                .get(&**name)
                .map(|v| bucket_of(canary.seed(), v.as_bytes())),
            StickyKey::ClientIp => ctx.client.map(|ip| match ip {
                IpAddr::V4(v4) => bucket_of(canary.seed(), &v4.octets()),
                IpAddr::V6(v6) => bucket_of(canary.seed(), &v6.octets()),
            }),
            StickyKey::None => None,
        };
        let bucket = keyed.unwrap_or_else(|| {
            let drawn = fastrand::u16(0..BUCKETS);
            if canary.canary().sticky_key == StickyKey::Cookie {
                ctx.issue_bucket = Some(drawn);
            }
            drawn
        });
        canary.side_for(bucket, forced)
    }

    /// The peer of `backend` for `session`: its protocol and TLS settings, the proxy's
    /// timeouts, stretched for upgraded connections and to a gRPC call's own deadline.
    fn peer_for(&self, session: &Session, backend: &BackendEntry) -> Result<Box<HttpPeer>> {
        let addr = backend.socket_addr().ok_or_else(|| {
            Error::explain(ErrorType::ConnectNoRoute, "backend address did not resolve")
        })?;
        let b = backend.backend();
        let tls = b.protocol.tls();
        let mut peer = HttpPeer::new(addr, tls, if tls { b.sni() } else { String::new() });
        // Pingora pools by address and SNI only: keep backends with other protocols or trust
        // settings on connections of their own.
        peer.group_key = backend.connection_key();
        let o = &mut peer.options;
        o.connection_timeout = Some(self.options.connect_timeout);
        o.read_timeout = Some(self.options.read_timeout);
        o.write_timeout = Some(self.options.write_timeout);
        o.idle_timeout = Some(self.options.idle_timeout);
        match b.protocol {
            BackendProtocol::Http | BackendProtocol::Https => {}
            // Prior knowledge: HTTP/2 only, no upgrade dance.
            BackendProtocol::H2c => o.set_http_version(2, 2),
            // ALPN h2 only: a backend that cannot speak HTTP/2 fails instead of silently
            // downgrading (gRPC needs HTTP/2).
            BackendProtocol::H2 => o.alpn = ALPN::H2,
        }
        if b.protocol.h2() {
            o.max_h2_streams = self.options.upstream_h2_streams;
        }
        if tls {
            o.verify_cert = b.tls_verify;
            o.verify_hostname = b.tls_verify;
            if let Some(path) = &b.tls_ca_path {
                let ca = self
                    .options
                    .certs
                    .as_ref()
                    .and_then(|c| c.current().upstream_ca(path).cloned())
                    .ok_or_else(|| {
                        Error::explain(ErrorType::ConnectError, "backend CA bundle not loaded")
                    })?;
                o.ca = Some(ca);
            }
        }
        if session.is_upgrade_req() {
            o.read_timeout = Some(self.options.websocket_idle_timeout);
            o.write_timeout = Some(self.options.websocket_idle_timeout);
        } else if let Some(deadline) = session
            .is_http2()
            .then(|| grpc_timeout(session.req_header()))
            .flatten()
        {
            // Never cut a call before its own deadline (the backend ends it then).
            let bound = deadline + Duration::from_secs(1);
            o.read_timeout = o.read_timeout.map(|t| t.max(bound));
        }
        Ok(Box::new(peer))
    }
}

/// Applies header rules to a Pingora request or response head: remove, then set, then add.
macro_rules! apply_rules {
    ($head:expr, $rules:expr, $values:expr) => {{
        let rules: &HeaderRules = $rules;
        for name in &rules.remove {
            $head.remove_header(name.as_str());
        }
        for (name, template) in &rules.set {
            if let Some(value) = expand(template, $values) {
                $head.insert_header(name.clone(), value)?;
            }
        }
        for (name, template) in &rules.add {
            if let Some(value) = expand(template, $values) {
                $head.append_header(name.clone(), value)?;
            }
        }
    }};
}

/// What header-rule placeholders stand for in this request.
fn template_values(ctx: &RequestCtx) -> TemplateValues<'_> {
    TemplateValues {
        client_ip: ctx.client,
        request_id: ctx.request_id.as_ref(),
        domain: domain_label(ctx.route()),
        tag: tag_label(ctx.route(), ctx.side),
        backend: ctx.backend().map_or("", |b| b.id().as_str()),
    }
}

/// A `grpc-status` other than `0` in `headers` (trailers, or the head of a trailers-only
/// answer).
fn grpc_failed(headers: &http::HeaderMap) -> bool {
    headers
        .get(GRPC_STATUS)
        .is_some_and(|v| v.as_bytes() != b"0")
}

/// The deadline a gRPC client set (`grpc-timeout: <digits><unit>`, units H M S m u n).
fn grpc_timeout(req: &pingora_http::RequestHeader) -> Option<Duration> {
    let v = req.headers.get(GRPC_TIMEOUT)?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n.saturating_mul(3600)),
        b"M" => Duration::from_secs(n.saturating_mul(60)),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The value of cookie `name` in the request's `Cookie` headers (the first one set).
fn cookie_value<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let rest = pair.strip_prefix(name.as_bytes())?;
            rest.strip_prefix(b"=")
        })
}

/// The request's host: `:authority` / absolute-form URI first, then the `Host` header.
fn request_host(session: &Session) -> Option<&[u8]> {
    let req = session.req_header();
    req.uri
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| req.headers.get(header::HOST).map(HeaderValue::as_bytes))
}

fn client_sni(digest: Option<&Digest>) -> Option<&str> {
    let ssl = digest?.ssl_digest.as_ref()?;
    ssl.extension.get::<ClientSni>().map(|s| s.0.as_ref())
}

async fn respond(
    session: &mut Session,
    status: u16,
    extra: &[(header::HeaderName, &str)],
    body: &'static str,
) -> Result<()> {
    respond_bytes(session, status, extra, Bytes::from_static(body.as_bytes())).await
}

async fn respond_bytes(
    session: &mut Session,
    status: u16,
    extra: &[(header::HeaderName, &str)],
    body: Bytes,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len())?;
    for (name, value) in extra {
        resp.insert_header(name.clone(), *value)?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(resp), head_only || body.is_empty())
        .await?;
    if !head_only && !body.is_empty() {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

#[async_trait]
impl ProxyHttp for VhostProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        let mut ctx = RequestCtx::default();
        ctx._inflight = Some(InflightGuard::new(&self.inflight));
        ctx.start = Some(Instant::now());
        ctx.access_log = self.options.access_log;
        ctx
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        VhostProxy::request_filter(self, session, ctx).await
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        VhostProxy::upstream_peer(self, session, ctx).await
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut pingora_http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        VhostProxy::upstream_request_filter(self, session, upstream, ctx).await
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        VhostProxy::response_filter(self, session, upstream_response, ctx).await
    }

    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        upstream_trailers: &mut http::HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if grpc_failed(upstream_trailers) {
            ctx.grpc_error = true;
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if is_local_failure(&e) {
            // This host is out of descriptors or ports: nothing the backend did, and another
            // backend would fail the same way. Not counted, not retried: 503.
            ctx.local = Some(LocalReason::Overloaded);
            return Error::because(
                ErrorType::HTTPStatus(503),
                "cannot connect to the backend: this host is out of resources",
                e,
            );
        }
        if let Some(addr) = peer.address().as_inet() {
            ctx.failed.push(*addr);
        }
        if let Some(backend) = ctx.backend() {
            self.record_outcome(ctx, backend, true);
        }
        ctx.trial = false;
        if let (Some(backend), Some(table)) = (ctx.backend(), &ctx.table) {
            self.metrics.connect_failure(table, backend);
            let threshold = self.options.passive_failure_threshold;
            if backend.health().record_connect_failure(threshold) {
                tracing::warn!(
                    backend = backend.id().as_str(),
                    from = "up",
                    to = "down",
                    reason = %format!("{threshold} consecutive connection failures"),
                    "backend ejected (passive health check)"
                );
            }
        }
        if ctx.attempts <= self.options.max_retries {
            e.set_retry(true);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        VhostProxy::fail_to_proxy(self, session, e, ctx).await
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _e: &Error) -> bool {
        // `logging` reports every failed request itself, at a level that fits its cause.
        true
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        _e: &Error,
        _context: ProxyWarnLogContext,
    ) -> bool {
        // Retries are counted in metrics; a dead backend is logged once when it is ejected.
        true
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        _digest: Option<&Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.backend_connected(ctx);
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        VhostProxy::logging(self, session, e, ctx).await
    }
}

/// The filters' bodies, called by the `ProxyHttp` implementation above (Pingora's path, one boxed
/// future each: `async_trait`) and directly by the HTTP/1.1 fast path (`fast.rs`), whose
/// future holds them inline: no allocation and copy per filter and request. (Inherent methods
/// take precedence over the trait's methods of the same name.)
impl VhostProxy {
    /// Routes the request (host → route → side → backend) or answers it locally (unknown
    /// host, ACME challenge, access list, rate limit, redirect, misdirected, no backend);
    /// `Ok(true)`: answered.
    pub(crate) async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        if !session.is_http2() {
            crate::conn::head_parsed(session.stream());
            if !self.options.client_keepalive {
                session.set_keepalive(None);
            }
        }
        ctx.peer = crate::conn::proxied_client(session.stream()).or_else(|| {
            session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(SocketAddr::ip)
        });
        ctx.client = ctx.peer;
        if !self.options.trusted_proxies.is_empty() {
            if let Some(peer) = ctx.peer {
                let chain = session.req_header().headers.get(X_FORWARDED_FOR);
                ctx.client = Some(client_behind(peer, chain, &self.options.trusted_proxies));
            }
        }
        if self.options.request_id {
            let mut given = session.req_header().headers.get_all(X_REQUEST_ID).iter();
            let kept = match (given.next(), given.next()) {
                (Some(id), None) if sane_request_id(id) => Some(id.clone()),
                _ => None,
            };
            ctx.request_id_given = kept.is_some();
            ctx.request_id = Some(kept.unwrap_or_else(new_request_id));
        }
        if self.options.access_log {
            ctx.request_line = Some(RequestLine::capture(session));
        }
        let table = self.store.load_full();
        ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let route = request_host(session).and_then(|h| table.lookup(h));
        if let Some(challenges) = &self.options.acme {
            if let Some(token) = session.req_header().uri.path().strip_prefix(HTTP01_PREFIX) {
                let answer = challenges.http01(token);
                ctx.route = route.map(Route::index);
                ctx.table = Some(table);
                ctx.local = Some(LocalReason::AcmeChallenge);
                match answer {
                    Some(key_authorization) => {
                        let body = Bytes::copy_from_slice(key_authorization.as_bytes());
                        respond_bytes(session, 200, &[], body).await?;
                    }
                    None => respond(session, 404, &[], "unknown ACME challenge token\n").await?,
                }
                return Ok(true);
            }
        }
        let Some(route) = route else {
            ctx.table = Some(table);
            ctx.local = Some(LocalReason::UnknownHost);
            respond(session, 404, &[], "unknown host\n").await?;
            return Ok(true);
        };
        let vhost = route.vhost();
        if !vhost.deny.is_empty() || !vhost.allow.is_empty() {
            let refused = match ctx.client {
                Some(ip) => {
                    any_contains(&vhost.deny, ip)
                        || (!vhost.allow.is_empty() && !any_contains(&vhost.allow, ip))
                }
                None => !vhost.allow.is_empty(),
            };
            if refused {
                ctx.route = Some(route.index());
                ctx.table = Some(table);
                ctx.local = Some(LocalReason::Forbidden);
                respond(session, 403, &[], "forbidden\n").await?;
                return Ok(true);
            }
        }
        if let Some(limit) = &vhost.rate_limit {
            let limiter = table
                .attachment::<PolicySlots>()
                .and_then(|p| p.limiter(route.index()));
            if let Some(limiter) = limiter {
                let mut ip_buf = [0u8; 16];
                let key: &[u8] = match &limit.key {
                    RateLimitKey::ClientIp => match ctx.client.map(|ip| ip.to_canonical()) {
                        Some(IpAddr::V4(v4)) => {
                            ip_buf[..4].copy_from_slice(&v4.octets());
                            &ip_buf[..4]
                        }
                        Some(IpAddr::V6(v6)) => {
                            ip_buf = v6.octets();
                            &ip_buf
                        }
                        None => b"",
                    },
                    RateLimitKey::Domain => b"",
                    RateLimitKey::Header(name) => session
                        .req_header()
                        .headers
                        .get(&**name)
                        .map_or(b"".as_slice(), HeaderValue::as_bytes),
                };
                if let Err(limited) = limiter.check(key) {
                    metrics::counter!("proxy_rate_limited_total", "domain" => vhost.domain.to_string())
                        .increment(1);
                    let retry = limited.retry_after_secs.to_string();
                    let state = format!("\"default\";r=0;t={retry}");
                    let policy = limiter.policy_header();
                    ctx.route = Some(route.index());
                    ctx.table = Some(table);
                    ctx.local = Some(LocalReason::RateLimited);
                    respond(
                        session,
                        429,
                        &[
                            (header::RETRY_AFTER, &retry),
                            (HeaderName::from_static("ratelimit-policy"), &policy),
                            (HeaderName::from_static("ratelimit"), &state),
                        ],
                        "too many requests\n",
                    )
                    .await?;
                    return Ok(true);
                }
            }
        }

        if ctx.tls {
            if let Some(sni) = client_sni(session.digest()) {
                let sni_route = table.lookup(sni.as_bytes());
                if sni_route.is_some_and(|r| r.vhost().domain != route.vhost().domain) {
                    ctx.route = Some(route.index());
                    ctx.table = Some(table);
                    ctx.local = Some(LocalReason::Misdirected);
                    respond(
                        session,
                        421,
                        &[],
                        "misdirected request: the Host does not match the TLS server name\n",
                    )
                    .await?;
                    return Ok(true);
                }
            }
        } else if route.vhost().http_to_https
            && (self.options.acme.is_some()
                || !session.req_header().uri.path().starts_with(HTTP01_PREFIX))
        {
            let location = redirect_location(session, self.options.https_port);
            ctx.route = Some(route.index());
            ctx.table = Some(table);
            ctx.local = Some(LocalReason::Redirect);
            match location {
                Some(location) => {
                    respond(session, 308, &[(header::LOCATION, &location)], "").await?;
                }
                None => respond(session, 400, &[], "bad host\n").await?,
            }
            return Ok(true);
        }

        let wanted = match route.canary() {
            Some(canary) => self.canary_side(session, canary, ctx),
            None => Side::Primary,
        };
        let pick = self.pick(route, wanted, |_| true);
        let picked = pick
            .chosen
            .map(|(side, member, backend)| (side, member, self.in_flight_slot(backend)));
        let saturated = pick.saturated;
        ctx.trial = pick.trial;
        if picked.as_ref().is_some_and(|(side, ..)| *side != wanted) {
            self.metrics.canary_fallback(&table, route);
        }
        ctx.route = Some(route.index());
        ctx.table = Some(table);
        match picked {
            Some((side, member, slot)) => {
                ctx.slot = slot;
                ctx.side = side;
                ctx.member = Some(member);
                Ok(false)
            }
            None if saturated => {
                ctx.local = Some(LocalReason::Saturated);
                respond(
                    session,
                    503,
                    &[(header::RETRY_AFTER, "1")],
                    "backend concurrency limit reached\n",
                )
                .await?;
                Ok(true)
            }
            None => {
                ctx.local = Some(LocalReason::NoBackend);
                let retry_after = self.options.retry_after_secs.to_string();
                respond(
                    session,
                    503,
                    &[(header::RETRY_AFTER, &retry_after)],
                    "no healthy backend for this domain\n",
                )
                .await?;
                Ok(true)
            }
        }
    }

    /// The backend chosen in `request_filter` (another one of the tag after a failed connect)
    /// as a Pingora peer.
    pub(crate) async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        ctx.attempts += 1;
        if ctx.attempts > 1 {
            let failed = &ctx.failed;
            // A retry after a connection failure: another available backend of the same side,
            // else of the other side of a canary.
            let pick = ctx.route().map(|r| {
                self.pick(r, ctx.side, |b| {
                    b.socket_addr().is_some_and(|a| !failed.contains(&a))
                })
            });
            let chosen = pick.and_then(|p| {
                p.chosen
                    .map(|(side, member, b)| (side, member, self.in_flight_slot(b), p.trial))
            });
            match chosen {
                Some((side, member, slot, trial)) => {
                    ctx.slot = None;
                    ctx.slot = slot;
                    ctx.trial = trial;
                    ctx.side = side;
                    ctx.member = Some(member);
                }
                None => {
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(502),
                        "every backend of the tag failed to connect",
                    ))
                }
            }
        }
        let backend = ctx
            .backend()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no backend selected"))?;
        self.peer_for(session, backend)
    }

    /// Applies [`Self::forwarded`] and the domain's request header rules to the head sent to
    /// the backend.
    pub(crate) async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut pingora_http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let fwd = self.forwarded(session, ctx);
        if fwd.drop_client_chain {
            upstream.remove_header(&X_FORWARDED_FOR);
        }
        if let Some(chain) = &fwd.for_ {
            upstream.insert_header("x-forwarded-for", chain.value()?)?;
        }
        if let Some(id) = fwd.request_id {
            upstream.insert_header("x-request-id", id)?;
        }
        if let Some(rules) = ctx.route().and_then(|r| r.vhost().request_headers.as_ref()) {
            let values = template_values(ctx);
            apply_rules!(upstream, rules, &values);
        }
        upstream.insert_header("x-forwarded-proto", fwd.proto)?;
        if let Some(host) = fwd.host {
            if upstream.headers.get(header::HOST).is_none() {
                upstream.insert_header(header::HOST, host.clone())?;
            }
            upstream.insert_header("x-forwarded-host", host)?;
        }
        Ok(())
    }

    /// What a request's head gets on its way to the backend besides its own fields (before
    /// a domain's header rules, which `upstream_request_filter` applies in between): the one
    /// decision both the head-editing filter and the fast path's head writer follow.
    pub(crate) fn forwarded(&self, session: &Session, ctx: &RequestCtx) -> Forwarded {
        let req = session.req_header();
        let mut fwd = Forwarded {
            drop_client_chain: false,
            for_: None,
            // A kept client id is already the request's only `X-Request-Id`.
            request_id: ctx.request_id.clone().filter(|_| !ctx.request_id_given),
            proto: HeaderValue::from_static(if ctx.tls { "https" } else { "http" }),
            // The host routing used (see `request_host`); a Host header's value is shared
            // (reference-counted), not copied.
            host: match req.uri.authority() {
                Some(a) => HeaderValue::from_str(a.as_str()).ok(),
                None => req.headers.get(header::HOST).cloned(),
            },
        };
        if let Some(ip) = ctx.peer {
            // With trusted proxies configured, a chain from anyone else is not passed on.
            fwd.drop_client_chain = !self.options.trusted_proxies.is_empty()
                && !any_contains(&self.options.trusted_proxies, ip);
            let mut chain = ForwardedFor {
                prev: req
                    .headers
                    .get(X_FORWARDED_FOR)
                    .filter(|_| !fwd.drop_client_chain)
                    .cloned(),
                ip: [0u8; 48],
                len: 0,
            };
            chain.len = format_ip(ip, &mut chain.ip).len();
            fwd.for_ = Some(chain);
        }
        fwd
    }

    /// What [`Self::response_filter`] would do to a non-101 HTTP/1 answer, when that is no more
    /// than setting `X-Request-Id`: `Some(the id to set, if any)`. `None`: it does more (header
    /// rules, a bucket cookie, the served tag) and the answer has to go through it.
    pub(crate) fn answer_edit<'c>(&self, ctx: &'c RequestCtx) -> Option<Option<&'c HeaderValue>> {
        let route = ctx.route();
        let more = ctx.issue_bucket.is_some()
            || route.is_some_and(|r| r.vhost().response_headers.is_some())
            || (self.options.canary.expose_served_tag
                && route.is_some_and(|r| r.canary().is_some()));
        (!more).then_some(ctx.request_id.as_ref())
    }

    /// The answer's `X-Request-Id`, response header rules, canary cookie and served tag. (An
    /// edit added here that `X-Request-Id` does not cover must make [`Self::answer_edit`]
    /// answer `None`: the fast path writes heads without calling this filter otherwise.)
    pub(crate) async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(id) = &ctx.request_id {
            upstream_response.insert_header("x-request-id", id.clone())?;
        }
        if let Some(rules) = ctx
            .route()
            .and_then(|r| r.vhost().response_headers.as_ref())
        {
            let values = template_values(ctx);
            apply_rules!(upstream_response, rules, &values);
        }
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS && !ctx.upgraded {
            ctx.upgraded = true;
            self.upgraded.increment(1.0);
        }
        // A trailers-only gRPC answer carries its status in the head (gRPC clients speak
        // HTTP/2: HTTP/1 requests skip the lookup).
        if session.is_http2() && grpc_failed(&upstream_response.headers) {
            ctx.grpc_error = true;
        }
        if let Some(bucket) = ctx.issue_bucket {
            let cookie = format!(
                "{}={bucket}; Path=/; Max-Age=86400; HttpOnly; SameSite=Lax",
                self.options.canary.bucket_cookie
            );
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                upstream_response.append_header(header::SET_COOKIE, value)?;
            }
        }
        if self.options.canary.expose_served_tag {
            if let Some(route) = ctx.route().filter(|r| r.canary().is_some()) {
                if let Ok(value) = HeaderValue::from_str(route.tag_on(ctx.side).as_str()) {
                    upstream_response.insert_header("x-served-tag", value)?;
                }
            }
        }
        Ok(())
    }

    /// Answers a request that failed before or while it was proxied (status from the error).
    pub(crate) async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let (code, reason) = failure_status(e);
        if ctx.local.is_none() {
            ctx.local = reason;
        }
        // An answer the fast path already started cannot be replaced by an error page.
        if code > 0 && ctx.answered.is_none() {
            let mut resp = pingora_core::protocols::http::ServerSession::generate_error(code);
            if code == 503 {
                let _ = resp.insert_header(header::RETRY_AFTER, self.options.retry_after_secs);
            }
            if let Err(write) = session.write_error_response(resp, Bytes::new()).await {
                tracing::debug!(error = %write, "could not send the error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// A connection to the backend is ready (new or reused): the backend counts as reachable
    /// (`connected_to_upstream`).
    pub(crate) fn backend_connected(&self, ctx: &RequestCtx) {
        if let Some(backend) = ctx.backend() {
            backend.health().record_connect_success();
        }
    }

    /// Metrics, health accounting and the access log of a finished request.
    pub(crate) async fn logging(
        &self,
        session: &mut Session,
        e: Option<&Error>,
        ctx: &mut RequestCtx,
    ) {
        ctx.logged = true;
        if !session.is_http2() {
            // Framing is settled now (an upgrade was decided by the response): tell the
            // connection loop how long this request's body was on the wire.
            let body_len = if session.is_body_empty() {
                Some(0)
            } else if session
                .req_header()
                .headers
                .contains_key(header::TRANSFER_ENCODING)
            {
                None
            } else {
                session
                    .req_header()
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok())
            };
            crate::conn::request_framed(session.stream(), body_len);
        }
        let status = ctx
            .answered
            .unwrap_or_else(|| session.response_written().map_or(0, |r| r.status.as_u16()));
        let elapsed = ctx.start.map_or(Duration::ZERO, |s| s.elapsed());
        if self.options.circuit_breaker.is_some() {
            let reached = matches!(
                ctx.local,
                None | Some(LocalReason::UpstreamError | LocalReason::UpstreamTimeout)
            );
            // A client that left says nothing about the backend.
            if reached && (status != 0 || ctx.local.is_some()) {
                if let Some(backend) = ctx.backend() {
                    let failed = status >= 500 || ctx.local.is_some();
                    self.record_outcome(ctx, backend, failed);
                }
                ctx.trial = false;
            }
        }
        ctx.slot = None;
        self.metrics.record(&Finished {
            table: ctx.table.as_deref(),
            route: ctx.route(),
            backend: ctx.backend().map(|b| &**b),
            member: ctx.member,
            side: ctx.side,
            local: ctx.local,
            status,
            attempts: ctx.attempts,
            seconds: elapsed.as_secs_f64(),
            grpc_error: ctx.grpc_error,
        });
        if std::mem::take(&mut ctx.upgraded) {
            self.upgraded.decrement(1.0);
        }
        let domain = domain_label(ctx.route());
        let backend = backend_label(ctx.backend().map(|b| &**b), ctx.local);
        if let Some(e) = e {
            self.log_failure(e, domain, backend, ctx.attempts, status);
        }
        if self.options.access_log {
            let req = session.req_header();
            access_log(&AccessLine {
                domain,
                tag: tag_label(ctx.route(), ctx.side),
                backend,
                method: req.method.as_str(),
                path: req.uri.path_and_query().map_or("/", |p| p.as_str()),
                status,
                bytes: if ctx.answered.is_some() {
                    ctx.answered_bytes
                } else {
                    session.body_bytes_sent()
                },
                elapsed,
                client: ctx.client,
                local: ctx.local.map_or("", LocalReason::as_str),
                request_id: ctx.request_id.as_ref(),
            });
        }
    }
}

impl VhostProxy {
    /// Logs a failed request: clients that went away at debug level (and as a summary at most
    /// once a minute), everything else as a warning, at most one line per second.
    fn log_failure(&self, e: &Error, domain: &str, backend: &str, attempts: usize, status: u16) {
        if *e.esource() == ErrorSource::Downstream {
            tracing::debug!(domain, error = %e, "client went away or sent a bad request");
            self.metrics.client_error();
            if let Some(held_back) = self.log_limits.client.admit() {
                if held_back > 0 {
                    tracing::info!(
                        count = held_back,
                        "requests ended by their client (disconnects, resets, bad requests) in the last minute"
                    );
                }
            }
            return;
        }
        if let Some(held_back) = self.log_limits.proxy.admit() {
            tracing::warn!(
                domain,
                backend,
                attempts,
                status,
                error = %e,
                similar_not_logged = held_back,
                "proxy error"
            );
        }
    }
}

/// The status the client gets for a failed request (0: the connection is gone) and why.
fn failure_status(e: &Error) -> (u16, Option<LocalReason>) {
    match (e.etype(), e.esource()) {
        (ErrorType::HTTPStatus(503), _) => (503, Some(LocalReason::Overloaded)),
        (ErrorType::HTTPStatus(502), _) => (502, Some(LocalReason::UpstreamError)),
        (ErrorType::HTTPStatus(code), _) => (*code, None),
        (
            ErrorType::ReadTimedout | ErrorType::WriteTimedout | ErrorType::ConnectTimedout,
            ErrorSource::Upstream,
        ) => (504, Some(LocalReason::UpstreamTimeout)),
        (_, ErrorSource::Upstream) => (502, Some(LocalReason::UpstreamError)),
        (
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
            ErrorSource::Downstream,
        ) => (0, None),
        (_, ErrorSource::Downstream) => (400, None),
        _ => (500, None),
    }
}

/// True when a connection attempt failed because this host is out of a resource (see
/// [`vhost_health::is_local_exhaustion`]), not because of the backend.
fn is_local_failure(e: &Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e
        .cause
        .as_deref()
        .map(|c| c as &(dyn std::error::Error + 'static));
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return vhost_health::is_local_exhaustion(io);
        }
        cause = c.source();
    }
    false
}

/// `https://host[:port]/path?query` for a plain-HTTP request, `None` if the host is unusable.
fn redirect_location(session: &Session, https_port: u16) -> Option<String> {
    let mut buf = [0u8; MAX_DOMAIN_LEN];
    let host = normalize_host(request_host(session)?, &mut buf)?;
    let path_and_query = session
        .req_header()
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str());
    Some(if https_port == 443 {
        format!("https://{host}{path_and_query}")
    } else {
        format!("https://{host}:{https_port}{path_and_query}")
    })
}
