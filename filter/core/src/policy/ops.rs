//! The operability part of the policy: rollout modes, near misses, graceful degradation
//! (ordered fallbacks before the hard 429) and where audit records go.
//!
//! Every field is optional and the defaults are today's behaviour (enforce everything,
//! fallbacks `[reject]`), so a policy written before these fields existed loads unchanged.

use super::raw::{
    RawAudit, RawCache, RawClass, RawFallback, RawFallbackRoute, RawFamily, RawMode, RawQueue,
    RawRollout, RawTenants,
};
use super::{header_name, rate, ClassId, PolicyError};
use crate::engine::{Bucket, BucketKind};
use crate::rate::Rate;
use std::collections::{BTreeSet, HashMap};

/// How a rule is rolled out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Limit: a request without room is degraded or refused.
    Enforce,
    /// "Would have been throttled": charged exactly as `enforce` would charge, but a
    /// request without room is let through, counted, recorded and sent the headers.
    Shadow,
    /// Not limited and not charged.
    Off,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
            Mode::Off => "off",
        }
    }

    fn from_raw(m: RawMode) -> Mode {
        match m {
            RawMode::Enforce => Mode::Enforce,
            RawMode::Shadow => Mode::Shadow,
            RawMode::Off => Mode::Off,
        }
    }
}

/// One step of graceful degradation, tried in order before the 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fallback {
    /// Hold the request (bounded wait, bounded depth per worker) until its buckets refill.
    Queue,
    /// Let it through on a route the Envoy YAML selects with a header.
    FallbackRoute,
    /// A cacheable request ([`CacheSettings::cacheable`]) goes to a cache-only route the
    /// Envoy YAML selects with a header (Envoy's cache filter answers it, the upstream is
    /// never reached); a miss there gets the 429. Only `reject` may follow it.
    Cached,
    /// Refuse with 429.
    Reject,
}

impl Fallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Queue => "queue",
            Fallback::FallbackRoute => "fallback_route",
            Fallback::Cached => "cached",
            Fallback::Reject => "reject",
        }
    }

    pub const ALL: [Fallback; 4] = [
        Fallback::Queue,
        Fallback::FallbackRoute,
        Fallback::Cached,
        Fallback::Reject,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    /// A request that would have to wait longer than this is not queued.
    pub max_wait_ms: u32,
    /// At most this many requests of the class wait at once on one worker.
    pub max_depth: u32,
}

pub const DEFAULT_QUEUE: QueueSettings = QueueSettings {
    max_wait_ms: 2_000,
    max_depth: 64,
};
pub const MAX_QUEUE_WAIT_MS: u32 = 30_000;
pub const MAX_QUEUE_DEPTH: u32 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackRoute {
    /// A request header the route table matches on (lower case).
    pub header: String,
    pub value: String,
    /// The route's own budget (`classes[].fallback_route.budget`): a request sent to the
    /// fallback route is charged to the bucket `[tenant, fallback, class]` at this rate, like
    /// any other admission. `None`: the class's budget for the request's tenant, or the
    /// tenant's shared pool for a class without one ([`crate::degrade::route_plan`]).
    pub budget: Option<Rate>,
}

/// `classes[].cache`: where the `cached` fallback sends a request, and which requests it
/// may send there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// A request header the route table matches on (lower case); default
    /// `x-laneguard-route: cached`.
    pub header: String,
    pub value: String,
    /// Only GETs of these endpoint families are cacheable; `None`: every GET.
    pub families: Option<Vec<String>>,
}

impl CacheSettings {
    /// Whether a request may be answered from the cache: a GET (Envoy's cache filter stores
    /// nothing else) of a listed family (any, when the policy lists none), and never an AI
    /// request (its answer is per prompt, and it is a POST).
    pub fn cacheable(&self, method: &str, family: Option<&str>, ai: bool) -> bool {
        let family_ok = match &self.families {
            None => true,
            Some(list) => family.is_some_and(|f| list.iter().any(|l| l == f)),
        };
        method == "GET" && family_ok && !ai
    }
}

/// The operability settings of one class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassOps {
    pub mode: Option<Mode>,
    /// Ordered; always ends with [`Fallback::Reject`].
    pub fallbacks: Vec<Fallback>,
    pub queue: QueueSettings,
    pub fallback_route: FallbackRoute,
    pub cache: CacheSettings,
}

/// Modes one tenant override sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantModes {
    pub mode: Option<Mode>,
    /// Per class id.
    pub classes: Vec<Option<Mode>>,
}

/// Per bucket kind (the lane follows the request's mode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BucketModes {
    pub class: Option<Mode>,
    pub user: Option<Mode>,
    pub tool: Option<Mode>,
    pub purpose: Option<Mode>,
    pub model: Option<Mode>,
    pub model_total: Option<Mode>,
}

/// Where audit records go besides Envoy's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// Ship records to the service's hash-chained audit log.
    pub ship: bool,
    pub cluster: String,
    /// Records one worker holds while the service is unreachable; more are dropped and counted.
    pub max_buffer: u32,
    /// At most this many records per call; each call carries the whole backlog up to it
    /// (and up to the filter's byte bound per call).
    pub max_batch: u32,
}

pub const DEFAULT_NEAR_MISS_PCT: u8 = 90;
pub const DEFAULT_AUDIT_BUFFER: u32 = 1_000;
pub const DEFAULT_AUDIT_BATCH: u32 = 1_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operations {
    /// The policy-wide default mode.
    pub mode: Mode,
    pub near_miss_pct: u8,
    pub buckets: BucketModes,
    /// Per class id.
    pub classes: Vec<ClassOps>,
    /// Per tenant named in `tenants.overrides`.
    pub tenants: HashMap<String, TenantModes>,
    /// Per endpoint family (its own `limit`, the `tool` bucket).
    pub families: HashMap<String, Mode>,
    pub audit: AuditSettings,
    /// Tenants the policy names (overrides and model allocations): the only tenants that
    /// get their own stats series.
    pub named_tenants: Vec<String>,
}

impl Operations {
    /// The mode of a request of `class` from `tenant`. Most specific wins:
    /// `tenants.overrides.T.classes.C.mode`, `tenants.overrides.T.mode`, `classes[C].mode`,
    /// `rollout.mode`, `enforce`.
    pub fn mode_for(&self, tenant: &str, class: ClassId) -> Mode {
        let t = self.tenants.get(tenant);
        t.and_then(|t| t.classes.get(class).copied().flatten())
            .or_else(|| t.and_then(|t| t.mode))
            .or_else(|| self.classes.get(class).and_then(|c| c.mode))
            .unwrap_or(self.mode)
    }

    /// The mode of one bucket's rule, before the request's own mode is applied. The lane
    /// (shared pool, reserve) has no mode of its own.
    pub fn bucket_mode(&self, bucket: &Bucket, family: Option<&str>) -> Mode {
        let by_kind = match bucket.kind {
            BucketKind::Shared | BucketKind::Reserve | BucketKind::Fallback => None,
            BucketKind::Class => self.buckets.class,
            // A token budget follows the mode of its dimension's rule.
            BucketKind::User | BucketKind::UserTokens => self.buckets.user,
            BucketKind::Tool | BucketKind::ToolTokens => family
                .and_then(|f| self.families.get(f).copied())
                .or(self.buckets.tool),
            BucketKind::Purpose | BucketKind::PurposeTokens => self.buckets.purpose,
            BucketKind::Model | BucketKind::ModelTokens => self.buckets.model,
            BucketKind::ModelTotal | BucketKind::ModelTotalTokens => self.buckets.model_total,
        };
        by_kind.unwrap_or(Mode::Enforce)
    }

    pub fn class(&self, id: ClassId) -> Option<&ClassOps> {
        self.classes.get(id)
    }
}

fn mode(m: Option<RawMode>) -> Option<Mode> {
    m.map(Mode::from_raw)
}

fn class_ops(c: &RawClass, i: usize, families: &[RawFamily]) -> Result<ClassOps, PolicyError> {
    let path = format!("classes[{i}]");
    let fallbacks = match &c.fallbacks {
        None => vec![Fallback::Reject],
        Some(list) => {
            if list.is_empty() {
                return Err(PolicyError::new(
                    format!("{path}.fallbacks"),
                    "list at least one fallback, or leave the field out (default: [reject])",
                ));
            }
            let mut out: Vec<Fallback> = Vec::with_capacity(list.len() + 1);
            for (j, f) in list.iter().enumerate() {
                let f = match f {
                    RawFallback::Queue => Fallback::Queue,
                    RawFallback::FallbackRoute => Fallback::FallbackRoute,
                    RawFallback::Cached => Fallback::Cached,
                    RawFallback::Reject => Fallback::Reject,
                };
                if out.contains(&f) {
                    return Err(PolicyError::new(
                        format!("{path}.fallbacks[{j}]"),
                        format!("{} is listed twice", f.as_str()),
                    ));
                }
                if out.contains(&Fallback::Reject) {
                    return Err(PolicyError::new(
                        format!("{path}.fallbacks[{j}]"),
                        "nothing after reject is ever tried; reject must be last",
                    ));
                }
                if out.contains(&Fallback::Cached) && f != Fallback::Reject {
                    return Err(PolicyError::new(
                        format!("{path}.fallbacks[{j}]"),
                        "only reject may follow cached: a cache miss is known after the request has left the filter, when only the 429 can still apply",
                    ));
                }
                out.push(f);
            }
            if !out.contains(&Fallback::Reject) {
                // A 429 is always the last resort.
                out.push(Fallback::Reject);
            }
            out
        }
    };
    let queue = match &c.queue {
        None => DEFAULT_QUEUE,
        Some(q) => queue_settings(q, &format!("{path}.queue"))?,
    };
    if c.queue.is_some() && !fallbacks.contains(&Fallback::Queue) {
        return Err(PolicyError::new(
            format!("{path}.queue"),
            "queue settings without `queue` in fallbacks do nothing; add it to fallbacks",
        ));
    }
    let fallback_route = match &c.fallback_route {
        None => FallbackRoute {
            header: "x-laneguard-route".into(),
            value: "fallback".into(),
            budget: None,
        },
        Some(r) => route(r, &format!("{path}.fallback_route"))?,
    };
    if c.fallback_route.is_some() && !fallbacks.contains(&Fallback::FallbackRoute) {
        return Err(PolicyError::new(
            format!("{path}.fallback_route"),
            "fallback_route settings without `fallback_route` in fallbacks do nothing; add it to fallbacks",
        ));
    }
    let cache = match &c.cache {
        None => CacheSettings {
            header: "x-laneguard-route".into(),
            value: "cached".into(),
            families: None,
        },
        Some(r) => cache_settings(r, &format!("{path}.cache"), families)?,
    };
    if c.cache.is_some() && !fallbacks.contains(&Fallback::Cached) {
        return Err(PolicyError::new(
            format!("{path}.cache"),
            "cache settings without `cached` in fallbacks do nothing; add it to fallbacks",
        ));
    }
    Ok(ClassOps {
        mode: mode(c.mode),
        fallbacks,
        queue,
        fallback_route,
        cache,
    })
}

fn queue_settings(q: &RawQueue, path: &str) -> Result<QueueSettings, PolicyError> {
    let max_wait_ms = q.max_wait_ms.unwrap_or(DEFAULT_QUEUE.max_wait_ms);
    if max_wait_ms == 0 || max_wait_ms > MAX_QUEUE_WAIT_MS {
        return Err(PolicyError::new(
            format!("{path}.max_wait_ms"),
            format!("must be between 1 and {MAX_QUEUE_WAIT_MS}"),
        ));
    }
    let max_depth = q.max_depth.unwrap_or(DEFAULT_QUEUE.max_depth);
    if max_depth == 0 || max_depth > MAX_QUEUE_DEPTH {
        return Err(PolicyError::new(
            format!("{path}.max_depth"),
            format!("must be between 1 and {MAX_QUEUE_DEPTH}"),
        ));
    }
    Ok(QueueSettings {
        max_wait_ms,
        max_depth,
    })
}

fn cache_settings(
    r: &RawCache,
    path: &str,
    families: &[RawFamily],
) -> Result<CacheSettings, PolicyError> {
    let (header, value) = route_match(&r.header, &r.value, "cached", path)?;
    if let Some(list) = &r.families {
        if list.is_empty() {
            return Err(PolicyError::new(
                format!("{path}.families"),
                "list at least one endpoint family, or leave the field out (every GET)",
            ));
        }
        for (j, name) in list.iter().enumerate() {
            if !families.iter().any(|f| &f.name == name) {
                return Err(PolicyError::new(
                    format!("{path}.families[{j}]"),
                    format!("no endpoint family named {name:?} in endpoint_families"),
                ));
            }
        }
    }
    Ok(CacheSettings {
        header,
        value,
        families: r.families.clone(),
    })
}

/// The request header (and value) a route table matches on, `x-laneguard-route` by default.
fn route_match(
    header: &Option<String>,
    value: &Option<String>,
    default_value: &str,
    path: &str,
) -> Result<(String, String), PolicyError> {
    let header = header_name(
        header.clone(),
        "x-laneguard-route",
        &format!("{path}.header"),
    )?;
    if header.starts_with(':') || header == "host" {
        return Err(PolicyError::new(
            format!("{path}.header"),
            "use an ordinary request header, not a pseudo-header or host",
        ));
    }
    let value = value.clone().unwrap_or_else(|| default_value.into());
    let valid = !value.is_empty()
        && value.len() <= 256
        && value.bytes().all(|b| (b' '..=b'~').contains(&b));
    if !valid {
        return Err(PolicyError::new(
            format!("{path}.value"),
            "must be 1 to 256 printable ASCII characters",
        ));
    }
    Ok((header, value))
}

fn route(r: &RawFallbackRoute, path: &str) -> Result<FallbackRoute, PolicyError> {
    let (header, value) = route_match(&r.header, &r.value, "fallback", path)?;
    let budget = r
        .budget
        .as_ref()
        .map(|b| rate(b, &format!("{path}.budget")))
        .transpose()?;
    Ok(FallbackRoute {
        header,
        value,
        budget,
    })
}

/// Validate the operability fields. `class_ids` maps class names to ids.
#[allow(clippy::too_many_arguments)]
pub(super) fn validate(
    rollout: &RawRollout,
    audit: &RawAudit,
    raw_classes: &[RawClass],
    tenants: &RawTenants,
    families: &[RawFamily],
    class_ids: &HashMap<&str, ClassId>,
    service_cluster: &str,
    model_tenants: impl Iterator<Item = String>,
) -> Result<Operations, PolicyError> {
    let near_miss_pct = match rollout.near_miss_pct {
        None => DEFAULT_NEAR_MISS_PCT,
        Some(p) if (1..=100).contains(&p) => u8::try_from(p).unwrap_or(DEFAULT_NEAR_MISS_PCT),
        Some(_) => {
            return Err(PolicyError::new(
                "rollout.near_miss_pct",
                "must be between 1 and 100",
            ))
        }
    };
    let b = &rollout.buckets;
    let buckets = BucketModes {
        class: mode(b.class),
        user: mode(b.user),
        tool: mode(b.tool),
        purpose: mode(b.purpose),
        model: mode(b.model),
        model_total: mode(b.model_total),
    };
    let classes = raw_classes
        .iter()
        .enumerate()
        .map(|(i, c)| class_ops(c, i, families))
        .collect::<Result<Vec<_>, _>>()?;

    for (name, o) in &tenants.default.classes {
        if o.mode.is_some() {
            return Err(PolicyError::new(
                format!("tenants.default.classes.{name}.mode"),
                "set the class's own `mode` (classes[].mode) instead",
            ));
        }
    }
    let mut tenant_modes = HashMap::new();
    for (tenant, o) in &tenants.overrides {
        let mut per_class = vec![None; raw_classes.len()];
        for (name, co) in &o.classes {
            // Unknown class names were already reported by the plan builder.
            if let Some(&id) = class_ids.get(name.as_str()) {
                per_class[id] = mode(co.mode);
            }
        }
        tenant_modes.insert(
            tenant.clone(),
            TenantModes {
                mode: mode(o.mode),
                classes: per_class,
            },
        );
    }
    let family_modes = families
        .iter()
        .filter_map(|f| f.mode.map(|m| (f.name.clone(), Mode::from_raw(m))))
        .collect();
    for (i, f) in families.iter().enumerate() {
        if f.mode.is_some() && f.limit.is_none() {
            return Err(PolicyError::new(
                format!("endpoint_families[{i}].mode"),
                "a family without its own `limit` has no rule to roll out",
            ));
        }
    }

    let cluster = audit
        .cluster
        .clone()
        .unwrap_or_else(|| service_cluster.to_string());
    if cluster.is_empty() {
        return Err(PolicyError::new("audit.cluster", "must not be empty"));
    }
    let max_buffer = audit.max_buffer.unwrap_or(DEFAULT_AUDIT_BUFFER);
    if !(1..=100_000).contains(&max_buffer) {
        return Err(PolicyError::new(
            "audit.max_buffer",
            "must be between 1 and 100000",
        ));
    }
    let max_batch = audit.max_batch.unwrap_or(DEFAULT_AUDIT_BATCH);
    if !(1..=100_000).contains(&max_batch) {
        return Err(PolicyError::new(
            "audit.max_batch",
            "must be between 1 and 100000",
        ));
    }

    let named: BTreeSet<String> = tenants
        .overrides
        .keys()
        .cloned()
        .chain(model_tenants)
        .collect();
    Ok(Operations {
        mode: mode(rollout.mode).unwrap_or(Mode::Enforce),
        near_miss_pct,
        buckets,
        classes,
        tenants: tenant_modes,
        families: family_modes,
        audit: AuditSettings {
            ship: audit.ship.unwrap_or(true),
            cluster,
            max_buffer,
            max_batch,
        },
        named_tenants: named.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;

    use crate::policy::tests::BASE;

    #[test]
    fn a_policy_without_the_new_fields_keeps_todays_behaviour() {
        let p = parse(BASE).unwrap();
        assert_eq!(p.ops.mode, Mode::Enforce);
        assert_eq!(p.ops.near_miss_pct, DEFAULT_NEAR_MISS_PCT);
        assert_eq!(p.ops.classes[0].fallbacks, vec![Fallback::Reject]);
        assert_eq!(p.ops.classes[0].queue, DEFAULT_QUEUE);
        assert_eq!(p.ops.classes[0].fallback_route.header, "x-laneguard-route");
        assert!(p.ops.audit.ship);
        assert_eq!(p.ops.audit.cluster, "laneguard_rls");
        assert!(p.ops.named_tenants.is_empty());
    }

    #[test]
    fn reject_is_always_the_last_resort() {
        let text = BASE.replace(
            "budget: { per_minute: 60, burst: 10 } }",
            "budget: { per_minute: 60, burst: 10 }, fallbacks: [fallback_route, queue] }",
        );
        let p = parse(&text).unwrap();
        assert_eq!(
            p.ops.classes[0].fallbacks,
            vec![Fallback::FallbackRoute, Fallback::Queue, Fallback::Reject]
        );
    }

    #[test]
    fn errors_name_their_path() {
        let cases = [
            (
                BASE.replace(
                    "  default: {",
                    "  default: { classes: { web: { mode: off } },",
                ),
                "tenants.default.classes.web.mode",
            ),
            (
                format!(
                    "{BASE}endpoint_families: [{{ name: f, path_prefixes: [/f], mode: off }}]\n"
                ),
                "endpoint_families[0].mode",
            ),
            (
                format!("{BASE}audit: {{ max_batch: 0 }}\n"),
                "audit.max_batch",
            ),
            (
                format!("{BASE}audit: {{ cluster: \"\" }}\n"),
                "audit.cluster",
            ),
            (
                BASE.replace("burst: 10 } }", "burst: 10 }, fallbacks: [] }"),
                "classes[0].fallbacks",
            ),
            (
                BASE.replace(
                    "burst: 10 } }",
                    "burst: 10 }, fallbacks: [fallback_route], fallback_route: { value: \"\" } }",
                ),
                "classes[0].fallback_route.value",
            ),
        ];
        for (text, path) in cases {
            match parse(&text) {
                Ok(_) => panic!("accepted:\n{text}"),
                Err(e) => assert_eq!(e.path, path, "{e}"),
            }
        }
    }

    #[test]
    fn named_tenants_come_from_overrides_and_model_allocations() {
        let text = format!(
            "{}\n    acme: {{ mode: shadow }}\nmodels:\n  unknown: refuse\n  list:\n    - {{ name: m, capacity: {{ per_minute: 10, burst: 5 }}, allocation: {{ share: 0.5, burst: 2 }}, tenants: {{ zeta: {{ per_minute: 2, burst: 1 }} }} }}\n",
            BASE.replace(
                "  default: { ceiling: { per_minute: 100, burst: 20 } }",
                "  default: { ceiling: { per_minute: 100, burst: 20 } }\n  overrides:"
            ).trim_end()
        );
        let p = parse(&text).unwrap();
        assert_eq!(
            p.ops.named_tenants,
            vec!["acme".to_string(), "zeta".to_string()]
        );
        assert_eq!(p.ops.mode_for("acme", 0), Mode::Shadow);
    }
}
