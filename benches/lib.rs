//! Fixtures shared by pingora-vhost's criterion benchmarks (`benches/benches/*.rs`).

use vhost_routing::{
    Backend, BackendAddress, BackendId, Canary, CanaryWeight, DomainName, State, StickyKey, Tag,
    VirtualHost,
};

/// A state with `domains` domains spread over `tags` tags, each tag with `per_tag` backends of
/// weights 1..=3. Returns it with the host names to look up (Host-header spelling, with a port).
pub fn fixture(
    domains: usize,
    tags: usize,
    per_tag: usize,
) -> Result<(State, Vec<String>), Box<dyn std::error::Error>> {
    let tag_names: Vec<Tag> = (0..tags)
        .map(|t| Tag::parse(&format!("t{t}")))
        .collect::<Result<_, _>>()?;
    let mut vhosts = Vec::with_capacity(domains);
    let mut hosts = Vec::with_capacity(domains);
    for d in 0..domains {
        let name = format!("app{d}.tenant{}.example.com", d % 97);
        vhosts.push(VirtualHost::new(
            DomainName::parse(&name)?,
            tag_names[d % tags].clone(),
        ));
        hosts.push(format!("{name}:443"));
    }
    let mut backends = Vec::with_capacity(tags * per_tag);
    for (t, tag) in tag_names.iter().enumerate() {
        for b in 0..per_tag {
            let n = t * per_tag + b;
            let address = format!("10.{}.{}.{}:8080", (n >> 16) & 255, (n >> 8) & 255, n & 255);
            backends.push(Backend {
                weight: (b % 3 + 1) as u16,
                ..Backend::new(
                    BackendId::parse(&format!("b{n}"))?,
                    BackendAddress::parse(&address)?,
                    vec![tag.clone()],
                )
            });
        }
    }
    Ok((State::new(vhosts, backends)?, hosts))
}

/// `state` with a 10 % canary (`sticky_key = "header:x-user"`) on every domain, towards the next
/// tag of the fixture.
pub fn with_canaries(state: State, tags: usize) -> Result<State, Box<dyn std::error::Error>> {
    let mut vhosts: Vec<VirtualHost> = state.vhosts().cloned().collect();
    for v in &mut vhosts {
        let n: usize = v.enabled_backends_tag.as_str()[1..].parse()?;
        v.canary = Some(Box::new(Canary::new(
            Tag::parse(&format!("t{}", (n + 1) % tags))?,
            CanaryWeight::from_percent(10.0)?,
            StickyKey::parse("header:x-user")?,
        )));
    }
    Ok(State::new(vhosts, state.backends().cloned().collect())?)
}
