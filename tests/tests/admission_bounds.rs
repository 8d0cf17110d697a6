//! Every admission path is bounded: a request let through by a shadow rule still pays the
//! enforced buckets beside it, a request degraded to the fallback route pays the route's
//! own budget, and a queued request is paid by a lease or a central decision before it is
//! released (issue 13, items 1, 3 and 2; the bounds are in docs/leases.md).
//!
//! Policy `tests/policies/valid/lanes.yaml` (northwind: shared pool 10/s burst 10,
//! integration budget 6/s, interactive 4/s, export 2/s), edited per test. One Envoy
//! worker, two for the queue.

// Test code: a failed unwrap or panic is a failed test (clippy.toml allows them inside
// #[test] functions; this extends that to the helpers of this file).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::traffic::{self, Stream, StreamResult};
use laneguard_tests::{test_policy, token, EnvoyOptions, Stack};
use serde_yaml::Value;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

const RUN: Duration = Duration::from_secs(4);
// From lanes.yaml.
const SHARED_PER_S: f64 = 10.0;
const SHARED_BURST: f64 = 10.0;
const EXPORT_PER_S: f64 = 2.0;
const INTERACTIVE_PER_S: f64 = 4.0;
const INTERACTIVE_BURST: f64 = 4.0;
const EXPORT_BURST: f64 = 2.0;
// Set below on the export class.
const ROUTE_PER_S: f64 = 3.0;
const ROUTE_BURST: f64 = 3.0;

/// The tests here measure admitted counts under a flood: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// lanes.yaml with `edit` applied.
fn lanes_with(edit: impl FnOnce(&mut Value)) -> String {
    let mut doc: Value = serde_yaml::from_str(&test_policy("valid/lanes.yaml").unwrap()).unwrap();
    edit(&mut doc);
    serde_yaml::to_string(&doc).unwrap()
}

fn class_mut<'a>(doc: &'a mut Value, name: &str) -> &'a mut serde_yaml::Mapping {
    doc["classes"]
        .as_sequence_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("lanes.yaml has no class {name}"))
        .as_mapping_mut()
        .unwrap()
}

fn body_field(body: &str, k: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v[k].as_str().unwrap_or_default().to_string()
}

fn only_200_or_429(r: &StreamResult, ctx: &str) {
    for o in &r.outcomes {
        assert!(
            o.status == 200 || o.status == 429,
            "{}: unexpected outcome {o:?}\n{ctx}",
            r.stream.name
        );
    }
}

/// `rollout.buckets.class: shadow` with the tenant's shared pool enforced. Before the fix,
/// once the (shadow) integration budget was full, every request was let through uncharged,
/// so the ERP flood was never limited at all.
#[test]
fn shadow_class_budget_does_not_switch_off_the_enforced_tenant_pool() {
    let _serial = serial();
    let policy = lanes_with(|doc| {
        doc.as_mapping_mut().unwrap().insert(
            "rollout".into(),
            serde_yaml::from_str("{ buckets: { class: shadow } }").unwrap(),
        );
    });
    let stack = Stack::start("shadow-rule-enforced-pool", &policy).unwrap();
    let erp = token("NORTHWIND_ERP").unwrap();

    // Within the pool, past the (shadow) class budget: let through, marked shadow-limited.
    let mut marked = 0;
    let mut replies = Vec::new();
    for _ in 0..9 {
        let r = stack.client.get_as("/orders/sync", &erp, &[]).unwrap();
        if r.status == 200 && r.header("x-laneguard-shadow-limited") == Some("class:integration") {
            marked += 1;
        }
        replies.push(r.describe());
    }
    assert!(
        marked > 0,
        "no request past the shadow class budget was marked x-laneguard-shadow-limited: \
         class:integration\n{}\n{}",
        replies.join("\n"),
        stack.logs()
    );

    // A flood: the enforced shared pool still binds.
    let streams = vec![Stream::new("erp", &erp, "/orders/sync", 40.0)];
    let (results, elapsed) = traffic::run(stack.client.base(), &streams, RUN);
    let erp = &results[0];
    let t = elapsed.as_secs_f64();
    let ctx = format!("elapsed {elapsed:?}\n{}\n{}", erp.summary(), stack.logs());
    eprintln!("shadow rule: {}", erp.summary());
    only_200_or_429(erp, &ctx);
    let admitted = erp.count(200) as f64;
    assert!(
        admitted <= SHARED_PER_S * t + SHARED_BURST,
        "the flood got {admitted} admitted past the enforced shared pool \
         ({SHARED_PER_S}/s x {t:.2}s + {SHARED_BURST})\n{ctx}"
    );
    assert!(erp.count(429) > 0, "the flood was never limited\n{ctx}");
    for o in erp.outcomes.iter().filter(|o| o.status == 429) {
        assert_eq!(
            body_field(&o.body, "bucket"),
            "shared",
            "a 429 must name the enforced bucket, not the shadow one: {}\n{ctx}",
            o.body
        );
    }
}

/// An export flood past its budget, with `fallbacks: [fallback_route, reject]` and a route
/// budget of 3/s burst 3. Before the fix every excess request went to the fallback cluster,
/// charged nowhere (an unlimited fallback lane).
#[test]
fn fallback_route_admits_at_most_its_own_budget_under_a_flood() {
    let _serial = serial();
    let policy = lanes_with(|doc| {
        let export = class_mut(doc, "export");
        export.insert(
            "fallbacks".into(),
            serde_yaml::from_str("[fallback_route, reject]").unwrap(),
        );
        export.insert(
            "fallback_route".into(),
            serde_yaml::from_str(&format!(
                "{{ budget: {{ per_second: {ROUTE_PER_S}, burst: {ROUTE_BURST} }} }}"
            ))
            .unwrap(),
        );
    });
    let stack = Stack::start("fallback-route-budget", &policy).unwrap();
    let streams = vec![Stream::new(
        "export",
        &token("NORTHWIND_EXPORT").unwrap(),
        "/exports/daily",
        30.0,
    )];
    let (results, elapsed) = traffic::run(stack.client.base(), &streams, RUN);
    let export = &results[0];
    let t = elapsed.as_secs_f64();
    let ctx = format!(
        "elapsed {elapsed:?}\n{}\n{}",
        export.summary(),
        stack.logs()
    );
    eprintln!("fallback route: {}", export.summary());
    only_200_or_429(export, &ctx);
    let on = |lane: &str| {
        export
            .outcomes
            .iter()
            .filter(|o| o.status == 200 && o.lane == lane)
            .count() as f64
    };
    let (shared, fallback) = (on("shared"), on("fallback"));
    assert!(
        fallback > 0.0,
        "nothing was sent to the fallback route\n{ctx}"
    );
    assert!(
        fallback <= ROUTE_PER_S * t + ROUTE_BURST,
        "the fallback route admitted {fallback} > its budget {ROUTE_PER_S}/s x {t:.2}s + \
         {ROUTE_BURST}\n{ctx}"
    );
    assert!(
        shared <= EXPORT_PER_S * t + EXPORT_BURST,
        "the shared lane admitted {shared} export requests > the export budget\n{ctx}"
    );
    assert_eq!(
        shared + fallback,
        export.count(200) as f64,
        "a 200 on neither lane\n{ctx}"
    );
    assert!(
        export.count(429) > 0,
        "past both budgets the flood must get 429s (reject follows the route)\n{ctx}"
    );
}

/// A queue fallback on two Envoy workers, flooded past the interactive budget (4/s burst 4).
/// Before the fix a queued request was charged only on its worker's mirror and reported
/// with the next reconciliation (10 s later), so each worker's queue admitted at the full
/// rate on its own: the fleet admitted about (workers + 1) × the budget.
#[test]
fn queued_requests_are_paid_centrally_so_two_workers_queues_stay_within_the_budget() {
    let _serial = serial();
    let policy = lanes_with(|doc| {
        let interactive = class_mut(doc, "interactive");
        interactive.insert(
            "fallbacks".into(),
            serde_yaml::from_str("[queue, reject]").unwrap(),
        );
        interactive.insert(
            "queue".into(),
            serde_yaml::from_str("{ max_wait_ms: 1000, max_depth: 64 }").unwrap(),
        );
    });
    let stack = Stack::start_with(
        "queue-paid-centrally",
        &policy,
        EnvoyOptions {
            concurrency: 2,
            ..EnvoyOptions::default()
        },
        |_| Ok(()),
    )
    .unwrap();
    let web = token("NORTHWIND_WEB").unwrap();
    let streams: Vec<Stream> = (0..4)
        .map(|i| Stream::new(&format!("web{i}"), &web, "/orders/1", 10.0))
        .collect();
    let (results, elapsed) = traffic::run(stack.client.base(), &streams, RUN);
    let t = elapsed.as_secs_f64();
    let summary: Vec<String> = results.iter().map(StreamResult::summary).collect();
    let ctx = format!(
        "elapsed {elapsed:?}\n{}\n{}",
        summary.join("\n"),
        stack.logs()
    );
    eprintln!("queue: elapsed {elapsed:?}\n{}", summary.join("\n"));
    for r in &results {
        only_200_or_429(r, &ctx);
    }
    let admitted: usize = results.iter().map(|r| r.count(200)).sum();
    let queued = stack
        .envoy
        .counter_sum("laneguard", "laneguard.queue.resumed")
        .unwrap();
    assert!(queued > 0, "nothing was queued and resumed\n{ctx}");
    assert!(
        admitted as f64 <= INTERACTIVE_PER_S * t + INTERACTIVE_BURST,
        "two workers admitted {admitted} > the interactive budget {INTERACTIVE_PER_S}/s x \
         {t:.2}s + {INTERACTIVE_BURST} ({queued} of them released from a queue)\n{ctx}"
    );
}
