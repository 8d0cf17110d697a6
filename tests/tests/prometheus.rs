//! A real Prometheus (Debian's package) scraping the demo's Envoy and laneguard-service, and
//! PromQL over its HTTP API: the per-class series exist with their labels and move during a
//! flood. Needs `prometheus` on PATH, so it is not part of `make test`: run
//! `make test-prometheus` (installs it with scripts/bootstrap.sh --with-prometheus).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use laneguard_tests::prometheus::{Prometheus, Target};
use laneguard_tests::traffic::{self, Stream};
use laneguard_tests::{token, EnvoyOptions, RunDir, Stack};

/// The admin port of a started Envoy (its admin client's base URL).
fn port_of(base: &str) -> u16 {
    base.rsplit(':').next().unwrap().parse().unwrap()
}

fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    false
}

#[test]
#[ignore = "needs Debian's prometheus: make test-prometheus"]
fn prometheus_sees_labelled_per_class_series_move_during_a_flood() {
    let policy = laneguard_tests::demo_policy().unwrap();
    let dir = RunDir::new("prometheus").unwrap();
    let stack = Stack::start_in(
        dir.clone(),
        &policy,
        &["--metrics-addr", "127.0.0.1:0"],
        EnvoyOptions::default(),
        |_| Ok(()),
    )
    .unwrap();
    let admin = port_of(stack.envoy.admin().base());
    let service_metrics = stack.service.metrics_url().unwrap();
    let service_port = port_of(service_metrics.trim_end_matches("/metrics"));
    let prom = Prometheus::start(
        &dir,
        &[
            Target {
                job: "envoy".into(),
                port: admin,
                path: "/stats/prometheus".into(),
            },
            Target {
                job: "service".into(),
                port: service_port,
                path: "/metrics".into(),
            },
        ],
    )
    .unwrap();
    for job in ["envoy", "service"] {
        let up = wait_for(Duration::from_secs(30), || {
            prom.query(&format!(r#"up{{job="{job}"}}"#))
                .is_ok_and(|r| r.iter().any(|(_, v)| *v == 1.0))
        });
        assert!(up, "prometheus never scraped {job}\n{}", prom.logs());
    }

    // The labelled series exist, one per class.
    let classes = prom.query("laneguard_class_allowed").unwrap();
    let names: Vec<String> = classes
        .iter()
        .filter_map(|(l, _)| l.get("class").and_then(|c| c.as_str()).map(String::from))
        .collect();
    for c in ["interactive", "integration", "repair", "recovery", "export"] {
        assert!(names.iter().any(|n| n == c), "no class={c}: {names:?}");
    }
    let limited = prom
        .query(r#"laneguard_class_budget_limited{class="integration",budget="class"}"#)
        .unwrap();
    assert_eq!(limited.len(), 1, "{limited:?}");
    let before = limited[0].1;

    // A flood of integration: its limited series moves, and allowed for integration too.
    let erp = token("NORTHWIND_ERP").unwrap();
    let streams = [Stream::new("erp flood", &erp, "/orders/1", 20.0)];
    let (results, _) = traffic::run(stack.client.base(), &streams, Duration::from_secs(4));
    let refused = results[0].count(429);
    assert!(refused > 0, "{}", results[0].summary());
    let moved = wait_for(Duration::from_secs(30), || {
        prom.query(r#"laneguard_class_budget_limited{class="integration",budget="class"}"#)
            .is_ok_and(|r| {
                r.first()
                    .is_some_and(|(_, v)| *v >= before + refused as f64)
            })
    });
    assert!(
        moved,
        "laneguard_class_budget_limited{{class=\"integration\",budget=\"class\"}} did not reach +{refused}: {:?}\n{}",
        prom.query(r#"laneguard_class_budget_limited{class="integration"}"#),
        prom.logs()
    );
    let rate = prom
        .query(r#"sum by (class) (increase(laneguard_class_allowed{class="integration"}[1m]))"#)
        .unwrap();
    assert!(
        rate.first().is_some_and(|(_, v)| *v > 0.0),
        "allowed for integration did not move: {rate:?}"
    );
    // The service's own series, from its scrape: its decisions moved during the flood.
    let decided = wait_for(Duration::from_secs(30), || {
        prom.query(r#"sum(laneguard_service_decisions_total{job="service"})"#)
            .is_ok_and(|r| r.first().is_some_and(|(_, v)| *v > 0.0))
    });
    assert!(
        decided,
        "laneguard_service_decisions_total did not move: {:?}",
        prom.query("laneguard_service_decisions_total")
    );
}
