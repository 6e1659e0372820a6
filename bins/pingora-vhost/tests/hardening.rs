//! The real binary against hostile and careless clients: slow and idle connections, floods,
//! oversized heads, pipelining, backends that never answer, clients that give up, shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn one_domain(backend: &TestBackend, extra: &str) -> String {
    one_domain_at(backend.addr, extra)
}

/// `one.test` with `extra` in its section, served by the one backend `b1` at `addr`.
fn one_domain_at(addr: impl std::fmt::Display, extra: &str) -> String {
    format!(
        "[[virtual_hosts]]\ndomain = \"one.test\"\nenabled_backends_tag = \"a\"\n{extra}\n\n[[backends]]\nid = \"b1\"\naddress = \"{addr}\"\ntags = [\"a\"]\n"
    )
}

/// A backend `b1` and a proxy with `proxy_extra` serving `one.test` from it.
fn one_domain_proxy(
    rt: &std::sync::Arc<tokio::runtime::Runtime>,
    proxy_extra: &str,
) -> (TestBackend, ProxyProcess) {
    let backend = TestBackend::start(rt, "b1");
    let proxy = ProxyProcess::start(
        tempfile::tempdir().unwrap(),
        proxy_extra,
        &one_domain(&backend, ""),
        false,
    );
    (backend, proxy)
}

const GET_ONE: &[u8] = b"GET / HTTP/1.1\r\nHost: one.test\r\n\r\n";

#[test]
fn slow_idle_and_oversized_clients_are_cut_off() {
    let rt = runtime();
    let (backend, proxy) = one_domain_proxy(&rt, "client_header_timeout_ms = 600\nclient_keepalive_timeout_ms = 600\nmax_request_header_bytes = 2048");

    // A head that trickles in one byte every 100 ms (slowloris) is cut at the header deadline.
    let mut slow = raw_connect(proxy.http);
    let start = Instant::now();
    let mut writer = slow.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for b in GET_ONE.iter().cycle().take(600) {
            if writer.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let took = wait_closed(&mut slow, start);
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "slow head cut after {took:?}"
    );
    trickle.join().unwrap();

    // A connection that never sends anything is closed at the same deadline.
    let mut silent = raw_connect(proxy.http);
    let took = wait_closed(&mut silent, Instant::now());
    assert!(took >= Duration::from_millis(500), "{took:?}");

    // A finished keep-alive connection is closed after the idle timeout, not kept forever.
    let mut idle = raw_connect(proxy.http);
    idle.write_all(GET_ONE).unwrap();
    let (status, head, body) = read_response(&mut idle);
    assert_eq!(status, 200, "{head}{body}");
    assert!(
        head.to_ascii_lowercase().contains("connection: keep-alive"),
        "{head}"
    );
    let took = wait_closed(&mut idle, Instant::now());
    assert!(took >= Duration::from_millis(500), "{took:?}");

    // A head over the limit gets 431 and the connection closes; one under it is served.
    let mut big = raw_connect(proxy.http);
    let filler = "x".repeat(3000);
    write!(
        big,
        "GET / HTTP/1.1\r\nHost: one.test\r\nX-Filler: {filler}\r\n\r\n"
    )
    .unwrap();
    let (status, _, body) = read_response(&mut big);
    assert_eq!(status, 431, "{body}");
    wait_closed(&mut big, Instant::now());
    let mut fits = raw_connect(proxy.http);
    let filler = "x".repeat(1500);
    write!(
        fits,
        "GET / HTTP/1.1\r\nHost: one.test\r\nX-Filler: {filler}\r\n\r\n"
    )
    .unwrap();
    assert_eq!(read_response(&mut fits).0, 200);

    let closed = |reason: &str| {
        metric(
            proxy.metrics,
            &format!("proxy_connections_closed_total{{reason=\"{reason}\"}}"),
        )
    };
    assert!(closed("header_timeout") >= 2.0);
    assert!(closed("keepalive_timeout") >= 1.0);
    assert_eq!(closed("header_too_large"), 1.0);
    assert_eq!(
        backend.hits(),
        2,
        "only the two complete requests reach the backend"
    );
    // None of this is an error worth a log line per client.
    assert!(!proxy.log().contains("ERROR"), "{}", proxy.log());
}

#[test]
fn tls_handshakes_and_idle_tls_connections_are_bounded_too() {
    let rt = runtime();
    let backend = TestBackend::start(&rt, "b1");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "one", &["one.test"]);
    let extra = format!(
        "tls_cert_path = \"{}\"\ntls_key_path = \"{}\"",
        cert.display(),
        key.display()
    );
    let proxy = ProxyProcess::start(
        dir,
        "client_header_timeout_ms = 600\nclient_keepalive_timeout_ms = 600",
        &one_domain(&backend, &extra),
        true,
    );
    // TCP connected, handshake never started.
    let mut silent = raw_connect(proxy.https);
    let took = wait_closed(&mut silent, Instant::now());
    assert!(took >= Duration::from_millis(500), "{took:?}");

    // A TLS keep-alive connection idle after its response.
    let mut connector =
        openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
    connector.set_verify(openssl::ssl::SslVerifyMode::NONE);
    let connector = connector.build();
    let tcp = raw_connect(proxy.https);
    let mut tls = connector.connect("one.test", tcp).unwrap();
    tls.write_all(GET_ONE).unwrap();
    assert_eq!(read_response(&mut tls).0, 200);
    let took = wait_closed(&mut tls, Instant::now());
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(
        metric(
            proxy.metrics,
            "proxy_connections_closed_total{reason=\"keepalive_timeout\"}"
        ) >= 1.0
    );
}

#[test]
fn pipelined_requests_are_answered_in_order_on_the_same_connection() {
    let rt = runtime();
    let (_backend, proxy) = one_domain_proxy(&rt, "");
    let mut s = raw_connect(proxy.http);
    s.write_all(b"GET /first HTTP/1.1\r\nHost: one.test\r\n\r\nGET /second HTTP/1.1\r\nHost: one.test\r\n\r\nGET /third HTTP/1.1\r\nHost: one.test\r\n\r\n")
        .unwrap();
    for path in ["/first", "/second", "/third"] {
        let (status, _, body) = read_response(&mut s);
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["path"], path);
    }
    // The connection is still usable afterwards.
    s.write_all(b"GET /fourth HTTP/1.1\r\nHost: one.test\r\n\r\n")
        .unwrap();
    let (_, _, body) = read_response(&mut s);
    assert!(body.contains("/fourth"), "{body}");
}

/// While an answer takes long (over 100 ms) the proxy watches the client connection; the next
/// request's first bytes read then are kept for it, not lost (over plain HTTP and TLS).
#[test]
fn a_request_pipelined_during_a_slow_answer_is_answered_next() {
    let rt = runtime();
    let (backend, proxy) = one_domain_proxy(&rt, "");
    let mut s = raw_connect(proxy.http);
    let before = backend.hits();
    s.write_all(b"GET /slow/400 HTTP/1.1\r\nHost: one.test\r\n\r\n")
        .unwrap();
    // Sent once the first request is with the backend, so that the proxy reads it while it
    // waits for the answer (not together with the first).
    wait_until("the slow request to reach the backend", || {
        backend.hits() > before
    });
    s.write_all(b"GET /next HTTP/1.1\r\nHost: one.test\r\n\r\n")
        .unwrap();
    for path in ["/slow/400", "/next"] {
        let (status, _, body) = read_response(&mut s);
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["path"], path);
        // A lost first byte would leave a request for method `ET`.
        assert_eq!(v["method"], "GET");
    }
}

/// A client that closes its side while the backend takes long is noticed: no answer, the
/// connection closed, counted as a client that went away.
#[test]
fn a_client_leaving_during_a_slow_answer_is_noticed() {
    let rt = runtime();
    let (_backend, proxy) = one_domain_proxy(&rt, "");
    let mut s = raw_connect(proxy.http);
    s.write_all(b"GET /slow/3000 HTTP/1.1\r\nHost: one.test\r\n\r\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    // Not noticed, the answer would come after 3 s.
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut got);
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    wait_until("the request to be counted as a client gone", || {
        metric(proxy.metrics, "proxy_client_errors_total") >= 1.0
    });
}

#[test]
fn a_connection_flood_is_refused_past_max_connections_and_backends_stay_healthy() {
    let rt = runtime();
    let backend = TestBackend::start(&rt, "b1");
    // 600 descriptors, 16 pooled upstream connections: room for (600 - 256 - 16) / 2 = 164
    // client connections, the default max_connections.
    let proxy = ProxyProcess::start_wrapped(
        tempfile::tempdir().unwrap(),
        "upstream_keepalive_pool_size = 16\nclient_header_timeout_ms = 60000",
        "format = \"json\"",
        &format!(
            "[health_check]\nkind = \"http\"\ninterval_secs = 1\ntimeout_secs = 1\nunhealthy_threshold = 1\n\n{}",
            one_domain(&backend, "")
        ),
        false,
        &["prlimit", "--nofile=300:600", "--"],
    );
    assert!(
        proxy.log().contains("\"max_connections\":164")
            && proxy.log().contains("\"file_descriptors\":600"),
        "the descriptor limit was not raised to the hard limit:\n{}",
        proxy.log()
    );
    let flood: Vec<TcpStream> = (0..400).map(|_| raw_connect(proxy.http)).collect();
    wait_until("connections past the limit to be refused", || {
        metric(proxy.metrics, "proxy_connections_rejected_total") >= 236.0
    });
    assert_eq!(metric(proxy.metrics, "proxy_connections_open"), 164.0);
    // Probes keep running while the flood holds every client slot: the backend stays up.
    let probes_before = backend.hits();
    wait_until("two more health probes", || {
        backend.hits() >= probes_before + 2
    });
    assert_eq!(
        metric(proxy.metrics, "health_check_status{backend=\"b1\"}"),
        1.0
    );
    drop(flood);
    // The moment the flood is gone, requests are served (no window of 503s).
    wait_until("the flood to be closed", || {
        metric(proxy.metrics, "proxy_connections_open") == 0.0
    });
    let mut s = raw_connect(proxy.http);
    s.write_all(GET_ONE).unwrap();
    assert_eq!(read_response(&mut s).0, 200);
    let log = proxy.log();
    assert!(
        !log.contains("\"to\":\"down\"") && !log.contains("Accept() failed"),
        "{log}"
    );
}

#[test]
fn a_backend_that_does_not_answer_in_time_gets_504() {
    let rt = runtime();
    let backend = TestBackend::start(&rt, "b1");
    let proxy = ProxyProcess::start_logged(
        tempfile::tempdir().unwrap(),
        "read_timeout_ms = 300",
        "format = \"json\"",
        &one_domain(&backend, ""),
        false,
    );
    let mut s = raw_connect(proxy.http);
    s.write_all(b"GET /slow/3000 HTTP/1.1\r\nHost: one.test\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).0, 504);
    // The answer leaves before the request is counted (logging runs after it): wait for both.
    wait_until("the timeout counted", || {
        metric(
            proxy.metrics,
            "proxy_local_responses_total{reason=\"upstream_timeout\"}",
        ) == 1.0
    });
    // The backend is named in the request metrics: it is the one that timed out.
    let series =
        "proxy_requests_total{domain=\"one.test\",tag=\"a\",backend=\"b1\",status=\"5xx\"}";
    wait_until("the request counted against b1", || {
        metric(proxy.metrics, series) == 1.0
    });
    wait_until("the access-log line", || {
        proxy.log().contains("\"local\":\"upstream_timeout\"")
    });
}

/// A backend that stops in the middle of a body: after `read_timeout_ms` of silence the
/// client connection is closed (its answer cannot be completed), on both proxy paths.
#[test]
fn a_backend_that_stalls_mid_body_is_cut_off_after_the_read_timeout() {
    use std::io::Read;
    let rt = runtime();
    // Never the rest of the body; the connection held until the proxy gives up on it.
    let addr = canned_backend(
        &rt,
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        true,
    );
    let body = format!(
        "{}[health_check]\ninterval_secs = 3600\n",
        one_domain_at(addr, "")
    );
    on_both_paths("read_timeout_ms = 300", &body, |proxy, fast| {
        let mut s = raw_connect(proxy.http);
        s.write_all(GET_ONE).unwrap();
        let started = Instant::now();
        let mut got = Vec::new();
        // Ends (EOF or reset) once the proxy gives up; `raw_connect`'s read timeout would fail
        // the test if it never did.
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("fast path {fast}: {e} after {:?}", started.elapsed()),
            }
        }
        let got = String::from_utf8_lossy(&got).into_owned();
        assert!(got.starts_with("HTTP/1.1 200 "), "fast path {fast}: {got}");
        assert!(got.ends_with("abc"), "fast path {fast}: {got}");
    });
}

#[test]
fn clients_that_give_up_do_not_flood_the_log() {
    let rt = runtime();
    let backend = TestBackend::start(&rt, "b1");
    let proxy = ProxyProcess::start_logged(
        tempfile::tempdir().unwrap(),
        "",
        "access_log = false",
        &one_domain(&backend, ""),
        false,
    );
    // 100 clients send a request and hang up while the backend is still working on it (for a
    // minute: they are counted only if the proxy watches the client connection meanwhile)...
    let waiting: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = raw_connect(proxy.http);
            s.write_all(b"GET /slow/60000 HTTP/1.1\r\nHost: one.test\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    wait_until("every request to reach the backend", || {
        backend.hits() == 100
    });
    drop(waiting);
    // ...and 100 more hang up in the middle of their request head.
    for _ in 0..100 {
        let mut half = raw_connect(proxy.http);
        half.write_all(b"GET / HTTP/1.1\r\nHost: one").unwrap();
    }
    wait_until("the abandoned requests to be counted", || {
        metric(proxy.metrics, "proxy_client_errors_total") == 100.0
            && metric(
                proxy.metrics,
                "proxy_connections_closed_total{reason=\"client_closed\"}",
            ) == 100.0
    });
    let log = proxy.log();
    let noisy: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .filter(|l| !l.contains("no certificate configured"))
        .collect();
    assert!(noisy.is_empty(), "{log}");
}

#[test]
fn shutdown_cuts_what_is_left_at_the_grace_deadline_and_logs_it() {
    let rt = runtime();
    let backend = TestBackend::start(&rt, "b1");
    let mut proxy = ProxyProcess::start_logged(
        tempfile::tempdir().unwrap(),
        "grace_period_secs = 1",
        "format = \"json\"",
        &one_domain(&backend, ""),
        false,
    );
    let mut s = raw_connect(proxy.http);
    s.write_all(b"GET /slow/20000 HTTP/1.1\r\nHost: one.test\r\n\r\n")
        .unwrap();
    wait_until("the request to reach the backend", || backend.hits() == 1);
    proxy.signal("TERM");
    let mut exit = None;
    wait_until("the proxy to exit", || {
        exit = proxy.child.try_wait().unwrap();
        exit.is_some()
    });
    assert!(exit.unwrap().success());
    let log = proxy.log();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(
        log.contains("grace period over") && log.contains("\"requests\":1"),
        "{log}"
    );
    assert!(!log.contains("all in-flight requests finished"), "{log}");
    let cut = log
        .lines()
        .find(|l| l.contains("\"target\":\"access\""))
        .unwrap_or_else(|| panic!("no access-log line for the cut request:\n{log}"));
    assert!(
        cut.contains("\"local\":\"cut\"")
            && cut.contains("/slow/20000")
            && cut.contains("\"method\":\"GET\""),
        "{cut}"
    );
}

#[test]
fn sigint_is_reported_as_sigint() {
    let rt = runtime();
    let (_backend, mut proxy) = one_domain_proxy(&rt, "");
    proxy.signal("INT");
    wait_until("the proxy to exit", || {
        proxy.child.try_wait().unwrap().is_some()
    });
    let log = proxy.log();
    assert!(log.contains("SIGINT received"), "{log}");
    assert!(!log.contains("SIGTERM"), "{log}");
    assert!(log.contains("all in-flight requests finished"), "{log}");
}

#[test]
fn idle_keep_alive_connections_wait_in_the_connection_loop() {
    // Between requests the connection loop itself waits for the next one (holding a few KiB,
    // not Pingora's request state); it does so only when it knows where the previous request
    // ended on the wire. Observable: the idle timeout applies alone (a session started on an
    // unknown boundary would allow the header timeout on top).
    let rt = runtime();
    let (_backend, proxy) = one_domain_proxy(
        &rt,
        "client_header_timeout_ms = 8000\nclient_keepalive_timeout_ms = 300",
    );
    let requests: [&[u8]; 3] = [
        GET_ONE,
        b"POST /p HTTP/1.1\r\nHost: one.test\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /a HTTP/1.1\r\nHost: one.test\r\n\r\n",
    ];
    for request in requests {
        let mut s = raw_connect(proxy.http);
        s.write_all(request).unwrap();
        assert_eq!(read_response(&mut s).0, 200);
        let took = wait_closed(&mut s, Instant::now());
        assert!(
            took < Duration::from_secs(4),
            "idle connection closed only after {took:?}: the loop did not know the request's end"
        );
    }
}
