//! # vhost-admin
//!
//! The admin REST API of pingora-vhost (the seed's `/api/v1` surface) as a tower service (an axum
//! `Router`), usable on its own listener or mounted in another server.
//!
//! Data flow of a write: request → [`extract::ApiJson`] (media type, size, schema) → the model's
//! [`State::apply`](vhost_routing::State::apply) on the current snapshot's state → extra checks
//! (If-Match, healthy target tag) → [`ApplyHook::prepare`] (e.g. certificates load) → crash-safe
//! write-back to the config file ([`vhost_config::ConfigWriter`]) → [`RouteWriter::publish`] →
//! 2xx. Any failure before the publish leaves the running state and the file as they were.
//!
//! Concurrency: the change is computed and prepared (certificate files read) on the current
//! snapshot without any lock; only persisting and publishing take the one mutex around the
//! single [`RouteWriter`], and if another change was published meanwhile the write starts over
//! on the new snapshot. A slow certificate file therefore never blocks other writes, and reads
//! load the current snapshot and never wait on writes. A write runs to the end (applied,
//! logged, counted) even when its client disconnects.
//!
//! A configuration reload ([`AdminState::reload`], `POST /api/v1/config/reload`, SIGHUP in the
//! binary) re-reads the file, validates it like start-up, and publishes its routing state the
//! same way; a [`ReloadHook`] applies the rest (certificates, health checks).
//!
//! Browser protection: without a token, requests whose `Host` is not the API's own loopback
//! address, or that carry a foreign `Origin`, are refused (403), so neither DNS rebinding nor a
//! cross-site page can drive the API. There is no CORS.

pub mod certificates;
pub mod error;
pub mod events;
pub mod extract;
mod handlers;
pub mod history;
mod middleware;
pub mod openapi;
mod reload;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::Mutex;
use vhost_config::ConfigWriter;
use vhost_routing::{DomainName, RouteStore, RouteWriter, State, Verdict, Window};

pub use certificates::{CertificateOrigin, CertificateSource, CertificateView, RenewRefusal};
pub use error::{ApiError, ErrorBody, ErrorDetail, Refusal};
pub use handlers::{
    BackendView, CanaryView, Health, RollbackReport, RollbackRequest, SwitchRequest,
};
pub use reload::{Diff, PreparedReload, ReloadError, ReloadHook, ReloadReport};

/// Largest accepted request body, in bytes.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Environment variable that provides the API token (overrides `management_api_token`).
pub const TOKEN_ENV: &str = "PINGORA_VHOST_API_TOKEN";

/// Checks, before anything is persisted or published, that a new state can be served, and
/// returns what makes the rest of the process follow it (run after the routing snapshot is
/// published). The binary uses it to load certificate files; an error is a 400 for the client.
pub trait ApplyHook: Send + Sync + 'static {
    /// Prepares `next`; an error refuses the change (400 `unservable`, naming its field).
    fn prepare(&self, next: &State) -> Result<Box<dyn FnOnce() + Send>, Refusal>;
}

/// A hook that accepts everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHook;

impl ApplyHook for NoHook {
    fn prepare(&self, _next: &State) -> Result<Box<dyn FnOnce() + Send>, Refusal> {
        Ok(Box::new(|| {}))
    }
}

/// Renders the Prometheus exposition for `GET /api/v1/metrics`.
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// Where an [`AdminState`] publishes and persists.
pub struct AdminState {
    store: Arc<RouteStore>,
    writer: Mutex<Writer>,
    hook: Box<dyn ApplyHook>,
    reload: Option<Box<dyn ReloadHook>>,
    token: ArcSwapOption<Vec<u8>>,
    /// The API's own listening address (for the `Host` / `Origin` checks).
    listen: Option<SocketAddr>,
    /// The config file (re-read by a reload).
    config_path: Option<std::path::PathBuf>,
    metrics: Option<MetricsRender>,
    /// The history's read side (lock-free).
    history: history::HistoryReader,
    /// Live events (`GET /api/v1/events`).
    events: Arc<events::Events>,
    /// What the rollout controller last measured, by domain (shown by `GET .../canary`).
    rollouts: arc_swap::ArcSwap<std::collections::BTreeMap<DomainName, RolloutReport>>,
    /// Certificates and renewals (`/api/v1/certificates`).
    certificates: Option<Arc<dyn CertificateSource>>,
}

/// The latest analysis of a running rollout, as `GET /api/v1/domains/{domain}/canary` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct RolloutReport {
    /// Checks made in the current step.
    pub checks: u64,
    /// Consecutive failed checks.
    pub consecutive_failures: u32,
    /// The last check: `pass`, `inconclusive` or `fail` (with the reason).
    #[schema(value_type = Option<Object>)]
    pub last_verdict: Option<Verdict>,
    /// The canary tag over the last window.
    pub canary: Option<Window>,
    /// The primary tag over the same window.
    pub primary: Option<Window>,
    /// Seconds the current step has run.
    pub step_age_secs: u64,
}

struct Writer {
    routes: RouteWriter,
    file: Option<ConfigWriter>,
    history: history::History,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("auth", &self.token.load().is_some())
            .field("metrics", &self.metrics.is_some())
            .finish_non_exhaustive()
    }
}

impl AdminState {
    /// The API over `routes` (its single writer). `file`: where changes are persisted (`None`:
    /// in memory only). `token`: required bearer token, if any.
    pub fn new(routes: RouteWriter, file: Option<ConfigWriter>, token: Option<String>) -> Self {
        let config_path = file.as_ref().map(|f| f.path().to_owned());
        let events = Arc::new(events::Events::default());
        let history = history::History::open(
            config_path.as_deref(),
            routes.current().state(),
            Arc::clone(&events),
        );
        let history_reader = history.reader.clone();
        Self {
            store: Arc::clone(routes.store()),
            history: history_reader,
            writer: Mutex::new(Writer {
                routes,
                file,
                history,
            }),
            hook: Box::new(NoHook),
            reload: None,
            token: ArcSwapOption::new(token.map(|t| Arc::new(t.into_bytes()))),
            listen: None,
            config_path,
            metrics: None,
            rollouts: arc_swap::ArcSwap::default(),
            events,
            certificates: None,
        }
    }

    /// Declares the address the API listens on: without a token, only requests whose `Host` is
    /// this address (or `localhost` / `127.0.0.1` / `[::1]` with its port) are served.
    pub fn with_listen_addr(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Enables configuration reloads (`POST /api/v1/config/reload`, [`AdminState::reload`]).
    pub fn with_reload(mut self, hook: impl ReloadHook) -> Self {
        self.reload = Some(Box::new(hook));
        self
    }

    /// Replaces the bearer token (`None`: no authentication; the API must then be on loopback).
    pub fn set_token(&self, token: Option<String>) {
        self.token.store(token.map(|t| Arc::new(t.into_bytes())));
    }

    /// Whether a token is required now.
    pub fn has_token(&self) -> bool {
        self.token.load().is_some()
    }

    /// Sets the hook run before each change is persisted.
    pub fn with_hook(mut self, hook: impl ApplyHook) -> Self {
        self.hook = Box::new(hook);
        self
    }

    /// Serves `/api/v1/certificates` from `source`.
    pub fn with_certificates(mut self, source: Arc<dyn CertificateSource>) -> Self {
        self.certificates = Some(source);
        self
    }

    /// Serves `GET /api/v1/metrics` with `render`.
    pub fn with_metrics(mut self, render: MetricsRender) -> Self {
        self.metrics = Some(render);
        self
    }

    /// The live event bus (`GET /api/v1/events`): other parts of the process publish health
    /// transitions and rollout decisions to it.
    pub fn events(&self) -> &Arc<events::Events> {
        &self.events
    }

    /// The rollout controller's latest reports (it replaces the whole map after each round).
    pub fn set_rollout_reports(
        &self,
        reports: std::collections::BTreeMap<DomainName, RolloutReport>,
    ) {
        self.rollouts.store(Arc::new(reports));
    }

    /// The latest report of `domain`'s rollout, if one runs.
    pub fn rollout_report(&self, domain: &DomainName) -> Option<RolloutReport> {
        self.rollouts.load().get(domain).cloned()
    }

    /// Applies a change decided inside the process (a rollout step, promotion or abort):
    /// checked, persisted and published exactly like an API write, without preconditions.
    /// `build` sees the current snapshot; it runs again if another change is published
    /// meanwhile, and may refuse (for example when what it decided on changed).
    pub async fn apply_internal(
        self: &Arc<Self>,
        build: impl Fn(&vhost_routing::RoutingTable) -> Result<vhost_routing::Command, ApiError>
            + Send
            + 'static,
    ) -> Result<Arc<vhost_routing::RoutingTable>, ApiError> {
        handlers::apply_write(
            self,
            &axum::http::HeaderMap::new(),
            history::Source::Rollout,
            move |t| Ok((build(t)?, None)),
        )
        .await
        .map(|(table, _)| table)
    }

    /// The routing store the API publishes to.
    pub fn store(&self) -> &Arc<RouteStore> {
        &self.store
    }

    /// Re-resolves backend host names through the single writer (serialised with API writes),
    /// on the blocking pool since resolution may wait on DNS; true if a changed address was
    /// published.
    pub async fn refresh_resolution(self: &Arc<Self>) -> bool {
        let this = Arc::clone(self);
        let published = tokio::task::spawn_blocking(move || {
            let mut writer = this.writer.blocking_lock();
            writer.routes.refresh_resolution().map(|t| t.generation())
        })
        .await;
        match published {
            Ok(Some(generation)) => {
                tracing::info!(
                    generation,
                    "backend addresses re-resolved: new snapshot published"
                );
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "backend address refresh failed");
                false
            }
        }
    }
}

/// Registers the descriptions (Prometheus `# HELP`) of the admin API's metrics.
pub fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(
        "api_requests_total",
        "Admin API requests by method, route pattern and status code"
    );
    describe_histogram!(
        "api_latency_seconds",
        Unit::Seconds,
        "Admin API request latency by method and route pattern"
    );
    describe_counter!(
        "config_changes_total",
        "Configuration changes through the admin API, applied or rejected"
    );
    reload::describe();
}

/// The admin API would listen beyond loopback without a token.
#[derive(Debug, thiserror::Error)]
#[error(
    "management_api_addr {addr} is not a loopback address and no API token is set: \
     set [proxy] management_api_token (or {TOKEN_ENV}), or bind the API to 127.0.0.1"
)]
pub struct ExposureError {
    /// The configured listen address.
    pub addr: SocketAddr,
}

/// Refuses to expose an unauthenticated API beyond loopback.
pub fn check_exposure(addr: SocketAddr, token: Option<&str>) -> Result<(), ExposureError> {
    if token.is_none() && !addr.ip().is_loopback() {
        return Err(ExposureError { addr });
    }
    Ok(())
}

/// The API's router (all routes under `/api/v1`).
pub fn router(state: Arc<AdminState>) -> Router {
    use handlers::*;
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/domains", get(list_domains).post(create_domain))
        .route(
            "/api/v1/domains/{domain}",
            get(get_domain).put(update_domain).delete(delete_domain),
        )
        .route("/api/v1/domains/{domain}/switch", post(switch_domain))
        .route(
            "/api/v1/domains/{domain}/canary",
            get(get_canary).put(put_canary).delete(delete_canary),
        )
        .route(
            "/api/v1/domains/{domain}/canary/promote",
            post(promote_canary),
        )
        .route("/api/v1/domains/{domain}/canary/pause", post(pause_canary))
        .route(
            "/api/v1/domains/{domain}/canary/resume",
            post(resume_canary),
        )
        .route("/api/v1/domains/{domain}/canary/abort", post(abort_canary))
        .route("/api/v1/backends", get(list_backends).post(create_backend))
        .route(
            "/api/v1/backends/{id}",
            get(get_backend).put(update_backend).delete(delete_backend),
        )
        .route("/api/v1/metrics", get(metrics_text))
        .route("/api/v1/config/reload", post(reload_config))
        .route("/api/v1/config/history", get(config_history))
        .route("/api/v1/events", get(events_stream))
        .route("/api/v1/config/revisions/{revision}", get(config_revision))
        .route("/api/v1/config/rollback", post(config_rollback))
        .route("/api/v1/certificates", get(certificates::list_certificates))
        .route(
            "/api/v1/certificates/{domain}/renew",
            post(certificates::renew_certificate),
        )
        .route("/api/v1/openapi.json", get(openapi::serve))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            middleware::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            middleware::same_origin_only,
        ))
        .layer(axum::middleware::from_fn(middleware::record_metrics))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
