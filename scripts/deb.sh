#!/usr/bin/env bash
# Builds the Debian package: target/debian/pingora-vhost_<version>-1_<arch>.deb
# (binary, systemd unit, /etc/pingora-vhost/config.toml as a conffile, docs, alert rules).
# Usage: scripts/deb.sh            release build (what to install)
#        scripts/deb.sh --dev      package the debug binary already built (used by the tests)
# Installs cargo-deb (pinned) into target/cargo-deb when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
version="3.8.0"
tool="target/cargo-deb/bin/cargo-deb"
if [ ! -x "$tool" ] || ! "$tool" --version 2>/dev/null | grep -q "$version"; then
  cargo install --quiet --locked --root target/cargo-deb --version "$version" cargo-deb
fi
if [ "${1:-}" = "--dev" ]; then
  cargo build --quiet -p pingora-vhost
  "$tool" -p pingora-vhost --no-build --profile dev --no-strip --output target/debian/pingora-vhost-dev.deb
else
  "$tool" -p pingora-vhost
fi
