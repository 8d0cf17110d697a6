#!/usr/bin/env python3
"""`make bench`: laneguard side by side with Envoy's native filters, on one machine, in one run.

Parts (all by default; BENCH_ONLY=main,tenants,service,micro picks some):

  main     seven Envoy configurations, same Envoy binary, same upstream, same listener:
           router, local_ratelimit, wasm_noop, native_global, laneguard, laneguard_binding,
           laneguard_shadow (laneguard_binding's service keeps an audit log: the run reports
           the 429s' records kept, issue 14 item 4). Rounds are interleaved (every configuration once per round, in
           a rotated order) and the median over rounds is reported.
  tenants  laneguard with 10 / 1,000 / 100,000 (and, over the bucket cap, 200,000) distinct
           active tenants: p99, Envoy memory, bytes per live bucket; then a churn of fresh
           tenants that shows the bucket table is capped and evicts idle buckets.
  service  laneguard-service alone, driven by bench/rls-load: decisions/s, memory and Redis.
  micro    the core engine's criterion benches (filter/core/benches/decision.rs).

Outputs: bench/results/latest.json (the stable per-configuration contract), bench/results/
full.json (everything, merged with the previous run for parts not re-run), the SVG plots
in docs/benchmarks/, the generated sections of docs/benchmarks.md and the README's table.

Envoy runs with one worker pinned to CPU 0; the load generator, the upstream and the
rate-limit service share CPU 1 (BENCH_PIN=0 turns pinning off). Settings: see SETTINGS.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import svgplot  # noqa: E402
import os  # noqa: E402
from benchlib import (  # noqa: E402
    BENCH, LANEGUARD_WASM, NOOP_WASM, RELEASE, RESULTS, ROOT, BenchError, Binary, Envoy,
    children_cpu_seconds, env_float, env_int, envoy_config, filter_snippet, free_port,
    git_state, log, machine_busy_seconds, machine_description, median, policy_json,
    replace_between, require, service_flags, start_service, start_upstream, wasm_filter,
    wasm_fingerprint, wrk,
)

CONFIGS = ["router", "local_ratelimit", "wasm_noop", "native_global", "laneguard",
           "laneguard_binding", "laneguard_shadow"]
# Measured in the same rounds, reported in docs/benchmarks.md, not in latest.json: the no-op
# filter making the host calls laneguard makes per request on its lease-hit path, and
# nothing else (one read of the request header map, one clock read, the access log's caller
# fields set as filter state, the granted-class request header and the two RateLimit
# response headers; counters are batched per tick). The list is pinned by
# `request::tests::a_lease_hit_makes_only_these_host_calls` in filter/wasm.
EXTRA_CONFIGS = ["wasm_hostcalls"]
HOSTCALLS = "headers=1,time=1,filter_state=1,set_request=1,set_response=2"

SETTINGS = {
    "BENCH_ROUNDS": (env_int, 3, "rounds of the main comparison (median reported)"),
    "BENCH_DURATION": (env_float, 10.0, "seconds of measured load per configuration and round"),
    "BENCH_WARMUP": (env_float, 2.0, "seconds of unmeasured load before each measurement"),
    "BENCH_CONNECTIONS": (env_int, 32, "wrk connections (one wrk thread)"),
    "BENCH_BINDING_RPS": (env_int, 2000, "laneguard_binding: the tenant's limit, per second"),
    "BENCH_PIN": (env_int, 1, "1: Envoy on CPU 0, everything else on CPU 1"),
    "BENCH_TENANTS": (None, "10,1000,100000,200000", "tenant counts for the tenants part"),
    "BENCH_TENANT_DURATION": (env_float, 10.0, "minimum seconds per tenant count"),
    "BENCH_TENANT_MAX_DURATION": (env_float, 40.0, "maximum seconds per tenant count"),
    "BENCH_CHURN_DURATION": (env_float, 30.0, "seconds of fresh tenants in the churn run"),
    "BENCH_SERVICE_DURATION": (env_float, 5.0, "seconds per service-alone measurement"),
    "BENCH_SERVICE_ROUNDS": (env_int, 3, "rounds per service-alone measurement"),
    "BENCH_CRITERION_TIME": (env_float, 3.0, "criterion measurement time per bench, seconds"),
    "BENCH_POLICY_EXTRA": (None, "", "JSON merged into every laneguard bench policy"),
    "BENCH_CONFIGS": (None, "", "main part: only these configurations (router is always run)"),
}


def setting(name: str):
    parse, default, _ = SETTINGS[name]
    if parse is None:
        return os.environ.get(name) or default
    return parse(name, default)


LOGS = RESULTS / "logs"
FULL = RESULTS / "full.json"
LATEST = RESULTS / "latest.json"
PLOTS = ROOT / "docs" / "benchmarks"
DOC = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"

IDENTITY = {"x-laneguard-tenant": "bench-tenant", "x-laneguard-principal": "bench"}
# Far above anything one Envoy worker can serve: never binding.
UNBOUNDED = {"per_second": 1_000_000_000, "burst": 1_000_000_000}


def policy_extra() -> dict:
    raw = setting("BENCH_POLICY_EXTRA")
    if not raw:
        return {}
    try:
        extra = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BenchError(f"BENCH_POLICY_EXTRA is not JSON: {e}") from e
    if not isinstance(extra, dict):
        raise BenchError("BENCH_POLICY_EXTRA must be a JSON object")
    return extra


def cpus(which: int) -> str | None:
    return str(which) if setting("BENCH_PIN") else None


def grants_flag() -> list[str]:
    """`--grants on` if this build of the service has the switch, else nothing."""
    return ["--grants", "on"] if "--grants" in service_flags() else []


def shadow_supported() -> bool:
    doc = (ROOT / "docs" / "policy.md").read_text()
    return "mode: shadow" in doc


# --- one configuration ---------------------------------------------------------------------


def config_for(name: str, upstream: Binary, svc: Binary | None) -> str:
    rls_port = svc.port if svc else upstream.port  # unused by configurations without a service
    rate_limits = ""
    if name == "router":
        filters = ""
    elif name == "local_ratelimit":
        filters = filter_snippet("local_ratelimit")
    elif name == "wasm_noop":
        require(NOOP_WASM, "make build (or cargo build --release --target wasm32-wasip1 -p laneguard-bench-noop)")
        filters = wasm_filter(NOOP_WASM, "noop", "{}")
    elif name == "wasm_hostcalls":
        filters = wasm_filter(NOOP_WASM, "noop", HOSTCALLS)
    elif name == "native_global":
        filters = filter_snippet("native_global")
        rate_limits = filter_snippet("native_global.rate_limits")
    else:
        require(LANEGUARD_WASM, "make build-wasm")
        extra = policy_extra()
        if name == "laneguard":
            policy = policy_json(UNBOUNDED, extra=extra)
        else:
            n = setting("BENCH_BINDING_RPS")
            if name == "laneguard_shadow":
                extra = {**extra, "rollout": {"mode": "shadow"}}
            policy = policy_json({"per_second": n, "burst": n}, extra=extra)
        filters = wasm_filter(LANEGUARD_WASM, "laneguard", policy)
    return envoy_config(filters, upstream_port=upstream.port, rls_port=rls_port,
                        rate_limits=rate_limits)


def service_args(name: str, grants: list[str]) -> list[str] | None:
    if name == "native_global":
        return ["--config", str(BENCH / "envoy" / "native_global.service.yaml")]
    if name.startswith("laneguard"):
        return grants
    return None


STAT_PATTERN = (r"^http\.bench\.downstream_rq_(total|2xx|4xx|5xx)$"
                r"|^cluster\.laneguard_rls\.upstream_rq_total$|^wasmcustom\.laneguard\.")


# The binding-limit run keeps an audit log, as a deployment does (issue 14 item 4): every
# 429 must be in it while the service is up, and the run reports the fraction kept.
AUDITED = "laneguard_binding"
AUDIT_FIELDS = ("audit_429s_seen", "audit_429s_kept", "audit_kept_pct", "audit_dropped")
# After the load, how long the filter may take to ship its backlog of records.
AUDIT_DRAIN_S = 5.0


def audit_429s(path: Path) -> int:
    """Records of 429s in a laneguard-service audit log (one JSON object a line)."""
    n = 0
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                if json.loads(line).get("record", {}).get("status") == 429:
                    n += 1
            except (ValueError, AttributeError):
                continue
    return n


def audit_kept(envoy: Envoy, path: Path) -> dict:
    """Wait until the records stop arriving (at most AUDIT_DRAIN_S), then count: 429s Envoy
    answered over the whole run (warm-up included, as the log is), their records in the
    log, and the filter's own drop counter."""
    deadline = time.monotonic() + AUDIT_DRAIN_S
    kept, seen = -1, 0
    while time.monotonic() < deadline:
        seen = envoy.stats(r"^http\.bench\.downstream_rq_4xx$").get(
            "http.bench.downstream_rq_4xx", 0)
        now = audit_429s(path)
        if now == kept and now >= seen:
            break
        kept = now
        time.sleep(0.5)
    kept = audit_429s(path)
    counters = envoy.stats(r"^wasmcustom\.laneguard\.audit\.")
    return {
        "audit_429s_seen": seen,
        "audit_429s_kept": kept,
        "audit_kept_pct": 100.0 * kept / seen if seen else None,
        "audit_dropped": counters.get("wasmcustom.laneguard.audit.dropped", 0),
        "audit_ship_errors": counters.get("wasmcustom.laneguard.audit.ship_errors", 0),
    }


def measure(name: str, upstream: Binary, grants: list[str], logdir: Path, *,
            duration: float, warmup: float, connections: int) -> dict:
    """Start the configuration's service and Envoy, warm up, measure one run, stop."""
    svc = None
    envoy = None
    audit_log = logdir / f"{name}.audit.log"
    audit = {}
    try:
        args = service_args(name, grants)
        if args is not None and name == AUDITED:
            # A fresh log per run: the log and its checkpoint (`.head`, which the service
            # checks the log against at start) and any rotated files.
            for f in logdir.glob(f"{audit_log.name}*"):
                f.unlink(missing_ok=True)
            args = args + ["--audit-log", str(audit_log)]
        if args is not None:
            svc = start_service(logdir, cpus(1), args, name=f"{name}.service")
        envoy = Envoy(name, config_for(name, upstream, svc), logdir, 1, cpus(0))
        envoy.start()
        url = f"http://127.0.0.1:{envoy.listener_port()}/orders/1"
        if warmup > 0:
            wrk(url, duration=warmup, connections=connections, headers=IDENTITY, cpus=cpus(1))
        s0, c0, sc0 = envoy.stats(STAT_PATTERN), envoy.cpu(), svc.cpu() if svc else 0.0
        rss0, mem0 = envoy.rss(), envoy.memory()
        m0, w0, u0 = machine_busy_seconds(), children_cpu_seconds(), upstream.cpu()
        r = wrk(url, duration=duration, connections=connections, headers=IDENTITY, cpus=cpus(1))
        m1, w1, u1 = machine_busy_seconds(), children_cpu_seconds(), upstream.cpu()
        s1, c1, sc1 = envoy.stats(STAT_PATTERN), envoy.cpu(), svc.cpu() if svc else 0.0
        rss1, mem1 = envoy.rss(), envoy.memory()
        # CPU the machine spent on anything but this run (other work on a shared machine):
        # the noise indicator of each run.
        ours = (c1 - c0) + (sc1 - sc0) + (u1 - u0) + (w1 - w0)
        others_cores = max(0.0, (m1 - m0) - ours) / max(r.duration_s, 1e-9)
        if name == AUDITED:
            audit = audit_kept(envoy, audit_log)
    finally:
        if envoy:
            envoy.stop()
        if svc:
            svc.stop()

    def delta(k: str) -> int:
        return s1.get(k, 0) - s0.get(k, 0)

    total = delta("http.bench.downstream_rq_total") or r.requests or 1
    rpcs = delta("cluster.laneguard_rls.upstream_rq_total")
    wasm = {k.removeprefix("wasmcustom.laneguard."): delta(k) for k in s1
            if k.startswith("wasmcustom.laneguard.") and delta(k)}
    return {
        "name": name,
        "rps": r.rps,
        "requests": r.requests,
        "p50_us": r.p50_us,
        "p99_us": r.p99_us,
        "p999_us": r.p999_us,
        "max_us": r.max_us,
        "socket_errors": r.socket_errors,
        "envoy_requests": total,
        "pct_2xx": 100.0 * delta("http.bench.downstream_rq_2xx") / total,
        "pct_429": 100.0 * delta("http.bench.downstream_rq_4xx") / total,
        "pct_5xx": 100.0 * delta("http.bench.downstream_rq_5xx") / total,
        "rpcs_per_1000": 1000.0 * rpcs / total,
        "envoy_cpu_us": (c1 - c0) * 1e6 / total,
        "envoy_cpu_util": (c1 - c0) / max(r.duration_s, 1e-9),
        "service_cpu_us": (sc1 - sc0) * 1e6 / total if svc else 0.0,
        "upstream_cpu_us": (u1 - u0) * 1e6 / total,
        "wrk_cpu_us": (w1 - w0) * 1e6 / total,
        "others_cores": others_cores,
        "rss_before": rss0,
        "rss_after": rss1,
        "alloc_before": int(mem0.get("allocated", 0)),
        "alloc_after": int(mem1.get("allocated", 0)),
        "wasm_counters": wasm,
        **audit,
    }


def buckets_gauge(envoy: Envoy, polls: int = 12) -> int | None:
    """The filter's `laneguard.buckets` gauge (its table size), if the filter has it.

    Every VM of the Envoy writes the one gauge on its own tick, the main thread's VM (with
    an empty table) included, so a single read can see another VM's value: the largest of
    a few reads over a little more than a second is the worker's table."""
    best = None
    for i in range(polls):
        v = envoy.stats(r"^wasmcustom\.laneguard\.buckets$").get("wasmcustom.laneguard.buckets")
        if v is not None:
            best = v if best is None else max(best, v)
        if i + 1 < polls:
            time.sleep(0.1)
    return best


def _wrk_sampling(url, duration, connections, script, script_args, envoy, samples):
    """Run wrk in a thread and sample Envoy's RSS every second meanwhile."""
    import threading

    box = {}

    def go():
        try:
            box["r"] = wrk(url, duration=duration, connections=connections, cpus=cpus(1),
                           script=script, script_args=script_args)
        except BenchError as e:
            box["e"] = e

    t = threading.Thread(target=go)
    start = time.monotonic()
    s0 = envoy.stats(r"^http\.bench\.downstream_rq_total$").get("http.bench.downstream_rq_total", 0)
    t.start()
    while t.is_alive():
        t.join(timeout=1.0)
        try:
            n = envoy.stats(r"^http\.bench\.downstream_rq_total$").get(
                "http.bench.downstream_rq_total", 0) - s0
            samples.append({"t": time.monotonic() - start, "requests": n, "rss": envoy.rss(),
                            "allocated": int(envoy.memory().get("allocated", 0)),
                            "buckets": buckets_gauge(envoy, polls=3)})
        except OSError:
            pass
    if "e" in box:
        raise box["e"]
    return box["r"]


# --- parts ---------------------------------------------------------------------------------


def part_main(full: dict) -> bool:
    """The main comparison. True if it was an experiment (BENCH_CONFIGS): then it wrote
    only `full["experiments"]`, and the docs must not be touched."""
    rounds = setting("BENCH_ROUNDS")
    duration, warmup = setting("BENCH_DURATION"), setting("BENCH_WARMUP")
    conns = setting("BENCH_CONNECTIONS")
    grants = grants_flag()
    configs = list(CONFIGS) + EXTRA_CONFIGS
    only = [c for c in str(setting("BENCH_CONFIGS")).split(",") if c]
    if only:
        unknown = set(only) - set(configs)
        if unknown:
            raise BenchError(f"BENCH_CONFIGS: unknown {sorted(unknown)}")
        configs = [c for c in configs if c in only or c == "router"]
    shadow = shadow_supported()
    if not shadow and "laneguard_shadow" in configs:
        configs.remove("laneguard_shadow")
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    failures: dict[str, str] = {}
    logdir = LOGS / "main"
    upstream = start_upstream(logdir, cpus(1))
    try:
        # One unrecorded run first: the first Envoy start of a session pays for cold caches.
        measure("router", upstream, grants, logdir, duration=2, warmup=0, connections=conns)
        for rnd in range(rounds):
            order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]
            for name in order:
                if name in failures:
                    continue
                try:
                    m = measure(name, upstream, grants, logdir, duration=duration,
                                warmup=warmup, connections=conns)
                except BenchError as e:
                    if name == "laneguard_shadow":
                        failures[name] = str(e).splitlines()[0]
                        log(f"laneguard_shadow not available: {failures[name]}")
                        continue
                    raise
                runs[name].append(m)
                log(f"round {rnd + 1}/{rounds} {name:18s} {m['rps']:9.0f} req/s  p99 "
                    f"{m['p99_us']:7.0f} us  envoy {m['envoy_cpu_us']:5.1f} us/req  "
                    f"rpcs/1000 {m['rpcs_per_1000']:7.1f}  429 {m['pct_429']:4.1f}%  "
                    f"other load {m['others_cores']:.2f} cores"
                    + (f"  audit kept {m['audit_429s_kept']}/{m['audit_429s_seen']} 429s "
                       f"(dropped {m['audit_dropped']})" if "audit_429s_seen" in m else ""))
    finally:
        upstream.stop()

    summary = []
    for name in CONFIGS + EXTRA_CONFIGS:
        rs = runs.get(name, [])
        if not rs:
            reason = failures.get(name) or (
                "docs/policy.md does not document `mode: shadow` yet" if name == "laneguard_shadow"
                else "not run")
            summary.append({"name": name, "rps": None, "p50_us": None, "p99_us": None,
                            "p999_us": None, "rpcs_per_1000": None, "status": "not_available",
                            "note": reason})
            continue
        row = {"name": name, "status": "ok", "rounds": len(rs)}
        for k in ("rps", "p50_us", "p99_us", "p999_us", "rpcs_per_1000", "envoy_cpu_us",
                  "service_cpu_us", "pct_429", "pct_5xx", "envoy_cpu_util", "others_cores"):
            row[k] = median([r[k] for r in rs])
        if name == AUDITED:
            # The kept fraction over all rounds (records kept / 429s seen), and the drops.
            seen = sum(r.get("audit_429s_seen", 0) for r in rs)
            kept = sum(r.get("audit_429s_kept", 0) for r in rs)
            row["audit_429s_seen"], row["audit_429s_kept"] = seen, kept
            row["audit_kept_pct"] = 100.0 * kept / seen if seen else None
            row["audit_dropped"] = sum(r.get("audit_dropped", 0) for r in rs)
        summary.append(row)
    base = next(r for r in summary if r["name"] == "router")
    for row in summary:
        if row.get("rps") is not None:
            row["rps_vs_router"] = row["rps"] / base["rps"]
            row["cpu_over_router_us"] = row["envoy_cpu_us"] - base["envoy_cpu_us"]
    if only:
        # A partial run is an experiment: keep it out of latest.json and the docs.
        label = f"{','.join(only)} {setting('BENCH_POLICY_EXTRA')}".strip()
        full.setdefault("experiments", {})[label] = {
            "summary": summary, "runs": runs, "date": full["date"], "git": full["git"],
            "wasm_fingerprint": full["wasm_fingerprint"]}
        for r in summary:
            if r.get("rps") is not None:
                log(f"experiment {label}: {r['name']:16s} {r['rps']:8.0f} req/s "
                    f"({r['rps_vs_router']:.2f}x router)  p99 {r['p99_us']:.0f} us  "
                    f"CPU over router {r['cpu_over_router_us']:+.1f} us  "
                    f"rpcs/1000 {r['rpcs_per_1000']:.1f}  429 {r['pct_429']:.1f}%"
                    + (f"  audit kept {r['audit_429s_kept']}/{r['audit_429s_seen']} 429s"
                       if "audit_429s_seen" in r else ""))
        return True
    full["main"] = {"summary": summary, "runs": runs, "grants": " ".join(grants) or "absent",
                    "settings": {"rounds": rounds, "duration_s": duration, "warmup_s": warmup,
                                 "connections": conns,
                                 "binding_rps": setting("BENCH_BINDING_RPS"),
                                 "policy_extra": setting("BENCH_POLICY_EXTRA")}}
    return False


def tenant_policy(n: int, duration: float, rps_hi: float, rps_lo: float) -> dict:
    """A ceiling under which every tenant's bucket stays live for the whole run and never
    trips. One cycle over n tenants takes n/rps seconds; the refill interval is 10 cycles at
    the slowest plausible rate (so a bucket is never full again between two hits), and the
    burst covers every hit a tenant can get at the fastest plausible rate."""
    a_lo, a_hi = rps_lo / n, rps_hi / n
    per_day = max(1, math.floor(86400 * a_lo / 10))
    burst = min(per_day, math.ceil(a_hi * duration) + 2)
    return {"per_day": per_day, "burst": burst}


def part_tenants(full: dict) -> None:
    grants = grants_flag()
    conns = setting("BENCH_CONNECTIONS")
    counts = [int(x) for x in str(setting("BENCH_TENANTS")).split(",") if x.strip()]
    main = {r["name"]: r for r in full.get("main", {}).get("summary", [])}
    router_rps = (main.get("router") or {}).get("rps") or 40000
    lg_rps = (main.get("laneguard") or {}).get("rps") or 10000
    rps_hi, rps_lo = router_rps * 1.3, 1000.0
    logdir = LOGS / "tenants"
    rows = []
    upstream = start_upstream(logdir, cpus(1))
    try:
        for n in counts:
            duration = min(max(setting("BENCH_TENANT_DURATION"), 1.5 * n / lg_rps),
                           setting("BENCH_TENANT_MAX_DURATION"))
            ceiling = tenant_policy(n, duration + 5, rps_hi, rps_lo)
            svc = start_service(logdir, cpus(1), grants, name=f"tenants{n}.service")
            try:
                cfg = envoy_config(
                    wasm_filter(LANEGUARD_WASM, "laneguard",
                                policy_json(ceiling, extra=policy_extra())),
                    upstream_port=upstream.port, rls_port=svc.port)
                m = measure_with_service(f"tenants{n}", svc, cfg, logdir, duration=duration,
                                         connections=conns, script_args=[str(n), "t"])
            finally:
                svc.stop()
            m["tenants"] = n
            m["ceiling"] = ceiling
            m["duration_s"] = duration
            m["tenants_reached"] = min(m["requests"] + m["warm_requests"], n)
            # The filter's gauge when it reads something; otherwise one bucket per tenant
            # reached (the policy keeps every one live), up to the cap.
            gauge = m["buckets_after"]
            m["buckets_source"] = "gauge" if gauge else "computed"
            m["live_buckets"] = gauge if gauge else min(m["tenants_reached"], 100_000)
            m["rss_delta"] = m["rss_after"] - m["rss_base"]
            m["vm_delta"] = m["outside_heap_after"] - m["outside_heap_base"]
            m["bytes_per_bucket"] = (m["vm_delta"] / m["live_buckets"]
                                     if m["live_buckets"] >= 10_000 else None)
            rows.append(m)
            log(f"tenants {n:>7}: {m['rps']:8.0f} req/s  p99 {m['p99_us']:8.0f} us  reached "
                f"{m['tenants_reached']}  RSS +{m['rss_delta'] / 1e6:.1f} MB  429 "
                f"{m['pct_429']:.2f}%  rpcs/1000 {m['rpcs_per_1000']:.1f}")

        # Churn: a fresh tenant on every request, with buckets that are full again (idle)
        # a moment after their one hit. Without eviction the table would hold one bucket per
        # tenant ever seen.
        samples: list = []
        svc = start_service(logdir, cpus(1), grants, name="churn.service")
        try:
            cfg = envoy_config(
                wasm_filter(LANEGUARD_WASM, "laneguard",
                            policy_json({"per_second": 1000, "burst": 1000},
                                        extra=policy_extra())),
                upstream_port=upstream.port, rls_port=svc.port)
            churn = measure_with_service("churn", svc, cfg, logdir,
                                         duration=setting("BENCH_CHURN_DURATION"),
                                         connections=conns, script_args=["0", "c"],
                                         samples=samples)
        finally:
            svc.stop()
        churn["samples"] = samples
        log(f"churn: {churn['requests']} fresh tenants, RSS "
            f"{churn['rss_base'] / 1e6:.1f} -> {churn['rss_after'] / 1e6:.1f} MB")
    finally:
        upstream.stop()
    full["tenants"] = {"rows": rows, "churn": churn, "grants": " ".join(grants) or "absent",
                       "rps_assumed": {"hi": rps_hi, "lo": rps_lo, "laneguard": lg_rps}}


def outside_heap(rss: int, memory: dict) -> int:
    """Envoy's resident memory that is not its own (tcmalloc) heap: mostly V8, whose Wasm
    linear memory holds the filter's bucket table. tcmalloc keeps freed pages resident, so a
    burst of Envoy allocations (many gRPC calls in flight) raises RSS without any change in
    the VM; subtracting the heap's resident size leaves the VM's share."""
    heap = int(memory.get("heap_size", 0)) - int(memory.get("pageheap_unmapped", 0))
    return rss - heap


def measure_with_service(name: str, svc: Binary, config: str, logdir: Path, *, duration: float,
                         connections: int, script_args: list[str],
                         samples: list | None = None) -> dict:
    """One tenants.lua run against a laneguard Envoy whose service is already running."""
    envoy = Envoy(name, config, logdir, 1, cpus(0))
    try:
        envoy.start()
        url = f"http://127.0.0.1:{envoy.listener_port()}/orders/1"
        # Warm V8 up on one tenant of the run's own set (t0 / c0), so that no extra bucket
        # is created, then take the baseline.
        warm = wrk(url, duration=1.0, connections=connections, cpus=cpus(1), script="tenants.lua",
                   script_args=["1", script_args[1]])
        time.sleep(0.5)
        rss_base, mem_base = envoy.rss(), envoy.memory()
        s0, c0, sc0 = envoy.stats(STAT_PATTERN), envoy.cpu(), svc.cpu()
        if samples is not None:
            r = _wrk_sampling(url, duration, connections, "tenants.lua", script_args, envoy,
                              samples)
        else:
            r = wrk(url, duration=duration, connections=connections, cpus=cpus(1),
                    script="tenants.lua", script_args=script_args)
        s1, c1, sc1 = envoy.stats(STAT_PATTERN), envoy.cpu(), svc.cpu()
        # The buckets gauge is refreshed on the filter's tick: give it a few seconds.
        time.sleep(3.0)
        rss1, mem1, buckets = envoy.rss(), envoy.memory(), buckets_gauge(envoy)
        # After a prune tick (every 5 s) and the grants' expiry, for the churn run.
        rss_idle = buckets_idle = None
        if samples is not None:
            time.sleep(8.0)
            rss_idle, buckets_idle = envoy.rss(), buckets_gauge(envoy)
    finally:
        envoy.stop()

    def delta(k: str) -> int:
        return s1.get(k, 0) - s0.get(k, 0)

    total = delta("http.bench.downstream_rq_total") or r.requests or 1
    return {
        "name": name, "rps": r.rps, "requests": r.requests, "warm_requests": warm.requests,
        "p50_us": r.p50_us, "p99_us": r.p99_us, "p999_us": r.p999_us, "max_us": r.max_us,
        "pct_429": 100.0 * delta("http.bench.downstream_rq_4xx") / total,
        "pct_5xx": 100.0 * delta("http.bench.downstream_rq_5xx") / total,
        "rpcs_per_1000": 1000.0 * delta("cluster.laneguard_rls.upstream_rq_total") / total,
        "envoy_cpu_us": (c1 - c0) * 1e6 / total,
        "service_cpu_us": (sc1 - sc0) * 1e6 / total,
        "rss_base": rss_base, "rss_after": rss1, "rss_idle": rss_idle,
        "buckets_after": buckets, "buckets_idle": buckets_idle,
        "alloc_base": int(mem_base.get("allocated", 0)),
        "alloc_after": int(mem1.get("allocated", 0)),
        "outside_heap_base": outside_heap(rss_base, mem_base),
        "outside_heap_after": outside_heap(rss1, mem1),
        "wasm_counters": {k.removeprefix("wasmcustom.laneguard."): delta(k) for k in s1
                          if k.startswith("wasmcustom.laneguard.") and delta(k)},
    }


SERVICE_CASES = [
    # (store, descriptors per call, pinned): pinned puts the service (and Redis) on CPU 0
    # and the load client alone on CPU 1; unpinned lets all of them share both cores.
    ("memory", 1, True), ("memory", 3, True), ("redis", 1, True), ("redis", 3, True),
    ("memory", 1, False), ("redis", 1, False),
]


def part_service(full: dict) -> None:
    load = require(RELEASE / "laneguard-rls-load", "cargo build --release -p laneguard-rls-load")
    duration = setting("BENCH_SERVICE_DURATION")
    rounds = setting("BENCH_SERVICE_ROUNDS")
    logdir = LOGS / "service"
    redis_ok = "redis://" in service_flags()
    results: dict[str, list[dict]] = {}
    redis = None
    redis_url = ""
    try:
        if redis_ok:
            redis, redis_url = start_redis(logdir, cpus(0))
        for rnd in range(rounds):
            for store, buckets, pinned in SERVICE_CASES:
                if store == "redis" and not redis_ok:
                    continue
                key = f"{store}/{buckets}/{'pinned' if pinned else 'shared'}"
                args = ["--store", redis_url] if store == "redis" else []
                svc = start_service(logdir, cpus(0) if pinned else None, args,
                                    name=f"service-{store}")
                client = ["taskset", "-c", "1"] if pinned and cpus(1) else []
                cmd = client + [str(load), "--target", svc.addr, "--connections", "2",
                                "--concurrency", "64", "--tenants", "1000",
                                "--buckets", str(buckets)]
                try:
                    # Warm-up (connections, allocator, Redis script cache), not measured.
                    subprocess.run(cmd + ["--duration", "1", "--warmup", "0"],
                                   capture_output=True, text=True, timeout=60)
                    c0 = svc.cpu()
                    rc0 = redis.cpu() if store == "redis" and redis else 0.0
                    t0 = time.monotonic()
                    out = subprocess.run(cmd + ["--duration", f"{duration:g}", "--warmup", "0"],
                                         capture_output=True, text=True, timeout=duration + 60)
                    wall = time.monotonic() - t0
                    c1 = svc.cpu()
                    rc1 = redis.cpu() if store == "redis" and redis else 0.0
                finally:
                    svc.stop()
                if out.returncode != 0:
                    raise BenchError(f"rls-load failed: {out.stderr}")
                d = json.loads(out.stdout.strip().splitlines()[-1])
                decisions = max(d["decisions"], 1)
                d["service_cores"] = (c1 - c0) / wall
                d["redis_cores"] = (rc1 - rc0) / wall
                d["service_us_per_decision"] = (c1 - c0) * 1e6 / decisions
                d["redis_us_per_decision"] = (rc1 - rc0) * 1e6 / decisions
                results.setdefault(key, []).append(d)
                log(f"service {key:22s} round {rnd + 1}: {d['rps']:7.0f} decisions/s  p99 "
                    f"{d['p99_us']:6d} us  errors {d['errors']}  service "
                    f"{d['service_cores']:.2f} cores ({d['service_us_per_decision']:.1f} us/decision)"
                    f"  redis {d['redis_cores']:.2f} cores")
    finally:
        if redis:
            redis.stop()
    summary = []
    for key, rs in results.items():
        store, buckets, mode = key.split("/")
        svc_us = median([r["service_us_per_decision"] for r in rs])
        redis_us = median([r["redis_us_per_decision"] for r in rs])
        summary.append({
            "store": store, "buckets": int(buckets), "mode": mode,
            "rps": median([r["rps"] for r in rs]),
            "p50_us": median([r["p50_us"] for r in rs]),
            "p99_us": median([r["p99_us"] for r in rs]),
            "errors": sum(r["errors"] for r in rs),
            "service_cores": median([r["service_cores"] for r in rs]),
            "redis_cores": median([r["redis_cores"] for r in rs]),
            "service_us_per_decision": svc_us,
            "redis_us_per_decision": redis_us,
            # What 2 cores could decide if they ran only the service (and Redis).
            "capacity_2_cores": 2e6 / (svc_us + redis_us) if svc_us else None,
        })
    full["service"] = {"summary": summary, "runs": results, "redis": redis_ok,
                       "duration_s": duration, "rounds": rounds,
                       "note": "" if redis_ok else
                       "this build of laneguard-service has no Redis store (--store redis://)"}


def start_redis(logdir: Path, cpu: str | None):
    from benchlib import Proc

    port = free_port()
    redis = Proc("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "no"], logdir, cpu)
    redis.start()
    deadline = time.monotonic() + 10
    while True:
        r = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                           text=True, timeout=5)
        if r.stdout.strip() == "PONG":
            return redis, f"redis://127.0.0.1:{port}"
        if time.monotonic() > deadline or not redis.alive():
            redis.stop()
            raise BenchError(f"redis-server did not come up:\n{redis.tail()}")
        time.sleep(0.05)


def part_micro(full: dict) -> None:
    t = setting("BENCH_CRITERION_TIME")
    cmd = ["cargo", "bench", "-p", "laneguard-core", "--bench", "decision", "--",
           "--warm-up-time", "1", "--measurement-time", f"{t:g}", "--noplot"]
    log(" ".join(cmd))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise BenchError(f"criterion failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    crit = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "criterion" / "decision"
    rows = []
    for bench in ("plan_and_decide", "decide", "plan_and_decide_99k_buckets",
                  "../table/new_tenant_at_cap_all_live"):
        for n in (1, 3, 6):
            f = crit / bench / str(n) / "new" / "estimates.json"
            if not f.exists():
                continue
            est = json.loads(f.read_text())
            bench = bench.removeprefix("../table/")
            rows.append({"bench": bench, "buckets": n,
                         "median_ns": est["median"]["point_estimate"],
                         "low_ns": est["median"]["confidence_interval"]["lower_bound"],
                         "high_ns": est["median"]["confidence_interval"]["upper_bound"]})
            log(f"criterion {bench}/{n}: {est['median']['point_estimate']:.0f} ns")
    full["micro"] = {"rows": rows, "command": " ".join(cmd)}


# --- report --------------------------------------------------------------------------------


def fnum(v, digits=0, none="—"):
    if v is None:
        return none
    return f"{v:,.{digits}f}"


def write_outputs(full: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    PLOTS.mkdir(parents=True, exist_ok=True)
    FULL.write_text(json.dumps(full, indent=1) + "\n")
    main = full.get("main")
    if main:
        # Fields are only ever added (the binding run's audit fields, issue 14 item 4).
        latest = [{k: r.get(k) for k in ("name", "rps", "p50_us", "p99_us", "p999_us",
                                          "rpcs_per_1000", *AUDIT_FIELDS) if k in r or k
                   not in AUDIT_FIELDS}
                  for r in main["summary"] if r["name"] in CONFIGS]
        # Rows other benchmarks add (make bench-accuracy's accuracy_cluster) stay.
        if LATEST.exists():
            latest += [r for r in json.loads(LATEST.read_text()) if r.get("name") not in CONFIGS]
        LATEST.write_text(json.dumps(latest, indent=2) + "\n")
    plots(full)
    doc = DOC.read_text()
    doc = replace_between(doc, "run", run_section(full))
    if main:
        doc = replace_between(doc, "table", main_table(full))
        doc = replace_between(doc, "goals", goals_section(full))
    if full.get("tenants"):
        doc = replace_between(doc, "tenants", tenants_section(full))
    if full.get("service"):
        doc = replace_between(doc, "service", service_section(full))
    if full.get("micro"):
        doc = replace_between(doc, "micro", micro_section(full))
    DOC.write_text(doc)
    if main:
        README.write_text(replace_between(README.read_text(), "readme", readme_table(full)))


def run_section(full: dict) -> str:
    m = full["machine"]
    lines = [
        f"Measured {full['date']} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}; Envoy {m['envoy']}, {m['wrk']}, {m['rustc']}.",
        f"Code: `{full['git']}`; Wasm filter sources fingerprint `{full['wasm_fingerprint']}` "
        f"(a hash of `filter/wasm/src` and `filter/core/src`).",
    ]
    main = full.get("main")
    if main:
        s = main["settings"]
        lines.append(
            f"Main comparison: {s['rounds']} interleaved rounds × {s['duration_s']:g} s per "
            f"configuration (after {s['warmup_s']:g} s of warm-up), wrk with 1 thread and "
            f"{s['connections']} connections, Envoy `--concurrency 1`. laneguard-service "
            f"flags for laneguard runs: `{main['grants']}`."
            + (f" Policy additions: `{s['policy_extra']}`." if s.get("policy_extra") else ""))
    return "\n".join(lines)


def main_table(full: dict) -> str:
    rows = full["main"]["summary"]
    out = ["| configuration | req/s | × router | p50 µs | p99 µs | p99.9 µs | Envoy CPU µs/req | "
           "CPU over router µs | RPCs / 1,000 req | 429 % |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("rps") is None:
            out.append(f"| `{r['name']}` | not available: {r.get('note', '')} |||||||||")
            continue
        out.append(
            f"| `{r['name']}` | {fnum(r['rps'])} | {r['rps_vs_router']:.2f} | {fnum(r['p50_us'])} "
            f"| {fnum(r['p99_us'])} | {fnum(r['p999_us'])} | {r['envoy_cpu_us']:.1f} | "
            f"{r['cpu_over_router_us']:+.1f} | {r['rpcs_per_1000']:.1f} | {r['pct_429']:.1f} |")
    return "\n".join(out)


def readme_table(full: dict) -> str:
    rows = [r for r in full["main"]["summary"] if r["name"] in CONFIGS]
    out = ["| configuration | req/s (× router) | p99 µs | Envoy CPU over router | RPCs / 1,000 |",
           "|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("rps") is None:
            out.append(f"| `{r['name']}` | not available yet | | | |")
            continue
        out.append(f"| `{r['name']}` | {fnum(r['rps'])} ({r['rps_vs_router']:.2f}×) | "
                   f"{fnum(r['p99_us'])} | {r['cpu_over_router_us']:+.1f} µs | "
                   f"{r['rpcs_per_1000']:.1f} |")
    m = full["machine"]
    out.append("")
    out.append(f"One Envoy worker, {m['cores']}-core {m['cpu']}, {full['date']}; medians of "
               f"{full['main']['settings']['rounds']} interleaved rounds. Method, goals and "
               "analysis: [docs/benchmarks.md](docs/benchmarks.md).")
    return "\n".join(out)


def goals_section(full: dict) -> str:
    s = {r["name"]: r for r in full["main"]["summary"]}
    needed = ("laneguard", "wasm_noop", "native_global", "laneguard_binding")
    if any(s.get(n, {}).get("rps") is None for n in needed):
        return "Not all configurations ran (BENCH_CONFIGS): no verdicts."
    lg, noop, nat = s["laneguard"], s["wasm_noop"], s["native_global"]
    out = ["| goal | measured | verdict |", "|---|---|---|"]

    def verdict(ok):
        return "met" if ok else "**missed**"

    r1 = lg["rps"] / noop["rps"]
    out.append(f"| laneguard throughput ≥ 0.95 × wasm_noop (issue 10 §2; was 0.90) | {r1:.2f}× "
               f"({fnum(lg['rps'])} vs {fnum(noop['rps'])} req/s) | {verdict(r1 >= 0.95)} |")
    r2 = lg["rps"] / nat["rps"]
    out.append(f"| laneguard throughput ≥ 2 × native_global | {r2:.2f}× "
               f"({fnum(lg['rps'])} vs {fnum(nat['rps'])} req/s) | {verdict(r2 >= 2.0)} |")
    r3 = lg["p99_us"] / nat["p99_us"]
    out.append(f"| laneguard p99 ≤ 0.5 × native_global p99 | {r3:.2f}× "
               f"({fnum(lg['p99_us'])} vs {fnum(nat['p99_us'])} µs) | {verdict(r3 <= 0.5)} |")
    out.append(f"| ≤ 1 service RPC per 1,000 requests (laneguard, under its limit; issue 10 §3) | "
               f"{lg['rpcs_per_1000']:.2f} | {verdict(lg['rpcs_per_1000'] <= 1)} |")
    b = s["laneguard_binding"]
    out.append(f"| ≤ 5 service RPCs per 1,000 requests (laneguard_binding, "
               f"{b['pct_429']:.0f}% 429) | {b['rpcs_per_1000']:.1f} | "
               f"{verdict(b['rpcs_per_1000'] <= 5)} |")
    if b.get("audit_kept_pct") is not None:
        out.append(f"| every 429 in the audit log while the service is up (laneguard_binding, "
                   f"`--audit-log`) | {b['audit_kept_pct']:.1f}% ({fnum(b['audit_429s_kept'])} "
                   f"of {fnum(b['audit_429s_seen'])} 429s; {fnum(b['audit_dropped'])} counted "
                   f"dropped) | {verdict(b['audit_429s_kept'] >= b['audit_429s_seen'])} |")
    cpu_noop, cpu_lg = noop["cpu_over_router_us"], lg["cpu_over_router_us"]
    out.append("")
    out.append(f"Envoy CPU per request over the router baseline: wasm_noop {cpu_noop:+.1f} µs, "
               f"laneguard {cpu_lg:+.1f} µs, so laneguard's own logic costs "
               f"{cpu_lg - cpu_noop:+.1f} µs per request beyond entering V8; native_global "
               f"{nat['cpu_over_router_us']:+.1f} µs in Envoy plus "
               f"{nat['service_cpu_us']:.1f} µs in the service.")
    hc = s.get("wasm_hostcalls")
    if hc and hc.get("rps") is not None:
        calls = hc["cpu_over_router_us"] - cpu_noop
        out.append("")
        out.append(f"`wasm_hostcalls` (the no-op filter making laneguard's per-request host calls: "
                   f"`{HOSTCALLS}`) costs {hc['cpu_over_router_us']:+.1f} µs over the router, "
                   f"so of laneguard's {cpu_lg - cpu_noop:+.1f} µs beyond the V8 entry, about "
                   f"{calls:.1f} µs is crossing into Envoy and {cpu_lg - cpu_noop - calls:.1f} µs "
                   f"is laneguard's own work inside the VM (parsing headers, planning, deciding, "
                   f"formatting headers; lease renewals included).")
        out.append("")
        out.append(f"A filter that made only these host calls and did nothing else would reach "
                   f"{hc['rps'] / noop['rps']:.2f}× wasm_noop's throughput "
                   f"({hc['rps']:,.0f} vs {noop['rps']:,.0f} req/s): the ceiling for laneguard's "
                   f"ratio with the calls its decision needs.")
    return "\n".join(out)


def tenants_section(full: dict) -> str:
    t = full["tenants"]
    out = ["| distinct tenants | req/s | p50 µs | p99 µs | tenants reached | live buckets | "
           "Envoy RSS growth | of which V8 (outside Envoy's heap) | bytes / live bucket | "
           "429 % | RPCs / 1,000 |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in t["rows"]:
        bpb = fnum(r["bytes_per_bucket"]) if r.get("bytes_per_bucket") is not None else "—"
        vm = r.get("vm_delta")
        out.append(
            f"| {r['tenants']:,} | {fnum(r['rps'])} | {fnum(r['p50_us'])} | {fnum(r['p99_us'])} | "
            f"{r['tenants_reached']:,} | {r['live_buckets']:,} | "
            f"{r['rss_delta'] / 1e6:+.1f} MB | "
            f"{(vm / 1e6 if vm is not None else 0):+.1f} MB | {bpb} | {r['pct_429']:.2f} | "
            f"{r['rpcs_per_1000']:.1f} |")
    c = t["churn"]
    out.append("")
    peak = max((s["rss"] for s in c["samples"]), default=c["rss_after"])
    buckets = [x["buckets"] for x in c["samples"] if x.get("buckets") is not None]
    if buckets:
        out.append(f"The filter's `laneguard.buckets` gauge during the churn run peaked at "
                   f"{max(buckets):,} buckets (cap 100,000) and read "
                   f"{c.get('buckets_idle') if c.get('buckets_idle') is not None else '—'} "
                   f"after the load stopped and a prune tick passed.")
    out.append(
        f"Churn: {c['requests']:,} requests, each from a tenant never seen before "
        f"({fnum(c['rps'])} req/s, p99 {fnum(c['p99_us'])} µs). Envoy RSS "
        f"{c['rss_base'] / 1e6:.1f} MB before, peak {peak / 1e6:.1f} MB during, "
        f"{c['rss_after'] / 1e6:.1f} MB at the end and "
        f"{(c['rss_idle'] or 0) / 1e6:.1f} MB after a prune tick.")
    return "\n".join(out)


def service_section(full: dict) -> str:
    s = full["service"]
    out = ["| store | descriptors per call | placement | decisions/s | p50 µs | p99 µs | "
           "service CPU (cores) | Redis CPU (cores) | CPU µs per decision (service + Redis) | "
           "implied decisions/s on 2 dedicated cores | errors |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in s["summary"]:
        place = ("service (and Redis) on CPU 0, client on CPU 1" if r["mode"] == "pinned"
                 else "all share both cores")
        cap = fnum(r["capacity_2_cores"]) if r.get("capacity_2_cores") else "—"
        out.append(f"| {r['store']} | {r['buckets']} | {place} | {fnum(r['rps'])} | "
                   f"{fnum(r['p50_us'])} | {fnum(r['p99_us'])} | {r['service_cores']:.2f} | "
                   f"{r['redis_cores']:.2f} | {r['service_us_per_decision']:.1f} + "
                   f"{r['redis_us_per_decision']:.1f} | {cap} | {r['errors']} |")
    if s.get("note"):
        out.append("")
        out.append(f"Redis: not measured: {s['note']}.")
    return "\n".join(out)


def micro_section(full: dict) -> str:
    rows = full["micro"]["rows"]
    by = {(r["bench"], r["buckets"]): r for r in rows}
    out = ["| buckets | plan + decide | decide only | plan + decide, table of 99k buckets |",
           "|---:|---:|---:|---:|"]
    for n in (1, 3, 6):
        cells = []
        for b in ("plan_and_decide", "decide", "plan_and_decide_99k_buckets"):
            r = by.get((b, n))
            cells.append(f"{r['median_ns']:,.0f} ns" if r else "—")
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    cap = by.get(("new_tenant_at_cap_all_live", 1))
    if cap:
        out.append("")
        out.append(f"A new tenant's first request when the table is at its cap (100,000 "
                   f"buckets) and every bucket in it is live: {cap['median_ns'] / 1e3:,.0f} µs "
                   f"(`table/new_tenant_at_cap_all_live`).")
    out.append("")
    out.append(f"Command: `{full['micro']['command']}` (medians, criterion's 95% interval in "
               "`bench/results/full.json`).")
    return "\n".join(out)


def plots(full: dict) -> None:
    main = full.get("main")
    if main:
        rows = [r for r in main["summary"] if r.get("rps") is not None]
        names = [r["name"] for r in rows]
        (PLOTS / "throughput.svg").write_text(svgplot.bars(
            "Requests per second, one Envoy worker (median of rounds)", names,
            [("req/s", [r["rps"] for r in rows])], "requests / s",
            annotate=[f"{r['rps_vs_router']:.2f}× router" for r in rows]))
        (PLOTS / "latency.svg").write_text(svgplot.bars(
            "Latency percentiles under saturating load (wrk, closed loop)", names,
            [("p50", [r["p50_us"] for r in rows]), ("p99", [r["p99_us"] for r in rows]),
             ("p99.9", [r["p999_us"] for r in rows])], "microseconds (log)", log=True))
        (PLOTS / "cpu.svg").write_text(svgplot.bars(
            "Envoy CPU per request over the router baseline", names,
            [("Envoy µs/req over router", [max(r["cpu_over_router_us"], 0.0) for r in rows]),
             ("service µs/req", [r["service_cpu_us"] for r in rows])], "microseconds"))
    t = full.get("tenants")
    if t:
        rows = t["rows"]
        xs = [float(r["tenants"]) for r in rows]
        (PLOTS / "tenants.svg").write_text(svgplot.lines(
            "laneguard as active tenants grow: p99 and Envoy memory", xs,
            [("p99 µs", [r["p99_us"] for r in rows]), ("p50 µs", [r["p50_us"] for r in rows])],
            "distinct active tenants (log)", "latency, µs (log)", logy=True,
            y2=("V8 growth, MB", [r.get("vm_delta", r["rss_delta"]) / 1e6 for r in rows]),
            y2label="MB"))
        c = t["churn"]["samples"]
        if len(c) >= 2:
            # A zero reading is another VM's write of the shared gauge (see buckets_gauge):
            # not a measurement of the worker's table, so it is left out.
            gauge = [s.get("buckets") or None for s in c]
            (PLOTS / "churn.svg").write_text(svgplot.lines(
                "Fresh tenant on every request: memory and bucket table stay bounded",
                [float(max(s["requests"], 1)) for s in c],
                [("Envoy RSS, MB", [s["rss"] / 1e6 for s in c])],
                "tenants seen so far", "MB", logx=False,
                y2=("buckets (gauge)", gauge) if any(g is not None for g in gauge) else None,
                y2label="buckets", y2_line=False))


def main() -> int:
    # The other parts of `make bench` are scripts of their own (the Makefile runs them).
    others = {"rtt", "replay", "ai"}
    only = [p for p in os.environ.get("BENCH_ONLY", "main,tenants,service,micro").split(",")
            if p and p not in others]
    if not only:  # BENCH_ONLY named only the other scripts' parts
        return 0
    full = json.loads(FULL.read_text()) if FULL.exists() else {}
    # What the docs' "Measured ..." line says; an experiment alone must not change it, since
    # the tables under it stay those of the last real run.
    header = {k: full.get(k) for k in ("date", "machine", "git", "wasm_fingerprint")}
    full["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    full["machine"] = machine_description()
    full["git"] = git_state()
    full["wasm_fingerprint"] = wasm_fingerprint()
    started = time.monotonic()
    parts = {"main": part_main, "tenants": part_tenants, "service": part_service,
             "micro": part_micro}
    try:
        for p in only:
            if p not in parts:
                raise BenchError(f"BENCH_ONLY: unknown part {p!r} "
                                 "(main, tenants, service, micro, rtt, replay, ai)")
            log(f"part {p}")
            if parts[p](full) and only == ["main"]:
                full.update({k: v for k, v in header.items() if v is not None})
                RESULTS.mkdir(parents=True, exist_ok=True)
                FULL.write_text(json.dumps(full, indent=1) + "\n")
                log(f"experiment only: {FULL.relative_to(ROOT)} (experiments); the docs, "
                    f"plots and {LATEST.relative_to(ROOT)} are left as they were")
                return 0
            write_outputs(full)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    log(f"done in {time.monotonic() - started:.0f} s: {LATEST.relative_to(ROOT)}, "
        f"{DOC.relative_to(ROOT)}, {PLOTS.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
