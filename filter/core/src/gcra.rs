//! The Generic Cell Rate Algorithm: a token bucket kept as one timestamp.
//!
//! State is the *theoretical arrival time* (TAT): when the bucket would be full again if no
//! more requests came. A request of cost `c` at `now` is admitted iff
//! `max(tat, now) + c·T − now ≤ burst·T`, where `T` is the emission interval. There is no
//! window to reset, so no doubling at a window boundary: over any interval of length `L`
//! a bucket admits at most `burst + L/T` cost units.
//!
//! The math is split into `check` (pure) and `commit`, so a decision over several buckets
//! can check all of them and charge none unless every one has room.

use crate::rate::Rate;

/// One bucket's state. `Default` is a full bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gcra {
    tat_ns: u64,
}

/// The outcome of checking a bucket for a cost at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    /// Whether the bucket has room for the cost.
    pub allowed: bool,
    /// The TAT the bucket would have after admitting the request.
    pub new_tat_ns: u64,
    /// Whole requests of cost 1 left after this request (if admitted) or now (if not).
    pub remaining: u32,
    /// Nanoseconds until the bucket has room for this cost (0 when allowed).
    pub retry_after_ns: u64,
    /// Nanoseconds until the bucket is full again (after this request if admitted).
    pub reset_ns: u64,
}

impl Gcra {
    pub fn from_tat(tat_ns: u64) -> Gcra {
        Gcra { tat_ns }
    }

    pub fn tat_ns(&self) -> u64 {
        self.tat_ns
    }

    /// Check whether `cost` fits at `now_ns`, without changing the bucket.
    pub fn check(&self, rate: &Rate, cost: u32, now_ns: u64) -> Check {
        let t = rate.interval_ns();
        let capacity_ns = t.saturating_mul(u64::from(rate.burst.get()));
        let base = self.tat_ns.max(now_ns);
        let new_tat = base.saturating_add(t.saturating_mul(u64::from(cost)));
        let debt_after = new_tat - now_ns;
        if debt_after <= capacity_ns {
            Check {
                allowed: true,
                new_tat_ns: new_tat,
                remaining: whole(capacity_ns - debt_after, t),
                retry_after_ns: 0,
                reset_ns: debt_after,
            }
        } else {
            let debt_now = base - now_ns;
            Check {
                allowed: false,
                new_tat_ns: new_tat,
                remaining: whole(capacity_ns.saturating_sub(debt_now), t),
                retry_after_ns: debt_after - capacity_ns,
                reset_ns: debt_now,
            }
        }
    }

    /// Apply an admitted check.
    pub fn commit(&mut self, check: &Check) {
        if check.allowed {
            self.tat_ns = check.new_tat_ns;
        }
    }

    /// Charge `cost` unconditionally (used when an authoritative answer already admitted the
    /// request, and to mirror what the rest of the fleet spent).
    pub fn force(&mut self, rate: &Rate, cost: u32, now_ns: u64) {
        let t = rate.interval_ns();
        self.tat_ns = self
            .tat_ns
            .max(now_ns)
            .saturating_add(t.saturating_mul(u64::from(cost)));
    }

    /// Give back `cost` charged earlier (a settlement that used less than it reserved).
    /// Never fills the bucket past full: the TAT does not move before `now`.
    pub fn refund(&mut self, rate: &Rate, cost: u32, now_ns: u64) {
        if self.tat_ns <= now_ns {
            return;
        }
        let back = rate.interval_ns().saturating_mul(u64::from(cost));
        self.tat_ns = self.tat_ns.saturating_sub(back).max(now_ns);
    }

    /// Whether the bucket is full (idle) at `now`: it can be dropped without losing state.
    pub fn is_idle(&self, now_ns: u64) -> bool {
        self.tat_ns <= now_ns
    }
}

fn whole(ns: u64, interval: u64) -> u32 {
    u32::try_from(ns / interval).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate::Window;
    use proptest::prelude::*;

    const S: u64 = 1_000_000_000;

    fn rate(n: u32, w: Window, b: u32) -> Rate {
        Rate::new(n, w, b).unwrap()
    }

    fn take(b: &mut Gcra, r: &Rate, cost: u32, now: u64) -> bool {
        let c = b.check(r, cost, now);
        b.commit(&c);
        c.allowed
    }

    #[test]
    fn burst_then_steady_rate() {
        let r = rate(60, Window::Minute, 5);
        let mut b = Gcra::default();
        let now = 1_000 * S;
        for i in 0..5 {
            assert!(take(&mut b, &r, 1, now), "request {i} of the burst");
        }
        let c = b.check(&r, 1, now);
        assert!(!c.allowed);
        assert_eq!(c.retry_after_ns, S);
        assert_eq!(c.remaining, 0);
        assert!(take(&mut b, &r, 1, now + S));
        assert!(!take(&mut b, &r, 1, now + S));
    }

    #[test]
    fn denied_request_is_not_charged() {
        let r = rate(1, Window::Second, 1);
        let mut b = Gcra::default();
        assert!(take(&mut b, &r, 1, 10 * S));
        let before = b;
        assert!(!take(&mut b, &r, 1, 10 * S));
        assert_eq!(b, before);
    }

    #[test]
    fn weighted_cost_and_cost_above_burst() {
        let r = rate(10, Window::Second, 5);
        let mut b = Gcra::default();
        assert!(take(&mut b, &r, 5, 10 * S));
        assert!(!take(&mut b, &r, 1, 10 * S));
        let never = Gcra::default().check(&r, 6, 10 * S);
        assert!(!never.allowed);
    }

    #[test]
    fn remaining_and_reset_when_idle() {
        let r = rate(100, Window::Minute, 20);
        let c = Gcra::default().check(&r, 1, 5 * S);
        assert!(c.allowed);
        assert_eq!(c.remaining, 19);
        assert_eq!(c.reset_ns, r.interval_ns());
    }

    /// Regression guard for the fixed-window flaw (seed 003, "edge effects at window
    /// boundaries"): a caller at the ceiling around a boundary cannot get twice the rate.
    #[test]
    fn no_doubling_at_a_window_boundary() {
        let r = rate(60, Window::Minute, 10);
        let mut b = Gcra::default();
        // Hammer every 10 ms from 0.5 s before a minute boundary to 0.5 s after it.
        let boundary = 600 * S;
        let mut admitted = 0;
        let mut t = boundary - S / 2;
        while t < boundary + S / 2 {
            if take(&mut b, &r, 1, t) {
                admitted += 1;
            }
            t += S / 100;
        }
        // A fixed window would admit 60 + 60 here; GCRA admits the burst plus one second's rate.
        assert!(admitted <= 10 + 1, "admitted {admitted}");
    }

    proptest! {
        /// Over any interval of length L, admitted cost ≤ burst + L/T (+1 for the edge).
        #[test]
        fn any_window_admits_at_most_rate_plus_burst(
            n in 1u32..200, burst_pct in 1u32..=100, gaps in prop::collection::vec(0u64..3_000_000_000, 1..300),
            costs in prop::collection::vec(1u32..4, 300),
        ) {
            let burst = (n * burst_pct / 100).max(1);
            let r = rate(n, Window::Second, burst);
            let mut b = Gcra::default();
            let mut now = 1_000 * S;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (i, g) in gaps.iter().enumerate() {
                now += g / 1000;
                let cost = costs[i];
                if take(&mut b, &r, cost, now) { admitted.push((now, u64::from(cost))); }
            }
            let t = r.interval_ns();
            for (i, &(start, _)) in admitted.iter().enumerate() {
                for len in [S / 10, S, 3 * S] {
                    let sum: u64 = admitted[i..].iter().take_while(|(at, _)| *at < start + len).map(|(_, c)| c).sum();
                    let bound = u64::from(burst) + len / t + 1;
                    prop_assert!(sum <= bound, "sum {} > bound {} over {} ns", sum, bound, len);
                }
            }
        }

        /// A check never changes state, and commit of a denial is a no-op.
        #[test]
        fn check_is_pure(tat in 0u64..10_000_000_000, now in 0u64..10_000_000_000, cost in 1u32..10) {
            let r = rate(10, Window::Second, 3);
            let b = Gcra::from_tat(tat);
            let c1 = b.check(&r, cost, now);
            let c2 = b.check(&r, cost, now);
            prop_assert_eq!(c1, c2);
            let mut b2 = b;
            if !c1.allowed { b2.commit(&c1); prop_assert_eq!(b2, b); }
        }
    }
}
