//! Response headers and bodies: the IETF draft `RateLimit-Policy` / `RateLimit` structured
//! fields (draft-ietf-httpapi-ratelimit-headers), `Retry-After`, the older draft-03
//! `X-RateLimit-*` trio, and the JSON bodies of local replies.

use crate::engine::Level;
use serde_json::json;

/// `RateLimit-Policy: "class:integration";q=30;w=60, "shared";q=70;w=60`
pub fn policy_header(levels: &[Level]) -> String {
    let items: Vec<String> = levels
        .iter()
        .map(|l| format!("{};q={};w={}", sf_string(&l.name), l.quota, l.window_s))
        .collect();
    items.join(", ")
}

/// `RateLimit: "class:integration";r=12;t=4, "shared";r=50;t=9`
pub fn state_header(levels: &[Level]) -> String {
    let items: Vec<String> = levels
        .iter()
        .map(|l| format!("{};r={};t={}", sf_string(&l.name), l.remaining, l.reset_s))
        .collect();
    items.join(", ")
}

/// The most constraining level: the first without room, else the one with the least left.
pub fn tightest(levels: &[Level]) -> Option<&Level> {
    levels
        .iter()
        .find(|l| !l.has_room)
        .or_else(|| levels.iter().min_by_key(|l| l.remaining))
}

/// All rate-limit headers for a response. Empty when no bucket was touched.
pub fn rate_limit_headers(levels: &[Level], draft03: bool) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(5);
    if levels.is_empty() {
        return out;
    }
    out.push(("ratelimit-policy", policy_header(levels)));
    out.push(("ratelimit", state_header(levels)));
    if draft03 {
        if let Some(t) = tightest(levels) {
            out.push(("x-ratelimit-limit", t.quota.to_string()));
            out.push(("x-ratelimit-remaining", t.remaining.to_string()));
            out.push(("x-ratelimit-reset", t.reset_s.to_string()));
        }
    }
    out
}

/// The JSON body of a 429. `request_id` (Envoy's `x-request-id`) is what the caller quotes
/// to find the decision's audit record.
pub fn limited_body(
    tenant: &str,
    class: &str,
    bucket: &str,
    retry_after_s: u64,
    decided_by: &str,
    request_id: Option<&str>,
) -> String {
    let mut v = json!({
        "error": "rate_limited",
        "tenant": tenant,
        "class": class,
        "bucket": bucket,
        "retry_after_s": retry_after_s,
        "decided_by": decided_by,
    });
    if let (Some(id), Some(m)) = (request_id, v.as_object_mut()) {
        m.insert("request_id".into(), json!(id));
    }
    v.to_string()
}

/// The JSON body of any other local reply.
pub fn error_body(code: &str, detail: &str) -> String {
    json!({ "error": code, "detail": detail }).to_string()
}

/// An RFC 8941 sf-string: quoted, with `"` and `\` escaped; other bytes outside
/// printable ASCII are dropped (names are validated ASCII anyway).
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => {}
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(name: &str, q: u32, w: u64, r: u32, t: u64, room: bool) -> Level {
        Level {
            name: name.into(),
            quota: q,
            window_s: w,
            remaining: r,
            reset_s: t,
            retry_after_s: 0,
            retry_after_ns: 0,
            burst: q,
            has_room: room,
        }
    }

    #[test]
    fn draft_syntax() {
        let l = vec![
            level("shared", 70, 60, 50, 9, true),
            level("class:integration", 30, 60, 12, 4, true),
        ];
        assert_eq!(
            policy_header(&l),
            r#""shared";q=70;w=60, "class:integration";q=30;w=60"#
        );
        assert_eq!(
            state_header(&l),
            r#""shared";r=50;t=9, "class:integration";r=12;t=4"#
        );
        let h = rate_limit_headers(&l, true);
        assert!(h.contains(&("x-ratelimit-limit", "30".to_string())));
        assert!(h.contains(&("x-ratelimit-remaining", "12".to_string())));
        assert!(rate_limit_headers(&l, false)
            .iter()
            .all(|(k, _)| !k.starts_with("x-")));
    }

    #[test]
    fn tightest_prefers_the_tripped_bucket() {
        let l = vec![
            level("a", 10, 1, 0, 1, true),
            level("b", 10, 1, 3, 1, false),
        ];
        assert_eq!(tightest(&l).map(|l| l.name.as_str()), Some("b"));
    }

    #[test]
    fn sf_string_escapes() {
        assert_eq!(sf_string(r#"a"b\c"#), r#""a\"b\\c""#);
    }

    #[test]
    fn body_is_json_naming_tenant_class_bucket() {
        let v: serde_json::Value =
            serde_json::from_str(&limited_body("t", "c", "shared", 3, "local", Some("r1")))
                .unwrap();
        assert_eq!(v["tenant"], "t");
        assert_eq!(v["class"], "c");
        assert_eq!(v["bucket"], "shared");
        assert_eq!(v["retry_after_s"], 3);
        assert_eq!(v["request_id"], "r1");
    }
}
