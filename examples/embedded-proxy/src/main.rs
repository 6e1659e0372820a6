//! Embedding pingora-vhost's routing crate and Pingora adapter in your own Pingora server.
//!
//! ```text
//! cargo run -p embedded-proxy -- 127.0.0.1:8000 127.0.0.1:3001 127.0.0.1:3002 [FLIP_EVERY_MS]
//! curl -H 'Host: app.example.test' http://127.0.0.1:8000/
//! ```
//! Routes `app.example.test` to the first backend (tag "blue"); every 10 s (or `FLIP_EVERY_MS`)
//! a background service of this app flips the domain between "blue" and "green" by publishing a
//! new snapshot — the same thing the pingora-vhost admin API does on
//! `POST /api/v1/domains/:domain/switch`.

use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{Server, ShutdownWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use tokio::sync::Mutex;
use vhost_pingora::{proxy_service, ConnLimits, Connections, ProxyOptions, VhostProxy};
use vhost_routing::{
    Backend, BackendAddress, BackendId, BuildOptions, Command, DomainName, LiteralOnly,
    RouteWriter, State, Tag, VirtualHost,
};

/// Flips the domain's tag every `every`.
struct Flipper {
    writer: Mutex<RouteWriter>,
    domain: DomainName,
    every: Duration,
}

#[async_trait]
impl BackgroundService for Flipper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let mut writer = self.writer.lock().await;
            let current = writer.current();
            let state = current.state();
            let Some(vhost) = state.vhost(&self.domain) else {
                return;
            };
            let next_tag = if vhost.enabled_backends_tag.as_str() == "blue" {
                "green"
            } else {
                "blue"
            };
            let Ok(tag) = Tag::parse(next_tag) else {
                return;
            };
            match state.apply(Command::SwitchTag {
                domain: self.domain.clone(),
                tag,
            }) {
                Ok((next, _change)) => {
                    writer.publish(next);
                    tracing::info!(domain = %self.domain, tag = next_tag, "switched");
                }
                Err(e) => tracing::warn!(error = %e, "switch refused"),
            }
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, blue, green, every) = match args.as_slice() {
        [listen, blue, green] => (listen, blue, green, Duration::from_secs(10)),
        [listen, blue, green, ms] => (listen, blue, green, Duration::from_millis(ms.parse()?)),
        _ => {
            return Err(
                "usage: embedded-proxy LISTEN_ADDR BLUE_BACKEND GREEN_BACKEND [FLIP_EVERY_MS]"
                    .into(),
            )
        }
    };
    if every.is_zero() {
        return Err("FLIP_EVERY_MS must be at least 1".into());
    }
    let domain = DomainName::parse("app.example.test")?;
    let state = State::new(
        vec![VirtualHost::new(domain.clone(), Tag::parse("blue")?)],
        vec![
            Backend::new(
                BackendId::parse("blue-1")?,
                BackendAddress::parse(blue)?,
                vec![Tag::parse("blue")?],
            ),
            Backend::new(
                BackendId::parse("green-1")?,
                BackendAddress::parse(green)?,
                vec![Tag::parse("green")?],
            ),
        ],
    )?;
    let (_store, mut writer) =
        RouteWriter::new(state, Box::new(LiteralOnly), BuildOptions::default());

    let mut server = Server::new_with_opt_and_conf(None, ServerConf::default());
    let proxy = VhostProxy::new(&mut writer, ProxyOptions::default());
    server.add_service(proxy_service(
        &server.configuration,
        proxy,
        Some(listen.parse()?),
        None,
        Connections::new(ConnLimits::default()),
    )?);
    server.add_service(background_service(
        "tag flipper",
        Flipper {
            writer: Mutex::new(writer),
            domain,
            every,
        },
    ));
    server.run_forever();
}
