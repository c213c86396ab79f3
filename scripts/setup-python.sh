#!/usr/bin/env bash
# Creates the Python environment the tests use: a third-party WebSocket client (`websockets`)
# and the reference Prometheus text parser (`prometheus-client`).
# Idempotent and private: a venv under target/, nothing installed system-wide.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${WSGATE_VENV:-$repo/target/pyenv}
marker=$venv/.wsgate-ready-2
mkdir -p "$(dirname "$venv")"
# Tests run in parallel and may all ask for the venv at once: one creates it.
exec 9>"$venv.lock"
flock 9
if [ -f "$marker" ] && "$venv/bin/python" -c 'import websockets, prometheus_client' 2>/dev/null; then
  echo "$venv"
  exit 0
fi
python3 -m venv "$venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check 'websockets>=15,<18' 'prometheus-client>=0.20,<1' >&2
touch "$marker"
echo "$venv"
