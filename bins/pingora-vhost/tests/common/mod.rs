//! Test harness: real backends (hyper) on loopback `:0` ports, the real `pingora-vhost` binary on
//! ephemeral ports, self-signed certificates, and HTTP clients. Waits poll a condition with a
//! deadline; nothing sleeps a fixed time to wait for an event.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509NameBuilder, X509};

pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds or `DEADLINE` passes.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free port for a listener the binary will bind itself (Pingora binds its own listeners, so it
/// cannot take `:0`). Ports come from below the kernel's ephemeral range, so neither `bind(:0)`
/// nor outgoing connections can take one between this check and the proxy's bind; a per-process
/// counter keeps the ports of concurrently running tests distinct.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = ephemeral_range();
    let (start, span) = if low > 12_000 {
        (10_000, u32::from(low) - 10_000)
    } else {
        (u32::from(high) + 1, 65_535 - u32::from(high))
    };
    let seed = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = start + (seed.wrapping_add(n) % span);
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port outside the ephemeral range");
}

fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().filter_map(|x| x.parse().ok());
            Some((it.next()?, it.next()?))
        })
        .unwrap_or((32_768, 60_999))
}

/// A loopback HTTP/1.1 + h2c backend that answers JSON describing the request it saw.
/// `/slow/<ms>` answers after `ms` milliseconds.
pub struct TestBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// When n > 0, every n-th request is answered 500.
    pub fail_every: Arc<AtomicUsize>,
    rt: Arc<tokio::runtime::Runtime>,
    accept: Option<tokio::task::JoinHandle<()>>,
    /// Flipped by `kill`: open connections close.
    killed: tokio::sync::watch::Sender<bool>,
}

impl TestBackend {
    pub fn start(rt: &Arc<tokio::runtime::Runtime>, name: &str) -> Self {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let (killed, killed_rx) = tokio::sync::watch::channel(false);
        let fail_every = Arc::new(AtomicUsize::new(0));
        let accept = Self::serve(rt, listener, name, &hits, &fail_every, killed_rx);
        Self {
            name: name.to_owned(),
            addr,
            hits,
            fail_every,
            rt: Arc::clone(rt),
            accept: Some(accept),
            killed,
        }
    }

    /// Stops accepting connections (the port then refuses them); open ones keep being served.
    pub fn kill(&mut self) {
        if let Some(task) = self.accept.take() {
            task.abort();
            let _ = self.rt.block_on(task);
        }
    }

    /// Stops accepting connections and closes the open ones too.
    pub fn kill_all(&mut self) {
        self.kill();
        let _ = self.killed.send(true);
    }

    /// Accepts again on the same address.
    pub fn restart(&mut self) {
        let listener = self
            .rt
            .block_on(tokio::net::TcpListener::bind(self.addr))
            .unwrap();
        let _ = self.killed.send(false);
        self.accept = Some(Self::serve(
            &self.rt,
            listener,
            &self.name,
            &self.hits,
            &self.fail_every,
            self.killed.subscribe(),
        ));
    }

    fn serve(
        rt: &Arc<tokio::runtime::Runtime>,
        listener: tokio::net::TcpListener,
        name: &str,
        hits: &Arc<AtomicUsize>,
        fail_every: &Arc<AtomicUsize>,
        killed: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let (name_c, hits_c) = (name.to_owned(), Arc::clone(hits));
        let fail_c = Arc::clone(fail_every);
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (name, hits) = (name_c.clone(), Arc::clone(&hits_c));
                let fail = Arc::clone(&fail_c);
                let mut killed = killed.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (name, hits, fail) = (name.clone(), Arc::clone(&hits), Arc::clone(&fail));
                        async move {
                            let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
                            let every = fail.load(Ordering::SeqCst);
                            if every > 0 && n % every == 0 {
                                let mut r = Response::new(Full::new(Bytes::from_static(b"injected failure")));
                                *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                                return Ok::<_, Infallible>(r);
                            }
                            if let Some(ms) = req.uri().path().strip_prefix("/slow/") {
                                let ms: u64 = ms.parse().unwrap_or(1000);
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            let header = |h: &str| {
                                req.headers().get(h).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
                            };
                            let body = serde_json::json!({
                                "backend": name,
                                "method": req.method().as_str(),
                                "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
                                "host": header("host"),
                                "x-forwarded-for": header("x-forwarded-for"),
                                "x-forwarded-proto": header("x-forwarded-proto"),
                                "x-forwarded-host": header("x-forwarded-host"),
                                "version": format!("{:?}", req.version()),
                                "headers": req.headers().iter().map(|(k, v)| {
                                    (k.as_str().to_owned(), serde_json::Value::from(v.to_str().unwrap_or("")))
                                }).collect::<serde_json::Map<String, serde_json::Value>>(),
                            });
                            let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
                            response.headers_mut().insert(
                                "x-backend-name",
                                hyper::header::HeaderValue::from_str(&name).unwrap(),
                            );
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = killed.wait_for(|k| *k) => {}
                    }
                });
            }
        })
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

pub fn runtime() -> Arc<tokio::runtime::Runtime> {
    Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    )
}

/// Writes a self-signed certificate for `names` into `dir`; returns (cert, key) paths.
pub fn self_signed(dir: &Path, file_stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, names[0]).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let serial = BigNum::from_u32(7).unwrap().to_asn1_integer().unwrap();
    b.set_serial_number(&serial).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(10).unwrap())
        .unwrap();
    let mut san = SubjectAlternativeName::new();
    for n in names {
        san.dns(n);
    }
    let san = san.build(&b.x509v3_context(None, None)).unwrap();
    b.append_extension(san).unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    let cert = dir.join(format!("{file_stem}.crt"));
    let keyp = dir.join(format!("{file_stem}.key"));
    std::fs::write(&cert, b.build().to_pem().unwrap()).unwrap();
    std::fs::write(&keyp, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    (cert, keyp)
}

/// The common name of a DER certificate.
pub fn common_name(der: &[u8]) -> String {
    let cert = X509::from_der(der).unwrap();
    let entry = cert
        .subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .unwrap();
    String::from_utf8_lossy(entry.data().as_slice()).into_owned()
}

thread_local! {
    /// A command line the next spawned binary runs under (see `start_wrapped`).
    static WRAPPER: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The real binary, running a config on ephemeral ports.
pub struct ProxyProcess {
    pub child: Child,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

/// The binary under test (only the binary crate's own tests have it; the library's in-process
/// tests share the rest of this harness).
pub fn binary() -> &'static str {
    match option_env!("CARGO_BIN_EXE_pingora-vhost") {
        Some(path) => path,
        None => panic!("only the binary crate's tests run the binary"),
    }
}

impl ProxyProcess {
    /// `body` is the config without `[proxy]` listener keys (they are added); `proxy_extra` goes
    /// into `[proxy]`. Waits until the HTTP (and, if `wait_https`, HTTPS) port accepts.
    pub fn start(dir: tempfile::TempDir, proxy_extra: &str, body: &str, wait_https: bool) -> Self {
        Self::start_full(dir, proxy_extra, "", body, wait_https, &[])
    }

    /// Like `start`, with extra keys in `[logging]`.
    pub fn start_with_logging(dir: tempfile::TempDir, logging_extra: &str, body: &str) -> Self {
        Self::start_full(dir, "", logging_extra, body, false, &[])
    }

    /// Like `start`, with extra environment variables for the process (HTTP listener only).
    pub fn start_with_env(
        dir: tempfile::TempDir,
        proxy_extra: &str,
        body: &str,
        envs: &[(&str, &str)],
    ) -> Self {
        Self::start_full(dir, proxy_extra, "", body, false, envs)
    }

    /// Like `start`, with extra `[logging]` keys and the binary run through `wrapper` (e.g.
    /// `["prlimit", "--nofile=600:600", "--"]`).
    pub fn start_wrapped(
        dir: tempfile::TempDir,
        proxy_extra: &str,
        logging_extra: &str,
        body: &str,
        wait_https: bool,
        wrapper: &[&str],
    ) -> Self {
        WRAPPER.with(|w| *w.borrow_mut() = wrapper.iter().map(|s| (*s).to_owned()).collect());
        let p = Self::start_full(dir, proxy_extra, logging_extra, body, wait_https, &[]);
        WRAPPER.with(|w| w.borrow_mut().clear());
        p
    }

    /// Like `start`, with extra `[proxy]` and `[logging]` keys.
    pub fn start_logged(
        dir: tempfile::TempDir,
        proxy_extra: &str,
        logging_extra: &str,
        body: &str,
        wait_https: bool,
    ) -> Self {
        Self::start_full(dir, proxy_extra, logging_extra, body, wait_https, &[])
    }

    fn start_full(
        dir: tempfile::TempDir,
        proxy_extra: &str,
        logging_extra: &str,
        body: &str,
        wait_https: bool,
        envs: &[(&str, &str)],
    ) -> Self {
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let https: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let grace = if proxy_extra.contains("grace_period_secs") {
            ""
        } else {
            "grace_period_secs = 5\n"
        };
        let config = format!(
            "# test config\n[proxy]\nlisten_addr = \"{https}\"\nlisten_addr_http = \"{http}\"\nmanagement_api_addr = \"{admin}\"\n{grace}{proxy_extra}\n\n[logging]\nlevel = \"info\"\n{logging_extra}\n\n[metrics]\nenabled = true\nlisten_addr = \"{metrics}\"\n\n{body}"
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut p = Self::spawn(dir, config_path, http, https, admin, wait_https, envs);
        p.metrics = metrics;
        p.wait_listening(metrics);
        p
    }

    /// Starts the binary on an existing config file (e.g. to restart after changes).
    pub fn spawn(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        http: SocketAddr,
        https: SocketAddr,
        admin: SocketAddr,
        wait_https: bool,
        envs: &[(&str, &str)],
    ) -> Self {
        let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
        let wrapper = WRAPPER.with(|w| w.borrow().clone());
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        let child = command
            .arg("--config")
            .arg(&config_path)
            .env_remove("PINGORA_VHOST_API_TOKEN")
            .envs(envs.iter().copied())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let mut p = Self {
            child,
            http,
            https,
            admin,
            metrics: "127.0.0.1:0".parse().unwrap(),
            dir,
            config_path,
        };
        p.wait_listening(http);
        p.wait_listening(admin);
        if wait_https {
            p.wait_listening(https);
        }
        p
    }

    pub fn wait_listening(&mut self, addr: SocketAddr) {
        let start = Instant::now();
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("proxy exited early ({status}):\n{}", self.log());
            }
            assert!(
                start.elapsed() < DEADLINE,
                "proxy did not listen on {addr}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// `GET path` on the HTTP listener with `Host: host`: (status, body).
    pub async fn get(&self, c: &reqwest::Client, host: &str, path: &str) -> (u16, String) {
        let r = c
            .get(self.http_url(path))
            .header("host", host)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    }

    /// The backend that answered `GET /` for `host` (asserting a 200).
    pub async fn backend_for(&self, c: &reqwest::Client, host: &str) -> String {
        let (status, body) = self.get(c, host, "/").await;
        assert_eq!(status, 200, "{body}");
        backend_of(&body)
    }

    /// `GET path` on the admin API, as JSON.
    pub fn admin_json(&self, rt: &tokio::runtime::Runtime, path: &str) -> serde_json::Value {
        let url = self.admin_url(path);
        let text = rt.block_on(async {
            client(&[], true)
                .get(url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        });
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Stops the process (SIGTERM) and waits for it to exit; returns the temp dir for a restart.
    pub fn stop(mut self) -> (tempfile::TempDir, PathBuf) {
        self.signal("TERM");
        let mut exited = false;
        wait_until("the proxy to exit", || {
            exited = self.child.try_wait().unwrap().is_some();
            exited
        });
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (dir, self.config_path.clone())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client that never follows redirects, trusts any certificate, records TLS info and resolves
/// the given names to the proxy.
pub fn client(resolve: &[(&str, SocketAddr)], http1_only: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .tls_danger_accept_invalid_certs(true)
        .tls_info(true)
        .no_proxy()
        .timeout(Duration::from_secs(15));
    for (name, addr) in resolve {
        b = b.resolve(name, *addr);
    }
    if http1_only {
        b = b.http1_only();
    }
    b.build().unwrap()
}

pub fn backend_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["backend"].as_str().unwrap().to_owned()
}

/// A plain TCP connection to `addr` with a read timeout of `DEADLINE`.
pub fn raw_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

/// A loopback backend whose every connection `serve` handles; its address.
pub fn raw_backend<F, Fut>(rt: &tokio::runtime::Runtime, serve: F) -> std::net::SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// A loopback backend that answers the first request of each connection with the raw bytes
/// `answer`; with `hold`, it then keeps the connection open until the proxy closes it (an
/// answer it never finishes), otherwise it closes it (an answer whose end is the close).
pub fn canned_backend(
    rt: &tokio::runtime::Runtime,
    answer: &'static [u8],
    hold: bool,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw_backend(rt, move |mut s| async move {
        if read_head(&mut s, &mut Vec::new()).await.is_some() {
            let _ = s.write_all(answer).await;
            if hold {
                let _ = s.read(&mut [0u8; 64]).await;
            }
        }
    })
}

/// Reads from `s` into `data` until it holds a whole request head; the head's length (blank
/// line included), or `None` when the peer closes first.
pub async fn read_head(s: &mut tokio::net::TcpStream, data: &mut Vec<u8>) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 2048];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(end + 4);
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads a response head (blank line included) byte by byte, so that nothing after it is
/// consumed.
pub fn read_response_head(s: &mut impl std::io::Read) -> String {
    let mut data = Vec::new();
    let mut byte = [0u8; 1];
    while !data.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).unwrap();
        assert!(
            n > 0,
            "connection closed after {:?}",
            String::from_utf8_lossy(&data)
        );
        data.push(byte[0]);
    }
    String::from_utf8_lossy(&data).into_owned()
}

/// Runs `run` against a proxy started with `proxy_extra` and `body` on the HTTP/1.1 fast path
/// (`h1_fast_path = true`), then against one on Pingora's general path (`false`); `run` gets the
/// proxy and the setting's value.
pub fn on_both_paths(proxy_extra: &str, body: &str, mut run: impl FnMut(&ProxyProcess, &str)) {
    for fast in ["true", "false"] {
        let proxy = ProxyProcess::start(
            tempfile::tempdir().unwrap(),
            &format!("{proxy_extra}\nh1_fast_path = {fast}"),
            body,
            false,
        );
        run(&proxy, fast);
    }
}

/// Reads one HTTP/1.1 response with a `Content-Length` body: (status, head, body).
pub fn read_response(s: &mut impl std::io::Read) -> (u16, String, String) {
    let head = read_response_head(s);
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

/// Waits until the peer closes `s` (EOF or reset); returns how long that took from `since`.
/// Panics if it stays open past `DEADLINE`.
pub fn wait_closed(s: &mut impl std::io::Read, since: Instant) -> Duration {
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return since.elapsed(),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("still open after {:?}", since.elapsed())
            }
            Err(_) => return since.elapsed(),
        }
    }
}

/// The value of one series (`name{labels}` exactly as exposed) on the metrics listener, 0 if
/// absent.
pub fn metric(metrics: SocketAddr, series: &str) -> f64 {
    let text = plain_http::get_text(&format!("http://{metrics}/metrics"));
    text.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}

/// Minimal blocking HTTP GET over a raw socket (the metrics listener), for use outside a runtime.
pub mod plain_http {
    use std::io::{Read, Write};

    /// The body of `GET url` (HTTP/1.1, `Connection: close`).
    pub fn get_text(url: &str) -> String {
        let rest = url.strip_prefix("http://").unwrap();
        let (authority, path) = rest
            .split_once('/')
            .map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
        let mut s = std::net::TcpStream::connect(authority).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default()
    }
}

/// A loopback webhook receiver: answers 500 to the first `fail_first` requests, then 200, and
/// keeps the bodies of all of them (in arrival order).
pub struct WebhookReceiver {
    pub addr: SocketAddr,
    pub bodies: Arc<tokio::sync::Mutex<Vec<String>>>,
}

impl WebhookReceiver {
    pub fn start(rt: &Arc<tokio::runtime::Runtime>, fail_first: usize) -> Self {
        use http_body_util::BodyExt;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies: Arc<tokio::sync::Mutex<Vec<String>>> = Arc::default();
        let seen = Arc::clone(&bodies);
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let seen = Arc::clone(&seen);
                        async move {
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let n = {
                                let mut all = seen.lock().await;
                                all.push(String::from_utf8_lossy(&body).into_owned());
                                all.len()
                            };
                            let mut r = Response::new(Full::new(Bytes::new()));
                            if n <= fail_first {
                                *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                            }
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, bodies }
    }

    /// The bodies received so far (call from outside the runtime).
    pub fn bodies(&self) -> Vec<String> {
        self.bodies.blocking_lock().clone()
    }
}

/// Requests `host` on the proxy from 4 clients until stopped; counts answers by status (a
/// transport error is a failure).
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(rt: &tokio::runtime::Runtime, proxy: &ProxyProcess, host: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let url = proxy.http_url("/");
        let tasks = (0..4)
            .map(|_| {
                let (stop, ok, failed, url) = (
                    Arc::clone(&stop),
                    Arc::clone(&ok),
                    Arc::clone(&failed),
                    url.clone(),
                );
                let c = client(&[], true);
                rt.spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let r = c.get(&url).header("host", host).send().await;
                        match r.map(|r| r.status().as_u16()) {
                            Ok(200) => ok.fetch_add(1, Ordering::SeqCst),
                            _ => failed.fetch_add(1, Ordering::SeqCst),
                        };
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    /// Requests answered 200 so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stops and returns (answered 200, failed).
    pub fn stop(self, rt: &tokio::runtime::Runtime) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            rt.block_on(t).unwrap();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}
