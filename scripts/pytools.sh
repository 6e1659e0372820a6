#!/usr/bin/env bash
# Installs the Python peers of the protocol tests into target/pytools (a venv): websockets and
# grpcio, independent implementations of WebSocket and gRPC (client and server). Idempotent.
# Usage: scripts/pytools.sh   then   target/pytools/bin/python ...
set -euo pipefail
cd "$(dirname "$0")/.."
venv="target/pytools"
want="grpcio==1.85.3 websockets==17.4"
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.installed" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null \
    || { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null; }
fi
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC2086
"$venv/bin/pip" install -q --disable-pip-version-check $want
echo "$want" > "$venv/.installed"
