//! Per-request cost of each traffic-policy feature when it is on (issue 16's budget: ≤ 100 ns
//! each): a rate-limit check, access lists, the client behind trusted proxies, a request id,
//! a header-rule template.
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderValue;
use vhost_pingora::{client_behind, expand, new_request_id, Limiter, TemplateValues};
use vhost_routing::{any_contains, Cidr, RateLimit, RateLimitKey};

fn policy(c: &mut Criterion) {
    let limit = RateLimit {
        requests_per_second: 1_000_000,
        burst: Some(10_000_000),
        key: RateLimitKey::ClientIp,
    };
    let limiter = Limiter::new(&limit, 7);
    let ip = [192u8, 0, 2, 1];
    c.bench_function("rate_limit_check", |b| {
        b.iter(|| black_box(limiter.check(black_box(&ip)).is_ok()))
    });

    let deny: Vec<Cidr> = [
        "10.0.0.0/8",
        "192.168.0.0/16",
        "2001:db8::/32",
        "203.0.113.0/24",
    ]
    .iter()
    .map(|t| Cidr::parse(t).unwrap())
    .collect();
    let client: IpAddr = "198.51.100.7".parse().unwrap();
    c.bench_function("access_list_4_networks", |b| {
        b.iter(|| black_box(any_contains(black_box(&deny), black_box(client))))
    });

    let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
    let peer: IpAddr = "10.1.1.1".parse().unwrap();
    let xff = HeaderValue::from_static("198.51.100.7, 10.2.2.2");
    c.bench_function("client_behind_trusted_proxy", |b| {
        b.iter(|| black_box(client_behind(black_box(peer), Some(&xff), &trusted)))
    });

    c.bench_function("request_id_uuid_v7", |b| {
        b.iter(|| black_box(new_request_id()))
    });

    let id = HeaderValue::from_static("0192d3f0-7c1e-7a4b-9f00-0123456789ab");
    let values = TemplateValues {
        client_ip: Some(client),
        request_id: Some(&id),
        domain: "shop.example.com",
        tag: "b",
        backend: "web-2",
    };
    c.bench_function("header_template_plain", |b| {
        b.iter(|| black_box(expand(black_box("prod"), &values)))
    });
    c.bench_function("header_template_two_placeholders", |b| {
        b.iter(|| black_box(expand(black_box("{domain}/{tag}"), &values)))
    });
}

fn breaker(c: &mut Criterion) {
    use vhost_routing::{CircuitBreaker, HealthCell};
    let cell = HealthCell::new(true);
    let settings = CircuitBreaker::default();
    let mut now = 0u64;
    c.bench_function("breaker_admit_enter_record_leave", |b| {
        b.iter(|| {
            now += 1;
            let admitted = cell.admit(now, Some(1000));
            cell.enter();
            let t = cell.record(now, false, false, &settings, || true);
            cell.leave();
            black_box((admitted, t))
        })
    });
}

criterion_group!(benches, policy, breaker);

fn parse_only(c: &mut Criterion) {
    let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
    let peer: IpAddr = "10.1.1.1".parse().unwrap();
    c.bench_function("contains_one", |b| {
        b.iter(|| black_box(any_contains(black_box(&trusted), black_box(peer))))
    });
    let xff = HeaderValue::from_static("198.51.100.7");
    c.bench_function("client_behind_one_hop", |b| {
        b.iter(|| black_box(client_behind(black_box(peer), Some(&xff), &trusted)))
    });
    c.bench_function("ipv4_parse_std", |b| {
        b.iter(|| {
            black_box(
                black_box("198.51.100.7")
                    .parse::<std::net::Ipv4Addr>()
                    .is_ok(),
            )
        })
    });
}

criterion_group!(parse, parse_only);
criterion_main!(benches, parse);
