#!/usr/bin/env python3
"""Memory per idle client connection, and whether it goes back when the connections leave.

Starts the release binary (build it first: `cargo build --release`) on loopback ports with one
domain and a small backend, then for each mode opens N connections that send one request each
(`h1`: HTTP/1.1 keep-alive, `tls`: HTTPS/1.1 keep-alive, `h2`: HTTP/2 over TLS, needs the `h2`
Python package; `silent`: connected, nothing sent), holds them idle, reads the proxy's RSS, closes
them and follows RSS for `--follow` seconds. Each mode gets a fresh proxy process.

    benches/idle-memory/run.py [--n 5000] [--modes h1,tls,h2] [--follow 40]

Prints, per mode: bytes of RSS per idle connection, and RSS after the connections closed as a
ratio of the RSS before they opened.
"""
import argparse
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY = os.path.join(ROOT, "target", "release", "pingora-vhost")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def serve_backend(listener):
    """A keep-alive backend that answers every request with one write (no Nagle stalls)."""
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n"

    def connection(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = b""
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    return
                pending += data
                while b"\r\n\r\n" in pending:
                    _, pending = pending.split(b"\r\n\r\n", 1)
                    c.sendall(response)
        except OSError:
            pass
        finally:
            c.close()

    while True:
        c, _ = listener.accept()
        threading.Thread(target=connection, args=(c,), daemon=True).start()


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def open_idle(mode, port, n):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    request = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"
    held = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if mode == "silent":
            held.append(s)
            continue
        if mode in ("tls", "h2"):
            ctx.set_alpn_protocols(["h2"] if mode == "h2" else ["http/1.1"])
            s = ctx.wrap_socket(s, server_hostname="bench.test")
        if mode == "h2":
            import h2.config
            import h2.connection
            import h2.events

            c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            c.initiate_connection()
            c.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "https"),
                               (":authority", "bench.test")], end_stream=True)
            s.sendall(c.data_to_send())
            done = False
            while not done:
                for e in c.receive_data(s.recv(65536)):
                    done = done or isinstance(e, h2.events.StreamEnded)
                s.sendall(c.data_to_send())
            held.append((s, c))
        else:
            s.sendall(request)
            data = b""
            while b"hello\n" not in data:
                data += s.recv(65536)
            held.append(s)
    return held


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--modes", default="h1,tls,h2")
    ap.add_argument("--follow", type=int, default=40)
    args = ap.parse_args()
    if not os.path.exists(BINARY):
        sys.exit(f"{BINARY} not found: run cargo build --release first")
    tmp = tempfile.mkdtemp(prefix="idle-memory-")
    cert, key = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=bench.test",
                    "-addext", "subjectAltName=DNS:bench.test"],
                   check=True, capture_output=True)
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(1024)
    threading.Thread(target=serve_backend, args=(backend,), daemon=True).start()
    for mode in args.modes.split(","):
        http_port, https_port = free_port(), free_port()
        config = os.path.join(tmp, "config.toml")
        with open(config, "w") as f:
            f.write(f"""[proxy]
listen_addr = "127.0.0.1:{https_port}"
listen_addr_http = "127.0.0.1:{http_port}"
management_api_addr = "127.0.0.1:{free_port()}"
threads = 1
[logging]
level = "warn"
access_log = false
[metrics]
listen_addr = "127.0.0.1:{free_port()}"
[[virtual_hosts]]
domain = "bench.test"
enabled_backends_tag = "a"
tls_cert_path = "{cert}"
tls_key_path = "{key}"
[[backends]]
id = "b"
address = "127.0.0.1:{backend.getsockname()[1]}"
tags = ["a"]
""")
        proxy = subprocess.Popen([BINARY, "--config", config], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            port = http_port if mode in ("h1", "silent") else https_port
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port)).close()
                    break
                except OSError:
                    time.sleep(0.05)
            open_idle(mode, port, 10)  # warm-up: first allocations of every kind
            time.sleep(1)
            base = rss_kb(proxy.pid)
            held = open_idle(mode, port, args.n)
            time.sleep(2)
            held_kb = rss_kb(proxy.pid)
            per = (held_kb - base) * 1024 / args.n
            for h in held:
                (h[0] if isinstance(h, tuple) else h).close()
            del held
            start = time.time()
            after = held_kb
            while time.time() - start < args.follow:
                time.sleep(1)
                after = rss_kb(proxy.pid)
                if after <= base * 1.1:
                    break
            print(f"{mode:6} n={args.n}: {per:,.0f} bytes per idle connection "
                  f"(RSS {base / 1024:.1f} -> {held_kb / 1024:.1f} MiB); after they closed: "
                  f"{after / 1024:.1f} MiB = {after / base:.2f} x the baseline "
                  f"({time.time() - start:.0f} s later)", flush=True)
        finally:
            proxy.terminate()
            proxy.wait()


if __name__ == "__main__":
    main()
