//! Redis goes away under the service: the service answers UNAVAILABLE fast (never hangs),
//! each class follows its failure mode, and decisions are central again once Redis is back.
//! Envoy's native ratelimit client sees the same UNAVAILABLE and applies its own
//! `failure_mode_deny`.
//!
//! Policy `tests/policies/valid/fast.yaml`: export fails closed (503); interactive fails
//! `local` (served from the worker's buckets, marked `x-laneguard-degraded`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::{test_policy, token, EnvoyOptions, RedisServer, RunDir, Stack};
use std::time::{Duration, Instant};

const SERVICE_TIMEOUT: Duration = Duration::from_millis(200);
const SLACK: Duration = Duration::from_secs(2);

#[test]
fn redis_down_takes_each_class_failure_mode_and_recovers() {
    let dir = RunDir::new("redis-down").unwrap();
    let mut redis = RedisServer::start(&dir).unwrap();
    let url = redis.url();
    let stack = Stack::start_in(
        dir,
        &test_policy("valid/fast.yaml").unwrap(),
        // No leases: every request reaches the service (a lease granted before Redis went
        // away would rightly keep serving locally until it expires).
        &[
            "--store",
            &url,
            "--redis-timeout-ms",
            "100",
            "--grants",
            "off",
        ],
        EnvoyOptions::default(),
        |_| Ok(()),
    )
    .unwrap();
    let web = token("NORTHWIND_WEB").unwrap();
    let export = token("NORTHWIND_EXPORT").unwrap();

    // Redis up: central decisions, nothing degraded.
    let r = stack.client.get_as("/orders/1", &web, &[]).unwrap();
    assert_eq!(r.status, 200, "{}\n{}", r.describe(), stack.logs());
    assert!(
        r.header("x-laneguard-degraded").is_none(),
        "{}",
        r.describe()
    );

    redis.stop();
    for round in 0..3 {
        let r = stack.client.get_as("/orders/1", &web, &[]).unwrap();
        let ctx = format!(
            "round {round}, interactive:\n{}\n{}",
            r.describe(),
            stack.logs()
        );
        assert!(
            r.elapsed < SERVICE_TIMEOUT + SLACK,
            "took {:?}\n{ctx}",
            r.elapsed
        );
        assert_eq!(r.status, 200, "interactive fails local\n{ctx}");
        assert!(r.header("x-laneguard-degraded").is_some(), "{ctx}");

        let r = stack.client.get_as("/exports/daily", &export, &[]).unwrap();
        let ctx = format!("round {round}, export:\n{}\n{}", r.describe(), stack.logs());
        assert!(
            r.elapsed < SERVICE_TIMEOUT + SLACK,
            "took {:?}\n{ctx}",
            r.elapsed
        );
        assert_eq!(r.status, 503, "export fails closed\n{ctx}");
    }
    let errors = stack
        .envoy
        .counter_sum("laneguard", "laneguard.service_error")
        .unwrap();
    assert!(
        errors >= 6,
        "service errors are counted: {errors}\n{}",
        stack.logs()
    );

    // Redis back (same port, empty): the service reconnects, decisions are central again.
    redis.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = stack.client.get_as("/exports/daily", &export, &[]).unwrap();
        if r.status == 200 && r.header("x-laneguard-degraded").is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still degraded after Redis came back:\n{}\n{}",
            r.describe(),
            stack.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Envoy's native ratelimit client with `failure_mode_deny: true`: the service's
/// UNAVAILABLE (Redis down) makes Envoy refuse, promptly; with Redis back it serves again.
#[test]
fn native_failure_mode_deny_sees_unavailable() {
    use laneguard_tests::{config::http_filter_mut, repo_root, NativeStack};

    let dir = RunDir::new("redis-native-deny").unwrap();
    let mut redis = RedisServer::start(&dir).unwrap();
    let rules = repo_root().join("envoy/native-ratelimit.service.yaml");
    let rules = rules.display().to_string();
    let url = redis.url();
    let args = [
        "--config",
        &rules,
        "--store",
        &url,
        "--redis-timeout-ms",
        "100",
    ];
    let native = NativeStack::start(dir, &args, |cfg| {
        let filter = http_filter_mut(cfg, "envoy.filters.http.ratelimit")?;
        filter["typed_config"]["failure_mode_deny"] = serde_yaml::Value::Bool(true);
        Ok(())
    })
    .unwrap();
    let (client, envoy, service) = (&native.client, &native.envoy, &native.service);
    let get = || {
        client
            .get("/orders/1", &[("x-tenant", "t-native")])
            .unwrap()
    };

    assert_eq!(get().status, 200, "{}", envoy.logs());
    redis.stop();
    let r = get();
    assert!(
        r.status >= 500 && r.elapsed < SLACK,
        "failure_mode_deny refuses promptly when the service is UNAVAILABLE: {}\n{}\n{}",
        r.describe(),
        service.logs(),
        envoy.logs()
    );
    redis.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while get().status != 200 {
        assert!(
            Instant::now() < deadline,
            "not serving after Redis came back\n{}",
            envoy.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
