"""`make bench-accuracy`, the fleet part (issue 10 §4): a binding limit held by a fleet on a
Redis Cluster, over a delayed link.

Setup, every process on loopback with ephemeral ports: a 3-primary Redis Cluster with one
replica each (tools/redis-harness's `laneguard-redis-cluster`, each node behind a
`laneguard-delay-proxy` and announcing the proxy's port, so the service's cluster client
follows CLUSTER SLOTS through the delay); 3 laneguard-service replicas on it, each behind a
delay proxy; 4 Envoys × 2 workers whose `laneguard_rls` cluster holds the 3 proxied replicas
(round robin, outlier detection ejects a dead replica). RTT 1 ms on both links (ACC_CLUSTER_RTT_MS).

Traffic: wrk floods tenant acme's shared pool on every Envoy (class `standard`), while a
small steady stream of the protected class `repair` (principal repair-tool) goes to
every Envoy, well inside its reserve. Two runs with fresh processes:

  steady  the headline: error_pct of the standard traffic against (ceiling − reserve) ×
          window, RPCs per 1,000 requests (Envoy's upstream_rq_total), Redis commands per
          1,000 requests (INFO commandstats on each primary, INFO itself excluded)
  kills   one service replica SIGKILLed at ACC_CLUSTER_KILL_SERVICE_AT s, then the primary
          holding acme's slot SIGKILLed at ACC_CLUSTER_KILL_REDIS_AT s (its replica is
          promoted, cluster-node-timeout 1 s); drift per phase, and the protected stream's
          success rate (it must stay 100%)

Then the service alone: laneguard-rls-load drives one service directly (memory store, and the
same Redis Cluster), decisions per second of service CPU (per core). The machine is shared
and loaded, so that figure is a lower bound.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchlib import (
    LANEGUARD_WASM, RELEASE, RESULTS, ROOT, BenchError, Binary, Envoy, Proc, envoy_config,
    fleet_stats, log, require, setting_of, start_service, start_upstream, wasm_filter,
)

SETTINGS = {
    "ACC_CLUSTER": (1, "1: run the Redis Cluster fleet part of make bench-accuracy; 0: skip it"),
    # Low enough to bind on a loaded 2-core machine, where 4 Envoys serve ~1,000 req/s.
    "ACC_CLUSTER_RATE": (400, "tenant ceiling, requests per second"),
    "ACC_CLUSTER_RESERVE": (20, "the protected class's reserve, per second"),
    "ACC_CLUSTER_PROTECTED_RPS": (2, "protected requests per second per Envoy"),
    "ACC_CLUSTER_DURATION": (24, "seconds of load per run"),
    "ACC_CLUSTER_SETTLE": (4, "seconds before the measured window opens"),
    "ACC_CLUSTER_CONNECTIONS": (8, "wrk connections per Envoy"),
    "ACC_CLUSTER_RTT_MS": (1.0, "round-trip time of the Envoy->service and service->Redis links"),
    "ACC_CLUSTER_KILL_SERVICE_AT": (7, "kills run: seconds into the load when a replica dies"),
    "ACC_CLUSTER_KILL_REDIS_AT": (13, "kills run: seconds into the load when a primary dies"),
    "ACC_CLUSTER_LOAD_SECONDS": (5, "laneguard-rls-load seconds per store"),
}
ENVOYS = 4
WORKERS = 2
SERVICES = 3
TENANT = "acme"
STATS = (r"^http\.bench\.downstream_rq_(total|2xx|4xx|5xx)$"
         r"|^cluster\.laneguard_rls\.(upstream_rq_total|outlier_detection\.ejections_enforced_total)$"
         r"|^wasmcustom\.laneguard\.")


def setting(name: str):
    return setting_of(SETTINGS, name)


def policy() -> str:
    import json

    rate = setting("ACC_CLUSTER_RATE")
    reserve = setting("ACC_CLUSTER_RESERVE")
    return json.dumps({
        "version": 1,
        "classification": {"default_class": "standard"},
        "service": {"cluster": "laneguard_rls", "domain": "laneguard", "timeout_ms": 200,
                    # Alone (service unreachable), each VM spends its share of the rate.
                    "local_share": round(1.0 / (ENVOYS * WORKERS), 4)},
        "headers": {"draft03": False},
        "audit": {"ship": False},
        "classes": [
            {"name": "standard", "consequence": "time_sensitive", "failure_mode": "local"},
            {"name": "repair", "consequence": "repair",
             "reserve": {"per_second": reserve, "burst": reserve}},
        ],
        "principals": [
            {"name": "bench", "default_class": "standard", "may_declare": ["standard"]},
            # The repair tool, its own identity, as a deployment would give it.
            {"name": "repair-tool", "default_class": "repair", "may_declare": ["repair"]},
        ],
        "tenants": {"default": {"ceiling": {"per_second": rate, "burst": 100}}},
    }, separators=(",", ":"))


def delay_proxy(target_port: int, name: str, logdir: Path) -> Binary:
    exe = require(RELEASE / "laneguard-delay-proxy", "cargo build --release -p laneguard-netbench")
    return Binary(name, [str(exe), "--listen", "127.0.0.1:0", "--target",
                         f"127.0.0.1:{target_port}", "--rtt-ms",
                         str(setting("ACC_CLUSTER_RTT_MS"))], logdir).start()


class Cluster:
    """laneguard-redis-cluster (tools/redis-harness), its nodes fronted by delay proxies."""

    def __init__(self, logdir: Path):
        exe = require(RELEASE / "laneguard-redis-cluster",
                      "cargo build --release -p laneguard-redis-harness")
        proxy = require(RELEASE / "laneguard-delay-proxy",
                        "cargo build --release -p laneguard-netbench")
        self.proc = Binary("redis-cluster", [
            str(exe), "--dir", str(logdir / "redis"), "--masters", "3", "--replicas", "1",
            "--front", f"{proxy} --rtt-ms {setting('ACC_CLUSTER_RTT_MS')}", "--lifetime-s", "900",
        ], logdir)
        # Creating the cluster (six nodes, six proxies, a healthy state) takes longer than the
        # readiness wait of one binary.
        Proc.start(self.proc)
        try:
            self.proc.addr = self.proc.wait_ready_line(timeout=120.0)
            text = self.proc.out_path.read_text()
            self.spec = re.search(r"^LANEGUARD_CLUSTER spec=(\S+)$", text, re.M).group(1)
            self.nodes = [{"port": int(p), "announced": int(a), "pid": int(pid)} for p, a, pid in
                          re.findall(r"^LANEGUARD_NODE index=\d+ port=(\d+) announced=(\d+) "
                                     r"pid=(\d+)$", text, re.M)]
        except BaseException:
            self.proc.stop()
            raise

    def cli(self, port: int, *args: str) -> str:
        r = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                           capture_output=True, text=True, timeout=10)
        return r.stdout

    def alive(self) -> list[dict]:
        return [n for n in self.nodes if not n.get("killed")]

    def masters(self) -> list[dict]:
        return [n for n in self.alive() if self.cli(n["port"], "ROLE").startswith("master")]

    def commands(self) -> dict[str, int]:
        """Commands the primaries executed so far, by name (INFO commandstats), INFO itself
        excluded."""
        total: dict[str, int] = {}
        for n in self.masters():
            for name, calls in re.findall(r"^cmdstat_([^:]+):calls=(\d+)",
                                          self.cli(n["port"], "INFO", "commandstats"), re.M):
                if name != "info":
                    total[name] = total.get(name, 0) + int(calls)
        return total

    def holder(self, tenant: str) -> dict | None:
        """The primary holding the tenant's keys (hash tag {tenant})."""
        for n in self.masters():
            if self.cli(n["port"], "--scan", "--pattern", f"*{{{tenant}}}*").strip():
                return n
        return None

    def kill(self, node: dict) -> None:
        import os
        import signal

        os.kill(node["pid"], signal.SIGKILL)
        node["killed"] = True

    def healthy(self) -> bool:
        """Three primaries among the live nodes (a replica promoted in place of a killed
        one), and every live node says cluster_state:ok."""
        return len(self.masters()) == 3 and all(
            "cluster_state:ok" in self.cli(n["port"], "CLUSTER", "INFO") for n in self.alive())

    def stop(self) -> None:
        self.proc.stop()


def fleet_config(cfg: str, rls_ports: list[int]) -> str:
    """The bench config with the laneguard_rls cluster over every replica, with outlier
    detection."""
    head, sep, tail = cfg.rpartition("  - name: laneguard_rls\n")
    if not sep:
        raise BenchError("bench/envoy/base.yaml has no laneguard_rls cluster")
    endpoints = "".join(
        f"        - endpoint:\n            address:\n              socket_address: "
        f"{{ address: 127.0.0.1, port_value: {p} }}\n" for p in rls_ports)
    return head + sep + (
        "    type: STATIC\n"
        "    connect_timeout: 1s\n"
        "    typed_extension_protocol_options:\n"
        "      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n"
        "        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n"
        "        explicit_http_config:\n"
        "          http2_protocol_options: {}\n"
        # A dead replica (its proxy accepts, then resets) is ejected after a few failures.
        "    outlier_detection:\n"
        "      consecutive_5xx: 3\n"
        "      consecutive_gateway_failure: 3\n"
        "      interval: 1s\n"
        "      base_ejection_time: 30s\n"
        "      max_ejection_percent: 34\n"
        "    load_assignment:\n"
        "      cluster_name: laneguard_rls\n"
        "      endpoints:\n"
        "      - lb_endpoints:\n" + endpoints)


class Protected:
    """A steady stream of the protected class to every Envoy; every response is recorded."""

    def __init__(self, urls: list[str], rps: float, until: float):
        self.records: list[tuple[float, int]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(u, rps, until), daemon=True)
                        for u in urls]
        for t in self.threads:
            t.start()

    def run(self, url: str, rps: float, until: float) -> None:
        step = 1.0 / rps
        nxt = time.monotonic()
        while nxt < until:
            req = urllib.request.Request(url, headers={
                "x-laneguard-tenant": TENANT, "x-laneguard-principal": "repair-tool",
                "x-traffic-class": "repair"})
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    status = r.status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError:
                status = 0
            with self.lock:
                self.records.append((time.monotonic(), status))
            nxt += step
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)

    def between(self, a: float, b: float) -> dict:
        rs = [s for t, s in self.records if a <= t < b]
        ok = sum(1 for s in rs if s == 200)
        return {"sent": len(rs), "ok": ok, "ok_pct": 100.0 * ok / len(rs) if rs else None}


def snapshot(envoys: list[Envoy], cluster: Cluster | None = None) -> dict:
    total = fleet_stats(envoys, STATS)
    if cluster is not None:
        total["_redis_commands"] = cluster.commands()
    return total


def phase(a: dict, b: dict, prot: Protected) -> dict:
    def d(k: str) -> int:
        return b.get(k, 0) - a.get(k, 0)

    seconds = b["_t"] - a["_t"]
    p = prot.between(a["_t"], b["_t"])
    served = d("http.bench.downstream_rq_total") or 1
    # The standard class spends the shared pool: the ceiling less the protected reserve.
    pool = setting("ACC_CLUSTER_RATE") - setting("ACC_CLUSTER_RESERVE")
    admitted = d("http.bench.downstream_rq_2xx") - p["ok"]
    limit = pool * seconds
    out = {
        "seconds": seconds, "admitted": admitted, "limit": limit,
        "error_pct": 100.0 * (admitted - limit) / limit if limit else 0.0,
        "requests": served, "rps": served / seconds if seconds else 0.0,
        "pct_429": 100.0 * d("http.bench.downstream_rq_4xx") / served,
        "pct_5xx": 100.0 * d("http.bench.downstream_rq_5xx") / served,
        "rpcs": d("cluster.laneguard_rls.upstream_rq_total"),
        "rpcs_per_1000": 1000.0 * d("cluster.laneguard_rls.upstream_rq_total") / served,
        "degraded": d("wasmcustom.laneguard.degraded"),
        "lease_renewals": d("wasmcustom.laneguard.lease.renewals"),
        "decided_central": d("wasmcustom.laneguard.decided.central"),
        "ejections": d("cluster.laneguard_rls.outlier_detection.ejections_enforced_total"),
        "protected_sent": p["sent"], "protected_ok": p["ok"], "protected_ok_pct": p["ok_pct"],
    }
    if "_redis_commands" in a and "_redis_commands" in b:
        by = {k: v - a["_redis_commands"].get(k, 0) for k, v in b["_redis_commands"].items()}
        by = {k: v for k, v in sorted(by.items(), key=lambda kv: -kv[1]) if v}
        out["redis_commands"] = sum(by.values())
        out["redis_commands_per_1000"] = 1000.0 * out["redis_commands"] / served
        out["redis_commands_by_name"] = by
    return out


def one_run(label: str, kills: bool, logdir_root: Path) -> dict:
    logdir = logdir_root / label
    duration = setting("ACC_CLUSTER_DURATION")
    procs: list = []
    envoys: list[Envoy] = []
    wrks: list[subprocess.Popen] = []
    cluster = None
    try:
        cluster = Cluster(logdir)
        procs.append(cluster)
        upstream = start_upstream(logdir, None)
        procs.append(upstream)
        services, fronts = [], []
        for i in range(SERVICES):
            svc = start_service(logdir, None, ["--store", cluster.spec], name=f"service{i}")
            services.append(svc)
            procs.append(svc)
            fronts.append(delay_proxy(svc.port, f"service{i}.proxy", logdir))
            procs.append(fronts[-1])
        wasm = require(LANEGUARD_WASM, "make build-wasm")
        cfg = fleet_config(envoy_config(wasm_filter(wasm, "laneguard", policy()),
                                        upstream_port=upstream.port, rls_port=fronts[0].port),
                           [f.port for f in fronts])
        for i in range(ENVOYS):
            envoys.append(Envoy(f"envoy{i}", cfg, logdir, WORKERS, None).start())
        urls = [f"http://127.0.0.1:{e.listener_port()}/orders/1" for e in envoys]
        start = time.monotonic()
        prot = Protected(urls, setting("ACC_CLUSTER_PROTECTED_RPS"), start + duration)
        for i, url in enumerate(urls):
            out = open(logdir / f"wrk{i}.log", "w")
            wrks.append(subprocess.Popen(
                ["wrk", "-t", "1", "-c", str(setting("ACC_CLUSTER_CONNECTIONS")),
                 "-d", f"{duration}s", "--timeout", "2s",
                 "-H", f"x-laneguard-tenant: {TENANT}", "-H", "x-laneguard-principal: bench",
                 url], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT))

        def at(t: float) -> None:
            delay = start + t - time.monotonic()
            if delay > 0:
                time.sleep(delay)

        marks = {}
        at(setting("ACC_CLUSTER_SETTLE"))
        marks["open"] = snapshot(envoys, None if kills else cluster)
        victim = None
        if kills:
            at(setting("ACC_CLUSTER_KILL_SERVICE_AT"))
            marks["kill_service"] = snapshot(envoys)
            services[1].stop()
            log(f"cluster {label}: service replica 1 killed")
            victim = cluster.holder(TENANT)
            at(setting("ACC_CLUSTER_KILL_REDIS_AT"))
            marks["kill_redis"] = snapshot(envoys)
            if victim is None:
                raise BenchError("no Redis primary holds the tenant's keys")
            cluster.kill(victim)
            log(f"cluster {label}: Redis primary on port {victim['port']} killed")
            deadline = time.monotonic() + 30
            while not cluster.healthy() and time.monotonic() < deadline:
                time.sleep(0.1)
            marks["promoted"] = snapshot(envoys)
            log(f"cluster {label}: cluster_state ok again after "
                f"{marks['promoted']['_t'] - marks['kill_redis']['_t']:.1f} s")
        at(duration - 1)
        marks["close"] = snapshot(envoys, None if kills else cluster)
        for w in wrks:
            w.wait(timeout=duration + 30)
        prot.join(10)
    finally:
        for w in wrks:
            if w.poll() is None:
                w.kill()
        for e in envoys:
            e.stop()
        for p in reversed(procs):
            p.stop()
    result = {"label": label, "window": phase(marks["open"], marks["close"], prot)}
    if kills:
        result["before"] = phase(marks["open"], marks["kill_service"], prot)
        result["service_down"] = phase(marks["kill_service"], marks["kill_redis"], prot)
        result["failover"] = phase(marks["kill_redis"], marks["promoted"], prot)
        result["after"] = phase(marks["promoted"], marks["close"], prot)
        result["whole_protected"] = prot.between(0, float("inf"))
    return result


def decisions_per_core(logdir: Path) -> dict:
    """laneguard-rls-load straight at one service: decisions per second of service CPU."""
    load = require(RELEASE / "laneguard-rls-load", "cargo build --release -p laneguard-rls-load")
    seconds = setting("ACC_CLUSTER_LOAD_SECONDS")
    out = {}
    cluster = Cluster(logdir / "rls-load")
    try:
        for store, args in (("memory", []), ("redis_cluster", ["--store", cluster.spec])):
            svc = start_service(logdir, None, args, name=f"rls-load-{store}")
            try:
                cmd = [str(load), "--target", svc.addr, "--connections", "2", "--concurrency",
                       "64", "--tenants", "1000", "--buckets", "1", "--warmup", "0"]
                subprocess.run(cmd + ["--duration", "1"], capture_output=True, timeout=60)
                c0 = svc.cpu()
                r = subprocess.run(cmd + ["--duration", str(seconds)], capture_output=True,
                                   text=True, timeout=seconds + 60)
                c1 = svc.cpu()
            finally:
                svc.stop()
            if r.returncode != 0:
                raise BenchError(f"rls-load failed: {r.stderr}")
            import json

            d = json.loads(r.stdout.strip().splitlines()[-1])
            cpu = max(c1 - c0, 1e-9)
            out[store] = {"decisions": d["decisions"], "decisions_per_s": d["rps"],
                          "service_cpu_s": cpu, "errors": d["errors"],
                          "decisions_per_core_s": d["decisions"] / cpu}
            log(f"cluster rls-load {store}: {d['rps']:.0f} decisions/s, "
                f"{out[store]['decisions_per_core_s']:.0f} per service core-second "
                f"(errors {d['errors']})")
    finally:
        cluster.stop()
    return out


def run() -> dict | None:
    if not setting("ACC_CLUSTER"):
        return None
    logdir = RESULTS / "logs" / "accuracy" / "cluster"
    steady = one_run("steady", False, logdir)
    w = steady["window"]
    log(f"cluster steady: admitted {w['admitted']} vs {w['limit']:.0f} -> {w['error_pct']:+.2f}%  "
        f"rpcs/1000 {w['rpcs_per_1000']:.2f}  redis commands/1000 "
        f"{w.get('redis_commands_per_1000', 0):.2f}  protected {w['protected_ok']}/{w['protected_sent']}")
    kills = one_run("kills", True, logdir)
    for name in ("before", "service_down", "failover", "after", "window"):
        p = kills[name]
        log(f"cluster kills {name:12s} {p['seconds']:5.2f} s: {p['error_pct']:+.2f}%  rpcs/1000 "
            f"{p['rpcs_per_1000']:.2f}  protected {p['protected_ok']}/{p['protected_sent']}")
    service = decisions_per_core(logdir)
    return {"settings": {k: setting(k) for k in SETTINGS}, "envoys": ENVOYS, "workers": WORKERS,
            "services": SERVICES, "redis": "3 primaries, 1 replica each", "steady": steady,
            "kills": kills, "service": service,
            "note": "decisions per core measured on a shared, loaded 2-core machine: a lower bound"}


DOC = ROOT / "docs" / "benchmarks.md"
LATEST = RESULTS / "latest.json"
GOALS = {"error_pct": 0.5, "rpcs_per_1000": 5.0, "memory_per_core": 50_000, "redis_per_core": 25_000}


def fmt_pct(v) -> str:
    return "—" if v is None else f"{v:.1f}%"


def doc_section(r: dict, machine: dict, git: str) -> str:
    s = r["settings"]
    w = r["steady"]["window"]
    svc = r["service"]
    mem = svc["memory"]["decisions_per_core_s"]
    red = svc["redis_cluster"]["decisions_per_core_s"]
    pool = s["ACC_CLUSTER_RATE"] - s["ACC_CLUSTER_RESERVE"]
    out = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} on {machine['cores']} cores "
        f"({machine['cpu']}), Envoy {machine['envoy']}; code `{git}`. Command: "
        "`make bench-accuracy` (this part: `ACC_CLUSTER=1`, the default; settings "
        "`ACC_CLUSTER_*` in bench/accuracy_cluster.py).",
        "",
        f"Setup: {r['envoys']} Envoys × {r['workers']} workers; {r['services']} laneguard-service "
        f"replicas behind one Envoy cluster (round robin, outlier detection: a replica is ejected after 3 consecutive failures); a Redis "
        f"Cluster of {r['redis']} (`tools/redis-harness`); every process on loopback, with a "
        f"{s['ACC_CLUSTER_RTT_MS']:g} ms RTT (laneguard-delay-proxy) on Envoy → service and on "
        f"service → each Redis node (the nodes announce their proxy's port, so the cluster client "
        f"stays behind the delay). Tenant ceiling {s['ACC_CLUSTER_RATE']}/s; the protected class "
        f"`repair` has a {s['ACC_CLUSTER_RESERVE']}/s reserve, so the flooded class `standard` "
        f"gets the shared pool of {pool}/s. wrk floods `standard` on every Envoy "
        f"({s['ACC_CLUSTER_CONNECTIONS']} connections each) for {s['ACC_CLUSTER_DURATION']} s; "
        f"{s['ACC_CLUSTER_PROTECTED_RPS']} protected requests/s go to every Envoy meanwhile. "
        f"Window from {s['ACC_CLUSTER_SETTLE']} s to {s['ACC_CLUSTER_DURATION'] - 1} s.",
        "",
        "| run | phase | seconds | offered req/s | admitted (standard) | limit (pool × time) | "
        "error | RPCs / 1,000 | Redis commands / 1,000 | protected served |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [("steady", "window", r["steady"]["window"])]
    k = r["kills"]
    rows += [("kills", "before the kills", k["before"]),
             ("kills", "one service replica down", k["service_down"]),
             ("kills", "Redis primary killed, until a replica is promoted", k["failover"]),
             ("kills", "after the promotion", k["after"]),
             ("kills", "whole window", k["window"])]
    for run, name, p in rows:
        rc = p.get("redis_commands_per_1000")
        out.append(f"| {run} | {name} | {p['seconds']:.1f} | {p['rps']:,.0f} | {p['admitted']:,} | "
                   f"{p['limit']:,.0f} | {p['error_pct']:+.2f}% | {p['rpcs_per_1000']:.2f} | "
                   f"{'—' if rc is None else f'{rc:.2f}'} | {p['protected_ok']}/{p['protected_sent']} "
                   f"({fmt_pct(p['protected_ok_pct'])}) |")
    out += [
        "",
        "The service alone (laneguard-rls-load straight at one replica, 64 calls in flight, one "
        "descriptor per call, 1,000 tenants), decisions per second of the service's CPU time. On "
        "this shared, loaded 2-core machine (the load client, Redis and its proxies share the "
        "cores) these are **lower bounds**:",
        "",
        "| store | decisions/s | service CPU s | decisions per core-second | errors | goal |",
        "|---|---:|---:|---:|---:|---:|",
        f"| memory | {svc['memory']['decisions_per_s']:,.0f} | {svc['memory']['service_cpu_s']:.2f} | "
        f"{mem:,.0f} | {svc['memory']['errors']} | ≥ 50,000 |",
        f"| Redis Cluster (through the 1 ms link) | {svc['redis_cluster']['decisions_per_s']:,.0f} | "
        f"{svc['redis_cluster']['service_cpu_s']:.2f} | {red:,.0f} | "
        f"{svc['redis_cluster']['errors']} | ≥ 25,000 |",
        "",
        "Goals: " + "; ".join([
            f"accuracy ±{GOALS['error_pct']}%: {w['error_pct']:+.2f}% "
            f"({'met' if abs(w['error_pct']) <= GOALS['error_pct'] else 'MISSED'})",
            f"≤ {GOALS['rpcs_per_1000']:g} RPCs / 1,000: {w['rpcs_per_1000']:.2f} "
            f"({'met' if w['rpcs_per_1000'] <= GOALS['rpcs_per_1000'] else 'MISSED'})",
            f"≥ 50k decisions/s per core on memory: {mem:,.0f} "
            f"({'met' if mem >= GOALS['memory_per_core'] else 'MISSED'})",
            f"≥ 25k on Redis: {red:,.0f} ({'met' if red >= GOALS['redis_per_core'] else 'MISSED'})",
        ]) + ".",
    ]
    return "\n".join(out)


def write_latest(r: dict) -> None:
    """One more object in bench/results/latest.json (the list of per-configuration rows, whose
    fields stay as they are): name `accuracy_cluster`, with the headline figures."""
    import json

    w = r["steady"]["window"]
    rows = json.loads(LATEST.read_text()) if LATEST.exists() else []
    rows = [x for x in rows if x.get("name") != "accuracy_cluster"]
    rows.append({
        "name": "accuracy_cluster", "rps": w["rps"], "p50_us": None, "p99_us": None,
        "p999_us": None, "rpcs_per_1000": w["rpcs_per_1000"], "error_pct": w["error_pct"],
        "redis_commands_per_1000": w.get("redis_commands_per_1000"),
        "decisions_per_core_memory": r["service"]["memory"]["decisions_per_core_s"],
        "decisions_per_core_redis": r["service"]["redis_cluster"]["decisions_per_core_s"],
        "kills_error_pct": r["kills"]["window"]["error_pct"],
        "kills_protected_ok_pct": r["kills"]["whole_protected"]["ok_pct"],
    })
    RESULTS.mkdir(parents=True, exist_ok=True)
    LATEST.write_text(json.dumps(rows, indent=2) + "\n")
