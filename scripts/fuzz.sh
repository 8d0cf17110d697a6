#!/usr/bin/env bash
# make fuzz: run every fuzz target (docs/fuzzing.md) for FUZZ_SECONDS each (default 60),
# one after the other, then print executions per second and totals. Each target is a
# `fuzz_*` test; without FUZZ_SECONDS (as in `make test`) the same tests run a few hundred
# fixed-seed inputs instead. FUZZ_SEED=N replays a run; FUZZ_REPORT=FILE keeps the figures
# (default target/fuzz/report.jsonl). FUZZ_PROFILE=release fuzzes an optimised build (more
# executions per second, no overflow checks); the default is the test build.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo=${CARGO:-cargo}
export FUZZ_SECONDS=${FUZZ_SECONDS:-60}
report=${FUZZ_REPORT:-target/fuzz/report.jsonl}
mkdir -p "$(dirname "$report")"
: > "$report"
FUZZ_REPORT=$(cd "$(dirname "$report")" && pwd)/$(basename "$report")
export FUZZ_REPORT
profile=()
if [ -n "${FUZZ_PROFILE:-}" ]; then profile=(--profile "$FUZZ_PROFILE"); fi

echo "fuzzing each target for ${FUZZ_SECONDS} s (report: $FUZZ_REPORT)"
status=0
for target in "-p laneguard-core --test fuzz" "-p laneguard-wasm --lib" "-p laneguard-service --test fuzz"; do
  # shellcheck disable=SC2086
  "$cargo" test ${profile[@]+"${profile[@]}"} $target fuzz_ -- --test-threads=1 --nocapture || status=1
done

python3 - "$FUZZ_REPORT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print()
print(f"{'target':<20} {'executions':>12} {'seconds':>8} {'per second':>11}")
for r in rows:
    print(f"{r['target']:<20} {r['executions']:>12} {r['seconds']:>8.1f} {r['per_second']:>11.1f}")
total = sum(r['executions'] for r in rows)
secs = sum(r['seconds'] for r in rows)
print(f"{'total':<20} {total:>12} {secs:>8.1f} {total / max(secs, 1e-9):>11.1f}")
PY
if [ "$status" -ne 0 ]; then
  echo "make fuzz: a target failed; its shrunk input is above (keep it as a regression test)" >&2
fi
exit "$status"
