# Sourced by the .ci scripts: find interpreters, make throwaway venvs outside the work tree.

SUPPORTED="3.11 3.12 3.13"
LOCK=requirements.lock

# An interpreter for version $1 that really runs: on PATH, else under pyenv (whose shims
# exist for every installed version but fail for those not selected).
find_python() {
    local c
    for c in "python$1" "$(pyenv root 2>/dev/null || echo /nonexistent)/versions/$1".*/bin/"python$1"; do
        if [ "$("$c" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$1" ]; then
            echo "$c"; return
        fi
    done
    echo "ci: no Python $1 found (PATH or pyenv); it is a supported version and must be tested" >&2
    return 1
}

# A scratch dir removed when the script exits.
scratch() {
    SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/backstream-ci.XXXXXX")
    trap 'rm -rf "$SCRATCH"' EXIT
}

# venv DIR PYTHON: a fresh venv.
venv() {
    "$2" -m venv "$1"
}

vpip() {
    local v=$1; shift
    "$v/bin/python" -m pip -q --disable-pip-version-check "$@"
}
