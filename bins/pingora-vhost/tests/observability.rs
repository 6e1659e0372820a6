//! Metrics and logs after known traffic: counters and histogram counts equal what was sent, the
//! labels are bounded, the exposition passes `promtool check metrics`, and JSON log lines parse.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

/// The value of one exact series in an exposition, if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn metrics_and_logs_match_the_traffic() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let b = TestBackend::start(&rt, "b1");
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("proxy.json.log");
    let logging = format!(
        "format = \"json\"\noutput = \"file\"\nfile_path = \"{}\"",
        log_path.display()
    );
    let body = format!(
        "[[virtual_hosts]]\ndomain = \"a.test\"\nenabled_backends_tag = \"a\"\n\n\
         [[virtual_hosts]]\ndomain = \"b.test\"\nenabled_backends_tag = \"b\"\n\n\
         [[virtual_hosts]]\ndomain = \"empty.test\"\nenabled_backends_tag = \"nobody\"\n\n\
         [[virtual_hosts]]\ndomain = \"secure.test\"\nenabled_backends_tag = \"a\"\nhttp_to_https = true\n\n\
         [[backends]]\nid = \"a1\"\naddress = \"{}\"\ntags = [\"a\"]\n\n\
         [[backends]]\nid = \"b1\"\naddress = \"{}\"\ntags = [\"b\"]\n\n\
         [[backends]]\nid = \"spare\"\naddress = \"{}\"\ntags = [\"spare\"]\n",
        a.addr, b.addr, a.addr
    );
    let proxy = ProxyProcess::start_with_logging(dir, &logging, &body);
    let c = client(&[], true);
    let send = |host: &str, path: &str| -> u16 { rt.block_on(proxy.get(&c, host, path)).0 };
    for i in 0..7 {
        assert_eq!(send("a.test", &format!("/a/{i}?q=1")), 200);
    }
    for _ in 0..4 {
        assert_eq!(send("b.test", "/"), 200);
    }
    for host in ["x.unknown", "attacker-controlled.example", "y.unknown:8080"] {
        assert_eq!(send(host, "/"), 404);
    }
    for _ in 0..2 {
        assert_eq!(send("empty.test", "/"), 503);
    }
    assert_eq!(send("secure.test", "/r"), 308);

    let scrape = |url: String| -> String {
        rt.block_on(async { c.get(url).send().await.unwrap().text().await.unwrap() })
    };
    let metrics_url = format!("http://{}/metrics", proxy.metrics);
    // Requests are counted when they finish (after the response): wait for the last one.
    wait_until("the request counters", || {
        sample(
            &scrape(metrics_url.clone()),
            "proxy_local_responses_total{reason=\"redirect\"}",
        ) == Some(1.0)
    });
    let text = scrape(metrics_url.clone());
    let expect = |series: &str, value: f64| {
        assert_eq!(sample(&text, series), Some(value), "{series} in:\n{text}");
    };
    expect(
        "proxy_requests_total{domain=\"a.test\",tag=\"a\",backend=\"a1\",status=\"2xx\"}",
        7.0,
    );
    expect(
        "proxy_requests_total{domain=\"b.test\",tag=\"b\",backend=\"b1\",status=\"2xx\"}",
        4.0,
    );
    expect(
        "proxy_requests_total{domain=\"_unknown\",tag=\"\",backend=\"_none\",status=\"4xx\"}",
        3.0,
    );
    expect("proxy_requests_total{domain=\"empty.test\",tag=\"nobody\",backend=\"_none\",status=\"5xx\"}", 2.0);
    expect(
        "proxy_requests_total{domain=\"secure.test\",tag=\"a\",backend=\"_none\",status=\"3xx\"}",
        1.0,
    );
    expect("proxy_local_responses_total{reason=\"unknown_host\"}", 3.0);
    expect("proxy_local_responses_total{reason=\"no_backend\"}", 2.0);
    expect(
        "proxy_latency_seconds_count{domain=\"a.test\",tag=\"a\"}",
        7.0,
    );
    expect(
        "proxy_latency_seconds_count{domain=\"b.test\",tag=\"b\"}",
        4.0,
    );
    expect(
        "proxy_latency_seconds_bucket{domain=\"a.test\",tag=\"a\",le=\"+Inf\"}",
        7.0,
    );
    assert!(
        text.contains("proxy_latency_seconds_bucket{domain=\"a.test\",tag=\"a\",le=\"0.0005\"}")
    );
    expect("proxy_domain_active_tag{domain=\"a.test\",tag=\"a\"}", 1.0);
    expect("health_check_status{backend=\"a1\"}", 1.0);
    expect("proxy_requests_in_flight", 0.0);
    // Bounded labels: raw hosts, paths and client addresses never become label values.
    for raw in ["attacker-controlled", "x.unknown", "/a/", "127.0.0.1"] {
        assert!(!text.contains(raw), "{raw} leaked into the exposition");
    }
    // The seed's path on both listeners.
    let seed_path = scrape(format!("http://{}/api/v1/metrics", proxy.metrics));
    assert!(seed_path.contains("proxy_requests_total"));
    let on_admin = scrape(proxy.admin_url("/api/v1/metrics"));
    assert!(on_admin.contains("proxy_requests_total"));

    // A switch moves the info gauge.
    rt.block_on(async {
        let r = c
            .post(proxy.admin_url("/api/v1/domains/a.test/switch"))
            .header("content-type", "application/json")
            .body(r#"{"new_tag": "b"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    });
    let text = scrape(metrics_url.clone());
    assert_eq!(
        sample(
            &text,
            "proxy_domain_active_tag{domain=\"a.test\",tag=\"b\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "proxy_domain_active_tag{domain=\"a.test\",tag=\"a\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "config_changes_total{result=\"applied\"}"),
        Some(1.0)
    );
    assert!(text.contains("api_requests_total{method=\"POST\",route=\"/api/v1/domains/{domain}/switch\",status=\"200\"} 1"));

    // Deleted domains and backends take their series with them.
    assert!(
        text.contains("health_check_status{backend=\"spare\"}"),
        "{text}"
    );
    assert!(text.contains("domain=\"b.test\""), "{text}");
    rt.block_on(async {
        for path in ["/api/v1/domains/b.test", "/api/v1/backends/spare"] {
            let r = c.delete(proxy.admin_url(path)).send().await.unwrap();
            assert_eq!(r.status(), 204, "DELETE {path}");
        }
    });
    let text = scrape(metrics_url.clone());
    assert!(!text.contains("backend=\"spare\""), "{text}");
    assert!(!text.contains("domain=\"b.test\""), "{text}");
    assert_eq!(
        sample(
            &text,
            "proxy_requests_total{domain=\"a.test\",tag=\"a\",backend=\"a1\",status=\"2xx\"}"
        ),
        Some(7.0),
        "series of a domain that still exists stay (the old tag's too)"
    );

    // promtool (Debian package `prometheus`, installed by scripts/test.sh) validates the format.
    assert!(
        Command::new("promtool").arg("--version").output().is_ok(),
        "promtool is missing: run scripts/test.sh (it installs the Debian package prometheus)"
    );
    {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // JSON logs: one access line per request, with its fields; application events too.
    let lines = || -> Vec<Value> {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };
    wait_until("17 access log lines", || {
        lines().iter().filter(|l| l["target"] == "access").count() == 17
    });
    let all = lines();
    let access: Vec<&Value> = all.iter().filter(|l| l["target"] == "access").collect();
    let first = access.iter().find(|l| l["path"] == "/a/0?q=1").unwrap();
    assert_eq!(first["domain"], "a.test");
    assert_eq!(first["tag"], "a");
    assert_eq!(first["backend"], "a1");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["status"], 200);
    assert!(first["bytes"].as_u64().unwrap() > 0);
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(first["client"], "127.0.0.1");
    let unknown = access.iter().filter(|l| l["domain"] == "_unknown").count();
    assert_eq!(unknown, 3);
    assert!(access
        .iter()
        .any(|l| l["status"] == 503 && l["local"] == "no_backend"));
    assert!(all
        .iter()
        .any(|l| l["message"] == "configuration change applied"));
    assert!(all.iter().any(|l| l["message"] == "pingora-vhost started"));
}
