//! Weighted, sticky canaries through the real binary: shares, stickiness across weight changes,
//! restarts and reloads, overrides, bucket cookies, fallback and changes under load.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::*;

fn config(a: &TestBackend, b: &TestBackend, canary: &str) -> String {
    format!(
        "[health_check]\ninterval_secs = 1\ntimeout_secs = 1\nunhealthy_threshold = 1\nhealthy_threshold = 1\n\n\
         [[virtual_hosts]]\ndomain = \"app.test\"\nenabled_backends_tag = \"a\"\n{canary}\n\n\
         [[backends]]\nid = \"a1\"\naddress = \"{}\"\ntags = [\"a\"]\n\n\
         [[backends]]\nid = \"b1\"\naddress = \"{}\"\ntags = [\"b\"]\n",
        a.addr, b.addr
    )
}

/// The tag that served a request (from `X-Served-Tag`), with the response.
async fn served(
    proxy: &ProxyProcess,
    c: &reqwest::Client,
    headers: &[(&str, &str)],
) -> (String, reqwest::header::HeaderMap) {
    let mut req = c.get(proxy.http_url("/")).header("host", "app.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let response_headers = r.headers().clone();
    let body = r.text().await.unwrap();
    let tag = response_headers["x-served-tag"]
        .to_str()
        .unwrap()
        .to_owned();
    // The header tells the truth: the backend of that tag answered.
    assert_eq!(backend_of(&body), format!("{tag}1"));
    (tag, response_headers)
}

/// The users (of `users`) the canary serves, by `X-User`.
async fn canary_users(
    proxy: &ProxyProcess,
    c: &reqwest::Client,
    users: std::ops::Range<usize>,
) -> BTreeSet<usize> {
    let mut on = BTreeSet::new();
    for u in users {
        let user = format!("user-{u}");
        if served(proxy, c, &[("x-user", &user)]).await.0 == "b" {
            on.insert(u);
        }
    }
    on
}

async fn put_canary(proxy: &ProxyProcess, c: &reqwest::Client, body: &str) {
    let r = c
        .put(proxy.admin_url("/api/v1/domains/app.test/canary"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 200, "{}", r.text().await.unwrap());
}

#[test]
fn weighted_sticky_canary_keeps_users_across_weights_restarts_and_reloads() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let b = TestBackend::start(&rt, "b1");
    let body = config(
        &a,
        &b,
        "canary = { tag = \"b\", weight = 10.0, sticky_key = \"header:X-User\" }",
    );
    let proxy = ProxyProcess::start(
        tempfile::tempdir().unwrap(),
        "expose_served_tag = true",
        &body,
        false,
    );
    let c = client(&[], true);
    let users = 0..3000;
    let at_10 = rt.block_on(async {
        let at_10 = canary_users(&proxy, &c, users.clone()).await;
        assert!(
            (255..=345).contains(&at_10.len()),
            "{} of 3000 users on a 10 % canary",
            at_10.len()
        );
        // The same key always lands on the same side: 1,000 requests by 20 users.
        for u in 0..20 {
            let user = format!("user-{u}");
            let side = at_10.contains(&u);
            for _ in 0..50 {
                let (tag, _) = served(&proxy, &c, &[("x-user", &user)]).await;
                assert_eq!(tag == "b", side, "{user} changed sides");
            }
        }
        // 10 → 30 %: every canary user stays; 30 → 10 %: exactly the first set again.
        put_canary(
            &proxy,
            &c,
            r#"{"tag":"b","weight":30,"sticky_key":"header:X-User"}"#,
        )
        .await;
        let at_30 = canary_users(&proxy, &c, users.clone()).await;
        assert!(at_30.is_superset(&at_10), "a canary user left at 30 %");
        assert!(
            (810..=990).contains(&at_30.len()),
            "{} of 3000 users on a 30 % canary",
            at_30.len()
        );
        put_canary(
            &proxy,
            &c,
            r#"{"tag":"b","weight":10,"sticky_key":"header:X-User"}"#,
        )
        .await;
        assert_eq!(canary_users(&proxy, &c, users.clone()).await, at_10);

        // Overrides: header beats cookie beats bucket; only between the two tags.
        let never_user = (0..3000).find(|u| !at_10.contains(u)).unwrap().to_string();
        let user = format!("user-{never_user}");
        for (headers, want) in [
            (vec![("x-user", user.as_str()), ("x-canary", "always")], "b"),
            (
                vec![("x-user", user.as_str()), ("cookie", "canary=always")],
                "b",
            ),
            (
                vec![("x-canary", "never"), ("cookie", "x=1; canary=always")],
                "a",
            ),
            (
                vec![("x-canary", "sometimes"), ("x-user", user.as_str())],
                "a",
            ),
        ] {
            assert_eq!(served(&proxy, &c, &headers).await.0, want, "{headers:?}");
        }
        at_10
    });
    let text = plain_http::get_text(&format!("http://{}/metrics", proxy.metrics));
    assert!(
        text.contains(r#"canary_weight{domain="app.test"} 10"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"proxy_requests_total{domain="app.test",tag="b",backend="b1",status="2xx"}"#
        ),
        "{text}"
    );

    // A reload of the (written-back) file and a restart keep every user where it was.
    proxy.signal("HUP");
    wait_until("the reload", || {
        proxy.log().contains("configuration reloaded")
    });
    let sample = 0..600;
    let expected: BTreeSet<usize> = at_10.iter().copied().filter(|u| *u < 600).collect();
    rt.block_on(async {
        assert_eq!(canary_users(&proxy, &c, sample.clone()).await, expected);
    });
    let (http, https, admin) = (proxy.http, proxy.https, proxy.admin);
    let (dir, path) = proxy.stop();
    let proxy = ProxyProcess::spawn(dir, path, http, https, admin, false, &[]);
    rt.block_on(async {
        assert_eq!(canary_users(&proxy, &c, sample).await, expected);
    });
}

#[test]
fn bucket_cookies_are_issued_once_and_honoured() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let b = TestBackend::start(&rt, "b1");
    let body = config(&a, &b, "canary = { tag = \"b\", weight = 50.0 }");
    let proxy = ProxyProcess::start(
        tempfile::tempdir().unwrap(),
        "expose_served_tag = true\ncanary_cookie = \"bkt\"",
        &body,
        false,
    );
    let c = client(&[], true);
    rt.block_on(async {
        let mut seen = BTreeSet::new();
        for _ in 0..40 {
            let (tag, headers) = served(&proxy, &c, &[]).await;
            let cookie = headers["set-cookie"].to_str().unwrap().to_owned();
            let value = cookie
                .strip_prefix("bkt=")
                .and_then(|r| r.strip_suffix("; Path=/; Max-Age=86400; HttpOnly; SameSite=Lax"))
                .unwrap_or_else(|| panic!("{cookie}"));
            let bucket: u16 = value.parse().unwrap();
            // The side follows the bucket it was given: below 5000 is the canary at 50 %.
            assert_eq!(tag == "b", bucket < 5000, "bucket {bucket} on {tag}");
            seen.insert(tag.clone());
            // Sending it back keeps the side and issues no new cookie.
            let (again, headers) =
                served(&proxy, &c, &[("cookie", &format!("bkt={bucket}"))]).await;
            assert_eq!(again, tag);
            assert!(headers.get("set-cookie").is_none());
        }
        assert_eq!(seen.len(), 2, "40 new clients all on one side: {seen:?}");
        // A garbled or out-of-range value is treated as absent: a new bucket is issued.
        for bad in ["bkt=10000", "bkt=abc", "bkt=-1", "bkt="] {
            let (_, headers) = served(&proxy, &c, &[("cookie", bad)]).await;
            assert!(headers.get("set-cookie").is_some(), "{bad}");
        }
        // Keyed by the client address: one client, one side, no cookie.
        put_canary(
            &proxy,
            &c,
            r#"{"tag":"b","weight":50,"sticky_key":"client_ip"}"#,
        )
        .await;
        let (first, _) = served(&proxy, &c, &[]).await;
        for _ in 0..30 {
            let (tag, headers) = served(&proxy, &c, &[]).await;
            assert_eq!(tag, first);
            assert!(headers.get("set-cookie").is_none());
        }
        // Not sticky: every request is drawn anew (60 draws at 50 % all on one side: 2^-59).
        put_canary(&proxy, &c, r#"{"tag":"b","weight":50,"sticky_key":"none"}"#).await;
        let mut tags = BTreeSet::new();
        for _ in 0..60 {
            let (tag, headers) = served(&proxy, &c, &[("cookie", "bkt=1")]).await;
            assert!(headers.get("set-cookie").is_none());
            tags.insert(tag);
        }
        assert_eq!(tags.len(), 2, "{tags:?}");
    });
}

#[test]
fn a_canary_without_healthy_backends_and_changes_under_load_fail_no_request() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let mut b = TestBackend::start(&rt, "b1");
    let body = config(
        &a,
        &b,
        "canary = { tag = \"b\", weight = 50.0, sticky_key = \"none\" }",
    );
    let proxy = Arc::new(ProxyProcess::start(
        tempfile::tempdir().unwrap(),
        "",
        &body,
        false,
    ));
    let c = client(&[], true);

    // The canary's only backend dies: its share goes to the primary, no request fails (a
    // connection refused before the health checker notices is retried on the other side).
    b.kill_all();
    rt.block_on(async {
        for _ in 0..200 {
            assert_eq!(proxy.backend_for(&c, "app.test").await, "a1");
        }
    });
    // Once the health checker marks it down, the canary side has no available backend.
    wait_until("the canary fallbacks to be counted", || {
        assert_eq!(rt.block_on(proxy.backend_for(&c, "app.test")), "a1");
        metric(
            proxy.metrics,
            r#"canary_fallbacks_total{domain="app.test"}"#,
        ) > 0.0
    });
    b.restart();
    wait_until("b1 to be healthy again", || {
        rt.block_on(async {
            let r = c
                .get(proxy.admin_url("/api/v1/backends/b1"))
                .send()
                .await
                .unwrap();
            let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            v["health"] == "up"
        })
    });

    // Load from 4 clients while the canary is changed, promoted, set again and deleted.
    let load = Load::start(&rt, &proxy, "app.test");
    let admin = |method: reqwest::Method, path: &'static str, body: Option<&'static str>| {
        let (c, proxy) = (c.clone(), Arc::clone(&proxy));
        rt.block_on(async move {
            let mut req = c.request(method, proxy.admin_url(path));
            if let Some(body) = body {
                req = req.header("content-type", "application/json").body(body);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        })
    };
    let wait_traffic = |n: usize| {
        let start = load.ok();
        wait_until("requests between changes", || load.ok() >= start + n);
    };
    wait_traffic(50);
    for (method, path, body, want) in [
        (
            reqwest::Method::PUT,
            "/api/v1/domains/app.test/canary",
            Some(r#"{"tag":"b","weight":20}"#),
            200,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/domains/app.test/canary/promote",
            None,
            200,
        ),
        (
            reqwest::Method::PUT,
            "/api/v1/domains/app.test/canary",
            Some(r#"{"tag":"a","weight":70}"#),
            200,
        ),
        (
            reqwest::Method::DELETE,
            "/api/v1/domains/app.test/canary",
            None,
            204,
        ),
    ] {
        let (status, text) = admin(method.clone(), path, body);
        assert_eq!(status, want, "{method} {path}: {text}");
        wait_traffic(50);
    }
    let (ok, failed) = load.stop(&rt);
    assert_eq!(failed, 0, "failed requests during the changes");
    assert!(ok >= 250);
    let domain = proxy.admin_json(&rt, "/api/v1/domains/app.test");
    assert_eq!(domain["enabled_backends_tag"], "b");
    assert!(domain.get("canary").is_none(), "{domain}");
}
