//! WebSocket, gRPC and TLS / HTTP/2 backends through the real binary, with independent
//! implementations on both sides: Python `websockets` and `grpcio` (installed by
//! `scripts/pytools.sh`, which the test script runs), run from `tests/peers/peers.py`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use common::*;

fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/pytools/bin/python");
    assert!(
        python.exists(),
        "the protocol tests need Python's websockets and grpcio: run scripts/pytools.sh (scripts/test.sh does)"
    );
    python
}

fn peers() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/peers.py")
}

/// A server from peers.py, killed on drop.
struct Peer {
    child: Child,
    addr: SocketAddr,
}

impl Peer {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(python())
            .arg(peers())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{args:?} printed {line:?} instead of its port"));
        Self {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a peers.py client (bounded to two minutes) and returns its JSON report.
fn client(args: &[&str]) -> serde_json::Value {
    let out = Command::new("timeout")
        .arg("120")
        .arg(python())
        .arg(peers())
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
}

/// A WebSocket client that keeps its connection and takes orders on stdin.
struct Held {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Held {
    fn open(args: &[&str]) -> Self {
        let mut child = Command::new(python())
            .arg(peers())
            .arg("ws-hold")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut held = Self {
            child,
            stdin,
            stdout,
        };
        assert_eq!(held.read(), "connected");
        held
    }

    fn read(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }

    fn ask(&mut self, order: &str) -> String {
        writeln!(self.stdin, "{order}").unwrap();
        self.stdin.flush().unwrap();
        self.read()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn switch(proxy: &ProxyProcess, domain: &str, tag: &str) {
    let rt = runtime();
    let status = rt.block_on(async {
        client_http()
            .post(proxy.admin_url(&format!("/api/v1/domains/{domain}/switch")))
            .header("content-type", "application/json")
            .body(format!(r#"{{"new_tag": "{tag}"}}"#))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    assert_eq!(status, 200);
}

fn client_http() -> reqwest::Client {
    common::client(&[], true)
}

#[test]
fn websocket_messages_echo_intact_over_http_and_tls_and_a_live_one_survives_a_tag_switch() {
    let a = Peer::start(&["ws-server", "ws-a"]);
    let b = Peer::start(&["ws-server", "ws-b"]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "ws", &["ws.test"]);
    let body = format!(
        "[[virtual_hosts]]\ndomain = \"ws.test\"\nenabled_backends_tag = \"a\"\ntls_cert_path = \"{}\"\ntls_key_path = \"{}\"\n\n\
         [[backends]]\nid = \"ws-a\"\naddress = \"{}\"\ntags = [\"a\"]\n\n\
         [[backends]]\nid = \"ws-b\"\naddress = \"{}\"\ntags = [\"b\"]\n",
        cert.display(),
        key.display(),
        a.addr,
        b.addr
    );
    // Backend reads time out after 1 s; upgraded connections get websocket_idle_timeout_secs.
    let proxy = ProxyProcess::start(dir, "read_timeout_ms = 1000", &body, true);
    let (http, https) = (proxy.http.to_string(), proxy.https.to_string());
    let cert = cert.display().to_string();

    let plain = client(&["ws-client", "ws://ws.test/", "1000", "--connect", &http]);
    assert_eq!(
        (plain["ok"].as_u64(), plain["who"].as_str()),
        (Some(1000), Some("ws-a"))
    );
    let tls = client(&[
        "ws-client",
        "wss://ws.test/",
        "1000",
        "--connect",
        &https,
        "--ca",
        &cert,
        "--server-name",
        "ws.test",
    ]);
    assert_eq!(
        (tls["ok"].as_u64(), tls["who"].as_str()),
        (Some(1000), Some("ws-a"))
    );

    // A live connection keeps its backend across a switch; new ones go to the new tag.
    let mut held = Held::open(&["ws://ws.test/", "--connect", &http]);
    assert_eq!(held.ask("who"), "ws-a");
    wait_until("the upgraded connection to be counted", || {
        metric(proxy.metrics, "proxy_upgraded_connections") == 1.0
    });
    switch(&proxy, "ws.test", "b");
    let fresh = client(&["ws-client", "ws://ws.test/", "10", "--connect", &http]);
    assert_eq!(fresh["who"], "ws-b");
    // Longer than the backend read timeout (1 s): an idle WebSocket is not cut by it.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(held.ask("echo 50"), "ok 50");
    assert_eq!(held.ask("who"), "ws-a");
    assert_eq!(held.ask("close"), "closed");
    wait_until("the closed connection to leave the gauge", || {
        metric(proxy.metrics, "proxy_upgraded_connections") == 0.0
    });
}

#[test]
fn grpc_over_h2c_and_tls_to_h2c_and_verified_h2_backends() {
    let dir = tempfile::tempdir().unwrap();
    let (backend_cert, backend_key) = self_signed(dir.path(), "backend", &["backend.test"]);
    let h2c = Peer::start(&["grpc-server", "g-h2c"]);
    let h2 = Peer::start(&[
        "grpc-server",
        "g-h2",
        "--cert",
        &backend_cert.display().to_string(),
        "--key",
        &backend_key.display().to_string(),
    ]);
    let (cert, key) = self_signed(
        dir.path(),
        "front",
        &["grpc.test", "grpcs.test", "wrong.test"],
    );
    let tls = format!(
        "tls_cert_path = \"{}\"\ntls_key_path = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let body = format!(
        "[[virtual_hosts]]\ndomain = \"grpc.test\"\nenabled_backends_tag = \"c\"\n{tls}\n\
         [[virtual_hosts]]\ndomain = \"grpcs.test\"\nenabled_backends_tag = \"s\"\n{tls}\n\
         [[virtual_hosts]]\ndomain = \"wrong.test\"\nenabled_backends_tag = \"w\"\n{tls}\n\
         [[backends]]\nid = \"g-h2c\"\naddress = \"{}\"\ntags = [\"c\"]\nprotocol = \"h2c\"\n\n\
         [[backends]]\nid = \"g-h2\"\naddress = \"{}\"\ntags = [\"s\"]\nprotocol = \"h2\"\ntls_sni = \"backend.test\"\ntls_ca_path = \"{}\"\n\n\
         [[backends]]\nid = \"g-wrong-name\"\naddress = \"{}\"\ntags = [\"w\"]\nprotocol = \"h2\"\ntls_sni = \"other.test\"\ntls_ca_path = \"{}\"\n",
        h2c.addr,
        h2.addr,
        backend_cert.display(),
        h2.addr,
        backend_cert.display(),
    );
    // Backend reads time out after 1 s: the 1.5 s call with a 10 s deadline must still pass.
    let proxy = ProxyProcess::start(dir, "read_timeout_ms = 1000", &body, true);
    let (http, https) = (proxy.http.to_string(), proxy.https.to_string());
    let cert = cert.display().to_string();
    let expect = |report: &serde_json::Value, who: &str, unary: u64, bidi: u64| {
        assert_eq!(report["who"], who, "{report}");
        assert_eq!(report["unary"].as_u64(), Some(unary), "{report}");
        assert_eq!(report["bidi"].as_u64(), Some(bidi), "{report}");
        // A non-OK status and its message come back (trailers forwarded).
        assert_eq!(report["fail"], "INVALID_ARGUMENT", "{report}");
        // Deadlines hold through the proxy, and are not cut short by its read timeout.
        assert_eq!(report["deadline"], "DEADLINE_EXCEEDED", "{report}");
        assert_eq!(report["slow"], "slept", "{report}");
    };

    // Cleartext h2c (prior knowledge) on the HTTP listener, and TLS (ALPN h2), to an h2c backend.
    expect(
        &client(&["grpc-client", &http, "grpc.test"]),
        "g-h2c",
        100,
        1000,
    );
    expect(
        &client(&["grpc-client", &https, "grpc.test", "--ca", &cert]),
        "g-h2c",
        100,
        1000,
    );
    // To an h2 (TLS) backend whose certificate is verified against its CA.
    expect(
        &client(&[
            "grpc-client",
            &https,
            "grpcs.test",
            "--ca",
            &cert,
            "--unary",
            "20",
            "--bidi",
            "200",
        ]),
        "g-h2",
        20,
        200,
    );
    // Non-zero grpc-status is told apart from HTTP successes: the failing call of each of the two
    // runs, and possibly its expired call too (when the backend's DEADLINE_EXCEEDED reaches the
    // proxy before the client's cancellation does — a race a loaded machine can tip).
    let grpc_errors = metric(
        proxy.metrics,
        "proxy_requests_total{domain=\"grpc.test\",tag=\"c\",backend=\"g-h2c\",status=\"grpc_error\"}",
    );
    assert!((2.0..=4.0).contains(&grpc_errors), "{grpc_errors}");
    // Verification is on: a backend certificate that does not name tls_sni is refused.
    let rt = runtime();
    let (status, _) = rt.block_on(proxy.get(&client_http(), "wrong.test", "/"));
    assert_eq!(status, 502);
}

#[test]
fn http1_clients_reach_h2c_and_https_backends_and_unverified_ones_are_refused() {
    let rt = runtime();
    let h2c = TestBackend::start(&rt, "h2c-backend");
    let dir = tempfile::tempdir().unwrap();
    let (web_cert, web_key) = self_signed(dir.path(), "web", &["web.test"]);
    let https = Peer::start(&[
        "https-server",
        "tls-backend",
        &web_cert.display().to_string(),
        &web_key.display().to_string(),
    ]);
    let body = format!(
        "[[virtual_hosts]]\ndomain = \"h2c.test\"\nenabled_backends_tag = \"c\"\n\n\
         [[virtual_hosts]]\ndomain = \"tls.test\"\nenabled_backends_tag = \"t\"\n\n\
         [[virtual_hosts]]\ndomain = \"untrusted.test\"\nenabled_backends_tag = \"u\"\n\n\
         [[virtual_hosts]]\ndomain = \"unverified.test\"\nenabled_backends_tag = \"n\"\n\n\
         [[backends]]\nid = \"c1\"\naddress = \"{}\"\ntags = [\"c\"]\nprotocol = \"h2c\"\n\n\
         [[backends]]\nid = \"t1\"\naddress = \"{}\"\ntags = [\"t\"]\nprotocol = \"https\"\ntls_sni = \"web.test\"\ntls_ca_path = \"{}\"\n\n\
         [[backends]]\nid = \"u1\"\naddress = \"{}\"\ntags = [\"u\"]\nprotocol = \"https\"\ntls_sni = \"web.test\"\n\n\
         [[backends]]\nid = \"n1\"\naddress = \"{}\"\ntags = [\"n\"]\nprotocol = \"https\"\ntls_verify = false\n",
        h2c.addr,
        https.addr,
        web_cert.display(),
        https.addr,
        https.addr,
    );
    let proxy = ProxyProcess::start(dir, "", &body, false);
    let c = client_http();
    let (status, body) = rt.block_on(proxy.get(&c, "h2c.test", "/x"));
    assert_eq!(status, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    assert_eq!(seen["path"], "/x");
    let (status, body) = rt.block_on(proxy.get(&c, "tls.test", "/y"));
    assert_eq!((status, backend_of(&body)), (200, "tls-backend".to_owned()));
    // The system's roots do not include the test CA: refused.
    let (status, _) = rt.block_on(proxy.get(&c, "untrusted.test", "/"));
    assert_eq!(status, 502);
    // Unless verification is explicitly off.
    let (status, body) = rt.block_on(proxy.get(&c, "unverified.test", "/"));
    assert_eq!((status, backend_of(&body)), (200, "tls-backend".to_owned()));
}

#[test]
fn a_request_that_is_not_idempotent_is_never_sent_twice() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // A backend that reads a request and closes without answering.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            if matches!(std::io::Read::read(&mut stream, &mut buf), Ok(n) if n > 0) {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let body = format!(
        "[[virtual_hosts]]\ndomain = \"post.test\"\nenabled_backends_tag = \"a\"\n\n\
         [[backends]]\nid = \"closer\"\naddress = \"{addr}\"\ntags = [\"a\"]\n"
    );
    let proxy = ProxyProcess::start(
        tempfile::tempdir().unwrap(),
        "max_retries = 3",
        &body,
        false,
    );
    let rt = runtime();
    let status = rt.block_on(async {
        client_http()
            .post(proxy.http_url("/order"))
            .header("host", "post.test")
            .body("pay once")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    assert_eq!(status, 502);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "the POST reached the backend more than once"
    );
}

#[test]
fn health_probes_speak_each_backends_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "backend", &["backend.test"]);
    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
    let serving = Peer::start(&["grpc-server", "serving"]);
    let not_serving = Peer::start(&["grpc-server", "not-serving", "--health", "not-serving"]);
    let tls_grpc = Peer::start(&["grpc-server", "tls", "--cert", &cert_s, "--key", &key_s]);
    let https = Peer::start(&["https-server", "web", &cert_s, &key_s]);
    let rt = runtime();
    let h2c_http = TestBackend::start(&rt, "h2c-http");
    let backend = |id: &str, addr: SocketAddr, extra: &str| {
        format!("[[backends]]\nid = \"{id}\"\naddress = \"{addr}\"\ntags = [\"a\"]\n{extra}\n")
    };
    let body = format!(
        "[health_check]\ninterval_secs = 1\ntimeout_secs = 2\nunhealthy_threshold = 1\nhealthy_threshold = 1\n\n\
         [[virtual_hosts]]\ndomain = \"h.test\"\nenabled_backends_tag = \"a\"\n\n{}{}{}{}{}",
        backend("serving", serving.addr, "protocol = \"h2c\"\nhealth_check = { kind = \"grpc\" }"),
        backend("not-serving", not_serving.addr, "protocol = \"h2c\"\nhealth_check = { kind = \"grpc\" }"),
        backend(
            "tls-grpc",
            tls_grpc.addr,
            &format!("protocol = \"h2\"\ntls_sni = \"backend.test\"\ntls_ca_path = \"{cert_s}\"\nhealth_check = {{ kind = \"grpc\" }}"),
        ),
        backend(
            "https",
            https.addr,
            &format!("protocol = \"https\"\ntls_sni = \"backend.test\"\ntls_ca_path = \"{cert_s}\"\nhealth_check = {{ kind = \"http\", path = \"/healthz\" }}"),
        ),
        // An HTTP probe of an h2c backend goes over HTTP/2 (the harness backend speaks both).
        backend(
            "h2c-http",
            h2c_http.addr,
            "protocol = \"h2c\"\nhealth_check = { kind = \"http\", path = \"/healthz\" }",
        ),
    );
    let proxy = ProxyProcess::start(dir, "", &body, false);
    let health = || -> std::collections::BTreeMap<String, String> {
        let list = proxy.admin_json(&rt, "/api/v1/backends");
        let list = list.as_array().unwrap();
        list.iter()
            .map(|b| {
                (
                    b["id"].as_str().unwrap().to_owned(),
                    b["health"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    wait_until("every backend to be probed in its protocol", || {
        let seen = health();
        seen["not-serving"] == "down"
            && ["serving", "tls-grpc", "https", "h2c-http"]
                .iter()
                .all(|id| seen[*id] == "up")
    });
}
