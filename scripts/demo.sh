#!/usr/bin/env bash
# Builds pingora-vhost and runs its self-contained demo (no root, no free 80/443 needed).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
exec cargo run -p pingora-vhost -- demo "$@"
