//! The routing snapshot: host → virtual host → pool of the active tag → backend.
//!
//! This is what every proxied request reads. A [`RoutingTable`] is immutable once built: the
//! exact and wildcard indexes, the per-tag pools with their precomputed weighted schedules and the
//! [`State`] they came from all live in ONE value, published as a whole by
//! [`crate::RouteWriter`]. The only mutable parts are atomics shared across rebuilds: each
//! backend's [`HealthCell`] (written by health checking) and each pool's round-robin cursor, so a
//! rebuild neither resets health nor restarts the rotation of an unchanged pool.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use foldhash::fast::RandomState;

use crate::canary::{domain_seed, Canary, Override, Side};
use crate::model::{Backend, VirtualHost};
use crate::names::{BackendAddress, BackendId, Tag, MAX_DOMAIN_LEN};
use crate::state::State;

/// Turns a backend address into a socket address when the snapshot is built (never on the
/// request path). The model does no I/O: an application that wants DNS names passes a resolver
/// doing the lookup; [`LiteralOnly`] accepts IP literals only.
pub trait Resolve {
    /// The socket address to connect to, or `None` if it cannot be resolved now (the backend is
    /// then skipped by selection until the next rebuild).
    fn resolve(&self, address: &BackendAddress) -> Option<SocketAddr>;
}

/// A [`Resolve`] that understands IP literals only.
#[derive(Debug, Clone, Copy, Default)]
pub struct LiteralOnly;

impl Resolve for LiteralOnly {
    fn resolve(&self, address: &BackendAddress) -> Option<SocketAddr> {
        address.socket_addr()
    }
}

impl<F> Resolve for F
where
    F: Fn(&BackendAddress) -> Option<SocketAddr>,
{
    fn resolve(&self, address: &BackendAddress) -> Option<SocketAddr> {
        self(address)
    }
}

/// A backend's health, shared by every snapshot that contains the backend (same id and address).
/// Active health checking and passive ejection write it; selection reads it with one relaxed
/// atomic load.
#[derive(Debug)]
pub struct HealthCell {
    healthy: AtomicBool,
    connect_failures: AtomicU32,
    breaker: Breaker,
}

/// Circuit-breaker state of a backend (see [`crate::policy::CircuitBreaker`]): atomics only,
/// times in milliseconds of the caller's monotonic clock.
#[derive(Debug, Default)]
struct Breaker {
    consecutive: AtomicU32,
    window_start: AtomicU64,
    window_total: AtomicU32,
    window_failed: AtomicU32,
    /// 0: closed; otherwise ejected until then, and half-open after.
    open_until: AtomicU64,
    /// A half-open trial request is in flight.
    trial: AtomicBool,
    in_flight: AtomicU32,
    ejections: AtomicU64,
}

/// Whether a backend takes a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Yes; `trial`: as the one request that decides whether an ejected backend comes back.
    Yes {
        /// This request is the half-open trial.
        trial: bool,
    },
    /// Ejected by the circuit breaker.
    Ejected,
    /// At its `max_concurrent_requests`.
    Saturated,
}

/// A circuit-breaker state as the API and metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Takes traffic.
    Closed,
    /// Ejected: takes none until the open period ends.
    Open,
    /// The open period ended: the next request is a trial.
    HalfOpen,
}

impl CircuitState {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// What a recorded outcome did to the circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changed.
    None,
    /// The backend was ejected (or a failed trial ejected it again).
    Ejected,
    /// A successful trial brought it back.
    Restored,
}

impl HealthCell {
    /// A cell with the given initial state.
    pub fn new(healthy: bool) -> Self {
        Self {
            healthy: AtomicBool::new(healthy),
            connect_failures: AtomicU32::new(0),
            breaker: Breaker::default(),
        }
    }

    /// The circuit at `now` (ms).
    pub fn circuit(&self, now: u64) -> CircuitState {
        match self.breaker.open_until.load(Ordering::Relaxed) {
            0 => CircuitState::Closed,
            until if now < until => CircuitState::Open,
            _ => CircuitState::HalfOpen,
        }
    }

    /// Whether the backend is ejected now or waiting for its trial (for `max_ejection_percent`).
    pub fn is_ejected(&self) -> bool {
        self.breaker.open_until.load(Ordering::Relaxed) != 0
    }

    /// Times the backend was ejected.
    pub fn ejections(&self) -> u64 {
        self.breaker.ejections.load(Ordering::Relaxed)
    }

    /// Requests in flight to the backend (counted only while a limit or a breaker applies).
    pub fn in_flight(&self) -> u32 {
        self.breaker.in_flight.load(Ordering::Relaxed)
    }

    /// Whether a request may go to this backend at `now`: not ejected (an ended ejection lets
    /// exactly one trial through), and under `max_concurrent` requests in flight.
    pub fn admit(&self, now: u64, max_concurrent: Option<u32>) -> Admission {
        let b = &self.breaker;
        let mut trial = false;
        let until = b.open_until.load(Ordering::Relaxed);
        if until != 0 {
            if now < until
                || b.trial
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
            {
                return Admission::Ejected;
            }
            trial = true;
        }
        if max_concurrent.is_some_and(|max| b.in_flight.load(Ordering::Relaxed) >= max) {
            if trial {
                b.trial.store(false, Ordering::Release);
            }
            return Admission::Saturated;
        }
        Admission::Yes { trial }
    }

    /// The half-open trial this request held ended without an outcome (the client left):
    /// the next request will be the trial.
    pub fn abandon_trial(&self) {
        self.breaker.trial.store(false, Ordering::Release);
    }

    /// A request to this backend starts (see [`HealthCell::leave`]).
    pub fn enter(&self) {
        self.breaker.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request to this backend ended.
    pub fn leave(&self) {
        self.breaker.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Records the outcome of a request at `now` (ms): `failed` for a 5xx answer or a failed
    /// connection. `may_eject` says whether ejecting one more backend of its tag stays within
    /// `max_ejection_percent` (asked only when the breaker trips).
    pub fn record(
        &self,
        now: u64,
        failed: bool,
        trial: bool,
        settings: &crate::policy::CircuitBreaker,
        may_eject: impl FnOnce() -> bool,
    ) -> Transition {
        let b = &self.breaker;
        let open_ms = u64::from(settings.open_secs) * 1000;
        if trial {
            b.trial.store(false, Ordering::Release);
            if failed {
                b.open_until.store(now + open_ms, Ordering::Relaxed);
                b.ejections.fetch_add(1, Ordering::Relaxed);
                return Transition::Ejected;
            }
            self.reset_window(now);
            b.open_until.store(0, Ordering::Relaxed);
            return Transition::Restored;
        }
        if b.open_until.load(Ordering::Relaxed) != 0 {
            return Transition::None;
        }
        let consecutive = if failed {
            b.consecutive.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            if b.consecutive.load(Ordering::Relaxed) != 0 {
                b.consecutive.store(0, Ordering::Relaxed);
            }
            0
        };
        let window_ms = u64::from(settings.window_secs) * 1000;
        if now.saturating_sub(b.window_start.load(Ordering::Relaxed)) >= window_ms {
            self.reset_window(now);
        }
        let total = b.window_total.fetch_add(1, Ordering::Relaxed) + 1;
        let bad = if failed {
            b.window_failed.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            b.window_failed.load(Ordering::Relaxed)
        };
        let by_count = settings.consecutive_5xx > 0 && consecutive >= settings.consecutive_5xx;
        let by_ratio = failed
            && total >= settings.min_requests
            && f64::from(bad) / f64::from(total) > settings.failure_ratio.get();
        if (by_count || by_ratio)
            && may_eject()
            && b.open_until
                .compare_exchange(0, now + open_ms, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            b.ejections.fetch_add(1, Ordering::Relaxed);
            b.consecutive.store(0, Ordering::Relaxed);
            self.reset_window(now);
            return Transition::Ejected;
        }
        Transition::None
    }

    fn reset_window(&self, now: u64) {
        let b = &self.breaker;
        b.window_start.store(now, Ordering::Relaxed);
        b.window_total.store(0, Ordering::Relaxed);
        b.window_failed.store(0, Ordering::Relaxed);
    }

    /// Current state.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Sets the state and returns the previous one. Marking a backend up clears its count of
    /// consecutive connection failures.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        if healthy {
            self.connect_failures.store(0, Ordering::Relaxed);
        }
        self.healthy.swap(healthy, Ordering::Relaxed)
    }

    /// Passive health: the proxy failed to connect. Returns true if this failure is the
    /// `threshold`-th in a row and ejected a healthy backend (0 disables ejection).
    pub fn record_connect_failure(&self, threshold: u32) -> bool {
        if threshold == 0 {
            return false;
        }
        let failures = self.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
        failures >= threshold && self.healthy.swap(false, Ordering::Relaxed)
    }

    /// Passive health: the proxy connected. Cheap when there were no failures (no write).
    pub fn record_connect_success(&self) {
        if self.connect_failures.load(Ordering::Relaxed) != 0 {
            self.connect_failures.store(0, Ordering::Relaxed);
        }
    }
}

/// A backend as the data plane sees it: its record, its resolved address and its health.
#[derive(Debug)]
pub struct BackendEntry {
    backend: Backend,
    socket_addr: Option<SocketAddr>,
    health: Arc<HealthCell>,
    index: u32,
    connection_key: u64,
}

/// What decides whether two backends may share pooled connections: the same record id, address
/// and protocol and TLS settings (a connection verified against one CA must not serve a backend
/// that trusts another).
fn connection_key(b: &Backend) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same record gives the same key in every snapshot.
    let mut h = std::hash::DefaultHasher::new();
    b.id.as_str().hash(&mut h);
    b.address.as_str().hash(&mut h);
    b.protocol.hash(&mut h);
    b.tls_verify.hash(&mut h);
    b.tls_sni.as_ref().map(|n| n.as_str()).hash(&mut h);
    b.tls_ca_path.hash(&mut h);
    h.finish()
}

impl BackendEntry {
    /// A key for connection pooling: equal only for backends whose connections are
    /// interchangeable (see [`connection_key`]).
    pub fn connection_key(&self) -> u64 {
        self.connection_key
    }

    /// Position of this backend in its snapshot (0..[`RoutingTable::backend_count`]), for
    /// per-snapshot side tables such as metric handles.
    pub fn index(&self) -> usize {
        self.index as usize
    }

    /// The configured record.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The backend's id.
    pub fn id(&self) -> &BackendId {
        &self.backend.id
    }

    /// Where to connect, if the address resolved when the snapshot was built.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.socket_addr
    }

    /// The shared health cell.
    pub fn health(&self) -> &Arc<HealthCell> {
        &self.health
    }

    /// Resolved and healthy.
    pub fn is_available(&self) -> bool {
        self.socket_addr.is_some() && self.health.is_healthy()
    }
}

/// Number of pseudo-random schedule slots tried after the cursor's slot was unavailable, before
/// falling back to a linear scan of the members.
const PROBES: usize = 8;

/// The backends of one tag, with a smooth weighted schedule and a shared round-robin cursor.
#[derive(Debug)]
pub struct Pool {
    tag: Tag,
    members: Box<[Arc<BackendEntry>]>,
    schedule: Box<[u32]>,
    /// `ticket % schedule.len()` without a division (Lemire's fastmod).
    slot_of: FastMod,
    cursor: Arc<Cursor>,
}

/// A pool's round-robin cursor, alone on its cache line: every request of every thread
/// increments it, and sharing the line with data that requests only read (or with another
/// pool's cursor) would make those reads miss on the other cores.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Cursor(AtomicUsize);

/// `x % d` for a fixed `d` with two multiplications instead of a division (Lemire, Kaser and
/// Kurz, "Faster remainder by direct computation", 2019). Exact for 32-bit `x`; tickets are
/// truncated to 32 bits, so the rotation restarts once every 2³² requests.
#[derive(Debug, Clone, Copy)]
struct FastMod {
    magic: u64,
    divisor: u32,
}

impl FastMod {
    fn new(divisor: usize) -> Self {
        let divisor = u32::try_from(divisor).unwrap_or(u32::MAX).max(1);
        Self {
            magic: (u64::MAX / u64::from(divisor)).wrapping_add(1),
            divisor,
        }
    }

    fn rem(self, x: usize) -> usize {
        let low = self.magic.wrapping_mul(u64::from(x as u32));
        ((u128::from(low) * u128::from(self.divisor)) >> 64) as usize
    }
}

impl Pool {
    fn new(tag: Tag, members: Vec<Arc<BackendEntry>>, cursor: Arc<Cursor>) -> Self {
        let weights: Vec<u16> = members.iter().map(|m| m.backend.weight).collect();
        let schedule = smooth_schedule(&weights).into_boxed_slice();
        Self {
            tag,
            slot_of: FastMod::new(schedule.len()),
            schedule,
            members: members.into_boxed_slice(),
            cursor,
        }
    }

    /// The tag this pool serves.
    pub fn tag(&self) -> &Tag {
        &self.tag
    }

    /// Members, ordered by backend id.
    pub fn members(&self) -> &[Arc<BackendEntry>] {
        &self.members
    }

    /// True if at least one member is available.
    pub fn any_available(&self) -> bool {
        self.members.iter().any(|m| m.is_available())
    }

    /// The next available backend in weighted round-robin order.
    pub fn select(&self) -> Option<&Arc<BackendEntry>> {
        self.select_where(|_| true)
    }

    /// Like [`Pool::select`], also skipping backends `accept` refuses (e.g. ones that already
    /// failed for this request). Lock-free and allocation-free: one atomic increment, then reads.
    ///
    /// The cursor walks a precomputed smooth weighted schedule, so with every member available each
    /// full turn gives each backend exactly its weight's share, interleaved. A slot whose backend
    /// is unavailable is replaced by pseudo-random slots of the same schedule, which spreads the
    /// missing share over the others in proportion to their weights.
    pub fn select_where(
        &self,
        accept: impl FnMut(&BackendEntry) -> bool,
    ) -> Option<&Arc<BackendEntry>> {
        self.select_where_indexed(accept).map(|(_, b)| b)
    }

    /// Like [`Pool::select_where`], also returning the backend's position in
    /// [`Pool::members`].
    pub fn select_where_indexed(
        &self,
        mut accept: impl FnMut(&BackendEntry) -> bool,
    ) -> Option<(usize, &Arc<BackendEntry>)> {
        let slots = self.schedule.len();
        if slots == 0 {
            return None;
        }
        let ticket = self.cursor.0.fetch_add(1, Ordering::Relaxed);
        let mut ok = |i: usize| {
            let m = &self.members[i];
            (m.is_available() && accept(m)).then_some((i, m))
        };
        if let Some(hit) = ok(self.schedule[self.slot_of.rem(ticket)] as usize) {
            return Some(hit);
        }
        let mut seed = ticket as u64;
        for _ in 0..PROBES {
            seed = splitmix64(seed);
            let slot = (seed % slots as u64) as usize;
            if let Some(hit) = ok(self.schedule[slot] as usize) {
                return Some(hit);
            }
        }
        let len = self.members.len();
        let start = ticket % len;
        (0..len).find_map(|i| ok((start + i) % len))
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A smooth weighted order of member indexes: member `i` appears `weight[i] / g` times (g = the
/// weights' gcd), its appearances spread evenly over the turn (virtual times (2k+1)/(2w), as in
/// weighted fair queueing; ties go to the lower index). O(total·log total), total ≤ 256 · members.
fn smooth_schedule(weights: &[u16]) -> Vec<u32> {
    let g = weights
        .iter()
        .fold(0u64, |acc, &w| gcd(acc, u64::from(w)))
        .max(1);
    // (numerator, denominator, member): virtual time = numerator / denominator.
    let mut slots: Vec<(u64, u64, u32)> = Vec::new();
    for (i, &w) in weights.iter().enumerate() {
        let w = u64::from(w) / g;
        let Ok(idx) = u32::try_from(i) else { break };
        for k in 0..w {
            slots.push((2 * k + 1, 2 * w, idx));
        }
    }
    slots.sort_unstable_by(|a, b| (a.0 * b.1).cmp(&(b.0 * a.1)).then(a.2.cmp(&b.2)));
    slots.into_iter().map(|(_, _, i)| i).collect()
}

/// A domain's route: its virtual host and the pool of its active tag (`None` when no backend
/// carries that tag), plus its canary if it has one.
#[derive(Debug, Clone)]
pub struct Route {
    vhost: Arc<VirtualHost>,
    pool: Option<Arc<Pool>>,
    canary: Option<Arc<CanaryRoute>>,
    index: u32,
}

/// A route's canary as the data plane uses it: weight, sticky key, the per-domain bucket seed
/// and the canary tag's pool.
#[derive(Debug)]
pub struct CanaryRoute {
    canary: Canary,
    seed: u64,
    pool: Option<Arc<Pool>>,
}

impl CanaryRoute {
    /// The configured canary.
    pub fn canary(&self) -> &Canary {
        &self.canary
    }

    /// The seed of [`crate::bucket_of`] for this domain.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The side a request with `bucket` and `forced` goes to, before health is considered.
    pub fn side_for(&self, bucket: u16, forced: Option<Override>) -> Side {
        crate::canary::side_for(self.canary.weight, bucket, forced)
    }
}

impl Route {
    /// Position of this route in its snapshot (0..[`RoutingTable::route_count`]), for
    /// per-snapshot side tables such as metric handles.
    pub fn index(&self) -> usize {
        self.index as usize
    }

    /// The virtual host.
    pub fn vhost(&self) -> &VirtualHost {
        &self.vhost
    }

    /// The active tag's pool.
    pub fn pool(&self) -> Option<&Arc<Pool>> {
        self.pool.as_ref()
    }

    /// The canary, if the domain has one.
    pub fn canary(&self) -> Option<&CanaryRoute> {
        self.canary.as_deref()
    }

    /// The pool of `side` (`None` for the canary side of a route without canary).
    pub fn pool_on(&self, side: Side) -> Option<&Arc<Pool>> {
        match side {
            Side::Primary => self.pool.as_ref(),
            Side::Canary => self.canary.as_ref()?.pool.as_ref(),
        }
    }

    /// The tag of `side` (the primary tag for the canary side of a route without canary).
    pub fn tag_on(&self, side: Side) -> &Tag {
        match (side, &self.canary) {
            (Side::Canary, Some(c)) => &c.canary.tag,
            _ => &self.vhost.enabled_backends_tag,
        }
    }

    /// The next available backend that `accept` takes, on `wanted`'s side or, when that side has
    /// none, on the other side (a route without canary has only the primary side). Returns the
    /// side that serves and the backend's position in that side's pool.
    pub fn select_on(
        &self,
        wanted: Side,
        mut accept: impl FnMut(&BackendEntry) -> bool,
    ) -> Option<(Side, usize, &Arc<BackendEntry>)> {
        let first = if self.canary.is_some() {
            wanted
        } else {
            Side::Primary
        };
        if let Some((i, b)) = self
            .pool_on(first)
            .and_then(|p| p.select_where_indexed(&mut accept))
        {
            return Some((first, i, b));
        }
        self.canary.as_ref()?;
        let other = first.other();
        let (i, b) = self.pool_on(other)?.select_where_indexed(accept)?;
        Some((other, i, b))
    }

    /// The next available backend of the active tag.
    pub fn select(&self) -> Option<&Arc<BackendEntry>> {
        self.pool.as_ref()?.select()
    }

    /// Like [`Route::select`], also skipping backends `accept` refuses.
    pub fn select_where(
        &self,
        accept: impl FnMut(&BackendEntry) -> bool,
    ) -> Option<&Arc<BackendEntry>> {
        self.pool.as_ref()?.select_where(accept)
    }

    /// Like [`Route::select_where`], also returning the backend's position in the pool.
    pub fn select_where_indexed(
        &self,
        accept: impl FnMut(&BackendEntry) -> bool,
    ) -> Option<(usize, &Arc<BackendEntry>)> {
        self.pool.as_ref()?.select_where_indexed(accept)
    }
}

/// Longest name stored inline in an index bucket.
const INLINE_NAME: usize = 38;

/// An index key: names up to [`INLINE_NAME`] bytes (nearly all) live inside the hash bucket next
/// to their route, so a lookup touches the bucket and not a separately allocated string; longer
/// names are boxed. Hashes and compares exactly like the `[u8]` it holds, so the index is
/// queried with plain byte slices.
#[derive(Debug, Clone)]
enum NameKey {
    Inline { len: u8, bytes: [u8; INLINE_NAME] },
    Heap(Box<[u8]>),
}

impl NameKey {
    fn new(name: &[u8]) -> Self {
        match u8::try_from(name.len()) {
            Ok(len) if name.len() <= INLINE_NAME => {
                let mut bytes = [0u8; INLINE_NAME];
                bytes[..name.len()].copy_from_slice(name);
                Self::Inline { len, bytes }
            }
            _ => Self::Heap(name.into()),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Heap(b) => b,
        }
    }
}

impl PartialEq for NameKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for NameKey {}

impl std::hash::Hash for NameKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl std::borrow::Borrow<[u8]> for NameKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// Options for building snapshots.
#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    /// Health of a backend that appears for the first time (or whose address changed).
    pub new_backends_healthy: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            new_backends_healthy: true,
        }
    }
}

/// An immutable routing snapshot (see the module docs).
///
/// Aligned to a cache line so that, inside its `Arc`, the reference count (written by every
/// request that takes the snapshot, on every thread) does not share a line with the index the
/// lookups read.
#[derive(Debug)]
#[repr(align(64))]
pub struct RoutingTable {
    generation: u64,
    state: Arc<State>,
    exact: HashMap<NameKey, Route, RandomState>,
    wildcard: HashMap<NameKey, Route, RandomState>,
    /// Every route again, at its [`Route::index`]: a request keeps the table and an index
    /// instead of cloning its route (whose `Arc` counts every thread's requests would write).
    by_index: Vec<Route>,
    /// No backend speaks HTTP/2 to us (`h2`/`h2c`): every request of an HTTP/1 client can go
    /// out over HTTP/1 (see [`RoutingTable::http1_only`]).
    http1_only: bool,
    pools: BTreeMap<Tag, Arc<Pool>>,
    backends: BTreeMap<BackendId, Arc<BackendEntry>>,
    attachments: Attachments,
}

/// What other layers attached to a snapshot before it was published (see [`Attach`]).
#[derive(Default)]
pub(crate) struct Attachments(Vec<Arc<dyn Any + Send + Sync>>);

impl std::fmt::Debug for Attachments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} attachment(s)", self.0.len())
    }
}

/// Derives per-snapshot data from a table before the [`RouteWriter`](crate::RouteWriter)
/// publishes it — off the request path, by the single writer, so that a request finds the data
/// of exactly the snapshot it loaded with [`RoutingTable::attachment`] (e.g. the Pingora
/// adapter's metric handles, indexed by route and backend).
pub trait Attach: Send + Sync {
    /// The data for `table` (called once per snapshot, in publication order).
    fn attach(&self, table: &RoutingTable) -> Arc<dyn Any + Send + Sync>;
}

impl RoutingTable {
    /// The empty table (generation 0): every lookup misses.
    pub fn empty() -> Self {
        Self {
            generation: 0,
            state: Arc::new(State::default()),
            exact: HashMap::default(),
            wildcard: HashMap::default(),
            by_index: Vec::new(),
            http1_only: true,
            pools: BTreeMap::new(),
            backends: BTreeMap::new(),
            attachments: Attachments::default(),
        }
    }

    /// Builds the snapshot of `state`, carrying over from `previous` the health cells of backends
    /// whose id and address are unchanged and the round-robin cursors of tags still in use.
    pub fn build(
        state: Arc<State>,
        previous: &RoutingTable,
        resolver: &dyn Resolve,
        options: BuildOptions,
    ) -> Self {
        let backends: BTreeMap<BackendId, Arc<BackendEntry>> = state
            .backends()
            .zip(0u32..)
            .map(|(b, index)| {
                let health = previous
                    .backends
                    .get(&b.id)
                    .filter(|old| old.backend.address == b.address)
                    .map(|old| Arc::clone(&old.health))
                    .unwrap_or_else(|| Arc::new(HealthCell::new(options.new_backends_healthy)));
                let entry = BackendEntry {
                    backend: b.clone(),
                    socket_addr: resolver.resolve(&b.address),
                    health,
                    index,
                    connection_key: connection_key(b),
                };
                (b.id.clone(), Arc::new(entry))
            })
            .collect();

        let mut pools: BTreeMap<Tag, Arc<Pool>> = BTreeMap::new();
        let tags = state.vhosts().flat_map(|v| {
            std::iter::once(&v.enabled_backends_tag).chain(v.canary.as_ref().map(|c| &c.tag))
        });
        for tag in tags {
            if pools.contains_key(tag) {
                continue;
            }
            let members: Vec<Arc<BackendEntry>> = backends
                .values()
                .filter(|e| e.backend.has_tag(tag))
                .cloned()
                .collect();
            if members.is_empty() {
                continue;
            }
            let cursor = previous
                .pools
                .get(tag)
                .map(|p| Arc::clone(&p.cursor))
                .unwrap_or_default();
            pools.insert(
                tag.clone(),
                Arc::new(Pool::new(tag.clone(), members, cursor)),
            );
        }

        let mut exact =
            HashMap::with_capacity_and_hasher(state.vhosts().len(), RandomState::default());
        let mut wildcard = HashMap::default();
        let mut by_index = Vec::with_capacity(state.vhosts().len());
        for (vhost, index) in state.vhosts().zip(0u32..) {
            let canary = vhost.canary.as_ref().map(|c| {
                Arc::new(CanaryRoute {
                    canary: Canary::clone(c),
                    seed: domain_seed(vhost.domain.as_str()),
                    pool: pools.get(&c.tag).cloned(),
                })
            });
            let route = Route {
                pool: pools.get(&vhost.enabled_backends_tag).cloned(),
                canary,
                vhost: Arc::new(vhost.clone()),
                index,
            };
            by_index.push(route.clone());
            match vhost.domain.wildcard_suffix() {
                Some(suffix) => wildcard.insert(NameKey::new(suffix.as_bytes()), route),
                None => exact.insert(NameKey::new(vhost.domain.as_str().as_bytes()), route),
            };
        }

        let http1_only = backends.values().all(|b| !b.backend.protocol.h2());
        Self {
            generation: previous.generation.wrapping_add(1),
            state,
            exact,
            wildcard,
            by_index,
            http1_only,
            pools,
            backends,
            attachments: Attachments::default(),
        }
    }

    /// Runs `attachers` on this table and keeps what they return (before it is published).
    pub(crate) fn attach_all(&mut self, attachers: &[Arc<dyn Attach>]) {
        self.attachments = Attachments(attachers.iter().map(|a| a.attach(self)).collect());
    }

    /// The data of type `T` an [`Attach`] attached to this snapshot, if any.
    pub fn attachment<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.attachments
            .0
            .iter()
            .find_map(|a| a.downcast_ref::<T>())
    }

    /// Every route, in no particular order (each knows its [`Route::index`]).
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.exact.values().chain(self.wildcard.values())
    }

    /// The route whose [`Route::index`] is `index`. Borrowing it from the table (kept alive by
    /// one `Arc`) instead of cloning it spares a request the route's shared reference counts.
    pub fn route(&self, index: usize) -> Option<&Route> {
        self.by_index.get(index)
    }

    /// Whether every backend is reached over HTTP/1 (`http` or `https`; none is `h2`/`h2c`).
    pub fn http1_only(&self) -> bool {
        self.http1_only
    }

    /// Number of routes (virtual hosts); [`Route::index`] is below it.
    pub fn route_count(&self) -> usize {
        self.state.vhosts().len()
    }

    /// Number of backends; [`BackendEntry::index`] is below it.
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Increases by one with every published snapshot (usable as an ETag).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The configuration this snapshot was built from.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// A backend's entry (record, address, health).
    pub fn backend(&self, id: &BackendId) -> Option<&Arc<BackendEntry>> {
        self.backends.get(id)
    }

    /// All backend entries, ordered by id.
    pub fn backends(&self) -> impl ExactSizeIterator<Item = &Arc<BackendEntry>> {
        self.backends.values()
    }

    /// The pool of a tag, if some domain uses the tag and some backend carries it.
    pub fn pool(&self, tag: &Tag) -> Option<&Arc<Pool>> {
        self.pools.get(tag)
    }

    /// The route for a request's host (`Host` header or `:authority`, or the TLS SNI).
    ///
    /// The host is matched case-insensitively, without a `:port` suffix and without a trailing
    /// dot; an exact domain wins over a wildcard, and a wildcard covers exactly one label.
    /// Allocation-free.
    pub fn lookup(&self, host: &[u8]) -> Option<&Route> {
        let mut buf = [0u8; MAX_DOMAIN_LEN];
        let name = normalize_host_bytes(host, &mut buf)?;
        if let Some(route) = self.exact.get(name) {
            return Some(route);
        }
        if self.wildcard.is_empty() {
            return None;
        }
        let dot = name.iter().position(|&b| b == b'.')?;
        if dot == 0 {
            return None;
        }
        self.wildcard.get(&name[dot + 1..])
    }
}

/// Lowercases `host` into `buf`, dropping a `:port` suffix and one trailing dot. `None` for IP
/// literals in brackets, empty or over-long names and bytes that cannot be in a domain name.
pub fn normalize_host<'b>(host: &[u8], buf: &'b mut [u8; MAX_DOMAIN_LEN]) -> Option<&'b str> {
    normalize_host_bytes(host, buf).and_then(|n| std::str::from_utf8(n).ok())
}

/// [`normalize_host`] without the UTF-8 view: every byte is ASCII by construction.
fn normalize_host_bytes<'b>(host: &[u8], buf: &'b mut [u8; MAX_DOMAIN_LEN]) -> Option<&'b [u8]> {
    if host.first() == Some(&b'[') {
        return None;
    }
    let host = match host.iter().rposition(|&b| b == b':') {
        Some(colon) if host[colon + 1..].iter().all(u8::is_ascii_digit) => &host[..colon],
        Some(_) => return None,
        None => host,
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.is_empty() || host.len() > MAX_DOMAIN_LEN {
        return None;
    }
    let out = &mut buf[..host.len()];
    let mut invalid = false;
    for (o, &b) in out.iter_mut().zip(host) {
        let l = HOST_BYTE[usize::from(b)];
        invalid |= l == 0;
        *o = l;
    }
    (!invalid).then_some(&*out)
}

/// Byte → lowercase byte for characters allowed in a host name (`a-z 0-9 - .`), 0 otherwise.
static HOST_BYTE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0usize;
    while b < 256 {
        let c = b as u8;
        table[b] = match c {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' => c,
            b'A'..=b'Z' => c + 32,
            _ => 0,
        };
        b += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::DomainName;

    fn t(s: &str) -> Tag {
        Tag::parse(s).unwrap()
    }

    fn backend(id: &str, port: u16, tags: &[&str], weight: u16) -> Backend {
        Backend {
            weight,
            ..Backend::new(
                BackendId::parse(id).unwrap(),
                BackendAddress::parse(&format!("127.0.0.1:{port}")).unwrap(),
                tags.iter().map(|x| t(x)).collect(),
            )
        }
    }

    fn vhost(domain: &str, tag: &str) -> VirtualHost {
        VirtualHost::new(DomainName::parse(domain).unwrap(), t(tag))
    }

    fn table(vhosts: Vec<VirtualHost>, backends: Vec<Backend>) -> RoutingTable {
        let state = State::new(vhosts, backends).unwrap();
        RoutingTable::build(
            Arc::new(state),
            &RoutingTable::empty(),
            &LiteralOnly,
            BuildOptions::default(),
        )
    }

    #[test]
    fn canary_sides_and_fallback() {
        let mut v = vhost("a.com", "a");
        v.canary = Some(Box::new(Canary::new(
            t("b"),
            crate::CanaryWeight::from_percent(25.0).unwrap(),
            crate::StickyKey::Cookie,
        )));
        let tbl = table(
            vec![v, vhost("plain.com", "a")],
            vec![backend("a1", 1, &["a"], 1), backend("b1", 2, &["b"], 1)],
        );
        let route = tbl.lookup(b"a.com").unwrap();
        let c = route.canary().unwrap();
        assert_eq!(c.side_for(2499, None), Side::Canary);
        assert_eq!(c.side_for(2500, None), Side::Primary);
        assert_eq!(c.side_for(0, Some(Override::Never)), Side::Primary);
        assert_eq!(route.tag_on(Side::Canary).as_str(), "b");
        let (side, _, b) = route.select_on(Side::Canary, |_| true).unwrap();
        assert_eq!((side, b.id().as_str()), (Side::Canary, "b1"));
        // The canary side has nothing available: the primary serves, and vice versa.
        let (side, _, b) = route
            .select_on(Side::Canary, |b| b.id().as_str() != "b1")
            .unwrap();
        assert_eq!((side, b.id().as_str()), (Side::Primary, "a1"));
        let (side, _, b) = route
            .select_on(Side::Primary, |b| b.id().as_str() != "a1")
            .unwrap();
        assert_eq!((side, b.id().as_str()), (Side::Canary, "b1"));
        assert!(route.select_on(Side::Primary, |_| false).is_none());
        // Without a canary only the primary side exists.
        let plain = tbl.lookup(b"plain.com").unwrap();
        assert!(plain.canary().is_none());
        let (side, _, b) = plain.select_on(Side::Canary, |_| true).unwrap();
        assert_eq!((side, b.id().as_str()), (Side::Primary, "a1"));
        assert!(plain
            .select_on(Side::Primary, |b| b.id().as_str() != "a1")
            .is_none());
    }

    fn picks(route: &Route, n: usize) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            if let Some(b) = route.select() {
                *counts.entry(b.id().to_string()).or_insert(0) += 1;
            }
        }
        counts
    }

    #[test]
    fn lookup_normalises_case_port_and_trailing_dot() {
        let tb = table(
            vec![vhost("example.com", "a")],
            vec![backend("x", 1, &["a"], 1)],
        );
        for host in [
            "example.com",
            "EXAMPLE.com",
            "example.com:8443",
            "example.com.",
            "Example.Com.:80",
        ] {
            let route = tb.lookup(host.as_bytes());
            assert_eq!(
                route.map(|r| r.vhost().domain.as_str()),
                Some("example.com"),
                "{host}"
            );
        }
        for miss in [
            "",
            ":80",
            "other.com",
            "www.example.com",
            "example.com:http",
            "[::1]:80",
            "exa mple.com",
            "example.com..",
        ] {
            assert!(
                tb.lookup(miss.as_bytes()).is_none(),
                "{miss:?} must not match"
            );
        }
        let long = format!("{}.com", "a".repeat(300));
        assert!(tb.lookup(long.as_bytes()).is_none());
    }

    #[test]
    fn exact_beats_wildcard_and_wildcard_covers_one_label() {
        let tb = table(
            vec![vhost("*.example.com", "w"), vhost("api.example.com", "e")],
            vec![backend("w1", 1, &["w"], 1), backend("e1", 2, &["e"], 1)],
        );
        let tag_of = |h: &str| {
            tb.lookup(h.as_bytes())
                .map(|r| r.vhost().enabled_backends_tag.to_string())
        };
        assert_eq!(tag_of("api.example.com").as_deref(), Some("e"));
        assert_eq!(tag_of("API.example.com:443").as_deref(), Some("e"));
        assert_eq!(tag_of("www.example.com").as_deref(), Some("w"));
        assert_eq!(tag_of("example.com"), None);
        assert_eq!(tag_of("a.b.example.com"), None);
        assert_eq!(tag_of(".example.com"), None);
    }

    #[test]
    fn weights_are_honoured_exactly_over_full_turns() {
        let tb = table(
            vec![vhost("a.com", "a")],
            vec![
                backend("heavy", 1, &["a"], 5),
                backend("light-1", 2, &["a"], 1),
                backend("light-2", 3, &["a"], 1),
            ],
        );
        let route = tb.lookup(b"a.com").unwrap();
        let counts = picks(route, 7 * 1000);
        assert_eq!(counts["heavy"], 5000);
        assert_eq!(counts["light-1"], 1000);
        assert_eq!(counts["light-2"], 1000);
    }

    #[test]
    fn long_and_short_names_are_both_found() {
        let long = format!("{}.example.com", "a".repeat(60));
        let tb = table(
            vec![
                vhost(&long, "a"),
                vhost("s.io", "a"),
                vhost(&format!("*.{long}"), "a"),
            ],
            vec![backend("x", 1, &["a"], 1)],
        );
        assert!(tb.lookup(long.as_bytes()).is_some());
        assert!(tb.lookup(b"S.io:80").is_some());
        assert!(tb.lookup(format!("w.{long}").as_bytes()).is_some());
        assert!(tb.lookup(b"t.io").is_none());
        assert_eq!(NameKey::new(b"abc"), NameKey::new(b"abc"));
        assert_ne!(NameKey::new(b"abc"), NameKey::new(b"abd"));
    }

    #[test]
    fn fast_modulo_is_exact() {
        for d in [1usize, 2, 3, 7, 10, 255, 1000, 65_536, 256_000] {
            let m = FastMod::new(d);
            for x in (0..5000usize).chain([u32::MAX as usize - 3, u32::MAX as usize]) {
                assert_eq!(m.rem(x), x % d, "{x} % {d}");
            }
        }
    }

    #[test]
    fn schedule_is_smooth() {
        // Weight 5 vs 1 vs 1: the heavy backend never waits more than two picks.
        let s = smooth_schedule(&[5, 1, 1]);
        assert_eq!(s.len(), 7);
        let mut gap = 0;
        for i in s.iter().chain(s.iter()) {
            if *i == 0 {
                gap = 0;
            } else {
                gap += 1;
                assert!(gap <= 2, "schedule {s:?} is not smooth");
            }
        }
        // The gcd is divided out.
        assert_eq!(smooth_schedule(&[4, 2]).len(), 3);
        assert_eq!(smooth_schedule(&[]).len(), 0);
    }

    #[test]
    fn unhealthy_backends_are_skipped_and_the_rest_keep_their_ratio() {
        let tb = table(
            vec![vhost("a.com", "a")],
            vec![
                backend("b1", 1, &["a"], 3),
                backend("b2", 2, &["a"], 1),
                backend("down", 3, &["a"], 4),
            ],
        );
        tb.backend(&BackendId::parse("down").unwrap())
            .unwrap()
            .health()
            .set_healthy(false);
        let route = tb.lookup(b"a.com").unwrap();
        let counts = picks(route, 40_000);
        assert!(!counts.contains_key("down"));
        assert_eq!(counts.values().sum::<usize>(), 40_000);
        let ratio = counts["b1"] as f64 / counts["b2"] as f64;
        assert!(
            (2.7..3.3).contains(&ratio),
            "b1:b2 should stay near 3:1, got {counts:?}"
        );
    }

    #[test]
    fn all_unhealthy_or_no_backends_selects_none() {
        let tb = table(
            vec![vhost("a.com", "a"), vhost("empty.com", "nobody")],
            vec![backend("b1", 1, &["a"], 1), backend("b2", 2, &["a"], 1)],
        );
        for b in tb.backends() {
            b.health().set_healthy(false);
        }
        assert!(tb.lookup(b"a.com").unwrap().select().is_none());
        assert!(!tb.lookup(b"a.com").unwrap().pool().unwrap().any_available());
        let empty = tb.lookup(b"empty.com").unwrap();
        assert!(empty.pool().is_none());
        assert!(empty.select().is_none());
    }

    #[test]
    fn routes_and_backends_have_dense_indexes() {
        let tb = table(
            vec![
                vhost("a.com", "a"),
                vhost("*.b.com", "a"),
                vhost("c.com", "a"),
            ],
            vec![backend("x", 1, &["a"], 1), backend("y", 2, &["a"], 1)],
        );
        let mut routes: Vec<usize> = ["a.com", "x.b.com", "c.com"]
            .iter()
            .map(|h| tb.lookup(h.as_bytes()).unwrap().index())
            .collect();
        routes.sort_unstable();
        assert_eq!(routes, vec![0, 1, 2]);
        assert_eq!(tb.route_count(), 3);
        for host in ["a.com", "x.b.com", "c.com"] {
            let found = tb.lookup(host.as_bytes()).unwrap();
            let by_index = tb.route(found.index()).unwrap();
            assert_eq!(by_index.vhost().domain, found.vhost().domain);
            assert_eq!(by_index.index(), found.index());
        }
        assert!(tb.route(3).is_none());
        let backends: Vec<usize> = tb.backends().map(|b| b.index()).collect();
        assert_eq!(backends, vec![0, 1]);
        assert_eq!(tb.backend_count(), 2);
    }

    #[test]
    fn unresolved_backends_are_skipped() {
        let state = State::new(
            vec![vhost("a.com", "a")],
            vec![Backend::new(
                BackendId::parse("named").unwrap(),
                BackendAddress::parse("backend.internal:80").unwrap(),
                vec![t("a")],
            )],
        )
        .unwrap();
        let tb = RoutingTable::build(
            Arc::new(state.clone()),
            &RoutingTable::empty(),
            &LiteralOnly,
            BuildOptions::default(),
        );
        assert!(tb.lookup(b"a.com").unwrap().select().is_none());
        let resolver = |_: &BackendAddress| Some(SocketAddr::from(([10, 0, 0, 1], 80)));
        let tb = RoutingTable::build(Arc::new(state), &tb, &resolver, BuildOptions::default());
        let picked = tb.lookup(b"a.com").unwrap().select().unwrap();
        assert_eq!(
            picked.socket_addr(),
            Some(SocketAddr::from(([10, 0, 0, 1], 80)))
        );
    }

    #[test]
    fn select_where_skips_refused_backends() {
        let tb = table(
            vec![vhost("a.com", "a")],
            vec![backend("b1", 1, &["a"], 1), backend("b2", 2, &["a"], 1)],
        );
        let route = tb.lookup(b"a.com").unwrap();
        for _ in 0..10 {
            let b = route.select_where(|e| e.id().as_str() != "b1").unwrap();
            assert_eq!(b.id().as_str(), "b2");
        }
        assert!(route.select_where(|_| false).is_none());
    }

    #[test]
    fn rebuild_keeps_health_and_rotation_of_unchanged_backends() {
        let vhosts = vec![vhost("a.com", "a")];
        let backends = vec![
            backend("b1", 1, &["a"], 1),
            backend("b2", 2, &["a"], 1),
            backend("b3", 3, &["a"], 1),
        ];
        let first = table(vhosts.clone(), backends.clone());
        let b2 = BackendId::parse("b2").unwrap();
        let b3 = BackendId::parse("b3").unwrap();
        first.backend(&b2).unwrap().health().set_healthy(false);
        first.backend(&b3).unwrap().health().set_healthy(false);
        // One pick advances the rotation.
        let before = first
            .lookup(b"a.com")
            .unwrap()
            .select()
            .unwrap()
            .id()
            .clone();
        assert_eq!(before.as_str(), "b1");

        // b3 moves to another address: its history restarts (healthy by default); b2 keeps its
        // "down" state; the domain gets a new sibling.
        let mut changed = backends.clone();
        changed[2] = backend("b3", 33, &["a"], 1);
        let state = State::new(vec![vhosts[0].clone(), vhost("b.com", "a")], changed).unwrap();
        let second = RoutingTable::build(
            Arc::new(state),
            &first,
            &LiteralOnly,
            BuildOptions::default(),
        );
        assert_eq!(second.generation(), first.generation() + 1);
        assert!(!second.backend(&b2).unwrap().health().is_healthy());
        assert!(Arc::ptr_eq(
            first.backend(&b2).unwrap().health(),
            second.backend(&b2).unwrap().health()
        ));
        assert!(second.backend(&b3).unwrap().health().is_healthy());
        // The rotation continues where it was: the slot after b1 is b2 (healthy again now),
        // where a reset cursor would pick b1 again.
        first.backend(&b2).unwrap().health().set_healthy(true);
        let next = second.lookup(b"b.com").unwrap().select().unwrap();
        assert_eq!(next.id().as_str(), "b2");
    }

    #[test]
    fn passive_ejection_after_consecutive_connect_failures() {
        let cell = HealthCell::new(true);
        assert!(!cell.record_connect_failure(3));
        assert!(!cell.record_connect_failure(3));
        cell.record_connect_success();
        assert!(!cell.record_connect_failure(3));
        assert!(!cell.record_connect_failure(3));
        assert!(cell.is_healthy());
        assert!(
            cell.record_connect_failure(3),
            "third failure in a row ejects"
        );
        assert!(!cell.is_healthy());
        assert!(
            !cell.record_connect_failure(3),
            "already down: not a new ejection"
        );
        cell.set_healthy(true);
        assert!(
            !cell.record_connect_failure(3),
            "counter restarts after recovery"
        );
        let off = HealthCell::new(true);
        for _ in 0..10 {
            assert!(!off.record_connect_failure(0));
        }
        assert!(off.is_healthy());
    }

    #[test]
    fn new_backends_can_start_down() {
        let state =
            State::new(vec![vhost("a.com", "a")], vec![backend("b1", 1, &["a"], 1)]).unwrap();
        let tb = RoutingTable::build(
            Arc::new(state),
            &RoutingTable::empty(),
            &LiteralOnly,
            BuildOptions {
                new_backends_healthy: false,
            },
        );
        assert!(tb.lookup(b"a.com").unwrap().select().is_none());
    }
}

#[cfg(test)]
mod breaker_tests {
    use super::*;
    use crate::policy::CircuitBreaker;

    #[test]
    fn consecutive_failures_eject_then_one_trial_decides() {
        let cell = HealthCell::new(true);
        let cb = CircuitBreaker {
            consecutive_5xx: 3,
            open_secs: 2,
            ..CircuitBreaker::default()
        };
        assert_eq!(cell.record(0, true, false, &cb, || true), Transition::None);
        assert_eq!(cell.record(1, false, false, &cb, || true), Transition::None);
        assert_eq!(cell.record(2, true, false, &cb, || true), Transition::None);
        assert_eq!(cell.record(3, true, false, &cb, || true), Transition::None);
        assert_eq!(
            cell.record(4, true, false, &cb, || true),
            Transition::Ejected
        );
        assert_eq!(cell.circuit(5), CircuitState::Open);
        assert_eq!(cell.admit(5, None), Admission::Ejected);
        // After open_secs: exactly one trial.
        assert_eq!(cell.circuit(2004), CircuitState::HalfOpen);
        assert_eq!(cell.admit(2004, None), Admission::Yes { trial: true });
        assert_eq!(cell.admit(2004, None), Admission::Ejected);
        // A failed trial ejects again; a good one restores.
        assert_eq!(
            cell.record(2005, true, true, &cb, || true),
            Transition::Ejected
        );
        assert_eq!(cell.admit(3000, None), Admission::Ejected);
        assert_eq!(cell.admit(4005, None), Admission::Yes { trial: true });
        assert_eq!(
            cell.record(4006, false, true, &cb, || true),
            Transition::Restored
        );
        assert_eq!(cell.circuit(4007), CircuitState::Closed);
        assert_eq!(cell.ejections(), 2);
    }

    #[test]
    fn the_failure_ratio_needs_enough_requests_and_ejection_can_be_refused() {
        let cell = HealthCell::new(true);
        let cb = CircuitBreaker {
            consecutive_5xx: 0,
            min_requests: 10,
            ..CircuitBreaker::default()
        };
        for i in 0..9 {
            assert_eq!(
                cell.record(i, i % 2 == 0, false, &cb, || true),
                Transition::None
            );
        }
        // 10th request, 6 failed of 10 > 0.5 — but the tag's ejection budget is spent.
        assert_eq!(cell.record(9, true, false, &cb, || false), Transition::None);
        assert_eq!(
            cell.record(10, true, false, &cb, || true),
            Transition::Ejected
        );
        // A new window forgets.
        let fresh = HealthCell::new(true);
        for i in 0..5 {
            fresh.record(i, true, false, &cb, || true);
        }
        assert_eq!(
            fresh.record(20_000, true, false, &cb, || true),
            Transition::None
        );
    }

    #[test]
    fn concurrency_is_capped() {
        let cell = HealthCell::new(true);
        cell.enter();
        assert_eq!(cell.admit(0, Some(1)), Admission::Saturated);
        assert_eq!(cell.admit(0, Some(2)), Admission::Yes { trial: false });
        cell.leave();
        assert_eq!(cell.admit(0, Some(1)), Admission::Yes { trial: false });
    }
}
