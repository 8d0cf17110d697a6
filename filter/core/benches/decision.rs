//! Micro-benchmarks of one decision in the core engine, as the filter makes it on its
//! local path: `plan` (classify, pick the buckets, encode their keys) and then
//! `LocalTable::decide` (check every bucket, charge them all).
//!
//! Three request shapes touch 1, 3 and 6 buckets:
//! - 1: the tenant's shared pool only (a class without a budget, no other dimension);
//! - 3: shared pool, class budget, user;
//! - 6: shared pool, class budget, user, endpoint family, model allocation, model total.
//!
//! The clock advances 2 µs per iteration and the rates allow one request per µs, so every
//! decision is an admit: the path that runs for almost every request. `decide` alone (with
//! the plan built once) shows how much of a decision is planning. `make bench` runs these
//! with `cargo bench -p laneguard-core --bench decision` and copies the medians into
//! docs/benchmarks.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use laneguard_core::{parse, plan, LocalTable, Policy, RequestInfo};
use std::hint::black_box;

/// Rates far above one request per 2 µs, so nothing is ever refused.
const POLICY: &str = r#"
version: 1
classification: { default_class: plain }
classes:
  - { name: plain, consequence: time_sensitive }
  - { name: interactive, consequence: time_sensitive,
      budget: { per_second: 1000000, burst: 1000000 } }
  - { name: repair, consequence: repair, reserve: { per_second: 100000, burst: 100000 },
      borrow: true }
principals:
  - { name: web, default_class: interactive, may_declare: [interactive] }
tenants:
  default: { ceiling: { per_second: 4000000, burst: 4000000 } }
endpoint_families:
  - { name: reports, path_prefixes: [/reports], limit: { per_second: 1000000, burst: 1000000 } }
users: { limit: { per_second: 1000000, burst: 1000000 } }
models:
  header: x-model
  default: m1
  list:
    - name: m1
      capacity: { per_second: 4000000, burst: 4000000 }
      allocation: { share: 0.5, burst: 1000000 }
"#;

fn policy() -> Policy {
    match parse(POLICY) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("benches/decision.rs: the bench policy does not parse: {e}");
            std::process::exit(1);
        }
    }
}

/// A request that touches `buckets` buckets (1, 3 or 6) for `tenant`.
fn request(buckets: usize, tenant: &str) -> RequestInfo<'_> {
    match buckets {
        1 => RequestInfo {
            tenant: Some(tenant),
            principal: Some("batch"),
            method: "GET",
            path: "/orders/1",
            ..RequestInfo::default()
        },
        3 => RequestInfo {
            tenant: Some(tenant),
            principal: Some("web"),
            user: Some("alice"),
            method: "GET",
            path: "/orders/1",
            ..RequestInfo::default()
        },
        _ => RequestInfo {
            tenant: Some(tenant),
            principal: Some("web"),
            user: Some("alice"),
            method: "GET",
            path: "/reports/q3",
            model: Some("m1"),
            ..RequestInfo::default()
        },
    }
}

const STEP_NS: u64 = 2_000;
const START_NS: u64 = 1_700_000_000_000_000_000;

fn decision(c: &mut Criterion) {
    let policy = policy();
    let mut group = c.benchmark_group("decision");
    for n in [1usize, 3, 6] {
        // Check the shape once, so a policy edit cannot silently change what is measured.
        match plan(&policy, &request(n, "acme")) {
            Ok(p) if p.buckets.len() == n => {}
            Ok(p) => {
                eprintln!("expected {n} buckets, the plan has {}", p.buckets.len());
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("the bench request is rejected: {e:?}");
                std::process::exit(1);
            }
        }

        group.bench_with_input(BenchmarkId::new("plan_and_decide", n), &n, |b, &n| {
            let mut table = LocalTable::default();
            let mut now = START_NS;
            let req = request(n, "acme");
            b.iter(|| {
                now += STEP_NS;
                let allowed = match plan(&policy, black_box(&req)) {
                    Ok(p) => table.decide(&p, now, 1.0).0.allowed,
                    Err(_) => false,
                };
                black_box(allowed)
            });
        });

        group.bench_with_input(BenchmarkId::new("decide", n), &n, |b, &n| {
            let mut table = LocalTable::default();
            let mut now = START_NS;
            let Ok(p) = plan(&policy, &request(n, "acme")) else {
                return;
            };
            b.iter(|| {
                now += STEP_NS;
                black_box(table.decide(black_box(&p), now, 1.0).0.allowed)
            });
        });
    }

    // The same 3-bucket decision against a table that already holds 99,000 buckets
    // (33,000 tenants × 3; the default cap is 100,000): a big table costs hash lookups.
    group.bench_function(BenchmarkId::new("plan_and_decide_99k_buckets", 3), |b| {
        let mut table = LocalTable::default();
        let mut now = START_NS;
        let tenants: Vec<String> = (0..33_000).map(|i| format!("t{i}")).collect();
        for t in &tenants {
            now += STEP_NS;
            if let Ok(p) = plan(&policy, &request(3, t)) {
                table.decide(&p, now, 1.0);
            }
        }
        let mut i = 0usize;
        b.iter(|| {
            now += STEP_NS;
            i = (i + 7919) % tenants.len();
            let allowed = match plan(&policy, black_box(&request(3, &tenants[i]))) {
                Ok(p) => table.decide(&p, now, 1.0).0.allowed,
                Err(_) => false,
            };
            black_box(allowed)
        });
    });
    group.finish();
}

/// Buckets that stay live (not full again) for over a minute after one hit, and never trip
/// in a bench: one request per 86.4 s refills, burst 1000.
const LIVE_POLICY: &str = r#"
version: 1
classification: { default_class: plain }
classes:
  - { name: plain, consequence: time_sensitive }
tenants:
  default: { ceiling: { per_day: 1000, burst: 1000 } }
"#;

/// A new tenant's first request when the table is at its cap (100,000) and every bucket in
/// it is live: nothing is idle to prune, so the table must evict to make room. This is the
/// tenants part of `make bench` beyond the cap, in isolation.
fn table_at_cap(c: &mut Criterion) {
    let policy = match parse(LIVE_POLICY) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("benches/decision.rs: the live policy does not parse: {e}");
            std::process::exit(1);
        }
    };
    let mut group = c.benchmark_group("table");
    group.sample_size(10);
    group.bench_function(BenchmarkId::new("new_tenant_at_cap_all_live", 1), |b| {
        let mut table = LocalTable::default();
        let mut now = START_NS;
        let mut next = 0u64;
        let mut admit_new = |table: &mut LocalTable, now: u64| {
            next += 1;
            let tenant = format!("f{next}");
            match plan(&policy, &request(1, &tenant)) {
                Ok(p) => table.decide(&p, now, 1.0).0.allowed,
                Err(_) => false,
            }
        };
        while table.len() < 100_000 {
            now += STEP_NS;
            admit_new(&mut table, now);
        }
        b.iter(|| {
            now += STEP_NS;
            black_box(admit_new(&mut table, now))
        });
    });
    group.finish();
}

criterion_group!(benches, decision, table_at_cap);
criterion_main!(benches);
