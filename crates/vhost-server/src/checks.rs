//! The checks a configuration must pass before it runs — the same at start-up, for `--check`
//! and for a reload (SIGHUP, `POST /api/v1/config/reload`): the file's own rules (done by
//! [`vhost_config::load`]), the admin API's exposure rule, every certificate loads, and the
//! limits derived from the machine. What is suspicious but allowed comes back as warnings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost_config::{Config, Location};
use vhost_pingora::{CertError, CertMap, CertStore, ConnLimits, FileRole, CERT_READ_TIMEOUT};

use crate::error::ServerError;

/// Descriptors kept aside from client connections: listeners, log and config files, admin and
/// metrics connections, health probes.
const RESERVED_DESCRIPTORS: u64 = 256;

/// A configuration that passed every check.
pub struct Checked {
    /// Every certificate, loaded (not yet published).
    pub certs: CertMap,
    /// The admin API token in force (the environment overrides the file).
    pub api_token: Option<String>,
    /// The metrics token in force (the environment overrides the file).
    pub metrics_token: Option<String>,
    /// Client connection limits.
    pub limits: ConnLimits,
    /// Allowed but suspicious settings.
    pub warnings: Vec<String>,
}

/// A certificate error, with the position of the key that names the file when it is known.
#[derive(Debug, thiserror::Error)]
#[error("{}{source}", location.as_ref().map(|l| format!("{l}: ")).unwrap_or_default())]
pub struct LocatedCertError {
    /// Where the file is named.
    pub location: Option<Location>,
    /// What is wrong with it.
    pub source: CertError,
}

impl LocatedCertError {
    /// Locates `source` in the config file at `path`.
    pub fn new(path: &Path, source: CertError) -> Self {
        let location = source.subject().and_then(|(owner, role)| {
            let field = match role {
                FileRole::Certificate => "cert_path",
                FileRole::Key => "key_path",
                FileRole::CaBundle => {
                    let id = owner.strip_prefix("backend ").unwrap_or(owner);
                    return vhost_config::locate_backend_key(path, id, "tls_ca_path");
                }
            };
            if owner == "default" {
                vhost_config::locate(path, &format!("proxy.default_{field}"))
            } else {
                vhost_config::locate_vhost_key(path, owner, &format!("tls_{field}"))
            }
        });
        Self { location, source }
    }

    /// The key path the error is about.
    pub fn key(&self) -> String {
        self.location
            .as_ref()
            .map_or_else(|| "virtual_hosts".to_owned(), |l| l.key.clone())
    }
}

/// The token for `var`, or the file's.
fn token(var: &str, from_file: Option<&String>) -> Option<String> {
    std::env::var(var)
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| from_file.cloned())
}

/// The soft descriptor limit after raising it to the hard limit (start-up), or the hard limit
/// (what start-up would get, for `--check`).
pub fn descriptor_limit(raise: bool) -> u64 {
    if raise {
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(limit) => return limit,
            Err(e) => tracing::warn!(error = %e, "cannot raise the file-descriptor limit"),
        }
    }
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(
        1024,
        |(soft, hard)| {
            if raise {
                soft
            } else {
                hard
            }
        },
    )
}

/// Client connections that fit in `nofile` descriptors: each may need a second descriptor for
/// its backend connection, and the idle upstream pool and [`RESERVED_DESCRIPTORS`] come first.
pub fn connection_budget(nofile: u64, upstream_pool: usize) -> u64 {
    let reserved = RESERVED_DESCRIPTORS + upstream_pool as u64;
    (nofile.saturating_sub(reserved) / 2).max(16)
}

/// Runs every check on `config` (read from `path`); certificates are loaded through `store`
/// (reusing files it already holds) within [`CERT_READ_TIMEOUT`].
pub fn check(
    config: &Config,
    path: &Path,
    store: &CertStore,
    nofile: u64,
) -> Result<Checked, ServerError> {
    let proxy = &config.proxy;
    let api_token = token(vhost_admin::TOKEN_ENV, proxy.management_api_token.as_ref());
    vhost_admin::check_exposure(proxy.management_api_addr, api_token.as_deref())?;
    let default_paths: Option<(PathBuf, PathBuf)> =
        match (&proxy.default_cert_path, &proxy.default_key_path) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            _ => None,
        };
    let certs = store
        .prepare_within(&config.state, default_paths, CERT_READ_TIMEOUT)
        .map_err(|e| LocatedCertError::new(path, e))?;

    let mut warnings = Vec::new();
    if certs.is_empty() && config.lets_encrypt.is_none() {
        let redirecting: Vec<&str> = config
            .state
            .vhosts()
            .filter(|v| v.http_to_https)
            .map(|v| v.domain.as_str())
            .collect();
        if !redirecting.is_empty() {
            warnings.push(format!(
                "http_to_https is set for {} but no certificate is configured: the HTTPS listener stays off and these domains redirect to a port nothing listens on",
                redirecting.join(", ")
            ));
        }
    }
    let metrics_token = token(METRICS_TOKEN_ENV, config.metrics.token.as_ref());
    if config.metrics.enabled
        && metrics_token.is_none()
        && !config.metrics.listen_addr.ip().is_loopback()
    {
        warnings.push(format!(
            "metrics.listen_addr {} is not a loopback address and no metrics token is set: anyone who can reach it reads domain names, backends and health; set [metrics] token (or {METRICS_TOKEN_ENV})",
            config.metrics.listen_addr
        ));
    }
    if let Some(le) = &config.lets_encrypt {
        let wildcards: Vec<&str> = config
            .state
            .vhosts()
            .filter(|v| {
                v.domain.wildcard_suffix().is_some()
                    && v.tls_cert_path.is_none()
                    && v.acme != Some(false)
            })
            .map(|v| v.domain.as_str())
            .collect();
        if !wildcards.is_empty() {
            warnings.push(format!(
                "{} cannot get ACME certificates (wildcards need DNS-01, which is not supported): set tls_cert_path/tls_key_path, or acme = false",
                wildcards.join(", ")
            ));
        }
        if let Some(ca) = &le.directory_ca_path {
            let usable = std::fs::read(ca)
                .map_err(|e| e.to_string())
                .and_then(|pem| {
                    openssl::x509::X509::stack_from_pem(&pem)
                        .map_err(|e| e.to_string())
                        .and_then(|c| {
                            if c.is_empty() {
                                Err("no PEM certificate in it".to_owned())
                            } else {
                                Ok(())
                            }
                        })
                });
            if let Err(reason) = usable {
                return Err(ServerError::Acme(format!(
                    "lets_encrypt.directory_ca_path {}: {reason}",
                    ca.display()
                )));
            }
        }
    }
    let budget = connection_budget(nofile, proxy.upstream_keepalive_pool_size);
    let max_connections = match proxy.max_connections {
        Some(n) => {
            if n > budget {
                warnings.push(format!(
                    "proxy.max_connections = {n} is more than the {budget} client connections the file-descriptor limit ({nofile}) leaves room for (each may need a backend connection too): past that, accepting clients and connecting to backends fail"
                ));
            }
            n
        }
        None => budget,
    };
    let limits = ConnLimits {
        header_timeout: Duration::from_millis(proxy.client_header_timeout_ms),
        keepalive_timeout: Duration::from_millis(proxy.client_keepalive_timeout_ms),
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        max_header_bytes: usize::try_from(proxy.max_request_header_bytes).unwrap_or(usize::MAX),
    };
    Ok(Checked {
        certs,
        api_token,
        metrics_token,
        limits,
        warnings,
    })
}

/// Environment variable that provides the metrics token (overrides `[metrics] token`).
pub const METRICS_TOKEN_ENV: &str = "PINGORA_VHOST_METRICS_TOKEN";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_budget_leaves_room_for_backend_connections() {
        assert_eq!(connection_budget(20_000, 128), (20_000 - 384) / 2);
        assert_eq!(connection_budget(1024, 128), 320);
        assert_eq!(connection_budget(100, 128), 16);
    }
}
