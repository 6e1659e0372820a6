#!/usr/bin/env bash
# The project's test command: formatting, lints, and every test (unit, integration with real
# servers on loopback, doc tests; benches and examples are built and smoke-run).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
cargo test --workspace --doc
