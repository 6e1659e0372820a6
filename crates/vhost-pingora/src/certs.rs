//! Per-SNI certificates, chosen during the TLS handshake from a map that can change at runtime.
//!
//! Sits between the HTTPS listener and the config: [`CertStore::prepare`] reads and checks every
//! PEM file a [`State`] references (off the request path; a bad file is an error and nothing is
//! published), [`CertStore::publish`] swaps the new map in, and [`SniCertResolver`] — the
//! listener's `TlsAccept` — looks the client's SNI up in the current map (exact name, then a
//! one-label wildcard, then the default certificate) and reports the SNI to the proxy logic
//! through the connection digest.
//!
//! Certificate paths come from the admin API, so they are not trusted: a file must be a regular
//! file (not a device, FIFO, socket or directory) of at most [`MAX_PEM_BYTES`], opened without
//! blocking, and [`CertStore::prepare_within`] gives up after a timeout (a hung network mount).
//! Errors name the file and the class of problem, never the file's contents.

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
use vhost_routing::{normalize_host, State, MAX_DOMAIN_LEN};

use crate::acme::AcmeChallenges;

/// Largest certificate or key file read, in bytes.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Which file of a certificate/key pair an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    /// The certificate (chain) file.
    Certificate,
    /// The private key file.
    Key,
    /// A backend's CA certificates (`tls_ca_path`).
    CaBundle,
}

impl std::fmt::Display for FileRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Certificate => "certificate",
            Self::Key => "private key",
            Self::CaBundle => "CA bundle",
        })
    }
}

/// A certificate or key file could not be used.
#[derive(Debug, Error)]
pub enum CertError {
    /// The path names something other than a regular file.
    #[error("{role} {} for {owner} is {kind}, not a regular file", path.display())]
    NotAFile {
        /// The domain (or `default`) the file belongs to.
        owner: String,
        /// Certificate or key.
        role: FileRole,
        /// The path.
        path: PathBuf,
        /// What it is: `a directory`, `a FIFO`, `a character device`, ...
        kind: &'static str,
    },
    /// The file is larger than [`MAX_PEM_BYTES`].
    #[error("{role} {} for {owner} is larger than {MAX_PEM_BYTES} bytes", path.display())]
    TooLarge {
        /// The domain (or `default`).
        owner: String,
        /// Certificate or key.
        role: FileRole,
        /// The file.
        path: PathBuf,
    },
    /// The file could not be read.
    #[error("cannot read {role} {} for {owner}: {source}", path.display())]
    Read {
        /// The domain (or `default`) the file belongs to.
        owner: String,
        /// Certificate or key.
        role: FileRole,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid PEM of the expected kind.
    #[error("{} for {owner} is not a valid PEM {role}: {message}", path.display())]
    Parse {
        /// The domain (or `default`).
        owner: String,
        /// Certificate or key.
        role: FileRole,
        /// The file.
        path: PathBuf,
        /// OpenSSL's reasons (never the file's contents).
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
    /// Reading the certificate files took longer than allowed.
    #[error("reading the certificate files took longer than {0:?} (a hung file system?)")]
    Timeout(std::time::Duration),
    /// No thread could be started to read the files.
    #[error("cannot start a thread to read the certificate files: {0}")]
    Thread(std::io::Error),
}

impl CertError {
    /// The domain (or `default`) and the file (certificate or key) the error is about, when it
    /// is about one.
    pub fn subject(&self) -> Option<(&str, FileRole)> {
        match self {
            Self::NotAFile { owner, role, .. }
            | Self::TooLarge { owner, role, .. }
            | Self::Read { owner, role, .. }
            | Self::Parse { owner, role, .. } => Some((owner, *role)),
            Self::Mismatch { owner, .. } => Some((owner, FileRole::Key)),
            Self::Timeout(_) | Self::Thread(_) => None,
        }
    }
}

/// A parsed certificate chain (leaf first) and its private key.
#[derive(Debug)]
pub struct CertifiedKey {
    pub(crate) chain: Vec<X509>,
    pub(crate) key: PKey<Private>,
    not_before_unix: Option<i64>,
    not_after_unix: Option<i64>,
}

/// Seconds since the Unix epoch of an ASN.1 time.
pub fn asn1_unix(time: &openssl::asn1::Asn1TimeRef) -> Option<i64> {
    openssl::asn1::Asn1Time::from_unix(0)
        .ok()
        .and_then(|epoch| epoch.diff(time).ok())
        .map(|d| i64::from(d.days) * 86_400 + i64::from(d.secs))
}

/// What a non-regular file is, for error messages.
fn file_kind(file_type: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Reads a PEM file that must be a regular file of at most [`MAX_PEM_BYTES`] (symbolic links are
/// followed). Opened non-blocking, so a FIFO that appears between the check and the open cannot
/// hang the caller; checked again on the open file.
fn read_pem(owner: &str, role: FileRole, path: &Path) -> Result<Vec<u8>, CertError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt;
    let read_err = |source| CertError::Read {
        owner: owner.to_owned(),
        role,
        path: path.to_owned(),
        source,
    };
    let too_large = || CertError::TooLarge {
        owner: owner.to_owned(),
        role,
        path: path.to_owned(),
    };
    let check = |meta: &std::fs::Metadata| {
        if !meta.is_file() {
            return Err(CertError::NotAFile {
                owner: owner.to_owned(),
                role,
                path: path.to_owned(),
                kind: file_kind(meta.file_type()),
            });
        }
        if meta.len() > MAX_PEM_BYTES {
            return Err(too_large());
        }
        Ok(())
    };
    check(&std::fs::metadata(path).map_err(read_err)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(read_err)?;
    check(&file.metadata().map_err(read_err)?)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

/// OpenSSL's reasons for a parse failure: fixed texts from its reason table (never the data
/// being parsed, which may be a secret key).
fn reasons(e: &openssl::error::ErrorStack) -> String {
    let reasons: Vec<&str> = e.errors().iter().filter_map(|e| e.reason()).collect();
    if reasons.is_empty() {
        "unreadable".to_owned()
    } else {
        reasons.join("; ")
    }
}

impl CertifiedKey {
    /// Loads a PEM chain and key, checking that they match.
    pub fn load(owner: &str, cert_path: &Path, key_path: &Path) -> Result<Self, CertError> {
        let parse_err = |path: &Path, role, message: String| CertError::Parse {
            owner: owner.to_owned(),
            role,
            path: path.to_owned(),
            message,
        };
        let chain = X509::stack_from_pem(&read_pem(owner, FileRole::Certificate, cert_path)?)
            .map_err(|e| parse_err(cert_path, FileRole::Certificate, reasons(&e)))?;
        let Some(leaf) = chain.first() else {
            return Err(parse_err(
                cert_path,
                FileRole::Certificate,
                "no certificate in file".to_owned(),
            ));
        };
        let key = PKey::private_key_from_pem(&read_pem(owner, FileRole::Key, key_path)?)
            .map_err(|e| parse_err(key_path, FileRole::Key, reasons(&e)))?;
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
        Ok(Self::new(chain, key))
    }

    /// A chain (leaf first, not empty) and its key, already checked to match.
    pub(crate) fn new(chain: Vec<X509>, key: PKey<Private>) -> Self {
        let leaf = chain.first();
        Self {
            not_before_unix: leaf.and_then(|l| asn1_unix(l.not_before())),
            not_after_unix: leaf.and_then(|l| asn1_unix(l.not_after())),
            chain,
            key,
        }
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> Option<&X509> {
        self.chain.first()
    }

    /// Start of the leaf certificate's validity, in seconds since the Unix epoch.
    pub fn not_before_unix(&self) -> Option<i64> {
        self.not_before_unix
    }

    /// Expiry of the leaf certificate, in seconds since the Unix epoch.
    pub fn not_after_unix(&self) -> Option<i64> {
        self.not_after_unix
    }

    /// The leaf's issuer, as its common name (else its organisation; else empty).
    pub fn issuer(&self) -> String {
        use openssl::nid::Nid;
        let Some(leaf) = self.leaf() else {
            return String::new();
        };
        let name = leaf.issuer_name();
        [Nid::COMMONNAME, Nid::ORGANIZATIONNAME]
            .iter()
            .find_map(|nid| name.entries_by_nid(*nid).next())
            .and_then(|e| e.data().to_string().ok())
            .unwrap_or_default()
    }

    /// The leaf's serial number in hexadecimal.
    pub fn serial_hex(&self) -> String {
        self.leaf()
            .and_then(|l| l.serial_number().to_bn().ok())
            .and_then(|bn| bn.to_hex_str().ok())
            .map(|s| s.to_ascii_lowercase())
            .unwrap_or_default()
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
    /// The default certificate's files (`[proxy] default_cert_path` / `default_key_path`).
    default_paths: Option<(PathBuf, PathBuf)>,
    /// CA certificates of TLS backends, by `tls_ca_path`.
    upstream_cas: HashMap<String, Arc<Box<[X509]>>>,
}

/// ACME certificates by exact domain (see [`CertStore::set_acme`]).
pub type AcmeCerts = HashMap<Box<str>, Arc<CertifiedKey>, RandomState>;

impl CertMap {
    /// The certificate for a client's SNI (`None`: no SNI or unknown name).
    pub fn resolve(&self, sni: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        self.resolve_with(sni, None)
    }

    /// Like [`CertMap::resolve`], looking in `acme` after the domains' own certificates and
    /// before wildcards and the default.
    pub fn resolve_with<'a>(
        &'a self,
        sni: Option<&str>,
        acme: Option<&'a AcmeCerts>,
    ) -> Option<&'a Arc<CertifiedKey>> {
        let by_name = sni.and_then(|name| {
            let mut buf = [0u8; MAX_DOMAIN_LEN];
            let name = normalize_host(name.as_bytes(), &mut buf)?;
            self.exact
                .get(name)
                .or_else(|| acme.and_then(|a| a.get(name)))
                .or_else(|| {
                    let (first, rest) = name.split_once('.')?;
                    (!first.is_empty())
                        .then(|| self.wildcard.get(rest))
                        .flatten()
                })
        });
        by_name.or(self.default.as_ref())
    }

    /// The CA certificates loaded from a backend's `tls_ca_path`.
    pub fn upstream_ca(&self, path: &str) -> Option<&Arc<Box<[X509]>>> {
        self.upstream_cas.get(path)
    }

    /// The domain's own certificate (`tls_cert_path`), if it has one.
    pub fn own(&self, domain: &str) -> Option<&Arc<CertifiedKey>> {
        self.exact.get(domain)
    }

    /// The default certificate, if one is configured.
    pub fn default_certificate(&self) -> Option<&Arc<CertifiedKey>> {
        self.default.as_ref()
    }

    /// The default certificate's files, if one is configured.
    pub fn default_paths(&self) -> Option<&(PathBuf, PathBuf)> {
        self.default_paths.as_ref()
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

/// The runtime-swappable certificate map shared by the HTTPS listener and the config writer,
/// plus the ACME certificates (their own map, written only by the ACME manager, so a config
/// change and a renewal never overwrite each other's work).
#[derive(Debug, Default)]
pub struct CertStore {
    current: ArcSwap<CertMap>,
    acme: ArcSwap<AcmeCerts>,
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// How a certificate is found: by exact domain, by wildcard suffix, or as the default.
#[derive(Debug, Clone)]
enum Slot {
    Exact(Box<str>),
    Wildcard(Box<str>),
    Default,
}

/// One certificate/key pair to load.
#[derive(Debug, Clone)]
struct Wanted {
    owner: String,
    cert: PathBuf,
    key: PathBuf,
    slot: Slot,
}

/// Loads `wanted` into a new map, reusing the pairs of `previous` whose files did not change,
/// and the CA bundles of TLS backends (`cas`: owner, path).
fn load_all(
    previous: &CertMap,
    wanted: Vec<Wanted>,
    cas: Vec<(String, String)>,
    default_paths: Option<(PathBuf, PathBuf)>,
) -> Result<CertMap, CertError> {
    let mut next = CertMap {
        default_paths,
        ..CertMap::default()
    };
    for (owner, path) in cas {
        if next.upstream_cas.contains_key(&path) {
            continue;
        }
        let file = Path::new(&path);
        let certs =
            X509::stack_from_pem(&read_pem(&owner, FileRole::CaBundle, file)?).map_err(|e| {
                CertError::Parse {
                    owner: owner.clone(),
                    role: FileRole::CaBundle,
                    path: file.to_owned(),
                    message: reasons(&e),
                }
            })?;
        if certs.is_empty() {
            return Err(CertError::Parse {
                owner,
                role: FileRole::CaBundle,
                path: file.to_owned(),
                message: "no certificate in file".to_owned(),
            });
        }
        next.upstream_cas
            .insert(path, Arc::new(certs.into_boxed_slice()));
    }
    for w in wanted {
        let files = (w.cert, w.key);
        let stamp = mtime(&files.0).max(mtime(&files.1));
        let reused = previous
            .files
            .get(&files)
            .filter(|(old_stamp, _)| *old_stamp == stamp && stamp.is_some())
            .map(|(_, ck)| Arc::clone(ck));
        let ck = match reused {
            Some(ck) => ck,
            None => Arc::new(CertifiedKey::load(&w.owner, &files.0, &files.1)?),
        };
        match w.slot {
            Slot::Exact(name) => next.exact.insert(name, Arc::clone(&ck)),
            Slot::Wildcard(suffix) => next.wildcard.insert(suffix, Arc::clone(&ck)),
            Slot::Default => next.default.replace(Arc::clone(&ck)),
        };
        next.files.insert(files, (stamp, ck));
    }
    Ok(next)
}

/// Longest time [`CertStore::prepare_within`] callers should wait, by default.
pub const CERT_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl CertStore {
    /// An empty store; `default_paths` is the `[proxy] default_cert_path` / `default_key_path`
    /// (loaded by the first [`CertStore::prepare`]).
    pub fn new(default_paths: Option<(PathBuf, PathBuf)>) -> Self {
        Self {
            current: ArcSwap::from_pointee(CertMap {
                default_paths,
                ..CertMap::default()
            }),
            acme: ArcSwap::default(),
        }
    }

    /// Serves `ck` for `domain` (an ACME certificate; the domain's own certificate file, if it
    /// gets one, takes precedence). New handshakes use it at once; open connections keep theirs.
    pub fn set_acme(&self, domain: &str, ck: Arc<CertifiedKey>) {
        self.acme.rcu(|current| {
            let mut next = AcmeCerts::clone(current);
            next.insert(domain.into(), Arc::clone(&ck));
            next
        });
    }

    /// Stops serving the ACME certificate of `domain`.
    pub fn remove_acme(&self, domain: &str) {
        if self.acme.load().contains_key(domain) {
            self.acme.rcu(|current| {
                let mut next = AcmeCerts::clone(current);
                next.remove(domain);
                next
            });
        }
    }

    /// The ACME certificates served now.
    pub fn acme(&self) -> Arc<AcmeCerts> {
        self.acme.load_full()
    }

    /// Loads every certificate `state` references plus the current default certificate, reusing
    /// files unchanged since the current map was built. Nothing is published.
    pub fn prepare(&self, state: &State) -> Result<CertMap, CertError> {
        let default_paths = self.current.load().default_paths.clone();
        self.prepare_with_default(state, default_paths)
    }

    /// Like [`CertStore::prepare`], with another default certificate (a reloaded config).
    pub fn prepare_with_default(
        &self,
        state: &State,
        default_paths: Option<(PathBuf, PathBuf)>,
    ) -> Result<CertMap, CertError> {
        load_all(
            &self.current.load(),
            Self::wanted(state, default_paths.as_ref()),
            Self::cas(state),
            default_paths,
        )
    }

    /// Like [`CertStore::prepare_with_default`], but gives up after `timeout`: the files are read
    /// on a thread of their own, so a file system that hangs costs the caller `timeout`, not
    /// forever (the thread ends whenever the file system answers).
    pub fn prepare_within(
        &self,
        state: &State,
        default_paths: Option<(PathBuf, PathBuf)>,
        timeout: std::time::Duration,
    ) -> Result<CertMap, CertError> {
        let wanted = Self::wanted(state, default_paths.as_ref());
        let cas = Self::cas(state);
        if wanted.is_empty() && cas.is_empty() {
            return Ok(CertMap {
                default_paths,
                ..CertMap::default()
            });
        }
        let previous = self.current.load_full();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("cert-load".into())
            .spawn(move || {
                let _ = tx.send(load_all(&previous, wanted, cas, default_paths));
            });
        if let Err(e) = spawned {
            return Err(CertError::Thread(e));
        }
        rx.recv_timeout(timeout)
            .unwrap_or(Err(CertError::Timeout(timeout)))
    }

    /// The CA bundles TLS backends name: (`backend <id>`, path).
    fn cas(state: &State) -> Vec<(String, String)> {
        state
            .backends()
            .filter_map(|b| {
                let path = b.tls_ca_path.as_ref()?;
                Some((format!("backend {}", b.id), path.clone()))
            })
            .collect()
    }

    fn wanted(state: &State, default_paths: Option<&(PathBuf, PathBuf)>) -> Vec<Wanted> {
        let default = default_paths.map(|(cert, key)| Wanted {
            owner: "default".into(),
            cert: cert.clone(),
            key: key.clone(),
            slot: Slot::Default,
        });
        let domains = state.vhosts().filter_map(|vhost| {
            let (Some(cert), Some(key)) = (&vhost.tls_cert_path, &vhost.tls_key_path) else {
                return None;
            };
            let slot = match vhost.domain.wildcard_suffix() {
                Some(suffix) => Slot::Wildcard(suffix.into()),
                None => Slot::Exact(vhost.domain.as_str().into()),
            };
            Some(Wanted {
                owner: vhost.domain.to_string(),
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
                slot,
            })
        });
        default.into_iter().chain(domains).collect()
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

/// The SNI a TLS client sent, attached to the connection digest by [`SniCertResolver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSni(pub Box<str>);

/// The HTTPS listener's handshake callbacks: pick the certificate for the SNI, and remember the
/// SNI for the request logic (SNI/Host mismatch → 421). With ACME's TLS-ALPN-01 challenge on,
/// a client that negotiated `acme-tls/1` gets the challenge certificate of its SNI instead.
#[derive(Debug, Clone)]
pub struct SniCertResolver {
    store: Arc<CertStore>,
    challenges: Option<Arc<AcmeChallenges>>,
}

impl SniCertResolver {
    /// Resolves from `store`.
    pub fn new(store: Arc<CertStore>) -> Self {
        Self {
            store,
            challenges: None,
        }
    }

    /// Also answers TLS-ALPN-01 challenges from `challenges`.
    pub fn with_challenges(mut self, challenges: Option<Arc<AcmeChallenges>>) -> Self {
        self.challenges = challenges;
        self
    }

    /// Whether `acme-tls/1` is offered (TLS-ALPN-01 challenges are answered).
    pub(crate) fn answers_tls_alpn(&self) -> bool {
        self.challenges.is_some()
    }
}

#[async_trait]
impl TlsAccept for SniCertResolver {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let sni = ssl.servername(NameType::HOST_NAME).map(str::to_owned);
        if ssl.selected_alpn_protocol() == Some(crate::acme::ACME_TLS_ALPN) {
            let cert = self
                .challenges
                .as_ref()
                .zip(sni.as_deref())
                .and_then(|(c, sni)| c.tls_alpn_certificate(sni));
            match cert {
                Some(ck) => install(ssl, &ck, sni.as_deref()),
                None => tracing::debug!(
                    sni = sni.as_deref().unwrap_or(""),
                    "acme-tls/1 handshake without a pending challenge"
                ),
            }
            return;
        }
        let map = self.store.current.load();
        let acme = self.store.acme.load();
        let Some(ck) = map.resolve_with(sni.as_deref(), Some(&acme)) else {
            tracing::debug!(sni = sni.as_deref().unwrap_or(""), "no certificate for SNI");
            return;
        };
        install(ssl, ck, sni.as_deref());
    }

    async fn handshake_complete_callback(
        &self,
        ssl: &TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let sni = ssl.servername(NameType::HOST_NAME)?;
        Some(Arc::new(ClientSni(sni.into())))
    }
}

/// Installs `ck` (leaf, chain, key) on the handshake.
fn install(ssl: &mut TlsRef, ck: &CertifiedKey, sni: Option<&str>) {
    let Some(leaf) = ck.leaf() else { return };
    let result = ext::ssl_use_certificate(ssl, leaf)
        .and_then(|()| {
            ck.chain[1..]
                .iter()
                .try_for_each(|c| ext::ssl_add_chain_cert(ssl, c))
        })
        .and_then(|()| ext::ssl_use_private_key(ssl, &ck.key));
    if let Err(e) = result {
        tracing::warn!(sni = sni.unwrap_or(""), error = %e, "failed to install certificate");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(path: &Path) -> String {
        match read_pem("example.com", FileRole::Certificate, path) {
            Ok(_) => panic!("{} was read", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let e = err(Path::new("/dev/zero"));
        assert!(
            e.contains("is a character device, not a regular file"),
            "{e}"
        );
        let e = err(dir.path());
        assert!(e.contains("is a directory"), "{e}");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // Refused without opening it (opening a FIFO for reading would block until a writer).
        let e = err(&fifo);
        assert!(e.contains("is a FIFO"), "{e}");
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'A'; MAX_PEM_BYTES as usize + 1]).unwrap();
        let e = err(&big);
        assert!(e.contains("larger than"), "{e}");
        let missing = dir.path().join("missing.pem");
        assert!(err(&missing).contains("cannot read"));
        // A symbolic link to a regular file is followed.
        let real = dir.path().join("real.pem");
        std::fs::write(&real, b"x").unwrap();
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(read_pem("example.com", FileRole::Key, &link).unwrap(), b"x");
        let link_to_device = dir.path().join("zero.pem");
        std::os::unix::fs::symlink("/dev/zero", &link_to_device).unwrap();
        assert!(err(&link_to_device).contains("character device"));
    }

    #[test]
    fn parse_errors_never_quote_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret =
            "-----BEGIN PRIVATE KEY-----\nTOP-SECRET-MATERIAL\n-----END PRIVATE KEY-----\n";
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        std::fs::write(&cert, secret).unwrap();
        std::fs::write(&key, secret).unwrap();
        let e = CertifiedKey::load("example.com", &cert, &key)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a valid PEM certificate"), "{e}");
        assert!(!e.contains("TOP-SECRET"), "{e}");
    }

    #[test]
    fn prepare_within_reports_files_that_cannot_be_served() {
        use vhost_routing::{DomainName, Tag, VirtualHost};
        let mut vhost = VirtualHost::new(
            DomainName::parse("example.com").unwrap(),
            Tag::parse("a").unwrap(),
        );
        vhost.tls_cert_path = Some("/dev/zero".into());
        vhost.tls_key_path = Some("/dev/zero".into());
        let state = State::new(vec![vhost], vec![]).unwrap();
        let store = CertStore::new(None);
        let e = store
            .prepare_within(&state, None, CERT_READ_TIMEOUT)
            .err()
            .unwrap();
        assert!(matches!(e, CertError::NotAFile { .. }), "{e}");
        assert!(store
            .prepare_within(&State::default(), None, CERT_READ_TIMEOUT)
            .unwrap()
            .is_empty());
    }
}
