//! Fuzz target of the request planner (issue 12 §2, `docs/fuzzing.md`): arbitrary header
//! sets (names, values, duplicates, bytes that are not UTF-8, values up to Envoy's header
//! size limit) through the whole state machine on the mock host, with the service's answer
//! arbitrary too. Properties: never a panic; the identity comes only from the trusted
//! headers (removing every header the policy does not read changes nothing); a header sent
//! twice counts once (its first value); a decided request's descriptors carry the tenant of
//! the first tenant header. `make test` runs a few hundred inputs, `make fuzz` more.

use crate::host::Action;
use crate::mock::{configured, rls_answer, Status, POLICY};
use crate::wasm_host::text;
use laneguard_fuzz::{fuzz, Budget};
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::Code;
use proptest::prelude::*;

/// Envoy's default limit on the request headers' total size (`max_request_headers_kb`).
const ENVOY_HEADERS_BYTES: usize = 60 * 1024;

/// The headers the policy reads: everything else must not change a decision.
const READ: &[&str] = &[
    ":method",
    ":path",
    "x-request-id",
    "x-laneguard-tenant",
    "x-laneguard-principal",
    "x-laneguard-user",
    "x-traffic-class",
];

/// Headers the policy does not read: some look like identity headers.
const UNREAD: &[&str] = &[
    "x-laneguard-class",
    "x-laneguard-route",
    "x-tenant",
    "x-laneguard-tenant-id",
    "x-forwarded-for",
    "authorization",
    "tenant",
];

const VALUES: &[&str] = &[
    "acme",
    "globex",
    "app",
    "stranger",
    "web",
    "batch",
    "repair",
    "legacy",
    "trial",
    "queued",
    "GET",
    "/orders",
    "/",
    "",
    " acme",
    "acme ",
    "ACME",
    "a:b@c.d-e_f",
    "u1",
];

/// A value: a known word, arbitrary bytes made text as the host makes them, or a long one.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => proptest::sample::select(VALUES).prop_map(str::to_string),
        2 => proptest::collection::vec(any::<u8>(), 0..24).prop_map(text),
        1 => "[ -~]{0,40}",
        1 => (100usize..ENVOY_HEADERS_BYTES / 2).prop_map(|n| "a".repeat(n)),
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(READ).prop_map(str::to_string),
        2 => proptest::sample::select(UNREAD).prop_map(str::to_string),
        1 => "[a-z0-9-]{1,20}",
    ]
}

/// A header set within Envoy's size limit, and how the service answers.
#[derive(Clone, Debug)]
struct Input {
    headers: Vec<(String, String)>,
    /// 0: OK, 1: OVER_LIMIT, 2: gRPC UNAVAILABLE, 3: an undecodable body.
    answer: u8,
}

fn input() -> impl Strategy<Value = Input> {
    (proptest::collection::vec((name(), value()), 0..24), 0u8..4).prop_map(
        |(mut headers, answer)| {
            let mut total = 0;
            headers.retain(|(k, v)| {
                total += k.len() + v.len();
                total <= ENVOY_HEADERS_BYTES
            });
            Input { headers, answer }
        },
    )
}

/// What a user sees of one request: the reply, the class sent upstream (when it goes
/// there), the descriptors of every call (as their entries).
#[derive(Debug, PartialEq)]
struct Seen {
    reply: Option<(u32, String)>,
    granted: Option<String>,
    calls: Vec<Vec<Vec<(String, String)>>>,
    passed: bool,
}

fn run(headers: &[(String, String)], answer: u8) -> Seen {
    let (h, root) = configured(POLICY);
    let Some(mut req) = root.new_request(2) else {
        return Seen {
            reply: None,
            granted: None,
            calls: Vec::new(),
            passed: false,
        };
    };
    *h.request_headers.borrow_mut() = headers.to_vec();
    let mut action = req.on_request_headers(&h);
    // Answer every call the request makes (a borrow asks twice).
    let mut answered = 0;
    while action == Action::Pause && h.last_reply().is_none() && h.call_count() > answered {
        answered = h.call_count();
        let Some(call) = h.last_call() else { break };
        let n = call.rls_request().descriptors.len();
        let (status, body) = match answer {
            0 => (0, Some(rls_answer(Code::Ok, &vec![Status::ok(5); n]))),
            1 => (
                0,
                Some(rls_answer(Code::OverLimit, &vec![Status::over(5_000); n])),
            ),
            2 => (14, None),
            _ => (0, Some(vec![0xff; 3])),
        };
        *h.grpc_body.borrow_mut() = body;
        req.on_grpc_response(&h, call.token, status, 0);
        if h.resumed.get() > 0 {
            action = Action::Continue;
        }
    }
    let calls = h
        .calls
        .borrow()
        .iter()
        .map(|c| {
            c.rls_request()
                .descriptors
                .iter()
                .map(|d| {
                    d.entries
                        .iter()
                        .map(|e| (e.key.clone(), e.value.clone()))
                        .collect()
                })
                .collect()
        })
        .collect();
    let passed = action == Action::Continue;
    Seen {
        reply: h.last_reply().map(|r| (r.status, r.body)),
        // What the upstream gets, if the request reaches it.
        granted: h
            .request_header_value("x-laneguard-class")
            .filter(|_| passed),
        calls,
        passed,
    }
}

fn first<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn check(i: &Input) -> Result<(), String> {
    let seen = run(&i.headers, i.answer);
    // Only the headers the policy reads matter.
    let read: Vec<(String, String)> = i
        .headers
        .iter()
        .filter(|(k, _)| READ.contains(&k.as_str()))
        .cloned()
        .collect();
    let only_read = run(&read, i.answer);
    if seen != only_read {
        return Err(format!(
            "an unread header changed the outcome: {seen:?} vs {only_read:?}"
        ));
    }
    // A header's later copies are ignored.
    let mut firsts: Vec<(String, String)> = Vec::new();
    for (k, v) in &read {
        if !firsts.iter().any(|(fk, _)| fk == k) {
            firsts.push((k.clone(), v.clone()));
        }
    }
    let deduped = run(&firsts, i.answer);
    if seen != deduped {
        return Err(format!(
            "a duplicate header changed the outcome: {seen:?} vs {deduped:?}"
        ));
    }
    let tenant = first(&i.headers, "x-laneguard-tenant");
    let principal = first(&i.headers, "x-laneguard-principal");
    match (&seen.reply, tenant, principal) {
        (Some((401, _)), None, _) | (Some((401, _)), _, None) => return Ok(()),
        (Some((s, body)), None, _) | (Some((s, body)), _, None) => {
            return Err(format!("no identity, yet {s} {body}"))
        }
        _ => {}
    }
    if let Some(class) = &seen.granted {
        if ![
            "web", "batch", "feed", "queued", "routed", "trial", "legacy", "repair",
        ]
        .contains(&class.as_str())
        {
            return Err(format!(
                "granted a class the policy does not have: {class:?}"
            ));
        }
    }
    // Every tenant entry the service sees is the first tenant header's value.
    for call in &seen.calls {
        for d in call {
            for (k, v) in d {
                if k == "tenant" && Some(v.as_str()) != tenant {
                    return Err(format!("descriptor tenant {v:?}, header {tenant:?}"));
                }
            }
        }
    }
    if seen.reply.is_none() && !seen.passed && seen.calls.is_empty() {
        // Held by the queue is the only way to be neither answered nor passed.
        return Err("neither answered nor passed, and no call".into());
    }
    Ok(())
}

#[test]
fn fuzz_request_headers() {
    fuzz("request_headers", Budget::from_env(100), input(), check).unwrap();
}

/// The comparisons above are not vacuous: the outcome does depend on the trusted tenant
/// (its descriptors carry it), so an untrusted header that leaked into the identity would
/// show.
#[test]
fn the_outcome_depends_on_the_trusted_tenant() {
    let with = |tenant: &str| {
        vec![
            ("x-laneguard-tenant".to_string(), tenant.to_string()),
            ("x-laneguard-principal".to_string(), "app".to_string()),
            ("x-tenant".to_string(), "globex".to_string()),
        ]
    };
    let i = Input {
        headers: with("acme"),
        answer: 0,
    };
    assert!(check(&i).is_ok());
    assert_ne!(run(&with("acme"), 0), run(&with("globex"), 0));
}
