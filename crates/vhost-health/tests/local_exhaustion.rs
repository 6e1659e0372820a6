//! Probes that cannot run because this process is out of file descriptors never count against a
//! backend. Its own test binary: it lowers the process's descriptor limit and uses up every
//! descriptor, which would disturb any test running beside it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use vhost_health::{CheckSettings, HealthChecker, ProbeError};
use vhost_routing::{
    Backend, BackendAddress, BackendId, BuildOptions, LiteralOnly, RouteWriter, State, Tag,
};

const DEADLINE: Duration = Duration::from_secs(20);

async fn next(
    events: &mut mpsc::UnboundedReceiver<vhost_health::ProbeEvent>,
) -> vhost_health::ProbeEvent {
    tokio::time::timeout(DEADLINE, events.recv())
        .await
        .expect("a probe event before the deadline")
        .expect("the checker is running")
}

/// Opens `/dev/null` until the process has no descriptor left; dropping the result frees them.
fn exhaust_descriptors() -> Vec<std::fs::File> {
    let mut held = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => held.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc_emfile()), "{e}");
                return held;
            }
        }
    }
}

fn libc_emfile() -> i32 {
    24 // EMFILE on Linux
}

#[tokio::test(flavor = "current_thread")]
async fn a_host_out_of_descriptors_never_marks_a_live_backend_down() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let _ = listener.accept().await;
        }
    });
    let state = State::new(
        vec![],
        vec![Backend::new(
            BackendId::parse("live").unwrap(),
            BackendAddress::parse(&addr.to_string()).unwrap(),
            vec![Tag::parse("a").unwrap()],
        )],
    )
    .unwrap();
    let (store, _writer) = RouteWriter::new(state, Box::new(LiteralOnly), BuildOptions::default());
    let settings = CheckSettings {
        interval: Duration::from_millis(20),
        timeout: Duration::from_millis(500),
        unhealthy_threshold: 2,
        healthy_threshold: 1,
        ..CheckSettings::default()
    };
    let (tx, mut events) = mpsc::unbounded_channel();
    let checker = HealthChecker::new(Arc::clone(&store), settings).with_events(tx);
    let (_stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(checker.run(stop_rx));
    let first = next(&mut events).await;
    assert!(first.healthy && first.error.is_none(), "{first:?}");

    // Keep the limit low so exhausting it is quick, then use up every descriptor.
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    rlimit::setrlimit(rlimit::Resource::NOFILE, 256.min(hard), hard).unwrap();
    let held = exhaust_descriptors();
    let mut local_failures = 0;
    while local_failures < 5 {
        let event = next(&mut events).await;
        if let Some(error) = &event.error {
            assert!(error.contains("local resource"), "{error}");
            assert!(event.healthy, "a local failure marked the backend down");
            local_failures += 1;
        }
    }
    let id = BackendId::parse("live").unwrap();
    assert!(store.load().backend(&id).unwrap().health().is_healthy());
    drop(held);
    // Descriptors back: the next probe is an ordinary success.
    loop {
        let event = next(&mut events).await;
        if event.error.is_none() {
            assert!(event.healthy);
            break;
        }
    }

    // The classification itself, on a direct probe.
    let held = exhaust_descriptors();
    let plan = CheckSettings::default().plan_for(store.load().backend(&id).unwrap().backend());
    let result = vhost_health::probe(addr, &plan).await;
    drop(held);
    assert!(matches!(result, Err(ProbeError::Local(_))), "{result:?}");
}
