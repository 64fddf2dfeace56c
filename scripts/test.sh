#!/usr/bin/env bash
# Runs ruff and the test suite; fails when ruff finds a problem, when any test fails and when no test ran.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export URESNET_REQUIRE_EXTENSION=${URESNET_REQUIRE_EXTENSION:-1}
# Lint first (pyproject.toml [tool.ruff]): a finding fails the run like a failing test.
if ! $PY -m ruff check --quiet .; then
    echo "uresnet: ruff check found problems (above): failing" >&2
    exit 1
fi
log=$(mktemp)
$PY -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
if [ "$status" -eq 5 ] || ! grep -Eq "[1-9][0-9]* passed" "$log"; then
    echo "uresnet: no test passed (pytest exit $status): failing" >&2
    exit 1
fi
exit "$status"
