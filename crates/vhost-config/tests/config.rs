//! Loading and write-back against real files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use vhost_config::{load, parse, ConfigError, ConfigWriter, LogFormat};
use vhost_routing::{
    Backend, BackendAddress, BackendId, BackendUpdate, Command, DomainName, Tag, VirtualHost,
    VirtualHostUpdate,
};

fn example_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config.example.toml")
}

fn invalid(text: &str) -> (usize, usize, String, String) {
    match parse(text, "test.toml") {
        Err(ConfigError::Invalid { location, message }) => {
            assert_eq!(location.origin, "test.toml");
            (
                location.line,
                location.column,
                location.key.clone(),
                message,
            )
        }
        other => panic!("expected an invalid-config error, got {other:?}"),
    }
}

const MINIMAL: &str = r#"
[[virtual_hosts]]
domain = "example.com"
enabled_backends_tag = "a"

[[backends]]
id = "web-v1"
address = "127.0.0.1:3001"
tags = ["a"]
"#;

#[test]
fn example_config_parses_and_validates() {
    let config = load(&example_path()).unwrap();
    assert_eq!(config.state.vhosts().len(), 2);
    assert_eq!(config.state.backends().len(), 2);
    assert_eq!(config.proxy.management_api_addr.port(), 8080);
    assert_eq!(config.logging.format, LogFormat::Text);
    assert_eq!(config.health_check.unhealthy_threshold, 3);
}

#[test]
fn defaults_fill_every_optional_key() {
    let config = parse(MINIMAL, "t").unwrap();
    assert_eq!(config.proxy.listen_addr.port(), 443);
    assert_eq!(config.proxy.listen_addr_http.port(), 80);
    assert!(config.metrics.enabled);
    assert_eq!(config.metrics.listen_addr.port(), 9090);
    assert_eq!(config.health_check.interval_secs, 10);
    assert_eq!(config.health_check.healthy_threshold, 2);
    let vhost = config.state.vhosts().next().unwrap();
    assert!(!vhost.http_to_https);
    assert_eq!(config.state.backends().next().unwrap().weight, 1);
    assert!(parse("", "t").unwrap().state.vhosts().len() == 0);
}

#[test]
fn syntax_errors_are_located() {
    let (line, col, _, msg) = invalid("[proxy]\nlisten_addr = \n");
    assert_eq!(line, 2);
    assert!(col > 1, "column {col}");
    assert!(!msg.is_empty());
}

#[test]
fn unknown_keys_are_rejected_with_their_position() {
    let (line, _, key, msg) = invalid("[proxy]\nlisten_adr = \"0.0.0.0:1\"\n");
    assert_eq!(line, 2);
    assert_eq!(key, "proxy.listen_adr");
    assert!(
        msg.contains("unknown field") && msg.contains("listen_adr"),
        "{msg}"
    );

    let (line, _, key, msg) = invalid(&format!("{MINIMAL}colour = \"red\"\n"));
    assert_eq!(line, 10);
    assert_eq!(key, "backends[0].colour");
    assert!(msg.contains("colour"), "{msg}");

    let (line, _, _, msg) = invalid("[extra]\nx = 1\n");
    assert_eq!(line, 1);
    assert!(msg.contains("extra"), "{msg}");
}

#[test]
fn invalid_values_name_key_and_line() {
    let text = MINIMAL.replace("domain = \"example.com\"", "domain = \"bad..example.com\"");
    let (line, col, key, msg) = invalid(&text);
    assert_eq!((line, key.as_str()), (3, "virtual_hosts[0].domain"));
    assert_eq!(col, 10);
    assert!(msg.contains("empty label"), "{msg}");

    let text = MINIMAL.replace("127.0.0.1:3001", "127.0.0.1:70000");
    let (line, _, key, msg) = invalid(&text);
    assert_eq!((line, key.as_str()), (8, "backends[0].address"));
    assert!(msg.contains("70000"), "{msg}");

    let text = MINIMAL.replace("tags = [\"a\"]", "tags = [\"\"]");
    let (_, _, key, msg) = invalid(&text);
    assert_eq!(key, "backends[0].tags[0]");
    assert!(msg.contains("tag is empty"), "{msg}");

    let (line, _, key, _) = invalid("[logging]\nlevel = \"loud\"\n");
    assert_eq!((line, key.as_str()), (2, "logging.level"));
}

#[test]
fn model_rules_are_located_at_the_offending_entry() {
    let dup = format!(
        "{MINIMAL}\n[[virtual_hosts]]\ndomain = \"EXAMPLE.com\"\nenabled_backends_tag = \"b\"\n"
    );
    let (line, _, key, msg) = invalid(&dup);
    assert_eq!(key, "virtual_hosts[1].domain");
    assert_eq!(line, 12);
    assert!(msg.contains("more than once"), "{msg}");

    let dup = format!(
        "{MINIMAL}\n[[backends]]\nid = \"web-v1\"\naddress = \"127.0.0.1:1\"\ntags = [\"a\"]\n"
    );
    let (line, _, key, _) = invalid(&dup);
    assert_eq!((line, key.as_str()), (12, "backends[1].id"));

    let (_, _, key, msg) = invalid(&MINIMAL.replace("tags = [\"a\"]", "tags = []"));
    assert_eq!(key, "backends[0].tags");
    assert!(msg.contains("empty tag list"), "{msg}");

    let (_, _, key, msg) = invalid(&format!("{MINIMAL}weight = 0\n"));
    assert_eq!(key, "backends[0].weight");
    assert!(msg.contains("weight 0"), "{msg}");
}

#[test]
fn section_rules() {
    let (_, _, key, _) = invalid("[logging]\noutput = \"file\"\n");
    assert_eq!(key, "logging.output");
    let (_, _, key, _) = invalid("[health_check]\nunhealthy_threshold = 0\n");
    assert_eq!(key, "health_check.unhealthy_threshold");
    let (_, _, key, _) = invalid("[proxy]\ndefault_cert_path = \"/x.pem\"\n");
    assert_eq!(key, "proxy.default_cert_path");
    let (_, _, key, _) = invalid("[proxy]\nlisten_addr = \"0.0.0.0:80\"\n");
    assert_eq!(key, "proxy.listen_addr_http");
    let (_, _, key, _) = invalid("[proxy]\nmanagement_api_token = \"\"\n");
    assert_eq!(key, "proxy.management_api_token");
    let (_, _, key, _) = invalid("[health_check]\nkind = \"http\"\npath = \"healthz\"\n");
    assert_eq!(key, "health_check.path");
    let (_, _, key, _) = invalid("[health_check]\nexpected_status = [500, 200]\n");
    assert_eq!(key, "health_check.expected_status");
    let (_, _, key, msg) = invalid(&format!(
        "{MINIMAL}health_check = {{ kind = \"http\", path = \"x\" }}\n"
    ));
    assert_eq!(key, "backends[0].health_check.path");
    assert!(msg.contains("must start with '/'"), "{msg}");
    for bad in ["ftp://x", "http://", "hooks.example.com", "https:// x"] {
        let (_, _, key, _) = invalid(&format!("[notifications]\nwebhook_url = \"{bad}\"\n"));
        assert_eq!(key, "notifications.webhook_url", "{bad}");
    }
    assert!(parse(
        "[notifications]\nwebhook_url = \"https://hooks.example.com/x?y=1\"\n",
        "t"
    )
    .is_ok());
    let (_, _, key, _) = invalid("[proxy]\ncanary_cookie = \"a b\"\n");
    assert_eq!(key, "proxy.canary_cookie");
    let (_, _, key, _) = invalid("[proxy]\ncanary_override_cookie = \"vhost_bucket\"\n");
    assert_eq!(key, "proxy.canary_override_cookie");
    let (line, _, key, msg) = invalid(&format!(
        "{MINIMAL}\n[[virtual_hosts]]\ndomain = \"c.test\"\nenabled_backends_tag = \"a\"\ncanary = {{ tag = \"a\", weight = 5 }}\n"
    ));
    assert_eq!(key, "virtual_hosts[1].canary.tag", "{msg}");
    assert!(line > 1);
    let (_, _, key, msg) = invalid(&format!(
        "{MINIMAL}\n[[virtual_hosts]]\ndomain = \"c.test\"\nenabled_backends_tag = \"a\"\ncanary = {{ tag = \"b\", weight = 100.5 }}\n"
    ));
    assert!(key.starts_with("virtual_hosts[1].canary"), "{key}: {msg}");
    assert!(msg.contains("from 0 to 100"), "{msg}");
    // The key comes from the error's kind, not from words in its message.
    let (_, _, key, _) = invalid("[health_check]\nhost = \"a path\"\n");
    assert_eq!(key, "health_check.host");
}

#[test]
fn every_numeric_key_has_a_located_range() {
    for (section, key, value) in [
        ("proxy", "threads", "5000"),
        ("proxy", "max_retries", "16"),
        ("proxy", "read_timeout_ms", "9223372036854775807"),
        ("proxy", "connect_timeout_ms", "0"),
        ("proxy", "grace_period_secs", "9223372036854775807"),
        ("proxy", "dns_refresh_secs", "100000"),
        ("proxy", "upstream_keepalive_pool_size", "100000000"),
        ("proxy", "client_header_timeout_ms", "0"),
        ("proxy", "max_request_header_bytes", "100"),
        ("proxy", "upstream_hold_ms", "3600001"),
        ("health_check", "interval_secs", "86401"),
        ("health_check", "timeout_secs", "0"),
        ("health_check", "healthy_threshold", "1001"),
        ("health_check", "passive_failure_threshold", "4294967295"),
    ] {
        let (line, _, found, msg) = invalid(&format!("[{section}]\n{key} = {value}\n"));
        assert_eq!(
            (line, found.as_str()),
            (2, format!("{section}.{key}").as_str()),
            "{msg}"
        );
        assert!(msg.contains("out of range: must be between"), "{msg}");
    }
}

#[test]
fn missing_file_is_a_read_error() {
    let err = load(std::path::Path::new("/nonexistent/pingora-vhost.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err.to_string().contains("/nonexistent/pingora-vhost.toml"));
}

fn d(s: &str) -> DomainName {
    DomainName::parse(s).unwrap()
}
fn t(s: &str) -> Tag {
    Tag::parse(s).unwrap()
}

#[test]
fn write_back_keeps_comments_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::copy(example_path(), &path).unwrap();
    let mut writer = ConfigWriter::open(&path).unwrap();
    let mut state = load(&path).unwrap().state;

    let commands = vec![
        Command::SwitchTag {
            domain: d("example.com"),
            tag: t("b"),
        },
        Command::AddDomain(VirtualHost::new(d("new.example.org"), t("a"))),
        Command::AddBackend(Backend::new(
            BackendId::parse("web-v3").unwrap(),
            BackendAddress::parse("127.0.0.1:3003").unwrap(),
            vec![t("b")],
        )),
        Command::UpdateBackend {
            id: BackendId::parse("web-v1").unwrap(),
            update: BackendUpdate {
                address: Some(BackendAddress::parse("127.0.0.1:3011").unwrap()),
                weight: Some(7),
                health_check: Some(vhost_routing::ProbeOverride {
                    kind: Some(vhost_routing::ProbeKind::Http),
                    path: Some("/healthz".into()),
                    expected_status: Some([200, 204]),
                    ..Default::default()
                }),
                ..Default::default()
            },
            force: false,
        },
        Command::SetCanary {
            domain: d("example.com"),
            canary: vhost_routing::Canary::new(
                t("a"),
                vhost_routing::CanaryWeight::from_percent(12.5).unwrap(),
                vhost_routing::StickyKey::parse("header:X-User").unwrap(),
            ),
        },
        Command::SetCanary {
            domain: d("example.com"),
            canary: {
                let mut c = vhost_routing::Canary::new(
                    t("a"),
                    vhost_routing::CanaryWeight::from_percent(25.0).unwrap(),
                    vhost_routing::StickyKey::Cookie,
                );
                c.steps = [1.0, 25.0, 100.0]
                    .iter()
                    .map(|p| vhost_routing::CanaryWeight::from_percent(*p).unwrap())
                    .collect();
                c.step = 1;
                c.step_interval_secs = 30;
                c.state = vhost_routing::RolloutState::Paused;
                c.analysis = Some(vhost_routing::Analysis {
                    max_error_rate: vhost_routing::Threshold::new(0.01),
                    max_p99_ms: Some(500),
                    max_p99_ratio: vhost_routing::Threshold::new(1.5),
                    min_requests: 100,
                    interval_secs: 10,
                    failure_limit: 2,
                });
                c
            },
        },
        Command::SetCanary {
            domain: d("*.example.com"),
            canary: vhost_routing::Canary::new(
                t("b"),
                vhost_routing::CanaryWeight::from_percent(0.01).unwrap(),
                vhost_routing::StickyKey::Cookie,
            ),
        },
        Command::PromoteCanary(d("*.example.com")),
        Command::UpdateDomain {
            domain: d("*.example.com"),
            update: VirtualHostUpdate {
                http_to_https: Some(true),
                ..Default::default()
            },
        },
        Command::DeleteBackend {
            id: BackendId::parse("web-v2").unwrap(),
            force: false,
        },
    ];
    for command in commands {
        let (next, change) = state.apply(command).unwrap();
        writer.persist(&change).unwrap();
        state = next;
        // After every step, the file on disk loads to exactly the state in memory.
        assert_eq!(load(&path).unwrap().state, state);
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("# pingora-vhost example configuration."));
    assert!(
        text.contains("# Use backends tagged \"a\""),
        "trailing comment of the switched key kept:\n{text}"
    );
    assert!(text.contains("enabled_backends_tag = \"b\"               # Use backends tagged"));
    assert!(text.contains("# HTTPS port (started when a certificate is configured)"));
    assert!(!text.contains("web-v2"));
    assert!(text.contains("weight = 7"));
    assert!(
        text.contains(
            "health_check = { kind = \"http\", path = \"/healthz\", expected_status = [200, 204] }"
        ),
        "{text}"
    );
    // No temp files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != "config.toml")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn inline_arrays_are_converted_and_edited() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "# top\nvirtual_hosts = [{ domain = \"a.com\", enabled_backends_tag = \"a\" }]\n",
    )
    .unwrap();
    let mut writer = ConfigWriter::open(&path).unwrap();
    let state = load(&path).unwrap().state;
    let (next, change) = state
        .apply(Command::SwitchTag {
            domain: d("a.com"),
            tag: t("z"),
        })
        .unwrap();
    writer.persist(&change).unwrap();
    assert_eq!(load(&path).unwrap().state, next);
    assert!(std::fs::read_to_string(&path).unwrap().starts_with("# top"));
}

#[test]
fn failed_write_leaves_file_and_writer_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    let mut writer = ConfigWriter::open(&path).unwrap();
    let state = load(&path).unwrap().state;
    // An entry that is not in the file (hand-edited away) cannot be updated.
    let ghost = VirtualHost::new(d("ghost.com"), t("a"));
    let (with_ghost, _) = state.apply(Command::AddDomain(ghost)).unwrap();
    let (_, change) = with_ghost
        .apply(Command::SwitchTag {
            domain: d("ghost.com"),
            tag: t("b"),
        })
        .unwrap();
    let err = writer.persist(&change).unwrap_err();
    assert!(err.to_string().contains("ghost.com"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), MINIMAL);

    // The file's directory is no longer a directory (it was moved away and a regular file put
    // in its place): no temp file can be created there, even by root. Nothing is written, and
    // the file (moved with its directory) is as it was.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let nested = sub.join("config.toml");
    std::fs::write(&nested, MINIMAL).unwrap();
    let mut nested_writer = ConfigWriter::open(&nested).unwrap();
    let (_, change) = state
        .apply(Command::SwitchTag {
            domain: d("example.com"),
            tag: t("b"),
        })
        .unwrap();
    let moved = dir.path().join("moved");
    std::fs::rename(&sub, &moved).unwrap();
    std::fs::write(&sub, b"not a directory").unwrap();
    let err = nested_writer.persist(&change).unwrap_err();
    assert!(err.to_string().contains("config.toml"), "{err}");
    assert_eq!(
        std::fs::read_to_string(moved.join("config.toml")).unwrap(),
        MINIMAL
    );
    assert_eq!(std::fs::read(&sub).unwrap(), b"not a directory");
}

#[test]
fn hand_edits_made_since_start_up_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    let mut writer = ConfigWriter::open(&path).unwrap();
    let state = load(&path).unwrap().state;
    // The operator edits the file by hand while the proxy runs (not yet reloaded).
    let edited = MINIMAL.replace(
        "[[backends]]",
        "# maintained by the platform team\n[[backends]]",
    );
    std::fs::write(&path, &edited).unwrap();
    let (_, change) = state
        .apply(Command::SwitchTag {
            domain: d("example.com"),
            tag: t("b"),
        })
        .unwrap();
    writer.persist(&change).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("# maintained by the platform team"), "{text}");
    assert!(text.contains("enabled_backends_tag = \"b\""), "{text}");
}

#[test]
fn symlinked_config_is_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.toml");
    let link = dir.path().join("config.toml");
    std::fs::write(&real, MINIMAL).unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let mut writer = ConfigWriter::open(&link).unwrap();
    let state = load(&link).unwrap().state;
    let (next, change) = state
        .apply(Command::SwitchTag {
            domain: d("example.com"),
            tag: t("b"),
        })
        .unwrap();
    writer.persist(&change).unwrap();
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(load(&real).unwrap().state, next);
}

#[test]
fn lets_encrypt_settings_have_defaults_and_located_errors() {
    use vhost_config::AcmeChallenge;
    let config = parse(
        &format!("[lets_encrypt]\nemail = \"ops@example.com\"\n{MINIMAL}"),
        "t",
    )
    .unwrap();
    let le = config.lets_encrypt.unwrap();
    assert!(le.staging);
    assert_eq!(
        le.directory(),
        "https://acme-staging-v02.api.letsencrypt.org/directory"
    );
    assert_eq!(le.cache_dir, PathBuf::from("/var/lib/pingora-vhost/acme"));
    assert_eq!(le.challenge, AcmeChallenge::Http01);
    assert_eq!(le.renew_before_days, 30);
    let config = parse(
        "[lets_encrypt]\nemail = \"ops@example.com\"\nstaging = false\nchallenge = \"tls-alpn-01\"\n",
        "t",
    )
    .unwrap();
    let le = config.lets_encrypt.unwrap();
    assert_eq!(
        le.directory(),
        "https://acme-v02.api.letsencrypt.org/directory"
    );
    assert_eq!(le.challenge, AcmeChallenge::TlsAlpn01);
    let le = parse(
        "[lets_encrypt]\nemail = \"ops@example.com\"\ndirectory_url = \"https://127.0.0.1:14000/dir\"\n",
        "t",
    )
    .unwrap()
    .lets_encrypt
    .unwrap();
    assert_eq!(le.directory(), "https://127.0.0.1:14000/dir");

    let base = "[lets_encrypt]\nemail = \"ops@example.com\"\n";
    for (extra, expected) in [
        (
            "directory_url = \"http://ca.example/dir\"\n",
            "lets_encrypt.directory_url",
        ),
        ("renew_before_days = 0\n", "lets_encrypt.renew_before_days"),
        (
            "renew_before_days = 181\n",
            "lets_encrypt.renew_before_days",
        ),
        ("challenge = \"dns-01\"\n", "lets_encrypt.challenge"),
        ("cache_dir = \"\"\n", "lets_encrypt.cache_dir"),
    ] {
        let (line, _, key, msg) = invalid(&format!("{base}{extra}"));
        assert_eq!(key, expected, "{extra}: {msg}");
        assert!(line >= 1);
    }
    let (_, _, key, _) = invalid("[lets_encrypt]\nemail = \"not an address\"\n");
    assert_eq!(key, "lets_encrypt.email");
}

#[test]
fn acme_opt_in_and_out_per_domain() {
    let config = parse(
        &MINIMAL.replacen(
            "enabled_backends_tag = \"a\"\n",
            "enabled_backends_tag = \"a\"\nacme = false\n",
            1,
        ),
        "t",
    )
    .unwrap();
    let vhost = config.state.vhosts().next().unwrap();
    assert_eq!(vhost.acme, Some(false));
    assert!(!vhost.wants_acme());
    let wildcard = format!(
        "{MINIMAL}\n[[virtual_hosts]]\ndomain = \"*.example.org\"\nenabled_backends_tag = \"a\"\nacme = true\n"
    );
    let (_, _, key, msg) = invalid(&wildcard);
    assert_eq!(key, "virtual_hosts[1].acme");
    assert!(msg.contains("DNS-01"), "{msg}");
    let own = format!(
        "{MINIMAL}\n[[virtual_hosts]]\ndomain = \"b.example.org\"\nenabled_backends_tag = \"a\"\nacme = true\ntls_cert_path = \"/c.pem\"\ntls_key_path = \"/k.pem\"\n"
    );
    let (_, _, key, _) = invalid(&own);
    assert_eq!(key, "virtual_hosts[1].acme");
}
