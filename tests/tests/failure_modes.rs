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
