//! Property tests for host lookup and weighted selection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use vhost_routing::{
    Backend, BackendAddress, BackendId, BuildOptions, DomainName, LiteralOnly, RoutingTable, State,
    Tag, VirtualHost,
};

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?"
}

fn domain() -> impl Strategy<Value = String> {
    (prop::collection::vec(label(), 1..4), "[a-z]{2,6}")
        .prop_map(|(labels, tld)| format!("{}.{tld}", labels.join(".")))
}

fn build(vhosts: Vec<VirtualHost>, backends: Vec<Backend>) -> RoutingTable {
    RoutingTable::build(
        Arc::new(State::new(vhosts, backends).unwrap()),
        &RoutingTable::empty(),
        &LiteralOnly,
        BuildOptions::default(),
    )
}

proptest! {
    #[test]
    fn any_spelling_of_a_configured_domain_finds_it(
        name in domain(),
        upper in prop::collection::vec(any::<bool>(), 64),
        port in prop::option::of(1u16..),
        dot in any::<bool>(),
    ) {
        let tag = Tag::parse("a").unwrap();
        let table = build(vec![VirtualHost::new(DomainName::parse(&name).unwrap(), tag)], vec![]);
        let mut host: String = name
            .chars()
            .zip(upper.iter().cycle())
            .map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c })
            .collect();
        if dot { host.push('.'); }
        if let Some(p) = port { host.push_str(&format!(":{p}")); }
        let found = table.lookup(host.as_bytes()).map(|r| r.vhost().domain.to_string());
        prop_assert_eq!(found, Some(name));
    }

    #[test]
    fn wildcard_never_shadows_exact_and_covers_one_label(name in domain(), sub in label(), subsub in label()) {
        let wildcard = format!("*.{name}");
        let exact = format!("{sub}.{name}");
        let table = build(
            vec![
                VirtualHost::new(DomainName::parse(&wildcard).unwrap(), Tag::parse("w").unwrap()),
                VirtualHost::new(DomainName::parse(&exact).unwrap(), Tag::parse("e").unwrap()),
            ],
            vec![],
        );
        let tag = |h: &str| table.lookup(h.as_bytes()).map(|r| r.vhost().enabled_backends_tag.to_string());
        prop_assert_eq!(tag(&exact), Some("e".to_string()));
        let other = format!("{sub}x.{name}");
        prop_assert_eq!(tag(&other), Some("w".to_string()));
        let deep = format!("{subsub}.{sub}.{name}");
        prop_assert_eq!(tag(&deep), None);
        prop_assert_eq!(tag(&name), None);
    }

    #[test]
    fn each_full_turn_gives_every_backend_exactly_its_weight(
        weights in prop::collection::vec(1u16..=12, 1..8),
        turns in 1usize..5,
    ) {
        let tag = Tag::parse("a").unwrap();
        let backends: Vec<Backend> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Backend {
                weight: *w,
                ..Backend::new(
                    BackendId::parse(&format!("b{i}")).unwrap(),
                    BackendAddress::parse(&format!("127.0.0.1:{}", i + 1)).unwrap(),
                    vec![tag.clone()],
                )
            })
            .collect();
        let table = build(
            vec![VirtualHost::new(DomainName::parse("a.com").unwrap(), tag)],
            backends,
        );
        let route = table.lookup(b"a.com").unwrap();
        let g = weights.iter().fold(0u16, |a, &b| gcd(a, b));
        let turn: usize = weights.iter().map(|w| usize::from(w / g)).sum();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..turn * turns {
            *counts.entry(route.select().unwrap().id().to_string()).or_default() += 1;
        }
        for (i, w) in weights.iter().enumerate() {
            prop_assert_eq!(counts.get(&format!("b{i}")).copied().unwrap_or(0), usize::from(w / g) * turns);
        }
    }
}

fn gcd(a: u16, b: u16) -> u16 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
