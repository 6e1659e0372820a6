//! `[metrics]` → the Prometheus recorder behind the `metrics` facade (fixed-label series), its
//! listener serving `GET /metrics` and `GET /api/v1/metrics`, and the exposition: the
//! recorder's series followed by the configuration-labelled ones each layer renders itself
//! (proxy requests, health, and here the active tag per domain and certificate expiry), so
//! series of deleted domains and backends leave the exposition with them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::routing::get;
use metrics::gauge;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use vhost_admin::{MetricsRender, RolloutReport};
use vhost_config::MetricsConfig;
use vhost_health::HealthMetrics;
use vhost_metrics::{Exposition, Kind};
use vhost_pingora::{CertStore, Inflight, ProxyMetrics};
use vhost_routing::{DomainName, RolloutState, RoutingTable, Window};

use crate::error::ServerError;

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
    install_with(config, false)
}

/// Like [`install`]; `wait_for_port`: retry binding for up to 30 s while the address is in use
/// (a binary upgrade, until the old process releases it).
pub fn install_with(
    config: &MetricsConfig,
    wait_for_port: bool,
) -> Result<Option<Metrics>, ServerError> {
    if !config.enabled {
        return Ok(None);
    }
    let listener =
        crate::run::bind_listener(config.listen_addr, "metrics.listen_addr", wait_for_port)?;
    let recorder = PrometheusBuilder::new()
        .set_buckets(&vhost_metrics::LATENCY_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("a metrics recorder was already installed; /metrics shows this process's own recorder only");
    }
    vhost_pingora::describe();
    vhost_admin::describe();
    crate::rollout::describe();
    crate::notify::describe();
    crate::acme::describe();
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

/// Everything that renders configuration-labelled series.
pub struct Sources {
    /// The proxy's request series.
    pub proxy: Arc<ProxyMetrics>,
    /// Backend health.
    pub health: HealthMetrics,
    /// Active tags and certificate expiry.
    pub config: Arc<ConfigGauges>,
    /// Certificates in force.
    pub certs: Arc<CertStore>,
    /// Requests in flight.
    pub inflight: Arc<Inflight>,
    /// The ACME manager, when `[lets_encrypt]` is on.
    pub acme: Option<Arc<crate::acme::AcmeManager>>,
}

/// The exposition: the recorder's series, then the configuration-labelled ones.
pub fn render(handle: PrometheusHandle, sources: Sources) -> MetricsRender {
    let in_flight = gauge!("proxy_requests_in_flight");
    Arc::new(move || {
        in_flight.set(sources.inflight.get() as f64);
        let mut out = handle.render();
        sources.proxy.render(&mut out);
        sources.health.render(&mut out);
        sources.config.render(&mut out, &sources.certs);
        if let Some(acme) = &sources.acme {
            let mut e = Exposition::new(&mut out);
            e.family(
                "acme_consecutive_failures",
                Kind::Gauge,
                "Failed ACME orders in a row, by domain (0 after a success)",
            );
            for (domain, failures) in acme.failure_counts() {
                e.sample(
                    "acme_consecutive_failures",
                    &[("domain", &domain)],
                    failures,
                );
            }
        }
        out
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
/// active tag, 0 for a tag the domain used before), `canary_weight{domain}` and
/// `tls_certificate_expiry_timestamp_seconds{domain}`. A deleted domain's series go with it.
#[derive(Debug, Default)]
pub struct ConfigGauges {
    /// Per domain: its active tag and the tags it used before.
    tags: ArcSwap<BTreeMap<String, (String, BTreeSet<String>)>>,
    /// Per domain: its canary weight in percent (0 without a canary).
    canary_weights: ArcSwap<BTreeMap<String, f64>>,
    /// Per domain with a rollout plan: its state (0 progressing, 1 paused, 2 aborted) and step.
    rollouts: ArcSwap<BTreeMap<String, (u8, usize)>>,
    /// Per running rollout: the last analysis window of (primary, canary).
    analysis: ArcSwap<BTreeMap<String, (Window, Window)>>,
}

impl ConfigGauges {
    /// Follows `table` after it was published.
    pub fn observe(&self, table: &RoutingTable) {
        let before = self.tags.load();
        let now = table
            .state()
            .vhosts()
            .map(|v| {
                let domain = v.domain.to_string();
                let active = v.enabled_backends_tag.to_string();
                let mut used = before
                    .get(&domain)
                    .map(|(tag, used)| {
                        let mut used = used.clone();
                        used.insert(tag.clone());
                        used
                    })
                    .unwrap_or_default();
                used.remove(&active);
                (domain, (active, used))
            })
            .collect();
        self.tags.store(Arc::new(now));
        let weights = table
            .state()
            .vhosts()
            .map(|v| {
                let weight = v.canary.as_ref().map_or(0.0, |c| c.weight.percent());
                (v.domain.to_string(), weight)
            })
            .collect();
        self.canary_weights.store(Arc::new(weights));
        let rollouts = table
            .state()
            .vhosts()
            .filter_map(|v| {
                let c = v.canary.as_ref()?;
                (!c.steps.is_empty() || c.analysis.is_some()).then(|| {
                    let state = match c.state {
                        RolloutState::Progressing => 0,
                        RolloutState::Paused => 1,
                        RolloutState::Aborted => 2,
                    };
                    (v.domain.to_string(), (state, c.step))
                })
            })
            .collect();
        self.rollouts.store(Arc::new(rollouts));
    }

    /// The rollout controller's latest windows.
    pub(crate) fn set_rollout_reports(&self, reports: &BTreeMap<DomainName, RolloutReport>) {
        let windows = reports
            .iter()
            .filter_map(|(d, r)| Some((d.to_string(), (r.primary?, r.canary?))))
            .collect();
        self.analysis.store(Arc::new(windows));
    }

    /// Appends the gauges to a Prometheus text exposition.
    pub fn render(&self, out: &mut String, store: &CertStore) {
        let certs = store.current();
        let mut e = Exposition::new(out);
        e.family(
            "proxy_domain_active_tag",
            Kind::Gauge,
            "1 for the tag a domain sends traffic to, 0 for tags it used before",
        );
        for (domain, (active, used)) in self.tags.load().iter() {
            e.sample(
                "proxy_domain_active_tag",
                &[("domain", domain), ("tag", active)],
                1,
            );
            for tag in used {
                e.sample(
                    "proxy_domain_active_tag",
                    &[("domain", domain), ("tag", tag)],
                    0,
                );
            }
        }
        e.family(
            "canary_weight",
            Kind::Gauge,
            "Percent of a domain's traffic sent to its canary tag (0 without a canary)",
        );
        for (domain, weight) in self.canary_weights.load().iter() {
            e.sample("canary_weight", &[("domain", domain)], weight);
        }
        e.family(
            "rollout_state",
            Kind::Gauge,
            "State of a domain's rollout plan: 0 progressing, 1 paused, 2 aborted",
        );
        let rollouts = self.rollouts.load();
        for (domain, (state, _)) in rollouts.iter() {
            e.sample("rollout_state", &[("domain", domain)], state);
        }
        e.family(
            "rollout_step",
            Kind::Gauge,
            "Index of the current step of a domain's rollout plan",
        );
        for (domain, (_, step)) in rollouts.iter() {
            e.sample("rollout_step", &[("domain", domain)], step);
        }
        e.family(
            "rollout_analysis_error_rate",
            Kind::Gauge,
            "Share of 5xx answers over the last analysis window of a running rollout, by side",
        );
        let analysis = self.analysis.load();
        for (domain, (primary, canary)) in analysis.iter() {
            for (side, w) in [("primary", primary), ("canary", canary)] {
                e.sample(
                    "rollout_analysis_error_rate",
                    &[("domain", domain), ("side", side)],
                    w.error_rate(),
                );
            }
        }
        e.family(
            "rollout_analysis_p99_seconds",
            Kind::Gauge,
            "p99 latency (histogram bucket bound) over the last analysis window of a running rollout, by side",
        );
        for (domain, (primary, canary)) in analysis.iter() {
            for (side, w) in [("primary", primary), ("canary", canary)] {
                if let Some(ms) = w.p99_ms {
                    e.sample(
                        "rollout_analysis_p99_seconds",
                        &[("domain", domain), ("side", side)],
                        ms / 1000.0,
                    );
                }
            }
        }
        e.family(
            "tls_certificate_expiry_timestamp_seconds",
            Kind::Gauge,
            "Expiry (Unix time) of each configured certificate, by domain (default: the default certificate)",
        );
        // A domain's own file wins over an ACME certificate left from before it had one.
        let mut expiries: BTreeMap<String, i64> = store
            .acme()
            .iter()
            .filter_map(|(domain, ck)| Some((domain.to_string(), ck.not_after_unix()?)))
            .collect();
        expiries.extend(
            certs
                .expiries()
                .filter_map(|(domain, t)| Some((domain, t?))),
        );
        for (domain, t) in expiries {
            e.sample(
                "tls_certificate_expiry_timestamp_seconds",
                &[("domain", &domain)],
                t,
            );
        }
    }
}
