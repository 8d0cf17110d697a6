//! Phase 3: the central call. Ask the service, take in its answer, and apply the class's
//! failure mode when it cannot answer.

use super::{DecidedBy, Pending, Request};
use crate::host::{Action, DispatchError, GrpcCall, Host};
use crate::rls;
use laneguard_core::audit::Event;
use laneguard_core::engine::{ceil_s, Level};
use laneguard_core::headers::error_body;
use laneguard_core::logsafe::held_back;
use laneguard_core::peer::{Answer, Peer};
use laneguard_core::{Bucket, FailureMode, LocalTable, Plan};
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::{
    DescriptorStatus, Quota,
};
use std::rc::Rc;
use std::time::Duration;

impl Request {
    /// Ask the service about one attempt. Pauses the request until the answer (or the
    /// timeout) arrives.
    pub(super) fn ask(&mut self, h: &dyn Host, plan: Plan, borrowing: bool) -> Action {
        let shared = Rc::clone(&self.shared);
        let svc = &shared.policy.service;
        let attempt = plan.attempt(borrowing);
        // A standard server charged the other buckets on the refusal that led here: the
        // borrowing retry asks for the borrowed pool alone (`laneguard_core::peer`).
        let sent = if borrowing && shared.peer.get().charges_refusals() {
            &attempt[..attempt.len().min(1)]
        } else {
            &attempt[..]
        };
        let msg = rls::encode_plan(&svc.domain, &plan, borrowing, sent.len());
        let now = h.now_ns();
        // No lease on a reserve, nor on a borrowing attempt (`LocalTable::want_for`).
        let want = {
            let mut table = shared.table.borrow_mut();
            // On a saturated bucket, this call is the only one until it is answered.
            table.begin_ask(&attempt, now, u64::from(svc.timeout_ms) * 1_000_000);
            table.want_for(&plan, borrowing, now, svc.max_lease)
        };
        let asked_lease = want > 0;
        let want = want.to_string();
        match h.dispatch_grpc(GrpcCall {
            cluster: &svc.cluster,
            service: rls::SERVICE,
            method: rls::METHOD,
            metadata: vec![
                (rls::LEASE_HEADER, want.as_bytes()),
                (
                    laneguard_core::usage::CLASS_METADATA,
                    plan.class_name.as_bytes(),
                ),
            ],
            message: &msg,
            timeout: Duration::from_millis(u64::from(svc.timeout_ms)),
        }) {
            Ok(token) => {
                self.pending = Some(Pending {
                    token,
                    plan,
                    borrowing,
                    started_ns: now,
                    asked_lease,
                });
                Action::Pause
            }
            Err(status) => {
                shared.table.borrow_mut().ask_done(&attempt);
                shared.metrics.service_error_dispatch.inc(h);
                let reason = match status {
                    DispatchError::UnknownCluster(_) => "unknown_cluster",
                    DispatchError::Failed(_) => "dispatch_failed",
                };
                let gate = shared.log_gates.borrow_mut().dispatch.pass(now);
                if let Some(held) = gate {
                    log::warn!(
                        "laneguard: cannot call {:?}: {status:?}{}",
                        svc.cluster,
                        held_back(held)
                    );
                }
                self.degrade(h, &plan, reason)
            }
        }
    }

    pub(super) fn on_answer(
        &mut self,
        h: &dyn Host,
        pending: Pending,
        status_code: u32,
        size: usize,
    ) -> Action {
        let shared = Rc::clone(&self.shared);
        let Pending {
            plan,
            borrowing,
            started_ns,
            asked_lease,
            ..
        } = pending;
        shared.table.borrow_mut().ask_done(&plan.attempt(borrowing));
        if status_code != 0 {
            let timed_out = laneguard_core::engine::call_timed_out(
                status_code,
                h.now_ns().saturating_sub(started_ns),
                shared.policy.service.timeout_ms,
            );
            let reason = if timed_out {
                shared.metrics.service_error_timeout.inc(h);
                "timeout"
            } else {
                shared.metrics.service_error_status.inc(h);
                "service_error"
            };
            let gate = shared.log_gates.borrow_mut().status.pass(h.now_ns());
            if let Some(held) = gate {
                log::warn!(
                    "laneguard: rate-limit service answered gRPC status {status_code}{}",
                    held_back(held)
                );
            }
            return self.degrade(h, &plan, reason);
        }
        let body = h.grpc_response_body(size).unwrap_or_default();
        let verdict = match rls::decode(&body) {
            Ok(v) => v,
            Err(e) => {
                shared.metrics.service_error_decode.inc(h);
                let gate = shared.log_gates.borrow_mut().decode.pass(h.now_ns());
                if let Some(held) = gate {
                    log::warn!(
                        "laneguard: undecodable rate-limit answer: {e}{}",
                        held_back(held)
                    );
                }
                return self.degrade(h, &plan, "bad_response");
            }
        };
        shared.service_answered(true);
        let now = h.now_ns();
        let attempt = plan.attempt(borrowing);
        let mut peer = shared.peer.get();
        peer.learn(answer(asked_lease, verdict.allowed, &verdict.statuses));
        shared.peer.set(peer);
        {
            let mut table = shared.table.borrow_mut();
            if verdict.allowed {
                table.charge_costs(&plan.costed(borrowing), now);
            }
            apply_statuses(
                &mut table,
                &attempt,
                &verdict.statuses,
                &verdict.holds,
                peer,
                now,
            );
        }
        if verdict.allowed {
            let mut levels = shared.table.borrow().levels(&attempt, now);
            overlay(&mut levels, &verdict.statuses);
            return self.allow(h, &plan, levels, DecidedBy::Central, borrowing, now);
        }
        let only_the_lane = verdict
            .statuses
            .iter()
            .skip(1)
            .all(|s| s.code != rls::OVER_LIMIT);
        if verdict.tripped == Some(0) && only_the_lane && !borrowing && plan.borrow.is_some() {
            // The reserve is empty fleet-wide (and it alone): try idle shared capacity.
            return self.ask(h, plan, true);
        }
        let mut eval = shared
            .table
            .borrow()
            .evaluate_costs(&plan.costed(borrowing), now, 1.0);
        overlay(&mut eval.levels, &verdict.statuses);
        eval.allowed = false;
        eval.tripped = verdict.tripped.or(eval.tripped).or(Some(0));
        // The service's per-descriptor codes say which buckets lacked room.
        for (l, st) in eval.levels.iter_mut().zip(&verdict.statuses) {
            l.has_room = st.code != rls::OVER_LIMIT;
            // A fixed window has room again when it ends: that is the wait to report.
            if let (false, true, Some(d)) =
                (l.has_room, peer.reset_is_retry(), &st.duration_until_reset)
            {
                l.retry_after_ns = l.retry_after_ns.max(rls::duration_ns(d));
                l.retry_after_s = ceil_s(l.retry_after_ns).max(1);
            }
        }
        if eval.levels.iter().all(|l| l.has_room) {
            if let Some(l) = eval.tripped.and_then(|i| eval.levels.get_mut(i)) {
                l.has_room = false;
            }
        }
        self.over(h, &plan, &eval, DecidedBy::Central, borrowing)
    }

    /// The service could not answer: apply the class's failure mode.
    pub(super) fn degrade(&mut self, h: &dyn Host, plan: &Plan, reason: &'static str) -> Action {
        let shared = Rc::clone(&self.shared);
        shared.service_answered(false);
        shared.metrics.degraded.inc(h);
        if let Some(c) = shared.metrics.class(plan.class) {
            c.degraded.inc(h);
        }
        self.decide_degraded(h, plan, reason)
    }

    /// Decide a plan under its class's failure mode, the service not answering.
    pub(super) fn decide_degraded(
        &mut self,
        h: &dyn Host,
        plan: &Plan,
        reason: &'static str,
    ) -> Action {
        let shared = Rc::clone(&self.shared);
        let now = h.now_ns();
        // The call may have reached the service (which may then have charged it) only when
        // it timed out or its answer was unreadable.
        let maybe_counted = matches!(reason, "timeout" | "bad_response");
        let report =
            |borrowed| laneguard_core::engine::report_unanswered(plan, borrowed, maybe_counted);
        match plan.failure_mode {
            FailureMode::Open => {
                shared
                    .table
                    .borrow_mut()
                    .charge_costs(&plan.costed(false), now);
                if report(false) {
                    shared.unreported.borrow_mut().add_seen(
                        &shared.table.borrow(),
                        &plan.costed(false),
                        now,
                    );
                }
                let levels = shared.table.borrow().levels(&plan.attempt(false), now);
                self.allow(h, plan, levels, DecidedBy::Degraded(reason), false, now)
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
                let mut rec = self.record(h, vec![Event::Degraded], plan, &[], &[], by);
                rec.status = 503;
                rec.retry_after_s = Some(1);
                self.emit(h, rec);
                self.reply(h, 503, &body, &headers);
                Action::Pause
            }
            FailureMode::Local => {
                let share = shared.policy.service.local_share;
                let (eval, borrowed) = shared.table.borrow_mut().decide(plan, now, share);
                if eval.allowed {
                    if report(borrowed) {
                        shared.unreported.borrow_mut().add_seen(
                            &shared.table.borrow(),
                            &plan.costed(borrowed),
                            now,
                        );
                    }
                    self.allow(
                        h,
                        plan,
                        eval.levels,
                        DecidedBy::Degraded(reason),
                        borrowed,
                        now,
                    )
                } else {
                    self.over(h, plan, &eval, DecidedBy::Degraded(reason), false)
                }
            }
        }
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

/// What one answer shows about the server (`laneguard_core::peer`).
fn answer(asked_lease: bool, admitted: bool, statuses: &[DescriptorStatus]) -> Answer {
    let mut limited = statuses
        .iter()
        .filter(|s| s.current_limit.is_some())
        .peekable();
    let any_limited = limited.peek().is_some();
    Answer {
        asked_lease,
        admitted,
        quota: statuses.iter().any(|s| s.quota.is_some()),
        room_left: any_limited && limited.all(|s| s.limit_remaining > 0),
    }
}

/// Take in what the service said about each bucket: align the local mirror with its level
/// (for a bucket with room only when its `duration_until_reset` means "full again in": a
/// leasing server, `laneguard_core::peer`), and
/// record any capacity it leased to this worker, and take the service's slot for a
/// bucket it left saturated (`holds[i]` for `statuses[i]`, `LocalTable::coordinate`; empty
/// when the answer gave none).
pub(crate) fn apply_statuses(
    table: &mut LocalTable,
    attempt: &[&Bucket],
    statuses: &[DescriptorStatus],
    holds: &[u64],
    peer: Peer,
    now: u64,
) {
    for (i, (bucket, status)) in attempt.iter().zip(statuses).enumerate() {
        let refused = status.code == rls::OVER_LIMIT;
        if let (true, Some(d)) = (peer.syncs(refused), &status.duration_until_reset) {
            table.sync(bucket, rls::duration_ns(d), now);
        }
        if let Some(q) = &status.quota {
            table.grant(bucket, q.requests, quota_until(q, now), now);
        }
        if let Some(&hold) = holds.get(i) {
            table.coordinate(bucket, hold, now);
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
