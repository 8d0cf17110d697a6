use super::*;
use crate::policy::parse;
use proptest::prelude::*;

const S: u64 = 1_000_000_000;

/// The engine tests' policy: ceiling 20/s; repair reserve 5/s, recovery reserve 3/s, so the
/// shared pool is 12/s; interactive 8/s and integration 10/s budgets compete for it, export
/// 4/s; tenant "big" has a 100/s ceiling.
use crate::engine::tests::POLICY;

fn policy() -> Policy {
    parse(POLICY).unwrap()
}

fn id(pairs: &[(&str, &str)]) -> BucketId {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn lane(tenant: &str, class: &str) -> BucketId {
    id(&[("tenant", tenant), ("class", class)])
}

fn usage(bucket: BucketId, allowed: u64, denied: u64, elapsed_s: u64) -> Usage {
    Usage {
        bucket_id: bucket,
        allowed,
        denied,
        elapsed_s,
    }
}

fn assigned(out: &[Outgoing], stream: StreamId, bucket: &BucketId) -> Option<TokenBucket> {
    out.iter().find_map(|(s, b, a)| match a {
        Action::Assign { bucket: tb, .. } if *s == stream && b == bucket => Some(*tb),
        _ => None,
    })
}

#[test]
fn resolve_maps_tenant_and_class_and_refuses_the_rest() {
    let p = policy();
    assert_eq!(
        resolve(&p, &lane("acme", "integration")),
        Lane::Class {
            tenant: "acme".into(),
            class: 1
        }
    );
    assert_eq!(
        resolve(&p, &id(&[("class", "integration")])),
        Lane::Refused(Refusal::NoTenant)
    );
    assert_eq!(
        resolve(&p, &id(&[("tenant", " "), ("class", "integration")])),
        Lane::Refused(Refusal::NoTenant)
    );
    assert_eq!(
        resolve(&p, &id(&[("tenant", "acme")])),
        Lane::Refused(Refusal::NoClass)
    );
    assert_eq!(
        resolve(&p, &lane("acme", "nightly")),
        Lane::Refused(Refusal::UnknownClass("nightly".into()))
    );
    // The classification rule of the Wasm filter, when the bucket names the principal.
    let erp_repair = id(&[
        ("tenant", "acme"),
        ("class", "repair"),
        ("principal", "erp"),
    ]);
    assert_eq!(
        resolve(&p, &erp_repair),
        Lane::Refused(Refusal::NotDeclarable {
            principal: "erp".into(),
            class: "repair".into()
        })
    );
    let recon_repair = id(&[
        ("tenant", "acme"),
        ("class", "repair"),
        ("principal", "recon"),
    ]);
    assert!(matches!(
        resolve(&p, &recon_repair),
        Lane::Class { class: 2, .. }
    ));
}

#[test]
fn waterfill_is_max_min_fair() {
    assert_eq!(waterfill(12.0, &[2.0, 100.0]), vec![2.0, 10.0]);
    assert_eq!(
        waterfill(12.0, &[f64::INFINITY, f64::INFINITY]),
        vec![6.0, 6.0]
    );
    assert_eq!(waterfill(12.0, &[1.0, 2.0]), vec![1.0, 2.0]);
    assert_eq!(waterfill(0.0, &[1.0]), vec![0.0]);
    assert!(waterfill(5.0, &[]).is_empty());
}

#[test]
fn a_lone_flood_gets_its_class_budget() {
    let p = policy();
    let b = allocate(&p, "acme", &[(1, Some(500.0))]);
    // 10/s over a 60 s fill interval, the full burst of 10.
    assert_eq!(
        b,
        vec![TokenBucket {
            max_tokens: 10,
            tokens_per_fill: 600,
            fill_interval_s: 60
        }]
    );
}

#[test]
fn unprotected_classes_share_the_pool_and_never_reach_a_reserve() {
    let p = policy();
    // interactive and integration both flood: the shared pool (12/s) splits 6 and 6; repair
    // keeps its 5/s reserve however hard the others push.
    let b = allocate(
        &p,
        "acme",
        &[(0, Some(900.0)), (1, Some(900.0)), (2, Some(1.0))],
    );
    assert_eq!(b[0].per_second(), 6.0);
    assert_eq!(b[1].per_second(), 6.0);
    assert_eq!(b[2].per_second(), 5.0);
    // A quiet interactive leaves room for integration, up to its budget.
    let b = allocate(&p, "acme", &[(0, Some(1.0)), (1, Some(900.0))]);
    assert_eq!(b[1].per_second(), 10.0);
    assert!(b[0].per_second() >= 1.0);
    assert!(b[0].per_second() + b[1].per_second() <= 12.0);
}

#[test]
fn a_class_rate_is_split_over_the_envoys_by_demand() {
    let p = policy();
    // Two Envoys flood integration: 5/s each. One mostly idle: it keeps what it uses and
    // half of what is left, the busy one gets the rest.
    let b = allocate(&p, "acme", &[(1, Some(100.0)), (1, Some(100.0))]);
    assert_eq!((b[0].per_second(), b[1].per_second()), (5.0, 5.0));
    assert_eq!((b[0].max_tokens, b[1].max_tokens), (5, 5));
    let b = allocate(&p, "acme", &[(1, Some(100.0)), (1, Some(2.0))]);
    assert_eq!(b[0].per_second(), 8.0);
    assert_eq!(b[1].per_second(), 2.0);
}

#[test]
fn tenant_overrides_apply() {
    let p = policy();
    // "big" has a 100/s ceiling: the shared pool is 92/s, integration stays at its budget.
    let b = allocate(&p, "big", &[(1, None)]);
    assert_eq!(b[0].per_second(), 10.0);
}

proptest! {
    /// Whatever the demands, the buckets of one tenant add up to at most its ceiling, an
    /// unprotected class never exceeds its budget, and a protected class gets its reserve.
    #[test]
    fn fleet_total_within_ceiling(
        consumers in proptest::collection::vec(
            (0usize..5, proptest::option::of(0.0f64..1000.0)), 1..12)
    ) {
        let p = policy();
        let b = allocate(&p, "acme", &consumers);
        let total: f64 = b.iter().map(TokenBucket::per_second).sum();
        // Each bucket holds at least one token per fill: 1/60 per consumer at worst.
        prop_assert!(total <= 20.0 + consumers.len() as f64 / 60.0, "total {total}");
        for class in 0..5 {
            let sum: f64 = consumers.iter().zip(&b)
                .filter(|((c, _), _)| *c == class)
                .map(|(_, tb)| tb.per_second())
                .sum();
            let n = consumers.iter().filter(|(c, _)| *c == class).count() as f64;
            let slack = n / 60.0;
            match class {
                0 => prop_assert!(sum <= 8.0 + slack),
                1 => prop_assert!(sum <= 10.0 + slack),
                2 if n > 0.0 => prop_assert!(sum >= 5.0 - slack && sum <= 5.0 + slack),
                3 if n > 0.0 => prop_assert!(sum >= 3.0 - slack && sum <= 3.0 + slack),
                4 => prop_assert!(sum <= 4.0 + slack),
                _ => {}
            }
        }
        let unprotected: f64 = consumers.iter().zip(&b)
            .filter(|((c, _), _)| matches!(c, 0 | 1 | 4))
            .map(|(_, tb)| tb.per_second())
            .sum();
        prop_assert!(unprotected <= 12.0 + consumers.len() as f64 / 60.0);
    }

    #[test]
    fn waterfill_never_exceeds_total_or_want(
        total in 0.0f64..1000.0,
        wants in proptest::collection::vec(0.0f64..500.0, 0..10)
    ) {
        let got = waterfill(total, &wants);
        prop_assert!(got.iter().sum::<f64>() <= total + 1e-9);
        for (g, w) in got.iter().zip(&wants) {
            prop_assert!(*g <= *w + 1e-9 && *g >= 0.0);
        }
    }
}

#[test]
fn book_assigns_refreshes_and_refuses() {
    let p = policy();
    let mut book = QuotaBook::new(QuotaSettings::default());
    let integ = lane("acme", "integration");
    let bad = lane("acme", "nightly");
    // The first report of a bucket (Envoy sends it when the bucket is created).
    let out = book.report(
        &p,
        1,
        &[usage(integ.clone(), 1, 0, 0), usage(bad.clone(), 0, 1, 0)],
        100 * S,
    );
    assert_eq!(assigned(&out, 1, &integ).unwrap().per_second(), 10.0);
    assert!(out.iter().any(|(s, b, a)| *s == 1
        && *b == bad
        && matches!(
            a,
            Action::DenyAll {
                ttl_s: DEFAULT_TTL_S,
                reason: Refusal::UnknownClass(_)
            }
        )));
    // The periodic report refreshes the same assignment (and so its TTL).
    let out = book.report(&p, 1, &[usage(integ.clone(), 50, 200, 5)], 105 * S);
    assert_eq!(assigned(&out, 1, &integ).unwrap().per_second(), 10.0);
    assert_eq!(book.totals().allowed, 51);
    assert_eq!(book.totals().denied, 201);
}

#[test]
fn a_second_envoy_shrinks_the_first_at_once() {
    let p = policy();
    let mut book = QuotaBook::new(QuotaSettings::default());
    let integ = lane("acme", "integration");
    book.report(&p, 1, &[usage(integ.clone(), 1, 0, 0)], 100 * S);
    book.report(&p, 1, &[usage(integ.clone(), 50, 500, 5)], 105 * S);
    // Envoy 2 appears: both get 5/s, and Envoy 1 hears of it now, not at its next report.
    let out = book.report(&p, 2, &[usage(integ.clone(), 1, 0, 0)], 106 * S);
    let one = assigned(&out, 1, &integ).unwrap();
    let two = assigned(&out, 2, &integ).unwrap();
    assert!(
        one.per_second() + two.per_second() <= 10.0,
        "{one:?} {two:?}"
    );
    assert_eq!(one.per_second(), 5.0);
    // Envoy 2 closes: Envoy 1 gets the whole budget back on its next report.
    book.close(2);
    let out = book.report(&p, 1, &[usage(integ.clone(), 25, 500, 5)], 110 * S);
    assert_eq!(assigned(&out, 1, &integ).unwrap().per_second(), 10.0);
}

#[test]
fn small_raises_keep_the_bucket_and_cuts_apply() {
    let p = policy();
    let mut book = QuotaBook::new(QuotaSettings::default());
    let (a, b) = (lane("acme", "interactive"), lane("acme", "integration"));
    // interactive floods, integration is quiet (1/s): interactive gets its budget, 8/s.
    book.report(
        &p,
        1,
        &[usage(a.clone(), 1, 0, 0), usage(b.clone(), 1, 0, 0)],
        100 * S,
    );
    let out = book.report(
        &p,
        1,
        &[usage(a.clone(), 40, 900, 5), usage(b.clone(), 5, 0, 5)],
        105 * S,
    );
    let first = assigned(&out, 1, &b).unwrap();
    // integration rises a little (1/s -> 1.2/s): its share grows by less than the raise
    // step, the bucket is kept as it was (a changed bucket would start full).
    let out = book.report(
        &p,
        1,
        &[usage(a.clone(), 40, 900, 5), usage(b.clone(), 6, 0, 5)],
        110 * S,
    );
    assert_eq!(assigned(&out, 1, &b).unwrap(), first);
    // integration floods too: interactive is cut to 6/s at once.
    let out = book.report(
        &p,
        1,
        &[usage(a.clone(), 40, 900, 5), usage(b.clone(), 30, 900, 5)],
        115 * S,
    );
    assert_eq!(assigned(&out, 1, &a).unwrap().per_second(), 6.0);
    assert_eq!(assigned(&out, 1, &b).unwrap().per_second(), 6.0);
}

#[test]
fn idle_buckets_are_abandoned() {
    let p = policy();
    let mut book = QuotaBook::new(QuotaSettings {
        idle_after_s: 20,
        ..QuotaSettings::default()
    });
    let integ = lane("acme", "integration");
    book.report(&p, 1, &[usage(integ.clone(), 1, 0, 0)], 100 * S);
    for t in [105, 110, 115] {
        let out = book.report(&p, 1, &[usage(integ.clone(), 0, 0, 5)], t * S);
        assert!(assigned(&out, 1, &integ).is_some(), "at {t}");
    }
    let out = book.report(&p, 1, &[usage(integ.clone(), 0, 0, 5)], 120 * S);
    assert_eq!(out, vec![(1, integ.clone(), Action::Abandon)]);
    assert!(book.is_empty());
    assert_eq!(book.totals().abandons, 1);
}

#[test]
fn keeps_only_small_raises() {
    let tb = |n| TokenBucket {
        max_tokens: n / 60,
        tokens_per_fill: n,
        fill_interval_s: 60,
    };
    assert!(keeps(tb(600), tb(600), 0.25));
    assert!(keeps(tb(600), tb(700), 0.25));
    assert!(!keeps(tb(600), tb(750), 0.25));
    assert!(!keeps(tb(600), tb(540), 0.25), "a cut always applies");
}
