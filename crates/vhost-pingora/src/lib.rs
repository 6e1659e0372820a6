//! # vhost-pingora
//!
//! The Pingora adapter of pingora-vhost, embeddable in any Pingora application:
//! - [`VhostProxy`]: a `ProxyHttp` that routes each request through the current
//!   [`vhost_routing::RoutingTable`] (host/SNI → virtual host → active tag → weighted healthy
//!   backend), answers 308/404/421/503 itself and retries connection failures on siblings;
//! - [`CertStore`] / [`SniCertResolver`]: per-SNI certificates that can change at runtime;
//! - [`proxy_service`]: the Pingora service with an HTTP and/or an HTTPS (h2 + http/1.1) listener.
//!
//! Data flow: listener → [`VhostProxy::request_filter`](pingora_proxy::ProxyHttp::request_filter)
//! (snapshot load, host lookup) → `upstream_peer` (backend) → Pingora forwards the request.

pub mod certs;
pub mod metrics;
pub mod proxy;

use std::sync::Arc;

use pingora_core::listeners::tls::TlsSettings;
use pingora_core::server::configuration::ServerConf;
use pingora_core::services::listening::Service;
use pingora_proxy::HttpProxy;

pub use certs::{CertError, CertMap, CertStore, CertifiedKey, ClientSni, SniCertResolver};
pub use metrics::ProxyMetrics;
pub use proxy::{Inflight, LocalReason, ProxyOptions, RequestCtx, VhostProxy};

/// Builds the proxy service: a plain-HTTP listener on `http_addr` and, when given, an HTTPS
/// listener on `https_addr` whose certificates come from `certs` (TLS 1.2+, ALPN h2 and http/1.1).
pub fn proxy_service(
    conf: &Arc<ServerConf>,
    proxy: VhostProxy,
    http_addr: Option<&str>,
    https: Option<(&str, Arc<CertStore>)>,
) -> pingora_error::Result<Service<HttpProxy<VhostProxy>>> {
    let mut service = pingora_proxy::http_proxy_service_with_name(conf, proxy, "pingora-vhost");
    if let Some(addr) = http_addr {
        service.add_tcp(addr);
    }
    if let Some((addr, certs)) = https {
        let mut tls = TlsSettings::with_callbacks(Box::new(SniCertResolver::new(certs)))?;
        tls.enable_h2();
        service.add_tls_with_settings(addr, None, tls);
    }
    Ok(service)
}
