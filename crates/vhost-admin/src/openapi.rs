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

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "OpenAPI 3 document", content_type = "application/json")))]
pub(crate) async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
