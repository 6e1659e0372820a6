//! The real binary proxying real traffic to real loopback backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use common::*;

fn backends_toml(list: &[(&str, String, &str)]) -> String {
    list.iter()
        .map(|(id, addr, tags)| {
            format!("[[backends]]\nid = \"{id}\"\naddress = \"{addr}\"\ntags = [{tags}]\n\n")
        })
        .collect()
}

fn vhost_toml(domain: &str, tag: &str, extra: &str) -> String {
    format!(
        "[[virtual_hosts]]\ndomain = \"{domain}\"\nenabled_backends_tag = \"{tag}\"\n{extra}\n\n"
    )
}

#[test]
fn two_domains_go_to_their_own_pools_and_unknown_hosts_are_never_forwarded() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let b = TestBackend::start(&rt, "b1");
    let body = format!(
        "{}{}{}",
        vhost_toml("one.test", "a", ""),
        vhost_toml("two.test", "b", ""),
        backends_toml(&[
            ("a1", a.addr.to_string(), "\"a\""),
            ("b1", b.addr.to_string(), "\"b\"")
        ])
    );
    let proxy = ProxyProcess::start(tempfile::tempdir().unwrap(), "", &body, false);
    let c = client(&[], true);
    rt.block_on(async {
        for _ in 0..5 {
            let r = c
                .get(proxy.http_url("/p?q=1"))
                .header("host", "ONE.test:80")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let text = r.text().await.unwrap();
            assert_eq!(backend_of(&text), "a1");
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["path"], "/p?q=1");
            assert_eq!(v["x-forwarded-for"], "127.0.0.1");
            assert_eq!(v["x-forwarded-proto"], "http");
            assert_eq!(v["x-forwarded-host"], "ONE.test:80");
            let r = c
                .get(proxy.http_url("/"))
                .header("host", "two.test")
                .send()
                .await
                .unwrap();
            assert_eq!(backend_of(&r.text().await.unwrap()), "b1");
        }
        let before = (a.hits(), b.hits());
        for host in ["unknown.test", "evil.example.com", "one.test.evil", "[::1]"] {
            let r = c
                .get(proxy.http_url("/"))
                .header("host", host)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 404, "{host}");
            assert_eq!(r.text().await.unwrap(), "unknown host\n");
        }
        // An absolute-form request naming a backend's own address is not an open proxy either.
        let mut raw = raw_connect(proxy.http);
        raw.write_all(
            format!(
                "GET http://{0}/ HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
                a.addr
            )
            .as_bytes(),
        )
        .unwrap();
        let (status, _, _) = read_response(&mut raw);
        assert_eq!(status, 404, "absolute-form request for an unknown host");
        assert_eq!(
            (a.hits(), b.hits()),
            before,
            "a request for an unknown host reached a backend"
        );
        // X-Forwarded-For is appended to, not replaced.
        let r = c
            .get(proxy.http_url("/"))
            .header("host", "one.test")
            .header("x-forwarded-for", "203.0.113.9")
            .send()
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(v["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    });
}

#[test]
fn http_to_https_redirects_keep_path_and_query_except_acme_challenges() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let body = format!(
        "{}{}{}",
        vhost_toml("secure.test", "a", "http_to_https = true"),
        vhost_toml("plain.test", "a", ""),
        backends_toml(&[("a1", a.addr.to_string(), "\"a\"")])
    );
    let proxy = ProxyProcess::start(tempfile::tempdir().unwrap(), "", &body, false);
    let c = client(&[], true);
    rt.block_on(async {
        let r = c
            .get(proxy.http_url("/a/b?x=1&y=%20z"))
            .header("host", "Secure.test:8080")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 308);
        assert_eq!(
            r.headers()["location"],
            format!("https://secure.test:{}/a/b?x=1&y=%20z", proxy.https.port()).as_str()
        );
        assert_eq!(a.hits(), 0);
        let r = c
            .get(proxy.http_url("/.well-known/acme-challenge/token123"))
            .header("host", "secure.test")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(a.hits(), 1);
        let r = c
            .get(proxy.http_url("/"))
            .header("host", "plain.test")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    });
}

#[test]
fn tls_serves_each_sni_its_own_certificate_h2_and_rejects_misdirected_hosts() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let b = TestBackend::start(&rt, "b1");
    let dir = tempfile::tempdir().unwrap();
    let (ca, ka) = self_signed(dir.path(), "one", &["one.test"]);
    let (cw, kw) = self_signed(dir.path(), "wild", &["*.wild.test"]);
    let (cd, kd) = self_signed(dir.path(), "default", &["default.invalid"]);
    let body = format!(
        "{}{}{}{}",
        vhost_toml(
            "one.test",
            "a",
            &format!(
                "tls_cert_path = \"{}\"\ntls_key_path = \"{}\"",
                ca.display(),
                ka.display()
            )
        ),
        vhost_toml(
            "*.wild.test",
            "b",
            &format!(
                "tls_cert_path = \"{}\"\ntls_key_path = \"{}\"",
                cw.display(),
                kw.display()
            )
        ),
        vhost_toml("nocert.test", "a", ""),
        backends_toml(&[
            ("a1", a.addr.to_string(), "\"a\""),
            ("b1", b.addr.to_string(), "\"b\"")
        ])
    );
    let proxy_extra = format!(
        "default_cert_path = \"{}\"\ndefault_key_path = \"{}\"",
        cd.display(),
        kd.display()
    );
    let proxy = ProxyProcess::start(dir, &proxy_extra, &body, true);
    let names = [
        ("one.test", proxy.https),
        ("x.wild.test", proxy.https),
        ("nocert.test", proxy.https),
    ];
    let port = proxy.https.port();
    rt.block_on(async {
        let h2 = client(&names, false);
        for (host, cn, backend) in [
            ("one.test", "one.test", "a1"),
            ("x.wild.test", "*.wild.test", "b1"),
            ("nocert.test", "default.invalid", "a1"),
        ] {
            let r = h2
                .get(format!("https://{host}:{port}/s"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{host}");
            assert_eq!(
                r.version(),
                reqwest::Version::HTTP_2,
                "{host} should negotiate h2"
            );
            let der = r
                .extensions()
                .get::<reqwest::tls::TlsInfo>()
                .and_then(|t| t.peer_certificate())
                .map(<[u8]>::to_vec)
                .unwrap();
            assert_eq!(common_name(&der), cn, "{host} got the wrong certificate");
            let text = r.text().await.unwrap();
            assert_eq!(backend_of(&text), backend);
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["x-forwarded-proto"], "https");
        }
        // SNI one.test, Host of another configured domain: 421, never forwarded.
        let h1 = client(&names, true);
        let before = b.hits();
        let r = h1
            .get(format!("https://one.test:{port}/"))
            .header("host", "x.wild.test")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 421);
        assert_eq!(r.version(), reqwest::Version::HTTP_11);
        assert_eq!(b.hits(), before);
    });
}

#[test]
fn a_dead_backend_costs_clients_nothing_while_a_sibling_is_up() {
    let rt = runtime();
    let live = TestBackend::start(&rt, "live");
    let mut dying = TestBackend::start(&rt, "dying");
    // Probes far apart: the backend that dies below is still "healthy" for routing, so the
    // proxy really connects to it, fails, and retries on the sibling.
    let body = format!(
        "[health_check]\ninterval_secs = 3600\n\n{}{}",
        vhost_toml("app.test", "a", ""),
        backends_toml(&[
            ("dying", dying.addr.to_string(), "\"a\""),
            ("live", live.addr.to_string(), "\"a\"")
        ])
    );
    // No upstream keep-alive: every attempt is a new connection, refused once the backend died.
    let proxy = ProxyProcess::start(
        tempfile::tempdir().unwrap(),
        "upstream_keepalive_pool_size = 0",
        &body,
        false,
    );
    let c = client(&[], true);
    wait_until("both backends served once", || {
        rt.block_on(proxy.get(&c, "app.test", "/")).0 == 200 && dying.hits() > 0 && live.hits() > 0
    });
    dying.kill_all();
    let live_before = live.hits();
    rt.block_on(async {
        for i in 0..40 {
            let r = c
                .get(proxy.http_url("/"))
                .header("host", "app.test")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "request {i} failed");
            assert_eq!(backend_of(&r.text().await.unwrap()), "live");
        }
    });
    assert_eq!(live.hits() - live_before, 40);
    let retries = metric(
        proxy.metrics,
        "proxy_retries_total{domain=\"app.test\",tag=\"a\"}",
    );
    let failures = metric(
        proxy.metrics,
        "proxy_upstream_connect_failures_total{backend=\"dying\"}",
    );
    assert!(retries >= 1.0, "no request was retried");
    assert!(failures >= 1.0, "the dead backend was never tried");
}

#[test]
fn no_backend_or_no_healthy_backend_is_503_with_retry_after() {
    let rt = runtime();
    let body = format!(
        "{}{}{}",
        vhost_toml("empty.test", "nobody", ""),
        vhost_toml("dead.test", "d", ""),
        backends_toml(&[("dead", format!("127.0.0.1:{}", free_port()), "\"d\"")])
    );
    let proxy = ProxyProcess::start(tempfile::tempdir().unwrap(), "", &body, false);
    let c = client(&[], true);
    rt.block_on(async {
        let r = c
            .get(proxy.http_url("/"))
            .header("host", "empty.test")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "5");
    });
    // The only backend of dead.test refuses connections: its first health probe marks it down,
    // then the proxy answers 503 itself instead of trying it.
    wait_until("the dead backend to be marked down", || {
        rt.block_on(async {
            let r = c
                .get(proxy.admin_url("/api/v1/backends/dead"))
                .send()
                .await
                .unwrap();
            r.text().await.unwrap().contains("\"health\":\"down\"")
        })
    });
    rt.block_on(async {
        let r = c
            .get(proxy.http_url("/"))
            .header("host", "dead.test")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "5");
        assert_eq!(
            r.text().await.unwrap(),
            "no healthy backend for this domain\n"
        );
    });
}

#[test]
fn sigterm_lets_an_in_flight_request_finish_then_exits() {
    let rt = runtime();
    let slow = TestBackend::start(&rt, "slow");
    let body = format!(
        "{}{}",
        vhost_toml("slow.test", "a", ""),
        backends_toml(&[("slow", slow.addr.to_string(), "\"a\"")])
    );
    let mut proxy = ProxyProcess::start(tempfile::tempdir().unwrap(), "", &body, false);
    let c = client(&[], true);
    let url = proxy.http_url("/slow/1500");
    let request = rt.spawn(async move {
        let r = c.get(url).header("host", "slow.test").send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    wait_until("the slow request to reach the backend", || slow.hits() == 1);
    proxy.signal("TERM");
    // The listener closes at once, while the in-flight request is still running.
    wait_until("new connections to be refused", || {
        std::net::TcpStream::connect_timeout(&proxy.http, Duration::from_millis(500)).is_err()
    });
    assert!(
        !request.is_finished(),
        "the slow request ended before the listener closed"
    );
    let (status, text) = rt.block_on(request).unwrap();
    assert_eq!(
        status,
        200,
        "in-flight request was cut: {text}\n{}",
        proxy.log()
    );
    assert_eq!(backend_of(&text), "slow");
    let mut exit = None;
    wait_until("the proxy to exit", || {
        exit = proxy.child.try_wait().unwrap();
        exit.is_some()
    });
    assert!(exit.unwrap().success(), "{}", proxy.log());
}

#[test]
fn check_flag_validates_config_and_certificates() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config.example.toml");
    let out = Command::new(binary())
        .args(["--check", "--config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    // The example a newcomer copies starts without warnings.
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "[[virtual_hosts]]\ndomain = \"bad..name\"\nenabled_backends_tag = \"a\"\n",
    )
    .unwrap();
    let out = Command::new(binary())
        .arg("--check")
        .arg("--config")
        .arg(&broken)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.toml:2:10: virtual_hosts[0].domain"),
        "{err}"
    );
    assert!(err.contains("empty label"), "{err}");

    let missing_cert = dir.path().join("cert.toml");
    std::fs::write(
        &missing_cert,
        "[[virtual_hosts]]\ndomain = \"a.test\"\nenabled_backends_tag = \"a\"\ntls_cert_path = \"/nonexistent.crt\"\ntls_key_path = \"/nonexistent.key\"\n",
    )
    .unwrap();
    let out = Command::new(binary())
        .arg("--check")
        .arg("--config")
        .arg(&missing_cert)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent.crt") && err.contains("a.test"),
        "{err}"
    );
}

/// A response streamed in chunks reaches the client chunk by chunk over HTTPS as over HTTP:
/// the proxy gathers small writes above TLS into one record, but never past a flush, and
/// Pingora flushes after every chunk. The backend sends the second chunk only once the client
/// has the first, so anything held back would stall the exchange into the deadline.
#[test]
fn streamed_chunks_reach_the_client_one_by_one_over_http_and_https() {
    use tokio::io::AsyncWriteExt;
    let rt = runtime();
    let (got_first, first_seen) = tokio::sync::mpsc::unbounded_channel::<()>();
    let first_seen = std::sync::Arc::new(tokio::sync::Mutex::new(first_seen));
    let backend = raw_backend(&rt, move |mut s| {
        let seen = std::sync::Arc::clone(&first_seen);
        async move {
            let mut head = Vec::new();
            if read_head(&mut s, &mut head).await.is_none() {
                return;
            }
            if !head.starts_with(b"GET /stream ") {
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
                return;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nfirst\r\n")
                .await;
            // Only once the client holds the first chunk.
            if seen.lock().await.recv().await.is_none() {
                return;
            }
            let _ = s.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await;
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "stream", &["stream.test"]);
    let body = format!(
        "[health_check]\ninterval_secs = 3600\n\n{}{}",
        vhost_toml(
            "stream.test",
            "a",
            &format!(
                "tls_cert_path = \"{}\"\ntls_key_path = \"{}\"",
                cert.display(),
                key.display()
            )
        ),
        backends_toml(&[("s1", backend.to_string(), "\"a\"")]),
    );
    let proxy = ProxyProcess::start(dir, "", &body, true);
    for (scheme, addr) in [("http", proxy.http), ("https", proxy.https)] {
        let c = client(&[("stream.test", addr)], true);
        let url = format!("{scheme}://stream.test:{}/stream", addr.port());
        let got_first = got_first.clone();
        let text = rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(10), async move {
                let mut r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let mut text = String::new();
                while !text.contains("first") {
                    let chunk = r.chunk().await.unwrap().expect("the first chunk");
                    text.push_str(std::str::from_utf8(&chunk).unwrap());
                }
                got_first.send(()).unwrap();
                while let Some(chunk) = r.chunk().await.unwrap() {
                    text.push_str(std::str::from_utf8(&chunk).unwrap());
                }
                text
            })
            .await
            .unwrap_or_else(|_| panic!("{scheme}: the first chunk was held back"))
        });
        assert_eq!(text, "firstsecond", "{scheme}");
    }
}

/// A backend that answers every request with the head it received (request line, then the
/// fields as `name: value` with the name lowercased, sorted, one per line; a generated
/// `x-request-id` shown as `<id>`, as it differs per request) and drains a `Content-Length`
/// body.
fn echo_head_backend(rt: &tokio::runtime::Runtime) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw_backend(rt, |mut s| async move {
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        while let Some(end) = read_head(&mut s, &mut data).await {
            let head = String::from_utf8_lossy(&data[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let request_line = lines.next().unwrap_or_default().to_owned();
            let mut names: Vec<String> = Vec::new();
            let mut length = 0usize;
            for line in lines.filter(|l| !l.is_empty()) {
                let (k, v) = line.split_once(':').unwrap_or((line, ""));
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    length = v.trim().parse().unwrap_or(0);
                }
                let v = v.trim();
                // A generated id (a UUID) differs per request.
                let v = if k == "x-request-id" && v.len() == 36 {
                    "<id>"
                } else {
                    v
                };
                names.push(format!("{k}: {v}"));
            }
            names.sort();
            while data.len() < end + length {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => data.extend_from_slice(&buf[..n]),
                }
            }
            data.drain(..end + length);
            let body = format!("{request_line}\n{}\n", names.join("\n"));
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
}

/// What the backend receives is the same whichever path a request takes (the HTTP/1.1 fast path
/// or Pingora's general one, `h1_fast_path = false`): hop-by-hop fields and the fields the
/// `Connection` header names are removed, the forwarding headers added, HTTP/1.1 spoken — for
/// requests the fast path serves (GETs) and ones it hands over (a body, a `Connection` option
/// naming a field).
#[test]
fn the_fast_path_and_pingoras_path_send_backends_the_same_request() {
    use std::io::Read;
    let rt = runtime();
    let backend = echo_head_backend(&rt);
    let body = format!(
        "[health_check]\ninterval_secs = 3600\n\n{}{}",
        vhost_toml("echo.test", "a", ""),
        backends_toml(&[("e1", backend.to_string(), "\"a\"")]),
    );
    let requests: [&[u8]; 8] = [
        b"GET /a?b=c HTTP/1.1\r\nHost: echo.test\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-T\r\nProxy-Authorization: Basic eDp5\r\nProxy-Connection: keep-alive\r\nX-Keep: 1\r\n\r\n",
        // Forwarded fields from the client: the chain extended, the others replaced, a sane
        // request id kept.
        b"GET /f HTTP/1.1\r\nHost: echo.test\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: ftp\r\nX-Forwarded-Host: elsewhere\r\nX-Request-Id: given-1\r\nX-Keep: a\r\nx-keep: b\r\n\r\n",
        // Two request ids: neither kept.
        b"GET /g HTTP/1.1\r\nHost: echo.test\r\nX-Request-Id: one\r\nX-Request-Id: two\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: echo.test\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: echo.test\r\nTE: trailers\r\nContent-Length: 5\r\n\r\nhello",
        b"GET / HTTP/1.0\r\nHost: echo.test\r\nConnection: keep-alive\r\nX-Keep: 1\r\n\r\n",
        b"HEAD / HTTP/1.1\r\nHost: echo.test\r\nConnection: close\r\nClose: named\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: echo.test\r\nConnection: close\r\nClose: named\r\n\r\n",
    ];
    let mut seen: Vec<Vec<(u16, String)>> = Vec::new();
    on_both_paths("", &body, |proxy, _| {
        let mut answers = Vec::new();
        for request in requests {
            let mut s = raw_connect(proxy.http);
            s.write_all(request).unwrap();
            if request.starts_with(b"HEAD") {
                // No body on a HEAD answer: what the backend saw is not readable; the status is.
                let head = read_response_head(&mut s);
                assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
                answers.push((200, String::new()));
                continue;
            }
            let (status, _, echoed) = read_response(&mut s);
            answers.push((status, echoed));
            let mut rest = [0u8; 1];
            s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            let _ = s.read(&mut rest);
        }
        seen.push(answers);
    });
    eprintln!("SEEN {seen:#?}");
    assert_eq!(seen[0], seen[1], "fast path vs Pingora's path");
    let first = &seen[0][0].1;
    assert!(first.starts_with("GET /a?b=c HTTP/1.1\n"), "{first}");
    let field =
        |answer: &str, name: &str| answer.lines().any(|l| l.starts_with(&format!("{name}:")));
    for gone in [
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(!field(first, gone), "{gone} forwarded: {first}");
    }
    for kept in [
        "host",
        "x-keep",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    ] {
        assert!(field(first, kept), "{kept} missing: {first}");
    }
    let forwarded = &seen[0][1].1;
    for line in [
        "x-forwarded-for: 10.0.0.1, 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: echo.test",
        "x-request-id: given-1",
        "x-keep: a",
        "x-keep: b",
    ] {
        assert!(forwarded.lines().any(|l| l == line), "{line}: {forwarded}");
    }
    assert_eq!(
        forwarded
            .lines()
            .filter(|l| l.starts_with("x-forwarded-"))
            .count(),
        3
    );
    let ids: Vec<&str> = seen[0][2]
        .1
        .lines()
        .filter(|l| l.starts_with("x-request-id:"))
        .collect();
    assert_eq!(ids, ["x-request-id: <id>"], "{}", seen[0][2].1);
    assert!(!field(&seen[0][3].1, "x-secret"), "{}", seen[0][3].1);
    assert!(
        seen[0][4].1.starts_with("POST /p HTTP/1.1\n"),
        "{}",
        seen[0][4].1
    );
    assert!(
        seen[0][5].1.starts_with("GET / HTTP/1.1\n"),
        "{}",
        seen[0][5].1
    );
}

/// Backend answers by request path, for comparing what clients get (see below).
fn answer_for(path: &str) -> (&'static [u8], bool) {
    match path {
        // Fields of one name apart, a lower-case `date` and `connection`, `Keep-Alive`.
        "/a" => (b"HTTP/1.1 200 OK\r\nServer: t\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\nSet-Cookie: a=1\r\nX-Other: x\r\nset-cookie: b=2\r\nconnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 5\r\n\r\nhello", false),
        // A reason of its own and the backend's own request id.
        "/b" => (b"HTTP/1.1 201 Made It\r\nX-Request-Id: theirs\r\nContent-Length: 2\r\n\r\nok", false),
        "/c" => (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-After: 1\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", false),
        // Close-delimited, from an HTTP/1.0 backend.
        "/d" => (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", true),
        "/e" => (b"HTTP/1.1 204 No Content\r\nDate: x\r\nDate: y\r\n\r\n", false),
        "/f" => (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc", false),
        "/g" => (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", false),
        // More bytes than its length.
        "/h" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabcd", true),
        _ => (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", false),
    }
}

/// Reads one whole answer (after any 1xx heads) as raw bytes: `Date` values and generated
/// request ids masked.
fn read_raw_answer(s: &mut std::net::TcpStream, head_request: bool) -> String {
    use std::io::Read;
    let mut out = String::new();
    loop {
        let head = read_response_head(s);
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        for line in head.split_inclusive("\r\n") {
            let masked = match line.split_once(": ") {
                Some((name, _)) if name.eq_ignore_ascii_case("date") => {
                    format!("{name}: <date>\r\n")
                }
                Some((name, v)) if name.eq_ignore_ascii_case("x-request-id") && v.len() == 38 => {
                    format!("{name}: <id>\r\n")
                }
                _ => line.to_owned(),
            };
            out.push_str(&masked);
        }
        if (100..200).contains(&status) {
            continue;
        }
        let field = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        };
        let mut body = Vec::new();
        if head_request || status == 204 || status == 304 {
        } else if field("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
            let mut byte = [0u8; 1];
            while !body.ends_with(b"\r\n0\r\n\r\n") && body != b"0\r\n\r\n" {
                assert_eq!(s.read(&mut byte).unwrap(), 1, "{out}");
                body.push(byte[0]);
            }
        } else if let Some(n) = field("content-length") {
            body = vec![0u8; n.parse().unwrap()];
            s.read_exact(&mut body).unwrap();
        } else {
            s.read_to_end(&mut body).unwrap();
        }
        if field("transfer-encoding").is_some() && !body.is_empty() {
            // Chunk boundaries are the writer's business (Pingora's path batches pieces that
            // arrive together): compare the content.
            let text = String::from_utf8(body).unwrap();
            let mut rest = text.as_str();
            out.push_str("<chunks:");
            while let Some((size, after)) = rest.split_once("\r\n") {
                let size = usize::from_str_radix(size, 16).unwrap();
                out.push_str(&after[..size]);
                rest = &after[size + 2..];
            }
            out.push('>');
            return out;
        }
        out.push_str(&String::from_utf8_lossy(&body));
        return out;
    }
}

/// The fast path writes answers itself; clients must get byte for byte what Pingora's path
/// sends them (but for the `Date` and the generated request id): fields of one name kept
/// together, `Date` and `Connection` replaced where the backend had them, the request id
/// replacing the backend's, 1xx heads passed on, a close-delimited answer re-chunked, an
/// HTTP/1.0 answer kept HTTP/1.0, a body cut at its length. (Chunked bodies are compared by
/// content: Pingora's path may join pieces that arrive together into one chunk.)
#[test]
fn the_fast_path_and_pingoras_path_send_clients_the_same_answer() {
    use std::io::Write;
    use tokio::io::AsyncWriteExt;
    let rt = runtime();
    let backend = raw_backend(&rt, |mut s| async move {
        let mut data = Vec::new();
        while let Some(end) = read_head(&mut s, &mut data).await {
            let head = String::from_utf8_lossy(&data[..end]).into_owned();
            data.drain(..end);
            let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
            let (answer, close) = answer_for(&path);
            let answer = if head.starts_with("HEAD") {
                let end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                &answer[..end]
            } else {
                answer
            };
            if s.write_all(answer).await.is_err() || close {
                return;
            }
        }
    });
    let body = format!(
        "[health_check]\ninterval_secs = 3600\n\n{}{}",
        vhost_toml("answers.test", "a", ""),
        backends_toml(&[("e1", backend.to_string(), "\"a\"")]),
    );
    let requests = [
        "GET /a", "GET /b", "GET /c", "GET /d", "GET /e", "GET /f", "GET /g", "GET /h", "HEAD /a",
        "HEAD /c",
    ];
    let mut seen: Vec<Vec<String>> = Vec::new();
    on_both_paths("", &body, |proxy, _| {
        let mut answers = Vec::new();
        for request in requests {
            let mut s = raw_connect(proxy.http);
            write!(s, "{request} HTTP/1.1\r\nHost: answers.test\r\n\r\n").unwrap();
            answers.push(format!(
                "{request}\n{}",
                read_raw_answer(&mut s, request.starts_with("HEAD"))
            ));
        }
        seen.push(answers);
    });
    for (fast, pingora) in seen[0].iter().zip(&seen[1]) {
        assert_eq!(fast, pingora, "fast path vs Pingora's path");
    }
    let answers = &seen[0];
    assert!(answers[0].contains("\r\nDate: <date>\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nX-Other: x\r\nConnection: keep-alive\r\n"), "{}", answers[0]);
    assert!(
        answers[1].contains("HTTP/1.1 201 Made It\r\nx-request-id: <id>\r\n"),
        "{}",
        answers[1]
    );
    assert!(
        answers[2].ends_with("\r\n\r\n<chunks:abcde>"),
        "{}",
        answers[2]
    );
    assert!(
        answers[3].contains("HTTP/1.1 200 OK\r\n")
            && answers[3].contains("Transfer-Encoding: chunked\r\n"),
        "{}",
        answers[3]
    );
    assert!(answers[5].contains("HTTP/1.0 200 OK\r\n"), "{}", answers[5]);
    assert!(
        answers[6]
            .contains("HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\nx-request-id: <id>\r\n\r\nHTTP/1.1 200 OK\r\n"),
        "{}",
        answers[6]
    );
    assert!(answers[7].ends_with("\r\n\r\nab"), "{}", answers[7]);
}

/// An answer whose end is the backend closing (no length, no chunks) reaches the client in
/// chunks, so the client connection carries the next request (on both paths).
#[test]
fn a_close_delimited_answer_keeps_the_client_connection() {
    let rt = runtime();
    let backend = canned_backend(
        &rt,
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
        false,
    );
    let body = format!(
        "[health_check]\ninterval_secs = 3600\n\n{}{}",
        vhost_toml("close.test", "a", ""),
        backends_toml(&[("c1", backend.to_string(), "\"a\"")]),
    );
    on_both_paths("", &body, |proxy, fast| {
        let url = proxy.http_url("/");
        rt.block_on(async move {
            let c = client(&[], true);
            for _ in 0..3 {
                let r = c
                    .get(&url)
                    .header("host", "close.test")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "fast path {fast}");
                let te = r.headers().get("transfer-encoding").cloned();
                assert_eq!(te.as_ref().map(|v| v.to_str().unwrap()), Some("chunked"));
                assert_eq!(r.text().await.unwrap(), "until the end", "fast path {fast}");
            }
        });
    });
}

/// A backend that answers every request with the number of the connection it came on (1, 2, …;
/// health probes take numbers too)
/// and, with `close_after`, closes each connection after its first answer (framed with a
/// length, without `Connection: close`: as a backend whose keep-alive timeout just ran out).
fn numbering_backend(rt: &tokio::runtime::Runtime, close_after: bool) -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    let next = Arc::new(AtomicUsize::new(1));
    raw_backend(rt, move |mut s| {
        let id = next.fetch_add(1, Ordering::Relaxed);
        async move {
            let mut data = Vec::new();
            while let Some(end) = read_head(&mut s, &mut data).await {
                data.drain(..end);
                let body = id.to_string();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if s.write_all(answer.as_bytes()).await.is_err() || close_after {
                    return;
                }
            }
        }
    })
}

/// One GET over the client connection `s`; the backend connection's number.
fn conn_number(s: &mut std::net::TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: hold.test\r\n\r\n")
        .unwrap();
    let (status, head, body) = read_response(s);
    assert_eq!(status, 200, "{head}{body}");
    body
}

/// On the fast path a client connection keeps its backend connection between its requests
/// (`upstream_hold_ms`): another client's request meanwhile gets a connection of its own; with
/// a hold of 0 it is back in the shared pool after each request; after a short hold an idle
/// client's connection goes back to the pool; and a kept connection the backend closed costs
/// the next request nothing.
#[test]
fn backend_connections_stay_with_the_client_connection_between_requests() {
    let rt = runtime();
    // A proxy with `extra` in `[proxy]` in front of a fresh numbering backend.
    let start = |extra: &str, close_after: bool| {
        let backend = numbering_backend(&rt, close_after);
        let body = format!(
            "[health_check]\ninterval_secs = 3600\n\n{}{}",
            vhost_toml("hold.test", "a", ""),
            backends_toml(&[("n1", backend.to_string(), "\"a\"")]),
        );
        ProxyProcess::start(tempfile::tempdir().unwrap(), extra, &body, false)
    };

    // Held: A and B, one after the other, each on its own backend connection throughout.
    let proxy = start("upstream_hold_ms = 60000", false);
    let (mut a, mut b) = (raw_connect(proxy.http), raw_connect(proxy.http));
    let first = [conn_number(&mut a), conn_number(&mut b)];
    assert_ne!(first[0], first[1], "B got the connection A keeps");
    for _ in 0..3 {
        assert_eq!([conn_number(&mut a), conn_number(&mut b)], first);
    }
    drop(proxy);

    // Not held: B takes the connection A just gave back to the pool. (One thread: a
    // connection goes back after its answer is written, before the thread reads another
    // request.)
    let proxy = start("upstream_hold_ms = 0\nthreads = 1", false);
    let (mut a, mut b) = (raw_connect(proxy.http), raw_connect(proxy.http));
    let n = conn_number(&mut a);
    assert_eq!(conn_number(&mut b), n, "pooled connection not reused");
    assert_eq!(conn_number(&mut a), n);
    drop(proxy);

    // A short hold: once A has been idle long enough, a new client (each kept open, so it
    // keeps what it got) gets A's connection from the pool. (One thread: with two, Pingora's
    // pool can drop a connection it hands out — its idle watcher's lock guard wakes the taker
    // before letting go of its `Arc`, and the taker's `Arc::try_unwrap` fails — and A's
    // connection would never come back.)
    let proxy = start("upstream_hold_ms = 50\nthreads = 1", false);
    let mut a = raw_connect(proxy.http);
    let n = conn_number(&mut a);
    let deadline = std::time::Instant::now() + DEADLINE;
    let mut probes = Vec::new();
    loop {
        let mut probe = raw_connect(proxy.http);
        if conn_number(&mut probe) == n {
            break;
        }
        probes.push(probe);
        assert!(
            std::time::Instant::now() < deadline,
            "A's connection ({n}) never went back to the pool ({} probes); proxy log:\n{}",
            probes.len(),
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(proxy);

    // The backend closes every connection after one answer: each kept connection is found
    // closed (or fails and is retried), never an error for the client.
    let proxy = start("upstream_hold_ms = 60000", true);
    let mut a = raw_connect(proxy.http);
    let mut numbers: Vec<u32> = (0..5)
        .map(|_| conn_number(&mut a).parse().unwrap())
        .collect();
    numbers.dedup();
    assert_eq!(
        numbers.len(),
        5,
        "a closed connection was used twice: {numbers:?}"
    );
}
