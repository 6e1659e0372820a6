//! Zero-downtime binary upgrade with the real binary: under constant load (64 connections:
//! keep-alive clients and clients opening a connection per request), a new process started with `--upgrade` takes
//! the listening sockets over from the running one (SIGQUIT), which drains and exits; no request
//! fails and no connection is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Clients requesting `up.test` until stopped: 64 connections — 48 keep-alive clients and 16
/// opening a new connection per request.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    errors: Arc<tokio::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(rt: &tokio::runtime::Runtime, http: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let errors = Arc::new(tokio::sync::Mutex::new(Vec::<String>::new()));
        let url = format!("http://{http}/");
        let tasks = (0..64)
            .map(|i| {
                let (stop, ok, failed, errors) = (
                    Arc::clone(&stop),
                    Arc::clone(&ok),
                    Arc::clone(&failed),
                    Arc::clone(&errors),
                );
                let mut b = reqwest::Client::builder().no_proxy().http1_only();
                if i >= 48 {
                    b = b.pool_max_idle_per_host(0);
                }
                let c = b.build().unwrap();
                let url = url.clone();
                rt.spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        match c.get(&url).header("host", "up.test").send().await {
                            Ok(r) if r.status() == 200 => {
                                let _ = r.bytes().await;
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(r) => {
                                errors.lock().await.push(format!("status {}", r.status()));
                                failed.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => {
                                errors.lock().await.push(format!("{e:?}"));
                                failed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failed,
            errors,
            tasks,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stops and returns (answered 200, failed, the failures).
    fn stop(self, rt: &tokio::runtime::Runtime) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            rt.block_on(t).unwrap();
        }
        let errors = rt.block_on(self.errors.lock()).clone();
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            errors,
        )
    }
}

fn write_config(
    dir: &std::path::Path,
    backend: SocketAddr,
) -> (std::path::PathBuf, [SocketAddr; 4]) {
    let (http, https, admin, metrics) = (addr(), addr(), addr(), addr());
    let sock = dir.join("upgrade.sock");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten_addr = \"{https}\"\nlisten_addr_http = \"{http}\"\nmanagement_api_addr = \"{admin}\"\n\
             grace_period_secs = 3\nupgrade_sock = \"{}\"\n\n[logging]\nlevel = \"info\"\naccess_log = false\n\n\
             [metrics]\nlisten_addr = \"{metrics}\"\n\n\
             [[virtual_hosts]]\ndomain = \"up.test\"\nenabled_backends_tag = \"a\"\n\n\
             [[backends]]\nid = \"b1\"\naddress = \"{backend}\"\ntags = [\"a\"]\n",
            sock.display(),
        ),
    )
    .unwrap();
    (config, [http, https, admin, metrics])
}

/// The admin API's health answer, or `None` while nothing (or a closing process) answers.
fn health(admin: SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /api/v1/health HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

#[test]
fn an_upgrade_under_load_loses_no_request_and_refuses_no_connection() {
    let rt = runtime();
    let backend = TestBackend::start(&rt, "b1");
    let dir = tempfile::tempdir().unwrap();
    let (config, [http, https, admin, _metrics]) = write_config(dir.path(), backend.addr);
    let sock = dir.path().join("upgrade.sock");
    let new_log = dir.path().join("new.log");
    let mut old = ProxyProcess::spawn(
        tempfile::tempdir().unwrap(),
        config.clone(),
        http,
        https,
        admin,
        false,
        &[],
    );
    let traffic = Traffic::start(&rt, http);
    wait_until("load before the upgrade", || traffic.ok() >= 300);

    // The new process waits on the upgrade socket; SIGQUIT makes the old one hand over.
    let log = std::fs::File::create(&new_log).unwrap();
    let new = Killed(
        Command::new(binary())
            .arg("--upgrade")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    wait_until("the new process to wait for the sockets", || sock.exists());
    let quit = Instant::now();
    old.signal("QUIT");
    let mut admin_gap = Duration::ZERO;
    wait_until("the new admin API", || {
        // The old process may still accept and then reset while it lets the port go.
        let up = health(admin).as_deref() == Some("OK");
        admin_gap = quit.elapsed();
        up
    });
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) && old.child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        old.child.try_wait().unwrap().is_some(),
        "the old process did not exit:\n{}",
        old.log()
    );
    let after = traffic.ok();
    wait_until("load on the new process alone", || {
        traffic.ok() >= after + 300
    });
    let (ok, failed, errors) = traffic.stop(&rt);
    assert_eq!(
        failed,
        0,
        "{errors:?}\nold:\n{}\nnew:\n{}",
        old.log(),
        std::fs::read_to_string(&new_log).unwrap_or_default()
    );
    eprintln!("upgrade: {ok} requests, 0 failed; admin API back {admin_gap:?} after SIGQUIT");
    drop(new);
}

/// What the service manager hears on `$NOTIFY_SOCKET`.
fn next_notification(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn sigusr2_starts_the_new_binary_itself_which_tells_systemd_it_is_the_service_now() {
    let rt = runtime();
    let backend = TestBackend::start(&rt, "b1");
    let dir = tempfile::tempdir().unwrap();
    let (config, [http, https, admin, _metrics]) = write_config(dir.path(), backend.addr);
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut old = ProxyProcess::spawn(
        tempfile::tempdir().unwrap(),
        config,
        http,
        https,
        admin,
        false,
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    let old_pid = old.child.id();
    assert_eq!(
        next_notification(&notify),
        format!("READY=1\nMAINPID={old_pid}")
    );

    let traffic = Traffic::start(&rt, http);
    wait_until("load before the upgrade", || traffic.ok() >= 200);
    old.signal("USR2");
    let ready = next_notification(&notify);
    let new_pid: u32 = ready
        .strip_prefix("READY=1\nMAINPID=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{ready:?}\n{}", old.log()));
    assert_ne!(new_pid, old_pid);
    // Cleaned up whatever happens below.
    struct KillPid(u32);
    impl Drop for KillPid {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg(self.0.to_string()).status();
        }
    }
    let _new = KillPid(new_pid);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) && old.child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        old.child.try_wait().unwrap().is_some(),
        "the old process did not exit"
    );
    let after = traffic.ok();
    wait_until("load on the new process alone", || {
        traffic.ok() >= after + 200
    });
    let (ok, failed, errors) = traffic.stop(&rt);
    assert_eq!(failed, 0, "{errors:?}\n{}", old.log());
    assert!(ok > 400);
    wait_until("the new admin API", || {
        health(admin).as_deref() == Some("OK")
    });
}
