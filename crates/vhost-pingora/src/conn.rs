//! Downstream connections, the first stage of the data path: accepted TCP connection →
//! connection limit → TLS handshake (HTTPS listener; a client offering only `acme-tls/1` gets
//! its TLS-ALPN-01 answer and is closed) → HTTP/1.1 keep-alive loop, or HTTP/2 (ALPN `h2`, or
//! on the plain listener a connection whose first bytes are `PRI`: h2c with prior knowledge) →
//! Pingora's `HttpProxy` → [`VhostProxy`].
//!
//! Pingora's own connection handling trusts the client: the request head has a per-read
//! timeout but no total deadline, a keep-alive connection whose client sends nothing is kept
//! forever, heads may grow to 1 MiB, and every accepted connection is served. [`VhostApp`]
//! replaces it with bounded behaviour:
//! - at most [`ConnLimits::max_connections`] connections; more are closed at once (counted);
//! - the TLS handshake plus the first request head must arrive within
//!   [`ConnLimits::header_timeout`] of the accept, every later head within that time of its
//!   first byte; a keep-alive connection idle for [`ConnLimits::keepalive_timeout`] is closed;
//! - a head larger than [`ConnLimits::max_header_bytes`] gets `431` and the connection closes;
//! - clients that give up or dawdle are closed quietly (debug log, a counter per reason), so a
//!   flood of them cannot flood the log.
//!
//! Between two requests of a keep-alive connection nothing of Pingora's request machinery is
//! kept: the loop waits for the next request's first bytes itself, holding only the socket (and
//! TLS state) and one 4 KiB read buffer, then hands the bytes to a fresh Pingora session. That
//! keeps an idle connection at a few KiB instead of Pingora's tens of KiB. Pipelined requests
//! (sent before the previous response) are served in order: when the wire accounting of
//! [`ConnStream`] shows that Pingora already read past the end of a request, the next session
//! starts at once with those bytes.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::BytesMut;
use metrics::{counter, gauge, Counter, Gauge};
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora_core::server::ShutdownWatch;
use pingora_core::tls::ssl::{
    select_next_proto, AlpnError, SslAcceptor, SslMethod, SslMode, SslSessionCacheMode,
};
use pingora_proxy::HttpProxy;

use crate::fast::{ConnUpstream, FastPath, Served};
use futures_util::FutureExt as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use vhost_health::LogLimiter;

use crate::certs::SniCertResolver;
use crate::proxy::VhostProxy;

/// Limits applied to every client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnLimits {
    /// Longest time for a request head: from the accept (TLS handshake included) for the first
    /// request of a connection, from its first byte for the next ones. For HTTP/2 it bounds the
    /// TLS handshake and the connection preface.
    pub header_timeout: Duration,
    /// Longest idle time between two requests; zero: no keep-alive (a connection serves one
    /// request). HTTP/2 connections without an open stream are closed after the same time.
    pub keepalive_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Largest request head, in bytes (HTTP/1: request line and headers on the wire; HTTP/2: the
    /// decoded header list).
    pub max_header_bytes: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_header_bytes: 32 * 1024,
        }
    }
}

/// Why the proxy closed a connection on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The request head (or TLS handshake) did not arrive within the header timeout.
    HeaderTimeout,
    /// The connection was idle longer than the keep-alive timeout.
    KeepaliveTimeout,
    /// The request head was larger than allowed (431 sent).
    HeaderTooLarge,
    /// The TLS handshake failed.
    HandshakeFailed,
    /// The client closed or reset the connection in the middle of a request head.
    ClientClosed,
}

impl CloseReason {
    const ALL: [Self; 5] = [
        Self::HeaderTimeout,
        Self::KeepaliveTimeout,
        Self::HeaderTooLarge,
        Self::HandshakeFailed,
        Self::ClientClosed,
    ];

    /// Label value in `proxy_connections_closed_total{reason}`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header_timeout",
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::HeaderTooLarge => "header_too_large",
            Self::HandshakeFailed => "handshake_failed",
            Self::ClientClosed => "client_closed",
        }
    }
}

/// Registers the descriptions (Prometheus `# HELP`) of the connection metrics.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(
        "proxy_connections_open",
        "Client connections open now (HTTP and HTTPS listeners)"
    );
    describe_counter!(
        "proxy_connections_rejected_total",
        "Client connections closed at accept because max_connections were open"
    );
    describe_counter!(
        "proxy_connections_closed_total",
        "Client connections the proxy closed on its own, by reason: header_timeout, keepalive_timeout, header_too_large (431), handshake_failed, client_closed (gone in the middle of a request head)"
    );
}

/// The connection limits and counters shared by every connection of a service.
pub struct Connections {
    limits: ConnLimits,
    open: AtomicUsize,
    /// Most connections open at once since [`Connections::take_peak`] was last called.
    peak: AtomicUsize,
    open_gauge: Gauge,
    rejected: Counter,
    closed: [Counter; 5],
    rejected_log: LogLimiter,
    /// The runtimes of the threads that accepted connections: Pingora's proxy threads (each
    /// runs a runtime of its own), learned from the first connection each one admits. For
    /// upkeep that must happen on those threads ([`Connections::run_on_workers`]).
    workers: ArcSwap<Vec<(std::thread::ThreadId, tokio::runtime::Handle)>>,
    /// Tells this set from others in the same process (for [`WORKER_OF`]).
    id: usize,
}

/// The next [`Connections::id`].
static NEXT_CONNECTIONS_ID: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// The [`Connections`] (id) this thread is registered with as a worker; 0: none.
    static WORKER_OF: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("limits", &self.limits)
            .field("open", &self.open())
            .finish_non_exhaustive()
    }
}

impl Connections {
    /// Counters registered with the metrics recorder installed now.
    pub fn new(limits: ConnLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            open: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            open_gauge: gauge!("proxy_connections_open"),
            rejected: counter!("proxy_connections_rejected_total"),
            closed: CloseReason::ALL
                .map(|r| counter!("proxy_connections_closed_total", "reason" => r.as_str())),
            rejected_log: LogLimiter::new(Duration::from_secs(60)),
            workers: ArcSwap::default(),
            id: NEXT_CONNECTIONS_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Runs `task` once on each thread that has accepted connections so far (on its own
    /// runtime: Pingora's proxy threads do not share one), without waiting for it. For upkeep
    /// that only the thread itself can do, such as asking its allocator to give back what it
    /// keeps. A runtime that has shut down just drops it.
    pub fn run_on_workers(&self, task: fn()) {
        for (_, handle) in self.workers.load().iter() {
            drop(handle.spawn(async move { task() }));
        }
    }

    /// How many threads have accepted connections so far.
    pub fn workers(&self) -> usize {
        self.workers.load().len()
    }

    /// Learns the calling thread's runtime, once per thread (a thread-local check otherwise).
    fn register_worker(&self) {
        if WORKER_OF.with(std::cell::Cell::get) == self.id {
            return;
        }
        WORKER_OF.with(|w| w.set(self.id));
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let thread = std::thread::current().id();
        // Single writer per thread, rare (once per thread): a copy-on-write update.
        self.workers.rcu(|workers| {
            let mut workers = Vec::clone(workers);
            if !workers.iter().any(|(t, _)| *t == thread) {
                workers.push((thread, handle.clone()));
            }
            workers
        });
    }

    /// The limits.
    pub fn limits(&self) -> &ConnLimits {
        &self.limits
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The most connections open at once since the previous call (used to notice that a wave
    /// of connections has come and gone, e.g. to return memory to the system).
    pub fn take_peak(&self) -> usize {
        self.peak.swap(self.open(), Ordering::Relaxed)
    }

    fn admit(self: &Arc<Self>) -> Option<Slot> {
        self.register_worker();
        let previous = self.open.fetch_add(1, Ordering::AcqRel);
        self.peak.fetch_max(previous + 1, Ordering::Relaxed);
        if previous >= self.limits.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.rejected.increment(1);
            if let Some(held_back) = self.rejected_log.admit() {
                tracing::warn!(
                    max_connections = self.limits.max_connections,
                    similar_not_logged = held_back,
                    "connection refused: max_connections are open"
                );
            }
            return None;
        }
        self.open_gauge.increment(1.0);
        Some(Slot(Arc::clone(self)))
    }

    fn closed(&self, reason: CloseReason, peer: Option<SocketAddr>) {
        let i = CloseReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.closed[i].increment(1);
        tracing::debug!(reason = reason.as_str(), client = ?peer, "connection closed by the proxy");
    }
}

/// One admitted connection; frees its place when dropped.
struct Slot(Arc<Connections>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.open_gauge.decrement(1.0);
    }
}

/// The HTTPS side of the listener set.
struct TlsEndpoint {
    addr: SocketAddr,
    acceptor: SslAcceptor,
    certs: SniCertResolver,
}

/// The Pingora `ServerApp` of the proxy service (see the module docs).
pub struct VhostApp {
    http: Arc<HttpProxy<VhostProxy>>,
    tls: Option<TlsEndpoint>,
    conns: Arc<Connections>,
    /// Plain connections starting with `PRI` are HTTP/2 with prior knowledge.
    h2c: bool,
    /// Peers whose connections may start with a PROXY protocol v2 header (`None`: off).
    proxy_protocol: Option<Vec<vhost_routing::Cidr>>,
    /// The HTTP/1.1 fast path (see [`crate::fast`]).
    fast: FastPath,
}

impl std::fmt::Debug for VhostApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostApp")
            .field("https", &self.tls.as_ref().map(|t| t.addr))
            .field("conns", &self.conns)
            .finish_non_exhaustive()
    }
}

/// The TLS acceptor of the HTTPS listener: Mozilla "intermediate" (TLS 1.2 and 1.3), ALPN `h2`
/// preferred over `http/1.1`, and OpenSSL's buffers released while a connection is idle. With
/// `acme_tls_alpn`, a client offering `acme-tls/1` (a CA validating TLS-ALPN-01, which offers
/// nothing else) gets that protocol.
fn tls_acceptor(acme_tls_alpn: bool) -> pingora_error::Result<SslAcceptor> {
    use pingora_error::{ErrorType, OrErr};
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())
        .or_err(ErrorType::InternalError, "creating the TLS acceptor")?;
    builder.set_mode(SslMode::RELEASE_BUFFERS);
    builder.set_read_ahead(true);
    builder.set_session_cache_mode(SslSessionCacheMode::OFF);
    builder.set_alpn_select_callback(move |_, offered| {
        let acme = acme_tls_alpn.then(|| select_next_proto(b"\x0aacme-tls/1", offered));
        acme.flatten()
            .or_else(|| select_next_proto(b"\x02h2\x08http/1.1", offered))
            .ok_or(AlpnError::NOACK)
    });
    Ok(builder.build())
}

impl VhostApp {
    /// Serves `proxy` (already configured with `server_options` / `h2_options`); `https`: the
    /// HTTPS listener's address and certificates.
    pub(crate) fn new(
        proxy: HttpProxy<VhostProxy>,
        https: Option<(SocketAddr, SniCertResolver)>,
        conns: Arc<Connections>,
        proxy_protocol: Option<Vec<vhost_routing::Cidr>>,
        fast: FastPath,
    ) -> pingora_error::Result<Self> {
        let tls = match https {
            Some((addr, certs)) => Some(TlsEndpoint {
                addr,
                acceptor: tls_acceptor(certs.answers_tls_alpn())?,
                certs,
            }),
            None => None,
        };
        let h2c = proxy.server_options.as_ref().is_some_and(|o| o.h2c);
        Ok(Self {
            http: Arc::new(proxy),
            tls,
            conns,
            h2c,
            proxy_protocol,
            fast,
        })
    }

    /// The connection limits and counters.
    pub fn connections(&self) -> &Arc<Connections> {
        &self.conns
    }

    /// The TLS endpoint if `stream` was accepted on the HTTPS listener.
    fn tls_for(&self, stream: &Stream) -> Option<&TlsEndpoint> {
        let tls = self.tls.as_ref()?;
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied())?;
        let same = if tls.addr.ip().is_unspecified() {
            local.port() == tls.addr.port()
        } else {
            local == tls.addr
        };
        same.then_some(tls)
    }

    async fn serve_h2(
        &self,
        stream: Stream,
        shared: &ConnShared,
        deadline: Instant,
        shutdown: &ShutdownWatch,
    ) {
        let conn = ServerApp::process_new(&self.http, stream, shutdown);
        match until_head(conn, shared, Some(deadline)).await {
            Outcome::Done(_) => {}
            Outcome::Closed(reason) | Outcome::TimedOut(reason) => {
                self.conns.closed(reason, None);
            }
        }
    }

    async fn serve_h1(
        &self,
        mut stream: Stream,
        shared: &ConnShared,
        accepted: Instant,
        shutdown: &ShutdownWatch,
    ) {
        let limits = &self.conns.limits;
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        let mut settings: Option<HttpPersistentSettings> = None;
        // Until when to wait for the first bytes of the next request; `None`: Pingora already
        // holds some (pipelining), start the session at once.
        let mut wait_until = Some(accepted + limits.header_timeout);
        let mut first_request = true;
        // The service is shutting down: serve what arrives with `Connection: close`.
        let mut draining = false;
        // One timer and one shutdown waiter for the connection's whole life, reset per request:
        // pushing a registered timer's deadline later costs an atomic, not a timer-wheel update.
        let mut idle_timer = std::pin::pin!(tokio::time::sleep_until(
            (accepted + limits.header_timeout).into()
        ));
        let mut stop_rx = shutdown.clone();
        let mut stopping = std::pin::pin!(async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        });
        // Backend connections of the fast path kept between requests, and when they go back
        // to the pool if the client stays idle (pushed later per request, like `idle_timer`).
        let mut upstream = self.fast.conn_upstream();
        let hold = self.fast.hold();
        let mut hold_timer = std::pin::pin!(tokio::time::sleep_until((accepted + hold).into()));
        loop {
            let scan = wait_until.is_some();
            let Some(started) = ConnStream::start_request(stream, shared, scan) else {
                return;
            };
            stream = started;
            let (mut first_bytes, deadline) = match wait_until {
                Some(until) => {
                    let idle = if first_request {
                        CloseReason::HeaderTimeout
                    } else {
                        CloseReason::KeepaliveTimeout
                    };
                    idle_timer.as_mut().reset(until.into());
                    let wait = first_bytes(
                        &mut stream,
                        shared,
                        idle_timer.as_mut(),
                        (!draining).then_some(stopping.as_mut()),
                        idle,
                        (&mut upstream, hold_timer.as_mut()),
                    );
                    match wait.await {
                        Ok((bytes, drain)) => {
                            draining |= drain;
                            let deadline = if first_request {
                                accepted + limits.header_timeout
                            } else {
                                Instant::now() + limits.header_timeout
                            };
                            (Some(bytes), deadline)
                        }
                        Err(Some(reason)) => return self.conns.closed(reason, peer),
                        Err(None) => return,
                    }
                }
                // The boundary is unknown: whatever Pingora holds is a request head in progress,
                // or nothing and the connection is idle. Allow for both.
                None => (
                    None,
                    Instant::now() + limits.keepalive_timeout + limits.header_timeout,
                ),
            };
            first_request = false;
            let keepalive_off = draining || *shutdown.borrow();
            // A whole head already here: the fast path takes it, or declines it untouched and
            // it is replayed into Pingora's path from a copy of the same bytes.
            let fast = first_bytes
                .as_ref()
                .filter(|b| self.fast.open() && has_whole_head(b))
                .cloned();
            let reused = 'request: {
                if let Some(mut replay) = fast {
                    // The session parses the head from its prefix over a stand-in stream; the
                    // fast path writes the answer to the connection's stream itself.
                    let mut session = pingora_proxy::Session::new_h1(HeadStream::stand_in(&stream));
                    prepare_session(
                        &mut session.downstream_session,
                        settings.take(),
                        keepalive_off,
                        first_bytes,
                    );
                    // Boxed: inline, the request's future (6.4 KB, sized by its largest
                    // state) took ≈ 14 KB of every connection's task even while it sat idle.
                    let serve = self
                        .fast
                        .serve(session, &mut stream, keepalive_off, &mut upstream);
                    match until_head(Box::pin(serve), shared, Some(deadline)).await {
                        Outcome::Done(Served::Keep {
                            mut settings,
                            head_len,
                            extra,
                        }) => {
                            // What followed the head (and a byte read while watching the
                            // client) starts the next request.
                            let mut next = replay.split_off(head_len.min(replay.len()));
                            if let Some(byte) = extra {
                                next.extend_from_slice(&[byte]);
                            }
                            if !next.is_empty() {
                                settings.set_pipelined_prefix(next);
                            }
                            break 'request ReusedHttpStream::new(stream, Some(settings));
                        }
                        Outcome::Done(Served::Close) => return,
                        Outcome::Done(Served::Declined(kept)) => {
                            settings = Some(kept);
                            first_bytes = Some(replay);
                        }
                        Outcome::Closed(reason) | Outcome::TimedOut(reason) => {
                            return self.conns.closed(reason, peer)
                        }
                    }
                }
                let mut session = ServerSession::new_http1(stream);
                prepare_session(&mut session, settings.take(), keepalive_off, first_bytes);
                let request = self.http.process_new_http(session, shutdown);
                match until_head(request, shared, Some(deadline)).await {
                    Outcome::Done(Some(reused)) => reused,
                    Outcome::Done(None) => return,
                    Outcome::Closed(reason) => return self.conns.closed(reason, peer),
                    Outcome::TimedOut(reason) => {
                        // Nothing at all arrived (a session started on a pipelined boundary that
                        // turned out to be idle): that is a keep-alive timeout, not a slow head.
                        let reason = if shared.read_some() {
                            reason
                        } else {
                            CloseReason::KeepaliveTimeout
                        };
                        return self.conns.closed(reason, peer);
                    }
                }
            };
            let (next_stream, next_settings) = reused.consume();
            settings = next_settings;
            let boundary_known = ConnStream::request_boundary_known(&next_stream, shared);
            stream = next_stream;
            let now = Instant::now();
            if !upstream.is_empty() {
                hold_timer.as_mut().reset((now + hold).into());
            }
            wait_until = boundary_known.then(|| now + limits.keepalive_timeout);
        }
    }
}

/// Sets up a fresh HTTP/1 session of the keep-alive loop: the previous request's settings, no
/// keep-alive while draining, pipelining, and the bytes already read as the start of its head.
fn prepare_session(
    session: &mut ServerSession,
    settings: Option<HttpPersistentSettings>,
    keepalive_off: bool,
    prefix: Option<BytesMut>,
) {
    if let Some(s) = settings {
        s.apply_to_session(session);
    }
    if keepalive_off {
        session.set_keepalive(None);
    }
    session.set_pipelining_enabled(true);
    if let Some(bytes) = prefix {
        session.set_pipelined_prefix(bytes);
    }
}

/// How waiting for a request head ended.
enum Outcome<T> {
    /// The future completed.
    Done(T),
    /// The client closed or overran the limit during the head.
    Closed(CloseReason),
    /// The deadline passed before the head was complete.
    TimedOut(CloseReason),
}

/// Runs `fut` (a session or connection) to completion, but gives up when the connection's head
/// is still incomplete at `deadline` or [`ConnStream`] closed it.
async fn until_head<F: std::future::Future>(
    fut: F,
    shared: &ConnShared,
    deadline: Option<Instant>,
) -> Outcome<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut closed = std::pin::pin!(closed(shared));
    if let Some(deadline) = deadline.filter(|_| !shared.head_done()) {
        let sleep = tokio::time::sleep_until(deadline.into());
        tokio::select! {
            biased;
            out = &mut fut => return Outcome::Done(out),
            reason = &mut closed => return Outcome::Closed(reason),
            () = sleep => {
                if !shared.head_done() {
                    return Outcome::TimedOut(CloseReason::HeaderTimeout);
                }
            }
        }
    }
    tokio::select! {
        biased;
        out = &mut fut => Outcome::Done(out),
        reason = &mut closed => Outcome::Closed(reason),
    }
}

/// Resolves when [`ConnStream`] closed the connection (it wakes the task when it does).
fn closed(shared: &ConnShared) -> impl std::future::Future<Output = CloseReason> + '_ {
    std::future::poll_fn(|_| match shared.closed() {
        Some(reason) => Poll::Ready(reason),
        None => Poll::Pending,
    })
}

/// Waits (until `timer` fires) for the first bytes of the next request and returns them in a
/// buffer the Pingora session continues to read into, and whether the service started shutting
/// down meanwhile (the request is then served with `Connection: close`: a client that sends on
/// an idle keep-alive connection during a drain or an upgrade gets its answer, not a reset).
/// `Err(Some(reason))`: counted close; `Err(None)`: the client closed.
async fn first_bytes(
    stream: &mut Stream,
    shared: &ConnShared,
    timer: Pin<&mut tokio::time::Sleep>,
    stopping: Option<Pin<&mut impl std::future::Future<Output = ()>>>,
    idle: CloseReason,
    upstream: (&mut ConnUpstream<'_>, Pin<&mut tokio::time::Sleep>),
) -> Result<(BytesMut, bool), Option<CloseReason>> {
    let (mut buf, draining) = first_read(stream, shared, timer, stopping, idle, upstream).await?;
    // The head often arrives in two reads on a new plain connection (the listener peeked at its
    // first bytes for h2c): take what is already there, without waiting, so that a whole head
    // can go to the HTTP/1.1 fast path.
    while buf.len() < buf.capacity() && !has_whole_head(&buf) {
        match stream.read_buf(&mut buf).now_or_never() {
            Some(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    Ok((buf, draining))
}

/// Whether `bytes` hold the end of a request head (usually their last four bytes: checked
/// first).
fn has_whole_head(bytes: &[u8]) -> bool {
    bytes.ends_with(b"\r\n\r\n") || memchr::memmem::find(bytes, b"\r\n\r\n").is_some()
}

/// The first read of [`first_bytes`]: waits for it. Kept backend connections go back to the
/// pool when their hold timer fires first.
async fn first_read(
    stream: &mut Stream,
    shared: &ConnShared,
    mut timer: Pin<&mut tokio::time::Sleep>,
    mut stopping: Option<Pin<&mut impl std::future::Future<Output = ()>>>,
    idle: CloseReason,
    (upstream, mut hold): (&mut ConnUpstream<'_>, Pin<&mut tokio::time::Sleep>),
) -> Result<(BytesMut, bool), Option<CloseReason>> {
    // Pingora's initial request buffer size.
    let mut buf = BytesMut::with_capacity(4096);
    let mut draining = false;
    loop {
        let stop = async {
            match stopping.as_mut() {
                Some(stop) => stop.as_mut().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            r = stream.read_buf(&mut buf) => {
                return match r {
                    Ok(n) if n > 0 => Ok((buf, draining)),
                    _ => Err(None),
                };
            }
            reason = closed(shared) => return Err(Some(reason)),
            () = stop => {
                draining = true;
                stopping = None;
            }
            () = hold.as_mut(), if !upstream.is_empty() => upstream.release(),
            // A drain ends idle connections quietly.
            () = timer.as_mut() => return Err((!draining).then_some(idle)),
        }
    }
}

const HEAD_DONE: u8 = 1;
const PARSED: u8 = 2;
const CLOSED_CLIENT: u8 = 4;
const CLOSED_TOO_LARGE: u8 = 8;
/// Some bytes of the current request were read.
const READ_SOME: u8 = 16;
const BODY_UNKNOWN: u64 = u64::MAX;

/// What a connection's stream, its loop and the proxy logic tell each other.
#[derive(Debug, Default)]
struct ConnShared {
    /// The client named by a PROXY protocol header.
    client: std::sync::OnceLock<std::net::IpAddr>,
    flags: AtomicU8,
    /// Wire length of the current request's body ([`BODY_UNKNOWN`] until the head is parsed, and
    /// for chunked bodies).
    body: AtomicU64,
}

impl ConnShared {
    fn set(&self, flag: u8) {
        self.flags.fetch_or(flag, Ordering::Relaxed);
    }

    fn read_some(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & READ_SOME != 0
    }

    fn head_done(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & (HEAD_DONE | PARSED) != 0
    }

    fn closed(&self) -> Option<CloseReason> {
        let flags = self.flags.load(Ordering::Relaxed);
        if flags & CLOSED_TOO_LARGE != 0 {
            Some(CloseReason::HeaderTooLarge)
        } else if flags & CLOSED_CLIENT != 0 {
            Some(CloseReason::ClientClosed)
        } else {
            None
        }
    }
}

/// The connection state behind a session's stream, if [`VhostApp`] serves it.
fn shared_of(stream: Option<&Stream>) -> Option<&ConnShared> {
    let any = (**stream?).as_any();
    match any.downcast_ref::<ConnStream>() {
        Some(c) => c.shared.as_deref(),
        None => any
            .downcast_ref::<HeadStream>()
            .and_then(|h| h.shared.as_deref()),
    }
}

/// The client a PROXY protocol header named for this connection, if any.
pub(crate) fn proxied_client(stream: Option<&Stream>) -> Option<std::net::IpAddr> {
    shared_of(stream).and_then(|s| s.client.get().copied())
}

/// Reads a PROXY protocol v2 header if the connection starts with one (its 12-byte signature;
/// otherwise nothing is consumed): `Some(client)` for a PROXY command with an IP source,
/// `None` for LOCAL (health checks of the balancer) or no header.
async fn read_proxy_header(stream: &mut Stream) -> io::Result<Option<std::net::IpAddr>> {
    const MAX_HEADER: usize = 16 + 4096;
    let mut signature = [0u8; 12];
    if !stream.try_peek(&mut signature).await? || signature != ppp::v2::PROTOCOL_PREFIX {
        return Ok(None);
    }
    let mut header = vec![0u8; 16];
    stream.read_exact(&mut header).await?;
    let length = usize::from(u16::from_be_bytes([header[14], header[15]]));
    if 16 + length > MAX_HEADER {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "PROXY header too long",
        ));
    }
    header.resize(16 + length, 0);
    stream.read_exact(&mut header[16..]).await?;
    let parsed = ppp::v2::Header::try_from(header.as_slice())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    if parsed.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    Ok(match parsed.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(std::net::IpAddr::V4(a.source_address)),
        ppp::v2::Addresses::IPv6(a) => Some(std::net::IpAddr::V6(a.source_address)),
        _ => None,
    })
}

/// Tells the connection loop that a request head was parsed (it stops timing the head). Called
/// by [`VhostProxy`] for every HTTP/1 request; a no-op for streams not served by [`VhostApp`].
pub(crate) fn head_parsed(stream: Option<&Stream>) {
    if let Some(shared) = shared_of(stream) {
        shared.set(PARSED);
    }
}

/// Tells the connection loop how long the finished request's body was on the wire (`None`:
/// unknown, e.g. chunked), so it can tell whether Pingora already read into the next request.
pub(crate) fn request_framed(stream: Option<&Stream>, body_len: Option<u64>) {
    if let Some(shared) = shared_of(stream) {
        shared
            .body
            .store(body_len.unwrap_or(BODY_UNKNOWN), Ordering::Relaxed);
    }
}

/// The answer to a request head over [`ConnLimits::max_header_bytes`].
const TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 32\r\nConnection: close\r\n\r\nrequest header fields too large\n";

/// How a [`ConnStream`] watches what it delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// Nothing: a plain pass-through (the TCP side of a TLS connection).
    Off,
    /// An HTTP/1 request head is expected: find its end on the wire, count its size.
    H1Head,
    /// The head is done (or its bytes were already read): only count bytes.
    H1Rest,
    /// HTTP/2: the head phase ends with the 24-byte connection preface.
    H2Preface,
}

/// The client stream as Pingora sees it: delegates everything to the real (TCP or TLS) stream,
/// and watches the bytes of each HTTP/1 request head (see the module docs).
pub(crate) struct ConnStream {
    inner: Stream,
    shared: Option<Arc<ConnShared>>,
    watch: Watch,
    /// Bytes delivered to readers since the connection started.
    delivered: u64,
    /// `delivered` when the current request started.
    request_start: u64,
    /// `delivered` at the end of the current request head, once found.
    head_end: Option<u64>,
    /// Head scanner state: 0 = before the request line, 1 = in a line, 2 = just after a line
    /// feed, 3 = after a line feed and a carriage return.
    scan: u8,
    max_head: u64,
    /// Bytes of [`TOO_LARGE`] written, while answering 431.
    rejecting: Option<usize>,
    /// HTTP/1 over TLS: plaintext gathered until a flush (at most [`GATHER_CAP`] bytes), so that
    /// a response head and a short body leave in one TLS record and one `SSL_write` — Pingora
    /// writes them separately, which below TLS costs a record (and its encryption) each. Pingora
    /// flushes wherever timing matters (after every chunk, after a close-delimited write, at the
    /// end of a response), the contract its own L4 write buffer relies on.
    gather: Option<Gather>,
}

/// Bytes gathered above TLS (see [`ConnStream::gather`]).
#[derive(Debug, Default)]
struct Gather {
    buf: Vec<u8>,
    /// How much of `buf` is already written.
    written: usize,
}

/// The most plaintext [`ConnStream`] gathers before writing: the size of Pingora's L4 write
/// buffer, so that writes on HTTPS reach the client no later than on plain HTTP.
const GATHER_CAP: usize = 1460;

impl std::fmt::Debug for ConnStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnStream")
            .field("inner", &self.inner)
            .field("watch", &self.watch)
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

impl ConnStream {
    fn new(inner: Stream, shared: Option<Arc<ConnShared>>, watch: Watch, max_head: u64) -> Self {
        let gather =
            (matches!(watch, Watch::H1Head) && inner.get_ssl().is_some()).then(Gather::default);
        Self {
            gather,
            inner,
            shared,
            watch,
            delivered: 0,
            request_start: 0,
            head_end: None,
            scan: 0,
            max_head,
            rejecting: None,
        }
    }

    /// Resets the per-request accounting of the connection's stream (a boxed `ConnStream`;
    /// `None` for any other stream, which the loop never sees).
    fn start_request(stream: Stream, shared: &ConnShared, scan: bool) -> Option<Stream> {
        shared.flags.store(0, Ordering::Relaxed);
        shared.body.store(BODY_UNKNOWN, Ordering::Relaxed);
        let mut conn = stream.into_any().downcast::<ConnStream>().ok()?;
        conn.request_start = conn.delivered;
        conn.head_end = None;
        conn.scan = 0;
        conn.watch = if scan { Watch::H1Head } else { Watch::H1Rest };
        Some(conn)
    }

    /// True when every byte Pingora read during the request just finished belonged to it, so
    /// it holds none of the next one: known head length (scanned) plus a known body length
    /// equals what was delivered.
    fn request_boundary_known(stream: &Stream, shared: &ConnShared) -> bool {
        let Some(conn) = (**stream).as_any().downcast_ref::<ConnStream>() else {
            return false;
        };
        let body = shared.body.load(Ordering::Relaxed);
        let (Some(head_end), true) = (conn.head_end, body != BODY_UNKNOWN) else {
            return false;
        };
        head_end
            .checked_add(body)
            .is_some_and(|end| end == conn.delivered)
    }

    /// Scans newly delivered head bytes; `Err` when the head is over the limit. Only the bytes
    /// right after each line feed are looked at (the line feeds are found with `memchr`).
    fn scan_head(&mut self, data: &[u8]) -> Result<(), ()> {
        let start = self.delivered;
        let mut i = 0;
        while i < data.len() {
            match self.scan {
                // Before the request line: empty lines are skipped, never taken for its end.
                0 => match data[i..].iter().position(|b| *b != b'\r' && *b != b'\n') {
                    Some(p) => {
                        i += p;
                        self.scan = 1;
                    }
                    None => i = data.len(),
                },
                // In a line: on to the next line feed.
                1 => match memchr::memchr(b'\n', &data[i..]) {
                    Some(p) => {
                        i += p + 1;
                        self.scan = 2;
                    }
                    None => i = data.len(),
                },
                // After a line feed (2), or a line feed and a carriage return (3): another line
                // feed ends the head, anything else starts the next header line.
                state => match data[i] {
                    b'\n' => return self.head_complete(start + i as u64 + 1),
                    b'\r' if state == 2 => {
                        self.scan = 3;
                        i += 1;
                    }
                    _ => self.scan = 1,
                },
            }
        }
        if start + data.len() as u64 - self.request_start > self.max_head {
            Err(())
        } else {
            Ok(())
        }
    }

    /// The head ended at wire offset `end`; `Err` if it was over the limit.
    fn head_complete(&mut self, end: u64) -> Result<(), ()> {
        self.head_end = Some(end);
        self.watch = Watch::H1Rest;
        if let Some(shared) = &self.shared {
            shared.set(HEAD_DONE);
        }
        if end - self.request_start > self.max_head {
            Err(())
        } else {
            Ok(())
        }
    }

    /// Writes the 431 answer, then marks the connection closed and wakes its loop.
    fn poll_reject(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(written) = self.rejecting.filter(|w| *w < TOO_LARGE.len()) {
            match Pin::new(&mut self.inner).poll_write(cx, &TOO_LARGE[written..]) {
                Poll::Ready(Ok(n)) if n > 0 => self.rejecting = Some(written + n),
                Poll::Ready(_) => break,
                Poll::Pending => return Poll::Pending,
            }
        }
        if Pin::new(&mut self.inner).poll_flush(cx).is_pending() {
            return Poll::Pending;
        }
        self.rejecting = Some(TOO_LARGE.len());
        self.close(CLOSED_TOO_LARGE, cx)
    }

    /// Marks the connection closed for the loop (which drops the session) and keeps the reader
    /// pending meanwhile.
    fn close(&mut self, flag: u8, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(shared) = &self.shared {
            shared.set(flag);
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionAborted)))
        }
    }
}

impl AsyncRead for ConnStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.rejecting.is_some() {
            return this.poll_reject(cx);
        }
        if let Some(shared) = &this.shared {
            if shared.closed().is_some() {
                return Poll::Pending;
            }
        }
        let before = buf.filled().len();
        let result = match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        let n = buf.filled().len() - before;
        if n > 0 {
            if let Some(shared) = &this.shared {
                if shared.flags.load(Ordering::Relaxed) & READ_SOME == 0 {
                    shared.set(READ_SOME);
                }
            }
        }
        match this.watch {
            Watch::Off | Watch::H1Rest => {}
            Watch::H1Head => {
                if result.is_err() || n == 0 {
                    if this.delivered > this.request_start {
                        // Gone in the middle of a head: close quietly instead of letting Pingora
                        // log an error per such client.
                        return this.close(CLOSED_CLIENT, cx);
                    }
                } else {
                    let parsed = this
                        .shared
                        .as_ref()
                        .is_some_and(|s| s.flags.load(Ordering::Relaxed) & PARSED != 0);
                    if parsed {
                        this.watch = Watch::H1Rest;
                    } else if this.scan_head(&buf.filled()[before..]).is_err() {
                        this.rejecting = Some(0);
                        return this.poll_reject(cx);
                    }
                }
            }
            Watch::H2Preface => {
                if this.delivered + n as u64 >= 24 {
                    this.watch = Watch::Off;
                    if let Some(shared) = &this.shared {
                        shared.set(HEAD_DONE);
                    }
                }
            }
        }
        this.delivered += n as u64;
        Poll::Ready(result)
    }
}

impl ConnStream {
    /// Writes out whatever is gathered (see [`ConnStream::gather`]).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(g) = self.gather.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while g.written < g.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &g.buf[g.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            g.written += n;
        }
        g.buf.clear();
        g.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ConnStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(g) = this.gather.as_mut() else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        if g.buf.len() + buf.len() > GATHER_CAP {
            ready!(this.poll_drain(cx))?;
            if buf.len() >= GATHER_CAP {
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            }
        }
        if let Some(g) = this.gather.as_mut() {
            if g.buf.capacity() == 0 {
                g.buf.reserve_exact(GATHER_CAP);
            }
            g.buf.extend_from_slice(buf);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.gather.is_some() {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &**b);
            return self.poll_write(cx, first);
        }
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.gather.is_none() && self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for ConnStream {
    async fn shutdown(&mut self) {
        // What is gathered goes out before the close (as Pingora's own buffer does).
        let _ = std::future::poll_fn(|cx| self.poll_drain(cx)).await;
        self.inner.shutdown().await;
    }
}

impl UniqueID for ConnStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ConnStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ConnStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ConnStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for ConnStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for ConnStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// The stream under a fast-path session (see [`crate::fast`]): the request head is parsed by
/// Pingora's session from its pipelined prefix — this stream is never read — while the
/// connection's real stream stays with the keep-alive loop, so that the fast path can write the
/// answer to it directly. What the session writes itself (a local answer, an error page) is
/// kept here and copied to the real stream when the request ends ([`HeadStream::written`]).
/// Everything the proxy logic asks of the connection (digests, PROXY protocol client, its
/// [`ConnShared`]) comes from the real stream.
#[derive(Debug)]
pub(crate) struct HeadStream {
    shared: Option<Arc<ConnShared>>,
    id: UniqueIDType,
    ssl: Option<Arc<SslDigest>>,
    alpn: Option<ALPN>,
    timing: Vec<Option<TimingDigest>>,
    proxy: Option<Arc<ProxyDigest>>,
    socket: Option<Arc<SocketDigest>>,
    /// What the session wrote.
    out: Vec<u8>,
    /// The session tried to read: the head in its prefix was not complete after all.
    wanted_more: bool,
}

impl HeadStream {
    /// A stand-in for `real` (a connection's [`ConnStream`]).
    pub(crate) fn stand_in(real: &Stream) -> Stream {
        let shared = (**real)
            .as_any()
            .downcast_ref::<ConnStream>()
            .and_then(|c| c.shared.clone());
        Box::new(Self {
            shared,
            id: real.id(),
            ssl: real.get_ssl_digest(),
            alpn: real.selected_alpn_proto(),
            timing: real.get_timing_digest(),
            proxy: real.get_proxy_digest(),
            socket: real.get_socket_digest(),
            out: Vec::new(),
            wanted_more: false,
        })
    }

    /// Whether the session under `stream` (a stand-in) tried to read past its prefix.
    pub(crate) fn wanted_more(stream: Option<&Stream>) -> bool {
        stream
            .and_then(|s| (**s).as_any().downcast_ref::<Self>())
            .is_some_and(|h| h.wanted_more)
    }

    /// What the session wrote to the stand-in `stream`.
    pub(crate) fn written(stream: Stream) -> Vec<u8> {
        stream
            .into_any()
            .downcast::<Self>()
            .map(|h| h.out)
            .unwrap_or_default()
    }
}

impl AsyncRead for HeadStream {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // End of stream: the fast path declines and the head goes to Pingora's path.
        self.get_mut().wanted_more = true;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HeadStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[async_trait]
impl Shutdown for HeadStream {
    async fn shutdown(&mut self) {}
}

impl UniqueID for HeadStream {
    fn id(&self) -> UniqueIDType {
        self.id
    }
}

impl Ssl for HeadStream {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.ssl.clone()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.alpn.clone()
    }
}

impl GetTimingDigest for HeadStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.timing.clone()
    }
}

impl GetProxyDigest for HeadStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.proxy.clone()
    }
}

impl GetSocketDigest for HeadStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.socket.clone()
    }
}

impl Peek for HeadStream {}

#[async_trait]
impl ServerApp for VhostApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let accepted = Instant::now();
        let _slot = self.conns.admit()?;
        let limits = &self.conns.limits;
        let deadline = accepted + limits.header_timeout;
        let shared = Arc::new(ConnShared::default());
        let mut stream = stream;
        if let Some(trusted) = &self.proxy_protocol {
            let peer = stream
                .get_socket_digest()
                .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(SocketAddr::ip));
            if peer.is_some_and(|ip| vhost_routing::any_contains(trusted, ip)) {
                let header = read_proxy_header(&mut stream);
                match tokio::time::timeout_at(deadline.into(), header).await {
                    Ok(Ok(Some(client))) => {
                        let _ = shared.client.set(client);
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, client = ?peer, "bad PROXY protocol header");
                        self.conns.closed(CloseReason::ClientClosed, None);
                        return None;
                    }
                    Err(_) => {
                        self.conns.closed(CloseReason::HeaderTimeout, None);
                        return None;
                    }
                }
            }
        }
        let stream = match self.tls_for(&stream) {
            Some(tls) => {
                let peer = stream
                    .get_socket_digest()
                    .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
                let plain = ConnStream::new(stream, None, Watch::Off, 0);
                let handshake = pingora_core::protocols::tls::server::handshake_with_callback(
                    &tls.acceptor,
                    plain,
                    &tls.certs,
                );
                match tokio::time::timeout_at(deadline.into(), handshake).await {
                    Ok(Ok(mut tls_stream)) => {
                        if tls_stream.ssl().selected_alpn_protocol()
                            == Some(crate::acme::ACME_TLS_ALPN)
                        {
                            // A TLS-ALPN-01 validation: the handshake was the answer.
                            tracing::debug!(client = ?peer, "acme-tls/1 handshake answered");
                            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls_stream).await;
                            return None;
                        }
                        Box::new(tls_stream) as Stream
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, client = ?peer, "TLS handshake failed");
                        self.conns.closed(CloseReason::HandshakeFailed, peer);
                        return None;
                    }
                    Err(_) => {
                        self.conns.closed(CloseReason::HeaderTimeout, peer);
                        return None;
                    }
                }
            }
            None => stream,
        };
        let mut stream = stream;
        let mut h2c = false;
        if self.h2c && stream.get_ssl_digest().is_none() {
            // Every HTTP/1 request is longer than 3 bytes; the h2 preface starts with "PRI".
            // The bytes are put back for whoever reads next.
            let mut start = [0u8; 3];
            match tokio::time::timeout_at(deadline.into(), stream.try_peek(&mut start)).await {
                Ok(Ok(peeked)) => h2c = peeked && &start == b"PRI",
                Ok(Err(_)) => return None,
                Err(_) => {
                    let peer = stream
                        .get_socket_digest()
                        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
                    self.conns.closed(CloseReason::HeaderTimeout, peer);
                    return None;
                }
            }
        }
        let max_head = limits.max_header_bytes as u64;
        if h2c || matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            let stream = Box::new(ConnStream::new(
                stream,
                Some(Arc::clone(&shared)),
                Watch::H2Preface,
                max_head,
            ));
            self.serve_h2(stream, &shared, deadline, shutdown).await;
        } else {
            let stream = Box::new(ConnStream::new(
                stream,
                Some(Arc::clone(&shared)),
                Watch::H1Head,
                max_head,
            ));
            self.serve_h1(stream, &shared, accepted, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        // Wakes requests of Pingora's that wait for a keep-alive client (fallback path).
        ServerApp::cleanup(&*self.http).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream with nothing to read (the scanner tests never read from it).
    #[derive(Debug)]
    struct ClosedStream;

    impl AsyncRead for ClosedStream {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for ClosedStream {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[async_trait]
    impl Shutdown for ClosedStream {
        async fn shutdown(&mut self) {}
    }

    impl UniqueID for ClosedStream {
        fn id(&self) -> UniqueIDType {
            -1
        }
    }

    impl Ssl for ClosedStream {}
    impl Peek for ClosedStream {}

    impl GetTimingDigest for ClosedStream {
        fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
            Vec::new()
        }
    }

    impl GetProxyDigest for ClosedStream {
        fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
            None
        }
    }

    impl GetSocketDigest for ClosedStream {
        fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
            None
        }
    }

    fn scanner(max_head: u64) -> ConnStream {
        ConnStream::new(
            Box::new(ClosedStream),
            Some(Arc::new(ConnShared::default())),
            Watch::H1Head,
            max_head,
        )
    }

    /// Feeds `chunks` as successive reads; the head end offset, or `Err` at the limit.
    fn head_end(max_head: u64, chunks: &[&[u8]]) -> Result<Option<u64>, ()> {
        let mut s = scanner(max_head);
        for chunk in chunks {
            if s.watch == Watch::H1Head {
                s.scan_head(chunk)?;
            }
            s.delivered += chunk.len() as u64;
        }
        Ok(s.head_end)
    }

    #[test]
    fn finds_the_end_of_a_head_with_any_line_ending_split_anywhere() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(head_end(1024, &[head]), Ok(Some(head.len() as u64)));
        for split in 1..head.len() {
            let (a, b) = head.split_at(split);
            assert_eq!(
                head_end(1024, &[a, b]),
                Ok(Some(head.len() as u64)),
                "split {split}"
            );
        }
        assert_eq!(
            head_end(1024, &[b"GET / HTTP/1.1\nHost: a\n\nBODY"]),
            Ok(Some(24))
        );
        assert_eq!(
            head_end(1024, &[b"GET / HTTP/1.1\r\nHost: a\n\r\n"]),
            Ok(Some(26))
        );
        assert_eq!(
            head_end(1024, &[b"GET / HTTP/1.1\r\nHost: a\r\n"]),
            Ok(None)
        );
    }

    /// The end of the head by definition: past leading empty lines, the first empty line.
    fn reference_end(data: &[u8]) -> Option<u64> {
        let start = data.iter().position(|b| *b != b'\r' && *b != b'\n')?;
        let rest = &data[start..];
        (0..rest.len()).find_map(|i| {
            let tail = &rest[i..];
            if tail.starts_with(b"\n\n") {
                Some((start + i + 2) as u64)
            } else if tail.starts_with(b"\n\r\n") {
                Some((start + i + 3) as u64)
            } else {
                None
            }
        })
    }

    proptest::proptest! {
        #[test]
        fn the_scanner_finds_the_reference_end_whatever_the_read_sizes(
            data in proptest::collection::vec(proptest::sample::select(vec![b'a', b':', b' ', b'\r', b'\n']), 0..80),
            a in 0usize..80,
            b in 0usize..80,
        ) {
            let (a, b) = (a.min(data.len()), b.min(data.len()));
            let (a, b) = (a.min(b), a.max(b));
            let found = head_end(1 << 20, &[&data[..a], &data[a..b], &data[b..]]).unwrap();
            proptest::prop_assert_eq!(found, reference_end(&data));
        }
    }

    /// A session over a stand-in parses a whole head from its prefix without reading; a prefix
    /// that only looked whole (empty lines before the request line) makes it read, which the
    /// fast path takes as its cue to decline; what the session writes is kept.
    #[test]
    fn a_stand_in_serves_the_prefix_and_reports_a_read_past_it() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let stand_in = |prefix: &'static [u8]| {
            let real: Stream = Box::new(scanner(8192));
            let mut session = ServerSession::new_http1(HeadStream::stand_in(&real));
            session.set_pipelined_prefix(BytesMut::from(prefix));
            session
        };
        let mut whole = stand_in(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b");
        assert!(rt.block_on(whole.read_request()).unwrap());
        assert!(!HeadStream::wanted_more(whole.stream()));
        assert_eq!(whole.req_header().uri.path(), "/a");
        rt.block_on(whole.respond_error(404)).unwrap();
        let ServerSession::H1(h1) = whole else {
            panic!("an HTTP/1 session")
        };
        let written = HeadStream::written(h1.into_inner());
        assert!(written.starts_with(b"HTTP/1.1 404 "), "{written:?}");

        let mut partial = stand_in(b"\r\n\r\nGET /a HTTP/1.1\r\nHost: h");
        let _ = rt.block_on(partial.read_request());
        assert!(HeadStream::wanted_more(partial.stream()));
    }

    #[test]
    fn empty_lines_before_the_request_line_do_not_end_the_head() {
        assert_eq!(
            head_end(1024, &[b"\r\n\r\n\n", b"GET / HTTP/1.1\r\n\r\n"]),
            Ok(Some(23))
        );
    }

    #[test]
    fn a_head_over_the_limit_is_refused_even_without_its_end() {
        let long = vec![b'a'; 2000];
        assert_eq!(head_end(1024, &[b"GET /", &long]), Err(()));
        let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
        head.extend_from_slice(&long);
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(head_end(1024, &[&head]), Err(()));
        // Body bytes after the head are not counted.
        let mut req = b"POST / HTTP/1.1\r\nContent-Length: 2000\r\n\r\n".to_vec();
        req.extend_from_slice(&long);
        assert_eq!(head_end(1024, &[&req]), Ok(Some(41)));
    }

    thread_local! {
        static IS_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    /// Runs of [`count_on_worker`] on a thread marked as a worker.
    static RAN_ON_WORKERS: AtomicUsize = AtomicUsize::new(0);

    fn count_on_worker() {
        if IS_WORKER.with(std::cell::Cell::get) {
            RAN_ON_WORKERS.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn upkeep_runs_once_on_each_thread_that_accepted_connections() {
        let conns = Connections::new(ConnLimits::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // Two threads with a runtime each (as Pingora's proxy threads), each admitting three
        // connections, then idling until told to stop.
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let conns = Arc::clone(&conns);
                let mut stop_rx = stop_rx.clone();
                std::thread::spawn(move || {
                    IS_WORKER.with(|w| w.set(true));
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        let slots: Vec<_> = (0..3).map(|_| conns.admit().unwrap()).collect();
                        drop(slots);
                        let _ = stop_rx.wait_for(|s| *s).await;
                    });
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while conns.workers() < 2 {
            assert!(Instant::now() < deadline, "workers never registered");
            std::thread::yield_now();
        }
        // A connection admitted outside any runtime registers nothing.
        drop(conns.admit().unwrap());
        assert_eq!(conns.workers(), 2);
        conns.run_on_workers(count_on_worker);
        while RAN_ON_WORKERS.load(Ordering::SeqCst) < 2 {
            assert!(
                Instant::now() < deadline,
                "upkeep did not run on both threads"
            );
            std::thread::yield_now();
        }
        stop_tx.send_replace(true);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            RAN_ON_WORKERS.load(Ordering::SeqCst),
            2,
            "ran more than once"
        );
    }
}
