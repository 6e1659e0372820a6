//! Per-SNI certificates, chosen during the TLS handshake from a map that can change at runtime.
//!
//! Sits between the HTTPS listener and the config: [`CertStore::prepare`] reads and checks every
//! PEM file a [`State`] references (off the request path; a bad file is an error and nothing is
//! published), [`CertStore::publish`] swaps the new map in, and [`SniCertResolver`] — the
//! listener's `TlsAccept` — looks the client's SNI up in the current map (exact name, then a
//! one-label wildcard, then the default certificate) and reports the SNI to the proxy logic
//! through the connection digest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use foldhash::fast::RandomState;
use pingora_core::listeners::TlsAccept;
use pingora_core::protocols::tls::TlsRef;
use pingora_core::tls::ext;
use pingora_core::tls::pkey::{PKey, Private};
use pingora_core::tls::ssl::NameType;
use pingora_core::tls::x509::X509;
use thiserror::Error;
use vhost_routing::{normalize_host, DomainName, State, MAX_DOMAIN_LEN};

/// A certificate or key file could not be used.
#[derive(Debug, Error)]
pub enum CertError {
    /// The file could not be read.
    #[error("cannot read {} for {owner}: {source}", path.display())]
    Read {
        /// The domain (or `default`) the file belongs to.
        owner: String,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid PEM of the expected kind.
    #[error("{} for {owner} is not a valid PEM {kind}: {message}", path.display())]
    Parse {
        /// The domain (or `default`).
        owner: String,
        /// The file.
        path: PathBuf,
        /// `certificate` or `private key`.
        kind: &'static str,
        /// The OpenSSL error.
        message: String,
    },
    /// The key does not belong to the certificate.
    #[error("the private key {} does not match the certificate {} for {owner}", key.display(), cert.display())]
    Mismatch {
        /// The domain (or `default`).
        owner: String,
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

/// A parsed certificate chain (leaf first) and its private key.
#[derive(Debug)]
pub struct CertifiedKey {
    chain: Vec<X509>,
    key: PKey<Private>,
    not_after_unix: Option<i64>,
}

impl CertifiedKey {
    /// Loads a PEM chain and key, checking that they match.
    pub fn load(owner: &str, cert_path: &Path, key_path: &Path) -> Result<Self, CertError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| CertError::Read {
                owner: owner.to_owned(),
                path: path.to_owned(),
                source,
            })
        };
        let parse_err = |path: &Path, kind, e: &dyn std::fmt::Display| CertError::Parse {
            owner: owner.to_owned(),
            path: path.to_owned(),
            kind,
            message: e.to_string(),
        };
        let chain = X509::stack_from_pem(&read(cert_path)?)
            .map_err(|e| parse_err(cert_path, "certificate", &e))?;
        let Some(leaf) = chain.first() else {
            return Err(parse_err(
                cert_path,
                "certificate",
                &"no certificate in file",
            ));
        };
        let key = PKey::private_key_from_pem(&read(key_path)?)
            .map_err(|e| parse_err(key_path, "private key", &e))?;
        let matches = leaf
            .public_key()
            .map(|public| public.public_eq(&key))
            .unwrap_or(false);
        if !matches {
            return Err(CertError::Mismatch {
                owner: owner.to_owned(),
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }
        let not_after_unix = openssl::asn1::Asn1Time::from_unix(0)
            .ok()
            .and_then(|epoch| epoch.diff(leaf.not_after()).ok())
            .map(|d| i64::from(d.days) * 86_400 + i64::from(d.secs));
        Ok(Self {
            chain,
            key,
            not_after_unix,
        })
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> Option<&X509> {
        self.chain.first()
    }

    /// Expiry of the leaf certificate, in seconds since the Unix epoch.
    pub fn not_after_unix(&self) -> Option<i64> {
        self.not_after_unix
    }
}

/// Which certificate each server name gets.
#[derive(Debug, Default)]
pub struct CertMap {
    exact: HashMap<Box<str>, Arc<CertifiedKey>, RandomState>,
    wildcard: HashMap<Box<str>, Arc<CertifiedKey>, RandomState>,
    default: Option<Arc<CertifiedKey>>,
    /// Files already loaded, to reuse unchanged ones on the next `prepare`.
    files: HashMap<(PathBuf, PathBuf), (Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl CertMap {
    /// The certificate for a client's SNI (`None`: no SNI or unknown name).
    pub fn resolve(&self, sni: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        let by_name = sni.and_then(|name| {
            let mut buf = [0u8; MAX_DOMAIN_LEN];
            let name = normalize_host(name.as_bytes(), &mut buf)?;
            self.exact.get(name).or_else(|| {
                let (first, rest) = name.split_once('.')?;
                (!first.is_empty())
                    .then(|| self.wildcard.get(rest))
                    .flatten()
            })
        });
        by_name.or(self.default.as_ref())
    }

    /// True if no certificate at all is configured (the HTTPS listener is then not started).
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty() && self.default.is_none()
    }

    /// Each certificate with its expiry (Unix seconds): domains with their own certificate
    /// (wildcards as `*.example.com`), and `default`.
    pub fn expiries(&self) -> impl Iterator<Item = (String, Option<i64>)> + '_ {
        let exact = self
            .exact
            .iter()
            .map(|(k, v)| (k.to_string(), v.not_after_unix));
        let wildcard = self
            .wildcard
            .iter()
            .map(|(k, v)| (format!("*.{k}"), v.not_after_unix));
        let default = self
            .default
            .iter()
            .map(|v| ("default".to_owned(), v.not_after_unix));
        exact.chain(wildcard).chain(default)
    }
}

/// The runtime-swappable certificate map shared by the HTTPS listener and the config writer.
#[derive(Debug, Default)]
pub struct CertStore {
    current: ArcSwap<CertMap>,
    default_paths: Option<(PathBuf, PathBuf)>,
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl CertStore {
    /// An empty store; `default_paths` is the `[proxy] default_cert_path` / `default_key_path`.
    pub fn new(default_paths: Option<(PathBuf, PathBuf)>) -> Self {
        Self {
            current: ArcSwap::default(),
            default_paths,
        }
    }

    /// Loads every certificate `state` references (plus the default), reusing files unchanged
    /// since the current map was built. Nothing is published.
    pub fn prepare(&self, state: &State) -> Result<CertMap, CertError> {
        let previous = self.current.load();
        let mut next = CertMap::default();
        let mut files_seen = HashMap::new();
        let mut load =
            |owner: &str, cert: &Path, key: &Path| -> Result<Arc<CertifiedKey>, CertError> {
                let files = (cert.to_owned(), key.to_owned());
                let stamp = mtime(cert).max(mtime(key));
                if let Some((old_stamp, ck)) = previous.files.get(&files) {
                    if *old_stamp == stamp && stamp.is_some() {
                        files_seen.insert(files, (stamp, Arc::clone(ck)));
                        return Ok(Arc::clone(ck));
                    }
                }
                let ck = Arc::new(CertifiedKey::load(owner, cert, key)?);
                files_seen.insert(files, (stamp, Arc::clone(&ck)));
                Ok(ck)
            };
        if let Some((cert, key)) = &self.default_paths {
            next.default = Some(load("default", cert, key)?);
        }
        for vhost in state.vhosts() {
            let (Some(cert), Some(key)) = (&vhost.tls_cert_path, &vhost.tls_key_path) else {
                continue;
            };
            let ck = load(vhost.domain.as_str(), Path::new(cert), Path::new(key))?;
            insert(&mut next, &vhost.domain, ck);
        }
        next.files = files_seen;
        Ok(next)
    }

    /// Makes `map` the one new handshakes use.
    pub fn publish(&self, map: CertMap) {
        self.current.store(Arc::new(map));
    }

    /// The map in use.
    pub fn current(&self) -> Arc<CertMap> {
        self.current.load_full()
    }
}

fn insert(map: &mut CertMap, domain: &DomainName, ck: Arc<CertifiedKey>) {
    match domain.wildcard_suffix() {
        Some(suffix) => map.wildcard.insert(suffix.into(), ck),
        None => map.exact.insert(domain.as_str().into(), ck),
    };
}

/// The SNI a TLS client sent, attached to the connection digest by [`SniCertResolver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSni(pub Box<str>);

/// The HTTPS listener's handshake callbacks: pick the certificate for the SNI, and remember the
/// SNI for the request logic (SNI/Host mismatch → 421).
#[derive(Debug, Clone)]
pub struct SniCertResolver {
    store: Arc<CertStore>,
}

impl SniCertResolver {
    /// Resolves from `store`.
    pub fn new(store: Arc<CertStore>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl TlsAccept for SniCertResolver {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let map = self.store.current.load();
        let sni = ssl.servername(NameType::HOST_NAME).map(str::to_owned);
        let Some(ck) = map.resolve(sni.as_deref()) else {
            tracing::debug!(sni = sni.as_deref().unwrap_or(""), "no certificate for SNI");
            return;
        };
        let Some(leaf) = ck.leaf() else { return };
        let result = ext::ssl_use_certificate(ssl, leaf)
            .and_then(|()| {
                ck.chain[1..]
                    .iter()
                    .try_for_each(|c| ext::ssl_add_chain_cert(ssl, c))
            })
            .and_then(|()| ext::ssl_use_private_key(ssl, &ck.key));
        if let Err(e) = result {
            tracing::warn!(sni = sni.as_deref().unwrap_or(""), error = %e, "failed to install certificate");
        }
    }

    async fn handshake_complete_callback(
        &self,
        ssl: &TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let sni = ssl.servername(NameType::HOST_NAME)?;
        Some(Arc::new(ClientSni(sni.into())))
    }
}
