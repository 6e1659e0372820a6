//! The operator's side of the real binary: reloading the config (SIGHUP and the API), `--check`
//! running the start-up checks, the metrics token, the admin API refusing foreign hosts and
//! origins, and certificate paths that are not certificate files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn vhost(domain: &str, tag: &str, extra: &str) -> String {
    format!(
        "[[virtual_hosts]]\ndomain = \"{domain}\"\nenabled_backends_tag = \"{tag}\"\n{extra}\n\n"
    )
}

fn backend(id: &str, b: &TestBackend, tag: &str) -> String {
    format!(
        "[[backends]]\nid = \"{id}\"\naddress = \"{}\"\ntags = [\"{tag}\"]\n\n",
        b.addr
    )
}

/// The `[proxy]` header and listener lines the harness wrote, to keep them when rewriting the
/// file.
fn listener_part(config: &str) -> String {
    config
        .split("[[virtual_hosts]]")
        .next()
        .unwrap()
        .split("[[backends]]")
        .next()
        .unwrap()
        .to_owned()
}

async fn reload(c: &reqwest::Client, proxy: &ProxyProcess) -> (u16, Value) {
    let r = c
        .post(proxy.admin_url("/api/v1/config/reload"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (
        status,
        serde_json::from_str(&r.text().await.unwrap()).unwrap(),
    )
}

#[test]
fn sighup_and_the_reload_endpoint_apply_a_valid_file_and_refuse_a_bad_one_whole() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let b = TestBackend::start(&rt, "b1");
    let body = format!(
        "{}{}{}",
        vhost("one.test", "a", ""),
        backend("a1", &a, "a"),
        backend("b1", &b, "b")
    );
    let proxy = ProxyProcess::start_logged(
        tempfile::tempdir().unwrap(),
        "",
        "format = \"json\"",
        &body,
        false,
    );
    let c = client(&[], true);
    let head = listener_part(&std::fs::read_to_string(&proxy.config_path).unwrap());

    // A hand edit: one.test moves to tag b, two.test appears.
    std::fs::write(
        &proxy.config_path,
        format!(
            "{head}{}{}{}{}",
            vhost("one.test", "b", ""),
            vhost("two.test", "a", ""),
            backend("a1", &a, "a"),
            backend("b1", &b, "b")
        ),
    )
    .unwrap();
    proxy.signal("HUP");
    rt.block_on(async {
        let start = Instant::now();
        while proxy.get(&c, "two.test", "/").await.0 != 200 {
            assert!(
                start.elapsed() < DEADLINE,
                "SIGHUP not applied:\n{}",
                proxy.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(proxy.backend_for(&c, "one.test").await, "b1");
    });
    wait_until("the reload summary", || {
        proxy.log().contains("configuration reloaded") && proxy.log().contains("domains +1 -0 ~1")
    });

    // A broken file: refused with its position, nothing changes.
    let broken = format!(
        "{head}{}{}{}",
        vhost("one.test", "a", ""),
        vhost("bad..name", "a", ""),
        backend("a1", &a, "a")
    );
    std::fs::write(&proxy.config_path, &broken).unwrap();
    proxy.signal("HUP");
    wait_until("the rejection to be logged", || {
        proxy.log().contains("configuration reload rejected")
    });
    let log = proxy.log();
    let line = log
        .lines()
        .find(|l| l.contains("configuration reload rejected"))
        .unwrap();
    assert!(
        line.contains("config.toml:") && line.contains("virtual_hosts[1].domain"),
        "{line}"
    );
    rt.block_on(async {
        assert_eq!(proxy.backend_for(&c, "one.test").await, "b1");
        assert_eq!(proxy.backend_for(&c, "two.test").await, "a1");

        // The same through the API: 400 naming the key, state unchanged.
        let (status, body) = reload(&c, &proxy).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "invalid_config");
        assert_eq!(body["error"]["field"], "virtual_hosts[1].domain");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("config.toml:"));

        // A certificate path that names a device: refused at the key that names it.
        std::fs::write(
            &proxy.config_path,
            format!(
                "{head}{}{}",
                vhost(
                    "one.test",
                    "a",
                    "tls_cert_path = \"/dev/zero\"\ntls_key_path = \"/dev/zero\""
                ),
                backend("a1", &a, "a")
            ),
        )
        .unwrap();
        let (status, body) = reload(&c, &proxy).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["field"], "virtual_hosts[0].tls_cert_path");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("character device"),
            "{body}"
        );
        assert_eq!(proxy.backend_for(&c, "two.test").await, "a1");

        // A valid file with a listener change: applied, the listener change reported.
        let moved = head.replace("[proxy]\n", "[proxy]\nthreads = 3\n");
        std::fs::write(
            &proxy.config_path,
            format!(
                "{moved}{}{}",
                vhost("one.test", "a", ""),
                backend("a1", &a, "a")
            ),
        )
        .unwrap();
        let (status, body) = reload(&c, &proxy).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["domains"]["removed"], serde_json::json!(["two.test"]));
        assert_eq!(body["domains"]["changed"], serde_json::json!(["one.test"]));
        assert_eq!(body["backends"]["removed"], serde_json::json!(["b1"]));
        assert_eq!(
            body["restart_required"],
            serde_json::json!(["proxy.threads"])
        );
        assert_eq!(proxy.get(&c, "two.test", "/").await.0, 404);
        assert_eq!(proxy.backend_for(&c, "one.test").await, "a1");

        // API writes keep working on top of the reloaded file, and are written back to it.
        let r = c
            .post(proxy.admin_url("/api/v1/domains"))
            .header("content-type", "application/json")
            .body(r#"{"domain": "three.test", "enabled_backends_tag": "a"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let file = std::fs::read_to_string(&proxy.config_path).unwrap();
        assert!(
            file.contains("three.test") && file.contains("threads = 3"),
            "{file}"
        );
    });
}

#[test]
fn a_reload_swaps_certificates_without_a_restart() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let dir = tempfile::tempdir().unwrap();
    let (c1, k1) = self_signed(dir.path(), "first", &["first.test"]);
    let (c2, k2) = self_signed(dir.path(), "second", &["second.test"]);
    let tls = |c: &std::path::Path, k: &std::path::Path| {
        format!(
            "tls_cert_path = \"{}\"\ntls_key_path = \"{}\"",
            c.display(),
            k.display()
        )
    };
    let body = format!(
        "{}{}",
        vhost("secure.test", "a", &tls(&c1, &k1)),
        backend("a1", &a, "a")
    );
    let proxy = ProxyProcess::start(dir, "", &body, true);
    let head = listener_part(&std::fs::read_to_string(&proxy.config_path).unwrap());
    let served_name = || {
        let c = client(&[("secure.test", proxy.https)], false);
        rt.block_on(async {
            let r = c
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
            common_name(&der)
        })
    };
    assert_eq!(served_name(), "first.test");
    std::fs::write(
        &proxy.config_path,
        format!(
            "{head}{}{}",
            vhost("secure.test", "a", &tls(&c2, &k2)),
            backend("a1", &a, "a")
        ),
    )
    .unwrap();
    proxy.signal("HUP");
    wait_until("the new certificate to be served", || {
        served_name() == "second.test"
    });
}

#[test]
fn check_runs_the_start_up_checks_and_prints_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(binary())
            .arg("--check")
            .arg("--config")
            .arg(&path)
            .env_remove(vhost_admin::TOKEN_ENV)
            .env_remove("PINGORA_VHOST_METRICS_TOKEN")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Start-up refuses a public API without a token: so does --check.
    let (code, _, err) = check("[proxy]\nmanagement_api_addr = \"0.0.0.0:8080\"\n");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("management_api_token"), "{err}");
    // Allowed but worth a warning: redirects to an HTTPS listener that will not start, public
    // metrics without a token.
    let (code, out, err) = check(
        "[metrics]\nlisten_addr = \"0.0.0.0:9090\"\n\n[[virtual_hosts]]\ndomain = \"a.test\"\nenabled_backends_tag = \"a\"\nhttp_to_https = true\n",
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("OK"), "{out}");
    assert!(
        err.contains("warning: http_to_https is set for a.test"),
        "{err}"
    );
    assert!(err.contains("metrics token"), "{err}");
    // A certificate that is not a file is located at the key naming it.
    let (code, _, err) = check(
        "[[virtual_hosts]]\ndomain = \"a.test\"\nenabled_backends_tag = \"a\"\ntls_cert_path = \"/dev/zero\"\ntls_key_path = \"/dev/zero\"\n",
    );
    assert_eq!(code, Some(1));
    assert!(
        err.contains("c.toml:4:17: virtual_hosts[0].tls_cert_path")
            && err.contains("character device"),
        "{err}"
    );
    // Out-of-range limits are located errors.
    let (code, _, err) = check("[proxy]\nmax_request_header_bytes = 10\n");
    assert_eq!(code, Some(1));
    assert!(
        err.contains("c.toml:2:") && err.contains("between 1024 and"),
        "{err}"
    );
}

#[test]
fn metrics_can_require_a_bearer_token() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let proxy = ProxyProcess::start_with_env(
        tempfile::tempdir().unwrap(),
        "",
        &format!("{}{}", vhost("one.test", "a", ""), backend("a1", &a, "a")),
        &[("PINGORA_VHOST_METRICS_TOKEN", "sc4pe")],
    );
    let c = client(&[], true);
    rt.block_on(async {
        for path in ["/metrics", "/api/v1/metrics"] {
            let url = format!("http://{}{path}", proxy.metrics);
            let r = c.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 401, "{path}");
            let r = c.get(&url).bearer_auth("wrong").send().await.unwrap();
            assert_eq!(r.status(), 401, "{path}");
            let r = c.get(&url).bearer_auth("sc4pe").send().await.unwrap();
            assert_eq!(r.status(), 200, "{path}");
            assert!(r.text().await.unwrap().contains("proxy_connections_open"));
        }
    });
}

#[test]
fn the_token_less_api_refuses_foreign_hosts_and_origins() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let proxy = ProxyProcess::start(
        tempfile::tempdir().unwrap(),
        "",
        &format!("{}{}", vhost("one.test", "a", ""), backend("a1", &a, "a")),
        false,
    );
    let c = client(&[], true);
    rt.block_on(async {
        let write = |host: Option<&str>, origin: Option<&str>| {
            let mut r = c
                .post(proxy.admin_url("/api/v1/domains/one.test/switch"))
                .header("content-type", "application/json")
                .body(r#"{"new_tag": "a"}"#);
            if let Some(h) = host {
                r = r.header("host", h);
            }
            if let Some(o) = origin {
                r = r.header("origin", o);
            }
            r.send()
        };
        let r = write(Some("attacker.example"), None).await.unwrap();
        assert_eq!(r.status(), 403);
        let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "forbidden");
        let r = write(None, Some("http://attacker.example")).await.unwrap();
        assert_eq!(r.status(), 403);
        let r = write(Some(&format!("localhost:{}", proxy.admin.port())), None)
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = write(None, None).await.unwrap();
        assert_eq!(
            r.status(),
            200,
            "curl-style requests to the API's own address work"
        );
    });
}

#[test]
fn certificate_paths_that_are_not_certificate_files_are_refused_quickly() {
    let rt = runtime();
    let a = TestBackend::start(&rt, "a1");
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("cert.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let big = dir.path().join("big.pem");
    std::fs::write(&big, vec![b'A'; 2 * 1024 * 1024]).unwrap();
    let proxy = ProxyProcess::start(
        dir,
        "",
        &format!("{}{}", vhost("one.test", "a", ""), backend("a1", &a, "a")),
        false,
    );
    let c = client(&[], true);
    rt.block_on(async {
        for (path, expected) in [
            ("/dev/zero".to_owned(), "character device"),
            (fifo.display().to_string(), "FIFO"),
            ("/tmp".to_owned(), "directory"),
            (big.display().to_string(), "larger than"),
        ] {
            let started = Instant::now();
            let r = c
                .put(proxy.admin_url("/api/v1/domains/one.test"))
                .header("content-type", "application/json")
                .body(format!(
                    r#"{{"tls_cert_path": "{path}", "tls_key_path": "{path}"}}"#
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 422, "{path}");
            let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains(expected), "{path}: {message}");
            assert!(
                !message.contains("AAAA"),
                "file contents in the error: {message}"
            );
            // Refused at once, not after reading (or waiting on) the file.
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{path}: {:?}",
                started.elapsed()
            );
        }
        // Nothing is stuck: the next write goes through at once.
        let r = c
            .post(proxy.admin_url("/api/v1/domains/one.test/switch"))
            .header("content-type", "application/json")
            .body(r#"{"new_tag": "a"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    });
}

/// `systemd-analyze verify` on a copy of the unit pointing at the binary under test; any
/// complaint (unknown key, missing executable, bad value) fails.
fn verify_unit(text: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("pingora-vhost.service");
    std::fs::write(&unit, text.replace("/usr/bin/pingora-vhost", binary())).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .map_err(|e| format!("systemd-analyze: {e} (apt-get install systemd)"))?;
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && complaints.trim().is_empty() {
        Ok(())
    } else {
        Err(complaints)
    }
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../packaging/pingora-vhost.service");
    let unit = std::fs::read_to_string(path).unwrap();
    verify_unit(&unit).unwrap();
    for line in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Type=notify",
        "NotifyAccess=all",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "StateDirectory=pingora-vhost pingora-vhost/acme",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "User=pingora-vhost",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    // The check can fail: a misspelt key is reported.
    let typo = unit.replace("ProtectSystem=strict", "ProtectSytem=strict");
    assert!(verify_unit(&typo).unwrap_err().contains("ProtectSytem"));
    // The unit's pre-start check passes on the packaged example config.
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config.example.toml");
    let status = std::process::Command::new(binary())
        .args(["--check", "--config"])
        .arg(example)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
}

#[test]
fn the_alerting_rules_parse_and_name_metrics_the_proxy_exports() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let rules = root.join("packaging/pingora-vhost.rules.yml");
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    assert!(out.status.success(), "{out:?}");
    // Every metric the rules use is one the code registers.
    let text = std::fs::read_to_string(&rules).unwrap();
    let sources: String = [
        "crates/vhost-pingora/src",
        "crates/vhost-health/src",
        "crates/vhost-server/src",
    ]
    .iter()
    .flat_map(|dir| std::fs::read_dir(root.join(dir)).unwrap())
    .flat_map(|entry| {
        let path = entry.unwrap().path();
        let files: Vec<std::path::PathBuf> = if path.is_dir() {
            std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect()
        } else {
            vec![path]
        };
        files
    })
    .filter(|p| p.extension().is_some_and(|e| e == "rs"))
    .map(|p| std::fs::read_to_string(p).unwrap())
    .collect();
    for name in [
        "health_check_status",
        "proxy_requests_total",
        "tls_certificate_expiry_timestamp_seconds",
        "acme_consecutive_failures",
        "circuit_breaker_open",
        "rollout_aborts_total",
        "proxy_connections_rejected_total",
    ] {
        assert!(text.contains(name), "the rules do not use {name}");
        assert!(
            sources.contains(&format!("\"{name}\"")),
            "{name} is not exported"
        );
    }
}

#[test]
fn the_debian_package_holds_the_binary_the_unit_and_the_config_as_a_conffile() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let deb = root.join("target/debian/pingora-vhost-dev.deb");
    assert!(
        deb.exists(),
        "{} is missing: run scripts/deb.sh --dev (scripts/test.sh does)",
        deb.display()
    );
    let run = |args: &[&str]| {
        let out = std::process::Command::new("dpkg-deb")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "dpkg-deb {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let deb_s = deb.to_str().unwrap();
    let info = run(&["--info", deb_s]);
    assert!(info.contains("Package: pingora-vhost"), "{info}");
    assert!(info.contains("Depends: adduser"), "{info}");
    assert_eq!(run(&["--field", deb_s, "Section"]).trim(), "net");
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control");
    run(&["--control", deb_s, control.to_str().unwrap()]);
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/pingora-vhost/config.toml");
    assert!(std::fs::read_to_string(control.join("postinst"))
        .unwrap()
        .contains("adduser --system"));
    // Unpacked: the binary checks the packaged config, and the packaged unit verifies.
    let files = dir.path().join("files");
    run(&["-x", deb_s, files.to_str().unwrap()]);
    let binary = files.join("usr/bin/pingora-vhost");
    let config = files.join("etc/pingora-vhost/config.toml");
    let out = std::process::Command::new(&binary)
        .arg("--check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let unit =
        std::fs::read_to_string(files.join("lib/systemd/system/pingora-vhost.service")).unwrap();
    verify_unit(&unit).unwrap();
    assert!(files
        .join("usr/share/doc/pingora-vhost/operations.md")
        .exists());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&config).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o640);
}
