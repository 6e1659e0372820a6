//! Layers around every route: bearer-token authentication and request metrics.

use std::sync::Arc;
use std::time::Instant;

use std::net::SocketAddr;

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
    let Some(token) = state.token.as_deref() else {
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
        Some(p) if bool::from(p.as_bytes().ct_eq(token)) => next.run(req).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

/// Records `api_requests_total{method,route,status}` and `api_latency_seconds{method,route}`;
/// `route` is the matched pattern (e.g. `/api/v1/domains/{domain}`), never the raw path. Every
/// write is also logged with who sent it (client address) and its outcome.
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
}
