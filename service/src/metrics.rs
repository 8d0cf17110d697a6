//! The service's own Prometheus metrics (`--metrics-addr IP:PORT`, `GET /metrics`).
//!
//! Every series is registered with the `prometheus-client` crate and rendered in the
//! Prometheus text format (0.0.4) by it; nothing here writes exposition text by hand. The
//! names are a contract with dashboards and alerts (`docs/operations.md`, "Service
//! metrics"): add series, never rename one. Every label takes a fixed, small set of values
//! (no tenant, key or client value ever becomes a label), and each of them is created at
//! start, so a series exists at 0 before it first moves.
//!
//! The audit chain's head is read at scrape time ([`AuditHead`]):
//! `laneguard_service_audit_head_seq` and `laneguard_service_audit_head_info{hash}`, the
//! hash a user passes to `laneguard-audit verify FILE --expect-head HASH` later.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::audit::AuditLog;
use crate::store::StoreError;

/// The prefix of every series.
pub const PREFIX: &str = "laneguard_service";

/// One label pair; every label of this module has a fixed set of values.
type Label = [(&'static str, &'static str); 1];

/// How a call ended, for the `outcome` label. `ok` and `over_limit` are the two answers a
/// decision gives; the others are the gRPC errors the caller's failure mode sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    OverLimit,
    InvalidArgument,
    Unavailable,
    Internal,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::OverLimit,
        Outcome::InvalidArgument,
        Outcome::Unavailable,
        Outcome::Internal,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::OverLimit => "over_limit",
            Outcome::InvalidArgument => "invalid_argument",
            Outcome::Unavailable => "unavailable",
            Outcome::Internal => "internal",
        }
    }
}

/// Which store operation, for the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    Decide,
    Report,
    Refund,
}

impl StoreOp {
    const ALL: [StoreOp; 3] = [StoreOp::Decide, StoreOp::Report, StoreOp::Refund];

    fn label(self) -> &'static str {
        match self {
            StoreOp::Decide => "decide",
            StoreOp::Report => "report",
            StoreOp::Refund => "refund",
        }
    }
}

const ERROR_KINDS: [&str; 5] = ["unavailable", "timeout", "contention", "corrupt", "backend"];

fn error_kind(e: &StoreError) -> &'static str {
    match e {
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Timeout(_) => "timeout",
        StoreError::Contention { .. } => "contention",
        StoreError::Corrupt { .. } => "corrupt",
        StoreError::Backend(_) => "backend",
    }
}

/// Store latency buckets, in seconds: 50 µs (the memory store) to 2.5 s (past any
/// `--redis-timeout-ms` worth setting).
const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 2.5,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Every counter the service moves. Cheap to update (atomics); cloned handles share values.
#[derive(Debug, Clone)]
pub struct Metrics {
    decisions: Family<Label, Counter>,
    grants: Counter,
    granted_units: Counter,
    /// Lease asks answered with a slot (`laneguard_core::engine::ask_slot`).
    slots: Counter,
    reports: Family<Label, Counter>,
    reported_hits: Counter,
    refunds: Family<Label, Counter>,
    refunded_units: Counter,
    store_seconds: Family<Label, Histogram, fn() -> Histogram>,
    store_errors: Family<Label, Counter>,
    redis_round_trips: Counter,
    audit_records: Counter,
    audit_rejected: Counter,
    /// Extra series registered by the store (bucket counts, evictions).
    memory_buckets: Gauge,
    memory_evictions: Counter,
    /// The usage ledger (`crate::usage`): requests by path, the filters' central count,
    /// lease units granted, failed flushes, tenants drifting over 1%.
    usage_requests: Family<Label, Counter>,
    usage_filter_central: Counter,
    usage_leased_granted: Counter,
    usage_flush_errors: Counter,
    usage_drift_tenants: Gauge,
}

/// The `path` label of `laneguard_service_usage_requests_total`.
const USAGE_PATHS: [&str; 4] = ["central", "leased", "degraded", "refused"];

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            decisions: Family::default(),
            grants: Counter::default(),
            granted_units: Counter::default(),
            slots: Counter::default(),
            reports: Family::default(),
            reported_hits: Counter::default(),
            refunds: Family::default(),
            refunded_units: Counter::default(),
            store_seconds: Family::new_with_constructor(latency_histogram),
            store_errors: Family::default(),
            redis_round_trips: Counter::default(),
            audit_records: Counter::default(),
            audit_rejected: Counter::default(),
            memory_buckets: Gauge::default(),
            memory_evictions: Counter::default(),
            usage_requests: Family::default(),
            usage_filter_central: Counter::default(),
            usage_leased_granted: Counter::default(),
            usage_flush_errors: Counter::default(),
            usage_drift_tenants: Gauge::default(),
        };
        for path in USAGE_PATHS {
            let _ = m.usage_requests.get_or_create(&[("path", path)]);
        }
        // Create every labelled series up front, so each exists (at 0) before it moves.
        for o in Outcome::ALL {
            let _ = m.decisions.get_or_create(&[("outcome", o.label())]);
            if !matches!(o, Outcome::OverLimit) {
                let _ = m.reports.get_or_create(&[("outcome", o.label())]);
                let _ = m.refunds.get_or_create(&[("outcome", o.label())]);
            }
        }
        for op in StoreOp::ALL {
            let _ = m.store_seconds.get_or_create(&[("op", op.label())]);
        }
        for kind in ERROR_KINDS {
            let _ = m.store_errors.get_or_create(&[("kind", kind)]);
        }
        m
    }

    /// A registry (prefix [`PREFIX`]) with every series of these metrics.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix(PREFIX);
        r.register(
            "decisions",
            "ShouldRateLimit calls that asked for a decision, by outcome (ok, over_limit, or the gRPC error answered)",
            self.decisions.clone(),
        );
        r.register(
            "grants",
            "Decisions that granted a lease (DescriptorStatus.quota)",
            self.grants.clone(),
        );
        r.register(
            "granted_units",
            "Cost units granted in leases, pre-charged to every bucket of the request",
            self.granted_units.clone(),
        );
        r.register(
            "slots",
            "Lease asks answered with a slot: the asker holds the saturated bucket until its turn (docs/leases.md step 3b)",
            self.slots.clone(),
        );
        r.register(
            "reports",
            "Reports of hits admitted without the service (x-laneguard-report: 1), by outcome",
            self.reports.clone(),
        );
        r.register(
            "reported_hits",
            "Hits charged by accepted reports (sum of their descriptors' hits_addend)",
            self.reported_hits.clone(),
        );
        r.register(
            "refunds",
            "Refunds of unused reserved capacity (x-laneguard-report: refund), by outcome",
            self.refunds.clone(),
        );
        r.register(
            "refunded_units",
            "Cost units given back by accepted refunds",
            self.refunded_units.clone(),
        );
        r.register(
            "store_duration_seconds",
            "Time one store call took (memory lock or Redis scripts), by op (decide, report, refund)",
            self.store_seconds.clone(),
        );
        r.register(
            "store_errors",
            "Store calls that failed, by kind (unavailable, timeout, contention: answered UNAVAILABLE; corrupt, backend: INTERNAL)",
            self.store_errors.clone(),
        );
        r.register(
            "redis_round_trips",
            "Commands and pipelines sent to Redis (scripts, script loads, pings); 0 with the memory store",
            self.redis_round_trips.clone(),
        );
        r.register(
            "audit_records",
            "Audit records appended to the hash-chained log (--audit-log)",
            self.audit_records.clone(),
        );
        r.register(
            "audit_rejected",
            "Audit records refused (not a JSON object, or too large)",
            self.audit_rejected.clone(),
        );
        r.register(
            "memory_buckets",
            "Buckets the memory store holds",
            self.memory_buckets.clone(),
        );
        r.register(
            "usage_requests",
            "Requests in the usage ledger, by path: central (the service's own count), leased, degraded, refused (the filters' tallies)",
            self.usage_requests.clone(),
        );
        r.register(
            "usage_filter_central",
            "Requests the filters say they admitted on a central answer; against usage_requests{path=\"central\"} it is the reconciliation drift",
            self.usage_filter_central.clone(),
        );
        r.register(
            "usage_leased_granted_units",
            "Lease units granted to decisions and renewals that named their class (x-laneguard-class)",
            self.usage_leased_granted.clone(),
        );
        r.register(
            "usage_flush_errors",
            "Flushes of the usage ledger to the store that failed (kept and retried)",
            self.usage_flush_errors.clone(),
        );
        r.register(
            "usage_drift_tenants",
            "Tenants whose drift in the last complete hour exceeds 1% of what the ledger admitted for them",
            self.usage_drift_tenants.clone(),
        );
        r.register(
            "memory_evictions",
            "Buckets the memory store evicted at its cap (--max-buckets) before they were full",
            self.memory_evictions.clone(),
        );
        r
    }

    pub fn decision(&self, outcome: Outcome, granted: u32) {
        self.decisions
            .get_or_create(&[("outcome", outcome.label())])
            .inc();
        if granted > 0 {
            self.grants.inc();
            self.granted_units.inc_by(u64::from(granted));
        }
    }

    /// A lease ask answered with a slot.
    pub fn slot(&self) {
        self.slots.inc();
    }

    /// A report (`units`: hits charged) or a refund (`units`: given back) answered.
    pub fn report(&self, op: StoreOp, outcome: Outcome, units: u64) {
        let (calls, total) = match op {
            StoreOp::Refund => (&self.refunds, &self.refunded_units),
            StoreOp::Report | StoreOp::Decide => (&self.reports, &self.reported_hits),
        };
        calls.get_or_create(&[("outcome", outcome.label())]).inc();
        if outcome == Outcome::Ok {
            total.inc_by(units);
        }
    }

    /// One store call of `op` that took `took` and may have failed.
    pub fn store_call(&self, op: StoreOp, took: Duration, error: Option<&StoreError>) {
        self.store_seconds
            .get_or_create(&[("op", op.label())])
            .observe(took.as_secs_f64());
        if let Some(e) = error {
            self.store_errors
                .get_or_create(&[("kind", error_kind(e))])
                .inc();
        }
    }

    /// The counter the Redis store increments once per command or pipeline it sends.
    pub fn redis_round_trips(&self) -> Counter {
        self.redis_round_trips.clone()
    }

    pub fn audit_appended(&self, appended: u32, rejected: u32) {
        self.audit_records.inc_by(u64::from(appended));
        self.audit_rejected.inc_by(u64::from(rejected));
    }

    /// Counts that entered the usage ledger.
    pub fn usage_counted(&self, r: &laneguard_core::usage::Row) {
        for (path, n) in [
            ("central", r.admitted_central),
            ("leased", r.admitted_leased),
            ("degraded", r.admitted_degraded),
            ("refused", r.refused),
        ] {
            if n > 0 {
                self.usage_requests
                    .get_or_create(&[("path", path)])
                    .inc_by(n);
            }
        }
        self.usage_filter_central.inc_by(r.filter_central);
        self.usage_leased_granted.inc_by(r.leased_granted);
    }

    pub fn usage_flush_failed(&self) {
        self.usage_flush_errors.inc();
    }

    pub fn usage_drift_tenants(&self, n: usize) {
        self.usage_drift_tenants
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The memory store's bucket gauge and eviction counter.
    pub fn memory_store(&self) -> (Gauge, Counter) {
        (self.memory_buckets.clone(), self.memory_evictions.clone())
    }
}

/// The audit chain's head, read from the log at every scrape:
/// `laneguard_service_audit_head_seq` (the seq of the last line written) and
/// `laneguard_service_audit_head_info{hash="..."} 1` (its hash). A user who keeps a scraped
/// hash can later run `laneguard-audit verify FILE --expect-head HASH`: a log whose tail was
/// cut (or rewritten) no longer contains that hash, and verify fails.
pub struct AuditHead(pub Arc<AuditLog>);

impl fmt::Debug for AuditHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AuditHead").field(&self.0.path()).finish()
    }
}

impl Collector for AuditHead {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let (seq, hash) = self.0.head();
        let seq_gauge = ConstGauge::new(i64::try_from(seq).unwrap_or(i64::MAX));
        let e = encoder.encode_descriptor(
            "audit_head_seq",
            "The seq of the last line of the audit log (its chain's head)",
            None,
            seq_gauge.metric_type(),
        )?;
        seq_gauge.encode(e)?;
        let one = ConstGauge::new(1i64);
        let mut e = encoder.encode_descriptor(
            "audit_head_info",
            "The audit chain's head hash, as a label; keep it and check it later with laneguard-audit verify FILE --expect-head HASH",
            None,
            one.metric_type(),
        )?;
        let labels = [("hash", hash)];
        one.encode(e.encode_family(&labels)?)?;
        Ok(())
    }
}

/// The Prometheus text of `registry`.
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry)?;
    Ok(text)
}

/// Serve `GET /metrics` (Prometheus text format 0.0.4) on `listener` until `shutdown`
/// resolves, and `GET /usage?since=..&until=..` (the usage ledger as JSON lines,
/// `docs/usage.md`) when `usage` is given. Any other path answers 404.
pub async fn serve<F>(
    listener: TcpListener,
    registry: Registry,
    usage: Option<Arc<crate::usage::UsageBook>>,
    shutdown: F,
) -> Result<(), std::io::Error>
where
    F: Future<Output = ()> + Send + 'static,
{
    use axum::http::{header, StatusCode, Uri};
    use axum::response::IntoResponse;

    let registry = Arc::new(registry);
    let app = axum::Router::new();
    let app = match usage {
        None => app,
        Some(book) => app.route(
            "/usage",
            axum::routing::get(move |uri: Uri| {
                let book = Arc::clone(&book);
                async move {
                    let (from, to) = match crate::usage::query_hours(uri.query()) {
                        Ok(hours) => hours,
                        Err(e) => {
                            return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
                        }
                    };
                    match book.export(from, to).await {
                        Ok(rows) => (
                            StatusCode::OK,
                            [(header::CONTENT_TYPE, "application/jsonl")],
                            crate::usage::jsonl(&rows),
                        )
                            .into_response(),
                        Err(e) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("cannot read the usage ledger: {e}\n"),
                        )
                            .into_response(),
                    }
                }
            }),
        ),
    };
    let app = app.route(
        "/metrics",
        axum::routing::get(move || {
            let registry = Arc::clone(&registry);
            async move {
                match render(&registry) {
                    Ok(text) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                        )],
                        text,
                    )
                        .into_response(),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot encode the metrics: {e}"),
                    )
                        .into_response(),
                }
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_exists_before_it_moves_and_moves_by_label() {
        let m = Metrics::new();
        let r = m.registry();
        let text = render(&r).unwrap();
        for series in [
            "laneguard_service_decisions_total{outcome=\"ok\"} 0",
            "laneguard_service_decisions_total{outcome=\"over_limit\"} 0",
            "laneguard_service_reports_total{outcome=\"unavailable\"} 0",
            "laneguard_service_grants_total 0",
            "laneguard_service_store_duration_seconds_count{op=\"decide\"} 0",
            "laneguard_service_store_errors_total{kind=\"timeout\"} 0",
            "laneguard_service_redis_round_trips_total 0",
            "laneguard_service_audit_records_total 0",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
        m.decision(Outcome::OverLimit, 0);
        m.decision(Outcome::Ok, 7);
        m.report(StoreOp::Report, Outcome::Ok, 12);
        m.report(StoreOp::Refund, Outcome::Ok, 5);
        m.store_call(
            StoreOp::Decide,
            Duration::from_micros(300),
            Some(&StoreError::Timeout(Duration::from_millis(250))),
        );
        let text = render(&r).unwrap();
        for series in [
            "laneguard_service_decisions_total{outcome=\"over_limit\"} 1",
            "laneguard_service_decisions_total{outcome=\"ok\"} 1",
            "laneguard_service_grants_total 1",
            "laneguard_service_granted_units_total 7",
            "laneguard_service_reported_hits_total 12",
            "laneguard_service_refunded_units_total 5",
            "laneguard_service_store_errors_total{kind=\"timeout\"} 1",
            "laneguard_service_store_duration_seconds_bucket{op=\"decide\",le=\"0.0005\"} 1",
            "laneguard_service_store_duration_seconds_bucket{op=\"decide\",le=\"0.00025\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }
}
