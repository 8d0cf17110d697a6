//! Phase 1: from the request's headers to a plan, under the rollout's scope.

use super::{DecidedBy, Request};
use crate::audit;
use crate::host::{Action, Host};
use laneguard_core::audit::Event;
use laneguard_core::headers::error_body;
use laneguard_core::{logsafe, rollout};
use laneguard_core::{plan, Mode, RequestInfo};
use std::rc::Rc;

impl Request {
    pub(super) fn start(&mut self, h: &dyn Host) -> Action {
        let shared = Rc::clone(&self.shared);
        let p = &shared.policy;
        // One host call for every header (each call crosses the V8 boundary, which costs
        // more than scanning a dozen short pairs). Envoy's header names are lower case, and
        // so are the policy's (the validator lowercases them).
        let headers = h.request_headers();
        // Values are borrowed from that map: no copy per header read.
        let header = |name: &str| -> Option<&str> {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
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
            tenant,
            principal,
            user,
            declared_class: declared,
            method,
            path,
            purpose,
            model,
        };
        method.clone_into(&mut self.ctx.method);
        path.clone_into(&mut self.ctx.path);
        // The access log's caller fields, bounded and escaped, for every request the filter
        // sees (refused ones too): the raw headers could forge a line (issue 14, items 7, 9).
        let request_id = header("x-request-id");
        let oversized = logsafe::oversized_values(&info, request_id);
        if oversized > 0 {
            shared
                .metrics
                .oversized_declared
                .add(h, u64::from(oversized));
        }
        let fields = logsafe::caller_fields(&info, request_id);
        // A missing access-log field must never fail the request.
        let _ = h.set_filter_state(audit::CALLER_STATE, fields.as_bytes());
        let mut plan = match plan(p, &info) {
            Ok(plan) => plan,
            Err(reject) => {
                shared.metrics.count_reject(h, reject);
                let body = error_body(reject.code(), reject.detail());
                self.reply(h, reject.status(), &body, &[]);
                return Action::Pause;
            }
        };
        let mode = rollout::scope(p, &mut plan);
        self.ctx.mode = Some(mode);
        if plan.forged {
            shared.metrics.forged_class.inc(h);
            if let Some(c) = shared.metrics.class(plan.class) {
                c.forged.inc(h);
            }
            // One line a second per VM: a client can send a forged class on every request,
            // and the counters (and the audit record) already count each one.
            let gate = shared.log_gates.borrow_mut().forged.pass(h.now_ns());
            if let Some(held) = gate {
                log::warn!(
                    "laneguard: forged class: tenant={} principal={} declared={:?} granted={}{}",
                    plan.tenant,
                    plan.principal,
                    logsafe::clip(plan.declared_class.as_deref().unwrap_or("")),
                    plan.class_name,
                    logsafe::held_back(held)
                );
            }
        }
        shared.metrics.count_defaulted(h, &plan);
        // The granted class, for routing (protected lanes) and for the upstream.
        h.set_request_header(&p.classification.granted_header, &plan.class_name);

        let now = h.now_ns();
        if mode == Mode::Off {
            // Not limited, not charged, no headers.
            shared.metrics.off.inc(h);
            if let Some(c) = shared.metrics.class(plan.class) {
                c.off.inc(h);
            }
            if plan.forged {
                let rec = self.record(
                    h,
                    vec![Event::ForgedClass],
                    &plan,
                    &[],
                    &[],
                    DecidedBy::Local,
                );
                self.emit(h, rec);
            }
            return Action::Continue;
        }
        shared
            .watch
            .borrow_mut()
            .note(&plan.tenant, plan.class, now);
        if laneguard_core::ai::inspects(p, path) {
            return self.hold_for_body(h, plan, model.map(str::to_string));
        }
        self.fast_path(h, plan, now)
    }
}
