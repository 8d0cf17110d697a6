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

use laneguard_tests::{built_binary, test_policy, token, Stack};
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    sent: u64,
    ok: u64,
    limited: u64,
    shadow_limited: u64,
}

const LEASE_SLACK: u64 = 2;

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
    let dir = stack.envoy.dir();
    let trace = dir.file("trace.log");
    let policy_file = dir.file("policy.yaml");
    std::fs::write(&trace, &log).unwrap();
    std::fs::write(&policy_file, &policy).unwrap();
    let out = Command::new(built_binary("laneguard-replay").unwrap())
        .args([
            "--policy",
            policy_file.to_str().unwrap(),
            "--trace",
            trace.to_str().unwrap(),
            "--format",
            "json",
            "--strict",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
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
