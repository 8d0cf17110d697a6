//! The embedded store: every bucket in one process's memory, behind one lock.
//!
//! One mutex over one map makes "check every bucket, then charge all" atomic without any
//! protocol. The critical section is a few hash lookups and the GCRA arithmetic. Full
//! (idle) buckets carry no information, since a missing key reads as a full bucket, so they
//! are swept whenever the map has doubled since the last sweep, which keeps memory bounded
//! by the buckets that are actually in debt, at amortised O(1) per request.
//!
//! Buckets in debt can still be many (a million per-day buckets cost about 126 MB), so the
//! map is also capped (`--max-buckets`, [`DEFAULT_MAX_BUCKETS`]). When a new bucket would
//! pass the cap, the store makes room for an eighth of the cap at once: idle buckets first
//! (exact: nothing is lost), then the least recently used buckets in debt. An evicted bucket
//! in debt reads as full again, so its caller may be admitted up to one more burst: the cap
//! trades that over-admission for bounded memory, and every such eviction is counted
//! (`laneguard_service_memory_evictions_total`). Making room is O(n) once per n/8 new
//! buckets: amortised O(1).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use laneguard_core::gcra::Gcra;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::{
    decide_refund, decide_report, decide_slotted, Charge, Decision, Outcome, Store, StoreFuture,
    UsageKey, UsageRow,
};

/// Never sweep maps smaller than this.
const MIN_SWEEP_LEN: usize = 1024;

/// The default cap on buckets held (`--max-buckets`): about 130 MB of buckets in debt
/// with the filter's keys.
pub const DEFAULT_MAX_BUCKETS: usize = 1_000_000;

/// The in-memory [`Store`].
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    /// The usage ledger (`Store::add_usage`): gone with the process, like the buckets.
    usage: Mutex<laneguard_core::usage::Ledger>,
    /// `laneguard_service_memory_buckets`.
    held: Gauge,
    /// `laneguard_service_memory_evictions_total`: buckets in debt evicted at the cap.
    evictions: Counter,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    state: Gcra,
    /// The bucket's slot tail (`laneguard_core::engine::ask_slot`; 0: none).
    tail_ns: u64,
    /// When a request last read or wrote the bucket: the eviction order at the cap.
    used_ns: u64,
}

#[derive(Debug)]
struct Inner {
    buckets: HashMap<String, Entry>,
    sweep_at_len: usize,
    max_buckets: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// A store capped at [`DEFAULT_MAX_BUCKETS`].
    pub fn new() -> MemoryStore {
        MemoryStore::with_max_buckets(DEFAULT_MAX_BUCKETS)
    }

    /// A store holding at most `max_buckets` buckets (at least 1).
    pub fn with_max_buckets(max_buckets: usize) -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner {
                buckets: HashMap::new(),
                sweep_at_len: MIN_SWEEP_LEN,
                max_buckets: max_buckets.max(1),
            }),
            usage: Mutex::default(),
            held: Gauge::default(),
            evictions: Counter::default(),
        }
    }

    /// Move these metrics (`Metrics::memory_store`): the bucket gauge and the eviction
    /// counter.
    pub fn with_metrics(mut self, (held, evictions): (Gauge, Counter)) -> MemoryStore {
        self.held = held;
        self.evictions = evictions;
        self
    }

    /// How many buckets are held (in debt, or not yet swept).
    pub fn len(&self) -> usize {
        self.lock().buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Buckets in debt evicted at the cap so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.get()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The critical section cannot panic between reads and writes of one request, so a
        // poisoned lock still guards consistent state.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The synchronous core of [`Store::check_and_charge`].
    pub fn check_and_charge_now(&self, charges: &[Charge], lease: u32, now_ns: u64) -> Outcome {
        self.apply(charges, now_ns, |loaded, tails| {
            decide_slotted(charges, loaded, Some(tails), lease, now_ns)
        })
    }

    /// The synchronous core of [`Store::report`].
    pub fn report_now(&self, charges: &[Charge], now_ns: u64) -> Outcome {
        self.apply(charges, now_ns, |loaded, _| {
            decide_report(charges, loaded, now_ns)
        })
    }

    /// The synchronous core of [`Store::refund`].
    pub fn refund_now(&self, charges: &[Charge], now_ns: u64) -> Outcome {
        self.apply(charges, now_ns, |loaded, _| {
            decide_refund(charges, loaded, now_ns)
        })
    }

    /// Load, decide and write back under the one lock.
    fn apply(
        &self,
        charges: &[Charge],
        now_ns: u64,
        decide: impl FnOnce(&[Gcra], &[u64]) -> Decision,
    ) -> Outcome {
        let mut inner = self.lock();
        let (loaded, tails): (Vec<Gcra>, Vec<u64>) = charges
            .iter()
            .map(|c| match inner.buckets.get_mut(&c.key) {
                Some(e) => {
                    e.used_ns = e.used_ns.max(now_ns);
                    (e.state, e.tail_ns)
                }
                None => (Gcra::default(), 0),
            })
            .unzip();
        let decision = decide(&loaded, &tails);
        if let Some(writes) = decision.writes {
            for (i, state) in writes {
                if let Some(charge) = charges.get(i) {
                    if !inner.buckets.contains_key(&charge.key)
                        && inner.buckets.len() >= inner.max_buckets
                    {
                        let evicted = inner.make_room(now_ns);
                        self.evictions.inc_by(evicted);
                    }
                    let tail_ns = inner.buckets.get(&charge.key).map_or(0, |e| e.tail_ns);
                    inner.buckets.insert(
                        charge.key.clone(),
                        Entry {
                            state,
                            tail_ns,
                            used_ns: now_ns,
                        },
                    );
                }
            }
            for (i, tail_ns) in decision.tails {
                if let Some(e) = charges.get(i).and_then(|c| inner.buckets.get_mut(&c.key)) {
                    e.tail_ns = tail_ns;
                }
            }
            inner.maybe_sweep(now_ns);
            self.held
                .set(i64::try_from(inner.buckets.len()).unwrap_or(i64::MAX));
        }
        decision.outcome
    }
}

impl Inner {
    fn maybe_sweep(&mut self, now_ns: u64) {
        if self.buckets.len() < self.sweep_at_len {
            return;
        }
        self.buckets.retain(|_, b| !b.state.is_idle(now_ns));
        self.sweep_at_len = (self.buckets.len() * 2).max(MIN_SWEEP_LEN);
    }

    /// At the cap: free an eighth of it (at least one bucket), idle buckets first, then the
    /// least recently used. Returns how many buckets in debt were evicted.
    fn make_room(&mut self, now_ns: u64) -> u64 {
        self.buckets.retain(|_, b| !b.state.is_idle(now_ns));
        let keep = self.max_buckets - (self.max_buckets / 8).max(1);
        let Some(excess) = self.buckets.len().checked_sub(keep).filter(|n| *n > 0) else {
            return 0;
        };
        // The `excess`-th oldest use is the cutoff: evict everything older, and of the
        // buckets used exactly then, only as many as still needed.
        let mut used: Vec<u64> = self.buckets.values().map(|e| e.used_ns).collect();
        let (_, &mut cutoff, _) = used.select_nth_unstable(excess - 1);
        let older = used.iter().filter(|&&u| u < cutoff).count();
        let mut ties = excess - older;
        self.buckets.retain(|_, e| {
            if e.used_ns < cutoff {
                false
            } else if e.used_ns == cutoff && ties > 0 {
                ties -= 1;
                false
            } else {
                true
            }
        });
        self.sweep_at_len = (self.buckets.len() * 2).max(MIN_SWEEP_LEN);
        u64::try_from(excess).unwrap_or(u64::MAX)
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

    fn add_usage<'a>(&'a self, rows: &'a [(UsageKey, UsageRow)]) -> StoreFuture<'a, ()> {
        let mut ledger = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        for (k, r) in rows {
            ledger.add(k.clone(), r);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn usage(&self, from_hour: u64, to_hour: u64) -> StoreFuture<'_, Vec<(UsageKey, UsageRow)>> {
        let rows = self
            .usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .rows(from_hour, to_hour);
        Box::pin(std::future::ready(Ok(rows)))
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
            age_ns: 0,
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

    /// Issue 14 item 5: a million per-day buckets cost 126 MB with no cap.
    #[test]
    fn the_cap_evicts_idle_buckets_first_then_the_least_recently_used() {
        let store = MemoryStore::with_max_buckets(80);
        let day = |k: &str| charge(k, 1, Window::Day, 1, 1);
        let second = |k: &str| charge(k, 1, Window::Second, 1, 1);
        // 40 per-day buckets in debt (used at T0 + i), then 40 per-second ones.
        for i in 0..40u64 {
            assert!(run(&store, &[day(&format!("day{i}"))], T0 + i).admitted);
        }
        for i in 0..40 {
            assert!(run(&store, &[second(&format!("sec{i}"))], T0 + 100).admitted);
        }
        assert_eq!(store.len(), 80);
        // "day0" is used again: it is now the most recently used bucket in debt.
        assert!(!run(&store, &[day("day0")], T0 + 200).admitted);
        // Two seconds on, the per-second buckets are full: the next new bucket frees them
        // and evicts no bucket in debt.
        assert!(run(&store, &[day("new0")], T0 + 2 * S).admitted);
        assert_eq!(store.evictions(), 0);
        assert_eq!(store.len(), 41);
        // Fill to the cap with more per-day buckets; the next one evicts the 10 least
        // recently used buckets in debt (an eighth of the cap): day1..day10, not day0.
        for i in 1..40 {
            assert!(run(&store, &[day(&format!("new{i}"))], T0 + 3 * S).admitted);
        }
        assert_eq!(store.len(), 80);
        assert!(run(&store, &[day("one-more")], T0 + 4 * S).admitted);
        assert_eq!(store.evictions(), 10);
        assert_eq!(store.len(), 71);
        assert!(!run(&store, &[day("day0")], T0 + 4 * S).admitted, "kept");
        assert!(!run(&store, &[day("day11")], T0 + 4 * S).admitted, "kept");
        // An evicted bucket in debt reads as full again: the over-admission the cap trades.
        assert!(run(&store, &[day("day1")], T0 + 4 * S).admitted, "evicted");
        assert!(store.len() <= 80);
    }

    #[test]
    fn the_cap_holds_under_a_flood_of_distinct_buckets() {
        let (held, evictions) = (Gauge::default(), Counter::default());
        let store =
            MemoryStore::with_max_buckets(1000).with_metrics((held.clone(), evictions.clone()));
        for i in 0..20_000u64 {
            let c = charge(&format!("t{i}"), 1, Window::Day, 1, 1);
            assert!(run(&store, &[c], T0 + i).admitted);
            assert!(store.len() <= 1000);
        }
        assert_eq!(held.get(), i64::try_from(store.len()).unwrap());
        assert!(evictions.get() >= 19_000, "{}", evictions.get());
        // The most recent buckets are the ones kept.
        let last = charge("t19999", 1, Window::Day, 1, 1);
        assert!(!run(&store, &[last], T0 + 20_000).admitted);
    }
}
