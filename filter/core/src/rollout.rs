//! Rollout: which rules a request is held to (`enforce`, `shadow`, `off`), what an
//! evaluation means under them, protected-lane near misses, and the activity a worker
//! remembers to say which classes were active when a protected lane was squeezed.
//!
//! Shadow is a judgement, not a different computation: a shadowed request is checked and
//! charged exactly as an enforced one (nothing is charged when a bucket lacks room, all of
//! them are when every bucket has room), so the shadow counters are the 429s enforcement
//! would have produced. Only the response differs: the request goes through.
//!
//! A shadowed *rule* never weakens an enforced one. When an enforced request's only full
//! buckets are shadow rules, it is not simply let through: it still has to pay every
//! enforced bucket it touches ([`enforced_part`]), through the same lease / central path as
//! any admission, and it is limited when one of those has no room. The shadow rules only
//! observe.

use crate::engine::{Bucket, BucketKind, Level, Plan};
use crate::policy::{ClassId, Mode, Policy};
use std::collections::HashMap;

/// Apply the policy's modes to a plan. Returns the request's mode. Buckets whose rule is
/// `off` are dropped (never the lane, `buckets[0]`, which follows the request's mode); when
/// the request's mode is `off` the caller skips limiting altogether.
pub fn scope(policy: &Policy, plan: &mut Plan) -> Mode {
    let mode = policy.ops.mode_for(&plan.tenant, plan.class);
    if mode == Mode::Off {
        return mode;
    }
    let family = plan.family.clone();
    let mut index = 0usize;
    plan.buckets.retain(|b| {
        let keep = index == 0 || policy.ops.bucket_mode(b, family.as_deref()) != Mode::Off;
        index += 1;
        keep
    });
    mode
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Enforced: degrade or refuse.
    Limit,
    /// Would have been limited: let through.
    ShadowLimit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judgement {
    pub verdict: Verdict,
    /// Index of the bucket to name: the first enforced bucket without room for a limit, the
    /// first without room for a shadow limit.
    pub bucket: Option<usize>,
}

/// Judge an evaluation (`room[i]`: whether `buckets[i]` had room) under the request's mode.
pub fn judge(
    policy: &Policy,
    mode: Mode,
    buckets: &[&Bucket],
    family: Option<&str>,
    room: &[bool],
) -> Judgement {
    let full: Vec<usize> = room
        .iter()
        .enumerate()
        .filter(|(_, r)| !**r)
        .map(|(i, _)| i)
        .collect();
    let Some(&first) = full.first() else {
        return Judgement {
            verdict: Verdict::Allow,
            bucket: None,
        };
    };
    if mode != Mode::Enforce {
        return Judgement {
            verdict: Verdict::ShadowLimit,
            bucket: Some(first),
        };
    }
    let enforced = full.iter().copied().find(|&i| {
        buckets
            .get(i)
            .is_none_or(|b| policy.ops.bucket_mode(b, family) == Mode::Enforce)
    });
    match enforced {
        Some(i) => Judgement {
            verdict: Verdict::Limit,
            bucket: Some(i),
        },
        None => Judgement {
            verdict: Verdict::ShadowLimit,
            bucket: Some(first),
        },
    }
}

/// What a shadow limit of a request in `mode` must still pay for: the same plan with only
/// the buckets whose rule is enforced (the lane is always one of them). `None` when the
/// request itself is not enforced: then every bucket only observes, and nothing is charged
/// for a would-be limit.
///
/// The caller decides the returned plan like any other (lease, local mirror, central call)
/// and admits the request only if it has room; it can only be judged `Allow` or `Limit`.
pub fn enforced_part(policy: &Policy, mode: Mode, plan: &Plan) -> Option<Plan> {
    if mode != Mode::Enforce {
        return None;
    }
    let family = plan.family.as_deref();
    let mut part = plan.clone();
    let mut index = 0usize;
    part.buckets.retain(|b| {
        let keep = index == 0 || policy.ops.bucket_mode(b, family) == Mode::Enforce;
        index += 1;
        keep
    });
    Some(part)
}

/// The mode a bucket's rule is recorded under, for a request in `mode`.
pub fn effective_bucket_mode(
    policy: &Policy,
    mode: Mode,
    bucket: &Bucket,
    family: Option<&str>,
) -> Mode {
    match (mode, policy.ops.bucket_mode(bucket, family)) {
        (Mode::Off, _) | (_, Mode::Off) => Mode::Off,
        (Mode::Shadow, _) | (_, Mode::Shadow) => Mode::Shadow,
        _ => Mode::Enforce,
    }
}

/// Percent of a bucket's burst in use after the request (0 to 100).
pub fn used_pct(level: &Level) -> u32 {
    if level.burst == 0 {
        return 0;
    }
    let used = u64::from(level.burst.saturating_sub(level.remaining));
    u32::try_from(used * 100 / u64::from(level.burst)).unwrap_or(100)
}

/// A protected lane that has `pct` percent or more of its burst in use is a near miss:
/// one more burst, and the protected workflow is refused.
pub fn is_near_miss(bucket: &Bucket, level: &Level, pct: u8) -> bool {
    bucket.kind == BucketKind::Reserve && used_pct(level) >= u32::from(pct)
}

/// Per worker: when each class of each tenant was last active, and in which window each
/// protected lane was last reported squeezed. Bounded: past `max_tenants` tenants, the ones
/// idle for an hour are dropped, and if none is, the table starts again.
#[derive(Debug, Clone)]
pub struct Watch {
    classes: usize,
    max_tenants: usize,
    tenants: HashMap<String, Activity>,
}

#[derive(Debug, Clone)]
struct Activity {
    last_seen_ns: Vec<u64>,
    /// Per class: 1 + the index of the window of its last reported squeeze (0: never).
    squeezed: Vec<u64>,
}

pub const DEFAULT_WATCH_TENANTS: usize = 10_000;
const IDLE_NS: u64 = 3_600 * 1_000_000_000;

impl Watch {
    pub fn new(classes: usize, max_tenants: usize) -> Watch {
        Watch {
            classes,
            max_tenants: max_tenants.max(1),
            tenants: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    /// Make sure `tenant` has an entry (allocating only for a tenant not seen yet).
    fn ensure(&mut self, tenant: &str, now_ns: u64) {
        if self.tenants.contains_key(tenant) {
            return;
        }
        if self.tenants.len() >= self.max_tenants {
            self.tenants.retain(|_, a| {
                a.last_seen_ns
                    .iter()
                    .any(|&t| t.saturating_add(IDLE_NS) > now_ns)
            });
            if self.tenants.len() >= self.max_tenants {
                self.tenants.clear();
            }
        }
        let n = self.classes;
        self.tenants.insert(
            tenant.to_string(),
            Activity {
                last_seen_ns: vec![0; n],
                squeezed: vec![0; n],
            },
        );
    }

    /// A request of `class` arrived for `tenant`.
    pub fn note(&mut self, tenant: &str, class: ClassId, now_ns: u64) {
        self.ensure(tenant, now_ns);
        if let Some(t) = self
            .tenants
            .get_mut(tenant)
            .and_then(|a| a.last_seen_ns.get_mut(class))
        {
            *t = now_ns;
        }
    }

    /// The other classes of `tenant` seen within the last `window_ns`.
    pub fn active_with(
        &self,
        tenant: &str,
        class: ClassId,
        now_ns: u64,
        window_ns: u64,
    ) -> Vec<ClassId> {
        let Some(a) = self.tenants.get(tenant) else {
            return Vec::new();
        };
        a.last_seen_ns
            .iter()
            .enumerate()
            .filter(|&(c, &t)| c != class && t != 0 && t.saturating_add(window_ns) >= now_ns)
            .map(|(c, _)| c)
            .collect()
    }

    /// Whether this is the first squeeze of `class`'s lane for `tenant` in the current
    /// window of length `window_ns` (so a squeeze is counted once per window).
    pub fn first_squeeze(
        &mut self,
        tenant: &str,
        class: ClassId,
        now_ns: u64,
        window_ns: u64,
    ) -> bool {
        let window = now_ns / window_ns.max(1) + 1;
        self.ensure(tenant, now_ns);
        match self
            .tenants
            .get_mut(tenant)
            .and_then(|a| a.squeezed.get_mut(class))
        {
            Some(w) if *w != window => {
                *w = window;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{plan, LocalTable, RequestInfo};
    use crate::policy::parse;

    const S: u64 = 1_000_000_000;

    const POLICY: &str = r#"
version: 1
rollout:
  buckets: { user: shadow }
classes:
  - { name: web, consequence: time_sensitive, budget: { per_minute: 60, burst: 2 } }
  - { name: batch, consequence: low, budget: { per_minute: 60, burst: 2 }, mode: shadow }
  - { name: repair, consequence: repair, reserve: { per_minute: 20, burst: 10 } }
principals:
  - { name: b, default_class: batch, may_declare: [batch] }
  - { name: r, default_class: repair, may_declare: [repair] }
tenants:
  default: { ceiling: { per_minute: 100, burst: 20 } }
  overrides:
    trial: { mode: shadow, classes: { web: { mode: off } } }
    onboarding: { mode: shadow }
endpoint_families:
  - { name: reports, path_prefixes: [/reports], limit: { per_minute: 10, burst: 1 }, mode: off }
users: { limit: { per_minute: 60, burst: 1 } }
"#;

    fn req<'a>(tenant: &'a str, principal: &'a str, path: &'a str) -> RequestInfo<'a> {
        RequestInfo {
            tenant: Some(tenant),
            principal: Some(principal),
            user: Some("u1"),
            declared_class: None,
            method: "GET",
            path,
            purpose: None,
            model: None,
        }
    }

    #[test]
    fn modes_resolve_most_specific_first() {
        let p = parse(POLICY).unwrap();
        let web = p.class_id("web").unwrap();
        let batch = p.class_id("batch").unwrap();
        assert_eq!(p.ops.mode_for("acme", web), Mode::Enforce, "default");
        assert_eq!(p.ops.mode_for("acme", batch), Mode::Shadow, "class");
        assert_eq!(p.ops.mode_for("onboarding", web), Mode::Shadow, "tenant");
        assert_eq!(p.ops.mode_for("trial", web), Mode::Off, "tenant class");
        assert_eq!(p.ops.mode_for("trial", batch), Mode::Shadow);
    }

    #[test]
    fn off_rules_are_not_planned_and_the_lane_always_is() {
        let p = parse(POLICY).unwrap();
        let mut pl = plan(&p, &req("acme", "web", "/reports/1")).unwrap();
        let before: Vec<String> = pl.buckets.iter().map(Bucket::name).collect();
        assert_eq!(before, ["shared", "class:web", "user", "tool:reports"]);
        assert_eq!(scope(&p, &mut pl), Mode::Enforce);
        let after: Vec<String> = pl.buckets.iter().map(Bucket::name).collect();
        assert_eq!(
            after,
            ["shared", "class:web", "user"],
            "the family's rule is off"
        );
    }

    #[test]
    fn shadow_limits_are_charged_exactly_as_enforced_ones() {
        // Same traffic through an enforced and a shadowed class: identical bucket states,
        // and every enforced 429 is a shadow limit on the other side.
        let p = parse(POLICY).unwrap();
        let mut enforced = LocalTable::default();
        let mut shadowed = LocalTable::default();
        let now = 1_000 * S;
        let mut limits = (0, 0);
        for i in 0..6 {
            let t = now + i * (S / 10);
            for (table, principal, count) in [
                (&mut enforced, "web", &mut limits.0),
                (&mut shadowed, "b", &mut limits.1),
            ] {
                let mut pl = plan(
                    &p,
                    &RequestInfo {
                        user: None,
                        ..req("acme", principal, "/")
                    },
                )
                .unwrap();
                let mode = scope(&p, &mut pl);
                let (eval, _) = table.decide(&pl, t, 1.0);
                let room: Vec<bool> = eval.levels.iter().map(|l| l.has_room).collect();
                let j = judge(&p, mode, &pl.attempt(false), None, &room);
                match (principal, j.verdict) {
                    ("web", Verdict::Limit) | ("b", Verdict::ShadowLimit) => *count += 1,
                    (_, Verdict::Allow) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(limits.0, 4, "burst 2 of 6 quick requests");
        assert_eq!(limits, (4, 4));
    }

    #[test]
    fn a_shadowed_rule_alone_does_not_limit() {
        let p = parse(POLICY).unwrap();
        let pl = plan(&p, &req("acme", "web", "/")).unwrap();
        let b = pl.attempt(false);
        // user (index 2) is full, the rest has room.
        let j = judge(&p, Mode::Enforce, &b, None, &[true, true, false]);
        assert_eq!(
            j,
            Judgement {
                verdict: Verdict::ShadowLimit,
                bucket: Some(2)
            }
        );
        // an enforced bucket is full too: limit, and name the enforced one.
        let j = judge(&p, Mode::Enforce, &b, None, &[true, false, false]);
        assert_eq!(
            j,
            Judgement {
                verdict: Verdict::Limit,
                bucket: Some(1)
            }
        );
        let j = judge(&p, Mode::Shadow, &b, None, &[false, true, true]);
        assert_eq!(j.verdict, Verdict::ShadowLimit);
        assert_eq!(
            judge(&p, Mode::Enforce, &b, None, &[true; 3]).verdict,
            Verdict::Allow
        );
    }

    /// Issue 13 item 1: a class budget in shadow, the tenant ceiling enforced. Once the
    /// shadowed budget is full, every request is a shadow limit; each must still be paid
    /// for by the enforced buckets, so the tenant's admitted total stays within its ceiling.
    #[test]
    fn a_full_shadow_rule_does_not_switch_off_the_enforced_ceiling() {
        let text = r#"
version: 1
rollout:
  buckets: { class: shadow }
classes:
  - { name: integration, consequence: time_sensitive, budget: { per_minute: 6, burst: 2 } }
  - { name: repair, consequence: repair, reserve: { per_minute: 6, burst: 2 } }
tenants:
  default: { ceiling: { per_minute: 60, burst: 12 } }
"#;
        let p = parse(text).unwrap();
        let mut table = LocalTable::default();
        let now = 1_000 * S;
        let (mut admitted, mut shadow, mut limited) = (0, 0, 0);
        for _ in 0..100 {
            let mut pl = plan(&p, &req("acme", "anyone", "/")).unwrap();
            pl.user = None;
            pl.buckets.retain(|b| b.kind != BucketKind::User);
            let mode = scope(&p, &mut pl);
            let (eval, _) = table.decide(&pl, now, 1.0);
            if eval.allowed {
                admitted += 1;
                continue;
            }
            let room: Vec<bool> = eval.levels.iter().map(|l| l.has_room).collect();
            let j = judge(&p, mode, &pl.attempt(false), None, &room);
            match j.verdict {
                Verdict::ShadowLimit => {
                    shadow += 1;
                    let part = enforced_part(&p, mode, &pl).expect("an enforced request");
                    assert!(part.buckets.iter().all(|b| b.kind != BucketKind::Class));
                    let (eval, _) = table.decide(&part, now, 1.0);
                    let room: Vec<bool> = eval.levels.iter().map(|l| l.has_room).collect();
                    let j = judge(&p, mode, &part.attempt(false), None, &room);
                    match j.verdict {
                        Verdict::Allow => admitted += 1,
                        Verdict::Limit => limited += 1,
                        Verdict::ShadowLimit => panic!("the enforced part has no shadow rule"),
                    }
                }
                Verdict::Limit => limited += 1,
                Verdict::Allow => panic!("no room but allowed"),
            }
        }
        // The shared pool (ceiling 12 minus the reserve's 2) admits 10 at once, no more.
        assert_eq!(admitted, 10, "shadow {shadow}, limited {limited}");
        assert!(shadow >= 8, "the class budget (burst 2) was shadow-full");
        assert_eq!(limited, 90);
        // A request in shadow mode pays nothing for a would-be limit.
        let mut pl = plan(&p, &req("acme", "anyone", "/")).unwrap();
        assert!(enforced_part(&p, Mode::Shadow, &pl).is_none());
        assert_eq!(scope(&p, &mut pl), Mode::Enforce);
    }

    #[test]
    fn near_miss_is_ninety_percent_of_a_protected_lane() {
        let p = parse(POLICY).unwrap();
        let pl = plan(
            &p,
            &RequestInfo {
                user: None,
                ..req("acme", "r", "/")
            },
        )
        .unwrap();
        let lane = &pl.buckets[0];
        let mut t = LocalTable::default();
        let now = 1_000 * S;
        let mut misses = Vec::new();
        for _ in 0..10 {
            let (eval, _) = t.decide(&pl, now, 1.0);
            misses.push(is_near_miss(lane, &eval.levels[0], p.ops.near_miss_pct));
        }
        // burst 10: after the 9th request 9 of 10 are used.
        assert_eq!(misses.iter().filter(|m| **m).count(), 2, "{misses:?}");
        assert!(misses[8] && misses[9]);
        let shared = plan(
            &p,
            &RequestInfo {
                user: None,
                ..req("acme", "web", "/")
            },
        )
        .unwrap();
        let (eval, _) = t.decide(&shared, now, 1.0);
        assert!(
            !is_near_miss(&shared.buckets[0], &eval.levels[0], 1),
            "not a protected lane"
        );
    }

    #[test]
    fn watch_reports_active_classes_and_one_squeeze_per_window() {
        let mut w = Watch::new(3, 10);
        let now = 1_000 * S;
        w.note("t", 0, now - 30 * S);
        w.note("t", 1, now - 90 * S);
        w.note("t", 2, now);
        w.note("other", 1, now);
        assert_eq!(w.active_with("t", 2, now, 60 * S), vec![0]);
        assert!(w.first_squeeze("t", 2, now, 60 * S));
        assert!(!w.first_squeeze("t", 2, now + S, 60 * S));
        assert!(w.first_squeeze("t", 2, now + 60 * S, 60 * S));
    }

    #[test]
    fn watch_is_bounded() {
        let mut w = Watch::new(2, 100);
        for i in 0..10_000u64 {
            w.note(&format!("tenant-{i}"), 0, 1_000 * S + i);
        }
        assert!(w.len() <= 100);
    }
}
