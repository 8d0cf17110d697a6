//! Audit records: one per limited, shadow-limited, degraded, near-miss or forged-class
//! decision, built here and serialised as one line of JSON. The filter puts the line in
//! Envoy's filter state (so the access log can print it) and ships it to the service,
//! which appends it to its hash-chained audit log.
//!
//! A record answers the four questions an operator asks after a throttle (seed 003):
//! which bucket tripped (`bucket`), which caller drove it (`tenant`, `principal`, `user`,
//! `request_id`, `request`), how close each bucket was (`buckets[]`: level against ceiling)
//! and which fallback fired (`fallback`, `status`).

use crate::engine::{Bucket, Level, Plan};
use crate::policy::Mode;
use serde::Serialize;

/// Why a record was written. A decision can have several reasons (a forged class that was
/// then limited); they are all listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Limited,
    ShadowLimited,
    /// A fallback fired (queue or fallback route), or the service failed and the class
    /// failed closed.
    Degraded,
    NearMiss,
    ForgedClass,
}

/// Which path made the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionPath {
    /// This worker's buckets (leased capacity, or a mirror that already showed no room).
    Local,
    /// The rate-limit service.
    Central,
    /// The service could not answer; the class's failure mode decided.
    Degraded,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClassRecord {
    /// What the caller declared (absent if nothing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub declared: Option<String>,
    pub granted: String,
    pub forged: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestRecord {
    pub method: String,
    /// Without the query string.
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    pub cost: u32,
}

/// One bucket's level against its ceiling when the decision was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BucketLevel {
    pub bucket: String,
    /// Requests per window, and the window in seconds.
    pub limit: u32,
    pub window_s: u64,
    /// The most requests the bucket holds at once.
    pub burst: u32,
    /// Requests of cost 1 in use now (`burst - remaining`), and as a percentage of `burst`.
    pub used: u32,
    pub used_pct: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_s: u64,
    /// Whether the request's cost fitted.
    pub room: bool,
    /// The rule's rollout mode for this request.
    pub mode: &'static str,
}

impl BucketLevel {
    pub fn new(level: &Level, mode: Mode) -> BucketLevel {
        let used = level.burst.saturating_sub(level.remaining);
        BucketLevel {
            bucket: level.name.clone(),
            limit: level.quota,
            window_s: level.window_s,
            burst: level.burst,
            used,
            used_pct: crate::rollout::used_pct(level),
            remaining: level.remaining,
            reset_s: level.reset_s,
            room: level.has_room,
            mode: mode.as_str(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub events: Vec<Event>,
    pub tenant: String,
    pub principal: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Envoy's `x-request-id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub class: ClassRecord,
    pub request: RequestRecord,
    /// The bucket that tripped first (absent when none did: a near miss or a forged class
    /// that was allowed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// Every bucket the request touched, in evaluation order.
    pub buckets: Vec<BucketLevel>,
    /// The request's rollout mode.
    pub mode: &'static str,
    pub path: DecisionPath,
    /// Why the service could not decide (timeout, service_error, ...), on the degraded path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub degraded_reason: Option<String>,
    /// The fallback that fired: queue, fallback_route or reject. Absent when the request
    /// was not limited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<&'static str>,
    /// The status the caller got (200 for a request let through; the upstream may still
    /// answer otherwise), or that a queued request was held.
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
    /// Other classes of the tenant active within the lane's window when a protected lane
    /// was squeezed: the collision evidence.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub active_classes: Vec<String>,
}

/// What the shell knows about the request besides the plan.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller<'a> {
    pub request_id: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
}

impl Record {
    /// A record for `plan` with the levels of the buckets it was checked against. The
    /// caller sets `bucket`, `fallback`, `status` and the rest that apply.
    pub fn new(
        now_ns: u64,
        events: Vec<Event>,
        plan: &Plan,
        caller: &Caller<'_>,
        mode: Mode,
        path: DecisionPath,
        levels: Vec<BucketLevel>,
    ) -> Record {
        // Every value a client controls is bounded (`logsafe`): a record must never carry
        // a 50 kB header into the audit log.
        let clip = |s: &str| crate::logsafe::clip(s).into_owned();
        Record {
            time: rfc3339_ms(now_ns),
            events,
            tenant: plan.tenant.clone(),
            principal: plan.principal.clone(),
            user: plan.user.as_deref().map(clip),
            request_id: caller.request_id.map(clip),
            class: ClassRecord {
                declared: plan.declared_class.as_deref().map(clip),
                granted: plan.class_name.clone(),
                forged: plan.forged,
            },
            request: RequestRecord {
                method: clip(caller.method),
                path: clip(caller.path.split('?').next().unwrap_or("")),
                family: plan.family.clone(),
                cost: plan.cost,
            },
            bucket: None,
            buckets: levels,
            mode: mode.as_str(),
            path,
            degraded_reason: None,
            fallback: None,
            status: 200,
            wait_ms: None,
            retry_after_s: None,
            active_classes: Vec::new(),
        }
    }

    /// One line of JSON, no newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            // Serialising plain strings and numbers cannot fail; keep a trace if it does.
            format!("{{\"error\":\"audit record not serialisable: {e}\"}}")
        })
    }
}

/// Levels paired with their buckets' modes.
pub fn levels(
    levels: &[Level],
    buckets: &[&Bucket],
    mode_of: impl Fn(&Bucket) -> Mode,
) -> Vec<BucketLevel> {
    levels
        .iter()
        .zip(buckets)
        .map(|(l, b)| BucketLevel::new(l, mode_of(b)))
        .collect()
}

/// `2026-11-24T05:25:22.123Z` from nanoseconds since the Unix epoch.
pub fn rfc3339_ms(now_ns: u64) -> String {
    let secs = now_ns / 1_000_000_000;
    let ms = (now_ns / 1_000_000) % 1_000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3_600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// A time for `--since`/`--until`: Unix seconds, a date (`2026-11-24`, midnight UTC), or
/// RFC 3339 ([`parse_rfc3339`], the parser the trace reader uses).
pub fn parse_time(s: &str) -> Option<u64> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u64>().ok()?.checked_mul(1_000_000_000);
    }
    if s.len() == 10 {
        let mut d = s.splitn(3, '-');
        let y: i64 = d.next()?.parse().ok()?;
        let m: u32 = d.next()?.parse().ok()?;
        let day: u32 = d.next()?.parse().ok()?;
        if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
            return None;
        }
        let days = u64::try_from(days_from_civil(y, m, day)).ok()?;
        return days.checked_mul(86_400 * 1_000_000_000);
    }
    parse_rfc3339(s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`, the inverse of [`civil_from_days`]).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// RFC 3339 (`2026-11-24T06:58:00.250Z`, `2026-11-24 07:58:00+01:00`, any number of fraction
/// digits) to nanoseconds since the Unix epoch. Hand-written on purpose: it is the inverse of
/// [`rfc3339_ms`], and it keeps the core free of a
/// date crate in the Wasm build. `None` for anything else, or a time before 1970.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo) || d == 0 || d > days_in[(mo - 1) as usize] {
        return None;
    }
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ns: u64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        let mut scale = 100_000_000u64;
        while let Some(c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            frac_ns += u64::from(c - b'0') * scale;
            scale /= 10;
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset_s: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = i64::from(num(i + 1..i + 3)?);
            let om = i64::from(num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3_600 + om * 60;
            if *sign == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    let days = days_from_civil(i64::from(y), mo, d);
    let secs = days * 86_400 + i64::from(h) * 3_600 + i64::from(mi) * 60 + i64::from(sec.min(59))
        - offset_s;
    let secs = u64::try_from(secs).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(frac_ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{plan, LocalTable, RequestInfo};
    use crate::policy::parse;

    #[test]
    fn time_is_rfc3339_utc() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_ms(951_782_400_123_000_000),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            rfc3339_ms(1_795_000_000_000_000_000),
            "2026-11-18T11:06:40.000Z"
        );
    }

    fn web_policy() -> crate::policy::Policy {
        parse(
            r#"
version: 1
classes: [{ name: web, consequence: time_sensitive, budget: { per_minute: 6, burst: 1 } }]
tenants: { default: { ceiling: { per_minute: 60, burst: 10 } } }
"#,
        )
        .unwrap()
    }

    /// Issue 14, items 7 and 9: a record carries every client-declared value bounded, and
    /// stays one line whatever the values hold.
    #[test]
    fn records_bound_declared_values_and_stay_one_line() {
        let p = web_policy();
        let huge = "x".repeat(50_000);
        let path = format!("/orders/{huge}");
        let info = RequestInfo {
            tenant: Some("northwind"),
            principal: Some("web"),
            user: Some("Ana\u{2028}María"),
            declared_class: Some(&huge),
            method: "GET",
            path: &path,
            ..Default::default()
        };
        let pl = plan(&p, &info).unwrap();
        let caller = Caller {
            request_id: Some(&huge),
            method: "GET",
            path: &path,
        };
        let r = Record::new(
            0,
            vec![Event::ForgedClass],
            &pl,
            &caller,
            Mode::Enforce,
            DecisionPath::Local,
            Vec::new(),
        );
        let json = r.to_json();
        assert!(
            json.len() < 5 * crate::logsafe::MAX_LOGGED_BYTES,
            "{}",
            json.len()
        );
        assert!(!json.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let declared = v["class"]["declared"].as_str().unwrap();
        assert!(declared.ends_with(crate::logsafe::CLIPPED) && declared.len() <= 256);
        assert!(v["request_id"].as_str().unwrap().len() <= 256);
        assert!(v["request"]["path"].as_str().unwrap().len() <= 256);
    }

    #[test]
    fn a_limited_record_answers_the_four_questions() {
        let p = web_policy();
        let info = RequestInfo {
            tenant: Some("northwind"),
            principal: Some("web"),
            user: Some("alice"),
            declared_class: Some("web"),
            method: "GET",
            path: "/orders/1?x=1",
            ..Default::default()
        };
        let pl = plan(&p, &info).unwrap();
        let mut t = LocalTable::default();
        let now = 1_795_000_000 * 1_000_000_000;
        assert!(t.decide(&pl, now, 1.0).0.allowed);
        let (eval, _) = t.decide(&pl, now, 1.0);
        let caller = Caller {
            request_id: Some("rid-1"),
            method: "GET",
            path: "/orders/1?x=1",
        };
        let mut r = Record::new(
            now,
            vec![Event::Limited],
            &pl,
            &caller,
            Mode::Enforce,
            DecisionPath::Local,
            levels(&eval.levels, &pl.attempt(false), |_| Mode::Enforce),
        );
        r.bucket = Some("class:web".into());
        r.fallback = Some("reject");
        r.status = 429;
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["bucket"], "class:web");
        assert_eq!(v["tenant"], "northwind");
        assert_eq!(v["principal"], "web");
        assert_eq!(v["user"], "alice");
        assert_eq!(v["request_id"], "rid-1");
        assert_eq!(v["request"]["path"], "/orders/1");
        assert_eq!(v["events"][0], "limited");
        assert_eq!(v["buckets"][1]["bucket"], "class:web");
        assert_eq!(v["buckets"][1]["used"], 1);
        assert_eq!(v["buckets"][1]["burst"], 1);
        assert_eq!(v["buckets"][1]["room"], false);
        assert_eq!(v["fallback"], "reject");
        assert_eq!(v["path"], "local");
        assert_eq!(v["mode"], "enforce");
        assert_eq!(v["time"], "2026-11-18T11:06:40.000Z");
    }
}
