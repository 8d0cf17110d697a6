//! Bucket storage: where GCRA state lives between requests.
//!
//! A [`Store`] does one thing, atomically: for the buckets one request touches, check that
//! every bucket has room for its cost at `now`, and charge all of them or none; when the
//! caller asks for a lease and the request is admitted, also grant (and charge) a few more
//! units to every bucket in the same step. The GCRA math is `laneguard_core::gcra`;
//! [`decide`] applies it to a request's loaded states, so a store only has to load the
//! states, call [`decide`], and write the new states back without interleaving with another
//! request. The memory store holds a lock; the Redis store runs the same arithmetic as one
//! Lua script over keys that share the tenant's hash tag, and checks the script's verdict
//! against [`decide`] (`docs/storage.md`).
//!
//! Errors know whether they are transient ([`StoreError::is_transient`]); the service
//! answers a transient error with gRPC `UNAVAILABLE`, so the caller's failure mode applies.

mod memory;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use laneguard_core::gcra::Gcra;
pub use laneguard_core::usage::{Key as UsageKey, Row as UsageRow};
use laneguard_core::Rate;

pub use self::redis::{RedisSettings, RedisStore};
pub use memory::{MemoryStore, DEFAULT_MAX_BUCKETS};

/// One bucket a request wants to charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The bucket key, from `laneguard_core::key::encode`.
    pub key: String,
    pub rate: Rate,
    /// Cost units to take (the request's `hits_addend`). 0 only reports the bucket.
    pub cost: u32,
    /// A report only: how long before now the first of these hits was admitted (ns, from the
    /// descriptor entry `lg.age_ms`); the report charges only what its hits exceeded the
    /// bucket's refill over that time by (`laneguard_core::engine::charge_reported`). 0 for
    /// every other call.
    pub age_ns: u64,
}

/// What a store reports for one bucket of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketStatus {
    /// Whether this bucket had room for its cost. When the request as a whole was refused,
    /// buckets that had room report `true` and were not charged.
    pub has_room: bool,
    /// Whole cost-1 requests left: after the charge if the request was admitted, otherwise
    /// as the bucket stands (nothing was charged).
    pub remaining: u32,
    /// Nanoseconds until the bucket is full again, on the same basis as `remaining`.
    pub reset_ns: u64,
    /// Nanoseconds until this bucket would have room for its cost (0 when it has room).
    pub retry_after_ns: u64,
    /// The slot of a lease ask that left this bucket saturated: the asker should hold the
    /// bucket this long before it asks again (`laneguard_core::engine::ask_slot`,
    /// docs/leases.md step 3b). 0: no slot (no lease asked, refused, or room left).
    pub hold_ns: u64,
}

/// The result of [`Store::check_and_charge`]: `buckets[i]` answers `charges[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Every bucket had room, and all were charged.
    pub admitted: bool,
    /// Cost units granted as a lease to every bucket of the request, and already charged to
    /// each of them. 0 when no lease was asked for, when the request was refused, or when a
    /// bucket has no room left after the request.
    pub grant: u32,
    pub buckets: Vec<BucketStatus>,
}

/// A store failure. Transient failures (the backend is down, slow or contended) are answered
/// with gRPC `UNAVAILABLE`; the others are bugs or corrupt data, answered with `INTERNAL`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store backend unavailable: {0}")]
    Unavailable(String),
    #[error("store operation timed out after {0:?}")]
    Timeout(Duration),
    #[error("store contention: gave up after {attempts} attempts")]
    Contention { attempts: u32 },
    #[error("store holds invalid state for key {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// The backend refused the operation for a reason retrying will not fix (a script error,
    /// a misconfigured server).
    #[error("store backend error: {0}")]
    Backend(String),
}

impl StoreError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable(_) | StoreError::Timeout(_) | StoreError::Contention { .. } => {
                true
            }
            StoreError::Corrupt { .. } | StoreError::Backend(_) => false,
        }
    }
}

/// The future a store returns. Boxed so `Store` stays object-safe and the binary can pick a
/// backend at run time (`--store memory`, `redis://...`, `redis-cluster://...`).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Atomic all-or-nothing bucket charging. Every implementation must pass the same contract
/// (`service/tests/store_contract.rs`): nothing is charged unless every bucket has room;
/// repeated keys in one request see each other's charges; a lease is granted exactly as
/// [`decide`] grants it; state only ever depends on the `now_ns` passed in.
pub trait Store: Send + Sync + 'static {
    /// A short name for logs (`memory`, `redis`, `redis-cluster`).
    fn name(&self) -> &'static str;

    /// Check that every bucket in `charges` has room for its cost at `now_ns` and, if so,
    /// charge all of them, plus a lease of at most `lease` units (0: no lease wanted) sized
    /// as [`decide`] sizes it. `Outcome::buckets[i]` answers `charges[i]`.
    fn check_and_charge<'a>(
        &'a self,
        charges: &'a [Charge],
        lease: u32,
        now_ns: u64,
    ) -> StoreFuture<'a, Outcome>;

    /// Charge every bucket in `charges` unconditionally, as [`decide_report`] does: the
    /// hits were already admitted elsewhere (a filter in degraded mode reporting them on
    /// its sync tick), so the account must include them even if that puts a bucket in debt
    /// beyond its burst. Never refuses, never grants.
    fn report<'a>(&'a self, charges: &'a [Charge], now_ns: u64) -> StoreFuture<'a, Outcome>;

    /// Whether the backend answers now: one bounded call (Redis: `PING`). The service's gRPC
    /// health follows it (`crate::health`). A store in this process always answers.
    fn probe(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Give back every charge's cost (an AI request that used fewer tokens than it
    /// reserved, settled on the filter's sync tick): each bucket's TAT moves back by the
    /// cost, never before now, so a bucket never holds more than its burst. Never refuses.
    fn refund<'a>(&'a self, charges: &'a [Charge], now_ns: u64) -> StoreFuture<'a, Outcome> {
        let _ = (charges, now_ns);
        Box::pin(std::future::ready(Err(StoreError::Backend(format!(
            "the {} store does not take refunds",
            self.name()
        )))))
    }

    /// Add usage-ledger rows (`laneguard_core::usage`) to what the store holds: every field
    /// of each row is added to the stored row of its key, atomically per hour.
    fn add_usage<'a>(&'a self, rows: &'a [(UsageKey, UsageRow)]) -> StoreFuture<'a, ()> {
        let _ = rows;
        Box::pin(std::future::ready(Err(StoreError::Backend(format!(
            "the {} store keeps no usage ledger",
            self.name()
        )))))
    }

    /// The stored usage rows of the hours in `[from_hour, to_hour)`, in key order.
    fn usage(&self, from_hour: u64, to_hour: u64) -> StoreFuture<'_, Vec<(UsageKey, UsageRow)>> {
        let _ = (from_hour, to_hour);
        Box::pin(std::future::ready(Err(StoreError::Backend(format!(
            "the {} store keeps no usage ledger",
            self.name()
        )))))
    }
}

/// The result of [`decide`]: the outcome, and the states to write back if admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// `Some((index, state))` for the first occurrence of every distinct key, when admitted:
    /// the new state of `charges[index].key` (request and grant included). `None` when
    /// refused: write nothing.
    pub writes: Option<Vec<(usize, Gcra)>>,
    /// `(index, tail)` for every distinct key that gave a slot (`BucketStatus::hold_ns`):
    /// its new slot tail, the latest slot given, in ns since the epoch. Write these too.
    pub tails: Vec<(usize, u64)>,
}

/// How many units to grant, given each distinct bucket's `(room, burst)`, its room in whole
/// cost-1 units left after the request's own charge, and the units asked for:
/// `laneguard_core::engine::lease_grant`, the rule the filter's hold is built on. Each
/// bucket gives all of its room up to half its burst (at least 1 while there is any room),
/// the request gets the smallest of those, never more than asked. Monotone in every room,
/// which is what lets the Redis store size a cross-slot lease per slot group and take the
/// minimum. The Redis script (gcra.lua) has the same rule in Lua.
pub fn lease_size(rooms: &[(u32, u32)], asked: u32) -> u32 {
    laneguard_core::engine::lease_grant(rooms.iter().copied(), asked)
}

/// The index of the first charge with the same key, for every charge: repeated keys share
/// one state.
pub(crate) fn first_mentions(charges: &[Charge]) -> Vec<usize> {
    charges
        .iter()
        .enumerate()
        .map(|(i, c)| {
            charges[..i]
                .iter()
                .position(|earlier| earlier.key == c.key)
                .unwrap_or(i)
        })
        .collect()
}

/// A report of hits already admitted: every mention's cost is charged unconditionally, as of
/// its `age_ns` before now (`laneguard_core::engine::charge_reported`), in request order, and every distinct bucket is written. `admitted` is
/// true and `grant` 0; a bucket's status says whether it still has room for a cost-1 request
/// after the report (`has_room`), with `remaining` and `reset_ns` after the report.
pub fn decide_report(charges: &[Charge], loaded: &[Gcra], now_ns: u64) -> Decision {
    apply_unconditionally(charges, loaded, now_ns, |state, charge| {
        laneguard_core::engine::charge_reported(
            state,
            &charge.rate,
            charge.cost,
            charge.age_ns,
            now_ns,
        )
    })
}

/// A refund: every mention's cost is given back (`Gcra::refund`), never past full. Like a
/// report it never refuses; statuses say each bucket's room after it.
pub fn decide_refund(charges: &[Charge], loaded: &[Gcra], now_ns: u64) -> Decision {
    apply_unconditionally(charges, loaded, now_ns, |state, charge| {
        state.refund(&charge.rate, charge.cost, now_ns)
    })
}

fn apply_unconditionally(
    charges: &[Charge],
    loaded: &[Gcra],
    now_ns: u64,
    op: impl Fn(&mut Gcra, &Charge),
) -> Decision {
    let first = first_mentions(charges);
    let mut work: Vec<Gcra> = (0..charges.len())
        .map(|i| loaded.get(first[i]).copied().unwrap_or_default())
        .collect();
    for (i, charge) in charges.iter().enumerate() {
        op(&mut work[first[i]], charge);
    }
    let buckets = charges
        .iter()
        .enumerate()
        .map(|(i, charge)| {
            let state = work[first[i]];
            let after = state.check(&charge.rate, 0, now_ns);
            let next = state.check(&charge.rate, 1, now_ns);
            BucketStatus {
                has_room: next.allowed,
                remaining: after.remaining,
                reset_ns: after.reset_ns,
                retry_after_ns: next.retry_after_ns,
                hold_ns: 0,
            }
        })
        .collect();
    let writes = (0..charges.len())
        .filter(|&i| first[i] == i)
        .map(|i| (i, work[i]))
        .collect();
    Decision {
        outcome: Outcome {
            admitted: true,
            grant: 0,
            buckets,
        },
        writes: Some(writes),
        tails: Vec::new(),
    }
}

/// The all-or-nothing decision over a request's buckets, given their current states
/// (`loaded[i]` is the state of `charges[i].key`; a key that repeats must load the same
/// state each time). Pure: every store shares it, so the semantics cannot drift between
/// backends.
///
/// Leases: when the request is admitted and `lease > 0`, the grant is
/// [`lease_size`]`(smallest room after the request, lease)`, and it is charged once to every
/// distinct bucket (at the rate of that key's first mention). Statuses of an admitted request
/// report each bucket after the request and the grant.
pub fn decide(charges: &[Charge], loaded: &[Gcra], lease: u32, now_ns: u64) -> Decision {
    decide_slotted(charges, loaded, None, lease, now_ns)
}

/// Whether a request's buckets can be given slots ([`decide_slotted`]): all of them share
/// one hash tag (one tenant's keys, `laneguard_core::key`), so the Redis store sizes and
/// charges them in one script call, where it also gives the slots. A request that spans
/// tenants (a model's `model_total` beside a tenant's bucket) gets none, from every store:
/// its workers hold on their own (`laneguard_core::engine::hold_ns`).
pub fn slotted(charges: &[Charge]) -> bool {
    let mut tags = charges
        .iter()
        .map(|c| laneguard_core::key::hash_tag(&c.key));
    match tags.next() {
        Some(first) => first.is_some() && tags.all(|t| t == first),
        None => false,
    }
}

/// [`decide`], and the slots of a lease ask (`laneguard_core::engine::ask_slot`): with
/// `tails`, when the request is admitted and `lease > 0`, every distinct bucket that the
/// request and its grant left saturated gets a slot from its slot tail (`tails[i]` for
/// `charges[i].key`, 0 or absent for none), reported in its statuses' `hold_ns`, and its
/// new tail is in [`Decision::tails`]; only when every bucket shares one hash tag
/// ([`slotted`]). `taken` for a bucket is everything this request charged to it (each
/// mention's cost, and the grant).
pub fn decide_slotted(
    charges: &[Charge],
    loaded: &[Gcra],
    tails: Option<&[u64]>,
    lease: u32,
    now_ns: u64,
) -> Decision {
    // Repeated keys share one state, so a bucket named twice is charged twice.
    let first = first_mentions(charges);
    let state_of = |i: usize| loaded.get(first[i]).copied().unwrap_or_default();

    let mut work: Vec<Gcra> = (0..charges.len()).map(state_of).collect();
    let mut checks = Vec::with_capacity(charges.len());
    let mut admitted = true;
    for (i, charge) in charges.iter().enumerate() {
        let state = &mut work[first[i]];
        let check = state.check(&charge.rate, charge.cost, now_ns);
        if check.allowed {
            state.commit(&check);
        } else {
            admitted = false;
        }
        checks.push(check);
    }
    let distinct = || (0..charges.len()).filter(|&i| first[i] == i);

    let mut grant = 0;
    if admitted && lease > 0 {
        let rooms: Vec<(u32, u32)> = distinct()
            .map(|i| {
                let rate = &charges[i].rate;
                (work[i].check(rate, 0, now_ns).remaining, rate.burst.get())
            })
            .collect();
        grant = lease_size(&rooms, lease);
        if grant > 0 {
            for i in distinct().collect::<Vec<_>>() {
                work[i].force(&charges[i].rate, grant, now_ns);
            }
        }
    }

    let mut holds = vec![0u64; charges.len()];
    let mut new_tails = Vec::new();
    if let Some(tails) = tails.filter(|_| admitted && lease > 0 && slotted(charges)) {
        for i in distinct() {
            let rate = &charges[i].rate;
            let taken = charges
                .iter()
                .enumerate()
                .filter(|&(j, _)| first[j] == i)
                .fold(grant, |sum, (_, c)| sum.saturating_add(c.cost));
            let room = laneguard_core::engine::room_ns(&work[i], rate, now_ns);
            let tail = tails.get(i).copied().unwrap_or(0);
            if let Some((hold, tail)) =
                laneguard_core::engine::ask_slot(rate, room, taken, tail, now_ns)
            {
                holds[i] = hold;
                new_tails.push((i, tail));
            }
        }
    }

    let buckets = charges
        .iter()
        .zip(&checks)
        .enumerate()
        .map(|(i, (charge, check))| {
            if admitted {
                // After everything this request charged to the bucket (repeats and grant).
                let after = work[first[i]].check(&charge.rate, 0, now_ns);
                BucketStatus {
                    has_room: true,
                    remaining: after.remaining,
                    reset_ns: after.reset_ns,
                    retry_after_ns: 0,
                    hold_ns: holds[first[i]],
                }
            } else if !check.allowed {
                BucketStatus {
                    has_room: false,
                    remaining: check.remaining,
                    reset_ns: check.reset_ns,
                    retry_after_ns: check.retry_after_ns,
                    hold_ns: 0,
                }
            } else {
                // Refused because of another bucket: this one was not charged, so report it
                // as it stands.
                let now = state_of(i).check(&charge.rate, 0, now_ns);
                BucketStatus {
                    has_room: true,
                    remaining: now.remaining,
                    reset_ns: now.reset_ns,
                    retry_after_ns: 0,
                    hold_ns: 0,
                }
            }
        })
        .collect();

    let writes = admitted.then(|| distinct().map(|i| (i, work[i])).collect());
    Decision {
        outcome: Outcome {
            admitted,
            grant,
            buckets,
        },
        writes,
        tails: new_tails,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use laneguard_core::Window;

    const S: u64 = 1_000_000_000;

    fn charge(key: &str, n: u32, burst: u32, cost: u32) -> Charge {
        Charge {
            key: key.to_string(),
            rate: Rate::new(n, Window::Second, burst).unwrap(),
            cost,
            age_ns: 0,
        }
    }

    #[test]
    fn transient_errors_are_the_retryable_ones() {
        assert!(StoreError::Unavailable("x".into()).is_transient());
        assert!(StoreError::Timeout(Duration::from_millis(5)).is_transient());
        assert!(StoreError::Contention { attempts: 3 }.is_transient());
        assert!(!StoreError::Backend("ERR unknown command".into()).is_transient());
        assert!(!StoreError::Corrupt {
            key: "k".into(),
            reason: "r".into()
        }
        .is_transient());
    }

    #[test]
    fn refused_request_writes_nothing_and_reports_untouched_buckets_as_they_stand() {
        let charges = [charge("a", 10, 10, 1), charge("b", 1, 1, 1)];
        let full_b = Gcra::from_tat(100 * S + S); // b is spent until 101 s
        let d = decide(&charges, &[Gcra::default(), full_b], 0, 100 * S);
        assert!(!d.outcome.admitted);
        assert_eq!(d.writes, None);
        assert!(d.outcome.buckets[0].has_room);
        assert_eq!(d.outcome.buckets[0].remaining, 10);
        assert_eq!(d.outcome.buckets[0].reset_ns, 0);
        assert!(!d.outcome.buckets[1].has_room);
        assert_eq!(d.outcome.buckets[1].retry_after_ns, S);
    }

    #[test]
    fn repeated_key_is_charged_once_per_mention() {
        let charges = [charge("a", 1, 2, 1), charge("a", 1, 2, 1)];
        let d = decide(&charges, &[Gcra::default(), Gcra::default()], 0, 10 * S);
        assert!(d.outcome.admitted);
        // Both mentions report the bucket after both charges.
        assert_eq!(d.outcome.buckets[0].remaining, 0);
        assert_eq!(d.outcome.buckets[1].remaining, 0);
        let writes = d.writes.unwrap();
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0], (0, Gcra::from_tat(12 * S)));

        let three = [
            charge("a", 1, 2, 1),
            charge("a", 1, 2, 1),
            charge("a", 1, 2, 1),
        ];
        let d = decide(&three, &[Gcra::default(); 3], 0, 10 * S);
        assert!(!d.outcome.admitted);
        assert!(!d.outcome.buckets[2].has_room);
    }

    #[test]
    fn lease_is_all_of_the_room_up_to_half_the_burst_of_the_tightest_bucket() {
        // One bucket of burst 100.
        assert_eq!(lease_size(&[(0, 100)], 100), 0);
        assert_eq!(lease_size(&[(1, 100)], 100), 1);
        assert_eq!(lease_size(&[(12, 100)], 100), 12);
        assert_eq!(lease_size(&[(50, 100)], 100), 50);
        assert_eq!(lease_size(&[(99, 100)], 100), 50);
        assert_eq!(lease_size(&[(99, 100)], 5), 5);
        assert_eq!(lease_size(&[(99, 100)], 0), 0);
        // A burst of 1 still grants one unit while it has room.
        assert_eq!(lease_size(&[(1, 1)], 10), 1);
        // The tightest bucket decides: b has 9 of burst 10 left, it gives 5.
        assert_eq!(lease_size(&[(97, 100), (9, 10)], 50), 5);
        assert_eq!(lease_size(&[(97, 100), (0, 10)], 50), 0);
        assert_eq!(lease_size(&[], 50), 0);
        // Monotone in every room, so a per-group minimum equals the global one.
        for asked in [1, 3, 50] {
            for burst in [1, 2, 10, 100] {
                for room in 0..200 {
                    let with = |r| lease_size(&[(r, burst), (150, 200)], asked);
                    assert!(with(room) <= with(room + 1));
                }
            }
        }
    }

    #[test]
    fn grant_is_charged_to_every_bucket_and_sized_by_the_tightest() {
        // a: 100 per second, burst 100; b: 10 per second, burst 10.
        let charges = [charge("a", 100, 100, 1), charge("b", 10, 10, 1)];
        let d = decide(&charges, &[Gcra::default(); 2], 50, 10 * S);
        assert!(d.outcome.admitted);
        // b has 9 left after the request, of a burst of 10: it grants up to half, 5.
        assert_eq!(d.outcome.grant, 5);
        assert_eq!(d.outcome.buckets[0].remaining, 94);
        assert_eq!(d.outcome.buckets[1].remaining, 4);
        let writes = d.writes.unwrap();
        assert_eq!(writes[0], (0, Gcra::from_tat(10 * S + 6 * (S / 100))));
        assert_eq!(writes[1], (1, Gcra::from_tat(10 * S + 6 * (S / 10))));

        // Refused requests get no grant and write nothing.
        let spent = Gcra::from_tat(11 * S);
        let d = decide(&charges, &[Gcra::default(), spent], 50, 10 * S);
        assert!(!d.outcome.admitted);
        assert_eq!(d.outcome.grant, 0);
        assert_eq!(d.writes, None);

        // No room left after the request: admitted, but nothing to grant.
        let nearly = Gcra::from_tat(10 * S + 9 * (S / 10));
        let d = decide(&charges, &[Gcra::default(), nearly], 50, 10 * S);
        assert!(d.outcome.admitted);
        assert_eq!(d.outcome.grant, 0);
        assert_eq!(d.outcome.buckets[1].remaining, 0);
    }

    #[test]
    fn refunds_give_back_never_past_full() {
        let charges = [charge("a", 10, 10, 4), charge("b", 10, 10, 50)];
        let spent = Gcra::from_tat(6 * S / 10); // a holds 6 of its 10 spent
        let d = decide_refund(&charges, &[spent, spent], 0);
        assert!(d.outcome.admitted);
        assert_eq!(d.outcome.buckets[0].remaining, 8);
        assert_eq!(d.outcome.buckets[1].remaining, 10, "never past full");
    }

    #[test]
    fn reports_charge_unconditionally_even_into_debt() {
        let charges = [charge("a", 10, 10, 15), charge("b", 10, 10, 2)];
        let d = decide_report(&charges, &[Gcra::default(); 2], 0);
        assert!(d.outcome.admitted);
        assert_eq!(d.outcome.grant, 0);
        // a: 15 units at 100 ms each, 5 beyond its burst of 10.
        let writes = d.writes.unwrap();
        assert_eq!(writes[0], (0, Gcra::from_tat(1_500_000_000)));
        assert!(!d.outcome.buckets[0].has_room);
        assert_eq!(d.outcome.buckets[0].remaining, 0);
        assert_eq!(d.outcome.buckets[0].reset_ns, 1_500_000_000);
        // One more unit fits again once the debt is back under the burst: 600 ms.
        assert_eq!(d.outcome.buckets[0].retry_after_ns, 600_000_000);
        assert!(d.outcome.buckets[1].has_room);
        assert_eq!(d.outcome.buckets[1].remaining, 8);
        // The debt then holds the bucket shut as a decision would see it.
        let later = decide(&charges[..1], &[writes[0].1], 0, 500_000_000);
        assert!(!later.outcome.admitted);
    }
}
