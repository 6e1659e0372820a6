#!/usr/bin/env python3
"""End-to-end load benchmark: pingora-vhost against nginx and HAProxy (and direct-to-backend).

One machine, one run: a fast nginx backend (13-byte body, and a 16 KiB file), then each target
proxying to it, driven with the same load by wrk (keep-alive HTTP/1.1, 64 connections; HTTPS
keep-alive; new TLS connections per second) and oha (fixed-rate latency), targets interleaved over
several rounds. Servers run on core 0, the load generator on core 1 (taskset). Prints a table of
medians: rps, p50/p99 latency, CPU-seconds per 10k requests of the proxy processes, and ratios to
nginx and to direct. Every process it starts is stopped by PID at the end. "nginx, same headers"
is nginx doing the header work pingora-vhost does by default (Host passed on, X-Forwarded-For,
-Proto, -Host and a request id to the backend, the id on the answer), for the 13-byte keep-alive
scenarios.

Usage: benches/e2e/run.sh [--rounds N] [--duration S] [--quick]
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_CPU = "0"
LOAD_CPU = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "bench.test"

started = []  # Popen objects, stopped at exit


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, deadline=30.0):
    end = time.time() + deadline
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"process {proc.args} exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def start(cmd, cpu=SERVER_CPU, log=None, **kw):
    full = ["taskset", "-c", cpu] + cmd
    out = open(log, "w") if log else subprocess.DEVNULL
    p = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, **kw)
    started.append(p)
    return p


def stop_all():
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.time() + 10
    for p in started:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()


def pids_of(root_pid):
    """The process and all its descendants (nginx master + workers)."""
    pids = [root_pid]
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children = {}
    for line in out.split("\n"):
        parts = line.split()
        if len(parts) == 2:
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    i = 0
    while i < len(pids):
        pids.extend(children.get(pids[i], []))
        i += 1
    return pids


def cpu_seconds(root_pid):
    total = 0
    for pid in pids_of(root_pid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (FileNotFoundError, IndexError):
            pass
    return total / CLK_TCK


def rss_mb(root_pid):
    total = 0
    for pid in pids_of(root_pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


def parse_duration_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def run_wrk(url, duration, conns, extra=()):
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency",
           "-H", f"Host: {HOST}", *extra, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    # The "Latency Distribution" lines (anchored: the thread-stats line also ends in a percentage).
    p50 = parse_duration_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = parse_duration_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "requests": reqs, "p50": p50, "p99": p99,
            "errors": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def run_oha(url, duration, conns, rate):
    cmd = ["taskset", "-c", LOAD_CPU, "oha", "--no-tui", "--output-format", "json", "-z", f"{duration}s",
           "-c", str(conns), "-q", str(rate), "-H", f"Host: {HOST}", "--insecure", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    data = json.loads(out)
    summary = data["summary"]
    pct = data["latencyPercentiles"]
    total = sum(data.get("statusCodeDistribution", {}).values())
    return {"rps": summary["requestsPerSec"], "requests": total,
            "p50": pct["p50"] * 1000, "p99": pct["p99"] * 1000,
            "errors": sum(n for k, n in data.get("errorDistribution", {}).items() if "deadline" not in k)}


def write(path, text):
    Path(path).write_text(text)
    return str(path)


def make_cert(d):
    cert, key = d / "bench.crt", d / "bench.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={HOST}",
                    "-addext", f"subjectAltName=DNS:{HOST}"], check=True, capture_output=True)
    pem = d / "bench.pem"
    pem.write_text(cert.read_text() + key.read_text())
    return cert, key, pem


def nginx_conf(d, name, body):
    (d / name).mkdir(exist_ok=True)
    os.chmod(d, 0o755)
    return write(d / name / "nginx.conf", f"""
worker_processes 1;
daemon off;
master_process on;
pid {d / name / 'nginx.pid'};
error_log {d / name / 'error.log'} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000;
  client_body_temp_path {d / name}; proxy_temp_path {d / name}; fastcgi_temp_path {d / name};
  uwsgi_temp_path {d / name}; scgi_temp_path {d / name};
{body}
}}
""")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--rate", type=int, default=10000, help="fixed-rate latency run, requests/s")
    ap.add_argument("--domains", type=int, default=10000, help="domain count of the large-config run")
    ap.add_argument("--only", default="", help="scenarios to run: ';'-separated substrings of their names")
    ap.add_argument("--binary", default=str(ROOT / "target/release/pingora-vhost"))
    args = ap.parse_args()

    d = Path(tempfile.mkdtemp(prefix="vhost-bench-"))
    os.chmod(d, 0o755)
    cert, key, pem = make_cert(d)
    (d / "www").mkdir()
    (d / "www" / "16k").write_bytes(b"x" * 16384)
    os.chmod(d / "www", 0o755)
    os.chmod(d / "www" / "16k", 0o644)
    for f in (cert, key, pem):
        os.chmod(f, 0o644)

    ports = {k: free_port() for k in ["backend", "nginx", "nginx_tls", "nginx_fwd", "nginx_fwd_tls",
                                      "haproxy", "haproxy_tls",
                                      "vhost", "vhost_tls", "vhost_admin", "vhost_metrics",
                                      "big", "big_tls", "big_admin", "big_metrics"]}
    backend = start(["nginx", "-c", nginx_conf(d, "backend", f"""
  server {{
    listen 127.0.0.1:{ports['backend']} reuseport backlog=4096;
    location = / {{ return 200 "hello, world!\\n"; }}
    location = /16k {{ root {d / 'www'}; }}
  }}""")])
    wait_port(ports["backend"], backend)

    tls = f"ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3; " \
          "ssl_session_cache off; ssl_session_tickets off;"
    nginx = start(["nginx", "-c", nginx_conf(d, "proxy", f"""
  upstream be {{ server 127.0.0.1:{ports['backend']}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{ports['nginx']};
    listen 127.0.0.1:{ports['nginx_tls']} ssl;
    server_name {HOST};
    {tls}
    location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
  # The same, doing the header work pingora-vhost does by default: the client's Host passed on,
  # X-Forwarded-For/-Proto/-Host and a request id to the backend, the id on the answer.
  server {{
    listen 127.0.0.1:{ports['nginx_fwd']};
    listen 127.0.0.1:{ports['nginx_fwd_tls']} ssl;
    server_name {HOST};
    {tls}
    location / {{
      proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Request-Id $request_id;
      add_header X-Request-Id $request_id always;
    }}
  }}""")])

    hap_cfg = write(d / "haproxy.cfg", f"""
global
  nbthread 1
  maxconn 5000
  tune.ssl.cachesize 0
  ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:{ports['haproxy']}
  bind 127.0.0.1:{ports['haproxy_tls']} ssl crt {pem} alpn http/1.1
  default_backend be
backend be
  server s1 127.0.0.1:{ports['backend']}
""")
    haproxy = start(["haproxy", "-f", hap_cfg])

    def vhost_config(path, domains, http, https, admin, metrics):
        vhosts = "".join(f'[[virtual_hosts]]\ndomain = "d{i}.{HOST}"\nenabled_backends_tag = "a"\n\n'
                         for i in range(domains - 1))
        write(path, f"""
[proxy]
listen_addr = "127.0.0.1:{https}"
listen_addr_http = "127.0.0.1:{http}"
management_api_addr = "127.0.0.1:{admin}"
default_cert_path = "{cert}"
default_key_path = "{key}"
threads = 1
[logging]
level = "warn"
access_log = false
[metrics]
listen_addr = "127.0.0.1:{metrics}"
[[virtual_hosts]]
domain = "{HOST}"
enabled_backends_tag = "a"

{vhosts}
[[backends]]
id = "b1"
address = "127.0.0.1:{ports['backend']}"
tags = ["a"]
""")
        return path

    vhost = start([args.binary, "--config", vhost_config(d / "vhost.toml", 2, ports["vhost"], ports["vhost_tls"],
                                                          ports["vhost_admin"], ports["vhost_metrics"])],
                  log=d / "vhost.log")
    big = start([args.binary, "--config", vhost_config(d / "big.toml", args.domains, ports["big"], ports["big_tls"],
                                                        ports["big_admin"], ports["big_metrics"])],
                log=d / "big.log")
    for name, port, proc in [("nginx", ports["nginx"], nginx), ("haproxy", ports["haproxy"], haproxy),
                             ("vhost", ports["vhost"], vhost), ("big", ports["big"], big),
                             ("vhost", ports["vhost_tls"], vhost)]:
        wait_port(port, proc)

    targets = {
        "direct": (backend, ports["backend"], None),
        "nginx": (nginx, ports["nginx"], ports["nginx_tls"]),
        "nginx, same headers": (nginx, ports["nginx_fwd"], ports["nginx_fwd_tls"]),
        "haproxy": (haproxy, ports["haproxy"], ports["haproxy_tls"]),
        "pingora-vhost": (vhost, ports["vhost"], ports["vhost_tls"]),
        f"pingora-vhost ({args.domains} domains)": (big, ports["big"], ports["big_tls"]),
    }
    have_oha = shutil.which("oha") is not None
    scenarios = {
        "keep-alive, 13 B": lambda t, p, tp: run_wrk(f"http://127.0.0.1:{p}/", args.duration, args.conns),
        "keep-alive, 16 KiB": lambda t, p, tp: run_wrk(f"http://127.0.0.1:{p}/16k", args.duration, args.conns),
        "HTTPS keep-alive, 13 B": lambda t, p, tp: tp and run_wrk(f"https://127.0.0.1:{tp}/", args.duration, args.conns),
        "new TLS connections": lambda t, p, tp: tp and run_wrk(f"https://127.0.0.1:{tp}/", args.duration, args.conns,
                                                                ("-H", "Connection: close")),
    }
    if have_oha:
        scenarios[f"fixed rate {args.rate}/s"] = lambda t, p, tp: run_oha(
            f"http://127.0.0.1:{p}/", args.duration, args.conns, args.rate)
    else:
        print("oha not installed (cargo install --locked oha): fixed-rate latency run skipped", file=sys.stderr)
    if args.only:
        wanted = set(args.only.split(";"))
        scenarios = {k: v for k, v in scenarios.items() if any(w in k for w in wanted)}

    results = {}  # (scenario, target) -> list of dicts
    for rnd in range(args.rounds):
        for scen, fn in scenarios.items():
            order = list(targets.items())
            if rnd % 2:
                order.reverse()
            for name, (proc, port, tls_port) in order:
                if name == "direct" and scen.startswith(("HTTPS", "new TLS")):
                    continue
                if "domains" in name and not scen.startswith("keep-alive, 13"):
                    continue
                if "same headers" in name and not scen.endswith("keep-alive, 13 B"):
                    continue
                # The proxy process's CPU; for direct, the backend's.
                cpu_proc = proc
                c0, b0 = cpu_seconds(cpu_proc.pid), cpu_seconds(backend.pid)
                r = fn(name, port, tls_port)
                if not r:
                    continue
                c1, b1 = cpu_seconds(cpu_proc.pid), cpu_seconds(backend.pid)
                cpu = c1 - c0
                r["cpu_per_10k"] = cpu / max(r["requests"], 1) * 10000
                r["backend_cpu_per_10k"] = (b1 - b0) / max(r["requests"], 1) * 10000
                results.setdefault((scen, name), []).append(r)
                print(f"round {rnd + 1} {scen:24} {name:34} {r['rps']:>10.0f} rps  p50 {r['p50']:.2f} ms  "
                      f"p99 {r['p99']:.2f} ms  cpu/10k {r['cpu_per_10k']:.3f} s  errors {r['errors']} {r.get('socket_errors', '')}",
                      flush=True)

    rss = {name: rss_mb(proc.pid) for name, (proc, _, _) in targets.items()}
    print()
    print(f"Medians of {args.rounds} rounds, {args.duration} s each, {args.conns} connections; servers on core "
          f"{SERVER_CPU}, load on core {LOAD_CPU}. CPU = proxy process(es) CPU-seconds per 10k requests.")
    print()
    print("| scenario | target | rps | × nginx | × direct | p50 ms | p99 ms | CPU s/10k req | × HAProxy CPU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for scen in scenarios:
        med = {}
        for name in targets:
            rs = results.get((scen, name))
            if rs:
                med[name] = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99", "cpu_per_10k")}
        for name, m in med.items():
            ng, di, hp = med.get("nginx"), med.get("direct"), med.get("haproxy")
            print(f"| {scen} | {name} | {m['rps']:.0f} | {m['rps'] / ng['rps']:.2f} | "
                  f"{(m['rps'] / di['rps']) if di else float('nan'):.2f} | {m['p50']:.2f} | {m['p99']:.2f} | "
                  f"{m['cpu_per_10k']:.3f} | {(m['cpu_per_10k'] / hp['cpu_per_10k']) if hp else float('nan'):.2f} |"
                  if ng else f"| {scen} | {name} | {m['rps']:.0f} | | | {m['p50']:.2f} | {m['p99']:.2f} | {m['cpu_per_10k']:.3f} | |")
    print()
    print("RSS after the run (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in rss.items()))
    print(f"work dir: {d}")


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
