//! # vhost-pingora
//!
//! The Pingora adapter of pingora-vhost, embeddable in any Pingora application:
//! - [`VhostProxy`]: a `ProxyHttp` that routes each request through the current
//!   [`vhost_routing::RoutingTable`] (host/SNI → virtual host → active tag → weighted healthy
//!   backend), answers 308/404/421/503 itself and retries connection failures on siblings;
//! - [`CertStore`] / [`SniCertResolver`]: per-SNI certificates that can change at runtime;
//! - [`VhostApp`]: the connection layer — limits, deadlines and the TLS handshake of every client
//!   connection (see [`conn`]);
//! - [`proxy_service`]: the Pingora service with an HTTP and/or an HTTPS (h2 + http/1.1) listener.
//!
//! Data flow: listener → [`VhostApp`] (connection limit, TLS, request-head deadline and size) →
//! [`VhostProxy::request_filter`](pingora_proxy::ProxyHttp::request_filter) (snapshot load, host
//! lookup) → `upstream_peer` (backend) → Pingora forwards the request — or, for a plain
//! HTTP/1.1 request to an HTTP/1 backend, the fast path (`fast.rs`) runs the same filters on
//! Pingora's session types without its per-request channels.

pub mod acme;
pub mod certs;
pub mod conn;
mod fast;
pub mod metrics;
pub mod policy;
pub mod proxy;

use std::net::SocketAddr;
use std::sync::Arc;

use pingora_core::apps::HttpServerOptions;
use pingora_core::connectors::{ConnectorOptions, TransportConnector};
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::protocols::http::v2::server::default_h2_options;
use pingora_core::server::configuration::ServerConf;
use pingora_core::services::listening::Service;

pub use acme::{AcmeChallenges, ChallengeCertError, ACME_TLS_ALPN, HTTP01_PREFIX};
pub use certs::{
    AcmeCerts, CertError, CertMap, CertStore, CertifiedKey, ClientSni, FileRole, SniCertResolver,
    CERT_READ_TIMEOUT, MAX_PEM_BYTES,
};
pub use conn::{CloseReason, ConnLimits, Connections, VhostApp};
pub use metrics::{ProxyMetrics, SideTotals};
pub use policy::{
    client_behind, expand, new_request_id, sane_request_id, Limiter, Policies, TemplateValues,
};
pub use proxy::{CanaryOptions, Inflight, LocalReason, ProxyOptions, RequestCtx, VhostProxy};

/// Registers the descriptions (Prometheus `# HELP`) of every metric of this crate.
pub fn describe() {
    metrics::describe();
    conn::describe();
}

/// Builds the proxy service: a plain-HTTP listener on `http_addr` and, when given, an HTTPS
/// listener on `https` whose certificates come from the store (TLS 1.2+, ALPN h2 and
/// http/1.1). Every client connection is bounded by `conns` (see [`conn`]).
pub fn proxy_service(
    conf: &Arc<ServerConf>,
    proxy: VhostProxy,
    http_addr: Option<SocketAddr>,
    https: Option<(SocketAddr, Arc<CertStore>)>,
    conns: Arc<Connections>,
) -> pingora_error::Result<Service<VhostApp>> {
    let limits = conns.limits();
    let challenges = proxy.acme_challenges();
    let h2c = proxy.h2c();
    let proxy_protocol = proxy.proxy_protocol_peers();
    let fast = fast::FastPath::new(
        proxy.clone(),
        TransportConnector::new(Some(ConnectorOptions::from_server_conf(conf))),
        conf.max_retries,
        proxy.upstream_hold(),
    );
    let mut http = pingora_proxy::http_proxy(conf, proxy);
    let mut server_options = HttpServerOptions::default();
    // Connections the listener recognises as h2c (see conn.rs) go through Pingora's own
    // preface check.
    server_options.h2c = h2c;
    // HTTP/2 connections with no open stream are closed like idle HTTP/1.1 ones.
    server_options.h2_idle_timeout = Some(limits.keepalive_timeout);
    http.server_options = Some(server_options);
    let mut h2 = default_h2_options();
    h2.max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    http.h2_options = Some(h2);
    let https_addr = https.as_ref().map(|(addr, _)| *addr);
    let app = VhostApp::new(
        http,
        https.map(|(addr, certs)| {
            (
                addr,
                SniCertResolver::new(certs).with_challenges(challenges),
            )
        }),
        conns,
        proxy_protocol,
        fast,
    )?;
    let mut service = Service::new("pingora-vhost".to_owned(), app);
    // No L4 read buffer: HTTP/1 heads are read straight into Pingora's buffer and OpenSSL reads
    // ahead into its own (released while idle), so an idle connection holds no 64 KiB buffer.
    let buffers = L4BufferSettings::new(0, pingora_core::listeners::DEFAULT_L4_WRITE_BUFFER_SIZE);
    for addr in http_addr.into_iter().chain(https_addr) {
        service.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(buffers));
    }
    Ok(service)
}
