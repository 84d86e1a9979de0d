#!/usr/bin/env bash
# The built wheel works on its own: build it (sdist, then the wheel from the sdist),
# check its contents, install it into a fresh venv of the newest supported Python (the
# lock as constraints only: the wheel's own metadata must pull every dependency), run
# `backstream install-local-model`, then serve from a temp dir and stream one request.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/common.sh

scratch
py=$(find_python "${1:-${SUPPORTED##* }}")
echo "== wheel: build and install with $py"
venv "$SCRATCH/build" "$py"
vpip "$SCRATCH/build" install -c "$LOCK" build
"$SCRATCH/build/bin/python" -m build --outdir "$SCRATCH/dist" . >"$SCRATCH/build.log" 2>&1 || { cat "$SCRATCH/build.log"; exit 1; }
whl=$(echo "$SCRATCH"/dist/backstream-*.whl)
"$py" .ci/wheel_check.py contents "$whl" src/backstream

venv "$SCRATCH/env" "$py"
vpip "$SCRATCH/env" install -c "$LOCK" "$whl"
mkdir "$SCRATCH/run"
(cd "$SCRATCH/run" && "$SCRATCH/env/bin/backstream" install-local-model)
"$SCRATCH/env/bin/python" .ci/wheel_check.py serve "$SCRATCH/env/bin/backstream" "$SCRATCH/run"
