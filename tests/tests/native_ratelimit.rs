//! Envoy's own `envoy.filters.http.ratelimit` against laneguard-service: the service is a
//! standard RLS v3 backend. Config: `envoy/native-ratelimit.yaml`, with the service started
//! on `--config envoy/native-ratelimit.service.yaml` (per-tenant limits from `x-tenant`).

// Test code: a failed unwrap or panic is a failed test (clippy.toml allows them inside
// #[test] functions; this extends that to the helpers of this file).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::{repo_root, NativeStack, RunDir};
use serde_yaml::Value;

const SERVICE_CONFIG: &str = "envoy/native-ratelimit.service.yaml";

/// The burst of a descriptor rule in the service config: (key, value) with value None for
/// the rule that applies to every value.
fn burst_of(key: &str, value: Option<&str>) -> u64 {
    let text = std::fs::read_to_string(repo_root().join(SERVICE_CONFIG)).unwrap();
    let doc: Value = serde_yaml::from_str(&text).unwrap();
    let rule = doc["descriptors"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|d| d["key"].as_str() == Some(key) && d["value"].as_str() == value)
        .unwrap_or_else(|| panic!("{SERVICE_CONFIG} has no rule for {key}={value:?}"));
    let rl = &rule["rate_limit"];
    rl["burst"]
        .as_u64()
        .or_else(|| rl["requests_per_unit"].as_u64())
        .unwrap()
}

#[test]
fn native_filter_limits_each_tenant_separately() {
    let dir = RunDir::new("native-ratelimit").unwrap();
    let service_config = repo_root().join(SERVICE_CONFIG).display().to_string();
    let native = NativeStack::start(dir, &["--config", &service_config], |_| Ok(())).unwrap();
    let (client, envoy, service) = (&native.client, &native.envoy, &native.service);

    // Quick requests (well inside one refill interval of a per-minute rule) for one tenant:
    // the burst is served, then Envoy answers 429.
    let burst = burst_of("tenant", None);
    let send = |tenant: &str, n: u64| -> Vec<laneguard_tests::Reply> {
        (0..n)
            .map(|_| client.get("/orders/1", &[("x-tenant", tenant)]).unwrap())
            .collect()
    };
    let one = send("t-one", burst + 5);
    let ok = one.iter().filter(|r| r.status == 200).count() as u64;
    let limited: Vec<_> = one.iter().filter(|r| r.status == 429).collect();
    let ctx = format!(
        "t-one: {ok} served, {} limited of {}\n{}\n{}",
        limited.len(),
        one.len(),
        service.logs(),
        envoy.logs()
    );
    assert!(!limited.is_empty(), "no request was limited\n{ctx}");
    // One extra token may refill while the requests run.
    assert!(
        (burst..=burst + 1).contains(&ok),
        "expected the burst of {burst} to be served\n{ctx}"
    );
    assert!(
        one.iter().all(|r| r.status == 200 || r.status == 429),
        "unexpected statuses\n{ctx}"
    );
    assert_eq!(
        limited[0].header("x-envoy-ratelimited"),
        Some("true"),
        "the 429 did not come from Envoy's ratelimit filter\n{}\n{ctx}",
        limited[0].describe()
    );

    // Another tenant has its own bucket.
    let two = send("t-two", 5);
    assert!(
        two.iter().all(|r| r.status == 200),
        "t-two was limited by t-one's traffic\n{ctx}"
    );

    // acme has a bigger plan (an exact-value rule): more than the default burst is served.
    let acme_burst = burst_of("tenant", Some("acme"));
    assert!(
        acme_burst > burst + 1,
        "the example config should give acme a bigger burst"
    );
    let acme = send("acme", burst + 2);
    assert!(
        acme.iter().all(|r| r.status == 200),
        "acme (burst {acme_burst}) was limited: {:?}\n{ctx}",
        acme.iter().map(|r| r.status).collect::<Vec<_>>()
    );
}
