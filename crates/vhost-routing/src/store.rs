//! Publishing snapshots: many lock-free readers, one writer.
//!
//! The request path calls [`RouteStore::load`] once per request and uses that one snapshot for
//! the whole request. Changes go through the unique [`RouteWriter`], which builds the next
//! [`RoutingTable`] off the request path (from the previous one, to carry health and rotation
//! over) and publishes it with a single atomic swap.

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use crate::state::State;
use crate::table::{Attach, BuildOptions, Resolve, RoutingTable};

/// The current routing snapshot, readable from any thread without locking.
#[derive(Debug)]
pub struct RouteStore {
    current: ArcSwap<RoutingTable>,
}

impl RouteStore {
    /// A cheap, lock-free handle on the current snapshot (hold it for one request).
    pub fn load(&self) -> Guard<Arc<RoutingTable>> {
        self.current.load()
    }

    /// An owned reference to the current snapshot (for long-lived readers).
    pub fn load_full(&self) -> Arc<RoutingTable> {
        self.current.load_full()
    }
}

/// The single writer of a [`RouteStore`]. Not `Clone`: whoever owns it serialises changes (the
/// admin API wraps it in an async mutex).
pub struct RouteWriter {
    store: Arc<RouteStore>,
    resolver: Box<dyn Resolve + Send + Sync>,
    options: BuildOptions,
    attachers: Vec<Arc<dyn Attach>>,
}

impl std::fmt::Debug for RouteWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteWriter")
            .field("generation", &self.store.load().generation())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl RouteWriter {
    /// Builds the first snapshot of `state` and returns the store and its writer.
    pub fn new(
        state: State,
        resolver: Box<dyn Resolve + Send + Sync>,
        options: BuildOptions,
    ) -> (Arc<RouteStore>, Self) {
        let first = RoutingTable::build(
            Arc::new(state),
            &RoutingTable::empty(),
            resolver.as_ref(),
            options,
        );
        let store = Arc::new(RouteStore {
            current: ArcSwap::from_pointee(first),
        });
        let writer = Self {
            store: Arc::clone(&store),
            resolver,
            options,
            attachers: Vec::new(),
        };
        (store, writer)
    }

    /// The store this writer publishes to.
    pub fn store(&self) -> &Arc<RouteStore> {
        &self.store
    }

    /// The snapshot currently published.
    pub fn current(&self) -> Arc<RoutingTable> {
        self.store.load_full()
    }

    /// Builds the snapshot of `state` (with every [`Attach`]ment) and makes it the current one;
    /// returns it.
    pub fn publish(&mut self, state: State) -> Arc<RoutingTable> {
        let previous = self.store.load_full();
        let mut next = RoutingTable::build(
            Arc::new(state),
            &previous,
            self.resolver.as_ref(),
            self.options,
        );
        next.attach_all(&self.attachers);
        let next = Arc::new(next);
        self.store.current.store(Arc::clone(&next));
        next
    }

    /// Adds `attacher` to every snapshot from now on, and republishes the current state so the
    /// current snapshot has its attachment too. Returns that snapshot.
    pub fn attach(&mut self, attacher: Arc<dyn Attach>) -> Arc<RoutingTable> {
        self.attachers.push(attacher);
        self.refresh()
    }

    /// Rebuilds the current state's snapshot (e.g. to re-resolve DNS names).
    pub fn refresh(&mut self) -> Arc<RoutingTable> {
        let state = State::clone(self.current().state());
        self.publish(state)
    }

    /// Re-resolves backend host names and publishes a new snapshot only if an address changed
    /// (returns it); `None` when no backend uses a host name or nothing changed.
    pub fn refresh_resolution(&mut self) -> Option<Arc<RoutingTable>> {
        let current = self.store.load_full();
        let mut names = current
            .backends()
            .filter(|b| matches!(b.backend().address.host(), crate::Host::Name(_)))
            .peekable();
        names.peek()?;
        let changed = names.any(|b| self.resolver.resolve(&b.backend().address) != b.socket_addr());
        changed.then(|| self.refresh())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Backend, BackendAddress, BackendId, Command, DomainName, LiteralOnly, Tag, VirtualHost,
    };

    #[test]
    fn refresh_resolution_publishes_only_when_an_address_changes() {
        use std::net::SocketAddr;
        use std::sync::atomic::{AtomicU16, Ordering};

        let port = Arc::new(AtomicU16::new(8080));
        let answer = Arc::clone(&port);
        let resolver = move |a: &BackendAddress| {
            a.socket_addr().or_else(|| {
                Some(SocketAddr::from((
                    [10, 0, 0, 1],
                    answer.load(Ordering::SeqCst),
                )))
            })
        };
        let state = State::new(
            vec![],
            vec![Backend::new(
                BackendId::parse("named").unwrap(),
                BackendAddress::parse("svc.internal:80").unwrap(),
                vec![Tag::parse("a").unwrap()],
            )],
        )
        .unwrap();
        let (store, mut writer) =
            RouteWriter::new(state, Box::new(resolver), BuildOptions::default());
        let generation = store.load().generation();
        assert!(
            writer.refresh_resolution().is_none(),
            "same answer: nothing published"
        );
        assert_eq!(store.load().generation(), generation);
        port.store(9090, Ordering::SeqCst);
        let next = writer.refresh_resolution().expect("new address published");
        let id = BackendId::parse("named").unwrap();
        assert_eq!(
            next.backend(&id).unwrap().socket_addr().unwrap().port(),
            9090
        );
        assert_eq!(store.load().generation(), generation + 1);

        let (_, mut literal) = RouteWriter::new(
            State::default(),
            Box::new(LiteralOnly),
            BuildOptions::default(),
        );
        assert!(literal.refresh_resolution().is_none());
    }

    #[test]
    fn publish_is_visible_to_the_next_load_and_old_guards_stay_valid() {
        let state = State::new(
            vec![VirtualHost::new(
                DomainName::parse("a.com").unwrap(),
                Tag::parse("a").unwrap(),
            )],
            vec![
                Backend::new(
                    BackendId::parse("one").unwrap(),
                    BackendAddress::parse("127.0.0.1:1").unwrap(),
                    vec![Tag::parse("a").unwrap()],
                ),
                Backend::new(
                    BackendId::parse("two").unwrap(),
                    BackendAddress::parse("127.0.0.1:2").unwrap(),
                    vec![Tag::parse("b").unwrap()],
                ),
            ],
        )
        .unwrap();
        let (store, mut writer) = RouteWriter::new(
            state.clone(),
            Box::new(LiteralOnly),
            BuildOptions::default(),
        );
        let old = store.load();
        assert_eq!(
            old.lookup(b"a.com")
                .unwrap()
                .select()
                .unwrap()
                .id()
                .as_str(),
            "one"
        );
        let (next, _) = state
            .apply(Command::SwitchTag {
                domain: DomainName::parse("a.com").unwrap(),
                tag: Tag::parse("b").unwrap(),
            })
            .unwrap();
        let published = writer.publish(next);
        let now = store.load();
        assert_eq!(now.generation(), published.generation());
        assert_eq!(
            now.lookup(b"a.com")
                .unwrap()
                .select()
                .unwrap()
                .id()
                .as_str(),
            "two"
        );
        // A request that loaded the old snapshot finishes on it.
        assert_eq!(
            old.lookup(b"a.com")
                .unwrap()
                .select()
                .unwrap()
                .id()
                .as_str(),
            "one"
        );
        assert_eq!(writer.refresh().generation(), now.generation() + 1);
    }
}
