//! One contract suite over every store: the memory store, Redis and a 3-node Redis Cluster
//! run exactly the same cases (`test_with_all_stores!`, after Limitador's
//! `test_with_all_storage_impls!`). The Redis variants start their own `redis-server`s on
//! ephemeral loopback ports (see `support`), shared by the cases of this test process; each
//! case uses its own domain, so their keys never meet.

// clippy.toml allows unwrap/expect/panic inside #[test] fns only; the helpers are test code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;

use laneguard_core::gcra::Gcra;
use laneguard_core::{key, Rate, Window};
use laneguard_service::store::redis::slot;
use laneguard_service::store::{decide, lease_size, Charge, Outcome};
use laneguard_service::{MemoryStore, RedisSettings, RedisStore, Store};

const S: u64 = 1_000_000_000;
/// A realistic wall-clock instant (2023-11-14), far above 2^53 ns: the Redis script must not
/// lose precision on it.
const T0: u64 = 1_700_000_000 * S + 123_456_789;

/// Which store a case runs over. `store()` makes a new client over the same backing state:
/// two calls are two service replicas.
pub enum Backend {
    Memory(Arc<MemoryStore>),
    Redis(String),
}

impl Backend {
    fn memory() -> Backend {
        Backend::Memory(Arc::new(MemoryStore::new()))
    }

    fn redis() -> Backend {
        Backend::Redis(support::shared_redis().url())
    }

    fn redis_cluster() -> Backend {
        Backend::Redis(support::shared_cluster().spec())
    }

    fn store(&self) -> Arc<dyn Store> {
        match self {
            Backend::Memory(m) => m.clone(),
            Backend::Redis(spec) => {
                let settings = RedisSettings {
                    // Generous: the suite shares 2 cores with concurrent builds.
                    timeout: std::time::Duration::from_secs(2),
                    ..RedisSettings::default()
                };
                Arc::new(RedisStore::from_spec(spec, settings).unwrap())
            }
        }
    }
}

/// A bucket of one case: its key (in the case's own domain) and rate.
#[derive(Clone)]
struct B {
    key: String,
    rate: Rate,
}

impl B {
    fn new(domain: &str, entries: &[(&str, &str)], n: u32, window: Window, burst: u32) -> B {
        B {
            key: key::encode(domain, entries),
            rate: Rate::new(n, window, burst).unwrap(),
        }
    }

    fn cost(&self, cost: u32) -> Charge {
        Charge {
            key: self.key.clone(),
            rate: self.rate,
            cost,
            age_ns: 0,
        }
    }
}

async fn run(store: &dyn Store, charges: &[Charge], now: u64) -> Outcome {
    store.check_and_charge(charges, 0, now).await.unwrap()
}

async fn leased(store: &dyn Store, charges: &[Charge], lease: u32, now: u64) -> Outcome {
    store.check_and_charge(charges, lease, now).await.unwrap()
}

/// Whole cost-1 requests left in a bucket, without charging it.
async fn remaining(store: &dyn Store, b: &B, now: u64) -> u32 {
    run(store, &[b.cost(0)], now).await.buckets[0].remaining
}

mod cases {
    use super::*;

    pub async fn all_or_nothing(be: &Backend) {
        let s = be.store();
        let d = "all_or_nothing";
        let big = B::new(
            d,
            &[("tenant", "t"), ("bucket", "shared")],
            100,
            Window::Minute,
            100,
        );
        let small = B::new(
            d,
            &[("tenant", "t"), ("bucket", "user"), ("user", "u")],
            1,
            Window::Minute,
            1,
        );
        assert!(run(&*s, &[big.cost(1), small.cost(1)], T0).await.admitted);
        assert_eq!(remaining(&*s, &big, T0).await, 99);

        let refused = run(&*s, &[big.cost(1), small.cost(1)], T0).await;
        assert!(!refused.admitted);
        assert_eq!(refused.grant, 0);
        assert!(refused.buckets[0].has_room);
        assert!(!refused.buckets[1].has_room);
        assert_eq!(refused.buckets[0].remaining, 99);
        assert_eq!(refused.buckets[1].retry_after_ns, 60 * S);
        // The bucket that had room was not charged.
        assert_eq!(remaining(&*s, &big, T0).await, 99);
    }

    pub async fn denials_dig_no_debt(be: &Backend) {
        let s = be.store();
        let c = B::new("denials", &[("tenant", "t")], 2, Window::Second, 2).cost(1);
        assert!(run(&*s, std::slice::from_ref(&c), T0).await.admitted);
        assert!(run(&*s, std::slice::from_ref(&c), T0).await.admitted);
        for _ in 0..20 {
            assert!(!run(&*s, std::slice::from_ref(&c), T0).await.admitted);
        }
        // One interval (0.5 s) later, exactly one more fits.
        assert!(
            run(&*s, std::slice::from_ref(&c), T0 + S / 2)
                .await
                .admitted
        );
        assert!(
            !run(&*s, std::slice::from_ref(&c), T0 + S / 2)
                .await
                .admitted
        );
    }

    pub async fn refill_follows_injected_time(be: &Backend) {
        let s = be.store();
        let b = B::new("refill", &[("tenant", "t")], 60, Window::Minute, 3);
        for _ in 0..3 {
            assert!(run(&*s, &[b.cost(1)], T0).await.admitted);
        }
        let denied = run(&*s, &[b.cost(1)], T0).await;
        assert!(!denied.admitted);
        assert_eq!(denied.buckets[0].retry_after_ns, S);
        assert_eq!(denied.buckets[0].reset_ns, 3 * S);
        assert!(!run(&*s, &[b.cost(1)], T0 + S - 1).await.admitted);
        let ok = run(&*s, &[b.cost(1)], T0 + S).await;
        assert!(ok.admitted);
        assert_eq!(ok.buckets[0].remaining, 0);
        // Three intervals later the bucket is full again.
        let full = run(&*s, &[b.cost(0)], T0 + 4 * S).await;
        assert_eq!(full.buckets[0].remaining, 3);
        assert_eq!(full.buckets[0].reset_ns, 0);
    }

    pub async fn burst_bounds_what_arrives_at_once(be: &Backend) {
        let s = be.store();
        let b = B::new("burst", &[("tenant", "t")], 1000, Window::Hour, 10);
        let mut admitted = 0;
        for _ in 0..25 {
            if run(&*s, &[b.cost(1)], T0).await.admitted {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 10);
        // A weighted request larger than the burst never fits, even in a full bucket.
        let other = B::new("burst", &[("tenant", "u")], 1000, Window::Hour, 10);
        assert!(!run(&*s, &[other.cost(11)], T0).await.admitted);
        assert_eq!(remaining(&*s, &other, T0).await, 10);
    }

    pub async fn weighted_cost_is_charged_to_every_bucket(be: &Backend) {
        let s = be.store();
        let d = "weighted";
        let a = B::new(
            d,
            &[("tenant", "t"), ("bucket", "a")],
            10,
            Window::Second,
            10,
        );
        let b = B::new(
            d,
            &[("tenant", "t"), ("bucket", "b")],
            10,
            Window::Second,
            10,
        );
        let out = run(&*s, &[a.cost(4), b.cost(4)], T0).await;
        assert!(out.admitted);
        assert_eq!(out.buckets[0].remaining, 6);
        assert_eq!(out.buckets[1].remaining, 6);
        assert_eq!(out.buckets[0].reset_ns, 4 * (S / 10));
        // 7 more does not fit in either: nothing charged.
        assert!(!run(&*s, &[a.cost(7), b.cost(1)], T0).await.admitted);
        assert_eq!(remaining(&*s, &b, T0).await, 6);
    }

    pub async fn distinct_tenants_are_independent(be: &Backend) {
        let s = be.store();
        let d = "tenants";
        let t1 = B::new(
            d,
            &[("tenant", "north"), ("bucket", "shared")],
            1,
            Window::Day,
            2,
        );
        let t2 = B::new(
            d,
            &[("tenant", "south"), ("bucket", "shared")],
            1,
            Window::Day,
            2,
        );
        assert!(run(&*s, &[t1.cost(2)], T0).await.admitted);
        assert!(!run(&*s, &[t1.cost(1)], T0).await.admitted);
        assert_eq!(remaining(&*s, &t2, T0).await, 2);
        assert!(run(&*s, &[t2.cost(1)], T0).await.admitted);
        // Keys that differ only by escaping are different buckets.
        let odd = B::new(d, &[("tenant", "north:shared")], 1, Window::Day, 2);
        assert_eq!(remaining(&*s, &odd, T0).await, 2);
    }

    /// A model's total-capacity bucket has no tenant, so (in a cluster) it lives in another
    /// hash slot than the tenant's buckets: the request spans two script calls and must still
    /// be all or nothing.
    pub async fn cross_slot_model_total_is_all_or_nothing(be: &Backend) {
        let s = be.store();
        let d = "cross_slot";
        let shared = B::new(
            d,
            &[("tenant", "acme"), ("bucket", "shared")],
            100,
            Window::Minute,
            100,
        );
        let model = B::new(
            d,
            &[("tenant", "acme"), ("bucket", "model"), ("model", "m1")],
            50,
            Window::Minute,
            50,
        );
        let total = B::new(
            d,
            &[("bucket", "model_total"), ("model", "m1")],
            3,
            Window::Minute,
            3,
        );
        assert_ne!(
            slot(&shared.key),
            slot(&total.key),
            "the case needs two slots"
        );
        assert_eq!(slot(&shared.key), slot(&model.key));
        let req = |cost| vec![shared.cost(cost), model.cost(cost), total.cost(cost)];

        let ok = run(&*s, &req(2), T0).await;
        assert!(ok.admitted);
        assert_eq!(
            ok.buckets.iter().map(|b| b.remaining).collect::<Vec<_>>(),
            vec![98, 48, 1]
        );
        // The model total (in the second slot) is short: the tenant's buckets (charged first,
        // in the first slot) are refunded.
        let refused = run(&*s, &req(2), T0).await;
        assert!(!refused.admitted);
        assert!(!refused.buckets[2].has_room);
        assert_eq!(refused.buckets[0].remaining, 98);
        assert_eq!(remaining(&*s, &shared, T0).await, 98);
        assert_eq!(remaining(&*s, &model, T0).await, 48);
        assert_eq!(remaining(&*s, &total, T0).await, 1);

        // The tenant side is short (first slot refuses): the model total is not touched.
        let tight = B::new(
            d,
            &[("tenant", "acme"), ("bucket", "user"), ("user", "u")],
            1,
            Window::Hour,
            1,
        );
        assert!(run(&*s, &[tight.cost(1)], T0).await.admitted);
        let refused = run(&*s, &[tight.cost(1), total.cost(1)], T0).await;
        assert!(!refused.admitted);
        assert!(!refused.buckets[0].has_room);
        assert!(refused.buckets[1].has_room);
        assert_eq!(refused.buckets[1].remaining, 1);
        assert_eq!(remaining(&*s, &total, T0).await, 1);

        // The model total first in the request, tenant short: still nothing charged.
        let refused = run(&*s, &[total.cost(1), tight.cost(1)], T0).await;
        assert!(!refused.admitted);
        assert_eq!(remaining(&*s, &total, T0).await, 1);

        // A lease across slots is sized by the tightest bucket anywhere, and each slot is
        // charged exactly that much.
        let out = leased(&*s, &[shared.cost(1), total.cost(0)], 50, T0 + 20 * S).await;
        assert!(out.admitted);
        // total: 1 left at T0, +1 per 20 s: 2 left, nothing charged by cost 0 -> room 2.
        // Of a burst of 3 it gives at most 1 (half, rounded down).
        assert_eq!(out.grant, lease_size(&[(2, 3)], 50));
        assert_eq!(out.grant, 1);
        // shared: full again by T0 + 20 s (100), - 1 - grant 1. In a cluster its slot first
        // granted up to half its own burst (50) and was refunded the excess.
        assert_eq!(out.buckets[0].remaining, 98);
        assert_eq!(remaining(&*s, &shared, T0 + 20 * S).await, 98);
        assert_eq!(remaining(&*s, &total, T0 + 20 * S).await, 1);
    }

    pub async fn many_keys_in_one_request(be: &Backend) {
        let s = be.store();
        let d = "many_keys";
        let mut buckets = Vec::new();
        for t in ["a", "b", "c"] {
            for u in 0..10 {
                let user = format!("user-{u}");
                buckets.push(B::new(
                    d,
                    &[("tenant", t), ("bucket", "user"), ("user", &user)],
                    10,
                    Window::Minute,
                    5,
                ));
            }
        }
        for m in 0..5 {
            let model = format!("model-{m}");
            buckets.push(B::new(
                d,
                &[("bucket", "model_total"), ("model", &model)],
                10,
                Window::Minute,
                5,
            ));
        }
        let mut charges: Vec<Charge> = buckets.iter().map(|b| b.cost(1)).collect();
        // A bucket named twice is charged twice.
        charges.push(buckets[0].cost(1));
        let out = run(&*s, &charges, T0).await;
        assert!(out.admitted);
        assert_eq!(out.buckets.len(), charges.len());
        assert_eq!(out.buckets[0].remaining, 3);
        assert_eq!(out.buckets[1].remaining, 4);
        assert_eq!(*out.buckets.last().unwrap(), out.buckets[0]);

        // Spend one bucket in the middle: the whole request is refused, nothing charged.
        assert!(run(&*s, &[buckets[17].cost(4)], T0).await.admitted);
        let refused = run(&*s, &charges, T0).await;
        assert!(!refused.admitted);
        assert!(!refused.buckets[17].has_room);
        for (i, b) in buckets.iter().enumerate() {
            let want = match i {
                0 => 3,
                17 => 0,
                _ => 4,
            };
            assert_eq!(remaining(&*s, b, T0).await, want, "bucket {i}");
        }
    }

    pub async fn report_only_charges_nothing(be: &Backend) {
        let s = be.store();
        let b = B::new("report", &[("tenant", "t")], 5, Window::Second, 5);
        for _ in 0..10 {
            let out = run(&*s, &[b.cost(0)], T0).await;
            assert!(out.admitted);
            assert_eq!(out.buckets[0].remaining, 5);
        }
        assert!(run(&*s, &[b.cost(5)], T0).await.admitted);
        let out = run(&*s, &[b.cost(0)], T0).await;
        assert!(out.admitted);
        assert_eq!(out.buckets[0].remaining, 0);
    }

    pub async fn grants_are_prepaid_and_sized_by_the_tightest_bucket(be: &Backend) {
        let s = be.store();
        let d = "grants";
        let wide = B::new(
            d,
            &[("tenant", "t"), ("bucket", "shared")],
            100,
            Window::Second,
            100,
        );
        let narrow = B::new(
            d,
            &[("tenant", "t"), ("bucket", "class"), ("class", "c")],
            10,
            Window::Second,
            41,
        );
        let req = [wide.cost(1), narrow.cost(1)];

        // narrow has 40 left after the request: it gives up to half its burst of 41, 20;
        // wide (99 left, burst 100) would give 50; asked 50 -> 20.
        let out = leased(&*s, &req, 50, T0).await;
        assert!(out.admitted);
        assert_eq!(out.grant, 20);
        // Statuses count the grant as spent.
        assert_eq!(out.buckets[0].remaining, 79);
        assert_eq!(out.buckets[1].remaining, 20);
        assert_eq!(remaining(&*s, &wide, T0).await, 79);
        assert_eq!(remaining(&*s, &narrow, T0).await, 20);

        // Never more than asked.
        let out = leased(&*s, &req, 3, T0).await;
        assert_eq!(out.grant, 3);
        assert_eq!(remaining(&*s, &narrow, T0).await, 16);

        // Asking for nothing grants nothing.
        let out = leased(&*s, &req, 0, T0).await;
        assert_eq!(out.grant, 0);
        assert_eq!(remaining(&*s, &narrow, T0).await, 15);

        // Draining with leases: what is admitted plus what is granted never exceeds the
        // bucket. Under half the burst left, a grant is all of the room: one ask empties it.
        let mut spent = 41 - 15;
        let mut grants = Vec::new();
        loop {
            let out = leased(&*s, &req, 1000, T0).await;
            if !out.admitted {
                assert_eq!(out.grant, 0, "a refused request gets no grant");
                break;
            }
            spent += 1 + out.grant;
            grants.push(out.grant);
        }
        assert_eq!(spent, 41, "grants {grants:?}");
        assert!(grants.windows(2).all(|w| w[0] >= w[1]), "{grants:?}");
        assert_eq!(grants, vec![14]);
    }

    /// A long pseudo-random sequence of requests (odd rates, weighted costs, leases, repeated
    /// keys, nanosecond time steps) gives exactly the answers of the pure reference decision.
    pub async fn matches_the_reference_decision(be: &Backend) {
        let s = be.store();
        let reference = MemoryStore::new();
        let d = "reference";
        let mut pool = Vec::new();
        let rates = [
            (3, Window::Second, 2),
            (7, Window::Second, 7),
            (10, Window::Minute, 4),
            (1, Window::Hour, 3),
            (1000, Window::Day, 9),
            (13, Window::Minute, 1),
        ];
        for (i, (n, w, burst)) in rates.into_iter().enumerate() {
            let bucket = format!("b{i}");
            pool.push(B::new(
                d,
                &[("tenant", "t"), ("bucket", &bucket)],
                n,
                w,
                burst,
            ));
        }
        pool.push(B::new(
            d,
            &[("bucket", "model_total"), ("model", "m")],
            5,
            Window::Second,
            3,
        ));
        pool.push(B::new(
            d,
            &[("tenant", "other"), ("bucket", "shared")],
            2,
            Window::Second,
            2,
        ));

        let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % m
        };
        let mut now = T0;
        for step in 0..300 {
            now += match next(4) {
                0 => 0,
                1 => next(1000) + 1,
                2 => next(400_000_000),
                _ => next(3) * S + next(S),
            };
            let n = 1 + next(3) as usize;
            let charges: Vec<Charge> = (0..n)
                .map(|_| pool[next(pool.len() as u64) as usize].cost(next(3) as u32))
                .collect();
            if next(8) == 0 {
                // A report of hits admitted elsewhere, now and then.
                let want = reference.report_now(&charges, now);
                let got = s.report(&charges, now).await.unwrap();
                assert_eq!(got, want, "step {step}: report {charges:?}");
                continue;
            }
            let lease = [0, 0, 1, 5, 100][next(5) as usize];
            let want = reference.check_and_charge_now(&charges, lease, now);
            let got = leased(&*s, &charges, lease, now).await;
            assert_eq!(got, want, "step {step}: charges {charges:?} lease {lease}");
        }
    }

    /// Two service replicas (two store clients) on one backend account as one.
    pub async fn two_replicas_account_as_one(be: &Backend) {
        let (r1, r2) = (be.store(), be.store());
        let d = "replicas";
        let b = B::new(
            d,
            &[("tenant", "t"), ("bucket", "shared")],
            60,
            Window::Minute,
            20,
        );
        let mut admitted = 0;
        for i in 0..40 {
            let s = if i % 2 == 0 { &r1 } else { &r2 };
            if run(&**s, &[b.cost(1)], T0).await.admitted {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 20);
        assert_eq!(remaining(&*r1, &b, T0).await, 0);
        assert_eq!(remaining(&*r2, &b, T0 + 5 * S).await, 5);

        // With leases, concurrently: admitted + granted never exceeds the bucket.
        let c = B::new(
            d,
            &[("tenant", "t"), ("bucket", "class"), ("class", "x")],
            60,
            Window::Minute,
            200,
        );
        let work = |s: Arc<dyn Store>, c: B| async move {
            let mut used = 0u32;
            for _ in 0..60 {
                let out = s.check_and_charge(&[c.cost(1)], 8, T0).await.unwrap();
                if out.admitted {
                    used += 1 + out.grant;
                }
            }
            used
        };
        let (u1, u2) = tokio::join!(work(r1.clone(), c.clone()), work(r2.clone(), c.clone()));
        assert_eq!(u1 + u2, 200, "every unit accounted for once: {u1} + {u2}");
        assert_eq!(remaining(&*r1, &c, T0).await, 0);
    }

    /// A report of hits already admitted is charged unconditionally, across slots, even into
    /// debt beyond the burst, and that debt then holds decisions shut until it drains.
    /// A report charges its hits as if onto a bucket that was empty when the first of them
    /// was admitted, `lg.age_ms` ago: max(TAT, now) + min(spent, max(0, spent + capacity -
    /// age)), the same in every store as in the core
    /// (`laneguard_core::engine::charge_reported`), across slots, with a key mentioned twice
    /// at two ages.
    pub async fn reports_charge_as_if_onto_a_bucket_empty_when_their_hits_began(be: &Backend) {
        let s = be.store();
        let d = "report_age";
        let shared = B::new(
            d,
            &[("tenant", "acme"), ("bucket", "shared")],
            10,
            Window::Second,
            10,
        );
        let total = B::new(
            d,
            &[("bucket", "model_total"), ("model", "m")],
            10,
            Window::Second,
            10,
        );
        let aged = |b: &B, cost: u32, age_ns: u64| Charge {
            age_ns,
            ..b.cost(cost)
        };
        // The fleet's traffic resumed when the service came back and took shared's burst
        // (empty at T0 + 4 s), then the report of a 4 s outage lands: 40 hits on shared (its
        // rate) charge the burst back (1 s); 60 on total (20 beyond its rate) charge 3 s.
        let now = T0 + 4 * S;
        assert!(run(&*s, &[shared.cost(10)], now).await.admitted);
        let report = [aged(&shared, 40, 4 * S), aged(&total, 60, 4 * S)];
        let reference = MemoryStore::new();
        reference.check_and_charge_now(&[shared.cost(10)], 0, now);
        let out = s.report(&report, now).await.unwrap();
        assert_eq!(out, reference.report_now(&report, now));
        assert!(!out.buckets[0].has_room);
        assert_eq!(out.buckets[0].reset_ns, 2 * S);
        assert!(!out.buckets[1].has_room);
        assert_eq!(out.buckets[1].reset_ns, 3 * S);
        assert_eq!(remaining(&*s, &shared, now + 11 * S / 10).await, 1);
        // Two mentions of one key: 15 hits over 2 s charge 0.5 s (1.5 s + the 1 s burst
        // - 2 s), then 5 as of now charge 0.5 s.
        let later = now + 10 * S;
        let twice = [aged(&shared, 15, 2 * S), aged(&shared, 5, 0)];
        let reference = MemoryStore::new();
        let out = s.report(&twice, later).await.unwrap();
        assert_eq!(out, reference.report_now(&twice, later));
        assert_eq!(out.buckets[0].remaining, 0);
        assert_eq!(out.buckets[0].reset_ns, S);
        // Ages past what the hits cost, up to u64::MAX, charge nothing and give nothing
        // back.
        let fresh = B::new(
            d,
            &[("tenant", "acme"), ("bucket", "fresh")],
            10,
            Window::Second,
            10,
        );
        assert!(run(&*s, &[total.cost(0)], later).await.admitted);
        let ancient = [aged(&fresh, 1000, u64::MAX), aged(&total, 1000, u64::MAX)];
        let out = s.report(&ancient, later).await.unwrap();
        assert_eq!(out, MemoryStore::new().report_now(&ancient, later));
        assert_eq!(out.buckets[0].remaining, 10);
        assert_eq!(out.buckets[1].remaining, 10);
    }

    pub async fn reports_charge_unconditionally(be: &Backend) {
        let s = be.store();
        let d = "reports";
        let shared = B::new(
            d,
            &[("tenant", "acme"), ("bucket", "shared")],
            10,
            Window::Second,
            10,
        );
        let user = B::new(
            d,
            &[("tenant", "acme"), ("bucket", "user"), ("user", "u")],
            10,
            Window::Second,
            10,
        );
        let total = B::new(
            d,
            &[("bucket", "model_total"), ("model", "m")],
            10,
            Window::Second,
            10,
        );
        let out = s
            .report(
                &[shared.cost(12), user.cost(3), total.cost(4), user.cost(1)],
                T0,
            )
            .await
            .unwrap();
        assert!(out.admitted);
        assert_eq!(out.grant, 0);
        assert!(!out.buckets[0].has_room);
        assert_eq!(out.buckets[0].remaining, 0);
        assert_eq!(out.buckets[0].reset_ns, 12 * (S / 10));
        assert_eq!(out.buckets[0].retry_after_ns, 3 * (S / 10));
        assert_eq!(out.buckets[1].remaining, 6);
        assert_eq!(out.buckets[3], out.buckets[1]);
        assert_eq!(remaining(&*s, &total, T0).await, 6);
        // The shared pool is in debt: refused until 300 ms later, then one fits.
        assert!(!run(&*s, &[shared.cost(1)], T0 + 299_999_999).await.admitted);
        assert!(
            run(&*s, &[shared.cost(1)], T0 + 3 * (S / 10))
                .await
                .admitted
        );
        // A report of nothing changes nothing.
        let out = s.report(&[user.cost(0)], T0).await.unwrap();
        assert_eq!(out.buckets[0].remaining, 6);

        // An absurd report (a daily bucket, u32::MAX hits) saturates the state as the core
        // does: the bucket is closed, and later requests are refused, not answered with an
        // error.
        let daily = B::new(
            d,
            &[("tenant", "acme"), ("bucket", "daily")],
            1,
            Window::Day,
            1,
        );
        let reference = MemoryStore::new();
        let absurd = [daily.cost(u32::MAX)];
        assert_eq!(
            s.report(&absurd, T0).await.unwrap(),
            reference.report_now(&absurd, T0)
        );
        let later = T0 + 1000 * S;
        let refused = run(&*s, &[daily.cost(1)], later).await;
        assert!(!refused.admitted);
        assert_eq!(
            refused,
            reference.check_and_charge_now(&[daily.cost(1)], 0, later)
        );
    }

    /// A refund (token settlement: used less than reserved) gives capacity back, across
    /// slots, never past full, and equals the reference decision.
    pub async fn refunds_give_back_never_past_full(be: &Backend) {
        let s = be.store();
        let d = "refunds";
        let alloc = B::new(
            d,
            &[
                ("tenant", "acme"),
                ("bucket", "model_tokens"),
                ("model", "m"),
            ],
            1000,
            Window::Minute,
            1000,
        );
        let total = B::new(
            d,
            &[("bucket", "model_total_tokens"), ("model", "m")],
            5000,
            Window::Minute,
            5000,
        );
        assert!(
            run(&*s, &[alloc.cost(800), total.cost(800)], T0)
                .await
                .admitted
        );
        assert!(
            !run(&*s, &[alloc.cost(300), total.cost(300)], T0)
                .await
                .admitted
        );
        let refund = [alloc.cost(700), total.cost(700)];
        let out = s.refund(&refund, T0).await.unwrap();
        assert!(out.admitted);
        assert_eq!(out.buckets[0].remaining, 900);
        assert_eq!(out.buckets[1].remaining, 4900);
        assert_eq!(remaining(&*s, &total, T0).await, 4900);
        assert!(
            run(&*s, &[alloc.cost(300), total.cost(300)], T0)
                .await
                .admitted
        );
        // Past full: clamped, and a later request sees a full bucket, as in the reference.
        let out = s.refund(&[alloc.cost(9000)], T0).await.unwrap();
        assert_eq!(out.buckets[0].remaining, 1000);
        let reference = MemoryStore::new();
        reference.check_and_charge_now(&[alloc.cost(10)], 0, T0);
        assert_eq!(
            reference.refund_now(&[alloc.cost(9000)], T0),
            s.refund(&[alloc.cost(1)], T0).await.unwrap()
        );
    }

    /// The same decision as `decide` for an admitted request with a repeated key and a
    /// lease: the grant is charged once per distinct bucket.
    pub async fn lease_with_a_repeated_key(be: &Backend) {
        let s = be.store();
        let b = B::new("repeat_lease", &[("tenant", "t")], 10, Window::Second, 20);
        let charges = [b.cost(2), b.cost(2)];
        let out = leased(&*s, &charges, 9, T0).await;
        let want = decide(&charges, &[Gcra::default(), Gcra::default()], 9, T0).outcome;
        assert_eq!(out, want);
        // 16 left of a burst of 20: it gives up to 10, asked 9.
        assert_eq!(out.grant, 9);
        assert_eq!(remaining(&*s, &b, T0).await, 7);
    }

    /// Coordinated holds (`laneguard_core::engine::ask_slot`, docs/leases.md step 3b): lease
    /// asks that leave a bucket saturated line up one gap apart, whichever replica answers
    /// them, a small take moves the line less, the line ends 500 ms out, an ask that passed
    /// its line starts afresh, and neither a plain check nor a bucket with room gets a slot.
    pub async fn saturated_lease_asks_line_up_in_slots(be: &Backend) {
        use laneguard_core::engine::{ask_gap_ns, MAX_SLOT_HOLD_NS};
        let (r1, r2) = (be.store(), be.store());
        let b = B::new(
            "slots",
            &[("tenant", "t"), ("bucket", "shared")],
            1000,
            Window::Second,
            100,
        );
        let gap = ask_gap_ns(&b.rate);
        assert_eq!(gap, 43_750_000, "7/8 of 50 units at 1 ms");
        const MS: u64 = 1_000_000;
        // A full bucket: the request and a grant of half the burst leave 49 ms of room, less
        // than 50 ms: saturated. The first in line holds one gap.
        let first = leased(&*r1, &[b.cost(1)], 1000, T0).await;
        assert!(first.admitted);
        assert_eq!(first.grant, 50);
        assert_eq!(first.buckets[0].hold_ns, gap);
        // The next asker, on the other replica, 1 ms later: behind the first.
        let second = leased(&*r2, &[b.cost(1)], 1000, T0 + MS).await;
        assert!(second.admitted && second.grant > 0);
        assert_eq!(second.buckets[0].hold_ns, 2 * gap - MS);
        // A plain check (no lease asked) neither gets a slot nor moves the line.
        let plain = run(&*r1, &[b.cost(0)], T0 + 2 * MS).await;
        assert_eq!(plain.buckets[0].hold_ns, 0);
        // A small take (the 1 ms that refilled: the request, no grant) moves the line by
        // twice its refill, not a whole gap.
        let small = leased(&*r1, &[b.cost(1)], 1000, T0 + 3 * MS).await;
        assert!(small.admitted);
        let taken = u64::from(1 + small.grant);
        assert_eq!(
            small.buckets[0].hold_ns,
            2 * gap - MS + 2 * taken * MS - 2 * MS
        );
        // The line ends MAX_SLOT_HOLD_NS out, however many ask.
        let mut at = T0 + 3 * MS;
        let mut last = 0;
        // Asks 10 ms apart each take 10 ms of refill and move the line 20 ms.
        for _ in 0..60 {
            at += 10 * MS;
            let out = leased(&*r2, &[b.cost(1)], 1000, at).await;
            last = out.buckets[0].hold_ns;
            assert!(last <= MAX_SLOT_HOLD_NS, "{last}");
        }
        assert_eq!(last, MAX_SLOT_HOLD_NS);
        // Once the line has passed, an ask starts it afresh: one gap.
        at += MAX_SLOT_HOLD_NS + 200 * MS;
        let drained = leased(&*r1, &[b.cost(1)], 1000, at).await;
        assert_eq!(drained.buckets[0].hold_ns, gap);
        // A bucket with room left after its grant is not saturated: no slot.
        let roomy = B::new(
            "slots",
            &[("tenant", "t"), ("bucket", "roomy")],
            1000,
            Window::Second,
            1000,
        );
        let out = leased(&*r2, &[roomy.cost(1)], 10, T0).await;
        assert!(out.admitted && out.grant == 10);
        assert_eq!(out.buckets[0].hold_ns, 0);
        // A request across tenants' hash tags gets none (store::slotted).
        let other = B::new(
            "slots",
            &[("tenant", "u"), ("bucket", "shared")],
            1000,
            Window::Second,
            100,
        );
        let out = leased(&*r1, &[other.cost(1), b.cost(1)], 1000, at + 100 * MS).await;
        assert!(out.admitted);
        assert!(out.buckets.iter().all(|s| s.hold_ns == 0), "{out:?}");
    }
}

macro_rules! test_with_all_stores {
    ($($case:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    cases::$case(&Backend::memory()).await
                }
            )*
        }
        mod redis {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    cases::$case(&Backend::redis()).await
                }
            )*
        }
        mod redis_cluster {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    cases::$case(&Backend::redis_cluster()).await
                }
            )*
        }
    };
}

test_with_all_stores!(
    all_or_nothing,
    denials_dig_no_debt,
    refill_follows_injected_time,
    burst_bounds_what_arrives_at_once,
    weighted_cost_is_charged_to_every_bucket,
    distinct_tenants_are_independent,
    cross_slot_model_total_is_all_or_nothing,
    many_keys_in_one_request,
    report_only_charges_nothing,
    grants_are_prepaid_and_sized_by_the_tightest_bucket,
    matches_the_reference_decision,
    two_replicas_account_as_one,
    lease_with_a_repeated_key,
    reports_charge_unconditionally,
    reports_charge_as_if_onto_a_bucket_empty_when_their_hits_began,
    refunds_give_back_never_past_full,
    saturated_lease_asks_line_up_in_slots,
);
