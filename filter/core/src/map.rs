//! The traffic competition map (seed 000, "Asset: The Tenant Traffic Competition Map"),
//! computed from a validated policy.
//!
//! One row per class (tenant segment, source identity, endpoint families, purpose, failure
//! consequence, burst shape, who it may and must not compete with, fallback, owner), and the
//! two questions the seed says the map must answer from the policy itself:
//! **who shares identity** (principals that can land in more than one class, and whether one
//! can reach both a protected and an unprotected class) and **who shares a budget** (the
//! pools: the tenant's shared pool, each reserve, and the buckets that cut across classes,
//! an endpoint family's `limit` and the per-user `users.limit`).
//!
//! A pair of classes that must not compete but draw from one pool is a [`Collision`]. The
//! validator already refuses two unprotected classes that must not compete (they share the
//! shared pool by construction); what is left are the pools that cut across lanes, and
//! borrowing, which is opportunistic (idle shared capacity above a reserve) and so reported
//! apart (`guaranteed: false`).

use crate::policy::{ClassId, Policy, TenantPlan};
use crate::rate::{Rate, Window};
use serde::Serialize;
use std::collections::BTreeSet;

/// A rate as the map prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RateView {
    pub requests: u32,
    /// `second`, `minute`, `hour` or `day`.
    pub per: &'static str,
    pub burst: u32,
}

impl RateView {
    pub fn new(r: &Rate) -> RateView {
        RateView {
            requests: r.requests.get(),
            per: window_name(r.window),
            burst: r.burst.get(),
        }
    }
}

impl std::fmt::Display for RateView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per = match self.per {
            "second" => "s",
            "minute" => "min",
            "hour" => "h",
            _ => "day",
        };
        write!(f, "{}/{per} burst {}", self.requests, self.burst)
    }
}

pub fn window_name(w: Window) -> &'static str {
    match w {
        Window::Second => "second",
        Window::Minute => "minute",
        Window::Hour => "hour",
        Window::Day => "day",
    }
}

/// A tenant segment: the default plan (`tenant: None`) or one override.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Segment {
    /// `default` or the tenant named in `tenants.overrides`.
    pub name: String,
    pub ceiling: RateView,
    pub shared: RateView,
    pub reserves: Vec<(String, RateView)>,
}

/// One row of the map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClassRow {
    pub name: String,
    pub consequence: &'static str,
    pub protected: bool,
    /// The rollout mode of the class for tenants without an override.
    pub mode: &'static str,
    /// `default` (all tenants) and every override that changes this class, with the change.
    pub segments: Vec<String>,
    /// `classes[].source` as written.
    pub source: Option<String>,
    /// The principals that may declare this class (`*` marks the ones whose default it is),
    /// and `(unknown principals)` if it is `classification.default_class`.
    pub identities: Vec<String>,
    pub families: Vec<String>,
    pub purpose: Option<String>,
    pub owner: Option<String>,
    /// `reserve` or `shared`.
    pub lane: &'static str,
    pub budget: Option<RateView>,
    pub reserve: Option<RateView>,
    pub borrow: bool,
    /// The lane, its rate and burst, in one phrase.
    pub burst_shape: String,
    /// Classes that draw from a pool this class draws from and are not excluded.
    pub may_compete_with: Vec<String>,
    /// Both directions of `must_not_compete_with`.
    pub must_not_compete_with: Vec<String>,
    /// Ordered fallbacks before the 429 (`queue`, `fallback_route`, `reject`).
    pub fallbacks: Vec<&'static str>,
    /// Fallbacks, borrowing and the failure mode, in one phrase.
    pub fallback: String,
    pub failure_mode: &'static str,
}

/// Who shares identity: one principal and the classes it can land in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrincipalRow {
    pub name: String,
    pub default_class: String,
    pub may_declare: Vec<String>,
    /// It can land in more than one class.
    pub shares_identity: bool,
    pub reaches_protected: bool,
    pub reaches_unprotected: bool,
    /// Both: one credential serves protected and unprotected work (internal automation on
    /// a customer identity, or a customer identity that can reach a protected lane).
    pub mixes_protected: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolKind {
    /// The tenant ceiling minus the reserves.
    Shared,
    Reserve,
    /// An endpoint family's `limit` (per tenant).
    Tool,
    /// `users.limit` (per user).
    User,
}

/// How a class draws from a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Draw {
    /// Its lane (unprotected classes in the shared pool, a protected class in its reserve).
    Lane,
    /// Idle shared capacity once its reserve is empty.
    Borrow,
    /// It calls the family (`classes[].families`).
    Calls,
    /// A principal that may declare it may also declare another class: one user, one bucket.
    Identity,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub class: String,
    pub draw: Draw,
    /// For `Identity`: the principals through which it shares.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub via: Vec<String>,
}

/// Who shares a budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pool {
    /// `shared`, `reserve:repair`, `tool:exports`, `user`.
    pub id: String,
    pub kind: PoolKind,
    /// For the default tenant plan.
    pub rate: RateView,
    pub members: Vec<Member>,
}

/// Two classes that must not compete, drawing from one pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Collision {
    pub pool: String,
    /// The class whose `must_not_compete_with` names `b` (or the first, if both do).
    pub a: String,
    pub b: String,
    /// `false` when one side only borrows idle capacity (its guarantee is its reserve).
    pub guaranteed: bool,
    pub why: String,
}

/// The whole map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompetitionMap {
    pub segments: Vec<Segment>,
    pub classes: Vec<ClassRow>,
    pub principals: Vec<PrincipalRow>,
    pub pools: Vec<Pool>,
    pub collisions: Vec<Collision>,
}

impl CompetitionMap {
    pub fn class(&self, name: &str) -> Option<&ClassRow> {
        self.classes.iter().find(|c| c.name == name)
    }
}

/// `a` and `b` must not compete (in either direction).
pub fn excluded(policy: &Policy, a: ClassId, b: ClassId) -> bool {
    policy.classes[a].must_not_compete_with.contains(&b)
        || policy.classes[b].must_not_compete_with.contains(&a)
}

fn sorted_principals(policy: &Policy) -> Vec<(&String, &crate::policy::Principal)> {
    let mut v: Vec<_> = policy.principals.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

fn segments(policy: &Policy) -> Vec<(String, &TenantPlan)> {
    let mut overrides: Vec<_> = policy.tenant_plans.iter().collect();
    overrides.sort_by(|a, b| a.0.cmp(b.0));
    std::iter::once(("default".to_string(), &policy.default_plan))
        .chain(overrides.into_iter().map(|(t, p)| (t.clone(), p)))
        .collect()
}

/// The pools of the default plan, with their members.
pub fn pools(policy: &Policy) -> Vec<Pool> {
    let plan = &policy.default_plan;
    let mut pools = Vec::new();
    let shared_members = policy
        .classes
        .iter()
        .filter_map(|c| {
            let draw = if !c.consequence.is_protected() {
                Draw::Lane
            } else if c.borrow {
                Draw::Borrow
            } else {
                return None;
            };
            Some(Member {
                class: c.name.clone(),
                draw,
                via: Vec::new(),
            })
        })
        .collect();
    pools.push(Pool {
        id: "shared".into(),
        kind: PoolKind::Shared,
        rate: RateView::new(&plan.shared),
        members: shared_members,
    });
    for (i, c) in policy.classes.iter().enumerate() {
        if let Some(r) = plan.reserves[i] {
            pools.push(Pool {
                id: format!("reserve:{}", c.name),
                kind: PoolKind::Reserve,
                rate: RateView::new(&r),
                members: vec![Member {
                    class: c.name.clone(),
                    draw: Draw::Lane,
                    via: Vec::new(),
                }],
            });
        }
    }
    for (fi, f) in policy.families.iter().enumerate() {
        let Some(limit) = f.limit else { continue };
        let members = policy
            .classes
            .iter()
            .filter(|c| c.families.contains(&fi))
            .map(|c| Member {
                class: c.name.clone(),
                draw: Draw::Calls,
                via: Vec::new(),
            })
            .collect();
        pools.push(Pool {
            id: format!("tool:{}", f.name),
            kind: PoolKind::Tool,
            rate: RateView::new(&limit),
            members,
        });
    }
    if let Some(limit) = policy.users {
        // One user's requests all charge one bucket, whatever class they land in; the classes
        // that share it are those one principal can land in.
        let mut members: Vec<Member> = Vec::new();
        for (name, p) in sorted_principals(policy) {
            if p.may_declare.len() < 2 {
                continue;
            }
            for &c in &p.may_declare {
                let class = &policy.classes[c].name;
                match members.iter_mut().find(|m| &m.class == class) {
                    Some(m) => m.via.push(name.clone()),
                    None => members.push(Member {
                        class: class.clone(),
                        draw: Draw::Identity,
                        via: vec![name.clone()],
                    }),
                }
            }
        }
        pools.push(Pool {
            id: "user".into(),
            kind: PoolKind::User,
            rate: RateView::new(&limit),
            members,
        });
    }
    pools
}

fn collisions(policy: &Policy, pools: &[Pool]) -> Vec<Collision> {
    let id = |name: &str| policy.class_id(name);
    let mut out = Vec::new();
    for pool in pools {
        for (x, mx) in pool.members.iter().enumerate() {
            for my in &pool.members[x + 1..] {
                let (Some(a), Some(b)) = (id(&mx.class), id(&my.class)) else {
                    continue;
                };
                if !excluded(policy, a, b) {
                    continue;
                }
                // Name the side whose rule is broken first.
                let (a, b, ma, mb) = if policy.classes[a].must_not_compete_with.contains(&b) {
                    (a, b, mx, my)
                } else {
                    (b, a, my, mx)
                };
                if pool.kind == PoolKind::User {
                    // Only through a principal that may declare both.
                    let both: Vec<&String> = ma.via.iter().filter(|p| mb.via.contains(p)).collect();
                    if both.is_empty() {
                        continue;
                    }
                    out.push(Collision {
                        pool: pool.id.clone(),
                        a: policy.classes[a].name.clone(),
                        b: policy.classes[b].name.clone(),
                        guaranteed: true,
                        why: format!(
                            "principal {} may declare both, and users.limit charges one bucket per user whatever the class",
                            both.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    });
                    continue;
                }
                let borrowing = ma.draw == Draw::Borrow || mb.draw == Draw::Borrow;
                let why = match pool.kind {
                    PoolKind::Shared if borrowing => {
                        let borrower = if ma.draw == Draw::Borrow { a } else { b };
                        format!(
                            "{} borrows idle shared capacity once its reserve is empty",
                            policy.classes[borrower].name
                        )
                    }
                    PoolKind::Shared => "both draw from the tenant's shared pool".into(),
                    PoolKind::Tool => format!(
                        "both call endpoint family {:?}, whose limit is one bucket per tenant",
                        pool.id.trim_start_matches("tool:")
                    ),
                    PoolKind::Reserve | PoolKind::User => "both draw from it".into(),
                };
                out.push(Collision {
                    pool: pool.id.clone(),
                    a: policy.classes[a].name.clone(),
                    b: policy.classes[b].name.clone(),
                    guaranteed: !borrowing,
                    why,
                });
            }
        }
    }
    out
}

fn fallback_phrase(policy: &Policy, id: ClassId) -> (Vec<&'static str>, String) {
    let c = &policy.classes[id];
    let ops = policy.ops.class(id);
    let list: Vec<&'static str> = ops
        .map(|o| o.fallbacks.iter().map(|f| f.as_str()).collect())
        .unwrap_or_else(|| vec!["reject"]);
    let mut parts = Vec::new();
    if c.borrow {
        parts.push("borrow idle shared capacity".to_string());
    }
    for f in ops.map(|o| o.fallbacks.as_slice()).unwrap_or(&[]) {
        parts.push(match f {
            crate::policy::Fallback::Queue => {
                let q = ops
                    .map(|o| o.queue)
                    .unwrap_or(crate::policy::ops::DEFAULT_QUEUE);
                format!("queue (up to {} ms, depth {})", q.max_wait_ms, q.max_depth)
            }
            crate::policy::Fallback::FallbackRoute => {
                let r = ops.map(|o| &o.fallback_route);
                match r {
                    Some(r) => format!("fallback route ({}: {})", r.header, r.value),
                    None => "fallback route".into(),
                }
            }
            crate::policy::Fallback::Cached => {
                let c = ops.map(|o| &o.cache);
                match c {
                    Some(c) => format!("a cached response ({}: {})", c.header, c.value),
                    None => "a cached response".into(),
                }
            }
            crate::policy::Fallback::Reject => "429".into(),
        });
    }
    if parts.is_empty() {
        parts.push("429".into());
    }
    (
        list,
        format!(
            "{}; service down: {}",
            parts.join(" → "),
            c.failure_mode.as_str()
        ),
    )
}

/// Draw the map.
pub fn map(policy: &Policy) -> CompetitionMap {
    let pools = pools(policy);
    let collisions = collisions(policy, &pools);
    let segs = segments(policy);
    let principals = sorted_principals(policy);

    let classes = policy
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let plan = &policy.default_plan;
            let mut segments = vec!["default".to_string()];
            for (name, p) in segs.iter().skip(1) {
                let mut changes = Vec::new();
                if p.budgets[i] != plan.budgets[i] {
                    if let Some(b) = p.budgets[i] {
                        changes.push(format!("budget {}", RateView::new(&b)));
                    }
                }
                if p.reserves[i] != plan.reserves[i] {
                    if let Some(r) = p.reserves[i] {
                        changes.push(format!("reserve {}", RateView::new(&r)));
                    }
                }
                let mode = policy.ops.mode_for(name, i);
                if mode != policy.ops.mode_for("", i) {
                    changes.push(mode.as_str().to_string());
                }
                if p.ceiling != plan.ceiling {
                    changes.push(format!("ceiling {}", RateView::new(&p.ceiling)));
                }
                if !changes.is_empty() {
                    segments.push(format!("{name}: {}", changes.join(", ")));
                }
            }
            let mut identities: Vec<String> = principals
                .iter()
                .filter(|(_, p)| p.may_declare.contains(&i))
                .map(|(n, p)| {
                    if p.default_class == i {
                        format!("{n}*")
                    } else {
                        (*n).clone()
                    }
                })
                .collect();
            if policy.classification.default_class == i {
                identities.push("(unknown principals)".into());
            }
            let budget = plan.budgets[i].as_ref().map(RateView::new);
            let reserve = plan.reserves[i].as_ref().map(RateView::new);
            let lane = if reserve.is_some() {
                "reserve"
            } else {
                "shared"
            };
            let burst_shape = match (&reserve, &budget) {
                (Some(r), _) => format!(
                    "reserve {r}{}",
                    if c.borrow {
                        ", borrows idle shared capacity"
                    } else {
                        ""
                    }
                ),
                (None, Some(b)) => {
                    format!("shared pool {}, budget {b}", RateView::new(&plan.shared))
                }
                (None, None) => format!("shared pool {}, no budget", RateView::new(&plan.shared)),
            };
            let mut must_not: BTreeSet<&str> = BTreeSet::new();
            let mut may: BTreeSet<&str> = BTreeSet::new();
            for (j, other) in policy.classes.iter().enumerate() {
                if j == i {
                    continue;
                }
                if excluded(policy, i, j) {
                    must_not.insert(&other.name);
                    continue;
                }
                let shares = pools.iter().any(|p| {
                    p.members.iter().any(|m| m.class == c.name)
                        && p.members.iter().any(|m| m.class == other.name)
                });
                if shares {
                    may.insert(&other.name);
                }
            }
            let (fallbacks, fallback) = fallback_phrase(policy, i);
            ClassRow {
                name: c.name.clone(),
                consequence: c.consequence.as_str(),
                protected: c.consequence.is_protected(),
                mode: policy.ops.mode_for("", i).as_str(),
                segments,
                source: c.source.clone(),
                identities,
                families: c
                    .families
                    .iter()
                    .map(|&f| policy.families[f].name.clone())
                    .collect(),
                purpose: c.purpose.clone(),
                owner: c.owner.clone(),
                lane,
                budget,
                reserve,
                borrow: c.borrow,
                burst_shape,
                may_compete_with: may.into_iter().map(str::to_string).collect(),
                must_not_compete_with: must_not.into_iter().map(str::to_string).collect(),
                fallbacks,
                fallback,
                failure_mode: c.failure_mode.as_str(),
            }
        })
        .collect();

    let principals = principals
        .iter()
        .map(|(name, p)| {
            let reaches_protected = p
                .may_declare
                .iter()
                .any(|&c| policy.classes[c].consequence.is_protected());
            let reaches_unprotected = p
                .may_declare
                .iter()
                .any(|&c| !policy.classes[c].consequence.is_protected());
            PrincipalRow {
                name: (*name).clone(),
                default_class: policy.classes[p.default_class].name.clone(),
                may_declare: p
                    .may_declare
                    .iter()
                    .map(|&c| policy.classes[c].name.clone())
                    .collect(),
                shares_identity: p.may_declare.len() > 1,
                reaches_protected,
                reaches_unprotected,
                mixes_protected: reaches_protected && reaches_unprotected,
            }
        })
        .collect();

    let segments = segs
        .iter()
        .map(|(name, p)| Segment {
            name: name.clone(),
            ceiling: RateView::new(&p.ceiling),
            shared: RateView::new(&p.shared),
            reserves: policy
                .classes
                .iter()
                .zip(&p.reserves)
                .filter_map(|(c, r)| r.as_ref().map(|r| (c.name.clone(), RateView::new(r))))
                .collect(),
        })
        .collect();

    CompetitionMap {
        segments,
        classes,
        principals,
        pools,
        collisions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;

    const POLICY: &str = r#"
version: 1
classification: { default_class: web }
classes:
  - { name: web, consequence: time_sensitive, owner: ui, budget: { per_minute: 60, burst: 10 }, families: [orders] }
  - { name: erp, consequence: time_sensitive, budget: { per_minute: 30, burst: 10 }, families: [orders, exports] }
  - name: repair
    consequence: repair
    reserve: { per_minute: 20, burst: 5 }
    borrow: true
    must_not_compete_with: [erp]
    families: [exports]
  - { name: support, consequence: recovery, reserve: { per_minute: 10, burst: 2 }, must_not_compete_with: [web] }
principals:
  - { name: web, default_class: web, may_declare: [web] }
  - { name: erp, default_class: erp, may_declare: [erp] }
  - { name: recon, default_class: repair, may_declare: [repair, web] }
  - { name: support, default_class: support, may_declare: [support, web] }
tenants:
  default: { ceiling: { per_minute: 120, burst: 30 } }
  overrides:
    acme: { mode: shadow, classes: { web: { budget: { per_minute: 90, burst: 10 } } } }
endpoint_families:
  - { name: exports, path_prefixes: [/exports], limit: { per_minute: 30, burst: 5 } }
  - { name: orders, path_prefixes: [/orders] }
users: { limit: { per_minute: 100, burst: 20 } }
"#;

    #[test]
    fn rows_say_who_shares_identity_and_budget() {
        let p = parse(POLICY).unwrap();
        let m = map(&p);
        let web = m.class("web").unwrap();
        assert_eq!(
            web.identities,
            ["recon", "support", "web*", "(unknown principals)"]
        );
        assert_eq!(web.lane, "shared");
        assert_eq!(web.may_compete_with, ["erp", "repair"]);
        assert_eq!(web.must_not_compete_with, ["support"]);
        assert_eq!(
            web.segments,
            ["default", "acme: budget 90/min burst 10, shadow"]
        );
        let repair = m.class("repair").unwrap();
        assert_eq!(repair.lane, "reserve");
        assert!(
            repair.burst_shape.contains("borrows"),
            "{}",
            repair.burst_shape
        );
        assert!(repair.fallback.starts_with("borrow idle shared capacity"));
        let recon = m.principals.iter().find(|r| r.name == "recon").unwrap();
        assert!(recon.mixes_protected && recon.shares_identity);
        assert_eq!(m.segments[0].shared.requests, 90);
        assert_eq!(m.segments[1].name, "acme");
    }

    #[test]
    fn collisions_come_from_pools_that_cut_across_lanes() {
        let p = parse(POLICY).unwrap();
        let m = map(&p);
        let find = |pool: &str| {
            m.collisions
                .iter()
                .filter(|c| c.pool == pool)
                .map(|c| (c.a.as_str(), c.b.as_str(), c.guaranteed))
                .collect::<Vec<_>>()
        };
        // repair borrows the shared pool erp draws from: reported, not guaranteed.
        assert_eq!(find("shared"), [("repair", "erp", false)]);
        // both call /exports, whose limit is one bucket.
        assert_eq!(find("tool:exports"), [("repair", "erp", true)]);
        // support's principal may declare web too: one user bucket.
        assert_eq!(find("user"), [("support", "web", true)]);
        assert!(find("reserve:repair").is_empty());
    }
}
