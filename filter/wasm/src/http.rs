//! One request: classify, decide, respond.
//!
//! The request is decided locally when it can be; otherwise it pauses on one
//! `ShouldRateLimit` call (two, when a protected class's reserve is empty and it may borrow
//! shared capacity). Envoy enforces the call's timeout, and every way the call can fail
//! (dispatch error, unknown cluster, non-OK gRPC status, timeout, undecodable answer) goes
//! through [`Request::degrade`], which applies the class's failure mode.
//!
//! Every decision goes through the rollout (`laneguard_core::rollout`): a request whose
//! class (or tenant) is `off` is not limited at all; one whose buckets lack room is judged
//! under its mode. A shadow limit is let through with the headers and a record; an enforced
//! limit walks the class's fallbacks (`laneguard_core::degrade`): queue (charge ahead, hold
//! the request, the root tick resumes it), fallback route (set the routing header, let it
//! through), reject (429). Each of those leaves an audit record (`crate::audit`).

use crate::{audit, rls};
use crate::{now_ns, Shared};
use laneguard_core::audit::{Caller, DecisionPath, Event, Record};
use laneguard_core::degrade::{self, Step};
use laneguard_core::engine::{ceil_s, Evaluation, Level};
use laneguard_core::headers::{error_body, limited_body, rate_limit_headers};
use laneguard_core::rollout::{self, Verdict};
use laneguard_core::{plan, Bucket, BucketKind, FailureMode, LocalTable, Mode, Plan, RequestInfo};
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::{
    DescriptorStatus, Quota,
};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, Status};
use std::rc::Rc;
use std::time::Duration;

/// gRPC status codes Envoy reports for a call that did not complete.
const GRPC_DEADLINE_EXCEEDED: u32 = 4;

/// Which path made the decision, reported in headers and bodies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DecidedBy {
    Local,
    Central,
    Degraded(&'static str),
}

impl DecidedBy {
    fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Local => "local",
            DecidedBy::Central => "central",
            DecidedBy::Degraded(_) => "degraded",
        }
    }

    fn path(self) -> DecisionPath {
        match self {
            DecidedBy::Local => DecisionPath::Local,
            DecidedBy::Central => DecisionPath::Central,
            DecidedBy::Degraded(_) => DecisionPath::Degraded,
        }
    }

    fn reason(self) -> Option<&'static str> {
        match self {
            DecidedBy::Degraded(r) => Some(r),
            _ => None,
        }
    }
}

/// What the audit record needs besides the plan.
#[derive(Default)]
struct Ctx {
    method: String,
    path: String,
    mode: Option<Mode>,
}

/// A request waiting for the service.
struct Pending {
    token: u32,
    plan: Plan,
    borrowing: bool,
    started_ns: u64,
}

pub struct Request {
    shared: Rc<Shared>,
    context_id: u32,
    pending: Option<Pending>,
    /// Headers to add to the upstream's response once the request was allowed.
    response_headers: Vec<(&'static str, String)>,
    ctx: Ctx,
    /// Held by the queue fallback (until the root tick resumes it).
    queued: bool,
}

impl Request {
    pub fn new(shared: Rc<Shared>, context_id: u32) -> Request {
        Request {
            shared,
            context_id,
            pending: None,
            response_headers: Vec::new(),
            ctx: Ctx::default(),
            queued: false,
        }
    }

    fn mode(&self) -> Mode {
        self.ctx.mode.unwrap_or(Mode::Enforce)
    }

    fn header(&self, name: &str) -> Option<String> {
        self.get_http_request_header(name)
    }

    fn now(&self) -> u64 {
        now_ns(self.get_current_time())
    }

    fn start(&mut self) -> Action {
        let shared = Rc::clone(&self.shared);
        let p = &shared.policy;
        // One host call for every header (each call crosses the V8 boundary, which costs
        // more than scanning a dozen short pairs). Envoy's header names are lower case, and
        // so are the policy's (the validator lowercases them).
        let headers = self.get_http_request_headers();
        let header = |name: &str| -> Option<String> {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let tenant = header(&p.identity.tenant_header);
        let principal = header(&p.identity.principal_header);
        let user = header(&p.identity.user_header);
        let declared = header(&p.classification.header);
        let method = header(":method").unwrap_or_default();
        let path = header(":path").unwrap_or_default();
        let purpose = p.purposes.as_ref().and_then(|x| header(&x.header));
        let model = p.models.as_ref().and_then(|x| header(&x.header));
        let info = RequestInfo {
            tenant: tenant.as_deref(),
            principal: principal.as_deref(),
            user: user.as_deref(),
            declared_class: declared.as_deref(),
            method: &method,
            path: &path,
            purpose: purpose.as_deref(),
            model: model.as_deref(),
        };
        self.ctx.method.clone_from(&method);
        self.ctx.path.clone_from(&path);
        let mut plan = match plan(p, &info) {
            Ok(plan) => plan,
            Err(reject) => {
                match reject {
                    laneguard_core::Reject::MissingIdentity => {
                        shared.metrics.missing_identity.inc()
                    }
                    laneguard_core::Reject::InvalidIdentity => {
                        shared.metrics.invalid_identity.inc()
                    }
                }
                let body = error_body(reject.code(), reject.detail());
                self.reply(reject.status(), &body, &[]);
                return Action::Pause;
            }
        };
        let mode = rollout::scope(p, &mut plan);
        self.ctx.mode = Some(mode);
        if plan.forged {
            shared.metrics.forged_class.inc();
            if let Some(c) = shared.metrics.class(plan.class) {
                c.forged.inc();
            }
            log::warn!(
                "laneguard: forged class: tenant={} principal={} declared={:?} granted={}",
                plan.tenant,
                plan.principal,
                plan.declared_class.as_deref().unwrap_or(""),
                plan.class_name
            );
        }
        // The granted class, for routing (protected lanes) and for the upstream.
        self.set_http_request_header(&p.classification.granted_header, Some(&plan.class_name));

        let now = self.now();
        if mode == Mode::Off {
            // Not limited, not charged, no headers.
            shared.metrics.off.inc();
            if let Some(c) = shared.metrics.class(plan.class) {
                c.off.inc();
            }
            if plan.forged {
                let rec = self.record(vec![Event::ForgedClass], &plan, &[], &[], DecidedBy::Local);
                self.emit(rec);
            }
            return Action::Continue;
        }
        shared
            .watch
            .borrow_mut()
            .note(&plan.tenant, plan.class, now);
        let primary = plan.attempt(false);
        // Fast path 1: capacity the service leased to this worker.
        let mut table = shared.table.borrow_mut();
        if table.try_lease(&primary, plan.cost, now) {
            if table.claim_renewal(&primary, now, crate::RENEW_HORIZON_NS) {
                let set = primary.iter().map(|b| (*b).clone()).collect();
                shared.renewals.borrow_mut().push(set);
            }
            let levels = table.levels(&primary, now);
            drop(table);
            return self.allow(&plan, &levels, DecidedBy::Local, false, now);
        }
        // Fast path 2: the local mirror already shows no room, so the fleet has none either.
        let (eval, borrowing) = table.precheck(&plan, now, 1.0);
        drop(table);
        if !eval.allowed {
            return self.over(&plan, &eval, DecidedBy::Local, false);
        }
        self.ask(plan, borrowing)
    }

    /// Ask the service about one attempt. Pauses the request until the answer (or the
    /// timeout) arrives.
    fn ask(&mut self, plan: Plan, borrowing: bool) -> Action {
        let shared = Rc::clone(&self.shared);
        let svc = &shared.policy.service;
        let attempt = plan.attempt(borrowing);
        let msg = rls::encode(&svc.domain, &attempt, plan.cost);
        let now = self.now();
        let want = shared
            .table
            .borrow()
            .want(&attempt, plan.cost, now, svc.max_lease);
        let want = want.to_string();
        match self.dispatch_grpc_call(
            &svc.cluster,
            rls::SERVICE,
            rls::METHOD,
            vec![(rls::LEASE_HEADER, want.as_bytes())],
            Some(&msg),
            Duration::from_millis(u64::from(svc.timeout_ms)),
        ) {
            Ok(token) => {
                self.pending = Some(Pending {
                    token,
                    plan,
                    borrowing,
                    started_ns: now,
                });
                Action::Pause
            }
            Err(status) => {
                shared.metrics.service_error_dispatch.inc();
                let reason = if status == Status::NotFound || status == Status::BadArgument {
                    "unknown_cluster"
                } else {
                    "dispatch_failed"
                };
                log::warn!("laneguard: cannot call {:?}: {status:?}", svc.cluster);
                self.degrade(&plan, reason)
            }
        }
    }

    fn allow(
        &mut self,
        plan: &Plan,
        levels: &[Level],
        by: DecidedBy,
        borrowed: bool,
        now: u64,
    ) -> Action {
        let shared = Rc::clone(&self.shared);
        let m = &shared.metrics;
        let mut levels = levels.to_vec();
        shared
            .table
            .borrow()
            .add_leases(&mut levels, &plan.attempt(borrowed), now);
        let levels = levels.as_slice();
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
                let (first, names) = self.squeeze(plan);
                if first {
                    active = names;
                    m.near_miss.inc();
                    if let Some(c) = m.class(plan.class) {
                        c.near_miss.inc();
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
            let mut rec = self.record(events, plan, levels, &attempt, by);
            rec.active_classes = active;
            self.emit(rec);
        }
        Action::Continue
    }

    /// A protected lane was squeezed (near miss or limit): the other classes of the tenant
    /// active within the lane's window are the collision evidence, counted once per window.
    /// Returns whether this is the window's first squeeze, and the active classes' names.
    fn squeeze(&self, plan: &Plan) -> (bool, Vec<String>) {
        let Some(lane) = plan
            .buckets
            .first()
            .filter(|b| b.kind == BucketKind::Reserve)
        else {
            return (false, Vec::new());
        };
        let shared = &self.shared;
        let now = self.now();
        let window = lane.rate.window.nanos();
        let mut watch = shared.watch.borrow_mut();
        let active = watch.active_with(&plan.tenant, plan.class, now, window);
        let first = watch.first_squeeze(&plan.tenant, plan.class, now, window);
        if first {
            if let Some(c) = shared.metrics.class(plan.class) {
                for &other in &active {
                    if let Some(counter) = c.collisions.get(other) {
                        counter.inc();
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
    fn record(
        &self,
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
        let request_id = self.header("x-request-id");
        let caller = Caller {
            request_id: request_id.as_deref(),
            method: &self.ctx.method,
            path: &self.ctx.path,
        };
        let levels = laneguard_core::audit::levels(levels, attempt, |b| {
            rollout::effective_bucket_mode(p, mode, b, plan.family.as_deref())
        });
        let mut rec = Record::new(self.now(), events, plan, &caller, mode, by.path(), levels);
        rec.degraded_reason = by.reason().map(str::to_string);
        rec
    }

    /// Put a record in the access log's filter state and in the outbox to the service.
    fn emit(&self, rec: Record) {
        let json = rec.to_json();
        let m = &self.shared.metrics;
        m.audit_records.inc();
        // A missing access-log field must never fail the request.
        let _ =
            proxy_wasm::hostcalls::set_property(vec![audit::FILTER_STATE], Some(json.as_bytes()));
        let audit = &self.shared.policy.ops.audit;
        if audit.ship && !self.shared.audit.borrow_mut().push(json) {
            m.audit_dropped.inc();
        }
    }

    /// The request's buckets lack room: judge it under its rollout mode.
    fn over(&mut self, plan: &Plan, eval: &Evaluation, by: DecidedBy, borrowing: bool) -> Action {
        let attempt = plan.attempt(borrowing);
        let room: Vec<bool> = eval.levels.iter().map(|l| l.has_room).collect();
        let j = rollout::judge(
            &self.shared.policy,
            self.mode(),
            &attempt,
            plan.family.as_deref(),
            &room,
        );
        let tripped = j.bucket.or(eval.tripped).unwrap_or(0);
        match j.verdict {
            Verdict::ShadowLimit => self.shadow(plan, eval, tripped, by, borrowing),
            // `Allow` cannot happen for an evaluation without room; refuse rather than guess.
            Verdict::Limit | Verdict::Allow => self.enforce(plan, eval, tripped, by, borrowing),
        }
    }

    fn count_limit(&self, plan: &Plan, kind: Option<BucketKind>, shadow: bool, by: DecidedBy) {
        let m = &self.shared.metrics;
        let pick =
            |l: crate::metrics::Counter, s: crate::metrics::Counter| if shadow { s } else { l };
        pick(m.limited, m.shadow_limited).inc();
        if let Some(c) = m.class(plan.class) {
            pick(c.limited, c.shadow_limited).inc();
            if let Some(k) = kind {
                let b = c.budget(k);
                pick(b.limited, b.shadow_limited).inc();
            }
        }
        if let Some(t) = m.tenant(&plan.tenant) {
            pick(t.limited, t.shadow_limited).inc();
        }
        if by == DecidedBy::Local {
            m.decided_local.inc();
        }
    }

    /// Would have been limited: let it through, with the headers and a record.
    fn shadow(
        &mut self,
        plan: &Plan,
        eval: &Evaluation,
        tripped: usize,
        by: DecidedBy,
        borrowing: bool,
    ) -> Action {
        let attempt = plan.attempt(borrowing);
        self.count_limit(plan, attempt.get(tripped).map(|b| b.kind), true, by);
        let bucket = eval.levels.get(tripped).map(|l| l.name.clone());
        let (_, active) = self.squeeze(plan);
        let mut headers = rate_limit_headers(&eval.levels, self.shared.policy.draft03_headers);
        headers.push((
            "x-laneguard-shadow-limited",
            bucket.clone().unwrap_or_default(),
        ));
        if let DecidedBy::Degraded(reason) = by {
            headers.push(("x-laneguard-degraded", reason.to_string()));
        }
        self.response_headers = headers;
        let mut rec = self.record(vec![Event::ShadowLimited], plan, &eval.levels, &attempt, by);
        rec.bucket = bucket;
        rec.active_classes = active;
        rec.retry_after_s = Some(degrade::retry_after_s(&eval.levels));
        self.emit(rec);
        Action::Continue
    }

    /// Limited: the class's fallbacks, in order, before the 429.
    fn enforce(
        &mut self,
        plan: &Plan,
        eval: &Evaluation,
        tripped: usize,
        by: DecidedBy,
        borrowing: bool,
    ) -> Action {
        let shared = Rc::clone(&self.shared);
        let m = &shared.metrics;
        let attempt = plan.attempt(borrowing);
        self.count_limit(plan, attempt.get(tripped).map(|b| b.kind), false, by);
        let (_, active) = self.squeeze(plan);
        let now = self.now();
        let wait_ns = degrade::wait_ns(&eval.levels);
        let ops = shared.policy.ops.class(plan.class);
        let depth = shared.queue.borrow().depth(plan.class);
        let step = ops.map_or(
            Step::Reject {
                queue_refused: false,
            },
            |o| degrade::choose(o, wait_ns, depth),
        );
        let fallback = step.fallback();
        m.fallback.get(fallback).inc();
        if let Some(c) = m.class(plan.class) {
            c.fallback.get(fallback).inc();
        }
        let bucket = eval.levels.get(tripped).map(|l| l.name.clone());
        let mut events = vec![Event::Limited];
        if !matches!(step, Step::Reject { .. }) {
            events.push(Event::Degraded);
        }
        let draft03 = shared.policy.draft03_headers;
        let mut rec = self.record(events, plan, &eval.levels, &attempt, by);
        rec.bucket = bucket;
        rec.fallback = Some(fallback.as_str());
        rec.active_classes = active;
        let degraded = |h: &mut Vec<(&'static str, String)>| {
            if let DecidedBy::Degraded(reason) = by {
                h.push(("x-laneguard-degraded", reason.to_string()));
            }
        };
        match step {
            Step::Queue { wait_ns } => {
                // Reserve the request's place: charge now, go when the charge conforms.
                let levels = {
                    let mut table = shared.table.borrow_mut();
                    table.charge(&attempt, plan.cost, now);
                    table.levels(&attempt, now)
                };
                shared.unreported.borrow_mut().add(&attempt, plan.cost);
                shared.queue.borrow_mut().push(
                    self.context_id,
                    plan.class,
                    now.saturating_add(wait_ns),
                );
                self.queued = true;
                let wait_ms = wait_ns.div_ceil(1_000_000);
                let mut h = rate_limit_headers(&levels, draft03);
                h.push(("x-laneguard-fallback", fallback.as_str().to_string()));
                h.push(("x-laneguard-queued-ms", wait_ms.to_string()));
                degraded(&mut h);
                self.response_headers = h;
                rec.wait_ms = Some(wait_ms);
                self.emit(rec);
                Action::Pause
            }
            Step::Route => {
                if let Some(o) = ops {
                    let r = &o.fallback_route;
                    self.set_http_request_header(&r.header, Some(&r.value));
                }
                let mut h = rate_limit_headers(&eval.levels, draft03);
                h.push(("x-laneguard-fallback", fallback.as_str().to_string()));
                degraded(&mut h);
                self.response_headers = h;
                self.emit(rec);
                Action::Continue
            }
            Step::Reject { .. } => {
                let retry = degrade::retry_after_s(&eval.levels);
                let mut h = rate_limit_headers(&eval.levels, draft03);
                h.push(("retry-after", retry.to_string()));
                h.push(("x-laneguard-fallback", fallback.as_str().to_string()));
                degraded(&mut h);
                let body = limited_body(
                    &plan.tenant,
                    &plan.class_name,
                    rec.bucket.as_deref().unwrap_or_default(),
                    retry,
                    by.as_str(),
                    rec.request_id.as_deref(),
                );
                rec.status = 429;
                rec.retry_after_s = Some(retry);
                self.emit(rec);
                self.reply(429, &body, &h);
                Action::Pause
            }
        }
    }

    /// The service could not answer: apply the class's failure mode.
    fn degrade(&mut self, plan: &Plan, reason: &'static str) -> Action {
        let shared = Rc::clone(&self.shared);
        shared.metrics.degraded.inc();
        if let Some(c) = shared.metrics.class(plan.class) {
            c.degraded.inc();
        }
        let now = self.now();
        match plan.failure_mode {
            FailureMode::Open => {
                shared
                    .table
                    .borrow_mut()
                    .charge(&plan.attempt(false), plan.cost, now);
                shared
                    .unreported
                    .borrow_mut()
                    .add(&plan.attempt(false), plan.cost);
                let levels = shared.table.borrow().levels(&plan.attempt(false), now);
                self.allow(plan, &levels, DecidedBy::Degraded(reason), false, now)
            }
            FailureMode::Closed => {
                let retry = 1.to_string();
                let headers = [
                    ("retry-after", retry),
                    ("x-laneguard-degraded", reason.to_string()),
                ];
                let body = error_body(
                    "rate_limit_service_unavailable",
                    "the rate-limit service did not answer and this class fails closed",
                );
                let by = DecidedBy::Degraded(reason);
                let mut rec = self.record(vec![Event::Degraded], plan, &[], &[], by);
                rec.status = 503;
                rec.retry_after_s = Some(1);
                self.emit(rec);
                self.reply(503, &body, &headers);
                Action::Pause
            }
            FailureMode::Local => {
                let share = shared.policy.service.local_share;
                let (eval, borrowed) = shared.table.borrow_mut().decide(plan, now, share);
                if eval.allowed {
                    let spent = plan.attempt(borrowed);
                    shared.unreported.borrow_mut().add(&spent, plan.cost);
                    self.allow(
                        plan,
                        &eval.levels,
                        DecidedBy::Degraded(reason),
                        borrowed,
                        now,
                    )
                } else {
                    self.over(plan, &eval, DecidedBy::Degraded(reason), false)
                }
            }
        }
    }

    fn reply(&self, status: u32, body: &str, headers: &[(&str, String)]) {
        let mut h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        h.push(("content-type", "application/json"));
        h.push(("x-laneguard", "1"));
        self.send_http_response(status, h, Some(body.as_bytes()));
    }

    /// Finish a paused request, whatever the outcome.
    fn resume_after(&mut self, action: Action) {
        if action == Action::Continue {
            self.resume_http_request();
        }
    }

    fn on_answer(&mut self, pending: Pending, status_code: u32, size: usize) -> Action {
        let shared = Rc::clone(&self.shared);
        let Pending {
            plan,
            borrowing,
            started_ns,
            ..
        } = pending;
        if status_code != 0 {
            // Envoy reports its own timeout of the call as UNAVAILABLE (14), not
            // DEADLINE_EXCEEDED, so the elapsed time tells a timeout apart.
            let elapsed_ms = self.now().saturating_sub(started_ns) / 1_000_000;
            let timed_out = status_code == GRPC_DEADLINE_EXCEEDED
                || elapsed_ms * 10 >= u64::from(shared.policy.service.timeout_ms) * 9;
            let reason = if timed_out {
                shared.metrics.service_error_timeout.inc();
                "timeout"
            } else {
                shared.metrics.service_error_status.inc();
                "service_error"
            };
            log::warn!("laneguard: rate-limit service answered gRPC status {status_code}");
            return self.degrade(&plan, reason);
        }
        let body = self
            .get_grpc_call_response_body(0, size)
            .unwrap_or_default();
        let verdict = match rls::decode(&body) {
            Ok(v) => v,
            Err(e) => {
                shared.metrics.service_error_decode.inc();
                log::warn!("laneguard: undecodable rate-limit answer: {e}");
                return self.degrade(&plan, "bad_response");
            }
        };
        let now = self.now();
        let attempt = plan.attempt(borrowing);
        {
            let mut table = shared.table.borrow_mut();
            if verdict.allowed {
                table.charge(&attempt, plan.cost, now);
            }
            apply_statuses(&mut table, &attempt, &verdict.statuses, now);
        }
        if verdict.allowed {
            let mut levels = shared.table.borrow().levels(&attempt, now);
            overlay(&mut levels, &verdict.statuses);
            return self.allow(&plan, &levels, DecidedBy::Central, borrowing, now);
        }
        if verdict.tripped == Some(0) && !borrowing && plan.borrow.is_some() {
            // The reserve is empty fleet-wide: try idle shared capacity.
            return self.ask(plan, true);
        }
        let mut eval = shared
            .table
            .borrow()
            .evaluate(&attempt, plan.cost, now, 1.0);
        overlay(&mut eval.levels, &verdict.statuses);
        eval.allowed = false;
        eval.tripped = verdict.tripped.or(eval.tripped).or(Some(0));
        // The service's per-descriptor codes say which buckets lacked room.
        for (l, st) in eval.levels.iter_mut().zip(&verdict.statuses) {
            l.has_room = st.code != rls::OVER_LIMIT;
        }
        if eval.levels.iter().all(|l| l.has_room) {
            if let Some(l) = eval.tripped.and_then(|i| eval.levels.get_mut(i)) {
                l.has_room = false;
            }
        }
        self.over(&plan, &eval, DecidedBy::Central, borrowing)
    }
}

/// The service's figures win over the local mirror's where it sent them.
fn overlay(levels: &mut [Level], statuses: &[DescriptorStatus]) {
    for (l, s) in levels.iter_mut().zip(statuses) {
        if s.current_limit.is_some() {
            l.remaining = s.limit_remaining;
        }
        if let Some(d) = &s.duration_until_reset {
            l.reset_s = ceil_s(rls::duration_ns(d));
        }
    }
}

/// Take in what the service said about each bucket: align the local mirror with its level,
/// and record any capacity it leased to this worker.
pub(crate) fn apply_statuses(
    table: &mut LocalTable,
    attempt: &[&Bucket],
    statuses: &[DescriptorStatus],
    now: u64,
) {
    for (bucket, status) in attempt.iter().zip(statuses) {
        if let Some(d) = &status.duration_until_reset {
            table.sync(bucket, rls::duration_ns(d), now);
        }
        if let Some(q) = &status.quota {
            table.grant(bucket, q.requests, quota_until(q, now), now);
        }
    }
}

fn quota_until(q: &Quota, now: u64) -> u64 {
    use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::quota::ExpirationSpecifier;
    match &q.expiration_specifier {
        Some(ExpirationSpecifier::ValidUntil(ts)) => {
            let secs = u64::try_from(ts.seconds).unwrap_or(0);
            let nanos = u64::try_from(ts.nanos).unwrap_or(0);
            secs.saturating_mul(1_000_000_000).saturating_add(nanos)
        }
        None => now,
    }
}

impl Context for Request {
    fn on_done(&mut self) -> bool {
        if self.queued && self.shared.queue.borrow_mut().remove(self.context_id) {
            self.shared.metrics.queue_abandoned.inc();
        }
        true
    }

    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        if pending.token != token_id {
            self.pending = Some(pending);
            return;
        }
        let action = self.on_answer(pending, status_code, response_size);
        self.resume_after(action);
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.start()
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for (k, v) in std::mem::take(&mut self.response_headers) {
            self.set_http_response_header(k, Some(&v));
        }
        Action::Continue
    }
}

/// The request context of a VM without a valid policy: fail closed, visibly.
pub struct Unconfigured;

impl Context for Unconfigured {}

impl HttpContext for Unconfigured {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let body = error_body(
            "laneguard_not_configured",
            "the laneguard policy did not load",
        );
        self.send_http_response(
            500,
            vec![("content-type", "application/json")],
            Some(body.as_bytes()),
        );
        Action::Pause
    }
}
