use super::trace::{parse_line, TraceRequest};
use super::*;
use crate::policy::parse;

const POLICY: &str = r#"
version: 1
classes:
  - { name: web, consequence: time_sensitive, budget: { per_minute: 60, burst: 5 },
      fallbacks: [queue, reject], queue: { max_wait_ms: 1500, max_depth: 2 } }
  - { name: bulk, consequence: low, budget: { per_minute: 60, burst: 3 }, fallbacks: [fallback_route, reject] }
  - { name: repair, consequence: repair, reserve: { per_minute: 6, burst: 2 }, borrow: true }
  - { name: trial, consequence: low, budget: { per_minute: 60, burst: 1 }, mode: shadow }
principals:
  - { name: w, default_class: web, may_declare: [web] }
  - { name: b, default_class: bulk, may_declare: [bulk] }
  - { name: r, default_class: repair, may_declare: [repair] }
  - { name: t, default_class: trial, may_declare: [trial] }
tenants:
  default: { ceiling: { per_minute: 120, burst: 12 } }
"#;

const T0: u64 = 1_795_000_000 * S;

fn req(line: u64, at_ms: u64, principal: &str) -> TraceRequest {
    TraceRequest {
        line,
        ts_ns: T0 + at_ms * 1_000_000,
        tenant: "acme".into(),
        principal: principal.into(),
        user: None,
        class: None,
        method: "GET".into(),
        path: "/".into(),
        purpose: None,
        model: None,
        cost: None,
        max_tokens: None,
        tokens: None,
        status: None,
        request_id: None,
    }
}

#[test]
fn a_burst_is_admitted_up_to_the_class_burst_then_limited() {
    let p = parse(POLICY).unwrap();
    let mut r = Replay::new(&p, "p", Options::default());
    let outcomes: Vec<Outcome> = (0..5).map(|i| r.decide(&req(i, 0, "b"))).collect();
    // burst 3, then the fallback route.
    assert_eq!(
        outcomes,
        [
            Outcome::Admitted,
            Outcome::Admitted,
            Outcome::Admitted,
            Outcome::Rerouted,
            Outcome::Rerouted
        ]
    );
    let rep = r.finish();
    let c = &rep.tenants["acme"].classes["bulk"];
    assert_eq!((c.offered, c.admitted, c.degraded, c.limited), (5, 3, 2, 0));
    assert_eq!(c.first_tripped.get("class:bulk"), Some(&2));
    assert_eq!(c.served_pct, 100.0);
}

#[test]
fn the_queue_charges_ahead_and_is_bounded() {
    let p = parse(POLICY).unwrap();
    let mut r = Replay::new(&p, "p", Options::default());
    let mut out = Vec::new();
    for i in 0..9 {
        out.push(r.decide(&req(i, 0, "w")));
    }
    // burst 5; one a second at 60/min: two fit a 1.5 s wait (1 s, then the depth's
    // second at 2 s is too long), the rest are refused.
    assert_eq!(&out[..5], &[Outcome::Admitted; 5]);
    assert_eq!(out[5], Outcome::Queued);
    assert!(out[6..].iter().all(|o| *o == Outcome::Limited), "{out:?}");
    let rep = r.finish();
    let c = &rep.tenants["acme"].classes["web"];
    assert_eq!((c.queued, c.limited), (1, 3));
}

#[test]
fn a_protected_class_borrows_then_is_refused_and_the_run_is_measured() {
    let p = parse(POLICY).unwrap();
    let mut r = Replay::new(&p, "p", Options::default());
    // Web and bulk take 5 + 3 = 8 of the shared pool's burst of 10 (12 - the reserve's 2).
    for i in 0..5 {
        r.decide(&req(i, 0, "w"));
    }
    for i in 0..3 {
        r.decide(&req(10 + i, 0, "b"));
    }
    // Repair: reserve burst 2, then borrows the pool's last 2, then refused.
    let out: Vec<Outcome> = (0..6).map(|i| r.decide(&req(20 + i, 0, "r"))).collect();
    assert_eq!(&out[..4], &[Outcome::Admitted; 4], "{out:?}");
    assert_eq!(&out[4..], &[Outcome::Limited; 2], "{out:?}");
    // Ten seconds later the reserve has refilled one request (6/min).
    assert_eq!(r.decide(&req(30, 10_000, "r")), Outcome::Admitted);
    let rep = r.finish();
    let lane = rep.protected.iter().find(|l| l.class == "repair").unwrap();
    assert!(lane.protected);
    assert_eq!(lane.limited, 2);
    assert_eq!(lane.longest_refusal.as_ref().unwrap().requests, 2);
    assert_eq!(lane.served_pct, 71.43);
    assert!(lane.near_misses >= 1, "borrowing is a near miss");
    assert_eq!(rep.overlap_windows.len(), 1);
    let w = &rep.overlap_windows[0];
    assert_eq!(w.lost, 2);
    assert_eq!(w.active, ["bulk", "web"]);
    assert!(rep.tenants["acme"].ceiling_ok);
    assert!(rep.tenants["acme"].ceiling.peak <= rep.tenants["acme"].ceiling.limit);
}

#[test]
fn shadow_limits_are_counted_and_let_through() {
    let p = parse(POLICY).unwrap();
    let mut r = Replay::new(&p, "p", Options::default());
    assert_eq!(r.decide(&req(1, 0, "t")), Outcome::Admitted);
    assert_eq!(r.decide(&req(2, 0, "t")), Outcome::ShadowLimited);
    let rep = r.finish();
    let c = &rep.tenants["acme"].classes["trial"];
    assert_eq!((c.admitted, c.shadow_limited, c.limited), (1, 1, 0));
    assert_eq!(c.served_pct, 50.0, "served as enforcement would");
}

#[test]
fn records_out_of_order_are_replayed_in_time_order() {
    let p = parse(POLICY).unwrap();
    let mut a = Replay::new(&p, "p", Options::default());
    let mut b = Replay::new(&p, "p", Options::default());
    let reqs: Vec<TraceRequest> = (0..20).map(|i| req(i, i * 300, "b")).collect();
    for q in &reqs {
        a.push(q.clone());
    }
    for q in reqs.iter().rev() {
        b.push(q.clone());
    }
    let (a, b) = (a.finish(), b.finish());
    assert_eq!(a.tenants, b.tenants);
    assert_eq!(a.trace.late, 0);
}

#[test]
fn unknown_names_and_bad_lines_are_reported() {
    let p = parse(POLICY).unwrap();
    let mut r = Replay::new(&p, "p", Options::default());
    let mut q = req(4, 0, "nobody");
    q.class = Some("vip".into());
    r.decide(&q);
    let mut q = req(5, 0, "b");
    q.class = Some("repair".into());
    r.decide(&q);
    let mut q = req(6, 0, "b");
    q.tenant = "bad tenant".into();
    assert_eq!(
        r.decide(&q),
        Outcome::Rejected(crate::engine::Reject::InvalidIdentity)
    );
    r.bad_line(&parse_line(7, "garbage").unwrap_err());
    let rep = r.finish();
    let kinds: Vec<(&str, &str, u64)> = rep
        .warnings
        .iter()
        .map(|w| (w.kind, w.name.as_str(), w.first_line))
        .collect();
    assert!(kinds.contains(&("unknown_class", "vip", 4)), "{kinds:?}");
    assert!(
        kinds.contains(&("unknown_principal", "nobody", 4)),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("forged_class", "b:repair", 5)),
        "{kinds:?}"
    );
    assert_eq!(rep.trace.malformed, 1);
    assert!(rep.trace.malformed_lines[0].starts_with("line 7:"));
    assert_eq!(rep.trace.rejected.invalid_identity, 1);
    assert_eq!(rep.tenants["acme"].classes["bulk"].forged, 1);
}

#[test]
fn the_json_has_the_stable_shape() {
    let p = parse(POLICY).unwrap();
    let mut r = Replay::new(&p, "policy.yaml", Options::default());
    r.push(req(1, 0, "w"));
    let v = serde_json::to_value(r.finish()).unwrap();
    assert_eq!(v["policy"], "policy.yaml");
    let c = &v["tenants"]["acme"]["classes"]["web"];
    for k in [
        "offered",
        "admitted",
        "limited",
        "shadow_limited",
        "degraded",
        "served_pct",
        "first_tripped",
    ] {
        assert!(!c[k].is_null(), "{k} missing: {c}");
    }
    assert_eq!(v["tenants"]["acme"]["ceiling_ok"], true);
}
