//! The rate-limit service fails: each class follows its failure mode, and nothing hangs.
//!
//! Policy `tests/policies/valid/fast.yaml` (`service.timeout_ms: 200`): export fails closed
//! (503), interactive and integration fail `local` (served from the worker's own buckets,
//! marked `x-laneguard-degraded`), and repair and recovery default to `local` too.
//!
//! Every request's wall time is measured client-side and must stay under the service
//! timeout plus a generous slack: this is a hang check, not a performance assertion.

// Test code: a failed unwrap or panic is a failed test (clippy.toml allows them inside
// #[test] functions; this extends that to the helpers of this file).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::config::{self, set_path, RLS_CLUSTER};
use laneguard_tests::{test_policy, token, BlackHole, EnvoyOptions, Reply, Stack};
use std::time::{Duration, Instant};

const SERVICE_TIMEOUT: Duration = Duration::from_millis(200);
const SLACK: Duration = Duration::from_secs(2);

/// (token, class, expected lane) for every class of fast.yaml that fails `local`.
const LOCAL: [(&str, &str, &str); 4] = [
    ("NORTHWIND_WEB", "interactive", "shared"),
    ("NORTHWIND_ERP", "integration", "shared"),
    ("NORTHWIND_RECON", "repair", "protected"),
    ("NORTHWIND_SUPPORT", "recovery", "protected"),
];

fn policy() -> String {
    test_policy("valid/fast.yaml").unwrap()
}

fn within_timeout(r: &Reply, ctx: &str) {
    assert!(
        r.elapsed < SERVICE_TIMEOUT + SLACK,
        "a request took {:?} (service timeout {SERVICE_TIMEOUT:?})\n{ctx}",
        r.elapsed
    );
}

/// Every class follows its failure mode; returns the slowest request's wall time.
fn assert_failure_modes(stack: &Stack, what: &str) -> Duration {
    let mut slowest = Duration::ZERO;
    for round in 0..3 {
        // closed: 503 with the documented error.
        let export = token("NORTHWIND_EXPORT").unwrap();
        let r = stack.client.get_as("/exports/daily", &export, &[]).unwrap();
        let ctx = format!(
            "{what}, round {round}, export (closed):\n{}\n{}",
            r.describe(),
            stack.logs()
        );
        within_timeout(&r, &ctx);
        slowest = slowest.max(r.elapsed);
        assert_eq!(r.status, 503, "{ctx}");
        assert_eq!(
            r.json().unwrap()["error"],
            "rate_limit_service_unavailable",
            "{ctx}"
        );

        // local: served from local buckets, marked degraded.
        for (name, class, lane) in LOCAL {
            let t = token(name).unwrap();
            let r = stack.client.get_as("/orders/1", &t, &[]).unwrap();
            let ctx = format!(
                "{what}, round {round}, {name} ({class}, local):\n{}\n{}",
                r.describe(),
                stack.logs()
            );
            within_timeout(&r, &ctx);
            slowest = slowest.max(r.elapsed);
            assert_eq!(r.status, 200, "{ctx}");
            let v = r.json().unwrap();
            assert_eq!(
                (v["class"].as_str(), v["lane"].as_str()),
                (Some(class), Some(lane)),
                "{ctx}"
            );
            let reason = r
                .header("x-laneguard-degraded")
                .unwrap_or_else(|| panic!("no x-laneguard-degraded header\n{ctx}"));
            assert!(!reason.is_empty(), "{ctx}");
        }
    }
    slowest
}

#[test]
fn service_stopped_each_class_follows_its_failure_mode_and_recovers_after_restart() {
    let mut stack = Stack::start("failure-stopped", &policy()).unwrap();
    // Stop the service before any request, so no worker holds leased capacity.
    stack.service.stop();
    assert_failure_modes(&stack, "service stopped");

    // The service comes back on the same port: decisions are central again (no degraded
    // marker) once Envoy reconnects. Polled, bounded.
    stack.service.restart().unwrap();
    let web = token("NORTHWIND_WEB").unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = stack.client.get_as("/orders/1", &web, &[]).unwrap();
        within_timeout(&r, &stack.logs());
        if r.status == 200 && r.header("x-laneguard-degraded").is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still degraded 15 s after the service restarted\n{}\n{}\n{}",
            r.describe(),
            stack.service.logs(),
            stack.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let export = token("NORTHWIND_EXPORT").unwrap();
    let r = stack.client.get_as("/exports/daily", &export, &[]).unwrap();
    assert_eq!(
        r.status,
        200,
        "export after the restart\n{}\n{}",
        r.describe(),
        stack.logs()
    );
}

#[test]
fn hanging_service_times_out_into_the_failure_mode() {
    let hole = BlackHole::start().unwrap();
    let port = hole.port();
    let stack = Stack::start_with(
        "failure-hanging",
        &policy(),
        EnvoyOptions::default(),
        |cfg| config::point_cluster(cfg, RLS_CLUSTER, port),
    )
    .unwrap();
    let slowest = assert_failure_modes(&stack, "service hangs");
    assert!(
        hole.connections() > 0,
        "Envoy never connected to the hanging service\n{}",
        stack.logs()
    );
    // The requests did wait for the service (this exercised the timeout, not a fast
    // connection failure), and no longer than the timeout allows (checked per request).
    assert!(
        slowest >= SERVICE_TIMEOUT / 2,
        "no request waited for the hanging service (slowest {slowest:?})\n{}",
        stack.logs()
    );
}

#[test]
fn unknown_service_cluster_takes_the_failure_mode() {
    let stack = Stack::start_with(
        "failure-unknown-cluster",
        &policy(),
        EnvoyOptions::default(),
        |cfg| {
            config::edit_policy(cfg, |p| {
                set_path(p, &["service", "cluster"], "no_such_cluster".into())
            })
        },
    )
    .unwrap();
    assert_failure_modes(&stack, "unknown cluster");
}

/// `local` is not `open`: with the service down, a `local` class is limited on the worker's
/// own buckets at `service.local_share` of its rates (interactive 50/s burst 50 at share 0.1:
/// 5/s burst 5), while an `open` class would let everything through.
#[test]
fn service_stopped_local_failure_mode_limits_at_the_local_share() {
    let policy = policy().replace(
        "  timeout_ms: 200\n",
        "  timeout_ms: 200\n  local_share: 0.1\n",
    );
    assert!(
        policy.contains("local_share: 0.1"),
        "fast.yaml changed shape"
    );
    let mut stack = Stack::start("failure-local-share", &policy).unwrap();
    stack.service.stop();
    let web = token("NORTHWIND_WEB").unwrap();
    let start = Instant::now();
    let replies: Vec<Reply> = (0..40)
        .map(|_| stack.client.get_as("/orders/1", &web, &[]).unwrap())
        .collect();
    let elapsed = start.elapsed().as_secs_f64();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    let ctx = format!(
        "{ok} admitted, {} limited of 40 in {elapsed:.2} s\n{}\n{}",
        limited.len(),
        replies.last().map(Reply::describe).unwrap_or_default(),
        stack.logs()
    );
    assert_eq!(ok + limited.len(), 40, "only 200 or 429\n{ctx}");
    assert!(ok >= 5, "less than the local burst was admitted\n{ctx}");
    assert!(
        !limited.is_empty(),
        "local never limited: it behaved like open\n{ctx}"
    );
    assert!(
        ok as f64 <= 5.0 + 5.0 * elapsed,
        "local admitted more than its share (5/s x {elapsed:.2} s + 5)\n{ctx}"
    );
    // Admitted without the service: marked degraded. (Once the mirror shows no room, a
    // refusal is local, without a call, like any local refusal.)
    for r in replies.iter().filter(|r| r.status == 200) {
        assert!(
            r.header("x-laneguard-degraded").is_some(),
            "an admission without the service must be marked degraded\n{}\n{ctx}",
            r.describe()
        );
    }
    assert_eq!(limited[0].json().unwrap()["class"], "interactive", "{ctx}");
}

/// A service outage under load writes about one warning a second, not one a request: the
/// million-tenant soak wrote 500,288 "answered gRPC status 14" lines in four minutes. The
/// lines held back are counted in the next one, and the filter's counters keep every error.
#[test]
fn an_outage_writes_one_warning_a_second_not_one_a_request() {
    let mut stack = Stack::start("failure-log-gate", &policy()).unwrap();
    stack.service.stop();
    let web = token("NORTHWIND_WEB").unwrap();
    let started = Instant::now();
    let mut sent = 0u64;
    // Past two seconds, so that a second line says how many the first held back; bounded.
    while sent < 3_000 && started.elapsed() < Duration::from_millis(2_500) {
        let r = stack.client.get_as("/orders/1", &web, &[]).unwrap();
        within_timeout(&r, &stack.logs());
        assert!(
            matches!(r.status, 200 | 429),
            "interactive fails local\n{}\n{}",
            r.describe(),
            stack.logs()
        );
        sent += 1;
    }
    let seconds = started.elapsed().as_secs() + 1;
    // Failed calls, counted when they fail (not batched). Fewer than the requests: the
    // worker refuses locally once its local share is spent, without a call.
    let errors = stack
        .envoy
        .counter_sum("laneguard", "laneguard.service_error.")
        .unwrap();
    let log = stack.envoy.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("laneguard: rate-limit service answered gRPC status")
                || l.contains("laneguard: cannot call")
        })
        .collect();
    // One worker VM, two kinds of line (the call could not be sent, or came back non-OK),
    // at most one of each a second, plus one for a second boundary.
    assert!(
        !warnings.is_empty() && warnings.len() as u64 <= 2 * (seconds + 1),
        "{} warnings for {sent} failed requests in {seconds} s:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    assert!(
        errors > warnings.len() as u64,
        "the outage must fail more calls than it writes lines for the test to mean anything: \
         {errors} failed calls, {} warnings",
        warnings.len()
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("more like it since the last such line")),
        "{errors} failed calls and no warning says how many were held back:\n{}",
        warnings.join("\n")
    );
}
