//! The rollout review card from a real shadow phase: real Envoy with the filter, the real
//! service keeping its hash-chained audit log, demo JWTs; then `laneguard-audit card` on that
//! log (and on Envoy's Prometheus scrape), as an operator runs it.
//!
//! Policy: `tests/policies/valid/card.yaml` (everything in shadow; its comments give the
//! arithmetic). A squeezed repair lane must FAIL "no protected workflow starvation" and name
//! exactly the records the log holds for it; a run where only an unprotected class goes over
//! its budget must PASS it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::{built_binary, test_policy, token, EnvoyOptions, RunDir, Stack};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn stack(label: &str) -> (Stack, PathBuf, PathBuf) {
    let dir = RunDir::new(label).unwrap();
    let log = dir.file("audit.log");
    let policy_file = dir.file("policy.yaml");
    let policy = test_policy("valid/card.yaml").unwrap();
    std::fs::write(&policy_file, &policy).unwrap();
    let log_arg = log.display().to_string();
    let stack = Stack::start_in(
        dir,
        &policy,
        &["--audit-log", &log_arg],
        EnvoyOptions::default(),
        |_| Ok(()),
    )
    .unwrap();
    (stack, log, policy_file)
}

fn audit_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(built_binary("laneguard-audit").unwrap())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The service's log entries (`{"seq":..,"record":..}`), polled until `want` hold `event`
/// (the filter ships records from its root tick).
fn entries(log: &Path, event: &str, want: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let all: Vec<Value> = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let n = all
            .iter()
            .filter(|e| {
                e["record"]["events"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == event))
            })
            .count();
        if n >= want || Instant::now() > deadline {
            return all;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn card_json(policy: &Path, log: &Path, stats: Option<&Path>) -> Value {
    let (p, l) = (policy.display().to_string(), log.display().to_string());
    let mut args = vec!["card", "--policy", &p, "--audit", &l, "--json"];
    let s;
    if let Some(stats) = stats {
        s = stats.display().to_string();
        args.extend(["--stats", &s]);
    }
    let (code, out, err) = audit_cli(&args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn check<'a>(card: &'a Value, name: &str) -> &'a Value {
    card["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .chain(card["stop_conditions"].as_array().unwrap())
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {card:#}"))
}

fn send(stack: &Stack, who: &str, n: usize) {
    let t = token(who).unwrap();
    for i in 0..n {
        let r = stack.client.get_as("/orders/1", &t, &[]).unwrap();
        assert_eq!(
            r.status,
            200,
            "{who} request {i}: shadow never blocks\n{}\n{}",
            r.describe(),
            stack.logs()
        );
    }
}

#[test]
fn a_squeezed_protected_lane_fails_the_card_and_names_its_records() {
    let (stack, log, policy) = stack("card-squeezed");
    // Integration active first: the repair lane is then squeezed while it is active.
    send(&stack, "NORTHWIND_ERP", 1);
    // The repair lane holds 3: six quick requests, the last three would have been limited.
    send(&stack, "NORTHWIND_RECON", 6);

    let all = entries(&log, "shadow_limited", 3);
    let squeezed: Vec<String> = all
        .iter()
        .filter(|e| e["record"]["class"]["granted"] == "repair")
        .filter(|e| {
            e["record"]["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == "shadow_limited")
        })
        .map(|e| {
            format!(
                "#{} (request {})",
                e["seq"],
                e["record"]["request_id"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(squeezed.len(), 3, "{all:#?}\n{}", stack.logs());

    let scrape = stack
        .envoy
        .admin()
        .get("/stats/prometheus", &[])
        .unwrap()
        .body;
    let stats = log.with_file_name("stats.prom");
    std::fs::write(&stats, scrape).unwrap();

    for (what, card) in [
        ("log", card_json(&policy, &log, None)),
        ("log and stats", card_json(&policy, &log, Some(&stats))),
    ] {
        let s = check(&card, "no protected workflow starvation");
        assert_eq!(s["verdict"], "FAIL", "{what}: {s:#}");
        assert_eq!(s["counts"]["shadow_limited"], 3, "{what}: {s:#}");
        assert_eq!(s["counts"]["limited"], 0, "{what}: {s:#}");
        let named: Vec<String> = s["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        assert_eq!(named, squeezed, "{what}: the card names the log's records");
        // The third request filled the lane: a near miss.
        let lag = check(&card, "acceptable convergence lag");
        assert_eq!(lag["verdict"], "FAIL", "{what}: {lag:#}");
        assert_eq!(lag["counts"]["near_misses"], 1, "{what}: {lag:#}");
        // Shadow refusals are not real ones.
        assert_eq!(
            check(&card, "morning downstream state diverges")["verdict"],
            "PASS"
        );
        assert_eq!(card["ready_to_enforce"], false);
        assert!(
            card["reasons"].as_array().unwrap().iter().any(|r| r
                .as_str()
                .unwrap()
                .contains("no protected workflow starvation")),
            "{what}: {card:#}"
        );
        assert!(card["shadow_phase"]["shadow_records"].as_u64().unwrap() >= 3);
        // From Envoy's counters: the lane was squeezed while integration, which must not
        // compete with repair, was active (laneguard_collision_repair_integration).
        let shared = check(
            &card,
            "critical internal tool shares a budget it was not supposed to share",
        );
        let want = if what == "log" { 0 } else { 1 };
        assert_eq!(
            shared["counts"]["squeezes_with_rival_active"], want,
            "{what}: {shared:#}"
        );
    }

    // The Markdown and HTML say the same, with the record ids.
    let (p, l) = (policy.display().to_string(), log.display().to_string());
    let (code, md, err) = audit_cli(&[
        "card",
        "--policy",
        &p,
        "--audit",
        &l,
        "--owner",
        "order-platform",
        "--change",
        "northwind shadow",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(md.contains("- Change name: northwind shadow"), "{md}");
    assert!(md.contains("- Owning team: order-platform"), "{md}");
    assert!(
        md.contains("- **FAIL** no protected workflow starvation: 0 limited, 3 shadow-limited"),
        "{md}"
    );
    for id in &squeezed {
        assert!(md.contains(id.as_str()), "{id} in\n{md}");
    }
    assert!(md.contains("## Ready to enforce: no"), "{md}");
    let (code, _, _) = audit_cli(&["card", "--policy", &p, "--audit", &l, "--strict"]);
    assert_eq!(code, 1, "--strict fails a card that is not ready");
    let (code, html, _) = audit_cli(&["card", "--policy", &p, "--audit", &l, "--html"]);
    assert_eq!(code, 0);
    assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
    assert!(
        html.contains("<strong>FAIL</strong> no protected workflow starvation"),
        "{html}"
    );
}

#[test]
fn a_run_where_only_unprotected_traffic_is_limited_passes_starvation() {
    let (stack, log, policy) = stack("card-clean");
    // Integration goes over its burst of 2 (allowed to: it is not protected)...
    send(&stack, "NORTHWIND_ERP", 4);
    // ...while the repair lane uses 2 of 3: no squeeze, no near miss.
    send(&stack, "NORTHWIND_RECON", 2);
    let all = entries(&log, "shadow_limited", 2);
    let integration: Vec<&Value> = all
        .iter()
        .filter(|e| e["record"]["class"]["granted"] == "integration")
        .collect();
    assert_eq!(integration.len(), 2, "{all:#?}\n{}", stack.logs());
    assert!(
        all.iter()
            .all(|e| e["record"]["class"]["granted"] != "repair"),
        "{all:#?}"
    );

    let card = card_json(&policy, &log, None);
    let s = check(&card, "no protected workflow starvation");
    assert_eq!(s["verdict"], "PASS", "{s:#}");
    assert_eq!(s["counts"]["shadow_limited"], 0);
    assert_eq!(s["counts"]["limited"], 0);
    assert_eq!(s["records"].as_array().unwrap().len(), 0);
    assert_eq!(
        check(&card, "acceptable convergence lag")["verdict"],
        "PASS"
    );
    assert_eq!(
        check(&card, "support recovery remains usable")["verdict"],
        "PASS"
    );
    assert_eq!(
        check(
            &card,
            "no hidden shared identity still bypassing policy intent"
        )["verdict"],
        "PASS"
    );
    assert_eq!(
        check(
            &card,
            "critical internal tool shares a budget it was not supposed to share"
        )["verdict"],
        "PASS"
    );
    assert_eq!(card["records"], 2);
    // A few seconds of evidence are not a business cycle: not ready, and it says why.
    assert_eq!(card["shadow_phase"]["completed"], false);
    assert_eq!(card["ready_to_enforce"], false);
    let reasons = card["reasons"].to_string();
    assert!(
        reasons.contains("export and reconciliation windows") && !reasons.contains("starvation"),
        "{reasons}"
    );
    // The chain was verified: no integrity problem.
    assert_eq!(card["integrity"].as_array().unwrap().len(), 0, "{card:#}");
}
