//! The checker against real loopback sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use vhost_health::{CheckSettings, HealthChecker, ProbeEvent};
use vhost_routing::{
    Backend, BackendAddress, BackendId, BuildOptions, DomainName, LiteralOnly, ProbeKind,
    ProbeOverride, RouteStore, RouteWriter, State, Tag, VirtualHost,
};

const DEADLINE: Duration = Duration::from_secs(20);

fn settings() -> CheckSettings {
    CheckSettings {
        interval: Duration::from_millis(40),
        timeout: Duration::from_millis(250),
        unhealthy_threshold: 3,
        healthy_threshold: 2,
        ..CheckSettings::default()
    }
}

/// A backend that accepts TCP connections and answers HTTP with `status` (or never answers).
async fn serve(listener: TcpListener, status: Option<u16>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            match status {
                Some(code) => {
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf).await;
                        let _ = s
                            .write_all(
                                format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n")
                                    .as_bytes(),
                            )
                            .await;
                    });
                }
                None => held.push(s), // black hole: accept, never answer
            }
        }
    })
}

async fn start(status: Option<u16>) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (addr, serve(l, status).await)
}

fn backend(id: &str, addr: SocketAddr, probe: Option<ProbeOverride>) -> Backend {
    Backend {
        health_check: probe,
        ..Backend::new(
            BackendId::parse(id).unwrap(),
            BackendAddress::parse(&addr.to_string()).unwrap(),
            vec![Tag::parse("a").unwrap()],
        )
    }
}

fn http(path: &str) -> Option<ProbeOverride> {
    Some(ProbeOverride {
        kind: Some(ProbeKind::Http),
        path: Some(path.into()),
        ..Default::default()
    })
}

struct Harness {
    store: Arc<RouteStore>,
    writer: RouteWriter,
    events: mpsc::UnboundedReceiver<ProbeEvent>,
    wake: Arc<tokio::sync::Notify>,
    _stop: watch::Sender<bool>,
}

fn harness(backends: Vec<Backend>, settings: CheckSettings) -> Harness {
    let state = State::new(
        vec![VirtualHost::new(
            DomainName::parse("a.test").unwrap(),
            Tag::parse("a").unwrap(),
        )],
        backends,
    )
    .unwrap();
    let (store, writer) = RouteWriter::new(state, Box::new(LiteralOnly), BuildOptions::default());
    let (tx, events) = mpsc::unbounded_channel();
    let checker = HealthChecker::new(Arc::clone(&store), settings).with_events(tx);
    let wake = checker.waker();
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(checker.run(stop_rx));
    Harness {
        store,
        writer,
        events,
        wake,
        _stop: stop,
    }
}

impl Harness {
    /// The next event of `id`, skipping others.
    async fn next_of(&mut self, id: &str) -> ProbeEvent {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let e = self.events.recv().await.unwrap();
                if e.backend.as_str() == id {
                    return e;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no probe of {id}"))
    }

    fn healthy(&self, id: &str) -> bool {
        self.store
            .load()
            .backend(&BackendId::parse(id).unwrap())
            .unwrap()
            .health()
            .is_healthy()
    }

    fn picks(&self) -> Vec<String> {
        let t = self.store.load();
        let r = t.lookup(b"a.test").unwrap();
        (0..20)
            .filter_map(|_| r.select().map(|b| b.id().to_string()))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_goes_down_after_exactly_the_threshold_and_comes_back() {
    let (victim, server) = start(Some(200)).await;
    let (sibling, _s) = start(Some(200)).await;
    let mut h = harness(
        vec![
            backend("victim", victim, None),
            backend("sibling", sibling, None),
        ],
        settings(),
    );
    assert!(h.next_of("victim").await.healthy);

    server.abort();
    let _ = server.await;
    // Consecutive failures until the flip: the flip happens on exactly the third.
    let mut failures = 0;
    loop {
        let e = h.next_of("victim").await;
        if e.error.is_some() {
            failures += 1;
        } else {
            failures = 0;
        }
        if !e.healthy {
            break;
        }
        assert!(failures < 3, "still healthy after {failures} failures");
    }
    assert_eq!(failures, 3);
    assert!(h.picks().iter().all(|p| p == "sibling"));

    // Restart on the same address: up after exactly two successes.
    let l = TcpListener::bind(victim).await.unwrap();
    let _server = serve(l, Some(200)).await;
    let mut successes = 0;
    loop {
        let e = h.next_of("victim").await;
        if e.error.is_none() {
            successes += 1;
        } else {
            successes = 0;
        }
        if e.healthy {
            break;
        }
        assert!(successes < 2, "still down after {successes} successes");
    }
    assert_eq!(successes, 2);
    assert!(h.picks().iter().any(|p| p == "victim"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_probe_checks_the_status_range() {
    let (ok, _a) = start(Some(204)).await;
    let (bad, _b) = start(Some(503)).await;
    let (redirect, _c) = start(Some(302)).await;
    let strict = Some(ProbeOverride {
        kind: Some(ProbeKind::Http),
        path: Some("/healthz".into()),
        expected_status: Some([200, 299]),
        ..Default::default()
    });
    let mut h = harness(
        vec![
            backend("ok", ok, http("/healthz")),
            backend("bad", bad, http("/healthz")),
            backend("redirect", redirect, strict),
        ],
        settings(),
    );
    assert!(h.next_of("ok").await.error.is_none());
    let e = h.next_of("bad").await;
    assert_eq!(e.error.as_deref(), Some("status 503, expected 200-399"));
    assert!(!e.healthy, "the first probe decides");
    let e = h.next_of("redirect").await;
    assert!(e.error.unwrap().contains("302"));
    assert!(h.healthy("ok") && !h.healthy("bad") && !h.healthy("redirect"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_backend_times_out_without_stalling_the_others() {
    let (hole, _h) = start(None).await;
    let (fine, _f) = start(Some(200)).await;
    let mut s = settings();
    // Long enough that "fine" (probed every 40 ms) is probed many times while the hole's probe
    // hangs, on any machine; the order of events says it, not a clock.
    s.timeout = Duration::from_secs(3);
    let mut h = harness(
        vec![
            backend("hole", hole, http("/")),
            backend("fine", fine, http("/")),
        ],
        s,
    );
    let mut fine_probes = 0;
    let e = tokio::time::timeout(DEADLINE, async {
        loop {
            let e = h.events.recv().await.unwrap();
            if e.backend.as_str() == "hole" {
                return e;
            }
            fine_probes += 1;
        }
    })
    .await
    .unwrap();
    assert!(e.error.unwrap().contains("no answer within"));
    assert!(
        fine_probes >= 3,
        "only {fine_probes} probes of the healthy backend while the black hole's probe hung"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_added_at_runtime_are_probed_at_once_and_deleted_ones_no_more() {
    let (live, _l) = start(Some(200)).await;
    let mut s = settings();
    s.interval = Duration::from_secs(30); // only the immediate first probe can happen in this test
    let mut h = harness(vec![backend("live", live, None)], s);
    assert!(h.next_of("live").await.healthy);

    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let current = h.store.load_full();
    let mut backends: Vec<Backend> = current.state().backends().cloned().collect();
    backends.push(backend("dead", dead, None));
    let vhosts: Vec<VirtualHost> = current.state().vhosts().cloned().collect();
    h.writer
        .publish(State::new(vhosts.clone(), backends).unwrap());
    h.wake.notify_one();
    let e = h.next_of("dead").await;
    assert!(e.error.unwrap().contains("connect failed"));
    assert!(
        !e.healthy,
        "a dead backend added at runtime is down after its first probe"
    );
    assert!(h.picks().iter().all(|p| p == "live"));

    // Changing its address restarts its history (new cell, probed at once).
    let (revived, _r) = start(Some(200)).await;
    let backends = vec![backend("live", live, None), backend("dead", revived, None)];
    h.writer
        .publish(State::new(vhosts.clone(), backends).unwrap());
    h.wake.notify_one();
    assert!(h.next_of("dead").await.healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_backends_are_no_longer_probed() {
    let (keep, _k) = start(Some(200)).await;
    let (gone, _g) = start(Some(200)).await;
    let mut h = harness(
        vec![backend("keep", keep, None), backend("gone", gone, None)],
        settings(),
    );
    h.next_of("gone").await;
    let vhosts: Vec<VirtualHost> = h.store.load().state().vhosts().cloned().collect();
    h.writer
        .publish(State::new(vhosts, vec![backend("keep", keep, None)]).unwrap());
    h.wake.notify_one();
    // Give the supervisor three probe intervals of "keep" to react (a probe of "gone" may still
    // be in flight), then "gone" must stay silent for seven more.
    let mut gone_late = 0;
    let mut keep_after = 0;
    tokio::time::timeout(DEADLINE, async {
        while keep_after < 10 {
            let e = h.events.recv().await.unwrap();
            match e.backend.as_str() {
                "gone" if keep_after >= 3 => gone_late += 1,
                "gone" => {}
                _ => keep_after += 1,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(gone_late, 0, "a deleted backend was still probed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passively_ejected_backend_returns_on_the_next_successful_probe() {
    let (live, _l) = start(Some(200)).await;
    let mut h = harness(vec![backend("live", live, None)], settings());
    // Two successes so far: past healthy_threshold.
    h.next_of("live").await;
    h.next_of("live").await;
    let cell = Arc::clone(
        h.store
            .load()
            .backend(&BackendId::parse("live").unwrap())
            .unwrap()
            .health(),
    );
    for _ in 0..4 {
        cell.record_connect_failure(5);
    }
    assert!(
        cell.record_connect_failure(5),
        "fifth consecutive connect failure ejects"
    );
    assert!(!cell.is_healthy());
    // Events queued before the ejection say nothing about it: drop them, then wait for a
    // successful probe and for the cell itself to be healthy again.
    while h.events.try_recv().is_ok() {}
    let e = h.next_of("live").await;
    assert!(e.error.is_none(), "{e:?}");
    tokio::time::timeout(DEADLINE, async {
        while !cell.is_healthy() {
            h.next_of("live").await;
        }
    })
    .await
    .expect("the next successful active probe brings it back");
}
