//! A fixed loop of the routing hot path (snapshot load + lookup + select) over 100 000 domains,
//! for deterministic measurement with cachegrind, which this noisy VM needs for A/B comparisons:
//!
//! ```text
//! cargo build --release -p vhost-benches --example lookup_loop
//! valgrind --tool=cachegrind --cache-sim=yes target/release/examples/lookup_loop
//! valgrind --tool=cachegrind --cache-sim=yes target/release/examples/lookup_loop canary
//! ```
//! Run once more with `LOOP_ITERATIONS=0` and subtract to get the loop's own cost. With
//! `canary`, every domain has a 10 % canary keyed by a user-id header, and each iteration
//! also hashes a key into its bucket and selects on the resulting side.
#![allow(clippy::print_stdout)]

use std::hint::black_box;

use vhost_benches::{fixture, with_canaries};
use vhost_routing::{bucket_of, BuildOptions, LiteralOnly, RouteWriter, Side};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let canary = std::env::args().nth(1).as_deref() == Some("canary");
    let (state, all) = fixture(100_000, 10, 10)?;
    let state = if canary {
        with_canaries(state, 10)?
    } else {
        state
    };
    let (store, _writer) = RouteWriter::new(state, Box::new(LiteralOnly), BuildOptions::default());
    let hosts: Vec<String> = (0..1024)
        .map(|k| all[(k * 7919) % all.len()].clone())
        .collect();
    let users: Vec<String> = (0..1024).map(|k| format!("user-{k:08}")).collect();
    let mut checksum = 0usize;
    // `LOOP_ITERATIONS=0` measures the set-up alone, to subtract.
    let iterations: usize = std::env::var("LOOP_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000);
    for i in 0..iterations {
        let table = store.load();
        let route = table
            .lookup(black_box(hosts[i % hosts.len()].as_bytes()))
            .ok_or("a configured host was not found")?;
        let side = match route.canary() {
            Some(c) => c.side_for(
                bucket_of(c.seed(), black_box(users[i % users.len()].as_bytes())),
                None,
            ),
            None => Side::Primary,
        };
        let (_, _, backend) = route
            .select_on(side, |_| true)
            .ok_or("no backend selected")?;
        checksum += backend.socket_addr().map_or(0, |a| usize::from(a.port()));
    }
    println!("{checksum}");
    Ok(())
}
