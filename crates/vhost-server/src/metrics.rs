//! `[metrics]` → the Prometheus recorder behind the `metrics` facade, its listener serving
//! `GET /metrics` and `GET /api/v1/metrics`, and the gauges that describe the configuration
//! (active tag per domain, certificate expiry), refreshed whenever a snapshot is published.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::routing::get;
use metrics::gauge;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use vhost_admin::MetricsRender;
use vhost_config::MetricsConfig;
use vhost_pingora::{CertMap, Inflight};
use vhost_routing::RoutingTable;

use crate::error::ServerError;

/// Latency histogram buckets, in seconds: 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// An installed recorder and its (bound, not yet served) listener.
pub struct Metrics {
    /// Renders what the recorder holds.
    pub handle: PrometheusHandle,
    /// The metrics listener, bound.
    pub listener: TcpListener,
    /// Its address.
    pub addr: SocketAddr,
}

/// Installs the global recorder and binds the listener; `None` when metrics are disabled (the
/// facade then records nothing).
pub fn install(config: &MetricsConfig) -> Result<Option<Metrics>, ServerError> {
    if !config.enabled {
        return Ok(None);
    }
    let listener = TcpListener::bind(config.listen_addr).map_err(|source| ServerError::Bind {
        addr: config.listen_addr,
        key: "metrics.listen_addr",
        source,
    })?;
    let recorder = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("a metrics recorder was already installed; /metrics shows this process's own recorder only");
    }
    vhost_pingora::describe();
    vhost_health::describe();
    vhost_admin::describe();
    metrics::describe_gauge!(
        "proxy_domain_active_tag",
        "1 for the tag a domain sends traffic to, 0 for tags it used before"
    );
    metrics::describe_gauge!(
        "tls_certificate_expiry_timestamp_seconds",
        metrics::Unit::Seconds,
        "Expiry (Unix time) of each configured certificate, by domain (default: the default certificate)"
    );
    Ok(Some(Metrics {
        handle,
        listener,
        addr: config.listen_addr,
    }))
}

/// Folds recorded histogram samples into their buckets every few seconds, so memory stays
/// bounded between scrapes (the exporter buffers raw samples until then).
pub async fn upkeep(handle: PrometheusHandle, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The exposition, with the point-in-time gauges refreshed first.
pub fn render(handle: PrometheusHandle, inflight: Arc<Inflight>) -> MetricsRender {
    let in_flight = gauge!("proxy_requests_in_flight");
    Arc::new(move || {
        in_flight.set(inflight.get() as f64);
        handle.render()
    })
}

/// The metrics listener's routes; with a `token`, a scraper must send `Authorization: Bearer
/// <token>` (401 otherwise).
pub fn router(render: MetricsRender, token: Option<String>) -> axum::Router {
    use axum::response::IntoResponse;
    let token: Option<Arc<[u8]>> = token.map(|t| Arc::from(t.into_bytes()));
    let text = move |headers: http::HeaderMap| {
        let render = render.clone();
        let token = token.clone();
        async move {
            if let Some(token) = token {
                let given = headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim)
                    .unwrap_or("");
                if !bool::from(subtle::ConstantTimeEq::ct_eq(given.as_bytes(), &token[..])) {
                    return (
                        http::StatusCode::UNAUTHORIZED,
                        [(http::header::WWW_AUTHENTICATE, "Bearer")],
                        "missing or invalid bearer token\n",
                    )
                        .into_response();
                }
            }
            (
                [(
                    http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                render(),
            )
                .into_response()
        }
    };
    axum::Router::new()
        .route("/metrics", get(text.clone()))
        .route("/api/v1/metrics", get(text))
}

/// Gauges derived from the configuration: `proxy_domain_active_tag{domain,tag}` (1 for the
/// active tag, 0 for a tag the domain used before) and
/// `tls_certificate_expiry_timestamp_seconds{domain}`.
#[derive(Default)]
pub struct ConfigGauges {
    active: ArcSwap<HashMap<String, String>>,
}

impl ConfigGauges {
    /// Updates the gauges after `table` was published (changed series only).
    pub fn observe(&self, table: &RoutingTable, certs: &CertMap) {
        let now: HashMap<String, String> = table
            .state()
            .vhosts()
            .map(|v| (v.domain.to_string(), v.enabled_backends_tag.to_string()))
            .collect();
        let before = self.active.load_full();
        for (domain, tag) in before.iter() {
            if now.get(domain) != Some(tag) {
                gauge!("proxy_domain_active_tag", "domain" => domain.clone(), "tag" => tag.clone())
                    .set(0.0);
            }
        }
        for (domain, tag) in &now {
            if before.get(domain) != Some(tag) {
                gauge!("proxy_domain_active_tag", "domain" => domain.clone(), "tag" => tag.clone())
                    .set(1.0);
            }
        }
        self.active.store(Arc::new(now));
        for (domain, expiry) in certs.expiries() {
            if let Some(t) = expiry {
                gauge!("tls_certificate_expiry_timestamp_seconds", "domain" => domain)
                    .set(t as f64);
            }
        }
    }
}
