//! The embedded store: every bucket in one process's memory, behind one lock.
//!
//! One mutex over one map makes "check every bucket, then charge all" atomic without any
//! protocol. The critical section is a few hash lookups and the GCRA arithmetic. Full
//! (idle) buckets carry no information, since a missing key reads as a full bucket, so they
//! are swept whenever the map has doubled since the last sweep, which keeps memory bounded
//! by the buckets that are actually in debt, at amortised O(1) per request.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use laneguard_core::gcra::Gcra;

use super::{decide, decide_refund, decide_report, Charge, Decision, Outcome, Store, StoreFuture};

/// Never sweep maps smaller than this.
const MIN_SWEEP_LEN: usize = 1024;

/// The in-memory [`Store`].
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    buckets: HashMap<String, Gcra>,
    sweep_at_len: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner {
                buckets: HashMap::new(),
                sweep_at_len: MIN_SWEEP_LEN,
            }),
        }
    }

    /// How many buckets are held (in debt, or not yet swept).
    pub fn len(&self) -> usize {
        self.lock().buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The critical section cannot panic between reads and writes of one request, so a
        // poisoned lock still guards consistent state.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The synchronous core of [`Store::check_and_charge`].
    pub fn check_and_charge_now(&self, charges: &[Charge], lease: u32, now_ns: u64) -> Outcome {
        self.apply(charges, now_ns, |loaded| {
            decide(charges, loaded, lease, now_ns)
        })
    }

    /// The synchronous core of [`Store::report`].
    pub fn report_now(&self, charges: &[Charge], now_ns: u64) -> Outcome {
        self.apply(charges, now_ns, |loaded| {
            decide_report(charges, loaded, now_ns)
        })
    }

    /// The synchronous core of [`Store::refund`].
    pub fn refund_now(&self, charges: &[Charge], now_ns: u64) -> Outcome {
        self.apply(charges, now_ns, |loaded| {
            decide_refund(charges, loaded, now_ns)
        })
    }

    /// Load, decide and write back under the one lock.
    fn apply(
        &self,
        charges: &[Charge],
        now_ns: u64,
        decide: impl FnOnce(&[Gcra]) -> Decision,
    ) -> Outcome {
        let mut inner = self.lock();
        let loaded: Vec<Gcra> = charges
            .iter()
            .map(|c| inner.buckets.get(&c.key).copied().unwrap_or_default())
            .collect();
        let decision = decide(&loaded);
        if let Some(writes) = decision.writes {
            for (i, state) in writes {
                if let Some(charge) = charges.get(i) {
                    inner.buckets.insert(charge.key.clone(), state);
                }
            }
            inner.maybe_sweep(now_ns);
        }
        decision.outcome
    }
}

impl Inner {
    fn maybe_sweep(&mut self, now_ns: u64) {
        if self.buckets.len() < self.sweep_at_len {
            return;
        }
        self.buckets.retain(|_, b| !b.is_idle(now_ns));
        self.sweep_at_len = (self.buckets.len() * 2).max(MIN_SWEEP_LEN);
    }
}

impl Store for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn check_and_charge<'a>(
        &'a self,
        charges: &'a [Charge],
        lease: u32,
        now_ns: u64,
    ) -> StoreFuture<'a, Outcome> {
        let outcome = self.check_and_charge_now(charges, lease, now_ns);
        Box::pin(std::future::ready(Ok(outcome)))
    }

    fn report<'a>(&'a self, charges: &'a [Charge], now_ns: u64) -> StoreFuture<'a, Outcome> {
        Box::pin(std::future::ready(Ok(self.report_now(charges, now_ns))))
    }

    fn refund<'a>(&'a self, charges: &'a [Charge], now_ns: u64) -> StoreFuture<'a, Outcome> {
        Box::pin(std::future::ready(Ok(self.refund_now(charges, now_ns))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use laneguard_core::{Rate, Window};

    const S: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * S;

    fn charge(key: &str, n: u32, window: Window, burst: u32, cost: u32) -> Charge {
        Charge {
            key: key.to_string(),
            rate: Rate::new(n, window, burst).unwrap(),
            cost,
        }
    }

    fn run(store: &MemoryStore, charges: &[Charge], now: u64) -> Outcome {
        store.check_and_charge_now(charges, 0, now)
    }

    #[test]
    fn all_or_nothing_when_one_bucket_is_full() {
        let store = MemoryStore::new();
        let big = charge("big", 100, Window::Minute, 100, 1);
        let small = charge("small", 1, Window::Minute, 1, 1);
        assert!(run(&store, &[big.clone(), small.clone()], T0).admitted);
        let before = run(&store, &[charge("big", 100, Window::Minute, 100, 0)], T0).buckets[0];
        assert_eq!(before.remaining, 99);

        let refused = run(&store, &[big.clone(), small.clone()], T0);
        assert!(!refused.admitted);
        assert!(refused.buckets[0].has_room);
        assert!(!refused.buckets[1].has_room);
        // The bucket that had room was not charged.
        assert_eq!(refused.buckets[0].remaining, 99);
        let after = run(&store, &[charge("big", 100, Window::Minute, 100, 0)], T0).buckets[0];
        assert_eq!(after, before);
    }

    #[test]
    fn nothing_is_charged_on_deny_even_after_many_denials() {
        let store = MemoryStore::new();
        let c = charge("k", 2, Window::Second, 2, 1);
        assert!(run(&store, std::slice::from_ref(&c), T0).admitted);
        assert!(run(&store, std::slice::from_ref(&c), T0).admitted);
        for _ in 0..50 {
            assert!(!run(&store, std::slice::from_ref(&c), T0).admitted);
        }
        // Refill after one interval (0.5 s) admits exactly one more: denials did not dig debt.
        assert!(run(&store, std::slice::from_ref(&c), T0 + S / 2).admitted);
        assert!(!run(&store, std::slice::from_ref(&c), T0 + S / 2).admitted);
    }

    #[test]
    fn refill_follows_injected_time() {
        let store = MemoryStore::new();
        let c = charge("k", 60, Window::Minute, 3, 1);
        for _ in 0..3 {
            assert!(run(&store, std::slice::from_ref(&c), T0).admitted);
        }
        let denied = run(&store, std::slice::from_ref(&c), T0);
        assert!(!denied.admitted);
        assert_eq!(denied.buckets[0].retry_after_ns, S);
        assert_eq!(denied.buckets[0].reset_ns, 3 * S);
        assert!(!run(&store, std::slice::from_ref(&c), T0 + S - 1).admitted);
        let ok = run(&store, std::slice::from_ref(&c), T0 + S);
        assert!(ok.admitted);
        assert_eq!(ok.buckets[0].remaining, 0);
        // Three intervals later the bucket is full again.
        let full = run(&store, &[charge("k", 60, Window::Minute, 3, 0)], T0 + 4 * S);
        assert_eq!(full.buckets[0].remaining, 3);
        assert_eq!(full.buckets[0].reset_ns, 0);
    }

    #[test]
    fn burst_bounds_what_arrives_at_once() {
        let store = MemoryStore::new();
        let c = charge("k", 1000, Window::Hour, 10, 1);
        let admitted = (0..25)
            .filter(|_| run(&store, std::slice::from_ref(&c), T0).admitted)
            .count();
        assert_eq!(admitted, 10);
        // A weighted request larger than the burst never fits.
        let heavy = charge("other", 1000, Window::Hour, 10, 11);
        assert!(!run(&MemoryStore::new(), &[heavy], T0).admitted);
    }

    #[test]
    fn weighted_cost_is_charged_to_every_bucket() {
        let store = MemoryStore::new();
        let a = charge("a", 10, Window::Second, 10, 4);
        let b = charge("b", 10, Window::Second, 10, 4);
        let out = run(&store, &[a.clone(), b.clone()], T0);
        assert!(out.admitted);
        assert_eq!(out.buckets[0].remaining, 6);
        assert_eq!(out.buckets[1].remaining, 6);
    }

    #[test]
    fn idle_buckets_are_swept() {
        let store = MemoryStore::new();
        for i in 0..MIN_SWEEP_LEN {
            let c = charge(&format!("k{i}"), 1, Window::Second, 1, 1);
            assert!(run(&store, &[c], T0).admitted);
        }
        assert!(store.len() <= MIN_SWEEP_LEN);
        // Two seconds later every bucket is full again; the next write triggers a sweep.
        for i in 0..MIN_SWEEP_LEN {
            let c = charge(&format!("later{i}"), 1, Window::Second, 1, 1);
            assert!(run(&store, &[c], T0 + 2 * S).admitted);
        }
        assert!(store.len() <= MIN_SWEEP_LEN, "len {}", store.len());
        // A swept bucket reads as full, exactly as before the sweep.
        let again = run(&store, &[charge("k0", 1, Window::Second, 1, 1)], T0 + 2 * S);
        assert!(again.admitted);
    }
}
