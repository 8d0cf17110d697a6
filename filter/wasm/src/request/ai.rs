//! AI requests (token budgets, `laneguard_core::ai`): hold the request until its body is
//! buffered (at most `tokens.inspect_bytes`), admit it with its token buckets reserved,
//! read the usage from the response as it passes, and settle. The core decides every step;
//! this file only moves bytes and counts.
//!
//! Settlement adds no call per request: the local mirror is adjusted at once, an extra
//! charge joins the hits reported on the sync tick (`x-laneguard-report: 1`, like any
//! decrement admitted without the service), and a refund joins this worker's refunds, sent
//! on the same tick (`x-laneguard-report: refund`, `crate::root`).

use super::outcome::Verdict;
use super::Request;
use crate::host::{Action, Host};
use laneguard_core::ai::{self, Inspected, NoUsage, ResponseReader, Settle};
use laneguard_core::audit::Event;
use laneguard_core::declared::Dimension;
use laneguard_core::headers::error_body;
use laneguard_core::{Bucket, Plan};
use std::rc::Rc;

/// What the filter keeps of one AI request.
#[derive(Default)]
pub(crate) struct AiState {
    /// Waiting for the body: the plan made from the headers.
    held: Option<Plan>,
    header_model: Option<String>,
    /// The buffered body's length (to rewrite it for a cheaper model).
    body_len: usize,
    inspected: Inspected,
    /// Admitted: the token buckets and what is reserved in each, until settled.
    reserved: Option<(Vec<Bucket>, u32)>,
    reader: Option<ResponseReader>,
    /// The `cheaper_model` fallback fired: the model the request was for.
    downgraded_from: Option<String>,
}

impl Request {
    /// Phase 1 of an AI request: wait for its body (the caller already planned it from
    /// the headers), or admit it at once if it has none.
    pub(super) fn hold_for_body(
        &mut self,
        h: &dyn Host,
        plan: Plan,
        header_model: Option<String>,
    ) -> Action {
        self.ai = Some(Box::new(AiState {
            held: Some(plan),
            header_model,
            ..AiState::default()
        }));
        if self.body_follows {
            return Action::Pause;
        }
        self.admit_body(h, &[])
    }

    /// A chunk of the request body arrived (`size`: all of it buffered so far). Envoy
    /// delivers it even while the headers are held (`allow_on_headers_stop_iteration`), so
    /// a request still waiting for its decision keeps its body buffered: letting it through
    /// would let the request through.
    pub fn on_request_body(&mut self, h: &dyn Host, size: usize, end_of_stream: bool) -> Action {
        let Some(st) = self.ai.as_mut().filter(|st| st.held.is_some()) else {
            return if self.waiting() {
                Action::Pause
            } else {
                Action::Continue
            };
        };
        let policy = &self.shared.policy;
        if !ai::within_limit(policy, size) {
            // Never buffer past the limit: refuse without reading further.
            let limit = policy.tokens.as_ref().map_or(0, |t| t.inspect_bytes);
            st.held = None;
            return self.refuse(h, &ai::AdmitError::TooLarge { limit });
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = h.request_body(0, size).unwrap_or_default();
        self.admit_body(h, &body)
    }

    fn admit_body(&mut self, h: &dyn Host, body: &[u8]) -> Action {
        let shared = Rc::clone(&self.shared);
        let m = &shared.metrics.tokens;
        let Some(st) = self.ai.as_mut() else {
            return Action::Continue;
        };
        let Some(plan) = st.held.take() else {
            return Action::Continue;
        };
        st.body_len = body.len();
        m.requests.inc(h);
        // Counted once: the header's model may already have been charged to the default.
        let was_defaulted = plan.defaulted.contains(&Dimension::Model);
        let admitted = ai::admit(&shared.policy, plan, st.header_model.as_deref(), body);
        let (plan, inspected, model_header) = match admitted {
            Ok(x) => x,
            Err(e) => return self.refuse(h, &e),
        };
        if let (Some(model), Some(models)) = (&model_header, &shared.policy.models) {
            h.set_request_header(&models.header, model);
        }
        if let Some(t) = &plan.tokens {
            m.estimate(t.estimate).inc(h);
        }
        if plan.defaulted.contains(&Dimension::Model) && !was_defaulted {
            shared.metrics.model_defaulted.inc(h);
        }
        st.inspected = inspected;
        let now = h.now_ns();
        self.fast_path(h, plan, now)
    }

    /// Refuse an AI request before any bucket is charged (400 or 413).
    fn refuse(&mut self, h: &dyn Host, e: &ai::AdmitError) -> Action {
        let m = &self.shared.metrics.tokens;
        match e {
            ai::AdmitError::Body(ai::BodyError::NotJson) => m.bad_body.inc(h),
            ai::AdmitError::Body(ai::BodyError::BadMaxTokens) => m.bad_max_tokens.inc(h),
            ai::AdmitError::TooLarge { .. } => m.body_too_large.inc(h),
            ai::AdmitError::Tokens(_) => m.too_many_tokens.inc(h),
            ai::AdmitError::Declared(r) => self.shared.metrics.count_reject(h, *r),
        }
        let body = error_body(e.code(), &e.detail());
        self.reply(h, e.status(), &body, &[]);
        Action::Pause
    }

    /// The request was admitted (its buckets charged): its reservation now stands.
    pub(super) fn reserved(&mut self, h: &dyn Host, plan: &Plan) {
        let (Some(t), Some(st)) = (&plan.tokens, self.ai.as_mut()) else {
            return;
        };
        st.reserved = Some((t.buckets.clone(), t.reserve));
        let shared = &self.shared;
        shared.metrics.tokens.reserved.add(h, u64::from(t.reserve));
        let in_flight = shared.tokens_in_flight.get() + u64::from(t.reserve);
        shared.tokens_in_flight.set(in_flight);
        shared.metrics.tokens.in_flight_reserved.set(h, in_flight);
    }

    /// The `cheaper_model` fallback: the tripped bucket belongs to the request's model and
    /// the policy names a cheaper one. Rewrites the request (model header, body `model`),
    /// records the fallback, and decides the request again on the cheaper model's buckets.
    /// `None` when the fallback does not apply.
    pub(super) fn try_cheaper(&mut self, h: &dyn Host, v: Verdict<'_>) -> Option<Action> {
        let Verdict { plan, eval, by, .. } = v;
        let shared = Rc::clone(&self.shared);
        let st = self.ai.as_ref()?;
        let attempt = v.attempt();
        let bucket = v.tripped_bucket()?;
        let (to, next) = ai::downgrade(&shared.policy, plan, &st.inspected, bucket)?;
        let from = st.inspected.model.clone().unwrap_or_default();
        let body_len = st.body_len;
        if let Some(models) = &shared.policy.models {
            h.set_request_header(&models.header, &to);
        }
        let body = h.request_body(0, body_len).filter(|b| !b.is_empty());
        if let Some(new) = body.and_then(|b| ai::rewrite_model(&b, &to)) {
            if h.set_request_body(body_len, &new).is_ok() {
                h.set_request_header("content-length", &new.len().to_string());
                if let Some(st) = self.ai.as_mut() {
                    st.body_len = new.len();
                }
            }
        }
        shared.metrics.tokens.cheaper_model.inc(h);
        let mut rec = self.record(
            h,
            vec![Event::Limited, Event::Degraded],
            plan,
            &eval.levels,
            &attempt,
            by,
        );
        rec.bucket = v.bucket_name();
        rec.fallback = Some(ai::CHEAPER_MODEL);
        self.emit(h, rec);
        log::info!(
            "laneguard: cheaper_model: tenant={} {from} -> {to}",
            plan.tenant
        );
        if let Some(st) = self.ai.as_mut() {
            st.downgraded_from.get_or_insert(from);
            st.inspected.model = Some(to);
        }
        let now = h.now_ns();
        Some(self.fast_path(h, next, now))
    }

    /// The response headers of an AI request: say it was downgraded, and start reading its
    /// usage (from the usage header at once, else from the body as it passes).
    pub(super) fn ai_response_headers(&mut self, h: &dyn Host, end_of_stream: bool) {
        let shared = Rc::clone(&self.shared);
        let Some(st) = self.ai.as_mut() else {
            return;
        };
        if st.downgraded_from.is_some() {
            h.set_response_header("x-laneguard-fallback", ai::CHEAPER_MODEL);
        }
        let (Some(tokens), Some(_)) = (&shared.policy.tokens, &st.reserved) else {
            return;
        };
        let content_type = h.response_header("content-type");
        let usage = tokens
            .usage_header
            .as_deref()
            .and_then(|n| h.response_header(n));
        let reader = ResponseReader::new(tokens, content_type.as_deref(), usage.as_deref());
        let done = end_of_stream || !reader.wants_body();
        st.reader = Some(reader);
        if done {
            self.settle_response(h);
        }
    }

    /// A chunk of an AI response: read it as it passes, never holding it.
    pub fn on_response_body(&mut self, h: &dyn Host, size: usize, end_of_stream: bool) -> Action {
        let Some(reader) = self.ai.as_mut().and_then(|st| st.reader.as_mut()) else {
            return Action::Continue;
        };
        if reader.wants_body() && size > 0 {
            if let Some(chunk) = h.response_body(0, size) {
                reader.feed(&chunk);
            }
        }
        if end_of_stream {
            self.settle_response(h);
        }
        Action::Continue
    }

    fn settle_response(&mut self, h: &dyn Host) {
        let Some(st) = self.ai.as_mut() else {
            return;
        };
        let (Some(reader), Some((_, reserve))) = (st.reader.as_mut(), &st.reserved) else {
            return;
        };
        let s = reader.finish(*reserve);
        self.settle(h, s);
    }

    /// The request is over: a reservation still standing (the client went away, or no
    /// response came) settles at the reservation.
    pub(super) fn ai_done(&mut self, h: &dyn Host) {
        if self.ai.as_ref().is_some_and(|st| st.reserved.is_some()) {
            self.settle(h, Settle::AtReservation(NoUsage::Disconnected));
        }
    }

    fn settle(&mut self, h: &dyn Host, s: Settle) {
        let Some((buckets, reserve)) = self.ai.as_mut().and_then(|st| st.reserved.take()) else {
            return;
        };
        let shared = &self.shared;
        let m = &shared.metrics.tokens;
        let in_flight = shared
            .tokens_in_flight
            .get()
            .saturating_sub(u64::from(reserve));
        shared.tokens_in_flight.set(in_flight);
        m.in_flight_reserved.set(h, in_flight);
        let refs: Vec<&Bucket> = buckets.iter().collect();
        let now = h.now_ns();
        match s {
            Settle::Exact => m.settled_exact.inc(h),
            Settle::Refund(n) => {
                shared.table.borrow_mut().refund(&refs, n, now);
                shared.refunds.borrow_mut().add(&refs, n);
                m.refunded.add(h, u64::from(n));
                m.settled_refund.inc(h);
            }
            Settle::Extra(n) => {
                let costed: Vec<(&Bucket, u32)> = refs.iter().map(|b| (*b, n)).collect();
                shared.table.borrow_mut().charge_costs(&costed, now);
                // Used beyond the reservation while the service answered: charged in full.
                shared.unreported.borrow_mut().add(&refs, n);
                m.over_reservation.add(h, u64::from(n));
                m.settled_extra.inc(h);
            }
            Settle::AtReservation(why) => m.at_reservation(why).inc(h),
        }
    }
}

#[cfg(test)]
mod tests;
