//! Configuration reload: the config file → a validated [`Config`] (exactly as at start-up) →
//! its routing state published through the single writer, and everything else applied by the
//! process's [`ReloadHook`] (certificates, health-check settings). Either all of it takes
//! effect or none of it: a file that does not validate, or whose certificates do not load,
//! leaves the running configuration as it was and the error names file, line and key.
//!
//! Used by `POST /api/v1/config/reload` and by the binary's SIGHUP handler.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use utoipa::ToSchema;
use vhost_config::{Config, ConfigError};
use vhost_routing::State;

use crate::error::{ApiError, Refusal};
use crate::AdminState;

/// What the process applies on a reload besides the routing state.
pub trait ReloadHook: Send + Sync + 'static {
    /// Validates what `config` holds beyond the routing state exactly as start-up does (e.g.
    /// certificates load, the API is not exposed without a token) and returns how to apply it.
    /// `Err`: nothing changes.
    fn prepare(&self, config: &Config) -> Result<PreparedReload, ReloadError>;
}

/// A reload that validated, ready to be applied.
pub struct PreparedReload {
    /// Run right after the new routing snapshot is published (e.g. certificates go live).
    pub commit: Box<dyn FnOnce() + Send>,
    /// The API token from now on (`None`: no authentication).
    pub token: Option<String>,
    /// Changed keys that take effect only after a restart (e.g. `proxy.listen_addr`).
    pub restart_required: Vec<String>,
    /// Things about the new configuration an operator should know.
    pub warnings: Vec<String>,
}

impl fmt::Debug for PreparedReload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedReload")
            .field("restart_required", &self.restart_required)
            .field("warnings", &self.warnings)
            .finish_non_exhaustive()
    }
}

/// A reload that was refused; the running configuration is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file cannot be read, or is invalid (the error carries file, line, column and key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The file is valid, but cannot be served (e.g. a certificate does not load); the
    /// refusal names the config key and keeps the cause (with the file position when known).
    #[error(transparent)]
    Refused(Refusal),
    /// This API has no reload hook (it is embedded without a config file).
    #[error("configuration reload is not enabled here")]
    Disabled,
}

impl From<ReloadError> for ApiError {
    fn from(e: ReloadError) -> Self {
        match e {
            ReloadError::Config(ConfigError::Invalid { ref location, .. }) => {
                ApiError::InvalidConfig {
                    field: location.key.clone(),
                    message: e.to_string(),
                }
            }
            ReloadError::Config(ConfigError::Read { .. }) => ApiError::InvalidConfig {
                field: String::new(),
                message: e.to_string(),
            },
            ReloadError::Refused(refusal) => ApiError::InvalidConfig {
                message: refusal.to_string(),
                field: refusal.field,
            },
            ReloadError::Disabled => ApiError::NotFound {
                message: e.to_string(),
            },
        }
    }
}

/// Names added, removed and changed by a reload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct Diff {
    /// New entries.
    pub added: Vec<String>,
    /// Entries no longer in the file.
    pub removed: Vec<String>,
    /// Entries whose settings changed.
    pub changed: Vec<String>,
}

impl Diff {
    fn of<'a, T: PartialEq + 'a>(
        before: impl Iterator<Item = (String, &'a T)>,
        after: impl Iterator<Item = (String, &'a T)>,
    ) -> Self {
        let before: Vec<(String, &T)> = before.collect();
        let after: Vec<(String, &T)> = after.collect();
        let names_before: BTreeSet<&String> = before.iter().map(|(n, _)| n).collect();
        let names_after: BTreeSet<&String> = after.iter().map(|(n, _)| n).collect();
        let mut diff = Self {
            added: names_after
                .difference(&names_before)
                .map(|n| (*n).clone())
                .collect(),
            removed: names_before
                .difference(&names_after)
                .map(|n| (*n).clone())
                .collect(),
            changed: Vec::new(),
        };
        for (name, value) in &after {
            if let Some((_, old)) = before.iter().find(|(n, _)| n == name) {
                if old != value {
                    diff.changed.push(name.clone());
                }
            }
        }
        diff
    }

    fn summary(&self, what: &str) -> String {
        format!(
            "{what} +{} -{} ~{}",
            self.added.len(),
            self.removed.len(),
            self.changed.len()
        )
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReloadReport {
    /// Generation of the routing snapshot now in use.
    pub generation: u64,
    /// Virtual hosts added, removed and changed.
    pub domains: Diff,
    /// Backends added, removed and changed.
    pub backends: Diff,
    /// Changed keys that take effect only after a restart.
    pub restart_required: Vec<String>,
    /// Things about the new configuration an operator should know.
    pub warnings: Vec<String>,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "generation {}: {}, {}",
            self.generation,
            self.domains.summary("domains"),
            self.backends.summary("backends")
        )?;
        if !self.restart_required.is_empty() {
            write!(
                f,
                "; needs a restart to take effect: {}",
                self.restart_required.join(", ")
            )?;
        }
        Ok(())
    }
}

fn diff_states(before: &State, after: &State) -> (Diff, Diff) {
    let domains = Diff::of(
        before.vhosts().map(|v| (v.domain.to_string(), v)),
        after.vhosts().map(|v| (v.domain.to_string(), v)),
    );
    let backends = Diff::of(
        before.backends().map(|b| (b.id.to_string(), b)),
        after.backends().map(|b| (b.id.to_string(), b)),
    );
    (domains, backends)
}

impl AdminState {
    /// Re-reads the config file, validates it as start-up does and applies it (see the module
    /// docs). Blocking (file reads, certificate loading, possibly DNS): call it from a thread or
    /// the blocking pool. Logs one line with the outcome and counts it in
    /// `config_reloads_total{result}`.
    pub fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let result = self.reload_inner();
        match &result {
            Ok(report) => {
                metrics::counter!("config_reloads_total", "result" => "applied").increment(1);
                tracing::info!(%report, "configuration reloaded");
                for warning in &report.warnings {
                    tracing::warn!("{warning}");
                }
            }
            Err(e) => {
                metrics::counter!("config_reloads_total", "result" => "rejected").increment(1);
                tracing::error!(error = %e, "configuration reload rejected; the running configuration is unchanged");
            }
        }
        result
    }

    fn reload_inner(&self) -> Result<ReloadReport, ReloadError> {
        let (Some(hook), Some(path)) = (self.reload.as_ref(), self.config_path.as_deref()) else {
            return Err(ReloadError::Disabled);
        };
        let mut attempt = 0;
        loop {
            // Validated without the writer lock unless other changes kept overtaking it.
            let locked = (attempt >= crate::handlers::OPTIMISTIC_ATTEMPTS)
                .then(|| self.writer.blocking_lock());
            attempt += 1;
            let before = self.store.load_full();
            let config = vhost_config::load(path)?;
            let prepared = hook.prepare(&config)?;
            let mut writer = match locked {
                Some(writer) => writer,
                None => self.writer.blocking_lock(),
            };
            if writer.routes.current().generation() != before.generation() {
                // A change was published (and written to the file) meanwhile: read it again.
                continue;
            }
            let table = writer.routes.publish(config.state);
            (prepared.commit)();
            writer.history.record(
                before.state(),
                table.state(),
                crate::history::Source::Reload,
                None,
            );
            self.set_token(prepared.token);
            drop(writer);
            let (domains, backends) = diff_states(before.state(), table.state());
            return Ok(ReloadReport {
                generation: table.generation(),
                domains,
                backends,
                restart_required: prepared.restart_required,
                warnings: prepared.warnings,
            });
        }
    }
}

/// Registers the description (Prometheus `# HELP`) of the reload counter.
pub(crate) fn describe() {
    metrics::describe_counter!(
        "config_reloads_total",
        "Configuration reloads (SIGHUP or POST /api/v1/config/reload), applied or rejected"
    );
}

/// Used by the handler: the blocking reload on the blocking pool.
pub(crate) async fn run(state: &Arc<AdminState>) -> Result<ReloadReport, ApiError> {
    let this = Arc::clone(state);
    tokio::task::spawn_blocking(move || this.reload())
        .await
        .map_err(|source| ApiError::TaskFailed {
            what: "reload",
            source,
        })?
        .map_err(ApiError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_added_removed_and_changed_entries() {
        let before = [("a", 1), ("b", 2), ("c", 3)];
        let after = [("b", 2), ("c", 4), ("d", 5)];
        let diff = Diff::of(
            before.iter().map(|(n, v)| (n.to_string(), v)),
            after.iter().map(|(n, v)| (n.to_string(), v)),
        );
        assert_eq!(diff.added, vec!["d"]);
        assert_eq!(diff.removed, vec!["a"]);
        assert_eq!(diff.changed, vec!["c"]);
        assert_eq!(diff.summary("domains"), "domains +1 -1 ~1");
    }
}
