//! One request: classify, decide, respond. The state machine, against [`Host`] only.
//!
//! The phases, one file each, in the order a request meets them:
//! 1. [`plan`]: read the headers, plan the request (identity, class, buckets), apply the
//!    rollout scope; refuse bad identities, count forged classes, let `off` through.
//! 2. [`local`]: the fast paths: spend capacity leased to this worker, or refuse when the
//!    local mirror already shows no room.
//! 3. [`central`]: otherwise one `ShouldRateLimit` call (two, when a protected class's
//!    reserve is empty and it may borrow shared capacity); its answer, and every way the
//!    call can fail (dispatch error, unknown cluster, non-OK gRPC status, timeout,
//!    undecodable answer) through [`Request::degrade`], which applies the class's failure
//!    mode. Envoy enforces the call's timeout.
//! 4. [`outcome`]: allow, or judge a limit under the rollout: a shadow limit is let through
//!    with the headers and a record; an enforced limit walks the class's fallbacks
//!    (`laneguard_core::degrade`): queue (charge ahead, hold the request, the root tick
//!    resumes it), fallback route (set the routing header, let it through), reject (429).
//!    Each of those leaves an audit record (`crate::audit`).
//!
//! Every decision goes through the rollout (`laneguard_core::rollout`): a request whose
//! class (or tenant) is `off` is not limited at all; one whose buckets lack room is judged
//! under its mode.

mod ai;
mod central;
mod local;
mod outcome;
mod plan;

pub(crate) use central::apply_statuses;

use crate::host::{Action, Host};
use crate::root::Shared;
use laneguard_core::audit::DecisionPath;
use laneguard_core::{Mode, Plan};
use std::rc::Rc;

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
    /// The call asked for a lease (what a plain server is recognised by).
    asked_lease: bool,
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
    /// A limited request whose admission now depends on a second plan (the enforced part
    /// of a shadow limit, or the fallback route's budget): what to answer once that plan
    /// is decided ([`outcome::Then`]).
    then: Option<outcome::Then>,
    /// A body follows the request headers.
    body_follows: bool,
    /// An AI request (token budgets): its body, reservation and settlement.
    ai: Option<Box<ai::AiState>>,
    /// Sent to the cache-only route by the `cached` fallback: settled by the response.
    cached: Option<Box<outcome::CachedAttempt>>,
}

impl Request {
    pub(crate) fn new(shared: Rc<Shared>, context_id: u32) -> Request {
        Request {
            shared,
            context_id,
            pending: None,
            response_headers: Vec::new(),
            ctx: Ctx::default(),
            queued: false,
            then: None,
            body_follows: false,
            ai: None,
            cached: None,
        }
    }

    fn mode(&self) -> Mode {
        self.ctx.mode.unwrap_or(Mode::Enforce)
    }

    /// The request's headers arrived: decide it, or pause it on a call to the service.
    /// (Tests; the glue calls [`Request::on_request_headers_end`].)
    #[cfg(test)]
    pub fn on_request_headers(&mut self, h: &dyn Host) -> Action {
        self.start(h)
    }

    /// [`Request::on_request_headers`], saying whether a body follows (an AI request's
    /// body is read before it is decided).
    pub fn on_request_headers_end(&mut self, h: &dyn Host, end_of_stream: bool) -> Action {
        self.body_follows = !end_of_stream;
        self.start(h)
    }

    /// An answer to a call this request dispatched (or its failure).
    pub fn on_grpc_response(
        &mut self,
        h: &dyn Host,
        token_id: u32,
        status_code: u32,
        response_size: usize,
    ) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        if pending.token != token_id {
            self.pending = Some(pending);
            return;
        }
        let action = self.on_answer(h, pending, status_code, response_size);
        self.resume_after(h, action);
    }

    /// The upstream's response headers: add the rate-limit headers of an allowed request.
    /// (Tests; the glue calls [`Request::on_response_headers_end`].)
    #[cfg(test)]
    pub fn on_response_headers(&mut self, h: &dyn Host) -> Action {
        self.on_response_headers_end(h, false)
    }

    /// [`Request::on_response_headers`], saying whether the response has a body.
    pub fn on_response_headers_end(&mut self, h: &dyn Host, end_of_stream: bool) -> Action {
        if self.cached.is_some() && self.cache_answered(h) == Action::Pause {
            return Action::Pause;
        }
        for (k, v) in std::mem::take(&mut self.response_headers) {
            h.set_response_header(k, &v);
        }
        self.ai_response_headers(h, end_of_stream);
        Action::Continue
    }

    /// The request is over (answered, or its client went away).
    pub fn on_done(&mut self, h: &dyn Host) -> bool {
        if self.queued && self.shared.queue.borrow_mut().remove(self.context_id) {
            self.shared.metrics.queue_abandoned.inc(h);
            // It was never paid (that happens on release): give its place on the mirror back.
            if let Some(q) = self.shared.queued.borrow_mut().remove(&self.context_id) {
                let attempt = q.plan.attempt(q.borrowing);
                let mut table = self.shared.table.borrow_mut();
                table.refund(&attempt, q.plan.cost, h.now_ns());
                if q.promised {
                    table.unpromise(&attempt, q.plan.cost);
                }
            }
        }
        self.ai_done(h);
        if let Some(c) = self.cached.take() {
            // No response came (the client went away): the record of what was tried.
            self.emit(h, c.rec);
        }
        true
    }

    /// Whether the request is held for its decision (a call to the service, or the queue).
    fn waiting(&self) -> bool {
        self.pending.is_some()
            || (self.queued && self.shared.queue.borrow().contains(self.context_id))
    }

    /// Finish a paused request, whatever the outcome.
    fn resume_after(&mut self, h: &dyn Host, action: Action) {
        if action == Action::Continue {
            let _ = h.resume_request();
        }
    }

    fn reply(&self, h: &dyn Host, status: u32, body: &str, headers: &[(&str, String)]) {
        reply(h, status, body, headers);
    }
}

/// A local JSON reply (429, 503, identity errors) to the effective request context.
pub(crate) fn reply(h: &dyn Host, status: u32, body: &str, headers: &[(&str, String)]) {
    let mut hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    hs.push(("content-type", "application/json"));
    hs.push(("x-laneguard", "1"));
    h.send_reply(status, hs, body.as_bytes());
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
