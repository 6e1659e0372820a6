#!/usr/bin/env bash
# The project's test command: formatting, lints, and every test (unit, integration with real
# servers on loopback, doc tests; benches and examples are built and smoke-run).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
# Test peers from Debian: promtool (package `prometheus`) lints the metrics exposition in the
# observability test; pebble + pebble-challtestsrv (package `pebble`) are the ACME CA the
# certificate tests order from.
tools=()
command -v promtool >/dev/null 2>&1 || tools+=(prometheus)
command -v pebble >/dev/null 2>&1 || tools+=(pebble)
# systemd-analyze (package `systemd`) verifies packaging/pingora-vhost.service.
command -v systemd-analyze >/dev/null 2>&1 || tools+=(systemd)
if ((${#tools[@]})); then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${tools[@]}" >/dev/null \
    || { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${tools[@]}" >/dev/null; }
fi
# Python's websockets and grpcio: the independent peers of the protocol tests (target/pytools).
./scripts/pytools.sh
# The Debian package of the debug binary, inspected by the operations tests (cargo-deb, pinned,
# installed into target/ when missing).
./scripts/deb.sh --dev
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
{ cargo test --workspace --all-targets && cargo test --workspace --doc; } 2>&1 | tee "$log" || status=$?
# The served OpenAPI document against the real binary: schemathesis for 60 s, any finding fails.
fuzz=skipped
if [ "$status" -eq 0 ]; then
  if ./scripts/api-fuzz.sh target/debug/pingora-vhost; then fuzz=passed; else fuzz=failed; status=1; fi
fi
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "\n== %d passed, %d failed; API fuzzing (schemathesis): '"$fuzz"' ==\n", p, f }' "$log"
exit "$status"
