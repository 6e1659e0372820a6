//! Hot-path benchmarks: snapshot load + host lookup + weighted selection, as one request does.
//! Run with `cargo bench -p vhost-benches`; figures are recorded in docs/performance.md.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vhost_benches::fixture;
use vhost_routing::{BuildOptions, LiteralOnly, RouteWriter};

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

criterion_group!(benches, lookup_and_select, unknown_host, rebuild);
criterion_main!(benches);
