#!/usr/bin/env bash
# The whole test suite, on a fresh machine with only the Rust toolchain and python3:
#  1. unit and integration tests (the real gateway on port 0, our Rust client and the
#     third-party Python `websockets` client, installed into target/pyenv by the tests);
#  2. Autobahn TestSuite sections 1-10 against the echo endpoint (installed privately
#     into target/tools on first use), diffed against scripts/autobahn-expected.json.
# Set WSGATE_SKIP_AUTOBAHN=1 to run only the first part.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-python.sh >/dev/null
cargo test
if [ "${WSGATE_SKIP_AUTOBAHN:-0}" != 1 ]; then
  scripts/conformance.sh
fi
