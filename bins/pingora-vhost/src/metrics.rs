//! `[metrics]` → the Prometheus recorder behind the `metrics` facade, and its listener serving
//! `GET /metrics` and `GET /api/v1/metrics`.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use axum::routing::get;
use metrics_exporter_prometheus::PrometheusBuilder;
use vhost_admin::MetricsRender;
use vhost_config::MetricsConfig;

use crate::server::AppError;

/// Latency histogram buckets, in seconds: 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// An installed recorder and its (bound, not yet served) listener.
pub(crate) struct Metrics {
    pub(crate) render: MetricsRender,
    pub(crate) listener: TcpListener,
    pub(crate) router: axum::Router,
    pub(crate) addr: SocketAddr,
}

/// Installs the global recorder and binds the listener; `None` when metrics are disabled.
pub(crate) fn install(config: &MetricsConfig) -> Result<Option<Metrics>, AppError> {
    if !config.enabled {
        return Ok(None);
    }
    let listener = TcpListener::bind(config.listen_addr).map_err(|source| AppError::Bind {
        addr: config.listen_addr,
        key: "metrics.listen_addr",
        source,
    })?;
    let recorder = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)
        .map_err(|e| AppError::Runtime(format!("metrics buckets: {e}")))?
        .build_recorder();
    let handle = recorder.handle();
    // Another recorder already installed (only possible when embedded) keeps recording there.
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("a metrics recorder was already installed; /metrics shows this process's own recorder only");
    }
    let render: MetricsRender = Arc::new(move || handle.render());
    let text = {
        let render = render.clone();
        move || {
            let render = render.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(),
                )
            }
        }
    };
    let router = axum::Router::new()
        .route("/metrics", get(text.clone()))
        .route("/api/v1/metrics", get(text));
    Ok(Some(Metrics {
        render,
        listener,
        router,
        addr: config.listen_addr,
    }))
}
