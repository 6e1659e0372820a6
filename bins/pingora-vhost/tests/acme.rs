//! Automatic certificates end to end against Pebble (Let's Encrypt's test CA, Debian package
//! `pebble`), with `pebble-challtestsrv` as its DNS so every name resolves to loopback: Pebble
//! validates the real binary's HTTP-01 and TLS-ALPN-01 answers on its real listeners, and what
//! the proxy then serves is verified against Pebble's issuing root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use openssl::x509::X509;

/// Orders must complete within this (the issue's bound).
const ISSUE_DEADLINE: Duration = Duration::from_secs(60);

/// Pebble and its DNS server, killed on drop.
struct Pebble {
    pebble: Child,
    dns: Child,
    port: u16,
    management: u16,
    /// Pebble's own HTTPS certificate (self-signed), trusted through `directory_ca_path`.
    ca: PathBuf,
}

fn tool(name: &str) -> &str {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{name} is not installed: apt-get install -y pebble (scripts/test.sh does)"
    );
    name
}

/// A self-signed certificate for 127.0.0.1 (Pebble's HTTPS listener).
fn loopback_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    use openssl::asn1::Asn1Time;
    use openssl::bn::BigNum;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::x509::extension::SubjectAlternativeName;
    use openssl::x509::X509NameBuilder;
    let key = PKey::from_ec_key(
        EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
    )
    .unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, "pebble test")
        .unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    let san = SubjectAlternativeName::new()
        .ip("127.0.0.1")
        .dns("localhost")
        .build(&b.x509v3_context(None, None))
        .unwrap();
    b.append_extension(san).unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    let (cert, keyp) = (dir.join("pebble.crt"), dir.join("pebble.key"));
    std::fs::write(&cert, b.build().to_pem().unwrap()).unwrap();
    std::fs::write(&keyp, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    (cert, keyp)
}

impl Pebble {
    /// Starts Pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` of
    /// 127.0.0.1 (the proxy's listeners).
    fn start(dir: &Path, http_port: u16, tls_port: u16) -> Self {
        let (ca, key) = loopback_certificate(dir);
        let (port, management, dns, dns_management) =
            (free_port(), free_port(), free_port(), free_port());
        let config = dir.join("pebble.json");
        std::fs::write(
            &config,
            serde_json::json!({"pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": ca, "privateKey": key,
                "httpPort": http_port, "tlsPort": tls_port,
                "ocspResponderURL": "", "externalAccountBindingRequired": false,
            }})
            .to_string(),
        )
        .unwrap();
        let log = |name: &str| Stdio::from(std::fs::File::create(dir.join(name)).unwrap());
        let dns_server = Command::new(tool("pebble-challtestsrv"))
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .unwrap();
        let pebble = Command::new(tool("pebble"))
            .arg("-config")
            .arg(&config)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .unwrap();
        let p = Self {
            pebble,
            dns: dns_server,
            port,
            management,
            ca,
        };
        for port in [port, management, dns_management] {
            wait_until("pebble to listen", || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
        }
        p
    }

    fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// Pebble's issuing root (new at every start).
    fn root(&self, rt: &tokio::runtime::Runtime) -> X509 {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&self.ca).unwrap()).unwrap();
        let c = reqwest::Client::builder()
            .add_root_certificate(ca)
            .no_proxy()
            .build()
            .unwrap();
        let url = format!("https://127.0.0.1:{}/roots/0", self.management);
        let pem = rt.block_on(async { c.get(url).send().await.unwrap().bytes().await.unwrap() });
        X509::from_pem(&pem).unwrap()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in [&mut self.pebble, &mut self.dns] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Ports {
    http: SocketAddr,
    https: SocketAddr,
    admin: SocketAddr,
    metrics: SocketAddr,
}

fn ports() -> Ports {
    let addr = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
    Ports {
        http: addr(),
        https: addr(),
        admin: addr(),
        metrics: addr(),
    }
}

fn write_config(
    dir: &Path,
    ports: &Ports,
    pebble: &Pebble,
    challenge: &str,
    backend: SocketAddr,
) -> PathBuf {
    let config = format!(
        "[proxy]\nlisten_addr = \"{}\"\nlisten_addr_http = \"{}\"\nmanagement_api_addr = \"{}\"\ngrace_period_secs = 1\n\n\
         [logging]\nlevel = \"info\"\n\n[metrics]\nenabled = true\nlisten_addr = \"{}\"\n\n\
         [lets_encrypt]\nemail = \"ops@example.test\"\ndirectory_url = \"{}\"\ndirectory_ca_path = \"{}\"\n\
         cache_dir = \"{}\"\nchallenge = \"{challenge}\"\n\n\
         [[virtual_hosts]]\ndomain = \"file.test\"\nenabled_backends_tag = \"a\"\nhttp_to_https = true\n\n\
         [[virtual_hosts]]\ndomain = \"*.wild.test\"\nenabled_backends_tag = \"a\"\n\n\
         [[backends]]\nid = \"a1\"\naddress = \"{backend}\"\ntags = [\"a\"]\n",
        ports.https,
        ports.http,
        ports.admin,
        ports.metrics,
        pebble.directory_url(),
        pebble.ca.display(),
        dir.join("acme").display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn spawn(dir: tempfile::TempDir, config: PathBuf, ports: &Ports) -> ProxyProcess {
    let mut p = ProxyProcess::spawn(dir, config, ports.http, ports.https, ports.admin, true, &[]);
    p.metrics = ports.metrics;
    p.wait_listening(ports.metrics);
    p
}

/// `GET /api/v1/certificates`, by domain.
fn certificates(
    rt: &tokio::runtime::Runtime,
    proxy: &ProxyProcess,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let list = proxy.admin_json(rt, "/api/v1/certificates");
    let list = list.as_array().unwrap().clone();
    list.into_iter()
        .map(|v| (v["domain"].as_str().unwrap().to_owned(), v))
        .collect()
}

/// Waits until `domain` is served an ACME certificate other than `not`; returns its serial.
fn wait_for_certificate(
    rt: &tokio::runtime::Runtime,
    proxy: &ProxyProcess,
    domain: &str,
    not: Option<&str>,
) -> String {
    let start = Instant::now();
    loop {
        let entry = certificates(rt, proxy).remove(domain);
        let serial = entry
            .as_ref()
            .and_then(|e| e["serial"].as_str())
            .map(str::to_owned);
        if let Some(serial) = serial.filter(|s| Some(s.as_str()) != not) {
            return serial;
        }
        assert!(
            start.elapsed() < ISSUE_DEADLINE,
            "no certificate for {domain} within {ISSUE_DEADLINE:?}: {entry:?}\n{}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A client that verifies the proxy's certificates against `root` only and opens a new
/// connection (a new handshake) for every request.
fn verifying_client(root: &X509, names: &[&str], https: SocketAddr) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_der(&root.to_der().unwrap()).unwrap()])
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(10));
    for name in names {
        b = b.resolve(name, https);
    }
    b.build().unwrap()
}

/// A verified HTTPS request to `domain`: the status and the serial (hex) of the leaf served.
async fn served(c: &reqwest::Client, domain: &str, https: SocketAddr) -> (u16, String) {
    let r = c
        .get(format!("https://{domain}:{}/", https.port()))
        .send()
        .await
        .unwrap_or_else(|e| panic!("verified request to {domain}: {e:?}"));
    let der = r
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|t| t.peer_certificate())
        .unwrap()
        .to_vec();
    let serial = X509::from_der(&der)
        .unwrap()
        .serial_number()
        .to_bn()
        .unwrap()
        .to_hex_str()
        .unwrap()
        .to_ascii_lowercase();
    (r.status().as_u16(), serial)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn unix_of(rfc3339: &str) -> i64 {
    let out = Command::new("date")
        .args(["-u", "-d", rfc3339, "+%s"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn post(url: String) -> (u16, serde_json::Value) {
    let r = client(&[], true).post(url).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn http01_certificates_for_file_and_api_domains_survive_restarts_renewals_and_ca_outages() {
    let rt = runtime();
    let backend = TestBackend::start(&rt, "a1");
    let dir = tempfile::tempdir().unwrap();
    let ports = ports();
    let pebble = Pebble::start(dir.path(), ports.http.port(), ports.https.port());
    let root = pebble.root(&rt);
    let config = write_config(dir.path(), &ports, &pebble, "http-01", backend.addr);
    let acme_dir = dir.path().join("acme");
    let mut proxy = spawn(dir, config.clone(), &ports);

    // A domain of the file: certificate within the deadline, served and valid for its name.
    let file_serial = wait_for_certificate(&rt, &proxy, "file.test", None);
    let verified = verifying_client(&root, &["file.test", "api.test"], ports.https);
    let (status, serial) = rt.block_on(served(&verified, "file.test", ports.https));
    assert_eq!((status, serial.as_str()), (200, file_serial.as_str()));
    let listed = certificates(&rt, &proxy);
    assert_eq!(listed["file.test"]["source"], "acme");
    assert!(listed["file.test"]["issuer"]
        .as_str()
        .unwrap()
        .contains("Pebble"));
    assert!(listed["file.test"]["last_error"].is_null());
    // The wildcard cannot be validated by these challenges, and says so.
    assert!(
        listed["*.wild.test"]["last_error"]
            .as_str()
            .unwrap()
            .contains("DNS-01"),
        "{listed:?}"
    );

    // http_to_https still redirects everything but challenges; unknown tokens are 404 and never
    // reach the backend.
    let plain = client(&[], true);
    let hits = backend.hits();
    let (status, _) = rt.block_on(proxy.get(&plain, "file.test", "/page"));
    assert_eq!(status, 308);
    let (status, body) =
        rt.block_on(proxy.get(&plain, "file.test", "/.well-known/acme-challenge/nope"));
    assert_eq!(
        (status, body.as_str()),
        (404, "unknown ACME challenge token\n")
    );
    assert_eq!(backend.hits(), hits);

    // A domain added through the API gets one too.
    let (status, _) = rt.block_on(async {
        let r = plain
            .post(proxy.admin_url("/api/v1/domains"))
            .header("content-type", "application/json")
            .body(r#"{"domain": "api.test", "enabled_backends_tag": "a"}"#)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), ())
    });
    assert_eq!(status, 201);
    let api_serial = wait_for_certificate(&rt, &proxy, "api.test", None);
    let (status, serial) = rt.block_on(served(&verified, "api.test", ports.https));
    assert_eq!((status, serial.as_str()), (200, api_serial.as_str()));
    assert_eq!(
        metric(ports.metrics, "acme_orders_total{result=\"success\"}"),
        2.0
    );

    // The cache is private: directories 0700, account and certificates 0600.
    assert_eq!(mode(&acme_dir), 0o700);
    let account = std::fs::read_dir(acme_dir.join("accounts"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(mode(&account), 0o600);

    // Renewal API refusals.
    let (status, body) = rt.block_on(post(
        proxy.admin_url("/api/v1/certificates/none.test/renew"),
    ));
    assert_eq!(status, 404, "{body}");
    let (status, body) = rt.block_on(post(
        proxy.admin_url("/api/v1/certificates/*.wild.test/renew"),
    ));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("not_acme_managed"))
    );

    // Restart: the cached certificates are served at once and nothing is ordered.
    let (dir, config) = proxy.stop();
    proxy = spawn(dir, config, &ports);
    let listed = certificates(&rt, &proxy);
    assert_eq!(listed["file.test"]["serial"], file_serial.as_str());
    assert_eq!(listed["api.test"]["serial"], api_serial.as_str());
    for domain in ["file.test", "api.test"] {
        let next = unix_of(listed[domain]["next_renewal"].as_str().unwrap());
        assert!(
            next > now_unix() + 300 * 86_400,
            "{domain}: {:?}",
            listed[domain]
        );
    }
    let (status, serial) = rt.block_on(served(&verified, "file.test", ports.https));
    assert_eq!((status, serial.as_str()), (200, file_serial.as_str()));
    assert_eq!(
        metric(ports.metrics, "acme_orders_total{result=\"success\"}"),
        0.0
    );
    assert!(
        !proxy.log().contains("ACME order started"),
        "{}",
        proxy.log()
    );

    // A renewal swaps the certificate under load (a new TLS handshake per request): no request
    // fails, and new handshakes get the new certificate.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
            let c = verifying_client(&root, &["file.test"], ports.https);
            let url = format!("https://file.test:{}/", ports.https.port());
            rt.spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    match c.get(&url).send().await.map(|r| r.status().as_u16()) {
                        Ok(200) => ok.fetch_add(1, Ordering::SeqCst),
                        _ => failed.fetch_add(1, Ordering::SeqCst),
                    };
                }
            })
        })
        .collect();
    wait_until("load to flow", || ok.load(Ordering::SeqCst) >= 20);
    let (status, body) = rt.block_on(post(
        proxy.admin_url("/api/v1/certificates/file.test/renew"),
    ));
    assert_eq!(status, 202, "{body}");
    let renewed = wait_for_certificate(&rt, &proxy, "file.test", Some(&file_serial));
    let after = ok.load(Ordering::SeqCst);
    wait_until("load after the renewal", || {
        ok.load(Ordering::SeqCst) >= after + 20
    });
    stop.store(true, Ordering::SeqCst);
    for task in load {
        rt.block_on(task).unwrap();
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests failed during the renewal"
    );
    let (_, serial) = rt.block_on(served(&verified, "file.test", ports.https));
    assert_eq!(serial, renewed);

    // The CA goes away: the order fails, is retried later (backoff), the error shows, and the
    // current certificate keeps being served.
    drop(pebble);
    let (status, _) = rt.block_on(post(proxy.admin_url("/api/v1/certificates/api.test/renew")));
    assert_eq!(status, 202);
    let mut entry = serde_json::Value::Null;
    wait_until("the failed order to show", || {
        entry = certificates(&rt, &proxy).remove("api.test").unwrap();
        entry["consecutive_failures"] == 1
    });
    assert!(
        entry["last_error"]
            .as_str()
            .unwrap()
            .contains("Connection refused"),
        "{entry}"
    );
    let retry = unix_of(entry["next_renewal"].as_str().unwrap());
    assert!(retry >= now_unix() + 50, "retried too soon: {entry}");
    assert_eq!(entry["serial"], api_serial.as_str());
    let (status, serial) = rt.block_on(served(&verified, "api.test", ports.https));
    assert_eq!((status, serial.as_str()), (200, api_serial.as_str()));
    assert_eq!(
        metric(
            ports.metrics,
            "acme_consecutive_failures{domain=\"api.test\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(ports.metrics, "acme_orders_total{result=\"failure\"}"),
        1.0
    );
}

#[test]
fn tls_alpn01_certificates_for_file_and_api_domains() {
    let rt = runtime();
    let backend = TestBackend::start(&rt, "a1");
    let dir = tempfile::tempdir().unwrap();
    let ports = ports();
    let pebble = Pebble::start(dir.path(), ports.http.port(), ports.https.port());
    let root = pebble.root(&rt);
    let config = write_config(dir.path(), &ports, &pebble, "tls-alpn-01", backend.addr);
    let proxy = spawn(dir, config, &ports);
    let verified = verifying_client(&root, &["file.test", "api.test"], ports.https);

    let file_serial = wait_for_certificate(&rt, &proxy, "file.test", None);
    let (status, serial) = rt.block_on(served(&verified, "file.test", ports.https));
    assert_eq!((status, serial.as_str()), (200, file_serial.as_str()));

    let (status, _) = rt.block_on(async {
        client(&[], true)
            .post(proxy.admin_url("/api/v1/domains"))
            .header("content-type", "application/json")
            .body(r#"{"domain": "api.test", "enabled_backends_tag": "a"}"#)
            .send()
            .await
            .map(|r| (r.status().as_u16(), ()))
            .unwrap()
    });
    assert_eq!(status, 201);
    let api_serial = wait_for_certificate(&rt, &proxy, "api.test", None);
    let (status, serial) = rt.block_on(served(&verified, "api.test", ports.https));
    assert_eq!((status, serial.as_str()), (200, api_serial.as_str()));
    // Validation went through the TLS listener: the HTTP listener saw no challenge request.
    assert_eq!(
        metric(
            ports.metrics,
            "proxy_local_responses_total{reason=\"acme_challenge\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(ports.metrics, "acme_orders_total{result=\"success\"}"),
        2.0
    );
}
