#!/usr/bin/env bash
# The whole test suite, in three parts (run `bash scripts/setup.sh` first):
#   1. main env (torch 2.13):        python3 -m pytest -q tests --ignore=tests/integration/noether
#   2. Noether env (torch 2.11):     pytest -q -m torch_compat tests --ignore=tests/integration/noether
#   3. Noether env, real Noether:    pytest -q tests/integration/noether
# Every part runs even when an earlier one failed; the exit status is non-zero when any part
# failed or ran no test (pytest's exit 5 counts as a failure here). Extra arguments go to
# every pytest call (e.g. -x).
set -uo pipefail
cd "$(dirname "$0")/.."
here=$(pwd -P)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever is installed
NOETHER_PY="$(bash scripts/noether_env.sh)/bin/python"
NOETHER_MISSING=$(bash scripts/setup_noether_env.sh --check >/dev/null || bash scripts/setup_noether_env.sh --check)
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
declare -a SUMMARY=()
failed=0 total_passed=0 total_failed=0 total_skipped=0

count() {  # count WORD LOG: the number before WORD in pytest's closing line
    tail -n 5 "$2" | grep -oE "[0-9]+ $1" | tail -n 1 | grep -oE '^[0-9]+' || echo 0
}

part() {  # part NAME PYTHON PYTEST-ARGS...
    local name=$1 py=$2; shift 2
    local log="$LOGS/$name.log" start rc secs verdict
    echo
    echo "================================================================================"
    echo "== $name: $py -m pytest $*"
    echo "================================================================================"
    start=$(date +%s)
    if [ "$py" = "$NOETHER_PY" ] && [ -n "$NOETHER_MISSING" ]; then
        echo "$NOETHER_MISSING: run bash scripts/setup.sh (it builds the Noether environment)" | tee "$log"
        rc=127
    else
        "$py" -m pytest "$@" "${EXTRA[@]}" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
    fi
    secs=$(( $(date +%s) - start ))
    local p f e s
    p=$(count passed "$log"); f=$(count failed "$log"); e=$(count "errors?" "$log"); s=$(count skipped "$log")
    total_passed=$((total_passed + p)); total_failed=$((total_failed + f + e)); total_skipped=$((total_skipped + s))
    case $rc in
        0) verdict="ok";;
        5) verdict="FAILED: no test was collected (pytest exit 5)";;
        127) verdict="FAILED: the Noether environment is missing or incomplete";;
        *) verdict="FAILED (pytest exit $rc)";;
    esac
    [ "$rc" = 0 ] || { failed=1; echo "!! $name: $verdict"; }
    SUMMARY+=("$(printf '%-28s %5ds  %s passed, %s failed, %s skipped  %s' "$name" "$secs" "$p" "$((f + e))" "$s" "$verdict")")
}

EXTRA=("$@")
part "1-main-env" python3 -q tests --ignore=tests/integration/noether
part "2-noether-env-torch_compat" "$NOETHER_PY" -q -m torch_compat tests --ignore=tests/integration/noether
part "3-noether-env-noether" "$NOETHER_PY" -q tests/integration/noether

echo
echo "== summary (seconds per part)"
printf '%s\n' "${SUMMARY[@]}"
echo "total: $total_passed passed, $total_failed failed, $total_skipped skipped"
exit $failed
