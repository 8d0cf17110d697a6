//! The service's usage ledger: counts taken from decisions and from the filters' tallies
//! (`laneguard_core::usage`, which owns every rule of how they move the ledger), held in
//! memory for at most one flush interval, then added to the store (`Store::add_usage`:
//! the memory store, or Redis, where it survives a restart of the service).
//!
//! The export reads the store (after a flush, so it includes everything counted so far):
//! `GET /usage?since=..&until=..` on the metrics port, which `laneguard-usage export`
//! calls (`docs/usage.md`).
//!
//! What a crash costs: counts not yet flushed (at most one interval, 1 s by default) are
//! lost with the process; the drift shows them (the filters' side still has them). A flush
//! that fails is put back and retried on the next interval.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use laneguard_core::usage::{self, Counts, Key, Ledger, Row};

use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// How often counts are written to the store (`--usage-flush-ms`).
pub const DEFAULT_FLUSH: Duration = Duration::from_secs(1);

/// The most tenants per hour the drift gauge follows (the ledger itself has no cap).
pub const MAX_DRIFT_TENANTS: usize = 100_000;

/// Per (hour, tenant): what the ledger admitted and the drift, for the drift gauge. Only the
/// current and the previous hour are kept.
type HourTotals = BTreeMap<(u64, String), (u64, i64)>;

/// The ledger's pending counts and the store they go to.
pub struct UsageBook {
    pending: Mutex<Ledger>,
    totals: Mutex<HourTotals>,
    store: Arc<dyn Store>,
    metrics: Metrics,
}

impl std::fmt::Debug for UsageBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageBook")
            .field("store", &self.store.name())
            .finish_non_exhaustive()
    }
}

impl UsageBook {
    pub fn new(store: Arc<dyn Store>, metrics: Metrics) -> UsageBook {
        UsageBook {
            pending: Mutex::default(),
            totals: Mutex::default(),
            store,
            metrics,
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A central decision or renewal the service answered ([`Ledger::decided`]).
    pub fn decided(
        &self,
        tenant: &str,
        class: &str,
        admitted: bool,
        counts_request: bool,
        granted: u32,
        now_ns: u64,
    ) {
        let mut delta = Ledger::default();
        delta.decided(tenant, class, admitted, counts_request, granted, now_ns);
        self.count(delta);
    }

    /// A worker's tally arrived on a call the service answered ([`Ledger::reported`]).
    pub fn reported(&self, entries: &[(Key, Counts)]) {
        if entries.is_empty() {
            return;
        }
        let mut delta = Ledger::default();
        delta.reported(entries);
        self.count(delta);
    }

    fn count(&self, mut delta: Ledger) {
        let rows = delta.take();
        if rows.is_empty() {
            return;
        }
        let mut pending = self.pending();
        let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        for (k, r) in rows {
            self.metrics.usage_counted(&r);
            let tenant = (k.hour, k.tenant.clone());
            if totals.len() < 2 * MAX_DRIFT_TENANTS || totals.contains_key(&tenant) {
                let t = totals.entry(tenant).or_default();
                t.0 = t.0.saturating_add(r.admitted());
                t.1 = t.1.saturating_add(r.drift());
            }
            pending.add(k, &r);
        }
    }

    /// Write the pending counts to the store. On failure they are kept for the next flush.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let rows = self.pending().take();
        if rows.is_empty() {
            return Ok(0);
        }
        match self.store.add_usage(&rows).await {
            Ok(()) => Ok(rows.len()),
            Err(e) => {
                self.metrics.usage_flush_failed();
                let mut pending = self.pending();
                for (k, r) in rows {
                    pending.add(k, &r);
                }
                Err(e)
            }
        }
    }

    /// The ledger's rows for hours in `[from_hour, to_hour)`: flush, then read the store.
    pub async fn export(
        &self,
        from_hour: u64,
        to_hour: u64,
    ) -> Result<Vec<(Key, Row)>, StoreError> {
        self.flush().await?;
        self.store.usage(from_hour, to_hour).await
    }

    /// Set the drift gauge from the hour before `now_ns`'s (the last complete one: the
    /// filters' tallies of the current hour are still arriving), and forget older hours.
    pub fn judge_drift(&self, now_ns: u64) {
        let hour = usage::hour_of(now_ns);
        let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        totals.retain(|(h, _), _| *h + 1 >= hour);
        let over = totals
            .iter()
            .filter(|((h, _), (admitted, drift))| {
                *h + 1 == hour && usage::drift_ratio(*drift, *admitted) > usage::DRIFT_ALERT_RATIO
            })
            .count();
        self.metrics.usage_drift_tenants(over);
    }

    /// Flush every `every`, and judge the drift, until the runtime stops.
    pub fn spawn_flusher(self: &Arc<Self>, clock: Arc<dyn crate::clock::Clock>, every: Duration) {
        let book = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = book.flush().await {
                    log::warn!(
                        "usage ledger: cannot write to the store ({e}); kept for the next flush"
                    );
                }
                book.judge_drift(clock.now_ns());
            }
        });
    }
}

/// The `/usage` endpoint's answer: JSON lines, one per ledger row.
pub fn jsonl(rows: &[(Key, Row)]) -> String {
    let mut out = String::new();
    for (k, r) in rows {
        out.push_str(&usage::json_line(k, r));
        out.push('\n');
    }
    out
}

/// The `since` and `until` of a `/usage` query string, as hours `[from, to)`: `since`
/// rounded down to its hour, `until` up (an export covers whole hours). Errors name the
/// parameter.
pub fn query_hours(query: Option<&str>) -> Result<(u64, u64), String> {
    let mut since = None;
    let mut until = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = usage::unescape(value).ok_or_else(|| format!("`{name}`: bad %-escape"))?;
        let secs = || usage::parse_time(&value).map_err(|e| format!("`{name}`: {e}"));
        match name {
            "since" => since = Some(secs()?),
            "until" => until = Some(secs()?),
            other => return Err(format!("unknown parameter `{other}` (since, until)")),
        }
    }
    let since = since.ok_or("`since` is missing (seconds since the epoch or RFC 3339)")?;
    let until = until.ok_or("`until` is missing (seconds since the epoch or RFC 3339)")?;
    if until <= since {
        return Err(format!("`until` ({until}) must be after `since` ({since})"));
    }
    Ok((since / 3600, until.div_ceil(3600)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use laneguard_core::usage::{Admission, Tally, HOUR_NS};

    const T0: u64 = 1_796_349_600 * 1_000_000_000; // 2026-12-04T02:00:00Z

    #[tokio::test]
    async fn counts_reach_the_store_on_flush_and_the_export_sums_them() {
        let store = Arc::new(MemoryStore::new());
        let book = UsageBook::new(store.clone(), Metrics::new());
        book.decided("acme", "web", true, true, 4, T0);
        book.decided("acme", "web", false, true, 0, T0);
        let mut t = Tally::default();
        t.note("acme", "web", Admission::Central, 1, T0);
        t.note("acme", "web", Admission::Leased, 1, T0);
        book.reported(&t.take(10));
        assert!(
            store.usage(0, u64::MAX).await.unwrap().is_empty(),
            "not yet flushed"
        );
        let rows = book.export(0, u64::MAX).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].1.admitted(), 2);
        assert_eq!(rows[0].1.leased_granted, 4);
        assert_eq!(rows[0].1.drift(), 0);
        // A second flush adds, never replaces.
        book.decided("acme", "web", true, true, 0, T0);
        let rows = book.export(0, u64::MAX).await.unwrap();
        assert_eq!(rows[0].1.admitted_central, 2);
    }

    #[tokio::test]
    async fn the_drift_gauge_counts_tenants_over_one_percent_in_the_last_complete_hour() {
        let m = Metrics::new();
        let book = UsageBook::new(Arc::new(MemoryStore::new()), m.clone());
        // acme: 100 central, the filters saw 98 of them (2% drift); globex: exact.
        for _ in 0..100 {
            book.decided("acme", "web", true, true, 0, T0);
            book.decided("globex", "web", true, true, 0, T0);
        }
        let mut t = Tally::default();
        for _ in 0..98 {
            t.note("acme", "web", Admission::Central, 1, T0);
        }
        for _ in 0..100 {
            t.note("globex", "web", Admission::Central, 1, T0);
        }
        book.reported(&t.take(10));
        book.judge_drift(T0 + 10);
        let text = crate::metrics::render(&m.registry()).unwrap();
        assert!(
            text.contains("laneguard_service_usage_drift_tenants 0"),
            "{text}"
        );
        book.judge_drift(T0 + HOUR_NS + 10);
        let text = crate::metrics::render(&m.registry()).unwrap();
        assert!(
            text.contains("laneguard_service_usage_drift_tenants 1"),
            "{text}"
        );
        assert!(
            text.contains("laneguard_service_usage_requests_total{path=\"central\"} 200"),
            "{text}"
        );
        assert!(
            text.contains("laneguard_service_usage_filter_central_total 198"),
            "{text}"
        );
        // Two hours on, the hour is forgotten.
        book.judge_drift(T0 + 2 * HOUR_NS + 10);
        let text = crate::metrics::render(&m.registry()).unwrap();
        assert!(
            text.contains("laneguard_service_usage_drift_tenants 0"),
            "{text}"
        );
    }

    #[test]
    fn query_hours_cover_whole_hours_and_name_the_bad_parameter() {
        assert_eq!(
            query_hours(Some("since=1796349600&until=1796353200")),
            Ok((498_986, 498_987))
        );
        assert_eq!(
            query_hours(Some(
                "since=2026-12-04T02%3A30%3A00Z&until=2026-12-04T03:10:00Z"
            )),
            Ok((498_986, 498_988))
        );
        assert!(query_hours(None)
            .unwrap_err()
            .contains("`since` is missing"));
        assert!(query_hours(Some("since=1&until=x"))
            .unwrap_err()
            .contains("`until`"));
        assert!(query_hours(Some("since=5&until=5"))
            .unwrap_err()
            .contains("after"));
        assert!(query_hours(Some("since=1&until=2&tenant=a"))
            .unwrap_err()
            .contains("tenant"));
    }
}
