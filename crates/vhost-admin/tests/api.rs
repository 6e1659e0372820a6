//! The admin API as a tower service (`oneshot`), over a real config file on disk.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use vhost_admin::{router, AdminState, ApplyHook, Refusal};
use vhost_config::ConfigWriter;
use vhost_routing::{BackendId, BuildOptions, LiteralOnly, RouteStore, RouteWriter, State};

const CONFIG: &str = r#"# Operator's comment at the top.
[proxy]
management_api_addr = "127.0.0.1:8080"

# Define your virtual hosts (domains)
[[virtual_hosts]]
domain = "example.com"
enabled_backends_tag = "a"               # Use backends tagged "a"
http_to_https = true

# Define backend servers
[[backends]]
id = "web-v1"
address = "127.0.0.1:3001"
tags = ["a"]
"#;

struct Api {
    router: Router,
    store: Arc<RouteStore>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

fn api_with(
    token: Option<&str>,
    hook: Option<Box<dyn Fn(&State) -> Result<(), String> + Send + Sync>>,
) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, CONFIG).unwrap();
    let config = vhost_config::load(&path).unwrap();
    let (store, writer) =
        RouteWriter::new(config.state, Box::new(LiteralOnly), BuildOptions::default());
    let mut state = AdminState::new(
        writer,
        Some(ConfigWriter::open(&path).unwrap()),
        token.map(str::to_owned),
    )
    .with_listen_addr(config.proxy.management_api_addr)
    .with_metrics(Arc::new(|| "# TYPE up gauge\nup 1\n".to_owned()));
    if let Some(check) = hook {
        state = state.with_hook(FnHook(check));
    }
    Api {
        router: router(Arc::new(state)),
        store,
        path,
        _dir: dir,
    }
}

fn api() -> Api {
    api_with(None, None)
}

struct FnHook(Box<dyn Fn(&State) -> Result<(), String> + Send + Sync>);

impl ApplyHook for FnHook {
    fn prepare(&self, next: &State) -> Result<Box<dyn FnOnce() + Send>, Refusal> {
        (self.0)(next).map_err(|message| Refusal {
            field: "tls_cert_path".into(),
            source: message.into(),
        })?;
        Ok(Box::new(|| {}))
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }

    fn error(&self) -> (String, Option<String>) {
        let v = self.json();
        (
            v["error"]["code"].as_str().unwrap().to_owned(),
            v["error"]["field"].as_str().map(str::to_owned),
        )
    }
}

async fn send(
    api: &Api,
    method: Method,
    uri: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    // What a client addressing the API on its own address sends (see same_origin_only).
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", "127.0.0.1:8080");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
        .unwrap();
    let resp = api.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        text: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

async fn get(api: &Api, uri: &str) -> Reply {
    send(api, Method::GET, uri, None, &[]).await
}

#[tokio::test]
async fn every_seed_example_works() {
    let api = api();
    // GET /api/v1/health
    let r = get(&api, "/api/v1/health").await;
    assert_eq!((r.status, r.text.as_str()), (StatusCode::OK, "OK"));

    // GET /api/v1/domains
    let r = get(&api, "/api/v1/domains").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json(),
        json!([{"domain": "example.com", "enabled_backends_tag": "a", "http_to_https": true}])
    );
    assert!(r.headers.contains_key("etag"));

    // GET /api/v1/domains/:domain
    let r = get(&api, "/api/v1/domains/example.com").await;
    assert_eq!(r.json()["enabled_backends_tag"], "a");

    // POST /api/v1/domains
    let r = send(
        &api,
        Method::POST,
        "/api/v1/domains",
        Some(
            r#"{"domain": "shop.example.com", "enabled_backends_tag": "a", "http_to_https": true}"#,
        ),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.headers["location"], "/api/v1/domains/shop.example.com");

    // POST /api/v1/backends
    let r = send(
        &api,
        Method::POST,
        "/api/v1/backends",
        Some(r#"{"id": "web-v2", "address": "127.0.0.1:3002", "tags": ["b"]}"#),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(
        r.json(),
        json!({"id": "web-v2", "address": "127.0.0.1:3002", "tags": ["b"], "weight": 1, "health": "up", "protocol": "http", "circuit": "closed"})
    );

    // PUT /api/v1/domains/:domain
    let r = send(
        &api,
        Method::PUT,
        "/api/v1/domains/shop.example.com",
        Some(r#"{"enabled_backends_tag": "b", "http_to_https": false}"#),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json(),
        json!({"domain": "shop.example.com", "enabled_backends_tag": "b", "http_to_https": false})
    );

    // GET /api/v1/backends and /api/v1/backends/:id
    let r = get(&api, "/api/v1/backends").await;
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    let r = get(&api, "/api/v1/backends/web-v1").await;
    assert_eq!(r.json()["tags"], json!(["a"]));

    // PUT /api/v1/backends/:id (seed example: a host name; it does not resolve here)
    let r = send(
        &api,
        Method::PUT,
        "/api/v1/backends/web-v2",
        Some(r#"{"address": "localhost:3003", "tags": ["a", "b"]}"#),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["address"], "localhost:3003");
    assert_eq!(r.json()["health"], "unresolved");

    // The A/B flow: switch to "b" (web-v2 carries b but is unresolved: no healthy backend)...
    let switch = |tag: &'static str, q: &'static str| {
        let api = &api;
        async move {
            send(
                api,
                Method::POST,
                &format!("/api/v1/domains/example.com/switch{q}"),
                Some(&format!(r#"{{"new_tag": "{tag}"}}"#)),
                &[],
            )
            .await
        }
    };
    let r = switch("b", "").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    assert_eq!(r.error().0, "no_healthy_backend");
    // ...so give b a reachable backend, switch, and roll back.
    let r = send(
        &api,
        Method::PUT,
        "/api/v1/backends/web-v2",
        Some(r#"{"address": "127.0.0.1:3003"}"#),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = switch("b", "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["enabled_backends_tag"], "b");
    // The very next routing decision uses the new tag.
    let picked = api
        .store
        .load()
        .lookup(b"example.com")
        .unwrap()
        .select()
        .unwrap()
        .id()
        .to_string();
    assert_eq!(picked, "web-v2");
    let r = switch("a", "").await;
    assert_eq!(r.json()["enabled_backends_tag"], "a");

    // DELETE /api/v1/domains/:domain and /api/v1/backends/:id
    let r = send(
        &api,
        Method::DELETE,
        "/api/v1/domains/shop.example.com",
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = send(&api, Method::DELETE, "/api/v1/backends/web-v2", None, &[]).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert_eq!(
        get(&api, "/api/v1/domains/shop.example.com").await.status,
        StatusCode::NOT_FOUND
    );

    // GET /api/v1/metrics
    let r = get(&api, "/api/v1/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert!(r.text.contains("up 1"));

    // Everything above is in the file, comments kept.
    let text = std::fs::read_to_string(&api.path).unwrap();
    assert!(text.starts_with("# Operator's comment at the top."));
    assert!(text.contains("# Use backends tagged \"a\""));
    let on_disk = vhost_config::load(&api.path).unwrap().state;
    assert_eq!(&on_disk, api.store.load().state().as_ref());
}

#[tokio::test]
async fn every_error_class_has_its_status_code_and_field() {
    let api = api_with(
        None,
        Some(Box::new(|s: &State| {
            if s.vhosts()
                .any(|v| v.tls_cert_path.as_deref() == Some("/missing.pem"))
            {
                Err("cannot read /missing.pem".into())
            } else {
                Ok(())
            }
        })),
    );
    let cases: Vec<(
        Method,
        &str,
        Option<&str>,
        Vec<(&str, &str)>,
        StatusCode,
        &str,
        Option<&str>,
    )> = vec![
        (
            Method::POST,
            "/api/v1/domains",
            Some("{\"domain\": "),
            vec![],
            StatusCode::BAD_REQUEST,
            "malformed_json",
            None,
        ),
        (
            Method::POST,
            "/api/v1/domains",
            Some(r#"{"domain":"a.com","enabled_backends_tag":"a","colour":1}"#),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("colour"),
        ),
        (
            Method::POST,
            "/api/v1/domains",
            Some(r#"{"domain":"bad..com","enabled_backends_tag":"a"}"#),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("domain"),
        ),
        (
            Method::POST,
            "/api/v1/domains",
            Some(r#"{"domain":"a.com"}"#),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("enabled_backends_tag"),
        ),
        (
            Method::POST,
            "/api/v1/domains",
            Some(
                r#"{"domain":"a.com","enabled_backends_tag":"a","tls_cert_path":"/missing.pem","tls_key_path":"/k.pem"}"#,
            ),
            vec![],
            StatusCode::UNPROCESSABLE_ENTITY,
            "unservable",
            Some("tls_cert_path"),
        ),
        (
            Method::POST,
            "/api/v1/domains",
            Some(r#"{"domain":"a.com","enabled_backends_tag":"a","tls_cert_path":"/c.pem"}"#),
            vec![],
            StatusCode::UNPROCESSABLE_ENTITY,
            "inconsistent",
            Some("tls_cert_path"),
        ),
        (
            Method::PUT,
            "/api/v1/backends/web-v1",
            Some(r#"{"health_check":{"expected_status":[500,200]}}"#),
            vec![],
            StatusCode::UNPROCESSABLE_ENTITY,
            "inconsistent",
            Some("health_check.expected_status"),
        ),
        (
            Method::PUT,
            "/api/v1/backends/web-v1",
            Some(r#"{"health_check":{"expected_status":[200,600]}}"#),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("health_check.expected_status"),
        ),
        (
            Method::DELETE,
            "/api/v1/backends/web-v1?force=maybe",
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("force"),
        ),
        (
            Method::POST,
            "/api/v1/backends",
            Some(r#"{"id":"x","address":"127.0.0.1:0","tags":["a"]}"#),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("address"),
        ),
        (
            Method::POST,
            "/api/v1/backends",
            Some(r#"{"id":"x","address":"127.0.0.1:1","tags":[""]}"#),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("tags[0]"),
        ),
        (
            Method::POST,
            "/api/v1/backends",
            Some(r#"{"id":"x","address":"127.0.0.1:1","tags":[]}"#),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("tags"),
        ),
        (
            Method::POST,
            "/api/v1/backends",
            Some(r#"{"id":"x","address":"127.0.0.1:1","tags":["a"],"weight":0}"#),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("weight"),
        ),
        (
            Method::GET,
            "/api/v1/domains/bad..name",
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("domain"),
        ),
        (
            Method::GET,
            "/api/v1/domains/nope.com",
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            Method::GET,
            "/api/v1/backends/nope",
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            Method::PUT,
            "/api/v1/backends/nope",
            Some(r#"{"weight":2}"#),
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            Method::DELETE,
            "/api/v1/domains/nope.com",
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            Method::GET,
            "/api/v1/nothing-here",
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            Method::POST,
            "/api/v1/domains",
            Some(r#"{"domain":"EXAMPLE.com","enabled_backends_tag":"a"}"#),
            vec![],
            StatusCode::CONFLICT,
            "already_exists",
            Some("domain"),
        ),
        (
            Method::POST,
            "/api/v1/backends",
            Some(r#"{"id":"web-v1","address":"127.0.0.1:1","tags":["a"]}"#),
            vec![],
            StatusCode::CONFLICT,
            "already_exists",
            Some("id"),
        ),
        (
            Method::DELETE,
            "/api/v1/backends/web-v1",
            None,
            vec![],
            StatusCode::CONFLICT,
            "backend_in_use",
            None,
        ),
        (
            Method::PUT,
            "/api/v1/backends/web-v1",
            Some(r#"{"tags":["z"]}"#),
            vec![],
            StatusCode::CONFLICT,
            "backend_in_use",
            None,
        ),
        (
            Method::POST,
            "/api/v1/domains/example.com/switch",
            Some(r#"{"new_tag":"nobody"}"#),
            vec![],
            StatusCode::CONFLICT,
            "no_healthy_backend",
            Some("new_tag"),
        ),
        (
            Method::PUT,
            "/api/v1/domains/example.com",
            Some(r#"{"enabled_backends_tag":"nobody"}"#),
            vec![],
            StatusCode::CONFLICT,
            "no_healthy_backend",
            Some("new_tag"),
        ),
        (
            Method::PUT,
            "/api/v1/domains/example.com",
            Some(r#"{"http_to_https":false}"#),
            vec![("if-match", "\"0000000000000000\"")],
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            None,
        ),
        (
            Method::DELETE,
            "/api/v1/backends/web-v1?force=true",
            None,
            vec![("if-match", "\"stale\"")],
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            None,
        ),
    ];
    let file_before = std::fs::read(&api.path).unwrap();
    let state_before =
        get(&api, "/api/v1/domains").await.text + &get(&api, "/api/v1/backends").await.text;
    for (method, uri, body, headers, status, code, field) in cases {
        let r = send(&api, method.clone(), uri, body, &headers).await;
        assert_eq!(r.status, status, "{method} {uri} {body:?}: {}", r.text);
        let (got_code, got_field) = r.error();
        assert_eq!(got_code, code, "{method} {uri}: {}", r.text);
        assert_eq!(got_field.as_deref(), field, "{method} {uri}: {}", r.text);
        assert!(!r.json()["error"]["message"].as_str().unwrap().is_empty());
        // A rejected request changes nothing, on disk or in memory.
        assert_eq!(
            std::fs::read(&api.path).unwrap(),
            file_before,
            "{method} {uri} changed the file"
        );
        let state_now =
            get(&api, "/api/v1/domains").await.text + &get(&api, "/api/v1/backends").await.text;
        assert_eq!(state_now, state_before, "{method} {uri} changed the state");
    }

    // 415: a body that is not declared JSON.
    let req = Request::post("/api/v1/domains")
        .header("host", "127.0.0.1:8080")
        .header("content-type", "text/plain")
        .body(Body::from("{}"))
        .unwrap();
    let resp = api.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let req = Request::post("/api/v1/domains")
        .header("host", "127.0.0.1:8080")
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(
        api.router.clone().oneshot(req).await.unwrap().status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    // 413: a body over the limit.
    let big = format!(
        r#"{{"domain":"a.com","enabled_backends_tag":"{}"}}"#,
        "a".repeat(vhost_admin::BODY_LIMIT)
    );
    let r = send(&api, Method::POST, "/api/v1/domains", Some(&big), &[]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.error().0, "payload_too_large");
    assert_eq!(std::fs::read(&api.path).unwrap(), file_before);

    // force=true overrides the two safety checks.
    let r = send(
        &api,
        Method::POST,
        "/api/v1/domains/example.com/switch?force=true",
        Some(r#"{"new_tag":"nobody"}"#),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = send(
        &api,
        Method::POST,
        "/api/v1/domains/example.com/switch",
        Some(r#"{"new_tag":"a"}"#),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(
        &api,
        Method::DELETE,
        "/api/v1/backends/web-v1?force=true",
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
}

#[tokio::test]
async fn etags_guard_concurrent_edits() {
    let api = api();
    let r = get(&api, "/api/v1/domains/example.com").await;
    let etag = r.headers["etag"].to_str().unwrap().to_owned();
    let r = send(
        &api,
        Method::PUT,
        "/api/v1/domains/example.com",
        Some(r#"{"http_to_https":false}"#),
        &[("if-match", &etag)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let new_etag = r.headers["etag"].to_str().unwrap().to_owned();
    assert_ne!(new_etag, etag);
    // The first ETag is now stale.
    let r = send(
        &api,
        Method::PUT,
        "/api/v1/domains/example.com",
        Some(r#"{"http_to_https":true}"#),
        &[("if-match", &etag)],
    )
    .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    // An unrelated change does not invalidate this resource's ETag.
    let r = send(
        &api,
        Method::POST,
        "/api/v1/backends",
        Some(r#"{"id":"other","address":"127.0.0.1:9","tags":["x"]}"#),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = send(
        &api,
        Method::DELETE,
        "/api/v1/domains/example.com",
        None,
        &[("if-match", &new_etag)],
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn backend_json_reports_health_read_only() {
    let api = api();
    api.store
        .load()
        .backend(&BackendId::parse("web-v1").unwrap())
        .unwrap()
        .health()
        .set_healthy(false);
    let r = get(&api, "/api/v1/backends/web-v1").await;
    assert_eq!(r.json()["health"], "down");
    // A switch to a tag whose only backend is down is refused.
    let r = send(
        &api,
        Method::POST,
        "/api/v1/domains/example.com/switch",
        Some(r#"{"new_tag":"a"}"#),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    // Health cannot be written through the API.
    let r = send(
        &api,
        Method::PUT,
        "/api/v1/backends/web-v1",
        Some(r#"{"health":"up"}"#),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error().1.as_deref(), Some("health"));
}

#[tokio::test]
async fn bearer_token_protects_everything_but_health() {
    let api = api_with(Some("s3cret"), None);
    assert_eq!(get(&api, "/api/v1/health").await.status, StatusCode::OK);
    let r = get(&api, "/api/v1/domains").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    assert_eq!(r.error().0, "unauthorized");
    for bad in [
        "Bearer wrong",
        "Bearer s3cre",
        "Bearer s3cret2",
        "Basic s3cret",
        "s3cret",
    ] {
        let r = send(
            &api,
            Method::GET,
            "/api/v1/domains",
            None,
            &[("authorization", bad)],
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{bad}");
    }
    let r = send(
        &api,
        Method::POST,
        "/api/v1/domains/example.com/switch",
        Some(r#"{"new_tag":"a"}"#),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = send(
        &api,
        Method::GET,
        "/api/v1/domains",
        None,
        &[("authorization", "Bearer s3cret")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[test]
fn unauthenticated_api_is_refused_beyond_loopback() {
    assert!(vhost_admin::check_exposure("127.0.0.1:8080".parse().unwrap(), None).is_ok());
    assert!(vhost_admin::check_exposure("[::1]:8080".parse().unwrap(), None).is_ok());
    let err = vhost_admin::check_exposure("0.0.0.0:8080".parse().unwrap(), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("management_api_token"), "{err}");
    assert!(vhost_admin::check_exposure("0.0.0.0:8080".parse().unwrap(), Some("t")).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_lose_nothing() {
    let api = Arc::new(api());
    let mut tasks = Vec::new();
    for i in 0..24 {
        let api = Arc::clone(&api);
        tasks.push(tokio::spawn(async move {
            let body = format!(
                r#"{{"id":"w{i}","address":"127.0.0.1:{}","tags":["a"]}}"#,
                4000 + i
            );
            let r = send(&api, Method::POST, "/api/v1/backends", Some(&body), &[]).await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
            let body = format!(r#"{{"weight":{}}}"#, i + 2);
            let r = send(
                &api,
                Method::PUT,
                &format!("/api/v1/backends/w{i}"),
                Some(&body),
                &[],
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            let body = format!(r#"{{"domain":"d{i}.example.com","enabled_backends_tag":"a"}}"#);
            let r = send(&api, Method::POST, "/api/v1/domains", Some(&body), &[]).await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let table = api.store.load();
    for i in 0..24 {
        let b = table
            .state()
            .backend(&BackendId::parse(&format!("w{i}")).unwrap())
            .unwrap();
        assert_eq!(b.weight, i + 2);
    }
    assert_eq!(table.state().vhosts().len(), 25);
    assert_eq!(table.state().backends().len(), 25);
    assert_eq!(
        &vhost_config::load(&api.path).unwrap().state,
        table.state().as_ref()
    );
}

#[tokio::test]
async fn openapi_lists_optional_routes_only_when_enabled() {
    let (store, writer) = RouteWriter::new(
        State::default(),
        Box::new(LiteralOnly),
        BuildOptions::default(),
    );
    let dir = tempfile::tempdir().unwrap();
    let bare = Api {
        router: router(Arc::new(AdminState::new(writer, None, None))),
        store,
        path: dir.path().join("unused.toml"),
        _dir: dir,
    };
    let doc = get(&bare, "/api/v1/openapi.json").await.json();
    assert!(doc["paths"]["/api/v1/metrics"].is_null(), "{doc}");
    assert!(doc["paths"]["/api/v1/config/reload"].is_null(), "{doc}");
    assert_eq!(
        get(&bare, "/api/v1/metrics").await.status,
        StatusCode::NOT_FOUND
    );
    let r = send(&bare, Method::POST, "/api/v1/config/reload", None, &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let full = get(&api(), "/api/v1/openapi.json").await.json();
    assert!(full["paths"]["/api/v1/metrics"]["get"].is_object());
}

#[tokio::test]
async fn openapi_security_follows_the_token() {
    let open = get(&api(), "/api/v1/openapi.json").await.json();
    assert!(open.get("security").is_none(), "{open}");
    assert!(open["paths"]["/api/v1/domains"]["get"]["responses"]["403"].is_object());
    assert!(open["paths"]["/api/v1/domains"]["get"]["responses"]["401"].is_null());

    let api = api_with(Some("s3cret"), None);
    let r = send(
        &api,
        Method::GET,
        "/api/v1/openapi.json",
        None,
        &[("authorization", "Bearer s3cret")],
    )
    .await;
    let locked = r.json();
    assert_eq!(locked["security"][0]["bearer"], serde_json::json!([]));
    assert_eq!(
        locked["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(locked["paths"]["/api/v1/domains"]["get"]["responses"]["401"].is_object());
}

#[tokio::test]
async fn openapi_document_lists_every_route_and_resolves() {
    let api = api();
    let r = get(&api, "/api/v1/openapi.json").await;
    assert_eq!(r.status, StatusCode::OK);
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let expected = [
        ("/api/v1/health", vec!["get"]),
        ("/api/v1/domains", vec!["get", "post"]),
        ("/api/v1/domains/{domain}", vec!["get", "put", "delete"]),
        ("/api/v1/domains/{domain}/switch", vec!["post"]),
        (
            "/api/v1/domains/{domain}/canary",
            vec!["get", "put", "delete"],
        ),
        ("/api/v1/domains/{domain}/canary/promote", vec!["post"]),
        ("/api/v1/domains/{domain}/canary/pause", vec!["post"]),
        ("/api/v1/domains/{domain}/canary/resume", vec!["post"]),
        ("/api/v1/domains/{domain}/canary/abort", vec!["post"]),
        ("/api/v1/backends", vec!["get", "post"]),
        ("/api/v1/backends/{id}", vec!["get", "put", "delete"]),
        ("/api/v1/metrics", vec!["get"]),
        // No reload hook here: `/api/v1/config/reload` answers 404 and is not listed.
        ("/api/v1/config/history", vec!["get"]),
        ("/api/v1/config/revisions/{revision}", vec!["get"]),
        ("/api/v1/config/rollback", vec!["post"]),
        ("/api/v1/events", vec!["get"]),
        ("/api/v1/certificates", vec!["get"]),
        ("/api/v1/certificates/{domain}/renew", vec!["post"]),
        ("/api/v1/openapi.json", vec!["get"]),
    ];
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(
        paths.len(),
        expected.len(),
        "{:?}",
        paths.keys().collect::<Vec<_>>()
    );
    for (path, methods) in expected {
        let item = paths.get(path).unwrap_or_else(|| panic!("{path} missing"));
        let mut got: Vec<&str> = item
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "parameters")
            .collect();
        got.sort_unstable();
        let mut want = methods.clone();
        want.sort_unstable();
        assert_eq!(got, want, "{path}");
        for m in methods {
            assert!(
                item[m]["responses"]
                    .as_object()
                    .is_some_and(|r| !r.is_empty()),
                "{path} {m}"
            );
        }
        // Every route in the document really exists (it is not a 404 from the fallback).
        let concrete = path
            .replace("{domain}", "example.com")
            .replace("{id}", "web-v1")
            .replace("{revision}", "1");
        if concrete == "/api/v1/events" {
            // An endless stream: it exists if it opens as one.
            drop(open_events(&api, None).await);
            continue;
        }
        let r = get(&api, &concrete).await;
        assert!(
            !r.text.contains("no such API route"),
            "{concrete}: {}",
            r.text
        );
    }
    // Every $ref points at a defined schema.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "$ref" {
                        out.push(x.as_str().unwrap().to_owned());
                    } else {
                        refs(x, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap();
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling $ref {r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_refresh_publishes_only_changed_addresses() {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU16, Ordering};
    use vhost_routing::{Backend, BackendAddress, Tag};

    let port = Arc::new(AtomicU16::new(1000));
    let answer = Arc::clone(&port);
    let resolver = move |_: &BackendAddress| {
        Some(SocketAddr::from((
            [10, 0, 0, 7],
            answer.load(Ordering::SeqCst),
        )))
    };
    let state = State::new(
        vec![],
        vec![Backend::new(
            BackendId::parse("named").unwrap(),
            BackendAddress::parse("svc.internal:80").unwrap(),
            vec![Tag::parse("a").unwrap()],
        )],
    )
    .unwrap();
    let (store, writer) = RouteWriter::new(state, Box::new(resolver), BuildOptions::default());
    let admin = Arc::new(AdminState::new(writer, None, None));
    assert!(!admin.refresh_resolution().await);
    port.store(2000, Ordering::SeqCst);
    assert!(admin.refresh_resolution().await);
    let id = BackendId::parse("named").unwrap();
    assert_eq!(
        store
            .load()
            .backend(&id)
            .unwrap()
            .socket_addr()
            .unwrap()
            .port(),
        2000
    );
    assert!(!admin.refresh_resolution().await);
}

#[tokio::test]
async fn without_a_token_only_requests_addressed_to_the_api_itself_are_served() {
    let api = api();
    let body = r#"{"id":"x1","address":"127.0.0.1:4001","tags":["a"]}"#;
    // DNS rebinding: a browser page on another name reaches the loopback API with its own Host.
    for host in [
        "attacker.example",
        "attacker.example:8080",
        "127.0.0.1:9999",
        "localhost",
    ] {
        let r = send(
            &api,
            Method::POST,
            "/api/v1/backends",
            Some(body),
            &[("host", host)],
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{host}: {}", r.text);
        assert_eq!(r.error().0, "forbidden");
        let r = send(
            &api,
            Method::GET,
            "/api/v1/domains",
            None,
            &[("host", host)],
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{host}");
    }
    // A cross-site request (foreign Origin) with the right Host.
    for origin in [
        "http://evil.example",
        "null",
        "https://127.0.0.1:8080",
        "http://127.0.0.1:8081",
    ] {
        let r = send(
            &api,
            Method::POST,
            "/api/v1/backends",
            Some(body),
            &[("origin", origin)],
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{origin}: {}", r.text);
    }
    assert_eq!(
        api.store.load().state().backends().len(),
        1,
        "a refused request changed the state"
    );
    // The API's own address, any loopback spelling, with or without its own Origin.
    for host in ["127.0.0.1:8080", "localhost:8080", "[::1]:8080"] {
        let r = send(
            &api,
            Method::GET,
            "/api/v1/domains",
            None,
            &[("host", host)],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{host}");
    }
    let r = send(
        &api,
        Method::POST,
        "/api/v1/backends",
        Some(body),
        &[("origin", "http://localhost:8080")],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // No CORS: nothing invites a browser to read answers cross-site.
    assert!(r.headers.get("access-control-allow-origin").is_none());

    // With a token, the token is what protects: any Host, bearer required.
    let api = api_with(Some("s3cret"), None);
    let r = send(
        &api,
        Method::GET,
        "/api/v1/domains",
        None,
        &[
            ("host", "proxy.internal:8080"),
            ("authorization", "Bearer s3cret"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn canary_lifecycle_through_the_api() {
    let api = api();
    let put = |body: &'static str, query: &'static str| {
        let api = &api;
        async move {
            send(
                api,
                Method::PUT,
                &format!("/api/v1/domains/example.com/canary{query}"),
                Some(body),
                &[],
            )
            .await
        }
    };
    // A tag without backends needs ?force; the primary tag can't be the canary.
    let r = put(r#"{"tag":"b","weight":10}"#, "").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    assert_eq!(r.error(), ("no_healthy_backend".into(), Some("tag".into())));
    let r = put(r#"{"tag":"a","weight":10}"#, "").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    assert_eq!(r.error().0, "canary_is_primary");
    for bad in [
        r#"{"tag":"b","weight":100.5}"#,
        r#"{"tag":"b","weight":10.001}"#,
        r#"{"tag":"b","weight":10,"sticky_key":"ip"}"#,
        r#"{"tag":"b"}"#,
    ] {
        let r = put(bad, "?force=true").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.text);
    }
    assert_eq!(
        get(&api, "/api/v1/domains/example.com/canary").await.status,
        StatusCode::NOT_FOUND
    );

    let r = put(
        r#"{"tag":"b","weight":12.5,"sticky_key":"header:X-User"}"#,
        "?force=true",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let expected = json!({"tag": "b", "weight": 12.5, "sticky_key": "header:x-user"});
    assert_eq!(r.json()["canary"], expected);
    let r = get(&api, "/api/v1/domains/example.com/canary").await;
    assert_eq!(r.json(), expected);
    // Persisted: the file loads to the same state.
    assert_eq!(
        vhost_config::load(&api.path)
            .unwrap()
            .state
            .vhosts()
            .next()
            .unwrap()
            .canary,
        api.store.load().state().vhosts().next().unwrap().canary
    );
    // A stale ETag changes nothing.
    let r = send(
        &api,
        Method::DELETE,
        "/api/v1/domains/example.com/canary",
        None,
        &[("if-match", "\"0000000000000000\"")],
    )
    .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);

    // Promote needs a serving tag too; with force the canary's tag becomes the primary.
    let r = send(
        &api,
        Method::POST,
        "/api/v1/domains/example.com/canary/promote",
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    let r = send(
        &api,
        Method::POST,
        "/api/v1/domains/example.com/canary/promote?force=true",
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["enabled_backends_tag"], "b");
    assert!(r.json().get("canary").is_none(), "{}", r.text);

    // Set again, then delete: all traffic back to the primary.
    let r = put(r#"{"tag":"a","weight":50}"#, "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = send(
        &api,
        Method::DELETE,
        "/api/v1/domains/example.com/canary",
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let r = send(
        &api,
        Method::DELETE,
        "/api/v1/domains/example.com/canary",
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    assert!(vhost_config::load(&api.path)
        .unwrap()
        .state
        .vhosts()
        .next()
        .unwrap()
        .canary
        .is_none());
}

#[tokio::test]
async fn rollout_plans_are_validated_and_paused_resumed_aborted() {
    let api = api();
    let put = |body: &'static str| {
        let api = &api;
        async move {
            send(
                api,
                Method::PUT,
                "/api/v1/domains/example.com/canary?force=true",
                Some(body),
                &[],
            )
            .await
        }
    };
    // Steps must increase; the weight must be the current step's.
    for (body, status, field) in [
        (
            r#"{"tag":"b","weight":5,"steps":[5,1]}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "steps",
        ),
        (
            r#"{"tag":"b","weight":7,"steps":[5,10]}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "weight",
        ),
        (
            r#"{"tag":"b","weight":5,"steps":[5,10],"step_interval_secs":0}"#,
            StatusCode::BAD_REQUEST,
            "step_interval_secs",
        ),
        (
            r#"{"tag":"b","weight":5,"analysis":{"max_error_rate":2}}"#,
            StatusCode::BAD_REQUEST,
            "analysis",
        ),
        (
            r#"{"tag":"b","weight":5,"analysis":{"interval":2}}"#,
            StatusCode::BAD_REQUEST,
            "analysis.interval",
        ),
    ] {
        let r = put(body).await;
        assert_eq!(r.status, status, "{body}: {}", r.text);
        assert_eq!(r.error().1.as_deref(), Some(field), "{body}: {}", r.text);
    }
    let r = put(
        r#"{"tag":"b","weight":1,"steps":[1,5,25,50,100],"step_interval_secs":60,"analysis":{"max_error_rate":0.01,"max_p99_ms":500,"max_p99_ratio":1.5,"min_requests":100,"interval_secs":10,"failure_limit":2}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let order = |what: &'static str| {
        let api = &api;
        async move {
            send(
                api,
                Method::POST,
                &format!("/api/v1/domains/example.com/canary/{what}"),
                None,
                &[],
            )
            .await
        }
    };
    let r = order("pause").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["canary"]["state"], "paused");
    let r = order("resume").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(
        r.json()["canary"].get("state").is_none(),
        "progressing is the default: {}",
        r.text
    );
    let r = order("abort").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let canary = &r.json()["canary"];
    assert_eq!(
        (canary["state"].as_str(), canary["weight"].as_f64()),
        (Some("aborted"), Some(0.0))
    );
    assert_eq!(canary["abort_reason"], "aborted by the operator");
    assert_eq!(order("resume").await.status, StatusCode::CONFLICT);
    assert_eq!(order("pause").await.status, StatusCode::CONFLICT);
    // Persisted like any change.
    let on_disk = vhost_config::load(&api.path).unwrap().state;
    let c = on_disk.vhosts().next().unwrap().canary.clone().unwrap();
    assert_eq!(c.state, vhost_routing::RolloutState::Aborted);
    assert_eq!(c.steps.len(), 5);
    let r = send(
        &api,
        Method::POST,
        "/api/v1/domains/nowhere.test/canary/pause",
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn every_change_gets_a_revision_and_rollback_applies_an_old_one_as_a_new_one() {
    let api = api();
    let r = get(&api, "/api/v1/config/history").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let start = r.json()[0]["revision"].as_u64().unwrap();
    assert_eq!(r.json()[0]["source"], "start");

    // Two API changes: two revisions, newest first, with the records they changed.
    let r = send(
        &api,
        Method::POST,
        "/api/v1/backends",
        Some(r#"{"id":"web-v2","address":"127.0.0.1:3002","tags":["b"]}"#),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = send(
        &api,
        Method::POST,
        "/api/v1/domains/example.com/switch",
        Some(r#"{"new_tag":"b"}"#),
        &[("x-ignored", "1")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let history = get(&api, "/api/v1/config/history?limit=2").await.json();
    let list = history.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["revision"].as_u64(), Some(start + 2));
    assert_eq!(list[0]["source"], "api");
    assert_eq!(list[0]["domains"][0]["before"]["enabled_backends_tag"], "a");
    assert_eq!(list[0]["domains"][0]["after"]["enabled_backends_tag"], "b");
    assert_eq!(list[1]["backends"][0]["after"]["id"], "web-v2");
    assert!(list[1]["backends"][0].get("before").is_none());
    for bad in ["limit=0", "limit=1001", "limit=x"] {
        let r = get(&api, &format!("/api/v1/config/history?{bad}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }

    // The whole configuration at the start revision; then roll back to it.
    let old = get(&api, &format!("/api/v1/config/revisions/{start}")).await;
    assert_eq!(old.status, StatusCode::OK, "{}", old.text);
    assert_eq!(old.json()["virtual_hosts"][0]["enabled_backends_tag"], "a");
    assert_eq!(old.json()["backends"].as_array().unwrap().len(), 1);
    let r = send(
        &api,
        Method::POST,
        "/api/v1/config/rollback",
        Some(&format!(r#"{{"revision":{start}}}"#)),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["revision"].as_u64(), Some(start + 3));
    assert_eq!(r.json()["changed"], true);
    // Applied, written to the file, and recorded as a rollback.
    let table = api.store.load();
    assert_eq!(
        table
            .state()
            .vhosts()
            .next()
            .unwrap()
            .enabled_backends_tag
            .as_str(),
        "a"
    );
    assert_eq!(table.state().backends().count(), 1);
    assert_eq!(
        &vhost_config::load(&api.path).unwrap().state,
        table.state().as_ref()
    );
    let newest = &get(&api, "/api/v1/config/history?limit=1").await.json()[0];
    assert_eq!(newest["source"], "rollback");
    // Again: nothing to change.
    let r = send(
        &api,
        Method::POST,
        "/api/v1/config/rollback",
        Some(&format!(r#"{{"revision":{start}}}"#)),
        &[],
    )
    .await;
    assert_eq!(r.json()["changed"], false, "{}", r.text);
    // Unknown revisions.
    assert_eq!(
        get(&api, "/api/v1/config/revisions/999").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&api, "/api/v1/config/revisions/x").await.status,
        StatusCode::BAD_REQUEST
    );
    let r = send(
        &api,
        Method::POST,
        "/api/v1/config/rollback",
        Some(r#"{"revision":999}"#),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // The history is a file next to the config, and a new process continues it.
    let mut name = api.path.as_os_str().to_owned();
    name.push(".history.jsonl");
    let lines = std::fs::read_to_string(std::path::PathBuf::from(name)).unwrap();
    assert_eq!(lines.lines().count() as u64, start + 3);
}

/// Opens `GET /api/v1/events` (with `Last-Event-ID: after`) and returns its body.
async fn open_events(api: &Api, after: Option<u64>) -> Body {
    let mut req = Request::builder()
        .uri("/api/v1/events")
        .header("host", "127.0.0.1:8080");
    if let Some(id) = after {
        req = req.header("last-event-id", id.to_string());
    }
    let resp = api
        .router
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    resp.into_body()
}

/// The next `n` events of an SSE body: (id, event, data).
async fn next_events(body: &mut Body, n: usize) -> Vec<(u64, String, Value)> {
    let mut text = String::new();
    let mut events = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while events.len() < n {
            let frame = body.frame().await.unwrap().unwrap();
            if let Ok(data) = frame.into_data() {
                text.push_str(std::str::from_utf8(&data).unwrap());
            }
            while let Some(end) = text.find("\n\n") {
                let block: String = text.drain(..end + 2).collect();
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(str::to_owned)
                };
                if let (Some(id), Some(kind), Some(data)) =
                    (field("id: "), field("event: "), field("data: "))
                {
                    events.push((
                        id.parse().unwrap(),
                        kind,
                        serde_json::from_str(&data).unwrap(),
                    ));
                }
            }
        }
    })
    .await
    .expect("events before the deadline");
    events
}

#[tokio::test]
async fn live_events_arrive_in_order_and_resume_with_last_event_id() {
    let api = api();
    let mut live = open_events(&api, None).await;
    for (tag, force) in [("b", "?force=true"), ("a", "")] {
        let r = send(
            &api,
            Method::POST,
            &format!("/api/v1/domains/example.com/switch{force}"),
            Some(&format!(r#"{{"new_tag":"{tag}"}}"#)),
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    let got = next_events(&mut live, 2).await;
    assert_eq!(got[0].1, "config");
    assert_eq!(got[0].2["domains"], json!(["example.com"]));
    assert_eq!(got[0].2["source"], "api");
    assert_eq!(got[1].0, got[0].0 + 1, "in order, no gap");
    let (r1, r2) = (
        got[0].2["revision"].as_u64().unwrap(),
        got[1].2["revision"].as_u64().unwrap(),
    );
    assert_eq!(r2, r1 + 1);
    // Reconnecting after the first event replays the second, then goes on live.
    let mut resumed = open_events(&api, Some(got[0].0)).await;
    let replay = next_events(&mut resumed, 1).await;
    assert_eq!(replay[0], got[1]);
    send(
        &api,
        Method::DELETE,
        "/api/v1/domains/example.com",
        None,
        &[],
    )
    .await;
    let next = next_events(&mut resumed, 1).await;
    assert_eq!(next[0].0, got[1].0 + 1);
    assert_eq!(next[0].2["domains"], json!(["example.com"]));
    // A bad Last-Event-ID is a 400.
    let r = send(
        &api,
        Method::GET,
        "/api/v1/events",
        None,
        &[("last-event-id", "x")],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn certificates_without_a_source_list_nothing_and_refuse_renewals() {
    let api = api();
    let r = get(&api, "/api/v1/certificates").await;
    assert_eq!((r.status, r.text.as_str()), (StatusCode::OK, "[]"));
    let r = send(
        &api,
        Method::POST,
        "/api/v1/certificates/example.com/renew",
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.error().0, "acme_disabled");
    let r = send(
        &api,
        Method::POST,
        "/api/v1/certificates/nope.example/renew",
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = send(
        &api,
        Method::POST,
        "/api/v1/certificates/a..b/renew",
        None,
        &[],
    )
    .await;
    assert_eq!(
        (r.status, r.error().1.as_deref()),
        (StatusCode::BAD_REQUEST, Some("domain"))
    );
    // acme = true contradicts a wildcard or an own certificate: 422, nothing changed.
    let r = send(
        &api,
        Method::POST,
        "/api/v1/domains",
        Some(r#"{"domain": "*.wild.example", "enabled_backends_tag": "a", "acme": true}"#),
        &[],
    )
    .await;
    assert_eq!(
        (r.status, r.error().1.as_deref()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("acme"))
    );
    let r = send(
        &api,
        Method::PUT,
        "/api/v1/domains/example.com",
        Some(r#"{"acme": false}"#),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(std::fs::read_to_string(&api.path)
        .unwrap()
        .contains("acme = false"));
}
