//! One request: classify, decide, respond.
//!
//! The request is decided locally when it can be; otherwise it pauses on one
//! `ShouldRateLimit` call (two, when a protected class's reserve is empty and it may borrow
//! shared capacity). Envoy enforces the call's timeout, and every way the call can fail
//! (dispatch error, unknown cluster, non-OK gRPC status, timeout, undecodable answer) goes
//! through [`Request::degrade`], which applies the class's failure mode.

use crate::rls;
use crate::{now_ns, Shared};
use laneguard_core::engine::{ceil_s, Evaluation, Level};
use laneguard_core::headers::{error_body, limited_body, rate_limit_headers};
use laneguard_core::{plan, Bucket, FailureMode, LocalTable, Plan, RequestInfo};
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
    pending: Option<Pending>,
    /// Headers to add to the upstream's response once the request was allowed.
    response_headers: Vec<(&'static str, String)>,
}

impl Request {
    pub fn new(shared: Rc<Shared>) -> Request {
        Request {
            shared,
            pending: None,
            response_headers: Vec::new(),
        }
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
        let tenant = self.header(&p.identity.tenant_header);
        let principal = self.header(&p.identity.principal_header);
        let user = self.header(&p.identity.user_header);
        let declared = self.header(&p.classification.header);
        let method = self.header(":method").unwrap_or_default();
        let path = self.header(":path").unwrap_or_default();
        let purpose = p.purposes.as_ref().and_then(|x| self.header(&x.header));
        let model = p.models.as_ref().and_then(|x| self.header(&x.header));
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
        let plan = match plan(p, &info) {
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
                let detail = match reject {
                    laneguard_core::Reject::MissingIdentity => {
                        "no trusted tenant/principal: the request did not pass authentication"
                    }
                    laneguard_core::Reject::InvalidIdentity => {
                        "the trusted identity is not a valid name"
                    }
                };
                self.reply(reject.status(), &error_body(reject.code(), detail), &[]);
                return Action::Pause;
            }
        };
        if plan.forged {
            shared.metrics.forged_class.inc();
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
        let primary = plan.attempt(false);
        // Fast path 1: capacity the service leased to this worker.
        let mut table = shared.table.borrow_mut();
        if table.try_lease(&primary, plan.cost, now) {
            if table.claim_renewal(&primary, now, crate::RENEW_HORIZON_NS) {
                let set = primary.iter().map(|b| (*b).clone()).collect();
                shared.renewals.borrow_mut().push(set);
            }
            let levels = table.evaluate(&primary, 0, now, 1.0).levels;
            drop(table);
            return self.allow(&plan, &levels, DecidedBy::Local);
        }
        drop(table);
        // Fast path 2: the local mirror already shows no room, so the fleet has none either.
        let table = shared.table.borrow();
        let eval = table.evaluate(&primary, plan.cost, now, 1.0);
        let mut borrowing = false;
        if !eval.allowed {
            let alt_ok = eval.tripped == Some(0)
                && plan.borrow.is_some()
                && table
                    .evaluate(&plan.attempt(true), plan.cost, now, 1.0)
                    .allowed;
            if !alt_ok {
                drop(table);
                return self.limit(&plan, &eval, DecidedBy::Local);
            }
            borrowing = true;
        }
        drop(table);
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

    fn allow(&mut self, plan: &Plan, levels: &[Level], by: DecidedBy) -> Action {
        let m = &self.shared.metrics;
        m.allowed.inc();
        if let Some(c) = m.class(plan.class) {
            c.allowed.inc();
        }
        match by {
            DecidedBy::Local => m.decided_local.inc(),
            DecidedBy::Central => m.decided_central.inc(),
            DecidedBy::Degraded(_) => {}
        }
        self.response_headers = rate_limit_headers(levels, self.shared.policy.draft03_headers);
        if let DecidedBy::Degraded(reason) = by {
            self.response_headers
                .push(("x-laneguard-degraded", reason.to_string()));
        }
        Action::Continue
    }

    fn limit(&mut self, plan: &Plan, eval: &Evaluation, by: DecidedBy) -> Action {
        let m = &self.shared.metrics;
        m.limited.inc();
        if let Some(c) = m.class(plan.class) {
            c.limited.inc();
        }
        if by == DecidedBy::Local {
            m.decided_local.inc();
        }
        let tripped = eval.tripped.unwrap_or(0);
        let bucket = eval
            .levels
            .get(tripped)
            .map_or_else(String::new, |l| l.name.clone());
        let retry = eval
            .levels
            .get(tripped)
            .map_or(1, |l| l.retry_after_s.max(1));
        let mut headers = rate_limit_headers(&eval.levels, self.shared.policy.draft03_headers);
        headers.push(("retry-after", retry.to_string()));
        if let DecidedBy::Degraded(reason) = by {
            headers.push(("x-laneguard-degraded", reason.to_string()));
        }
        let body = limited_body(&plan.tenant, &plan.class_name, &bucket, retry, by.as_str());
        self.reply(429, &body, &headers);
        Action::Pause
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
                let levels = shared
                    .table
                    .borrow()
                    .evaluate(&plan.attempt(false), 0, now, 1.0)
                    .levels;
                self.allow(plan, &levels, DecidedBy::Degraded(reason))
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
                self.reply(503, &body, &headers);
                Action::Pause
            }
            FailureMode::Local => {
                let share = shared.policy.service.local_share;
                let (eval, borrowed) = shared.table.borrow_mut().decide(plan, now, share);
                if eval.allowed {
                    let spent = plan.attempt(borrowed);
                    shared.unreported.borrow_mut().add(&spent, plan.cost);
                    self.allow(plan, &eval.levels, DecidedBy::Degraded(reason))
                } else {
                    self.limit(plan, &eval, DecidedBy::Degraded(reason))
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
            let mut levels = shared.table.borrow().evaluate(&attempt, 0, now, 1.0).levels;
            overlay(&mut levels, &verdict.statuses);
            return self.allow(&plan, &levels, DecidedBy::Central);
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
        self.limit(&plan, &eval, DecidedBy::Central)
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
