//! Replay agrees with the real thing: the same requests sent through real Envoy with the
//! filter and the real service, then Envoy's access log of them replayed offline with
//! `laneguard-replay`, get the same admitted / limited / shadow-limited count per class.
//!
//! Policy `tests/policies/valid/replay.yaml` (its comments give the arithmetic): about two
//! hundred requests from four demo identities, in phases a few hundred milliseconds apart,
//! that meet a class budget, the shared pool, a reserve (with borrowing) and a shadow rule.
//!
//! **Tolerance.** Wall-clock jitter cannot move a request across a refill: every rate is per
//! hour (at most one token a minute) and all the traffic is sent within seconds, so the
//! access log's START_TIME (what the replay sees) and the service's clock (what decided)
//! differ by milliseconds that change nothing. What can differ is the lease: a worker may
//! hold capacity it has not spent, at most `max_lease` (1) per bucket on the one worker, so
//! the real gateway may admit up to one request fewer per bucket than exact central
//! accounting. The test allows that (2 per class: a class's requests touch its lane and the
//! shared pool) and nothing else; it expects, and usually sees, exact agreement.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::config::set_path;
use laneguard_tests::{built_binary, demo_policy, test_policy, token, Stack};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    sent: u64,
    ok: u64,
    limited: u64,
    shadow_limited: u64,
}

const LEASE_SLACK: u64 = 2;

/// `laneguard-replay --format json --strict` of `trace` (written to the stack's run
/// directory as `name`) against `policy`: its report.
fn replay(stack: &Stack, policy: &str, name: &str, trace: &str) -> Value {
    let dir = stack.envoy.dir();
    let trace_file = dir.file(name);
    let policy_file = dir.file("replay-policy.yaml");
    std::fs::write(&trace_file, trace).unwrap();
    std::fs::write(&policy_file, policy).unwrap();
    let out = Command::new(built_binary("laneguard-replay").unwrap())
        .args([
            "--policy",
            policy_file.to_str().unwrap(),
            "--trace",
            trace_file.to_str().unwrap(),
            "--format",
            "json",
            "--strict",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn replaying_the_access_log_gives_what_envoy_and_the_service_decided() {
    let policy = test_policy("valid/replay.yaml").unwrap();
    let stack = Stack::start("replay-agrees", &policy).unwrap();
    let phases: [(&str, &str, &str, u64); 5] = [
        ("repair", "NORTHWIND_RECON", "/orders/1/reconcile", 40),
        (
            "integration",
            "NORTHWIND_ERP",
            "/orders?updated_since=1",
            80,
        ),
        ("interactive", "NORTHWIND_WEB", "/orders/2", 50),
        ("export", "NORTHWIND_EXPORT", "/orders?page=1", 30),
        ("repair", "NORTHWIND_RECON", "/orders/3/reconcile", 10),
    ];
    let mut seen: BTreeMap<&str, Seen> = BTreeMap::new();
    let mut total = 0u64;
    for (class, who, path, n) in phases {
        let tok = token(who).unwrap();
        let s = seen.entry(class).or_default();
        for _ in 0..n {
            let r = stack.client.get_as(path, &tok, &[]).unwrap();
            s.sent += 1;
            match r.status {
                200 => s.ok += 1,
                429 => s.limited += 1,
                other => panic!(
                    "{class}: status {other}: {}\n{}",
                    r.describe(),
                    stack.logs()
                ),
            }
            if r.header("x-laneguard-shadow-limited").is_some() {
                s.shadow_limited += 1;
            }
        }
        total += n;
        // Controlled times: the phases are apart, so their order is the same in the log.
        std::thread::sleep(Duration::from_millis(300));
    }

    // The access log (Envoy flushes it every 50 ms) as the trace.
    let deadline = Instant::now() + Duration::from_secs(15);
    let log = loop {
        let log = stack.envoy.access_log();
        let n = log
            .lines()
            .filter(|l| l.contains("tenant=northwind"))
            .count() as u64;
        if n >= total || Instant::now() > deadline {
            assert_eq!(n, total, "access log lines\n{}", stack.logs());
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let report = replay(&stack, &policy, "trace.log", &log);
    assert_eq!(report["trace"]["records"].as_u64(), Some(total));
    assert_eq!(report["trace"]["malformed"].as_u64(), Some(0));
    let classes = &report["tenants"]["northwind"]["classes"];
    let n = |c: &str, k: &str| classes[c][k].as_u64().unwrap_or_else(|| panic!("{c}.{k}"));

    let mut table = String::new();
    for (class, s) in &seen {
        table.push_str(&format!(
            "{class}: real {s:?}; replay admitted {} limited {} shadow_limited {} degraded {} observed {}\n",
            n(class, "admitted"),
            n(class, "limited"),
            n(class, "shadow_limited"),
            n(class, "degraded"),
            classes[class]["observed"]
        ));
    }
    for (class, s) in &seen {
        assert_eq!(n(class, "offered"), s.sent, "{table}");
        // What Envoy logged is what the client got.
        assert_eq!(
            classes[class]["observed"]["429"].as_u64().unwrap_or(0),
            s.limited,
            "{table}"
        );
        assert_eq!(n(class, "degraded"), 0, "{table}");
        // Replay admits at least what the gateway did, and at most the lease slack more.
        let (real_limited, replay_limited) = (s.limited, n(class, "limited"));
        assert!(
            replay_limited <= real_limited && real_limited <= replay_limited + LEASE_SLACK,
            "{class} limited: real {real_limited}, replay {replay_limited}\n{table}"
        );
        let (real_shadow, replay_shadow) = (s.shadow_limited, n(class, "shadow_limited"));
        assert!(
            replay_shadow <= real_shadow && real_shadow <= replay_shadow + LEASE_SLACK,
            "{class} shadow-limited: real {real_shadow}, replay {replay_shadow}\n{table}"
        );
    }
    // The policy's arithmetic, so the test cannot pass with everything admitted.
    assert_eq!(n("integration", "limited"), 40, "{table}");
    assert_eq!(n("interactive", "limited"), 30, "{table}");
    assert_eq!(n("repair", "limited"), 10, "{table}");
    assert_eq!(n("export", "shadow_limited"), 30, "{table}");
    println!("{table}");
}

/// An AI trace: the same chat completions through real Envoy (filter, service, demo model
/// server) and through `laneguard-replay` on the same policy give the same admitted /
/// downgraded / limited counts. The demo policy, `large` 400 tokens an hour (all burst),
/// `small` 600, a 1 s sync interval. Phase one: 2 requests reserve 190 each on `large` and
/// use 11, so 358 come back (the filter sends the refunds on the next sync tick; the test
/// waits 2.5 s; the replay settles at once). Phase two: 8 requests of 190 that use all of
/// it: 1 more on `large` (378 left after the refunds), 3 downgraded to `small`, 4 refused
/// naming `small`'s token bucket. AI requests are decided by the service (token buckets
/// are never leased) and every settlement has landed before the next phase, so the two
/// must agree exactly. A replay that ignored the trace's `tokens` (no refund) would admit
/// none more on `large` in phase two (2 / 3 / 5).
#[test]
fn replaying_an_ai_trace_gives_what_the_filter_decided() {
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&demo_policy().unwrap()).unwrap();
    set_path(&mut doc, &["service", "sync_interval_s"], 1.into()).unwrap();
    let tokens = |s: &str| serde_yaml::from_str::<serde_yaml::Value>(s).unwrap();
    doc["models"]["list"][0]["tokens"]["capacity"] = tokens("{ per_hour: 400, burst: 400 }");
    doc["models"]["list"][1]["tokens"]["capacity"] = tokens("{ per_hour: 600, burst: 600 }");
    let policy = serde_yaml::to_string(&doc).unwrap();
    let stack = Stack::start("replay-agrees-ai", &policy).unwrap();
    let tok = token("NORTHWIND_ASSISTANT").unwrap();

    #[derive(Debug, Default, PartialEq)]
    struct Counts {
        admitted: u64,
        downgraded: u64,
        limited: u64,
    }
    let mut real = Counts::default();
    let mut trace = String::new();
    for (n, completion) in [(2u32, 10u32), (8, 189)] {
        for _ in 0..n {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            let body = json!({"model": "large", "max_tokens": 190,
                              "messages": [{"role": "user", "content": "hi"}]});
            let r = stack
                .client
                .post_as(
                    "/v1/chat/completions",
                    &tok,
                    &[
                        ("content-type", "application/json"),
                        ("x-demo-completion-tokens", completion.to_string().as_str()),
                    ],
                    body.to_string().as_bytes(),
                )
                .unwrap();
            let mut line = json!({"ts": ts, "tenant": "northwind", "principal": "assistant",
                                  "user": "svc-assistant", "method": "POST",
                                  "path": "/v1/chat/completions", "model": "large",
                                  "max_tokens": 190, "status": r.status});
            match r.status {
                200 => {
                    if r.header("x-laneguard-fallback") == Some("cheaper_model") {
                        real.downgraded += 1;
                    } else {
                        real.admitted += 1;
                    }
                    // The usage the response reported, as an access log would record it.
                    line["tokens"] = r.json().unwrap()["usage"]["total_tokens"].clone();
                }
                429 => {
                    real.limited += 1;
                    assert_eq!(
                        r.json_str("bucket"),
                        "model_tokens:small",
                        "{}",
                        r.describe()
                    );
                }
                other => panic!("status {other}: {}\n{}", r.describe(), stack.logs()),
            }
            trace.push_str(&format!("{line}\n"));
        }
        // The refunds reach the service on the next sync tick (1 s).
        std::thread::sleep(Duration::from_millis(2500));
    }

    let report = replay(&stack, &policy, "ai-trace.jsonl", &trace);
    let c = &report["tenants"]["northwind"]["classes"]["assistant"];
    let n = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("{k}: {c}"));
    let replayed = Counts {
        admitted: n("admitted"),
        downgraded: n("downgraded"),
        limited: n("limited"),
    };
    assert_eq!(n("offered"), 10, "{c}");
    assert_eq!(
        replayed, real,
        "replay vs the filter\ntrace:\n{trace}\nreplay: {c}"
    );
    // The arithmetic above, so the test cannot pass with both sides wrong alike.
    assert_eq!(
        real,
        Counts {
            admitted: 3,
            downgraded: 3,
            limited: 4
        },
        "{trace}"
    );
}
