//! A write whose client hangs up before the answer is still applied, logged and counted (an
//! applied change is never silent). Its own test binary: it installs the process-wide metrics
//! recorder and log subscriber.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_admin::{router, AdminState, ApplyHook, Refusal};
use vhost_config::ConfigWriter;
use vhost_routing::{BackendId, BuildOptions, LiteralOnly, RouteWriter, State};

const DEADLINE: Duration = Duration::from_secs(20);

/// Holds every change for a while, so the client can leave before the answer.
struct SlowHook(Arc<AtomicBool>);

impl ApplyHook for SlowHook {
    fn prepare(&self, _next: &State) -> Result<Box<dyn FnOnce() + Send>, Refusal> {
        self.0.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(500));
        Ok(Box::new(|| {}))
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_client_hangs_up_is_still_applied_logged_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("log.txt");
    let log = std::fs::File::create(&log_path).unwrap();
    tracing_subscriber::fmt()
        .with_writer(Arc::new(log))
        .with_ansi(false)
        .init();
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();

    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[proxy]\nmanagement_api_addr = \"127.0.0.1:8080\"\n").unwrap();
    let config = vhost_config::load(&path).unwrap();
    let (store, writer) =
        RouteWriter::new(config.state, Box::new(LiteralOnly), BuildOptions::default());
    let entered = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let state = AdminState::new(writer, Some(ConfigWriter::open(&path).unwrap()), None)
        .with_listen_addr(addr)
        .with_hook(SlowHook(Arc::clone(&entered)));
    tokio::spawn(vhost_admin::serve(
        listener,
        router(Arc::new(state)),
        std::future::pending(),
    ));

    let body = r#"{"id":"late","address":"127.0.0.1:4001","tags":["a"]}"#;
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    write!(
        client,
        "POST /api/v1/backends HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_until("the change to be in preparation", || {
        entered.load(Ordering::SeqCst)
    })
    .await;
    // The client gives up before the answer.
    client.shutdown(std::net::Shutdown::Both).unwrap();
    drop(client);

    let id = BackendId::parse("late").unwrap();
    wait_until("the change to be live", || {
        store.load().backend(&id).is_some()
    })
    .await;
    wait_until("the change to be logged and counted", || {
        let text = std::fs::read_to_string(&log_path).unwrap();
        text.contains("admin API write")
            && text.contains("path=\"/api/v1/backends\"")
            && text.contains("configuration change applied")
            && metrics
                .render()
                .contains("config_changes_total{result=\"applied\"} 1")
    })
    .await;
    // And persisted.
    assert!(vhost_config::load(&path)
        .unwrap()
        .state
        .backend(&id)
        .is_some());
}
