//! Phase 2: the local fast paths, decided without the service.

use super::{DecidedBy, Request};
use crate::host::{Action, Host};
use crate::root::{RENEW_HORIZON_NS, RENEW_LEAD_NS};
use laneguard_core::Plan;
use std::rc::Rc;

impl Request {
    /// Spend leased capacity, or refuse when the local mirror shows no room; otherwise ask
    /// the service.
    pub(super) fn fast_path(&mut self, h: &dyn Host, plan: Plan, now: u64) -> Action {
        let shared = Rc::clone(&self.shared);
        let primary = plan.attempt(false);
        // Fast path 1: capacity the service leased to this worker.
        let mut table = shared.table.borrow_mut();
        if table.try_lease(&primary, plan.cost, now) {
            if table.claim_renewal(&primary, now, RENEW_HORIZON_NS, RENEW_LEAD_NS) {
                let set = primary.iter().map(|b| (*b).clone()).collect();
                shared
                    .renewals
                    .borrow_mut()
                    .push((plan.class_name.clone(), set));
            }
            let levels = table.levels(&primary, now);
            drop(table);
            return self.allow(h, &plan, levels, DecidedBy::Local, false, now);
        }
        // Fast path 2: the local mirror already shows no room, so the fleet has none either.
        let (eval, borrowing) = table.precheck(&plan, now, 1.0);
        drop(table);
        if !eval.allowed {
            return self.over(h, &plan, &eval, DecidedBy::Local, false);
        }
        self.ask(h, plan, borrowing)
    }
}
