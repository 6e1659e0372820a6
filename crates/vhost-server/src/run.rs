//! Start-up and shutdown of the whole proxy.
//!
//! [`Config`] → [`crate::checks`] (exposure rule, certificates, limits) → [`RouteWriter`] (first
//! snapshot) + [`CertStore`] → Pingora `Server` with the [`vhost_pingora::proxy_service`] on its
//! own thread → the control loop: a reload order (SIGHUP) re-reads the file
//! ([`crate::reload`]); a stop order (SIGTERM/SIGINT) stops accepting, drains in-flight requests
//! (bounded by `grace_period_secs`; requests still running then are cut and logged), returns; an
//! upgrade order (SIGQUIT, with `[proxy] upgrade_sock`) first releases the admin API and metrics
//! ports and hands the listening sockets to a process started with [`Start::Upgrade`], then
//! drains the same way.
//!
//! Threads: Pingora's proxy threads; `vhost-admin` (admin API, DNS refresh, memory upkeep, the
//! control loop); `vhost-health` (the health checker and every prober, so their timeouts are
//! never delayed by a slow admin write or a large scrape); `vhost-metrics` (the metrics listener
//! and rendering).

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{ExecutionPhase, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use tokio::sync::{mpsc, watch};
use vhost_admin::AdminState;
use vhost_config::{Config, ConfigWriter};
use vhost_health::HealthChecker;
use vhost_pingora::{proxy_service, AcmeChallenges, CertStore, Connections, VhostProxy};
use vhost_routing::{BuildOptions, RouteWriter};

use crate::acme::{AcmeManager, Certificates};
use crate::checks;
use crate::error::ServerError;
use crate::publish::{check_settings, PublishHook, SystemResolver};

/// An order for a running proxy (see [`Signals::Channel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Re-read and apply the config file, as SIGHUP does.
    Reload,
    /// Stop accepting, drain in-flight requests within the grace period and return, as SIGTERM
    /// does.
    Stop,
    /// Hand the listening sockets to a new process started with `--upgrade` (over
    /// `[proxy] upgrade_sock`), then drain and return, as SIGQUIT does.
    Upgrade,
    /// Start the binary on disk with `--upgrade` (as a child: under systemd it stays in the
    /// service, and reports itself as its main process), then hand over as [`Control::Upgrade`];
    /// as SIGUSR2 does.
    SpawnUpgrade,
}

/// How a proxy process starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// Bind the listeners itself.
    #[default]
    Fresh,
    /// Take the listening sockets over from a running process (which is sent SIGQUIT), then
    /// bind the admin API and metrics listeners as soon as it releases them.
    Upgrade,
}

/// Where a running proxy takes its orders from.
#[derive(Debug)]
pub enum Signals {
    /// The process's signals: SIGHUP reloads, SIGTERM and SIGINT stop gracefully.
    Process,
    /// A channel (embedding, in-process tests); dropping every sender stops the proxy too.
    Channel(mpsc::UnboundedReceiver<Control>),
}

/// What `--check` found in a valid configuration.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// One line: domains, backends, certificates, connection limit.
    pub summary: String,
    /// Allowed but suspicious settings.
    pub warnings: Vec<String>,
}

/// Runs every start-up check on the file at `path` without starting anything.
pub fn check(path: &Path) -> Result<CheckReport, ServerError> {
    let config = vhost_config::load(path)?;
    let nofile = checks::descriptor_limit(false);
    let checked = checks::check(&config, path, &CertStore::new(None), nofile)?;
    let summary = format!(
        "{} domains, {} backends, {}, max {} client connections",
        config.state.vhosts().len(),
        config.state.backends().len(),
        match (checked.certs.is_empty(), config.lets_encrypt.is_some()) {
            (_, true) => "certificates loaded, ACME on",
            (true, false) => "no certificates (HTTPS listener off)",
            (false, false) => "certificates loaded",
        },
        checked.limits.max_connections,
    );
    Ok(CheckReport {
        summary,
        warnings: checked.warnings,
    })
}

/// Pingora's shutdown trigger, fired by the control loop: `Some(true)` hands the listeners
/// over first (upgrade), `Some(false)` terminates.
struct ChannelShutdown(watch::Receiver<Option<bool>>);

#[async_trait]
impl ShutdownSignalWatch for ChannelShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        // An error means the sender is gone: shut down as well.
        let upgrade = rx
            .wait_for(Option::is_some)
            .await
            .map(|v| *v == Some(true))
            .unwrap_or(false);
        if upgrade {
            ShutdownSignal::GracefulUpgrade
        } else {
            ShutdownSignal::GracefulTerminate
        }
    }
}

/// Binds `addr`; with `wait`, retries for up to 30 s while it is in use (an upgrade: the old
/// process releases it when it receives SIGQUIT).
pub(crate) fn bind_listener(
    addr: SocketAddr,
    key: &'static str,
    wait: bool,
) -> Result<TcpListener, ServerError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e)
                if wait
                    && e.kind() == std::io::ErrorKind::AddrInUse
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => return Err(ServerError::Bind { addr, key, source }),
        }
    }
}

fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, ServerError> {
    bind_listener(addr, key, false)
}

/// Runs `f` on a new thread with its own single-threaded runtime.
fn spawn_runtime<F>(name: &'static str, f: F) -> Result<JoinHandle<()>, ServerError>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ServerError::Start { what: name, source })?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || rt.block_on(f))
        .map_err(|source| ServerError::Start { what: name, source })
}

/// Runs the proxy for a loaded `config` (read from `path`, which changes through the admin API
/// are written back to) until a stop order; see the module docs.
pub fn run(config: Config, path: &Path, signals: Signals) -> Result<(), ServerError> {
    run_with(config, path, signals, Start::Fresh)
}

/// Like [`run`], starting as `start` says.
pub fn run_with(
    config: Config,
    path: &Path,
    signals: Signals,
    start: Start,
) -> Result<(), ServerError> {
    let proxy_conf = &config.proxy;
    let upgrading = start == Start::Upgrade;
    if upgrading && proxy_conf.upgrade_sock.is_none() {
        return Err(ServerError::Upgrade(
            "--upgrade needs [proxy] upgrade_sock (the same path as the running process's)".into(),
        ));
    }
    let nofile = checks::descriptor_limit(true);
    let certs = Arc::new(CertStore::new(None));
    let checked = checks::check(&config, path, &certs, nofile)?;
    for warning in &checked.warnings {
        tracing::warn!("{warning}");
    }
    // With ACME the HTTPS listener starts even before the first certificate arrives.
    let https_enabled = !checked.certs.is_empty() || config.lets_encrypt.is_some();
    certs.publish(checked.certs);
    if !https_enabled {
        tracing::warn!("no certificate configured: HTTPS listener not started");
    }

    if !upgrading {
        // Fail early and clearly when a proxy port is taken (an upgrade inherits them).
        drop(bind(proxy_conf.listen_addr_http, "proxy.listen_addr_http")?);
        if https_enabled {
            drop(bind(proxy_conf.listen_addr, "proxy.listen_addr")?);
        }
    }

    let (_, mut writer) = RouteWriter::new(
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
        // Bounded by the config (max 15): no overflow.
        max_retries: proxy_conf.max_retries + 1,
        upgrade_sock: proxy_conf.upgrade_sock.as_ref().map_or_else(
            || ServerConf::default().upgrade_sock,
            |p| p.display().to_string(),
        ),
        ..ServerConf::default()
    };
    let opt = pingora_core::server::configuration::Opt {
        upgrade: upgrading,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), server_conf);
    if upgrading {
        tracing::info!(
            upgrade_sock = proxy_conf
                .upgrade_sock
                .as_ref()
                .map(|p| p.display().to_string()),
            "waiting for the running process's listening sockets (send it SIGQUIT)"
        );
        server.bootstrap();
        tracing::info!("listening sockets received");
    }
    // Our own listeners: the old process releases them when it gets SIGQUIT.
    let admin_listener = bind_listener(
        proxy_conf.management_api_addr,
        "proxy.management_api_addr",
        upgrading,
    )?;
    let metrics = crate::metrics::install_with(&config.metrics, upgrading)?;
    let challenges = config
        .lets_encrypt
        .as_ref()
        .map(|_| Arc::new(AcmeChallenges::default()));
    let proxy = VhostProxy::new(
        &mut writer,
        vhost_pingora::ProxyOptions {
            acme: challenges.clone(),
            certs: Some(Arc::clone(&certs)),
            ..crate::proxy_options(&config)
        },
    );
    let acme = config
        .lets_encrypt
        .as_ref()
        .zip(challenges)
        .map(|(le, challenges)| {
            AcmeManager::new(
                le,
                Arc::clone(writer.store()),
                Arc::clone(&certs),
                challenges,
            )
        });
    if let Some(acme) = &acme {
        acme.load_cached();
    }
    let inflight = proxy.inflight();
    let proxy_metrics = proxy.metrics();
    // Probe results, for the health events of `GET /api/v1/events`.
    let (probe_tx, probe_rx) = tokio::sync::mpsc::unbounded_channel();
    let checker = HealthChecker::new(
        Arc::clone(writer.store()),
        check_settings(&config.health_check),
    )
    .with_events(probe_tx);
    let hook = PublishHook {
        certs: Arc::clone(&certs),
        health: checker.waker(),
        store: Arc::clone(writer.store()),
        gauges: Arc::default(),
        acme: acme.as_ref().map(|a| a.waker()),
    };
    hook.published();
    let gauges = Arc::clone(&hook.gauges);
    let rollout_gauges = Arc::clone(&gauges);
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
        .with_reload(reload)
        .with_certificates(Arc::new(Certificates {
            certs: Arc::clone(&certs),
            acme: acme.clone(),
        }));
    let metrics = metrics.map(|m| {
        let sources = crate::metrics::Sources {
            proxy: proxy.metrics(),
            health: checker.metrics(),
            config: gauges,
            certs: Arc::clone(&certs),
            inflight: proxy.inflight(),
            acme: acme.clone(),
        };
        let render = crate::metrics::render(m.handle.clone(), sources);
        (m, render)
    });
    if let Some((_, render)) = &metrics {
        admin = admin.with_metrics(render.clone());
    }
    let admin = Arc::new(admin);
    let admin_router = vhost_admin::router(Arc::clone(&admin));
    let dns_refresh = Duration::from_secs(proxy_conf.dns_refresh_secs);
    let webhook = config.notifications.webhook_url.clone();
    let conns = Connections::new(checked.limits);
    let service = proxy_service(
        &server.configuration,
        proxy,
        Some(proxy_conf.listen_addr_http),
        https_enabled.then(|| (proxy_conf.listen_addr, Arc::clone(&certs))),
        Arc::clone(&conns),
    )
    .map_err(ServerError::Setup)?;
    server.add_service(service);

    let (stop_tx, stop_rx) = watch::channel(None::<bool>);
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
        .map_err(|source| ServerError::Start {
            what: "proxy server thread",
            source,
        })?;

    tracing::info!(
        config = %path.display(),
        http = %proxy_conf.listen_addr_http,
        https = %if https_enabled { proxy_conf.listen_addr.to_string() } else { "off".into() },
        admin = %proxy_conf.management_api_addr,
        metrics = %metrics.as_ref().map_or("off".into(), |(m, _)| m.addr.to_string()),
        domains = config.state.vhosts().len(),
        backends = config.state.backends().len(),
        max_connections = conns.limits().max_connections,
        file_descriptors = nofile,
        "pingora-vhost started"
    );
    // Under systemd (Type=notify): serving; and, after an upgrade, the service's process now.
    crate::sd::notify(&format!("READY=1\nMAINPID={}", std::process::id()));

    // Background work that must not wait on the admin runtime gets threads of its own.
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    // The admin API and metrics listeners stop first on an upgrade (their ports go to the new
    // process), with everything else otherwise.
    let (http_stop_tx, http_stop_rx) = watch::channel(false);
    let mut helpers = vec![spawn_runtime(
        "vhost-health",
        checker.run(admin_stop_rx.clone()),
    )?];
    if let Some(acme) = acme {
        helpers.push(spawn_runtime(
            "vhost-acme",
            acme.run(admin_stop_rx.clone()),
        )?);
    }
    if let Some((m, render)) = metrics {
        let router = crate::metrics::router(render, checked.metrics_token);
        let stop = admin_stop_rx.clone();
        let http_stop = http_stop_rx.clone();
        helpers.push(spawn_runtime("vhost-metrics", async move {
            tokio::spawn(crate::metrics::upkeep(m.handle, stop));
            serve_http("metrics", m.listener, router, http_stop).await;
        })?);
    }

    let grace = Duration::from_secs(proxy_conf.grace_period_secs);
    let has_upgrade_sock = proxy_conf.upgrade_sock.is_some();
    let upgrade_sock = proxy_conf.upgrade_sock.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ServerError::Start {
            what: "admin runtime",
            source,
        })?;
    let result = rt.block_on(async move {
        let admin_task = tokio::spawn(serve_http(
            "admin API",
            admin_listener,
            admin_router,
            http_stop_rx,
        ));
        if !dns_refresh.is_zero() {
            tokio::spawn(refresh_dns(
                Arc::clone(&admin),
                after_publish,
                dns_refresh,
                admin_stop_rx.clone(),
            ));
        }
        if let Some(url) = webhook {
            tokio::spawn(crate::notify::run(
                Arc::clone(admin.events()),
                url,
                admin_stop_rx.clone(),
            ));
        }
        tokio::spawn(crate::rollout::health_events(
            Arc::clone(&admin),
            probe_rx,
            admin_stop_rx.clone(),
        ));
        tokio::spawn(crate::rollout::run(
            Arc::clone(&admin),
            proxy_metrics,
            rollout_gauges,
            admin_stop_rx.clone(),
        ));
        tokio::spawn(crate::memory::trim_after_waves(
            Arc::clone(&conns),
            admin_stop_rx,
        ));
        let mut orders = Orders::new(signals)?;
        let mut done_rx = done_rx;
        let upgrade = loop {
            tokio::select! {
                order = orders.next() => match order {
                    Control::Reload => {
                        tracing::info!("{}: reloading {}", orders.reload_name(), path.display());
                        let admin = Arc::clone(&admin);
                        // Logged (applied or rejected, with the located error) by `reload` itself.
                        tokio::task::spawn_blocking(move || admin.reload());
                    }
                    Control::Stop => {
                        tracing::info!(grace_period_secs = grace.as_secs(), "{} received: graceful shutdown", orders.stop_name());
                        break false;
                    }
                    Control::SpawnUpgrade if has_upgrade_sock => {
                        match spawn_successor(path, upgrade_sock.as_deref()).await {
                            Ok(pid) => {
                                tracing::info!(pid, grace_period_secs = grace.as_secs(), "upgrade: new process started; handing the listening sockets over, then draining");
                                break true;
                            }
                            Err(e) => tracing::error!(error = %e, "upgrade: cannot start the new process; still serving"),
                        }
                    }
                    Control::Upgrade if has_upgrade_sock => {
                        tracing::info!(grace_period_secs = grace.as_secs(), "upgrade: handing the listening sockets to the new process, then draining");
                        break true;
                    }
                    Control::Upgrade => {
                        tracing::warn!("SIGQUIT without [proxy] upgrade_sock: no process can take the sockets over; shutting down gracefully");
                        break false;
                    }
                    Control::SpawnUpgrade => {
                        tracing::warn!("SIGUSR2 without [proxy] upgrade_sock: no upgrade; still serving");
                    }
                },
                _ = &mut done_rx => return Err(ServerError::Stopped),
            }
        };
        // An upgrade keeps serving on the shared sockets for Pingora's hand-over pause (5 s).
        let handover = if upgrade { Duration::from_secs(5) } else { Duration::ZERO };
        let deadline = Instant::now() + grace + handover;
        if upgrade {
            // Release the admin API and metrics ports for the new process at once.
            let _ = http_stop_tx.send(true);
        }
        let _ = stop_tx.send(Some(upgrade));
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
        let _ = tokio::time::timeout(grace + handover, listeners_closed).await;
        // ...then until in-flight requests are done, at most until the deadline.
        while inflight.get() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = http_stop_tx.send(true);
        let _ = admin_stop_tx.send(true);
        let _ = admin_task.await;
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
    });
    for helper in helpers {
        let _ = helper.join();
    }
    result
}

/// Starts the binary this process was started from (the path on disk, so a replaced file runs
/// the new version) with `--upgrade --config <path>`, and waits until it listens on
/// `upgrade_sock` for the sockets. Returns its process id.
async fn spawn_successor(
    config: &Path,
    upgrade_sock: Option<&Path>,
) -> Result<u32, std::io::Error> {
    let program = std::env::args_os()
        .next()
        .ok_or_else(|| std::io::Error::other("no program name in argv"))?;
    let child = std::process::Command::new(program)
        .arg("--upgrade")
        .arg("--config")
        .arg(config)
        .spawn()?;
    let pid = child.id();
    // The child outlives this process; it is not waited for here.
    drop(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while upgrade_sock.is_some_and(|s| !s.exists()) {
        if Instant::now() > deadline {
            return Err(std::io::Error::other(
                "the new process did not open upgrade_sock within 10 s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(pid)
}

/// Re-resolves backend host names every `every`; a changed address publishes a new snapshot.
async fn refresh_dns(
    admin: Arc<AdminState>,
    after_publish: PublishHook,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if admin.refresh_resolution().await {
            after_publish.published();
        }
    }
}

/// The control loop's source of orders.
enum Orders {
    Process {
        term: tokio::signal::unix::Signal,
        int: tokio::signal::unix::Signal,
        hup: tokio::signal::unix::Signal,
        quit: tokio::signal::unix::Signal,
        usr2: tokio::signal::unix::Signal,
        last_stop: &'static str,
    },
    Channel(mpsc::UnboundedReceiver<Control>),
}

impl Orders {
    fn new(signals: Signals) -> Result<Self, ServerError> {
        use tokio::signal::unix::{signal, SignalKind};
        let watch = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| ServerError::Signal {
                signal: name,
                source,
            })
        };
        Ok(match signals {
            Signals::Process => Self::Process {
                term: watch(SignalKind::terminate(), "SIGTERM")?,
                int: watch(SignalKind::interrupt(), "SIGINT")?,
                hup: watch(SignalKind::hangup(), "SIGHUP")?,
                quit: watch(SignalKind::quit(), "SIGQUIT")?,
                usr2: watch(SignalKind::user_defined2(), "SIGUSR2")?,
                last_stop: "SIGTERM",
            },
            Signals::Channel(rx) => Self::Channel(rx),
        })
    }

    async fn next(&mut self) -> Control {
        match self {
            Self::Process {
                term,
                int,
                hup,
                quit,
                usr2,
                last_stop,
            } => tokio::select! {
                _ = term.recv() => { *last_stop = "SIGTERM"; Control::Stop }
                _ = int.recv() => { *last_stop = "SIGINT"; Control::Stop }
                _ = hup.recv() => Control::Reload,
                _ = quit.recv() => { *last_stop = "SIGQUIT"; Control::Upgrade }
                _ = usr2.recv() => Control::SpawnUpgrade,
            },
            Self::Channel(rx) => rx.recv().await.unwrap_or(Control::Stop),
        }
    }

    /// What the last stop order was, for the log.
    fn stop_name(&self) -> &'static str {
        match self {
            Self::Process { last_stop, .. } => last_stop,
            Self::Channel(_) => "stop order",
        }
    }

    fn reload_name(&self) -> &'static str {
        match self {
            Self::Process { .. } => "SIGHUP received",
            Self::Channel(_) => "reload order",
        }
    }
}

/// Serves `router` on `listener` (already bound) until `stop` flips.
async fn serve_http(
    what: &'static str,
    listener: TcpListener,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the {what}");
            return;
        }
    };
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = vhost_admin::serve(listener, router, shutdown).await {
        tracing::error!(error = %e, "{what} listener failed");
    }
}
