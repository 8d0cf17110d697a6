//! Classification: the caller declares a class; the policy decides whether to honour it.
//! A declaration is honoured only when the principal's `may_declare` lists the class.
//! Anything else falls back to the principal's default class and is flagged as forged, so
//! the filter can count and log the attempt (seed 000, "Traffic classification headers").

use crate::policy::{ClassId, Policy};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    pub class: ClassId,
    /// The declaration was not honoured.
    pub forged: bool,
}

pub fn classify(policy: &Policy, principal: &str, declared: Option<&str>) -> Classified {
    let declared = declared.map(str::trim).filter(|d| !d.is_empty());
    let (default, allowed): (ClassId, &[ClassId]) = match policy.principals.get(principal) {
        Some(p) => (p.default_class, &p.may_declare),
        None => (policy.classification.default_class, &[]),
    };
    match declared {
        None => Classified {
            class: default,
            forged: false,
        },
        Some(d) => match policy.class_id(d) {
            Some(id) if id == default || allowed.contains(&id) => Classified {
                class: id,
                forged: false,
            },
            _ => Classified {
                class: default,
                forged: true,
            },
        },
    }
}
