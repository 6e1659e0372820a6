//! Fixtures shared by pingora-vhost's criterion benchmarks (`benches/benches/*.rs`).

use vhost_routing::{Backend, BackendAddress, BackendId, DomainName, State, Tag, VirtualHost};

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
