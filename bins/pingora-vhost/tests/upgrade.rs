//! Zero-downtime binary upgrade with the real binary: under constant load (keep-alive clients
//! and clients opening a connection per request), a new process started with `--upgrade` takes
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

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

#[test]
fn an_upgrade_under_load_loses_no_request_and_refuses_no_connection() {
    let rt = runtime();
    let backend = TestBackend::start(&rt, "b1");
    let dir = tempfile::tempdir().unwrap();
    let (http, https, admin, metrics) = (addr(), addr(), addr(), addr());
    let sock = dir.path().join("upgrade.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten_addr = \"{https}\"\nlisten_addr_http = \"{http}\"\nmanagement_api_addr = \"{admin}\"\n\
             grace_period_secs = 3\nupgrade_sock = \"{}\"\n\n[logging]\nlevel = \"info\"\naccess_log = false\n\n\
             [metrics]\nlisten_addr = \"{metrics}\"\n\n\
             [[virtual_hosts]]\ndomain = \"up.test\"\nenabled_backends_tag = \"a\"\n\n\
             [[backends]]\nid = \"b1\"\naddress = \"{}\"\ntags = [\"a\"]\n",
            sock.display(),
            backend.addr
        ),
    )
    .unwrap();
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

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let errors = Arc::new(tokio::sync::Mutex::new(Vec::<String>::new()));
    let url = format!("http://{http}/");
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let (stop, ok, failed, errors) = (
                Arc::clone(&stop),
                Arc::clone(&ok),
                Arc::clone(&failed),
                Arc::clone(&errors),
            );
            let mut b = reqwest::Client::builder().no_proxy().http1_only();
            if i >= 8 {
                // A new connection (a new accept) for every request.
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
    wait_until("load before the upgrade", || {
        ok.load(Ordering::SeqCst) >= 300
    });

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
        let up = std::net::TcpStream::connect(admin).is_ok()
            && plain_http::get_text(&format!("http://{admin}/api/v1/health")) == "OK";
        admin_gap = quit.elapsed();
        up
    });
    let mut exited = false;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) && !exited {
        exited = old.child.try_wait().unwrap().is_some();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(exited, "the old process did not exit:\n{}", old.log());
    let after = ok.load(Ordering::SeqCst);
    wait_until("load on the new process alone", || {
        ok.load(Ordering::SeqCst) >= after + 300
    });
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        rt.block_on(t).unwrap();
    }
    let errors = rt.block_on(errors.lock()).clone();
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "{errors:?}\nold:\n{}\nnew:\n{}",
        old.log(),
        std::fs::read_to_string(&new_log).unwrap_or_default()
    );
    eprintln!(
        "upgrade: {} requests, 0 failed; admin API back {admin_gap:?} after SIGQUIT",
        ok.load(Ordering::SeqCst)
    );
    drop(new);
}
