//! The admin API of the real binary: switches seen by the next proxied request, persistence
//! across a restart, certificates added at runtime, and the exposure rule.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn config_body(a: &TestBackend, b: &TestBackend) -> String {
    format!(
        "[[virtual_hosts]]\ndomain = \"app.test\"\nenabled_backends_tag = \"a\"   # stable by default\n\n\
         [[backends]]\nid = \"a1\"\naddress = \"{}\"\ntags = [\"a\"]\n\n\
         [[backends]]\nid = \"b1\"\naddress = \"{}\"\ntags = [\"b\"]\n",
        a.addr, b.addr
    )
}

async fn post_json(c: &reqwest::Client, url: String, body: &str) -> (u16, Value) {
    let r = c
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[test]
fn switch_is_seen_by_the_next_request_and_survives_a_restart() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let b = TestBackend::start(&rt, "b1");
    let proxy = ProxyProcess::start(
        tempfile::tempdir().unwrap(),
        "",
        &config_body(&a, &b),
        false,
    );
    let c = client(&[], true);
    rt.block_on(async {
        assert_eq!(proxy.backend_for(&c, "app.test").await, "a1");
        let (status, body) = post_json(
            &c,
            proxy.admin_url("/api/v1/domains/app.test/switch"),
            r#"{"new_tag": "b"}"#,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        // The very next request goes to the new tag.
        assert_eq!(proxy.backend_for(&c, "app.test").await, "b1");
        // Runtime additions: a domain and a backend.
        let (status, _) = post_json(
            &c,
            proxy.admin_url("/api/v1/backends"),
            &format!(r#"{{"id": "c1", "address": "{}", "tags": ["c"]}}"#, a.addr),
        )
        .await;
        assert_eq!(status, 201);
        let (status, _) = post_json(
            &c,
            proxy.admin_url("/api/v1/domains"),
            r#"{"domain": "new.test", "enabled_backends_tag": "c"}"#,
        )
        .await;
        assert_eq!(status, 201);
        assert_eq!(proxy.backend_for(&c, "new.test").await, "a1");
    });

    let (dir, config_path) = proxy.stop();
    let text = std::fs::read_to_string(&config_path).unwrap();
    assert!(text.starts_with("# test config"), "{text}");
    assert!(
        text.contains("enabled_backends_tag = \"b\"   # stable by default"),
        "{text}"
    );

    let restarted = {
        let cfg = vhost_config::load(&config_path).unwrap();
        ProxyProcess::spawn(
            dir,
            config_path,
            cfg.proxy.listen_addr_http,
            cfg.proxy.listen_addr,
            cfg.proxy.management_api_addr,
            false,
            &[],
        )
    };
    rt.block_on(async {
        let r = c
            .get(restarted.admin_url("/api/v1/domains/app.test"))
            .send()
            .await
            .unwrap();
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(v["enabled_backends_tag"], "b");
        assert_eq!(restarted.backend_for(&c, "app.test").await, "b1");
        assert_eq!(restarted.backend_for(&c, "new.test").await, "a1");
    });
}

#[test]
fn certificates_added_at_runtime_are_served_and_bad_ones_refused() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let b = TestBackend::start(&rt, "b1");
    let dir = tempfile::tempdir().unwrap();
    let (cd, kd) = self_signed(dir.path(), "default", &["default.invalid"]);
    let (cn, kn) = self_signed(dir.path(), "new", &["secure.test"]);
    let extra = format!(
        "default_cert_path = \"{}\"\ndefault_key_path = \"{}\"",
        cd.display(),
        kd.display()
    );
    let proxy = ProxyProcess::start(dir, &extra, &config_body(&a, &b), true);
    let c = client(&[], true);
    let file_before = std::fs::read(&proxy.config_path).unwrap();
    rt.block_on(async {
        let (status, body) = post_json(
            &c,
            proxy.admin_url("/api/v1/domains"),
            r#"{"domain": "secure.test", "enabled_backends_tag": "a", "tls_cert_path": "/nonexistent.crt", "tls_key_path": "/nonexistent.key"}"#,
        )
        .await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error"]["code"], "unservable");
        assert!(body["error"]["message"].as_str().unwrap().contains("/nonexistent.crt"));
        assert_eq!(std::fs::read(&proxy.config_path).unwrap(), file_before);

        let (status, body) = post_json(
            &c,
            proxy.admin_url("/api/v1/domains"),
            &format!(
                r#"{{"domain": "secure.test", "enabled_backends_tag": "a", "tls_cert_path": "{}", "tls_key_path": "{}"}}"#,
                cn.display(),
                kn.display()
            ),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let tls = client(&[("secure.test", proxy.https)], false);
        let r = tls
            .get(format!("https://secure.test:{}/", proxy.https.port()))
            .send()
            .await
            .unwrap();
        let der = r
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|t| t.peer_certificate())
            .map(<[u8]>::to_vec)
            .unwrap();
        assert_eq!(common_name(&der), "secure.test");
        assert_eq!(backend_of(&r.text().await.unwrap()), "a1");
    });
}

#[test]
fn an_unauthenticated_api_on_a_public_address_is_refused_and_the_token_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let port = free_port();
    std::fs::write(
        &path,
        format!(
            "[proxy]\nmanagement_api_addr = \"0.0.0.0:{port}\"\nlisten_addr_http = \"127.0.0.1:{}\"\n[metrics]\nenabled = false\n",
            free_port()
        ),
    )
    .unwrap();
    let out = Command::new(binary())
        .arg("--config")
        .arg(&path)
        .env_remove(vhost_admin::TOKEN_ENV)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("management_api_token") && err.contains("not a loopback"),
        "{err}"
    );

    // With the token from the environment it starts, and enforces it.
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let b = TestBackend::start(&rt, "b1");
    let proxy = ProxyProcess::start_with_env(
        tempfile::tempdir().unwrap(),
        "",
        &config_body(&a, &b),
        &[(vhost_admin::TOKEN_ENV, "t0ken")],
    );
    let c = client(&[], true);
    rt.block_on(async {
        let r = c
            .get(proxy.admin_url("/api/v1/health"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = c
            .get(proxy.admin_url("/api/v1/domains"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = c
            .get(proxy.admin_url("/api/v1/domains"))
            .bearer_auth("t0ken")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    });
}
