//! Start-up and shutdown of the proxy process.
//!
//! config file → [`vhost_config::Config`] → [`crate::checks`] (exposure rule, certificates,
//! limits) → [`RouteWriter`] (first snapshot) + [`CertStore`] → Pingora `Server` with the
//! [`vhost_pingora::proxy_service`] → wait for signals: SIGHUP reloads the file
//! ([`crate::reload`]); SIGTERM/SIGINT stop accepting, drain in-flight requests (bounded by
//! `grace_period_secs`; requests still running then are cut and logged), exit.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{ExecutionPhase, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use thiserror::Error;
use tokio::sync::watch;
use vhost_admin::{AdminState, ApplyHook};
use vhost_config::{Config, ConfigError, ConfigWriter, PersistError};
use vhost_health::{CheckSettings, HealthChecker};
use vhost_pingora::{
    proxy_service, CertStore, Connections, ProxyMetrics, ProxyOptions, VhostProxy,
    CERT_READ_TIMEOUT,
};
use vhost_routing::{BackendAddress, BuildOptions, RouteStore, RouteWriter, State};

use crate::checks::{self, LocatedCertError};
use crate::metrics::ConfigGauges;

/// Why the process could not start or stopped abnormally.
#[derive(Debug, Error)]
pub(crate) enum AppError {
    /// The config file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A certificate file is unusable.
    #[error(transparent)]
    Cert(Box<LocatedCertError>),
    /// The log file cannot be opened.
    #[error("cannot open log file {}: {source}", path.display())]
    LogFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file cannot be opened for write-back.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The admin API would be exposed without authentication.
    #[error("{0}")]
    Exposure(String),
    /// A listener address cannot be bound.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The config key it comes from.
        key: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Pingora refused the setup.
    #[error("proxy setup failed: {0}")]
    Setup(String),
    /// Demo set-up failed.
    #[error("demo: {0}")]
    Demo(String),
    /// Signal handling or the shutdown sequence failed.
    #[error("{0}")]
    Runtime(String),
}

/// Resolves backend host names with the system resolver when a snapshot is built.
struct SystemResolver;

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
/// after the routing snapshot is published they go live and the health checker looks at the new
/// backend set (new backends are probed at once).
#[derive(Clone)]
pub(crate) struct PublishHook {
    certs: Arc<CertStore>,
    health: Arc<tokio::sync::Notify>,
    store: Arc<RouteStore>,
    proxy_metrics: Arc<ProxyMetrics>,
    gauges: Arc<ConfigGauges>,
}

impl PublishHook {
    /// Everything that follows a newly published snapshot.
    pub(crate) fn published(&self) {
        let table = self.store.load_full();
        self.proxy_metrics.prepare(&table);
        self.gauges.observe(&table, &self.certs.current());
        self.health.notify_one();
    }
}

impl ApplyHook for PublishHook {
    fn prepare(&self, next: &State) -> Result<Box<dyn FnOnce() + Send>, String> {
        let default_paths = self.certs.current().default_paths().cloned();
        let map = self
            .certs
            .prepare_within(next, default_paths, CERT_READ_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let hook = self.clone();
        Ok(Box::new(move || {
            hook.certs.publish(map);
            hook.published();
        }))
    }
}

/// `[health_check]` → the checker's settings.
pub(crate) fn check_settings(h: &vhost_config::HealthCheckConfig) -> CheckSettings {
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

/// `--check`: runs the start-up checks on the file; returns a summary and the warnings.
pub(crate) fn check(path: &Path) -> Result<(String, Vec<String>), AppError> {
    let config = vhost_config::load(path)?;
    let nofile = checks::descriptor_limit(false);
    let checked = checks::check(&config, path, &CertStore::new(None), nofile)?;
    let summary = format!(
        "{} domains, {} backends, {}, max {} client connections",
        config.state.vhosts().len(),
        config.state.backends().len(),
        if checked.certs.is_empty() {
            "no certificates (HTTPS listener off)"
        } else {
            "certificates loaded"
        },
        checked.limits.max_connections,
    );
    Ok((summary, checked.warnings))
}

/// Pingora's shutdown trigger, fired by our own signal handling.
struct ChannelShutdown(watch::Receiver<bool>);

#[async_trait]
impl ShutdownSignalWatch for ChannelShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        // An error means the sender is gone: shut down as well.
        let _ = rx.wait_for(|stop| *stop).await;
        ShutdownSignal::GracefulTerminate
    }
}

fn ensure_bindable(addr: SocketAddr, key: &'static str) -> Result<(), AppError> {
    TcpListener::bind(addr)
        .map(drop)
        .map_err(|source| AppError::Bind { addr, key, source })
}

/// Runs the proxy described by the config file until SIGTERM or SIGINT.
pub(crate) fn run(path: &Path) -> Result<(), AppError> {
    let config = vhost_config::load(path)?;
    let _log_guard = crate::logging::init(&config.logging)?;
    run_config(config, path)
}

/// Runs the proxy for an already loaded config.
pub(crate) fn run_config(config: Config, path: &Path) -> Result<(), AppError> {
    let proxy_conf = &config.proxy;
    let nofile = checks::descriptor_limit(true);
    let certs = Arc::new(CertStore::new(None));
    let checked = checks::check(&config, path, &certs, nofile)?;
    for warning in &checked.warnings {
        tracing::warn!("{warning}");
    }
    let https_enabled = !checked.certs.is_empty();
    certs.publish(checked.certs);
    if !https_enabled {
        tracing::warn!("no certificate configured: HTTPS listener not started");
    }

    let admin_listener =
        TcpListener::bind(proxy_conf.management_api_addr).map_err(|source| AppError::Bind {
            addr: proxy_conf.management_api_addr,
            key: "proxy.management_api_addr",
            source,
        })?;
    let metrics = crate::metrics::install(&config.metrics)?;
    ensure_bindable(proxy_conf.listen_addr_http, "proxy.listen_addr_http")?;
    if https_enabled {
        ensure_bindable(proxy_conf.listen_addr, "proxy.listen_addr")?;
    }

    let (store, writer) = RouteWriter::new(
        config.state.clone(),
        Box::new(SystemResolver),
        BuildOptions::default(),
    );

    let threads = match proxy_conf.threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let server_conf = ServerConf {
        threads,
        // One runtime per thread, connections spread by the kernel (as nginx workers): less
        // cross-thread wake-up and scheduling work per request than a work-stealing pool.
        work_stealing: false,
        grace_period_seconds: Some(proxy_conf.grace_period_secs),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: proxy_conf.upstream_keepalive_pool_size,
        max_retries: proxy_conf.max_retries + 1,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, server_conf);
    let proxy = VhostProxy::new(
        store,
        ProxyOptions {
            connect_timeout: Duration::from_millis(proxy_conf.connect_timeout_ms),
            read_timeout: Duration::from_millis(proxy_conf.read_timeout_ms),
            write_timeout: Duration::from_millis(proxy_conf.write_timeout_ms),
            idle_timeout: Duration::from_millis(proxy_conf.idle_timeout_ms),
            max_retries: proxy_conf.max_retries,
            https_port: proxy_conf.listen_addr.port(),
            passive_failure_threshold: config.health_check.passive_failure_threshold,
            access_log: config.logging.access_log,
            client_keepalive: proxy_conf.client_keepalive_timeout_ms > 0,
            ..ProxyOptions::default()
        },
    );
    let inflight = proxy.inflight();
    let checker = HealthChecker::new(
        Arc::clone(writer.store()),
        check_settings(&config.health_check),
    );
    let hook = PublishHook {
        certs: Arc::clone(&certs),
        health: checker.waker(),
        store: Arc::clone(writer.store()),
        proxy_metrics: proxy.metrics(),
        gauges: Arc::default(),
    };
    hook.published();
    // The same follow-up actions after a DNS re-resolution publishes a snapshot.
    let after_publish = hook.clone();
    let reload = crate::reload::ServerReload {
        path: path.to_owned(),
        running: config.clone(),
        certs: Arc::clone(&certs),
        health: checker.settings(),
        after_publish: hook.clone(),
        https_listening: https_enabled,
        nofile,
    };
    let mut admin = AdminState::new(writer, Some(ConfigWriter::open(path)?), checked.api_token)
        .with_hook(hook)
        .with_listen_addr(proxy_conf.management_api_addr)
        .with_reload(reload);
    let upkeep = metrics.as_ref().map(|m| m.handle.clone());
    let metrics = metrics.map(|m| {
        let render = crate::metrics::render(m.handle, proxy.inflight());
        (m.listener, m.addr, render)
    });
    if let Some((_, _, render)) = &metrics {
        admin = admin.with_metrics(render.clone());
    }
    let admin = Arc::new(admin);
    let admin_router = vhost_admin::router(Arc::clone(&admin));
    let dns_refresh = Duration::from_secs(proxy_conf.dns_refresh_secs);
    let conns = Connections::new(checked.limits);
    let service = proxy_service(
        &server.configuration,
        proxy,
        Some(proxy_conf.listen_addr_http),
        https_enabled.then(|| (proxy_conf.listen_addr, Arc::clone(&certs))),
        Arc::clone(&conns),
    )
    .map_err(|e| AppError::Setup(e.to_string()))?;
    server.add_service(service);

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut phases = server.watch_execution_phase();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("pingora".into())
        .spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(ChannelShutdown(stop_rx)),
            });
            let _ = done_tx.send(());
        })
        .map_err(|e| AppError::Runtime(format!("cannot start the server thread: {e}")))?;

    tracing::info!(
        config = %path.display(),
        http = %proxy_conf.listen_addr_http,
        https = %if https_enabled { proxy_conf.listen_addr.to_string() } else { "off".into() },
        admin = %proxy_conf.management_api_addr,
        metrics = %metrics.as_ref().map_or("off".into(), |(_, addr, _)| addr.to_string()),
        domains = config.state.vhosts().len(),
        backends = config.state.backends().len(),
        max_connections = conns.limits().max_connections,
        file_descriptors = nofile,
        "pingora-vhost started"
    );

    let grace = Duration::from_secs(proxy_conf.grace_period_secs);
    let metrics_token = checked.metrics_token;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AppError::Runtime(format!("cannot start the signal runtime: {e}")))?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
        spawn_http("admin API", admin_listener, admin_router, admin_stop_rx.clone())?;
        if let Some((listener, _, render)) = metrics {
            let router = crate::metrics::router(render, metrics_token);
            spawn_http("metrics", listener, router, admin_stop_rx.clone())?;
        }
        if let Some(handle) = upkeep {
            tokio::spawn(crate::metrics::upkeep(handle, admin_stop_rx.clone()));
        }
        if !dns_refresh.is_zero() {
            let mut stop = admin_stop_rx.clone();
            let admin = Arc::clone(&admin);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(dns_refresh);
                tick.tick().await;
                loop {
                    let stopping = tokio::select! {
                        _ = tick.tick() => false,
                        _ = stop.wait_for(|s| *s) => true,
                    };
                    if stopping {
                        return;
                    }
                    if admin.refresh_resolution().await {
                        after_publish.published();
                    }
                }
            });
        }
        tokio::spawn(crate::memory::trim_after_waves(Arc::clone(&conns), admin_stop_rx.clone()));
        tokio::spawn(checker.run(admin_stop_rx));
        let watch = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| AppError::Runtime(format!("cannot watch {name}: {e}")))
        };
        let mut term = watch(SignalKind::terminate(), "SIGTERM")?;
        let mut int = watch(SignalKind::interrupt(), "SIGINT")?;
        let mut hup = watch(SignalKind::hangup(), "SIGHUP")?;
        let mut done_rx = done_rx;
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!(grace_period_secs = grace.as_secs(), "SIGTERM received: graceful shutdown");
                    break;
                }
                _ = int.recv() => {
                    tracing::info!(grace_period_secs = grace.as_secs(), "SIGINT received: graceful shutdown");
                    break;
                }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP received: reloading {}", path.display());
                    let admin = Arc::clone(&admin);
                    // Logged (applied or rejected, with the located error) by `reload` itself.
                    tokio::task::spawn_blocking(move || admin.reload());
                }
                _ = &mut done_rx => return Err(AppError::Runtime("the proxy server stopped unexpectedly".into())),
            }
        }
        let deadline = Instant::now() + grace;
        let _ = stop_tx.send(true);
        // Wait until listeners have stopped accepting (Pingora's grace period begins)...
        let listeners_closed = async {
            loop {
                match phases.recv().await {
                    Ok(ExecutionPhase::ShutdownGracePeriod | ExecutionPhase::ShutdownRuntimes) => break,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                }
            }
        };
        let _ = tokio::time::timeout(grace, listeners_closed).await;
        // ...then until in-flight requests are done, at most until the deadline.
        while inflight.get() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = admin_stop_tx.send(true);
        let left = inflight.get();
        if left == 0 && inflight.cut() == 0 {
            tracing::info!("all in-flight requests finished; exiting");
            return Ok(());
        }
        // Pingora stops its runtimes at the end of the same grace period, which drops what is
        // still running; each dropped request writes its access-log line (status 0, local
        // "cut") as it goes. Wait for that, briefly.
        let _ = tokio::time::timeout(Duration::from_secs(5), done_rx).await;
        let cut = inflight.cut().max(left);
        tracing::warn!(
            requests = cut,
            grace_period_secs = grace.as_secs(),
            "grace period over: requests still in flight were cut"
        );
        tracing::info!("exiting");
        Ok(())
    })
}

/// Serves `router` on `listener` (already bound) on the current runtime until `stop` flips.
fn spawn_http(
    what: &'static str,
    listener: TcpListener,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AppError> {
    listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
        .map(|listener| {
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = vhost_admin::serve(listener, router, shutdown).await {
                    tracing::error!(error = %e, "{what} listener failed");
                }
            });
        })
        .map_err(|e| AppError::Runtime(format!("cannot serve the {what}: {e}")))
}
