#!/usr/bin/env bash
# The whole test suite, on a fresh machine with only the Rust toolchain, python3 and node
# (the scripts install the rest: Python packages, Chromium, promtool, Autobahn):
#  1. unit, simulation and integration tests (the real gateway on port 0, our Rust client and
#     the third-party Python `websockets` client, installed into target/pyenv by the tests;
#     tests/route_sim.rs runs the router through 1,500 seeded interleavings, and
#     tests/cluster.rs three nodes joined by a real nats-server or redis-server, installed by
#     scripts/test-cluster.sh when missing);
#  2. the integration tests again with every gateway on the epoll fallback driver
#     (MONOIO_FORCE_LEGACY_DRIVER=1), which behaves differently under load (~40 s), and
#     once more on io_uring without the data path (WSGATE_NO_RING=true, i.e. --no-ring:
#     readiness waits, as TLS connections always use; ~40 s);
#  3. the JavaScript client and the --demo page: node's test runner and headless Chromium
#     against the real gateway (scripts/test-js.sh);
#  4. the operations kit: promtool, dashboard metric names against the real /metrics,
#     systemd-analyze (scripts/test-deploy.sh);
#  5. the soak in its quick mode: thousands of connections with churn, floods, slow readers
#     and garbage for about two minutes, failing on any gap, leak or unbounded queue
#     (scripts/soak.sh --quick; builds release binaries);
#  6. Autobahn TestSuite sections 1-10 against the echo endpoint (installed privately
#     into target/tools on first use), diffed against scripts/autobahn-expected.json.
# Set WSGATE_SKIP_AUTOBAHN=1 to skip part 6, WSGATE_SKIP_SOAK=1 to skip part 5.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-python.sh >/dev/null
# Installs nats-server and redis-server (Debian packages) when missing and builds the cluster tests; then every
# test, the cluster's included, runs in the one `cargo test`.
scripts/test-cluster.sh --no-run
cargo test
echo "== integration tests on the epoll fallback driver" >&2
MONOIO_FORCE_LEGACY_DRIVER=1 cargo test --test gateway --test v1 --test hostile --test tls \
  --test cluster --test python_client
echo "== integration tests on io_uring readiness waits (--no-ring)" >&2
WSGATE_NO_RING=true cargo test --test gateway --test v1 --test hostile --test python_client
bin="${CARGO_TARGET_DIR:-target}/debug/wsgate"
echo "== JavaScript client and demo page" >&2
WSGATE_BIN="$bin" scripts/test-js.sh
echo "== operations kit" >&2
WSGATE_BIN="$bin" scripts/test-deploy.sh
if [ "${WSGATE_SKIP_SOAK:-0}" != 1 ]; then
  echo "== soak (quick)" >&2
  SOAK_REQUIRE_METRICS=1 scripts/soak.sh --quick
fi
if [ "${WSGATE_SKIP_AUTOBAHN:-0}" != 1 ]; then
  scripts/conformance.sh
fi
