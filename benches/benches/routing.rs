//! Hot-path benchmarks: snapshot load + host lookup + weighted selection, as one request does.
//! Run with `cargo bench -p vhost-benches`; figures are recorded in docs/performance.md.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vhost_benches::{fixture, with_canaries};
use vhost_routing::{bucket_of, BuildOptions, LiteralOnly, RouteWriter};

fn lookup_and_select(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup_select");
    group.throughput(Throughput::Elements(1));
    for &(domains, per_tag) in &[
        (10, 10),
        (1_000, 10),
        (100_000, 10),
        (1_000, 1_000),
        (100_000, 1_000),
    ] {
        let (state, all_hosts) = fixture(domains, 10, per_tag).unwrap();
        let (store, _writer) =
            RouteWriter::new(state, Box::new(LiteralOnly), BuildOptions::default());
        // A request's Host bytes are in cache (just parsed); the table is not. So: 1024 hosts
        // spread over the whole domain set, looked up in turn.
        let hosts: Vec<String> = (0..1024)
            .map(|k| all_hosts[(k * 7919) % all_hosts.len()].clone())
            .collect();
        let mut i = 0usize;
        group.bench_with_input(
            BenchmarkId::new(format!("{per_tag}_backends_per_tag"), domains),
            &hosts,
            |b, hosts| {
                b.iter(|| {
                    i = (i + 1) % hosts.len();
                    let table = store.load();
                    let route = table.lookup(black_box(hosts[i].as_bytes())).unwrap();
                    black_box(route.select().unwrap().socket_addr())
                })
            },
        );
    }
    group.finish();
}

/// The same with a 10 % canary on every domain, keyed by a user-id header: lookup, bucket of the
/// key, side, weighted selection on that side (what a request of a domain with a canary does).
fn lookup_and_select_with_canary(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup_select_canary");
    group.throughput(Throughput::Elements(1));
    for &domains in &[10usize, 1_000, 100_000] {
        let (state, all_hosts) = fixture(domains, 10, 10).unwrap();
        let state = with_canaries(state, 10).unwrap();
        let (store, _writer) =
            RouteWriter::new(state, Box::new(LiteralOnly), BuildOptions::default());
        let hosts: Vec<String> = (0..1024)
            .map(|k| all_hosts[(k * 7919) % all_hosts.len()].clone())
            .collect();
        let users: Vec<String> = (0..1024).map(|k| format!("user-{k:08}")).collect();
        let mut i = 0usize;
        group.bench_with_input(
            BenchmarkId::new("10_backends_per_tag", domains),
            &hosts,
            |b, hosts| {
                b.iter(|| {
                    i = (i + 1) % hosts.len();
                    let table = store.load();
                    let route = table.lookup(black_box(hosts[i].as_bytes())).unwrap();
                    let canary = route.canary().unwrap();
                    let bucket = bucket_of(canary.seed(), black_box(users[i].as_bytes()));
                    let side = canary.side_for(bucket, None);
                    black_box(route.select_on(side, |_| true).unwrap().2.socket_addr())
                })
            },
        );
    }
    group.finish();
}

fn unknown_host(c: &mut Criterion) {
    let (state, _) = fixture(100_000, 10, 10).unwrap();
    let (store, _writer) = RouteWriter::new(state, Box::new(LiteralOnly), BuildOptions::default());
    c.bench_function("lookup_miss/100000", |b| {
        b.iter(|| {
            black_box(
                store
                    .load()
                    .lookup(black_box(b"Unknown.Example.NET:8443"))
                    .is_none(),
            )
        })
    });
}

fn rebuild(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish");
    group.sample_size(10);
    for &domains in &[1_000usize, 100_000] {
        let (state, _) = fixture(domains, 10, 10).unwrap();
        let (_store, mut writer) = RouteWriter::new(
            state.clone(),
            Box::new(LiteralOnly),
            BuildOptions::default(),
        );
        group.bench_with_input(BenchmarkId::from_parameter(domains), &state, |b, state| {
            b.iter(|| black_box(writer.publish(state.clone()).generation()))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    lookup_and_select,
    lookup_and_select_with_canary,
    unknown_host,
    rebuild
);
criterion_main!(benches);
