//! `GET /api/v1/certificates` and `POST /api/v1/certificates/{domain}/renew`.
//!
//! The admin API knows nothing of TLS or ACME: the binary provides a [`CertificateSource`]
//! (its certificate store and ACME manager) through [`crate::AdminState::with_certificates`].
//! Without one the list is empty and renewals are refused with 409 `acme_disabled`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use vhost_routing::DomainName;

use crate::error::ApiError;
use crate::AdminState;

/// Where a certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CertificateOrigin {
    /// PEM files named in the config (`tls_cert_path`, or `[proxy] default_cert_path` for the
    /// entry named `default`).
    File,
    /// Obtained and renewed automatically from the ACME CA of `[lets_encrypt]`.
    Acme,
}

/// One certificate as the API shows it. Times are RFC 3339 UTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct CertificateView {
    /// The domain (`*.example.com` for a wildcard), or `default` for the default certificate.
    pub domain: String,
    /// `file` or `acme`.
    pub source: CertificateOrigin,
    /// The issuer's common name, when a certificate is served.
    pub issuer: Option<String>,
    /// The serial number (hexadecimal), when a certificate is served.
    pub serial: Option<String>,
    /// Start of validity.
    pub not_before: Option<String>,
    /// Expiry.
    pub not_after: Option<String>,
    /// ACME: when the next order is due (renewal, or retry after a failure).
    pub next_renewal: Option<String>,
    /// ACME: why the last order failed (cleared by a success).
    pub last_error: Option<String>,
    /// ACME: failed orders in a row.
    pub consecutive_failures: u32,
}

/// Why a renewal request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenewRefusal {
    /// No such domain.
    #[error("unknown domain {0}")]
    UnknownDomain(String),
    /// ACME is not configured (`[lets_encrypt]` absent).
    #[error("automatic certificates are off: add a [lets_encrypt] section to the config")]
    AcmeDisabled,
    /// The domain's certificate is not managed by ACME.
    #[error("{domain} does not get an ACME certificate: {reason}")]
    NotManaged {
        /// The domain.
        domain: String,
        /// Why (own certificate file, `acme = false`, wildcard).
        reason: String,
    },
    /// The per-domain order limit is reached.
    #[error(
        "{domain} already had {orders} orders in the last hour; retry in {retry_after_secs} s"
    )]
    Limited {
        /// The domain.
        domain: String,
        /// Orders in the last hour.
        orders: usize,
        /// Seconds until another order is allowed.
        retry_after_secs: u64,
    },
}

/// The certificates of a running proxy (implemented by the binary).
pub trait CertificateSource: Send + Sync + 'static {
    /// Every served or wanted certificate: domains with their own file, ACME domains (also
    /// before their first certificate arrives) and the default certificate.
    fn list(&self) -> Vec<CertificateView>;
    /// Orders a new certificate for `domain` now (off the request path); returns the entry.
    fn renew(&self, domain: &DomainName) -> Result<CertificateView, RenewRefusal>;
}

impl From<RenewRefusal> for ApiError {
    fn from(e: RenewRefusal) -> Self {
        let message = e.to_string();
        match e {
            RenewRefusal::UnknownDomain(_) => Self::NotFound { message },
            RenewRefusal::AcmeDisabled => Self::Conflict {
                code: "acme_disabled",
                message,
                field: None,
            },
            RenewRefusal::NotManaged { .. } => Self::Conflict {
                code: "not_acme_managed",
                message,
                field: Some("domain".into()),
            },
            RenewRefusal::Limited {
                retry_after_secs, ..
            } => Self::TooManyRequests {
                code: "order_limit",
                message,
                retry_after_secs,
            },
        }
    }
}

type AppState = State<Arc<AdminState>>;

/// Certificates served or wanted: source, issuer, validity and, for ACME, the renewal schedule
/// and the last error.
#[utoipa::path(get, path = "/api/v1/certificates", tag = "certificates",
    responses((status = 200, description = "Certificates, by domain", body = [CertificateView])))]
pub(crate) async fn list_certificates(State(s): AppState) -> Json<Vec<CertificateView>> {
    Json(
        s.certificates
            .as_ref()
            .map(|c| c.list())
            .unwrap_or_default(),
    )
}

/// Orders a new ACME certificate for the domain now. The order runs in the background; follow
/// it with `GET /api/v1/certificates`. The current certificate is served until the new one
/// arrives.
#[utoipa::path(post, path = "/api/v1/certificates/{domain}/renew", tag = "certificates",
    params(("domain" = DomainName, Path, description = "Domain name")),
    responses(
        (status = 202, description = "Order scheduled", body = CertificateView),
        (status = 400, description = "Invalid domain name", body = crate::ErrorBody),
        (status = 404, description = "Unknown domain", body = crate::ErrorBody),
        (status = 409, description = "ACME is off, or the domain's certificate is not managed by ACME", body = crate::ErrorBody),
        (status = 429, description = "The domain's order limit per hour is reached (Retry-After)", body = crate::ErrorBody)))]
pub(crate) async fn renew_certificate(
    State(s): AppState,
    Path(domain): Path<String>,
) -> Result<Response, ApiError> {
    let domain = DomainName::parse(&domain).map_err(|e| ApiError::InvalidField {
        field: "domain".into(),
        message: e.to_string(),
    })?;
    if s.store.load().state().vhost(&domain).is_none() {
        return Err(RenewRefusal::UnknownDomain(domain.to_string()).into());
    }
    let source = s.certificates.as_ref().ok_or(RenewRefusal::AcmeDisabled)?;
    let view = source.renew(&domain)?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}
