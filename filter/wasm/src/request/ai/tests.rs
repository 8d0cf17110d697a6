//! AI requests against the scripted host: body buffering, reservation, settlement,
//! the cheaper model, and every bad input's outcome.

use crate::host::{Action, Host};
use crate::mock::MockHost;
use crate::root::Root;
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus,
};
use laneguard_protos::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use laneguard_protos::prost::Message;

const T0: u64 = 1_700_000_000_000_000_000;

const POLICY: &str = r#"
version: 1
service: { cluster: laneguard_rls, timeout_ms: 200, sync_interval_s: 1 }
classes:
  - { name: assistant, consequence: time_sensitive, budget: { per_minute: 600, burst: 100 } }
principals:
  - { name: bot, default_class: assistant, may_declare: [assistant] }
tenants:
  default: { ceiling: { per_minute: 1000, burst: 200 } }
models:
  header: x-model
  default: small
  unknown: refuse
  list:
    - name: large
      capacity: { per_minute: 600, burst: 100 }
      allocation: { share: 1.0, burst: 100 }
      cheaper_model: small
      tokens: { capacity: { per_minute: 60000, burst: 1000 }, default_estimate: 300 }
    - name: small
      capacity: { per_minute: 600, burst: 100 }
      allocation: { share: 1.0, burst: 100 }
      tokens: { capacity: { per_minute: 60000, burst: 5000 } }
tokens:
  inspect_bytes: 1024
"#;

fn configured() -> (MockHost, Root) {
    let h = MockHost::new(T0);
    *h.plugin_config.borrow_mut() = Some(POLICY.as_bytes().to_vec());
    let mut root = Root::with_vm(1, 7);
    assert!(root.on_vm_start(&h));
    assert!(root.on_configure(&h), "the test policy parses");
    h.flush_on_read(&root);
    (h, root)
}

fn headers() -> Vec<(&'static str, &'static str)> {
    vec![
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("x-laneguard-tenant", "northwind"),
        ("x-laneguard-principal", "bot"),
        ("content-type", "application/json"),
    ]
}

/// The decision request the filter sent: each descriptor's name and hits.
fn sent(h: &MockHost) -> Vec<(String, Option<u64>)> {
    let call = h.last_call().unwrap();
    let req = RateLimitRequest::decode(call.message.as_slice()).unwrap();
    req.descriptors
        .iter()
        .map(|d| {
            let name = d
                .entries
                .iter()
                .filter(|e| e.key == "bucket" || e.key == "model")
                .map(|e| e.value.as_str())
                .collect::<Vec<_>>()
                .join(":");
            (name, d.hits_addend)
        })
        .collect()
}

fn answer(codes: &[Code]) -> Vec<u8> {
    let over = codes.contains(&Code::OverLimit);
    RateLimitResponse {
        overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
        statuses: codes
            .iter()
            .map(|c| DescriptorStatus {
                code: *c as i32,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Send headers and a body; the request ends up waiting for the service.
fn admit(h: &MockHost, req: &mut crate::request::Request, body: &str) {
    h.start_request(&headers());
    let calls = h.calls.borrow().len();
    assert_eq!(req.on_request_headers_end(h, false), Action::Pause);
    assert_eq!(
        h.calls.borrow().len(),
        calls,
        "nothing decided before the body"
    );
    *h.request_body.borrow_mut() = body.as_bytes().to_vec();
    let half = body.len() / 2;
    assert_eq!(req.on_request_body(h, half, false), Action::Pause);
    assert_eq!(req.on_request_body(h, body.len(), true), Action::Pause);
}

/// [`admit`], and the service says yes.
fn admitted(h: &MockHost, req: &mut crate::request::Request, body: &str) {
    admit(h, req, body);
    *h.grpc_body.borrow_mut() = Some(answer(&[Code::Ok; 6]));
    req.on_grpc_response(h, h.last_call().unwrap().token, 0, 10);
}

fn respond(h: &MockHost, req: &mut crate::request::Request, ctype: &str, chunks: &[&str]) {
    h.response_headers
        .borrow_mut()
        .push(("content-type".into(), ctype.into()));
    assert_eq!(req.on_response_headers_end(h, false), Action::Continue);
    for (i, c) in chunks.iter().enumerate() {
        *h.response_body.borrow_mut() = c.as_bytes().to_vec();
        let last = i + 1 == chunks.len();
        assert_eq!(req.on_response_body(h, c.len(), last), Action::Continue);
    }
}

#[test]
fn reserves_at_admission_and_refunds_on_the_sync_tick() {
    let (h, mut root) = configured();
    let mut req = root.new_request(2).unwrap();
    admit(
        &h,
        &mut req,
        r#"{"model":"large","max_tokens":200,"messages":[]}"#,
    );
    // The body named the model: its buckets, and the header set for routing.
    assert_eq!(h.request_header_value("x-model").as_deref(), Some("large"));
    let names = sent(&h);
    assert_eq!(
        names,
        [
            ("shared".to_string(), None),
            ("class".to_string(), None),
            ("model:large".to_string(), None),
            ("model_total:large".to_string(), None),
            ("model_tokens:large".to_string(), Some(200)),
            ("model_total_tokens:large".to_string(), Some(200)),
        ]
    );
    let lease = h.last_call().unwrap().metadata;
    assert!(
        lease
            .iter()
            .any(|(k, v)| k == "x-laneguard-lease" && v == b"0"),
        "token buckets are never leased"
    );
    *h.grpc_body.borrow_mut() = Some(answer(&[Code::Ok; 6]));
    req.on_grpc_response(&h, h.last_call().unwrap().token, 0, 10);
    assert_eq!(h.resumed.get(), 1);
    assert_eq!(h.metric("laneguard.tokens.reserved"), 200);
    assert_eq!(h.metric("laneguard.tokens.in_flight_reserved"), 200);
    // It used 120 of 200.
    respond(
        &h,
        &mut req,
        "application/json",
        &[
            r#"{"usage":{"prompt_tokens":20,"#,
            r#""completion_tokens":100}}"#,
        ],
    );
    assert_eq!(h.metric("laneguard.tokens.settled.refund"), 1);
    assert_eq!(h.metric("laneguard.tokens.refunded"), 80);
    assert_eq!(h.metric("laneguard.tokens.in_flight_reserved"), 0);
    req.on_done(&h);
    assert_eq!(h.metric("laneguard.tokens.settled.disconnected"), 0);
    // No call per request: the refund goes out with the sync tick, for every bucket.
    let calls = h.calls.borrow().len();
    for _ in 0..10 {
        root.on_tick(&h);
    }
    let all = h.calls.borrow();
    let refund: Vec<_> = all[calls..]
        .iter()
        .filter(|c| {
            c.metadata
                .iter()
                .any(|(k, v)| k == "x-laneguard-report" && v == b"refund")
        })
        .collect();
    assert_eq!(refund.len(), 1);
    let req = RateLimitRequest::decode(refund[0].message.as_slice()).unwrap();
    assert_eq!(req.descriptors.len(), 2);
    assert!(req.descriptors.iter().all(|d| d.hits_addend == Some(80)));
}

#[test]
fn sse_usage_settles_and_an_extra_charge_is_reported() {
    let (h, root) = configured();
    let mut req = root.new_request(2).unwrap();
    admit(
        &h,
        &mut req,
        r#"{"model":"small","max_tokens":10,"stream":true}"#,
    );
    *h.grpc_body.borrow_mut() = Some(answer(&[Code::Ok; 6]));
    req.on_grpc_response(&h, h.last_call().unwrap().token, 0, 10);
    respond(
        &h,
        &mut req,
        "text/event-stream",
        &[
            "data: {\"choices\":[]}\n\n",
            "data: {\"usage\":{\"total_",
            "tokens\":25}}\n\ndata: [DONE]\n\n",
        ],
    );
    assert_eq!(h.metric("laneguard.tokens.settled.extra"), 1);
    assert_eq!(h.metric("laneguard.tokens.over_reservation"), 15);
}

#[test]
fn a_client_that_goes_away_settles_at_the_reservation() {
    let (h, root) = configured();
    let mut req = root.new_request(2).unwrap();
    admit(&h, &mut req, r#"{"model":"large","stream":true}"#);
    assert_eq!(h.metric("laneguard.tokens.estimate.model"), 1);
    *h.grpc_body.borrow_mut() = Some(answer(&[Code::Ok; 6]));
    req.on_grpc_response(&h, h.last_call().unwrap().token, 0, 10);
    respond(&h, &mut req, "text/event-stream", &[]);
    *h.response_body.borrow_mut() = b"data: {\"choices\":[]}\n\n".to_vec();
    req.on_response_body(&h, 22, false);
    req.on_done(&h);
    assert_eq!(h.metric("laneguard.tokens.settled.disconnected"), 1);
    assert_eq!(h.metric("laneguard.tokens.in_flight_reserved"), 0);
    // A response without usage settles at the reservation too, counted apart.
    let mut req = root.new_request(3).unwrap();
    admitted(&h, &mut req, r#"{"model":"large","max_tokens":5}"#);
    respond(&h, &mut req, "application/json", &[r#"{"id":"x"}"#]);
    assert_eq!(h.metric("laneguard.tokens.settled.missing"), 1);
    let mut req = root.new_request(4).unwrap();
    admitted(&h, &mut req, r#"{"model":"large","max_tokens":5}"#);
    respond(
        &h,
        &mut req,
        "application/json",
        &[r#"{"usage":{"total_tokens":-4}}"#],
    );
    assert_eq!(h.metric("laneguard.tokens.settled.invalid"), 1);
}

#[test]
fn bad_bodies_are_refused_before_any_charge() {
    let (h, root) = configured();
    let cases: [(&str, u32, &str); 4] = [
        ("not json", 400, "invalid_body"),
        (r#"{"max_tokens":-1}"#, 400, "invalid_max_tokens"),
        (
            r#"{"model":"large","max_tokens":100000}"#,
            400,
            "max_tokens_too_large",
        ),
        ("", 400, "invalid_body"),
    ];
    for (i, (body, status, code)) in cases.iter().enumerate() {
        let mut req = root.new_request(10 + i as u32).unwrap();
        h.start_request(&headers());
        if body.is_empty() {
            // No body at all.
            assert_eq!(req.on_request_headers_end(&h, true), Action::Pause);
        } else {
            assert_eq!(req.on_request_headers_end(&h, false), Action::Pause);
            *h.request_body.borrow_mut() = body.as_bytes().to_vec();
            assert_eq!(req.on_request_body(&h, body.len(), true), Action::Pause);
        }
        let reply = h.last_reply().unwrap();
        assert_eq!(reply.status, *status, "{body}");
        assert!(reply.body.contains(code), "{body}: {}", reply.body);
    }
    // Larger than inspect_bytes: 413 as soon as the buffer passes it.
    let mut req = root.new_request(20).unwrap();
    h.start_request(&headers());
    assert_eq!(req.on_request_headers_end(&h, false), Action::Pause);
    assert_eq!(req.on_request_body(&h, 2000, false), Action::Pause);
    assert_eq!(h.last_reply().unwrap().status, 413);
    assert!(h.calls.borrow().is_empty(), "nothing charged");
    assert_eq!(h.metric("laneguard.tokens.body_too_large"), 1);
    assert_eq!(h.metric("laneguard.tokens.bad_body"), 2);
}

#[test]
fn a_full_model_falls_back_to_the_cheaper_one() {
    let (h, root) = configured();
    let mut req = root.new_request(2).unwrap();
    let body = r#"{"model":"large","max_tokens":50}"#;
    admit(&h, &mut req, body);
    // The service says large's token allocation is out of room.
    let first = h.last_call().unwrap().token;
    *h.grpc_body.borrow_mut() = Some(answer(&[
        Code::Ok,
        Code::Ok,
        Code::Ok,
        Code::Ok,
        Code::OverLimit,
        Code::Ok,
    ]));
    req.on_grpc_response(&h, first, 0, 10);
    assert_eq!(h.resumed.get(), 0, "asked again, for the cheaper model");
    assert_eq!(h.request_header_value("x-model").as_deref(), Some("small"));
    let rewritten: serde_json::Value = serde_json::from_slice(&h.request_body.borrow()).unwrap();
    assert_eq!(rewritten["model"], "small");
    assert_eq!(rewritten["max_tokens"], 50);
    assert_eq!(
        h.request_header_value("content-length"),
        Some(h.request_body.borrow().len().to_string())
    );
    let names: Vec<String> = sent(&h).into_iter().map(|(n, _)| n).collect();
    assert!(
        names.contains(&"model_tokens:small".to_string()),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.contains("large")), "{names:?}");
    *h.grpc_body.borrow_mut() = Some(answer(&[Code::Ok; 6]));
    req.on_grpc_response(&h, h.last_call().unwrap().token, 0, 10);
    assert_eq!(h.resumed.get(), 1);
    req.on_response_headers_end(&h, true);
    assert_eq!(
        h.response_header("x-laneguard-fallback").as_deref(),
        Some("cheaper_model")
    );
    assert_eq!(h.metric("laneguard.tokens.cheaper_model"), 1);
    let audit = String::from_utf8(
        h.filter_state
            .borrow()
            .get(crate::audit::FILTER_STATE)
            .cloned()
            .unwrap_or_default(),
    )
    .unwrap();
    assert!(audit.contains("\"fallback\":\"cheaper_model\""), "{audit}");
    assert!(audit.contains("model_tokens:large"), "{audit}");
    // small is out too: a 429 naming its bucket.
    let mut req = root.new_request(3).unwrap();
    admit(&h, &mut req, body);
    *h.grpc_body.borrow_mut() = Some(answer(&[
        Code::Ok,
        Code::Ok,
        Code::Ok,
        Code::Ok,
        Code::OverLimit,
        Code::Ok,
    ]));
    req.on_grpc_response(&h, h.last_call().unwrap().token, 0, 10);
    req.on_grpc_response(&h, h.last_call().unwrap().token, 0, 10);
    let reply = h.last_reply().unwrap();
    assert_eq!(reply.status, 429);
    assert!(reply.body.contains("model_tokens:small"), "{}", reply.body);
}

#[test]
fn any_body_stays_buffered_while_its_request_waits_for_the_decision() {
    let (h, root) = configured();
    let mut req = root.new_request(2).unwrap();
    h.start_request(&[
        (":method", "POST"),
        (":path", "/orders"),
        ("x-laneguard-tenant", "northwind"),
        ("x-laneguard-principal", "bot"),
    ]);
    assert_eq!(req.on_request_headers_end(&h, false), Action::Pause);
    // Not an AI request: the body is not read, but it must not overtake the decision.
    assert_eq!(req.on_request_body(&h, 10, false), Action::Pause);
    *h.grpc_body.borrow_mut() = Some(answer(&[Code::Ok; 2]));
    req.on_grpc_response(&h, h.last_call().unwrap().token, 0, 10);
    assert_eq!(h.resumed.get(), 1);
    assert_eq!(req.on_request_body(&h, 20, true), Action::Continue);
    assert_eq!(h.metric("laneguard.tokens.requests"), 0);
}
