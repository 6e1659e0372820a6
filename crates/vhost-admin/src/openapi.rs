//! The OpenAPI 3 document, generated from the handlers' annotations (utoipa) and served at
//! `GET /api/v1/openapi.json`.

use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::handlers;

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
        handlers::list_backends,
        handlers::create_backend,
        handlers::get_backend,
        handlers::update_backend,
        handlers::delete_backend,
        handlers::metrics_text,
        handlers::reload_config,
        serve,
    ),
    components(schemas(
        vhost_routing::VirtualHost,
        vhost_routing::VirtualHostUpdate,
        vhost_routing::Backend,
        vhost_routing::BackendUpdate,
        handlers::BackendView,
        handlers::Health,
        handlers::SwitchRequest,
        crate::ReloadReport,
        crate::reload::Diff,
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

/// The document as this API runs now: with a token in force every operation requires the
/// bearer scheme and may answer 401; without one there is no security requirement (the API is
/// loopback-only then) and every operation may answer 403 (foreign `Host` or `Origin`).
pub fn document(token_in_force: bool) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::{RefOr, Response};
    let mut doc = ApiDoc::openapi();
    let (status, description) = if token_in_force {
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
    for item in doc.paths.paths.values_mut() {
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
    Json(document(state.has_token()))
}
