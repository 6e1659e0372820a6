#!/usr/bin/env bash
# Instructions per proxied request, pingora-vhost against nginx, counted by callgrind (see
# benches/ipr/run.py). One command: installs what it needs when missing, builds the release
# binary, prints the table and the top functions.
#   benches/ipr/run.sh                        # HTTP and HTTPS, ~6 minutes
#   benches/ipr/run.sh --schemes http --top 40 --keep /tmp/ipr
#   benches/ipr/run.sh --set 'request_id = false'
set -euo pipefail
cd "$(dirname "$0")/../.."
./scripts/deps.sh
need=()
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release -p pingora-vhost
exec python3 benches/ipr/run.py "$@"
