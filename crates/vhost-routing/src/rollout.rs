//! Rollout plans: a canary whose weight moves through steps on its own, guarded by an analysis
//! of the proxy's own measurements, aborted after repeated failures, promoted at the end.
//!
//! Sits in the model next to [`crate::canary`]: the plan and its state are part of a
//! [`crate::Canary`] (so they are validated, persisted and published like any configuration);
//! [`judge`] and [`decide`] are the pure rules a driver (vhost-server's rollout controller)
//! applies every analysis interval to the numbers it measured. No clock here: the caller passes
//! seconds.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::canary::CanaryWeight;

/// Most steps in a plan.
pub const MAX_STEPS: usize = 20;

/// A finite, non-negative number (thresholds), comparable for equality.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
pub struct Threshold(f64);

impl Eq for Threshold {}

impl Threshold {
    /// A finite number ≥ 0.
    pub fn new(value: f64) -> Option<Self> {
        (value.is_finite() && value >= 0.0).then_some(Self(value))
    }

    /// The number.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Threshold {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        Self::new(v).ok_or_else(|| {
            serde::de::Error::custom(format!("{v} must be a finite number of at least 0"))
        })
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

fn default_min_requests() -> u64 {
    100
}
fn default_interval() -> u64 {
    10
}
fn default_failure_limit() -> u32 {
    2
}

/// What a canary must stay within, checked every `interval_secs` against the primary over the
/// same window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Analysis {
    /// Largest share of the canary's requests that may fail (5xx, including connection
    /// failures and timeouts the proxy answers with 502/504), 0–1.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<f64>, minimum = 0, maximum = 1))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<Threshold>,
    /// Largest canary p99 latency, in milliseconds (1–3600000).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 3600000))]
    #[serde(
        default,
        deserialize_with = "crate::model::whole::option_u64",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_p99_ms: Option<u64>,
    /// Largest canary p99 as a multiple of the primary's p99 over the same window.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<f64>, minimum = 1))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ratio: Option<Threshold>,
    /// Fewer canary requests than this in a window: inconclusive (the step holds).
    #[cfg_attr(
        feature = "openapi",
        schema(minimum = 1, maximum = 1000000000, default = 100)
    )]
    #[serde(
        default = "default_min_requests",
        deserialize_with = "crate::model::whole::u64"
    )]
    pub min_requests: u64,
    /// Seconds between two checks (the window), 1–3600.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 3600, default = 10))]
    #[serde(
        default = "default_interval",
        deserialize_with = "crate::model::whole::u64"
    )]
    pub interval_secs: u64,
    /// Consecutive failed checks that abort the rollout, 1–100.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100, default = 2))]
    #[serde(
        default = "default_failure_limit",
        deserialize_with = "crate::model::whole::u32"
    )]
    pub failure_limit: u32,
}

/// Where a rollout stands (persisted with the canary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    /// Steps advance (and the analysis runs).
    #[default]
    Progressing,
    /// Held by the operator: no step, no analysis, the weight stays.
    Paused,
    /// Stopped after failed checks or by the operator: weight 0.
    Aborted,
}

impl RolloutState {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Progressing => "progressing",
            Self::Paused => "paused",
            Self::Aborted => "aborted",
        }
    }
}

/// Why a rollout plan was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RolloutError {
    /// Steps not strictly increasing, above 0, at most [`MAX_STEPS`].
    #[error("steps must be 1 to {MAX_STEPS} weights above 0, strictly increasing")]
    Steps,
    /// `step` is not an index of `steps`, or `weight` is not the weight of that step.
    #[error("weight must be the weight of the current step (steps[{step}]) of a running rollout")]
    WeightNotStep {
        /// The current step.
        step: usize,
    },
    /// An aborted rollout with a weight above 0.
    #[error("an aborted rollout has weight 0")]
    AbortedWithWeight,
    /// `step_interval_secs` out of range.
    #[error("step_interval_secs must be from 1 to 86400")]
    StepInterval,
    /// An analysis setting out of range.
    #[error("analysis: {0}")]
    Analysis(&'static str),
}

impl RolloutError {
    /// The field of the canary the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Steps => "steps",
            Self::WeightNotStep { .. } | Self::AbortedWithWeight => "weight",
            Self::StepInterval => "step_interval_secs",
            Self::Analysis(_) => "analysis",
        }
    }
}

/// Checks a plan: steps, the current step and weight, intervals and thresholds.
pub fn check_plan(
    steps: &[CanaryWeight],
    step: usize,
    weight: CanaryWeight,
    state: RolloutState,
    step_interval_secs: u64,
    analysis: Option<&Analysis>,
) -> Result<(), RolloutError> {
    if steps.len() > MAX_STEPS
        || steps.first().is_some_and(|w| w.hundredths() == 0)
        || steps.windows(2).any(|w| w[0] >= w[1])
    {
        return Err(RolloutError::Steps);
    }
    if step >= steps.len().max(1)
        || (!steps.is_empty() && state != RolloutState::Aborted && steps[step] != weight)
    {
        return Err(RolloutError::WeightNotStep { step });
    }
    if state == RolloutState::Aborted && weight.hundredths() != 0 {
        return Err(RolloutError::AbortedWithWeight);
    }
    if !(1..=86_400).contains(&step_interval_secs) {
        return Err(RolloutError::StepInterval);
    }
    if let Some(a) = analysis {
        if a.max_error_rate.is_some_and(|r| r.get() > 1.0) {
            return Err(RolloutError::Analysis("max_error_rate must be from 0 to 1"));
        }
        if a.max_p99_ratio.is_some_and(|r| r.get() < 1.0) {
            return Err(RolloutError::Analysis("max_p99_ratio must be at least 1"));
        }
        if a.max_p99_ms
            .is_some_and(|ms| !(1..=3_600_000).contains(&ms))
        {
            return Err(RolloutError::Analysis(
                "max_p99_ms must be from 1 to 3600000",
            ));
        }
        if !(1..=1_000_000_000).contains(&a.min_requests) {
            return Err(RolloutError::Analysis(
                "min_requests must be from 1 to 1000000000",
            ));
        }
        if !(1..=3_600).contains(&a.interval_secs) {
            return Err(RolloutError::Analysis(
                "interval_secs must be from 1 to 3600",
            ));
        }
        if !(1..=100).contains(&a.failure_limit) {
            return Err(RolloutError::Analysis(
                "failure_limit must be from 1 to 100",
            ));
        }
    }
    Ok(())
}

/// One side's requests over an analysis window.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Window {
    /// Requests answered.
    pub requests: u64,
    /// Of which failed (5xx).
    pub errors: u64,
    /// 99th percentile latency in milliseconds (the upper bound of the histogram bucket it
    /// falls in), when there were requests.
    pub p99_ms: Option<f64>,
}

impl Window {
    /// `errors / requests` (0 without requests).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            // Counts far below 2^53: exact enough.
            #[allow(clippy::cast_precision_loss)]
            let rate = self.errors as f64 / self.requests as f64;
            rate
        }
    }
}

/// The 99th percentile of a window of histogram counts (`counts[i]` observations at most
/// `bounds[i]` seconds, the last count above every bound): the bound of the bucket holding it,
/// in milliseconds (the last bound for the overflow bucket); `None` without observations.
pub fn p99_ms(bounds: &[f64], counts: &[u64]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the 99th percentile, rounded up: ceil(0.99 × total).
    let rank = total - total / 100;
    let mut seen = 0u64;
    for (i, count) in counts.iter().enumerate() {
        seen += count;
        if seen >= rank {
            let bound = bounds.get(i).or(bounds.last()).copied().unwrap_or(0.0);
            return Some(bound * 1000.0);
        }
    }
    bounds.last().map(|b| b * 1000.0)
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", content = "reason", rename_all = "lowercase")]
pub enum Verdict {
    /// Within every limit.
    Pass,
    /// Fewer canary requests than `min_requests`: no decision.
    Inconclusive,
    /// Over a limit (the reason says which).
    Fail(String),
}

/// Checks the canary's window against `analysis` and the primary's window.
pub fn judge(analysis: &Analysis, canary: &Window, primary: &Window) -> Verdict {
    if canary.requests < analysis.min_requests {
        return Verdict::Inconclusive;
    }
    if let Some(max) = analysis.max_error_rate {
        let rate = canary.error_rate();
        if rate > max.get() {
            return Verdict::Fail(format!(
                "error rate {rate:.4} above max_error_rate {max} ({} of {} requests)",
                canary.errors, canary.requests
            ));
        }
    }
    if let (Some(max), Some(p99)) = (analysis.max_p99_ms, canary.p99_ms) {
        // Whole milliseconds: exact.
        #[allow(clippy::cast_precision_loss)]
        let max_ms = max as f64;
        if p99 > max_ms {
            return Verdict::Fail(format!("p99 {p99} ms above max_p99_ms {max}"));
        }
    }
    if let (Some(max), Some(p99), Some(base)) =
        (analysis.max_p99_ratio, canary.p99_ms, primary.p99_ms)
    {
        if base > 0.0 && p99 / base > max.get() {
            return Verdict::Fail(format!(
                "p99 {p99} ms is {:.2} × the primary's {base} ms, above max_p99_ratio {max}",
                p99 / base
            ));
        }
    }
    Verdict::Pass
}

/// What a driver remembers of a running rollout between checks (not persisted: a restart
/// starts the current step's interval and the failure count afresh, never a step back).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// The step being run.
    pub step: usize,
    /// When it started (driver's seconds).
    pub step_started: u64,
    /// Consecutive failed checks.
    pub failures: u32,
    /// The last check's verdict in this step.
    pub last: Option<Verdict>,
}

/// What the rollout should do now.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Nothing.
    Hold,
    /// Move to `steps[step]`.
    Advance {
        /// The new step.
        step: usize,
    },
    /// The last step passed: the canary's tag becomes the primary.
    Promote,
    /// Too many failed checks: weight 0, state aborted.
    Abort {
        /// Why.
        reason: String,
    },
}

/// Applies a check's verdict (if one was made at `now`) and the step clock to `progress`.
/// `steps` empty: the weight is only guarded (abort on failures, never advance).
pub fn decide(
    steps: &[CanaryWeight],
    step_interval_secs: u64,
    analysis: Option<&Analysis>,
    progress: &mut Progress,
    verdict: Option<Verdict>,
    now: u64,
) -> Action {
    if let Some(v) = verdict {
        match &v {
            Verdict::Fail(reason) => {
                progress.failures += 1;
                let limit = analysis.map_or(1, |a| a.failure_limit);
                if progress.failures >= limit {
                    return Action::Abort {
                        reason: format!(
                            "{} consecutive failed checks; last: {reason}",
                            progress.failures
                        ),
                    };
                }
            }
            Verdict::Pass => progress.failures = 0,
            Verdict::Inconclusive => {}
        }
        progress.last = Some(v);
    }
    if steps.is_empty() || now.saturating_sub(progress.step_started) < step_interval_secs {
        return Action::Hold;
    }
    // With an analysis, a step ends only after a passing check (inconclusive holds it).
    if analysis.is_some() && progress.last != Some(Verdict::Pass) {
        return Action::Hold;
    }
    if progress.step + 1 < steps.len() {
        Action::Advance {
            step: progress.step + 1,
        }
    } else {
        Action::Promote
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(p: f64) -> CanaryWeight {
        CanaryWeight::from_percent(p).unwrap()
    }

    fn analysis() -> Analysis {
        Analysis {
            max_error_rate: Threshold::new(0.01),
            max_p99_ms: Some(500),
            max_p99_ratio: Threshold::new(1.5),
            min_requests: 100,
            interval_secs: 10,
            failure_limit: 2,
        }
    }

    #[test]
    fn plans_are_checked() {
        let steps = [w(1.0), w(5.0), w(100.0)];
        let ok = |s: &[CanaryWeight], step, weight| {
            check_plan(
                s,
                step,
                weight,
                RolloutState::Progressing,
                60,
                Some(&analysis()),
            )
        };
        assert_eq!(ok(&steps, 0, w(1.0)), Ok(()));
        assert_eq!(
            ok(&steps, 1, w(1.0)),
            Err(RolloutError::WeightNotStep { step: 1 })
        );
        assert_eq!(
            ok(&steps, 3, w(1.0)),
            Err(RolloutError::WeightNotStep { step: 3 })
        );
        assert_eq!(ok(&[w(5.0), w(1.0)], 0, w(5.0)), Err(RolloutError::Steps));
        assert_eq!(ok(&[w(0.0), w(1.0)], 0, w(0.0)), Err(RolloutError::Steps));
        assert_eq!(ok(&[], 0, w(7.0)), Ok(()), "no steps: a guarded weight");
        // An aborted rollout sits at weight 0 whatever its step.
        assert_eq!(
            check_plan(&steps, 1, w(0.0), RolloutState::Aborted, 60, None),
            Ok(())
        );
        let mut bad = analysis();
        bad.max_error_rate = Threshold::new(1.5);
        assert!(matches!(
            check_plan(&steps, 0, w(1.0), RolloutState::Progressing, 60, Some(&bad)),
            Err(RolloutError::Analysis(_))
        ));
        assert_eq!(
            check_plan(&steps, 0, w(1.0), RolloutState::Progressing, 0, None),
            Err(RolloutError::StepInterval)
        );
    }

    #[test]
    fn percentile_from_buckets() {
        let bounds = [0.001, 0.01, 0.1, 1.0];
        assert_eq!(p99_ms(&bounds, &[0, 0, 0, 0, 0]), None);
        assert_eq!(p99_ms(&bounds, &[100, 0, 0, 0, 0]), Some(1.0));
        // 98 fast, 2 slow: the 99th of 100 is slow.
        assert_eq!(p99_ms(&bounds, &[98, 0, 0, 2, 0]), Some(1000.0));
        // 99 fast, 1 slow: the 99th is fast.
        assert_eq!(p99_ms(&bounds, &[99, 0, 1, 0, 0]), Some(1.0));
        assert_eq!(p99_ms(&bounds, &[0, 0, 0, 0, 7]), Some(1000.0));
    }

    #[test]
    fn verdicts() {
        let a = analysis();
        let primary = Window {
            requests: 1000,
            errors: 0,
            p99_ms: Some(100.0),
        };
        let fine = Window {
            requests: 200,
            errors: 1,
            p99_ms: Some(100.0),
        };
        assert_eq!(judge(&a, &fine, &primary), Verdict::Pass);
        let few = Window {
            requests: 99,
            errors: 99,
            p99_ms: None,
        };
        assert_eq!(judge(&a, &few, &primary), Verdict::Inconclusive);
        let failing = Window {
            requests: 200,
            errors: 100,
            ..fine
        };
        assert!(
            matches!(judge(&a, &failing, &primary), Verdict::Fail(r) if r.contains("error rate"))
        );
        let slow = Window {
            p99_ms: Some(1000.0),
            ..fine
        };
        assert!(matches!(judge(&a, &slow, &primary), Verdict::Fail(r) if r.contains("max_p99_ms")));
        let slower = Window {
            p99_ms: Some(250.0),
            ..fine
        };
        assert!(matches!(judge(&a, &slower, &primary), Verdict::Fail(r) if r.contains("ratio")));
    }

    #[test]
    fn steps_advance_after_passing_checks_and_abort_after_the_limit() {
        let steps = [w(1.0), w(50.0), w(100.0)];
        let a = analysis();
        let mut p = Progress::default();
        // Before the interval: hold, whatever the verdict.
        assert_eq!(
            decide(&steps, 60, Some(&a), &mut p, Some(Verdict::Pass), 10),
            Action::Hold
        );
        // Interval over, but the last check was inconclusive: hold.
        assert_eq!(
            decide(
                &steps,
                60,
                Some(&a),
                &mut p,
                Some(Verdict::Inconclusive),
                60
            ),
            Action::Hold
        );
        assert_eq!(
            decide(&steps, 60, Some(&a), &mut p, Some(Verdict::Pass), 70),
            Action::Advance { step: 1 }
        );
        p = Progress {
            step: 2,
            step_started: 100,
            ..Progress::default()
        };
        assert_eq!(
            decide(&steps, 60, Some(&a), &mut p, Some(Verdict::Pass), 160),
            Action::Promote
        );
        // One failure is tolerated (limit 2), a pass resets the count, two in a row abort.
        let mut p = Progress::default();
        let fail = || Some(Verdict::Fail("error rate".into()));
        assert_eq!(
            decide(&steps, 60, Some(&a), &mut p, fail(), 5),
            Action::Hold
        );
        assert_eq!(
            decide(&steps, 60, Some(&a), &mut p, Some(Verdict::Pass), 6),
            Action::Hold
        );
        assert_eq!(
            decide(&steps, 60, Some(&a), &mut p, fail(), 7),
            Action::Hold
        );
        assert!(matches!(
            decide(&steps, 60, Some(&a), &mut p, fail(), 8),
            Action::Abort { reason } if reason.starts_with("2 consecutive")
        ));
        // No steps: only guarded.
        let mut p = Progress::default();
        assert_eq!(
            decide(&[], 1, Some(&a), &mut p, Some(Verdict::Pass), 1000),
            Action::Hold
        );
        // No analysis: time alone moves the steps.
        let mut p = Progress::default();
        assert_eq!(
            decide(&steps, 5, None, &mut p, None, 5),
            Action::Advance { step: 1 }
        );
    }
}
