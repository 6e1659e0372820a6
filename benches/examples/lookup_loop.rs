//! A fixed loop of the routing hot path (snapshot load + lookup + select) over 100 000 domains,
//! for deterministic measurement with cachegrind, which this noisy VM needs for A/B comparisons:
//!
//! ```text
//! cargo build --release -p vhost-benches --example lookup_loop
//! valgrind --tool=cachegrind --cache-sim=yes target/release/examples/lookup_loop
//! ```
#![allow(clippy::print_stdout)]

use std::hint::black_box;

use vhost_benches::fixture;
use vhost_routing::{BuildOptions, LiteralOnly, RouteWriter};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (state, all) = fixture(100_000, 10, 10)?;
    let (store, _writer) = RouteWriter::new(state, Box::new(LiteralOnly), BuildOptions::default());
    let hosts: Vec<String> = (0..1024)
        .map(|k| all[(k * 7919) % all.len()].clone())
        .collect();
    let mut checksum = 0usize;
    for i in 0..400_000usize {
        let table = store.load();
        let route = table
            .lookup(black_box(hosts[i % hosts.len()].as_bytes()))
            .ok_or("a configured host was not found")?;
        let backend = route.select().ok_or("no backend selected")?;
        checksum += backend.socket_addr().map_or(0, |a| usize::from(a.port()));
    }
    println!("{checksum}");
    Ok(())
}
