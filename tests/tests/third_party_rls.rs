//! The filter against an RLS v3 server this repository did not write the limiting of:
//! `fixed-window-rls` (tests/src/bin), Kuadrant's limitador behind the standard
//! `ShouldRateLimit` API, behaving on the wire like envoyproxy/ratelimit: fixed windows,
//! `duration_until_reset` is the time left in the window whatever the level, every
//! descriptor is charged on its own (also on a denial), and no leases (`quota`) ever.
//!
//! Issue 13 item 5. Before the fix the filter read `duration_until_reset` as "full again
//! in", so after the first request of a minute it refused locally, without a call, for the
//! rest of the minute; and its borrow retry charged the other buckets a second time.
//!
//! One test, in phases on one stack, within one minute window (per-minute limits, small
//! counts), then across the window's end (the "and back").

// Test code: a failed unwrap or panic is a failed test (clippy.toml allows them inside
// #[test] functions; this extends that to the helpers of this file).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_protos::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::{Entry, RateLimitOverride},
    RateLimitDescriptor,
};
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::Code;
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use laneguard_protos::envoy::service::ratelimit::v3::RateLimitRequest;
use laneguard_tests::config::{self, demo_config, DemoPorts};
use laneguard_tests::process::ReadyChild;
use laneguard_tests::{token, Client, Envoy, EnvoyOptions, Reply, RunDir, Upstream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Per-minute limits with burst = rate, so the filter's local mirror (GCRA) never refuses
/// before the fixed window does. The users limit (10/min) is what shows a double charge.
const POLICY: &str = r#"
version: 1
classification:
  default_class: interactive
service:
  cluster: laneguard_rls
  domain: laneguard
  timeout_ms: 1000
headers:
  draft03: true
classes:
  - name: interactive
    consequence: time_sensitive
    budget: { per_minute: 10, burst: 10 }
    failure_mode: local
    must_not_compete_with: [recovery]
  - name: integration
    consequence: time_sensitive
    budget: { per_minute: 20, burst: 20 }
    failure_mode: local
    must_not_compete_with: [repair]
  - name: repair
    consequence: repair
    reserve: { per_minute: 20, burst: 20 }
    borrow: true
    must_not_compete_with: [integration, interactive]
  - name: recovery
    consequence: recovery
    reserve: { per_minute: 10, burst: 10 }
    borrow: true
    must_not_compete_with: [interactive, integration, export]
  - name: export
    consequence: low
    budget: { per_minute: 10, burst: 10 }
    failure_mode: closed
principals:
  - { name: web, default_class: interactive, may_declare: [interactive] }
  - { name: erp, default_class: integration, may_declare: [integration] }
  - { name: recon, default_class: repair, may_declare: [repair, interactive] }
  - { name: support, default_class: recovery, may_declare: [recovery, repair] }
  - { name: export, default_class: export, may_declare: [export] }
tenants:
  default:
    ceiling: { per_minute: 100, burst: 100 }
users:
  limit: { per_minute: 10, burst: 10 }
"#;
const INTERACTIVE_PER_MIN: usize = 10;
const USER_PER_MIN: usize = 10;
const REPAIR_RESERVE: u32 = 20;

struct ThirdPartyStack {
    envoy: Envoy,
    rls: ReadyChild,
    _upstream: Upstream,
    client: Client,
}

impl ThirdPartyStack {
    fn start() -> ThirdPartyStack {
        let dir = RunDir::new("third-party-rls").unwrap();
        let upstream = Upstream::start(&dir).unwrap();
        let rls = ReadyChild::spawn(
            &dir,
            "fixed-window-rls",
            Path::new(env!("CARGO_BIN_EXE_fixed-window-rls")),
            &["--listen".to_string(), "127.0.0.1:0".to_string()],
        )
        .unwrap();
        let mut cfg = demo_config().unwrap();
        config::rewrite_demo(
            &mut cfg,
            &DemoPorts {
                service: rls.addr().port(),
                upstream: upstream.port(),
            },
        )
        .unwrap();
        config::set_policy(&mut cfg, POLICY).unwrap();
        let envoy = Envoy::start_in(dir, &cfg, EnvoyOptions::default()).unwrap();
        let client = Client::new(format!(
            "http://127.0.0.1:{}",
            envoy.port("gateway").unwrap()
        ));
        ThirdPartyStack {
            envoy,
            rls,
            _upstream: upstream,
            client,
        }
    }

    fn logs(&self) -> String {
        format!("{}\n{}", self.rls.logs(), self.envoy.logs())
    }
}

/// `n` requests one after the other: the replies, their statuses, and context for a failure.
fn send(
    stack: &ThirdPartyStack,
    path: &str,
    token: &str,
    n: usize,
) -> (Vec<Reply>, Vec<u16>, String) {
    let replies: Vec<Reply> = (0..n)
        .map(|_| stack.client.get_as(path, token, &[]).unwrap())
        .collect();
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    let ctx = format!(
        "statuses {statuses:?}\n{}\n{}",
        replies.last().map(Reply::describe).unwrap_or_default(),
        stack.logs()
    );
    (replies, statuses, ctx)
}

fn body(r: &Reply, k: &str) -> String {
    r.json()
        .ok()
        .and_then(|v| v[k].as_str().map(String::from))
        .unwrap_or_default()
}

/// Spend the repair reserve on the server directly (as other gateways of the fleet would),
/// with exactly the descriptor the filter sends for it, until the server refuses it.
fn exhaust_repair_reserve(addr: std::net::SocketAddr) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = RateLimitServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let entry = |k: &str, v: &str| Entry {
            key: k.into(),
            value: v.into(),
        };
        let req = RateLimitRequest {
            domain: "laneguard".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![
                    entry("tenant", "northwind"),
                    entry("bucket", "reserve"),
                    entry("class", "repair"),
                    entry("lg.burst", &REPAIR_RESERVE.to_string()),
                ],
                limit: Some(RateLimitOverride {
                    requests_per_unit: REPAIR_RESERVE,
                    unit: 2,
                }),
                hits_addend: None,
            }],
            hits_addend: 1,
        };
        for spent in 0..=REPAIR_RESERVE as usize {
            let r = c.should_rate_limit(req.clone()).await.unwrap().into_inner();
            if r.overall_code == Code::OverLimit as i32 {
                return spent;
            }
        }
        panic!("the server never refused the repair reserve");
    })
}

#[test]
fn standard_fixed_window_server_limits_at_its_limit_and_back_and_protected_lanes_hold() {
    let stack = ThirdPartyStack::start();
    let web = token("NORTHWIND_WEB").unwrap();
    let recon = token("NORTHWIND_RECON").unwrap();
    let window_start = Instant::now();

    // 1. 200s turn into 429s at the configured limit (10 a minute), not after the first
    //    request of the window.
    let (replies, statuses, ctx) = send(&stack, "/orders/1", &web, INTERACTIVE_PER_MIN + 2);
    let mut want = vec![200; INTERACTIVE_PER_MIN];
    want.extend([429, 429]);
    assert_eq!(statuses, want, "interactive at 10 a minute\n{ctx}");
    let limited = replies.last().unwrap();
    assert_eq!(body(limited, "bucket"), "class:interactive", "{ctx}");

    // 2. The protected lane holds while interactive is refused.
    let (repair, _, _) = send(&stack, "/orders/42/repair", &recon, 5);
    for r in &repair {
        let ctx = format!("{}\n{}", r.describe(), stack.logs());
        assert_eq!(r.status, 200, "repair on its reserve\n{ctx}");
        assert_eq!(r.json().unwrap()["lane"], "protected", "{ctx}");
    }

    // 3. The reserve is spent elsewhere in the fleet: repair borrows shared capacity. The
    //    server charged the user bucket on the refused first attempt already, so the borrow
    //    retry must not charge it again: the recon user gets exactly its 10 a minute
    //    (5 above + 5 here), not 5 + 3 (each borrow charging the user twice).
    let spent = exhaust_repair_reserve(stack.rls.addr());
    assert!(spent <= 15, "the reserve had {spent} left after 5 repairs");
    let (borrowed, statuses, ctx) = send(&stack, "/orders/42/repair", &recon, USER_PER_MIN - 4);
    let mut want = vec![200; USER_PER_MIN - 5];
    want.push(429);
    assert_eq!(
        statuses, want,
        "repair borrowing, user limit 10 a minute\n{ctx}"
    );
    for r in borrowed.iter().filter(|r| r.status == 200) {
        assert_eq!(r.json().unwrap()["lane"], "protected", "{ctx}");
    }
    // The user bucket is what ran out. (The 429 names the reserve when the mirror refuses
    // it locally, `user` when the server does: docs/leases.md, "Small cases".)
    let last = borrowed.last().unwrap();
    assert!(
        last.header("ratelimit")
            .is_some_and(|v| v.contains("\"user\";r=0")),
        "{ctx}"
    );
    assert!(
        ["user", "reserve:repair"].contains(&body(last, "bucket").as_str()),
        "{ctx}"
    );

    // 4. ...and back: interactive is refused until the server's window ends (the server is
    //    the authority; the local mirror alone would have refilled after 6 s), then served.
    let deadline = window_start + Duration::from_secs(90);
    let back = loop {
        let r = stack.client.get_as("/orders/1", &web, &[]).unwrap();
        let at = window_start.elapsed();
        if r.status == 200 {
            break at;
        }
        assert_eq!(r.status, 429, "{}\n{}", r.describe(), stack.logs());
        assert!(
            Instant::now() < deadline,
            "interactive still refused 90 s into a one-minute window\n{}\n{}",
            r.describe(),
            stack.logs()
        );
        // Pacing between probes, not a readiness wait.
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(
        back >= Duration::from_secs(50),
        "interactive was served again {back:?} into the server's one-minute window\n{}",
        stack.logs()
    );
}
