//! Traffic policy through the real binary: rate limits, access lists, trusted proxies, header
//! rules and request ids, with exact counts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;

/// A client whose connections come from `source` (127.0.0.x are all loopback).
fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(Some(source.parse::<IpAddr>().unwrap()))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn get(c: &reqwest::Client, proxy: SocketAddr, host: &str, extra: &[(&str, &str)]) -> Reply {
    let mut req = c.get(format!("http://{proxy}/")).header("host", host);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    Reply {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.text().await.unwrap(),
    }
}

fn seen(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn start(rt: &std::sync::Arc<tokio::runtime::Runtime>) -> (ProxyProcess, TestBackend) {
    let backend = TestBackend::start(rt, "b1");
    let body = format!(
        "[[virtual_hosts]]\ndomain = \"rl.test\"\nenabled_backends_tag = \"a\"\nrate_limit = {{ requests_per_second = 5, burst = 10 }}\n\n\
         [[virtual_hosts]]\ndomain = \"key.test\"\nenabled_backends_tag = \"a\"\nrate_limit = {{ requests_per_second = 1, burst = 2, key = \"header:X-Api-Key\" }}\n\n\
         [[virtual_hosts]]\ndomain = \"acl.test\"\nenabled_backends_tag = \"a\"\nallow = [\"127.0.0.0/8\"]\ndeny = [\"127.0.0.2\", \"198.51.100.0/24\"]\n\n\
         [[virtual_hosts]]\ndomain = \"internal.test\"\nenabled_backends_tag = \"a\"\nallow = [\"10.0.0.0/8\"]\n\n\
         [[virtual_hosts]]\ndomain = \"hdr.test\"\nenabled_backends_tag = \"a\"\n\
         request_headers = {{ set = {{ \"X-Env\" = \"prod-{{tag}}\", \"X-Client\" = \"{{client_ip}}\" }}, add = {{ \"X-Trace\" = \"{{request_id}}@{{domain}}\" }}, remove = [\"X-Debug\"] }}\n\
         response_headers = {{ set = {{ \"X-Served-By\" = \"{{backend}}\" }}, remove = [\"X-Backend-Name\"] }}\n\n\
         [[backends]]\nid = \"b1\"\naddress = \"{}\"\ntags = [\"a\"]\n",
        backend.addr
    );
    let proxy = ProxyProcess::start(
        tempfile::tempdir().unwrap(),
        "trusted_proxies = [\"127.0.0.3/32\"]\nproxy_protocol = true",
        &body,
        false,
    );
    (proxy, backend)
}

#[test]
fn rate_limits_count_exactly_per_client_and_refill() {
    let rt = runtime();
    let (proxy, _backend) = start(&rt);
    let one = client_from("127.0.0.1");
    let started = std::time::Instant::now();
    let replies: Vec<Reply> = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..30 {
            out.push(get(&one, proxy.http, "rl.test", &[]).await);
        }
        out
    });
    let refilled = (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    // The burst of 10 passes at once, plus what refilled at 5/s while the 30 ran.
    assert!(
        (10..=10 + refilled).contains(&ok),
        "{ok} passed, {refilled} refilled"
    );
    assert_eq!(ok + limited.len(), 30);
    // The first ten are never refused.
    assert!(replies[..10].iter().all(|r| r.status == 200));
    let r = limited[0];
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.headers["ratelimit-policy"], "\"default\";q=10;w=2");
    assert_eq!(r.headers["ratelimit"], "\"default\";r=0;t=1");

    // Another client address has its own budget.
    let two = client_from("127.0.0.2");
    let r = rt.block_on(get(&two, proxy.http, "rl.test", &[]));
    assert_eq!(r.status, 200);
    // Behind a trusted proxy (127.0.0.3), each forwarded client has its own budget too.
    let lb = client_from("127.0.0.3");
    let statuses: Vec<u16> = rt.block_on(async {
        let mut s = Vec::new();
        for i in 0..12 {
            let client = if i < 11 {
                "198.51.100.1"
            } else {
                "198.51.100.2"
            };
            s.push(
                get(&lb, proxy.http, "rl.test", &[("x-forwarded-for", client)])
                    .await
                    .status,
            );
        }
        s
    });
    assert_eq!(&statuses[..10], &[200; 10]);
    assert_eq!(statuses[11], 200, "{statuses:?}");

    // Tokens come back at the sustained rate.
    wait_until("a token to refill", || {
        rt.block_on(get(&one, proxy.http, "rl.test", &[])).status == 200
    });
    assert!(
        metric(
            proxy.metrics,
            "proxy_rate_limited_total{domain=\"rl.test\"}"
        ) >= 18.0
    );

    // Keyed by a header: each key its own bucket of 2.
    let statuses: Vec<u16> = rt.block_on(async {
        let mut s = Vec::new();
        for key in ["k1", "k1", "k1", "k2"] {
            s.push(
                get(&one, proxy.http, "key.test", &[("x-api-key", key)])
                    .await
                    .status,
            );
        }
        s
    });
    assert_eq!(statuses, [200, 200, 429, 200]);
}

#[test]
fn access_lists_deny_wins_and_trusted_proxies_decide_the_client() {
    let rt = runtime();
    let (proxy, backend) = start(&rt);
    let status = |source: &str, host: &str, extra: &[(&str, &str)]| {
        rt.block_on(get(&client_from(source), proxy.http, host, extra))
            .status
    };
    assert_eq!(status("127.0.0.1", "acl.test", &[]), 200);
    // In the allow list, but denied: deny wins.
    assert_eq!(status("127.0.0.2", "acl.test", &[]), 403);
    assert_eq!(status("127.0.0.1", "internal.test", &[]), 403);
    // An untrusted peer cannot pose as another client...
    assert_eq!(
        status("127.0.0.2", "acl.test", &[("x-forwarded-for", "127.0.0.1")]),
        403
    );
    assert_eq!(
        status(
            "127.0.0.1",
            "acl.test",
            &[("x-forwarded-for", "198.51.100.9")]
        ),
        200
    );
    // ...a trusted one passes on who the client is.
    assert_eq!(
        status(
            "127.0.0.3",
            "acl.test",
            &[("x-forwarded-for", "198.51.100.9")]
        ),
        403
    );
    assert_eq!(
        status(
            "127.0.0.3",
            "internal.test",
            &[("x-forwarded-for", "10.1.2.3")]
        ),
        200
    );
    // Forwarded headers: an untrusted peer's chain is dropped, a trusted one's is extended.
    let hits = backend.hits();
    let r = rt.block_on(get(
        &client_from("127.0.0.1"),
        proxy.http,
        "hdr.test",
        &[("x-forwarded-for", "203.0.113.7")],
    ));
    assert_eq!(seen(&r.body)["x-forwarded-for"], "127.0.0.1");
    let r = rt.block_on(get(
        &client_from("127.0.0.3"),
        proxy.http,
        "hdr.test",
        &[("x-forwarded-for", "203.0.113.7")],
    ));
    assert_eq!(seen(&r.body)["x-forwarded-for"], "203.0.113.7, 127.0.0.3");
    assert_eq!(seen(&r.body)["headers"]["x-client"], "203.0.113.7");
    assert!(backend.hits() > hits);
    assert_eq!(
        metric(
            proxy.metrics,
            "proxy_local_responses_total{reason=\"forbidden\"}"
        ),
        4.0
    );
}

#[test]
fn header_rules_and_request_ids_round_trip() {
    let rt = runtime();
    let (proxy, _backend) = start(&rt);
    let c = client_from("127.0.0.1");
    let r = rt.block_on(get(&c, proxy.http, "hdr.test", &[("x-debug", "1")]));
    assert_eq!(r.status, 200);
    let v = seen(&r.body);
    let headers = &v["headers"];
    assert_eq!(headers["x-env"], "prod-a");
    assert_eq!(headers["x-client"], "127.0.0.1");
    assert!(headers.get("x-debug").is_none(), "{headers}");
    // A generated id (UUID v7), the same on both sides, in the access log.
    let id = r.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "7");
    assert_eq!(headers["x-request-id"], id.as_str());
    assert_eq!(headers["x-trace"], format!("{id}@hdr.test"));
    assert_eq!(r.headers["x-served-by"], "b1");
    assert!(r.headers.get("x-backend-name").is_none());
    // A sane id from the client is kept; a bad one is replaced.
    let r = rt.block_on(get(
        &c,
        proxy.http,
        "hdr.test",
        &[("x-request-id", "order-42.a")],
    ));
    assert_eq!(r.headers["x-request-id"], "order-42.a");
    assert_eq!(seen(&r.body)["headers"]["x-request-id"], "order-42.a");
    let r = rt.block_on(get(
        &c,
        proxy.http,
        "hdr.test",
        &[("x-request-id", "bad id!")],
    ));
    assert_ne!(r.headers["x-request-id"], "bad id!");
    wait_until("the access log line", || {
        proxy.log().contains("order-42.a") && proxy.log().contains(&id)
    });
}

#[test]
fn policies_are_edited_through_the_api_with_located_errors() {
    let rt = runtime();
    let (proxy, _backend) = start(&rt);
    let c = client_http();
    let put = |body: &str| {
        rt.block_on(async {
            let r = c
                .put(proxy.admin_url("/api/v1/domains/internal.test"))
                .header("content-type", "application/json")
                .body(body.to_owned())
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, seen(&r.text().await.unwrap()))
        })
    };
    let (status, body) = put(r#"{"request_headers": {"set": {"Host": "evil"}}}"#);
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (400, Some("request_headers")),
        "{body}"
    );
    let (status, body) = put(r#"{"allow": ["10.0.0.0/33"]}"#);
    assert_eq!(status, 400, "{body}");
    let (status, body) = put(r#"{"rate_limit": {"requests_per_second": 0}}"#);
    assert_eq!(status, 400, "{body}");
    // Open it up and limit it, then remove the limit: persisted each time.
    let (status, body) =
        put(r#"{"allow": [], "rate_limit": {"requests_per_second": 100, "key": "domain"}}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rate_limit"]["key"], "domain");
    let file = std::fs::read_to_string(&proxy.config_path).unwrap();
    assert!(
        file.contains("rate_limit = { requests_per_second = 100, key = \"domain\" }"),
        "{file}"
    );
    assert_eq!(
        rt.block_on(get(
            &client_from("127.0.0.1"),
            proxy.http,
            "internal.test",
            &[]
        ))
        .status,
        200
    );
    let (status, body) = put(r#"{"rate_limit": null}"#);
    assert_eq!(status, 200, "{body}");
    assert!(body.get("rate_limit").is_none());
}

fn client_http() -> reqwest::Client {
    common::client(&[], true)
}

fn backend_json(rt: &tokio::runtime::Runtime, proxy: &ProxyProcess, id: &str) -> serde_json::Value {
    proxy.admin_json(rt, &format!("/api/v1/backends/{id}"))
}

#[test]
fn the_circuit_breaker_ejects_a_failing_backend_and_a_trial_brings_it_back() {
    use std::sync::atomic::Ordering;
    let rt = runtime();
    let bad = TestBackend::start(&rt, "bad");
    let good = TestBackend::start(&rt, "good");
    bad.fail_every.store(1, Ordering::SeqCst);
    let body = format!(
        "[[virtual_hosts]]\ndomain = \"cb.test\"\nenabled_backends_tag = \"a\"\n\n\
         [[backends]]\nid = \"bad\"\naddress = \"{}\"\ntags = [\"a\"]\n\n\
         [[backends]]\nid = \"good\"\naddress = \"{}\"\ntags = [\"a\"]\n",
        bad.addr, good.addr
    );
    let proxy = ProxyProcess::start(
        tempfile::tempdir().unwrap(),
        "circuit_breaker = { consecutive_5xx = 3, open_secs = 2 }",
        &body,
        false,
    );
    let c = client_from("127.0.0.1");
    let statuses = |n: usize| -> Vec<u16> {
        rt.block_on(async {
            let mut s = Vec::new();
            for _ in 0..n {
                s.push(get(&c, proxy.http, "cb.test", &[]).await.status);
            }
            s
        })
    };
    // Round robin: the bad backend answers 500 three times in a row, then is ejected.
    let first = statuses(6);
    assert_eq!(first.iter().filter(|s| **s == 500).count(), 3, "{first:?}");
    assert_eq!(bad.hits(), 3);
    assert_eq!(backend_json(&rt, &proxy, "bad")["circuit"], "open");
    assert_eq!(
        metric(proxy.metrics, "circuit_breaker_open{backend=\"bad\"}"),
        1.0
    );
    // Then every request succeeds on its sibling.
    assert_eq!(statuses(100), vec![200; 100]);
    assert_eq!(bad.hits(), 3);

    // Fixed: after open_secs one trial request goes to it, succeeds, and it is back.
    bad.fail_every.store(0, Ordering::SeqCst);
    wait_until("the trial request", || {
        statuses(1);
        bad.hits() > 3
    });
    assert_eq!(backend_json(&rt, &proxy, "bad")["circuit"], "closed");
    assert_eq!(
        metric(proxy.metrics, "circuit_breaker_open{backend=\"bad\"}"),
        0.0
    );
    assert_eq!(
        metric(
            proxy.metrics,
            "circuit_breaker_ejections_total{backend=\"bad\"}"
        ),
        1.0
    );

    // Both failing: never more than max_ejection_percent (50 % of 2 = one) ejected.
    bad.fail_every.store(1, Ordering::SeqCst);
    good.fail_every.store(1, Ordering::SeqCst);
    let all = statuses(20);
    assert!(all.iter().all(|s| *s == 500), "{all:?}");
    let open: Vec<String> = ["bad", "good"]
        .iter()
        .filter(|id| backend_json(&rt, &proxy, id)["circuit"] != "closed")
        .map(|id| (*id).to_owned())
        .collect();
    assert_eq!(open.len(), 1, "{open:?}");
}

#[test]
fn max_concurrent_requests_answers_503_at_once() {
    let rt = runtime();
    let slow = TestBackend::start(&rt, "slow");
    let body = format!(
        "[[virtual_hosts]]\ndomain = \"mc.test\"\nenabled_backends_tag = \"a\"\n\n\
         [[backends]]\nid = \"slow\"\naddress = \"{}\"\ntags = [\"a\"]\nmax_concurrent_requests = 1\n",
        slow.addr
    );
    let proxy = ProxyProcess::start(tempfile::tempdir().unwrap(), "", &body, false);
    let url = proxy.http_url("/slow/3000");
    let held = rt.spawn(async move {
        client_from("127.0.0.1")
            .get(url)
            .header("host", "mc.test")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    wait_until("the first request to reach the backend", || {
        slow.hits() == 1
    });
    let r = rt.block_on(get(&client_from("127.0.0.1"), proxy.http, "mc.test", &[]));
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, "backend concurrency limit reached\n")
    );
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(slow.hits(), 1);
    assert_eq!(rt.block_on(held).unwrap(), 200);
    // The slot is free again.
    let r = rt.block_on(get(&client_from("127.0.0.1"), proxy.http, "mc.test", &[]));
    assert_eq!(r.status, 200);
    assert_eq!(
        metric(
            proxy.metrics,
            "proxy_local_responses_total{reason=\"saturated\"}"
        ),
        1.0
    );
    assert_eq!(
        backend_json(&rt, &proxy, "slow")["max_concurrent_requests"],
        1
    );
}

/// A PROXY protocol v2 header naming `client` (IPv4, TCP), as a load balancer sends it.
fn proxy_v2(client: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&40000u16.to_be_bytes());
    h.extend_from_slice(&80u16.to_be_bytes());
    h
}

/// Sends `prefix` then a `GET /` for `host` from `source`; the status and body.
fn raw_request(
    rt: &tokio::runtime::Runtime,
    source: &str,
    proxy: SocketAddr,
    prefix: &[u8],
    host: &str,
) -> (u16, String) {
    use std::io::Write as _;
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(proxy).await.unwrap()
    });
    let mut stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(prefix).unwrap();
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let (status, _, body) = read_response(&mut stream);
    (status, body)
}

#[test]
fn a_proxy_protocol_header_from_a_trusted_balancer_names_the_client() {
    let rt = runtime();
    let (proxy, _backend) = start(&rt);
    // Denied network, announced by the trusted balancer (127.0.0.3): 403.
    let (status, _) = raw_request(
        &rt,
        "127.0.0.3",
        proxy.http,
        &proxy_v2([198, 51, 100, 7]),
        "acl.test",
    );
    assert_eq!(status, 403);
    // The announced client is the one the backend hears of, and the one rules see.
    let (status, body) = raw_request(
        &rt,
        "127.0.0.3",
        proxy.http,
        &proxy_v2([203, 0, 113, 5]),
        "hdr.test",
    );
    assert_eq!(status, 200, "{body}");
    let v = seen(&body);
    assert_eq!(v["x-forwarded-for"], "203.0.113.5");
    assert_eq!(v["headers"]["x-client"], "203.0.113.5");
    // The balancer may also connect without a header.
    let (status, body) = raw_request(&rt, "127.0.0.3", proxy.http, b"", "hdr.test");
    assert_eq!(
        (status, seen(&body)["headers"]["x-client"].as_str()),
        (200, Some("127.0.0.3"))
    );
    // Anyone else's header is not read: it is a malformed request.
    let (status, _) = raw_request(
        &rt,
        "127.0.0.1",
        proxy.http,
        &proxy_v2([10, 0, 0, 1]),
        "hdr.test",
    );
    assert_eq!(status, 400);
}
