//! The trace reader: recorded requests, one a line, in either of two formats.
//!
//! - **JSONL**: one object a line, `{"ts": "2026-11-24T06:58:00.250Z", "tenant": "northwind",
//!   "principal": "erp", "user": "svc-erp", "class": "integration", "method": "GET",
//!   "path": "/orders/7", "purpose": null, "model": null, "cost": null}`. `ts` is RFC 3339 (any
//!   offset, any fraction) or Unix seconds as a number (with a fraction). `user`, `class` (the
//!   class the caller *declared*), `purpose`, `model`, `cost` (overrides the endpoint family's
//!   cost, for token-weighted traces), `max_tokens` (an AI request's limit, which the filter
//!   reserves in its token buckets; absent: the policy's estimate) and `tokens` (the tokens
//!   its response reported, which settle the reservation; absent: it stands), `status` (what
//!   the caller got, if known) and `request_id` are optional. Unknown fields are refused, so a typo is not silently a
//!   missing value.
//! - **Envoy's access log in the demo's format** (`envoy/demo/envoy.yaml`):
//!   `[START_TIME] "METHOD PATH" CODE FLAGS tenant=.. principal=.. user=.. declared=..
//!   class=.. ... audit=...`, the caller fields `%XX`-escaped by the filter
//!   (`crate::logsafe::word`) and decoded here. The declared class is `declared=` when the line has it, else the
//!   class laneguard granted (`class=`). A line whose tenant or principal is `-` never
//!   reached laneguard (Envoy's authentication refused it): it is reported as
//!   [`LineErrorKind::NoIdentity`], not as malformed.
//!
//! Blank lines and lines starting with `#` are skipped. Any other line that cannot be read is
//! a [`LineError`] naming its line number; the caller decides whether that is fatal
//! (`laneguard-replay --strict`) or skipped and counted.

pub use crate::audit::parse_rfc3339;
use crate::engine::RequestInfo;
use serde::Deserialize;
use std::io::BufRead;

/// One recorded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRequest {
    /// 1-based line number in the trace.
    pub line: u64,
    /// Nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    pub tenant: String,
    pub principal: String,
    pub user: Option<String>,
    /// The class the caller declared.
    pub class: Option<String>,
    pub method: String,
    pub path: String,
    pub purpose: Option<String>,
    pub model: Option<String>,
    /// A cost that replaces the endpoint family's.
    pub cost: Option<u32>,
    /// An AI request's `max_tokens` (what the filter reserves, `crate::ai`).
    pub max_tokens: Option<u32>,
    /// The tokens an AI response reported (what settles the reservation).
    pub tokens: Option<u64>,
    /// The status the caller got, when the trace knows it (access logs always do).
    pub status: Option<u16>,
    pub request_id: Option<String>,
}

impl TraceRequest {
    /// The request as the filter reads it from its headers.
    pub fn info(&self) -> RequestInfo<'_> {
        RequestInfo {
            tenant: Some(&self.tenant),
            principal: Some(&self.principal),
            user: self.user.as_deref(),
            declared_class: self.class.as_deref(),
            method: &self.method,
            path: &self.path,
            purpose: self.purpose.as_deref(),
            model: self.model.as_deref(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineErrorKind {
    /// The line is not a trace record.
    Malformed,
    /// An access-log line of a request that had no identity (refused before laneguard).
    NoIdentity,
}

/// A line that is not a usable record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct LineError {
    pub line: u64,
    pub kind: LineErrorKind,
    pub message: String,
}

impl LineError {
    fn malformed(line: u64, message: impl Into<String>) -> LineError {
        LineError {
            line,
            kind: LineErrorKind::Malformed,
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine {
    ts: serde_json::Value,
    tenant: String,
    principal: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    class: Option<String>,
    method: String,
    path: String,
    #[serde(default)]
    purpose: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    cost: Option<u32>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    tokens: Option<u64>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    request_id: Option<String>,
}

/// Read one line. `Ok(None)` for a blank line or a `#` comment.
pub fn parse_line(line: u64, text: &str) -> Result<Option<TraceRequest>, LineError> {
    let t = text.trim();
    if t.is_empty() || t.starts_with('#') {
        return Ok(None);
    }
    if t.starts_with('{') {
        return parse_json(line, t).map(Some);
    }
    if t.starts_with('[') {
        return parse_access_log(line, t).map(Some);
    }
    Err(LineError::malformed(
        line,
        "neither a JSON object nor an Envoy access-log line (`[START_TIME] \"METHOD PATH\" ...`)",
    ))
}

fn parse_json(line: u64, t: &str) -> Result<TraceRequest, LineError> {
    let mut de = serde_json::Deserializer::from_str(t);
    let j: JsonLine = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            LineError::malformed(line, format!("{inner}"))
        } else {
            LineError::malformed(line, format!("{path}: {inner}"))
        }
    })?;
    let ts_ns = match &j.ts {
        serde_json::Value::String(s) => parse_rfc3339(s)
            .ok_or_else(|| LineError::malformed(line, format!("ts: `{s}` is not RFC 3339")))?,
        serde_json::Value::Number(n) => unix_seconds(&n.to_string())
            .ok_or_else(|| LineError::malformed(line, format!("ts: {n} is not Unix seconds")))?,
        other => {
            return Err(LineError::malformed(
                line,
                format!("ts: {other} is neither RFC 3339 text nor Unix seconds"),
            ))
        }
    };
    if j.tenant.is_empty() || j.principal.is_empty() {
        return Err(LineError::malformed(
            line,
            "tenant and principal may not be empty",
        ));
    }
    if j.cost == Some(0) {
        return Err(LineError::malformed(line, "cost: must be at least 1"));
    }
    Ok(TraceRequest {
        line,
        ts_ns,
        tenant: j.tenant,
        principal: j.principal,
        user: j.user,
        class: j.class,
        method: j.method,
        path: j.path,
        purpose: j.purpose,
        model: j.model,
        cost: j.cost,
        max_tokens: j.max_tokens,
        tokens: j.tokens,
        status: j.status,
        request_id: j.request_id,
    })
}

/// Unix seconds from the number's decimal text (exact to the nanosecond: an f64 is not).
fn unix_seconds(s: &str) -> Option<u64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || !int.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = int.parse().ok().filter(|s| *s < 10_000_000_000)?;
    let mut ns = 0u64;
    let mut scale = 100_000_000u64;
    for c in frac.bytes().take(9) {
        ns += u64::from(c - b'0') * scale;
        scale /= 10;
    }
    Some(secs * 1_000_000_000 + ns)
}

/// A `key=value` field of an access-log line; `-` (Envoy's empty value) is `None`.
fn field<'a>(fields: &[(&'a str, &'a str)], key: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .filter(|v| !v.is_empty() && *v != "-")
}

fn parse_access_log(line: u64, t: &str) -> Result<TraceRequest, LineError> {
    let bad = |m: &str| LineError::malformed(line, m.to_string());
    let rest = t.strip_prefix('[').ok_or_else(|| bad("no [START_TIME]"))?;
    let (start, rest) = rest
        .split_once(']')
        .ok_or_else(|| bad("no closing ] after START_TIME"))?;
    let ts_ns = parse_rfc3339(start)
        .ok_or_else(|| bad(&format!("START_TIME `{start}` is not RFC 3339")))?;
    let rest = rest
        .trim_start()
        .strip_prefix('"')
        .ok_or_else(|| bad("no \"METHOD PATH\" after the time"))?;
    let (request, rest) = rest
        .split_once('"')
        .ok_or_else(|| bad("unterminated \"METHOD PATH\""))?;
    let (method, path) = request
        .split_once(' ')
        .ok_or_else(|| bad("the request is not \"METHOD PATH\""))?;
    if method.is_empty() || method == "-" || path.is_empty() || path == "-" {
        return Err(bad("the request has no method or no path"));
    }
    // The audit record is the last field and may contain spaces: split it off first.
    let fields_text = match rest.find(" audit=") {
        Some(i) => &rest[..i],
        None => rest,
    };
    let mut words = fields_text.split_whitespace();
    let status = words
        .next()
        .ok_or_else(|| bad("no response code"))?
        .parse::<u16>()
        .map_err(|_| bad("the response code is not a number"))?;
    let fields: Vec<(&str, &str)> = words.filter_map(|w| w.split_once('=')).collect();
    let tenant = field(&fields, "tenant");
    let principal = field(&fields, "principal");
    let (Some(tenant), Some(principal)) = (tenant, principal) else {
        return Err(LineError {
            line,
            kind: LineErrorKind::NoIdentity,
            message: format!(
                "status {status}: no tenant or principal (refused before laneguard decided)"
            ),
        });
    };
    // The filter escapes its caller fields (`crate::logsafe::word`): decode them back.
    let decode = |v: &str| {
        crate::logsafe::unword(v)
            .ok_or_else(|| bad(&format!("`{v}` is not a valid escaped access-log value")))
    };
    let (tenant, principal) = (decode(tenant)?, decode(principal)?);
    let class = field(&fields, "declared").or_else(|| field(&fields, "class"));
    let own = |k: &str| field(&fields, k).map(decode).transpose();
    Ok(TraceRequest {
        line,
        ts_ns,
        tenant,
        principal,
        user: own("user")?,
        class: class.map(decode).transpose()?,
        method: method.to_string(),
        path: path.to_string(),
        purpose: own("purpose")?,
        model: own("model")?,
        cost: None,
        max_tokens: None,
        tokens: None,
        status: Some(status),
        request_id: own("request_id")?,
    })
}

/// Reads a trace line by line. Yields every record and every bad line (blank lines and
/// comments are skipped), so nothing is lost silently.
pub struct Reader<R> {
    input: R,
    line: u64,
    buf: String,
}

impl<R: BufRead> Reader<R> {
    pub fn new(input: R) -> Reader<R> {
        Reader {
            input,
            line: 0,
            buf: String::new(),
        }
    }
}

/// What the reader hands out: a record, a bad line, or an I/O error (which ends the trace).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one item at a time, never stored in bulk
pub enum Item {
    Request(TraceRequest),
    Bad(LineError),
    Io(std::io::Error),
}

impl<R: BufRead> Iterator for Reader<R> {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        loop {
            self.buf.clear();
            match self.input.read_line(&mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    // Not UTF-8: a bad line, not the end of the trace (read_line has
                    // consumed it, up to and including its newline).
                    self.line += 1;
                    return Some(Item::Bad(LineError::malformed(self.line, "not UTF-8")));
                }
                Err(e) => return Some(Item::Io(e)),
            }
            self.line += 1;
            match parse_line(self.line, &self.buf) {
                Ok(Some(r)) => return Some(Item::Request(r)),
                Ok(None) => continue,
                Err(e) => return Some(Item::Bad(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::rfc3339_ms;
    use proptest::prelude::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn rfc3339_forms() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2026-11-18T11:06:40.000Z"),
            Some(1_795_000_000 * S)
        );
        assert_eq!(
            parse_rfc3339("2026-11-18T12:06:40.5+01:00"),
            Some(1_795_000_000 * S + S / 2)
        );
        assert_eq!(
            parse_rfc3339("2026-11-18 11:06:40.123456789z"),
            Some(1_795_000_000 * S + 123_456_789)
        );
        for bad in [
            "2026-11-18",
            "2026-13-18T11:06:40Z",
            "2026-02-29T11:06:40Z",
            "2026-11-18T11:06:40",
            "2026-11-18T11:06:40.Z",
            "2026-11-18T11:06:40+0100",
            "1969-12-31T23:59:59Z",
            "2026-11-18T11:06:40Zjunk",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn rfc3339_round_trips_with_the_audit_formatter(ms in 0u64..4_102_444_800_000) {
            let ns = ms * 1_000_000;
            prop_assert_eq!(parse_rfc3339(&rfc3339_ms(ns)), Some(ns));
        }

        #[test]
        fn arbitrary_lines_never_panic(s in "\\PC{0,200}") {
            let _ = parse_line(1, &s);
            let _ = parse_line(1, &format!("[{s}"));
            let _ = parse_line(1, &format!("{{{s}"));
        }
    }

    #[test]
    fn jsonl_line() {
        let r = parse_line(
            3,
            r#"{"ts": 1795000000.25, "tenant": "northwind", "principal": "erp", "class": "integration", "method": "GET", "path": "/orders/7", "cost": 2}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.line, 3);
        assert_eq!(r.ts_ns, 1_795_000_000 * S + S / 4);
        assert_eq!(r.class.as_deref(), Some("integration"));
        assert_eq!(r.cost, Some(2));
        assert_eq!(r.user, None);
        let info = r.info();
        assert_eq!(info.tenant, Some("northwind"));
        assert_eq!(info.path, "/orders/7");
    }

    #[test]
    fn bad_jsonl_lines_name_line_and_field() {
        let e = parse_line(
            9,
            r#"{"ts": "yesterday", "tenant": "t", "principal": "p", "method": "GET", "path": "/"}"#,
        )
        .unwrap_err();
        assert_eq!(e.line, 9);
        assert_eq!(e.kind, LineErrorKind::Malformed);
        assert!(e.to_string().starts_with("line 9: ts:"), "{e}");
        let e = parse_line(10, r#"{"ts": 1, "tenant": "t", "principal": "p", "method": "GET", "path": "/", "clas": "x"}"#)
            .unwrap_err();
        assert!(e.message.contains("clas"), "{e}");
        let e = parse_line(
            11,
            r#"{"ts": 1, "tenant": "t", "method": "GET", "path": "/"}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("principal"), "{e}");
        let e = parse_line(12, "GET /orders 200").unwrap_err();
        assert_eq!(e.line, 12);
        assert_eq!(parse_line(13, "  ").unwrap(), None);
        assert_eq!(parse_line(14, "# comment").unwrap(), None);
    }

    #[test]
    fn access_log_line_of_the_demo_format() {
        let line = r#"[2026-11-18T11:06:40.250Z] "GET /orders/1" 429 - tenant=northwind principal=erp user=svc-erp declared=integration class=integration cluster=- details=laneguard_rate_limited duration_ms=0 request_id=abc-1 audit={"time":"x", "events":["limited"]}"#;
        let r = parse_line(5, line).unwrap().unwrap();
        assert_eq!(r.ts_ns, 1_795_000_000 * S + S / 4);
        assert_eq!(
            (r.tenant.as_str(), r.principal.as_str()),
            ("northwind", "erp")
        );
        assert_eq!(r.user.as_deref(), Some("svc-erp"));
        assert_eq!(r.class.as_deref(), Some("integration"));
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/orders/1"));
        assert_eq!(r.status, Some(429));
        assert_eq!(r.request_id.as_deref(), Some("abc-1"));
    }

    /// The filter's caller fields are escaped (issue 14, item 9): the reader decodes them,
    /// so a user id with a space or `|` replays as itself.
    #[test]
    fn access_log_fields_escaped_by_the_filter_are_decoded() {
        let line = r#"[2026-11-18T11:06:40.250Z] "GET /orders/1" 200 - tenant=northwind principal=web user=Ana%20Mar%C3%ADa declared=auth0|x%25 request_id=r%0A class=interactive audit=-"#;
        let r = parse_line(1, line).unwrap().unwrap();
        assert_eq!(r.user.as_deref(), Some("Ana María"));
        assert_eq!(r.class.as_deref(), Some("auth0|x%"));
        assert_eq!(r.request_id.as_deref(), Some("r\n"));
        let bad = line.replace("%20", "%2");
        assert_eq!(
            parse_line(1, &bad).unwrap_err().kind,
            LineErrorKind::Malformed
        );
    }

    #[test]
    fn access_log_without_declared_uses_the_granted_class() {
        let line = r#"[2026-11-18T11:06:40.250Z] "GET /orders/1" 200 - tenant=northwind principal=recon class=repair cluster=upstream_protected details=via_upstream duration_ms=1 request_id=r audit=-"#;
        let r = parse_line(1, line).unwrap().unwrap();
        assert_eq!(r.class.as_deref(), Some("repair"));
        assert_eq!(r.user, None);
        let line = r#"[2026-11-18T11:06:40.250Z] "GET /orders/1" 200 - tenant=northwind principal=recon user=- declared=- class=repair audit=-"#;
        assert_eq!(
            parse_line(1, line).unwrap().unwrap().class.as_deref(),
            Some("repair")
        );
    }

    #[test]
    fn access_log_of_an_unauthenticated_request_is_no_identity() {
        let line = r#"[2026-11-18T11:06:40.250Z] "GET /orders/1" 401 - tenant=- principal=- class=- cluster=- details=jwt_authn_access_denied duration_ms=0 request_id=r audit=-"#;
        let e = parse_line(2, line).unwrap_err();
        assert_eq!(e.kind, LineErrorKind::NoIdentity);
        let e = parse_line(3, r#"[2026-11-18T11:06:40Z] "GET" 200"#).unwrap_err();
        assert_eq!(e.kind, LineErrorKind::Malformed);
    }

    #[test]
    fn reader_counts_lines_and_keeps_going() {
        let text = "# a trace\n{\"ts\":1,\"tenant\":\"t\",\"principal\":\"p\",\"method\":\"GET\",\"path\":\"/\"}\n\nnot a line\n{\"ts\":2,\"tenant\":\"t\",\"principal\":\"p\",\"method\":\"GET\",\"path\":\"/\"}\n";
        let items: Vec<Item> = Reader::new(text.as_bytes()).collect();
        assert_eq!(items.len(), 3);
        assert!(matches!(&items[0], Item::Request(r) if r.line == 2));
        assert!(matches!(&items[1], Item::Bad(e) if e.line == 4));
        assert!(matches!(&items[2], Item::Request(r) if r.line == 5));
        let mut bytes = b"{\"ts\":1,\"tenant\":\"t\",\"principal\":\"p\",\"method\":\"GET\",\"path\":\"/\"}\n\xff\xfe\n".to_vec();
        bytes.extend_from_slice(
            b"{\"ts\":3,\"tenant\":\"t\",\"principal\":\"p\",\"method\":\"GET\",\"path\":\"/\"}\n",
        );
        let items: Vec<Item> = Reader::new(bytes.as_slice()).collect();
        assert!(matches!(&items[1], Item::Bad(e) if e.line == 2 && e.message == "not UTF-8"));
        assert!(matches!(&items[2], Item::Request(r) if r.line == 3));
    }
}
