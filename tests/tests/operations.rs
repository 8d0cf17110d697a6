//! Operability through real Envoy and the real service: shadow rollout, the queue and
//! fallback-route fallbacks, audit records (in the access log and in the service's
//! hash-chained log, read back with `laneguard-audit`), and bounded Prometheus stats.
//!
//! Policies: `tests/policies/valid/operations.yaml` (its comments give the arithmetic) and
//! `tests/policies/valid/cardinality.yaml` (the Prometheus test).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::config::remove_http_filter;
use laneguard_tests::{test_policy, token, Client, EnvoyOptions, Reply, RunDir, Stack};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A stack whose service keeps an audit log; returns it and the log's path.
fn stack(label: &str) -> (Stack, PathBuf) {
    let dir = RunDir::new(label).unwrap();
    let log = dir.file("audit.log");
    let log_arg = log.display().to_string();
    let stack = Stack::start_in(
        dir,
        &test_policy("valid/operations.yaml").unwrap(),
        &["--audit-log", &log_arg],
        EnvoyOptions::default(),
        |_| Ok(()),
    )
    .unwrap();
    (stack, log)
}

/// The audit records of the access log (its `audit=` field), polled until `pred` holds
/// for them (the access log is flushed every 50 ms).
fn access_records(stack: &Stack, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let records: Vec<Value> = stack
            .envoy
            .access_log()
            .lines()
            .filter_map(|l| l.split_once(" audit=").map(|(_, a)| a.trim().to_string()))
            .filter(|a| a.starts_with('{'))
            .filter_map(|a| serde_json::from_str(&a).ok())
            .collect();
        if pred(&records) || Instant::now() > deadline {
            return records;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn audit_cli(args: &[&str]) -> (i32, String) {
    laneguard_tests::audit_cli(args).unwrap()
}

/// `laneguard-audit query LOG ARGS...` as records, polled until there are `want`
/// (the filter ships records from its root tick).
fn query_log(log: &Path, args: &[&str], want: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let path = log.display().to_string();
    loop {
        let mut all = vec!["query", path.as_str()];
        all.extend_from_slice(args);
        let (code, out) = audit_cli(&all);
        assert_eq!(code, 0, "laneguard-audit query failed: {out}");
        let records: Vec<Value> = out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if records.len() >= want || Instant::now() > deadline {
            return records;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One filter counter, by its exact name (`laneguard.class.repair.near_miss`).
fn counter(stack: &Stack, name: &str) -> u64 {
    let full = format!("wasmcustom.{name}");
    stack
        .envoy
        .stats("laneguard")
        .unwrap()
        .iter()
        .filter(|(k, _)| *k == full)
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum()
}

fn echo_lane(r: &Reply) -> String {
    r.json().unwrap_or_default()["lane"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_class_in_shadow_is_never_blocked_and_its_would_be_limits_are_evidence() {
    let (stack, log) = stack("ops-shadow");
    // Integration is active first: it is what the repair lane collides with.
    let erp = token("NORTHWIND_ERP").unwrap();
    assert_eq!(
        stack.client.get_as("/orders/1", &erp, &[]).unwrap().status,
        200
    );

    // The repair lane holds 3; six quick requests: three fit, three would have been limited.
    let recon = token("NORTHWIND_RECON").unwrap();
    let mut shadowed = Vec::new();
    for i in 0..6 {
        let r = stack.client.get_as("/orders/1", &recon, &[]).unwrap();
        let ctx = format!("request {i}: {}\n{}", r.describe(), stack.logs());
        assert_eq!(r.status, 200, "a shadowed class is never blocked\n{ctx}");
        assert_eq!(echo_lane(&r), "protected", "{ctx}");
        assert!(
            r.header("ratelimit").is_some(),
            "headers are sent in shadow\n{ctx}"
        );
        if let Some(b) = r.header("x-laneguard-shadow-limited") {
            assert_eq!(b, "reserve:repair", "{ctx}");
            shadowed.push(i);
        }
    }
    assert_eq!(shadowed, vec![3, 4, 5], "{}", stack.logs());

    // Stats: by class and by budget, the near miss, and the collision evidence.
    let stats = stack.envoy.stats("laneguard").unwrap();
    let ctx = format!("{stats:?}\n{}", stack.logs());
    assert_eq!(
        counter(&stack, "laneguard.class.repair.shadow_limited"),
        3,
        "{ctx}"
    );
    assert_eq!(
        counter(
            &stack,
            "laneguard.class.repair.budget.reserve.shadow_limited"
        ),
        3,
        "{ctx}"
    );
    assert_eq!(
        counter(&stack, "laneguard.class.repair.limited"),
        0,
        "{ctx}"
    );
    assert_eq!(
        counter(&stack, "laneguard.class.repair.near_miss"),
        1,
        "{ctx}"
    );
    assert_eq!(
        counter(&stack, "laneguard.collision.repair.integration"),
        1,
        "integration was active when the repair lane was squeezed\n{ctx}"
    );
    assert_eq!(
        counter(&stack, "laneguard.collision.repair.interactive"),
        0,
        "{ctx}"
    );

    // Audit records: in the access log and in the service's log, with mode shadow.
    let access = access_records(&stack, |r| {
        r.iter()
            .filter(|x| x["events"][0] == "shadow_limited")
            .count()
            >= 3
    });
    let shadow: Vec<&Value> = access
        .iter()
        .filter(|x| x["events"][0] == "shadow_limited")
        .collect();
    assert_eq!(
        shadow.len(),
        3,
        "access log records: {access:?}\n{}",
        stack.logs()
    );
    let logged = query_log(
        &log,
        &["--event", "shadow_limited", "--tenant", "northwind"],
        3,
    );
    assert_eq!(logged.len(), 3, "{logged:?}\n{}", stack.logs());
    for r in &logged {
        assert_eq!(r["mode"], "shadow", "{r}");
        assert_eq!(r["bucket"], "reserve:repair", "{r}");
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["principal"], "recon", "{r}");
        assert!(r.get("fallback").is_none(), "nothing fired in shadow: {r}");
        assert_eq!(r["active_classes"][0], "integration", "{r}");
    }
    let near = query_log(&log, &["--event", "near_miss"], 1);
    assert_eq!(near.len(), 1, "{near:?}");
    assert!(
        near[0]["buckets"][0]["used_pct"].as_u64().unwrap() >= 90,
        "{}",
        near[0]
    );
}

#[test]
fn queue_waits_for_the_refill_and_refuses_a_wait_beyond_the_maximum() {
    let (stack, _log) = stack("ops-queue");
    let web = token("NORTHWIND_WEB").unwrap();
    // Spend the burst (1).
    let r = stack.client.get_as("/orders/1", &web, &[]).unwrap();
    assert_eq!(r.status, 200, "{}\n{}", r.describe(), stack.logs());

    // Two at once: one waits ~1 s for the refill (within max_wait_ms 1500) and gets
    // through; the other would wait ~2 s and is refused at once, with Retry-After.
    let base = stack.client.base().to_string();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (base, web) = (base.clone(), web.clone());
            std::thread::spawn(move || Client::new(base).get_as("/orders/1", &web, &[]).unwrap())
        })
        .collect();
    let mut replies: Vec<Reply> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    replies.sort_by_key(|r| r.status);
    let ctx = format!(
        "{}\n---\n{}\n{}",
        replies[0].describe(),
        replies[1].describe(),
        stack.logs()
    );
    let (queued, refused) = (&replies[0], &replies[1]);
    assert_eq!((queued.status, refused.status), (200, 429), "{ctx}");

    assert_eq!(
        queued.header("x-laneguard-fallback"),
        Some("queue"),
        "{ctx}"
    );
    let waited: u64 = queued
        .header("x-laneguard-queued-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no x-laneguard-queued-ms\n{ctx}"));
    assert!((1..=1500).contains(&waited), "queued {waited} ms\n{ctx}");
    // It was held, not answered early (a lower bound, which no slowness can break).
    assert!(
        queued.elapsed >= Duration::from_millis(waited * 8 / 10),
        "answered after {:?} but should have waited {waited} ms\n{ctx}",
        queued.elapsed
    );
    assert_eq!(
        echo_lane(queued),
        "shared",
        "it reached the upstream\n{ctx}"
    );

    assert_eq!(
        refused.header("x-laneguard-fallback"),
        Some("reject"),
        "{ctx}"
    );
    let retry: u64 = refused
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no integer Retry-After\n{ctx}"));
    assert!((1..=3).contains(&retry), "Retry-After {retry}\n{ctx}");

    assert_eq!(
        counter(&stack, "laneguard.class.interactive.fallback.queue"),
        1,
        "{ctx}"
    );
    assert_eq!(
        counter(&stack, "laneguard.class.interactive.fallback.reject"),
        1,
        "{ctx}"
    );
    assert_eq!(counter(&stack, "laneguard.queue.resumed"), 1, "{ctx}");
}

#[test]
fn fallback_route_reaches_the_fallback_cluster() {
    let (stack, _log) = stack("ops-route");
    let export = token("NORTHWIND_EXPORT").unwrap();
    let first = stack.client.get_as("/reports/1", &export, &[]).unwrap();
    assert_eq!(first.status, 200, "{}\n{}", first.describe(), stack.logs());
    assert_eq!(echo_lane(&first), "shared");

    let r = stack.client.get_as("/reports/1", &export, &[]).unwrap();
    let ctx = format!("{}\n{}", r.describe(), stack.logs());
    assert_eq!(r.status, 200, "{ctx}");
    assert_eq!(echo_lane(&r), "fallback", "rerouted\n{ctx}");
    assert_eq!(
        r.header("x-laneguard-fallback"),
        Some("fallback_route"),
        "{ctx}"
    );
    let upstream = stack
        .envoy
        .counter_sum(
            "upstream_fallback",
            "cluster.upstream_fallback.upstream_rq_total",
        )
        .unwrap();
    assert_eq!(upstream, 1, "one request went to upstream_fallback\n{ctx}");
    let recs = access_records(&stack, |r| !r.is_empty());
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["fallback"], "fallback_route");
    assert_eq!(
        recs[0]["events"],
        serde_json::json!(["limited", "degraded"])
    );
}

#[test]
fn an_audit_record_answers_the_four_questions_for_a_429() {
    let (stack, log) = stack("ops-audit");
    let erp = token("NORTHWIND_ERP").unwrap();
    for _ in 0..2 {
        assert_eq!(
            stack
                .client
                .get_as("/orders/7?page=2", &erp, &[])
                .unwrap()
                .status,
            200
        );
    }
    let r = stack.client.get_as("/orders/7?page=2", &erp, &[]).unwrap();
    let ctx = format!("{}\n{}", r.describe(), stack.logs());
    assert_eq!(r.status, 429, "{ctx}");
    let id = r.json_str("request_id");
    assert!(!id.is_empty(), "the 429 body carries the request id\n{ctx}");

    // From the service's audit log, by the caller's request id.
    let found = query_log(&log, &["--caller", &id], 1);
    assert_eq!(found.len(), 1, "{found:?}\n{ctx}");
    let rec = &found[0];
    let ctx = format!("{rec:#}\n{ctx}");
    // 1. Which bucket tripped.
    assert_eq!(rec["bucket"], "class:integration", "{ctx}");
    // 2. Which caller drove it.
    assert_eq!(rec["tenant"], "northwind", "{ctx}");
    assert_eq!(rec["principal"], "erp", "{ctx}");
    assert!(rec["user"].as_str().is_some_and(|u| !u.is_empty()), "{ctx}");
    assert_eq!(rec["request_id"], id.as_str(), "{ctx}");
    assert_eq!(rec["request"]["path"], "/orders/7", "{ctx}");
    assert_eq!(rec["class"]["granted"], "integration", "{ctx}");
    // 3. How close each bucket was: level against ceiling, for every bucket touched.
    let buckets = rec["buckets"].as_array().unwrap();
    let names: Vec<&str> = buckets
        .iter()
        .filter_map(|b| b["bucket"].as_str())
        .collect();
    assert_eq!(names, ["shared", "class:integration"], "{ctx}");
    let class = &buckets[1];
    assert_eq!(
        (class["used"].as_u64(), class["burst"].as_u64()),
        (Some(2), Some(2)),
        "{ctx}"
    );
    assert_eq!(
        (class["limit"].as_u64(), class["window_s"].as_u64()),
        (Some(6), Some(60)),
        "{ctx}"
    );
    assert_eq!(class["room"], false, "{ctx}");
    assert_eq!(buckets[0]["room"], true, "{ctx}");
    // 4. Which fallback fired, and what the caller got.
    assert_eq!(rec["fallback"], "reject", "{ctx}");
    assert_eq!(rec["status"], 429, "{ctx}");
    assert_eq!(rec["mode"], "enforce", "{ctx}");
    assert!(
        ["local", "central"].contains(&rec["path"].as_str().unwrap_or("")),
        "{ctx}"
    );
    assert!(rec["time"].as_str().unwrap().ends_with('Z'), "{ctx}");

    // The same record is on the request's access-log line.
    let access = access_records(&stack, |r| r.iter().any(|x| x["request_id"] == id.as_str()));
    let line = access.iter().find(|x| x["request_id"] == id.as_str());
    assert_eq!(
        line.map(|l| &l["bucket"]),
        Some(&rec["bucket"]),
        "{access:?}"
    );

    // Query by tenant, bucket and time range.
    let by_bucket = query_log(
        &log,
        &[
            "--tenant",
            "northwind",
            "--bucket",
            "class:integration",
            "--since",
            "2020-01-01",
        ],
        1,
    );
    assert_eq!(by_bucket.len(), 1, "{by_bucket:?}");
    let none = query_log(&log, &["--until", "2020-01-01"], 0);
    assert!(none.is_empty(), "{none:?}");
}

#[test]
fn the_hash_chain_detects_one_edited_line() {
    let (stack, log) = stack("ops-chain");
    let erp = token("NORTHWIND_ERP").unwrap();
    for _ in 0..6 {
        stack.client.get_as("/orders/1", &erp, &[]).unwrap();
    }
    let records = query_log(&log, &[], 4);
    assert_eq!(records.len(), 4, "{records:?}\n{}", stack.logs());
    let path = log.display().to_string();
    let (code, out) = audit_cli(&["verify", &path]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 4 records"), "{out}");

    // Edit one line: the principal of the third record.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[2] = lines[2].replacen("\"principal\":\"erp\"", "\"principal\":\"web\"", 1);
    assert_ne!(
        lines[2],
        text.lines().nth(2).unwrap(),
        "the edit changed the line"
    );
    let edited = log.with_file_name("audit.edited.log");
    std::fs::write(&edited, lines.join("\n") + "\n").unwrap();
    let (code, out) = audit_cli(&["verify", &edited.display().to_string()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("line 3"), "the edited line is named: {out}");
}

#[test]
fn prometheus_shows_the_stats_and_random_tenants_add_no_series() {
    let policy = test_policy("valid/cardinality.yaml").unwrap();
    // Send identity headers directly: without header_mutation and jwt_authn any tenant id
    // reaches the filter.
    let stack = Stack::start_with("ops-cardinality", &policy, EnvoyOptions::default(), |cfg| {
        remove_http_filter(cfg, "envoy.filters.http.header_mutation")?;
        remove_http_filter(cfg, "envoy.filters.http.jwt_authn")
    })
    .unwrap();
    let admin = stack.envoy.admin().clone();
    let series = || -> Vec<String> {
        let body = admin.get("/stats/prometheus", &[]).unwrap().body;
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| l.rsplit_once(' ').map_or(l, |(name, _)| name))
            .map(|name| name.strip_suffix("{}").unwrap_or(name).to_string())
            .collect()
    };
    let send = |tenants: std::ops::Range<u32>, threads: u32| {
        let base = stack.client.base().to_string();
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let base = base.clone();
                let tenants = tenants.clone();
                std::thread::spawn(move || {
                    let c = Client::new(base);
                    let mut statuses = std::collections::BTreeMap::new();
                    for i in tenants.filter(|i| i % threads == t) {
                        let tenant = format!("rnd{i:08x}");
                        let r = c
                            .get(
                                "/orders/1",
                                &[
                                    ("x-laneguard-tenant", &tenant),
                                    ("x-laneguard-principal", "web"),
                                    ("x-laneguard-user", &tenant),
                                    ("x-model", "m1"),
                                ],
                            )
                            .unwrap();
                        *statuses.entry(r.status).or_insert(0u32) += 1;
                    }
                    statuses
                })
            })
            .collect();
        let mut all = std::collections::BTreeMap::new();
        for h in handles {
            for (k, v) in h.join().unwrap() {
                *all.entry(k).or_insert(0u32) += v;
            }
        }
        all
    };
    // Warm up: the model's capacity runs out, so both 200 and 429 have happened.
    let warm = send(0..20, 1);
    assert!(
        warm.contains_key(&200) && warm.contains_key(&429),
        "{warm:?}\n{}",
        stack.logs()
    );
    let before = series();

    let wanted = [
        "laneguard_allowed",
        "laneguard_limited",
        "laneguard_shadow_limited",
        // Labelled by envoy/demo/envoy.yaml's stats_config.stats_tags.
        r#"laneguard_class_allowed{class="interactive"}"#,
        r#"laneguard_class_budget_limited{class="interactive",budget="model_total"}"#,
        r#"laneguard_class_fallback{class="interactive",fallback="reject"}"#,
        r#"laneguard_class_near_miss{class="repair"}"#,
        r#"laneguard_collision{class="repair",rival="interactive"}"#,
        r#"laneguard_tenant_limited{tenant="acme"}"#,
        r#"laneguard_fallback{fallback="reject"}"#,
        "laneguard_forged_class",
        "laneguard_service_error_timeout",
        "laneguard_audit_dropped",
    ];
    for w in wanted {
        assert!(
            before.iter().any(|s| s == w),
            "{w} is not in the Prometheus scrape: {:?}",
            before
                .iter()
                .filter(|s| s.starts_with("laneguard_"))
                .collect::<Vec<_>>()
        );
    }
    let limited_before = counter(
        &stack,
        "laneguard.class.interactive.budget.model_total.limited",
    );

    let flood = send(20..10_020, 4);
    let after = series();
    let ctx = format!("statuses {flood:?}\n{}", stack.logs());
    assert_eq!(flood.values().sum::<u32>(), 10_000, "{ctx}");
    assert!(
        counter(
            &stack,
            "laneguard.class.interactive.budget.model_total.limited"
        ) > limited_before,
        "the flood reached the limited path\n{ctx}"
    );
    let new: Vec<&String> = after.iter().filter(|s| !before.contains(s)).collect();
    assert!(
        new.is_empty(),
        "10,000 tenant ids added series: {new:?}\n{ctx}"
    );
    assert_eq!(after.len(), before.len(), "{ctx}");
    assert!(
        !after.iter().any(|s| s.contains("rnd")),
        "a tenant id appears in a series name\n{ctx}"
    );

    // The Grafana dashboard is valid JSON, and every series its queries name is in this
    // scrape (names without labels; histograms by their _bucket series).
    let names: std::collections::BTreeSet<&str> = after
        .iter()
        .map(|s| s.split('{').next().unwrap_or(s))
        .collect();
    let path = laneguard_tests::repo_root().join("deploy/grafana/laneguard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    for expr in &exprs {
        let series = promql_series(expr);
        assert!(!series.is_empty(), "no series in {expr}");
        for name in series {
            assert!(
                names.contains(name.as_str()),
                "the dashboard queries {name} ({expr}), which the scrape does not have"
            );
        }
    }
}

/// The series names a PromQL expression reads: identifiers starting with `laneguard_` or
/// `envoy_`, outside label matchers and `by (...)` groupings.
fn promql_series(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth_braces = 0;
    let mut word = String::new();
    let mut after_by = false;
    let mut in_by = false;
    for ch in expr.chars().chain(std::iter::once(' ')) {
        if ch.is_ascii_alphanumeric() || ch == '_' || ch == ':' {
            word.push(ch);
            continue;
        }
        if !word.is_empty() {
            let is_series = word.starts_with("laneguard_") || word.starts_with("envoy_");
            if depth_braces == 0 && !in_by && is_series {
                out.push(word.clone());
            }
            after_by = word == "by" || word == "without";
            word.clear();
        }
        match ch {
            '{' => depth_braces += 1,
            '}' => depth_braces -= 1,
            '(' if after_by => in_by = true,
            ')' if in_by => in_by = false,
            c if !c.is_whitespace() => after_by = false,
            _ => {}
        }
    }
    out
}
