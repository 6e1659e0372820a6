//! The OpenAPI 3 document, generated from the handlers' annotations (utoipa) and served at
//! `GET /api/v1/openapi.json`.

use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{handlers, AdminState};

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(title = "pingora-vhost admin API", description = "Domains, tagged backends and A/B switches of a running pingora-vhost."),
    paths(
        handlers::health,
        handlers::list_domains,
        handlers::create_domain,
        handlers::get_domain,
        handlers::update_domain,
        handlers::delete_domain,
        handlers::switch_domain,
        handlers::get_canary,
        handlers::put_canary,
        handlers::delete_canary,
        handlers::promote_canary,
        handlers::pause_canary,
        handlers::resume_canary,
        handlers::abort_canary,
        handlers::list_backends,
        handlers::create_backend,
        handlers::get_backend,
        handlers::update_backend,
        handlers::delete_backend,
        handlers::metrics_text,
        handlers::reload_config,
        handlers::config_history,
        handlers::config_revision,
        handlers::config_rollback,
        handlers::events_stream,
        crate::certificates::list_certificates,
        crate::certificates::renew_certificate,
        serve,
    ),
    components(schemas(
        vhost_routing::VirtualHost,
        vhost_routing::VirtualHostUpdate,
        vhost_routing::Canary,
        handlers::CanaryView,
        crate::RolloutReport,
        vhost_routing::Backend,
        vhost_routing::BackendUpdate,
        handlers::BackendView,
        handlers::Health,
        handlers::SwitchRequest,
        crate::ReloadReport,
        crate::history::Revision,
        crate::history::Snapshot,
        handlers::RollbackRequest,
        handlers::RollbackReport,
        crate::reload::Diff,
        crate::certificates::CertificateView,
        crate::certificates::CertificateOrigin,
        crate::ErrorBody,
        crate::ErrorDetail,
    )),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document as this API runs now:
/// - with a token in force every operation requires the bearer scheme and may answer 401;
///   without one there is no security requirement (the API is loopback-only then) and every
///   operation may answer 403 (foreign `Host` or `Origin`);
/// - `/api/v1/metrics` and `/api/v1/config/reload` are listed only when they are enabled;
/// - every write lists the answers every write can give: 400 (invalid path, query or body),
///   422 (valid fields that contradict each other, or a certificate that does not load), and
///   413/415 when it takes a body.
pub fn document(state: &AdminState) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::{RefOr, Response};
    let mut doc = ApiDoc::openapi();
    let (status, description) = if state.has_token() {
        ("401", "Missing or invalid bearer token")
    } else {
        doc.security = None;
        if let Some(components) = doc.components.as_mut() {
            components.security_schemes.clear();
        }
        (
            "403",
            "Request not addressed to the API itself (foreign Host or Origin)",
        )
    };
    if state.metrics.is_none() {
        doc.paths.paths.remove("/api/v1/metrics");
    }
    if state.reload.is_none() {
        doc.paths.paths.remove("/api/v1/config/reload");
    }
    let error = |text: &str| {
        RefOr::T(
            utoipa::openapi::ResponseBuilder::new()
                .description(text)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build(),
        )
    };
    for (path, item) in doc.paths.paths.iter_mut() {
        let resource = path.starts_with("/api/v1/domains") || path.starts_with("/api/v1/backends");
        let writes = [&mut item.put, &mut item.post, &mut item.delete];
        for operation in writes.into_iter().flatten().filter(|_| resource) {
            let responses = &mut operation.responses.responses;
            responses
                .entry("400".to_owned())
                .or_insert_with(|| error("Invalid path parameter, query parameter or body"));
            responses.entry("422".to_owned()).or_insert_with(|| {
                error("Fields that contradict each other, or a certificate or key file that does not load (nothing changed)")
            });
            if operation.request_body.is_some() {
                responses
                    .entry("413".to_owned())
                    .or_insert_with(|| error("Body too large"));
                responses
                    .entry("415".to_owned())
                    .or_insert_with(|| error("Not JSON"));
            }
        }
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
        ];
        for operation in operations.into_iter().flatten() {
            operation
                .responses
                .responses
                .entry(status.to_owned())
                .or_insert_with(|| RefOr::T(Response::new(description)));
        }
    }
    doc
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "OpenAPI 3 document", content_type = "application/json")))]
pub(crate) async fn serve(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<crate::AdminState>>,
) -> Json<utoipa::openapi::OpenApi> {
    Json(document(&state))
}
