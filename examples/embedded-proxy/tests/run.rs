//! Runs the example binary against two loopback backends and checks that it routes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A backend answering every request with `body` (one request per connection).
fn backend(body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(reply.as_bytes());
        }
    });
    addr
}

fn get(addr: SocketAddr, host: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_embedded_proxy_routes_by_host() {
    let blue = backend("blue");
    let green = backend("green");
    // Pingora binds the listener itself: take a free port from the kernel and hand it over.
    let listen = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_embedded-proxy"))
        // Flip every 200 ms, so the test sees the flipper at work without waiting.
        .args([
            listen.to_string(),
            blue.to_string(),
            green.to_string(),
            "200".to_owned(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Kill(child);
    let start = Instant::now();
    let answer = loop {
        if let Some(a) = get(listen, "app.example.test") {
            break a;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the example did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Both colours answer as the background service flips the tag.
    let mut seen = [false; 2];
    while seen != [true, true] {
        let a = get(listen, "app.example.test").unwrap();
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
        seen[0] |= a.ends_with("blue");
        seen[1] |= a.ends_with("green");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no flip seen: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let unknown = get(listen, "other.test").unwrap();
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
}
