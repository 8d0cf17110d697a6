#!/usr/bin/env python3
"""`make bench-replay` (part of `make bench`): laneguard-replay on a million-line trace.

Generates the trace once with tools/tracegen.py (northwind's bad morning for 205 tenants,
seed 1: about a million JSONL lines) into .run/bench/, then times the release build of
laneguard-replay on it, wall clock, best of BENCH_REPLAY_RUNS (default 3):

  single    --policy envoy/demo/envoy.yaml, JSON report to /dev/null
  compare   the same with --compare examples/rollout/flat-cap.yaml (both policies, one pass)

Prints seconds and lines per second, and writes bench/results/replay.json. A timing: run it
on a quiet machine. Standard library only.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "laneguard-replay"
TRACE = ROOT / ".run" / "bench" / "replay-1m.jsonl"
OUT = ROOT / "bench" / "results" / "replay.json"
TENANTS = 205
SEED = 1


def main():
    if not BIN.is_file():
        sys.exit(f"{BIN} is missing: cargo build --release -p laneguard-replay")
    if not TRACE.is_file():
        TRACE.parent.mkdir(parents=True, exist_ok=True)
        print(f"bench-replay: generating {TRACE} ({TENANTS} tenants, seed {SEED})", flush=True)
        subprocess.run(
            [sys.executable, str(ROOT / "tools" / "tracegen.py"), "--seed", str(SEED),
             "--tenants", str(TENANTS), "--out", str(TRACE)],
            check=True,
        )
    with TRACE.open("rb") as f:
        lines = sum(1 for _ in f)
    runs = int(os.environ.get("BENCH_REPLAY_RUNS", "3"))
    cases = {
        "single": ["--policy", "envoy/demo/envoy.yaml"],
        "compare": ["--policy", "envoy/demo/envoy.yaml", "--compare", "examples/rollout/flat-cap.yaml"],
    }
    rows = []
    for name, args in cases.items():
        best = None
        for _ in range(max(1, runs)):
            t = time.monotonic()
            p = subprocess.run(
                [str(BIN), *args, "--trace", str(TRACE), "--format", "json"],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
            dt = time.monotonic() - t
            if p.returncode != 0:
                sys.exit(f"laneguard-replay failed ({p.returncode}): {p.stderr}")
            best = dt if best is None else min(best, dt)
        row = {"case": name, "lines": lines, "seconds": round(best, 3),
               "lines_per_second": int(lines / best), "runs": runs}
        rows.append(row)
        print(f"bench-replay: {name}: {lines} lines in {best:.2f} s ({int(lines / best)} lines/s, best of {runs})")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"trace": str(TRACE.relative_to(ROOT)), "rows": rows,
                               "cpus": os.cpu_count()}, indent=2) + "\n")
    print(f"bench-replay: wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
