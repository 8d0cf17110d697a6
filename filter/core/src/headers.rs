//! Response headers and bodies: the IETF draft `RateLimit-Policy` / `RateLimit` structured
//! fields (draft-ietf-httpapi-ratelimit-headers), `Retry-After`, the older draft-03
//! `X-RateLimit-*` trio, and the JSON bodies of local replies.

use crate::engine::Level;
use serde_json::json;

/// `RateLimit-Policy: "class:integration";q=30;w=60, "shared";q=70;w=60`
pub fn policy_header(levels: &[Level]) -> String {
    structured(levels, |out, l| {
        push_param(out, ";q=", u64::from(l.quota));
        push_param(out, ";w=", l.window_s);
    })
}

/// `RateLimit: "class:integration";r=12;t=4, "shared";r=50;t=9`
pub fn state_header(levels: &[Level]) -> String {
    structured(levels, |out, l| {
        push_param(out, ";r=", u64::from(l.remaining));
        push_param(out, ";t=", l.reset_s);
    })
}

/// An sf-list of one item per level: the level's name as an sf-string, then `params`.
/// Written into one `String` with no `format!` and no temporary per item: these two headers
/// go out on every allowed request, and building them with `format!`, a `Vec<String>` and
/// `join` was the largest part of a lease hit's own work (issue 10 §2: a native profile of
/// the request path put it at 17%, mostly the allocator).
fn structured(levels: &[Level], params: impl Fn(&mut String, &Level)) -> String {
    let mut out = String::with_capacity(levels.len() * 40);
    for (i, l) in levels.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        push_sf_string(&mut out, &l.name);
        params(&mut out, l);
    }
    out
}

fn push_param(out: &mut String, key: &str, value: u64) {
    out.push_str(key);
    push_u64(out, value);
}

/// Decimal digits of `n`, without `core::fmt`.
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[at..] {
        out.push(char::from(d));
    }
}

fn u64_string(n: u64) -> String {
    let mut out = String::with_capacity(20);
    push_u64(&mut out, n);
    out
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
            out.push(("x-ratelimit-limit", u64_string(u64::from(t.quota))));
            out.push(("x-ratelimit-remaining", u64_string(u64::from(t.remaining))));
            out.push(("x-ratelimit-reset", u64_string(t.reset_s)));
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
#[cfg(test)]
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    push_sf_string(&mut out, s);
    out
}

/// [`sf_string`] appended to `out`.
fn push_sf_string(out: &mut String, s: &str) {
    out.push('"');
    if s.bytes()
        .all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\')
    {
        // Every bucket name the policy makes: nothing to escape or drop.
        out.push_str(s);
        out.push('"');
        return;
    }
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
    fn digits_without_fmt() {
        for n in [0, 1, 9, 10, 99, 100, 12_345, u64::from(u32::MAX), u64::MAX] {
            assert_eq!(u64_string(n), n.to_string());
        }
    }

    proptest::proptest! {
        /// The headers written without `format!` are byte for byte what `format!` wrote.
        #[test]
        fn headers_match_the_format_reference(
            items in proptest::collection::vec(
                ("[ -~]{0,12}|[^\\x00]{0,6}", proptest::prelude::any::<u32>(),
                 proptest::prelude::any::<u64>(), proptest::prelude::any::<u32>(),
                 proptest::prelude::any::<u64>()),
                0..4,
            )
        ) {
            let l: Vec<Level> = items
                .iter()
                .map(|(n, q, w, r, t)| level(n, *q, *w, *r, *t, true))
                .collect();
            // The escaping rule on its own (RFC 8941 sf-string, printable ASCII kept).
            let sf_string = |s: &str| {
                let body: String = s
                    .chars()
                    .filter(|c| matches!(c, ' '..='~'))
                    .flat_map(|c| match c {
                        '"' | '\\' => vec!['\\', c],
                        _ => vec![c],
                    })
                    .collect();
                format!("\"{body}\"")
            };
            let reference = |f: &dyn Fn(&Level) -> String| {
                l.iter().map(f).collect::<Vec<_>>().join(", ")
            };
            proptest::prop_assert_eq!(
                policy_header(&l),
                reference(&|x| format!("{};q={};w={}", sf_string(&x.name), x.quota, x.window_s))
            );
            proptest::prop_assert_eq!(
                state_header(&l),
                reference(&|x| format!("{};r={};t={}", sf_string(&x.name), x.remaining, x.reset_s))
            );
        }
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
