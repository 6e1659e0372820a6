//! Rollout plans through the real binary: a failing canary is aborted by its analysis, a healthy
//! one walks its steps and is promoted, a step without traffic holds, and a restart resumes at
//! the same step.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn config(a: &TestBackend, b: &TestBackend, canary: &str) -> String {
    config_with(a, b, canary, "")
}

fn config_with(a: &TestBackend, b: &TestBackend, canary: &str, head: &str) -> String {
    format!(
        "{head}\n[[virtual_hosts]]\ndomain = \"app.test\"\nenabled_backends_tag = \"a\"\ncanary = {canary}\n\n\
         [[backends]]\nid = \"a1\"\naddress = \"{}\"\ntags = [\"a\"]\n\n\
         [[backends]]\nid = \"b1\"\naddress = \"{}\"\ntags = [\"b\"]\n",
        a.addr, b.addr
    )
}

fn get_json(c: &reqwest::Client, rt: &tokio::runtime::Runtime, url: String) -> (u16, Value) {
    rt.block_on(async {
        let r = c.get(url).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    })
}

/// Reads server-sent events from `r` until one satisfies `want` (deadline-bound); returns every
/// event seen, as (event, data).
fn read_events_until(
    rt: &tokio::runtime::Runtime,
    r: &mut reqwest::Response,
    want: impl Fn(&str, &Value) -> bool,
) -> Vec<(String, Value)> {
    rt.block_on(async {
        let mut text = String::new();
        let mut seen = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let chunk = r.chunk().await.unwrap().expect("the stream ended");
                text.push_str(std::str::from_utf8(&chunk).unwrap());
                while let Some(end) = text.find("\n\n") {
                    let block: String = text.drain(..end + 2).collect();
                    let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name));
                    if let (Some(kind), Some(data)) = (field("event: "), field("data: ")) {
                        let data: Value = serde_json::from_str(data).unwrap();
                        let done = want(kind, &data);
                        seen.push((kind.to_owned(), data));
                        if done {
                            return;
                        }
                    }
                }
            }
        })
        .await
        .expect("the awaited event before the deadline");
        seen
    })
}

fn post(c: &reqwest::Client, rt: &tokio::runtime::Runtime, url: String) -> u16 {
    rt.block_on(async { c.post(url).send().await.unwrap().status().as_u16() })
}

#[test]
fn a_canary_failing_half_its_requests_is_aborted_then_every_request_succeeds() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let b = TestBackend::start(&rt, "b1");
    b.fail_every.store(2, Ordering::SeqCst);
    // The webhook refuses the first delivery: the notification is retried.
    let webhook = WebhookReceiver::start(&rt, 1);
    let body = config_with(
        &a,
        &b,
        "{ tag = \"b\", weight = 30.0, sticky_key = \"none\", analysis = { max_error_rate = 0.05, min_requests = 10, interval_secs = 2, failure_limit = 2 } }",
        &format!("[notifications]\nwebhook_url = \"http://{}/hooks/rollout\"\n", webhook.addr),
    );
    let proxy = ProxyProcess::start(tempfile::tempdir().unwrap(), "", &body, false);
    let c = client(&[], true);
    let events_url = proxy.admin_url("/api/v1/events");
    let mut events = rt
        .block_on(async { c.get(events_url).send().await })
        .unwrap();
    assert_eq!(events.status(), 200);
    let started = Instant::now();
    let load = Load::start(&rt, &proxy, "app.test");
    let mut canary = Value::Null;
    wait_until("the analysis to abort the rollout", || {
        canary = get_json(&c, &rt, proxy.admin_url("/api/v1/domains/app.test/canary")).1;
        canary["state"] == "aborted"
    });
    let took = started.elapsed();
    load.stop(&rt);
    // The live events told it: the abort, after the configuration change that carried it out.
    let seen = read_events_until(&rt, &mut events, |kind, data| {
        kind == "rollout" && data["action"] == "abort"
    });
    let config = seen
        .iter()
        .position(|(k, d)| k == "config" && d["source"] == "rollout")
        .expect("a config event for the abort");
    assert_eq!(config, seen.len() - 2, "{seen:?}");
    assert_eq!(seen.last().unwrap().1["domain"], "app.test");
    assert!(took < Duration::from_secs(10), "aborted after {took:?}");
    assert_eq!(canary["weight"], 0.0, "{canary}");
    let reason = canary["abort_reason"].as_str().unwrap();
    assert!(reason.contains("error rate"), "{reason}");
    // From now on every request succeeds: the canary gets no traffic.
    rt.block_on(async {
        for _ in 0..100 {
            assert_eq!(proxy.backend_for(&c, "app.test").await, "a1");
        }
    });
    // Persisted, visible in the metrics, and resume is refused (set the canary again instead).
    let file = std::fs::read_to_string(&proxy.config_path).unwrap();
    assert!(file.contains("state = \"aborted\""), "{file}");
    assert_eq!(
        metric(proxy.metrics, r#"rollout_state{domain="app.test"}"#),
        2.0
    );
    assert!(
        metric(
            proxy.metrics,
            r#"rollout_aborts_total{domain="app.test",reason="analysis"}"#
        ) >= 1.0
    );
    assert_eq!(
        post(
            &c,
            &rt,
            proxy.admin_url("/api/v1/domains/app.test/canary/resume")
        ),
        409
    );
    // The webhook got the abort, on the second attempt.
    wait_until("the webhook delivery", || webhook.bodies().len() >= 2);
    let bodies = webhook.bodies();
    assert_eq!(bodies[0], bodies[1], "the retry sends the same event");
    let delivered: Value = serde_json::from_str(&bodies[1]).unwrap();
    assert_eq!(delivered["event"], "rollout");
    assert_eq!(delivered["data"]["action"], "abort");
    assert_eq!(delivered["data"]["domain"], "app.test");
}

#[test]
fn a_healthy_canary_walks_every_step_and_is_promoted() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let b = TestBackend::start(&rt, "b1");
    let body = config(
        &a,
        &b,
        "{ tag = \"b\", weight = 10.0, sticky_key = \"none\", steps = [10, 50, 100], step_interval_secs = 1, analysis = { max_error_rate = 0.05, min_requests = 5, interval_secs = 1 } }",
    );
    let proxy = ProxyProcess::start(tempfile::tempdir().unwrap(), "", &body, false);
    let c = client(&[], true);
    let load = Load::start(&rt, &proxy, "app.test");
    let mut weights = Vec::new();
    let mut domain = Value::Null;
    wait_until("the promotion", || {
        domain = get_json(&c, &rt, proxy.admin_url("/api/v1/domains/app.test")).1;
        if let Some(w) = domain["canary"]["weight"].as_f64() {
            if weights.last() != Some(&w) {
                weights.push(w);
            }
        }
        domain["enabled_backends_tag"] == "b"
    });
    let (ok, failed) = load.stop(&rt);
    assert_eq!(failed, 0, "failed requests during the rollout");
    assert!(ok > 0);
    assert!(domain.get("canary").is_none(), "{domain}");
    // The weight only ever went up, through the steps.
    assert!(weights.windows(2).all(|w| w[0] < w[1]), "{weights:?}");
    assert!(
        weights.iter().all(|w| [10.0, 50.0, 100.0].contains(w)),
        "{weights:?}"
    );
    rt.block_on(async {
        assert_eq!(proxy.backend_for(&c, "app.test").await, "b1");
    });
    assert_eq!(
        metric(
            proxy.metrics,
            r#"rollout_promotions_total{domain="app.test"}"#
        ),
        1.0
    );
    let file = std::fs::read_to_string(&proxy.config_path).unwrap();
    assert!(file.contains("enabled_backends_tag = \"b\""), "{file}");
    assert!(!file.contains("canary"), "{file}");
    // Each step and the promotion are revisions of the configuration history.
    let history = get_json(&c, &rt, proxy.admin_url("/api/v1/config/history")).1;
    let sources: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source"].as_str().unwrap())
        .collect();
    assert_eq!(
        sources,
        ["rollout", "rollout", "rollout", "start"],
        "{history}"
    );
}

#[test]
fn without_traffic_a_step_holds_and_a_restart_resumes_at_the_same_step() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let b = TestBackend::start(&rt, "b1");
    let body = config(
        &a,
        &b,
        "{ tag = \"b\", weight = 10.0, sticky_key = \"none\", steps = [10, 20, 100], step_interval_secs = 1, analysis = { min_requests = 5, interval_secs = 1 } }",
    );
    let proxy = ProxyProcess::start(tempfile::tempdir().unwrap(), "", &body, false);
    let c = client(&[], true);
    let url = proxy.admin_url("/api/v1/domains/app.test/canary");
    // No traffic: three inconclusive checks, and the first step holds.
    let mut canary = Value::Null;
    wait_until("three inconclusive checks", || {
        canary = get_json(&c, &rt, url.clone()).1;
        canary["rollout"]["checks"].as_u64().unwrap_or(0) >= 3
    });
    assert_eq!(
        canary["rollout"]["last_verdict"]["verdict"], "inconclusive",
        "{canary}"
    );
    assert_eq!(
        (canary["weight"].as_f64(), canary.get("step")),
        (Some(10.0), None),
        "{canary}"
    );

    // With traffic it moves on; pause it at the second step.
    let load = Load::start(&rt, &proxy, "app.test");
    wait_until("the second step", || {
        get_json(&c, &rt, url.clone()).1["step"] == 1
    });
    assert_eq!(
        post(
            &c,
            &rt,
            proxy.admin_url("/api/v1/domains/app.test/canary/pause")
        ),
        200
    );
    let (_, failed) = load.stop(&rt);
    assert_eq!(failed, 0);
    let paused = get_json(&c, &rt, url.clone()).1;
    assert_eq!(
        (paused["state"].as_str(), paused["step"].as_u64()),
        (Some("paused"), Some(1))
    );

    // A restart resumes exactly there.
    let (http, https, admin) = (proxy.http, proxy.https, proxy.admin);
    let (dir, path) = proxy.stop();
    let proxy = ProxyProcess::spawn(dir, path, http, https, admin, false, &[]);
    let after = get_json(&c, &rt, url.clone()).1;
    assert_eq!(
        (
            after["state"].as_str(),
            after["step"].as_u64(),
            after["weight"].as_f64()
        ),
        (Some("paused"), Some(1), Some(20.0)),
        "{after}"
    );
    // Resumed with traffic, it finishes.
    assert_eq!(
        post(
            &c,
            &rt,
            proxy.admin_url("/api/v1/domains/app.test/canary/resume")
        ),
        200
    );
    let load = Load::start(&rt, &proxy, "app.test");
    wait_until("the promotion after the restart", || {
        get_json(&c, &rt, proxy.admin_url("/api/v1/domains/app.test")).1["enabled_backends_tag"]
            == "b"
    });
    let (_, failed) = load.stop(&rt);
    assert_eq!(failed, 0);
}
