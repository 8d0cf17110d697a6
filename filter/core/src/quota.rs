//! Quota assignments for Envoy's native `envoy.filters.http.rate_limit_quota` filter (RLQS).
//!
//! Envoy keeps one token bucket per `bucket_id` (a string map its `bucket_id_builder` builds
//! from the request, here `tenant` and `class`), reports each bucket's allowed and denied
//! counts every few seconds on a bidirectional stream, and enforces whatever the server
//! assigns. The service is a thin shell around [`QuotaBook`]: it feeds it every usage report
//! with `now_ns` and sends back the [`Action`]s it returns. Every rule lives here:
//!
//! - a bucket maps onto the laneguard policy by [`resolve`]: its tenant's plan and its class,
//!   with the same classification rule as the Wasm filter when the bucket also carries the
//!   `principal` (a class the principal may not declare is refused);
//! - per tenant, a protected class gets its reserved lane and the unprotected classes share
//!   the pool left under the ceiling (`ceiling - reserves`), each at most its budget, by
//!   max-min fairness over their reported demand ([`waterfill`]); a class's rate is split over
//!   every Envoy that reports the bucket the same way. So at assignment time the fleet's total
//!   stays within the tenant ceiling and no unprotected class can reach a reserve;
//! - an Envoy applies a *changed* token bucket full, so a share that grows by less than
//!   [`QuotaSettings::raise_step`] keeps the old bucket (shrinking always applies: the sum
//!   bound must hold);
//! - a bucket the policy refuses gets `DENY_ALL`; one that reports no traffic for
//!   [`QuotaSettings::idle_after_s`] is abandoned (Envoy erases it); every assignment carries
//!   a TTL, after which a stale Envoy applies its `expired_assignment_behavior`.
//!
//! What RLQS cannot express (one bucket per request, no per-request cost, no borrowing
//! signal) is in `docs/rlqs.md`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::classify::classify;
use crate::policy::{ClassId, Policy};
use crate::rate::Rate;

/// The `bucket_id` keys the service reads. Other keys are kept (they make separate buckets
/// that share their class's rate) but do not change the lane.
pub const TENANT_KEY: &str = "tenant";
pub const CLASS_KEY: &str = "class";
pub const PRINCIPAL_KEY: &str = "principal";

/// A bucket as Envoy's `bucket_id_builder` names it (key order does not matter).
pub type BucketId = BTreeMap<String, String>;

/// One Envoy's stream, numbered by the service.
pub type StreamId = u64;

/// Envoy's `envoy.type.v3.TokenBucket`: `tokens_per_fill` every `fill_interval_s`, at most
/// `max_tokens` held. Envoy refills continuously at `tokens_per_fill / fill_interval_s` and
/// reads the interval in whole seconds, so it is at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval_s: u32,
}

impl TokenBucket {
    /// The steady rate, requests per second.
    pub fn per_second(&self) -> f64 {
        f64::from(self.tokens_per_fill) / f64::from(self.fill_interval_s.max(1))
    }
}

/// Why a bucket is refused outright (`DENY_ALL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NoTenant,
    NoClass,
    UnknownClass(String),
    /// The bucket names a principal that may not declare this class.
    NotDeclarable {
        principal: String,
        class: String,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NoTenant => write!(f, "the bucket id has no `{TENANT_KEY}`"),
            Refusal::NoClass => write!(f, "the bucket id has no `{CLASS_KEY}`"),
            Refusal::UnknownClass(c) => write!(f, "the policy has no class {c:?}"),
            Refusal::NotDeclarable { principal, class } => {
                write!(f, "principal {principal:?} may not declare class {class:?}")
            }
        }
    }
}

/// Where a bucket lands in the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lane {
    Class { tenant: String, class: ClassId },
    Refused(Refusal),
}

/// Map a bucket id onto the policy.
pub fn resolve(policy: &Policy, id: &BucketId) -> Lane {
    let nonempty = |k: &str| id.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let Some(tenant) = nonempty(TENANT_KEY) else {
        return Lane::Refused(Refusal::NoTenant);
    };
    let Some(class_name) = nonempty(CLASS_KEY) else {
        return Lane::Refused(Refusal::NoClass);
    };
    let Some(class) = policy.class_id(class_name) else {
        return Lane::Refused(Refusal::UnknownClass(class_name.to_string()));
    };
    if let Some(principal) = nonempty(PRINCIPAL_KEY) {
        // The Wasm filter's rule: a declaration is honoured only if the principal may make
        // it. RLQS cannot move the request to the principal's default class, so it refuses.
        if classify(policy, principal, Some(class_name)).forged {
            return Lane::Refused(Refusal::NotDeclarable {
                principal: principal.to_string(),
                class: class_name.to_string(),
            });
        }
    }
    Lane::Class {
        tenant: tenant.to_string(),
        class,
    }
}

/// What the server tells one Envoy about one bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `quota_assignment_action` with a `token_bucket` strategy.
    Assign { bucket: TokenBucket, ttl_s: u32 },
    /// `quota_assignment_action` with `blanket_rule: DENY_ALL`.
    DenyAll { ttl_s: u32, reason: Refusal },
    /// `abandon_action`: the bucket went idle; Envoy erases it.
    Abandon,
}

/// The service's knobs. Envoy 1.40 reports every 5 s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuotaSettings {
    /// Assignment time to live, whole seconds (Envoy truncates to seconds). It must cover a
    /// few report intervals, or assignments lapse between refreshes.
    pub ttl_s: u32,
    /// A bucket whose reports show no request for this long is abandoned.
    pub idle_after_s: u32,
    /// A share that grows by less than this fraction keeps the previous token bucket.
    pub raise_step: f64,
}

pub const DEFAULT_TTL_S: u32 = 15;
pub const DEFAULT_IDLE_AFTER_S: u32 = 60;

impl Default for QuotaSettings {
    fn default() -> QuotaSettings {
        QuotaSettings {
            ttl_s: DEFAULT_TTL_S,
            idle_after_s: DEFAULT_IDLE_AFTER_S,
            raise_step: 0.25,
        }
    }
}

/// One bucket's line in a usage report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub bucket_id: BucketId,
    pub allowed: u64,
    pub denied: u64,
    /// `time_elapsed` since the bucket's previous report (Envoy sends whole seconds).
    pub elapsed_s: u64,
}

#[derive(Debug, Clone)]
struct Consumer {
    lane: Lane,
    /// Requests per second (allowed + denied) over the last report; `None` before one.
    demand: Option<f64>,
    last_active_ns: u64,
    last_report_ns: u64,
    sent: Option<TokenBucket>,
}

/// Totals since the book was created, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaTotals {
    pub reports: u64,
    pub allowed: u64,
    pub denied: u64,
    pub assignments: u64,
    pub denials: u64,
    pub abandons: u64,
}

/// Every (stream, bucket) the service is assigning, and what it last sent.
#[derive(Debug, Clone)]
pub struct QuotaBook {
    settings: QuotaSettings,
    consumers: HashMap<(StreamId, BucketId), Consumer>,
    totals: QuotaTotals,
}

/// An action for one bucket on one stream.
pub type Outgoing = (StreamId, BucketId, Action);

/// A consumer of one tenant: its key, class and demand.
type Member = ((StreamId, BucketId), ClassId, Option<f64>);

impl QuotaBook {
    pub fn new(settings: QuotaSettings) -> QuotaBook {
        QuotaBook {
            settings,
            consumers: HashMap::new(),
            totals: QuotaTotals::default(),
        }
    }

    pub fn settings(&self) -> QuotaSettings {
        self.settings
    }

    pub fn totals(&self) -> QuotaTotals {
        self.totals
    }

    /// How many (stream, bucket) pairs are being assigned.
    pub fn len(&self) -> usize {
        self.consumers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.consumers.is_empty()
    }

    /// One usage-report message from `stream`. Returns what to send: an action for every
    /// bucket in the message (which also refreshes its TTL), and a new assignment for every
    /// bucket on another stream whose share changed.
    pub fn report(
        &mut self,
        policy: &Policy,
        stream: StreamId,
        usages: &[Usage],
        now_ns: u64,
    ) -> Vec<Outgoing> {
        self.totals.reports += 1;
        let mut out = Vec::new();
        let mut reported = BTreeSet::new();
        let mut tenants = BTreeSet::new();
        let idle_ns = u64::from(self.settings.idle_after_s) * 1_000_000_000;
        for u in usages {
            self.totals.allowed += u.allowed;
            self.totals.denied += u.denied;
            let key = (stream, u.bucket_id.clone());
            let hits = u.allowed.saturating_add(u.denied);
            let consumer = self
                .consumers
                .entry(key.clone())
                .or_insert_with(|| Consumer {
                    lane: resolve(policy, &u.bucket_id),
                    demand: None,
                    last_active_ns: now_ns,
                    last_report_ns: now_ns,
                    sent: None,
                });
            let elapsed_s = if u.elapsed_s > 0 {
                u.elapsed_s as f64
            } else {
                now_ns.saturating_sub(consumer.last_report_ns) as f64 / 1e9
            };
            // The first report of a bucket (elapsed 0) says it exists, not how busy it is.
            if elapsed_s >= 0.5 {
                consumer.demand = Some(hits as f64 / elapsed_s);
            }
            consumer.last_report_ns = now_ns;
            if hits > 0 {
                consumer.last_active_ns = now_ns;
            }
            let idle = now_ns.saturating_sub(consumer.last_active_ns) >= idle_ns;
            let lane = consumer.lane.clone();
            if idle {
                if let Lane::Class { tenant, .. } = &lane {
                    tenants.insert(tenant.clone());
                }
                self.consumers.remove(&key);
                self.totals.abandons += 1;
                out.push((stream, u.bucket_id.clone(), Action::Abandon));
                continue;
            }
            match &lane {
                Lane::Refused(reason) => {
                    self.totals.denials += 1;
                    out.push((
                        stream,
                        u.bucket_id.clone(),
                        Action::DenyAll {
                            ttl_s: self.settings.ttl_s,
                            reason: reason.clone(),
                        },
                    ));
                }
                Lane::Class { tenant, .. } => {
                    tenants.insert(tenant.clone());
                    reported.insert(key);
                }
            }
        }
        // One pass over the book for every tenant this report touched (a report carries
        // every bucket of one Envoy, so per-tenant scans would be quadratic).
        let mut members: BTreeMap<String, Vec<Member>> = BTreeMap::new();
        for (k, c) in &self.consumers {
            if let Lane::Class { tenant, class } = &c.lane {
                if tenants.contains(tenant) {
                    members
                        .entry(tenant.clone())
                        .or_default()
                        .push((k.clone(), *class, c.demand));
                }
            }
        }
        for (tenant, members) in members {
            self.assign_tenant(policy, &tenant, members, &reported, &mut out);
        }
        out
    }

    /// `stream` closed: forget its buckets. The other streams' shares grow on their next
    /// report (growing is never urgent; shrinking is pushed at once).
    pub fn close(&mut self, stream: StreamId) {
        self.consumers.retain(|(s, _), _| *s != stream);
    }

    fn assign_tenant(
        &mut self,
        policy: &Policy,
        tenant: &str,
        mut members: Vec<Member>,
        reported: &BTreeSet<(StreamId, BucketId)>,
        out: &mut Vec<Outgoing>,
    ) {
        // Deterministic order: the allocation below is order-independent, but ties in
        // rounding and the order of the actions are not.
        members.sort_by(|a, b| a.0.cmp(&b.0));
        let demands: Vec<(ClassId, Option<f64>)> =
            members.iter().map(|(_, c, d)| (*c, *d)).collect();
        let buckets = allocate(policy, tenant, &demands);
        for ((key, _, _), computed) in members.into_iter().zip(buckets) {
            let Some(consumer) = self.consumers.get_mut(&key) else {
                continue;
            };
            let next = match consumer.sent {
                Some(prev) if keeps(prev, computed, self.settings.raise_step) => prev,
                _ => computed,
            };
            let changed = consumer.sent != Some(next);
            consumer.sent = Some(next);
            if changed || reported.contains(&key) {
                self.totals.assignments += 1;
                out.push((
                    key.0,
                    key.1,
                    Action::Assign {
                        bucket: next,
                        ttl_s: self.settings.ttl_s,
                    },
                ));
            }
        }
    }
}

/// Keep the previous bucket when the new share is larger by less than `step`: Envoy would
/// refill a changed bucket to `max_tokens` for nothing.
fn keeps(prev: TokenBucket, next: TokenBucket, step: f64) -> bool {
    prev.fill_interval_s == next.fill_interval_s
        && next.tokens_per_fill >= prev.tokens_per_fill
        && next.max_tokens >= prev.max_tokens
        && f64::from(next.tokens_per_fill) < f64::from(prev.tokens_per_fill) * (1.0 + step)
}

/// Requests per second of a rate.
fn per_second(rate: &Rate) -> f64 {
    f64::from(rate.requests.get()) / rate.window.seconds() as f64
}

/// The token buckets of one tenant's consumers, each given as (class, demand in requests
/// per second; `None` when not yet known), in the same order.
///
/// Protected classes get their reserve; unprotected classes share `ceiling - reserves`, each
/// at most its budget; within a class, the consumers share the class's rate. Both splits are
/// max-min fair over demand, and what demand leaves unused is spread evenly, so an Envoy that
/// starts sending has room before its next report. The rates of all the buckets returned
/// add up to at most the tenant's ceiling.
pub fn allocate(
    policy: &Policy,
    tenant: &str,
    consumers: &[(ClassId, Option<f64>)],
) -> Vec<TokenBucket> {
    let plan = policy.plan_for(tenant);
    let shared = per_second(&plan.shared);
    // Per class present: its demand (unknown counts as unbounded).
    let mut class_demand: BTreeMap<ClassId, f64> = BTreeMap::new();
    for (class, demand) in consumers {
        *class_demand.entry(*class).or_insert(0.0) += demand.unwrap_or(f64::INFINITY);
    }
    // The rate each class present gets, and the policy rate its burst scales from.
    let mut class_rate: BTreeMap<ClassId, (f64, Rate)> = BTreeMap::new();
    let mut pool: Vec<(ClassId, f64, f64, Rate)> = Vec::new(); // (class, want, cap, rate)
    for (&class, &demand) in &class_demand {
        let reserve = plan.reserves.get(class).copied().flatten();
        let budget = plan.budgets.get(class).copied().flatten();
        match reserve {
            Some(r) => {
                class_rate.insert(class, (per_second(&r), r));
            }
            None => {
                let rate = budget.unwrap_or(plan.shared);
                let cap = per_second(&rate).min(shared);
                pool.push((class, demand.min(cap), cap, rate));
            }
        }
    }
    let wants: Vec<f64> = pool.iter().map(|p| p.1).collect();
    let first = waterfill(shared, &wants);
    let left = (shared - first.iter().sum::<f64>()).max(0.0);
    let room: Vec<f64> = pool
        .iter()
        .zip(&first)
        .map(|(p, got)| (p.2 - got).max(0.0))
        .collect();
    let second = waterfill(left, &room);
    for (i, (class, _, _, rate)) in pool.iter().enumerate() {
        class_rate.insert(*class, (first[i] + second[i], *rate));
    }

    let mut out = vec![
        TokenBucket {
            max_tokens: 1,
            tokens_per_fill: 1,
            fill_interval_s: 60,
        };
        consumers.len()
    ];
    for (&class, &(total, rate)) in &class_rate {
        let idx: Vec<usize> = (0..consumers.len())
            .filter(|&i| consumers[i].0 == class)
            .collect();
        let wants: Vec<f64> = idx
            .iter()
            .map(|&i| consumers[i].1.unwrap_or(f64::INFINITY))
            .collect();
        let first = waterfill(total, &wants);
        let left = (total - first.iter().sum::<f64>()).max(0.0);
        let even = left / idx.len().max(1) as f64;
        let policy_rate = per_second(&rate);
        for (k, &i) in idx.iter().enumerate() {
            let share = first[k] + even;
            out[i] = token_bucket(share, share / policy_rate, &rate);
        }
    }
    out
}

/// A bucket refilling at `share` requests per second, holding `fraction` of the rate's
/// burst. The fill interval is at least a minute, so shares of small rates stay exact.
fn token_bucket(share: f64, fraction: f64, rate: &Rate) -> TokenBucket {
    let fill_interval_s = u32::try_from(rate.window.seconds().max(60)).unwrap_or(u32::MAX);
    let per_fill = (share * f64::from(fill_interval_s)).floor();
    let burst = (f64::from(rate.burst.get()) * fraction).floor();
    TokenBucket {
        max_tokens: clamp_u32(burst),
        tokens_per_fill: clamp_u32(per_fill),
        fill_interval_s,
    }
}

/// At least 1 (Envoy refuses a zero), at most `u32::MAX`.
fn clamp_u32(x: f64) -> u32 {
    if x.is_nan() || x < 1.0 {
        1
    } else if x >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        x as u32
    }
}

/// Max-min fair division of `total` among `wants`: everyone gets `min(want, level)`, with
/// the level as high as `total` allows. Never more than `total` in sum, never more than a
/// want; an infinite want takes an equal part of what the others leave.
pub fn waterfill(total: f64, wants: &[f64]) -> Vec<f64> {
    let mut got = vec![0.0; wants.len()];
    let mut order: Vec<usize> = (0..wants.len()).collect();
    order.sort_by(|&a, &b| wants[a].total_cmp(&wants[b]));
    let mut left = total.max(0.0);
    for (n, &i) in order.iter().enumerate() {
        let fair = left / (wants.len() - n) as f64;
        let take = wants[i].max(0.0).min(fair);
        got[i] = take;
        left -= take;
    }
    got
}

#[cfg(test)]
mod tests;
