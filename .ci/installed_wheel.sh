#!/usr/bin/env bash
# CI job (issue 12): the conformance suite as a port author gets it, from the built wheel.
#
# Builds the wheel, installs `<wheel>[conformance]` into a fresh virtual environment (no
# torch at first: the reference and a numpy port must not need it), and from an empty
# directory outside the repository runs the documented commands of docs/13-conformance.md:
#   1. pytest --pyargs conformance --impl conformance.examples.minimal_port:factory
#   2. pytest --pyargs conformance --impl reference
#   3. the file route: conformance.export -> examples.write_outputs -> conformance.check_outputs
#      (the minimal port and the reference)
#   4. with torch==2.13.0 added: the accelerated port, both routes.
# ci profile throughout; a few minutes on 2 cores.  Called from .ci/run; runs alone too.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kvsink-wheel-ci.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
step() { printf '\n=== installed wheel: %s\n' "$*"; }

step "build the wheel"
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$REPO"
WHEEL="$(ls "$WORK"/dist/kvsink-*.whl)"
echo "$WHEEL"

step "fresh environment: $WORK/venv"
"$PY" -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "${WHEEL}[conformance]"
mkdir "$WORK/run"
cd "$WORK/run"                          # outside the repository: only the installed package counts
unset PYTHONPATH
python - <<'EOF'
import importlib.util, pathlib, sys
import conformance
where = pathlib.Path(conformance.__file__).resolve()
assert "site-packages" in where.parts, f"conformance imported from {where}, not the installed wheel"
assert importlib.util.find_spec("torch") is None, "torch is installed; this step checks ports without it"
print(f"conformance from {where.parent}; no torch")
EOF
PYTEST=(python -m pytest --pyargs conformance -p no:cacheprovider -q -rs --profile ci)

file_route() {   # $1: --impl spec
    local out="$WORK/outputs-${1//[^a-z]/_}"
    python -m conformance.examples.write_outputs "$WORK/vectors" "$out" --impl "$1"
    python -m conformance.check_outputs "$WORK/vectors" "$out"
}

step "pytest --pyargs conformance --impl conformance.examples.minimal_port:factory (no torch)"
"${PYTEST[@]}" --impl conformance.examples.minimal_port:factory
step "pytest --pyargs conformance --impl reference (no torch)"
"${PYTEST[@]}" --impl reference
step "file route: export, the minimal port's and the reference's outputs, check"
python -m conformance.export "$WORK/vectors"
file_route conformance.examples.minimal_port:factory
file_route reference

step "torch==2.13.0 for the accelerated port"
python -m pip install -q torch==2.13.0
step "pytest --pyargs conformance --impl accelerated"
"${PYTEST[@]}" --impl accelerated
step "file route: the accelerated port's outputs, check"
file_route accelerated
step "passed"
