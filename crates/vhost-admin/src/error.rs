//! API errors: every failure becomes `{"error": {"code", "message", "field"}}` with the status
//! that tells the client what to do. Client input never produces a 5xx; only a failure to write
//! the config file does (and then nothing changed).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use vhost_routing::{CommandError, ProbeFieldError, RolloutError, ValidationError};

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_value`, `not_found`, `already_exists`.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// The request field the error is about, when there is one (e.g. `address`, `tags[0]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Why an [`ApplyHook`](crate::ApplyHook) refuses a state: the request field (or config key)
/// concerned and the cause, kept as the source.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct Refusal {
    /// The field or key concerned, e.g. `tls_cert_path`.
    pub field: String,
    /// Why the state cannot be served.
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// A failed API request. The running configuration and the file are unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not valid JSON.
    #[error("malformed JSON: {message}")]
    MalformedJson {
        /// Parser message.
        message: String,
    },
    /// A field is missing, unknown or has an invalid value.
    #[error("{message}")]
    InvalidField {
        /// The field path.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The body is not `application/json`.
    #[error("expected a body with Content-Type: application/json")]
    UnsupportedMediaType,
    /// The body is over the limit.
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// Missing or wrong bearer token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// The request is not addressed to the API itself (foreign `Host` or `Origin`, no token).
    #[error("{message}")]
    Forbidden {
        /// Why.
        message: String,
    },
    /// No such domain / backend / route.
    #[error("{message}")]
    NotFound {
        /// What was not found.
        message: String,
    },
    /// The request conflicts with the current configuration.
    #[error("{message}")]
    Conflict {
        /// Machine-readable reason.
        code: &'static str,
        /// Explanation.
        message: String,
        /// The field concerned.
        field: Option<String>,
    },
    /// `If-Match` does not match the resource's current ETag.
    #[error("the resource changed since it was read (If-Match {given} does not match {current})")]
    PreconditionFailed {
        /// The ETag sent.
        given: String,
        /// The current ETag.
        current: String,
    },
    /// Every field is valid on its own but they contradict each other (only one of
    /// `tls_cert_path` / `tls_key_path`, a status range with its low end above its high end):
    /// rules the OpenAPI schema cannot state.
    #[error("{message}")]
    Inconsistent {
        /// The field concerned.
        field: String,
        /// What contradicts what.
        message: String,
    },
    /// The change is valid but cannot be served here (e.g. a certificate file does not load).
    #[error(transparent)]
    Unservable(#[from] Refusal),
    /// The config file could not be written; nothing was changed.
    #[error("could not persist the change, nothing was changed: {0}")]
    Persist(#[from] vhost_config::PersistError),
    /// A write task panicked; nothing was changed unless it was already published.
    #[error("the {what} task failed: {source}")]
    TaskFailed {
        /// Which task.
        what: &'static str,
        /// The panic or cancellation.
        source: tokio::task::JoinError,
    },
    /// Too many requests of this kind for now; try again after `retry_after_secs`.
    #[error("{message}")]
    TooManyRequests {
        /// Machine-readable reason.
        code: &'static str,
        /// Explanation.
        message: String,
        /// Seconds until a retry can succeed (sent as `Retry-After`).
        retry_after_secs: u64,
    },
    /// The configuration file to reload is invalid; the running configuration is unchanged.
    #[error("{message}")]
    InvalidConfig {
        /// The key path the error is about (empty when it is about the whole file).
        field: String,
        /// `file:line:column: key: what is wrong`.
        message: String,
    },
}

impl ApiError {
    /// HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson { .. } | Self::InvalidField { .. } | Self::InvalidConfig { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::Inconsistent { .. } | Self::Unservable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Persist(_) | Self::TaskFailed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson { .. } => "malformed_json",
            Self::InvalidField { .. } => "invalid_value",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden { .. } => "forbidden",
            Self::NotFound { .. } => "not_found",
            Self::Conflict { code, .. } | Self::TooManyRequests { code, .. } => code,
            Self::PreconditionFailed { .. } => "precondition_failed",
            Self::Inconsistent { .. } => "inconsistent",
            Self::Unservable(_) => "unservable",
            Self::Persist(_) => "persist_failed",
            Self::TaskFailed { .. } => "internal",
            Self::InvalidConfig { .. } => "invalid_config",
        }
    }

    /// For a request whose body is the canary itself: fields named from the domain
    /// (`canary.steps`) are named from the body (`steps`).
    pub(crate) fn within_canary(self) -> Self {
        let strip = |field: String| match field.strip_prefix("canary.") {
            Some(rest) => rest.to_owned(),
            None => field,
        };
        match self {
            Self::InvalidField { field, message } => Self::InvalidField {
                field: strip(field),
                message,
            },
            Self::Inconsistent { field, message } => Self::Inconsistent {
                field: strip(field),
                message,
            },
            other => other,
        }
    }

    fn field(&self) -> Option<String> {
        match self {
            Self::InvalidField { field, .. }
            | Self::InvalidConfig { field, .. }
            | Self::Inconsistent { field, .. }
                if !field.is_empty() =>
            {
                Some(field.clone())
            }
            Self::Conflict { field, .. } => field.clone(),
            Self::Unservable(refusal) => Some(refusal.field.clone()),
            _ => None,
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        let message = e.to_string();
        match e {
            CommandError::Invalid(v) => {
                let field = v.field().to_owned();
                if is_cross_field(&v) {
                    Self::Inconsistent { field, message }
                } else {
                    Self::InvalidField { field, message }
                }
            }
            CommandError::DomainNotFound { .. }
            | CommandError::BackendNotFound { .. }
            | CommandError::NoCanary { .. } => Self::NotFound { message },
            CommandError::DomainExists { .. } => Self::Conflict {
                code: "already_exists",
                message,
                field: Some("domain".into()),
            },
            CommandError::BackendExists { .. } => Self::Conflict {
                code: "already_exists",
                message,
                field: Some("id".into()),
            },
            CommandError::BackendInUse { .. } => Self::Conflict {
                code: "backend_in_use",
                message,
                field: None,
            },
        }
    }
}

/// True for the rules that relate fields which are each valid on their own (422), as opposed to
/// a value outside what the API document allows (400).
fn is_cross_field(error: &ValidationError) -> bool {
    let status = 100..=599;
    match error {
        ValidationError::IncompleteTlsPair { .. }
        | ValidationError::CanaryIsPrimary { .. }
        | ValidationError::AcmeWildcard { .. }
        | ValidationError::AcmeWithOwnCertificate { .. }
        | ValidationError::TlsSettingWithoutTls { .. }
        | ValidationError::TlsSniRequired { .. } => true,
        ValidationError::InvalidRollout { reason, .. } => matches!(
            reason,
            RolloutError::Steps
                | RolloutError::WeightNotStep { .. }
                | RolloutError::AbortedWithWeight
        ),
        ValidationError::InvalidProbe {
            reason: ProbeFieldError::ExpectedStatus(lo, hi),
            ..
        } => status.contains(lo) && status.contains(hi),
        _ => false,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "admin API request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
                field: self.field(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        if matches!(self, Self::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Self::TooManyRequests {
            retry_after_secs, ..
        } = self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}
