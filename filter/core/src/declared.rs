//! Declared dimensions: the purpose and the model a request is charged to (issue 13 item 4).
//!
//! The tenant, the principal and the user are trusted: the authentication filter sets them.
//! The class, the purpose and the model are *declared*: the caller writes the header (or, for
//! an AI request, the body's `model`). A declared class is checked by [`crate::classify`];
//! a declared purpose or model by [`resolve`], the one rule the filter, the offline replay
//! and the lint all call. A request in the dimension's scope (`families`, default every
//! request) is charged to exactly one value of it, or refused before any bucket is charged:
//!
//! - a listed value the principal may declare (`principals[].may_declare_purposes` /
//!   `may_declare_models`; without the list, any listed value) is charged to its own bucket;
//! - no value at all is charged to `default`, and refused (400) when there is none;
//! - any other value (unlisted, or one the principal may not declare) follows `unknown`:
//!   charged to `default` and counted (`defaulted`), or refused (403).
//!
//! The default is always allowed: it is what a caller gets for declaring nothing.

use crate::engine::Reject;
use crate::policy::{DeclaredRule, Policy, Unknown};

/// A dimension whose value the caller declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Purpose,
    Model,
}

impl Dimension {
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Purpose => "purpose",
            Dimension::Model => "model",
        }
    }
}

/// What a declaration resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved<'p> {
    /// The value charged (a name the policy lists); `None` when the policy has no such
    /// dimension or the request is outside its scope.
    pub value: Option<&'p str>,
    /// The caller declared a value it may not use and was charged the default instead.
    pub defaulted: bool,
}

impl Resolved<'static> {
    /// No value of this dimension: the policy has none, or the request is outside its scope.
    pub const NONE: Resolved<'static> = Resolved {
        value: None,
        defaulted: false,
    };
}

/// The value of `dim` that a request from `principal` in endpoint family `family` declaring
/// `declared` is charged to, or why it is refused.
pub fn resolve<'p>(
    policy: &'p Policy,
    dim: Dimension,
    principal: &str,
    family: Option<&str>,
    declared: Option<&str>,
) -> Result<Resolved<'p>, Reject> {
    let (rule, listed, allowed): (&DeclaredRule, Option<&'p str>, Option<&Vec<String>>) = match dim
    {
        Dimension::Purpose => {
            let Some(p) = &policy.purposes else {
                return Ok(Resolved::NONE);
            };
            // Declarable: a request budget, or a token budget (`tokens.purposes`).
            let listed = declared.map(str::trim).and_then(|d| {
                p.limits.get_key_value(d).map(|(k, _)| k).or(policy
                    .tokens
                    .as_ref()
                    .and_then(|t| t.purposes.get_key_value(d))
                    .map(|(k, _)| k))
            });
            (
                &p.rule,
                listed.map(String::as_str),
                policy
                    .principals
                    .get(principal)
                    .and_then(|x| x.purposes.as_ref()),
            )
        }
        Dimension::Model => {
            let Some(m) = &policy.models else {
                return Ok(Resolved::NONE);
            };
            let listed = declared.and_then(|d| m.list.get_key_value(d.trim()).map(|(k, _)| k));
            (
                &m.rule,
                listed.map(String::as_str),
                policy
                    .principals
                    .get(principal)
                    .and_then(|x| x.models.as_ref()),
            )
        }
    };
    if let Some(scope) = &rule.families {
        if !family.is_some_and(|f| scope.iter().any(|s| s == f)) {
            return Ok(Resolved::NONE);
        }
    }
    let default = rule.default.as_deref();
    let declared = declared.map(str::trim).filter(|d| !d.is_empty());
    let may = |v: &str| Some(v) == default || allowed.is_none_or(|a| a.iter().any(|x| x == v));
    match (declared, listed) {
        (_, Some(v)) if may(v) => Ok(Resolved {
            value: Some(v),
            defaulted: false,
        }),
        (None, _) => match default {
            Some(d) => Ok(Resolved {
                value: Some(d),
                defaulted: false,
            }),
            None => Err(Reject::Undeclared(dim)),
        },
        (Some(_), _) => match (rule.unknown, default) {
            (Unknown::Default, Some(d)) => Ok(Resolved {
                value: Some(d),
                defaulted: true,
            }),
            _ => Err(Reject::NotDeclarable(dim)),
        },
    }
}

/// Whether `principal` may declare `value` of `dim` (a listed value it may use, or the
/// default), by [`resolve`] on a request in the dimension's scope: what the lint walks.
pub fn may_declare(policy: &Policy, dim: Dimension, principal: &str, value: &str) -> bool {
    matches!(
        resolve(policy, dim, principal, scope_sample(policy, dim), Some(value)),
        Ok(Resolved { value: Some(v), defaulted: false }) if v == value
    )
}

/// An endpoint family inside the dimension's scope (`None` when the scope is every request):
/// a request there is in scope, so tools can ask [`resolve`] about it.
pub fn scope_sample(policy: &Policy, dim: Dimension) -> Option<&str> {
    let rule = match dim {
        Dimension::Purpose => &policy.purposes.as_ref()?.rule,
        Dimension::Model => &policy.models.as_ref()?.rule,
    };
    rule.families.as_ref()?.first().map(String::as_str)
}

#[cfg(test)]
mod tests;
