//! Rate-limit headers and the 429: the IETF draft `RateLimit-Policy` / `RateLimit`
//! structured fields and the draft-03 `X-RateLimit-*` trio on allowed and limited responses,
//! `Retry-After` and a JSON body naming tenant, class and bucket on a 429.
//!
//! Policy `tests/policies/valid/headers.yaml`: interactive is 6 per minute with a burst of 3,
//! so the fourth quick request is limited and nothing refills during the test.

// Test code: a failed unwrap or panic is a failed test (clippy.toml allows them inside
// #[test] functions; this extends that to the helpers of this file).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::{test_policy, token, Reply, Stack};
use regex::Regex;

/// One list member: `"name";k=v;k=v` (sf-string with integer or string parameters).
fn member() -> Regex {
    Regex::new(r#"^"((?:[^"\\]|\\["\\])+)"((?:;[a-z*][a-z0-9_.*-]*=(?:-?[0-9]+|"(?:[^"\\]|\\["\\])*"))*)$"#).unwrap()
}

/// Check a structured-field list header; return each member's name and parameters.
/// A list member: its name and its parameters.
type Member = (String, Vec<(String, String)>);

fn parse_list(value: &str) -> Result<Vec<Member>, String> {
    let re = member();
    let mut out = Vec::new();
    for item in value.split(',') {
        let item = item.trim();
        let caps = re
            .captures(item)
            .ok_or_else(|| format!("{item:?} is not `\"name\";k=v...`"))?;
        let name = caps[1].to_string();
        let params = caps[2]
            .split(';')
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        out.push((name, params));
    }
    if out.is_empty() {
        return Err("empty list".into());
    }
    Ok(out)
}

fn has_int_params(value: &str, keys: &[&str]) -> Result<(), String> {
    for (name, params) in parse_list(value)? {
        for k in keys {
            let v = params
                .iter()
                .find(|(pk, _)| pk == k)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| format!("member {name:?} of {value:?} has no {k}="))?;
            if !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "member {name:?} of {value:?}: {k}={v} is not a non-negative integer"
                ));
            }
        }
    }
    Ok(())
}

fn assert_rate_limit_headers(r: &Reply, ctx: &str) {
    let policy = r
        .header("ratelimit-policy")
        .unwrap_or_else(|| panic!("no RateLimit-Policy\n{ctx}"));
    if let Err(e) = has_int_params(policy, &["q", "w"]) {
        panic!("RateLimit-Policy: {e}\n{ctx}");
    }
    let state = r
        .header("ratelimit")
        .unwrap_or_else(|| panic!("no RateLimit\n{ctx}"));
    if let Err(e) = has_int_params(state, &["r", "t"]) {
        panic!("RateLimit: {e}\n{ctx}");
    }
    let int = Regex::new(r"^[0-9]+$").unwrap();
    // X-RateLimit-Limit may carry a quota-policy suffix (`10, 10;w=60`): the first item is
    // the number.
    let limit = r
        .header("x-ratelimit-limit")
        .unwrap_or_else(|| panic!("no X-RateLimit-Limit\n{ctx}"));
    assert!(
        Regex::new(r"^[0-9]+(\s*,.*)?$").unwrap().is_match(limit),
        "X-RateLimit-Limit {limit:?}\n{ctx}"
    );
    for h in ["x-ratelimit-remaining", "x-ratelimit-reset"] {
        let v = r.header(h).unwrap_or_else(|| panic!("no {h}\n{ctx}"));
        assert!(int.is_match(v), "{h}: {v:?} is not an integer\n{ctx}");
    }
}

#[test]
fn structured_field_parser_accepts_the_draft_examples() {
    assert!(has_int_params(r#""integration";q=30;w=60"#, &["q", "w"]).is_ok());
    assert!(has_int_params(r#""integration";r=29;t=2"#, &["r", "t"]).is_ok());
    assert!(has_int_params(
        r#""shared";q=70;w=60, "class:integration";q=30;w=60"#,
        &["q", "w"]
    )
    .is_ok());
    assert!(has_int_params(r#"integration;q=30;w=60"#, &["q", "w"]).is_err());
    assert!(has_int_params(r#""integration";q=30"#, &["q", "w"]).is_err());
    assert!(has_int_params(r#""integration";q=x;w=60"#, &["q", "w"]).is_err());
}

#[test]
fn allowed_and_limited_responses_carry_the_rate_limit_headers() {
    let stack = Stack::start("headers", &test_policy("valid/headers.yaml").unwrap()).unwrap();
    let web = token("NORTHWIND_WEB").unwrap();

    // The burst (3) is served; each allowed response carries the headers, and the budget's
    // remaining count goes down.
    let mut remaining = Vec::new();
    for i in 0..3 {
        let r = stack.client.get_as("/orders/1", &web, &[]).unwrap();
        let ctx = format!("request {i}: {}\n{}", r.describe(), stack.logs());
        assert_eq!(r.status, 200, "{ctx}");
        assert_rate_limit_headers(&r, &ctx);
        // The values are the policy's: the shared pool is the ceiling less the repair
        // reserve (120 - 30 a minute), the interactive budget 6 a minute (the tightest).
        assert_eq!(
            r.header("ratelimit-policy"),
            Some(r#""shared";q=90;w=60, "class:interactive";q=6;w=60"#),
            "{ctx}"
        );
        assert_eq!(r.header("x-ratelimit-limit"), Some("6"), "{ctx}");
        remaining.push(
            r.header("x-ratelimit-remaining")
                .unwrap_or_default()
                .parse::<u64>()
                .unwrap_or(0),
        );
    }
    assert_eq!(
        remaining,
        [2, 1, 0],
        "X-RateLimit-Remaining over the burst of 3\n{}",
        stack.logs()
    );
    assert!(
        remaining.windows(2).all(|w| w[1] < w[0]),
        "X-RateLimit-Remaining did not go down over the burst: {remaining:?}\n{}",
        stack.logs()
    );
    assert_eq!(
        remaining.last(),
        Some(&0),
        "the burst is 3: after three requests none remain\n{}",
        stack.logs()
    );

    // The fourth is limited.
    let r = stack.client.get_as("/orders/1", &web, &[]).unwrap();
    let ctx = format!("{}\n{}", r.describe(), stack.logs());
    assert_eq!(r.status, 429, "{ctx}");
    let retry = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After\n{ctx}"));
    let retry: u64 = retry
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {retry:?} is not integer seconds\n{ctx}"));
    // 6 per minute: the next request fits 10 s after the last one.
    assert!((1..=10).contains(&retry), "Retry-After {retry}\n{ctx}");
    assert_rate_limit_headers(&r, &ctx);
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("application/json"),
        "{ctx}"
    );
    let body = r.json().unwrap();
    assert_eq!(body["tenant"], "northwind", "{ctx}");
    assert_eq!(body["class"], "interactive", "{ctx}");
    let bucket = body["bucket"].as_str().unwrap_or_default();
    assert!(
        !bucket.is_empty(),
        "the 429 body does not name the bucket\n{ctx}"
    );

    // Another class of the same tenant is not limited by interactive's budget.
    let erp = token("NORTHWIND_ERP").unwrap();
    let r = stack.client.get_as("/orders/1", &erp, &[]).unwrap();
    assert_eq!(r.status, 200, "{}\n{}", r.describe(), stack.logs());
    assert_rate_limit_headers(&r, &format!("{}\n{}", r.describe(), stack.logs()));
}
