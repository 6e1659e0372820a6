//! Layers around every route: request metrics (and detached writes), browser protection when
//! no token is set, and bearer-token authentication.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::AdminState;

/// Requires `Authorization: Bearer <token>` (compared in constant time) on every route except
/// `/api/v1/health`, when a token is configured.
pub(crate) async fn authenticate(
    State(state): State<Arc<AdminState>>,
    req: Request,
    next: Next,
) -> Response {
    let token = state.token.load_full();
    let Some(token) = token.as_deref() else {
        return next.run(req).await;
    };
    if req.uri().path() == "/api/v1/health" {
        return next.run(req).await;
    }
    let provided = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match provided {
        Some(p) if bool::from(p.as_bytes().ct_eq(token.as_slice())) => next.run(req).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

/// Without a token, serves only requests addressed to the API itself: a `Host` that names the
/// API's address (or `localhost`, `127.0.0.1`, `[::1]` with its port) and no `Origin` other than
/// the API's own. That is what keeps a web page the operator happens to open (DNS rebinding,
/// cross-site requests) or a co-located service tricked into making requests (SSRF with a
/// foreign Host) from driving an unauthenticated API. 403 otherwise.
pub(crate) async fn same_origin_only(
    State(state): State<Arc<AdminState>>,
    req: Request,
    next: Next,
) -> Response {
    if state.has_token() {
        return next.run(req).await;
    }
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if !host.is_some_and(|h| is_own_authority(h, state.listen)) {
        return ApiError::Forbidden {
            message: format!(
                "Host {:?} is not this API's address; without an API token only requests to {} are served",
                host.unwrap_or(""),
                own_authorities(state.listen).join(", ")
            ),
        }
        .into_response();
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let own = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(|authority| is_own_authority(authority, state.listen));
        if !own {
            return ApiError::Forbidden {
                message: format!(
                    "requests from origin {:?} are refused: without an API token the API serves no web page other than its own",
                    origin.to_str().unwrap_or("(not text)")
                ),
            }
            .into_response();
        }
    }
    next.run(req).await
}

/// The `host:port` spellings of the API's own address.
fn own_authorities(listen: Option<SocketAddr>) -> Vec<String> {
    match listen {
        Some(addr) => {
            let port = addr.port();
            let mut own = vec![
                addr.to_string(),
                format!("localhost:{port}"),
                format!("127.0.0.1:{port}"),
                format!("[::1]:{port}"),
            ];
            if port == 80 {
                own.extend(["localhost".into(), "127.0.0.1".into(), "[::1]".into()]);
                own.push(match addr {
                    SocketAddr::V4(a) => a.ip().to_string(),
                    SocketAddr::V6(a) => format!("[{}]", a.ip()),
                });
            }
            own.dedup();
            own
        }
        None => vec!["localhost:*".into(), "127.0.0.1:*".into(), "[::1]:*".into()],
    }
}

fn is_own_authority(authority: &str, listen: Option<SocketAddr>) -> bool {
    let authority = authority.trim().to_ascii_lowercase();
    match listen {
        Some(_) => own_authorities(listen).contains(&authority),
        // Not told its address (embedded): any loopback name, any port.
        None => {
            let host = authority
                .rsplit_once(':')
                .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
                .map_or(authority.as_str(), |(host, _)| host);
            matches!(host, "localhost" | "127.0.0.1" | "[::1]")
        }
    }
}

tokio::task_local! {
    /// The client address of the API request being handled (for the history of changes).
    pub(crate) static CLIENT: Option<SocketAddr>;
}

/// Records `api_requests_total{method,route,status}` and `api_latency_seconds{method,route}`;
/// `route` is the matched pattern (e.g. `/api/v1/domains/{domain}`), never the raw path. Every
/// write is also logged with who sent it (client address) and its outcome. A write runs in a
/// task of its own: if its client disconnects, it still completes and is logged and counted
/// (a change that was applied is never silent).
pub(crate) async fn record_metrics(req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let write = !matches!(*req.method(), http::Method::GET | http::Method::HEAD);
    let path = write.then(|| req.uri().path().to_owned());
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let start = Instant::now();
    let handled = CLIENT.scope(peer, async move {
        let response = next.run(req).await;
        if let Some(path) = path {
            tracing::info!(
                method = method.as_str(),
                path = path.as_str(),
                status = response.status().as_u16(),
                client = %peer.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                "admin API write"
            );
        }
        let status = response.status().as_u16().to_string();
        metrics::counter!("api_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
            .increment(1);
        metrics::histogram!("api_latency_seconds", "method" => method, "route" => route)
            .record(start.elapsed().as_secs_f64());
        response
    });
    if !write {
        return handled.await;
    }
    match tokio::spawn(handled).await {
        Ok(response) => response,
        Err(source) => ApiError::TaskFailed {
            what: "request handler",
            source,
        }
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_authorities_are_the_listen_address_and_loopback_names_with_its_port() {
        let listen = Some("127.0.0.1:8080".parse().unwrap());
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST:8080",
            "[::1]:8080",
        ] {
            assert!(is_own_authority(ok, listen), "{ok}");
        }
        for bad in [
            "attacker.example",
            "attacker.example:8080",
            "localhost",
            "localhost:8081",
            "127.0.0.1",
            "10.0.0.1:8080",
            "",
        ] {
            assert!(!is_own_authority(bad, listen), "{bad}");
        }
        let port80 = Some("127.0.0.1:80".parse().unwrap());
        assert!(is_own_authority("localhost", port80));
        assert!(is_own_authority("127.0.0.1:80", port80));
        assert!(is_own_authority("localhost:1234", None));
        assert!(!is_own_authority("evil.example:1234", None));
    }
}
