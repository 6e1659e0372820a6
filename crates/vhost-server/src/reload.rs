//! Configuration reload (SIGHUP, `POST /api/v1/config/reload`): the admin crate re-reads the
//! file and publishes its routing state; this hook runs the start-up checks on the rest
//! ([`crate::checks`]) and applies what can change while running — certificates (including the
//! default one), `[health_check]`, the admin API token. Other settings (listeners, timeouts,
//! limits, logging, metrics) are reported as needing a restart.

use std::path::PathBuf;
use std::sync::Arc;

use vhost_admin::{PreparedReload, Refusal, ReloadError, ReloadHook};
use vhost_config::Config;
use vhost_health::SettingsHandle;
use vhost_pingora::CertStore;

use crate::checks;
use crate::error::ServerError;
use crate::publish::{check_settings, PublishHook};

/// The server's part of a reload.
pub(crate) struct ServerReload {
    pub(crate) path: PathBuf,
    /// The configuration the process started with (what listeners and limits still use).
    pub(crate) running: Config,
    pub(crate) certs: Arc<CertStore>,
    pub(crate) health: SettingsHandle,
    pub(crate) after_publish: PublishHook,
    pub(crate) https_listening: bool,
    pub(crate) nofile: u64,
}

/// Keys of a section whose values differ, as `section.key`.
fn changed_keys<T: serde::Serialize>(section: &str, before: &T, after: &T) -> Vec<String> {
    let (Ok(toml::Value::Table(before)), Ok(toml::Value::Table(after))) =
        (toml::Value::try_from(before), toml::Value::try_from(after))
    else {
        return vec![section.to_owned()];
    };
    let mut keys: Vec<String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| format!("{section}.{k}"))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Keys changed between `running` and `next` that only a restart applies.
fn restart_required(running: &Config, next: &Config) -> Vec<String> {
    const RELOADED: [&str; 3] = [
        "proxy.management_api_token",
        "proxy.default_cert_path",
        "proxy.default_key_path",
    ];
    let mut keys = changed_keys("proxy", &running.proxy, &next.proxy);
    keys.retain(|k| !RELOADED.contains(&k.as_str()));
    keys.extend(changed_keys("logging", &running.logging, &next.logging));
    keys.extend(changed_keys("metrics", &running.metrics, &next.metrics));
    if running.lets_encrypt != next.lets_encrypt {
        keys.push("lets_encrypt".to_owned());
    }
    if running.notifications != next.notifications {
        keys.push("notifications.webhook_url".to_owned());
    }
    keys
}

impl ReloadHook for ServerReload {
    fn prepare(&self, config: &Config) -> Result<PreparedReload, ReloadError> {
        let checked = checks::check(config, &self.path, &self.certs, self.nofile).map_err(|e| {
            let field = match &e {
                ServerError::Cert(located) => located.key(),
                ServerError::Exposure(_) => "proxy.management_api_token".to_owned(),
                _ => String::new(),
            };
            ReloadError::Refused(Refusal {
                field,
                source: Box::new(e),
            })
        })?;
        let mut warnings = checked.warnings;
        if !self.https_listening && !checked.certs.is_empty() {
            warnings.push("certificates are configured now, but the HTTPS listener was not started (there were none at start-up): restart to serve HTTPS".to_owned());
        }
        let certs = Arc::clone(&self.certs);
        let map = checked.certs;
        let health = self.health.clone();
        let settings = check_settings(&config.health_check);
        let after_publish = self.after_publish.clone();
        Ok(PreparedReload {
            commit: Box::new(move || {
                certs.publish(map);
                health.set(settings);
                after_publish.published();
            }),
            token: checked.api_token,
            restart_required: restart_required(&self.running, config),
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_settings_a_reload_cannot_apply_need_a_restart() {
        let running = vhost_config::parse("", "a").unwrap();
        let next = vhost_config::parse(
            "[proxy]\nlisten_addr = \"0.0.0.0:8443\"\nmanagement_api_token = \"t\"\nread_timeout_ms = 5\n[logging]\nlevel = \"debug\"\n[health_check]\ninterval_secs = 3\n",
            "b",
        )
        .unwrap();
        assert_eq!(
            restart_required(&running, &next),
            vec![
                "proxy.listen_addr",
                "proxy.read_timeout_ms",
                "logging.level"
            ]
        );
        assert!(restart_required(&running, &running).is_empty());
    }
}
