//! The `ProxyHttp` implementation: listener → host/SNI → snapshot → tag → backend.
//!
//! Per request: one lock-free [`RouteStore::load_full`] in `request_filter`, a host lookup, the
//! redirect / 404 / 421 / 503 answers the proxy gives itself, and the first weighted pick of the
//! active tag's healthy backends. `upstream_peer` turns the pick into an `HttpPeer`; a failed
//! connection is retried (bounded) on another backend of the same tag, so one dead backend costs
//! the client nothing while a sibling is up. The same service serves the HTTP and the HTTPS
//! listener; the connection's TLS digest tells them apart.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use pingora_core::protocols::Digest;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::{ProxyHttp, Session};
use vhost_routing::{
    normalize_host, BackendEntry, Route, RouteStore, RoutingTable, MAX_DOMAIN_LEN,
};

use crate::certs::ClientSni;
use crate::metrics::{Finished, ProxyMetrics};

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
}

impl LocalReason {
    /// A stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redirect => "redirect",
            Self::UnknownHost => "unknown_host",
            Self::Misdirected => "misdirected",
            Self::NoBackend => "no_backend",
        }
    }
}

/// Number of requests being handled, for draining on shutdown.
#[derive(Debug, Default)]
pub struct Inflight(AtomicUsize);

impl Inflight {
    /// Requests in progress now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// Counts one request while alive.
#[derive(Debug)]
struct InflightGuard(Arc<Inflight>);

impl InflightGuard {
    fn new(counter: &Arc<Inflight>) -> Self {
        counter.0.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(counter))
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per-request state.
#[derive(Debug, Default)]
pub struct RequestCtx {
    _inflight: Option<InflightGuard>,
    /// The snapshot this request uses from start to end.
    table: Option<Arc<RoutingTable>>,
    /// The matched route.
    route: Option<Route>,
    /// The backend currently tried.
    backend: Option<Arc<BackendEntry>>,
    /// Its position in the route's pool.
    member: Option<usize>,
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
}

impl RequestCtx {
    /// The matched route, if any.
    pub fn route(&self) -> Option<&Route> {
        self.route.as_ref()
    }

    /// The backend the request went to (the last one tried).
    pub fn backend(&self) -> Option<&Arc<BackendEntry>> {
        self.backend.as_ref()
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

/// The virtual-host reverse proxy over a [`RouteStore`].
#[derive(Debug, Clone)]
pub struct VhostProxy {
    store: Arc<RouteStore>,
    options: Arc<ProxyOptions>,
    inflight: Arc<Inflight>,
    metrics: Arc<ProxyMetrics>,
}

impl VhostProxy {
    /// A proxy routing with `store`.
    pub fn new(store: Arc<RouteStore>, options: ProxyOptions) -> Self {
        Self {
            store,
            options: Arc::new(options),
            inflight: Arc::default(),
            metrics: Arc::new(ProxyMetrics::new()),
        }
    }

    /// The metric handles (call [`ProxyMetrics::prepare`] after publishing a snapshot).
    pub fn metrics(&self) -> Arc<ProxyMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The counter of requests in progress (shared by every clone of this proxy).
    pub fn inflight(&self) -> Arc<Inflight> {
        Arc::clone(&self.inflight)
    }

    fn peer_for(&self, backend: &BackendEntry) -> Result<Box<HttpPeer>> {
        let addr = backend.socket_addr().ok_or_else(|| {
            Error::explain(ErrorType::ConnectNoRoute, "backend address did not resolve")
        })?;
        let mut peer = HttpPeer::new(addr, false, String::new());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.options.connect_timeout);
        o.read_timeout = Some(self.options.read_timeout);
        o.write_timeout = Some(self.options.write_timeout);
        o.idle_timeout = Some(self.options.idle_timeout);
        Ok(Box::new(peer))
    }
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
        session
            .write_response_body(Some(Bytes::from_static(body.as_bytes())), true)
            .await?;
    }
    Ok(())
}

const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

#[async_trait]
impl ProxyHttp for VhostProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            _inflight: Some(InflightGuard::new(&self.inflight)),
            start: Some(Instant::now()),
            ..RequestCtx::default()
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let table = self.store.load_full();
        ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let route = request_host(session).and_then(|h| table.lookup(h)).cloned();
        let Some(route) = route else {
            ctx.table = Some(table);
            ctx.local = Some(LocalReason::UnknownHost);
            respond(session, 404, &[], "unknown host\n").await?;
            return Ok(true);
        };

        if ctx.tls {
            if let Some(sni) = client_sni(session.digest()) {
                let sni_route = table.lookup(sni.as_bytes());
                if sni_route.is_some_and(|r| r.vhost().domain != route.vhost().domain) {
                    ctx.table = Some(table);
                    ctx.route = Some(route);
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
            && !session
                .req_header()
                .uri
                .path()
                .starts_with(ACME_CHALLENGE_PREFIX)
        {
            let location = redirect_location(session, self.options.https_port);
            ctx.table = Some(table);
            ctx.route = Some(route);
            ctx.local = Some(LocalReason::Redirect);
            match location {
                Some(location) => {
                    respond(session, 308, &[(header::LOCATION, &location)], "").await?;
                }
                None => respond(session, 400, &[], "bad host\n").await?,
            }
            return Ok(true);
        }

        let picked = route
            .select_where_indexed(|_| true)
            .map(|(i, b)| (i, Arc::clone(b)));
        ctx.table = Some(table);
        ctx.route = Some(route);
        match picked {
            Some((member, backend)) => {
                ctx.member = Some(member);
                ctx.backend = Some(backend);
                Ok(false)
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

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        ctx.attempts += 1;
        if ctx.attempts > 1 {
            // A retry after a connection failure: another available backend of the same tag.
            let failed = &ctx.failed;
            let next = ctx.route.as_ref().and_then(|r| {
                r.select_where_indexed(|b| b.socket_addr().is_some_and(|a| !failed.contains(&a)))
                    .map(|(i, b)| (i, Arc::clone(b)))
            });
            match next {
                Some((member, b)) => {
                    ctx.member = Some(member);
                    ctx.backend = Some(b);
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
            .backend
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no backend selected"))?;
        self.peer_for(backend)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut pingora_http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(ip) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(SocketAddr::ip)
        {
            // Format without a temporary String: at most 39 bytes for an IPv6 address.
            let mut buf = [0u8; 48];
            let len = {
                let mut cursor = std::io::Cursor::new(&mut buf[..]);
                let _ = write!(cursor, "{ip}");
                cursor.position() as usize
            };
            let ip = &buf[..len];
            let forwarded_for = match upstream.headers.get("x-forwarded-for") {
                Some(prev) => {
                    let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
                    v.extend_from_slice(prev.as_bytes());
                    v.extend_from_slice(b", ");
                    v.extend_from_slice(ip);
                    HeaderValue::from_bytes(&v)
                }
                None => HeaderValue::from_bytes(ip),
            }
            .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "x-forwarded-for", e))?;
            upstream.insert_header("x-forwarded-for", forwarded_for)?;
        }
        upstream.insert_header(
            "x-forwarded-proto",
            HeaderValue::from_static(if ctx.tls { "https" } else { "http" }),
        )?;
        // The host routing used (see `request_host`); a Host header's value is shared
        // (reference-counted), not copied.
        let req = session.req_header();
        let host = match req.uri.authority() {
            Some(a) => HeaderValue::from_str(a.as_str()).ok(),
            None => req.headers.get(header::HOST).cloned(),
        };
        if let Some(host) = host {
            if upstream.headers.get(header::HOST).is_none() {
                upstream.insert_header(header::HOST, host.clone())?;
            }
            upstream.insert_header("x-forwarded-host", host)?;
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
        if let Some(addr) = peer.address().as_inet() {
            ctx.failed.push(*addr);
        }
        if let (Some(backend), Some(table)) = (&ctx.backend, &ctx.table) {
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

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        _digest: Option<&Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(backend) = &ctx.backend {
            backend.health().record_connect_success();
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.start.map_or(Duration::ZERO, |s| s.elapsed());
        self.metrics.record(&Finished {
            table: ctx.table.as_deref(),
            route: ctx.route.as_ref(),
            backend: ctx.backend.as_deref(),
            member: ctx.member,
            local: ctx.local,
            status,
            attempts: ctx.attempts,
            seconds: elapsed.as_secs_f64(),
        });
        let domain = ctx
            .route
            .as_ref()
            .map_or(crate::metrics::UNKNOWN_DOMAIN, |r| {
                r.vhost().domain.as_str()
            });
        let tag = ctx
            .route
            .as_ref()
            .map_or("", |r| r.vhost().enabled_backends_tag.as_str());
        let backend = match (&ctx.backend, ctx.local) {
            (Some(b), None) => b.id().as_str(),
            _ => crate::metrics::NO_BACKEND,
        };
        if let Some(e) = e {
            tracing::warn!(domain, backend, attempts = ctx.attempts, status, error = %e, "proxy error");
        }
        if self.options.access_log {
            let req = session.req_header();
            let client = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(SocketAddr::ip);
            tracing::info!(
                target: "access",
                domain,
                tag,
                backend,
                method = req.method.as_str(),
                path = req.uri.path_and_query().map_or("/", |p| p.as_str()),
                status,
                bytes = session.body_bytes_sent(),
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                client = %client.map_or_else(String::new, |c| c.to_string()),
                local = ctx.local.map_or("", LocalReason::as_str),
            );
        }
    }
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
