//! # vhost-routing
//!
//! The embeddable routing model of pingora-vhost: virtual hosts, tagged backends, A/B tag
//! selection, and a lock-free routing snapshot for the request path.
//!
//! Data flow: user text → validated names ([`names`]) and records ([`model`]) → a valid
//! [`State`], changed only through [`State::apply`] → an immutable [`RoutingTable`] built by the
//! single [`RouteWriter`] and published in a [`RouteStore`] → per request:
//! [`RouteStore::load`] → [`RoutingTable::lookup`] (host) → [`Route::select`] (weighted round robin
//! over the active tag's healthy backends).
//!
//! This crate does no I/O and knows nothing of tokio, Pingora or HTTP servers; DNS resolution is
//! injected through [`Resolve`].
//!
//! ```
//! use vhost_routing::*;
//!
//! let state = State::new(
//!     vec![VirtualHost::new(DomainName::parse("example.com")?, Tag::parse("a")?)],
//!     vec![Backend::new(BackendId::parse("web-v1")?, BackendAddress::parse("127.0.0.1:3001")?, vec![Tag::parse("a")?])],
//! )?;
//! let (store, _writer) = RouteWriter::new(state, Box::new(LiteralOnly), BuildOptions::default());
//! let table = store.load();
//! let backend = table.lookup(b"Example.com:443").and_then(|route| route.select());
//! assert_eq!(backend.map(|b| b.id().as_str()), Some("web-v1"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod canary;
pub mod error;
pub mod model;
pub mod names;
pub mod policy;
pub mod rollout;
pub mod state;
pub mod store;
pub mod table;

pub use canary::{
    bucket_of, domain_seed, parse_bucket, side_for, Canary, CanaryError, CanaryWeight, Override,
    Side, StickyKey, BUCKETS,
};
pub use error::{CommandError, ProbeFieldError, ValidationError};
pub use model::{
    check_probe_fields, Backend, BackendProtocol, BackendUpdate, ProbeKind, ProbeOverride,
    VirtualHost, VirtualHostUpdate, MAX_WEIGHT,
};
/// Deserialises a `u64` written as an integer or a whole float (`2.0`), as JSON Schema counts
/// integers; for API types outside this crate.
pub fn whole_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    model::whole::u64(d)
}
pub use names::{
    AddressError, BackendAddress, BackendId, BackendIdError, DomainName, DomainNameError, Host,
    Tag, TagError, MAX_DOMAIN_LEN,
};
pub use policy::{
    any_contains, monotonic_ms, Cidr, CircuitBreaker, CircuitBreakerOverride, HeaderRules,
    PolicyError, RateLimit, RateLimitKey, Ratio,
};
pub use rollout::{
    decide, judge, p99_ms, Action, Analysis, Progress, RolloutError, RolloutState, Threshold,
    Verdict, Window,
};
pub use state::{Change, Command, State};
pub use store::{RouteStore, RouteWriter};
pub use table::{
    normalize_host, Admission, Attach, BackendEntry, BuildOptions, CanaryRoute, CircuitState,
    HealthCell, LiteralOnly, Pool, Resolve, Route, RoutingTable, Transition,
};
