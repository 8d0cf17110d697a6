//! Phase 4: the outcome. Allow (with the rate-limit headers), or judge a limit under the
//! rollout: shadow, or enforce through the class's fallbacks (queue, fallback route, 429).
//! Near misses, forged classes and limits leave an audit record.

use super::{DecidedBy, Request};
use crate::audit;
use crate::host::{Action, Host};
use crate::root::Queued;
use laneguard_core::audit::{Caller, Event, Record};
use laneguard_core::degrade::{self, Step};
use laneguard_core::engine::{Evaluation, Level};
use laneguard_core::headers::{limited_body, rate_limit_headers};
use laneguard_core::policy::Fallback;
use laneguard_core::rollout;
use laneguard_core::usage::Admission;
use laneguard_core::{Bucket, BucketKind, Plan};
use std::rc::Rc;

/// A request judged limited, whose answer waits on a second decision.
pub(super) struct Limited {
    plan: Plan,
    eval: Evaluation,
    tripped: usize,
    borrowing: bool,
}

impl Limited {
    /// The verdict again, as decided by the second decision's path.
    fn verdict(&self, by: DecidedBy) -> Verdict<'_> {
        Verdict {
            plan: &self.plan,
            eval: &self.eval,
            tripped: self.tripped,
            by,
            borrowing: self.borrowing,
        }
    }
}

/// A limited request as judged: its plan, the evaluation, the bucket that tripped (an
/// index into the attempt), the path that decided, and whether it was the borrowing
/// attempt. Every outcome of a limit (shadow, enforce, cheaper model, the fallbacks)
/// starts from one.
#[derive(Clone, Copy)]
pub(super) struct Verdict<'a> {
    pub(super) plan: &'a Plan,
    pub(super) eval: &'a Evaluation,
    pub(super) tripped: usize,
    pub(super) by: DecidedBy,
    pub(super) borrowing: bool,
}

impl<'a> Verdict<'a> {
    /// The buckets the decision drew on (the borrow in the lane's place when borrowing).
    pub(super) fn attempt(&self) -> Vec<&'a Bucket> {
        self.plan.attempt(self.borrowing)
    }

    /// The bucket that tripped, when known.
    pub(super) fn tripped_bucket(&self) -> Option<&'a Bucket> {
        self.attempt().get(self.tripped).copied()
    }

    /// The tripped bucket's name as the evaluation reports it.
    pub(super) fn bucket_name(&self) -> Option<String> {
        self.eval.levels.get(self.tripped).map(|l| l.name.clone())
    }

    /// Kept for a second decision (see [`Then`]).
    fn limited(&self) -> Limited {
        Limited {
            plan: self.plan.clone(),
            eval: self.eval.clone(),
            tripped: self.tripped,
            borrowing: self.borrowing,
        }
    }
}

/// A request the `cached` fallback sent to the cache-only route: what to answer once the
/// route's response shows whether the cache had it ([`Request::cache_answered`]).
pub(super) struct CachedAttempt {
    pub(super) rec: Record,
    /// The 429 a miss gets.
    reject_body: String,
    reject_headers: Vec<(&'static str, String)>,
    retry_after_s: u64,
    /// Tenant and class, to count a miss's 429 in the usage tally.
    usage: (String, String),
}

/// What a second decision is for, and what its outcome means. The second plan is decided
/// like any other (lease, local mirror, central call, failure mode); its admission ends in
/// [`Request::allow`], its refusal in [`Request::over`], which read this.
pub(super) enum Then {
    /// Only shadow rules lacked room: the enforced part of the plan
    /// ([`rollout::enforced_part`]) is being paid. Admitted: the shadow outcome (let
    /// through, marked). Refused: limited by the enforced bucket, as itself.
    Shadow(Limited),
    /// The class's fallback route was chosen: its own budget ([`degrade::route_plan`]) is
    /// being paid. Admitted: routed. Refused: the fallbacks after the route.
    Route(Limited),
}

impl Request {
    pub(super) fn allow(
        &mut self,
        h: &dyn Host,
        plan: &Plan,
        mut levels: Vec<Level>,
        by: DecidedBy,
        borrowed: bool,
        now: u64,
    ) -> Action {
        // Admitted, whatever the outcome below (shadow or routed included): the ledger
        // counts it by the path that paid for it.
        let how = match by {
            DecidedBy::Local => Admission::Leased,
            DecidedBy::Central => Admission::Central,
            DecidedBy::Degraded(_) => Admission::Degraded,
        };
        self.shared.note_usage(plan, how, now);
        match self.then.take() {
            Some(Then::Shadow(l)) => return self.shadow(h, l.verdict(by)),
            Some(Then::Route(l)) => return self.finish(h, Step::Route, l.verdict(by)),
            None => {}
        }
        let shared = Rc::clone(&self.shared);
        let m = &shared.metrics;
        shared
            .table
            .borrow()
            .add_leases(&mut levels, &plan.attempt(borrowed), now);
        let levels = levels.as_slice();
        self.reserved(h, plan);
        m.allowed.inc();
        if let Some(c) = m.class(plan.class) {
            c.allowed.inc();
        }
        if let Some(t) = m.tenant(&plan.tenant) {
            t.allowed.inc();
        }
        match by {
            DecidedBy::Local => m.decided_local.inc(),
            DecidedBy::Central => m.decided_central.inc(),
            DecidedBy::Degraded(_) => {}
        }
        self.response_headers = rate_limit_headers(levels, shared.policy.draft03_headers);
        if let DecidedBy::Degraded(reason) = by {
            self.response_headers
                .push(("x-laneguard-degraded", reason.to_string()));
        }
        // A protected lane that had to borrow, or is nearly spent, is a near miss.
        let mut events = Vec::new();
        let mut active = Vec::new();
        if let Some(lane) = plan
            .buckets
            .first()
            .filter(|b| b.kind == BucketKind::Reserve)
        {
            let pct = shared.policy.ops.near_miss_pct;
            let near = borrowed
                || levels
                    .first()
                    .is_some_and(|l| rollout::is_near_miss(lane, l, pct));
            if near {
                let (first, names) = self.squeeze(h, plan);
                if first {
                    active = names;
                    m.near_miss.inc(h);
                    if let Some(c) = m.class(plan.class) {
                        c.near_miss.inc(h);
                    }
                    events.push(Event::NearMiss);
                }
            }
        }
        if plan.forged {
            events.push(Event::ForgedClass);
        }
        if !events.is_empty() {
            let attempt = plan.attempt(borrowed);
            let mut rec = self.record(h, events, plan, levels, &attempt, by);
            rec.active_classes = active;
            self.emit(h, rec);
        }
        Action::Continue
    }

    /// A protected lane was squeezed (near miss or limit): the other classes of the tenant
    /// active within the lane's window are the collision evidence, counted once per window.
    /// Returns whether this is the window's first squeeze, and the active classes' names.
    fn squeeze(&self, h: &dyn Host, plan: &Plan) -> (bool, Vec<String>) {
        let Some(lane) = plan
            .buckets
            .first()
            .filter(|b| b.kind == BucketKind::Reserve)
        else {
            return (false, Vec::new());
        };
        let shared = &self.shared;
        let now = h.now_ns();
        let window = lane.rate.window.nanos();
        let mut watch = shared.watch.borrow_mut();
        let active = watch.active_with(&plan.tenant, plan.class, now, window);
        let first = watch.first_squeeze(&plan.tenant, plan.class, now, window);
        if first {
            if let Some(c) = shared.metrics.class(plan.class) {
                for &other in &active {
                    if let Some(counter) = c.collisions.get(other) {
                        counter.inc(h);
                    }
                }
            }
        }
        let names = active
            .iter()
            .filter_map(|&id| shared.policy.classes.get(id).map(|c| c.name.clone()))
            .collect();
        (first, names)
    }

    /// An audit record for this request.
    pub(super) fn record(
        &self,
        h: &dyn Host,
        mut events: Vec<Event>,
        plan: &Plan,
        levels: &[Level],
        attempt: &[&Bucket],
        by: DecidedBy,
    ) -> Record {
        let p = &self.shared.policy;
        let mode = self.mode();
        if plan.forged && !events.contains(&Event::ForgedClass) {
            events.push(Event::ForgedClass);
        }
        // Read only when a record is written: most requests never need it.
        let request_id = h.request_header("x-request-id");
        let caller = Caller {
            request_id: request_id.as_deref(),
            method: &self.ctx.method,
            path: &self.ctx.path,
        };
        let levels = laneguard_core::audit::levels(levels, attempt, |b| {
            rollout::effective_bucket_mode(p, mode, b, plan.family.as_deref())
        });
        let mut rec = Record::new(h.now_ns(), events, plan, &caller, mode, by.path(), levels);
        rec.degraded_reason = by.reason().map(str::to_string);
        rec
    }

    /// Put a record in the access log's filter state and in the outbox to the service.
    pub(super) fn emit(&self, h: &dyn Host, rec: Record) {
        let json = rec.to_json();
        let m = &self.shared.metrics;
        m.audit_records.inc(h);
        // A missing access-log field must never fail the request.
        let _ = h.set_filter_state(audit::FILTER_STATE, json.as_bytes());
        let audit = &self.shared.policy.ops.audit;
        if audit.ship && !self.shared.audit.borrow_mut().push(json) {
            m.audit_dropped.inc(h);
        }
    }

    /// The request's buckets lack room: judge it under its rollout mode.
    pub(super) fn over(
        &mut self,
        h: &dyn Host,
        plan: &Plan,
        eval: &Evaluation,
        by: DecidedBy,
        borrowing: bool,
    ) -> Action {
        let paying_part = match self.then.take() {
            Some(Then::Route(l)) => {
                // The fallback route's own budget has no room: the fallbacks after it.
                let step = self.next_step(&l.plan, &l.eval, true);
                return self.finish(h, step, l.verdict(by));
            }
            // The enforced part of a shadow limit has no room: judged as itself below.
            Some(Then::Shadow(_)) => true,
            None => false,
        };
        let attempt = plan.attempt(borrowing);
        let room: Vec<bool> = eval.levels.iter().map(|l| l.has_room).collect();
        let j = rollout::judge(
            &self.shared.policy,
            self.mode(),
            &attempt,
            plan.family.as_deref(),
            &room,
        );
        let v = Verdict {
            plan,
            eval,
            tripped: j.bucket.or(eval.tripped).unwrap_or(0),
            by,
            borrowing,
        };
        match j.verdict {
            rollout::Verdict::ShadowLimit => {
                // A shadow rule never weakens an enforced one: an enforced request still
                // pays every enforced bucket, and is limited when one of them has no room.
                let part = (!paying_part)
                    .then(|| rollout::enforced_part(&self.shared.policy, self.mode(), plan))
                    .flatten();
                match part {
                    Some(part) => {
                        self.then = Some(Then::Shadow(v.limited()));
                        self.decide_again(h, part, by)
                    }
                    None => self.shadow(h, v),
                }
            }
            // `Allow` cannot happen for an evaluation without room; refuse rather than guess.
            rollout::Verdict::Limit | rollout::Verdict::Allow => self.enforce(h, v),
        }
    }

    /// Decide a second plan for a limited request (see [`Then`]): through the failure mode
    /// when the first decision was degraded (the service is not answering), else through
    /// the same paths as any request (lease, local mirror, central call).
    fn decide_again(&mut self, h: &dyn Host, plan: Plan, by: DecidedBy) -> Action {
        match by {
            DecidedBy::Degraded(reason) => self.decide_degraded(h, &plan, reason),
            DecidedBy::Local | DecidedBy::Central => {
                let now = h.now_ns();
                self.fast_path(h, plan, now)
            }
        }
    }

    fn count_limit(
        &self,
        h: &dyn Host,
        plan: &Plan,
        kind: Option<BucketKind>,
        shadow: bool,
        by: DecidedBy,
    ) {
        let m = &self.shared.metrics;
        let pick =
            |l: crate::metrics::Counter, s: crate::metrics::Counter| if shadow { s } else { l };
        pick(m.limited, m.shadow_limited).inc(h);
        if let Some(c) = m.class(plan.class) {
            pick(c.limited, c.shadow_limited).inc(h);
            if let Some(k) = kind {
                let b = c.budget(k);
                pick(b.limited, b.shadow_limited).inc(h);
            }
        }
        if let Some(t) = m.tenant(&plan.tenant) {
            pick(t.limited, t.shadow_limited).inc(h);
        }
        if by == DecidedBy::Local {
            m.decided_local.inc();
        }
    }

    /// Would have been limited: let it through, with the headers and a record.
    fn shadow(&mut self, h: &dyn Host, v: Verdict<'_>) -> Action {
        let Verdict { plan, eval, by, .. } = v;
        let attempt = v.attempt();
        self.count_limit(h, plan, v.tripped_bucket().map(|b| b.kind), true, by);
        let bucket = v.bucket_name();
        let (_, active) = self.squeeze(h, plan);
        let mut headers = rate_limit_headers(&eval.levels, self.shared.policy.draft03_headers);
        headers.push((
            "x-laneguard-shadow-limited",
            bucket.clone().unwrap_or_default(),
        ));
        if let DecidedBy::Degraded(reason) = by {
            headers.push(("x-laneguard-degraded", reason.to_string()));
        }
        self.response_headers = headers;
        let mut rec = self.record(
            h,
            vec![Event::ShadowLimited],
            plan,
            &eval.levels,
            &attempt,
            by,
        );
        rec.bucket = bucket;
        rec.active_classes = active;
        rec.retry_after_s = Some(degrade::retry_after_s(&eval.levels));
        self.emit(h, rec);
        Action::Continue
    }

    /// Limited: the class's fallbacks, in order, before the 429.
    fn enforce(&mut self, h: &dyn Host, v: Verdict<'_>) -> Action {
        if let Some(action) = self.try_cheaper(h, v) {
            return action;
        }
        let Verdict { plan, eval, by, .. } = v;
        let shared = Rc::clone(&self.shared);
        self.count_limit(h, plan, v.tripped_bucket().map(|b| b.kind), false, by);
        let step = self.next_step(plan, eval, false);
        if step == Step::Route {
            // The fallback route has its own budget: pay it first (see [`Then::Route`]).
            let route = degrade::route_plan(&shared.policy, plan);
            self.then = Some(Then::Route(v.limited()));
            return self.decide_again(h, route, by);
        }
        self.finish(h, step, v)
    }

    /// The class's fallback for a limited request: the first that applies, or (once the
    /// fallback route's budget had no room) the first after `fallback_route`.
    fn next_step(&self, plan: &Plan, eval: &Evaluation, after_route: bool) -> Step {
        let wait_ns = degrade::wait_ns(&eval.levels);
        let depth = self.shared.queue.borrow().depth(plan.class);
        self.shared.policy.ops.class(plan.class).map_or(
            Step::Reject {
                queue_refused: false,
            },
            |o| {
                let method = &self.ctx.method;
                if after_route {
                    degrade::choose_after_route(o, plan, method, wait_ns, depth)
                } else {
                    degrade::choose_for(o, plan, method, wait_ns, depth)
                }
            },
        )
    }

    /// Carry out the fallback chosen for a limited request: queue, route, or 429.
    fn finish(&mut self, h: &dyn Host, step: Step, v: Verdict<'_>) -> Action {
        let Verdict {
            plan,
            eval,
            by,
            borrowing,
            ..
        } = v;
        let shared = Rc::clone(&self.shared);
        let m = &shared.metrics;
        let attempt = v.attempt();
        let (_, active) = self.squeeze(h, plan);
        let now = h.now_ns();
        let ops = shared.policy.ops.class(plan.class);
        let fallback = step.fallback();
        m.fallback.get(fallback).inc(h);
        if let Some(c) = m.class(plan.class) {
            c.fallback.get(fallback).inc(h);
        }
        let bucket = v.bucket_name();
        let mut events = vec![Event::Limited];
        if !matches!(step, Step::Reject { .. }) {
            events.push(Event::Degraded);
        }
        let draft03 = shared.policy.draft03_headers;
        let mut rec = self.record(h, events, plan, &eval.levels, &attempt, by);
        rec.bucket = bucket;
        rec.fallback = Some(fallback.as_str());
        rec.active_classes = active;
        let degraded = |hs: &mut Vec<(&'static str, String)>| {
            if let DecidedBy::Degraded(reason) = by {
                hs.push(("x-laneguard-degraded", reason.to_string()));
            }
        };
        // The 429 (`reject`, and a `cached` miss): Retry-After, headers, body.
        let the_429 = |rec: &Record| {
            let retry = degrade::retry_after_s(&eval.levels);
            let mut hs = rate_limit_headers(&eval.levels, draft03);
            hs.push(("retry-after", retry.to_string()));
            hs.push((
                "x-laneguard-fallback",
                Fallback::Reject.as_str().to_string(),
            ));
            degraded(&mut hs);
            let body = limited_body(
                &plan.tenant,
                &plan.class_name,
                rec.bucket.as_deref().unwrap_or_default(),
                retry,
                by.as_str(),
                rec.request_id.as_deref(),
            );
            (retry, hs, body)
        };
        match step {
            Step::Queue { wait_ns } => {
                // Reserve the request's place: charge now, go when the charge conforms. A
                // request refused only by the pace of this worker's lease is promised the
                // lease's next free slot instead, if that comes within the queue's longest
                // wait: released then without asking the service (which leased that room
                // to this worker), and no later request takes the same slot.
                let max_wait_ns = ops.map_or(0, |o| u64::from(o.queue.max_wait_ms) * 1_000_000);
                let (levels, wait_ns, promised) = {
                    let mut table = shared.table.borrow_mut();
                    let promised = table.promise(&attempt, plan.cost, now, max_wait_ns);
                    table.charge_costs(&plan.costed(borrowing), now);
                    (
                        table.levels(&attempt, now),
                        promised.unwrap_or(wait_ns),
                        promised.is_some(),
                    )
                };
                // Paid when it is released, by a lease or a central decision (the root
                // tick: `Root::resume_queued`), like any admission.
                shared.queued.borrow_mut().insert(
                    self.context_id,
                    Queued {
                        plan: plan.clone(),
                        borrowing,
                        promised,
                    },
                );
                shared.queue.borrow_mut().push(
                    self.context_id,
                    plan.class,
                    now.saturating_add(wait_ns),
                );
                self.queued = true;
                let wait_ms = wait_ns.div_ceil(1_000_000);
                let mut hs = rate_limit_headers(&levels, draft03);
                hs.push(("x-laneguard-fallback", fallback.as_str().to_string()));
                hs.push(("x-laneguard-queued-ms", wait_ms.to_string()));
                degraded(&mut hs);
                self.response_headers = hs;
                rec.wait_ms = Some(wait_ms);
                self.emit(h, rec);
                Action::Pause
            }
            Step::Route => {
                if let Some(o) = ops {
                    let r = &o.fallback_route;
                    h.set_request_header(&r.header, &r.value);
                }
                let mut hs = rate_limit_headers(&eval.levels, draft03);
                hs.push(("x-laneguard-fallback", fallback.as_str().to_string()));
                degraded(&mut hs);
                self.response_headers = hs;
                self.emit(h, rec);
                Action::Continue
            }
            Step::Cached => {
                // Answered by Envoy's cache on the cache-only route, or the 429 on a miss:
                // the response tells which ([`Request::cache_answered`]).
                if let Some(o) = ops {
                    h.set_request_header(&o.cache.header, &o.cache.value);
                }
                h.set_request_header("cache-control", "only-if-cached");
                let mut hs = rate_limit_headers(&eval.levels, draft03);
                hs.push(("x-laneguard-fallback", fallback.as_str().to_string()));
                degraded(&mut hs);
                let (retry, reject_headers, reject_body) = the_429(&rec);
                self.response_headers = hs;
                self.cached = Some(Box::new(CachedAttempt {
                    rec,
                    reject_body,
                    reject_headers,
                    retry_after_s: retry,
                    usage: (plan.tenant.clone(), plan.class_name.clone()),
                }));
                Action::Continue
            }
            Step::Reject { .. } => {
                shared.note_usage(plan, Admission::Refused, now);
                let (retry, hs, body) = the_429(&rec);
                rec.status = 429;
                rec.retry_after_s = Some(retry);
                self.emit(h, rec);
                self.reply(h, 429, &body, &hs);
                Action::Pause
            }
        }
    }

    /// The response of a request the `cached` fallback sent to the cache-only route. A
    /// response from a cache carries `Age` (RFC 9111 4); Envoy's cache filter adds it to
    /// every response it serves. Anything else is the route's miss (nothing reached the
    /// upstream): it is replaced by the 429 that `reject` would have sent.
    pub(super) fn cache_answered(&mut self, h: &dyn Host) -> Action {
        let Some(c) = self.cached.take() else {
            return Action::Continue;
        };
        let CachedAttempt {
            mut rec,
            reject_body,
            reject_headers,
            retry_after_s,
            usage,
        } = *c;
        let m = &self.shared.metrics;
        if h.response_header("age").is_some() {
            m.cache_hit.inc(h);
            rec.status = 200;
            self.emit(h, rec);
            return Action::Continue;
        }
        m.cache_miss.inc(h);
        let (tenant, class) = &usage;
        self.shared
            .usage
            .borrow_mut()
            .note(tenant, class, Admission::Refused, 1, h.now_ns());
        self.response_headers.clear();
        rec.events.retain(|e| *e != Event::Degraded);
        rec.fallback = Some(Fallback::Reject.as_str());
        rec.status = 429;
        rec.retry_after_s = Some(retry_after_s);
        self.emit(h, rec);
        self.reply(h, 429, &reject_body, &reject_headers);
        Action::Pause
    }
}
