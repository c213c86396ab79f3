#!/usr/bin/env bash
# Run the Autobahn|Testsuite fuzzing client against a WebSocket echo endpoint.
#
#   scripts/autobahn.sh install            install wstest into a private prefix
#   scripts/autobahn.sh run URL [OUTDIR]   run cases against URL, summarise, gate
#
# autobahntestsuite is Python 2 only and Debian 12 ships no Python 2, so we
# fetch Debian 11 (bullseye)'s python2.7 .debs with a throwaway apt state and
# unpack them into a private root. Nothing on the host is installed or changed
# (except, on a bare machine, the stock bookworm python3/pip/gcc we depend on).
#
# Environment:
#   WSGATE_TOOLS_DIR   parent of the install prefix (default: $REPO/target/tools)
#   AUTOBAHN_CASES     JSON list of case patterns (default: 1.* .. 10.*;
#                      12.*/13.* are permessage-deflate, which wsgate lacks)
#   AUTOBAHN_EXCLUDE   JSON list of case patterns to exclude (default: [])
#   AUTOBAHN_EXPECTED  expectation file (default: scripts/autobahn-expected.json)
#   AUTOBAHN_TIMEOUT   seconds before the fuzzing run is killed (default: 1800)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${WSGATE_TOOLS_DIR:-$REPO/target/tools}/autobahn"
ROOT="$PREFIX/root"          # unpacked bullseye python2.7 (+ installed packages)
PY2="$PREFIX/bin/python2"    # wrapper that sets PYTHONHOME/LD_LIBRARY_PATH
WSTEST="$PREFIX/bin/wstest"
MARKER="$PREFIX/.installed"

DEBS=(python2.7-minimal libpython2.7-minimal libpython2.7-stdlib python2.7
      libpython2.7 libpython2.7-dev python2.7-dev libssl1.1 libffi7)
BOOTSTRAP=(pip==20.3.4 setuptools==44.1.1 wheel==0.37.1)
# Last py2-compatible releases. The py2 wheel's metadata pins the same set, but
# the sdist lacks its requirements file, so pin explicitly in case pip ever
# falls back to it. Unpinned transitive deps resolve via Requires-Python.
PINS=(autobahntestsuite==25.10.1 txaio==2.1.0 incremental==16.10.1
      pyOpenSSL==19.1.0 cryptography==3.3.2 Twisted==19.10.0
      zope.interface==4.6.0 jinja2==2.11.3 markupsafe==1.1.1 Werkzeug==1.0.1
      klein==17.10.0 service_identity==18.1.0 unittest2==1.1.0 six==1.16.0
      'autobahn[accelerate,twisted]==0.10.9')
# Changing any pin invalidates an existing install.
STAMP="$(printf '%s\n' "${DEBS[@]}" "${BOOTSTRAP[@]}" "${PINS[@]}" | sha256sum | cut -c1-16)"

log() { printf '[autobahn] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# A bare Debian 12 (e.g. a container) may lack python3, pip or a C compiler;
# wsaccel/ujson/Twisted build C extensions, and pip fetches the bootstrap wheels.
ensure_host_tools() {
    local missing=()
    command -v python3 >/dev/null || missing+=(python3)
    python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    command -v x86_64-linux-gnu-gcc >/dev/null || missing+=(gcc libc6-dev)
    command -v dpkg-deb >/dev/null || missing+=(dpkg)
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) == 0 ]] || die "missing host packages: ${missing[*]} (need root to apt-get install)"
    log "installing host packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" ca-certificates >/dev/null
}

# Print "URI<TAB>SIGNED-BY" for the main archive and the security archive, taken
# from the host's own apt sources so mirrors/proxies configured there are reused.
host_archives() {
    python3 - <<'EOF'
import glob, re
main = sec = None
def add(uri, suites, signed):
    global main, sec
    for s in suites:
        if s.endswith("-security") and sec is None:
            sec = (uri, signed)
        elif "-" not in s and main is None:
            main = (uri, signed)
# deb822 (Debian 12 default) ...
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        f = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            k, v = line.split(":", 1)
            f[k.strip().lower()] = v.strip()
        if "deb" not in f.get("types", "").split() or f.get("enabled", "yes") == "no":
            continue
        for uri in f.get("uris", "").split():
            add(uri, f.get("suites", "").split(), f.get("signed-by", ""))
# ... and the one-line format, for hosts upgraded from older releases.
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        m = re.match(r"\s*deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)", line)
        if m:
            opts = dict(o.split("=", 1) for o in (m.group(1) or "").split() if "=" in o)
            add(m.group(2), [m.group(3)], opts.get("signed-by", ""))
main = main or ("http://deb.debian.org/debian", "")
sec = sec or ("http://deb.debian.org/debian-security", "")
for uri, signed in (main, sec):
    print("%s\t%s" % (uri, signed or "/usr/share/keyrings/debian-archive-keyring.gpg"))
EOF
}

# Fetch the bullseye python2.7 .debs into $1 without touching the host's apt
# state. bullseye's keys are still in bookworm's debian-archive-keyring.gpg,
# which the host sources already name as Signed-By, so signatures stay checked.
fetch_debs() {
    local dest="$1" state="$PREFIX/apt" uri signed suite
    rm -rf "$state"
    mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/empty.d" "$dest"
    : >"$state/status"
    : >"$state/bullseye.sources"
    while IFS=$'\t' read -r uri signed; do
        if [[ -z "${suite:-}" ]]; then suite=bullseye; else suite=bullseye-security; fi
        printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n\n' \
            "$uri" "$suite" "$signed" >>"$state/bullseye.sources"
    done < <(host_archives)
    local apt_opts=(
        -o "Dir::Etc::sourcelist=$state/bullseye.sources"
        -o "Dir::Etc::sourceparts=$state/empty.d"
        -o "Dir::State::Lists=$state/lists"
        -o "Dir::State::status=$state/status"
        -o "Dir::Cache=$state/cache"
        -o "Dir::Etc::preferences=$state/empty.d/none"
        -o "Dir::Etc::preferencesparts=$state/empty.d"
        -o APT::Architecture=amd64
        -o Debug::NoLocking=1
        # _apt cannot write into a root-owned work tree; these are signed
        # .debs fetched into a scratch dir, so sandboxing buys nothing here.
        -o APT::Sandbox::User=root
    )
    log "apt update (private state, bullseye)"
    apt-get "${apt_opts[@]}" -qq update
    log "apt download: ${DEBS[*]}"
    (cd "$dest" && apt-get "${apt_opts[@]}" -qq download "${DEBS[@]}")
}

write_wrappers() {
    mkdir -p "$PREFIX/bin"
    # PYTHONUSERBASE keeps pip's installs in a tree we own and that is on
    # sys.path; PYTHONPATH/PYTHONSTARTUP from the caller would only confuse py2.
    cat >"$PY2" <<EOF
#!/bin/sh
unset PYTHONPATH PYTHONSTARTUP PYTHONNOUSERSITE
export PYTHONHOME="$ROOT/usr"
export PYTHONUSERBASE="$PREFIX/py"
export LD_LIBRARY_PATH="$ROOT/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$ROOT/usr/bin/python2.7" "\$@"
EOF
    cat >"$WSTEST" <<EOF
#!/bin/sh
exec "$PY2" -c 'import sys; sys.argv[0] = "wstest"; from autobahntestsuite.wstest import run; run()' "\$@"
EOF
    chmod +x "$PY2" "$WSTEST"
}

is_installed() {
    [[ -f "$MARKER" && "$(cat "$MARKER")" == "$STAMP" ]] &&
        "$PY2" -c 'import autobahntestsuite.wstest, wsaccel' >/dev/null 2>&1
}

cmd_install() {
    if is_installed; then
        log "already installed in $PREFIX"
        return 0
    fi
    local t0=$SECONDS
    # The private root is laid out for amd64 (x86_64-linux-gnu paths).
    [[ "$(uname -m)" == x86_64 ]] || die "only x86_64 hosts are supported"
    ensure_host_tools
    # Start clean: a half-finished earlier attempt is not worth salvaging.
    rm -rf "$PREFIX"
    mkdir -p "$PREFIX"

    fetch_debs "$PREFIX/debs"
    local deb
    for deb in "$PREFIX"/debs/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
    write_wrappers
    "$PY2" -c 'import ssl, ctypes, zlib, hashlib' || die "unpacked python2.7 is unusable"

    # Python 2 has no ensurepip here, so pip runs itself from its own wheel.
    log "bootstrapping pip for python2.7"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 2.7 \
        -d "$PREFIX/wheels" "${BOOTSTRAP[@]}"
    local pipwhl=("$PREFIX"/wheels/pip-*.whl)
    "$PY2" "${pipwhl[0]}/pip" install -q --user --no-index --find-links "$PREFIX/wheels" \
        --no-python-version-warning --no-warn-script-location "${BOOTSTRAP[@]}"

    log "pip install autobahntestsuite (builds a few C extensions; well under a minute)"
    # Headers of the private python2.7; pyconfig.h is found via the multiarch
    # include dir under $ROOT/usr/include.
    CFLAGS="-I$ROOT/usr/include -I$ROOT/usr/include/python2.7" \
        "$PY2" -m pip install -q --user --no-warn-script-location \
        --disable-pip-version-check --no-python-version-warning "${PINS[@]}"
    "$PY2" -c 'import autobahntestsuite.wstest, wsaccel' || die "autobahntestsuite install failed"

    rm -rf "$PREFIX/apt" "$PREFIX/debs"
    echo "$STAMP" >"$MARKER"
    log "installed in $PREFIX ($((SECONDS - t0))s)"
}

cmd_run() {
    local url="${1:-}" outdir="${2:-$REPO/target/autobahn}"
    [[ -n "$url" ]] || die "usage: $0 run URL [OUTDIR]"
    cmd_install

    mkdir -p "$outdir"
    outdir="$(cd "$outdir" && pwd)"
    local cases="${AUTOBAHN_CASES:-[\"1.*\",\"2.*\",\"3.*\",\"4.*\",\"5.*\",\"6.*\",\"7.*\",\"8.*\",\"9.*\",\"10.*\"]}"
    local exclude="${AUTOBAHN_EXCLUDE:-[]}"
    local expected="${AUTOBAHN_EXPECTED:-$REPO/scripts/autobahn-expected.json}"
    # A stale index.json from an earlier run must never be mistaken for this one.
    rm -rf "$outdir/reports"

    URL="$url" CASES="$cases" EXCLUDE="$exclude" OUTDIR="$outdir" python3 - <<'EOF'
import json, os
spec = {
    "outdir": os.path.join(os.environ["OUTDIR"], "reports"),
    "servers": [{"agent": "wsgate", "url": os.environ["URL"]}],
    "cases": json.loads(os.environ["CASES"]),
    "exclude-cases": json.loads(os.environ["EXCLUDE"]),
    "exclude-agent-cases": {},
}
with open(os.path.join(os.environ["OUTDIR"], "spec.json"), "w") as f:
    json.dump(spec, f, indent=2)
EOF

    log "running fuzzingclient against $url (cases: $cases)"
    local t0=$SECONDS rc=0
    # wstest writes its report relative to cwd and logs per-case chatter.
    (cd "$outdir" && timeout "${AUTOBAHN_TIMEOUT:-1800}" "$WSTEST" -m fuzzingclient -s spec.json) \
        >"$outdir/wstest.log" 2>&1 || rc=$?
    log "wstest finished in $((SECONDS - t0))s (exit $rc, log: $outdir/wstest.log)"
    if ((rc != 0)) || [[ ! -f "$outdir/reports/index.json" ]]; then
        tail -n 20 "$outdir/wstest.log" >&2
        ((rc == 124)) && die "wstest timed out after ${AUTOBAHN_TIMEOUT:-1800}s"
        die "wstest failed (exit $rc) or produced no report"
    fi

    INDEX="$outdir/reports/index.json" EXPECTED="$expected" CASES="$cases" EXCLUDE="$exclude" \
        python3 - <<'EOF'
import fnmatch, json, os, sys
from collections import Counter

# Worse behaviours rank higher. NON-STRICT/INFORMATIONAL/UNIMPLEMENTED are all
# tolerated by default; only an expectation file can demand better.
RANK = {"OK": 0, "NON-STRICT": 1, "INFORMATIONAL": 1, "UNIMPLEMENTED": 2, "FAILED": 3}

def case_key(cid):
    return tuple(int(p) if p.isdigit() else p for p in cid.split("."))

index = json.load(open(os.environ["INDEX"]))
# wstest still writes an (empty) index when it cannot connect at all.
if len(index) != 1 or not next(iter(index.values())):
    sys.exit("FAIL: report has no results (could not connect?); see wstest.log")
agent, results = next(iter(index.items()))

exp_path = os.environ["EXPECTED"]
expected = {}
if os.path.exists(exp_path):
    expected = json.load(open(exp_path))
    print("expectations: %s (%d entries)" % (exp_path, len(expected)))
else:
    print("expectations: none (%s missing); rule is: no FAILED" % exp_path)

def expectation(cid):
    """Allowed behaviours for a case: exact id first, then glob keys in file order."""
    val = expected.get(cid)
    if val is None:
        val = next((v for k, v in expected.items() if fnmatch.fnmatchcase(cid, k)), None)
    if val is None:
        return None
    return [val] if isinstance(val, str) else list(val)

counts, close_counts = Counter(), Counter()
problems, improved = [], []
for cid in sorted(results, key=case_key):
    r = results[cid]
    got, got_close = r["behavior"], r.get("behaviorClose", "")
    counts[got] += 1
    close_counts[got_close] += 1
    allowed = expectation(cid)
    worst_ok = max(RANK.get(a, 3) for a in allowed) if allowed else RANK["UNIMPLEMENTED"]
    if got == "FAILED" or got_close == "FAILED" or RANK.get(got, 3) > worst_ok:
        problems.append((cid, got, got_close, allowed))
    elif allowed and RANK.get(got, 3) < min(RANK.get(a, 3) for a in allowed):
        improved.append((cid, got, allowed))

# A case the expectation file names and the selection covers must have run.
selected = json.loads(os.environ["CASES"])
excluded = json.loads(os.environ["EXCLUDE"])
for k in expected:
    if any(c in k for c in "*?["):
        continue
    if (any(fnmatch.fnmatchcase(k, p) for p in selected)
            and not any(fnmatch.fnmatchcase(k, p) for p in excluded)
            and k not in results):
        problems.append((k, "MISSING", "", expectation(k)))

order = list(RANK) + sorted(set(counts) - set(RANK))
print("agent %s: %d cases" % (agent, len(results)))
print("  behavior:      " + "  ".join("%s=%d" % (b, counts[b]) for b in order))
print("  behaviorClose: " + "  ".join("%s=%d" % kv for kv in sorted(close_counts.items())))
for cid, got, allowed in improved:
    print("  better than expected: %s got %s (expected %s)" % (cid, got, "/".join(allowed)))
if problems:
    print("FAILURES (%d):" % len(problems))
    for cid, got, got_close, allowed in problems:
        r = results.get(cid, {})
        print("  %-10s behavior=%-13s close=%-8s expected=%-13s %s" % (
            cid, got, got_close or "-", "/".join(allowed) if allowed else "not FAILED",
            r.get("reportfile", "")))
    sys.exit(1)
print("PASS: no FAILED case, nothing worse than expected")
EOF
}

case "${1:-}" in
    install) cmd_install ;;
    run) shift; cmd_run "$@" ;;
    *) echo "usage: $0 install | run URL [OUTDIR]" >&2; exit 2 ;;
esac
