//! Envoy stats. Every series is defined once per VM in `on_configure`; Envoy shows them with
//! the prefix `wasmcustom.` (e.g. `wasmcustom.laneguard.forged_class`, and
//! `laneguard_forged_class` on `/stats/prometheus`). The names are built so that the
//! `stats_config.stats_tags` of `envoy/demo/envoy.yaml` can cut class, budget, fallback,
//! named tenant and rival out as labels (`docs/operations.md`): keep that in step.
//!
//! Cardinality is fixed by the policy, never by traffic: series are per class, per bucket
//! kind a class can touch, per pair of classes (collisions), and per tenant *named in the
//! policy* (`tenants.overrides`, model allocations). A request from any other tenant only
//! moves the aggregate series, so a flood of random tenant ids cannot add a single series.
//! `docs/operations.md` says how to read each one.

use crate::host::{Host, MetricKind};
use laneguard_core::declared::Dimension;
use laneguard_core::policy::Fallback;
use laneguard_core::{BucketKind, Plan, Policy, Reject};
use std::collections::HashMap;

/// A counter id, or none if Envoy refused to define it (then it is silently skipped:
/// a missing stat must never fail a request).
#[derive(Clone, Copy, Default)]
pub struct Counter(Option<u32>);

impl Counter {
    fn define(h: &dyn Host, name: &str) -> Counter {
        match h.define_metric(MetricKind::Counter, name) {
            Ok(id) => Counter(Some(id)),
            Err(e) => {
                log::warn!("laneguard: cannot define metric {name}: {e:?}");
                Counter(None)
            }
        }
    }

    pub fn inc(self, h: &dyn Host) {
        self.add(h, 1);
    }

    pub fn add(self, h: &dyn Host, n: u64) {
        if let Some(id) = self.0 {
            // A failed increment loses counts; it must not fail the request.
            let _ = h.increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// A counter every admitted request moves: counted in VM memory and added to Envoy's stat
/// on the root tick ([`Metrics::flush`], every `root::TICK`), so the common path makes no
/// host call for it (issue 10 §2: one crossing into Envoy costs about 0.3 µs, a tick's
/// flush one call per series for every request of the tick). The stat lags the requests by
/// at most one tick; counts of a VM that stops between two ticks are lost.
#[derive(Default)]
pub struct Batched {
    counter: Counter,
    pending: std::cell::Cell<u64>,
}

impl Batched {
    fn define(h: &dyn Host, name: &str) -> Batched {
        Batched {
            counter: Counter::define(h, name),
            pending: std::cell::Cell::new(0),
        }
    }

    pub fn inc(&self) {
        self.pending.set(self.pending.get().saturating_add(1));
    }

    /// Add what was counted since the last flush to the stat.
    fn flush(&self, h: &dyn Host) {
        let n = self.pending.take();
        if n > 0 {
            self.counter.add(h, n);
        }
    }
}

/// A gauge that sums over VMs. Every worker VM defines the same Envoy gauge, so a plain
/// `record` would leave whatever the last VM wrote (often the main thread's, which serves no
/// requests). Each VM instead adds the change in its own value, so the gauge holds the sum.
#[derive(Default)]
pub struct Gauge {
    id: Option<u32>,
    mine: std::cell::Cell<u64>,
}

impl Gauge {
    fn define(h: &dyn Host, name: &str) -> Gauge {
        match h.define_metric(MetricKind::Gauge, name) {
            Ok(id) => Gauge {
                id: Some(id),
                mine: std::cell::Cell::new(0),
            },
            Err(e) => {
                log::warn!("laneguard: cannot define metric {name}: {e:?}");
                Gauge::default()
            }
        }
    }

    /// Set this VM's share of the gauge.
    pub fn set(&self, h: &dyn Host, value: u64) {
        let Some(id) = self.id else {
            return;
        };
        let old = self.mine.get();
        if value == old {
            return;
        }
        let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        if h.increment_metric(id, to_i64(value) - to_i64(old)).is_ok() {
            self.mine.set(value);
        }
    }
}

/// Counters for one outcome, by fallback.
pub struct FallbackCounters {
    pub queue: Counter,
    pub fallback_route: Counter,
    pub cached: Counter,
    pub reject: Counter,
}

impl FallbackCounters {
    fn define(h: &dyn Host, prefix: &str) -> FallbackCounters {
        let c = |f: Fallback| Counter::define(h, &format!("{prefix}.fallback.{}", f.as_str()));
        FallbackCounters {
            queue: c(Fallback::Queue),
            fallback_route: c(Fallback::FallbackRoute),
            cached: c(Fallback::Cached),
            reject: c(Fallback::Reject),
        }
    }

    pub fn get(&self, f: Fallback) -> Counter {
        match f {
            Fallback::Queue => self.queue,
            Fallback::FallbackRoute => self.fallback_route,
            Fallback::Cached => self.cached,
            Fallback::Reject => self.reject,
        }
    }
}

/// Limited and shadow-limited by the budget (bucket kind) that tripped.
#[derive(Clone, Copy, Default)]
pub struct BudgetCounters {
    pub limited: Counter,
    pub shadow_limited: Counter,
}

/// Per-class counters, indexed by class id.
pub struct ClassCounters {
    pub allowed: Batched,
    /// Enforced limits, whatever fallback then fired.
    pub limited: Counter,
    pub shadow_limited: Counter,
    /// Decided without the service (its failure mode applied).
    pub degraded: Counter,
    /// Requests that declared a class they may not use and were given this one.
    pub forged: Counter,
    /// Not limited: the class (or the tenant) is `off`.
    pub off: Counter,
    pub fallback: FallbackCounters,
    /// Protected classes only: windows in which the lane came within `near_miss_pct`.
    pub near_miss: Counter,
    budgets: Vec<(BucketKind, BudgetCounters)>,
    /// Protected classes only: per other class id, squeezes of this lane while it was active.
    pub collisions: Vec<Counter>,
}

impl ClassCounters {
    pub fn budget(&self, kind: BucketKind) -> BudgetCounters {
        self.budgets
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, c)| *c)
            .unwrap_or_default()
    }
}

/// Per tenant named in the policy.
pub struct TenantCounters {
    pub allowed: Batched,
    pub limited: Counter,
    pub shadow_limited: Counter,
}

pub struct Metrics {
    pub allowed: Batched,
    pub limited: Counter,
    pub shadow_limited: Counter,
    pub off: Counter,
    pub forged_class: Counter,
    pub missing_identity: Counter,
    pub invalid_identity: Counter,
    /// Requests refused by the rule for declared purposes and models (no value and no
    /// default: 400; a value the principal may not use under `unknown: refuse`: 403), and
    /// those charged to the default instead of a value they may not use
    /// (`laneguard_core::declared`).
    pub purpose_refused: Counter,
    pub model_refused: Counter,
    pub purpose_defaulted: Counter,
    pub model_defaulted: Counter,
    /// Client-declared values (class, user, purpose, model, path, method, request id) longer
    /// than `logsafe::MAX_LOGGED_BYTES`, clipped in logs and records.
    pub oversized_declared: Counter,
    pub decided_local: Batched,
    pub decided_central: Batched,
    pub degraded: Counter,
    pub service_error_status: Counter,
    pub service_error_timeout: Counter,
    pub service_error_dispatch: Counter,
    /// Clusters the policy names that Envoy does not have, found by the startup probe
    /// (one per VM per cluster).
    pub service_cluster_unknown: Counter,
    pub service_error_decode: Counter,
    pub fallback: FallbackCounters,
    pub near_miss: Counter,
    pub queue_resumed: Counter,
    /// Queued requests whose client went away before their turn.
    pub queue_abandoned: Counter,
    /// Queued requests the service refused when they were due (the fleet used the room).
    pub queue_refused: Counter,
    /// `cached` fallbacks answered from the cache, and those the cache had nothing for (429).
    pub cache_hit: Counter,
    pub cache_miss: Counter,
    pub queue_depth: Gauge,
    pub audit_records: Counter,
    pub audit_shipped: Counter,
    /// Records lost: the buffer was full, or the service refused them.
    pub audit_dropped: Counter,
    pub audit_ship_errors: Counter,
    pub audit_buffered: Gauge,
    pub classes: Vec<ClassCounters>,
    tenants: HashMap<String, TenantCounters>,
    /// Leased capacity this worker holds unspent. Leases are pre-paid, so the sum over
    /// workers and Envoys bounds how far the fleet can under-admit; it never over-admits
    /// while the service answers.
    pub lease_outstanding: Gauge,
    /// Hits admitted without the service, not yet reported.
    pub unreported_hits: Gauge,
    pub buckets: Gauge,
    /// Live buckets evicted from this worker's table at its cap (`service.max_buckets`).
    pub buckets_evicted: Counter,
    /// Hits admitted without the service and forgotten during an outage: the VM's published
    /// ledger was at its cap (`reconcile::MAX_LEDGER_BYTES`), or the worker's own ledger
    /// between two sync ticks was (`laneguard_core::MAX_UNREPORTED_BUCKETS` buckets).
    pub unreported_dropped: Counter,
    /// Requests left out of the usage tally because it was at its cap
    /// (`laneguard_core::usage::Tally::MAX_KEYS` tenant-class-hours) between two syncs.
    pub usage_dropped: Counter,
    /// Shared-data keys of this filter in this Envoy and the bytes of their values
    /// (`reconcile::footprint`; the same figure in every VM): keys never carry a tenant.
    pub shared_data_keys: Gauge,
    pub shared_data_bytes: Gauge,
    /// This VM's linear memory (WebAssembly pages times 64 KiB; it only grows).
    pub vm_memory_bytes: Gauge,
    pub lease_renewals: Counter,
    pub reported_hits: Counter,
    /// Of `reported_hits`, those sent as soon as the service answered again after failing,
    /// rather than on the sync tick (`laneguard_core::reconnect`).
    pub reported_on_reconnect: Counter,
    /// AI requests (token budgets); defined only when the policy has token budgets.
    pub tokens: TokenCounters,
}

/// `laneguard.tokens.*`: AI requests, their reservations and settlements.
#[derive(Default)]
pub struct TokenCounters {
    /// AI requests whose body was read.
    pub requests: Counter,
    /// Refused before any charge: body not JSON (400), bad `max_tokens` (400), body above
    /// `tokens.inspect_bytes` (413), reservation no bucket can hold (400).
    pub bad_body: Counter,
    pub bad_max_tokens: Counter,
    pub body_too_large: Counter,
    pub too_many_tokens: Counter,
    /// Where each reservation came from.
    pub estimate_body: Counter,
    pub estimate_model: Counter,
    pub estimate_tool: Counter,
    pub estimate_default: Counter,
    /// Tokens reserved at admission, refunded at settlement, and charged beyond the
    /// reservation (the overshoot bound: `laneguard_core::ai`).
    pub reserved: Counter,
    pub refunded: Counter,
    pub over_reservation: Counter,
    /// Tokens given back to the service (on the sync tick).
    pub refunds_sent: Counter,
    /// Tokens not given back because the worker's refunds held `MAX_UNREPORTED_BUCKETS`
    /// buckets between two sync ticks (an over-charge, never an overshoot).
    pub refunds_dropped: Counter,
    /// Settlements, by outcome.
    pub settled_exact: Counter,
    pub settled_refund: Counter,
    pub settled_extra: Counter,
    pub settled_missing: Counter,
    pub settled_invalid: Counter,
    pub settled_too_large: Counter,
    pub settled_disconnected: Counter,
    /// Requests sent to a cheaper model.
    pub cheaper_model: Counter,
    /// Tokens reserved by requests in flight (not yet settled), summed over workers.
    pub in_flight_reserved: Gauge,
}

impl TokenCounters {
    fn define(h: &dyn Host) -> TokenCounters {
        let c = |n: &str| Counter::define(h, &format!("laneguard.tokens.{n}"));
        TokenCounters {
            requests: c("requests"),
            bad_body: c("bad_body"),
            bad_max_tokens: c("bad_max_tokens"),
            body_too_large: c("body_too_large"),
            too_many_tokens: c("too_many_tokens"),
            estimate_body: c("estimate.body"),
            estimate_model: c("estimate.model"),
            estimate_tool: c("estimate.tool"),
            estimate_default: c("estimate.default"),
            reserved: c("reserved"),
            refunded: c("refunded"),
            over_reservation: c("over_reservation"),
            refunds_sent: c("refunds_sent"),
            refunds_dropped: c("refunds_dropped"),
            settled_exact: c("settled.exact"),
            settled_refund: c("settled.refund"),
            settled_extra: c("settled.extra"),
            settled_missing: c("settled.missing"),
            settled_invalid: c("settled.invalid"),
            settled_too_large: c("settled.too_large"),
            settled_disconnected: c("settled.disconnected"),
            cheaper_model: c("cheaper_model"),
            in_flight_reserved: Gauge::define(h, "laneguard.tokens.in_flight_reserved"),
        }
    }

    pub fn estimate(&self, e: laneguard_core::ai::Estimate) -> Counter {
        use laneguard_core::ai::Estimate;
        match e {
            Estimate::Body => self.estimate_body,
            Estimate::Model => self.estimate_model,
            Estimate::Tool => self.estimate_tool,
            Estimate::Default => self.estimate_default,
        }
    }

    /// Settled at the reservation, by why.
    pub fn at_reservation(&self, why: laneguard_core::ai::NoUsage) -> Counter {
        use laneguard_core::ai::NoUsage;
        match why {
            NoUsage::Missing => self.settled_missing,
            NoUsage::Invalid => self.settled_invalid,
            NoUsage::TooLarge => self.settled_too_large,
            NoUsage::Disconnected => self.settled_disconnected,
        }
    }
}

/// The bucket kinds a class can trip, given the policy.
fn kinds_for(policy: &Policy, class: usize) -> Vec<BucketKind> {
    let c = &policy.classes[class];
    let plans = std::iter::once(&policy.default_plan).chain(policy.tenant_plans.values());
    let mut kinds = Vec::new();
    if c.consequence.is_protected() {
        kinds.push(BucketKind::Reserve);
        if c.borrow {
            kinds.push(BucketKind::Shared);
        }
    } else {
        kinds.push(BucketKind::Shared);
    }
    if plans
        .clone()
        .any(|p| p.budgets.get(class).is_some_and(Option::is_some))
    {
        kinds.push(BucketKind::Class);
    }
    if policy.users.is_some() {
        kinds.push(BucketKind::User);
    }
    if policy.families.iter().any(|f| f.limit.is_some()) {
        kinds.push(BucketKind::Tool);
    }
    if policy.purposes.is_some() {
        kinds.push(BucketKind::Purpose);
    }
    if policy.models.is_some() {
        kinds.push(BucketKind::Model);
        kinds.push(BucketKind::ModelTotal);
    }
    if let Some(t) = &policy.tokens {
        if t.users.is_some() {
            kinds.push(BucketKind::UserTokens);
        }
        if t.tools.values().any(|x| x.limit.is_some()) {
            kinds.push(BucketKind::ToolTokens);
        }
        if !t.purposes.is_empty() {
            kinds.push(BucketKind::PurposeTokens);
        }
        let models = policy.models.as_ref().map(|m| &m.list);
        if models.is_some_and(|l| l.values().any(|m| m.tokens.is_some())) {
            kinds.push(BucketKind::ModelTokens);
            kinds.push(BucketKind::ModelTotalTokens);
        }
    }
    kinds
}

impl Metrics {
    /// Count a request refused before any bucket was consulted.
    pub fn count_reject(&self, h: &dyn Host, reject: Reject) {
        match reject {
            Reject::MissingIdentity => self.missing_identity.inc(h),
            Reject::InvalidIdentity => self.invalid_identity.inc(h),
            Reject::Undeclared(d) | Reject::NotDeclarable(d) => self.declared_refused(d).inc(h),
        }
    }

    /// Count the declared values of `plan` that were charged to their default.
    pub fn count_defaulted(&self, h: &dyn Host, plan: &Plan) {
        for d in &plan.defaulted {
            self.declared_defaulted(*d).inc(h);
        }
    }

    /// The counter of requests refused for `dim` (`laneguard.purpose_refused`, ...).
    pub fn declared_refused(&self, dim: Dimension) -> Counter {
        match dim {
            Dimension::Purpose => self.purpose_refused,
            Dimension::Model => self.model_refused,
        }
    }

    /// The counter of requests charged to `dim`'s default instead of what they declared.
    pub fn declared_defaulted(&self, dim: Dimension) -> Counter {
        match dim {
            Dimension::Purpose => self.purpose_defaulted,
            Dimension::Model => self.model_defaulted,
        }
    }

    pub fn define(h: &dyn Host, policy: &Policy) -> Metrics {
        let c = |n: &str| Counter::define(h, &format!("laneguard.{n}"));
        let b = |n: &str| Batched::define(h, &format!("laneguard.{n}"));
        let g = |n: &str| Gauge::define(h, &format!("laneguard.{n}"));
        let classes = policy
            .classes
            .iter()
            .enumerate()
            .map(|(id, cl)| {
                let p = format!("class.{}", cl.name);
                let protected = cl.consequence.is_protected();
                let budgets = kinds_for(policy, id)
                    .into_iter()
                    .map(|k| {
                        let b = format!("{p}.budget.{}", k.as_str());
                        (
                            k,
                            BudgetCounters {
                                limited: c(&format!("{b}.limited")),
                                shadow_limited: c(&format!("{b}.shadow_limited")),
                            },
                        )
                    })
                    .collect();
                let collisions = policy
                    .classes
                    .iter()
                    .enumerate()
                    .map(|(other, o)| {
                        if protected && other != id {
                            c(&format!("collision.{}.{}", cl.name, o.name))
                        } else {
                            Counter::default()
                        }
                    })
                    .collect();
                ClassCounters {
                    allowed: b(&format!("{p}.allowed")),
                    limited: c(&format!("{p}.limited")),
                    shadow_limited: c(&format!("{p}.shadow_limited")),
                    degraded: c(&format!("{p}.degraded")),
                    forged: c(&format!("{p}.forged")),
                    off: c(&format!("{p}.off")),
                    fallback: FallbackCounters::define(h, &format!("laneguard.{p}")),
                    near_miss: if protected {
                        c(&format!("{p}.near_miss"))
                    } else {
                        Counter::default()
                    },
                    budgets,
                    collisions,
                }
            })
            .collect();
        let tenants = policy
            .ops
            .named_tenants
            .iter()
            .map(|t| {
                let p = format!("tenant.{t}");
                (
                    t.clone(),
                    TenantCounters {
                        allowed: b(&format!("{p}.allowed")),
                        limited: c(&format!("{p}.limited")),
                        shadow_limited: c(&format!("{p}.shadow_limited")),
                    },
                )
            })
            .collect();
        Metrics {
            allowed: b("allowed"),
            limited: c("limited"),
            shadow_limited: c("shadow_limited"),
            off: c("off"),
            forged_class: c("forged_class"),
            missing_identity: c("missing_identity"),
            invalid_identity: c("invalid_identity"),
            purpose_refused: c("purpose_refused"),
            model_refused: c("model_refused"),
            purpose_defaulted: c("purpose_defaulted"),
            model_defaulted: c("model_defaulted"),
            oversized_declared: c("oversized_declared"),
            decided_local: b("decided.local"),
            decided_central: b("decided.central"),
            degraded: c("degraded"),
            service_error_status: c("service_error.status"),
            service_error_timeout: c("service_error.timeout"),
            service_error_dispatch: c("service_error.dispatch"),
            service_cluster_unknown: c("service_cluster_unknown"),
            service_error_decode: c("service_error.decode"),
            fallback: FallbackCounters::define(h, "laneguard"),
            near_miss: c("near_miss"),
            queue_resumed: c("queue.resumed"),
            queue_abandoned: c("queue.abandoned"),
            queue_refused: c("queue.refused"),
            cache_hit: c("cache.hit"),
            cache_miss: c("cache.miss"),
            queue_depth: g("queue.depth"),
            audit_records: c("audit.records"),
            audit_shipped: c("audit.shipped"),
            audit_dropped: c("audit.dropped"),
            audit_ship_errors: c("audit.ship_errors"),
            audit_buffered: g("audit.buffered"),
            classes,
            tenants,
            lease_outstanding: g("lease.outstanding"),
            unreported_hits: g("unreported_hits"),
            buckets: g("buckets"),
            buckets_evicted: c("buckets.evicted"),
            unreported_dropped: c("unreported_dropped"),
            usage_dropped: c("usage.dropped"),
            shared_data_keys: g("shared_data.keys"),
            shared_data_bytes: g("shared_data.bytes"),
            vm_memory_bytes: g("vm.memory_bytes"),
            lease_renewals: c("lease.renewals"),
            reported_hits: c("reported_hits"),
            reported_on_reconnect: c("reported_on_reconnect"),
            tokens: if policy.tokens.is_some() {
                TokenCounters::define(h)
            } else {
                TokenCounters::default()
            },
        }
    }

    /// Add the [`Batched`] counters' counts to Envoy's stats (the root tick).
    pub fn flush(&self, h: &dyn Host) {
        self.allowed.flush(h);
        self.decided_local.flush(h);
        self.decided_central.flush(h);
        for c in &self.classes {
            c.allowed.flush(h);
        }
        for t in self.tenants.values() {
            t.allowed.flush(h);
        }
    }

    pub fn class(&self, id: usize) -> Option<&ClassCounters> {
        self.classes.get(id)
    }

    /// The counters of a tenant the policy names; none for any other tenant.
    pub fn tenant(&self, tenant: &str) -> Option<&TenantCounters> {
        self.tenants.get(tenant)
    }
}
