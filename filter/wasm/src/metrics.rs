//! Envoy stats. Counters are defined once per VM in `on_configure`; Envoy shows them with
//! the prefix `wasmcustom.` (e.g. `wasmcustom.laneguard.forged_class`). Series are per class
//! and per outcome only: the number of classes is fixed by the policy, so request data
//! (tenant ids, users) can never grow the number of series.

use laneguard_core::Policy;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// A counter id, or none if Envoy refused to define it (then it is silently skipped:
/// a missing stat must never fail a request).
#[derive(Clone, Copy, Default)]
pub struct Counter(Option<u32>);

impl Counter {
    fn define(name: &str) -> Counter {
        match hostcalls::define_metric(MetricType::Counter, name) {
            Ok(id) => Counter(Some(id)),
            Err(e) => {
                log::warn!("laneguard: cannot define metric {name}: {e:?}");
                Counter(None)
            }
        }
    }

    pub fn inc(self) {
        self.add(1);
    }

    pub fn add(self, n: u64) {
        if let Some(id) = self.0 {
            // A failed increment loses counts; it must not fail the request.
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// A gauge id (same caveats as [`Counter`]).
#[derive(Clone, Copy, Default)]
pub struct Gauge(Option<u32>);

impl Gauge {
    fn define(name: &str) -> Gauge {
        match hostcalls::define_metric(MetricType::Gauge, name) {
            Ok(id) => Gauge(Some(id)),
            Err(e) => {
                log::warn!("laneguard: cannot define metric {name}: {e:?}");
                Gauge(None)
            }
        }
    }

    pub fn set(self, value: u64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

/// Per-class counters, indexed by class id.
pub struct ClassCounters {
    pub allowed: Counter,
    pub limited: Counter,
    pub degraded: Counter,
}

pub struct Metrics {
    pub allowed: Counter,
    pub limited: Counter,
    pub forged_class: Counter,
    pub missing_identity: Counter,
    pub invalid_identity: Counter,
    pub decided_local: Counter,
    pub decided_central: Counter,
    pub degraded: Counter,
    pub service_error_status: Counter,
    pub service_error_timeout: Counter,
    pub service_error_dispatch: Counter,
    pub service_error_decode: Counter,
    pub classes: Vec<ClassCounters>,
    /// Leased capacity this worker holds unspent. Leases are pre-paid, so the sum over
    /// workers and Envoys bounds how far the fleet can under-admit; it never over-admits
    /// while the service answers.
    pub lease_outstanding: Gauge,
    /// Hits admitted without the service, not yet reported.
    pub unreported_hits: Gauge,
    pub buckets: Gauge,
    pub lease_renewals: Counter,
    pub reported_hits: Counter,
}

impl Metrics {
    pub fn define(policy: &Policy) -> Metrics {
        let c = |n: &str| Counter::define(&format!("laneguard.{n}"));
        Metrics {
            allowed: c("allowed"),
            limited: c("limited"),
            forged_class: c("forged_class"),
            missing_identity: c("missing_identity"),
            invalid_identity: c("invalid_identity"),
            decided_local: c("decided.local"),
            decided_central: c("decided.central"),
            degraded: c("degraded"),
            service_error_status: c("service_error.status"),
            service_error_timeout: c("service_error.timeout"),
            service_error_dispatch: c("service_error.dispatch"),
            service_error_decode: c("service_error.decode"),
            classes: policy
                .classes
                .iter()
                .map(|cl| ClassCounters {
                    allowed: c(&format!("class.{}.allowed", cl.name)),
                    limited: c(&format!("class.{}.limited", cl.name)),
                    degraded: c(&format!("class.{}.degraded", cl.name)),
                })
                .collect(),
            lease_outstanding: Gauge::define("laneguard.lease.outstanding"),
            unreported_hits: Gauge::define("laneguard.unreported_hits"),
            buckets: Gauge::define("laneguard.buckets"),
            lease_renewals: c("lease.renewals"),
            reported_hits: c("reported_hits"),
        }
    }

    pub fn class(&self, id: usize) -> Option<&ClassCounters> {
        self.classes.get(id)
    }
}
