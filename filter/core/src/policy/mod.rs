//! The policy: phase two. [`parse`] turns text into a [`Policy`] in which every rule of the
//! competition map has been checked. It is the one parser used by the filter's
//! `on_configure`, the CLI validator and the tests. Errors name their path
//! (`classes[2].reserve.per_minute`), so an operator can fix the field without reading code.

pub mod ops;
pub mod raw;
pub mod source;
pub mod tokens;

use crate::rate::{Rate, Window};
pub use ops::{Fallback, Mode, Operations};
use raw::*;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Index of a class in [`Policy::classes`].
pub type ClassId = usize;

/// A policy error: the path of the offending field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PolicyError {
    pub path: String,
    pub message: String,
}

impl PolicyError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> PolicyError {
        PolicyError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// What breaks when a class is throttled (seed 000's four levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consequence {
    Low,
    TimeSensitive,
    Repair,
    Recovery,
}

impl Consequence {
    /// Repair and recovery traffic get reserved lanes.
    pub fn is_protected(self) -> bool {
        matches!(self, Consequence::Repair | Consequence::Recovery)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Consequence::Low => "low",
            Consequence::TimeSensitive => "time_sensitive",
            Consequence::Repair => "repair",
            Consequence::Recovery => "recovery",
        }
    }
}

/// What a class does when the rate-limit service cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Allow, and report the hits later.
    Open,
    /// Refuse with 503.
    Closed,
    /// Decide on this worker's local buckets alone.
    Local,
}

impl FailureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::Open => "open",
            FailureMode::Closed => "closed",
            FailureMode::Local => "local",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Class {
    pub name: String,
    pub consequence: Consequence,
    pub source: Option<String>,
    pub purpose: Option<String>,
    pub owner: Option<String>,
    pub borrow: bool,
    pub failure_mode: FailureMode,
    pub must_not_compete_with: Vec<ClassId>,
    /// Indexes into [`Policy::families`]: the endpoint families this class calls (for the
    /// competition map; optional, empty when not declared).
    pub families: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub default_class: ClassId,
    pub may_declare: Vec<ClassId>,
    /// The purposes it may declare; `None`: any the policy lists.
    pub purposes: Option<Vec<String>>,
    /// The models it may declare; `None`: any the policy lists.
    pub models: Option<Vec<String>>,
}

/// One tenant's layered capacity: the ceiling, split into reserves and the shared pool.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantPlan {
    pub ceiling: Rate,
    /// The ceiling minus every reserve: what unprotected classes (and borrowers) draw from.
    pub shared: Rate,
    /// Per class: its budget, if it has one.
    pub budgets: Vec<Option<Rate>>,
    /// Per class: its reserved lane (protected classes only).
    pub reserves: Vec<Option<Rate>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub path_prefixes: Vec<String>,
    /// Upper-case methods; empty means any.
    pub methods: Vec<String>,
    pub cost: u32,
    pub limit: Option<Rate>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub name: String,
    pub capacity: Rate,
    pub default_allocation: Rate,
    pub tenant_allocations: HashMap<String, Rate>,
    /// Token budgets (`policy::tokens`), if the model has any.
    pub tokens: Option<tokens::ModelTokens>,
    /// The model the `cheaper_model` fallback sends a request to when this one has no room.
    pub cheaper_model: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub tenant_header: String,
    pub principal_header: String,
    pub user_header: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub header: String,
    pub granted_header: String,
    pub default_class: ClassId,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub cluster: String,
    pub domain: String,
    pub timeout_ms: u32,
    /// Fraction of each rate a worker may spend on its own when the service is down.
    pub local_share: f64,
    /// How often hits admitted without the service (degraded mode) are reported to it.
    pub sync_interval_s: u32,
    /// The most capacity a worker asks the service to lease it for one bucket at a time.
    pub max_lease: u32,
    /// The most buckets one worker's local table holds ([`crate::LocalTable`]): at the cap,
    /// idle buckets are pruned, then the fullest live ones evicted.
    pub max_buckets: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Purposes {
    pub header: String,
    pub rule: DeclaredRule,
    pub limits: HashMap<String, Rate>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Models {
    pub header: String,
    pub rule: DeclaredRule,
    pub list: HashMap<String, Model>,
}

/// What the caller's declaration of a purpose or a model is worth (issue 13 item 4): the
/// value is the caller's, so a missing or unusable one must land on a defined bucket or be
/// refused, never on no bucket at all. `crate::declared::resolve` applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeclaredRule {
    /// Charged when a request in scope declares nothing (and, with `unknown: default`, when
    /// it declares a value it may not use). `None`: such a request is refused.
    pub default: Option<String>,
    pub unknown: Unknown,
    /// The endpoint families the dimension applies to (`None`: every request). Outside
    /// them the header is ignored and no bucket of this dimension is charged.
    pub families: Option<Vec<String>>,
}

/// `unknown`: a declared value the policy does not list, or that the principal may not
/// declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// Charged to the default, as if nothing was declared; counted.
    Default,
    /// Refused with 403 before any bucket is charged.
    Refuse,
}

/// A validated policy. Every name it holds resolves; every rate is non-zero.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub identity: Identity,
    pub classification: Classification,
    pub service: Service,
    pub draft03_headers: bool,
    pub classes: Vec<Class>,
    pub principals: HashMap<String, Principal>,
    pub default_plan: TenantPlan,
    pub tenant_plans: HashMap<String, TenantPlan>,
    pub families: Vec<Family>,
    pub users: Option<Rate>,
    pub purposes: Option<Purposes>,
    pub models: Option<Models>,
    /// Rollout modes, near misses, fallbacks and audit shipping (`policy::ops`).
    pub ops: Operations,
    /// AI traffic: token budgets, body inspection, settlement (`policy::tokens`).
    pub tokens: Option<tokens::Tokens>,
}

impl Policy {
    pub fn class_id(&self, name: &str) -> Option<ClassId> {
        self.classes.iter().position(|c| c.name == name)
    }

    pub fn plan_for(&self, tenant: &str) -> &TenantPlan {
        self.tenant_plans.get(tenant).unwrap_or(&self.default_plan)
    }

    /// Every Envoy cluster the policy names, with the field that names it: the filter calls
    /// these (`service.cluster` for decisions, `audit.cluster` for records), so each must be
    /// a cluster of the Envoy config the filter runs in ([`source::check_clusters`]).
    pub fn clusters(&self) -> Vec<(&'static str, &str)> {
        vec![
            ("service.cluster", self.service.cluster.as_str()),
            ("audit.cluster", self.ops.audit.cluster.as_str()),
        ]
    }
}

pub const DEFAULT_TIMEOUT_MS: u32 = 200;
pub const DEFAULT_SYNC_INTERVAL_S: u32 = 10;
/// 2,000 since issue 10 §3 (was 1,000): a worker renews at most once a tick (10 a second),
/// so one that spends more than 10 × `max_lease` a second also asks on the request path
/// when its lease runs out between ticks. 2,000 keeps a worker at up to 20,000 req/s on
/// the tick's renewals alone (under 1 call per 1,000 requests from 10,000 req/s up), and a
/// lease is still at most one second of the worker's own spend (`LocalTable::want`) and at
/// most half a bucket's burst (the service's grant), so small budgets are unchanged.
pub const DEFAULT_MAX_LEASE: u32 = 2_000;
/// Bounds on `service.max_buckets` (default [`crate::engine::DEFAULT_MAX_BUCKETS`]).
pub const MIN_MAX_BUCKETS: u32 = 100;
pub const MAX_MAX_BUCKETS: u32 = 1_000_000;
pub const MAX_TIMEOUT_MS: u32 = 10_000;

/// Parse and validate a policy (YAML, or JSON, which is a subset).
pub fn parse(text: &str) -> Result<Policy, PolicyError> {
    validate(parse_raw(text)?)
}

/// Phase one alone: the policy as written, with every list in its written order, for tools
/// that name fields by index (`laneguard-policy lint`). Validate with [`parse`] as well.
pub fn parse_raw(text: &str) -> Result<RawPolicy, PolicyError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            "(document)".to_string()
        } else {
            path
        };
        let mut message = e.into_inner().to_string();
        // serde_yaml prefixes its own (shorter) path; ours is the full one.
        if let Some((prefix, rest)) = message.split_once(": ") {
            if path.starts_with(prefix) {
                message = rest.to_string();
            }
        }
        PolicyError::new(path, message)
    })
}

fn rate(raw: &RawRate, path: &str) -> Result<Rate, PolicyError> {
    window_rate(
        [raw.per_second, raw.per_minute, raw.per_hour, raw.per_day],
        raw.burst,
        path,
    )
}

fn window_rate(counts: [Option<u32>; 4], burst: u32, path: &str) -> Result<Rate, PolicyError> {
    const WINDOWS: [Window; 4] = [Window::Second, Window::Minute, Window::Hour, Window::Day];
    let given: Vec<(Window, u32)> = WINDOWS
        .iter()
        .zip(counts)
        .filter_map(|(w, c)| c.map(|c| (*w, c)))
        .collect();
    let (window, n) = match given.as_slice() {
        [one] => *one,
        [] => {
            return Err(PolicyError::new(
                path,
                "a rate needs one of per_second, per_minute, per_hour, per_day",
            ))
        }
        [_, second, ..] => {
            return Err(PolicyError::new(
                format!("{path}.{}", second.0.field()),
                "a rate has exactly one per_* window; this is a second one",
            ))
        }
    };
    let field = format!("{path}.{}", window.field());
    if n == 0 {
        return Err(PolicyError::new(field, "must be at least 1"));
    }
    if burst == 0 {
        return Err(PolicyError::new(
            format!("{path}.burst"),
            "must be at least 1",
        ));
    }
    if burst > n {
        return Err(PolicyError::new(
            format!("{path}.burst"),
            format!(
                "burst {burst} is larger than the rate itself ({n} {})",
                window.field()
            ),
        ));
    }
    Rate::new(n, window, burst).ok_or_else(|| PolicyError::new(field, "must be at least 1"))
}

fn header_name(value: Option<String>, default: &str, path: &str) -> Result<String, PolicyError> {
    let name = value
        .unwrap_or_else(|| default.to_string())
        .to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(name)
    } else {
        Err(PolicyError::new(
            path,
            format!("{name:?} is not a valid header name"),
        ))
    }
}

fn check_name(name: &str, path: &str) -> Result<(), PolicyError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(PolicyError::new(
            path,
            format!("{name:?}: names use letters, digits, '-', '_' and '.', at most 64 bytes"),
        ))
    }
}

fn lookup(
    names: &HashMap<&str, ClassId>,
    name: &str,
    path: String,
) -> Result<ClassId, PolicyError> {
    names
        .get(name)
        .copied()
        .ok_or_else(|| PolicyError::new(path, format!("unknown class {name:?}")))
}

fn validate(raw: RawPolicy) -> Result<Policy, PolicyError> {
    if raw.version != 1 {
        return Err(PolicyError::new("version", "only version 1 is supported"));
    }
    let identity = Identity {
        tenant_header: header_name(
            raw.identity.tenant_header,
            "x-laneguard-tenant",
            "identity.tenant_header",
        )?,
        principal_header: header_name(
            raw.identity.principal_header,
            "x-laneguard-principal",
            "identity.principal_header",
        )?,
        user_header: header_name(
            raw.identity.user_header,
            "x-laneguard-user",
            "identity.user_header",
        )?,
    };

    if raw.classes.is_empty() {
        return Err(PolicyError::new(
            "classes",
            "at least one class is required",
        ));
    }
    let mut names: HashMap<&str, ClassId> = HashMap::new();
    for (i, c) in raw.classes.iter().enumerate() {
        check_name(&c.name, &format!("classes[{i}].name"))?;
        if names.insert(c.name.as_str(), i).is_some() {
            return Err(PolicyError::new(
                format!("classes[{i}].name"),
                format!("duplicate class {:?}", c.name),
            ));
        }
    }

    let mut classes = Vec::with_capacity(raw.classes.len());
    for (i, c) in raw.classes.iter().enumerate() {
        let consequence = match c.consequence {
            RawConsequence::Low => Consequence::Low,
            RawConsequence::TimeSensitive => Consequence::TimeSensitive,
            RawConsequence::Repair => Consequence::Repair,
            RawConsequence::Recovery => Consequence::Recovery,
        };
        let failure_mode = match c.failure_mode {
            Some(RawFailureMode::Open) => FailureMode::Open,
            Some(RawFailureMode::Closed) => FailureMode::Closed,
            Some(RawFailureMode::Local) => FailureMode::Local,
            None if consequence == Consequence::Low => FailureMode::Closed,
            None => FailureMode::Local,
        };
        if c.borrow && !consequence.is_protected() {
            return Err(PolicyError::new(
                format!("classes[{i}].borrow"),
                "only protected classes (repair, recovery) borrow shared capacity",
            ));
        }
        let mut rivals = Vec::new();
        for (j, other) in c.must_not_compete_with.iter().enumerate() {
            let path = format!("classes[{i}].must_not_compete_with[{j}]");
            let id = lookup(&names, other, path.clone())?;
            if id == i {
                return Err(PolicyError::new(path, "a class cannot exclude itself"));
            }
            rivals.push(id);
        }
        classes.push(Class {
            name: c.name.clone(),
            consequence,
            source: c.source.clone(),
            purpose: c.purpose.clone(),
            owner: c.owner.clone(),
            borrow: c.borrow,
            failure_mode,
            must_not_compete_with: rivals,
            families: Vec::new(),
        });
    }

    let classification = {
        let default_name = raw
            .classification
            .default_class
            .clone()
            .unwrap_or_else(|| raw.classes[0].name.clone());
        let default_class = lookup(&names, &default_name, "classification.default_class".into())?;
        if classes[default_class].consequence.is_protected() {
            return Err(PolicyError::new(
                "classification.default_class",
                "the default for unknown principals must not be a protected class",
            ));
        }
        Classification {
            header: header_name(
                raw.classification.header,
                "x-traffic-class",
                "classification.header",
            )?,
            granted_header: header_name(
                raw.classification.granted_header,
                "x-laneguard-class",
                "classification.granted_header",
            )?,
            default_class,
        }
    };

    let service = {
        let s = raw.service;
        let cluster = s.cluster.unwrap_or_else(|| "laneguard_rls".to_string());
        if cluster.is_empty() {
            return Err(PolicyError::new("service.cluster", "must not be empty"));
        }
        let domain = s.domain.unwrap_or_else(|| "laneguard".to_string());
        if domain.is_empty() {
            return Err(PolicyError::new("service.domain", "must not be empty"));
        }
        let timeout_ms = s.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
        if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
            return Err(PolicyError::new(
                "service.timeout_ms",
                format!("must be between 1 and {MAX_TIMEOUT_MS}"),
            ));
        }
        let local_share = s.local_share.unwrap_or(1.0);
        if !(local_share > 0.0 && local_share <= 1.0) {
            return Err(PolicyError::new("service.local_share", "must be in (0, 1]"));
        }
        let sync_interval_s = s.sync_interval_s.unwrap_or(DEFAULT_SYNC_INTERVAL_S);
        if !(1..=30).contains(&sync_interval_s) {
            return Err(PolicyError::new(
                "service.sync_interval_s",
                "must be between 1 and 30 seconds",
            ));
        }
        let max_lease = s.max_lease.unwrap_or(DEFAULT_MAX_LEASE);
        if max_lease == 0 || max_lease > 100_000 {
            return Err(PolicyError::new(
                "service.max_lease",
                "must be between 1 and 100000",
            ));
        }
        let max_buckets = s
            .max_buckets
            .unwrap_or(crate::engine::DEFAULT_MAX_BUCKETS as u32);
        if !(MIN_MAX_BUCKETS..=MAX_MAX_BUCKETS).contains(&max_buckets) {
            return Err(PolicyError::new(
                "service.max_buckets",
                format!("must be between {MIN_MAX_BUCKETS} and {MAX_MAX_BUCKETS}"),
            ));
        }
        Service {
            cluster,
            domain,
            timeout_ms,
            local_share,
            sync_interval_s,
            max_lease,
            max_buckets,
        }
    };

    let mut principals = HashMap::new();
    for (i, p) in raw.principals.iter().enumerate() {
        check_name(&p.name, &format!("principals[{i}].name"))?;
        let default_class = lookup(
            &names,
            &p.default_class,
            format!("principals[{i}].default_class"),
        )?;
        let mut may_declare = Vec::new();
        for (j, c) in p.may_declare.iter().enumerate() {
            may_declare.push(lookup(
                &names,
                c,
                format!("principals[{i}].may_declare[{j}]"),
            )?);
        }
        if !may_declare.contains(&default_class) {
            return Err(PolicyError::new(
                format!("principals[{i}].default_class"),
                format!("{:?} is not in may_declare", p.default_class),
            ));
        }
        if principals
            .insert(
                p.name.clone(),
                Principal {
                    default_class,
                    may_declare,
                    purposes: None,
                    models: None,
                },
            )
            .is_some()
        {
            return Err(PolicyError::new(
                format!("principals[{i}].name"),
                format!("duplicate principal {:?}", p.name),
            ));
        }
    }

    // Base budgets and reserves from the class list.
    let mut base_budgets = Vec::new();
    let mut base_reserves = Vec::new();
    for (i, c) in raw.classes.iter().enumerate() {
        base_budgets.push(
            c.budget
                .as_ref()
                .map(|r| rate(r, &format!("classes[{i}].budget")))
                .transpose()?,
        );
        base_reserves.push(
            c.reserve
                .as_ref()
                .map(|r| rate(r, &format!("classes[{i}].reserve")))
                .transpose()?,
        );
    }

    let default_ceiling = rate(&raw.tenants.default.ceiling, "tenants.default.ceiling")?;
    let default_plan = build_plan(
        &classes,
        &names,
        default_ceiling,
        &raw.tenants.default.classes,
        "tenants.default",
        &base_budgets,
        &base_reserves,
        true,
    )?;
    let mut tenant_plans = HashMap::new();
    for (tenant, o) in &raw.tenants.overrides {
        let path = format!("tenants.overrides.{tenant}");
        let ceiling = match &o.ceiling {
            Some(r) => rate(r, &format!("{path}.ceiling"))?,
            None => default_ceiling,
        };
        let plan = build_plan(
            &classes,
            &names,
            ceiling,
            &o.classes,
            &path,
            &default_plan.budgets,
            &default_plan.reserves,
            false,
        )?;
        tenant_plans.insert(tenant.clone(), plan);
    }

    check_competition(&classes)?;

    let mut families = Vec::new();
    for (i, f) in raw.endpoint_families.iter().enumerate() {
        let path = format!("endpoint_families[{i}]");
        check_name(&f.name, &format!("{path}.name"))?;
        if families.iter().any(|g: &Family| g.name == f.name) {
            return Err(PolicyError::new(
                format!("{path}.name"),
                format!("duplicate family {:?}", f.name),
            ));
        }
        if f.path_prefixes.is_empty() {
            return Err(PolicyError::new(
                format!("{path}.path_prefixes"),
                "at least one prefix is required",
            ));
        }
        for (j, p) in f.path_prefixes.iter().enumerate() {
            if !p.starts_with('/') {
                return Err(PolicyError::new(
                    format!("{path}.path_prefixes[{j}]"),
                    "must start with '/'",
                ));
            }
        }
        let cost = f.cost.unwrap_or(1);
        if cost == 0 {
            return Err(PolicyError::new(
                format!("{path}.cost"),
                "must be at least 1",
            ));
        }
        families.push(Family {
            name: f.name.clone(),
            path_prefixes: f.path_prefixes.clone(),
            methods: f.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
            cost,
            limit: f
                .limit
                .as_ref()
                .map(|r| rate(r, &format!("{path}.limit")))
                .transpose()?,
        });
    }

    for (i, c) in raw.classes.iter().enumerate() {
        for (j, name) in c.families.iter().enumerate() {
            let id = families
                .iter()
                .position(|f| &f.name == name)
                .ok_or_else(|| {
                    PolicyError::new(
                        format!("classes[{i}].families[{j}]"),
                        format!("unknown endpoint family {name:?}"),
                    )
                })?;
            if !classes[i].families.contains(&id) {
                classes[i].families.push(id);
            }
        }
    }

    let users = raw
        .users
        .as_ref()
        .map(|u| rate(&u.limit, "users.limit"))
        .transpose()?;

    let purpose_rule = raw
        .purposes
        .as_ref()
        .map(|p| (p.default.clone(), p.unknown, p.families.clone()));
    let mut purposes = match raw.purposes {
        None => None,
        Some(p) => {
            let mut limits = HashMap::new();
            for (name, r) in &p.limits {
                check_name(name, &format!("purposes.limits.{name}"))?;
                limits.insert(name.clone(), rate(r, &format!("purposes.limits.{name}"))?);
            }
            Some(Purposes {
                header: header_name(p.header, "x-purpose", "purposes.header")?,
                // Set below, once `tokens.purposes` (also declarable) is validated.
                rule: DeclaredRule {
                    default: None,
                    unknown: Unknown::Refuse,
                    families: None,
                },
                limits,
            })
        }
    };

    let models = match raw.models {
        None => None,
        Some(m) => {
            let mut list = HashMap::new();
            for (i, model) in m.list.iter().enumerate() {
                let path = format!("models.list[{i}]");
                check_name(&model.name, &format!("{path}.name"))?;
                let capacity = rate(&model.capacity, &format!("{path}.capacity"))?;
                let default_allocation =
                    allocation(&model.allocation, &capacity, &format!("{path}.allocation"))?;
                let mut tenant_allocations = HashMap::new();
                let mut shares = 0.0;
                for (tenant, a) in &model.tenants {
                    let apath = format!("{path}.tenants.{tenant}");
                    shares += a.share.unwrap_or(0.0);
                    if shares > 1.0 + 1e-9 {
                        return Err(PolicyError::new(
                            format!("{apath}.share"),
                            "the tenants' shares of this model add up to more than 1",
                        ));
                    }
                    tenant_allocations.insert(tenant.clone(), allocation(a, &capacity, &apath)?);
                }
                let model_tokens = tokens::model_tokens(model, &path)?;
                if list
                    .insert(
                        model.name.clone(),
                        Model {
                            name: model.name.clone(),
                            capacity,
                            default_allocation,
                            tenant_allocations,
                            tokens: model_tokens,
                            cheaper_model: model.cheaper_model.clone(),
                        },
                    )
                    .is_some()
                {
                    return Err(PolicyError::new(
                        format!("{path}.name"),
                        format!("duplicate model {:?}", model.name),
                    ));
                }
            }
            tokens::check_cheaper(&m.list)?;
            let rule = declared_rule(
                "models",
                "model",
                m.default.as_deref(),
                m.unknown,
                m.families.as_deref(),
                |n| list.contains_key(n),
                &families,
            )?;
            Some(Models {
                header: header_name(m.header, "x-model", "models.header")?,
                rule,
                list,
            })
        }
    };

    let ops = ops::validate(
        &raw.rollout,
        &raw.audit,
        &raw.classes,
        &raw.tenants,
        &raw.endpoint_families,
        &names,
        &service.cluster,
        models
            .iter()
            .flat_map(|m| m.list.values())
            .flat_map(|m| m.tenant_allocations.keys().cloned()),
    )?;

    let family_names: Vec<String> = families.iter().map(|f| f.name.clone()).collect();
    let tokens = tokens::validate(
        raw.tokens.as_ref(),
        models
            .iter()
            .flat_map(|m| m.list.values())
            .any(|m| m.tokens.is_some()),
        &family_names,
        purposes.as_ref().map(|p| &p.limits),
    )?;

    // A purpose is declarable when the policy charges it something: a request budget or a
    // token budget.
    let mut declarable_purposes: HashMap<String, ()> = HashMap::new();
    if let Some(p) = &purposes {
        declarable_purposes.extend(p.limits.keys().map(|k| (k.clone(), ())));
        declarable_purposes.extend(
            tokens
                .iter()
                .flat_map(|t| t.purposes.keys())
                .map(|k| (k.clone(), ())),
        );
    }
    if let (Some(p), Some((default, unknown, scope))) = (purposes.as_mut(), purpose_rule) {
        p.rule = declared_rule(
            "purposes",
            "purpose",
            default.as_deref(),
            unknown,
            scope.as_deref(),
            |n| declarable_purposes.contains_key(n),
            &families,
        )?;
    }
    declarable(
        &raw.principals,
        &mut principals,
        purposes.as_ref().map(|_| &declarable_purposes),
        models.as_ref().map(|m| &m.list),
    )?;

    let policy = Policy {
        identity,
        classification,
        service,
        draft03_headers: raw.headers.draft03.unwrap_or(true),
        classes,
        principals,
        default_plan,
        tenant_plans,
        families,
        users,
        purposes,
        models,
        ops,
        tokens,
    };
    check_costs(&policy)?;
    Ok(policy)
}

/// `purposes` or `models`: their `default`, `unknown` and `families`.
fn declared_rule(
    section: &str,
    what: &str,
    default: Option<&str>,
    unknown: Option<RawUnknown>,
    scope: Option<&[String]>,
    listed: impl Fn(&str) -> bool,
    families: &[Family],
) -> Result<DeclaredRule, PolicyError> {
    if let Some(d) = default {
        if !listed(d) {
            return Err(PolicyError::new(
                format!("{section}.default"),
                format!("unknown {what} {d:?}"),
            ));
        }
    }
    let unknown = match (unknown, default) {
        (Some(RawUnknown::Refuse), _) => Unknown::Refuse,
        (Some(RawUnknown::Default), Some(_)) | (None, Some(_)) => Unknown::Default,
        (Some(RawUnknown::Default), None) => {
            return Err(PolicyError::new(
                format!("{section}.unknown"),
                format!("`default` needs {section}.default, the {what} to charge"),
            ));
        }
        (None, None) => {
            return Err(PolicyError::new(
                format!("{section}.default"),
                format!(
                    "required: the {what} charged to a request that declares none (the \
                     header is the caller's), or set `{section}.unknown: refuse` to refuse it"
                ),
            ));
        }
    };
    let families = match scope {
        None => None,
        Some([]) => {
            return Err(PolicyError::new(
                format!("{section}.families"),
                "empty: omit it to apply to every request",
            ));
        }
        Some(names) => {
            for (j, name) in names.iter().enumerate() {
                if !families.iter().any(|f| &f.name == name) {
                    return Err(PolicyError::new(
                        format!("{section}.families[{j}]"),
                        format!("unknown endpoint family {name:?}"),
                    ));
                }
            }
            Some(names.to_vec())
        }
    };
    Ok(DeclaredRule {
        default: default.map(str::to_string),
        unknown,
        families,
    })
}

/// `principals[].may_declare_purposes` and `may_declare_models`: listed names only.
fn declarable<P, M>(
    raw: &[RawPrincipal],
    principals: &mut HashMap<String, Principal>,
    purposes: Option<&HashMap<String, P>>,
    models: Option<&HashMap<String, M>>,
) -> Result<(), PolicyError> {
    fn names<T>(
        given: Option<&Vec<String>>,
        known: Option<&HashMap<String, T>>,
        path: String,
        what: &str,
    ) -> Result<Option<Vec<String>>, PolicyError> {
        let Some(given) = given else {
            return Ok(None);
        };
        let Some(known) = known else {
            return Err(PolicyError::new(
                path,
                format!("the policy has no {what}s section"),
            ));
        };
        for (j, n) in given.iter().enumerate() {
            if !known.contains_key(n) {
                return Err(PolicyError::new(
                    format!("{path}[{j}]"),
                    format!("unknown {what} {n:?}"),
                ));
            }
        }
        Ok(Some(given.clone()))
    }
    for (i, p) in raw.iter().enumerate() {
        let purposes = names(
            p.may_declare_purposes.as_ref(),
            purposes,
            format!("principals[{i}].may_declare_purposes"),
            "purpose",
        )?;
        let models = names(
            p.may_declare_models.as_ref(),
            models,
            format!("principals[{i}].may_declare_models"),
            "model",
        )?;
        if let Some(entry) = principals.get_mut(&p.name) {
            entry.purposes = purposes;
            entry.models = models;
        }
    }
    Ok(())
}

fn allocation(a: &RawAllocation, capacity: &Rate, path: &str) -> Result<Rate, PolicyError> {
    let absolute = [a.per_second, a.per_minute, a.per_hour, a.per_day];
    let alloc = match (a.share, absolute.iter().any(Option::is_some)) {
        (Some(_), true) => {
            return Err(PolicyError::new(
                path,
                "give either share or a per_* rate, not both",
            ));
        }
        (Some(share), false) => {
            if !(share > 0.0 && share <= 1.0) {
                return Err(PolicyError::new(
                    format!("{path}.share"),
                    "must be in (0, 1]",
                ));
            }
            let n = (f64::from(capacity.requests.get()) * share).floor();
            let n = if n >= 1.0 { n as u32 } else { 0 };
            if n == 0 {
                return Err(PolicyError::new(
                    format!("{path}.share"),
                    "this share of the capacity is less than one request per window",
                ));
            }
            window_rate(
                [
                    (capacity.window == Window::Second).then_some(n),
                    (capacity.window == Window::Minute).then_some(n),
                    (capacity.window == Window::Hour).then_some(n),
                    (capacity.window == Window::Day).then_some(n),
                ],
                a.burst,
                path,
            )?
        }
        (None, _) => window_rate(absolute, a.burst, path)?,
    };
    let widest = alloc.window.max(capacity.window);
    if alloc.count_over(widest) > capacity.count_over(widest) {
        return Err(PolicyError::new(
            path,
            "an allocation cannot exceed the model's capacity",
        ));
    }
    if alloc.burst > capacity.burst {
        return Err(PolicyError::new(
            format!("{path}.burst"),
            "the burst credit cannot exceed the model's capacity burst",
        ));
    }
    Ok(alloc)
}

#[allow(clippy::too_many_arguments)]
fn build_plan(
    classes: &[Class],
    names: &HashMap<&str, ClassId>,
    ceiling: Rate,
    overrides: &BTreeMap<String, RawClassOverride>,
    path: &str,
    inherited_budgets: &[Option<Rate>],
    inherited_reserves: &[Option<Rate>],
    is_default: bool,
) -> Result<TenantPlan, PolicyError> {
    let mut budgets = inherited_budgets.to_vec();
    let mut reserves = inherited_reserves.to_vec();
    for (name, o) in overrides {
        let opath = format!("{path}.classes.{name}");
        let id = lookup(names, name, opath.clone())?;
        if let Some(b) = &o.budget {
            budgets[id] = Some(rate(b, &format!("{opath}.budget"))?);
        }
        if let Some(r) = &o.reserve {
            reserves[id] = Some(rate(r, &format!("{opath}.reserve"))?);
            if !classes[id].consequence.is_protected() {
                return Err(PolicyError::new(
                    format!("{opath}.reserve"),
                    format!("{name:?} is not a protected class (repair, recovery); it cannot have a reserve"),
                ));
            }
        }
    }
    for (i, c) in classes.iter().enumerate() {
        let where_ = if is_default {
            format!("classes[{i}]")
        } else {
            format!("{path}.classes.{}", c.name)
        };
        match (c.consequence.is_protected(), reserves[i].is_some()) {
            (true, false) => {
                return Err(PolicyError::new(
                    format!("{where_}.reserve"),
                    format!(
                        "{:?} is a {} class and needs a reserved lane",
                        c.name,
                        c.consequence.as_str()
                    ),
                ))
            }
            (false, true) => {
                return Err(PolicyError::new(
                    format!("{where_}.reserve"),
                    format!(
                        "{:?} is a {} class; only repair and recovery classes get reserves",
                        c.name,
                        c.consequence.as_str()
                    ),
                ))
            }
            _ => {}
        }
        if let Some(b) = &budgets[i] {
            let w = b.window.max(ceiling.window);
            if b.count_over(w) > ceiling.count_over(w) {
                return Err(PolicyError::new(
                    format!("{where_}.budget"),
                    "a class budget cannot exceed the tenant ceiling",
                ));
            }
        }
    }
    // The shared pool is the ceiling minus the reserves, counted over the widest window
    // in play so the subtraction is exact (every window divides the wider ones).
    let widest = reserves
        .iter()
        .flatten()
        .map(|r| r.window)
        .fold(ceiling.window, Window::max);
    let reserved: u64 = reserves
        .iter()
        .flatten()
        .map(|r| r.count_over(widest))
        .sum();
    let reserved_burst: u64 = reserves
        .iter()
        .flatten()
        .map(|r| u64::from(r.burst.get()))
        .sum();
    let total = ceiling.count_over(widest);
    let ceiling_path = format!("{path}.ceiling");
    if reserved >= total {
        return Err(PolicyError::new(
            format!("{ceiling_path}.{}", ceiling.window.field()),
            format!("the reserves add up to {reserved} per {} but the ceiling is {total}; leave a shared pool", widest_name(widest)),
        ));
    }
    if reserved_burst >= u64::from(ceiling.burst.get()) {
        return Err(PolicyError::new(
            format!("{ceiling_path}.burst"),
            format!(
                "the reserves' bursts add up to {reserved_burst} but the ceiling's burst is {}; leave a shared burst",
                ceiling.burst
            ),
        ));
    }
    let shared_n = u32::try_from(total - reserved)
        .map_err(|_| PolicyError::new(ceiling_path.clone(), "rate too large"))?;
    let shared_burst = u32::try_from(u64::from(ceiling.burst.get()) - reserved_burst)
        .map_err(|_| PolicyError::new(ceiling_path.clone(), "burst too large"))?;
    let shared = Rate::new(shared_n, widest, shared_burst.min(shared_n))
        .ok_or_else(|| PolicyError::new(ceiling_path, "no shared capacity left"))?;
    Ok(TenantPlan {
        ceiling,
        shared,
        budgets,
        reserves,
    })
}

fn widest_name(w: Window) -> &'static str {
    match w {
        Window::Second => "second",
        Window::Minute => "minute",
        Window::Hour => "hour",
        Window::Day => "day",
    }
}

/// Two classes compete when their guaranteed capacity comes from the same budget. Every
/// unprotected class draws from the tenant's shared pool, so two unprotected classes
/// always compete; a protected class's reserve is its own. (Borrowing idle shared capacity
/// is opportunistic and does not count: the reserve is what is guaranteed.)
fn check_competition(classes: &[Class]) -> Result<(), PolicyError> {
    for (i, c) in classes.iter().enumerate() {
        for (j, &other) in c.must_not_compete_with.iter().enumerate() {
            if !c.consequence.is_protected() && !classes[other].consequence.is_protected() {
                return Err(PolicyError::new(
                    format!("classes[{i}].must_not_compete_with[{j}]"),
                    format!(
                        "{:?} and {:?} both draw from the tenant's shared pool, so they compete; \
                         make one of them a protected class with a reserve, or drop this rule",
                        c.name, classes[other].name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// A weighted request must fit in every bucket it can touch, or it could never pass.
fn check_costs(p: &Policy) -> Result<(), PolicyError> {
    let mut limits: Vec<(String, Rate)> = Vec::new();
    let plans = std::iter::once(("tenants.default".to_string(), &p.default_plan)).chain(
        p.tenant_plans
            .iter()
            .map(|(t, pl)| (format!("tenants.overrides.{t}"), pl)),
    );
    for (path, plan) in plans {
        limits.push((format!("{path} (shared pool)"), plan.shared));
        for (i, c) in p.classes.iter().enumerate() {
            if let Some(b) = plan.budgets[i] {
                limits.push((format!("the budget of class {:?}", c.name), b));
            }
            if let Some(r) = plan.reserves[i] {
                limits.push((format!("the reserve of class {:?}", c.name), r));
            }
        }
    }
    if let Some(u) = p.users {
        limits.push(("users.limit".into(), u));
    }
    for (i, c) in p.ops.classes.iter().enumerate() {
        if let Some(b) = c.fallback_route.budget {
            limits.push((format!("classes[{i}].fallback_route.budget"), b));
        }
    }
    for (i, f) in p.families.iter().enumerate() {
        let own = f.limit.iter().map(|r| ("its own limit".to_string(), *r));
        for (what, r) in limits.iter().cloned().chain(own) {
            if f.cost > r.burst.get() {
                return Err(PolicyError::new(
                    format!("endpoint_families[{i}].cost"),
                    format!(
                        "cost {} is larger than the burst {} of {what}: such a request could never pass",
                        f.cost, r.burst
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl fmt::Display for Consequence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small valid policy; other policy tests build on it.
    pub(crate) const BASE: &str = r#"
version: 1
classes:
  - { name: web, consequence: time_sensitive, budget: { per_minute: 60, burst: 10 } }
  - { name: repair, consequence: repair, reserve: { per_minute: 20, burst: 5 } }
tenants:
  default: { ceiling: { per_minute: 100, burst: 20 } }
"#;

    fn err(text: &str) -> PolicyError {
        match parse(text) {
            Ok(_) => panic!("policy should be rejected:\n{text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn base_parses_with_defaults() {
        let p = parse(BASE).unwrap();
        assert_eq!(p.identity.tenant_header, "x-laneguard-tenant");
        assert_eq!(p.classification.header, "x-traffic-class");
        assert_eq!(p.classification.default_class, 0);
        assert_eq!(p.service.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(p.classes[0].failure_mode, FailureMode::Local);
        assert_eq!(p.default_plan.shared.requests.get(), 80);
        assert_eq!(p.default_plan.shared.burst.get(), 15);
    }

    #[test]
    fn json_is_accepted() {
        let json = r#"{"version":1,"classes":[{"name":"a","consequence":"low"}],
            "tenants":{"default":{"ceiling":{"per_second":5,"burst":5}}}}"#;
        let p = parse(json).unwrap();
        assert_eq!(
            p.classes[0].failure_mode,
            FailureMode::Closed,
            "low fails closed by default"
        );
    }

    #[test]
    fn errors_name_their_path() {
        let cases = [
            (
                BASE.replace("burst: 5 }", "burst: 5, extra: 1 }"),
                "classes[1].reserve.extra",
            ),
            (
                BASE.replace("per_minute: 20", "per_minute: 0"),
                "classes[1].reserve.per_minute",
            ),
            (
                BASE.replace("burst: 10", "burst: 61"),
                "classes[0].budget.burst",
            ),
            (
                BASE.replace("consequence: repair", "consequence: fixing"),
                "classes[1].consequence",
            ),
            (
                BASE.replace(
                    "reserve: { per_minute: 20, burst: 5 }",
                    "budget: { per_minute: 20, burst: 5 }",
                ),
                "classes[1].reserve",
            ),
            (
                BASE.replace("per_minute: 20, burst: 5", "per_minute: 100, burst: 5"),
                "tenants.default.ceiling.per_minute",
            ),
            (BASE.replace("version: 1", "version: 2"), "version"),
            (
                BASE.replace(
                    "per_minute: 60, burst",
                    "per_minute: 60, per_hour: 60, burst",
                ),
                "classes[0].budget.per_hour",
            ),
        ];
        for (text, path) in cases {
            let e = err(&text);
            assert_eq!(e.path, path, "{e}");
        }
    }

    #[test]
    fn per_window_rates_compare_exactly() {
        // 1/s reserve against a 100/min ceiling: 60/min of 100/min is fine…
        let ok = BASE.replace(
            "reserve: { per_minute: 20, burst: 5 }",
            "reserve: { per_second: 1, burst: 1 }",
        );
        assert_eq!(parse(&ok).unwrap().default_plan.shared.requests.get(), 40);
        // …but 2/s is 120/min, more than the ceiling.
        let bad = BASE.replace(
            "reserve: { per_minute: 20, burst: 5 }",
            "reserve: { per_second: 2, burst: 1 }",
        );
        assert_eq!(err(&bad).path, "tenants.default.ceiling.per_minute");
    }

    #[test]
    fn rejects_a_map_that_contradicts_itself() {
        let text = BASE.replace(
            "  - { name: repair",
            "  - { name: batch, consequence: low, must_not_compete_with: [web] }\n  - { name: repair",
        );
        let e = err(&text);
        assert_eq!(e.path, "classes[1].must_not_compete_with[0]");
        assert!(e.message.contains("shared pool"), "{e}");
    }

    #[test]
    fn costs_must_fit_the_smallest_burst() {
        let text = format!(
            "{BASE}endpoint_families:\n  - {{ name: big, path_prefixes: [/x], cost: 11 }}\n"
        );
        assert_eq!(err(&text).path, "endpoint_families[0].cost");
    }

    #[test]
    fn principals_must_be_allowed_their_default() {
        let text = format!(
            "{BASE}principals:\n  - {{ name: p, default_class: repair, may_declare: [web] }}\n"
        );
        assert_eq!(err(&text).path, "principals[0].default_class");
    }
}
