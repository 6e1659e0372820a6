//! The rollout controller: moves running canaries through their steps, aborts them when their
//! analysis keeps failing and promotes them at the end — from the proxy's own measurements.
//!
//! Where it sits: a task on the admin runtime. It reads the published routing snapshot (which
//! canaries run, at which step) and the proxy's per-(domain, tag) totals
//! ([`ProxyMetrics::side_totals`]), applies the pure rules of [`vhost_routing::rollout`] every
//! analysis interval, and writes its decisions through [`AdminState::apply_internal`] — the same
//! checked, persisted, published path as an API write, so a step survives a restart and shows
//! in the config file. Its latest numbers go to the API (`GET .../canary`) and to the metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vhost_admin::{AdminState, ApiError, RolloutReport};
use vhost_metrics::LATENCY_BUCKETS;
use vhost_pingora::{ProxyMetrics, SideTotals};
use vhost_routing::{
    decide, judge, p99_ms, Action, Canary, Command, DomainName, Progress, RolloutState, Tag, Window,
};

use crate::metrics::ConfigGauges;

/// How often the controller looks at the running rollouts.
const TICK: Duration = Duration::from_millis(250);

/// What the controller follows of one running rollout.
struct Tracker {
    /// The canary tag and step this tracker was started for (a change by hand restarts it).
    tag: Tag,
    step: usize,
    progress: Progress,
    /// Totals at the start of the current analysis window: (primary, canary).
    baseline: (SideTotals, SideTotals),
    last_check: u64,
    checks: u64,
    windows: Option<(Window, Window)>,
}

/// One side's window from two totals.
fn window(now: &SideTotals, before: &SideTotals) -> Window {
    let delta = now.since(before);
    Window {
        requests: delta.requests,
        errors: delta.errors,
        p99_ms: p99_ms(&LATENCY_BUCKETS, &delta.latency),
    }
}

/// Runs until `stop`.
pub(crate) async fn run(
    admin: Arc<AdminState>,
    metrics: Arc<ProxyMetrics>,
    gauges: Arc<ConfigGauges>,
    mut stop: watch::Receiver<bool>,
) {
    let start = Instant::now();
    let mut trackers: BTreeMap<DomainName, Tracker> = BTreeMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = start.elapsed().as_secs();
        let table = admin.store().load_full();
        let mut decisions = Vec::new();
        let mut running = Vec::new();
        for vhost in table.state().vhosts() {
            let Some(canary) = vhost.canary.as_ref().filter(|c| c.is_running()) else {
                continue;
            };
            running.push(vhost.domain.clone());
            let domain = vhost.domain.as_str();
            let primary_tag = vhost.enabled_backends_tag.as_str();
            let totals = || {
                (
                    metrics.side_totals(domain, primary_tag),
                    metrics.side_totals(domain, canary.tag.as_str()),
                )
            };
            let tracker = trackers
                .entry(vhost.domain.clone())
                .and_modify(|t| {
                    if t.tag != canary.tag || t.step != canary.step {
                        *t = new_tracker(canary, now, totals());
                    }
                })
                .or_insert_with(|| new_tracker(canary, now, totals()));
            let mut verdict = None;
            if let Some(analysis) = &canary.analysis {
                if now.saturating_sub(tracker.last_check) >= analysis.interval_secs {
                    let (primary_now, canary_now) = totals();
                    let primary = window(&primary_now, &tracker.baseline.0);
                    let canary_window = window(&canary_now, &tracker.baseline.1);
                    let v = judge(analysis, &canary_window, &primary);
                    tracing::debug!(domain, verdict = ?v, canary = ?canary_window, primary = ?primary, "rollout check");
                    tracker.baseline = (primary_now, canary_now);
                    tracker.last_check = now;
                    tracker.checks += 1;
                    tracker.windows = Some((primary, canary_window));
                    verdict = Some(v);
                }
            }
            let action = decide(
                &canary.steps,
                canary.step_interval_secs,
                canary.analysis.as_ref(),
                &mut tracker.progress,
                verdict,
                now,
            );
            if action != Action::Hold {
                decisions.push((vhost.domain.clone(), canary.clone(), action));
            }
        }
        trackers.retain(|domain, _| running.contains(domain));
        let reports: BTreeMap<DomainName, RolloutReport> = trackers
            .iter()
            .map(|(domain, t)| {
                let report = RolloutReport {
                    checks: t.checks,
                    consecutive_failures: t.progress.failures,
                    last_verdict: t.progress.last.clone(),
                    primary: t.windows.map(|w| w.0),
                    canary: t.windows.map(|w| w.1),
                    step_age_secs: now.saturating_sub(t.progress.step_started),
                };
                (domain.clone(), report)
            })
            .collect();
        gauges.set_rollout_reports(&reports);
        admin.set_rollout_reports(reports);
        for (domain, canary, action) in decisions {
            carry_out(&admin, &domain, &canary, action).await;
        }
    }
}

fn new_tracker(canary: &Canary, now: u64, baseline: (SideTotals, SideTotals)) -> Tracker {
    Tracker {
        tag: canary.tag.clone(),
        step: canary.step,
        progress: Progress {
            step: canary.step,
            step_started: now,
            ..Progress::default()
        },
        baseline,
        last_check: now,
        checks: 0,
        windows: None,
    }
}

/// Writes `action` for `domain`, provided its canary is still the one it was decided on.
async fn carry_out(
    admin: &Arc<AdminState>,
    domain: &DomainName,
    decided_on: &Canary,
    action: Action,
) {
    let with = |change: &dyn Fn(&mut Canary)| {
        let mut next = decided_on.clone();
        change(&mut next);
        Command::SetCanary {
            domain: domain.clone(),
            canary: next,
        }
    };
    let (command, event) = match &action {
        Action::Hold => return,
        Action::Advance { step } => {
            let weight = decided_on
                .steps
                .get(*step)
                .copied()
                .unwrap_or(decided_on.weight);
            (
                with(&|c| {
                    c.step = *step;
                    c.weight = weight;
                }),
                serde_json::json!({
                    "domain": domain.as_str(), "action": "step", "step": step,
                    "weight": weight.percent(),
                }),
            )
        }
        Action::Promote => (
            Command::PromoteCanary(domain.clone()),
            serde_json::json!({
                "domain": domain.as_str(), "action": "promote", "tag": decided_on.tag.as_str(),
            }),
        ),
        Action::Abort { reason } => (
            with(&|c| {
                c.state = RolloutState::Aborted;
                c.weight = vhost_routing::CanaryWeight::ZERO;
                c.abort_reason = Some(reason.clone());
            }),
            serde_json::json!({
                "domain": domain.as_str(), "action": "abort", "reason": reason,
            }),
        ),
    };
    // Applied only to the canary it was decided on (a change by hand meanwhile wins).
    let (target, expected) = (domain.clone(), decided_on.clone());
    let result = admin
        .apply_internal(move |table| {
            let unchanged = table
                .state()
                .vhost(&target)
                .and_then(|v| v.canary.as_deref())
                .is_some_and(|c| *c == expected);
            if !unchanged {
                return Err(ApiError::Conflict {
                    code: "rollout_changed",
                    message: format!("the canary of {target} changed before the rollout step"),
                    field: None,
                });
            }
            Ok(command.clone())
        })
        .await;
    if let Err(e) = result {
        tracing::warn!(domain = %domain, error = %e, "rollout: change not applied");
        return;
    }
    admin.events().publish("rollout", event);
    let domain_label = domain.to_string();
    match &action {
        Action::Advance { step } => tracing::info!(domain = %domain, step, "rollout: next step"),
        Action::Promote => {
            metrics::counter!("rollout_promotions_total", "domain" => domain_label).increment(1);
            tracing::info!(domain = %domain, tag = %decided_on.tag, "rollout: promoted");
        }
        Action::Abort { reason } => {
            metrics::counter!("rollout_aborts_total", "domain" => domain_label, "reason" => "analysis")
                .increment(1);
            tracing::warn!(domain = %domain, reason, "rollout: aborted");
        }
        Action::Hold => {}
    }
}

/// Publishes a `health` event each time a probe changes a backend's health.
pub(crate) async fn health_events(
    admin: Arc<AdminState>,
    mut probes: tokio::sync::mpsc::UnboundedReceiver<vhost_health::ProbeEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last: BTreeMap<vhost_routing::BackendId, bool> = BTreeMap::new();
    loop {
        let probe = tokio::select! {
            p = probes.recv() => match p { Some(p) => p, None => return },
            _ = stop.wait_for(|s| *s) => return,
        };
        let before = last.insert(probe.backend.clone(), probe.healthy);
        if before.is_some_and(|b| b != probe.healthy) {
            admin.events().publish(
                "health",
                serde_json::json!({
                    "backend": probe.backend.as_str(),
                    "healthy": probe.healthy,
                    "error": probe.error,
                }),
            );
        }
        // Forget backends that are gone (bounded by the configuration).
        if last.len() > 2 * admin.store().load().backend_count() + 16 {
            let table = admin.store().load();
            last.retain(|id, _| table.backend(id).is_some());
        }
    }
}

/// Registers the descriptions of the controller's facade counters.
pub(crate) fn describe() {
    metrics::describe_counter!(
        "rollout_aborts_total",
        "Rollouts aborted, by domain and reason (analysis: failed checks; operator: the abort call)"
    );
    metrics::describe_counter!(
        "rollout_promotions_total",
        "Rollouts that passed their last step and were promoted, by domain"
    );
}
