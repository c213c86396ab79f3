#!/usr/bin/env bash
# The whole test suite, on a fresh machine with only the Rust toolchain and python3:
#  1. unit and integration tests (the real gateway on port 0, our Rust client and the
#     third-party Python `websockets` client, installed into target/pyenv by the tests);
#  2. the integration tests again with every gateway on the epoll fallback driver
#     (MONOIO_FORCE_LEGACY_DRIVER=1), which behaves differently under load (~25 s);
#  3. Autobahn TestSuite sections 1-10 against the echo endpoint (installed privately
#     into target/tools on first use), diffed against scripts/autobahn-expected.json.
# Set WSGATE_SKIP_AUTOBAHN=1 to skip the third part.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-python.sh >/dev/null
cargo test
echo "== integration tests on the epoll fallback driver" >&2
MONOIO_FORCE_LEGACY_DRIVER=1 cargo test --test gateway --test v1 --test python_client
if [ "${WSGATE_SKIP_AUTOBAHN:-0}" != 1 ]; then
  scripts/conformance.sh
fi
