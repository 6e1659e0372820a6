//! The whole pingora-vhost proxy as a library: [`run`] builds and runs it from a loaded
//! [`vhost_config::Config`] — routing snapshot, certificates, the Pingora proxy service, admin
//! API, health checker, metrics — until a stop order, and [`check`] runs the same start-up
//! checks without starting anything. The `pingora-vhost` binary is CLI parsing, logging set-up
//! and one call into this crate; another binary can embed the full product the same way.
//!
//! Where it sits: it is the wiring layer, above every other crate — routing model
//! ([`vhost_routing`]) ← health checker ([`vhost_health`]) ← Pingora adapter
//! ([`vhost_pingora`]) and admin API ([`vhost_admin`]) ← this crate ← the binary.
//!
//! Modules: [`checks`] (what a configuration must pass at start-up, `--check` and reload),
//! `publish` (what follows a published snapshot), `reload` (the reload hook), [`metrics`]
//! (recorder, listener, configuration gauges), [`memory`] (giving memory back after connection
//! waves), [`demo`] (the self-contained demo), `run` (start-up, control loop, shutdown).

pub mod acme;
pub mod checks;
pub mod demo;
mod error;
mod memory;
pub mod metrics;
mod notify;
mod publish;
mod reload;
mod rollout;
mod run;
mod sd;

use std::time::Duration;

pub use error::ServerError;
pub use publish::{check_settings, SystemResolver};
pub use run::{check, run, run_with, CheckReport, Control, Signals, Start};

/// The configuration's `[proxy]` and `[health_check]` settings for the Pingora adapter.
pub fn proxy_options(config: &vhost_config::Config) -> vhost_pingora::ProxyOptions {
    let proxy = &config.proxy;
    vhost_pingora::ProxyOptions {
        connect_timeout: Duration::from_millis(proxy.connect_timeout_ms),
        read_timeout: Duration::from_millis(proxy.read_timeout_ms),
        write_timeout: Duration::from_millis(proxy.write_timeout_ms),
        idle_timeout: Duration::from_millis(proxy.idle_timeout_ms),
        max_retries: proxy.max_retries,
        https_port: proxy.listen_addr.port(),
        passive_failure_threshold: config.health_check.passive_failure_threshold,
        access_log: config.logging.access_log,
        client_keepalive: proxy.client_keepalive_timeout_ms > 0,
        canary: vhost_pingora::CanaryOptions {
            bucket_cookie: proxy.canary_cookie.clone(),
            // Validated as an HTTP token at load time, so the default is never used.
            override_header: http::HeaderName::from_bytes(proxy.canary_override_header.as_bytes())
                .unwrap_or_else(|_| http::HeaderName::from_static("x-canary")),
            override_cookie: proxy.canary_override_cookie.clone(),
            expose_served_tag: proxy.expose_served_tag,
        },
        upstream_h2_streams: proxy.upstream_h2_streams,
        websocket_idle_timeout: Duration::from_secs(proxy.websocket_idle_timeout_secs),
        h2c: proxy.h2c,
        trusted_proxies: proxy.trusted_proxies.clone(),
        request_id: proxy.request_id,
        h1_fast_path: proxy.h1_fast_path,
        upstream_hold: Duration::from_millis(proxy.upstream_hold_ms),
        proxy_protocol: proxy.proxy_protocol,
        circuit_breaker: proxy.circuit_breaker,
        ..vhost_pingora::ProxyOptions::default()
    }
}
