//! Lint the competition map: what seed 000 calls a rollout risk, in a policy that is valid.
//! `laneguard-policy check` (the parser) refuses what cannot work; this warns about what works
//! but hides competition. Every warning names the field to change (`principals[2].
//! may_declare[1]`, the same path syntax as parse errors) and says what to change.
//!
//! It reads the policy twice: as written ([`RawPolicy`], for the indices a path needs) and
//! validated ([`Policy`], for the pools).

use crate::declared::{self, Dimension};
use crate::map::{self, PoolKind};
use crate::policy::raw::{RawFallback, RawPolicy};
use crate::policy::{Policy, TenantPlan};
use crate::rate::{Rate, Window};
use serde::Serialize;

/// Which rule a warning comes from (stable names, for `--allow` lists and scripts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// A class with no `owner`: nobody answers when it is throttled.
    NoOwner,
    /// A protected class whose only fallback is the 429.
    ProtectedWithoutFallback,
    /// A principal that may declare a protected class and an unprotected one.
    MixedIdentity,
    /// A class no principal may declare (and not the default for unknown principals).
    UndeclarableClass,
    /// A `must_not_compete_with` the pools cannot honour.
    RivalsSharePool,
    /// Reserves that leave the shared pool smaller than an unprotected budget's burst or rate.
    SharedPoolTooSmall,
    /// An endpoint family's prefix that an earlier family already matches.
    OverlappingFamilies,
    /// A declared dimension's default allows more than a value a caller may declare: omitting
    /// the header (or, with `unknown: default`, inventing a value) escapes that value's bucket.
    LooseDefault,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::NoOwner => "no_owner",
            Rule::ProtectedWithoutFallback => "protected_without_fallback",
            Rule::MixedIdentity => "mixed_identity",
            Rule::UndeclarableClass => "undeclarable_class",
            Rule::RivalsSharePool => "rivals_share_pool",
            Rule::SharedPoolTooSmall => "shared_pool_too_small",
            Rule::OverlappingFamilies => "overlapping_families",
            Rule::LooseDefault => "loose_default",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    pub rule: Rule,
    /// The field to change.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// What to change.
    pub fix: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} [{}]\n  fix: {}",
            self.path,
            self.message,
            self.rule.as_str(),
            self.fix
        )
    }
}

fn warn(rule: Rule, path: String, message: String, fix: impl Into<String>) -> Warning {
    Warning {
        rule,
        path,
        message,
        fix: fix.into(),
    }
}

/// Every warning, in policy order.
pub fn lint(raw: &RawPolicy, policy: &Policy) -> Vec<Warning> {
    let mut out = Vec::new();
    let protected = |name: &str| {
        policy
            .class_id(name)
            .is_some_and(|id| policy.classes[id].consequence.is_protected())
    };

    for (i, c) in raw.classes.iter().enumerate() {
        if c.owner.as_deref().is_none_or(|o| o.trim().is_empty()) {
            out.push(warn(
                Rule::NoOwner,
                format!("classes[{i}].owner"),
                format!(
                    "class {:?} has no owner: nobody is named to answer when it is throttled",
                    c.name
                ),
                "add `owner: TEAM`, the team that owns this workflow",
            ));
        }
        let only_reject = c
            .fallbacks
            .as_ref()
            .is_none_or(|f| f.iter().all(|x| *x == RawFallback::Reject));
        if protected(&c.name) && only_reject {
            out.push(warn(
                Rule::ProtectedWithoutFallback,
                format!("classes[{i}].fallbacks"),
                format!(
                    "{:?} is a protected class, but when its reserve runs out the only answer is a 429",
                    c.name
                ),
                "say what happens next: `fallbacks: [queue, reject]` (bounded wait, with `queue:`) or `[fallback_route, reject]` (a route that still serves it)",
            ));
        }
    }

    for (i, p) in raw.principals.iter().enumerate() {
        let default_protected = protected(&p.default_class);
        for (j, c) in p.may_declare.iter().enumerate() {
            if protected(c) == default_protected {
                continue;
            }
            let (message, fix) = if default_protected {
                (
                    format!(
                        "principal {:?} is internal automation ({:?} by default) that may also declare the unprotected class {:?}: its protected work and its ordinary work share one identity",
                        p.name, p.default_class, c
                    ),
                    format!(
                        "give the {c:?} work its own principal (credential) and remove {c:?} here"
                    ),
                )
            } else {
                (
                    format!(
                        "principal {:?} is a customer identity ({:?} by default) that may declare the protected class {:?}",
                        p.name, p.default_class, c
                    ),
                    format!(
                        "let only the tool that does {c:?} work declare it: give that tool its own principal and remove {c:?} here"
                    ),
                )
            };
            out.push(warn(
                Rule::MixedIdentity,
                format!("principals[{i}].may_declare[{j}]"),
                message,
                fix,
            ));
        }
    }

    let default_class = &policy.classes[policy.classification.default_class].name;
    for (i, c) in raw.classes.iter().enumerate() {
        let declarable = raw
            .principals
            .iter()
            .any(|p| p.may_declare.iter().any(|d| d == &c.name));
        if !declarable && &c.name != default_class {
            out.push(warn(
                Rule::UndeclarableClass,
                format!("classes[{i}]"),
                format!(
                    "no principal may declare class {:?} and it is not classification.default_class: no request can land in it",
                    c.name
                ),
                format!(
                    "add {:?} to the may_declare of the principal that sends this traffic, or remove the class",
                    c.name
                ),
            ));
        }
    }

    let m = map::map(policy);
    for col in m.collisions.iter().filter(|c| c.guaranteed) {
        let Some(a) = raw.classes.iter().position(|c| c.name == col.a) else {
            continue;
        };
        let Some(j) = raw.classes[a]
            .must_not_compete_with
            .iter()
            .position(|b| b == &col.b)
        else {
            continue;
        };
        let fix = match m.pools.iter().find(|p| p.id == col.pool).map(|p| p.kind) {
            Some(PoolKind::Tool) => format!(
                "give {:?} and {:?} separate endpoint families (distinct path prefixes), or drop the limit of {:?}",
                col.a, col.b, col.pool.trim_start_matches("tool:")
            ),
            Some(PoolKind::User) => format!(
                "give the {:?} work its own principal, so its users do not share a bucket with {:?}",
                col.a, col.b
            ),
            _ => "give one of the two classes its own reserve".to_string(),
        };
        out.push(warn(
            Rule::RivalsSharePool,
            format!("classes[{a}].must_not_compete_with[{j}]"),
            format!(
                "{:?} must not compete with {:?}, but both draw from pool {}: {}",
                col.a, col.b, col.pool, col.why
            ),
            fix,
        ));
    }

    let mut plans: Vec<(String, &TenantPlan)> =
        vec![("tenants.default".into(), &policy.default_plan)];
    let mut overrides: Vec<_> = policy.tenant_plans.iter().collect();
    overrides.sort_by(|a, b| a.0.cmp(b.0));
    plans.extend(
        overrides
            .into_iter()
            .map(|(t, p)| (format!("tenants.overrides.{t}"), p)),
    );
    for (path, plan) in plans {
        let has_reserves = plan.reserves.iter().any(Option::is_some);
        if !has_reserves {
            continue;
        }
        for (i, c) in policy.classes.iter().enumerate() {
            let Some(b) = plan.budgets[i] else { continue };
            if c.consequence.is_protected() {
                continue;
            }
            let w = b.window.max(plan.shared.window);
            let (shared_n, budget_n) = (plan.shared.count_over(w), b.count_over(w));
            let problem = if plan.shared.burst < b.burst {
                Some(format!(
                    "the reserves leave a shared burst of {}, smaller than the burst {} of {:?}'s budget: it can never use its burst",
                    plan.shared.burst, b.burst, c.name
                ))
            } else if shared_n < budget_n {
                Some(format!(
                    "the reserves leave a shared pool of {shared_n} per {}, less than {:?}'s budget of {budget_n}: the budget is a promise the pool cannot keep",
                    map::window_name(w), c.name
                ))
            } else {
                None
            };
            if let Some(message) = problem {
                out.push(warn(
                    Rule::SharedPoolTooSmall,
                    format!("{path}.ceiling"),
                    message,
                    format!(
                        "raise the ceiling, shrink the reserves, or lower {:?}'s budget to fit the shared pool ({})",
                        c.name,
                        map::RateView::new(&plan.shared)
                    ),
                ));
            }
        }
    }

    for (j, f) in raw.endpoint_families.iter().enumerate() {
        for (k, q) in f.path_prefixes.iter().enumerate() {
            let earlier = raw.endpoint_families[..j]
                .iter()
                .enumerate()
                .find_map(|(i, e)| {
                    let methods_meet = e.methods.is_empty()
                        || f.methods.is_empty()
                        || e.methods
                            .iter()
                            .any(|m| f.methods.iter().any(|n| n.eq_ignore_ascii_case(m)));
                    let covering = e.path_prefixes.iter().find(|p| q.starts_with(p.as_str()));
                    match (methods_meet, covering) {
                        (true, Some(p)) => Some((i, e, p)),
                        _ => None,
                    }
                });
            if let Some((i, e, p)) = earlier {
                out.push(warn(
                    Rule::OverlappingFamilies,
                    format!("endpoint_families[{j}].path_prefixes[{k}]"),
                    format!(
                        "{q:?} of family {:?} is already matched by {p:?} of family {:?} (endpoint_families[{i}]), which comes first: these requests are never {:?}",
                        f.name, e.name, f.name
                    ),
                    format!(
                        "move family {:?} before {:?}, or make the prefixes disjoint (a prefix matches any path that starts with it: \"/orders\" also matches \"/orders-archive\")",
                        f.name, e.name
                    ),
                ));
            }
        }
    }
    loose_defaults(policy, &mut out);
    out
}

/// [`Rule::LooseDefault`]: where a request that declares nothing lands, by the filter's own
/// rule ([`declared::resolve`]), against every value a principal may declare instead.
fn loose_defaults(policy: &Policy, out: &mut Vec<Warning>) {
    let looser = |a: &Rate, b: &Rate| {
        a.burst > b.burst || a.count_over(Window::Day) > b.count_over(Window::Day)
    };
    for (dim, section, header) in [
        (
            Dimension::Purpose,
            "purposes",
            policy.purposes.as_ref().map(|p| p.header.as_str()),
        ),
        (
            Dimension::Model,
            "models",
            policy.models.as_ref().map(|m| m.header.as_str()),
        ),
    ] {
        let Some(header) = header else {
            continue;
        };
        let family = declared::scope_sample(policy, dim);
        // Any principal the policy does not name has no list: it may declare every value.
        let Ok(landed) = declared::resolve(policy, dim, "", family, None) else {
            continue;
        };
        let Some(default) = landed.value else {
            continue;
        };
        let Some(default_rate) = dimension_rate(policy, dim, default) else {
            continue;
        };
        let mut tighter: Vec<(&str, Rate)> = dimension_values(policy, dim)
            .into_iter()
            .filter(|v| *v != default && declared::may_declare(policy, dim, "", v))
            .filter_map(|v| Some((v, dimension_rate(policy, dim, v)?)))
            .filter(|(_, r)| looser(&default_rate, r))
            .collect();
        tighter.sort_by_key(|(v, _)| *v);
        if tighter.is_empty() {
            continue;
        }
        let names: Vec<String> = tighter
            .iter()
            .map(|(v, r)| format!("{v:?} ({})", map::RateView::new(r)))
            .collect();
        out.push(warn(
            Rule::LooseDefault,
            format!("{section}.default"),
            format!(
                "a request that sends no {header} is charged to the default {} {default:?} ({}), which allows more than {}: a caller escapes those buckets by not declaring them",
                dim.as_str(),
                map::RateView::new(&default_rate),
                names.join(", ")
            ),
            format!(
                "make the default the tightest {} (a dedicated one with a small budget), or remove `{section}.default` and set `{section}.unknown: refuse` so that a request without it is refused",
                dim.as_str()
            ),
        ));
    }
}

/// The values of a declared dimension the policy lists.
fn dimension_values(policy: &Policy, dim: Dimension) -> Vec<&str> {
    match dim {
        Dimension::Purpose => policy
            .purposes
            .iter()
            .flat_map(|p| p.limits.keys())
            .map(String::as_str)
            .collect(),
        Dimension::Model => policy
            .models
            .iter()
            .flat_map(|m| m.list.keys())
            .map(String::as_str)
            .collect(),
    }
}

/// What one value of a dimension allows a tenant (a model's default allocation).
fn dimension_rate(policy: &Policy, dim: Dimension, value: &str) -> Option<Rate> {
    match dim {
        Dimension::Purpose => policy.purposes.as_ref()?.limits.get(value).copied(),
        Dimension::Model => Some(policy.models.as_ref()?.list.get(value)?.default_allocation),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{parse, parse_raw};

    fn rules(text: &str) -> Vec<(Rule, String)> {
        let raw = parse_raw(text).unwrap();
        let p = parse(text).unwrap();
        lint(&raw, &p)
            .into_iter()
            .map(|w| (w.rule, w.path))
            .collect()
    }

    const CLEAN: &str = r#"
version: 1
classes:
  - { name: web, consequence: time_sensitive, owner: ui, budget: { per_minute: 60, burst: 10 } }
  - { name: repair, consequence: repair, owner: ops, reserve: { per_minute: 20, burst: 5 }, fallbacks: [queue, reject] }
principals:
  - { name: web, default_class: web, may_declare: [web] }
  - { name: recon, default_class: repair, may_declare: [repair] }
tenants:
  default: { ceiling: { per_minute: 100, burst: 20 } }
endpoint_families:
  - { name: export, path_prefixes: [/orders/export] }
  - { name: orders, path_prefixes: [/orders] }
"#;

    #[test]
    fn a_clean_map_has_no_warnings() {
        assert_eq!(rules(CLEAN), []);
    }

    #[test]
    fn each_rule_names_its_path() {
        let cases = [
            (
                CLEAN.replace("owner: ui, ", ""),
                Rule::NoOwner,
                "classes[0].owner",
            ),
            (
                CLEAN.replace(", fallbacks: [queue, reject]", ""),
                Rule::ProtectedWithoutFallback,
                "classes[1].fallbacks",
            ),
            (
                CLEAN.replace("may_declare: [repair]", "may_declare: [repair, web]"),
                Rule::MixedIdentity,
                "principals[1].may_declare[1]",
            ),
            (
                CLEAN
                    .replace("may_declare: [repair] }", "may_declare: [web] }")
                    .replace("default_class: repair", "default_class: web"),
                Rule::UndeclarableClass,
                "classes[1]",
            ),
            (
                CLEAN.replace("per_minute: 100, burst: 20", "per_minute: 100, burst: 14"),
                Rule::SharedPoolTooSmall,
                "tenants.default.ceiling",
            ),
            (
                CLEAN
                    .replace(
                        "path_prefixes: [/orders] }",
                        "path_prefixes: [/orders/export/x] }",
                    )
                    .replace("[/orders/export]", "[/orders]"),
                Rule::OverlappingFamilies,
                "endpoint_families[1].path_prefixes[0]",
            ),
            (
                format!(
                    "{CLEAN}purposes:\n  default: general\n  limits:\n    general: {{ per_minute: 60, burst: 20 }}\n    export: {{ per_minute: 6, burst: 2 }}\n"
                ),
                Rule::LooseDefault,
                "purposes.default",
            ),
        ];
        for (text, rule, path) in cases {
            let got = rules(&text);
            assert_eq!(got, [(rule, path.to_string())], "{text}");
        }
    }

    #[test]
    fn rivals_in_one_family_limit_are_named_at_the_rule() {
        let text = CLEAN
            .replace(
                "fallbacks: [queue, reject] }",
                "fallbacks: [queue, reject], must_not_compete_with: [web], families: [export] }",
            )
            .replace(
                "budget: { per_minute: 60, burst: 10 } }",
                "budget: { per_minute: 60, burst: 10 }, families: [export] }",
            )
            .replace(
                "path_prefixes: [/orders/export] }",
                "path_prefixes: [/orders/export], limit: { per_minute: 10, burst: 5 } }",
            );
        assert_eq!(
            rules(&text),
            [(
                Rule::RivalsSharePool,
                "classes[1].must_not_compete_with[0]".to_string()
            )]
        );
    }
}
