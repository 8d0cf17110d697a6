//! Declared dimensions (issue 13 item 4) through real Envoy and the real service: the purpose
//! and the model are the caller's headers (or, for an AI request, its body), so omitting or
//! inventing one must never mean "no bucket".
//!
//! The policy is the demo's (`envoy/demo/envoy.yaml`: models apply to the `chat` family and
//! refuse a missing or unlisted model), plus a purposes section whose default, `general`, is
//! the tightest bucket (3 an hour, so no window boundary is straddled).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::{demo_policy, token, Stack};
use serde_yaml::Value;

fn policy() -> String {
    let mut doc: Value = serde_yaml::from_str(&demo_policy().unwrap()).unwrap();
    doc["purposes"] = serde_yaml::from_str(
        "{ header: x-purpose, default: general, limits: { general: { per_hour: 3, burst: 3 }, reporting: { per_hour: 100, burst: 50 } } }",
    )
    .unwrap();
    serde_yaml::to_string(&doc).unwrap()
}

fn counter(stack: &Stack, name: &str, want: u64) -> u64 {
    stack.envoy.wait_counter(name, want).unwrap()
}

#[test]
fn omitting_x_purpose_no_longer_escapes_the_purpose_bucket() {
    // Old code: a request without x-purpose was charged no purpose bucket, so ERP's five
    // requests were all served (its class budget allows 10 at once).
    let stack = Stack::start("declared-purpose", &policy()).unwrap();
    let erp = token("NORTHWIND_ERP").unwrap();
    let statuses: Vec<(u16, String)> = (0..5)
        .map(|i| {
            let r = stack
                .client
                .get_as(&format!("/orders/{i}"), &erp, &[])
                .unwrap();
            let bucket = r
                .json()
                .map(|v| v["bucket"].as_str().unwrap_or("").to_string());
            (r.status, bucket.unwrap_or_default())
        })
        .collect();
    let ctx = format!("{statuses:?}\n{}", stack.logs());
    let served = statuses.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(served, 3, "the default purpose admits its burst: {ctx}");
    assert!(
        statuses[3..]
            .iter()
            .all(|(s, b)| *s == 429 && b == "purpose:general"),
        "the rest are refused by the default purpose's bucket: {ctx}"
    );

    // Inventing a purpose does not escape it either: charged to the default, and counted.
    let r = stack
        .client
        .get_as("/orders/9", &erp, &[("x-purpose", "anything")])
        .unwrap();
    assert_eq!(r.status, 429, "{}", r.describe());
    assert_eq!(r.json_str("bucket"), "purpose:general", "{}", r.describe());
    assert_eq!(
        counter(&stack, "purpose_defaulted", 1),
        1,
        "{}",
        stack.logs()
    );
    // A listed purpose is its own bucket.
    let r = stack
        .client
        .get_as("/orders/10", &erp, &[("x-purpose", "reporting")])
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
}

#[test]
fn a_chat_request_for_an_unlisted_model_is_refused_before_the_model_server() {
    // Old code: a model the policy does not list was charged no model bucket and served.
    let stack = Stack::start("declared-model", &demo_policy().unwrap()).unwrap();
    let assistant = token("NORTHWIND_ASSISTANT").unwrap();
    let post = |body: &str, headers: &[(&str, &str)]| {
        let mut hs = vec![("content-type", "application/json")];
        hs.extend_from_slice(headers);
        stack
            .client
            .post_as("/v1/chat/completions", &assistant, &hs, body.as_bytes())
            .unwrap()
    };
    let r = post(r#"{"model":"gpt-9","max_tokens":10}"#, &[]);
    assert_eq!(r.status, 403, "{}", r.describe());
    assert_eq!(r.json_str("error"), "model_not_allowed", "{}", r.describe());
    let r = post(r#"{"max_tokens":10}"#, &[("x-model", "gpt-9")]);
    assert_eq!(
        r.status,
        403,
        "the header is declared too: {}",
        r.describe()
    );
    assert_eq!(counter(&stack, "model_refused", 2), 2, "{}", stack.logs());

    // No model at all: the demo names no default model, so it is refused too (400).
    let r = post(r#"{"max_tokens":10}"#, &[]);
    assert_eq!(r.status, 400, "{}", r.describe());
    assert_eq!(r.json_str("error"), "model_required", "{}", r.describe());
    assert_eq!(counter(&stack, "model_refused", 3), 3, "{}", stack.logs());

    // A listed model is served, on its own buckets.
    let r = post(r#"{"model":"small","max_tokens":10}"#, &[]);
    assert_eq!(r.status, 200, "{}", r.describe());
    let policy = r.header("ratelimit-policy").unwrap_or_default().to_string();
    assert!(
        policy.contains("model:small"),
        "{policy:?}\n{}",
        r.describe()
    );
}
