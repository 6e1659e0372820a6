//! Route handlers. Reads serve the current snapshot; writes go through [`apply_write`], the one
//! place where a change is checked, persisted and published.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use vhost_routing::{
    Backend, BackendEntry, BackendId, BackendUpdate, Canary, CanaryWeight, Change, Command,
    DomainName, RolloutState, RoutingTable, Tag, VirtualHost, VirtualHostUpdate,
};

use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::AdminState;

type AppState = State<Arc<AdminState>>;

/// Body of `POST /api/v1/domains/{domain}/switch`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchRequest {
    /// The tag whose backends the domain uses from the next request on.
    pub new_tag: Tag,
}

/// A backend's health as the data plane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Receives traffic.
    Up,
    /// Marked down by health checking.
    Down,
    /// Its host name does not resolve; receives no traffic.
    Unresolved,
}

/// A backend as the API shows it: the configured record plus its current health (read-only).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackendView {
    /// Unique id.
    #[schema(example = "web-v1")]
    pub id: String,
    /// `host:port`.
    #[schema(example = "127.0.0.1:3001")]
    pub address: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Weight within each tag.
    pub weight: u16,
    /// Current health (read-only; ignored if sent).
    pub health: Health,
    /// `http`, `https`, `h2c` or `h2`.
    #[schema(value_type = String, example = "http")]
    pub protocol: vhost_routing::BackendProtocol,
    /// The circuit breaker: `closed` (takes traffic), `open` (ejected) or `half_open` (the next
    /// request is a trial); always `closed` while `[proxy] circuit_breaker` is off.
    #[schema(example = "closed")]
    pub circuit: String,
    /// Requests in flight beyond which others get 503 at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
}

impl BackendView {
    fn of(entry: &BackendEntry) -> Self {
        let b = entry.backend();
        let health = if entry.socket_addr().is_none() {
            Health::Unresolved
        } else if entry.health().is_healthy() {
            Health::Up
        } else {
            Health::Down
        };
        Self {
            id: b.id.to_string(),
            address: b.address.to_string(),
            tags: b.tags.iter().map(Tag::to_string).collect(),
            weight: b.weight,
            health,
            protocol: b.protocol,
            circuit: entry
                .health()
                .circuit(vhost_routing::monotonic_ms())
                .as_str()
                .to_owned(),
            max_concurrent_requests: b.max_concurrent_requests,
        }
    }
}

/// A strong ETag of a JSON representation (FNV-1a over its bytes: stable across restarts).
pub(crate) fn etag_of<T: Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{hash:016x}\"")
}

fn json_with_etag<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let etag = etag_of(value);
    let mut response = (status, Json(value)).into_response();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

fn with_location(mut response: Response, path: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(path) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

fn check_if_match(if_match: Option<&HeaderValue>, current: &str) -> Result<(), ApiError> {
    let Some(given) = if_match else {
        return Ok(());
    };
    let given = given.to_str().unwrap_or("").trim();
    let matches = given == "*"
        || given
            .split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == current);
    if matches {
        Ok(())
    } else {
        Err(ApiError::PreconditionFailed {
            given: given.to_owned(),
            current: current.to_owned(),
        })
    }
}

/// `?force`, `?force=true|1` or `?force=false|0`; any other value of `force` is a 400. Other
/// query parameters are ignored.
fn force(query: &Option<String>) -> Result<bool, ApiError> {
    let mut force = false;
    for pair in query.as_deref().unwrap_or("").split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
        if key != "force" {
            continue;
        }
        force = match value {
            "true" | "1" => true,
            "false" | "0" => false,
            other => {
                return Err(ApiError::InvalidField {
                    field: "force".into(),
                    message: format!("query parameter force={other:?} must be true or false"),
                })
            }
        };
    }
    Ok(force)
}

fn parse_domain(raw: &str) -> Result<DomainName, ApiError> {
    DomainName::parse(raw).map_err(|e| ApiError::InvalidField {
        field: "domain".into(),
        message: e.to_string(),
    })
}

fn parse_id(raw: &str) -> Result<BackendId, ApiError> {
    BackendId::parse(raw).map_err(|e| ApiError::InvalidField {
        field: "id".into(),
        message: e.to_string(),
    })
}

/// The virtual host of `domain` in `table`, or 404.
fn vhost_in<'t>(table: &'t RoutingTable, domain: &DomainName) -> Result<&'t VirtualHost, ApiError> {
    table
        .state()
        .vhost(domain)
        .ok_or_else(|| domain_not_found(domain))
}

fn domain_not_found(domain: &DomainName) -> ApiError {
    ApiError::NotFound {
        message: format!("domain {domain} not found"),
    }
}

fn backend_not_found(id: &BackendId) -> ApiError {
    ApiError::NotFound {
        message: format!("backend {id} not found"),
    }
}

fn has_healthy_backend(table: &RoutingTable, tag: &Tag) -> bool {
    table
        .backends()
        .any(|b| b.backend().has_tag(tag) && b.is_available())
}

fn ensure_serving_tag(
    table: &RoutingTable,
    tag: &Tag,
    force: bool,
    field: &str,
) -> Result<(), ApiError> {
    if force || has_healthy_backend(table, tag) {
        return Ok(());
    }
    Err(ApiError::Conflict {
        code: "no_healthy_backend",
        message: format!(
            "tag {tag} has no healthy backend: the domain would answer 503; add or fix a backend first, or repeat with ?force=true"
        ),
        field: Some(field.into()),
    })
}

/// How many times a write is prepared without the writer lock before it takes the lock first
/// (so that, under heavy contention, every write still completes).
pub(crate) const OPTIMISTIC_ATTEMPTS: usize = 3;

/// Checks, persists and publishes one change (see the crate docs). `build` sees the current
/// snapshot and returns the command plus the current ETag of the resource it changes, if any; it
/// runs again if another change is published while this one is prepared. Runs on the blocking
/// pool: preparing reads certificate files, persisting fsyncs the config file and publishing may
/// resolve backend host names, none of which may stall the async runtime.
pub(crate) async fn apply_write(
    state: &Arc<AdminState>,
    headers: &HeaderMap,
    source: crate::history::Source,
    build: impl Fn(&RoutingTable) -> Result<(Command, Option<String>), ApiError> + Send + 'static,
) -> Result<(Arc<RoutingTable>, Change), ApiError> {
    let this = Arc::clone(state);
    let if_match = headers.get(header::IF_MATCH).cloned();
    let client = crate::middleware::CLIENT
        .try_with(|c| *c)
        .ok()
        .flatten()
        .map(|c| c.to_string());
    let result = tokio::task::spawn_blocking(move || {
        let mut attempt = 0;
        loop {
            // Prepared without the writer lock (a slow certificate file delays only this
            // write) unless the optimistic attempts were all overtaken by other changes.
            let locked = (attempt >= OPTIMISTIC_ATTEMPTS).then(|| this.writer.blocking_lock());
            attempt += 1;
            let current = this.store.load_full();
            let (command, etag) = build(&current)?;
            let (next, change) = current.state().apply(command)?;
            // Preconditions are evaluated after the request's own checks (RFC 9110 §13.2.1):
            // an invalid request is a 400 whatever its If-Match says.
            if let Some(etag) = etag {
                check_if_match(if_match.as_ref(), &etag)?;
            }
            let commit = this.hook.prepare(&next)?;
            let mut writer = match locked {
                Some(writer) => writer,
                None => this.writer.blocking_lock(),
            };
            if writer.routes.current().generation() != current.generation() {
                continue; // another change was published meanwhile: start over on it
            }
            if let Some(file) = writer.file.as_mut() {
                file.persist(&change)?;
            }
            let table = writer.routes.publish(next);
            commit();
            writer
                .history
                .record(current.state(), table.state(), source, client.clone());
            return Ok((table, change));
        }
    })
    .await
    .unwrap_or_else(|source| {
        Err(ApiError::TaskFailed {
            what: "write",
            source,
        })
    });
    match &result {
        Ok((table, change)) => {
            metrics::counter!("config_changes_total", "result" => "applied").increment(1);
            tracing::info!(generation = table.generation(), change = ?change, "configuration change applied");
        }
        Err(e) => {
            metrics::counter!("config_changes_total", "result" => "rejected").increment(1);
            tracing::info!(error = %e, "configuration change rejected");
        }
    }
    result
}

/// Liveness of the proxy process.
#[utoipa::path(get, path = "/api/v1/health", tag = "health",
    responses((status = 200, description = "The proxy is running", body = String, content_type = "text/plain", example = "OK")))]
pub(crate) async fn health() -> &'static str {
    "OK"
}

/// Every virtual host.
#[utoipa::path(get, path = "/api/v1/domains", tag = "domains",
    responses((status = 200, description = "All domains, ordered by name", body = [VirtualHost])))]
pub(crate) async fn list_domains(State(s): AppState) -> Response {
    let table = s.store.load();
    let list: Vec<&VirtualHost> = table.state().vhosts().collect();
    json_with_etag(StatusCode::OK, &list)
}

/// One virtual host.
#[utoipa::path(get, path = "/api/v1/domains/{domain}", tag = "domains",
    params(("domain" = DomainName, Path, description = "Domain name")),
    responses(
        (status = 200, description = "The domain (with an ETag)", body = VirtualHost),
        (status = 400, description = "Invalid domain name", body = crate::ErrorBody),
        (status = 404, description = "Unknown domain", body = crate::ErrorBody)))]
pub(crate) async fn get_domain(
    State(s): AppState,
    Path(domain): Path<String>,
) -> Result<Response, ApiError> {
    let domain = parse_domain(&domain)?;
    let table = s.store.load();
    let vhost = vhost_in(&table, &domain)?;
    Ok(json_with_etag(StatusCode::OK, vhost))
}

/// Creates a virtual host.
#[utoipa::path(post, path = "/api/v1/domains", tag = "domains", request_body = VirtualHost,
    responses(
        (status = 201, description = "Created", body = VirtualHost),
        (status = 400, description = "Malformed JSON, unknown field or invalid value", body = crate::ErrorBody),
        (status = 409, description = "The domain exists", body = crate::ErrorBody),
        (status = 413, description = "Body too large", body = crate::ErrorBody),
        (status = 415, description = "Not JSON", body = crate::ErrorBody)))]
pub(crate) async fn create_domain(
    State(s): AppState,
    headers: HeaderMap,
    ApiJson(vhost): ApiJson<VirtualHost>,
) -> Result<Response, ApiError> {
    let domain = vhost.domain.clone();
    let (table, _) = apply_write(&s, &headers, crate::history::Source::Api, move |_| {
        Ok((Command::AddDomain(vhost.clone()), None))
    })
    .await?;
    let vhost = vhost_in(&table, &domain)?;
    let response = json_with_etag(StatusCode::CREATED, vhost);
    Ok(with_location(
        response,
        &format!("/api/v1/domains/{domain}"),
    ))
}

/// Changes some fields of a virtual host (absent fields keep their value).
#[utoipa::path(put, path = "/api/v1/domains/{domain}", tag = "domains", request_body = VirtualHostUpdate,
    params(("domain" = DomainName, Path, description = "Domain name"),
           ("If-Match" = Option<String>, Header, description = "ETag from a previous GET"),
           ("force" = Option<bool>, Query, description = "Allow a tag without healthy backends")),
    responses(
        (status = 200, description = "Updated", body = VirtualHost),
        (status = 400, description = "Invalid request", body = crate::ErrorBody),
        (status = 404, description = "Unknown domain", body = crate::ErrorBody),
        (status = 409, description = "New tag has no healthy backend", body = crate::ErrorBody),
        (status = 412, description = "Stale If-Match", body = crate::ErrorBody),
        (status = 415, description = "Not JSON", body = crate::ErrorBody)))]
pub(crate) async fn update_domain(
    State(s): AppState,
    Path(domain): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ApiJson(update): ApiJson<VirtualHostUpdate>,
) -> Result<Response, ApiError> {
    let domain = parse_domain(&domain)?;
    let force = force(&query)?;
    let target = domain.clone();
    let (table, _) = apply_write(&s, &headers, crate::history::Source::Api, move |t| {
        let current = vhost_in(t, &target)?;
        if let Some(tag) = &update.enabled_backends_tag {
            if *tag != current.enabled_backends_tag {
                ensure_serving_tag(t, tag, force, "new_tag")?;
            }
        }
        let etag = etag_of(current);
        Ok((
            Command::UpdateDomain {
                domain: target.clone(),
                update: update.clone(),
            },
            Some(etag),
        ))
    })
    .await?;
    let vhost = vhost_in(&table, &domain)?;
    Ok(json_with_etag(StatusCode::OK, vhost))
}

/// Deletes a virtual host.
#[utoipa::path(delete, path = "/api/v1/domains/{domain}", tag = "domains",
    params(("domain" = DomainName, Path, description = "Domain name"),
           ("If-Match" = Option<String>, Header, description = "ETag from a previous GET")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "Unknown domain", body = crate::ErrorBody),
        (status = 412, description = "Stale If-Match", body = crate::ErrorBody)))]
pub(crate) async fn delete_domain(
    State(s): AppState,
    Path(domain): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let domain = parse_domain(&domain)?;
    apply_write(&s, &headers, crate::history::Source::Api, move |t| {
        let current = vhost_in(t, &domain)?;
        Ok((
            Command::DeleteDomain(domain.clone()),
            Some(etag_of(current)),
        ))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Points a domain at another tag: the A/B switch, visible to the very next request.
#[utoipa::path(post, path = "/api/v1/domains/{domain}/switch", tag = "domains", request_body = SwitchRequest,
    params(("domain" = DomainName, Path, description = "Domain name"),
           ("If-Match" = Option<String>, Header, description = "ETag from a previous GET of the domain"),
           ("force" = Option<bool>, Query, description = "Switch even if the tag has no healthy backend")),
    responses(
        (status = 200, description = "Switched", body = VirtualHost),
        (status = 400, description = "Invalid request", body = crate::ErrorBody),
        (status = 404, description = "Unknown domain", body = crate::ErrorBody),
        (status = 409, description = "The tag has no healthy backend", body = crate::ErrorBody),
        (status = 412, description = "Stale If-Match", body = crate::ErrorBody),
        (status = 415, description = "Not JSON", body = crate::ErrorBody)))]
pub(crate) async fn switch_domain(
    State(s): AppState,
    Path(domain): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ApiJson(request): ApiJson<SwitchRequest>,
) -> Result<Response, ApiError> {
    let domain = parse_domain(&domain)?;
    let force = force(&query)?;
    let target = domain.clone();
    let (table, _) = apply_write(&s, &headers, crate::history::Source::Api, move |t| {
        let current = vhost_in(t, &target)?;
        ensure_serving_tag(t, &request.new_tag, force, "new_tag")?;
        Ok((
            Command::SwitchTag {
                domain: target.clone(),
                tag: request.new_tag.clone(),
            },
            Some(etag_of(current)),
        ))
    })
    .await?;
    let vhost = vhost_in(&table, &domain)?;
    Ok(json_with_etag(StatusCode::OK, vhost))
}

/// A domain's canary.
#[utoipa::path(get, path = "/api/v1/domains/{domain}/canary", tag = "canary",
    params(("domain" = DomainName, Path, description = "Domain name")),
    responses(
        (status = 200, description = "The canary with its rollout's latest analysis (ETag: the domain's)", body = CanaryView),
        (status = 400, description = "Invalid domain name", body = crate::ErrorBody),
        (status = 404, description = "Unknown domain, or the domain has no canary", body = crate::ErrorBody)))]
pub(crate) async fn get_canary(
    State(s): AppState,
    Path(domain): Path<String>,
) -> Result<Response, ApiError> {
    let domain = parse_domain(&domain)?;
    let table = s.store.load();
    let vhost = vhost_in(&table, &domain)?;
    let canary = vhost.canary.as_ref().ok_or_else(|| no_canary(&domain))?;
    let view = CanaryView {
        canary: Canary::clone(canary),
        rollout: s.rollout_report(&domain),
    };
    let mut response = (StatusCode::OK, Json(view)).into_response();
    if let Ok(v) = HeaderValue::from_str(&etag_of(vhost)) {
        response.headers_mut().insert(header::ETAG, v);
    }
    Ok(response)
}

/// A canary as `GET .../canary` shows it: the configured object, plus the rollout controller's
/// latest numbers while a rollout runs.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CanaryView {
    /// The canary.
    #[serde(flatten)]
    pub canary: Canary,
    /// The latest analysis of a running rollout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::RolloutReport>,
}

/// Which rollout order.
#[derive(Debug, Clone, Copy)]
enum RolloutOrder {
    Pause,
    Resume,
    Abort,
}

/// Applies a rollout order to `domain`'s canary.
async fn rollout_order(
    s: &Arc<AdminState>,
    domain: String,
    headers: &HeaderMap,
    order: RolloutOrder,
) -> Result<Response, ApiError> {
    let domain = parse_domain(&domain)?;
    let target = domain.clone();
    let (table, _) = apply_write(s, headers, crate::history::Source::Api, move |t| {
        let current = vhost_in(t, &target)?;
        let mut canary = current.canary.clone().ok_or_else(|| no_canary(&target))?;
        let conflict = |message: String| ApiError::Conflict {
            code: "rollout_state",
            message,
            field: None,
        };
        match (order, canary.state) {
            (_, RolloutState::Aborted) if !matches!(order, RolloutOrder::Abort) => {
                return Err(conflict(format!(
                    "the rollout of {target} was aborted; set the canary again to start over"
                )))
            }
            (RolloutOrder::Pause, _) => canary.state = RolloutState::Paused,
            (RolloutOrder::Resume, _) => canary.state = RolloutState::Progressing,
            (RolloutOrder::Abort, _) => {
                canary.state = RolloutState::Aborted;
                canary.weight = CanaryWeight::ZERO;
                canary.abort_reason = Some("aborted by the operator".to_owned());
            }
        }
        Ok((
            Command::SetCanary {
                domain: target.clone(),
                canary: *canary,
            },
            Some(etag_of(current)),
        ))
    })
    .await?;
    if matches!(order, RolloutOrder::Abort) {
        metrics::counter!("rollout_aborts_total", "domain" => domain.to_string(), "reason" => "operator")
            .increment(1);
    }
    let vhost = vhost_in(&table, &domain)?;
    Ok(json_with_etag(StatusCode::OK, vhost))
}

/// Pauses a domain's rollout: no step and no analysis until it is resumed; the weight stays.
#[utoipa::path(post, path = "/api/v1/domains/{domain}/canary/pause", tag = "canary",
    params(("domain" = DomainName, Path, description = "Domain name"),
           ("If-Match" = Option<String>, Header, description = "ETag from a previous GET of the domain")),
    responses(
        (status = 200, description = "Paused: the domain", body = VirtualHost),
        (status = 404, description = "Unknown domain, or no canary", body = crate::ErrorBody),
        (status = 409, description = "The rollout was aborted", body = crate::ErrorBody),
        (status = 412, description = "Stale If-Match", body = crate::ErrorBody)))]
pub(crate) async fn pause_canary(
    State(s): AppState,
    Path(domain): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    rollout_order(&s, domain, &headers, RolloutOrder::Pause).await
}

/// Resumes a paused rollout (its current step starts its interval afresh).
#[utoipa::path(post, path = "/api/v1/domains/{domain}/canary/resume", tag = "canary",
    params(("domain" = DomainName, Path, description = "Domain name"),
           ("If-Match" = Option<String>, Header, description = "ETag from a previous GET of the domain")),
    responses(
        (status = 200, description = "Resumed: the domain", body = VirtualHost),
        (status = 404, description = "Unknown domain, or no canary", body = crate::ErrorBody),
        (status = 409, description = "The rollout was aborted", body = crate::ErrorBody),
        (status = 412, description = "Stale If-Match", body = crate::ErrorBody)))]
pub(crate) async fn resume_canary(
    State(s): AppState,
    Path(domain): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    rollout_order(&s, domain, &headers, RolloutOrder::Resume).await
}

/// Aborts a rollout: weight 0 (all traffic on the primary), state `aborted`.
#[utoipa::path(post, path = "/api/v1/domains/{domain}/canary/abort", tag = "canary",
    params(("domain" = DomainName, Path, description = "Domain name"),
           ("If-Match" = Option<String>, Header, description = "ETag from a previous GET of the domain")),
    responses(
        (status = 200, description = "Aborted: the domain", body = VirtualHost),
        (status = 404, description = "Unknown domain, or no canary", body = crate::ErrorBody),
        (status = 412, description = "Stale If-Match", body = crate::ErrorBody)))]
pub(crate) async fn abort_canary(
    State(s): AppState,
    Path(domain): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    rollout_order(&s, domain, &headers, RolloutOrder::Abort).await
}

fn no_canary(domain: &DomainName) -> ApiError {
    ApiError::NotFound {
        message: format!("domain {domain} has no canary"),
    }
}

/// Sets (or changes) a domain's canary: `weight` percent of its traffic goes to `tag`.
#[utoipa::path(put, path = "/api/v1/domains/{domain}/canary", tag = "canary", request_body = Canary,
    params(("domain" = DomainName, Path, description = "Domain name"),
           ("If-Match" = Option<String>, Header, description = "ETag from a previous GET of the domain"),
           ("force" = Option<bool>, Query, description = "Set it even if the tag has no healthy backend")),
    responses(
        (status = 200, description = "The domain with its canary", body = VirtualHost),
        (status = 400, description = "Invalid weight, tag or sticky key", body = crate::ErrorBody),
        (status = 404, description = "Unknown domain", body = crate::ErrorBody),
        (status = 409, description = "The tag is the primary tag, or has no healthy backend", body = crate::ErrorBody),
        (status = 412, description = "Stale If-Match", body = crate::ErrorBody)))]
pub(crate) async fn put_canary(
    State(s): AppState,
    Path(domain): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ApiJson(canary): ApiJson<Canary>,
) -> Result<Response, ApiError> {
    let domain = parse_domain(&domain)?;
    let force = force(&query)?;
    let target = domain.clone();
    let (table, _) = apply_write(&s, &headers, crate::history::Source::Api, move |t| {
        let current = vhost_in(t, &target)?;
        if canary.tag == current.enabled_backends_tag {
            return Err(ApiError::Conflict {
                code: "canary_is_primary",
                message: format!(
                    "tag {} is already the primary tag of {target}; a canary needs another tag",
                    canary.tag
                ),
                field: Some("tag".into()),
            });
        }
        if current.canary.as_ref().is_none_or(|c| c.tag != canary.tag) {
            ensure_serving_tag(t, &canary.tag, force, "tag")?;
        }
        Ok((
            Command::SetCanary {
                domain: target.clone(),
                canary: canary.clone(),
            },
            Some(etag_of(current)),
        ))
    })
    .await
    .map_err(ApiError::within_canary)?;
    let vhost = vhost_in(&table, &domain)?;
    Ok(json_with_etag(StatusCode::OK, vhost))
}

/// Removes a domain's canary: all its traffic goes back to the primary tag.
#[utoipa::path(delete, path = "/api/v1/domains/{domain}/canary", tag = "canary",
    params(("domain" = DomainName, Path, description = "Domain name"),
           ("If-Match" = Option<String>, Header, description = "ETag from a previous GET of the domain")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "Unknown domain, or no canary", body = crate::ErrorBody),
        (status = 412, description = "Stale If-Match", body = crate::ErrorBody)))]
pub(crate) async fn delete_canary(
    State(s): AppState,
    Path(domain): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let domain = parse_domain(&domain)?;
    apply_write(&s, &headers, crate::history::Source::Api, move |t| {
        let current = vhost_in(t, &domain)?;
        Ok((
            Command::RemoveCanary(domain.clone()),
            Some(etag_of(current)),
        ))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Promotes the canary: its tag becomes the domain's primary tag and the canary is removed, in
/// one change.
#[utoipa::path(post, path = "/api/v1/domains/{domain}/canary/promote", tag = "canary",
    params(("domain" = DomainName, Path, description = "Domain name"),
           ("If-Match" = Option<String>, Header, description = "ETag from a previous GET of the domain"),
           ("force" = Option<bool>, Query, description = "Promote even if the canary tag has no healthy backend")),
    responses(
        (status = 200, description = "Promoted: the domain", body = VirtualHost),
        (status = 404, description = "Unknown domain, or no canary", body = crate::ErrorBody),
        (status = 409, description = "The canary tag has no healthy backend", body = crate::ErrorBody),
        (status = 412, description = "Stale If-Match", body = crate::ErrorBody)))]
pub(crate) async fn promote_canary(
    State(s): AppState,
    Path(domain): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let domain = parse_domain(&domain)?;
    let force = force(&query)?;
    let target = domain.clone();
    let (table, _) = apply_write(&s, &headers, crate::history::Source::Api, move |t| {
        let current = vhost_in(t, &target)?;
        let canary = current.canary.as_ref().ok_or_else(|| no_canary(&target))?;
        ensure_serving_tag(t, &canary.tag, force, "tag")?;
        Ok((
            Command::PromoteCanary(target.clone()),
            Some(etag_of(current)),
        ))
    })
    .await?;
    let vhost = vhost_in(&table, &domain)?;
    Ok(json_with_etag(StatusCode::OK, vhost))
}

/// Every backend, with its health.
#[utoipa::path(get, path = "/api/v1/backends", tag = "backends",
    responses((status = 200, description = "All backends, ordered by id", body = [BackendView])))]
pub(crate) async fn list_backends(State(s): AppState) -> Response {
    let table = s.store.load();
    let list: Vec<BackendView> = table.backends().map(|b| BackendView::of(b)).collect();
    json_with_etag(StatusCode::OK, &list)
}

fn backend_view(table: &RoutingTable, id: &BackendId) -> Result<BackendView, ApiError> {
    table
        .backend(id)
        .map(|b| BackendView::of(b))
        .ok_or_else(|| backend_not_found(id))
}

fn backend_etag(table: &RoutingTable, id: &BackendId) -> Result<String, ApiError> {
    // The ETag covers the configured record, not the (changing) health.
    let record: &Backend = table
        .state()
        .backend(id)
        .ok_or_else(|| backend_not_found(id))?;
    Ok(etag_of(record))
}

fn backend_response(
    status: StatusCode,
    table: &RoutingTable,
    id: &BackendId,
) -> Result<Response, ApiError> {
    let view = backend_view(table, id)?;
    let mut response = (status, Json(&view)).into_response();
    if let Ok(v) = HeaderValue::from_str(&backend_etag(table, id)?) {
        response.headers_mut().insert(header::ETAG, v);
    }
    Ok(response)
}

/// One backend, with its health.
#[utoipa::path(get, path = "/api/v1/backends/{id}", tag = "backends",
    params(("id" = BackendId, Path, description = "Backend id")),
    responses(
        (status = 200, description = "The backend (with an ETag)", body = BackendView),
        (status = 400, description = "Invalid id", body = crate::ErrorBody),
        (status = 404, description = "Unknown backend", body = crate::ErrorBody)))]
pub(crate) async fn get_backend(
    State(s): AppState,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    backend_response(StatusCode::OK, &s.store.load(), &id)
}

/// Creates a backend.
#[utoipa::path(post, path = "/api/v1/backends", tag = "backends", request_body = Backend,
    responses(
        (status = 201, description = "Created", body = BackendView),
        (status = 400, description = "Malformed JSON, unknown field or invalid value", body = crate::ErrorBody),
        (status = 409, description = "The id exists", body = crate::ErrorBody),
        (status = 413, description = "Body too large", body = crate::ErrorBody),
        (status = 415, description = "Not JSON", body = crate::ErrorBody)))]
pub(crate) async fn create_backend(
    State(s): AppState,
    headers: HeaderMap,
    ApiJson(backend): ApiJson<Backend>,
) -> Result<Response, ApiError> {
    let id = backend.id.clone();
    let (table, _) = apply_write(&s, &headers, crate::history::Source::Api, move |_| {
        Ok((Command::AddBackend(backend.clone()), None))
    })
    .await?;
    let response = backend_response(StatusCode::CREATED, &table, &id)?;
    Ok(with_location(response, &format!("/api/v1/backends/{id}")))
}

/// Changes some fields of a backend (absent fields keep their value).
#[utoipa::path(put, path = "/api/v1/backends/{id}", tag = "backends", request_body = BackendUpdate,
    params(("id" = BackendId, Path, description = "Backend id"),
           ("If-Match" = Option<String>, Header, description = "ETag from a previous GET"),
           ("force" = Option<bool>, Query, description = "Allow leaving a domain's active tag without backends")),
    responses(
        (status = 200, description = "Updated", body = BackendView),
        (status = 400, description = "Invalid request", body = crate::ErrorBody),
        (status = 404, description = "Unknown backend", body = crate::ErrorBody),
        (status = 409, description = "Would leave a domain without backends", body = crate::ErrorBody),
        (status = 412, description = "Stale If-Match", body = crate::ErrorBody),
        (status = 415, description = "Not JSON", body = crate::ErrorBody)))]
pub(crate) async fn update_backend(
    State(s): AppState,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ApiJson(update): ApiJson<BackendUpdate>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let force = force(&query)?;
    let target = id.clone();
    let (table, _) = apply_write(&s, &headers, crate::history::Source::Api, move |t| {
        let etag = backend_etag(t, &target)?;
        Ok((
            Command::UpdateBackend {
                id: target.clone(),
                update: update.clone(),
                force,
            },
            Some(etag),
        ))
    })
    .await?;
    backend_response(StatusCode::OK, &table, &id)
}

/// Deletes a backend; refused (409) if it is the last backend of a domain's active tag, unless
/// `?force=true`.
#[utoipa::path(delete, path = "/api/v1/backends/{id}", tag = "backends",
    params(("id" = BackendId, Path, description = "Backend id"),
           ("If-Match" = Option<String>, Header, description = "ETag from a previous GET"),
           ("force" = Option<bool>, Query, description = "Delete even if a domain is left without backends")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "Unknown backend", body = crate::ErrorBody),
        (status = 409, description = "Last backend of a domain's active tag", body = crate::ErrorBody),
        (status = 412, description = "Stale If-Match", body = crate::ErrorBody)))]
pub(crate) async fn delete_backend(
    State(s): AppState,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    let force = force(&query)?;
    apply_write(&s, &headers, crate::history::Source::Api, move |t| {
        let etag = backend_etag(t, &id)?;
        Ok((
            Command::DeleteBackend {
                id: id.clone(),
                force,
            },
            Some(etag),
        ))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Prometheus metrics (the same registry as the metrics listener).
#[utoipa::path(get, path = "/api/v1/metrics", tag = "metrics",
    responses(
        (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 404, description = "Metrics are disabled", body = crate::ErrorBody)))]
pub(crate) async fn metrics_text(State(s): AppState) -> Result<Response, ApiError> {
    let render = s.metrics.as_ref().ok_or_else(|| ApiError::NotFound {
        message: "metrics are disabled ([metrics] enabled = false)".into(),
    })?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(),
    )
        .into_response())
}

/// Re-reads the config file and applies it: validated exactly as at start-up; on any error the
/// running configuration is unchanged (the same as sending SIGHUP to the process).
#[utoipa::path(post, path = "/api/v1/config/reload", tag = "config",
    responses(
        (status = 200, description = "Reloaded: what changed", body = crate::ReloadReport),
        (status = 400, description = "The file is invalid or cannot be served (field: the key; message: file:line:column)", body = crate::ErrorBody),
        (status = 404, description = "Reload is not enabled (embedded API without a config file)", body = crate::ErrorBody)))]
pub(crate) async fn reload_config(
    State(s): AppState,
) -> Result<Json<crate::ReloadReport>, ApiError> {
    crate::reload::run(&s).await.map(Json)
}

/// `?limit=N` of the history (1-1000, default 100).
fn history_limit(query: &Option<String>) -> Result<usize, ApiError> {
    let mut limit = 100;
    for pair in query.as_deref().unwrap_or("").split('&') {
        let Some(value) = pair.strip_prefix("limit=") else {
            continue;
        };
        limit = value
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=crate::history::MAX_REVISIONS).contains(n))
            .ok_or_else(|| ApiError::InvalidField {
                field: "limit".into(),
                message: format!(
                    "query parameter limit={value:?} must be a number from 1 to {}",
                    crate::history::MAX_REVISIONS
                ),
            })?;
    }
    Ok(limit)
}

/// The newest configuration revisions, newest first.
#[utoipa::path(get, path = "/api/v1/config/history", tag = "config",
    params(("limit" = Option<u16>, Query, minimum = 1, maximum = 1000, description = "How many (default 100)")),
    responses(
        (status = 200, description = "Revisions, newest first", body = [crate::history::Revision]),
        (status = 400, description = "Invalid limit", body = crate::ErrorBody)))]
pub(crate) async fn config_history(
    State(s): AppState,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<crate::history::Revision>>, ApiError> {
    let limit = history_limit(&query)?;
    Ok(Json(s.history.list(limit)))
}

fn history_error(e: crate::history::HistoryError) -> ApiError {
    match e {
        crate::history::HistoryError::Unknown(_) => ApiError::NotFound {
            message: e.to_string(),
        },
        crate::history::HistoryError::Damaged { .. } => ApiError::Conflict {
            code: "history_damaged",
            message: e.to_string(),
            field: Some("revision".into()),
        },
    }
}

/// The whole configuration (virtual hosts and backends) at a revision.
#[utoipa::path(get, path = "/api/v1/config/revisions/{revision}", tag = "config",
    params(("revision" = u64, Path, minimum = 1, description = "A revision number")),
    responses(
        (status = 200, description = "The configuration at that revision", body = crate::history::Snapshot),
        (status = 400, description = "Not a revision number", body = crate::ErrorBody),
        (status = 404, description = "Unknown revision, or older than the kept window", body = crate::ErrorBody),
        (status = 409, description = "The history cannot rebuild it (damaged file)", body = crate::ErrorBody)))]
pub(crate) async fn config_revision(
    State(s): AppState,
    Path(revision): Path<String>,
) -> Result<Json<crate::history::Snapshot>, ApiError> {
    let revision: u64 = revision.parse().map_err(|_| ApiError::InvalidField {
        field: "revision".into(),
        message: format!("{revision:?} is not a revision number"),
    })?;
    s.history
        .snapshot_at(revision)
        .map(Json)
        .map_err(history_error)
}

/// Body of `POST /api/v1/config/rollback`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The revision whose configuration to apply again.
    #[schema(minimum = 1)]
    #[serde(deserialize_with = "vhost_routing::whole_u64")]
    pub revision: u64,
}

/// What a rollback did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RollbackReport {
    /// The revision rolled back to.
    pub to: u64,
    /// The new revision the rollback made (the current one if nothing changed).
    pub revision: u64,
    /// Whether anything changed.
    pub changed: bool,
}

/// Applies the configuration of an earlier revision as a new revision: validated (certificates
/// must load), written to the config file in one replacement and published, like any write.
#[utoipa::path(post, path = "/api/v1/config/rollback", tag = "config", request_body = RollbackRequest,
    responses(
        (status = 200, description = "Rolled back (or already there)", body = RollbackReport),
        (status = 400, description = "Invalid body", body = crate::ErrorBody),
        (status = 404, description = "Unknown revision, or older than the kept window", body = crate::ErrorBody),
        (status = 409, description = "The history cannot rebuild it (damaged file)", body = crate::ErrorBody),
        (status = 413, description = "Body too large", body = crate::ErrorBody),
        (status = 415, description = "Not JSON", body = crate::ErrorBody),
        (status = 422, description = "That configuration cannot be served now (a certificate does not load)", body = crate::ErrorBody)))]
pub(crate) async fn config_rollback(
    State(s): AppState,
    ApiJson(request): ApiJson<RollbackRequest>,
) -> Result<Json<RollbackReport>, ApiError> {
    let client = crate::middleware::CLIENT
        .try_with(|c| *c)
        .ok()
        .flatten()
        .map(|c| c.to_string());
    let this = Arc::clone(&s);
    let result = tokio::task::spawn_blocking(move || {
        let mut guard = this.writer.blocking_lock();
        let writer = &mut *guard;
        let target = writer
            .history
            .reader
            .state_at(request.revision)
            .map_err(history_error)?;
        let current = writer.routes.current();
        if target == **current.state() {
            return Ok(RollbackReport {
                to: request.revision,
                revision: writer.history.reader.latest(),
                changed: false,
            });
        }
        let commit = this.hook.prepare(&target)?;
        let changes = changes_between(current.state(), &target);
        if let Some(file) = writer.file.as_mut() {
            file.persist_all(&changes)?;
        }
        let table = writer.routes.publish(target);
        commit();
        let revision = writer
            .history
            .record(
                current.state(),
                table.state(),
                crate::history::Source::Rollback,
                client,
            )
            .unwrap_or_else(|| writer.history.reader.latest());
        tracing::info!(to = request.revision, revision, "configuration rolled back");
        Ok(RollbackReport {
            to: request.revision,
            revision,
            changed: true,
        })
    })
    .await
    .unwrap_or_else(|source| {
        Err(ApiError::TaskFailed {
            what: "rollback",
            source,
        })
    });
    let outcome = if result.is_ok() {
        "applied"
    } else {
        "rejected"
    };
    metrics::counter!("config_changes_total", "result" => outcome).increment(1);
    result.map(Json)
}

/// The record changes that turn `before` into `after`, for the config file.
fn changes_between(before: &vhost_routing::State, after: &vhost_routing::State) -> Vec<Change> {
    let (domains, backends) = crate::history::diff(before, after);
    let mut changes = Vec::new();
    for c in domains {
        changes.push(match (c.before, c.after) {
            (None, Some(v)) => Change::DomainAdded(v),
            (Some(v), None) => Change::DomainDeleted(v),
            (Some(before), Some(after)) => Change::DomainUpdated { before, after },
            (None, None) => continue,
        });
    }
    for c in backends {
        changes.push(match (c.before, c.after) {
            (None, Some(b)) => Change::BackendAdded(b),
            (Some(b), None) => Change::BackendDeleted(b),
            (Some(before), Some(after)) => Change::BackendUpdated { before, after },
            (None, None) => continue,
        });
    }
    changes
}

/// Live events as Server-Sent Events: `config` (a new revision: its number, source, and the
/// domains and backends it changed), `health` (a backend went up or down), `rollout` (a step,
/// abort or promotion). Send `Last-Event-ID` to resume after an event still in the buffer (the
/// last 1,024); a client that falls further behind gets an `overflow` event and is dropped.
#[utoipa::path(get, path = "/api/v1/events", tag = "events",
    params(("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id")),
    responses(
        (status = 200, description = "An endless `text/event-stream`", content_type = "text/event-stream", body = String),
        (status = 400, description = "Last-Event-ID is not a number", body = crate::ErrorBody)))]
pub(crate) async fn events_stream(
    State(s): AppState,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::InvalidField {
                    field: "Last-Event-ID".into(),
                    message: "Last-Event-ID must be an event id (a number)".into(),
                })?,
        ),
    };
    Ok(s.events().stream(after).into_response())
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::NotFound {
        message: "no such API route; see /api/v1/openapi.json".into(),
    }
}
