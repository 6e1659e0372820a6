//! Typed errors of the model: every variant names the offending item, so the config loader can
//! point at a line and the admin API at a field.

use thiserror::Error;

use crate::names::{BackendId, DomainName, Tag};

/// A record or a whole configuration breaks a rule of the model.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValidationError {
    /// Two virtual hosts with the same domain.
    #[error("domain {domain} is defined more than once")]
    DuplicateDomain {
        /// The repeated domain.
        domain: DomainName,
    },
    /// Two backends with the same id.
    #[error("backend id {id} is defined more than once")]
    DuplicateBackend {
        /// The repeated id.
        id: BackendId,
    },
    /// A backend without tags would never receive traffic.
    #[error("backend {id} has an empty tag list; give it at least one tag")]
    EmptyTagList {
        /// The backend.
        id: BackendId,
    },
    /// The same tag twice in one backend's list.
    #[error("backend {id} lists tag {tag} more than once")]
    DuplicateTag {
        /// The backend.
        id: BackendId,
        /// The repeated tag.
        tag: Tag,
    },
    /// Weight outside 1..=256.
    #[error("backend {id} has weight {weight}; weights go from 1 to {max}", max = crate::MAX_WEIGHT)]
    InvalidWeight {
        /// The backend.
        id: BackendId,
        /// The rejected weight.
        weight: u16,
    },
    /// Invalid `health_check` overrides.
    #[error("backend {id} has invalid health_check settings: {reason}")]
    InvalidProbe {
        /// The backend.
        id: BackendId,
        /// What is wrong.
        reason: ProbeFieldError,
    },
    /// Only one of `tls_cert_path` / `tls_key_path` is set.
    #[error(
        "domain {domain} sets only one of tls_cert_path and tls_key_path; set both or neither"
    )]
    IncompleteTlsPair {
        /// The domain.
        domain: DomainName,
    },
    /// The canary's tag is the domain's primary tag.
    #[error(
        "domain {domain}: the canary tag {tag} is already the primary tag (enabled_backends_tag)"
    )]
    CanaryIsPrimary {
        /// The domain.
        domain: DomainName,
        /// The tag.
        tag: Tag,
    },
    /// The canary's rollout plan is invalid.
    #[error("domain {domain}: invalid canary rollout: {reason}")]
    InvalidRollout {
        /// The domain.
        domain: DomainName,
        /// What is wrong.
        reason: crate::rollout::RolloutError,
    },
    /// An empty TLS path.
    #[error("domain {domain} has an empty tls_cert_path or tls_key_path")]
    EmptyTlsPath {
        /// The domain.
        domain: DomainName,
    },
    /// A wildcard as a backend's TLS server name.
    #[error("backend {id}: tls_sni must be a host name, not a wildcard")]
    WildcardSni {
        /// The backend.
        id: BackendId,
    },
    /// A TLS backend addressed by IP, verified, without `tls_sni`.
    #[error("backend {id}: its address is an IP address, so the name to verify its certificate against is unknown: set tls_sni (the name in its certificate), or tls_verify = false")]
    TlsSniRequired {
        /// The backend.
        id: BackendId,
    },
    /// An empty `tls_ca_path`.
    #[error("backend {id}: tls_ca_path is empty; remove the key to trust the system's roots")]
    EmptyCaPath {
        /// The backend.
        id: BackendId,
    },
    /// A TLS setting on a backend that does not use TLS.
    #[error("backend {id}: {field} applies to TLS backends (protocol https or h2), but protocol is {protocol}")]
    TlsSettingWithoutTls {
        /// The backend.
        id: BackendId,
        /// The setting.
        field: &'static str,
        /// The backend's protocol.
        protocol: &'static str,
    },
    /// A policy setting of a backend is out of range.
    #[error("backend {id}: {field} is out of range")]
    InvalidBackendPolicy {
        /// The backend.
        id: BackendId,
        /// The setting.
        field: &'static str,
    },
    /// A traffic-policy setting of a domain is invalid.
    #[error("domain {domain}: {field}: {reason}")]
    InvalidPolicy {
        /// The domain.
        domain: DomainName,
        /// The setting.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// `acme = true` on a wildcard domain.
    #[error("domain {domain}: wildcard domains cannot get ACME certificates (HTTP-01 and TLS-ALPN-01 cannot validate them; DNS-01 is not supported); set tls_cert_path/tls_key_path")]
    AcmeWildcard {
        /// The domain.
        domain: DomainName,
    },
    /// `acme = true` together with `tls_cert_path`.
    #[error("domain {domain}: acme = true and tls_cert_path are exclusive; remove one")]
    AcmeWithOwnCertificate {
        /// The domain.
        domain: DomainName,
    },
}

/// A probe setting (global `[health_check]` or a backend's override) is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProbeFieldError {
    /// The HTTP probe path.
    #[error("probe path {0:?} must start with '/' and contain no spaces")]
    Path(String),
    /// The HTTP probe Host header.
    #[error("probe host {0:?} must be non-empty and contain no spaces")]
    Host(String),
    /// The healthy status range.
    #[error(
        "expected_status [{0}, {1}] must be a range of HTTP status codes (100-599, low first)"
    )]
    ExpectedStatus(u16, u16),
}

impl ProbeFieldError {
    /// The setting's key within a `health_check` table.
    pub fn key(&self) -> &'static str {
        match self {
            Self::Path(_) => "path",
            Self::Host(_) => "host",
            Self::ExpectedStatus(..) => "expected_status",
        }
    }
}

impl ValidationError {
    /// The record field the error is about, as named in the config file and the API.
    pub fn field(&self) -> &'static str {
        match self {
            Self::DuplicateDomain { .. } => "domain",
            Self::DuplicateBackend { .. } => "id",
            Self::EmptyTagList { .. } | Self::DuplicateTag { .. } => "tags",
            Self::InvalidWeight { .. } => "weight",
            Self::InvalidProbe { reason, .. } => match reason {
                ProbeFieldError::Path(_) => "health_check.path",
                ProbeFieldError::Host(_) => "health_check.host",
                ProbeFieldError::ExpectedStatus(..) => "health_check.expected_status",
            },
            Self::IncompleteTlsPair { .. } | Self::EmptyTlsPath { .. } => "tls_cert_path",
            Self::AcmeWildcard { .. } | Self::AcmeWithOwnCertificate { .. } => "acme",
            Self::WildcardSni { .. } | Self::TlsSniRequired { .. } => "tls_sni",
            Self::InvalidPolicy { field, .. } | Self::InvalidBackendPolicy { field, .. } => field,
            Self::EmptyCaPath { .. } => "tls_ca_path",
            Self::TlsSettingWithoutTls { field, .. } => field,
            Self::CanaryIsPrimary { .. } => "canary.tag",
            Self::InvalidRollout { reason, .. } => match reason {
                crate::rollout::RolloutError::Steps => "canary.steps",
                crate::rollout::RolloutError::WeightNotStep { .. }
                | crate::rollout::RolloutError::AbortedWithWeight => "canary.weight",
                crate::rollout::RolloutError::StepInterval => "canary.step_interval_secs",
                crate::rollout::RolloutError::Analysis(_) => "canary.analysis",
            },
        }
    }
}

/// A [`crate::Command`] could not be applied; the state it was applied to is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CommandError {
    /// The resulting record or configuration would be invalid.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// No virtual host with this domain.
    #[error("domain {domain} not found")]
    DomainNotFound {
        /// The domain asked for.
        domain: DomainName,
    },
    /// The domain has no canary.
    #[error("domain {domain} has no canary")]
    NoCanary {
        /// The domain.
        domain: DomainName,
    },
    /// No backend with this id.
    #[error("backend {id} not found")]
    BackendNotFound {
        /// The id asked for.
        id: BackendId,
    },
    /// Creating a domain that exists.
    #[error("domain {domain} already exists")]
    DomainExists {
        /// The domain.
        domain: DomainName,
    },
    /// Creating a backend that exists.
    #[error("backend {id} already exists")]
    BackendExists {
        /// The id.
        id: BackendId,
    },
    /// Deleting (or retagging) a backend would leave these domains' active tags without backends.
    #[error(
        "backend {id} is the last backend of the active tag of {}; switch those domains first or use force",
        list_domains(domains)
    )]
    BackendInUse {
        /// The backend.
        id: BackendId,
        /// Domains that would be left without a backend.
        domains: Vec<DomainName>,
    },
}

fn list_domains(domains: &[DomainName]) -> String {
    domains
        .iter()
        .map(DomainName::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}
