//! The HTTP/1.1 fast path: one plain request, one HTTP/1 backend, without Pingora's
//! per-request machinery.
//!
//! Where it sits: [`crate::conn`]'s keep-alive loop hands each HTTP/1 request whose whole head
//! already arrived to [`FastPath::serve`] instead of Pingora's `process_new_http`. It runs the
//! same [`VhostProxy`] filters in the same order (`request_filter`, `upstream_peer`,
//! `fail_to_connect`, `connected_to_upstream`, `upstream_request_filter`, `response_filter`,
//! `fail_to_proxy`, `logging`) on Pingora's own session types — its HTTP/1 parser, its client
//! and server sessions, its upstream connection pool — but drives the two halves directly
//! instead of through two task channels and a boxed ~10 KB request future. (`VhostProxy` keeps
//! Pingora's no-op body filters and `upstream_response_filter`: they are not called here.)
//!
//! The server session parses the client's head from the bytes the loop already read, over a
//! stand-in stream ([`HeadStream`]); the connection's real stream stays with the loop and the
//! answer is written to it here: the backend's head as Pingora's client session parsed it,
//! written by [`answer_head`] with the proxy's edits (`x-request-id`, and the server session's
//! own `Date` and `Connection`) — not copied into a header map, edited with inserts and
//! serialised by the server session — and the body as the client session reads it, framed by
//! [`BodyOut`] as the server session's body writer would (`Content-Length`, chunked, until
//! close). Domains whose answers need more edits (header rules, a bucket cookie, the served
//! tag) run `response_filter` on a copy of the head. What the session writes itself (local
//! answers, error pages) goes to the stand-in and is copied to the connection when the request
//! ends.
//!
//! The request head for the backend is written by [`write_head`] from the client's head as
//! Pingora parsed it and the fields [`VhostProxy::forwarded`] decides (the same decision
//! `upstream_request_filter` applies to a header map), instead of being cloned into a header
//! map, edited and serialised; `HEAD` requests and domains with request header rules take the
//! header-map way.
//!
//! It takes only what it can forward exactly as Pingora would, and declines before any filter
//! ran (the caller replays the same bytes into Pingora's path): requests with a body, upgrades,
//! `CONNECT`, `Expect`, request targets that are not origin-form (`/…`), `Connection` options
//! other than `keep-alive` and `close`, and any request while a backend of the snapshot speaks
//! HTTP/2. What it does to a request on the way out is Pingora's default policy for such a
//! request: hop-by-hop fields removed, HTTP/1.1, the authority validated after the filters.
//!
//! A backend connection stays with the client connection between its requests
//! ([`ConnUpstream`], one at most): the next request to the same backend goes out on it
//! without a trip through Pingora's pool (whose release spawns an idle-watch task per
//! connection and request). It goes back to the pool when a request goes to another backend,
//! when the client connection has been idle for `[proxy] upstream_hold_ms`, and when the client
//! connection ends.

use bytes::{BufMut, BytesMut};
use futures_util::FutureExt as _;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Version};
use pingora_core::apps::HttpPersistentSettings;
use pingora_core::connectors::TransportConnector;
use pingora_core::protocols::http::authority::validate_request_authority;
use pingora_core::protocols::http::date::get_cached_date;
use pingora_core::protocols::http::v1::client::HttpSession as ClientV1;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Shutdown, Stream};
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_error::{Error, ErrorType, Result, RetryType};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{ProxyHttp, Session};
use std::fmt::Write as _;
use std::future::Future as _;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Sleep;

use crate::conn::HeadStream;
use crate::proxy::{
    Forwarded, RequestCtx, VhostProxy, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO,
    X_REQUEST_ID,
};

/// Hop-by-hop fields Pingora's default upstream policy removes from every request.
const HOP_BY_HOP: [HeaderName; 10] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::CONNECTION,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// How [`FastPath::serve`] ended.
pub(crate) enum Served {
    /// The request was served (or failed) and the connection carries another one.
    Keep {
        /// The next session's settings (keep-alive, pipelining) as this one left them.
        settings: HttpPersistentSettings,
        /// The length of this request's head at the start of the bytes the session was given:
        /// what follows it is the start of the next request.
        head_len: usize,
        /// A byte of the next request read while watching the client during a slow answer.
        extra: Option<u8>,
    },
    /// The request was served (or failed); the connection is done.
    Close,
    /// Not for the fast path: the session's settings, to replay the same head into Pingora's
    /// path on the connection (untouched: nothing was read from it or written to it).
    Declined(HttpPersistentSettings),
}

/// How long an answer may take before the client connection is watched for the client
/// leaving (Pingora watches from the start; a quick answer makes the watch a wasted read).
const PROBE_AFTER: Duration = Duration::from_millis(100);

/// The fast path of one listener (see the module docs).
pub(crate) struct FastPath {
    proxy: VhostProxy,
    upstream: TransportConnector,
    max_retries: usize,
    /// How long an idle client connection keeps its backend connections (zero: none kept).
    hold: Duration,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("max_retries", &self.max_retries)
            .field("hold", &self.hold)
            .finish_non_exhaustive()
    }
}

impl FastPath {
    /// A fast path running `proxy`'s filters, with its own upstream pool (`upstream`); client
    /// connections keep their backend connections for `hold` while idle.
    pub(crate) fn new(
        proxy: VhostProxy,
        upstream: TransportConnector,
        max_retries: usize,
        hold: Duration,
    ) -> Self {
        Self {
            proxy,
            upstream,
            max_retries: max_retries.max(1),
            hold,
        }
    }

    /// How long an idle client connection keeps its backend connections.
    pub(crate) fn hold(&self) -> Duration {
        self.hold
    }

    /// The backend side of a new client connection: nothing kept yet.
    pub(crate) fn conn_upstream(&self) -> ConnUpstream<'_> {
        ConnUpstream {
            pool: &self.upstream,
            held: None,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            probe: Box::pin(tokio::time::sleep(Duration::ZERO)),
            keep: !self.hold.is_zero(),
        }
    }

    /// Whether requests can take the fast path at all right now (no HTTP/2 backend).
    pub(crate) fn open(&self) -> bool {
        self.proxy.http1_only()
    }

    /// Serves the request whose whole head is the start of `session`'s pipelined prefix, or
    /// declines it untouched. The session runs on a [`HeadStream`] stand-in; `client` is the
    /// connection's real stream, to which the answer is written.
    /// The caller set the session up (settings, prefix). `keepalive_off`: the service is
    /// draining — applied after the head is read, since reading it re-derives keep-alive from
    /// the request's own headers.
    /// `upstream`: the client connection's backend side (its kept connection is used and
    /// refilled).
    pub(crate) async fn serve(
        &self,
        mut session: Session,
        client: &mut Stream,
        keepalive_off: bool,
        upstream: &mut ConnUpstream<'_>,
    ) -> Served {
        let read = session.downstream_session.read_request().await;
        if HeadStream::wanted_more(session.downstream_session.stream()) {
            // Pingora's parser needs more than the bytes that looked like a whole head.
            return Served::Declined(HttpPersistentSettings::for_session(
                &session.downstream_session,
            ));
        }
        match read {
            Ok(true) => {}
            Ok(false) => return Served::Close,
            Err(mut e) => {
                e.as_down();
                if matches!(e.etype, ErrorType::InvalidHTTPHeader) {
                    let _ = session.downstream_session.respond_error(400).await;
                }
                written_out(session, client).await;
                Shutdown::shutdown(&mut **client).await;
                return Served::Close;
            }
        }
        if !eligible(&mut session) {
            return Served::Declined(HttpPersistentSettings::for_session(
                &session.downstream_session,
            ));
        }
        if keepalive_off {
            session.set_keepalive(None);
        }
        let mut ctx = self.proxy.new_ctx();
        match self.proxy.request_filter(&mut session, &mut ctx).await {
            Ok(true) => {
                self.proxy.logging(&mut session, None, &mut ctx).await;
                return end(session, client, None).await;
            }
            Ok(false) => {}
            Err(e) => return self.failed(session, client, &mut ctx, e).await,
        }
        let mut server_reuse = false;
        let mut error = None;
        let mut extra = None;
        for _ in 0..self.max_retries {
            let (reuse, e) = self
                .proxy_once(&mut session, client, &mut ctx, upstream, &mut extra)
                .await;
            server_reuse = reuse;
            match e {
                Some(e) if may_retry(&e) && !ctx.answered() => {
                    error = Some(e);
                }
                e => {
                    error = e;
                    break;
                }
            }
        }
        if let Some(e) = error.as_ref() {
            self.proxy.fail_to_proxy(&mut session, e, &mut ctx).await;
        }
        self.proxy
            .logging(&mut session, error.as_deref(), &mut ctx)
            .await;
        if let Some(e) = error {
            session.downstream_session.on_proxy_failure(e);
        }
        if server_reuse {
            end(session, client, extra).await
        } else {
            close(session, client).await
        }
    }

    /// A filter failed before any backend was involved (as Pingora's `handle_error`).
    async fn failed(
        &self,
        mut session: Session,
        client: &mut Stream,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Served {
        let res = self.proxy.fail_to_proxy(&mut session, &e, ctx).await;
        self.proxy.logging(&mut session, Some(&e), ctx).await;
        session.downstream_session.on_proxy_failure(e);
        if res.can_reuse_downstream {
            end(session, client, None).await
        } else {
            close(session, client).await
        }
    }

    /// One attempt: a backend, a connection, the exchange. Returns whether the client
    /// connection can be reused and the error, if any (retryable or not).
    async fn proxy_once(
        &self,
        session: &mut Session,
        client: &mut Stream,
        ctx: &mut RequestCtx,
        upstream: &mut ConnUpstream<'_>,
        extra: &mut Option<u8>,
    ) -> (bool, Option<Box<Error>>) {
        let peer = match self.proxy.upstream_peer(session, ctx).await {
            Ok(peer) => peer,
            Err(e) => return (false, Some(e)),
        };
        let key = peer.reuse_hash();
        let (stream, reused) = match upstream.take(key) {
            Some(stream) => (stream, true),
            // As Pingora's HTTP/1 connector: the pool, else a new connection.
            None => match self.upstream.get_stream(&*peer).await {
                Ok(got) => got,
                Err(mut e) => {
                    e.as_up();
                    let e = self.proxy.fail_to_connect(session, &peer, ctx, e);
                    return (false, Some(e.into_up()));
                }
            },
        };
        self.proxy.backend_connected(ctx);
        let sent = self
            .send_head(session, stream, &peer, ctx, upstream.timer.as_mut())
            .await;
        let (mut backend, (server_reuse, client_reuse, error)) = match sent {
            Ok(mut backend) => {
                let outcome = self
                    .forward_answer(
                        session,
                        client,
                        &mut backend,
                        &peer,
                        ctx,
                        upstream.timer.as_mut(),
                        (upstream.probe.as_mut(), extra),
                    )
                    .await;
                (backend, outcome)
            }
            Err((unused, e)) => {
                // Nothing went out on it: as good as before.
                if let Some(stream) = unused {
                    upstream.keep(key, stream, peer.idle_timeout());
                }
                let e = self.proxy.error_while_proxy(&peer, session, e, ctx, reused);
                return (false, Some(e));
            }
        };
        if client_reuse {
            // As Pingora's release: only a connection whose exchange ended cleanly and that
            // both sides keep alive.
            backend.respect_keepalive();
            if let Some(stream) = backend.reuse().await {
                upstream.keep(key, stream, peer.idle_timeout());
            }
        }
        let error = error.map(|e| {
            let mut e = self.proxy.error_while_proxy(&peer, session, e, ctx, reused);
            if ctx.answered() {
                // Part of an answer is out: another attempt would send a second one.
                e.set_retry(false);
            }
            e
        });
        (server_reuse, error)
    }

    /// Sends the request head: written straight from the client's parsed head and the
    /// forwarded fields ([`write_head`]) — or, for a `HEAD` request (the client session must know
    /// the method to frame the answer) and a domain with request header rules, edited as a
    /// Pingora head by `upstream_request_filter` and written by the client session. On failure,
    /// the connection if nothing was written on it.
    async fn send_head(
        &self,
        session: &mut Session,
        mut stream: Stream,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        timer: Pin<&mut Sleep>,
    ) -> std::result::Result<ClientV1, (Option<Stream>, Box<Error>)> {
        // The client session's own timeouts stay off: `timed` applies the peer's.
        let write_timeout = peer.options.write_timeout;
        let rules = ctx
            .route()
            .is_some_and(|r| r.vhost().request_headers.is_some());
        let client_head = session.req_header();
        if client_head.method != Method::HEAD && client_head.has_case() && !rules {
            // No authority check after the filters here: this head keeps the client's `Host` and
            // target, which nothing changed since Pingora's parser checked them
            // (`validate_request` runs `validate_request_authority` on every request head).
            debug_assert!(check_authority(session.req_header()).is_ok());
            let fwd = self.proxy.forwarded(session, ctx);
            let head = match write_head(session.req_header(), &fwd) {
                Ok(head) => head,
                Err(e) => return Err((Some(stream), e)),
            };
            let write_error =
                |e| Error::because(ErrorType::WriteError, "while writing request headers", e);
            let write = async {
                stream.write_all(&head).await.map_err(write_error)?;
                stream.flush().await.map_err(write_error)
            };
            if let Err(e) = timed_write(timer, write_timeout, write).await {
                return Err((None, e));
            }
            return Ok(ClientV1::new_with_options(stream, peer));
        }
        let mut req = upstream_head(session.req_header());
        if let Err(e) = self
            .proxy
            .upstream_request_filter(session, &mut req, ctx)
            .await
        {
            return Err((Some(stream), e));
        }
        if let Err(e) = check_authority(&req) {
            return Err((Some(stream), e));
        }
        let mut client = ClientV1::new_with_options(stream, peer);
        let write = async {
            client.write_request_header(Box::new(req)).await?;
            client.finish_body().await
        };
        if let Err(e) = timed_write(timer, write_timeout, write).await {
            return Err((None, e));
        }
        Ok(client)
    }

    /// Forwards the answer to the request just sent, writing it to the client connection
    /// itself: the backend's head as Pingora's client session parsed it (not copied) with the
    /// proxy's edits ([`answer_head`]), then the body pieces as that session reads them (not
    /// copied either), framed as Pingora's server session would ([`BodyOut`]). Returns (client
    /// connection reusable, backend connection reusable, error).
    #[allow(clippy::too_many_arguments)]
    async fn forward_answer(
        &self,
        session: &mut Session,
        client: &mut Stream,
        backend: &mut ClientV1,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut timer: Pin<&mut Sleep>,
        (mut probe, extra): (Pin<&mut Sleep>, &mut Option<u8>),
    ) -> (bool, bool, Option<Box<Error>>) {
        let read_timeout = peer.options.read_timeout;
        let head_request = session.req_header().method == Method::HEAD;
        // Until the answer's head: a client that leaves meanwhile is noticed (as Pingora does),
        // once the answer takes longer than `PROBE_AFTER` (the probe is a read on the client
        // connection — on TLS a whole `SSL_read` — wasted on every quick answer).
        let mut watch = ClientWatch::Waiting;
        probe
            .as_mut()
            .reset(tokio::time::Instant::now() + PROBE_AFTER);
        let mut buf = BytesMut::with_capacity(512);
        let mut out = loop {
            let read = timed(
                timer.as_mut(),
                read_timeout,
                backend.read_response(),
                ErrorType::ReadTimedout,
                "while reading the backend's answer (timeout)",
            );
            let read = {
                let mut read = std::pin::pin!(read);
                let mut byte = [0u8; 1];
                loop {
                    tokio::select! {
                        biased;
                        read = &mut read => break read,
                        () = probe.as_mut(), if watch == ClientWatch::Waiting => {
                            watch = if extra.is_none() {
                                ClientWatch::Reading
                            } else {
                                ClientWatch::Done
                            };
                        }
                        got = client.read(&mut byte), if watch == ClientWatch::Reading => {
                            // As Pingora's idle probe: after one byte of a pipelined request
                            // the client is not read again during this request.
                            watch = ClientWatch::Done;
                            match got {
                                // Pipelined: the start of the next request.
                                Ok(n) if n > 0 => *extra = Some(byte[0]),
                                _ => {
                                    session.set_keepalive(None);
                                    let e = Error::explain(
                                        ErrorType::ConnectionClosed,
                                        "Prematurely before response header is sent",
                                    );
                                    return (false, false, Some(e.into_down()));
                                }
                            }
                        }
                    }
                }
            };
            if let Err(e) = read {
                return (false, false, Some(e.into_up()));
            }
            // Asked after every head, as Pingora's `read_response_task` does.
            let body_done = backend.is_body_done();
            let Some(head) = backend.resp_header() else {
                let e =
                    Error::explain(ErrorType::InvalidHTTPHeader, "no response from the backend");
                return (false, false, Some(e.into_up()));
            };
            if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
                let e = Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "101 answer to a request that asked for no upgrade",
                );
                return (false, false, Some(e.into_up()));
            }
            if head.status.is_informational() {
                // Passed on at once, with the response filter's edits (Pingora's path runs the
                // filters on 1xx heads too) and without the session's `Date` and `Connection`.
                buf.clear();
                let written = self.edited_head(session, ctx, head, false, true, None, &mut buf);
                if let Err(e) = written.await {
                    return (false, false, Some(e));
                }
                if let Err(e) = write_client(client, &buf, true).await {
                    return (false, false, Some(e));
                }
                continue;
            }
            // A close-delimited answer goes on as chunked, so the client connection survives
            // it (as Pingora's proxy does).
            let no_body = head_request || matches!(head.status.as_u16(), 204 | 304);
            let chunked = !no_body
                && !body_done
                && head.headers.get(header::TRANSFER_ENCODING).is_none()
                && head.headers.get(header::CONTENT_LENGTH).is_none();
            let status = head.status.as_u16();
            let keepalive = session
                .downstream_session
                .as_http1()
                .is_some_and(|h| h.will_keepalive());
            buf.clear();
            let fields = SessionFields {
                keepalive,
                date: get_cached_date(),
            };
            let written =
                self.edited_head(session, ctx, head, chunked, no_body, Some(fields), &mut buf);
            let out = match written.await {
                Ok(out) => out,
                Err(e) => return (false, false, Some(e)),
            };
            if matches!(out, BodyOut::UntilClose) {
                // As Pingora: a close-delimited answer ends the client connection.
                session.set_keepalive(None);
            }
            // Pingora flushes a head without a length (its body may come slowly) and a head
            // without a body.
            let flush = !matches!(out, BodyOut::Length { .. }) || out.finished();
            if let Err(e) = write_client(client, &buf, flush).await {
                return (false, false, Some(e));
            }
            ctx.set_answered(status);
            break out;
        };
        while !backend.is_body_done() {
            let piece = timed(
                timer.as_mut(),
                read_timeout,
                backend.read_body_ref(),
                ErrorType::ReadTimedout,
                "while reading the backend's answer (timeout)",
            )
            .await;
            match piece {
                Ok(Some(data)) if !data.is_empty() => {
                    match out.write(client, data, &mut buf).await {
                        Ok(n) => ctx.add_answered_bytes(n),
                        Err(e) => return (false, false, Some(e)),
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return (false, false, Some(e.into_up())),
            }
        }
        if let Err(e) = out.finish(client).await {
            return (false, true, Some(e));
        }
        (true, true, None)
    }

    /// Writes `head` (an answer's, as the backend session parsed it) into `buf` as the client
    /// gets it: with the fast edit when `x-request-id` is all the response filter would change
    /// ([`VhostProxy::answer_edit`]), else through `response_filter` on a copy. `chunked`: a
    /// close-delimited answer, re-framed; `fields`: the server session's own fields (final
    /// heads only). Returns how the written head frames the body (see [`body_out`]).
    #[allow(clippy::too_many_arguments)]
    async fn edited_head(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        head: &ResponseHeader,
        chunked: bool,
        no_body: bool,
        fields: Option<SessionFields>,
        buf: &mut BytesMut,
    ) -> Result<BodyOut> {
        if let Some(request_id) = self.proxy.answer_edit(ctx) {
            let edit = Edit {
                chunked,
                request_id,
                session: fields,
            };
            answer_head(head, &edit, buf)?;
            return Ok(body_out(head, chunked, no_body));
        }
        let mut head = head.clone();
        if chunked {
            // Where Pingora's proxy adds it: before the filters.
            head.set_version(Version::HTTP_11);
            head.insert_header(header::TRANSFER_ENCODING, "chunked")?;
        }
        self.proxy.response_filter(session, &mut head, ctx).await?;
        let edit = Edit {
            chunked: false,
            request_id: None,
            session: fields,
        };
        answer_head(&head, &edit, buf)?;
        Ok(body_out(&head, false, no_body))
    }
}

/// What one client connection keeps for the backend side of its fast-path requests: two
/// timers (backend reads and writes; watching the client while an answer takes long), pushed
/// later for each use instead of a timer registration per read and write, and the backend
/// connection of its last request — at most one, so a client connection never holds more than
/// one backend descriptor (the budget `max_connections` is derived with). That connection goes back to the pool when the next
/// request goes to another backend, when the client connection has been idle for the hold time
/// ([`Self::release`]), or when it ends (drop).
pub(crate) struct ConnUpstream<'a> {
    pool: &'a TransportConnector,
    held: Option<HeldUpstream>,
    /// Bounds each backend read and write (see [`timed`]).
    timer: Pin<Box<Sleep>>,
    /// When to start watching the client while waiting for an answer (see `PROBE_AFTER`).
    probe: Pin<Box<Sleep>>,
    /// Keep a connection at all (`false`: straight back to the pool).
    keep: bool,
}

/// One kept backend connection.
struct HeldUpstream {
    /// The peer's reuse hash (the pool's key).
    key: u64,
    stream: Stream,
    idle_timeout: Option<Duration>,
}

impl ConnUpstream<'_> {
    /// Whether no connection is kept.
    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_none()
    }

    /// The kept connection if it goes to the backend of `key` and is still idle and open (as
    /// Pingora's pool checks: a backend that closed it or sent something unasked does not get
    /// a request on it). A connection to another backend goes back to the pool first.
    fn take(&mut self, key: u64) -> Option<Stream> {
        let held = self.held.take()?;
        if held.key != key {
            self.pool
                .release_stream(held.stream, held.key, held.idle_timeout);
            return None;
        }
        let mut stream = held.stream;
        idle_and_open(&mut stream).then_some(stream)
    }

    /// Keeps `stream` (to the backend of `key`) for the next request.
    fn keep(&mut self, key: u64, stream: Stream, idle_timeout: Option<Duration>) {
        if !self.keep {
            self.pool.release_stream(stream, key, idle_timeout);
            return;
        }
        let kept = HeldUpstream {
            key,
            stream,
            idle_timeout,
        };
        if let Some(old) = self.held.replace(kept) {
            self.pool
                .release_stream(old.stream, old.key, old.idle_timeout);
        }
    }

    /// Gives the kept connection back to the pool.
    pub(crate) fn release(&mut self) {
        if let Some(held) = self.held.take() {
            self.pool
                .release_stream(held.stream, held.key, held.idle_timeout);
        }
    }
}

impl Drop for ConnUpstream<'_> {
    fn drop(&mut self) {
        // The pool watches idle connections from a task: only inside the runtime (a
        // connection dropped while the runtime shuts down just closes its backend connection).
        if tokio::runtime::Handle::try_current().is_ok() {
            self.release();
        }
    }
}

/// Whether an idle backend connection is still open and silent (Pingora's pool test: a read
/// that would block).
fn idle_and_open(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    tokio::task::unconstrained(stream.read(&mut byte))
        .now_or_never()
        .is_none()
}

/// `fut`, or a `kind` error once `limit` has passed since the call. `timer` is the client
/// connection's one timer, pushed later for each use: unlike Pingora's per-read timeouts no
/// timer is registered per backend read or write. A limit covers one step — writing the request,
/// reading the answer's head, reading one piece of its body — rather than each socket read.
async fn timed<T>(
    mut timer: Pin<&mut Sleep>,
    limit: Option<Duration>,
    fut: impl std::future::Future<Output = Result<T>>,
    kind: ErrorType,
    what: &'static str,
) -> Result<T> {
    let Some(limit) = limit else {
        return fut.await;
    };
    let mut fut = std::pin::pin!(fut);
    // Most steps are done at the first poll (a request head into the socket buffer, a body
    // piece that came with the answer's head): the timer is pushed only for a step that waits.
    let mut armed = false;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        if !armed {
            armed = true;
            timer.as_mut().reset(tokio::time::Instant::now() + limit);
        }
        timer
            .as_mut()
            .poll(cx)
            .map(|()| Err(Error::explain(kind.clone(), what)))
    })
    .await
}

/// Writing the request to the backend, within the peer's write timeout (see [`timed`]); errors
/// are the backend's.
async fn timed_write<T>(
    timer: Pin<&mut Sleep>,
    limit: Option<Duration>,
    write: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    timed(
        timer,
        limit,
        write,
        ErrorType::WriteTimedout,
        "while writing the request to the backend (timeout)",
    )
    .await
    .map_err(|e| e.into_up())
}

/// Whether `e` allows another attempt. An undecided "only if the connection was reused" never
/// gets here undecided (`error_while_proxy` decides it), but asking Pingora's `retry()` about one
/// would panic: such an error counts as final.
fn may_retry(e: &Error) -> bool {
    matches!(e.retry, RetryType::Decided(true))
}

/// Whether the request is one the fast path forwards exactly as Pingora would (see the
/// module docs).
fn eligible(session: &mut Session) -> bool {
    if !session.downstream_session.is_body_empty() {
        return false;
    }
    let req = session.req_header();
    if req.version == Version::HTTP_2
        || req.method == Method::CONNECT
        || req.raw_path().first() != Some(&b'/')
    {
        return false;
    }
    // One pass over the fields (a handful) instead of four hashed lookups.
    req.headers.iter().all(|(name, value)| {
        if name == header::CONNECTION {
            only_tokens(value.as_bytes(), &[b"keep-alive", b"close"])
        } else {
            name != header::UPGRADE && name != header::EXPECT && name != header::TRANSFER_ENCODING
        }
    })
}

/// Whether every comma-separated token of `value` is one of `allowed` (ignoring case).
fn only_tokens(value: &[u8], allowed: &[&[u8]]) -> bool {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .all(|t| allowed.iter().any(|a| t.eq_ignore_ascii_case(a)))
}

/// The request head sent to the backend: the client's, with Pingora's default policy for such
/// a request (hop-by-hop fields and a field named by `Connection: close` removed, HTTP/1.1).
/// (Rebuilding it with room for the fields the filters add, instead of cloning a full one,
/// costs as much as the maps' growth it avoids: measured, docs/performance.md.)
fn upstream_head(client: &RequestHeader) -> RequestHeader {
    let mut req = client.clone();
    req.set_version(Version::HTTP_11);
    // Usually none is there: one pass over the names instead of ten hashed removals.
    if req.headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        for name in &HOP_BY_HOP {
            req.remove_header(name);
        }
    }
    // `Connection: close` names a field `close` (the only other option taken is `keep-alive`,
    // removed above).
    if names_close(client) {
        req.remove_header("close");
    }
    req
}

/// Pingora's checks of a request's authority after the filters: no userinfo in `Host`, `Host`
/// and target consistent.
fn check_authority(req: &RequestHeader) -> Result<()> {
    if req
        .headers
        .get(header::HOST)
        .is_some_and(|h| h.as_bytes().contains(&b'@'))
    {
        let e = Error::explain(ErrorType::InvalidHTTPHeader, "userinfo in Host header");
        return Err(e.into_in());
    }
    validate_request_authority(req).map_err(|e| e.into_in())
}

/// The request head for the backend, written from the client's head as Pingora parsed it and
/// the forwarded fields — the same head `upstream_head` and `upstream_request_filter` make and
/// Pingora's client session writes, without building it as a header map first: the request
/// line with HTTP/1.1; the client's fields in their order and case, less the hop-by-hop ones
/// (and a field named by `Connection: close`) and those the forwarded fields replace; then
/// `x-forwarded-for`, `x-request-id`, `x-forwarded-proto`, `Host` (when missing) and
/// `x-forwarded-host`, under the names Pingora writes for them. Only for heads that keep their
/// names' case (Pingora's HTTP/1 parser keeps it).
fn write_head(client: &RequestHeader, fwd: &Forwarded) -> Result<BytesMut> {
    let path = client.raw_path();
    // Pingora refuses to write these (and its parser never lets them through).
    if path.iter().any(|b| matches!(b, 0 | b'\n' | b'\r' | b' ')) {
        return Err(Error::explain(
            ErrorType::InvalidHTTPHeader,
            "request-line contains forbidden delimiter bytes",
        ));
    }
    let close = names_close(client);
    let replaced = |name: &HeaderName| {
        (name == X_FORWARDED_FOR && (fwd.for_.is_some() || fwd.drop_client_chain))
            || (name == X_REQUEST_ID && fwd.request_id.is_some())
            || name == X_FORWARDED_PROTO
            || (name == X_FORWARDED_HOST && fwd.host.is_some())
    };
    let mut head = BytesMut::with_capacity(512);
    head.put_slice(client.method.as_str().as_bytes());
    head.put_u8(b' ');
    head.put_slice(path);
    head.put_slice(b" HTTP/1.1\r\n");
    // Both maps list the fields in the same order (Pingora relies on it to write them).
    for ((name, _), (case, value)) in client.headers.iter().zip(client.case_header_iter()) {
        let hop = HOP_BY_HOP.contains(name) || (close && name == "close");
        if !hop && !replaced(name) {
            put_field(&mut head, case.as_slice(), &[value.as_bytes()]);
        }
    }
    if let Some(chain) = &fwd.for_ {
        // The client's value and the address, as `ForwardedFor::value` joins them.
        let name = b"x-forwarded-for";
        match chain.parts() {
            (Some(prev), ip) => put_field(&mut head, name, &[prev, b", ", ip]),
            (None, ip) => put_field(&mut head, name, &[ip]),
        }
    }
    if let Some(id) = &fwd.request_id {
        put_field(&mut head, b"x-request-id", &[id.as_bytes()]);
    }
    put_field(&mut head, b"x-forwarded-proto", &[fwd.proto.as_bytes()]);
    if let Some(host) = &fwd.host {
        if !client.headers.contains_key(header::HOST) {
            put_field(&mut head, b"Host", &[host.as_bytes()]);
        }
        put_field(&mut head, b"x-forwarded-host", &[host.as_bytes()]);
    }
    head.put_slice(b"\r\n");
    Ok(head)
}

/// Appends the field `name: value` (the value given in pieces) to a head.
fn put_field(head: &mut BytesMut, name: &[u8], value: &[&[u8]]) {
    head.put_slice(name);
    head.put_slice(b": ");
    for piece in value {
        head.put_slice(piece);
    }
    head.put_slice(b"\r\n");
}

/// Whether the request's `Connection` fields list `close` (which, as a connection option,
/// also names a field `close` that is not passed on).
fn names_close(req: &RequestHeader) -> bool {
    req.headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| has_token(v.as_bytes(), b"close"))
}

/// Whether `value` lists `token` (ignoring case).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Ends a request whose client connection can carry another one (as Pingora's `finish` for
/// a request without a body): what the session wrote goes out, then the connection is kept if
/// both sides keep it alive.
async fn end(mut session: Session, client: &mut Stream, extra: Option<u8>) -> Served {
    let ds = &mut session.downstream_session;
    let finished = ds.finish_body().await.is_ok();
    // Where the next request's bytes start, and its session's settings.
    let next = ds
        .as_http1()
        .filter(|h| finished && h.will_keepalive())
        .map(|h| {
            (
                h.get_headers_raw_bytes().len(),
                HttpPersistentSettings::for_session(ds),
            )
        });
    if !written_out(session, client).await {
        return Served::Close;
    }
    match next {
        Some((head_len, settings)) => Served::Keep {
            settings,
            head_len,
            extra,
        },
        None => {
            Shutdown::shutdown(&mut **client).await;
            Served::Close
        }
    }
}

/// Ends a request whose client connection cannot carry another: what the session wrote goes
/// out, and the connection is dropped by the caller.
async fn close(session: Session, client: &mut Stream) -> Served {
    written_out(session, client).await;
    Served::Close
}

/// Writes to the client what the session wrote to its stand-in stream (a local answer, an
/// error page), and flushes. Whether that worked.
async fn written_out(session: Session, client: &mut Stream) -> bool {
    let ServerSession::H1(h1) = *session.downstream_session else {
        return false;
    };
    let out = HeadStream::written(h1.into_inner());
    let write = async {
        if !out.is_empty() {
            client.write_all(&out).await?;
        }
        client.flush().await
    };
    write.await.is_ok()
}

/// Writes `bytes` to the client (and flushes if asked); errors are the client's.
async fn write_client(client: &mut Stream, bytes: &[u8], flush: bool) -> Result<()> {
    let write = async {
        client.write_all(bytes).await?;
        if flush {
            client.flush().await?;
        }
        Ok::<(), std::io::Error>(())
    };
    write.await.map_err(|e| {
        Error::because(ErrorType::WriteError, "while writing the answer", e).into_down()
    })
}

/// Watching the client while waiting for the answer's head (see `PROBE_AFTER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientWatch {
    /// Not yet: the answer may still come quickly.
    Waiting,
    /// Reading one byte: the end of the connection, or the start of a pipelined request.
    Reading,
    /// No more reads during this request.
    Done,
}

/// The edits to an answer's head that [`answer_head`] makes while writing it.
struct Edit<'a> {
    /// Add `Transfer-Encoding: chunked` (and answer in HTTP/1.1): a close-delimited answer.
    chunked: bool,
    /// The `x-request-id` to set (the response filter's edit, also on 1xx heads).
    request_id: Option<&'a HeaderValue>,
    /// The server session's own fields, on final heads only.
    session: Option<SessionFields>,
}

/// The fields Pingora's HTTP/1 server session sets on every final answer.
struct SessionFields {
    /// The client connection stays open (`Connection: keep-alive`, else `close`).
    keepalive: bool,
    /// The `Date` (Pingora's, cached per second).
    date: HeaderValue,
}

/// Writes an answer's head for the client as Pingora's HTTP/1 server session does
/// (`prepare_response_header`, `http_resp_header_to_buf`) after the proxy's edits — which a
/// header map would make with `insert_header`: the status line with the answer's version and
/// reason; the answer's fields in their order and case, values of one name together; a field
/// the edits set (`x-request-id`, then on a final head the session's `Date` and `Connection`)
/// written once, in place of the first of the answer's own, or after all of them
/// (`Transfer-Encoding` first).
fn answer_head(head: &ResponseHeader, edit: &Edit<'_>, buf: &mut BytesMut) -> Result<()> {
    let version = if edit.chunked {
        Version::HTTP_11
    } else {
        head.version
    };
    let version: &[u8] = match version {
        Version::HTTP_09 => b"HTTP/0.9 ",
        Version::HTTP_10 => b"HTTP/1.0 ",
        Version::HTTP_11 => b"HTTP/1.1 ",
        _ => {
            return Err(Error::explain(
                ErrorType::WriteError,
                "serializing response header",
            ))
        }
    };
    buf.put_slice(version);
    buf.put_slice(head.status.as_str().as_bytes());
    buf.put_u8(b' ');
    if let Some(reason) = head.get_reason_phrase() {
        buf.put_slice(reason.as_bytes());
    }
    buf.put_slice(b"\r\n");
    let session = edit.session.as_ref();
    let connection: &[u8] = if session.is_some_and(|s| s.keepalive) {
        b"keep-alive"
    } else {
        b"close"
    };
    // Done (or not to be set at all).
    let mut id_done = edit.request_id.is_none();
    let (mut date_done, mut connection_done) = (session.is_none(), session.is_none());
    let mut cases = head.case_header_iter();
    for (name, value) in head.headers.iter() {
        let case = cases.next().map_or(&b""[..], |(c, _)| c.as_slice());
        let replaced = if name == header::DATE {
            session.map(|s| (&mut date_done, &b"Date"[..], s.date.as_bytes()))
        } else if name == header::CONNECTION {
            session.map(|_| (&mut connection_done, &b"Connection"[..], connection))
        } else if name == X_REQUEST_ID {
            edit.request_id
                .map(|id| (&mut id_done, &b"x-request-id"[..], id.as_bytes()))
        } else {
            None
        };
        match replaced {
            // The first value of the name is replaced; the others go.
            Some((done, name, value)) => {
                if !std::mem::replace(done, true) {
                    put_field(buf, name, &[value]);
                }
            }
            None => put_field(buf, case_or_name(case, name), &[value.as_bytes()]),
        }
    }
    if edit.chunked {
        put_field(buf, b"Transfer-Encoding", &[b"chunked"]);
    }
    if let Some(id) = edit.request_id.filter(|_| !id_done) {
        put_field(buf, b"x-request-id", &[id.as_bytes()]);
    }
    if let Some(s) = session {
        if !date_done {
            put_field(buf, b"Date", &[s.date.as_bytes()]);
        }
        if !connection_done {
            put_field(buf, b"Connection", &[connection]);
        }
    }
    buf.put_slice(b"\r\n");
    Ok(())
}

/// A field's name as received, or (a head built without case, which Pingora's parser never
/// makes) its lower-case name.
fn case_or_name<'a>(case: &'a [u8], name: &'a HeaderName) -> &'a [u8] {
    if case.is_empty() {
        name.as_str().as_bytes()
    } else {
        case
    }
}

/// How the body of an answer with `head` goes to the client (Pingora's server session: no body
/// for `HEAD`, 204 and 304; chunked if the last transfer coding is; else `Content-Length`; else
/// until the connection closes). `chunked`: the fast edit adds `Transfer-Encoding: chunked`.
fn body_out(head: &ResponseHeader, chunked: bool, no_body: bool) -> BodyOut {
    if no_body {
        return BodyOut::Length {
            total: 0,
            written: 0,
        };
    }
    let last_coding = head
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .map(|v| {
            let v = v.as_bytes();
            v.iter()
                .rposition(|b| *b == b',')
                .map_or(v, |i| &v[i + 1..])
                .trim_ascii()
        });
    if chunked || last_coding.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")) {
        return BodyOut::Chunked;
    }
    match content_length(&head.headers) {
        Some(total) => BodyOut::Length { total, written: 0 },
        None => BodyOut::UntilClose,
    }
}

/// The framing `Content-Length` of an answer (Pingora's rule: every value, and every item of a
/// comma-separated value, the same decimal number).
fn content_length(headers: &http::HeaderMap) -> Option<usize> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for item in value.as_bytes().split(|b| *b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let n: usize = std::str::from_utf8(item).ok()?.parse().ok()?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        }
    }
    length
}

/// Pingora's error for an answer that ended before its `Content-Length`.
const PREMATURE_BODY_END: ErrorType = ErrorType::new("PrematureBodyEnd");

/// How an answer's body is framed for the client, and how much of it went out (the modes of
/// Pingora's HTTP/1 body writer, with its flushes).
#[derive(Debug, Clone, Copy)]
enum BodyOut {
    /// At most `total` bytes (zero: no body).
    Length { total: usize, written: usize },
    /// Chunked: each piece a chunk, flushed.
    Chunked,
    /// Until the connection closes: each piece flushed.
    UntilClose,
}

impl BodyOut {
    /// Whether all of a length-framed body went out.
    fn finished(&self) -> bool {
        matches!(self, Self::Length { total, written } if written >= total)
    }

    /// Writes a piece of the body; returns how many of its bytes went out (a length-framed
    /// body takes no more than its length).
    async fn write(
        &mut self,
        client: &mut Stream,
        data: &[u8],
        buf: &mut BytesMut,
    ) -> Result<usize> {
        match self {
            Self::Length { total, written } => {
                let n = data.len().min(total.saturating_sub(*written));
                if n == 0 {
                    return Ok(0);
                }
                *written += n;
                let done = *written >= *total;
                write_client(client, &data[..n], done).await?;
                Ok(n)
            }
            Self::Chunked => {
                buf.clear();
                let _ = write!(ChunkSize(buf), "{:X}\r\n", data.len());
                let write = async {
                    client.write_all(buf).await?;
                    client.write_all(data).await?;
                    client.write_all(b"\r\n").await?;
                    client.flush().await
                };
                write.await.map_err(|e| {
                    Error::because(ErrorType::WriteError, "while writing body", e).into_down()
                })?;
                Ok(data.len())
            }
            Self::UntilClose => {
                write_client(client, data, true).await?;
                Ok(data.len())
            }
        }
    }

    /// Ends the body: the last chunk, or an error if fewer bytes than its length went out.
    async fn finish(&mut self, client: &mut Stream) -> Result<()> {
        match *self {
            Self::Length { total, written } if written < total => Err(Error::explain(
                PREMATURE_BODY_END,
                format!("Content-length: {total} bytes written: {written}"),
            )
            .into_down()),
            Self::Chunked => write_client(client, b"0\r\n\r\n", true).await,
            _ => write_client(client, b"", true).await,
        }
    }
}

/// `fmt::Write` into a byte buffer (a chunk's size line).
struct ChunkSize<'a>(&'a mut BytesMut);

impl std::fmt::Write for ChunkSize<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.put_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_options_are_checked_token_by_token() {
        let ok: &[&[u8]] = &[b"keep-alive", b"close"];
        assert!(only_tokens(b"keep-alive", ok));
        assert!(only_tokens(b"Keep-Alive, close", ok));
        assert!(only_tokens(b" close ,", ok));
        assert!(!only_tokens(b"keep-alive, x-secret", ok));
        assert!(!only_tokens(b"upgrade", ok));
        assert!(has_token(b"keep-alive, CLOSE", b"close"));
        assert!(!has_token(b"closed", b"close"));
    }

    #[test]
    fn the_upstream_head_keeps_case_and_drops_hop_by_hop_fields() {
        let mut client = RequestHeader::build("GET", b"/a?b=c", Some(7)).unwrap();
        client.set_version(Version::HTTP_10);
        for (name, value) in [
            ("Host", "h.test"),
            ("X-Keep", "1"),
            ("Connection", "keep-alive, Close"),
            ("TE", "trailers"),
            ("x-KEEP", "2"),
            ("close", "named"),
            ("Keep-Alive", "timeout=5"),
        ] {
            client.append_header(name, value).unwrap();
        }
        let up = upstream_head(&client);
        let mut wire = Vec::new();
        up.header_to_h1_wire(&mut wire);
        let wire = String::from_utf8(wire).unwrap();
        let mut lines: Vec<&str> = wire.split_terminator("\r\n").collect();
        // Values of one name keep their order; fields of different names may move.
        let keep = |l: &&str| l.starts_with("X-Keep") || l.starts_with("x-KEEP");
        let kept: Vec<&str> = lines.iter().copied().filter(keep).collect();
        assert_eq!(kept, ["X-Keep: 1", "x-KEEP: 2"], "{wire}");
        lines.sort_unstable();
        assert_eq!(lines, ["Host: h.test", "X-Keep: 1", "x-KEEP: 2"], "{wire}");
        assert_eq!(up.version, Version::HTTP_11);
        assert_eq!(up.raw_path(), b"/a?b=c");
        assert_eq!(up.method, Method::GET);
        // Without `Connection: close`, a field named `close` is an ordinary one.
        let mut client = RequestHeader::build("GET", b"/", None).unwrap();
        client.append_header("Close", "kept").unwrap();
        let up = upstream_head(&client);
        assert_eq!(up.headers.get("close").unwrap(), "kept");
    }

    /// The head Pingora's server session writes for `head` after the same edits, made as the
    /// proxy and the session make them (header-map inserts), serialised by Pingora.
    fn pingora_wire(head: &ResponseHeader, edit: &Edit<'_>) -> String {
        let mut head = head.clone();
        if edit.chunked {
            head.set_version(Version::HTTP_11);
            head.insert_header(header::TRANSFER_ENCODING, "chunked")
                .unwrap();
        }
        if let Some(id) = edit.request_id {
            head.insert_header("x-request-id", id.clone()).unwrap();
        }
        if let Some(session) = &edit.session {
            head.insert_header(header::DATE, session.date.clone())
                .unwrap();
            let connection = if session.keepalive {
                "keep-alive"
            } else {
                "close"
            };
            head.insert_header(header::CONNECTION, connection).unwrap();
        }
        let version = match head.version {
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        };
        let mut wire = format!(
            "{version} {} {}\r\n",
            head.status.as_str(),
            head.get_reason_phrase().unwrap_or("")
        )
        .into_bytes();
        head.header_to_h1_wire(&mut wire);
        wire.extend_from_slice(b"\r\n");
        String::from_utf8(wire).unwrap()
    }

    #[test]
    fn answer_heads_are_written_as_pingora_writes_them_after_the_same_edits() {
        let layouts: &[&[(&str, &str)]] = &[
            &[
                ("Server", "nginx"),
                ("date", "Mon, 01 Jan 2024 00:00:00 GMT"),
                ("Content-Type", "text/plain"),
                ("Content-Length", "13"),
                ("connection", "close"),
            ],
            &[
                ("Set-Cookie", "a=1"),
                ("X-Other", "x"),
                ("set-cookie", "b=2"),
                ("X-Request-Id", "theirs"),
                ("Date", "d1"),
                ("x-request-id", "theirs too"),
                ("DATE", "d2"),
                ("Connection", "keep-alive"),
                ("CONNECTION", "x"),
            ],
            &[],
            &[("Content-Length", "0"), ("Keep-Alive", "timeout=5")],
        ];
        let id = HeaderValue::from_static("0123-abcd");
        let date = HeaderValue::from_static("Sun, 29 Nov 2026 05:00:00 GMT");
        for fields in layouts {
            for (version, reason) in [(Version::HTTP_11, None), (Version::HTTP_10, Some("Fine"))] {
                let mut head = ResponseHeader::build(203, None).unwrap();
                head.set_version(version);
                head.set_reason_phrase(reason).unwrap();
                for (name, value) in *fields {
                    head.append_header((*name).to_owned(), *value).unwrap();
                }
                for chunked in [false, true] {
                    for request_id in [None, Some(&id)] {
                        for session in [None, Some(true), Some(false)] {
                            let edit = Edit {
                                chunked,
                                request_id,
                                session: session.map(|keepalive| SessionFields {
                                    keepalive,
                                    date: date.clone(),
                                }),
                            };
                            let mut got = BytesMut::new();
                            answer_head(&head, &edit, &mut got).unwrap();
                            assert_eq!(
                                std::str::from_utf8(&got).unwrap(),
                                pingora_wire(&head, &edit),
                                "{fields:?} chunked={chunked} id={request_id:?} {session:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn answer_bodies_are_framed_as_pingora_frames_them() {
        let head = |fields: &[(&str, &str)]| {
            let mut head = ResponseHeader::build(200, None).unwrap();
            for (name, value) in fields {
                head.append_header((*name).to_owned(), *value).unwrap();
            }
            head
        };
        let length = |n| BodyOut::Length {
            total: n,
            written: 0,
        };
        // (the answer's fields, chunked added, no body)
        type Case<'a> = (&'a [(&'a str, &'a str)], bool, bool);
        let cases: &[Case<'_>] = &[
            (&[("Content-Length", "13")], false, false),
            (
                &[("Content-Length", "13, 13"), ("content-length", "13")],
                false,
                false,
            ),
            (
                &[("Content-Length", "13"), ("Transfer-Encoding", "chunked")],
                false,
                false,
            ),
            (&[("Transfer-Encoding", "gzip, Chunked ")], false, false),
            (&[("Transfer-Encoding", "chunked, gzip")], false, false),
            (&[("Content-Length", "12, 13")], false, false),
            (&[("Content-Length", "+13")], false, false),
            (&[], true, false),
            (&[("Content-Length", "13")], false, true),
        ];
        let expected = [
            length(13),
            length(13),
            BodyOut::Chunked,
            BodyOut::Chunked,
            BodyOut::UntilClose,
            BodyOut::UntilClose,
            BodyOut::UntilClose,
            BodyOut::Chunked,
            length(0),
        ];
        for ((fields, chunked, no_body), want) in cases.iter().zip(expected) {
            let got = body_out(&head(fields), *chunked, *no_body);
            assert_eq!(format!("{got:?}"), format!("{want:?}"), "{fields:?}");
        }
        assert!(length(0).finished());
        assert!(!length(1).finished());
        assert!(!BodyOut::Chunked.finished());
    }

    #[test]
    fn only_decided_retries_count() {
        let mut e = Error::new(ErrorType::ConnectionClosed);
        e.retry = RetryType::ReusedOnly;
        assert!(!may_retry(&e));
        e.retry = RetryType::Decided(true);
        assert!(may_retry(&e));
        e.retry = RetryType::Decided(false);
        assert!(!may_retry(&e));
    }
}
