#!/usr/bin/env bash
# End-to-end load benchmark: pingora-vhost vs nginx vs HAProxy (see benches/e2e/run.py).
#   benches/e2e/run.sh                 # 3 rounds x 10 s per scenario and target (~10 minutes)
#   benches/e2e/run.sh --rounds 1 --duration 5 --only "keep-alive, 13"
# Installs its tools when missing (Debian packages; oha through cargo, a one-time ~7 min build).
set -euo pipefail
cd "$(dirname "$0")/../.."
./scripts/deps.sh
need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v oha >/dev/null 2>&1 && [ "${SKIP_OHA:-0}" != 1 ]; then
  echo "installing oha (fixed-rate latency runs; SKIP_OHA=1 to skip)..." >&2
  cargo install --locked oha >/dev/null
fi
cargo build --release -p pingora-vhost
exec python3 benches/e2e/run.py "$@"
