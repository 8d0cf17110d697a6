//! The usage ledger: what was admitted, for whom, and how (issue 11 §3).
//!
//! Billing needs one authoritative count per tenant, class and hour, and a signal when the
//! two sides of the hybrid design disagree. The two sides:
//!
//! - **the service** sees every central decision. Its count of admitted central decisions
//!   ([`Row::admitted_central`]) and of lease units it granted ([`Row::leased_granted`]) is
//!   its own, made in the same handler that charged the buckets ([`Ledger::decided`]).
//! - **the filters** see every admission. A worker tallies, per tenant, class and hour, the
//!   requests it admitted on a central answer, on a lease (requests and cost units), in
//!   degraded mode, and the requests it refused ([`Tally`]); it sends the tally in gRPC
//!   metadata ([`METADATA`]) on the renewals and reports it already makes, and on its sync
//!   tick ([`Ledger::reported`]).
//!
//! The ledger's admitted count is the service's central count plus the filters' leased and
//! degraded counts ([`Row::admitted`]); that is what a billing export sums. The **drift**
//! ([`Row::drift`]) is what the filters say they admitted minus what the ledger holds: since
//! leased and degraded counts come from the filters, it is the difference between the
//! central admissions the filters saw and those the service charged. It moves when a
//! central answer was charged but never reached the filter (the filter then admits the
//! request degraded, so the ledger counts it twice), when a filter's tally is lost (an
//! Envoy restarted before its sync), or when the service lost counts it had not stored.
//! [`DRIFT_ALERT_RATIO`] is the seed's threshold (`seeds/002_*.txt`: drift under 1%).
//!
//! Pure: hours are `now_ns / HOUR_NS`, passed in; nothing here reads a clock.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Nanoseconds in one ledger hour.
pub const HOUR_NS: u64 = 3_600_000_000_000;

/// The gRPC request metadata that carries a worker's tally, `x-laneguard-usage`
/// (`laneguard_core::usage::encode`). A plain RLS server ignores it.
pub const METADATA: &str = "x-laneguard-usage";

/// The gRPC request metadata that names the class of a decision or renewal,
/// `x-laneguard-class` (the tenant is the descriptors' `tenant` entry). A plain RLS server
/// ignores it; without it the service's ledger does not count the decision.
pub const CLASS_METADATA: &str = "x-laneguard-class";

/// The most tally entries one call carries (about 60 bytes each: the metadata stays well
/// under HTTP/2's 16 KiB header list).
pub const MAX_ENTRIES_PER_CALL: usize = 128;

/// The seed's reconciliation-drift threshold: 1% of what the ledger admitted.
pub const DRIFT_ALERT_RATIO: f64 = 0.01;

/// The hour (since the Unix epoch) that `now_ns` falls in.
pub fn hour_of(now_ns: u64) -> u64 {
    now_ns / HOUR_NS
}

/// How a filter answered one request, as far as the ledger is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Admitted on the service's answer to a decision call.
    Central,
    /// Admitted on capacity leased to the worker, without a call.
    Leased,
    /// Admitted without the service (the class's failure mode, service unreachable).
    Degraded,
    /// Answered 429 by a limit (locally or after a central refusal).
    Refused,
}

/// One ledger line's identity: a tenant's class in one hour.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub hour: u64,
    pub tenant: String,
    pub class: String,
}

/// What one worker reports for one [`Key`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub central: u64,
    pub leased: u64,
    /// Cost units spent from leases (a weighted endpoint family costs more than 1).
    pub leased_units: u64,
    pub degraded: u64,
    pub refused: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.central = self.central.saturating_add(o.central);
        self.leased = self.leased.saturating_add(o.leased);
        self.leased_units = self.leased_units.saturating_add(o.leased_units);
        self.degraded = self.degraded.saturating_add(o.degraded);
        self.refused = self.refused.saturating_add(o.refused);
    }

    fn is_zero(&self) -> bool {
        *self == Counts::default()
    }
}

/// One worker's counts since its last report, per tenant, class and hour.
///
/// Bounded: at [`Tally::MAX_KEYS`] distinct keys a new key is dropped and counted
/// ([`Tally::take_dropped`]), so a flood of tenants while the service is away cannot grow
/// a VM without bound.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    counts: BTreeMap<Key, Counts>,
    dropped: u64,
    /// The key of the last count: a worker sees the same tenant and class over and over,
    /// and a repeat is counted without building a key (two `String`s) per request.
    last: Option<Key>,
}

impl Tally {
    /// The most keys one worker holds between reports.
    pub const MAX_KEYS: usize = 50_000;

    /// Count one request of `cost` units.
    pub fn note(&mut self, tenant: &str, class: &str, how: Admission, cost: u32, now_ns: u64) {
        let hour = hour_of(now_ns);
        let repeat = self
            .last
            .as_ref()
            .filter(|k| k.hour == hour && k.tenant == tenant && k.class == class);
        // The last key may have been taken since (`take`): then it is counted as new.
        let c = match repeat.and_then(|k| self.counts.get_mut(k)) {
            Some(c) => c,
            None => {
                let key = Key {
                    hour,
                    tenant: tenant.to_string(),
                    class: class.to_string(),
                };
                if !self.counts.contains_key(&key) && self.counts.len() >= Self::MAX_KEYS {
                    self.dropped = self.dropped.saturating_add(1);
                    return;
                }
                self.last = Some(key.clone());
                self.counts.entry(key).or_default()
            }
        };
        match how {
            Admission::Central => c.central = c.central.saturating_add(1),
            Admission::Leased => {
                c.leased = c.leased.saturating_add(1);
                c.leased_units = c.leased_units.saturating_add(u64::from(cost));
            }
            Admission::Degraded => c.degraded = c.degraded.saturating_add(1),
            Admission::Refused => c.refused = c.refused.saturating_add(1),
        }
    }

    /// Take at most `max` entries (oldest hours first), leaving the rest.
    pub fn take(&mut self, max: usize) -> Vec<(Key, Counts)> {
        let mut out = Vec::with_capacity(max.min(self.counts.len()));
        while out.len() < max {
            match self.counts.pop_first() {
                Some(e) => out.push(e),
                None => break,
            }
        }
        out
    }

    /// Put back entries whose call failed: they are sent again with the next one.
    pub fn give_back(&mut self, entries: Vec<(Key, Counts)>) {
        for (k, c) in entries {
            self.counts.entry(k).or_default().add(&c);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Requests not counted because the tally was full, since the last call.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

/// A malformed [`METADATA`] value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entry {index}: {reason} (expected `v1;HOUR/TENANT/CLASS=CENTRAL,LEASED,LEASED_UNITS,DEGRADED,REFUSED;...`)")]
pub struct UsageError {
    pub index: usize,
    pub reason: String,
}

/// The metadata value for a batch of tally entries:
/// `v1;HOUR/TENANT/CLASS=CENTRAL,LEASED,LEASED_UNITS,DEGRADED,REFUSED;...`, with tenant and
/// class percent-escaped (`%`, `/`, `;`, `,`, `=` and anything outside visible ASCII).
pub fn encode(entries: &[(Key, Counts)]) -> String {
    let mut s = String::from("v1");
    for (k, c) in entries {
        let _ = write!(
            s,
            ";{}/{}/{}={},{},{},{},{}",
            k.hour,
            escape(&k.tenant),
            escape(&k.class),
            c.central,
            c.leased,
            c.leased_units,
            c.degraded,
            c.refused
        );
    }
    s
}

/// Read a [`METADATA`] value written by [`encode`]. Any malformed entry refuses the whole
/// value, naming the entry.
pub fn decode(text: &str) -> Result<Vec<(Key, Counts)>, UsageError> {
    let mut parts = text.trim().split(';');
    if parts.next() != Some("v1") {
        return Err(UsageError {
            index: 0,
            reason: "the value does not start with the version `v1`".into(),
        });
    }
    let mut out = Vec::new();
    for (i, part) in parts.enumerate() {
        let index = i + 1;
        let bad = |reason: &str| UsageError {
            index,
            reason: reason.to_string(),
        };
        let (key, nums) = part.split_once('=').ok_or_else(|| bad("no `=`"))?;
        let mut k = key.split('/');
        let (Some(hour), Some(tenant), Some(class), None) =
            (k.next(), k.next(), k.next(), k.next())
        else {
            return Err(bad("the key is not HOUR/TENANT/CLASS"));
        };
        let hour = hour
            .parse::<u64>()
            .map_err(|_| bad("the hour is not a number"))?;
        let tenant = unescape(tenant).ok_or_else(|| bad("bad escape in the tenant"))?;
        let class = unescape(class).ok_or_else(|| bad("bad escape in the class"))?;
        if tenant.is_empty() || class.is_empty() {
            return Err(bad("empty tenant or class"));
        }
        let n: Vec<u64> = nums
            .split(',')
            .map(str::parse::<u64>)
            .collect::<Result<_, _>>()
            .map_err(|_| bad("a count is not a non-negative integer"))?;
        let [central, leased, leased_units, degraded, refused] = n[..] else {
            return Err(bad("not five counts"));
        };
        out.push((
            Key {
                hour,
                tenant,
                class,
            },
            Counts {
                central,
                leased,
                leased_units,
                degraded,
                refused,
            },
        ));
    }
    Ok(out)
}

/// A tenant or class name escaped for a separator-delimited field (`%`, `/`, `;`, `,`, `=`
/// and anything outside visible ASCII as `%XX`): injective, so two names never collide.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_graphic() && !matches!(b, b'%' | b'/' | b';' | b',' | b'=') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The inverse of [`escape`]; `None` for a malformed escape (the same %XX decoding as
/// [`crate::logsafe::unword`]).
pub fn unescape(s: &str) -> Option<String> {
    crate::logsafe::unword(s)
}

/// One ledger line: a tenant's class in one hour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Row {
    /// Requests the service admitted on a decision call (its own count).
    pub admitted_central: u64,
    /// Requests the filters admitted on leases (reported).
    pub admitted_leased: u64,
    /// Cost units the filters spent from leases (reported).
    pub leased_units_spent: u64,
    /// Requests the filters admitted without the service (reported).
    pub admitted_degraded: u64,
    /// Requests the filters answered 429 (reported).
    pub refused: u64,
    /// Cost units the service granted as leases for this class (its own count).
    pub leased_granted: u64,
    /// Requests the filters admitted on a central answer (reported): the other side of
    /// `admitted_central`, for the drift.
    pub filter_central: u64,
}

impl Row {
    /// What the ledger bills: central (the service's count), leased and degraded.
    pub fn admitted(&self) -> u64 {
        self.admitted_central
            .saturating_add(self.admitted_leased)
            .saturating_add(self.admitted_degraded)
    }

    /// What the filters say they admitted.
    pub fn filter_admitted(&self) -> u64 {
        self.filter_central
            .saturating_add(self.admitted_leased)
            .saturating_add(self.admitted_degraded)
    }

    /// Lease units granted and not (yet) spent. Final once the hour's last lease expired
    /// (`--lease-ttl-ms` after the hour). Grants are attributed to the class whose request
    /// asked for them, while a lease on a bucket that classes share (the tenant's pool) may
    /// be spent by another class: per class the figure is approximate, per tenant it is
    /// exact.
    pub fn leased_unspent(&self) -> u64 {
        self.leased_granted.saturating_sub(self.leased_units_spent)
    }

    /// What the filters say they admitted minus what the ledger holds (signed).
    pub fn drift(&self) -> i64 {
        let f = i64::try_from(self.filter_admitted()).unwrap_or(i64::MAX);
        let l = i64::try_from(self.admitted()).unwrap_or(i64::MAX);
        f.saturating_sub(l)
    }

    /// `|drift|` over what the ledger admitted (0 when both are 0; 1 when the ledger holds
    /// nothing but the filters admitted).
    pub fn drift_ratio(&self) -> f64 {
        drift_ratio(self.drift(), self.admitted())
    }

    pub fn add(&mut self, o: &Row) {
        self.admitted_central = self.admitted_central.saturating_add(o.admitted_central);
        self.admitted_leased = self.admitted_leased.saturating_add(o.admitted_leased);
        self.leased_units_spent = self.leased_units_spent.saturating_add(o.leased_units_spent);
        self.admitted_degraded = self.admitted_degraded.saturating_add(o.admitted_degraded);
        self.refused = self.refused.saturating_add(o.refused);
        self.leased_granted = self.leased_granted.saturating_add(o.leased_granted);
        self.filter_central = self.filter_central.saturating_add(o.filter_central);
    }

    /// The stored fields by name (the Redis hash fields, the export columns).
    pub fn fields(&self) -> [(&'static str, u64); 7] {
        [
            ("admitted_central", self.admitted_central),
            ("admitted_leased", self.admitted_leased),
            ("leased_units_spent", self.leased_units_spent),
            ("admitted_degraded", self.admitted_degraded),
            ("refused", self.refused),
            ("leased_granted", self.leased_granted),
            ("filter_central", self.filter_central),
        ]
    }

    /// Set a field by the name [`Row::fields`] gives it; false for an unknown name.
    pub fn set(&mut self, field: &str, value: u64) -> bool {
        let slot = match field {
            "admitted_central" => &mut self.admitted_central,
            "admitted_leased" => &mut self.admitted_leased,
            "leased_units_spent" => &mut self.leased_units_spent,
            "admitted_degraded" => &mut self.admitted_degraded,
            "refused" => &mut self.refused,
            "leased_granted" => &mut self.leased_granted,
            "filter_central" => &mut self.filter_central,
            _ => return false,
        };
        *slot = value;
        true
    }
}

/// `|drift|` over `admitted`.
pub fn drift_ratio(drift: i64, admitted: u64) -> f64 {
    let d = drift.unsigned_abs();
    if d == 0 {
        0.0
    } else if admitted == 0 {
        1.0
    } else {
        d as f64 / admitted as f64
    }
}

/// The ledger: how each decision, grant and report moves it. The service holds one for the
/// counts not yet written to its store and flushes it ([`Ledger::take`]); a store adds the
/// rows up.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    rows: BTreeMap<Key, Row>,
}

impl Ledger {
    /// A central decision (or renewal) for `tenant`'s `class` at `now_ns`: one admitted
    /// request when `admitted` and `counts_request` (a renewal asks for capacity, not for a
    /// request), and `granted` lease units. A refusal moves nothing here: the filter counts
    /// its 429 (a refused first attempt may still be admitted by a borrowing retry).
    pub fn decided(
        &mut self,
        tenant: &str,
        class: &str,
        admitted: bool,
        counts_request: bool,
        granted: u32,
        now_ns: u64,
    ) {
        if !admitted || (!counts_request && granted == 0) {
            return;
        }
        let row = self.row(hour_of(now_ns), tenant, class);
        if counts_request {
            row.admitted_central = row.admitted_central.saturating_add(1);
        }
        row.leased_granted = row.leased_granted.saturating_add(u64::from(granted));
    }

    /// A worker's tally arrived.
    pub fn reported(&mut self, entries: &[(Key, Counts)]) {
        for (k, c) in entries {
            if c.is_zero() {
                continue;
            }
            let row = self.row(k.hour, &k.tenant, &k.class);
            row.filter_central = row.filter_central.saturating_add(c.central);
            row.admitted_leased = row.admitted_leased.saturating_add(c.leased);
            row.leased_units_spent = row.leased_units_spent.saturating_add(c.leased_units);
            row.admitted_degraded = row.admitted_degraded.saturating_add(c.degraded);
            row.refused = row.refused.saturating_add(c.refused);
        }
    }

    /// Add a stored row (reading a store back, or putting back a failed flush).
    pub fn add(&mut self, key: Key, row: &Row) {
        self.rows.entry(key).or_default().add(row);
    }

    fn row(&mut self, hour: u64, tenant: &str, class: &str) -> &mut Row {
        self.rows
            .entry(Key {
                hour,
                tenant: tenant.to_string(),
                class: class.to_string(),
            })
            .or_default()
    }

    /// Take every row, leaving the ledger empty.
    pub fn take(&mut self) -> Vec<(Key, Row)> {
        std::mem::take(&mut self.rows).into_iter().collect()
    }

    /// The rows of hours in `[from_hour, to_hour)`, in key order.
    pub fn rows(&self, from_hour: u64, to_hour: u64) -> Vec<(Key, Row)> {
        self.rows
            .iter()
            .filter(|(k, _)| k.hour >= from_hour && k.hour < to_hour)
            .map(|(k, r)| (k.clone(), *r))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Per tenant and hour: what the ledger admitted and the drift (drift is judged per
    /// tenant: a tenant is billed as a whole).
    pub fn tenants(&self) -> BTreeMap<(u64, String), (u64, i64)> {
        tenant_totals(self.rows.iter())
    }
}

/// Sum rows per (hour, tenant): `(admitted, drift)`.
pub fn tenant_totals<'a>(
    rows: impl Iterator<Item = (&'a Key, &'a Row)>,
) -> BTreeMap<(u64, String), (u64, i64)> {
    let mut out: BTreeMap<(u64, String), (u64, i64)> = BTreeMap::new();
    for (k, r) in rows {
        let e = out.entry((k.hour, k.tenant.clone())).or_default();
        e.0 = e.0.saturating_add(r.admitted());
        e.1 = e.1.saturating_add(r.drift());
    }
    out
}

/// The export's columns, in order (CSV header and JSON keys alike).
pub const COLUMNS: [&str; 13] = [
    "hour",
    "tenant",
    "class",
    "admitted",
    "admitted_central",
    "admitted_leased",
    "admitted_degraded",
    "refused",
    "leased_granted",
    "leased_unspent",
    "filter_admitted",
    "drift",
    "drift_ratio",
];

/// One export line's values, as text, in [`COLUMNS`] order (the hour as RFC 3339).
pub fn export_values(key: &Key, row: &Row) -> [String; 13] {
    [
        format_hour(key.hour),
        key.tenant.clone(),
        key.class.clone(),
        row.admitted().to_string(),
        row.admitted_central.to_string(),
        row.admitted_leased.to_string(),
        row.admitted_degraded.to_string(),
        row.refused.to_string(),
        row.leased_granted.to_string(),
        row.leased_unspent().to_string(),
        row.filter_admitted().to_string(),
        row.drift().to_string(),
        format!("{:.6}", row.drift_ratio()),
    ]
}

/// One CSV line (RFC 4180 quoting where a field needs it), without the newline.
pub fn csv_line(values: &[String]) -> String {
    values
        .iter()
        .map(|v| {
            if v.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", v.replace('"', "\"\""))
            } else {
                v.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// One JSON line: the numbers as numbers, the hour, tenant and class as strings.
pub fn json_line(key: &Key, row: &Row) -> String {
    let v = export_values(key, row);
    let mut map = serde_json::Map::new();
    for (i, (name, value)) in COLUMNS.iter().zip(v).enumerate() {
        let json = if i < 3 {
            serde_json::Value::String(value)
        } else if *name == "drift_ratio" {
            serde_json::Value::from(row.drift_ratio())
        } else if *name == "drift" {
            serde_json::Value::from(row.drift())
        } else {
            serde_json::Value::from(value.parse::<u64>().unwrap_or(0))
        };
        map.insert((*name).to_string(), json);
    }
    serde_json::Value::Object(map).to_string()
}

/// A JSON line written by [`json_line`] back to its key and row (the stored fields; the
/// derived columns are recomputed).
pub fn parse_json_line(line: &str) -> Result<(Key, Row), String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not a JSON object: {e}"))?;
    let text = |name: &str| {
        v.get(name)
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("`{name}` is missing or not a string"))
    };
    let num = |name: &str| {
        v.get(name)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| format!("`{name}` is missing or not a non-negative integer"))
    };
    let hour = parse_time(&text("hour")?).map_err(|e| format!("`hour`: {e}"))? / 3600;
    let leased_granted = num("leased_granted")?;
    let admitted_leased = num("admitted_leased")?;
    let admitted_degraded = num("admitted_degraded")?;
    let admitted_central = num("admitted_central")?;
    let filter_admitted = num("filter_admitted")?;
    let row = Row {
        admitted_central,
        admitted_leased,
        leased_units_spent: leased_granted.saturating_sub(num("leased_unspent")?),
        admitted_degraded,
        refused: num("refused")?,
        leased_granted,
        filter_central: filter_admitted
            .saturating_sub(admitted_leased)
            .saturating_sub(admitted_degraded),
    };
    Ok((
        Key {
            hour,
            tenant: text("tenant")?,
            class: text("class")?,
        },
        row,
    ))
}

/// An hour as RFC 3339 UTC: `2026-12-04T02:00:00Z`.
pub fn format_hour(hour: u64) -> String {
    crate::audit::rfc3339_ms(hour.saturating_mul(HOUR_NS)).replace(".000Z", "Z")
}

/// A time as seconds since the Unix epoch, as `laneguard-audit` reads one
/// ([`crate::audit::parse_time`]: RFC 3339, a date, or Unix seconds), with an error that
/// says what is accepted.
pub fn parse_time(s: &str) -> Result<u64, String> {
    crate::audit::parse_time(s)
        .map(|ns| ns / 1_000_000_000)
        .ok_or_else(|| {
            format!(
                "`{}` is not a time: expected RFC 3339 (2026-12-04T02:00:00Z), a date \
                 (2026-12-04, midnight UTC) or seconds since the Unix epoch",
                s.trim()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_796_349_600 * 1_000_000_000; // 2026-12-04T02:00:00Z

    fn key(tenant: &str, class: &str) -> Key {
        Key {
            hour: hour_of(T0),
            tenant: tenant.into(),
            class: class.into(),
        }
    }

    #[test]
    fn times_parse_and_hours_format_in_utc() {
        assert_eq!(parse_time("2026-12-04T02:00:00Z"), Ok(1_796_349_600));
        assert_eq!(parse_time("2026-12-04T02:30:15.250Z"), Ok(1_796_351_415));
        assert_eq!(parse_time("2026-12-04T03:00:00+01:00"), Ok(1_796_349_600));
        assert_eq!(parse_time("2026-12-04"), Ok(1_796_342_400));
        assert_eq!(parse_time("1796349600"), Ok(1_796_349_600));
        for bad in ["", "yesterday", "2026-13-01", "2026-12-04T25:00:00Z"] {
            let e = parse_time(bad).unwrap_err();
            assert!(e.contains("RFC 3339"), "{bad:?}: {e}");
        }
        assert_eq!(format_hour(hour_of(T0)), "2026-12-04T02:00:00Z");
        assert_eq!(format_hour(0), "1970-01-01T00:00:00Z");
        for h in [0u64, 1, 478_986, 498_986 + 24 * 366] {
            assert_eq!(parse_time(&format_hour(h)), Ok(h * 3600), "hour {h}");
        }
    }

    #[test]
    fn a_tally_round_trips_through_the_metadata_and_escapes_its_names() {
        let mut t = Tally::default();
        t.note("acme", "integration", Admission::Central, 1, T0);
        t.note("acme", "integration", Admission::Leased, 3, T0);
        t.note("acme", "integration", Admission::Leased, 3, T0);
        t.note("acme", "integration", Admission::Refused, 1, T0);
        t.note("we/ird;,=%", "cl ass", Admission::Degraded, 1, T0 + HOUR_NS);
        let entries = t.take(10);
        assert!(t.is_empty());
        let text = encode(&entries);
        assert!(text.is_ascii() && !text.contains(' '), "{text}");
        let back = decode(&text).unwrap();
        assert_eq!(back, entries);
        assert_eq!(
            back[0].1,
            Counts {
                central: 1,
                leased: 2,
                leased_units: 6,
                degraded: 0,
                refused: 1
            }
        );
        assert_eq!(back[1].0.tenant, "we/ird;,=%");
        assert_eq!(back[1].0.hour, hour_of(T0) + 1);
        assert_eq!(decode("v1"), Ok(vec![]));
        for bad in [
            "",
            "v2;1/a/b=1,2,3,4,5",
            "v1;1/a/b=1,2,3,4",
            "v1;1/a=1,2,3,4,5",
            "v1;x/a/b=1,2,3,4,5",
            "v1;1/a/b=1,2,-3,4,5",
            "v1;1/a%G1/b=1,2,3,4,5",
            "v1;1//b=1,2,3,4,5",
        ] {
            assert!(decode(bad).is_err(), "{bad:?} decoded");
        }
        assert_eq!(decode("v1;1/a/b=1,2,3,4,5;zzz").unwrap_err().index, 2);
    }

    #[test]
    fn take_is_bounded_and_give_back_adds_up() {
        let mut t = Tally::default();
        for i in 0..5 {
            t.note(&format!("t{i}"), "c", Admission::Central, 1, T0);
        }
        let first = t.take(2);
        assert_eq!(first.len(), 2);
        assert_eq!(t.len(), 3);
        t.note("t0", "c", Admission::Central, 1, T0);
        t.give_back(first);
        let all = t.take(100);
        assert_eq!(all.len(), 5);
        assert_eq!(all[0].1.central, 2, "the failed call's count came back");
    }

    #[test]
    fn repeats_of_the_last_key_count_on_it_until_it_is_taken_or_the_hour_turns() {
        let mut t = Tally::default();
        for _ in 0..3 {
            t.note("acme", "batch", Admission::Leased, 2, T0);
        }
        t.note("acme", "batch", Admission::Central, 1, T0);
        // Same tenant, another class; then back: each key keeps its own counts.
        t.note("acme", "repair", Admission::Leased, 1, T0);
        t.note("acme", "batch", Admission::Leased, 1, T0);
        let all = t.take(10);
        assert_eq!(all.len(), 2);
        let batch = &all.iter().find(|(k, _)| k.class == "batch").unwrap().1;
        assert_eq!((batch.leased, batch.leased_units, batch.central), (4, 7, 1));
        // The last key was taken with the rest: the next count starts it again.
        t.note("acme", "batch", Admission::Leased, 1, T0);
        assert_eq!(t.len(), 1);
        // The next hour is a new key.
        t.note(
            "acme",
            "batch",
            Admission::Leased,
            1,
            T0 + 3_600 * 1_000_000_000,
        );
        let all = t.take(10);
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|(_, c)| c.leased == 1));
    }

    #[test]
    fn the_tally_is_capped_and_counts_what_it_dropped() {
        let mut t = Tally::default();
        for i in 0..Tally::MAX_KEYS + 3 {
            t.note(&format!("t{i}"), "c", Admission::Central, 1, T0);
        }
        assert_eq!(t.len(), Tally::MAX_KEYS);
        assert_eq!(t.take_dropped(), 3);
        // A known key still counts.
        t.note("t0", "c", Admission::Central, 1, T0);
        assert_eq!(t.take_dropped(), 0);
    }

    #[test]
    fn the_ledger_bills_central_from_the_service_and_the_rest_from_the_filters() {
        let mut l = Ledger::default();
        // Three central decisions admitted, one refused, one renewal granting 8 units.
        for _ in 0..3 {
            l.decided("acme", "integration", true, true, 0, T0);
        }
        l.decided("acme", "integration", false, true, 0, T0);
        l.decided("acme", "integration", true, false, 8, T0);
        // A renewal that granted nothing moves nothing.
        l.decided("acme", "integration", true, false, 0, T0);
        let mut t = Tally::default();
        for _ in 0..3 {
            t.note("acme", "integration", Admission::Central, 1, T0);
        }
        for _ in 0..5 {
            t.note("acme", "integration", Admission::Leased, 1, T0);
        }
        t.note("acme", "integration", Admission::Degraded, 1, T0);
        t.note("acme", "integration", Admission::Refused, 1, T0);
        l.reported(&t.take(10));
        let rows = l.rows(0, u64::MAX);
        assert_eq!(rows.len(), 1);
        let (k, r) = &rows[0];
        assert_eq!(k, &key("acme", "integration"));
        assert_eq!(r.admitted(), 3 + 5 + 1);
        assert_eq!(r.refused, 1);
        assert_eq!(r.leased_granted, 8);
        assert_eq!(r.leased_unspent(), 3);
        assert_eq!(r.drift(), 0);
        assert_eq!(r.drift_ratio(), 0.0);
    }

    #[test]
    fn a_central_answer_lost_on_the_way_back_is_drift() {
        // The service charged and counted it; the filter timed out and admitted it degraded:
        // the ledger bills it twice, and the drift says so.
        let mut l = Ledger::default();
        for _ in 0..99 {
            l.decided("acme", "web", true, true, 0, T0);
        }
        let mut t = Tally::default();
        for _ in 0..98 {
            t.note("acme", "web", Admission::Central, 1, T0);
        }
        t.note("acme", "web", Admission::Degraded, 1, T0);
        l.reported(&t.take(10));
        let (_, r) = l.rows(0, u64::MAX)[0].clone();
        assert_eq!(r.admitted(), 100);
        assert_eq!(r.filter_admitted(), 99);
        assert_eq!(r.drift(), -1);
        assert!((r.drift_ratio() - 0.01).abs() < 1e-12);
        let tenants = l.tenants();
        assert_eq!(tenants[&(hour_of(T0), "acme".to_string())], (100, -1));
        assert_eq!(drift_ratio(5, 0), 1.0);
    }

    #[test]
    fn export_lines_round_trip_and_quote_what_needs_it() {
        let k = key("acme", "integration");
        let r = Row {
            admitted_central: 3,
            admitted_leased: 5,
            leased_units_spent: 6,
            admitted_degraded: 1,
            refused: 2,
            leased_granted: 8,
            filter_central: 2,
        };
        let v = export_values(&k, &r);
        assert_eq!(
            csv_line(&v),
            "2026-12-04T02:00:00Z,acme,integration,9,3,5,1,2,8,2,8,-1,0.111111"
        );
        assert_eq!(csv_line(&COLUMNS.map(String::from)).split(',').count(), 13);
        assert_eq!(csv_line(&["a,b".into(), "q\"".into()]), "\"a,b\",\"q\"\"\"");
        let line = json_line(&k, &r);
        assert_eq!(parse_json_line(&line), Ok((k, r)));
        assert!(parse_json_line("{}").unwrap_err().contains("hour"));
    }
}
