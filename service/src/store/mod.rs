//! Bucket storage: where GCRA state lives between requests.
//!
//! A [`Store`] does one thing, atomically: for the buckets one request touches, check that
//! every bucket has room for its cost at `now`, and charge all of them or none. The GCRA math
//! is `laneguard_core::gcra`; [`decide`] applies it to a request's loaded states, so a store
//! only has to load the states, call [`decide`], and write the new states back without
//! interleaving with another request (the memory store holds a lock; a Redis store would run
//! the same decision as one atomic script or a compare-and-swap over keys that share the
//! tenant's hash tag).
//!
//! Errors know whether they are transient ([`StoreError::is_transient`]); the service
//! answers a transient error with gRPC `UNAVAILABLE`, so the caller's failure mode applies.

mod memory;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use laneguard_core::gcra::Gcra;
use laneguard_core::Rate;

pub use memory::MemoryStore;

/// One bucket a request wants to charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The bucket key, from `laneguard_core::key::encode`.
    pub key: String,
    pub rate: Rate,
    /// Cost units to take (the request's `hits_addend`). 0 only reports the bucket.
    pub cost: u32,
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
}

/// The result of [`Store::check_and_charge`]: `buckets[i]` answers `charges[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Every bucket had room, and all were charged.
    pub admitted: bool,
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
}

impl StoreError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable(_) | StoreError::Timeout(_) | StoreError::Contention { .. } => {
                true
            }
            StoreError::Corrupt { .. } => false,
        }
    }
}

/// The future a store returns. Boxed so `Store` stays object-safe and the binary can pick a
/// backend at run time (`--store memory`, later `redis://...`).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Atomic all-or-nothing bucket charging. Every implementation must pass the same contract:
/// nothing is charged unless every bucket has room; repeated keys in one request see each
/// other's charges; state only ever depends on the `now_ns` passed in.
pub trait Store: Send + Sync + 'static {
    /// A short name for logs (`memory`, `redis`).
    fn name(&self) -> &'static str;

    /// Check that every bucket in `charges` has room for its cost at `now_ns` and, if so,
    /// charge all of them. `Outcome::buckets[i]` answers `charges[i]`.
    fn check_and_charge<'a>(
        &'a self,
        charges: &'a [Charge],
        now_ns: u64,
    ) -> StoreFuture<'a, Outcome>;
}

/// The result of [`decide`]: the outcome, and the states to write back if admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// `Some((index, state))` for the first occurrence of every distinct key, when admitted:
    /// the new state of `charges[index].key`. `None` when refused: write nothing.
    pub writes: Option<Vec<(usize, Gcra)>>,
}

/// The all-or-nothing decision over a request's buckets, given their current states
/// (`loaded[i]` is the state of `charges[i].key`; a key that repeats must load the same
/// state each time). Pure: every store shares it, so the semantics cannot drift between
/// backends.
pub fn decide(charges: &[Charge], loaded: &[Gcra], now_ns: u64) -> Decision {
    // The index of the first charge with the same key: repeated keys share one state, so a
    // bucket named twice is charged twice.
    let first: Vec<usize> = charges
        .iter()
        .enumerate()
        .map(|(i, c)| {
            charges[..i]
                .iter()
                .position(|earlier| earlier.key == c.key)
                .unwrap_or(i)
        })
        .collect();
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

    let buckets = charges
        .iter()
        .zip(&checks)
        .enumerate()
        .map(|(i, (charge, check))| {
            if admitted || !check.allowed {
                BucketStatus {
                    has_room: check.allowed,
                    remaining: check.remaining,
                    reset_ns: check.reset_ns,
                    retry_after_ns: check.retry_after_ns,
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
                }
            }
        })
        .collect();

    let writes = admitted.then(|| {
        (0..charges.len())
            .filter(|&i| first[i] == i)
            .map(|i| (i, work[i]))
            .collect()
    });
    Decision {
        outcome: Outcome { admitted, buckets },
        writes,
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
        }
    }

    #[test]
    fn transient_errors_are_the_retryable_ones() {
        assert!(StoreError::Unavailable("x".into()).is_transient());
        assert!(StoreError::Timeout(Duration::from_millis(5)).is_transient());
        assert!(StoreError::Contention { attempts: 3 }.is_transient());
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
        let d = decide(&charges, &[Gcra::default(), full_b], 100 * S);
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
        let d = decide(&charges, &[Gcra::default(), Gcra::default()], 10 * S);
        assert!(d.outcome.admitted);
        assert_eq!(d.outcome.buckets[1].remaining, 0);
        let writes = d.writes.unwrap();
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0], (0, Gcra::from_tat(12 * S)));

        let three = [
            charge("a", 1, 2, 1),
            charge("a", 1, 2, 1),
            charge("a", 1, 2, 1),
        ];
        let d = decide(&three, &[Gcra::default(); 3], 10 * S);
        assert!(!d.outcome.admitted);
        assert!(!d.outcome.buckets[2].has_room);
    }
}
