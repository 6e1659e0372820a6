//! # vhost-health
//!
//! Active health checking for pingora-vhost. A supervisor ([`HealthChecker::run`]) keeps one
//! prober task per backend of the current routing snapshot — added backends are probed at once,
//! deleted ones stop being probed, a changed address (or probe setting) restarts the backend's
//! history. Each prober runs on its own schedule (interval ± 10 % jitter, per-probe timeout), so a
//! slow or black-holed backend never delays the others.
//!
//! Data flow: [`RouteStore`] snapshot → probers → the backends' [`HealthCell`]s, the one health
//! state that selection (data plane), the admin API and the metrics all read.
//!
//! Rules: the first probe of a backend decides its state at once (a dead backend added at runtime
//! stops getting traffic after one probe, a live one keeps it); after that,
//! `unhealthy_threshold` consecutive failures mark it down and `healthy_threshold` consecutive
//! successes mark it up. A backend ejected passively by the proxy (consecutive connection
//! failures, see [`HealthCell::record_connect_failure`]) comes back on the next successful probe.
//! A probe that cannot run because this host is out of a resource (file descriptors, ports,
//! buffers) counts neither way: it is logged, rate-limited, and the backend keeps its state.
//!
//! The settings can be replaced while running ([`SettingsHandle`], used by a configuration
//! reload): timing and thresholds apply from each prober's next probe, a changed probe kind,
//! path, host or status range restarts the affected probers.

mod limit;
mod probe;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use vhost_routing::{Backend, BackendId, HealthCell, ProbeKind, RouteStore};

pub use limit::LogLimiter;
pub use probe::{is_local_exhaustion, probe, ProbeError};

/// Health changes decided by a backend's probes.
#[derive(Debug, Default)]
struct Transitions {
    up: vhost_metrics::Counter,
    down: vhost_metrics::Counter,
}

/// The health metrics, rendered from the current snapshot and the running probers, so a
/// backend's series leave `/metrics` with the backend.
#[derive(Debug, Clone)]
pub struct HealthMetrics {
    store: Arc<RouteStore>,
    transitions: Arc<ArcSwap<BTreeMap<BackendId, Arc<Transitions>>>>,
}

impl HealthMetrics {
    /// Appends `health_check_status` and `health_check_transitions_total` to a Prometheus
    /// text exposition.
    pub fn render(&self, out: &mut String) {
        use vhost_metrics::{Exposition, Kind};
        let table = self.store.load();
        let mut e = Exposition::new(out);
        e.family(
            "health_check_status",
            Kind::Gauge,
            "Backend health as routing sees it: 1 up, 0 down (or no address)",
        );
        for b in table.backends() {
            let up = u8::from(b.is_available());
            e.sample("health_check_status", &[("backend", b.id().as_str())], up);
        }
        e.family(
            "health_check_transitions_total",
            Kind::Counter,
            "Health changes decided by active probes, by backend and new state",
        );
        for (id, t) in self.transitions.load().iter() {
            for (to, c) in [("up", &t.up), ("down", &t.down)] {
                if c.get() > 0 {
                    e.sample(
                        "health_check_transitions_total",
                        &[("backend", id.as_str()), ("to", to)],
                        c.get(),
                    );
                }
            }
        }
        e.family(
            "circuit_breaker_open",
            Kind::Gauge,
            "1 while the circuit breaker keeps a backend ejected (open or waiting for its trial)",
        );
        for b in table.backends() {
            let open = u8::from(b.health().is_ejected());
            e.sample(
                "circuit_breaker_open",
                &[("backend", b.id().as_str())],
                open,
            );
        }
        e.family(
            "circuit_breaker_ejections_total",
            Kind::Counter,
            "Times the circuit breaker ejected a backend (failed trials included)",
        );
        for b in table.backends() {
            let n = b.health().ejections();
            if n > 0 {
                e.sample(
                    "circuit_breaker_ejections_total",
                    &[("backend", b.id().as_str())],
                    n,
                );
            }
        }
    }
}

/// Global probe settings (`[health_check]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSettings {
    /// Time between two probes of one backend.
    pub interval: Duration,
    /// Time after which a probe counts as failed.
    pub timeout: Duration,
    /// Consecutive failures that mark a backend down.
    pub unhealthy_threshold: u32,
    /// Consecutive successes that mark a backend up.
    pub healthy_threshold: u32,
    /// Default probe kind.
    pub kind: ProbeKind,
    /// Default HTTP probe path.
    pub path: String,
    /// Default HTTP probe Host header (`None`: the backend address's host).
    pub host: Option<String>,
    /// Default healthy HTTP status range (inclusive).
    pub expected_status: [u16; 2],
}

impl Default for CheckSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            kind: ProbeKind::Tcp,
            path: "/".into(),
            host: None,
            expected_status: [200, 399],
        }
    }
}

/// How one backend is probed: the global settings merged with its overrides.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProbePlan {
    /// TCP or HTTP.
    pub kind: ProbeKind,
    /// HTTP path.
    pub path: String,
    /// HTTP Host header.
    pub host: String,
    /// Healthy status range (inclusive).
    pub expected_status: [u16; 2],
    /// The backend's protocol: HTTP/1.1 or HTTP/2, with or without TLS.
    pub protocol: vhost_routing::BackendProtocol,
    /// Server name for TLS probes (empty: none).
    pub sni: String,
}

impl CheckSettings {
    /// The plan for `backend`.
    pub fn plan_for(&self, backend: &Backend) -> ProbePlan {
        let o = backend.health_check.clone().unwrap_or_default();
        let default_host = match backend.address.host() {
            vhost_routing::Host::Name(n) => n.to_string(),
            vhost_routing::Host::Ip(ip) if ip.is_ipv6() => format!("[{ip}]"),
            vhost_routing::Host::Ip(ip) => ip.to_string(),
        };
        ProbePlan {
            kind: o.kind.unwrap_or(self.kind),
            path: o.path.unwrap_or_else(|| self.path.clone()),
            host: o.host.or_else(|| self.host.clone()).unwrap_or(default_host),
            expected_status: o.expected_status.unwrap_or(self.expected_status),
            protocol: backend.protocol,
            sni: if backend.protocol.tls() {
                backend.sni()
            } else {
                String::new()
            },
        }
    }
}

/// One probe result, for observers (tests, diagnostics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeEvent {
    /// The backend.
    pub backend: BackendId,
    /// The probe's error, `None` on success.
    pub error: Option<String>,
    /// Health after this probe.
    pub healthy: bool,
}

/// Replaces the settings of a running [`HealthChecker`].
#[derive(Debug, Clone)]
pub struct SettingsHandle {
    settings: Arc<ArcSwap<CheckSettings>>,
    wake: Arc<Notify>,
}

impl SettingsHandle {
    /// The settings in use.
    pub fn get(&self) -> Arc<CheckSettings> {
        self.settings.load_full()
    }

    /// Uses `settings` from now on (see the crate docs for when each field takes effect).
    pub fn set(&self, settings: CheckSettings) {
        self.settings.store(Arc::new(settings));
        self.wake.notify_one();
    }
}

/// The health-check supervisor.
pub struct HealthChecker {
    store: Arc<RouteStore>,
    transitions: Arc<ArcSwap<BTreeMap<BackendId, Arc<Transitions>>>>,
    settings: Arc<ArcSwap<CheckSettings>>,
    wake: Arc<Notify>,
    events: Option<mpsc::UnboundedSender<ProbeEvent>>,
}

impl std::fmt::Debug for HealthChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthChecker")
            .field("settings", &self.settings.load())
            .finish_non_exhaustive()
    }
}

/// How often the supervisor re-reads the snapshot when nobody wakes it.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

struct Prober {
    key: (SocketAddr, ProbePlan),
    cell: Arc<HealthCell>,
    transitions: Arc<Transitions>,
    task: JoinHandle<()>,
}

impl HealthChecker {
    /// A checker of the backends published in `store`.
    pub fn new(store: Arc<RouteStore>, settings: CheckSettings) -> Self {
        Self {
            store,
            transitions: Arc::default(),
            settings: Arc::new(ArcSwap::from_pointee(settings)),
            wake: Arc::new(Notify::new()),
            events: None,
        }
    }

    /// Sends every probe result to `events`.
    pub fn with_events(mut self, events: mpsc::UnboundedSender<ProbeEvent>) -> Self {
        self.events = Some(events);
        self
    }

    /// Notify this after publishing a snapshot so new backends are probed at once.
    pub fn waker(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    /// The health metrics (render them at scrape time).
    pub fn metrics(&self) -> HealthMetrics {
        HealthMetrics {
            store: Arc::clone(&self.store),
            transitions: Arc::clone(&self.transitions),
        }
    }

    /// A handle that replaces the settings while the checker runs.
    pub fn settings(&self) -> SettingsHandle {
        SettingsHandle {
            settings: Arc::clone(&self.settings),
            wake: Arc::clone(&self.wake),
        }
    }

    /// Runs until `shutdown` becomes true (or its sender is dropped).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut probers: HashMap<BackendId, Prober> = HashMap::new();
        loop {
            self.reconcile(&mut probers);
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(RECONCILE_EVERY) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
        for (_, p) in probers {
            p.task.abort();
        }
    }

    fn reconcile(&self, probers: &mut HashMap<BackendId, Prober>) {
        let table = self.store.load();
        let settings = self.settings.load();
        probers.retain(|id, p| {
            let keep = table.backend(id).is_some_and(|entry| {
                entry.socket_addr().is_some_and(|addr| {
                    p.key == (addr, settings.plan_for(entry.backend()))
                        && Arc::ptr_eq(&p.cell, entry.health())
                })
            });
            if !keep {
                p.task.abort();
                tracing::debug!(backend = %id, "stopped probing");
            }
            keep
        });
        for entry in table.backends() {
            let Some(addr) = entry.socket_addr() else {
                continue;
            };
            if probers.contains_key(entry.id()) {
                continue;
            }
            let plan = settings.plan_for(entry.backend());
            let cell = Arc::clone(entry.health());
            // A backend probed again (new address or plan) keeps counting.
            let transitions = self
                .transitions
                .load()
                .get(entry.id())
                .cloned()
                .unwrap_or_default();
            let task = tokio::spawn(prober(
                entry.id().clone(),
                addr,
                plan.clone(),
                Arc::clone(&cell),
                Arc::clone(&transitions),
                Arc::clone(&self.settings),
                self.events.clone(),
            ));
            probers.insert(
                entry.id().clone(),
                Prober {
                    key: (addr, plan),
                    cell,
                    transitions,
                    task,
                },
            );
        }
        // Transitions of backends no longer probed leave the metrics.
        let now: BTreeMap<BackendId, Arc<Transitions>> = probers
            .iter()
            .map(|(id, p)| (id.clone(), Arc::clone(&p.transitions)))
            .collect();
        self.transitions.store(Arc::new(now));
    }
}

fn jittered(interval: Duration) -> Duration {
    // ±10 %, so probes of many backends do not align.
    let factor = 0.9 + fastrand::f64() * 0.2;
    interval.mul_f64(factor)
}

/// Probes that could not run for a local reason: one log line per minute at most.
static LOCAL_FAILURES: std::sync::OnceLock<LogLimiter> = std::sync::OnceLock::new();

async fn prober(
    id: BackendId,
    addr: SocketAddr,
    plan: ProbePlan,
    cell: Arc<HealthCell>,
    transitions: Arc<Transitions>,
    settings: Arc<ArcSwap<CheckSettings>>,
    events: Option<mpsc::UnboundedSender<ProbeEvent>>,
) {
    let mut first = true;
    let (mut failures, mut successes) = (0u32, 0u32);
    loop {
        let settings = settings.load_full();
        let result = match tokio::time::timeout(settings.timeout, probe(addr, &plan)).await {
            Ok(r) => r,
            Err(_) => Err(ProbeError::Timeout(settings.timeout)),
        };
        let was_healthy = cell.is_healthy();
        match &result {
            Err(e @ ProbeError::Local(_)) => {
                let limiter =
                    LOCAL_FAILURES.get_or_init(|| LogLimiter::new(Duration::from_secs(60)));
                if let Some(held_back) = limiter.admit() {
                    tracing::warn!(backend = %id, %addr, error = %e, similar_not_logged = held_back, "health probe could not run (this host is out of a resource); not counted against the backend");
                }
            }
            Ok(()) => {
                successes = successes.saturating_add(1);
                failures = 0;
                if !was_healthy && (first || successes >= settings.healthy_threshold) {
                    cell.set_healthy(true);
                    transitions.up.add(1);
                    tracing::info!(backend = %id, %addr, from = "down", to = "up", reason = %format!("{successes} successful probe(s)"), "backend health changed");
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                successes = 0;
                if was_healthy && (first || failures >= settings.unhealthy_threshold) {
                    cell.set_healthy(false);
                    transitions.down.add(1);
                    tracing::warn!(backend = %id, %addr, from = "up", to = "down", reason = %e, failures, "backend health changed");
                }
            }
        }
        // A probe that could not run decides nothing, not even as the first one.
        first = first && matches!(result, Err(ProbeError::Local(_)));
        let healthy = cell.is_healthy();
        if let Some(tx) = &events {
            let _ = tx.send(ProbeEvent {
                backend: id.clone(),
                error: result.err().map(|e| e.to_string()),
                healthy,
            });
        }
        tokio::time::sleep(jittered(settings.interval)).await;
    }
}
