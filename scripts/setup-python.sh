#!/usr/bin/env bash
# Creates the Python environment the tests use (third-party WebSocket client `websockets`).
# Idempotent and private: a venv under target/, nothing installed system-wide.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${WSGATE_VENV:-$repo/target/pyenv}
marker=$venv/.wsgate-ready-websockets15
if [ -f "$marker" ] && "$venv/bin/python" -c 'import websockets' 2>/dev/null; then
  echo "$venv"
  exit 0
fi
python3 -m venv "$venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check 'websockets>=15,<18' >&2
touch "$marker"
echo "$venv"
