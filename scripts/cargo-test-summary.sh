#!/usr/bin/env bash
# Run `cargo test --workspace` and end with one line that totals every test binary's
# results ("N passed, N failed, N skipped"): cargo's own last line belongs to whichever
# crate ran last (often a doc-test run with 0 tests), which says nothing about the whole.
set -uo pipefail
cargo=${CARGO:-cargo}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$cargo" test --workspace "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
awk '/^test result:/ {
  for (i = 2; i <= NF; i++) {
    if ($i == "passed;") p += $(i - 1)
    if ($i == "failed;") f += $(i - 1)
    if ($i == "ignored;") s += $(i - 1)
  }
} END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
