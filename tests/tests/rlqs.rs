//! Envoy's own `envoy.filters.http.rate_limit_quota` filter (RLQS) as the client of
//! laneguard-service's `StreamRateLimitQuotas`: config `envoy/rlqs.yaml`, the service on
//! `--policy tests/policies/valid/lanes.yaml` (integration 6/s in a 10/s shared pool, repair
//! reserve 4/s). Real Envoy, real service; docs/rlqs.md.

// Test code: a failed unwrap or panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use laneguard_tests::traffic::{self, Stream, StreamResult};
use laneguard_tests::{repo_root, NativeStack, RunDir};

const POLICY: &str = "tests/policies/valid/lanes.yaml";
/// integration's budget in lanes.yaml (per second, and its burst).
const INTEGRATION_RATE: f64 = 6.0;
const INTEGRATION_BURST: f64 = 6.0;
/// The expired-assignment fallback in envoy/rlqs.yaml: 5 per second, 5 at once.
const FALLBACK_RATE: f64 = 5.0;
/// The assignment TTL the service is started with (short, so the outage test is quick).
const TTL_S: u64 = 6;
/// Requests that may pass between a bucket's first request (Envoy allows until the first
/// assignment arrives, one round trip) and the assignment, on a loaded machine.
const BEFORE_ASSIGNMENT: f64 = 15.0;

fn flood(base: &str, seconds: u64) -> (StreamResult, StreamResult, Duration) {
    let streams = [
        Stream::new("integration flood", "", "/orders/1", 60.0)
            .header("x-tenant", "acme")
            .header("x-traffic-class", "integration"),
        Stream::new("repair", "", "/repair/1", 3.0)
            .header("x-tenant", "acme")
            .header("x-traffic-class", "repair"),
    ];
    let (mut results, took) = traffic::run(base, &streams, Duration::from_secs(seconds));
    let repair = results.pop().unwrap();
    let integration = results.pop().unwrap();
    (integration, repair, took)
}

/// (allowed, denied) summed over the service's `rlqs report` log lines for one bucket.
fn reported(log: &Path, class: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let bucket = format!("bucket=class={class},tenant=acme ");
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    text.lines()
        .filter(|l| l.contains("rlqs report:") && l.contains(&bucket))
        .fold((0, 0), |(a, d), l| {
            (a + field(l, "allowed="), d + field(l, "denied="))
        })
}

/// Poll (reports come every 5 s) until `f` holds or `timeout` passes; the last value.
fn poll<T>(timeout: Duration, mut f: impl FnMut() -> T, ok: impl Fn(&T) -> bool) -> T {
    let end = Instant::now() + timeout;
    loop {
        let v = f();
        if ok(&v) || Instant::now() > end {
            return v;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn rlqs_holds_the_flood_keeps_the_reserve_and_survives_a_restart() {
    let dir = RunDir::new("rlqs").unwrap();
    let policy = repo_root().join(POLICY).display().to_string();
    let ttl = TTL_S.to_string();
    let mut stack = NativeStack::start_rlqs(
        dir.clone(),
        &["--policy", &policy, "--rlqs-ttl-s", &ttl],
        |_| Ok(()),
    )
    .unwrap();
    let base = stack.client.base().to_string();
    let ctx = |stack: &NativeStack| format!("{}\n{}", stack.service.logs(), stack.envoy.logs());

    // 1. A flood of integration (60/s offered) next to repair at 3/s, for 8 s: integration
    //    is held to its 6/s budget, repair (reserve 4/s) loses nothing.
    let (integ, repair, _) = flood(&base, 8);
    let took = integ.last_done().as_secs_f64();
    let ok = integ.count(200) as f64;
    let limit = INTEGRATION_BURST + INTEGRATION_RATE * took + BEFORE_ASSIGNMENT;
    let summary = format!("{}\n{}\n{took:.1} s", integ.summary(), repair.summary());
    eprintln!("{summary}");
    assert!(
        ok <= limit,
        "integration exceeded its budget ({ok} > {limit:.0})\n{summary}\n{}",
        ctx(&stack)
    );
    assert!(
        ok >= INTEGRATION_RATE * took * 0.5,
        "integration got far less than its budget\n{summary}\n{}",
        ctx(&stack)
    );
    assert!(integ.count(429) > 0, "nothing was limited\n{summary}");
    assert_eq!(
        integ.count(200) + integ.count(429),
        integ.sent(),
        "statuses other than 200 and 429\n{summary}"
    );
    assert_eq!(
        repair.count(200),
        repair.sent(),
        "repair lost requests next to the flood\n{summary}\n{}",
        ctx(&stack)
    );

    // 2. The usage reports arrive: what Envoy reported for the integration bucket adds up,
    //    exactly, to what the client saw (after the next 5 s report).
    let log = dir.file("service.stderr.log");
    let want = (integ.count(200) as u64, integ.count(429) as u64);
    let got = poll(
        Duration::from_secs(15),
        || reported(&log, "integration"),
        |g| *g == want,
    );
    assert_eq!(
        got,
        want,
        "reported (allowed, denied) for integration != what the client saw\n{}",
        ctx(&stack)
    );
    assert!(reported(&log, "repair").0 >= repair.count(200) as u64 - 1);

    // 3. The service dies. Envoy keeps the assignment until its TTL, then applies
    //    envoy/rlqs.yaml's expired_assignment_behavior (5/s per Envoy); nothing hangs.
    stack.service.stop();
    std::thread::sleep(Duration::from_secs(TTL_S + 2)); // the TTL itself is the subject
    let (integ, repair, _) = flood(&base, 4);
    let took = integ.last_done().as_secs_f64();
    let ok = integ.count(200) as f64;
    let summary = format!("outage: {}\n{}", integ.summary(), repair.summary());
    eprintln!("{summary} in {took:.1} s");
    assert!(
        integ
            .outcomes
            .iter()
            .all(|o| o.status == 200 || o.status == 429),
        "requests failed while the service was down\n{summary}"
    );
    assert!(
        ok <= FALLBACK_RATE + FALLBACK_RATE * took + 2.0 && integ.count(429) > 0,
        "the fallback bucket did not hold integration\n{summary}\n{}",
        stack.envoy.logs()
    );
    assert!(repair.count(200) > 0, "{summary}");

    // 4. The service comes back on the same port: Envoy reopens the stream at its next
    //    report, the new process assigns again, and the flood is held to 6/s once more.
    stack.service.restart().unwrap();
    let log = dir.file("service.1.stderr.log");
    let back = poll(
        Duration::from_secs(20),
        || std::fs::read_to_string(&log).unwrap_or_default(),
        |t| t.contains("rlqs report:"),
    );
    assert!(
        back.contains("rlqs report:"),
        "no report reached the restarted service\n{}",
        ctx(&stack)
    );
    let (integ, repair, _) = flood(&base, 6);
    let took = integ.last_done().as_secs_f64();
    let ok = integ.count(200) as f64;
    let summary = format!("after restart: {}\n{}", integ.summary(), repair.summary());
    eprintln!("{summary} in {took:.1} s");
    assert!(
        ok <= INTEGRATION_BURST + INTEGRATION_RATE * took + BEFORE_ASSIGNMENT
            && integ.count(429) > 0,
        "integration not held after the restart\n{summary}\n{}",
        ctx(&stack)
    );
    assert_eq!(
        repair.count(200),
        repair.sent(),
        "{summary}\n{}",
        ctx(&stack)
    );
}

#[test]
fn rlqs_refuses_unknown_classes_and_requests_without_a_tenant() {
    let dir = RunDir::new("rlqs-refusals").unwrap();
    let policy = repo_root().join(POLICY).display().to_string();
    let stack = NativeStack::start_rlqs(dir.clone(), &["--policy", &policy], |_| Ok(())).unwrap();
    let client = &stack.client;
    // No tenant: the static bucket is denied from the first request.
    let r = client
        .get("/orders/1", &[("x-traffic-class", "integration")])
        .unwrap();
    assert_eq!(r.status, 429, "{}", r.describe());
    // A class the policy does not have: DENY_ALL once the service has answered (the first
    // request or two pass under no_assignment_behavior).
    let statuses = poll(
        Duration::from_secs(10),
        || {
            client
                .get(
                    "/orders/1",
                    &[("x-tenant", "acme"), ("x-traffic-class", "nightly")],
                )
                .unwrap()
                .status
        },
        |s| *s == 429,
    );
    assert_eq!(
        statuses,
        429,
        "{}\n{}",
        stack.service.logs(),
        stack.envoy.logs()
    );
    let log = std::fs::read_to_string(dir.file("service.stderr.log")).unwrap();
    assert!(
        log.contains("DENY_ALL (the policy has no class \"nightly\")"),
        "{log}"
    );
    // No class header: the policy's default class (interactive, 4/s) applies, not DENY_ALL.
    let r = client.get("/orders/1", &[("x-tenant", "acme")]).unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
}
