#!/usr/bin/env python3
"""`make bench` AI run (also `make bench-ai`): token budgets (docs/ai.md), counted.

  accuracy     AI_CONCURRENCY clients send AI_REQUESTS chat completions at once against one
               model token bucket of AI_LIMIT tokens (per hour, all of it as burst: the
               refill during the run is negligible). Each reserves AI_RESERVE tokens
               (`max_tokens`) and uses all of them plus the prompt the upstream counts, so
               each goes over its reservation a little: the case the bound is about.
               admitted_pct = tokens the upstream reports for the admitted requests / limit;
               bound_pct = (limit + laneguard.tokens.over_reservation) / limit: the
               documented bound (limit plus what admitted requests used beyond their
               reservations), which admitted_pct must never pass.
  settlement   AI_SETTLE_REQUESTS requests, AI_CONCURRENCY at a time, on a bucket with room,
               each using about half of what it reserved (a refund each). charged_tokens =
               reserved - refunded + extra charges (the filter's laneguard.tokens.* stats),
               against used_tokens, the sum of the usage the upstream reported: settlement
               is exact when they are equal. RPCs are Envoy's
               cluster.laneguard_rls.upstream_rq_total over the run, per 1,000 requests:
               total, and beyond the one admission call each AI request makes (settlement:
               refunds and extra-charge reports ride on the sync tick, so this should stay
               near zero per request).

Writes bench/results/ai.json, and an `ai` row in bench/results/latest.json (the same keys as
the other rows, timing ones null, plus ai_* fields). The last line printed is, exactly:
  ai admitted_pct=<f> bound_pct=<f> charged_tokens=<n> used_tokens=<n> rpcs_per_1000=<f> settle_rpcs_per_1000=<f>
Only counts: nothing here is a timing figure, so a busy machine does not spoil it.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    LANEGUARD_WASM, RESULTS, BenchError, Envoy, env_int, envoy_config,
    git_state, log, machine_description, policy_json, require, start_service,
    start_upstream, wasm_filter, wasm_fingerprint,
)

SETTINGS = {
    "AI_REQUESTS": (200, "accuracy run: requests sent at once"),
    "AI_CONCURRENCY": (50, "client threads"),
    "AI_LIMIT": (10000, "accuracy run: the model's token bucket, tokens"),
    "AI_RESERVE": (100, "max_tokens of each request (its reservation)"),
    "AI_SETTLE_REQUESTS": (1000, "settlement run: requests"),
}
OUT = RESULTS / "ai.json"
LATEST = RESULTS / "latest.json"
PATH = "/v1/chat/completions"


def setting(name: str) -> int:
    return env_int(name, SETTINGS[name][0])


def policy(limit: int) -> str:
    big = {"per_second": 1000000, "burst": 1000000}
    return policy_json(
        big,
        extra={
            "service": {"sync_interval_s": 1},
            "models": {
                "header": "x-model",
                "unknown": "refuse",  # every request names `large` (docs/policy.md)
                "list": [{
                    "name": "large",
                    "capacity": big,
                    "allocation": {"share": 1.0, "burst": 1000000},
                    "tokens": {"capacity": {"per_hour": limit, "burst": limit}},
                }],
            },
            "tokens": {"path_prefixes": [PATH]},
        },
    )


def config(limit: int, upstream, svc) -> str:
    filt = wasm_filter(LANEGUARD_WASM, "laneguard", policy(limit))
    # The filter reads a held request's body only with this knob (docs/ai.md).
    filt = filt.replace("      root_id: laneguard\n",
                        "      root_id: laneguard\n      allow_on_headers_stop_iteration: true\n", 1)
    if "allow_on_headers_stop_iteration" not in filt:
        raise BenchError("bench/envoy/wasm.yaml changed: cannot add allow_on_headers_stop_iteration")
    return envoy_config(filt, upstream_port=upstream.port, rls_port=svc.port)


def ask(port: int, reserve: int, completion: int) -> tuple[int, int]:
    """One chat completion; (status, total tokens the upstream reports)."""
    body = json.dumps({"model": "large", "max_tokens": reserve,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{PATH}", data=body, method="POST",
        headers={"content-type": "application/json", "x-laneguard-tenant": "acme",
                 "x-laneguard-principal": "bench", "x-demo-completion-tokens": str(completion)})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            data = json.loads(r.read())
            return r.status, int(data.get("usage", {}).get("total_tokens", 0))
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, 0
    except OSError:
        return 0, 0


def stack(name: str, limit: int):
    logdir = RESULTS / "logs" / f"ai-{name}"
    upstream = start_upstream(logdir, None)
    svc = start_service(logdir, None)
    envoy = Envoy(f"envoy-ai-{name}", config(limit, upstream, svc), logdir).start()
    return logdir, [envoy, svc, upstream]


def stat(envoy: Envoy, name: str) -> int:
    return sum(envoy.stats(f"^{name}$").values())


def run_accuracy() -> dict:
    n, conc, limit, reserve = (setting(k) for k in
                               ("AI_REQUESTS", "AI_CONCURRENCY", "AI_LIMIT", "AI_RESERVE"))
    _, procs = stack("accuracy", limit)
    envoy = procs[0]
    try:
        port = envoy.listener_port()
        with ThreadPoolExecutor(conc) as pool:
            results = list(pool.map(lambda _: ask(port, reserve, reserve), range(n)))
        admitted = [t for s, t in results if s == 200]
        refused = sum(1 for s, _ in results if s == 429)
        other = n - len(admitted) - refused
        deadline = time.monotonic() + 10
        while stat(envoy, "wasmcustom.laneguard.tokens.in_flight_reserved") and time.monotonic() < deadline:
            time.sleep(0.1)
        over = stat(envoy, "wasmcustom.laneguard.tokens.over_reservation")
    finally:
        for p in procs:
            p.stop()
    used = sum(admitted)
    out = {"requests": n, "concurrency": conc, "limit": limit, "reserve": reserve,
           "admitted": len(admitted), "refused": refused, "other": other,
           "admitted_tokens": used, "over_reservation": over,
           "admitted_pct": 100.0 * used / limit, "bound_pct": 100.0 * (limit + over) / limit}
    if other:
        raise BenchError(f"accuracy run: {other} requests neither 200 nor 429: {out}")
    return out


def run_settlement() -> dict:
    n, conc, reserve = setting("AI_SETTLE_REQUESTS"), setting("AI_CONCURRENCY"), setting("AI_RESERVE")
    _, procs = stack("settlement", 100 * n * reserve)
    envoy = procs[0]
    try:
        port = envoy.listener_port()
        rq = "cluster.laneguard_rls.upstream_rq_total"
        before = stat(envoy, rq)
        with ThreadPoolExecutor(conc) as pool:
            results = list(pool.map(lambda _: ask(port, reserve, reserve // 2), range(n)))
        ok = sum(1 for s, _ in results if s == 200)
        used = sum(t for s, t in results if s == 200)
        deadline = time.monotonic() + 10
        while stat(envoy, "wasmcustom.laneguard.tokens.in_flight_reserved") and time.monotonic() < deadline:
            time.sleep(0.1)
        # Let the last refunds go out with the next sync tick (1 s) before counting.
        time.sleep(2.5)
        rpcs = stat(envoy, rq) - before
        refunds = stat(envoy, "wasmcustom.laneguard.tokens.settled.refund")
        t = "wasmcustom.laneguard.tokens."
        charged = (stat(envoy, t + "reserved") - stat(envoy, t + "refunded")
                   + stat(envoy, t + "over_reservation"))
        at_reservation = sum(stat(envoy, t + "settled." + k)
                             for k in ("missing", "invalid", "too_large", "disconnected"))
    finally:
        for p in procs:
            p.stop()
    if ok != n:
        raise BenchError(f"settlement run: only {ok} of {n} admitted")
    return {"requests": n, "settled_refund": refunds, "settled_at_reservation": at_reservation,
            "charged_tokens": charged, "used_tokens": used,
            "charged_minus_used": charged - used, "rpcs": rpcs,
            "rpcs_per_1000": 1000.0 * rpcs / n,
            "settle_rpcs_per_1000": 1000.0 * max(0, rpcs - n) / n}


def write_latest(acc: dict, settle: dict) -> None:
    """Add (or replace) the `ai` row of latest.json; the other rows are bench/run.py's."""
    rows = []
    if LATEST.exists():
        try:
            rows = [r for r in json.loads(LATEST.read_text()) if r.get("name") != "ai"]
        except (json.JSONDecodeError, AttributeError, TypeError):
            rows = []
    rows.append({
        "name": "ai", "rps": None, "p50_us": None, "p99_us": None, "p999_us": None,
        "rpcs_per_1000": settle["rpcs_per_1000"],
        "ai_admitted_pct": acc["admitted_pct"], "ai_bound_pct": acc["bound_pct"],
        "ai_over_reservation": acc["over_reservation"],
        "ai_charged_tokens": settle["charged_tokens"], "ai_used_tokens": settle["used_tokens"],
        "ai_settle_rpcs_per_1000": settle["settle_rpcs_per_1000"],
    })
    LATEST.write_text(json.dumps(rows, indent=2) + "\n")


def main() -> int:
    require(LANEGUARD_WASM, "make bench-build")
    try:
        acc = run_accuracy()
        log(f"accuracy: {acc}")
        settle = run_settlement()
        log(f"settlement: {settle}")
    except BenchError as e:
        print(f"bench ai: {e}", file=sys.stderr)
        return 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "settings": {k: setting(k) for k in SETTINGS},
        "machine": machine_description(), "git": git_state(),
        "wasm_fingerprint": wasm_fingerprint(),
        "accuracy": acc, "settlement": settle}, indent=1) + "\n")
    write_latest(acc, settle)
    print(f"ai admitted_pct={acc['admitted_pct']:.2f} bound_pct={acc['bound_pct']:.2f} "
          f"charged_tokens={settle['charged_tokens']} used_tokens={settle['used_tokens']} "
          f"rpcs_per_1000={settle['rpcs_per_1000']:.1f} "
          f"settle_rpcs_per_1000={settle['settle_rpcs_per_1000']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
