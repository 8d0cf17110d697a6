//! `laneguard-replay`, run as a user runs it (the built binary on files), and asserted from
//! its JSON (`--format json`, the stable shape of docs/rollout.md).
//!
//! - The incident: the committed trace of northwind's bad morning
//!   (`examples/rollout/northwind-bad-morning.jsonl`, `tools/tracegen.py --seed 2026`)
//!   against the seed's flat cap (`examples/rollout/flat-cap.yaml`) and the demo's layered
//!   policy (`envoy/demo/envoy.yaml`), side by side.
//! - Bad input: malformed lines named and counted (fatal with `--strict`), unknown tenants,
//!   classes and principals reported, unreadable or invalid policies refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::{built_binary, repo_root, run_cli, RunDir};
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;

const TRACE: &str = "examples/rollout/northwind-bad-morning.jsonl";
const FLAT: &str = "examples/rollout/flat-cap.yaml";
const LAYERED: &str = "envoy/demo/envoy.yaml";

/// `laneguard-replay ARGS...` from the repository root: (exit code, stdout, stderr).
fn replay(args: &[&str]) -> (i32, String, String) {
    run_cli("laneguard-replay", args).unwrap()
}

fn json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["--format", "json"]);
    let (code, out, err) = replay(&a);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// Requests per declared class, counted from the trace file itself.
fn trace_classes() -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(repo_root().join(TRACE)).unwrap();
    let mut by = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).unwrap();
        *by.entry(v["class"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    by
}

fn minute(ts: &str) -> u64 {
    laneguard_core::audit::parse_rfc3339(ts).unwrap() / 60_000_000_000
}

#[test]
fn the_incident_flat_cap_starves_repair_and_the_layered_policy_does_not() {
    let v = json(&["--policy", LAYERED, "--compare", FLAT, "--trace", TRACE]);
    let both = v
        .as_array()
        .expect("--compare prints a list of two reports");
    assert_eq!(both.len(), 2);
    let (layered, flat) = (&both[0], &both[1]);
    assert_eq!(layered["policy"], LAYERED);
    assert_eq!(flat["policy"], FLAT);

    // Nothing is lost: every request of the trace is offered, per class, in both.
    let offered = trace_classes();
    for r in both {
        assert_eq!(u(&r["trace"]["malformed"]), 0);
        let classes = &r["tenants"]["northwind"]["classes"];
        for (class, n) in &offered {
            assert_eq!(u(&classes[class]["offered"]), *n, "{class}");
            let c = &classes[class];
            assert_eq!(
                u(&c["admitted"]) + u(&c["limited"]) + u(&c["shadow_limited"]) + u(&c["degraded"]),
                *n,
                "{class}: every request has one outcome"
            );
        }
    }

    // Layered: the repair lane is served in full through the whole morning, and the tenant
    // ceiling holds.
    let l = &layered["tenants"]["northwind"];
    let repair = &l["classes"]["repair"];
    assert_eq!(repair["served_pct"].as_f64(), Some(100.0), "{repair}");
    assert_eq!(u(&repair["limited"]) + u(&repair["shadow_limited"]), 0);
    assert_eq!(l["classes"]["recovery"]["served_pct"].as_f64(), Some(100.0));
    assert_eq!(l["ceiling_ok"], true, "{}", l["ceiling"]);
    assert!(u(&l["ceiling"]["peak"]) <= u(&l["ceiling"]["limit"]));
    // ... while the ERP burst is held to its own budget.
    assert!(u(&l["classes"]["integration"]["limited"]) > 1_000);
    let lane = layered["protected"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["class"] == "repair")
        .unwrap();
    assert!(lane["longest_refusal"].is_null(), "{lane}");
    assert!(layered["overlap_windows"]
        .as_array()
        .unwrap()
        .iter()
        .all(|o| o["lost"] == 0 && o["shadow_lost"] == 0));

    // Flat cap: repair is refused, by the one tenant x family bucket, for a measurable
    // stretch: minute after minute of the shift change.
    let f = &flat["tenants"]["northwind"];
    let repair = &f["classes"]["repair"];
    let refused = u(&repair["limited"]);
    assert!(refused >= 40, "{repair}");
    assert_eq!(u(&repair["first_tripped"]["tool:orders"]), refused);
    assert!(repair["served_pct"].as_f64().unwrap() < 95.0, "{repair}");
    let lost: Vec<u64> = flat["overlap_windows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["class"] == "repair" && u(&o["lost"]) > 0)
        .map(|o| minute(o["from"].as_str().unwrap()))
        .collect();
    assert!(
        lost.len() >= 10,
        "repair lost budget in fewer than 10 one-minute windows: {lost:?}"
    );
    let (first, last) = (lost[0], lost[lost.len() - 1]);
    assert!(last - first >= 9, "{lost:?}");
    // The windows name the classes it competed with.
    assert!(flat["overlap_windows"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["class"] == "repair"
            && o["active"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == "integration")
            && o["active"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == "export")));
}

#[test]
fn text_and_html_reports_show_both_policies() {
    let dir = RunDir::new("replay-html").unwrap();
    let html = dir.file("report.html");
    let html_arg = html.display().to_string();
    let (code, out, err) = replay(&[
        "--policy",
        LAYERED,
        "--compare",
        FLAT,
        "--trace",
        TRACE,
        "--html",
        &html_arg,
    ]);
    assert_eq!(code, 0, "{err}");
    let repair = out
        .lines()
        .find(|l| l.trim_start().starts_with("repair "))
        .unwrap_or_else(|| panic!("no repair row: {out}"));
    // class offered | P1 admitted limited shadow degraded served tripped | P2 admitted ...
    let cells: Vec<&str> = repair.split_whitespace().collect();
    assert_eq!(cells[3], "0", "P1 limited: {repair}");
    assert_eq!(cells[6], "100.00%", "P1 served: {repair}");
    assert!(out.contains("P1 policy envoy/demo/envoy.yaml"), "{out}");
    assert!(
        out.contains("P2 policy examples/rollout/flat-cap.yaml"),
        "{out}"
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert_eq!(page.matches("<svg").count(), 2, "one plot per policy");
    for class in ["interactive", "integration", "repair", "recovery", "export"] {
        assert!(page.contains(class), "{class}");
    }
    assert!(page.contains("<table>"));
}

#[test]
fn malformed_lines_are_named_counted_and_fatal_with_strict() {
    let dir = RunDir::new("replay-bad").unwrap();
    let trace = dir.file("trace.jsonl");
    let good = |ts: u64, tenant: &str, principal: &str, class: &str| {
        format!(
            r#"{{"ts": {ts}, "tenant": "{tenant}", "principal": "{principal}", "class": "{class}", "method": "GET", "path": "/orders/1"}}"#
        )
    };
    let lines = [
        "# a comment".to_string(),
        good(1_795_500_000, "northwind", "erp", "integration"),
        r#"{"ts": "yesterday", "tenant": "northwind", "principal": "erp", "method": "GET", "path": "/"}"#.to_string(),
        "GET /orders 200".to_string(),
        good(1_795_500_001, "umbrella", "erp", "integration"),
        good(1_795_500_002, "northwind", "erp", "teleport"),
        good(1_795_500_003, "northwind", "mallory", "interactive"),
        good(1_795_500_004, "northwind", "erp", "repair"),
        r#"{"ts": 1795500005, "tenant": "northwind", "principal": "erp", "method": "GET", "path": "/", "clas": "x"}"#.to_string(),
    ];
    std::fs::write(&trace, lines.join("\n") + "\n").unwrap();
    let t = trace.display().to_string();

    let (code, out, err) = replay(&["--policy", LAYERED, "--trace", &t, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    for n in [3, 4, 9] {
        assert!(
            err.contains(&format!("line {n}:")),
            "line {n} not named: {err}"
        );
    }
    assert!(err.contains("clas"), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(u(&v["trace"]["malformed"]), 3);
    assert_eq!(u(&v["trace"]["records"]), 5);
    let named: Vec<&str> = v["trace"]["malformed_lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(named[0].starts_with("line 3: ts:"), "{named:?}");
    assert!(named[1].starts_with("line 4:"), "{named:?}");
    assert!(named[2].starts_with("line 9:"), "{named:?}");
    let warnings: Vec<(String, String, u64)> = v["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["kind"].as_str().unwrap().to_string(),
                w["name"].as_str().unwrap().to_string(),
                u(&w["first_line"]),
            )
        })
        .collect();
    for want in [
        ("unknown_class", "teleport", 6),
        ("unknown_principal", "mallory", 7),
        ("forged_class", "erp:repair", 8),
        ("default_tenant", "umbrella", 5),
    ] {
        assert!(
            warnings
                .iter()
                .any(|(k, n, l)| (k.as_str(), n.as_str(), *l) == want),
            "{want:?} not in {warnings:?}"
        );
    }
    // The unknown tenant is replayed, not dropped.
    assert_eq!(
        u(&v["tenants"]["umbrella"]["classes"]["integration"]["offered"]),
        1
    );

    let (code, out, err) = replay(&["--policy", LAYERED, "--trace", &t, "--strict"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("line 3: ts:") && err.contains("--strict"),
        "{err}"
    );
    assert!(out.is_empty(), "no report with --strict: {out}");
}

#[test]
fn unusable_policies_and_traces_are_refused_with_exit_2() {
    let dir = RunDir::new("replay-usage").unwrap();
    let bad = dir.file("bad.yaml");
    std::fs::write(
        &bad,
        "version: 1\nclasses:\n  - { name: a, consequence: low, budget: { per_minute: 0 } }\n",
    )
    .unwrap();
    let b = bad.display().to_string();
    let (code, _, err) = replay(&["--policy", &b, "--trace", TRACE]);
    assert_eq!(code, 2);
    assert!(
        err.contains("invalid policy") && err.contains("classes[0].budget"),
        "{err}"
    );

    let (code, _, err) = replay(&["--policy", "no/such/policy.yaml", "--trace", TRACE]);
    assert_eq!(code, 2);
    assert!(err.contains("no/such/policy.yaml"), "{err}");

    let (code, _, err) = replay(&["--policy", LAYERED, "--trace", "no/such/trace.jsonl"]);
    assert_eq!(code, 2);
    assert!(err.contains("no/such/trace.jsonl"), "{err}");

    let (code, _, err) = replay(&["--policy", "envoy/native-ratelimit.yaml", "--trace", TRACE]);
    assert_eq!(code, 2);
    assert!(err.contains("without a laneguard wasm filter"), "{err}");

    let (code, _, err) = replay(&["--policy", LAYERED, "--trace", TRACE, "--format", "yaml"]);
    assert_eq!(code, 2, "{err}");
}

/// `laneguard-audit card --trace`: a trace replayed as a would-have-been-throttled phase is
/// the card's evidence (policy `tests/policies/valid/card.yaml`: repair's reserve has a
/// burst of 3, so the 4th+ quick repair requests squeeze it).
#[test]
fn the_card_reads_a_trace_as_shadow_evidence() {
    let dir = RunDir::new("replay-card").unwrap();
    let line = |s: u64, principal: &str| {
        format!(
            r#"{{"ts": {}, "tenant": "northwind", "principal": "{principal}", "method": "GET", "path": "/orders/1"}}"#,
            1_795_500_000 + s
        )
    };
    let card = |name: &str, recon: usize| {
        let trace = dir.file(name);
        let mut lines = vec!["# card trace".to_string(), line(0, "web")];
        lines.extend((0..recon).map(|_| line(1, "recon")));
        std::fs::write(&trace, lines.join("\n") + "\n").unwrap();
        let policy = repo_root().join("tests/policies/valid/card.yaml");
        let out = Command::new(built_binary("laneguard-audit").unwrap())
            .args(["card", "--policy", policy.to_str().unwrap()])
            .args(["--trace", trace.to_str().unwrap(), "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v
    };
    let squeezed = card("squeezed.jsonl", 6);
    let starvation = &squeezed["evidence"][0];
    assert_eq!(starvation["name"], "no protected workflow starvation");
    assert_eq!(starvation["verdict"], "FAIL", "{starvation}");
    assert_eq!(
        u(&starvation["counts"]["shadow_limited"]),
        3,
        "{starvation}"
    );
    let named: Vec<&str> = starvation["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(named, ["trace line 6", "trace line 7", "trace line 8"]);
    assert_eq!(squeezed["ready_to_enforce"], false);
    let notes = squeezed["notes"].to_string();
    assert!(notes.contains("7 requests replayed"), "{notes}");

    let clean = card("clean.jsonl", 2);
    assert_eq!(
        clean["evidence"][0]["verdict"], "PASS",
        "{}",
        clean["evidence"][0]
    );
    assert_eq!(u(&clean["evidence"][0]["counts"]["shadow_limited"]), 0);
}

/// Issue 9: an AI request reserves tokens at admission in the replay as in the filter
/// (`ai::admit` on the body the trace describes), and a limit on the model's token bucket
/// tries `cheaper_model` first. The demo's `large` model holds 400 tokens of burst and
/// `small` 600; 30 requests of `max_tokens: 100` at once: 4 on `large`, 6 downgraded to
/// `small`, the other 20 refused, naming the token bucket. (Before, the replay ignored token
/// buckets and admitted 20, the class's request burst.) A response that used 10 tokens gives
/// 90 back, so a trace that says so admits more.
#[test]
fn ai_requests_reserve_tokens_and_fall_back_to_the_cheaper_model() {
    let dir = RunDir::new("replay-ai").unwrap();
    let write = |name: &str, used: Option<u64>| {
        let path = dir.file(name);
        let lines: Vec<String> = (0..30)
            .map(|i| {
                let used = used.map_or(String::new(), |n| format!(r#", "tokens": {n}"#));
                format!(
                    r#"{{"ts": {}, "tenant": "northwind", "principal": "assistant", "method": "POST", "path": "/v1/chat/completions", "model": "large", "max_tokens": 100{used}}}"#,
                    1_795_000_000 + i / 100
                )
            })
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path.display().to_string()
    };
    let class = |trace: &str| {
        let v = json(&["--policy", LAYERED, "--trace", trace]);
        v["tenants"]["northwind"]["classes"]["assistant"].clone()
    };
    let c = class(&write("at-reservation.jsonl", None));
    assert_eq!(u(&c["offered"]), 30, "{c}");
    assert_eq!(
        (u(&c["admitted"]), u(&c["downgraded"]), u(&c["limited"])),
        (4, 6, 20),
        "{c}"
    );
    assert_eq!(u(&c["degraded"]), 6, "{c}");
    let tripped = c["first_tripped"].as_object().unwrap();
    assert!(
        tripped.keys().any(|k| k.contains("large")),
        "the large model's token bucket trips first: {c}"
    );

    // Each response used 10 of its 100: the refunds leave room for more on `large`.
    let c = class(&write("refunded.jsonl", Some(10)));
    assert!(u(&c["admitted"]) > 4, "refunds give room back: {c}");
}
