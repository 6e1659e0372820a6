#!/usr/bin/env python3
"""Instructions per proxied request: pingora-vhost against nginx, counted by callgrind.

Deterministic (repeatable to well under 1 %, whatever else the machine is doing) where wall-clock
runs on a shared 2-core VM are not. One run starts:

* a backend: nginx, one worker, `return 200 "hello, world\\n"`;
* nginx as the reference reverse proxy (one worker, upstream keep-alive, access log off), and
* pingora-vhost (`threads = 1`, access log off, metrics and everything else at their defaults),

each under `valgrind --tool=callgrind`, and drives both with the same h2load load (HTTP/1.1
keep-alive, 8 connections) over HTTP and HTTPS. Per scheme: a warm-up, then two measured phases of
N1 and N2 requests, each ended with a callgrind dump; the cost per request is
(phase2 - phase1) / (N2 - N1), which cancels whatever a phase costs regardless of its length
(timers, the dump itself). User-space instructions only: the kernel's share is not counted.

Prints the table (and the ratio to nginx against the issue's targets) and, for pingora-vhost, the
functions with the highest self cost per request, computed the same differential way from
`callgrind_annotate` of the two phases. `--keep DIR` keeps the callgrind files for
`callgrind_annotate` or KCachegrind.

Usage: benches/ipr/run.sh [--schemes http,https] [--top 25] [--config TEMPLATE] [--set "KEY = VALUE"]
       [--keep DIR] [--binary PATH] [--no-nginx]
A config template may use @BACKEND@ @LISTEN@ @TLS_LISTEN@ @CERT@ @KEY@ @ADMIN@ @METRICS@.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST = "bench.test"
TARGETS = {"http": 2.5, "https": 2.0}  # issue 18: at most this many times nginx's count

DEFAULT_TEMPLATE = """\
[proxy]
listen_addr = "@TLS_LISTEN@"
listen_addr_http = "@LISTEN@"
management_api_addr = "@ADMIN@"
default_cert_path = "@CERT@"
default_key_path = "@KEY@"
threads = 1

[logging]
level = "warn"
access_log = false

[metrics]
enabled = true
listen_addr = "@METRICS@"

[[virtual_hosts]]
domain = "bench.test"
enabled_backends_tag = "a"

[[backends]]
id = "origin"
address = "@BACKEND@"
tags = ["a"]
"""

started = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_all():
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.time() + 20
    for p in started:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()


def tls_version(port):
    """The TLS version a server on `port` negotiates with OpenSSL's default offer."""
    out = subprocess.run(["openssl", "s_client", "-brief", "-connect", f"127.0.0.1:{port}"],
                         input="", capture_output=True, text=True, timeout=60)
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("Protocol version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def wait_http(port, proc, deadline=180.0):
    """Waits until `port` answers a request for the bench host (valgrind starts slowly)."""
    end = time.time() + deadline
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
                s.settimeout(5)
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"port {port} did not answer within {deadline:.0f} s")


def h2load(url, n, conns):
    out = subprocess.run(
        ["h2load", "--h1", "-n", str(n), "-c", str(conns), "-H", f":authority: {HOST}", url],
        capture_output=True, text=True, check=True).stdout
    m = re.search(r"^requests: .*?(\d+) succeeded", out, re.M)
    return int(m.group(1)) if m else 0


class Callgrind:
    """A process under callgrind whose counters are dumped (and reset) on demand."""

    def __init__(self, name, cmd, work, env=None):
        self.name, self.work = name, work
        self.out = work / f"{name}.cg"
        self.dumps = 0
        log = open(work / f"{name}.log", "w")
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}"] + cmd,
            stdout=log, stderr=subprocess.STDOUT, env=env)
        started.append(self.proc)

    def dump(self):
        """Dumps the counters since the last dump; returns that dump's file."""
        self.dumps += 1
        path = Path(f"{self.out}.{self.dumps}")
        subprocess.run(["callgrind_control", "-d", str(self.proc.pid)],
                       capture_output=True, check=False)
        end = time.time() + 60
        while time.time() < end:
            if path.exists() and total(path) is not None:
                return path
            time.sleep(0.2)
        raise SystemExit(f"callgrind dump {path} did not appear")

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def total(path):
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"^(?:totals|summary): (\d+)", text, re.M)
    return int(m.group(1)) if m else None


def self_costs(path):
    """Self cost per function (`callgrind_annotate`, no threshold)."""
    out = subprocess.run(["callgrind_annotate", "--threshold=100", "--auto=no", str(path)],
                         capture_output=True, text=True, check=True).stdout
    costs = {}
    for line in out.splitlines():
        m = re.match(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*)$", line)
        if not m or ":" not in m.group(2):
            continue
        name = re.sub(r" \[[^\]]*\]$", "", m.group(2))
        costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def short(name, width=100):
    name = name.split(":", 1)[1] if ":" in name and not name.startswith("<") else name
    name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    return name if len(name) <= width else name[: width - 1] + "…"


def measure(cg, ports, schemes, n1, n2, conns, top):
    results = {}
    for scheme in schemes:
        port = ports[scheme]
        url = f"{scheme}://127.0.0.1:{port}/"
        h2load(url, 50, conns)
        cg.dump()
        ok = h2load(url, n1, conns)
        a = cg.dump()
        ok += h2load(url, n2, conns)
        b = cg.dump()
        if ok != n1 + n2:
            print(f"{cg.name} {scheme}: only {ok} of {n1 + n2} requests succeeded", file=sys.stderr)
            continue
        per = (total(b) - total(a)) / (n2 - n1)
        funcs = []
        if top:
            ca, cb = self_costs(a), self_costs(b)
            # Thread entry points are reported with the whole thread's cost: not self costs.
            whole = 0.5 * total(b)
            diff = {k: (cb.get(k, 0) - ca.get(k, 0)) / (n2 - n1)
                    for k in set(ca) | set(cb) if cb.get(k, 0) < whole}
            funcs = sorted(diff.items(), key=lambda kv: -kv[1])[:top]
        results[scheme] = (per, funcs)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schemes", default="http,https")
    ap.add_argument("--n1", type=int, default=500)
    ap.add_argument("--n2", type=int, default=2500)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--top", type=int, default=25, help="functions to list (0: none)")
    ap.add_argument("--config", help="pingora-vhost config template (default: one domain)")
    ap.add_argument("--set", action="append", default=[], metavar="'KEY = VALUE'",
                    help="add a line to [proxy] of the config (e.g. 'request_id = false')")
    ap.add_argument("--binary", default=str(ROOT / "target/release/pingora-vhost"))
    ap.add_argument("--keep", help="keep the callgrind files in this directory")
    ap.add_argument("--no-nginx", action="store_true", help="measure pingora-vhost only")
    ap.add_argument("--nginx-tls", choices=["1.3", "default"], default="1.3",
                    help="nginx's HTTPS protocols: '1.3' (TLS 1.2 and 1.3, so it speaks TLS 1.3 "
                         "with h2load like pingora-vhost) or 'default' (nginx 1.22's own "
                         "default: TLS 1.2 only, as the shared tool)")
    args = ap.parse_args()
    schemes = [s for s in args.schemes.split(",") if s]

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ipr."))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    p = {k: free_port() for k in ("backend", "nginx", "nginx_tls", "http", "https", "admin",
                                  "metrics")}
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", f"/CN={HOST}",
                        "-addext", f"subjectAltName=DNS:{HOST}", "-keyout", str(work / "key.pem"),
                        "-out", str(work / "cert.pem")], capture_output=True, check=True)
        temps = " ".join(f"{t}_temp_path {work};" for t in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (work / "backend.conf").write_text(f"""
daemon off; master_process off; worker_processes 1; pid {work}/backend.pid;
error_log {work}/backend.err; events {{ worker_connections 4000; }}
http {{ access_log off; keepalive_requests 1000000; {temps}
  server {{ listen 127.0.0.1:{p['backend']}; location / {{ return 200 "hello, world\\n"; }} }} }}
""")
        protocols = "ssl_protocols TLSv1.2 TLSv1.3;" if args.nginx_tls == "1.3" else ""
        (work / "nginx.conf").write_text(f"""
daemon off; master_process off; worker_processes 1; pid {work}/nginx.pid;
error_log {work}/nginx.err; events {{ worker_connections 4000; }}
http {{ access_log off; keepalive_requests 1000000; {temps}
  upstream be {{ server 127.0.0.1:{p['backend']}; keepalive 256; keepalive_requests 1000000; }}
  server {{ listen 127.0.0.1:{p['nginx']}; listen 127.0.0.1:{p['nginx_tls']} ssl;
    ssl_certificate {work}/cert.pem; ssl_certificate_key {work}/key.pem; {protocols}
    ssl_session_cache off; ssl_session_tickets off;
    location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }} }}
""")
        template = Path(args.config).read_text() if args.config else DEFAULT_TEMPLATE
        config = (template.replace("@BACKEND@", f"127.0.0.1:{p['backend']}")
                  .replace("@LISTEN@", f"127.0.0.1:{p['http']}")
                  .replace("@TLS_LISTEN@", f"127.0.0.1:{p['https']}")
                  .replace("@ADMIN@", f"127.0.0.1:{p['admin']}")
                  .replace("@METRICS@", f"127.0.0.1:{p['metrics']}")
                  .replace("@CERT@", str(work / "cert.pem"))
                  .replace("@KEY@", str(work / "key.pem")))
        for line in args.set:
            config = config.replace("[proxy]\n", f"[proxy]\n{line}\n", 1)
        (work / "pingora-vhost.toml").write_text(config)

        backend = subprocess.Popen(["nginx", "-p", str(work), "-c", str(work / "backend.conf")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        started.append(backend)
        wait_http(p["backend"], backend)

        rows = {}
        tls = {}
        if not args.no_nginx:
            cg = Callgrind("nginx", ["nginx", "-p", str(work), "-c", str(work / "nginx.conf")],
                           work)
            wait_http(p["nginx"], cg.proc)
            if "https" in schemes:
                tls["nginx"] = tls_version(p["nginx_tls"])
            rows["nginx"] = measure(cg, {"http": p["nginx"], "https": p["nginx_tls"]}, schemes,
                                    args.n1, args.n2, args.conns, 0)
            cg.stop()
        cg = Callgrind("pingora-vhost",
                       [args.binary, "--config", str(work / "pingora-vhost.toml")], work)
        wait_http(p["http"], cg.proc)
        if "https" in schemes:
            tls["pingora-vhost"] = tls_version(p["https"])
        rows["pingora-vhost"] = measure(cg, {"http": p["http"], "https": p["https"]}, schemes,
                                        args.n1, args.n2, args.conns, args.top)
        cg.stop()
    finally:
        stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nuser-space instructions per proxied keep-alive request "
          f"(callgrind, h2load --h1 -c {args.conns}, ({args.n2} - {args.n1}) requests)\n")
    if tls:
        print("HTTPS negotiated with h2load's offer: " +
              ", ".join(f"{name} {version}" for name, version in tls.items()) + "\n")
    print(f"| scheme | nginx | pingora-vhost | × nginx | target |")
    print(f"|---|---:|---:|---:|---:|")
    for scheme in schemes:
        ngx = rows.get("nginx", {}).get(scheme, (None, []))[0]
        ours = rows["pingora-vhost"].get(scheme, (None, []))[0]
        ratio = f"{ours / ngx:.2f}" if ngx and ours else "–"
        fmt = lambda v: f"{v / 1000:.1f} k" if v else "–"
        print(f"| {scheme} | {fmt(ngx)} | {fmt(ours)} | {ratio} | ≤ {TARGETS.get(scheme, 0)} |")
    for scheme in schemes:
        funcs = rows["pingora-vhost"].get(scheme, (None, []))[1]
        if not funcs:
            continue
        print(f"\npingora-vhost {scheme}: top {len(funcs)} functions by self cost "
              f"(instructions per request)\n")
        for name, cost in funcs:
            print(f"{cost:9.0f}  {short(name)}")
    if args.keep:
        print(f"\ncallgrind files kept in {work}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
