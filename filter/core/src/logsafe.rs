//! Text a client controls, on its way into logs, filter state and audit records: bounded
//! and escaped, so that one request can neither fill the disk (issue 14, item 7: a 50 kB
//! `x-traffic-class` was copied whole into three logs on every request) nor forge a line or
//! a field (item 9: a tenant claim with a newline and `audit={...}` produced a line that
//! read as a real audit record).
//!
//! - [`clip`] bounds a value to [`MAX_LOGGED_BYTES`] (at a character boundary, marked with
//!   `…`). Audit records clip every client-declared value with it: declared class, method,
//!   path, request id, user.
//! - [`word`] makes a value one access-log word: clipped, then `%XX`-escaped for control
//!   characters, space, `"` and `%` itself (so it decodes back with [`unword`]). Nothing
//!   else changes: names and ids that are plain stay byte for byte the same.
//! - [`caller_fields`] is the filter's part of the demo access-log line (`tenant=..
//!   principal=.. user=.. declared=.. request_id=..`), built from the raw headers, so it is
//!   safe even for a request the filter refuses.
//! - [`LogGate`] bounds how often one kind of line is written (once a second, with a count of
//!   the lines held back: [`held_back`]), so a service outage, or a client forging its class
//!   on every request, does not write a warning per request.
//!
//! Audit records are JSON: `serde_json` already escapes control characters inside strings,
//! so a record is always one line.

use crate::engine::RequestInfo;

/// The most bytes of one client-declared value that reach a log, the filter state or an
/// audit record. Longer values are clipped (and counted by the filter:
/// `laneguard.oversized_declared`).
pub const MAX_LOGGED_BYTES: usize = 256;

/// The marker a clipped value ends with.
pub const CLIPPED: &str = "…";

/// `s` bounded to [`MAX_LOGGED_BYTES`]: unchanged if it fits, else its longest prefix that
/// ends on a character boundary and leaves room for [`CLIPPED`], followed by it.
pub fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    if !oversized(s) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = MAX_LOGGED_BYTES - CLIPPED.len();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}{CLIPPED}", &s[..end]))
}

/// Whether a value is longer than [`MAX_LOGGED_BYTES`] (and so will be clipped).
pub fn oversized(s: &str) -> bool {
    s.len() > MAX_LOGGED_BYTES
}

/// How many of a request's client-declared values are over the bound.
pub fn oversized_values(info: &RequestInfo<'_>, request_id: Option<&str>) -> u32 {
    [
        info.declared_class,
        info.user,
        info.purpose,
        info.model,
        request_id,
        Some(info.path),
        Some(info.method),
    ]
    .into_iter()
    .flatten()
    .filter(|v| oversized(v))
    .count() as u32
}

fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, ' ' | '"' | '%' | '\u{2028}' | '\u{2029}')
}

/// One access-log word: clipped, control characters, spaces, `"` and `%` escaped as `%XX`
/// (each UTF-8 byte). `-` for an absent or empty value, as Envoy prints one.
pub fn word(s: Option<&str>) -> String {
    let mut out = String::new();
    push_word(&mut out, s);
    out
}

/// [`word`], appended to `out` (no allocation of its own: the caller fields are built in
/// one string on every request).
fn push_word(out: &mut String, s: Option<&str>) {
    let s = match s {
        Some(s) if !s.is_empty() => clip(s),
        _ => {
            out.push('-');
            return;
        }
    };
    out.reserve(s.len());
    for c in s.chars() {
        if needs_escape(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        } else {
            out.push(c);
        }
    }
}

/// The inverse of [`word`]'s escaping (not of the clipping). `None` for a malformed escape.
pub fn unword(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The filter's fields of the demo access-log line, from the request's raw headers:
/// `tenant=.. principal=.. user=.. declared=.. request_id=..`, each a [`word`]. The filter
/// puts it in the filter state `wasm.laneguard_caller`; the access log prints it with
/// `%FILTER_STATE(wasm.laneguard_caller:PLAIN)%`.
pub fn caller_fields(info: &RequestInfo<'_>, request_id: Option<&str>) -> String {
    let mut out = String::with_capacity(128);
    for (name, value) in [
        ("tenant=", info.tenant),
        (" principal=", info.principal),
        (" user=", info.user),
        (" declared=", info.declared_class),
        (" request_id=", request_id),
    ] {
        out.push_str(name);
        push_word(&mut out, value);
    }
    out
}

/// A rate limit on one kind of log line: at most one line per `every_ns`. The lines held
/// back meanwhile are counted, and the next line that passes says how many. A service
/// outage under 1,000 req/s would otherwise write one warning per request (the million-tenant
/// soak wrote 500,288 in four minutes); the filter's counters keep the exact totals.
#[derive(Clone, Debug)]
pub struct LogGate {
    every_ns: u64,
    next_ns: u64,
    held: u64,
}

/// How often a gated kind of line may be written: once a second.
pub const LOG_EVERY_NS: u64 = 1_000_000_000;

/// Once every [`LOG_EVERY_NS`].
impl Default for LogGate {
    fn default() -> LogGate {
        LogGate::new(LOG_EVERY_NS)
    }
}

impl LogGate {
    pub const fn new(every_ns: u64) -> LogGate {
        LogGate {
            every_ns,
            next_ns: 0,
            held: 0,
        }
    }

    /// At `now_ns`: `Some(lines held back since the last one)` when a line may be written,
    /// `None` (and counted) when it must not.
    pub fn pass(&mut self, now_ns: u64) -> Option<u64> {
        if now_ns < self.next_ns {
            self.held = self.held.saturating_add(1);
            return None;
        }
        self.next_ns = now_ns.saturating_add(self.every_ns);
        Some(std::mem::take(&mut self.held))
    }
}

/// The suffix of a gated line that says how many like it were held back (empty for none).
pub fn held_back(held: u64) -> String {
    if held == 0 {
        String::new()
    } else {
        format!(" ({held} more like it since the last such line)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_values_are_unchanged() {
        for v in [
            "northwind",
            "svc-erp",
            "auth0|5f7c",
            "a+b@example.com",
            "用户",
        ] {
            assert_eq!(word(Some(v)), v);
            assert_eq!(clip(v), v);
        }
        assert_eq!(word(None), "-");
        assert_eq!(word(Some("")), "-");
    }

    #[test]
    fn a_forged_line_stays_one_word() {
        let forged = "northwind\naudit={\"tenant\":\"forged\"} x=\"y\" 100%\r";
        let w = word(Some(forged));
        assert!(!w.contains(['\n', '\r', ' ', '"']), "{w}");
        assert_eq!(
            w,
            "northwind%0Aaudit={%22tenant%22:%22forged%22}%20x=%22y%22%20100%25%0D"
        );
        assert_eq!(unword(&w).as_deref(), Some(forged));
    }

    #[test]
    fn long_values_are_clipped_at_a_char_boundary() {
        let long = "é".repeat(30_000);
        let c = clip(&long);
        assert!(c.len() <= MAX_LOGGED_BYTES, "{}", c.len());
        assert!(c.ends_with(CLIPPED));
        assert!(oversized(&long));
        let at = "x".repeat(MAX_LOGGED_BYTES);
        assert_eq!(clip(&at), at.as_str(), "exactly the bound is kept");
        // A word of a clipped value is bounded too (each escape is three bytes at most per
        // byte, so at most three times the bound).
        let spaces = " ".repeat(50_000);
        assert!(word(Some(&spaces)).len() <= 3 * MAX_LOGGED_BYTES);
    }

    #[test]
    fn caller_fields_are_five_words() {
        let info = RequestInfo {
            tenant: Some("north\nwind"),
            principal: Some("erp"),
            user: Some("Ana María"),
            declared_class: Some(&"c".repeat(50_000)),
            method: "GET",
            path: "/",
            purpose: None,
            model: None,
        };
        let f = caller_fields(&info, None);
        assert_eq!(f.split(' ').count(), 5, "{f}");
        assert!(f.starts_with("tenant=north%0Awind principal=erp user=Ana%20María declared=c"));
        assert!(f.ends_with(" request_id=-"));
        assert!(f.len() < 2 * MAX_LOGGED_BYTES);
        assert_eq!(oversized_values(&info, None), 1);
    }

    proptest! {
        #[test]
        fn words_decode_back_and_never_break_a_line(s in "\\PC{0,40}|[\\x00-\\x20%\"a]{0,40}") {
            let w = word(Some(&s));
            prop_assert!(!w.chars().any(|c| c.is_control() || c == ' '));
            if !s.is_empty() {
                prop_assert_eq!(unword(&w), Some(s.clone()));
            }
        }
    }

    #[test]
    fn a_gate_writes_one_line_a_second_and_counts_the_rest() {
        let mut g = LogGate::new(LOG_EVERY_NS);
        assert_eq!(g.pass(5), Some(0), "the first line passes");
        for t in 1..=999u64 {
            assert_eq!(g.pass(5 + t * 1_000_000), None, "held at {t} ms");
        }
        assert_eq!(
            g.pass(5 + LOG_EVERY_NS),
            Some(999),
            "a second later, with the count"
        );
        assert_eq!(g.pass(6 + LOG_EVERY_NS), None);
        assert_eq!(
            g.pass(5 + 3 * LOG_EVERY_NS),
            Some(1),
            "the count starts again"
        );
        assert_eq!(held_back(0), "");
        assert_eq!(
            held_back(999),
            " (999 more like it since the last such line)"
        );
    }
}
