//! When a worker reports the hits it admitted without the service.
//!
//! While the service cannot answer, each worker decides alone (its classes' failure modes)
//! and keeps what it admitted in its ledger ([`crate::Unreported`]); the report goes out on
//! the sync tick (`service.sync_interval_s`). Meanwhile the central bucket refills (on a
//! restarted memory store it starts full; on Redis it kept its level but refilled while no
//! call charged it). Until the report lands, the service would hand out that refill again as
//! a burst: with a 30 s sync tick, +18–19% over the budget in the 5 s after a service
//! restart. So the report is also due as soon as the service answers again after failing to:
//! the first usable answer after a failure makes it due on the next root tick.

/// One worker's reporting trigger. Pure: the shell tells it what happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReportTrigger {
    /// The last call to the service failed (no usable answer).
    down: bool,
    /// The service answered again after a failure: report on the next tick.
    due: bool,
}

impl ReportTrigger {
    /// A call to the service got no usable answer (dispatch error, error status, timeout,
    /// undecodable body).
    pub fn failed(&mut self) {
        self.down = true;
    }

    /// A call to the service got a usable answer. The first one after a failure makes the
    /// report due.
    pub fn answered(&mut self) {
        if self.down {
            self.down = false;
            self.due = true;
        }
    }

    /// Whether this tick reports: on the regular sync tick, or when the service came back
    /// since the last tick. Clears the early trigger; returns whether it was early.
    pub fn take(&mut self, sync_tick: bool) -> Due {
        let early = std::mem::take(&mut self.due);
        match (sync_tick, early) {
            (true, _) => Due::SyncTick,
            (false, true) => Due::Reconnected,
            (false, false) => Due::No,
        }
    }

    /// The service's last call failed.
    pub fn is_down(&self) -> bool {
        self.down
    }
}

/// What [`ReportTrigger::take`] says about this tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    No,
    /// The regular sync tick.
    SyncTick,
    /// The service answered again after failing: report now, not on the next sync tick.
    Reconnected,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_answer_after_a_failure_makes_the_report_due_once() {
        let mut t = ReportTrigger::default();
        t.answered();
        assert_eq!(
            t.take(false),
            Due::No,
            "answers without a failure: no early report"
        );
        t.failed();
        t.failed();
        assert!(t.is_down());
        assert_eq!(t.take(false), Due::No, "still down: nothing to report to");
        t.answered();
        assert!(!t.is_down());
        t.answered();
        assert_eq!(t.take(false), Due::Reconnected);
        assert_eq!(t.take(false), Due::No, "once per recovery");
        assert_eq!(t.take(true), Due::SyncTick);
    }

    #[test]
    fn the_sync_tick_still_reports_and_consumes_an_early_trigger() {
        let mut t = ReportTrigger::default();
        t.failed();
        t.answered();
        assert_eq!(t.take(true), Due::SyncTick);
        assert_eq!(t.take(false), Due::No);
        // A flap: failed again before the tick, answered again: due again.
        t.failed();
        t.answered();
        t.failed();
        assert_eq!(
            t.take(false),
            Due::Reconnected,
            "it did answer since the last tick"
        );
        assert_eq!(t.take(false), Due::No);
    }
}
