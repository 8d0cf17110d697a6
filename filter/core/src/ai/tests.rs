use super::*;
use crate::engine::{plan, LocalTable, RequestInfo};
use crate::policy::parse;
use proptest::prelude::*;

const S: u64 = 1_000_000_000;

const POLICY: &str = r#"
version: 1
classes:
  - { name: assistant, consequence: time_sensitive, budget: { per_minute: 600, burst: 100 } }
tenants:
  default: { ceiling: { per_minute: 1000, burst: 200 } }
endpoint_families:
  - { name: chat, path_prefixes: [/v1/chat] }
models:
  header: x-model
  default: small
  unknown: refuse
  list:
    - name: large
      capacity: { per_minute: 600, burst: 100 }
      allocation: { share: 1.0, burst: 100 }
      cheaper_model: small
      tokens:
        capacity: { per_minute: 60000, burst: 1000 }
        tenants: { northwind: { per_minute: 30000, burst: 800 } }
        default_estimate: 300
    - name: small
      capacity: { per_minute: 600, burst: 100 }
      allocation: { share: 1.0, burst: 100 }
      tokens:
        capacity: { per_minute: 60000, burst: 5000 }
tokens:
  default_estimate: 100
  users: { per_minute: 60000, burst: 4000 }
  tools: { chat: { default_estimate: 50 } }
"#;

fn policy() -> Policy {
    parse(POLICY).unwrap()
}

fn req(model: Option<&str>) -> RequestInfo<'_> {
    RequestInfo {
        tenant: Some("northwind"),
        principal: Some("assistant"),
        user: Some("u1"),
        method: "POST",
        path: "/v1/chat/completions",
        model,
        ..Default::default()
    }
}

#[test]
fn request_body_fields() {
    let b = parse_request(br#"{"model":"large","messages":[{"role":"user","content":"hi"}],"max_tokens":64,"stream":true}"#).unwrap();
    assert_eq!(b.model.as_deref(), Some("large"));
    assert_eq!(b.max_tokens, Some(64));
    assert!(b.stream);
    // max_completion_tokens supersedes max_tokens; null is absent; "stream": "yes" is no stream.
    let b = parse_request(
        br#"{"max_tokens":64,"max_completion_tokens":10,"stream":"yes","model":null}"#,
    )
    .unwrap();
    assert_eq!(b.max_tokens, Some(10));
    assert!(!b.stream);
    assert_eq!(b.model, None);
    assert_eq!(parse_request(b" {}").unwrap(), RequestBody::default());
    // An absurd limit saturates; the reservation check refuses it by name.
    let b = parse_request(br#"{"max_tokens":99999999999999}"#).unwrap();
    assert_eq!(b.max_tokens, Some(u32::MAX));
}

#[test]
fn bad_request_bodies_are_400s() {
    for body in [
        &b"not json"[..],
        b"",
        b"[\"large\", 5]",
        b"{\"max_tokens\": 5",
    ] {
        assert_eq!(parse_request(body), Err(BodyError::NotJson), "{body:?}");
    }
    for body in [
        &br#"{"max_tokens":-1}"#[..],
        br#"{"max_tokens":0}"#,
        br#"{"max_tokens":1.5}"#,
        br#"{"max_tokens":"10"}"#,
        br#"{"max_completion_tokens":-3,"max_tokens":5}"#,
    ] {
        assert_eq!(
            parse_request(body),
            Err(BodyError::BadMaxTokens),
            "{body:?}"
        );
    }
}

#[test]
fn rewrite_sets_the_model_field() {
    let out = rewrite_model(br#"{"model":"large","max_tokens":5}"#, "small").unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["model"], "small");
    assert_eq!(v["max_tokens"], 5);
    assert_eq!(rewrite_model(b"[1]", "small"), None);
    assert_eq!(rewrite_model(b"nope", "small"), None);
}

#[test]
fn reservation_comes_from_the_body_then_model_then_tool_then_default() {
    let p = policy();
    let pl = plan(&p, &req(Some("large"))).unwrap();
    let t = token_plan(&p, &pl, Some("large"), None, Some(64))
        .unwrap()
        .unwrap();
    assert_eq!((t.reserve, t.estimate), (64, Estimate::Body));
    let names: Vec<String> = t.buckets.iter().map(|b| b.name()).collect();
    assert_eq!(
        names,
        [
            "user_tokens",
            "model_tokens:large",
            "model_total_tokens:large"
        ]
    );
    // The tenant's own allocation, and the total spans tenants.
    assert_eq!(t.buckets[1].rate.burst.get(), 800);
    assert_eq!(t.buckets[2].entries()[0], ("bucket", "model_total_tokens"));
    let t = token_plan(&p, &pl, Some("large"), None, None)
        .unwrap()
        .unwrap();
    assert_eq!((t.reserve, t.estimate), (300, Estimate::Model));
    let t = token_plan(&p, &pl, Some("small"), None, None)
        .unwrap()
        .unwrap();
    assert_eq!((t.reserve, t.estimate), (50, Estimate::Tool));
    let mut other = pl.clone();
    other.family = None;
    let t = token_plan(&p, &other, Some("small"), None, None)
        .unwrap()
        .unwrap();
    assert_eq!((t.reserve, t.estimate), (100, Estimate::Default));
}

#[test]
fn a_reservation_no_bucket_can_hold_is_refused_by_name() {
    let p = policy();
    let pl = plan(&p, &req(Some("large"))).unwrap();
    let e = token_plan(&p, &pl, Some("large"), None, Some(900)).unwrap_err();
    assert_eq!(e.bucket, "model_tokens:large");
    assert_eq!((e.reserve, e.burst), (900, 800));
    let e = token_plan(&p, &pl, Some("large"), None, Some(u32::MAX)).unwrap_err();
    assert_eq!(e.bucket, "user_tokens");
}

#[test]
fn no_token_settings_no_token_plan() {
    let p = parse(
        "version: 1\nclasses: [{ name: a, consequence: low }]\ntenants: { default: { ceiling: { per_second: 5, burst: 5 } } }\n",
    )
    .unwrap();
    let pl = plan(&p, &req(None)).unwrap();
    assert_eq!(token_plan(&p, &pl, None, None, Some(5)), Ok(None));
}

#[test]
fn cheaper_model_swaps_every_model_bucket() {
    let p = policy();
    assert_eq!(cheaper(&p, "large"), Some("small"));
    assert_eq!(cheaper(&p, "small"), None);
    let pl = plan(&p, &req(Some("large"))).unwrap();
    let t = token_plan(&p, &pl, Some("large"), None, None).unwrap();
    let (next, nt) = with_model(&p, &pl, t.as_ref(), "small", None, None).unwrap();
    let models: Vec<String> = next
        .buckets
        .iter()
        .filter(|b| b.kind.is_model())
        .map(|b| b.name())
        .collect();
    assert_eq!(models, ["model:small", "model_total:small"]);
    assert_eq!(next.buckets.len(), pl.buckets.len());
    let nt = nt.unwrap();
    assert_eq!(nt.model.as_deref(), Some("small"));
    // The old model's default no longer applies: the family's does.
    assert_eq!((nt.reserve, nt.estimate), (50, Estimate::Tool));
    assert!(nt.buckets.iter().any(|b| b.name() == "model_tokens:small"));
    assert!(with_model(&p, &pl, None, "unknown", None, None).is_none());
}

#[test]
fn settlement_refunds_or_charges_the_difference() {
    assert_eq!(settle(100, Usage::Tokens(40)), Settle::Refund(60));
    assert_eq!(settle(100, Usage::Tokens(130)), Settle::Extra(30));
    assert_eq!(settle(100, Usage::Tokens(100)), Settle::Exact);
    assert_eq!(
        settle(100, Usage::Missing),
        Settle::AtReservation(NoUsage::Missing)
    );
    assert_eq!(
        settle(100, Usage::Invalid),
        Settle::AtReservation(NoUsage::Invalid)
    );
    assert_eq!(settle(1, Usage::Tokens(u64::MAX)), Settle::Extra(u32::MAX));
}

#[test]
fn usage_in_json_bodies() {
    let u = |s: &str| usage_from_json(s.as_bytes());
    assert_eq!(
        u(r#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#),
        Usage::Tokens(7)
    );
    assert_eq!(
        u(r#"{"usage":{"prompt_tokens":3,"completion_tokens":4}}"#),
        Usage::Tokens(7)
    );
    assert_eq!(u(r#"{"id":"x"}"#), Usage::Missing);
    assert_eq!(u(r#"{"usage":null}"#), Usage::Missing);
    assert_eq!(u(r#"{"usage":{"total_tokens":-1}}"#), Usage::Invalid);
    assert_eq!(u(r#"{"usage":{"total_tokens":"7"}}"#), Usage::Invalid);
    assert_eq!(u(r#"{"usage":{"total_tokens":7.5}}"#), Usage::Invalid);
    assert_eq!(u(r#"{"usage":{"prompt_tokens":3}}"#), Usage::Invalid);
    assert_eq!(u(r#"{"usage":"lots"}"#), Usage::Invalid);
    assert_eq!(u("<html>502</html>"), Usage::Invalid);
    assert_eq!(usage_from_header(" 42 "), Usage::Tokens(42));
    assert_eq!(usage_from_header("-4"), Usage::Invalid);
    assert_eq!(usage_from_header("many"), Usage::Invalid);
}

const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n\
data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n\
data: [DONE]\n\n";

#[test]
fn the_final_sse_chunk_settles_whatever_the_chunking() {
    for split in 1..STREAM.len() {
        let mut s = SseScanner::new(1024);
        let (a, b) = STREAM.as_bytes().split_at(split);
        s.feed(a);
        s.feed(b);
        assert!(s.done);
        assert_eq!(s.finish(), Usage::Tokens(7), "split at {split}");
    }
    let crlf = STREAM.replace("\n\n", "\r\n\r\n");
    let mut s = SseScanner::new(1024);
    s.feed(crlf.as_bytes());
    assert_eq!(s.finish(), Usage::Tokens(7));
}

#[test]
fn streams_without_usage_and_oversized_events() {
    let mut s = SseScanner::new(1024);
    s.feed(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n");
    assert_eq!(s.finish(), Usage::Missing);
    // A stream cut off mid-event (no usage yet).
    let mut s = SseScanner::new(1024);
    s.feed(&STREAM.as_bytes()[..60]);
    assert_eq!(s.finish(), Usage::Missing);
    // An event over the limit is skipped whole, and the scanner recovers after it.
    let mut s = SseScanner::new(64);
    let big = format!("data: {{\"pad\":\"{}\"}}\n\n", "x".repeat(500));
    s.feed(big.as_bytes());
    s.feed(b"data: {\"usage\":{\"total_tokens\":9}}\n\n");
    assert!(s.overflowed);
    assert_eq!(s.finish(), Usage::Tokens(9));
    let mut s = SseScanner::new(64);
    s.feed(b"data: {\"usage\":{\"total_tokens\":-9}}\n\n");
    assert_eq!(s.finish(), Usage::Invalid);
}

#[test]
fn refunds_make_room_for_the_next_request() {
    let p = policy();
    let pl = plan(&p, &req(Some("large"))).unwrap();
    let t = token_plan(&p, &pl, Some("large"), None, Some(800))
        .unwrap()
        .unwrap();
    let mut table = LocalTable::default();
    let now = 1_000 * S;
    let (eval, _) = table.decide_with(&pl, &t.costed(), now, 1.0);
    assert!(eval.allowed);
    let (eval, _) = table.precheck_with(&pl, &t.costed(), now, 1.0);
    assert!(!eval.allowed, "the allocation's burst is reserved");
    assert_eq!(
        eval.levels[eval.tripped.unwrap()].name,
        "model_tokens:large"
    );
    // It used 100 of 800: 700 go back, and the same request fits again.
    if let Settle::Refund(n) = settle(t.reserve, Usage::Tokens(100)) {
        table.refund(&t.refs(), n, now);
    }
    let levels = table.levels(&t.refs(), now);
    assert_eq!(levels[1].remaining, 700);
    let t2 = token_plan(&p, &pl, Some("large"), None, Some(700))
        .unwrap()
        .unwrap();
    assert!(table.precheck_with(&pl, &t2.costed(), now, 1.0).0.allowed);
}

proptest! {
    /// The published bound: with reservations admitted all or nothing and settlements
    /// applied when each request ends, a token bucket never holds more spend than its
    /// burst plus the sum of the excess (usage above reservation) of what it admitted.
    #[test]
    fn admitted_tokens_stay_within_the_limit_plus_over_reservation(
        reqs in proptest::collection::vec((1u32..400, 0u64..600), 1..60),
        in_flight in 1usize..50,
    ) {
        let p = policy();
        let pl = plan(&p, &req(Some("large"))).unwrap();
        let mut table = LocalTable::default();
        let now = 1_000 * S; // no refill: the worst case
        let mut open: Vec<(TokenPlan, u64)> = Vec::new();
        let mut used_by_admitted: u64 = 0;
        let mut excess: u64 = 0;
        for (max_tokens, usage) in reqs {
            if open.len() >= in_flight {
                let (t, usage) = open.remove(0);
                match settle(t.reserve, Usage::Tokens(usage)) {
                    Settle::Refund(n) => table.refund(&t.refs(), n, now),
                    Settle::Extra(n) => {
                        let costed: Vec<(&Bucket, u32)> = t.buckets.iter().map(|b| (b, n)).collect();
                        table.charge_costs(&costed, now);
                        excess += u64::from(n);
                    }
                    _ => {}
                }
            }
            let Ok(Some(t)) = token_plan(&p, &pl, Some("large"), None, Some(max_tokens)) else { continue };
            let (eval, _) = table.decide_with(&pl, &t.costed(), now, 1.0);
            if eval.allowed {
                used_by_admitted += usage;
                open.push((t, usage));
            }
        }
        for (t, usage) in open.drain(..) {
            if let Settle::Extra(n) = settle(t.reserve, Usage::Tokens(usage)) {
                excess += u64::from(n);
            }
        }
        // The tenant's token allocation: burst 800, no refill at a fixed instant.
        prop_assert!(used_by_admitted <= 800 + excess, "{used_by_admitted} > 800 + {excess}");
    }
}

#[test]
fn an_ai_request_is_never_queued() {
    use crate::degrade::{choose_after_route, choose_for, Step};
    use crate::policy::ops::{CacheSettings, ClassOps, FallbackRoute, QueueSettings};
    use crate::policy::Fallback;
    let ops = ClassOps {
        mode: None,
        fallbacks: vec![Fallback::Queue, Fallback::Reject],
        queue: QueueSettings {
            max_wait_ms: 1_000,
            max_depth: 4,
        },
        fallback_route: FallbackRoute {
            header: "x-laneguard-route".into(),
            value: "fallback".into(),
            budget: None,
        },
        cache: CacheSettings {
            header: "x-laneguard-route".into(),
            value: "cached".into(),
            families: None,
        },
    };
    let p = policy();
    let pl = plan(&p, &req(Some("large"))).unwrap();
    assert_eq!(
        choose_for(&ops, &pl, "POST", 1_000, 0),
        Step::Queue { wait_ns: 1_000 }
    );
    let mut ai = pl.clone();
    ai.tokens = token_plan(&p, &pl, Some("large"), None, Some(10)).unwrap();
    assert!(matches!(
        choose_for(&ops, &ai, "POST", 1_000, 0),
        Step::Reject { .. }
    ));
    // Nor after the fallback route's own budget had no room.
    let ops = ClassOps {
        fallbacks: vec![Fallback::FallbackRoute, Fallback::Queue, Fallback::Reject],
        ..ops
    };
    assert_eq!(choose_for(&ops, &ai, "POST", 1_000, 0), Step::Route);
    assert_eq!(
        choose_after_route(&ops, &pl, "POST", 1_000, 0),
        Step::Queue { wait_ns: 1_000 }
    );
    assert_eq!(
        choose_after_route(&ops, &ai, "POST", 1_000, 0),
        Step::Reject {
            queue_refused: false
        }
    );
}

#[test]
fn only_events_that_can_carry_a_usage_are_parsed() {
    assert!(!may_carry_usage(
        br#"{"choices":[{"delta":{"content":"a"}}]}"#
    ));
    assert!(!may_carry_usage(br#"{"choices":[],"usage" : null}"#));
    assert!(!may_carry_usage(
        br#"{"choices":[{"delta":{"content":"say \"usage\""}}]}"#
    ));
    assert!(may_carry_usage(br#"{"usage":{"total_tokens":7}}"#));
    assert!(may_carry_usage(
        br#"{"usage":null,"x":{"usage":{"total_tokens":7}}}"#
    ));
    assert!(may_carry_usage(br#"{"usage":"lots"}"#));
    // OpenAI's include_usage streams: "usage":null in every content chunk, the total last.
    let mut s = SseScanner::new(1024);
    for _ in 0..3 {
        s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n");
    }
    s.feed(b"data: {\"choices\":[],\"usage\":{\"total_tokens\":12}}\n\ndata: [DONE]\n\n");
    assert!(s.done);
    assert_eq!(s.finish(), Usage::Tokens(12));
}
