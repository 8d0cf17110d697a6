#!/usr/bin/env python3
"""`make bench-accuracy`: how close does a fleet stay to a binding limit, and at what cost in
service calls?

Two Envoy instances with two workers each (four VMs, four local tables) share one
laneguard-service. wrk drives each Envoy with one tenant's traffic, far past the tenant's
ceiling, for a bounded time. Three runs, each with fresh processes:

  grants on    the service leases capacity (DescriptorStatus.quota): the headline figures
  grants off   the same with `--grants off`: per-call checks only, for comparison
  restart      grants on; the service is killed mid-run and restarted after a pause
  queue        grants on, the flooded class with `fallbacks: [queue, reject]` (ACC_QUEUE=1,
               the default): over-budget requests wait up to ACC_QUEUE_WAIT_MS and are
               released only once paid (issue 13 item 2); admitted against the same bound.
               `python3 bench/accuracy.py queue` runs this phase alone (ACC_WASM: the
               filter to load, to measure another build), printing
                 accuracy_queue error_pct=<signed float> queued=<int>

Admitted requests are Envoy's `http.bench.downstream_rq_2xx`, summed over both Envoys and
sampled while the load runs: once the first seconds have spent the initial burst (the
settle time) and once just before the end. Over that window the tenant's bucket is
saturated, so GCRA admits exactly rate × window; error_pct = (admitted − rate × window) /
(rate × window) × 100, signed. RPCs are Envoy's `cluster.laneguard_rls.upstream_rq_total`
over the same window, per 1,000 requests served.

The last line printed is, exactly:
  accuracy error_pct=<signed float> rpcs_per_1000=<float>
for the grants-on run. Settings (environment): see SETTINGS below.

Then the fleet part (bench/accuracy_cluster.py, ACC_CLUSTER=1 by default): 4 Envoys, 3
service replicas, a Redis Cluster, a 1 ms link; its line comes last:
  accuracy_cluster error_pct=<signed float> rpcs_per_1000=<float>
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_cluster  # noqa: E402
from benchlib import (  # noqa: E402
    BENCH, LANEGUARD_WASM, RESULTS, ROOT, BenchError, Envoy, envoy_config, fleet_stats, git_state, log, machine_description, policy_json, replace_between,
    require, service_flags, setting_of, start_service, start_upstream, taskset, wasm_filter,
    wasm_fingerprint,
)

SETTINGS = {
    "ACC_RATE": (1000, "the tenant's ceiling, requests per second"),
    "ACC_BURST": (100, "the ceiling's burst"),
    "ACC_DURATION": (20, "seconds of load per run"),
    "ACC_SETTLE": (3, "seconds before the measured window opens"),
    "ACC_CONNECTIONS": (16, "wrk connections per Envoy"),
    "ACC_KILL_AT": (8, "restart run: seconds into the load when the service is killed"),
    "ACC_DOWN": (4, "restart run: seconds the service stays down"),
    "ACC_WORKERS": (2, "Envoy workers per instance"),
    "ACC_QUEUE": (1, "1: also the queue-fallback run"),
    "ACC_QUEUE_WAIT_MS": (1000, "queue run: queue.max_wait_ms"),
    "ACC_QUEUE_DEPTH": (64, "queue run: queue.max_depth per worker"),
    # wrk's connections wait in the queue, so 16 of them offered less than the ceiling once
    # queued requests were released on their lease's slot (no 429s, nothing to measure).
    "ACC_QUEUE_CONNECTIONS": (64, "queue run: wrk connections per Envoy"),
}
ENVOYS = 2
TENANT = "acme"
DOC = ROOT / "docs" / "accuracy.md"
OUT = RESULTS / "accuracy.json"
STATS = (r"^http\.bench\.downstream_rq_(total|2xx|4xx|5xx)$"
         r"|^cluster\.laneguard_rls\.upstream_rq_total$|^wasmcustom\.laneguard\.")


def setting(name: str) -> float:
    return setting_of(SETTINGS, name)


def policy(queue: bool = False) -> str:
    workers = ENVOYS * setting("ACC_WORKERS")
    extra = None
    if queue:
        extra = {"classes": [{
            "name": "standard", "consequence": "time_sensitive", "failure_mode": "local",
            "fallbacks": ["queue", "reject"],
            "queue": {"max_wait_ms": setting("ACC_QUEUE_WAIT_MS"),
                      "max_depth": setting("ACC_QUEUE_DEPTH")},
        }]}
    return policy_json(
        {"per_second": setting("ACC_RATE"), "burst": setting("ACC_BURST")},
        # When the service is down, each VM decides alone on its share of the rate, so the
        # fleet as a whole stays near the limit.
        share=round(1.0 / workers, 4),
        extra=extra,
    )


def filter_wasm() -> Path:
    """The filter to load: ACC_WASM (another build, for a before/after figure) or ours."""
    other = os.environ.get("ACC_WASM")
    return Path(other) if other else require(LANEGUARD_WASM, "make build-wasm")


def snapshot(envoys: list[Envoy]) -> dict:
    """Counters summed over every Envoy, stamped with the mid-point of the sampling."""
    return fleet_stats(envoys, STATS)


def window(a: dict, b: dict, rate: float) -> dict:
    def d(k: str) -> int:
        return b.get(k, 0) - a.get(k, 0)

    seconds = b["_t"] - a["_t"]
    admitted = d("http.bench.downstream_rq_2xx")
    served = d("http.bench.downstream_rq_total") or 1
    limit = rate * seconds
    return {
        "seconds": seconds,
        "admitted": admitted,
        "limit": limit,
        "error_pct": 100.0 * (admitted - limit) / limit if limit else 0.0,
        "requests": served,
        "rps": served / seconds if seconds else 0.0,
        "pct_429": 100.0 * d("http.bench.downstream_rq_4xx") / served,
        "pct_5xx": 100.0 * d("http.bench.downstream_rq_5xx") / served,
        "rpcs": d("cluster.laneguard_rls.upstream_rq_total"),
        "rpcs_per_1000": 1000.0 * d("cluster.laneguard_rls.upstream_rq_total") / served,
        "degraded": d("wasmcustom.laneguard.degraded"),
        "decided_local": d("wasmcustom.laneguard.decided.local"),
        "decided_central": d("wasmcustom.laneguard.decided.central"),
        "lease_renewals": d("wasmcustom.laneguard.lease.renewals"),
        "reported_hits": d("wasmcustom.laneguard.reported_hits"),
        "queued": d("wasmcustom.laneguard.fallback.queue"),
        "queue_resumed": d("wasmcustom.laneguard.queue.resumed"),
        "queue_refused": d("wasmcustom.laneguard.queue.refused"),
    }


def one_run(label: str, grants: str, restart: bool, queue: bool = False) -> dict:
    logdir = RESULTS / "logs" / "accuracy" / label
    duration = setting("ACC_DURATION")
    settle = setting("ACC_SETTLE")
    rate = setting("ACC_RATE")
    flags = service_flags()
    svc_args = ["--grants", grants] if "--grants" in flags else []
    upstream = start_upstream(logdir, None)
    svc = start_service(logdir, None, svc_args)
    envoys: list[Envoy] = []
    wrks: list[subprocess.Popen] = []
    try:
        cfg = envoy_config(wasm_filter(filter_wasm(), "laneguard", policy(queue)),
                           upstream_port=upstream.port, rls_port=svc.port)
        for i in range(ENVOYS):
            envoys.append(Envoy(f"envoy{i}", cfg, logdir, setting("ACC_WORKERS"), None).start())
        before = snapshot(envoys)
        start = time.monotonic()
        for i, e in enumerate(envoys):
            url = f"http://127.0.0.1:{e.listener_port()}/orders/1"
            out = open(logdir / f"wrk{i}.log", "w")
            wrks.append(subprocess.Popen(
                taskset(None) + ["wrk", "-t", "1", "-c", str(setting(
                    "ACC_QUEUE_CONNECTIONS" if queue else "ACC_CONNECTIONS")),
                                 "-d", f"{duration}s", "--timeout", "2s",
                                 "-s", str(BENCH / "lua" / "report.lua"),
                                 "-H", f"x-laneguard-tenant: {TENANT}",
                                 "-H", "x-laneguard-principal: bench", url],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT))

        def at(t: float) -> None:
            delay = start + t - time.monotonic()
            if delay > 0:
                time.sleep(delay)

        marks = {}
        at(settle)
        marks["open"] = snapshot(envoys)
        if restart:
            at(setting("ACC_KILL_AT"))
            marks["kill"] = snapshot(envoys)
            svc.stop()
            log(f"{label}: service killed")
            at(setting("ACC_KILL_AT") + setting("ACC_DOWN"))
            marks["restart"] = snapshot(envoys)
            svc.restart_same_port()
            log(f"{label}: service restarted on {svc.addr}")
        at(duration - 1)
        marks["close"] = snapshot(envoys)
        for w in wrks:
            w.wait(timeout=duration + 30)
        time.sleep(0.5)
        after = snapshot(envoys)
    finally:
        for w in wrks:
            if w.poll() is None:
                w.kill()
        for e in envoys:
            e.stop()
        svc.stop()
        upstream.stop()

    result = {
        "label": label, "grants": grants if svc_args else "no --grants flag",
        "wasm": str(filter_wasm()),
        "window": window(marks["open"], marks["close"], rate),
        # The whole run, burst included: admitted against burst + rate × load time.
        "whole": window(before, after, rate),
    }
    whole = result["whole"]
    whole["limit"] = setting("ACC_BURST") + rate * duration
    whole["error_pct"] = 100.0 * (whole["admitted"] - whole["limit"]) / whole["limit"]
    if restart:
        result["before"] = window(marks["open"], marks["kill"], rate)
        result["down"] = window(marks["kill"], marks["restart"], rate)
        result["after"] = window(marks["restart"], marks["close"], rate)
    return result


def show(r: dict) -> None:
    w = r["window"]
    log(f"{r['label']:10s} grants {r['grants']:3s}: admitted {w['admitted']} in {w['seconds']:.2f} s "
        f"vs limit {w['limit']:.0f} -> {w['error_pct']:+.2f}%   rpcs/1000 {w['rpcs_per_1000']:.2f}  "
        f"({w['rps']:.0f} req/s offered, {w['pct_429']:.1f}% 429, {w['pct_5xx']:.1f}% 5xx)")
    if "queued" in w and r["label"] == "queue":
        log(f"{'':10s} queued {w['queued']}, released {w['queue_resumed']}, refused when due "
            f"{w['queue_refused']}")
    for phase in ("before", "down", "after"):
        if phase in r:
            p = r[phase]
            log(f"{'':10s} {phase:6s} {p['seconds']:5.2f} s: admitted {p['admitted']} vs "
                f"{p['limit']:.0f} -> {p['error_pct']:+.2f}%  rpcs/1000 {p['rpcs_per_1000']:.2f}  "
                f"degraded {p['degraded']}")


def doc_section(runs: list[dict], machine: dict) -> str:
    s = {k: setting(k) for k in SETTINGS}
    out = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} on {machine['cores']} cores "
        f"({machine['cpu']}), Envoy {machine['envoy']}; code `{git_state()}`, Wasm filter "
        f"sources fingerprint `{wasm_fingerprint()}`.",
        f"Setup: {ENVOYS} Envoys × {s['ACC_WORKERS']} workers, one laneguard-service (memory "
        f"store), tenant ceiling {s['ACC_RATE']}/s with burst {s['ACC_BURST']}, "
        f"`service.local_share` {round(1 / (ENVOYS * s['ACC_WORKERS']), 4)}; "
        f"{s['ACC_DURATION']} s of load per run, window from {s['ACC_SETTLE']} s to "
        f"{s['ACC_DURATION'] - 1} s; wrk 1 thread × {s['ACC_CONNECTIONS']} connections per Envoy.",
        "",
        "| run | window | offered req/s | 429 % | admitted | limit (rate × window) | error | "
        "RPCs / 1,000 requests |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        phases = [("window", r["window"])]
        if "before" in r:
            phases = [("before the kill", r["before"]), ("service down", r["down"]),
                      ("after the restart", r["after"]), ("whole window", r["window"])]
        for name, p in phases:
            out.append(f"| {r['label']} (grants {r['grants']}) | {name}, {p['seconds']:.1f} s | "
                       f"{p['rps']:,.0f} | {p['pct_429']:.1f} | {p['admitted']:,} | "
                       f"{p['limit']:,.0f} | {p['error_pct']:+.2f}% | {p['rpcs_per_1000']:.2f} |")
    out.append("")
    queue = [r for r in runs if r["label"] == "queue"]
    if queue:
        w = queue[0]["window"]
        out.append(f"Queue run: `fallbacks: [queue, reject]`, queue.max_wait_ms "
                   f"{s['ACC_QUEUE_WAIT_MS']}, max_depth {s['ACC_QUEUE_DEPTH']}, "
                   f"{s['ACC_QUEUE_CONNECTIONS']} wrk connections per Envoy; in the window "
                   f"{w['queued']:,} requests were queued, {w['queue_resumed']:,} released once "
                   f"paid, {w['queue_refused']:,} refused when due.")
        out.append("")
    whole = runs[0]["whole"]
    out.append(f"Whole grants-on run including the initial burst: admitted {whole['admitted']:,} "
               f"against burst + rate × {s['ACC_DURATION']} s = {whole['limit']:,.0f} "
               f"({whole['error_pct']:+.2f}%; wrk's start-up makes this figure a little low).")
    return "\n".join(out)


def main() -> int:
    try:
        machine = machine_description()
        runs = [one_run("grants-on", "on", False)]
        show(runs[0])
        runs.append(one_run("grants-off", "off", False))
        show(runs[1])
        runs.append(one_run("restart", "on", True))
        show(runs[2])
        if setting("ACC_QUEUE"):
            runs.append(one_run("queue", "on", False, queue=True))
            show(runs[3])
        RESULTS.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps({"settings": {k: setting(k) for k in SETTINGS},
                                   "machine": machine, "git": git_state(),
                                   "wasm_fingerprint": wasm_fingerprint(), "runs": runs},
                                  indent=1) + "\n")
        DOC.write_text(replace_between(DOC.read_text(), "accuracy", doc_section(runs, machine)))
    except BenchError as e:
        print(f"bench-accuracy: {e}", file=sys.stderr)
        return 1
    w = runs[0]["window"]
    print(f"accuracy error_pct={w['error_pct']:.3f} rpcs_per_1000={w['rpcs_per_1000']:.3f}",
          flush=True)
    return cluster_part(machine)


def queue_only() -> int:
    """`python3 bench/accuracy.py queue`: the queue run alone, into accuracy_queue.json."""
    try:
        r = one_run("queue", "on", False, queue=True)
        show(r)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "accuracy_queue.json").write_text(json.dumps(
            {"settings": {k: setting(k) for k in SETTINGS}, "machine": machine_description(),
             "git": git_state(), "run": r}, indent=1) + "\n")
    except BenchError as e:
        print(f"bench-accuracy (queue): {e}", file=sys.stderr)
        return 1
    w = r["window"]
    print(f"accuracy_queue error_pct={w['error_pct']:.3f} queued={w['queued']}", flush=True)
    return 0


def cluster_part(machine: dict) -> int:
    """The Redis Cluster fleet run (bench/accuracy_cluster.py), unless ACC_CLUSTER=0."""
    try:
        r = accuracy_cluster.run()
        if r is None:
            return 0
        (RESULTS / "accuracy_cluster.json").write_text(json.dumps(r, indent=1) + "\n")
        accuracy_cluster.write_latest(r)
        doc = accuracy_cluster.DOC
        doc.write_text(replace_between(doc.read_text(), "accuracy_cluster",
                                       accuracy_cluster.doc_section(r, machine, git_state())))
    except BenchError as e:
        print(f"bench-accuracy (cluster): {e}", file=sys.stderr)
        return 1
    w = r["steady"]["window"]
    print(f"accuracy_cluster error_pct={w['error_pct']:.3f} "
          f"rpcs_per_1000={w['rpcs_per_1000']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(queue_only() if sys.argv[1:] == ["queue"] else main())
