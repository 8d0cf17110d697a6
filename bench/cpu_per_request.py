#!/usr/bin/env python3
"""Envoy CPU µs per request for router, wasm_noop, wasm_hostcalls and laneguard builds.

Usage: python3 bench/cpu_per_request.py ROUNDS DURATION LABEL=path/to/laneguard_wasm.wasm ...
                                          [hostcalls:LABEL=CALLS ...]

Compares laneguard builds (copies of target/wasm32-wasip1/release/laneguard_wasm.wasm taken
before and after a change) in interleaved rounds with bench/run.py's `measure` (same Envoy,
policy, pinning and load as `make bench`'s main part) and prints the median Envoy CPU per
request. CPU time per request survives a loaded machine better than throughput.
`hostcalls:LABEL=CALLS` adds the no-op filter with that host-call configuration
(bench/noop-wasm's keys, e.g. `hostcalls:hdr=headers=1` or `hostcalls:fs4=filter_state=4`),
to price one kind of host call against `wasm_noop`. Needs
`make bench-build`. CPU_HOSTCALLS=0 leaves wasm_hostcalls out. Logs in bench/results/logs/cpu_per_request/.
"""
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run, benchlib
rounds, duration = int(sys.argv[1]), float(sys.argv[2])
pairs = [a.split("=", 1) for a in sys.argv[3:]]
if any(len(p) != 2 for p in pairs):
    sys.exit("each variant is LABEL=path.wasm or hostcalls:LABEL=CALLS")
variants = {k: v for k, v in pairs if not k.startswith("hostcalls:")}
calls = {k: v for k, v in pairs if k.startswith("hostcalls:")}
logdir = run.LOGS / "cpu_per_request"; logdir.mkdir(parents=True, exist_ok=True)
up = benchlib.start_upstream(logdir, run.cpus(1))
grants = run.grants_flag()
names = ["router", "wasm_noop"] + (["wasm_hostcalls"] if os.environ.get("CPU_HOSTCALLS", "1") == "1" else []) + list(calls) + [f"laneguard:{k}" for k in variants]
res = {n: [] for n in names}
HOSTCALLS = run.HOSTCALLS
try:
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            cfg = n
            run.HOSTCALLS = calls.get(n, HOSTCALLS)
            if n in calls:
                cfg = "wasm_hostcalls"
            if n.startswith("laneguard:"):
                run.LANEGUARD_WASM = Path(variants[n.split(":", 1)[1]])
                cfg = "laneguard"
            m = run.measure(cfg, up, grants, logdir, duration=duration, warmup=2.0, connections=32)
            res[n].append(m)
            print(f"round {r} {n}: {m['envoy_cpu_us']:.2f} us/req cpu, {m['rps']:.0f} rps, "
                  f"rpcs/1000 {m['rpcs_per_1000']:.2f}, others {m.get('others_cores', 0):.2f}", flush=True)
finally:
    up.stop()
router = statistics.median(x["envoy_cpu_us"] for x in res["router"])
print(f"\nmedians over {rounds} rounds, {duration}s each (Envoy CPU us per request):")
for n in names:
    c = statistics.median(x["envoy_cpu_us"] for x in res[n])
    rps = statistics.median(x["rps"] for x in res[n])
    print(f"  {n:28s} {c:6.2f} us/req  over router {c - router:+5.2f}   rps {rps:,.0f}")
json.dump({n: [{k: x[k] for k in ('envoy_cpu_us', 'rps')} for x in v] for n, v in res.items()},
          open(logdir / "last.json", "w"))
