//! What follows a change of the routing state, wherever it comes from (admin API write, reload,
//! DNS refresh): certificates checked before the change is accepted and published right after
//! it, the configuration gauges updated, the health checker
//! woken for new backends. Also the config → settings mappings and the system resolver used
//! when a snapshot is built.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use vhost_admin::{ApplyHook, Refusal};
use vhost_health::CheckSettings;
use vhost_pingora::{CertError, CertStore, FileRole, CERT_READ_TIMEOUT};
use vhost_routing::{BackendAddress, RouteStore, State};

use crate::metrics::ConfigGauges;

/// Resolves backend host names with the system resolver when a snapshot is built (never on the
/// request path): the first IPv4 address, else the first address.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl vhost_routing::Resolve for SystemResolver {
    fn resolve(&self, address: &BackendAddress) -> Option<SocketAddr> {
        if let Some(addr) = address.socket_addr() {
            return Some(addr);
        }
        let resolved = address
            .as_str()
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| {
                let all: Vec<SocketAddr> = addrs.by_ref().collect();
                all.iter().find(|a| a.is_ipv4()).or(all.first()).copied()
            });
        if resolved.is_none() {
            tracing::warn!(
                address = address.as_str(),
                "backend address does not resolve; it gets no traffic until it does"
            );
        }
        resolved
    }
}

/// Admin API hook: a change is accepted only if the certificates it references load; right
/// after the routing snapshot is published they go live, and [`PublishHook::published`] runs.
#[derive(Clone)]
pub(crate) struct PublishHook {
    pub(crate) certs: Arc<CertStore>,
    pub(crate) health: Arc<tokio::sync::Notify>,
    pub(crate) store: Arc<RouteStore>,
    pub(crate) gauges: Arc<ConfigGauges>,
    /// Wakes the ACME manager (domains may want certificates), when ACME is on.
    pub(crate) acme: Option<Arc<tokio::sync::Notify>>,
}

impl PublishHook {
    /// Everything that follows a newly published snapshot.
    pub(crate) fn published(&self) {
        self.gauges.observe(&self.store.load());
        self.health.notify_one();
        if let Some(acme) = &self.acme {
            acme.notify_one();
        }
    }
}

/// The request field a certificate error is about.
fn cert_field(e: &CertError) -> &'static str {
    match e.subject() {
        Some(("default", FileRole::Certificate)) => "proxy.default_cert_path",
        Some(("default", FileRole::Key)) => "proxy.default_key_path",
        Some((_, FileRole::Key)) => "tls_key_path",
        Some((_, FileRole::CaBundle)) => "tls_ca_path",
        _ => "tls_cert_path",
    }
}

impl ApplyHook for PublishHook {
    fn prepare(&self, next: &State) -> Result<Box<dyn FnOnce() + Send>, Refusal> {
        let default_paths = self.certs.current().default_paths().cloned();
        let map = self
            .certs
            .prepare_within(next, default_paths, CERT_READ_TIMEOUT)
            .map_err(|e| Refusal {
                field: cert_field(&e).to_owned(),
                source: Box::new(e),
            })?;
        let hook = self.clone();
        Ok(Box::new(move || {
            hook.certs.publish(map);
            hook.published();
        }))
    }
}

/// `[health_check]` → the checker's settings.
pub fn check_settings(h: &vhost_config::HealthCheckConfig) -> CheckSettings {
    CheckSettings {
        interval: Duration::from_secs(h.interval_secs),
        timeout: Duration::from_secs(h.timeout_secs),
        unhealthy_threshold: h.unhealthy_threshold,
        healthy_threshold: h.healthy_threshold,
        kind: h.kind,
        path: h.path.clone(),
        host: h.host.clone(),
        expected_status: h.expected_status,
    }
}
