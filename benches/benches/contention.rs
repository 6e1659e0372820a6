//! Contention on the shared state a request touches, with one and with two threads.
//!
//! Each iteration does to shared memory what one proxied request does in `vhost-pingora`'s
//! filters. `borrowed` is the current request path: take the routing snapshot (`load_full`, one
//! `Arc` count), look the host up and keep only the route's index (the route and its backend are
//! borrowed from the snapshot whenever needed), pick a backend (the pool's round-robin cursor,
//! one atomic increment), count the request in flight and out again and add to a per-route
//! request counter. `cloned` is the request path before issue 18: it also kept clones of the
//! route (two to three `Arc` counts) and of the backend (one more). Every thread works on the
//! SAME domain — the worst case: one cursor, one set of counts, one counter cache line for all
//! of them. Each variant runs on one and on two threads and reports the time per request and
//! thread; the difference is what sharing cache lines between the two cores costs.
//!
//! Run with `cargo bench -p vhost-benches --bench contention`; figures in docs/performance.md.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vhost_benches::fixture;
use vhost_routing::{BuildOptions, LiteralOnly, RouteStore, RouteWriter};

/// Counters of the kind the proxy keeps per route and process (in flight, requests by class).
#[derive(Default)]
struct Shared {
    in_flight: AtomicU64,
    requests: AtomicU64,
}

/// One request's worth of shared-state traffic (see the module docs); `clone`: keep clones of
/// the route and the backend as the request path did before.
fn request(store: &RouteStore, shared: &Shared, host: &[u8], clone: bool) {
    shared.in_flight.fetch_add(1, Ordering::Relaxed);
    let table = store.load_full();
    let route = table.lookup(black_box(host)).unwrap();
    if clone {
        let route = route.clone();
        let backend = Arc::clone(route.select().unwrap());
        black_box(backend.socket_addr());
    } else {
        let index = route.index();
        black_box(route.select().unwrap().socket_addr());
        black_box(table.route(index).unwrap().index());
    }
    shared.requests.fetch_add(1, Ordering::Relaxed);
    drop(table);
    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
}

/// Runs `iters` requests on each of `threads` threads started together; the time of the slowest.
fn run(
    store: &Arc<RouteStore>,
    shared: &Arc<Shared>,
    host: &str,
    (threads, clone): (usize, bool),
    iters: u64,
) -> Duration {
    let barrier = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (store, shared, barrier) = (store.clone(), shared.clone(), barrier.clone());
            let host = host.to_owned();
            std::thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                for _ in 0..iters {
                    request(&store, &shared, host.as_bytes(), clone);
                }
                start.elapsed()
            })
        })
        .collect();
    workers
        .into_iter()
        .map(|w| w.join().unwrap())
        .max()
        .unwrap_or_default()
}

fn shared_request_state(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_shared_state");
    group.throughput(Throughput::Elements(1));
    let (state, hosts) = fixture(10, 10, 10).unwrap();
    let (store, _writer) = RouteWriter::new(state, Box::new(LiteralOnly), BuildOptions::default());
    let store = Arc::new(store);
    let shared = Arc::new(Shared::default());
    for (name, clone) in [("borrowed", false), ("cloned", true)] {
        for threads in [1usize, 2] {
            let id = BenchmarkId::new(format!("{name}_threads"), threads);
            group.bench_with_input(id, &(threads, clone), |b, &setup| {
                b.iter_custom(|iters| run(&store, &shared, &hosts[0], setup, iters));
            });
        }
    }
    group.finish();
}

criterion_group!(benches, shared_request_state);
criterion_main!(benches);
