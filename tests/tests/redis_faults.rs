//! The fault suite: Redis fails under the whole stack (real Envoy with the built filter, the
//! real service on the Redis store, real `redis-server`s) while traffic of every class flows,
//! and the service is restarted on Redis. For every fault:
//!
//! - the protected lanes (repair, recovery) are 100% served, on their protected lane;
//! - no request takes longer than the filter's service timeout plus slack (a hang check);
//! - each class's failure mode is honoured: export (`closed`) answers 503
//!   `rate_limit_service_unavailable` while the store is unreachable and 200 after, the
//!   `local` classes are served throughout (decided in degraded mode while it lasts);
//! - the service's gRPC health is NOT_SERVING while its store is unreachable, SERVING after;
//! - a tenant flooding its interactive budget (100/s) is admitted within 1% of the budget over
//!   a window after recovery (once the hits admitted in degraded mode are reported).
//!
//! Policy `tests/policies/valid/faults.yaml`. Each scenario takes about half a minute; they
//! run one at a time (a lock) so that their floods do not compete for the two cores. Longer
//! variants: `make chaos` (CHAOS_HOLD_S, CHAOS_WINDOW_S; docs/reliability.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::chaos::{drift_pct, Load, Recorded};
use laneguard_tests::traffic::Stream;
use laneguard_tests::{
    health, test_policy, token, EnvoyOptions, RedisCluster, RedisServer, RunDir, Shape, Stack,
};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SERVICE_TIMEOUT: Duration = Duration::from_millis(200);
const SLACK: Duration = Duration::from_secs(2);
/// The flooded budget (acme's interactive class in faults.yaml).
const FLOOD_RATE: f64 = 100.0;
const DRIFT_LIMIT_PCT: f64 = 1.0;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn secs_env(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// How long a fault lasts at least, and the measured window after recovery.
fn hold() -> Duration {
    secs_env("CHAOS_HOLD_S", 3)
}
fn window() -> Duration {
    secs_env("CHAOS_WINDOW_S", 10)
}
const WARM: Duration = Duration::from_secs(3);

fn streams() -> Vec<Stream> {
    let t = |n: &str| token(n).unwrap();
    vec![
        // acme floods its interactive budget four times over, on four connections (so that
        // even slow answers on a loaded machine keep the bucket saturated).
        Stream::new("flood", &t("ACME_WEB"), "/orders/1", 100.0),
        Stream::new("flood", &t("ACME_WEB"), "/orders/2", 100.0),
        Stream::new("flood", &t("ACME_WEB"), "/orders/3", 100.0),
        Stream::new("flood", &t("ACME_WEB"), "/orders/4", 100.0),
        Stream::new("repair", &t("NORTHWIND_RECON"), "/orders/1", 5.0),
        Stream::new("recovery", &t("NORTHWIND_SUPPORT"), "/orders/1", 5.0),
        Stream::new("interactive", &t("NORTHWIND_WEB"), "/orders/1", 5.0),
        Stream::new("export", &t("NORTHWIND_EXPORT"), "/exports/daily", 4.0),
    ]
}

fn policy() -> String {
    test_policy("valid/faults.yaml").unwrap()
}

fn start(label: &str, store: &str) -> Stack {
    start_with(label, store, &policy())
}

fn start_with(label: &str, store: &str, policy: &str) -> Stack {
    start_extra(label, store, policy, &[])
}

/// [`start_with`], with `extra` service flags after the suite's own.
fn start_extra(label: &str, store: &str, policy: &str, extra: &[&str]) -> Stack {
    let dir = RunDir::new(label).unwrap();
    let mut args = vec!["--store", store, "--redis-timeout-ms", "100"];
    args.extend_from_slice(extra);
    Stack::start_in(dir, policy, &args, EnvoyOptions::default(), |_| Ok(())).unwrap()
}

/// Poll the service's health until it reports `want`; how long that took.
fn health_becomes(addr: SocketAddr, want: &str, within: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < within {
        match health::check(addr, health::RLS) {
            Ok(s) if s == want => return Ok(started.elapsed()),
            Ok(s) => last = s,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "health still {last} after {within:?}, expected {want}"
    ))
}

/// When things happened, on the load's clock.
struct Timeline {
    fault_from: Duration,
    fault_to: Duration,
    recovered: Duration,
    window_from: Duration,
    window_to: Duration,
}

/// Run the load, `inject` the fault after a warm-up, check health goes NOT_SERVING, keep the
/// fault for at least [`hold`], `heal` it, wait for SERVING, then measure a window.
fn scenario(stack: &Stack, inject: impl FnOnce(), heal: impl FnOnce()) -> (Recorded, Timeline) {
    let addr = stack.service.addr();
    health_becomes(addr, "SERVING", Duration::from_secs(10)).unwrap();
    let load = Load::start(stack.client.base(), &streams());
    std::thread::sleep(WARM);
    let fault_from = load.now();
    inject();
    let down = health_becomes(addr, "NOT_SERVING", Duration::from_secs(10));
    let held = load.now() - fault_from;
    if held < hold() {
        std::thread::sleep(hold() - held);
    }
    heal();
    let fault_to = load.now();
    let up = health_becomes(addr, "SERVING", Duration::from_secs(30));
    let recovered = load.now();
    // Hits admitted in degraded mode are reported on the next sync tick (1 s) and charged
    // to the bucket, which then refuses until they are paid for (about as long as the fault
    // lasted): measure after that.
    let settle = (fault_to - fault_from) + Duration::from_secs(3);
    std::thread::sleep(settle + window());
    let rec = load.stop();
    let ctx = format!("{}\n{}", rec.summary(), stack.logs());
    down.unwrap_or_else(|e| panic!("while the store is unreachable: {e}\n{ctx}"));
    up.unwrap_or_else(|e| panic!("after the store is back: {e}\n{ctx}"));
    let window_from = recovered + settle;
    (
        rec,
        Timeline {
            fault_from,
            fault_to,
            recovered,
            window_from,
            window_to: window_from + window(),
        },
    )
}

/// Every assertion of the suite; returns the drift after recovery (percent) for the report.
fn check(what: &str, rec: &Recorded, t: &Timeline, stack: &Stack) -> f64 {
    let ctx = format!(
        "{what}: fault {:?}..{:?}, recovered {:?}, window {:?}..{:?}\n{}\n{}",
        t.fault_from,
        t.fault_to,
        t.recovered,
        t.window_from,
        t.window_to,
        rec.summary(),
        stack.logs()
    );
    let end = Duration::MAX;
    for (name, records) in &rec.streams {
        assert!(!records.is_empty(), "{name} sent nothing\n{ctx}");
        for r in records {
            assert_ne!(r.status, 0, "{name}: transport error {}\n{ctx}", r.detail);
        }
    }
    // No request past the timeout (plus slack: a hang check on a loaded machine).
    assert!(
        rec.slowest() < SERVICE_TIMEOUT + SLACK,
        "slowest request {:?}\n{ctx}",
        rec.slowest()
    );
    // Protected lanes: 100% served, on the protected lane.
    for lane in ["repair", "recovery"] {
        for r in rec.of(lane) {
            assert!(
                r.status == 200 && r.detail == "protected",
                "{lane} at {:?}: {} {}\n{ctx}",
                r.sent,
                r.status,
                r.detail
            );
        }
    }
    // local: northwind's interactive traffic is always served.
    for r in rec.of("interactive") {
        assert_eq!(r.status, 200, "interactive at {:?}\n{ctx}", r.sent);
    }
    // The flood is served or refused by its budget, never failed; some of it was decided in
    // degraded mode during the fault.
    for r in rec.of("flood") {
        assert!(
            r.status == 200 || r.status == 429,
            "flood at {:?}: {}\n{ctx}",
            r.sent,
            r.status
        );
    }
    assert!(
        rec.between("flood", t.fault_from, t.fault_to)
            .iter()
            .any(|r| r.degraded),
        "no degraded decision during the fault\n{ctx}"
    );
    // closed: export is 503 rate_limit_service_unavailable only while the store is away.
    for r in rec.between("export", Duration::ZERO, t.fault_from) {
        assert_eq!(
            r.status, 200,
            "export before the fault at {:?}\n{ctx}",
            r.sent
        );
    }
    for r in rec.of("export") {
        assert!(
            r.status == 200 || (r.status == 503 && r.detail == "rate_limit_service_unavailable"),
            "export at {:?}: {} {}\n{ctx}",
            r.sent,
            r.status,
            r.detail
        );
    }
    let refused = rec
        .between("export", t.fault_from, t.fault_to + SLACK)
        .iter()
        .filter(|r| r.status == 503)
        .count();
    println!("{what}: export (closed) refused {refused} while the store was away");
    assert!(
        refused > 0,
        "export (closed) never refused while the store was away\n{ctx}"
    );
    for r in rec.between("export", t.window_from, end) {
        assert_eq!(
            r.status, 200,
            "export after recovery at {:?}\n{ctx}",
            r.sent
        );
    }
    // Drift after recovery.
    let flood = rec.between("flood", t.window_from, t.window_to);
    let drift = drift_pct(&flood, FLOOD_RATE, t.window_from, t.window_to);
    println!(
        "{what}: drift after recovery {drift:+.2}% over {:?} ({} admitted, {} sent); fault {:?}, slowest request {:?}",
        t.window_to - t.window_from,
        flood.iter().filter(|r| r.status == 200).count(),
        flood.len(),
        t.fault_to - t.fault_from,
        rec.slowest()
    );
    assert!(
        drift.abs() < DRIFT_LIMIT_PCT,
        "drift after recovery {drift:+.2}%; flood admitted per second: {}\n{ctx}",
        per_second(rec, "flood")
    );
    drift
}

/// `t=0s: 200/300 ...`: admitted over sent, per second of the load, for messages.
fn per_second(rec: &Recorded, name: &str) -> String {
    let records = rec.of(name);
    let end = records.last().map(|r| r.sent.as_secs()).unwrap_or(0);
    (0..=end)
        .map(|s| {
            let from = Duration::from_secs(s);
            let in_second = rec.between(name, from, from + Duration::from_secs(1));
            let ok = in_second.iter().filter(|r| r.status == 200).count();
            format!("{s}s {ok}/{}", in_second.len())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn redis_killed_mid_flood_then_restarted() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = RunDir::new("fault-redis-kill").unwrap();
    let redis = Mutex::new(RedisServer::start(&dir).unwrap());
    let stack = start("fault-redis-kill-stack", &redis.lock().unwrap().url());
    let (rec, t) = scenario(
        &stack,
        || redis.lock().unwrap().stop(),
        || redis.lock().unwrap().restart().unwrap(),
    );
    check("redis killed", &rec, &t, &stack);
}

#[test]
fn redis_paused_past_its_timeout() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = RunDir::new("fault-redis-pause").unwrap();
    let redis = RedisServer::start(&dir).unwrap();
    let stack = start("fault-redis-pause-stack", &redis.url());
    let (rec, t) = scenario(
        &stack,
        || redis.pause().unwrap(),
        || redis.resume().unwrap(),
    );
    // The state survived the pause: nothing was lost.
    check("redis paused (SIGSTOP)", &rec, &t, &stack);
}

#[test]
fn cluster_primary_killed_replica_promoted() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = RunDir::new("fault-cluster").unwrap();
    let cluster = Mutex::new(RedisCluster::start(&dir, Shape::with_replicas(3)).unwrap());
    let spec = cluster.lock().unwrap().spec();
    // Leases of 500 ms (default 2 s): export (`closed`, 4/s) spends what it holds on lease
    // while the store is away, as it should (pre-paid), and only then asks the service and
    // is refused. The outage here is the failover, not the hold: at least the 1 s
    // cluster-node-timeout plus the replica's election delay (0.5-1 s). A 2 s lease renewed
    // just before the kill could outlast that, and export then never met the outage
    // (CI on f9e7803: export 90/90 served). A 500 ms lease cannot.
    let stack = start_extra(
        "fault-cluster-stack",
        &spec,
        &policy(),
        &["--lease-ttl-ms", "500"],
    );
    let (rec, t) = scenario(
        &stack,
        || {
            // Kill the primary that holds northwind's buckets (the tenant of the protected
            // and closed classes), so that the fault reaches them.
            let mut c = cluster.lock().unwrap();
            let masters = c.masters().unwrap();
            let victim = masters
                .iter()
                .copied()
                .find(|&i| {
                    c.nodes[i]
                        .cli(&["--scan", "--pattern", "*{northwind}*"])
                        .map(|keys| !keys.trim().is_empty())
                        .unwrap_or(false)
                })
                .expect("a primary holds northwind's keys");
            c.nodes[victim].stop();
        },
        || {
            // A replica takes over (cluster-node-timeout 1 s); the victim stays down.
            cluster
                .lock()
                .unwrap()
                .wait_healthy(3, Duration::from_secs(30))
                .unwrap();
        },
    );
    check("cluster primary killed", &rec, &t, &stack);
}

/// The window measured after a service restart. 10 s, not 5: at a binding limit a worker
/// takes what refilled in one hold (about 10 of this 100/s budget) per ask, so a window's
/// edges cut a lease or two, and the outage's tail admits about 3 a second over the budget
/// for 2-3 s after the restart. Over 5 s that measured +0.2% to +1.0% (CI on f9e7803 failed
/// at +1.00% against the 1% bound); over 10 s, -0.2% to +0.4% in the same runs. A second
/// burst (100) would be +10% over 10 s.
const AFTER_RESTART: Duration = Duration::from_secs(10);

/// Kill the service (SIGKILL) mid-flood and restart it a second later. Returns the drift over
/// the [`AFTER_RESTART`] window after the restart and over the whole run from the kill to then: the outage was
/// decided locally and is reported on the next sync tick (1 s), which charges the bucket.
fn restart_drift(label: &str, store: &str) -> (f64, f64, Recorded) {
    restart_drift_with(&mut start(label, store))
}

/// [`restart_drift`] on a stack already started.
fn restart_drift_with(stack: &mut Stack) -> (f64, f64, Recorded) {
    let load = Load::start(
        stack.client.base(),
        &streams()
            .into_iter()
            .filter(|s| s.name == "flood")
            .collect::<Vec<_>>(),
    );
    std::thread::sleep(WARM);
    let killed = load.now();
    stack.service.stop();
    std::thread::sleep(Duration::from_secs(1));
    stack.service.restart().unwrap();
    let restarted = load.now();
    std::thread::sleep(AFTER_RESTART + Duration::from_secs(1));
    let rec = load.stop();
    let to = restarted + AFTER_RESTART;
    let after = drift_pct(
        &rec.between("flood", restarted, to),
        FLOOD_RATE,
        restarted,
        to,
    );
    let whole = drift_pct(&rec.between("flood", killed, to), FLOOD_RATE, killed, to);
    (after, whole, rec)
}

/// A service restart on Redis does not hand out the burst twice: over the 10 s after it the
/// tenant gets no more than its budget (+1%); the outage's local decisions, reported on the
/// 1 s sync tick, are paid back. The memory store is run the same way for comparison (its
/// bucket starts full after the restart). docs/reliability.md discusses both figures.
#[test]
fn service_restart_on_redis_keeps_the_budget() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = RunDir::new("fault-service-restart").unwrap();
    let redis = RedisServer::start(&dir).unwrap();
    let (redis_after, redis_whole, rec) = restart_drift("fault-restart-redis", &redis.url());
    let (memory_after, memory_whole, _) = restart_drift("fault-restart-memory", "memory");
    println!(
        "service restart: drift over the 10 s after it {redis_after:+.2}% on Redis ({memory_after:+.2}% memory); \
         from the kill {redis_whole:+.2}% on Redis ({memory_whole:+.2}% memory)"
    );
    assert!(
        redis_after < DRIFT_LIMIT_PCT,
        "Redis: {redis_after:+.2}% over the 10 s after the restart; per second: {}",
        per_second(&rec, "flood")
    );
}

/// The finding this guards against: with a long sync tick the hits admitted while the service
/// was down were reported only on the next tick, so the central bucket, refilled during the
/// outage, handed out its burst again after a restart: +18% (memory) and +19% (Redis) over the
/// 5 s after it, with `sync_interval_s: 30`. The filter now reports as soon as the service
/// answers again (`laneguard_core::reconnect`), so the 10 s after a restart stay within the
/// budget (+1%) on both stores although the next sync tick is 30 s away. Two workers, so the
/// worker that sees the service first drains the other's ledger too.
#[test]
fn service_restart_with_a_30s_sync_tick_reports_on_reconnect() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let policy = policy().replace("sync_interval_s: 1\n", "sync_interval_s: 30\n");
    assert!(
        policy.contains("sync_interval_s: 30\n"),
        "the policy's tick is 30 s"
    );
    let dir = RunDir::new("fault-restart-30s").unwrap();
    let redis = RedisServer::start(&dir).unwrap();
    let two = || EnvoyOptions {
        concurrency: 2,
        ..EnvoyOptions::default()
    };
    let mut figures = Vec::new();
    for (label, store) in [
        ("fault-restart-30s-memory", "memory".to_string()),
        ("fault-restart-30s-redis", redis.url()),
    ] {
        let mut stack = Stack::start_in(
            RunDir::new(label).unwrap(),
            &policy,
            &["--store", &store, "--redis-timeout-ms", "100"],
            two(),
            |_| Ok(()),
        )
        .unwrap();
        let (after, whole, rec) = restart_drift_with(&mut stack);
        let on_reconnect = stack
            .envoy
            .counter_sum("laneguard", "laneguard.reported_on_reconnect")
            .unwrap();
        println!(
            "{label}: drift over the 10 s after the restart {after:+.2}%, from the kill {whole:+.2}%; \
             {on_reconnect} hits reported on reconnect; per second: {}",
            per_second(&rec, "flood")
        );
        figures.push((label, after, on_reconnect, per_second(&rec, "flood")));
    }
    for (label, after, on_reconnect, per_second) in figures {
        assert!(
            on_reconnect > 0,
            "{label}: nothing was reported on reconnect (the outage's hits wait for the 30 s tick)"
        );
        assert!(
            after < DRIFT_LIMIT_PCT,
            "{label}: {after:+.2}% over the 10 s after the restart (the burst handed out again); per second: {per_second}"
        );
    }
}
