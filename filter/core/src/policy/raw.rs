//! Phase one: the policy exactly as written. Every struct rejects unknown fields, so a typo
//! is an error that names its path rather than a silently ignored setting.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub version: u32,
    #[serde(default)]
    pub identity: RawIdentity,
    #[serde(default)]
    pub classification: RawClassification,
    #[serde(default)]
    pub service: RawService,
    #[serde(default)]
    pub headers: RawHeaders,
    pub classes: Vec<RawClass>,
    #[serde(default)]
    pub principals: Vec<RawPrincipal>,
    pub tenants: RawTenants,
    #[serde(default)]
    pub endpoint_families: Vec<RawFamily>,
    pub users: Option<RawUsers>,
    pub purposes: Option<RawPurposes>,
    pub models: Option<RawModels>,
    #[serde(default)]
    pub rollout: RawRollout,
    #[serde(default)]
    pub audit: RawAudit,
    /// AI traffic: token budgets, body inspection, usage settlement (`policy::tokens`).
    pub tokens: Option<RawTokens>,
}

/// `enforce | shadow | off` (see `policy::ops::Mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawMode {
    Enforce,
    Shadow,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawFallback {
    Queue,
    FallbackRoute,
    Cached,
    Reject,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    pub mode: Option<RawMode>,
    pub near_miss_pct: Option<u32>,
    #[serde(default)]
    pub buckets: RawBucketModes,
}

/// Per bucket kind. The lane (shared pool or reserve) follows the class's mode.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBucketModes {
    pub class: Option<RawMode>,
    pub user: Option<RawMode>,
    pub tool: Option<RawMode>,
    pub purpose: Option<RawMode>,
    pub model: Option<RawMode>,
    pub model_total: Option<RawMode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub ship: Option<bool>,
    pub cluster: Option<String>,
    pub max_buffer: Option<u32>,
    pub max_batch: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub max_wait_ms: Option<u32>,
    pub max_depth: Option<u32>,
}

/// `classes[].cache`: the route an over-budget cacheable request is sent to (the `cached`
/// fallback), and which requests are cacheable.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub header: Option<String>,
    pub value: Option<String>,
    /// Only GETs of these endpoint families are cacheable (default: every GET).
    pub families: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallbackRoute {
    pub header: Option<String>,
    pub value: Option<String>,
    /// The fallback route's own bucket (default: the class's budget, else the shared pool).
    pub budget: Option<RawRate>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub tenant_header: Option<String>,
    pub principal_header: Option<String>,
    pub user_header: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClassification {
    pub header: Option<String>,
    pub granted_header: Option<String>,
    pub default_class: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub cluster: Option<String>,
    pub domain: Option<String>,
    pub timeout_ms: Option<u32>,
    pub local_share: Option<f64>,
    pub sync_interval_s: Option<u32>,
    pub max_lease: Option<u32>,
    pub max_buckets: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaders {
    pub draft03: Option<bool>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRate {
    pub per_second: Option<u32>,
    pub per_minute: Option<u32>,
    pub per_hour: Option<u32>,
    pub per_day: Option<u32>,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawConsequence {
    Low,
    TimeSensitive,
    Repair,
    Recovery,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawFailureMode {
    Open,
    Closed,
    Local,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClass {
    pub name: String,
    pub consequence: RawConsequence,
    pub source: Option<String>,
    pub purpose: Option<String>,
    pub owner: Option<String>,
    pub budget: Option<RawRate>,
    pub reserve: Option<RawRate>,
    #[serde(default)]
    pub borrow: bool,
    pub failure_mode: Option<RawFailureMode>,
    #[serde(default)]
    pub must_not_compete_with: Vec<String>,
    pub mode: Option<RawMode>,
    pub fallbacks: Option<Vec<RawFallback>>,
    pub queue: Option<RawQueue>,
    pub fallback_route: Option<RawFallbackRoute>,
    pub cache: Option<RawCache>,
    /// The endpoint families this class calls. Descriptive: the competition map and its lint
    /// read it (which classes share a family's `limit`); classification does not.
    #[serde(default)]
    pub families: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrincipal {
    pub name: String,
    pub default_class: String,
    #[serde(default)]
    pub may_declare: Vec<String>,
    /// The purposes this principal may declare (default: any the policy lists).
    pub may_declare_purposes: Option<Vec<String>>,
    /// The models this principal may declare (default: any the policy lists).
    pub may_declare_models: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenants {
    pub default: RawTenantPlan,
    #[serde(default)]
    pub overrides: BTreeMap<String, RawTenantOverride>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenantPlan {
    pub ceiling: RawRate,
    #[serde(default)]
    pub classes: BTreeMap<String, RawClassOverride>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenantOverride {
    pub ceiling: Option<RawRate>,
    pub mode: Option<RawMode>,
    #[serde(default)]
    pub classes: BTreeMap<String, RawClassOverride>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClassOverride {
    pub budget: Option<RawRate>,
    pub reserve: Option<RawRate>,
    pub mode: Option<RawMode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFamily {
    pub name: String,
    #[serde(default)]
    pub path_prefixes: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    pub cost: Option<u32>,
    pub limit: Option<RawRate>,
    pub mode: Option<RawMode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUsers {
    pub limit: RawRate,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPurposes {
    pub header: Option<String>,
    pub default: Option<String>,
    pub unknown: Option<RawUnknown>,
    pub families: Option<Vec<String>>,
    pub limits: BTreeMap<String, RawRate>,
}

/// What a declared dimension (purpose, model) does with a value the caller may not use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawUnknown {
    Default,
    Refuse,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModels {
    pub header: Option<String>,
    pub default: Option<String>,
    pub unknown: Option<RawUnknown>,
    pub families: Option<Vec<String>>,
    pub list: Vec<RawModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: String,
    pub capacity: RawRate,
    pub allocation: RawAllocation,
    #[serde(default)]
    pub tenants: BTreeMap<String, RawAllocation>,
    /// The model's token budgets, next to its request budgets.
    pub tokens: Option<RawModelTokens>,
    /// Where the `cheaper_model` fallback sends a request when this model has no room.
    pub cheaper_model: Option<String>,
}

/// A model's token capacity and the tenants' allocations of it (tokens per window).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModelTokens {
    pub capacity: RawRate,
    pub allocation: Option<RawAllocation>,
    #[serde(default)]
    pub tenants: BTreeMap<String, RawAllocation>,
    pub default_estimate: Option<u32>,
}

/// Policy-wide AI settings and the token budgets that are not per model.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokens {
    pub path_prefixes: Option<Vec<String>>,
    pub inspect_bytes: Option<u32>,
    pub default_estimate: Option<u32>,
    pub usage_header: Option<String>,
    pub users: Option<RawRate>,
    #[serde(default)]
    pub purposes: BTreeMap<String, RawRate>,
    #[serde(default)]
    pub tools: BTreeMap<String, RawToolTokens>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawToolTokens {
    pub limit: Option<RawRate>,
    pub default_estimate: Option<u32>,
}

/// A tenant's allocation of a model: a share of its capacity, or an absolute rate.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAllocation {
    pub share: Option<f64>,
    pub per_second: Option<u32>,
    pub per_minute: Option<u32>,
    pub per_hour: Option<u32>,
    pub per_day: Option<u32>,
    pub burst: u32,
}
