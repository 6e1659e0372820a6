//! Automatic certificates from an ACME CA (`[lets_encrypt]`, see docs/acme.md).
//!
//! Where it sits: beside the admin API on the control plane. The [`AcmeManager`] task follows
//! the published routing snapshots (woken by every publish) to know which domains want a
//! certificate, loads what the cache already holds, and orders the rest off the request path;
//! the data plane only ever reads its results: challenge answers from
//! [`vhost_pingora::AcmeChallenges`] and certificates from [`vhost_pingora::CertStore`]'s ACME
//! map (one atomic swap per new certificate; open connections keep theirs).
//!
//! Scheduling rules, per domain:
//! - a valid cached certificate is served and never re-ordered before its renewal time
//!   (`not_after - min(renew_before_days, lifetime / 3)`, minus up to an hour of jitter), so a
//!   restart makes no order;
//! - a missing certificate is ordered at once (0–1 s of jitter);
//! - a failed order is retried after 1 min, doubling up to 24 h;
//! - at most [`MAX_ORDERS_PER_HOUR`] orders per domain per hour, whatever asks (schedule,
//!   domain changes, `POST .../renew`); at most [`MAX_CONCURRENT_ORDERS`] orders run at once.

mod cache;
mod client;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use tokio::sync::{mpsc, watch, Notify, OnceCell};
use vhost_admin::{CertificateOrigin, CertificateView, RenewRefusal};
use vhost_config::{AcmeChallenge, LetsEncryptConfig};
use vhost_pingora::{AcmeChallenges, CertStore, CertifiedKey};
use vhost_routing::{DomainName, RouteStore};

use cache::Cache;

/// Most orders per domain in any hour.
pub const MAX_ORDERS_PER_HOUR: usize = 5;
/// Most orders running at once.
pub const MAX_CONCURRENT_ORDERS: usize = 2;
/// First retry delay after a failed order; doubles per failure.
const FIRST_BACKOFF_MS: i64 = 60_000;
/// Longest retry delay.
const MAX_BACKOFF_MS: i64 = 24 * 3_600_000;
const HOUR_MS: i64 = 3_600_000;

/// Registers the descriptions (Prometheus `# HELP`) of the ACME metrics.
pub(crate) fn describe() {
    metrics::describe_counter!(
        "acme_orders_total",
        "ACME certificate orders, by result (success, failure)"
    );
}

/// The ACME settings in force.
#[derive(Debug, Clone)]
struct Settings {
    email: String,
    directory: String,
    ca_path: Option<PathBuf>,
    challenge: AcmeChallenge,
    renew_before_ms: i64,
}

/// What the manager knows about one domain.
#[derive(Debug, Clone, Default)]
struct DomainStatus {
    /// The certificate served (from the cache or the last order).
    cert: Option<Arc<CertifiedKey>>,
    /// When the next order is due (ms since the epoch).
    due_ms: i64,
    /// Failed orders in a row.
    failures: u32,
    /// The last failure.
    last_error: Option<String>,
    /// Start times of the orders of the last hour (ms since the epoch).
    orders: VecDeque<i64>,
    /// An order is running.
    in_flight: bool,
}

impl DomainStatus {
    /// Forgets orders older than an hour; `Err(t)`: the hourly limit is reached until `t` (ms
    /// since the epoch).
    fn order_slot(&mut self, now: i64) -> Result<(), i64> {
        while self.orders.front().is_some_and(|t| *t <= now - HOUR_MS) {
            self.orders.pop_front();
        }
        if self.orders.len() >= MAX_ORDERS_PER_HOUR {
            return Err(self.orders.front().map_or(now, |t| t + HOUR_MS));
        }
        Ok(())
    }
}

/// A wanted domain that ACME cannot serve, with the reason (wildcards).
type Unservable = BTreeMap<String, String>;

/// The ACME manager (see the module docs): a task ([`AcmeManager::run`]) plus the read side the
/// admin API and the metrics use.
pub struct AcmeManager {
    settings: Settings,
    cache: Cache,
    store: Arc<RouteStore>,
    certs: Arc<CertStore>,
    challenges: Arc<AcmeChallenges>,
    /// The task's view, republished after every change (read by the API and metrics).
    status: ArcSwap<(BTreeMap<String, DomainStatus>, Unservable)>,
    /// Wakes the task: a snapshot was published.
    wake: Arc<Notify>,
    renew_tx: mpsc::UnboundedSender<String>,
    renew_rx: tokio::sync::Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    account: OnceCell<Account>,
}

impl std::fmt::Debug for AcmeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeManager")
            .field("directory", &self.settings.directory)
            .field("challenge", &self.settings.challenge)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// When a certificate valid from `not_before` to `not_after` (Unix seconds) is renewed.
fn renewal_due_ms(not_before: i64, not_after: i64, renew_before_ms: i64) -> i64 {
    let lifetime_ms = (not_after - not_before).max(0) * 1000;
    let before = renew_before_ms.min(lifetime_ms / 3);
    let jitter = i64::try_from(fastrand::u64(
        0..=u64::try_from((before / 10).min(HOUR_MS)).unwrap_or(0),
    ))
    .unwrap_or(0);
    not_after * 1000 - before - jitter
}

/// Delay before retrying after `failures` failed orders in a row.
fn backoff_ms(failures: u32) -> i64 {
    let shift = failures.saturating_sub(1).min(20);
    (FIRST_BACKOFF_MS << shift).min(MAX_BACKOFF_MS)
}

impl AcmeManager {
    /// A manager for `config`, serving into `certs` and answering challenges through
    /// `challenges` (the same instance the proxy was given).
    pub fn new(
        config: &LetsEncryptConfig,
        store: Arc<RouteStore>,
        certs: Arc<CertStore>,
        challenges: Arc<AcmeChallenges>,
    ) -> Arc<Self> {
        let (renew_tx, renew_rx) = mpsc::unbounded_channel();
        let directory = config.directory().to_owned();
        Arc::new(Self {
            cache: Cache::new(config.cache_dir.clone(), &directory),
            settings: Settings {
                email: config.email.clone(),
                directory,
                ca_path: config.directory_ca_path.clone(),
                challenge: config.challenge,
                renew_before_ms: i64::from(config.renew_before_days) * 24 * HOUR_MS,
            },
            store,
            certs,
            challenges,
            status: ArcSwap::default(),
            wake: Arc::new(Notify::new()),
            renew_tx,
            renew_rx: tokio::sync::Mutex::new(Some(renew_rx)),
            account: OnceCell::new(),
        })
    }

    /// Wakes the manager (call after every published snapshot).
    pub fn waker(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    /// Loads the cached certificates of the wanted domains and serves them, before the proxy
    /// accepts its first connection (a restart then serves the same certificates at once).
    pub fn load_cached(&self) {
        let mut state = BTreeMap::new();
        let unservable = self.sync(&mut state);
        self.status.store(Arc::new((state, unservable)));
    }

    /// Runs until `stop` flips (see the module docs).
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Some(mut renew_rx) = self.renew_rx.lock().await.take() else {
            return;
        };
        if let Err(e) = self.cache.ensure_writable() {
            tracing::error!(error = %e, "ACME cache is not writable: no certificate will be ordered until it is");
        }
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let mut state = self.status.load().0.clone();
        loop {
            let unservable = self.sync(&mut state);
            let now = now_ms();
            let mut running = state.values().filter(|s| s.in_flight).count();
            for (domain, st) in &mut state {
                if running >= MAX_CONCURRENT_ORDERS {
                    break;
                }
                if st.in_flight || st.due_ms > now {
                    continue;
                }
                if let Err(allowed_at) = st.order_slot(now) {
                    st.due_ms = allowed_at;
                    continue;
                }
                st.in_flight = true;
                st.orders.push_back(now);
                running += 1;
                let this = Arc::clone(&self);
                let done = done_tx.clone();
                let domain = domain.clone();
                tokio::spawn(async move {
                    tracing::info!(
                        domain,
                        directory = this.settings.directory,
                        "ACME order started"
                    );
                    let result = this.order(&domain).await;
                    let _ = done.send((domain, result));
                });
            }
            self.status.store(Arc::new((state.clone(), unservable)));
            let next_due = state
                .values()
                .filter(|s| !s.in_flight)
                .map(|s| s.due_ms)
                .min()
                .unwrap_or(i64::MAX);
            let wait = Duration::from_millis(
                u64::try_from((next_due - now_ms()).clamp(0, HOUR_MS)).unwrap_or(0),
            );
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
                Some(domain) = renew_rx.recv() => {
                    if let Some(st) = state.get_mut(&domain) {
                        st.due_ms = now_ms();
                    }
                }
                Some((domain, result)) = done_rx.recv() => self.finish(&mut state, &domain, result),
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Follows the current snapshot: new wanted domains get their cached certificate (or are
    /// due now), domains no longer wanted are dropped and their certificate withdrawn. Returns
    /// the domains that want ACME but cannot have it.
    fn sync(&self, state: &mut BTreeMap<String, DomainStatus>) -> Unservable {
        let table = self.store.load();
        let mut unservable = Unservable::new();
        let mut wanted = std::collections::BTreeSet::new();
        for vhost in table.state().vhosts() {
            if vhost.wants_acme() {
                wanted.insert(vhost.domain.to_string());
            } else if vhost.domain.wildcard_suffix().is_some()
                && vhost.tls_cert_path.is_none()
                && vhost.acme != Some(false)
            {
                unservable.insert(
                    vhost.domain.to_string(),
                    "wildcard domains cannot get ACME certificates (HTTP-01 and TLS-ALPN-01 cannot validate them; DNS-01 is not supported): set tls_cert_path/tls_key_path, or acme = false to silence this".to_owned(),
                );
            }
        }
        state.retain(|domain, _| {
            let keep = wanted.contains(domain);
            if !keep {
                self.certs.remove_acme(domain);
            }
            keep
        });
        for domain in wanted {
            if state.contains_key(&domain) {
                continue;
            }
            let mut st = DomainStatus {
                due_ms: now_ms() + i64::try_from(fastrand::u64(0..=1000)).unwrap_or(0),
                ..DomainStatus::default()
            };
            match self.load_from_cache(&domain) {
                Ok(Some(ck)) => {
                    st.due_ms = renewal_due_ms(
                        ck.not_before_unix().unwrap_or(0),
                        ck.not_after_unix().unwrap_or(0),
                        self.settings.renew_before_ms,
                    );
                    self.certs.set_acme(&domain, Arc::clone(&ck));
                    tracing::info!(
                        domain,
                        serial = ck.serial_hex(),
                        "ACME certificate loaded from the cache"
                    );
                    st.cert = Some(ck);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(domain, error = %e, "cached ACME certificate not usable; ordering a new one");
                }
            }
            state.insert(domain, st);
        }
        unservable
    }

    /// The cached certificate of `domain` if it exists, loads, names the domain and has not
    /// expired.
    fn load_from_cache(&self, domain: &str) -> Result<Option<Arc<CertifiedKey>>, String> {
        let path = self.cache.certificate_path(domain);
        if self.cache.read(&path).map_err(|e| e.to_string())?.is_none() {
            return Ok(None);
        }
        let ck = CertifiedKey::load(domain, &path, &path).map_err(|e| e.to_string())?;
        let names_domain = ck
            .leaf()
            .and_then(|leaf| leaf.subject_alt_names())
            .is_some_and(|names| names.iter().any(|n| n.dnsname() == Some(domain)));
        if !names_domain {
            return Err(format!("{} does not name {domain}", path.display()));
        }
        if ck.not_after_unix().unwrap_or(0) * 1000 <= now_ms() {
            return Err(format!("{} has expired", path.display()));
        }
        Ok(Some(Arc::new(ck)))
    }

    /// Records the end of an order.
    fn finish(
        &self,
        state: &mut BTreeMap<String, DomainStatus>,
        domain: &str,
        result: Result<Arc<CertifiedKey>, String>,
    ) {
        let Some(st) = state.get_mut(domain) else {
            return;
        };
        st.in_flight = false;
        match result {
            Ok(ck) => {
                metrics::counter!("acme_orders_total", "result" => "success").increment(1);
                tracing::info!(
                    domain,
                    serial = ck.serial_hex(),
                    issuer = ck.issuer(),
                    not_after = ck.not_after_unix().unwrap_or(0),
                    "ACME certificate issued and served"
                );
                st.due_ms = renewal_due_ms(
                    ck.not_before_unix().unwrap_or(0),
                    ck.not_after_unix().unwrap_or(0),
                    self.settings.renew_before_ms,
                );
                self.certs.set_acme(domain, Arc::clone(&ck));
                st.cert = Some(ck);
                st.failures = 0;
                st.last_error = None;
            }
            Err(error) => {
                metrics::counter!("acme_orders_total", "result" => "failure").increment(1);
                st.failures = st.failures.saturating_add(1);
                let delay = backoff_ms(st.failures);
                st.due_ms = now_ms() + delay;
                tracing::warn!(
                    domain,
                    failures = st.failures,
                    retry_in_secs = delay / 1000,
                    error,
                    "ACME order failed{}",
                    if st.cert.is_some() {
                        "; the current certificate stays in use"
                    } else {
                        ""
                    }
                );
                st.last_error = Some(error);
            }
        }
    }

    /// The account, loaded from the cache or created (once) and saved.
    async fn account(&self) -> Result<&Account, String> {
        self.account
            .get_or_try_init(|| async {
                let client = client::ReqwestClient::new(self.settings.ca_path.as_deref())
                    .map_err(|e| e.to_string())?;
                let builder = Account::builder_with_http(Box::new(client));
                let path = self.cache.account_path();
                if let Some(bytes) = self.cache.read(&path).map_err(|e| e.to_string())? {
                    let credentials: AccountCredentials =
                        serde_json::from_slice(&bytes).map_err(|e| {
                            format!("{}: not ACME account credentials: {e}", path.display())
                        })?;
                    return builder
                        .from_credentials(credentials)
                        .await
                        .map_err(|e| format!("loading the ACME account: {}", chain(&e)));
                }
                let contact = format!("mailto:{}", self.settings.email);
                let (account, credentials) = builder
                    .create(
                        &NewAccount {
                            contact: &[&contact],
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.settings.directory.clone(),
                        None,
                    )
                    .await
                    .map_err(|e| {
                        format!(
                            "creating the ACME account at {}: {}",
                            self.settings.directory,
                            chain(&e)
                        )
                    })?;
                let json = serde_json::to_vec(&credentials).map_err(|e| e.to_string())?;
                cache::write_private(&path, &json).map_err(|e| e.to_string())?;
                tracing::info!(id = account.id(), path = %path.display(), "ACME account created");
                Ok(account)
            })
            .await
    }

    /// One order for `domain`, from the account to the cached and parsed certificate.
    async fn order(&self, domain: &str) -> Result<Arc<CertifiedKey>, String> {
        self.cache.ensure_writable().map_err(|e| e.to_string())?;
        let account = self.account().await?;
        let identifiers = [Identifier::Dns(domain.to_owned())];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(|e| format!("new order: {}", chain(&e)))?;
        let mut pending = Pending {
            challenges: &self.challenges,
            tokens: Vec::new(),
            alpn: None,
        };
        let kind = match self.settings.challenge {
            AcmeChallenge::Http01 => ChallengeType::Http01,
            AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| format!("authorization: {}", chain(&e)))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(format!("authorization is {other:?}")),
            }
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or_else(|| format!("the CA offers no {kind:?} challenge for {domain}"))?;
            let key_authorization = challenge.key_authorization();
            match self.settings.challenge {
                AcmeChallenge::Http01 => {
                    self.challenges
                        .add_http01(&challenge.token, key_authorization.as_str());
                    pending.tokens.push(challenge.token.clone());
                }
                AcmeChallenge::TlsAlpn01 => {
                    self.challenges
                        .add_tls_alpn01(domain, key_authorization.digest().as_ref())
                        .map_err(|e| e.to_string())?;
                    pending.alpn = Some(domain.to_owned());
                }
            }
            challenge
                .set_ready()
                .await
                .map_err(|e| format!("challenge: {}", chain(&e)))?;
        }
        let retries = RetryPolicy::new().timeout(Duration::from_secs(90));
        let status = order
            .poll_ready(&retries)
            .await
            .map_err(|e| format!("validation: {}", chain(&e)))?;
        if status != OrderStatus::Ready {
            return Err(format!(
                "validation failed ({status:?}): {}",
                validation_errors(&mut order).await
            ));
        }
        drop(pending);
        let (key_pem, csr_der) = key_and_csr(domain).map_err(|e| format!("CSR: {e}"))?;
        order
            .finalize_csr(&csr_der)
            .await
            .map_err(|e| format!("finalize: {}", chain(&e)))?;
        let chain_pem = order
            .poll_certificate(&retries)
            .await
            .map_err(|e| format!("certificate: {}", chain(&e)))?;
        let path = self.cache.certificate_path(domain);
        let mut file = key_pem;
        file.extend_from_slice(chain_pem.as_bytes());
        cache::write_private(&path, &file).map_err(|e| e.to_string())?;
        CertifiedKey::load(domain, &path, &path)
            .map(Arc::new)
            .map_err(|e| format!("the issued certificate does not load: {e}"))
    }

    /// The API's view of every certificate: the domains' own files, ACME domains (also before
    /// their first certificate) and the default certificate.
    pub(crate) fn views(&self) -> Vec<CertificateView> {
        certificate_views(&self.certs, Some(self))
    }

    /// Failed orders in a row, per ACME domain (for `acme_consecutive_failures`).
    pub fn failure_counts(&self) -> Vec<(String, u32)> {
        self.status
            .load()
            .0
            .iter()
            .map(|(d, s)| (d.clone(), s.failures))
            .collect()
    }
}

/// Withdraws the challenge answers of an order when it ends, however it ends.
struct Pending<'a> {
    challenges: &'a AcmeChallenges,
    tokens: Vec<String>,
    alpn: Option<String>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        for token in &self.tokens {
            self.challenges.remove_http01(token);
        }
        if let Some(domain) = &self.alpn {
            self.challenges.remove_tls_alpn01(domain);
        }
    }
}

/// The CA's reasons for a failed validation, from the authorizations' challenges.
async fn validation_errors(order: &mut instant_acme::Order) -> String {
    let mut reasons = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        if let Ok(state) = authz.refresh().await {
            reasons.extend(
                state
                    .challenges
                    .iter()
                    .filter_map(|c| c.error.as_ref().map(ToString::to_string)),
            );
        }
    }
    if reasons.is_empty() {
        "the CA gave no reason".to_owned()
    } else {
        reasons.join("; ")
    }
}

/// A new P-256 key (PKCS#8 PEM) and a CSR (DER) naming `domain`.
fn key_and_csr(domain: &str) -> Result<(Vec<u8>, Vec<u8>), openssl::error::ErrorStack> {
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::stack::Stack;
    use openssl::x509::extension::SubjectAlternativeName;
    use openssl::x509::{X509NameBuilder, X509ReqBuilder};
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let key = PKey::from_ec_key(EcKey::generate(&group)?)?;
    let mut req = X509ReqBuilder::new()?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, domain)?;
    req.set_subject_name(&name.build())?;
    req.set_pubkey(&key)?;
    let mut extensions = Stack::new()?;
    extensions.push(
        SubjectAlternativeName::new()
            .dns(domain)
            .build(&req.x509v3_context(None))?,
    )?;
    req.add_extensions(&extensions)?;
    req.sign(&key, MessageDigest::sha256())?;
    Ok((key.private_key_to_pem_pkcs8()?, req.build().to_der()?))
}

fn rfc3339(unix: Option<i64>) -> Option<String> {
    unix.map(vhost_admin::history::rfc3339_unix)
}

fn view_of(
    domain: String,
    source: CertificateOrigin,
    ck: Option<&CertifiedKey>,
) -> CertificateView {
    CertificateView {
        domain,
        source,
        issuer: ck.map(CertifiedKey::issuer),
        serial: ck.map(CertifiedKey::serial_hex),
        not_before: rfc3339(ck.and_then(CertifiedKey::not_before_unix)),
        not_after: rfc3339(ck.and_then(CertifiedKey::not_after_unix)),
        next_renewal: None,
        last_error: None,
        consecutive_failures: 0,
    }
}

/// Every certificate of `certs`, with the ACME schedule when `acme` is on.
pub(crate) fn certificate_views(
    certs: &CertStore,
    acme: Option<&AcmeManager>,
) -> Vec<CertificateView> {
    let map = certs.current();
    let mut views: BTreeMap<String, CertificateView> = map
        .expiries()
        .filter(|(domain, _)| domain != "default")
        .map(|(domain, _)| {
            let ck = map.own(&domain).or_else(|| map.resolve(Some(&domain)));
            (
                domain.clone(),
                view_of(domain, CertificateOrigin::File, ck.map(|c| &**c)),
            )
        })
        .collect();
    if let Some(acme) = acme {
        let status = acme.status.load();
        for (domain, st) in &status.0 {
            let mut view = view_of(domain.clone(), CertificateOrigin::Acme, st.cert.as_deref());
            view.next_renewal = Some(if st.in_flight {
                rfc3339(Some(now_ms() / 1000)).unwrap_or_default()
            } else {
                rfc3339(Some(st.due_ms / 1000)).unwrap_or_default()
            });
            view.last_error = st.last_error.clone();
            view.consecutive_failures = st.failures;
            views.insert(domain.clone(), view);
        }
        for (domain, reason) in &status.1 {
            let mut view = view_of(domain.clone(), CertificateOrigin::Acme, None);
            view.last_error = Some(reason.clone());
            views.entry(domain.clone()).or_insert(view);
        }
    }
    let mut list: Vec<CertificateView> = views.into_values().collect();
    if let Some(ck) = map.default_certificate() {
        list.push(view_of(
            "default".to_owned(),
            CertificateOrigin::File,
            Some(ck),
        ));
    }
    list
}

/// The admin API's certificate source.
#[derive(Debug, Clone)]
pub(crate) struct Certificates {
    pub(crate) certs: Arc<CertStore>,
    pub(crate) acme: Option<Arc<AcmeManager>>,
}

impl vhost_admin::CertificateSource for Certificates {
    fn list(&self) -> Vec<CertificateView> {
        match &self.acme {
            Some(acme) => acme.views(),
            None => certificate_views(&self.certs, None),
        }
    }

    fn renew(&self, domain: &DomainName) -> Result<CertificateView, RenewRefusal> {
        let Some(acme) = &self.acme else {
            return Err(RenewRefusal::AcmeDisabled);
        };
        let name = domain.to_string();
        let status = acme.status.load();
        let Some(st) = status.0.get(&name) else {
            // Just added and not seen by the manager yet: it will be ordered at once anyway.
            let wanted = acme
                .store
                .load()
                .state()
                .vhost(domain)
                .is_some_and(vhost_routing::VirtualHost::wants_acme);
            if wanted {
                let _ = acme.renew_tx.send(name.clone());
                let mut view = view_of(name, CertificateOrigin::Acme, None);
                view.next_renewal = rfc3339(Some(now_ms() / 1000));
                return Ok(view);
            }
            let reason = status.1.get(&name).cloned().unwrap_or_else(|| {
                "it has its own certificate (tls_cert_path) or acme = false".to_owned()
            });
            return Err(RenewRefusal::NotManaged {
                domain: name,
                reason,
            });
        };
        let now = now_ms();
        let recent: Vec<i64> = st
            .orders
            .iter()
            .copied()
            .filter(|t| *t > now - HOUR_MS)
            .collect();
        if recent.len() >= MAX_ORDERS_PER_HOUR {
            let retry = recent.first().map_or(HOUR_MS, |t| t + HOUR_MS - now);
            return Err(RenewRefusal::Limited {
                domain: name,
                orders: recent.len(),
                retry_after_secs: u64::try_from(retry / 1000).unwrap_or(1).max(1),
            });
        }
        let _ = acme.renew_tx.send(name.clone());
        let mut view = view_of(name, CertificateOrigin::Acme, st.cert.as_deref());
        view.next_renewal = rfc3339(Some(now / 1000));
        view.last_error = st.last_error.clone();
        view.consecutive_failures = st.failures;
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_before_expiry_and_never_right_after_issuance() {
        let day = 86_400;
        let thirty_days_ms = 30 * 24 * HOUR_MS;
        // 90-day certificate, renew 30 days before: between 60 days minus jitter and 60 days.
        let due = renewal_due_ms(0, 90 * day, thirty_days_ms);
        assert!(
            due <= 60 * day * 1000 && due >= 60 * day * 1000 - HOUR_MS,
            "{due}"
        );
        // 7-day certificate: renewed after two thirds of its life, not at once.
        let due = renewal_due_ms(0, 7 * day, thirty_days_ms);
        let two_thirds = 7 * day * 1000 * 2 / 3;
        assert!(
            due >= two_thirds - HOUR_MS && due <= two_thirds + 1000,
            "{due}"
        );
    }

    #[test]
    fn at_most_five_orders_an_hour() {
        let mut st = DomainStatus::default();
        let now = 10 * HOUR_MS;
        for i in 0..5 {
            assert_eq!(st.order_slot(now + i), Ok(()));
            st.orders.push_back(now + i);
        }
        assert_eq!(st.order_slot(now + 10), Err(now + HOUR_MS));
        // An hour after the first, one more is allowed.
        assert_eq!(st.order_slot(now + HOUR_MS), Ok(()));
        assert_eq!(st.orders.len(), 4);
    }

    #[test]
    fn renewals_over_the_limit_are_refused_with_a_retry_time() {
        use vhost_admin::CertificateSource as _;
        use vhost_routing::{
            BuildOptions, DomainName, LiteralOnly, RouteWriter, State, Tag, VirtualHost,
        };
        let domain = DomainName::parse("shop.example.com").unwrap();
        let state = State::new(
            vec![VirtualHost::new(domain.clone(), Tag::parse("a").unwrap())],
            vec![],
        )
        .unwrap();
        let (store, _writer) =
            RouteWriter::new(state, Box::new(LiteralOnly), BuildOptions::default());
        let config: vhost_config::LetsEncryptConfig =
            toml::from_str("email = \"ops@example.com\"\ncache_dir = \"/nonexistent\"\n").unwrap();
        let certs = Arc::new(CertStore::new(None));
        let acme = AcmeManager::new(&config, store, Arc::clone(&certs), Arc::default());
        acme.load_cached();
        let source = Certificates {
            certs,
            acme: Some(Arc::clone(&acme)),
        };
        // Wanted and not limited: scheduled now.
        let view = source.renew(&domain).unwrap();
        assert_eq!(view.source, CertificateOrigin::Acme);
        // Five orders in the last hour: 429 material.
        let (mut map, unservable) = acme.status.load().as_ref().clone();
        let now = now_ms();
        map.get_mut("shop.example.com").unwrap().orders = (0..5).map(|i| now - 1000 * i).collect();
        acme.status.store(Arc::new((map, unservable)));
        match source.renew(&domain) {
            Err(RenewRefusal::Limited {
                orders,
                retry_after_secs,
                ..
            }) => {
                assert_eq!(orders, 5);
                assert!(
                    (3_590..=3_600).contains(&retry_after_secs),
                    "{retry_after_secs}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_from_a_minute_up_to_a_day() {
        assert_eq!(backoff_ms(1), 60_000);
        assert_eq!(backoff_ms(2), 120_000);
        assert_eq!(backoff_ms(5), 16 * 60_000);
        assert_eq!(backoff_ms(30), MAX_BACKOFF_MS);
    }

    #[test]
    fn the_csr_names_the_domain() {
        let (key, der) = key_and_csr("shop.example.com").unwrap();
        assert!(String::from_utf8(key)
            .unwrap()
            .contains("BEGIN PRIVATE KEY"));
        let req = openssl::x509::X509Req::from_der(&der).unwrap();
        assert!(req.verify(&req.public_key().unwrap()).unwrap());
        let text = String::from_utf8(req.to_text().unwrap()).unwrap();
        assert!(text.contains("DNS:shop.example.com"), "{text}");
    }
}
