//! The whole proxy run in-process through the library: start, serve, reload on order, stop on
//! order — no child process, no signals.

#[path = "../../../bins/pingora-vhost/tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::time::Instant;

use common::{backend_of, free_port, read_response, wait_until, TestBackend};
use vhost_server::{Control, Signals};

fn config(
    http: u16,
    https: u16,
    admin: u16,
    tag: &str,
    a: &TestBackend,
    b: &TestBackend,
) -> String {
    format!(
        r#"[proxy]
listen_addr = "127.0.0.1:{https}"
listen_addr_http = "127.0.0.1:{http}"
management_api_addr = "127.0.0.1:{admin}"
grace_period_secs = 1

[metrics]
enabled = false

[[virtual_hosts]]
domain = "app.test"
enabled_backends_tag = "{tag}"

[[backends]]
id = "a"
address = "{}"
tags = ["a"]

[[backends]]
id = "b"
address = "{}"
tags = ["b"]
"#,
        a.addr, b.addr
    )
}

/// The backend that answers `GET /` for `app.test` now, or `None` if the proxy is not up.
fn served_by(http: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", http)).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        .ok()?;
    let (status, _, body) = read_response(&mut s);
    (status == 200).then(|| backend_of(&body))
}

#[test]
fn runs_reloads_and_stops_on_orders() {
    let rt = common::runtime();
    let (a, b) = (TestBackend::start(&rt, "a"), TestBackend::start(&rt, "b"));
    let (http, https, admin) = (free_port(), free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config(http, https, admin, "a", &a, &b)).unwrap();
    let loaded = vhost_config::load(&path).unwrap();

    let (orders, rx) = tokio::sync::mpsc::unbounded_channel();
    let server = {
        let path = path.clone();
        std::thread::spawn(move || vhost_server::run(loaded, &path, Signals::Channel(rx)))
    };
    wait_until("the proxy serves app.test from a", || {
        served_by(http).as_deref() == Some("a")
    });

    // A hand edit of the file, applied by a reload order (as SIGHUP would).
    std::fs::write(&path, config(http, https, admin, "b", &a, &b)).unwrap();
    orders.send(Control::Reload).unwrap();
    wait_until("the reload moves app.test to b", || {
        served_by(http).as_deref() == Some("b")
    });

    let stopping = Instant::now();
    orders.send(Control::Stop).unwrap();
    wait_until("run() returns after the stop order", || {
        server.is_finished()
    });
    server.join().unwrap().unwrap();
    assert!(stopping.elapsed() < common::DEADLINE);
    // The admin listener was closed by run() itself.
    assert!(std::net::TcpStream::connect(("127.0.0.1", admin)).is_err());
}
