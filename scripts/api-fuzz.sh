#!/usr/bin/env bash
# Runs schemathesis (every check, stateful phase included) for SECONDS (default 60) against the
# admin API of the real binary, started as `pingora-vhost demo` on free loopback ports, and
# fails on any finding: the served OpenAPI document must describe exactly what the API does.
# Usage: scripts/api-fuzz.sh [path/to/pingora-vhost]   (default: target/debug/pingora-vhost)
set -euo pipefail
cd "$(dirname "$0")/.."
binary="${1:-target/debug/pingora-vhost}"
seconds="${API_FUZZ_SECONDS:-60}"
version="4.32.5"
venv="target/schemathesis-$version"

if [ ! -x "$venv/bin/schemathesis" ]; then
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null \
      || { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null; }
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$version"
fi

# Four free ports: the demo uses P (HTTP), P+80 (admin), P+443 (HTTPS) and P+1090 (metrics).
port="$(python3 - <<'PY'
import random, socket
def free(p):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
            return True
        except OSError:
            return False
for _ in range(500):
    p = random.randrange(20000, 30000)
    if all(free(p + d) for d in (0, 80, 443, 1090)):
        print(p)
        break
else:
    raise SystemExit("no free ports")
PY
)"
dir="$(mktemp -d)"
"$binary" demo --dir "$dir" --http-port "$port" >"$dir/proxy.log" 2>&1 &
proxy=$!
trap 'kill "$proxy" 2>/dev/null || true; wait "$proxy" 2>/dev/null || true; rm -rf "$dir"' EXIT
admin="http://127.0.0.1:$((port + 80))"
for _ in $(seq 1 300); do
  curl -fsS "$admin/api/v1/health" >/dev/null 2>&1 && break
  kill -0 "$proxy" 2>/dev/null || { cat "$dir/proxy.log"; echo "the proxy exited" >&2; exit 1; }
  sleep 0.1
done
curl -fsS "$admin/api/v1/health" >/dev/null || { cat "$dir/proxy.log"; echo "the admin API did not come up" >&2; exit 1; }

"$venv/bin/schemathesis" --config-file scripts/schemathesis.toml run "$admin/api/v1/openapi.json" \
  --checks all --max-time "$seconds" --no-color ${API_FUZZ_ARGS:-}
kill -0 "$proxy" 2>/dev/null || { cat "$dir/proxy.log"; echo "the proxy died during the run" >&2; exit 1; }
echo "api-fuzz: no finding in ${seconds} s"
