//! The adapter embedded in an in-process Pingora server: a tag switch published while a client
//! loops is seen by the very next request, and no request fails or reaches a wrong pool.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use vhost_pingora::{proxy_service, ConnLimits, Connections, ProxyOptions, VhostProxy};
use vhost_routing::{
    Backend, BackendAddress, BackendId, BuildOptions, Command, DomainName, LiteralOnly,
    RouteWriter, State, Tag, VirtualHost,
};

struct StopOn(tokio::sync::watch::Receiver<bool>);

#[async_trait]
impl ShutdownSignalWatch for StopOn {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|s| *s).await;
        ShutdownSignal::FastShutdown
    }
}

async fn backend(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |_r: Request<hyper::body::Incoming>| async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            name.as_bytes(),
                        ))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn start_server(
    writer: &mut RouteWriter,
    options: ProxyOptions,
) -> (
    String,
    tokio::sync::watch::Sender<bool>,
    std::thread::JoinHandle<()>,
) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let conf = ServerConf {
        threads: 2,
        grace_period_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let service = proxy_service(
        &server.configuration,
        VhostProxy::new(writer, options),
        Some(listen.parse().unwrap()),
        None,
        Connections::new(ConnLimits::default()),
    )
    .unwrap();
    server.add_service(service);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let thread = std::thread::spawn(move || {
        server.run(RunArgs {
            shutdown_signal: Box::new(StopOn(stop_rx)),
        });
    });
    let start = Instant::now();
    while TcpStream::connect(&listen).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "proxy did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (listen, stop_tx, thread)
}

#[test]
fn consecutive_connect_failures_eject_a_backend_passively() {
    let rt = runtime();
    let live = rt.block_on(backend("live"));
    let dead: SocketAddr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let state = app_state(&[("dead", dead, "a"), ("live", live, "a")]);
    let (store, mut writer) =
        RouteWriter::new(state, Box::new(LiteralOnly), BuildOptions::default());
    let options = ProxyOptions {
        passive_failure_threshold: 3,
        ..ProxyOptions::default()
    };
    let (listen, stop, thread) = start_server(&mut writer, options);
    let dead_id = BackendId::parse("dead").unwrap();
    let cell = Arc::clone(store.load().backend(&dead_id).unwrap().health());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{listen}/");
    rt.block_on(async {
        // Round robin alternates dead/live; every request still succeeds (retry on the sibling).
        let mut requests = 0;
        while cell.is_healthy() {
            let r = client
                .get(&url)
                .header("host", "app.test")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.text().await.unwrap(), "live");
            requests += 1;
            assert!(requests <= 6, "not ejected after {requests} requests");
        }
        // Each request's first pick is the dead backend (the retry on "live" takes the next
        // rotation slot), so the third request makes the third consecutive failure: ejected.
        assert_eq!(requests, 3);
        // Requests keep succeeding while it stays ejected (no active checker here to revive it).
        for _ in 0..10 {
            let r = client
                .get(&url)
                .header("host", "app.test")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        assert!(!cell.is_healthy());
    });
    stop.send(true).unwrap();
    thread.join().unwrap();
}

#[test]
fn every_backend_refusing_connections_is_502() {
    let dead: SocketAddr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let state = app_state(&[("dead", dead, "a")]);
    let (_store, mut writer) =
        RouteWriter::new(state, Box::new(LiteralOnly), BuildOptions::default());
    let options = ProxyOptions {
        passive_failure_threshold: 0,
        ..ProxyOptions::default()
    };
    let (listen, stop, thread) = start_server(&mut writer, options);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        for _ in 0..3 {
            let r = client
                .get(format!("http://{listen}/"))
                .header("host", "app.test")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 502);
        }
    });
    stop.send(true).unwrap();
    thread.join().unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `app.test` on tag "a", with the given `(id, address, tag)` backends.
fn app_state(backends: &[(&str, SocketAddr, &str)]) -> State {
    State::new(
        vec![VirtualHost::new(
            DomainName::parse("app.test").unwrap(),
            t("a"),
        )],
        backends
            .iter()
            .map(|(id, addr, tag)| {
                Backend::new(
                    BackendId::parse(id).unwrap(),
                    BackendAddress::parse(&addr.to_string()).unwrap(),
                    vec![t(tag)],
                )
            })
            .collect(),
    )
    .unwrap()
}

fn t(s: &str) -> Tag {
    Tag::parse(s).unwrap()
}

#[test]
fn switch_is_visible_to_the_next_request_and_nothing_fails() {
    let rt = runtime();
    let a = rt.block_on(backend("a"));
    let b = rt.block_on(backend("b"));
    let state = app_state(&[("a", a, "a"), ("b", b, "b")]);
    let (_store, mut writer) = RouteWriter::new(
        state.clone(),
        Box::new(LiteralOnly),
        BuildOptions::default(),
    );

    let (listen, stop_tx, server_thread) = start_server(&mut writer, ProxyOptions::default());

    let switched = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{listen}/");
    let (sw, dn) = (Arc::clone(&switched), Arc::clone(&done));
    let looping = rt.spawn(async move {
        let mut seen = Vec::new();
        for _ in 0..400 {
            let after_switch = sw.load(Ordering::SeqCst);
            let r = client
                .get(&url)
                .header("host", "app.test")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let body = r.text().await.unwrap();
            if after_switch {
                assert_eq!(
                    body, "b",
                    "a request started after the switch went to the old pool"
                );
            }
            assert!(body == "a" || body == "b");
            seen.push(body);
            dn.fetch_add(1, Ordering::SeqCst);
        }
        seen
    });
    let start = Instant::now();
    while done.load(Ordering::SeqCst) < 100 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "client loop stalled"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (next, _) = state
        .apply(Command::SwitchTag {
            domain: DomainName::parse("app.test").unwrap(),
            tag: t("b"),
        })
        .unwrap();
    writer.publish(next);
    switched.store(true, Ordering::SeqCst);

    let seen = rt.block_on(looping).unwrap();
    assert_eq!(seen.len(), 400);
    let first_b = seen.iter().position(|s| s == "b").unwrap();
    assert!(first_b >= 100);
    assert!(
        seen[first_b..].iter().all(|s| s == "b"),
        "traffic went back to the old pool"
    );
    stop_tx.send(true).unwrap();
    server_thread.join().unwrap();
}
