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
               near zero per request). The run's sync ticks (duration / sync_interval_s, one
               worker) are printed beside them: settlement adds no RPC per request when the
               settlement calls are at most one per tick, whatever the request count.
  inspection   the cost of body inspection per request: one Envoy (one worker), one service
               (`--grants off`, so that every request is one central call and the only
               difference between variants is the filter's work on the bodies), six variants
               of the same chat completion (an AI_INSPECT_PROMPT_BYTES prompt, AI_RESERVE
               completion tokens, `max_tokens` = prompt + completion so that every AI
               request settles exactly, no refund):
                 plain_json / plain_sse    /plain/v1/chat/completions, rewritten by the route
                                           to the same upstream path: not a tokens path, so
                                           the filter reads no body (the control);
                 ai_hdr_json / ai_hdr_sse  the tokens path, usage in the response header
                                           `tokens.usage_header`: the request body is read,
                                           the response body is not;
                 ai_json / ai_sse          the tokens path, usage in the JSON body or the
                                           final SSE chunk: both bodies are read.
               Closed loop, one keep-alive connection, AI_INSPECT_REQUESTS requests per
               variant per round, AI_INSPECT_ROUNDS rounds, the variants interleaved (the
               order rotates each round; a 3 ms pause on each side of a round, so that
               Envoy's work after a response has left is counted in its own variant). Per
               round and variant: Envoy's CPU per request (the sum of its threads'
               /proc/PID/task/*/schedstat run time, in ns) and the median wall latency.
               Each figure is a difference of medians over rounds (`*_cpu_us`,
               `*_wall_us`); beside them the difference of means over all rounds, from
               schedstat (`*_cpu_mean_us`) and from utime+stime of /proc/PID/stat
               (`*_stat_cpu_us`, 10 ms ticks: only a sum over many rounds resolves it):
                 request      = ai_hdr_json - plain_json (max_tokens/model parse, with the
                                hold for the body and the token buckets' reservation and
                                settlement bookkeeping)
                 response_json = ai_json - ai_hdr_json (the usage parse of a JSON body)
                 response_sse  = ai_sse - ai_hdr_sse (the usage scan of an SSE stream)
               A timing figure, unlike the rest: on a loaded machine prefer the CPU one.

Writes bench/results/ai.json, and an `ai` row in bench/results/latest.json (the same keys as
the other rows, timing ones null, plus ai_* fields). The last line printed is, exactly:
  ai admitted_pct=<f> bound_pct=<f> charged_tokens=<n> used_tokens=<n> rpcs_per_1000=<f> settle_rpcs_per_1000=<f> inspect_request_cpu_us=<f> inspect_response_json_cpu_us=<f> inspect_response_sse_cpu_us=<f>
The accuracy and settlement runs are counts, so a busy machine does not spoil them; the
inspection run is the one timing figure (CPU time first). AI_SKIP_INSPECTION=1 skips it;
`python3 bench/ai.py inspection` runs it alone and only prints it.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    LANEGUARD_WASM, RESULTS, BenchError, Envoy, cpu_seconds, env_int, envoy_config,
    git_state, log, machine_description, median, policy_json, require, service_flags,
    start_service, start_upstream, wasm_filter, wasm_fingerprint,
)

SETTINGS = {
    "AI_REQUESTS": (200, "accuracy run: requests sent at once"),
    "AI_CONCURRENCY": (50, "client threads"),
    "AI_LIMIT": (10000, "accuracy run: the model's token bucket, tokens"),
    "AI_RESERVE": (100, "max_tokens of each request (its reservation)"),
    "AI_SETTLE_REQUESTS": (1000, "settlement run: requests"),
    "AI_INSPECT_REQUESTS": (25, "inspection run: requests per variant and round"),
    "AI_INSPECT_ROUNDS": (60, "inspection run: interleaved rounds"),
    "AI_INSPECT_PROMPT_BYTES": (1024, "inspection run: the prompt's length in bytes"),
}
SYNC_INTERVAL_S = 1
OUT = RESULTS / "ai.json"
LATEST = RESULTS / "latest.json"
PATH = "/v1/chat/completions"
# The inspection run's control: a path that is not a tokens path, which the route rewrites
# to PATH, so that the upstream answers it exactly as it answers PATH.
PLAIN_PREFIX = "/plain"
USAGE_HEADER = "x-upstream-total-tokens"  # the demo model server's (bench/upstream)


def setting(name: str) -> int:
    return env_int(name, SETTINGS[name][0])


def policy(limit: int, usage_header: bool = False) -> str:
    big = {"per_second": 1000000, "burst": 1000000}
    tokens = {"path_prefixes": [PATH]}
    if usage_header:
        tokens["usage_header"] = USAGE_HEADER
    return policy_json(
        big,
        extra={
            "service": {"sync_interval_s": SYNC_INTERVAL_S},
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
            "tokens": tokens,
        },
    )


def config(limit: int, upstream, svc, usage_header: bool = False) -> str:
    filt = wasm_filter(LANEGUARD_WASM, "laneguard", policy(limit, usage_header))
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


def plain_route(cfg: str) -> str:
    """Add the control route: PLAIN_PREFIX + PATH, rewritten to PATH, same upstream."""
    catch_all = "              - match: { prefix: / }\n"
    if catch_all not in cfg:
        raise BenchError("bench/envoy/base.yaml changed: cannot add the /plain route")
    plain = (f"              - match: {{ prefix: {PLAIN_PREFIX}/ }}\n"
             "                route: { cluster: upstream, prefix_rewrite: / }\n")
    return cfg.replace(catch_all, plain + catch_all, 1)


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
        t0 = time.monotonic()
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
        duration = time.monotonic() - t0
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
            "settle_rpcs_per_1000": 1000.0 * max(0, rpcs - n) / n,
            # The calls beyond admission against the sync ticks of the run (one worker):
            # at most one a tick is "no RPC per request", whatever the request count.
            "settle_rpcs": max(0, rpcs - n), "duration_s": duration,
            "sync_ticks": duration / SYNC_INTERVAL_S}


PAUSE_S = 0.003


def iqr(xs: list[float]) -> list[float]:
    """The 25th and 75th percentiles: how much the rounds spread."""
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


VARIANTS = ("plain_json", "ai_hdr_json", "ai_json", "plain_sse", "ai_hdr_sse", "ai_sse")


def envoy_cpu_ns(envoy: Envoy) -> tuple[int, float]:
    """Envoy's CPU time: (the sum of its threads' schedstat run time in ns, utime+stime of
    /proc/PID/stat in seconds, 10 ms ticks). Threads that ended are lost by the first, so
    it is read around runs that start and end no thread."""
    ns = 0
    for pid in envoy.pids():
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                    ns += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return ns, cpu_seconds(envoy.pids())


class Caller:
    """One keep-alive connection to Envoy's listener, one request at a time."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def send(self, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                self.conn.request("POST", path, body=body, headers=headers)
                r = self.conn.getresponse()
                return r.status, r.read()
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if attempt:
                    raise
        raise BenchError("unreachable")


def inspection_request(variant: str, prompt_bytes: int, completion: int) -> tuple[str, bytes, dict]:
    """(path, body, headers) of one variant's request. The prompt is ceil(bytes / 4) tokens
    to the demo model server; max_tokens is prompt + completion, so usage = reservation."""
    prompt_tokens = max(1, -(-prompt_bytes // 4))
    body = {"model": "large", "max_tokens": prompt_tokens + completion,
            "messages": [{"role": "user", "content": "x" * prompt_bytes}]}
    if variant.endswith("_sse"):
        body["stream"] = True
    headers = {"content-type": "application/json", "x-laneguard-tenant": "acme",
               "x-laneguard-principal": "bench", "x-model": "large",
               "x-demo-completion-tokens": str(completion)}
    if variant.startswith("ai_hdr"):
        headers["x-demo-usage"] = "header"
    path = PLAIN_PREFIX + PATH if variant.startswith("plain") else PATH
    return path, json.dumps(body).encode(), headers


def run_inspection() -> dict:
    n, rounds = setting("AI_INSPECT_REQUESTS"), setting("AI_INSPECT_ROUNDS")
    prompt_bytes, completion = setting("AI_INSPECT_PROMPT_BYTES"), setting("AI_RESERVE")
    logdir = RESULTS / "logs" / "ai-inspection"
    # --grants off: every request (AI or not) is one central call, so the control pays the
    # same RPC as the AI request and only the filter's body work differs.
    grants = ["--grants", "off"] if "--grants" in service_flags() else []
    if not grants:
        raise BenchError("inspection run: this laneguard-service has no --grants flag")
    upstream = start_upstream(logdir, None)
    svc = start_service(logdir, None, grants)
    procs = [upstream, svc]
    try:
        total = rounds * n * len(VARIANTS) * (prompt_bytes + 2 * completion) * 10
        cfg = plain_route(config(total, upstream, svc, usage_header=True))
        envoy = Envoy("envoy-ai-inspection", cfg, logdir).start()
        procs.insert(0, envoy)
        caller = Caller(envoy.listener_port())
        reqs = {v: inspection_request(v, prompt_bytes, completion) for v in VARIANTS}
        rq = "cluster.laneguard_rls.upstream_rq_total"
        t = "wasmcustom.laneguard.tokens."

        def batch(v: str, count: int) -> tuple[list[float], int]:
            path, body, headers = reqs[v]
            lat, size = [], 0
            for _ in range(count):
                t0 = time.perf_counter()
                status, data = caller.send(path, body, headers)
                lat.append((time.perf_counter() - t0) * 1e6)
                if status != 200:
                    raise BenchError(f"inspection run: {v}: status {status}: {data[:200]!r}")
                size = len(data)
            return lat, size

        for v in VARIANTS:  # warm-up: connections, the VM, the service's buckets
            batch(v, max(20, n // 10))
        per: dict = {v: {"cpu_us": [], "cpu_ns": 0, "stat_cpu_s": 0.0, "wall_p50_us": [],
                         "rpcs": 0, "response_bytes": 0} for v in VARIANTS}
        exact0 = stat(envoy, t + "settled.exact")
        for r in range(rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
            for v in order:
                rpc0 = stat(envoy, rq)
                # A pause on each side, so that what Envoy does after a response has left
                # (the stream's end, the log) is counted in its own variant's window.
                time.sleep(PAUSE_S)
                ns0, s0 = envoy_cpu_ns(envoy)
                lat, size = batch(v, n)
                time.sleep(PAUSE_S)
                ns1, s1 = envoy_cpu_ns(envoy)
                per[v]["rpcs"] += stat(envoy, rq) - rpc0
                per[v]["cpu_us"].append((ns1 - ns0) / 1000.0 / n)
                per[v]["stat_cpu_s"] += s1 - s0
                per[v]["cpu_ns"] += ns1 - ns0
                per[v]["wall_p50_us"].append(median(lat))
                per[v]["response_bytes"] = size
            if (r + 1) % 10 == 0 or r + 1 == rounds:
                log(f"inspection round {r + 1}/{rounds}: " + ", ".join(
                    f"{v} {median(per[v]['cpu_us']):.0f}" for v in VARIANTS)
                    + " us CPU/request (medians so far)")
        deadline = time.monotonic() + 10
        while stat(envoy, t + "in_flight_reserved") and time.monotonic() < deadline:
            time.sleep(0.1)
        exact = stat(envoy, t + "settled.exact") - exact0
        not_exact = sum(stat(envoy, t + "settled." + k) for k in
                        ("refund", "extra", "missing", "invalid", "too_large", "disconnected"))
    finally:
        for p in procs:
            p.stop()
    ai_sent = rounds * n * sum(1 for v in VARIANTS if v.startswith("ai"))
    if exact != ai_sent or not_exact:
        raise BenchError(f"inspection run: {exact} of {ai_sent} AI requests settled exactly, "
                         f"{not_exact} otherwise: the variants did not do what they say")
    variants = {}
    for v in VARIANTS:
        d = per[v]
        variants[v] = {"cpu_us": median(d["cpu_us"]), "cpu_us_iqr": iqr(d["cpu_us"]),
                       # Means over every round (a 10 ms tick is too coarse for one):
                       "cpu_mean_us": d["cpu_ns"] / 1000.0 / (rounds * n),
                       "stat_cpu_us": d["stat_cpu_s"] * 1e6 / (rounds * n),
                       "wall_p50_us": median(d["wall_p50_us"]),
                       "rpcs_per_request": d["rpcs"] / (rounds * n),
                       "response_bytes": d["response_bytes"],
                       "rounds_cpu_us": d["cpu_us"], "rounds_wall_p50_us": d["wall_p50_us"]}

    def diff(a: str, b: str, k: str) -> float:
        return variants[a][k] - variants[b][k]

    out = {"requests_per_round": n, "rounds": rounds, "prompt_bytes": prompt_bytes,
           "completion_tokens": completion,
           "request_body_bytes": len(reqs["ai_json"][1]), "variants": variants}
    for name, a, b in (("request", "ai_hdr_json", "plain_json"),
                       ("request_sse", "ai_hdr_sse", "plain_sse"),
                       ("response_json", "ai_json", "ai_hdr_json"),
                       ("response_sse", "ai_sse", "ai_hdr_sse")):
        out[f"{name}_cpu_us"] = diff(a, b, "cpu_us")
        out[f"{name}_cpu_mean_us"] = diff(a, b, "cpu_mean_us")
        out[f"{name}_stat_cpu_us"] = diff(a, b, "stat_cpu_us")
        out[f"{name}_wall_us"] = diff(a, b, "wall_p50_us")
    return out


INSPECT_FIGURES = tuple(f"{part}_{unit}" for part in ("request", "response_json", "response_sse")
                        for unit in ("cpu_us", "cpu_mean_us", "stat_cpu_us", "wall_us"))


def write_latest(acc: dict, settle: dict, insp: dict | None) -> None:
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
        "ai_settle_rpcs": settle["settle_rpcs"], "ai_sync_ticks": settle["sync_ticks"],
        **{f"ai_inspect_{k}": (insp or {}).get(k) for k in INSPECT_FIGURES},
    })
    LATEST.write_text(json.dumps(rows, indent=2) + "\n")


def main() -> int:
    require(LANEGUARD_WASM, "make bench-build")
    if sys.argv[1:] == ["inspection"]:  # the inspection run alone, printed, nothing written
        try:
            print(json.dumps(run_inspection(), indent=1))
        except BenchError as e:
            print(f"bench ai: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        acc = run_accuracy()
        log(f"accuracy: {acc}")
        settle = run_settlement()
        log(f"settlement: {settle}")
        insp = None
        if os.environ.get("AI_SKIP_INSPECTION") != "1":
            insp = run_inspection()
            log("inspection: " + ", ".join(f"{k}={insp[k]:.1f}" for k in INSPECT_FIGURES))
    except BenchError as e:
        print(f"bench ai: {e}", file=sys.stderr)
        return 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "settings": {k: setting(k) for k in SETTINGS},
        "machine": machine_description(), "git": git_state(),
        "wasm_fingerprint": wasm_fingerprint(),
        "accuracy": acc, "settlement": settle, "inspection": insp}, indent=1) + "\n")
    write_latest(acc, settle, insp)
    print(f"ai admitted_pct={acc['admitted_pct']:.2f} bound_pct={acc['bound_pct']:.2f} "
          f"charged_tokens={settle['charged_tokens']} used_tokens={settle['used_tokens']} "
          f"rpcs_per_1000={settle['rpcs_per_1000']:.1f} "
          f"settle_rpcs_per_1000={settle['settle_rpcs_per_1000']:.1f}"
          + "".join(f" inspect_{k}={insp[k]:.1f}" for k in
                    ("request_cpu_us", "response_json_cpu_us", "response_sse_cpu_us") if insp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
