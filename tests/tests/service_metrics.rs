//! The service's own Prometheus endpoint (`--metrics-addr`), scraped while real traffic goes
//! through a real Envoy and the real filter to the real service: every documented series is
//! there from the start, decisions move by outcome, every decision that reached the store
//! is in the latency histogram, audit records are counted, the published head is the one
//! `laneguard-audit verify` finds, and with Redis the round trips, the store errors of an
//! outage and the reports after it move (issue 11 §2, issue 14 item 10).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::{
    poll, repo_root, test_policy, token, EnvoyOptions, NativeStack, RedisServer, RunDir, Scrape,
    Stack,
};
use std::time::Duration;

/// Every series `docs/operations.md` ("Service metrics") lists, as exposed before any
/// traffic (labelled ones with one of their values).
const SERIES: [&str; 17] = [
    "laneguard_service_decisions_total{outcome=\"ok\"}",
    "laneguard_service_decisions_total{outcome=\"over_limit\"}",
    "laneguard_service_decisions_total{outcome=\"unavailable\"}",
    "laneguard_service_grants_total",
    "laneguard_service_slots_total",
    "laneguard_service_granted_units_total",
    "laneguard_service_reports_total{outcome=\"ok\"}",
    "laneguard_service_reported_hits_total",
    "laneguard_service_refunds_total{outcome=\"ok\"}",
    "laneguard_service_refunded_units_total",
    "laneguard_service_store_duration_seconds_count{op=\"decide\"}",
    "laneguard_service_store_errors_total{kind=\"unavailable\"}",
    "laneguard_service_redis_round_trips_total",
    "laneguard_service_audit_records_total",
    "laneguard_service_audit_rejected_total",
    "laneguard_service_audit_head_seq",
    "laneguard_service_memory_buckets",
];

#[test]
fn service_metrics_move_with_real_traffic_and_publish_the_audit_head() {
    let dir = RunDir::new("service-metrics").unwrap();
    let log = dir.file("audit.log");
    let log_arg = log.display().to_string();
    let stack = Stack::start_in(
        dir,
        &test_policy("valid/operations.yaml").unwrap(),
        &["--metrics-addr", "127.0.0.1:0", "--audit-log", &log_arg],
        EnvoyOptions::default(),
        |_| Ok(()),
    )
    .unwrap();
    let url = stack.service.metrics_url().unwrap();
    let before = Scrape::get(&url).unwrap();
    for series in SERIES {
        before.must(series).unwrap();
    }
    assert_eq!(
        before.must("laneguard_service_audit_head_seq").unwrap(),
        0.0
    );

    // erp (integration, a burst of 2 per minute): 2 admitted, then 429s with an audit
    // record each. Scrape all the while (the requests are 100 ms apart, so the scrapes
    // overlap the traffic). The filter refuses locally once the service has said the
    // bucket is empty, so most 429s never reach the service: the native-filter test below
    // counts refusals exactly.
    let erp = token("NORTHWIND_ERP").unwrap();
    let client = stack.client.clone();
    let traffic = std::thread::spawn(move || {
        (0..30)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(100));
                client.get_as("/orders/1", &erp, &[]).map(|r| r.status)
            })
            .collect::<Vec<_>>()
    });
    let mut scrapes = 0;
    let mut last_decisions = 0.0;
    while !traffic.is_finished() {
        let s = Scrape::get(&url).unwrap();
        let decisions: f64 = s
            .family("laneguard_service_decisions_total")
            .iter()
            .map(|(_, v)| v)
            .sum();
        assert!(
            decisions >= last_decisions,
            "a counter went down:\n{}",
            s.text
        );
        last_decisions = decisions;
        scrapes += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let statuses: Vec<u16> = traffic
        .join()
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}\n{}",
        stack.logs()
    );
    assert_eq!(limited, 28, "{statuses:?}");
    assert!(scrapes >= 1);

    // Every 429's record reaches the log; the counter and the head follow it.
    let after = poll(Duration::from_secs(30), || {
        let s = Scrape::get(&url).ok()?;
        (s.value("laneguard_service_audit_records_total") == Some(limited as f64)).then_some(s)
    })
    .unwrap_or_else(|| {
        panic!(
            "audit_records_total never reached {limited}:\n{}\n{}",
            Scrape::get(&url).map(|s| s.text).unwrap_or_default(),
            stack.service.logs()
        )
    });
    let ok = after
        .must("laneguard_service_decisions_total{outcome=\"ok\"}")
        .unwrap();
    let over = after
        .must("laneguard_service_decisions_total{outcome=\"over_limit\"}")
        .unwrap();
    assert!(ok >= 1.0, "{}", after.text);
    // Each decision charged buckets in the store once, and was timed.
    assert_eq!(
        after
            .must("laneguard_service_store_duration_seconds_count{op=\"decide\"}")
            .unwrap(),
        ok + over,
        "{}",
        after.text
    );
    assert!(after.must("laneguard_service_grants_total").unwrap() <= ok);
    assert_eq!(
        after
            .must("laneguard_service_redis_round_trips_total")
            .unwrap(),
        0.0,
        "the memory store makes no round trips"
    );
    for (series, v) in after.family("laneguard_service_store_errors_total") {
        assert_eq!(v, 0.0, "{series}");
    }
    assert_eq!(
        after.must("laneguard_service_audit_head_seq").unwrap(),
        limited as f64
    );

    // The published head is the hash laneguard-audit verify ends on, and it accepts it
    // as the expected head.
    let (_, head) = after
        .family("laneguard_service_audit_head_info")
        .into_iter()
        .find_map(|(s, v)| {
            let hash = s.split_once("hash=\"")?.1.split_once('"')?.0.to_string();
            (v == 1.0).then_some(((), hash))
        })
        .unwrap_or_else(|| panic!("no audit_head_info:\n{}", after.text));
    assert_eq!(head.len(), 64, "{head}");
    let (code, out) =
        laneguard_tests::audit_cli(&["verify", "--expect-head", &head, &log_arg]).unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("head {head}")), "{out}");
}

#[test]
fn redis_round_trips_store_errors_and_reports_are_counted() {
    let dir = RunDir::new("service-metrics-redis").unwrap();
    let mut redis = RedisServer::start(&dir).unwrap();
    let redis_url = redis.url();
    let stack = Stack::start_in(
        dir,
        &test_policy("valid/fast.yaml").unwrap(),
        &[
            "--store",
            &redis_url,
            "--redis-timeout-ms",
            "100",
            "--grants",
            "off",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        EnvoyOptions::default(),
        |_| Ok(()),
    )
    .unwrap();
    let url = stack.service.metrics_url().unwrap();
    let web = token("NORTHWIND_WEB").unwrap();
    for _ in 0..3 {
        let r = stack.client.get_as("/orders/1", &web, &[]).unwrap();
        assert_eq!(r.status, 200, "{}\n{}", r.describe(), stack.logs());
    }
    let up = Scrape::get(&url).unwrap();
    let trips = up
        .must("laneguard_service_redis_round_trips_total")
        .unwrap();
    // One script call per decision at least (grants off: every request is a decision).
    assert!(trips >= 3.0, "{}", up.text);
    assert_eq!(
        up.must("laneguard_service_decisions_total{outcome=\"ok\"}")
            .unwrap(),
        3.0,
        "{}",
        up.text
    );

    // Redis down: interactive fails local (200, degraded); the service answers UNAVAILABLE
    // and counts the store errors.
    redis.stop();
    for _ in 0..3 {
        let r = stack.client.get_as("/orders/1", &web, &[]).unwrap();
        assert_eq!(r.status, 200, "{}", r.describe());
    }
    let down = Scrape::get(&url).unwrap();
    let unavailable = down
        .must("laneguard_service_decisions_total{outcome=\"unavailable\"}")
        .unwrap();
    assert!(unavailable >= 3.0, "{}", down.text);
    let errors: f64 = down
        .family("laneguard_service_store_errors_total")
        .iter()
        .map(|(_, v)| v)
        .sum();
    assert!(errors >= 3.0, "{}", down.text);

    // Redis back: the hits admitted while it was away are reported and counted.
    redis.restart().unwrap();
    let reported = poll(Duration::from_secs(60), || {
        let s = Scrape::get(&url).ok()?;
        let hits = s.value("laneguard_service_reported_hits_total")?;
        (hits >= 3.0).then_some(s)
    })
    .unwrap_or_else(|| {
        panic!(
            "no report of the degraded hits:\n{}\n{}",
            Scrape::get(&url).map(|s| s.text).unwrap_or_default(),
            stack.logs()
        )
    });
    assert!(
        reported
            .must("laneguard_service_reports_total{outcome=\"ok\"}")
            .unwrap()
            >= 1.0,
        "{}",
        reported.text
    );
}

#[test]
fn every_decision_of_envoys_native_filter_is_counted_by_outcome() {
    // Envoy's native ratelimit filter asks the service for every request: each 200 is one
    // `ok` decision and each 429 one `over_limit`.
    let dir = RunDir::new("service-metrics-native").unwrap();
    let config = repo_root()
        .join("envoy/native-ratelimit.service.yaml")
        .display()
        .to_string();
    let native = NativeStack::start(
        dir,
        &["--config", &config, "--metrics-addr", "127.0.0.1:0"],
        |_| Ok(()),
    )
    .unwrap();
    let url = native.service.metrics_url().unwrap();
    let statuses: Vec<u16> = (0..25)
        .map(|_| {
            native
                .client
                .get("/orders/1", &[("x-tenant", "t-metrics")])
                .unwrap()
                .status
        })
        .collect();
    let served = statuses.iter().filter(|s| **s == 200).count() as f64;
    let limited = statuses.iter().filter(|s| **s == 429).count() as f64;
    assert!(limited >= 1.0, "{statuses:?}");
    assert_eq!(served + limited, 25.0, "{statuses:?}");
    let s = Scrape::get(&url).unwrap();
    assert_eq!(
        s.must("laneguard_service_decisions_total{outcome=\"ok\"}")
            .unwrap(),
        served,
        "{}",
        s.text
    );
    assert_eq!(
        s.must("laneguard_service_decisions_total{outcome=\"over_limit\"}")
            .unwrap(),
        limited,
        "{}",
        s.text
    );
    assert_eq!(
        s.must("laneguard_service_store_duration_seconds_count{op=\"decide\"}")
            .unwrap(),
        25.0,
        "{}",
        s.text
    );
    assert_eq!(s.must("laneguard_service_grants_total").unwrap(), 0.0);
}
