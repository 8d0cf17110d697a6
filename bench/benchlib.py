"""Shared machinery for laneguard's benchmarks (bench/run.py, bench/accuracy.py).

Processes: every child runs in its own session (process group), optionally pinned to CPUs
with taskset, with stdout and stderr in a log directory, and is killed by group. Readiness
is polled, never slept for: the laneguard binaries print `LANEGUARD_READY addr=IP:PORT`,
Envoy's admin `/ready` answers `LIVE`. Every port is ephemeral. Every wait and every load
run is bounded.

Standard library only, so `make bench` needs nothing beyond Python 3.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import socket
import statistics
import string
import subprocess
import textwrap
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
RELEASE = TARGET / "release"
WASM_DIR = TARGET / "wasm32-wasip1" / "release"
LANEGUARD_WASM = WASM_DIR / "laneguard_wasm.wasm"
NOOP_WASM = WASM_DIR / "laneguard_bench_noop.wasm"

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise BenchError(f"{name}={raw!r} is not a whole number") from e


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise BenchError(f"{name}={raw!r} is not a number") from e


def setting_of(settings: dict, name: str):
    """The environment's value of a benchmark setting `name`, whose (default, help) is in
    `settings`; the default's type (int or float) is the setting's type."""
    default, _ = settings[name]
    return env_float(name, default) if isinstance(default, float) else env_int(name, default)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def envoy_command() -> list[str]:
    cmd = os.environ.get("ENVOY")
    if cmd:
        return shlex.split(cmd)
    default = ROOT / ".venv" / "bin" / "envoy"
    if not default.exists():
        raise BenchError(f"no Envoy: {default} is missing and ENVOY is not set (run `make build`)")
    return [str(default)]


def require(path: Path, how: str) -> Path:
    if not path.exists():
        raise BenchError(f"missing {path}: build it with `{how}`")
    return path


def free_port() -> int:
    """A port that was free a moment ago (for redis-server, which cannot report its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes -----------------------------------------------------------------------------


def taskset(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


def group_pids(pgid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid:  # field 5 of stat: pgrp
            pids.append(int(d))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15: utime, stime
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, every process), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def children_cpu_seconds() -> float:
    """CPU seconds of this script's reaped children (wrk runs are reaped by subprocess.run)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class Proc:
    """A child process in its own process group. Killed (the whole group) by stop()."""

    def __init__(self, name: str, argv: list[str], logdir: Path, cpus: str | None = None):
        self.name = name
        self.argv = argv
        self.logdir = logdir
        self.cpus = cpus
        self.popen: subprocess.Popen | None = None
        self.out_path = logdir / f"{name}.stdout.log"
        self.err_path = logdir / f"{name}.stderr.log"
        self.restarts = 0

    def start(self) -> "Proc":
        self.logdir.mkdir(parents=True, exist_ok=True)
        suffix = f".{self.restarts}" if self.restarts else ""
        self.out_path = self.logdir / f"{self.name}{suffix}.stdout.log"
        self.err_path = self.logdir / f"{self.name}{suffix}.stderr.log"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                taskset(self.cpus) + self.argv,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=ROOT,
                # The service logs one line per decision at debug; warn keeps its log small.
                env={**os.environ, "LANEGUARD_LOG": os.environ.get("LANEGUARD_LOG", "warn")},
            )
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise BenchError(f"{self.name} is not running")
        return self.popen.pid

    def pids(self) -> list[int]:
        return group_pids(self.pid) or [self.pid]

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def rss(self) -> int:
        return rss_bytes(self.pids())

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, n: int = 20) -> str:
        try:
            lines = self.err_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_ready_line(self, timeout: float = 20.0) -> str:
        """Wait for `LANEGUARD_READY addr=IP:PORT` on stdout; return the address."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                text = self.out_path.read_text(errors="replace")
            except OSError:
                text = ""
            m = re.search(r"^LANEGUARD_READY addr=(\S+)$", text, re.M)
            if m:
                return m.group(1)
            if not self.alive():
                raise BenchError(f"{self.name} exited before it was ready:\n{self.tail()}")
            time.sleep(0.02)
        raise BenchError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class Binary(Proc):
    """laneguard-service or laneguard-upstream: `--listen 127.0.0.1:0`, ready line."""

    def __init__(self, name: str, argv: list[str], logdir: Path, cpus: str | None = None):
        super().__init__(name, argv, logdir, cpus)
        self.addr = ""

    def start(self) -> "Binary":
        super().start()
        self.addr = self.wait_ready_line()
        return self

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    def restart_same_port(self) -> "Binary":
        """Start again on the port it had (after a kill), so that Envoy's cluster finds it."""
        argv = list(self.argv)
        i = argv.index("--listen")
        argv[i + 1] = self.addr
        self.argv = argv
        self.restarts += 1
        deadline = time.monotonic() + 10
        while True:
            super().start()
            try:
                self.addr = self.wait_ready_line()
                return self
            except BenchError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # the port may linger for a moment after the kill


def start_upstream(logdir: Path, cpus: str | None) -> Binary:
    exe = require(RELEASE / "laneguard-upstream", "cargo build --release -p laneguard-upstream")
    return Binary("upstream", [str(exe), "--listen", "127.0.0.1:0"], logdir, cpus).start()


def start_service(logdir: Path, cpus: str | None, extra: list[str] | None = None,
                  name: str = "service") -> Binary:
    exe = require(RELEASE / "laneguard-service", "cargo build --release -p laneguard-service")
    argv = [str(exe), "--listen", "127.0.0.1:0"] + (extra or [])
    return Binary(name, argv, logdir, cpus).start()


def service_flags() -> str:
    """The service's --help text, to find out which flags this build has."""
    exe = require(RELEASE / "laneguard-service", "cargo build --release -p laneguard-service")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=10)
    return r.stdout + r.stderr


# --- Envoy ---------------------------------------------------------------------------------


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode("utf-8", "replace")


class Envoy(Proc):
    def __init__(self, name: str, config: str, logdir: Path, concurrency: int = 1,
                 cpus: str | None = None):
        self.config_path = logdir / f"{name}.yaml"
        self.admin_path = logdir / f"{name}.admin-address.txt"
        argv = envoy_command() + [
            "-c", str(self.config_path),
            "--concurrency", str(concurrency),
            "--use-dynamic-base-id",
            "--admin-address-path", str(self.admin_path),
            "--log-path", str(logdir / f"{name}.log"),
            "-l", "warning",
        ]
        super().__init__(name, argv, logdir, cpus)
        self.config = config
        self.admin = ""

    def start(self, timeout: float = 60.0) -> "Envoy":
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config)
        self.admin_path.unlink(missing_ok=True)
        super().start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                log_tail = ""
                try:
                    log_tail = "\n".join(
                        (self.logdir / f"{self.name}.log").read_text(errors="replace").splitlines()[-15:])
                except OSError:
                    pass
                raise BenchError(f"Envoy {self.name} exited at start:\n{self.tail()}\n{log_tail}")
            if not self.admin and self.admin_path.exists():
                self.admin = self.admin_path.read_text().strip()
            if self.admin:
                try:
                    if http_get(f"http://{self.admin}/ready", 1.0).strip() == "LIVE":
                        return self
                except OSError:
                    pass
            time.sleep(0.025)
        raise BenchError(f"Envoy {self.name} not LIVE after {timeout}s")

    def listener_port(self, name: str = "bench") -> int:
        data = json.loads(http_get(f"http://{self.admin}/listeners?format=json"))
        for ls in data.get("listener_statuses", []):
            if ls.get("name") == name:
                return int(ls["local_address"]["socket_address"]["port_value"])
        raise BenchError(f"Envoy {self.name} has no listener {name!r}")

    def stats(self, pattern: str = "") -> dict[str, int]:
        """Counters and gauges whose name matches the regex `pattern`."""
        q = f"?filter={urllib.request.quote(pattern)}" if pattern else ""
        out = {}
        for line in http_get(f"http://{self.admin}/stats{q}").splitlines():
            name, _, value = line.partition(": ")
            try:
                out[name] = int(value)
            except ValueError:
                continue
        return out

    def memory(self) -> dict:
        return json.loads(http_get(f"http://{self.admin}/memory"))


def fleet_stats(envoys: list[Envoy], pattern: str) -> dict:
    """Counters matching `pattern` summed over every Envoy, stamped (`_t`) with the
    mid-point of the sampling."""
    t0 = time.monotonic()
    total: dict = {}
    for e in envoys:
        for k, v in e.stats(pattern).items():
            total[k] = total.get(k, 0) + v
    total["_t"] = (t0 + time.monotonic()) / 2
    return total


def render(template: str, **fields) -> str:
    """Fill `${NAME}` fields. A field left unfilled is an error, never a silent blank."""
    try:
        return string.Template(template).substitute(fields)
    except KeyError as e:
        raise BenchError(f"template field {e} not given") from e


def envoy_config(filters: str, *, upstream_port: int, rls_port: int,
                 rate_limits: str = "") -> str:
    """bench/envoy/base.yaml around these HTTP filters and route `rate_limits` (both YAML
    list items, written unindented). The same listener, route and clusters for every
    configuration, so that only the filters differ."""
    base = (BENCH / "envoy" / "base.yaml").read_text()
    return render(
        base,
        HTTP_FILTERS=textwrap.indent(filters.strip("\n"), " " * 10),
        RATE_LIMITS=textwrap.indent(rate_limits.strip("\n"), " " * 14),
        UPSTREAM_PORT=upstream_port,
        RLS_PORT=rls_port,
    )


def filter_snippet(name: str) -> str:
    return (BENCH / "envoy" / f"{name}.yaml").read_text()


def yaml_single_quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def policy_json(ceiling: dict, *, share: float | None = None, extra: dict | None = None) -> str:
    """The bench policy: one unprotected class, every tenant one bucket (its ceiling)."""
    service = {"cluster": "laneguard_rls", "domain": "laneguard", "timeout_ms": 200}
    if share is not None:
        service["local_share"] = share
    p = {
        "version": 1,
        "classification": {"default_class": "standard"},
        "service": service,
        "headers": {"draft03": False},
        "classes": [{"name": "standard", "consequence": "time_sensitive", "failure_mode": "local"}],
        "tenants": {"default": {"ceiling": ceiling}},
    }
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(p.get(k), dict):
            p[k] = {**p[k], **v}
        else:
            p[k] = v
    return json.dumps(p, separators=(",", ":"))


def wasm_filter(wasm: Path, name: str, configuration: str) -> str:
    return render(filter_snippet("wasm"), NAME=name, WASM=str(wasm),
                  CONFIGURATION=yaml_single_quoted(configuration))


# --- load ----------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    status_errors: int
    socket_errors: int
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float
    raw: dict = field(default_factory=dict)


def wrk(url: str, *, duration: float, connections: int, threads: int = 1,
        headers: dict[str, str] | None = None, script: str = "report.lua",
        script_args: list[str] | None = None, cpus: str | None = None,
        timeout: str = "2s") -> WrkResult:
    """One bounded wrk run. Latency percentiles come from the Lua `done()` hook."""
    duration = max(1, math.ceil(duration))  # wrk takes whole seconds
    argv = taskset(cpus) + [
        "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
        "--timeout", timeout, "-s", str(BENCH / "lua" / script),
    ]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(url)
    if script_args:
        argv += ["--"] + script_args
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"wrk did not finish: {' '.join(argv)}") from e
    m = re.search(r"^WRK_JSON (.*)$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise BenchError(f"wrk failed ({r.returncode}): {' '.join(argv)}\n{r.stdout}\n{r.stderr}")
    d = json.loads(m.group(1))
    dur = d["duration_us"] / 1e6
    return WrkResult(
        requests=d["requests"], duration_s=dur, rps=d["requests"] / dur if dur else 0.0,
        status_errors=d["status_errors"],
        socket_errors=d["connect_errors"] + d["read_errors"] + d["write_errors"] + d["timeouts"],
        p50_us=d["p50_us"], p90_us=d["p90_us"], p99_us=d["p99_us"], p999_us=d["p999_us"],
        max_us=d["max_us"], raw=d,
    )


def machine_description() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass

    def version(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else ""
        except (OSError, subprocess.TimeoutExpired):
            return ""

    envoy_v = version(envoy_command() + ["--version"])
    m = re.search(r"version: \S+/(\d+\.\d+\.\d+)/", envoy_v)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": os.uname().release,
        "envoy": m.group(1) if m else envoy_v,
        "wrk": version(["wrk", "-v"]).split(" [")[0],
        "rustc": version(["rustc", "--version"]),
    }


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head}{' + uncommitted changes' if dirty else ''}"


def wasm_fingerprint() -> str:
    """A short hash of filter/wasm/src and filter/core/src, to say which filter was measured."""
    import hashlib

    h = hashlib.sha256()
    for d in ("filter/wasm/src", "filter/core/src"):
        for p in sorted((ROOT / d).rglob("*.rs")):
            h.update(p.relative_to(ROOT).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def replace_between(text: str, name: str, body: str) -> str:
    """Replace what lies between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise BenchError(f"markers {begin} ... {end} not found")
    return text[: i + len(begin)] + "\n" + body.strip("\n") + "\n" + text[j:]
