//! Offline replay: a recorded trace driven through the engine the filter runs, on a virtual
//! clock. "What would this policy have done to this traffic?"
//!
//! Each request goes through the same steps as in Envoy, with the same functions:
//! [`plan`] (identity, classification, buckets, cost), [`rollout::scope`] (modes),
//! [`LocalTable::precheck`] (every bucket has room; a protected class borrows idle shared
//! capacity when its reserve is empty), [`rollout::judge`] (enforce or shadow) and
//! [`degrade::choose_for`] (queue, fallback route, reject). Time is the trace's: the clock
//! jumps from one request's timestamp to the next.
//!
//! **AI requests** (a path the policy's `tokens.path_prefixes` inspects) reserve their token
//! buckets as the filter does, by [`crate::ai::admit`] on the body the trace describes (its
//! `model` and `max_tokens`; no `max_tokens`: the policy's estimate), and settle at once
//! against the trace's `tokens` (the usage the response reported; absent: the reservation
//! stands) by [`crate::ai::settle`]. A limit on a model bucket tries the `cheaper_model`
//! fallback ([`crate::ai::downgrade`]) before the class's fallbacks, as the filter does.
//!
//! **Exact central accounting.** The default (and, for now, only) model counts every bucket
//! in one table, as the rate-limit service does when every decision is central. A fleet of
//! Envoys spending leases decides the same way up to the lease undershoot that
//! `docs/leases.md` bounds; the replay does not model leases, local shares or a service
//! outage (failure modes).
//!
//! **Open loop.** A trace records what was offered. A client that would have retried after a
//! 429 under the replayed policy is not invented; the figures are for the offered load.
//!
//! The [`Report`] is what `laneguard-replay --format json` prints; its shape is stable.

pub mod trace;

use crate::audit::rfc3339_ms;
use crate::card::EvidenceRecord;
use crate::degrade::{self, Step, WaitQueue};
use crate::engine::{plan, BucketKind, LocalTable, Reject};
use crate::policy::{ClassId, Mode, Policy};
use crate::rollout::{self, Verdict, Watch, DEFAULT_WATCH_TENANTS};
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use trace::{LineError, LineErrorKind, TraceRequest};

const S: u64 = 1_000_000_000;

/// How a replay runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Classes to report as lanes to watch (served %, refusal runs, overlap windows) besides
    /// the ones this policy protects. Comparing a flat cap with a layered policy needs the
    /// flat cap's report to watch the lanes the layered one protects.
    pub watch: Vec<String>,
    /// How far out of timestamp order a record may arrive and still be replayed at its own
    /// time. Envoy writes an access-log line when a request completes, so a request that
    /// waited is logged after requests that started later.
    pub reorder_ns: u64,
    /// The step of the time series, in seconds (at least 1).
    pub step_s: u64,
    /// Keep one audit-style record per replayed request ([`Report::evidence`]), for the
    /// review card (`laneguard-audit card --trace`). Off by default: it holds the whole trace.
    pub evidence: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            watch: Vec::new(),
            reorder_ns: 60 * S,
            step_s: 10,
            evidence: false,
        }
    }
}

/// A request's outcome in the replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every bucket had room (or the request's mode is `off`).
    Admitted,
    /// Enforced limit, refused with 429.
    Limited,
    /// Would have been limited; let through (shadow mode).
    ShadowLimited,
    /// Enforced limit, served by a fallback: queued, then let through.
    Queued,
    /// Enforced limit, served by a fallback: sent to the fallback route.
    Rerouted,
    /// Enforced limit on a model bucket, served by the `cheaper_model` fallback.
    Downgraded,
    /// Refused before any bucket (no valid identity).
    Rejected(Reject),
    /// An AI request refused with 400 before any bucket: its body (`max_tokens` above a
    /// token bucket's burst, or not JSON).
    BadReservation,
}

#[derive(Debug, Clone, Copy, Default)]
struct Run {
    requests: u64,
    from_ns: u64,
    to_ns: u64,
}

#[derive(Debug, Clone, Default)]
struct ClassAcc {
    offered: u64,
    admitted: u64,
    limited: u64,
    shadow_limited: u64,
    queued: u64,
    rerouted: u64,
    downgraded: u64,
    unlimited: u64,
    forged: u64,
    first_tripped: BTreeMap<String, u64>,
    near_misses: u64,
    near_miss_requests: u64,
    run: Run,
    longest: Run,
    observed: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default)]
struct TenantAcc {
    classes: BTreeMap<String, ClassAcc>,
    /// (time it reached the upstream, cost) of every request let through on the tenant's
    /// lanes: the evidence for `ceiling_ok`.
    through: Vec<(u64, u32)>,
}

#[derive(Debug, Clone, Default)]
struct OverlapAcc {
    lost: u64,
    shadow_lost: u64,
    near_misses: u64,
    active: BTreeSet<String>,
    window_ns: u64,
}

#[derive(Debug, Clone, Default)]
struct Seen {
    requests: u64,
    first_line: u64,
}

/// A record waiting in the reorder buffer, ordered by time, then by arrival.
#[derive(Debug)]
struct Queued(u64, u64, TraceRequest);

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(o.0, o.1))
    }
}

/// One replay of one policy. Feed it records with [`Replay::push`] (in any order within
/// [`Options::reorder_ns`]), report bad lines with [`Replay::bad_line`], then
/// [`Replay::finish`].
pub struct Replay<'p> {
    policy: &'p Policy,
    label: String,
    opts: Options,
    watched: Vec<bool>,
    table: LocalTable,
    watch: Watch,
    queue: WaitQueue,
    next_id: u32,
    now_ns: u64,
    buffer: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    newest_ns: u64,
    // Evidence.
    tenants: BTreeMap<String, TenantAcc>,
    overlaps: BTreeMap<(String, String, u64), OverlapAcc>,
    series: BTreeMap<String, BTreeMap<u64, Point>>,
    unknown_classes: BTreeMap<String, Seen>,
    unknown_principals: BTreeMap<String, Seen>,
    forged: BTreeMap<(String, String), Seen>,
    default_tenants: BTreeMap<String, Seen>,
    summary: TraceSummary,
    bad_examples: Vec<String>,
    /// What the request being decided did, for its evidence record.
    detail: Detail,
    evidence: Vec<EvidenceRecord>,
}

#[derive(Debug, Clone, Default)]
struct Detail {
    tenant: String,
    class: ClassId,
    class_name: String,
    forged: bool,
    lane_window_ns: u64,
    bucket: Option<String>,
    near: bool,
}

/// One step of the time series of a class (all tenants).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Point {
    /// Admitted or served by a fallback.
    pub served: u64,
    /// Refused with 429.
    pub limited: u64,
    /// Would have been refused (shadow).
    pub shadow_limited: u64,
}

/// Admitted vs limited per class over time, for plots.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Series {
    pub step_s: u64,
    /// Per class: (step start, ns since the epoch) and its counts, in time order.
    pub classes: BTreeMap<String, Vec<(u64, Point)>>,
}

const MAX_BAD_EXAMPLES: usize = 20;

impl<'p> Replay<'p> {
    /// `label` names the policy in the report (its file, usually).
    pub fn new(policy: &'p Policy, label: &str, opts: Options) -> Replay<'p> {
        let watched = policy
            .classes
            .iter()
            .map(|c| c.consequence.is_protected() || opts.watch.contains(&c.name))
            .collect();
        Replay {
            policy,
            label: label.to_string(),
            watched,
            table: LocalTable::new(usize::MAX),
            watch: Watch::new(policy.classes.len(), DEFAULT_WATCH_TENANTS),
            queue: WaitQueue::default(),
            next_id: 0,
            now_ns: 0,
            buffer: BinaryHeap::new(),
            seq: 0,
            newest_ns: 0,
            tenants: BTreeMap::new(),
            overlaps: BTreeMap::new(),
            series: BTreeMap::new(),
            unknown_classes: BTreeMap::new(),
            unknown_principals: BTreeMap::new(),
            forged: BTreeMap::new(),
            default_tenants: BTreeMap::new(),
            summary: TraceSummary::default(),
            bad_examples: Vec::new(),
            detail: Detail::default(),
            evidence: Vec::new(),
            opts: Options {
                step_s: opts.step_s.max(1),
                ..opts
            },
        }
    }

    /// A line of the trace that is not a record: counted, and the first few kept for the
    /// report.
    pub fn bad_line(&mut self, e: &LineError) {
        match e.kind {
            LineErrorKind::Malformed => {
                self.summary.malformed += 1;
                if self.bad_examples.len() < MAX_BAD_EXAMPLES {
                    self.bad_examples.push(e.to_string());
                }
            }
            LineErrorKind::NoIdentity => self.summary.no_identity += 1,
        }
    }

    /// Add a record. It is replayed once no earlier record can still arrive.
    pub fn push(&mut self, r: TraceRequest) {
        self.summary.records += 1;
        self.newest_ns = self.newest_ns.max(r.ts_ns);
        self.seq += 1;
        self.buffer.push(Reverse(Queued(r.ts_ns, self.seq, r)));
        let horizon = self.newest_ns.saturating_sub(self.opts.reorder_ns);
        while self.buffer.peek().is_some_and(|Reverse(q)| q.0 <= horizon) {
            if let Some(Reverse(Queued(_, _, r))) = self.buffer.pop() {
                self.decide(&r);
            }
        }
    }

    /// Replay what is still buffered and write the report.
    pub fn finish(mut self) -> Report {
        while let Some(Reverse(Queued(_, _, r))) = self.buffer.pop() {
            self.decide(&r);
        }
        self.report()
    }

    /// Decide one request at its time (or at the clock's, if it arrived too late).
    pub fn decide(&mut self, r: &TraceRequest) -> Outcome {
        let outcome = self.decide_one(r);
        if self.opts.evidence {
            self.record(r, outcome);
        }
        outcome
    }

    /// The request as a shadow-phase audit record ([`crate::card::EvidenceRecord`]): the
    /// replay enforces nothing, so what it would have refused is `shadow_limited` (and
    /// `degraded` where a fallback would have served it), with the status the caller got
    /// left at 200.
    fn record(&mut self, r: &TraceRequest, outcome: Outcome) {
        let mut events = match outcome {
            Outcome::Rejected(_) | Outcome::BadReservation => return,
            Outcome::Admitted => Vec::new(),
            Outcome::Limited | Outcome::ShadowLimited => vec!["shadow_limited".to_string()],
            Outcome::Queued | Outcome::Rerouted | Outcome::Downgraded => {
                vec!["shadow_limited".to_string(), "degraded".to_string()]
            }
        };
        let d = std::mem::take(&mut self.detail);
        if d.near {
            events.push("near_miss".into());
        }
        if d.forged {
            events.push("forged_class".into());
        }
        let active_classes = if events.is_empty() {
            Vec::new()
        } else {
            self.watch
                .active_with(&d.tenant, d.class, self.now_ns, d.lane_window_ns)
                .into_iter()
                .filter_map(|id| self.policy.classes.get(id).map(|c| c.name.clone()))
                .collect()
        };
        self.evidence.push(EvidenceRecord {
            id: format!("trace line {}", r.line),
            request_id: r.request_id.clone(),
            time_ns: Some(self.now_ns),
            events,
            tenant: d.tenant,
            principal: r.principal.clone(),
            declared: r.class.clone(),
            granted: d.class_name,
            forged: d.forged,
            bucket: d.bucket,
            mode: "shadow".into(),
            status: 200,
            active_classes,
        });
    }

    fn decide_one(&mut self, r: &TraceRequest) -> Outcome {
        if r.ts_ns < self.now_ns {
            self.summary.late += 1;
        }
        let now = self.now_ns.max(r.ts_ns);
        self.now_ns = now;
        if self.summary.from_ns == 0 || now < self.summary.from_ns {
            self.summary.from_ns = now;
        }
        self.summary.to_ns = self.summary.to_ns.max(now);
        // Requests whose wait is over leave the queue (they were charged when queued).
        self.queue.take_ready(now);
        let policy = self.policy;
        let mut plan = match plan(policy, &r.info()) {
            Ok(p) => p,
            Err(reject) => {
                match reject {
                    Reject::MissingIdentity => self.summary.rejected.missing_identity += 1,
                    Reject::InvalidIdentity => self.summary.rejected.invalid_identity += 1,
                    Reject::Undeclared(_) | Reject::NotDeclarable(_) => {
                        self.summary.rejected.declared += 1
                    }
                }
                return Outcome::Rejected(reject);
            }
        };
        self.summary.replayed += 1;
        if let Some(cost) = r.cost {
            plan.cost = cost;
        }
        // An AI request: the filter reads its body; the trace says what was in it.
        let mut inspected = None;
        if crate::ai::inspects(policy, &r.path) {
            let mut body = serde_json::Map::new();
            if let Some(m) = &r.model {
                body.insert("model".into(), m.clone().into());
            }
            if let Some(n) = r.max_tokens {
                body.insert("max_tokens".into(), n.into());
            }
            let body = serde_json::Value::Object(body).to_string();
            match crate::ai::admit(policy, plan, r.model.as_deref(), body.as_bytes()) {
                Ok((p, i, _)) => {
                    plan = p;
                    inspected = Some(i);
                }
                Err(e) => {
                    return match e {
                        crate::ai::AdmitError::Declared(reject) => {
                            self.summary.rejected.declared += 1;
                            Outcome::Rejected(reject)
                        }
                        _ => {
                            self.summary.rejected.tokens += 1;
                            Outcome::BadReservation
                        }
                    };
                }
            }
        }
        self.note_identity(r, &plan.tenant, plan.forged);
        let mode = rollout::scope(policy, &mut plan);
        let class = plan.class;
        let class_name = plan.class_name.clone();
        let tenant = plan.tenant.clone();
        let watched = self.watched.get(class).copied().unwrap_or(false);
        if self.opts.evidence {
            self.detail = Detail {
                tenant: tenant.clone(),
                class,
                class_name: class_name.clone(),
                forged: plan.forged,
                ..Detail::default()
            };
        }
        {
            let c = self.class_acc(&tenant, &class_name);
            c.offered += 1;
            if plan.forged {
                c.forged += 1;
            }
            if let Some(status) = r.status {
                *c.observed.entry(status.to_string()).or_default() += 1;
            }
        }
        if mode == Mode::Off {
            let c = self.class_acc(&tenant, &class_name);
            c.admitted += 1;
            c.unlimited += 1;
            c.run = Run::default();
            self.point(&class_name, now, |p| p.served += 1);
            return Outcome::Admitted;
        }
        self.watch.note(&tenant, class, now);
        let (eval, borrowing) = self.table.precheck(&plan, now, 1.0);
        let attempt = plan.attempt(borrowing);
        let lane = attempt.first().copied();
        let lane_window = lane.map_or(60 * S, |b| b.rate.window.nanos());
        let reserve = lane.is_some_and(|b| b.kind == BucketKind::Reserve);
        let pct = policy.ops.near_miss_pct;
        self.detail.lane_window_ns = lane_window;

        if eval.allowed {
            self.table.charge_costs(&plan.costed(borrowing), now);
            self.settle(&plan, r.tokens, now);
            self.through(&tenant, now, plan.cost);
            let levels = self.table.levels(&attempt, now);
            // The filter's near miss: a protected lane that had to borrow or is nearly
            // spent. A watched lane the policy does not protect: any bucket nearly spent.
            let near = if reserve {
                borrowing
                    || match (lane, levels.first()) {
                        (Some(b), Some(l)) => rollout::is_near_miss(b, l, pct),
                        _ => false,
                    }
            } else {
                watched
                    && levels
                        .iter()
                        .any(|l| rollout::used_pct(l) >= u32::from(pct))
            };
            self.detail.near = near;
            let first =
                near && reserve && self.watch.first_squeeze(&tenant, class, now, lane_window);
            let c = self.class_acc(&tenant, &class_name);
            c.admitted += 1;
            c.run = Run::default();
            if near {
                c.near_miss_requests += 1;
                if first {
                    c.near_misses += 1;
                }
            }
            if near && watched {
                self.overlap(&tenant, class, &class_name, now, lane_window, |o| {
                    o.near_misses += 1
                });
            }
            self.point(&class_name, now, |p| p.served += 1);
            return Outcome::Admitted;
        }

        let room: Vec<bool> = eval.levels.iter().map(|l| l.has_room).collect();
        let j = rollout::judge(policy, mode, &attempt, plan.family.as_deref(), &room);
        let tripped = j.bucket.or(eval.tripped).unwrap_or(0);
        let bucket = eval
            .levels
            .get(tripped)
            .map_or_else(|| "unknown".to_string(), |l| l.name.clone());
        if self.opts.evidence {
            self.detail.bucket = Some(bucket.clone());
        }
        if reserve {
            // As in the filter: a squeeze of a protected lane uses up the window's first.
            self.watch.first_squeeze(&tenant, class, now, lane_window);
        }
        *self
            .class_acc(&tenant, &class_name)
            .first_tripped
            .entry(bucket)
            .or_default() += 1;
        let tripped_bucket = attempt.get(tripped).copied();
        let cheaper = match (j.verdict, &inspected, tripped_bucket) {
            (Verdict::ShadowLimit, _, _) | (_, None, _) | (_, _, None) => None,
            (_, Some(i), Some(b)) => crate::ai::downgrade(policy, &plan, i, b),
        };
        // `cheaper_model`: the request re-planned for the cheaper model, decided afresh.
        let downgraded = cheaper.and_then(|(_, next)| {
            let (e, b) = self.table.precheck(&next, now, 1.0);
            e.allowed.then_some((next, b))
        });
        let outcome = match j.verdict {
            Verdict::ShadowLimit => Outcome::ShadowLimited,
            Verdict::Limit | Verdict::Allow if downgraded.is_some() => {
                if let Some((next, b)) = &downgraded {
                    self.table.charge_costs(&next.costed(*b), now);
                    self.settle(next, r.tokens, now);
                    self.through(&tenant, now, next.cost);
                }
                Outcome::Downgraded
            }
            Verdict::Limit | Verdict::Allow => {
                let wait_ns = degrade::wait_ns(&eval.levels);
                let depth = self.queue.depth(class);
                let step = policy.ops.class(class).map_or(
                    Step::Reject {
                        queue_refused: false,
                    },
                    |o| degrade::choose_for(o, &plan, &r.method, wait_ns, depth),
                );
                match step {
                    Step::Queue { wait_ns } => {
                        // Charged now (its place is reserved), served when the wait is over.
                        // (Never an AI request: `choose_for` does not queue one.)
                        self.table.charge_costs(&plan.costed(false), now);
                        self.next_id = self.next_id.wrapping_add(1);
                        self.queue
                            .push(self.next_id, class, now.saturating_add(wait_ns));
                        self.through(&tenant, now.saturating_add(wait_ns), plan.cost);
                        Outcome::Queued
                    }
                    Step::Route => Outcome::Rerouted,
                    // `choose` passes `cached` over (the trace cannot say what the
                    // cache held): never chosen here, a miss if it were.
                    Step::Cached | Step::Reject { .. } => Outcome::Limited,
                }
            }
        };
        let c = self.class_acc(&tenant, &class_name);
        match outcome {
            Outcome::ShadowLimited | Outcome::Limited => {
                if outcome == Outcome::Limited {
                    c.limited += 1;
                } else {
                    c.shadow_limited += 1;
                }
                if c.run.requests == 0 {
                    c.run.from_ns = now;
                }
                c.run.requests += 1;
                c.run.to_ns = now;
                if c.run.requests > c.longest.requests {
                    c.longest = c.run;
                }
            }
            Outcome::Queued => {
                c.queued += 1;
                c.run = Run::default();
            }
            Outcome::Rerouted => {
                c.rerouted += 1;
                c.run = Run::default();
            }
            Outcome::Downgraded => {
                c.downgraded += 1;
                c.run = Run::default();
            }
            Outcome::Admitted | Outcome::Rejected(_) | Outcome::BadReservation => {}
        }
        if outcome == Outcome::ShadowLimited {
            // Let through: it reached the upstream on the tenant's lanes.
            self.through(&tenant, now, plan.cost);
        }
        if watched && matches!(outcome, Outcome::Limited | Outcome::ShadowLimited) {
            let shadow = outcome == Outcome::ShadowLimited;
            self.overlap(&tenant, class, &class_name, now, lane_window, |o| {
                if shadow {
                    o.shadow_lost += 1;
                } else {
                    o.lost += 1;
                }
            });
        }
        self.point(&class_name, now, |p| match outcome {
            Outcome::Limited => p.limited += 1,
            Outcome::ShadowLimited => p.shadow_limited += 1,
            _ => p.served += 1,
        });
        outcome
    }

    /// An admitted AI request's reservation settled against the usage the trace recorded
    /// (`tokens`), on the token buckets as the filter settles its table.
    fn settle(&mut self, plan: &crate::engine::Plan, tokens: Option<u64>, now: u64) {
        let (Some(t), Some(used)) = (&plan.tokens, tokens) else {
            return;
        };
        let refs = t.refs();
        match crate::ai::settle(t.reserve, crate::ai::Usage::Tokens(used)) {
            crate::ai::Settle::Refund(n) => self.table.refund(&refs, n, now),
            crate::ai::Settle::Extra(n) => {
                let costed: Vec<_> = refs.iter().map(|b| (*b, n)).collect();
                self.table.charge_costs(&costed, now);
            }
            crate::ai::Settle::Exact | crate::ai::Settle::AtReservation(_) => {}
        }
    }

    fn class_acc(&mut self, tenant: &str, class: &str) -> &mut ClassAcc {
        self.tenants
            .entry(tenant.to_string())
            .or_default()
            .classes
            .entry(class.to_string())
            .or_default()
    }

    fn through(&mut self, tenant: &str, at_ns: u64, cost: u32) {
        self.tenants
            .entry(tenant.to_string())
            .or_default()
            .through
            .push((at_ns, cost));
    }

    fn point(&mut self, class: &str, now: u64, f: impl FnOnce(&mut Point)) {
        let step = self.opts.step_s * S;
        let at = now / step * step;
        f(self
            .series
            .entry(class.to_string())
            .or_default()
            .entry(at)
            .or_default());
    }

    fn overlap(
        &mut self,
        tenant: &str,
        class: ClassId,
        class_name: &str,
        now: u64,
        window_ns: u64,
        f: impl FnOnce(&mut OverlapAcc),
    ) {
        let names: Vec<String> = self
            .watch
            .active_with(tenant, class, now, window_ns)
            .into_iter()
            .filter_map(|id| self.policy.classes.get(id).map(|c| c.name.clone()))
            .collect();
        let key = (
            tenant.to_string(),
            class_name.to_string(),
            now / window_ns.max(1),
        );
        let o = self.overlaps.entry(key).or_default();
        o.window_ns = window_ns.max(1);
        o.active.extend(names);
        f(o);
    }

    fn note_identity(&mut self, r: &TraceRequest, tenant: &str, forged: bool) {
        let seen = |m: &mut BTreeMap<String, Seen>, k: &str| {
            let e = m.entry(k.to_string()).or_insert(Seen {
                requests: 0,
                first_line: r.line,
            });
            e.requests += 1;
        };
        let p = self.policy;
        if let Some(c) = r.class.as_deref() {
            if p.class_id(c).is_none() {
                seen(&mut self.unknown_classes, c);
            }
        }
        if !p.principals.contains_key(&r.principal) {
            seen(&mut self.unknown_principals, &r.principal);
        }
        if !p.tenant_plans.is_empty() && !p.tenant_plans.contains_key(tenant) {
            seen(&mut self.default_tenants, tenant);
        }
        if forged {
            let key = (r.principal.clone(), r.class.clone().unwrap_or_default());
            let e = self.forged.entry(key).or_insert(Seen {
                requests: 0,
                first_line: r.line,
            });
            e.requests += 1;
        }
    }

    fn report(self) -> Report {
        let policy = self.policy;
        let mut tenants = BTreeMap::new();
        let mut lanes = Vec::new();
        for (name, t) in &self.tenants {
            let plan = policy.plan_for(name);
            let ceiling = plan.ceiling;
            let window_ns = ceiling.window.nanos();
            let mut through = t.through.clone();
            through.sort_unstable();
            let (mut peak, mut peak_at, mut sum, mut start) = (0u64, 0u64, 0u64, 0usize);
            for i in 0..through.len() {
                sum += u64::from(through[i].1);
                while through[start].0 + window_ns <= through[i].0 {
                    sum -= u64::from(through[start].1);
                    start += 1;
                }
                if sum > peak {
                    peak = sum;
                    peak_at = through[i].0;
                }
            }
            let limit = u64::from(ceiling.requests.get()) + u64::from(ceiling.burst.get());
            let mut classes = BTreeMap::new();
            for (cname, c) in &t.classes {
                let served = c.offered - c.limited - c.shadow_limited;
                classes.insert(
                    cname.clone(),
                    ClassReport {
                        offered: c.offered,
                        admitted: c.admitted,
                        limited: c.limited,
                        shadow_limited: c.shadow_limited,
                        degraded: c.queued + c.rerouted + c.downgraded,
                        served_pct: pct(served, c.offered),
                        first_tripped: c.first_tripped.clone(),
                        queued: c.queued,
                        rerouted: c.rerouted,
                        downgraded: c.downgraded,
                        unlimited: c.unlimited,
                        forged: c.forged,
                        observed: c.observed.clone(),
                    },
                );
                let id = policy.class_id(cname);
                let protected = id.is_some_and(|i| policy.classes[i].consequence.is_protected());
                if id.is_some_and(|i| self.watched.get(i).copied().unwrap_or(false)) {
                    lanes.push(LaneReport {
                        tenant: name.clone(),
                        class: cname.clone(),
                        protected,
                        offered: c.offered,
                        served_pct: pct(served, c.offered),
                        limited: c.limited,
                        shadow_limited: c.shadow_limited,
                        longest_refusal: (c.longest.requests > 0).then(|| RefusalRun {
                            requests: c.longest.requests,
                            seconds: secs(c.longest.to_ns - c.longest.from_ns),
                            from: rfc3339_ms(c.longest.from_ns),
                            to: rfc3339_ms(c.longest.to_ns),
                        }),
                        near_misses: c.near_misses,
                        near_miss_requests: c.near_miss_requests,
                    });
                }
            }
            tenants.insert(
                name.clone(),
                TenantReport {
                    ceiling_ok: peak <= limit,
                    ceiling: CeilingReport {
                        per: ceiling
                            .window
                            .field()
                            .trim_start_matches("per_")
                            .to_string(),
                        requests: ceiling.requests.get(),
                        burst: ceiling.burst.get(),
                        limit,
                        peak,
                        peak_at: (peak > 0).then(|| rfc3339_ms(peak_at)),
                    },
                    plan: if policy.tenant_plans.contains_key(name) {
                        "override"
                    } else {
                        "default"
                    },
                    classes,
                },
            );
        }
        let overlap_windows = self
            .overlaps
            .iter()
            .map(|((tenant, class, idx), o)| OverlapWindow {
                tenant: tenant.clone(),
                class: class.clone(),
                from: rfc3339_ms(idx * o.window_ns),
                to: rfc3339_ms((idx + 1) * o.window_ns),
                lost: o.lost,
                shadow_lost: o.shadow_lost,
                near_misses: o.near_misses,
                active: o.active.iter().cloned().collect(),
            })
            .collect();
        let mut warnings = Vec::new();
        for (c, s) in &self.unknown_classes {
            warnings.push(Warning {
                kind: "unknown_class",
                name: c.clone(),
                requests: s.requests,
                first_line: s.first_line,
                message: format!(
                    "declared class `{c}` is not in the policy: replayed as the principal's default class"
                ),
            });
        }
        for (p, s) in &self.unknown_principals {
            warnings.push(Warning {
                kind: "unknown_principal",
                name: p.clone(),
                requests: s.requests,
                first_line: s.first_line,
                message: format!(
                    "principal `{p}` is not in `principals`: replayed in classification.default_class"
                ),
            });
        }
        for ((p, c), s) in &self.forged {
            warnings.push(Warning {
                kind: "forged_class",
                name: format!("{p}:{c}"),
                requests: s.requests,
                first_line: s.first_line,
                message: format!(
                    "principal `{p}` may not declare `{c}`: replayed in its default class"
                ),
            });
        }
        for (t, s) in &self.default_tenants {
            warnings.push(Warning {
                kind: "default_tenant",
                name: t.clone(),
                requests: s.requests,
                first_line: s.first_line,
                message: format!(
                    "tenant `{t}` is not in tenants.overrides: replayed under tenants.default"
                ),
            });
        }
        let series = Series {
            step_s: self.opts.step_s,
            classes: self
                .series
                .iter()
                .map(|(c, pts)| (c.clone(), pts.iter().map(|(t, p)| (*t, *p)).collect()))
                .collect(),
        };
        let mut summary = self.summary;
        summary.malformed_lines = self.bad_examples;
        summary.from = (summary.from_ns > 0).then(|| rfc3339_ms(summary.from_ns));
        summary.to = (summary.to_ns > 0).then(|| rfc3339_ms(summary.to_ns));
        summary.seconds = secs(summary.to_ns.saturating_sub(summary.from_ns));
        Report {
            policy: self.label,
            model: "exact_central",
            trace: summary,
            tenants,
            protected: lanes,
            overlap_windows,
            warnings,
            series,
            evidence: self.evidence,
        }
    }
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 100.0;
    }
    (part as f64 * 10_000.0 / whole as f64).round() / 100.0
}

fn secs(ns: u64) -> f64 {
    (ns as f64 / 1e6).round() / 1e3
}

/// Everything a replay found. Serialised, this is `laneguard-replay --format json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The policy's label (its file).
    pub policy: String,
    /// The accounting model: `exact_central`.
    pub model: &'static str,
    pub trace: TraceSummary,
    pub tenants: BTreeMap<String, TenantReport>,
    /// Per protected (or watched) class of each tenant.
    pub protected: Vec<LaneReport>,
    /// The lane windows in which a protected (or watched) class lost or nearly lost budget,
    /// with the other classes of the tenant active then.
    pub overlap_windows: Vec<OverlapWindow>,
    pub warnings: Vec<Warning>,
    /// Not in the JSON (it would dwarf it): the HTML report plots it.
    #[serde(skip)]
    pub series: Series,
    /// One record per replayed request, with [`Options::evidence`]; not in the JSON.
    #[serde(skip)]
    pub evidence: Vec<EvidenceRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TraceSummary {
    /// Records read.
    pub records: u64,
    /// Records decided (the rest were refused before any bucket: see `rejected`).
    pub replayed: u64,
    /// Lines that are not records (named in `malformed_lines`, the first 20).
    pub malformed: u64,
    pub malformed_lines: Vec<String>,
    /// Access-log lines of requests refused before laneguard (no identity).
    pub no_identity: u64,
    pub rejected: Rejected,
    /// Records that arrived later than the reorder window allows: replayed at the clock's time.
    pub late: u64,
    pub from: Option<String>,
    pub to: Option<String>,
    pub seconds: f64,
    #[serde(skip)]
    pub from_ns: u64,
    #[serde(skip)]
    pub to_ns: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Rejected {
    pub missing_identity: u64,
    pub invalid_identity: u64,
    /// Refused by the rule for declared purposes and models (`crate::declared`): no value
    /// and no default, or a value the principal may not use under `unknown: refuse`.
    pub declared: u64,
    /// AI requests the filter answers 400 for their reservation (`max_tokens` above a token
    /// bucket's burst, `crate::ai::TokenReject`).
    pub tokens: u64,
}

impl Rejected {
    pub fn total(&self) -> u64 {
        self.missing_identity + self.invalid_identity + self.declared + self.tokens
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantReport {
    /// Nothing the tenant sent through its lanes exceeded the ceiling (`limit`: its rate plus
    /// its burst) in any window of the ceiling's length.
    pub ceiling_ok: bool,
    pub ceiling: CeilingReport,
    /// `override` (in tenants.overrides) or `default`.
    pub plan: &'static str,
    pub classes: BTreeMap<String, ClassReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CeilingReport {
    pub per: String,
    pub requests: u32,
    pub burst: u32,
    pub limit: u64,
    /// The most cost let through in one window.
    pub peak: u64,
    pub peak_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassReport {
    pub offered: u64,
    /// Every bucket had room (or the class is `off`: see `unlimited`).
    pub admitted: u64,
    /// Refused with 429.
    pub limited: u64,
    /// Would have been refused; let through.
    pub shadow_limited: u64,
    /// Limited, then served by a fallback: `queued` + `rerouted` + `downgraded`.
    pub degraded: u64,
    /// What enforcement would serve: (offered − limited − shadow_limited) / offered.
    pub served_pct: f64,
    /// The bucket named for each limited, shadow-limited or degraded request.
    pub first_tripped: BTreeMap<String, u64>,
    pub queued: u64,
    pub rerouted: u64,
    /// Served by the `cheaper_model` fallback (AI requests).
    pub downgraded: u64,
    pub unlimited: u64,
    pub forged: u64,
    /// The statuses the trace recorded (access logs), when it has them.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub observed: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LaneReport {
    pub tenant: String,
    pub class: String,
    /// Protected by this policy (a reserve); false for a class only watched.
    pub protected: bool,
    pub offered: u64,
    pub served_pct: f64,
    pub limited: u64,
    pub shadow_limited: u64,
    /// The longest run of consecutive refusals (limited or shadow-limited) of this class.
    pub longest_refusal: Option<RefusalRun>,
    /// Near misses as the filter counts them: once per tenant and lane window.
    pub near_misses: u64,
    /// Admitted requests that were near misses.
    pub near_miss_requests: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefusalRun {
    pub requests: u64,
    pub seconds: f64,
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OverlapWindow {
    pub tenant: String,
    pub class: String,
    pub from: String,
    pub to: String,
    pub lost: u64,
    pub shadow_lost: u64,
    pub near_misses: u64,
    /// The tenant's other classes active within the lane's window.
    pub active: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    pub kind: &'static str,
    pub name: String,
    pub requests: u64,
    pub first_line: u64,
    pub message: String,
}

/// A trace as the review card's evidence (`laneguard-audit card --trace`).
#[derive(Debug, Clone, Default)]
pub struct TraceEvidence {
    /// One record per replayed request, named `trace line N` ([`Options::evidence`]).
    pub records: Vec<EvidenceRecord>,
    /// The first and the last request's time: the period the trace observed.
    pub observed: Option<(u64, u64)>,
    /// Lines that are not records (the first 20, then how many more).
    pub problems: Vec<String>,
    /// What the evidence is, for the card's notes.
    pub note: String,
}

/// Replay a trace against `policy` as a would-have-been-throttled phase: nothing is
/// enforced, so every request the policy would have refused is a `shadow_limited` record.
/// An I/O error ends the trace and is returned.
pub fn trace_evidence<R: std::io::BufRead>(
    policy: &Policy,
    label: &str,
    reader: trace::Reader<R>,
) -> Result<TraceEvidence, std::io::Error> {
    let opts = Options {
        evidence: true,
        ..Options::default()
    };
    let mut replay = Replay::new(policy, label, opts);
    let mut problems = Vec::new();
    let mut malformed = 0usize;
    for item in reader {
        match item {
            trace::Item::Request(r) => replay.push(r),
            trace::Item::Bad(e) => {
                if e.kind == LineErrorKind::Malformed {
                    malformed += 1;
                    if problems.len() < MAX_BAD_EXAMPLES {
                        problems.push(format!("trace {label}: {e}"));
                    }
                }
                replay.bad_line(&e);
            }
            trace::Item::Io(e) => return Err(e),
        }
    }
    if malformed > MAX_BAD_EXAMPLES {
        problems.push(format!(
            "trace {label}: {} more malformed lines",
            malformed - MAX_BAD_EXAMPLES
        ));
    }
    let report = replay.finish();
    let t = &report.trace;
    let observed = (t.replayed > 0).then_some((t.from_ns, t.to_ns));
    let note = format!(
        "trace {label}: {} requests replayed against the policy (exact central accounting) as a would-have-been-throttled phase, {} .. {}",
        t.replayed,
        t.from.as_deref().unwrap_or("-"),
        t.to.as_deref().unwrap_or("-")
    );
    Ok(TraceEvidence {
        records: report.evidence,
        observed,
        problems,
        note,
    })
}

#[cfg(test)]
mod tests;
