//! The decision engine: which buckets a request touches ([`plan`]) and whether they have
//! room ([`LocalTable`]). Pure: time is an argument, and nothing here knows about Envoy.
//!
//! A request passes only if every bucket it touches has room. Buckets are checked in a fixed
//! order (lane, class budget, user, tool, purpose, model allocation, model total); nothing is
//! charged for a denied request, and the first bucket without room is the one named.

use crate::classify::{classify, Classified};
use crate::declared::{self, Dimension};
use crate::gcra::{Check, Gcra};
use crate::key;
use crate::policy::{ClassId, FailureMode, Policy};
use crate::rate::Rate;
use std::collections::HashMap;

/// What the filter read from the request. Identity fields come from trusted headers only.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestInfo<'a> {
    pub tenant: Option<&'a str>,
    pub principal: Option<&'a str>,
    pub user: Option<&'a str>,
    pub declared_class: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    pub purpose: Option<&'a str>,
    pub model: Option<&'a str>,
}

/// A request refused before any bucket is consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// No trusted tenant or principal: the authentication filter did not run.
    MissingIdentity,
    /// A trusted identity value that is not a valid name.
    InvalidIdentity,
    /// A request in a declared dimension's scope declares no value and the policy has no
    /// default for it (`crate::declared`).
    Undeclared(Dimension),
    /// A declared value the policy does not list, or that the principal may not declare,
    /// under `unknown: refuse` (`crate::declared`).
    NotDeclarable(Dimension),
}

impl Reject {
    pub fn status(self) -> u32 {
        match self {
            Reject::MissingIdentity => 401,
            Reject::InvalidIdentity | Reject::Undeclared(_) => 400,
            Reject::NotDeclarable(_) => 403,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Reject::MissingIdentity => "missing_identity",
            Reject::InvalidIdentity => "invalid_identity",
            Reject::Undeclared(Dimension::Purpose) => "purpose_required",
            Reject::Undeclared(Dimension::Model) => "model_required",
            Reject::NotDeclarable(Dimension::Purpose) => "purpose_not_allowed",
            Reject::NotDeclarable(Dimension::Model) => "model_not_allowed",
        }
    }

    /// What the reply's body says about it.
    pub fn detail(self) -> &'static str {
        match self {
            Reject::MissingIdentity => {
                "no trusted tenant/principal: the request did not pass authentication"
            }
            Reject::InvalidIdentity => "the trusted identity is not a valid name",
            Reject::Undeclared(Dimension::Purpose) => {
                "the request declares no purpose and the policy has no default purpose"
            }
            Reject::Undeclared(Dimension::Model) => {
                "the request declares no model and the policy has no default model"
            }
            Reject::NotDeclarable(Dimension::Purpose) => {
                "the declared purpose is not listed in the policy, or this principal may not declare it"
            }
            Reject::NotDeclarable(Dimension::Model) => {
                "the declared model is not listed in the policy, or this principal may not declare it"
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BucketKind {
    Shared,
    Reserve,
    Class,
    User,
    Tool,
    Purpose,
    Model,
    ModelTotal,
    /// Token buckets (AI traffic, `crate::ai`): charged in tokens, not requests.
    UserTokens,
    ToolTokens,
    PurposeTokens,
    ModelTokens,
    ModelTotalTokens,
    /// A class's fallback route (`classes[].fallback_route.budget`): what a request degraded
    /// to the fallback route is charged to, so that degrading is never unbounded.
    Fallback,
}

impl BucketKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BucketKind::Shared => "shared",
            BucketKind::Reserve => "reserve",
            BucketKind::Class => "class",
            BucketKind::User => "user",
            BucketKind::Tool => "tool",
            BucketKind::Purpose => "purpose",
            BucketKind::Model => "model",
            BucketKind::ModelTotal => "model_total",
            BucketKind::UserTokens => "user_tokens",
            BucketKind::ToolTokens => "tool_tokens",
            BucketKind::PurposeTokens => "purpose_tokens",
            BucketKind::ModelTokens => "model_tokens",
            BucketKind::ModelTotalTokens => "model_total_tokens",
            BucketKind::Fallback => "fallback",
        }
    }

    /// Whether the bucket counts tokens (its cost is a reservation or a settlement).
    pub fn is_tokens(self) -> bool {
        matches!(
            self,
            BucketKind::UserTokens
                | BucketKind::ToolTokens
                | BucketKind::PurposeTokens
                | BucketKind::ModelTokens
                | BucketKind::ModelTotalTokens
        )
    }

    /// Whether the bucket belongs to a model (the `cheaper_model` fallback applies to it).
    pub fn is_model(self) -> bool {
        matches!(
            self,
            BucketKind::Model
                | BucketKind::ModelTotal
                | BucketKind::ModelTokens
                | BucketKind::ModelTotalTokens
        )
    }

    /// A model's total capacity spans tenants: its bucket has no tenant entry.
    fn spans_tenants(self) -> bool {
        matches!(self, BucketKind::ModelTotal | BucketKind::ModelTotalTokens)
    }

    /// The descriptor entry key that carries this bucket's label, if it has one.
    fn label_key(self) -> Option<&'static str> {
        match self {
            BucketKind::Shared => None,
            BucketKind::Reserve | BucketKind::Class | BucketKind::Fallback => Some("class"),
            BucketKind::User | BucketKind::UserTokens => Some("user"),
            BucketKind::Tool | BucketKind::ToolTokens => Some("tool"),
            BucketKind::Purpose | BucketKind::PurposeTokens => Some("purpose"),
            BucketKind::Model
            | BucketKind::ModelTotal
            | BucketKind::ModelTokens
            | BucketKind::ModelTotalTokens => Some("model"),
        }
    }
}

/// One bucket a request touches.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub kind: BucketKind,
    /// Empty for a model's total capacity, which spans tenants.
    pub tenant: String,
    /// The class, user, tool, purpose or model; empty for the shared pool.
    pub label: String,
    pub rate: Rate,
    /// The bucket key from [`key::encode`]: the same on every worker and in every store.
    pub key: String,
}

impl Bucket {
    pub(crate) fn new(
        domain: &str,
        kind: BucketKind,
        tenant: &str,
        label: &str,
        rate: Rate,
    ) -> Bucket {
        let mut b = Bucket {
            kind,
            tenant: tenant.to_string(),
            label: label.to_string(),
            rate,
            key: String::new(),
        };
        b.key = key::encode(domain, &b.entries());
        b
    }

    /// The descriptor entries that identify this bucket (see docs/architecture.md).
    pub fn entries(&self) -> Vec<(&'static str, &str)> {
        let mut e = Vec::with_capacity(3);
        if !self.kind.spans_tenants() {
            e.push(("tenant", self.tenant.as_str()));
        }
        e.push(("bucket", self.kind.as_str()));
        if let Some(k) = self.kind.label_key() {
            e.push((k, self.label.as_str()));
        }
        e
    }

    /// The name used in headers, 429 bodies and logs: `class:integration`, `shared`, …
    pub fn name(&self) -> String {
        match self.kind {
            BucketKind::Shared | BucketKind::User | BucketKind::UserTokens => {
                self.kind.as_str().to_string()
            }
            _ => format!("{}:{}", self.kind.as_str(), self.label),
        }
    }
}

/// Everything the filter needs to decide and to explain one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub tenant: String,
    pub principal: String,
    pub user: Option<String>,
    pub declared_class: Option<String>,
    pub class: ClassId,
    pub class_name: String,
    /// The caller declared a class it may not use (or one that does not exist).
    pub forged: bool,
    pub family: Option<String>,
    /// The purpose and the model charged (`crate::declared::resolve`): a listed value, the
    /// default, or `None` outside the dimension's scope.
    pub purpose: Option<String>,
    pub model: Option<String>,
    /// Declared values the caller may not use, charged to the default instead.
    pub defaulted: Vec<Dimension>,
    pub cost: u32,
    /// `buckets[0]` is the lane: the class's reserve, or the shared pool.
    pub buckets: Vec<Bucket>,
    /// For a protected class that may borrow: the shared pool, to use in place of
    /// `buckets[0]` when the reserve has no room.
    pub borrow: Option<Bucket>,
    pub failure_mode: FailureMode,
    /// An AI request's token buckets and reservation (`crate::ai`), set once its body was
    /// read; `None` for every other request.
    pub tokens: Option<crate::ai::TokenPlan>,
}

impl Plan {
    /// Whether the request's lane is a protected class's reserve (not the shared pool).
    pub fn on_reserve(&self) -> bool {
        self.buckets
            .first()
            .is_some_and(|b| b.kind == BucketKind::Reserve)
    }

    /// The buckets of the primary attempt, or of the borrowing attempt: the request
    /// buckets, then an AI request's token buckets. A token bucket's cost is the
    /// reservation, not `cost`: charge through [`Plan::costed`].
    pub fn attempt(&self, borrowing: bool) -> Vec<&Bucket> {
        let mut v: Vec<&Bucket> = self.buckets.iter().collect();
        if borrowing {
            if let (Some(b), Some(first)) = (&self.borrow, v.first_mut()) {
                *first = b;
            }
        }
        if let Some(t) = &self.tokens {
            v.extend(t.buckets.iter());
        }
        v
    }

    /// [`Plan::attempt`] with each bucket's cost: `cost` for the request buckets, the
    /// reservation for the token buckets.
    pub fn costed(&self, borrowing: bool) -> Vec<(&Bucket, u32)> {
        let request = self.buckets.len();
        let reserve = self.tokens.as_ref().map_or(self.cost, |t| t.reserve);
        self.attempt(borrowing)
            .into_iter()
            .enumerate()
            .map(|(i, b)| (b, if i < request { self.cost } else { reserve }))
            .collect()
    }
}

const MAX_IDENTITY_LEN: usize = 128;

/// The longest user id accepted, in bytes (UTF-8).
pub const MAX_USER_LEN: usize = 256;

/// Tenant and principal names: the policy names them, so they stay strict.
fn valid_identity(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_IDENTITY_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

/// A user id is opaque: identity providers issue subjects such as `auth0|5f7c`,
/// `google-oauth2|1234`, an e-mail address with `+`, a display name with spaces or
/// non-ASCII letters (issue 14, item 6). Any text is accepted up to [`MAX_USER_LEN`] bytes,
/// except control characters, which no provider issues and which would only serve to
/// forge log lines. The bucket key escapes it ([`key::encode`]), so it can never be
/// confused with another user or bucket.
fn valid_user(s: &str) -> bool {
    s.len() <= MAX_USER_LEN && !s.chars().any(char::is_control)
}

/// Work out which buckets a request touches and at what cost.
pub fn plan(policy: &Policy, req: &RequestInfo<'_>) -> Result<Plan, Reject> {
    let (tenant, principal) = match (req.tenant, req.principal) {
        (Some(t), Some(p)) if !t.is_empty() && !p.is_empty() => (t, p),
        _ => return Err(Reject::MissingIdentity),
    };
    if !valid_identity(tenant) || !valid_identity(principal) {
        return Err(Reject::InvalidIdentity);
    }
    let user = match req.user {
        Some(u) if !u.is_empty() => {
            if !valid_user(u) {
                return Err(Reject::InvalidIdentity);
            }
            Some(u)
        }
        _ => None,
    };
    let Classified { class, forged } = classify(policy, principal, req.declared_class);
    let domain = policy.service.domain.as_str();
    let tenant_plan = policy.plan_for(tenant);
    let class_def = &policy.classes[class];

    let path = req.path.split('?').next().unwrap_or("");
    let family = policy.families.iter().find(|f| {
        (f.methods.is_empty() || f.methods.iter().any(|m| m.eq_ignore_ascii_case(req.method)))
            && f.path_prefixes.iter().any(|p| path.starts_with(p.as_str()))
    });
    let cost = family.map_or(1, |f| f.cost);

    let mut buckets = Vec::with_capacity(6);
    let shared = Bucket::new(domain, BucketKind::Shared, tenant, "", tenant_plan.shared);
    let mut borrow = None;
    match tenant_plan.reserves[class] {
        Some(reserve) => {
            buckets.push(Bucket::new(
                domain,
                BucketKind::Reserve,
                tenant,
                &class_def.name,
                reserve,
            ));
            if class_def.borrow {
                borrow = Some(shared);
            }
        }
        None => buckets.push(shared),
    }
    if let Some(budget) = tenant_plan.budgets[class] {
        buckets.push(Bucket::new(
            domain,
            BucketKind::Class,
            tenant,
            &class_def.name,
            budget,
        ));
    }
    if let (Some(u), Some(rate)) = (user, policy.users) {
        buckets.push(Bucket::new(domain, BucketKind::User, tenant, u, rate));
    }
    if let Some(f) = family {
        if let Some(rate) = f.limit {
            buckets.push(Bucket::new(domain, BucketKind::Tool, tenant, &f.name, rate));
        }
    }
    // Declared dimensions: a missing or unusable value lands on the default, or the request
    // is refused; never on no bucket (issue 13 item 4).
    let family_name = family.map(|f| f.name.as_str());
    let purpose = declared::resolve(
        policy,
        Dimension::Purpose,
        principal,
        family_name,
        req.purpose,
    )?;
    let model = if req.model.is_none() && crate::ai::inspects(policy, req.path) {
        // An AI request may name its model in the body: `ai::admit` decides it, by the same
        // rule, once the body is read.
        declared::Resolved::NONE
    } else {
        declared::resolve(policy, Dimension::Model, principal, family_name, req.model)?
    };
    if let (Some(p), Some(purposes)) = (purpose.value, &policy.purposes) {
        if let Some(rate) = purposes.limits.get(p) {
            buckets.push(Bucket::new(domain, BucketKind::Purpose, tenant, p, *rate));
        }
    }
    if let (Some(m), Some(models)) = (model.value, &policy.models) {
        if let Some(model) = models.list.get(m) {
            buckets.extend(model_buckets(domain, model, tenant));
        }
    }
    let defaulted = [(Dimension::Purpose, purpose), (Dimension::Model, model)]
        .into_iter()
        .filter(|(_, r)| r.defaulted)
        .map(|(d, _)| d)
        .collect();

    Ok(Plan {
        tenant: tenant.to_string(),
        principal: principal.to_string(),
        user: user.map(str::to_string),
        declared_class: req.declared_class.map(str::to_string),
        class,
        class_name: class_def.name.clone(),
        forged,
        family: family.map(|f| f.name.clone()),
        purpose: purpose.value.map(str::to_string),
        model: model.value.map(str::to_string),
        defaulted,
        cost,
        buckets,
        borrow,
        failure_mode: class_def.failure_mode,
        tokens: None,
    })
}

/// A model's two request buckets: the tenant's allocation and the model's total capacity.
pub(crate) fn model_buckets(
    domain: &str,
    model: &crate::policy::Model,
    tenant: &str,
) -> [Bucket; 2] {
    let alloc = model
        .tenant_allocations
        .get(tenant)
        .copied()
        .unwrap_or(model.default_allocation);
    [
        Bucket::new(domain, BucketKind::Model, tenant, &model.name, alloc),
        Bucket::new(
            domain,
            BucketKind::ModelTotal,
            "",
            &model.name,
            model.capacity,
        ),
    ]
}

/// One bucket's level, for headers and records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    pub name: String,
    /// Requests per window.
    pub quota: u32,
    pub window_s: u64,
    /// Requests of cost 1 still available.
    pub remaining: u32,
    /// Seconds until the bucket is full again (rounded up).
    pub reset_s: u64,
    /// Seconds until this request's cost would fit (0 if it fits; rounded up, at least 1 if not).
    pub retry_after_s: u64,
    /// The same, exact: how long a queued request has to wait for this bucket.
    pub retry_after_ns: u64,
    /// The bucket's burst: the most cost-1 requests it holds (its ceiling at any instant).
    pub burst: u32,
    pub has_room: bool,
}

impl Level {
    fn from_check(b: &Bucket, c: &Check) -> Level {
        Level {
            name: b.name(),
            quota: b.rate.requests.get(),
            window_s: b.rate.window.seconds(),
            remaining: c.remaining,
            reset_s: ceil_s(c.reset_ns),
            retry_after_s: if c.allowed {
                0
            } else {
                ceil_s(c.retry_after_ns).max(1)
            },
            retry_after_ns: c.retry_after_ns,
            burst: b.rate.burst.get(),
            has_room: c.allowed,
        }
    }
}

pub fn ceil_s(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

/// The result of checking a set of buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub allowed: bool,
    /// Index (in the checked set) of the first bucket without room.
    pub tripped: Option<usize>,
    pub levels: Vec<Level>,
}

#[derive(Debug, Clone, Copy, Default)]
struct LocalBucket {
    gcra: Gcra,
    /// Capacity the service granted this worker and that it has not spent yet. It is
    /// pre-paid: the service charged it when it granted it.
    lease: u32,
    lease_until_ns: u64,
    /// The size of the last grant, to tell when the lease runs low.
    last_grant: u32,
    /// A renewal for this bucket is in flight.
    renewing: bool,
    /// The service said the bucket is empty, or leased this worker its share of a saturated
    /// bucket: refuse locally (beyond the lease) until then ([`hold_ns`]).
    hold_until_ns: u64,
    /// The service's last word on the bucket was that it is saturated: empty, or less than
    /// half its burst left after a grant. While it is, one central ask at a time
    /// ([`LocalTable::begin_ask`]) and no renewals during the hold.
    saturated: bool,
    /// A central ask on this saturated bucket is in flight until then (its timeout at the
    /// latest): other requests are refused locally meanwhile, the answer brings the lease.
    asking_until_ns: u64,
    /// The lease of a held, saturated bucket is spent paced ([`LocalBucket::paced_at`]): one
    /// unit every `pace_ns`, on a schedule whose next slot is `pace_tat_ns` (0: not paced).
    pace_ns: u64,
    pace_tat_ns: u64,
    /// Until then this worker holds the saturated bucket for at most the time one grant
    /// takes to refill ([`hold_limit_ns`]): a grant on it came back whole, at the cap.
    short_until_ns: u64,
    /// Units of the lease promised to requests waiting in this worker's queue for their
    /// paced slot ([`LocalTable::promise`]): part of `lease`, not spendable by others.
    promised: u32,
    /// What this worker spent on the bucket, to size leases and renewals.
    spent: PerSecond,
    /// What this worker's requests asked of the bucket, spent or refused: a flooded worker's
    /// demand, which its spend (its share of a saturated bucket) understates.
    offered: PerSecond,
}

/// Units counted in the current and the previous one-second slot.
#[derive(Debug, Clone, Copy, Default)]
struct PerSecond {
    slot: u64,
    cur: u32,
    prev: u32,
}

impl PerSecond {
    fn note(&mut self, cost: u32, now_ns: u64) {
        let slot = now_ns / 1_000_000_000;
        if slot != self.slot {
            self.prev = if slot == self.slot + 1 { self.cur } else { 0 };
            self.cur = 0;
            self.slot = slot;
        }
        self.cur = self.cur.saturating_add(cost);
    }

    /// Units per second recently.
    fn rate(&self, now_ns: u64) -> u32 {
        let slot = now_ns / 1_000_000_000;
        match slot.checked_sub(self.slot) {
            Some(0) => self.prev.max(self.cur),
            Some(1) => self.cur,
            _ => 0,
        }
    }
}

impl LocalBucket {
    fn note_spend(&mut self, cost: u32, now_ns: u64) {
        self.spent.note(cost, now_ns);
    }

    /// Requests per second this worker spent recently.
    fn rate(&self, now_ns: u64) -> u32 {
        self.spent.rate(now_ns)
    }

    /// When this bucket's lease may next be spent for `cost` units, if it is paced: the
    /// schedule's slot less its tolerance ([`PACE_TOLERANCE`] units), so a request that came
    /// late is made up by the next ones. `None` when the lease is not paced.
    fn paced_at(&self, cost: u32) -> Option<u64> {
        if self.pace_ns == 0 {
            return None;
        }
        let ahead = self.pace_ns.saturating_mul(u64::from(
            cost.saturating_sub(1).saturating_add(PACE_TOLERANCE),
        ));
        Some(self.pace_tat_ns.saturating_sub(ahead))
    }

    /// Whether the lease covers `cost` now: enough of it not promised to a queued request,
    /// unexpired, and (paced) its slot.
    fn can_spend(&self, cost: u32, now_ns: u64) -> bool {
        self.free_lease(now_ns) >= cost && self.paced_at(cost).is_none_or(|at| at <= now_ns)
    }

    /// The unexpired lease less what is promised to queued requests.
    fn free_lease(&self, now_ns: u64) -> u32 {
        self.lease_left(now_ns).saturating_sub(self.promised)
    }

    /// When `cost` units of the lease could be promised: its paced slot, or now when the
    /// lease is not paced; `None` when the free lease is short or expires first.
    fn promise_at(&self, cost: u32, now_ns: u64) -> Option<u64> {
        if cost == 0 || self.free_lease(now_ns) < cost {
            return None;
        }
        let at = self.paced_at(cost).map_or(now_ns, |at| at.max(now_ns));
        (at < self.lease_until_ns).then_some(at)
    }

    /// Spend `cost` of the lease ([`LocalBucket::can_spend`]). No GCRA charge: the grant
    /// was already counted when the mirror synced with the service's answer that carried it.
    fn spend(&mut self, cost: u32, now_ns: u64) {
        self.lease -= cost;
        self.note_spend(cost, now_ns);
        if self.pace_ns > 0 {
            self.pace_tat_ns = self
                .pace_tat_ns
                .max(now_ns)
                .saturating_add(self.pace_ns.saturating_mul(u64::from(cost)));
        }
    }

    /// How long a paced lease is spread over ([`LocalTable::grant`],
    /// [`LocalTable::coordinate`]): the hold, or the lease's validity when that ends first.
    /// A slow bucket's hold lasts until it has room (a minute at 60 an hour), and a lease
    /// paced over that expired mostly unspent, pre-paid and lost.
    fn pace_span(&self, now_ns: u64) -> u64 {
        self.hold_until_ns
            .min(self.lease_until_ns)
            .saturating_sub(now_ns)
    }

    /// Whether this worker's holds on the saturated bucket are short ([`hold_limit_ns`]).
    fn short(&self, now_ns: u64) -> bool {
        self.short_until_ns > now_ns
    }

    fn lease_left(&self, now_ns: u64) -> u32 {
        if self.lease_until_ns > now_ns {
            self.lease
        } else {
            0
        }
    }
}

/// One worker's buckets. Each Envoy worker has its own VM and so its own table.
///
/// The table mirrors what this worker spent and what the service last said about each
/// bucket. A local "no room" is therefore sound (the fleet as a whole has spent at least as
/// much), which lets floods be refused without a call. It is capped: idle buckets (full
/// again) carry no state and are evicted first.
#[derive(Debug, Clone)]
pub struct LocalTable {
    buckets: HashMap<String, LocalBucket>,
    max_buckets: usize,
    /// Live buckets evicted at the cap since the last [`LocalTable::take_evicted`].
    evicted: u64,
}

/// The default cap on one worker's table (`service.max_buckets`). At about 200 bytes a
/// bucket (key, state, map slot) it is about 20 MB of a VM's memory.
///
/// The eviction rule ([`LocalTable::new`]): when a new bucket would pass the cap, buckets
/// that carry no state (full again, no lease, no renewal, no hold) are pruned first; if the
/// table is still full, a batch of a sixteenth of the cap is evicted, the buckets closest to
/// full first (lowest GCRA theoretical arrival time: the least state lost). An evicted
/// bucket is as if new. While the service answers that costs calls, never over-admission:
/// the mirror only refuses on evidence, a new bucket's next request is decided centrally,
/// and a lease it held is forgotten (pre-paid, so at worst under-admission). While the
/// service is down (`local` failure mode) an evicted bucket starts full again: at most one
/// more burst at `service.local_share`, reported when the service is back. Each eviction is
/// counted ([`LocalTable::take_evicted`], stat `buckets.evicted`).
pub const DEFAULT_MAX_BUCKETS: usize = 100_000;

/// A bucket counts as saturated after the service's answer when it has less room left than
/// this (or than half its fill time, if that is shorter): the worker then spends its lease
/// and holds ([`hold_ns`]) rather than ask again at once.
///
/// Without a hold, a saturated bucket shows room in the local mirror again one emission
/// interval later, and every worker asks the service at once, so a binding limit costs about
/// one call per admitted request.
pub const SATURATED_ROOM_NS: u64 = 50_000_000;

/// The longest hold: however long a saturated bucket takes to fill, a worker asks the
/// service again at least this often while its clients keep asking (4 times a second). A
/// hold does not make the admitted requests come in clumps: its lease is spent paced over
/// it ([`LocalTable::grant`]). Before pacing (issue 10, 2026-12-07) the lease was spent at
/// once and refusals filled the rest of the hold, so the cap was 100 ms: at 250 ms a 100/s
/// bucket admitted 25 every 250 ms, and a 10 s window of it read 1.2% under the rate
/// depending on where the window cut a clump. Longer than 250 ms saves calls only on
/// buckets that fill in more than 286 ms, keeps a worker refusing longer after the others
/// have stopped asking. In the core's fleet simulation 500 ms measured as well as 250 on
/// every shape (and halved a 1 s-fill bucket's calls again), and 1 s put a 10 s window of
/// the 2-worker restart shape 2.4% off (docs/accuracy.md, "Paced leases and a 250 ms
/// longest hold"); 250 ms is what the integration tests and benchmarks ran.
pub const MAX_HOLD_NS: u64 = 250_000_000;

/// The hold a saturated bucket may always get, however few workers share it
/// ([`hold_limit_ns`]): the longest hold before leases were paced.
pub const BASE_HOLD_NS: u64 = 100_000_000;

/// How many units a paced lease may be spent ahead of its schedule
/// ([`LocalTable::grant`]): a request that arrives late for its slot is made up by the
/// next ones, up to this many at once.
pub const PACE_TOLERANCE: u32 = 2;

/// Whether `room_ns` of room (in nanoseconds of the bucket's emission schedule) left after
/// the service's answer makes a bucket saturated: less than [`SATURATED_ROOM_NS`] or half
/// the fill time, whichever is shorter.
pub fn saturated(rate: &Rate, room_ns: u64) -> bool {
    room_ns < (fill_ns(rate) / 2).min(SATURATED_ROOM_NS)
}

fn fill_ns(rate: &Rate) -> u64 {
    rate.interval_ns()
        .saturating_mul(u64::from(rate.burst.get()))
}

/// How long to hold a saturated bucket after the service's answer: seven eighths of the
/// time until the service's bucket is full again (`until_full_ns`, its debt after the
/// answer), at most `limit_ns` ([`hold_limit_ns`]), and never less than `until_room_ns`,
/// the time until it has room for one request.
///
/// Nothing is lost by holding. What refills at the service while this worker holds stays in
/// the service's bucket for the next ask, of this worker or another, and the grant of that
/// ask is all of it ([`lease_room`]): a bucket is lost capacity only once it is full, and the
/// hold ends an eighth of the fill time (12.5 ms for a burst of 100 at 1000/s: room for the
/// round trip) before that would happen even with no other worker asking. So the calls a
/// binding limit costs are about `workers / hold` a second, whatever the offered load: for
/// `make bench-accuracy`'s 4 workers on a burst of 100 at 1000/s, one ask per worker per
/// ~88 ms (issue 10 §3). The hold used to be half the fill time, at most 50 ms, because a
/// grant was a quarter of the room and left the rest in a bucket that then filled sooner.
pub fn hold_ns(until_room_ns: u64, until_full_ns: u64, limit_ns: u64) -> u64 {
    (until_full_ns - until_full_ns / 8)
        .min(limit_ns)
        .max(until_room_ns)
}

/// The longest hold on a saturated bucket of `rate` ([`hold_ns`]): [`MAX_HOLD_NS`], or,
/// when `short`, seven eighths of the time the bucket takes to refill one grant (half its
/// burst, [`lease_room`]), never less than [`BASE_HOLD_NS`].
///
/// A grant is at most half the burst. A worker that asks a saturated bucket alone, and
/// later than one grant's refill, finds more room than one grant: its grant leaves room
/// behind, the bucket is no longer saturated, and its leases are spent at once and renewed
/// instead of paced, which made a 5 s window of the core's fleet simulation 1.8% off (one
/// worker, 380/s, burst 95, holds of 219 ms). So a grant that comes back whole, at the
/// cap, after a hold makes the worker's holds on that bucket short for [`SHORT_HOLD_NS`]
/// ([`LocalTable::grant`]). With other workers asking, the fleet asks more often than any
/// one of them, grants stay under the cap, and every worker holds the longest hold. The
/// holds are the same length for all of them on purpose: holds sized by an estimate of how
/// many workers ask (each worker's share of the grants) made the paced leases overlap and
/// leave gaps, and a 5 s window 1.1% to 1.6% off.
pub fn hold_limit_ns(rate: &Rate, short: bool) -> u64 {
    if !short {
        return MAX_HOLD_NS;
    }
    let grant_ns = rate
        .interval_ns()
        .saturating_mul(u64::from(max_grant(rate.burst.get())));
    (grant_ns - grant_ns / 8).clamp(BASE_HOLD_NS, MAX_HOLD_NS)
}

/// How long a grant at the cap keeps a worker's holds short ([`hold_limit_ns`]).
pub const SHORT_HOLD_NS: u64 = 10_000_000_000;

/// The longest hold a service's slot may give ([`ask_slot`], [`LocalTable::coordinate`]).
/// Longer than [`MAX_HOLD_NS`] because the service, which sees every ask, spaces the
/// fleet's asks so that one comes at least every [`ask_gap_ns`]: a worker's own hold has to
/// end before the bucket could fill with nobody asking, a slot only before its turn comes
/// round again. Half the default lease TTL (2 s), so a held lease outlives its hold.
pub const MAX_SLOT_HOLD_NS: u64 = 500_000_000;

/// The gap a service keeps between the fleet's asks on a saturated bucket of `rate`
/// ([`ask_slot`]): seven eighths of the time one grant (half the burst, [`max_grant`])
/// takes to refill. So each ask finds at most one grant's refill, and a worker that stops
/// asking leaves a gap of two, which is still shorter than the fill time: nothing
/// refills past full while the slot that worker left goes by.
pub fn ask_gap_ns(rate: &Rate) -> u64 {
    let grant_ns = rate
        .interval_ns()
        .saturating_mul(u64::from(max_grant(rate.burst.get())));
    (grant_ns - grant_ns / 8).max(1)
}

/// The service's side of coordinated holds (issue 10 §3, docs/leases.md step 3b): a lease
/// ask that leaves a bucket of `rate` with `room_ns` of room (after the request and its
/// grant) saturated ([`saturated`]) gets a slot, the time until it should ask again, and
/// moves the bucket's slot tail (`tail_ns`, the latest slot given; 0 for none).
///
/// Each such ask is put at the back of the line: one gap ([`ask_gap_ns`]) after the latest
/// slot given, or after now if that has passed, and at most [`MAX_SLOT_HOLD_NS`] from now.
/// With N workers flooding the bucket their asks settle one gap apart and each holds N
/// gaps, whatever N is, without the service knowing the workers: the line grows by one gap
/// per ask and time eats it at one gap per gap, so a worker that stops asking stops
/// lengthening it, and the others' holds shorten within one round. A worker alone holds
/// one gap. Returns `None` (no slot, the tail unchanged) when the bucket is not saturated.
/// `(hold_ns, new_tail_ns)` otherwise.
pub fn ask_slot(
    rate: &Rate,
    room_ns: u64,
    taken: u32,
    tail_ns: u64,
    now_ns: u64,
) -> Option<(u64, u64)> {
    if !saturated(rate, room_ns) {
        return None;
    }
    let step = ask_gap_ns(rate).min(
        rate.interval_ns()
            .saturating_mul(u64::from(taken))
            .saturating_mul(2),
    );
    let tail = tail_ns
        .max(now_ns)
        .saturating_add(step)
        .min(now_ns.saturating_add(MAX_SLOT_HOLD_NS));
    Some((tail - now_ns, tail))
}

/// The room a bucket of `rate` in state `gcra` has at `now_ns`, in nanoseconds of its
/// emission schedule ([`saturated`], [`ask_slot`]).
pub fn room_ns(gcra: &Gcra, rate: &Rate, now_ns: u64) -> u64 {
    fill_ns(rate).saturating_sub(gcra.tat_ns().saturating_sub(now_ns))
}

/// How long to hold an empty bucket that is never leased (a protected reserve, a token
/// bucket): half its fill time, at most [`SATURATED_ROOM_NS`], and never less than
/// `until_room_ns`. Each of its requests asks the service, so the hold only spares the
/// calls of a flood on an empty bucket; kept short, since what refills during it is not
/// handed to this worker by a grant, and a protected lane should see it soon.
pub fn empty_hold_ns(rate: &Rate, until_room_ns: u64) -> u64 {
    (fill_ns(rate) / 2)
        .min(SATURATED_ROOM_NS)
        .max(until_room_ns)
}

/// The most one grant takes from a bucket with `room` whole units left after the request:
/// all of it, up to half the bucket's burst; at least 1 while there is any room.
///
/// All of the room, so that an ask on a saturated bucket empties it: the worker takes what
/// refilled since the last ask (its share of the refill) and the next ask finds what refills
/// after it, which is what lets [`hold_ns`] hold until the bucket is nearly full. Half the
/// burst at most, so that near a full bucket two workers asking at once both get a lease
/// and one worker cannot pre-pay a whole burst it may not spend before the lease expires.
/// Monotone in `room`, so a request's grant, the minimum over its buckets, is the same
/// whether its buckets are sized together or in groups (the Redis store's hash slots).
pub fn lease_room(room: u32, burst: u32) -> u32 {
    if room == 0 {
        0
    } else {
        room.min(max_grant(burst))
    }
}

/// The most one grant takes from a bucket of `burst` ([`lease_room`]): half of it, at
/// least 1.
pub fn max_grant(burst: u32) -> u32 {
    (burst / 2).max(1)
}

/// The grant for a lease of `asked` units on buckets with these `(room, burst)`: the
/// smallest [`lease_room`] over them, at most `asked`; 0 with no buckets.
pub fn lease_grant(rooms: impl IntoIterator<Item = (u32, u32)>, asked: u32) -> u32 {
    rooms
        .into_iter()
        .map(|(room, burst)| lease_room(room, burst))
        .min()
        .unwrap_or(0)
        .min(asked)
}

/// Whether a bucket can be leased at all: a protected reserve and token buckets never are
/// ([`LocalTable::want`]), so they are never held on a grant nor asked one at a time.
fn leasable(bucket: &Bucket) -> bool {
    bucket.kind != BucketKind::Reserve && !bucket.kind.is_tokens()
}

impl Default for LocalTable {
    fn default() -> Self {
        LocalTable::new(DEFAULT_MAX_BUCKETS)
    }
}

impl LocalTable {
    pub fn new(max_buckets: usize) -> LocalTable {
        LocalTable {
            buckets: HashMap::new(),
            max_buckets: max_buckets.max(1),
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The cap on [`LocalTable::len`].
    pub fn max_buckets(&self) -> usize {
        self.max_buckets
    }

    /// Live buckets evicted at the cap since the last call (pruned idle ones not counted:
    /// they carried no state).
    pub fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    fn state(&self, key: &str) -> Gcra {
        self.buckets.get(key).map(|b| b.gcra).unwrap_or_default()
    }

    /// The room this worker's mirror shows for a bucket at `now`, in nanoseconds of its
    /// schedule (burst × interval when full, 0 when empty).
    pub fn room_ns(&self, bucket: &Bucket, now_ns: u64) -> u64 {
        let capacity = fill_ns(&bucket.rate);
        capacity.saturating_sub(self.state(&bucket.key).tat_ns().saturating_sub(now_ns))
    }

    /// Check every bucket for `cost` at `now` with each rate scaled by `share` (1.0 for the
    /// full rate). Charges nothing.
    pub fn evaluate(&self, buckets: &[&Bucket], cost: u32, now_ns: u64, share: f64) -> Evaluation {
        let costed: Vec<(&Bucket, u32)> = buckets.iter().map(|b| (*b, cost)).collect();
        self.evaluate_costs(&costed, now_ns, share)
    }

    /// [`LocalTable::evaluate`] with a cost per bucket (an AI request charges its request
    /// buckets the plan's cost and its token buckets the reservation).
    pub fn evaluate_costs(
        &self,
        buckets: &[(&Bucket, u32)],
        now_ns: u64,
        share: f64,
    ) -> Evaluation {
        let mut levels = Vec::with_capacity(buckets.len());
        let mut tripped = None;
        for (i, &(b, cost)) in buckets.iter().enumerate() {
            let rate = scaled(&b.rate, share);
            let mut check = self.state(&b.key).check(&rate, cost, now_ns);
            let (hold, asking, paced) = self.buckets.get(&b.key).map_or((0, 0, None), |s| {
                (
                    s.hold_until_ns,
                    if s.saturated { s.asking_until_ns } else { 0 },
                    // A held lease's next slot: a retry then is spent on the lease.
                    s.paced_at(cost).filter(|_| s.free_lease(now_ns) >= cost),
                )
            });
            if check.allowed && hold.max(asking) > now_ns {
                check.allowed = false;
                let until = paced.map_or(hold, |at| at.min(hold)).max(asking);
                check.retry_after_ns = until.saturating_sub(now_ns).max(1);
            }
            if !check.allowed && tripped.is_none() {
                tripped = Some(i);
            }
            levels.push(Level::from_check(b, &check));
        }
        Evaluation {
            allowed: tripped.is_none(),
            tripped,
            levels,
        }
    }

    /// Charge every bucket (after an admitted decision, local or central).
    pub fn charge(&mut self, buckets: &[&Bucket], cost: u32, now_ns: u64) {
        self.charge_scaled(buckets, cost, now_ns, 1.0);
    }

    fn charge_scaled(&mut self, buckets: &[&Bucket], cost: u32, now_ns: u64, share: f64) {
        let costed: Vec<(&Bucket, u32)> = buckets.iter().map(|b| (*b, cost)).collect();
        self.charge_costs_scaled(&costed, now_ns, share);
    }

    /// [`LocalTable::charge`] with a cost per bucket.
    pub fn charge_costs(&mut self, buckets: &[(&Bucket, u32)], now_ns: u64) {
        self.charge_costs_scaled(buckets, now_ns, 1.0);
    }

    fn charge_costs_scaled(&mut self, buckets: &[(&Bucket, u32)], now_ns: u64, share: f64) {
        self.make_room(now_ns, buckets.len());
        for &(b, cost) in buckets {
            self.buckets.entry(b.key.clone()).or_default().gcra.force(
                &scaled(&b.rate, share),
                cost,
                now_ns,
            );
        }
    }

    /// Give back `amount` units charged earlier to each bucket (a token settlement that
    /// used less than it reserved). A bucket never holds more than its burst.
    pub fn refund(&mut self, buckets: &[&Bucket], amount: u32, now_ns: u64) {
        for b in buckets {
            if let Some(s) = self.buckets.get_mut(&b.key) {
                s.gcra.refund(&b.rate, amount, now_ns);
            }
        }
    }

    /// Align a bucket with the service's view: it is full again in `until_full_ns`.
    /// Only ever makes the local view more conservative.
    pub fn sync(&mut self, bucket: &Bucket, until_full_ns: u64, now_ns: u64) {
        if until_full_ns == 0 {
            return;
        }
        self.make_room(now_ns, 1);
        let entry = self.buckets.entry(bucket.key.clone()).or_default();
        let tat = now_ns.saturating_add(until_full_ns);
        if tat > entry.gcra.tat_ns() {
            entry.gcra = Gcra::from_tat(tat);
        }
        // No room for one more request fleet-wide: hold local refusals for a while.
        let interval = bucket.rate.interval_ns();
        let capacity = interval.saturating_mul(u64::from(bucket.rate.burst.get()));
        let debt = entry.gcra.tat_ns().saturating_sub(now_ns);
        let room = capacity.saturating_sub(debt);
        if room < interval {
            let until_room = interval - room;
            let hold = if leasable(bucket) {
                hold_ns(
                    until_room,
                    debt,
                    hold_limit_ns(&bucket.rate, entry.short(now_ns)),
                )
            } else {
                empty_hold_ns(&bucket.rate, until_room)
            };
            let hold = now_ns.saturating_add(hold);
            entry.hold_until_ns = entry.hold_until_ns.max(hold);
            entry.saturated = leasable(bucket);
        } else if room >= capacity / 2 {
            entry.saturated = false;
        }
    }

    /// Check a plan on local state alone, charging nothing: the primary attempt, then (for
    /// a protected class that may borrow and whose reserve is empty) the borrowing attempt.
    /// Returns the evaluation that decides (the primary's when neither has room) and
    /// whether it is the borrowing attempt.
    pub fn precheck(&self, plan: &Plan, now_ns: u64, share: f64) -> (Evaluation, bool) {
        self.precheck_with(plan, &[], now_ns, share)
    }

    /// [`LocalTable::precheck`] with more buckets checked after the plan's, each at its
    /// own cost (an AI request's token buckets at the reservation, `crate::ai`).
    pub fn precheck_with(
        &self,
        plan: &Plan,
        extra: &[(&Bucket, u32)],
        now_ns: u64,
        share: f64,
    ) -> (Evaluation, bool) {
        let eval = self.evaluate_costs(&with_costs(plan, false, extra), now_ns, share);
        if !eval.allowed && eval.tripped == Some(0) && plan.borrow.is_some() {
            let alt = self.evaluate_costs(&with_costs(plan, true, extra), now_ns, share);
            if alt.allowed {
                return (alt, true);
            }
        }
        (eval, false)
    }

    /// Decide on local state alone ([`LocalTable::precheck`]), and charge when allowed.
    /// Returns the evaluation and whether it borrowed.
    pub fn decide(&mut self, plan: &Plan, now_ns: u64, share: f64) -> (Evaluation, bool) {
        self.decide_with(plan, &[], now_ns, share)
    }

    /// [`LocalTable::decide`] with extra buckets at their own costs.
    pub fn decide_with(
        &mut self,
        plan: &Plan,
        extra: &[(&Bucket, u32)],
        now_ns: u64,
        share: f64,
    ) -> (Evaluation, bool) {
        let (eval, borrowing) = self.precheck_with(plan, extra, now_ns, share);
        if eval.allowed {
            self.charge_costs_scaled(&with_costs(plan, borrowing, extra), now_ns, share);
        }
        (eval, borrowing)
    }

    /// The buckets' levels now, for headers and records (a check of cost 0).
    pub fn levels(&self, buckets: &[&Bucket], now_ns: u64) -> Vec<Level> {
        self.evaluate(buckets, 0, now_ns, 1.0).levels
    }

    /// Levels as a caller sees them: the mirror counts a lease as spent when it is
    /// granted, but what this worker still holds on lease is capacity the caller can use,
    /// so it is added back (never above the bucket's burst).
    pub fn add_leases(&self, levels: &mut [Level], buckets: &[&Bucket], now_ns: u64) {
        for (l, b) in levels.iter_mut().zip(buckets) {
            l.remaining = l
                .remaining
                .saturating_add(self.lease_left(b, now_ns))
                .min(l.burst);
        }
    }

    /// Spend leased capacity for every bucket, if each holds enough. All or nothing.
    pub fn try_lease(&mut self, buckets: &[&Bucket], cost: u32, now_ns: u64) -> bool {
        // One pass notes the demand and checks the leases, one spends them.
        let mut enough = !buckets.is_empty();
        for b in buckets {
            match self.buckets.get_mut(&b.key) {
                Some(s) => {
                    s.offered.note(cost, now_ns);
                    enough &= s.can_spend(cost, now_ns);
                }
                None => enough = false,
            }
        }
        if !enough {
            return false;
        }
        for b in buckets {
            if let Some(s) = self.buckets.get_mut(&b.key) {
                s.spend(cost, now_ns);
            }
        }
        true
    }

    /// How long a request refused here would wait for the lease it could be promised
    /// ([`LocalTable::promise`]), without promising it: `None` when the lease cannot cover
    /// it before it expires.
    fn promise_wait_ns(&self, buckets: &[&Bucket], cost: u32, now_ns: u64) -> Option<u64> {
        let mut at = None::<u64>;
        for b in buckets {
            let slot = self.buckets.get(&b.key)?.promise_at(cost, now_ns)?;
            at = Some(at.map_or(slot, |a| a.max(slot)));
        }
        at.map(|a| a - now_ns)
    }

    /// Promise `cost` units of this worker's lease to a request that waits in the queue for
    /// its paced slot, and take that slot: the wait, or `None` (nothing promised) when the
    /// lease cannot cover it ([`LocalTable::promise_wait_ns`]) or the slot is more than
    /// `max_wait_ns` away (the queue's longest wait). The units stay in the lease
    /// (pre-paid, counted as remaining) until [`LocalTable::redeem`] spends them or
    /// [`LocalTable::unpromise`] gives them back.
    ///
    /// Without it a request refused only by the lease's pace waited for the mirror to show
    /// room, which a saturated bucket's mirror does not while the leases are out, and when
    /// due it asked the service, which had leased that room away: the worker's lease grew
    /// unspent while its queue was refused (issue 10 §3, the queue run read −17%).
    pub fn promise(
        &mut self,
        buckets: &[&Bucket],
        cost: u32,
        now_ns: u64,
        max_wait_ns: u64,
    ) -> Option<u64> {
        let wait = self
            .promise_wait_ns(buckets, cost, now_ns)
            .filter(|w| *w <= max_wait_ns)?;
        for b in buckets {
            if let Some(s) = self.buckets.get_mut(&b.key) {
                s.promised = s.promised.saturating_add(cost);
                if s.pace_ns > 0 {
                    s.pace_tat_ns = s
                        .pace_tat_ns
                        .max(now_ns)
                        .saturating_add(s.pace_ns.saturating_mul(u64::from(cost)));
                }
            }
        }
        Some(wait)
    }

    /// Spend a promise ([`LocalTable::promise`]) when its request is released: `false`
    /// (and the promise dropped) when the lease expired meanwhile, so the request must be
    /// paid another way.
    pub fn redeem(&mut self, buckets: &[&Bucket], cost: u32, now_ns: u64) -> bool {
        let ok = !buckets.is_empty()
            && buckets.iter().all(|b| {
                self.buckets
                    .get(&b.key)
                    .is_some_and(|s| s.promised >= cost && s.lease_left(now_ns) >= cost)
            });
        for b in buckets {
            if let Some(s) = self.buckets.get_mut(&b.key) {
                s.promised = s.promised.saturating_sub(cost);
                if ok {
                    s.lease -= cost;
                    s.note_spend(cost, now_ns);
                }
            }
        }
        ok
    }

    /// Give a promise back to the lease: its request left the queue unpaid.
    pub fn unpromise(&mut self, buckets: &[&Bucket], cost: u32) {
        for b in buckets {
            if let Some(s) = self.buckets.get_mut(&b.key) {
                s.promised = s.promised.saturating_sub(cost);
            }
        }
    }

    /// How much capacity to ask the service for: about one second of this worker's recent
    /// spend on these buckets, at least `min(cost, max)`, at most `max`. Small leases keep
    /// the pre-paid, unspent capacity (the accuracy cost of leasing) small; one second of
    /// traffic is enough for a renewal on the next tick to arrive before the lease runs out.
    ///
    /// A protected class's reserve is never leased (0: ask for none). A lease is pre-paid,
    /// and what expires unspent is lost to the window; a reserve is sized to the class's own
    /// rate, so a class sending at its reserved rate would slowly drain its reserve that way
    /// (issue 14, item 1). Requests on a reserve are decided centrally, each paying its cost
    /// and nothing more. Token buckets are never leased either: a token lease would pre-pay
    /// tokens the way a reserve lease pre-pays requests, and an AI request's settlement
    /// needs the reservation charged where it can be refunded.
    pub fn want(&self, buckets: &[&Bucket], cost: u32, now_ns: u64, max: u32) -> u32 {
        if buckets
            .iter()
            .any(|b| b.kind == BucketKind::Reserve || b.kind.is_tokens())
        {
            return 0;
        }
        let rate = buckets
            .iter()
            .filter_map(|b| self.buckets.get(&b.key))
            .map(|s| {
                if s.saturated {
                    s.rate(now_ns).max(s.offered.rate(now_ns))
                } else {
                    s.rate(now_ns)
                }
            })
            .max()
            .unwrap_or(0);
        rate.saturating_add(cost).clamp(1, max.max(1))
    }

    /// [`LocalTable::want`] for one attempt of a plan. A protected class is never leased,
    /// not even on its borrowing attempt: the fast path spends leases only on the primary
    /// attempt (the reserve, which holds none), so a lease on the shared pool bought while
    /// borrowing could never be spent by the class, and it would expire unspent, pre-paid
    /// out of the shared pool (issue 14, item 1). A borrowing request pays exactly its cost.
    pub fn want_for(&self, plan: &Plan, borrowing: bool, now_ns: u64, max: u32) -> u32 {
        if plan.on_reserve() {
            return 0;
        }
        self.want(&plan.attempt(borrowing), plan.cost, now_ns, max)
    }

    /// Whether the lease on these buckets is running low and no renewal is in flight: a
    /// quarter of the last grant or less, or gone within the next `horizon_ns`, or less
    /// than this worker spends in `lead_ns` at its current rate. `lead_ns` is how long a
    /// renewal takes to arrive (until the next tick sends it, plus the round trip): without
    /// it a worker spending a 1,000-request lease in 200 ms ran dry before its renewal came
    /// back, and the requests in between each waited for a call of their own (issue 10 §1).
    /// Marks the buckets as renewing when it says yes, so one renewal is asked at a time.
    ///
    /// Never while a saturated bucket is held: its lease was this worker's share of what
    /// had refilled, and the first request after the hold asks for the next one (a renewal
    /// as well made two calls per hold).
    pub fn claim_renewal(
        &mut self,
        buckets: &[&Bucket],
        now_ns: u64,
        horizon_ns: u64,
        lead_ns: u64,
    ) -> bool {
        let held = buckets.iter().any(|b| {
            self.buckets
                .get(&b.key)
                .is_some_and(|s| s.saturated && s.hold_until_ns > now_ns)
        });
        let low = !held
            && buckets.iter().any(|b| {
                self.buckets.get(&b.key).is_some_and(|s| {
                    let left = s.free_lease(now_ns);
                    // Spent within the lead at the current rate (requests per second).
                    let lead_spend =
                        u64::from(s.rate(now_ns)).saturating_mul(lead_ns) / 1_000_000_000;
                    s.last_grant > 0
                        && !s.renewing
                        && (left <= (s.last_grant / 4).max(1)
                            || u64::from(left) <= lead_spend
                            || s.lease_until_ns <= now_ns + horizon_ns)
                })
            });
        if low {
            for b in buckets {
                if let Some(s) = self.buckets.get_mut(&b.key) {
                    s.renewing = true;
                }
            }
        }
        low
    }

    /// A request is about to ask the service about these buckets (it passed
    /// [`LocalTable::precheck`]). On a saturated bucket the ask is the only one until its
    /// answer ([`LocalTable::ask_done`]) or `timeout_ns`: the other requests meanwhile are
    /// refused locally, since the answer's lease is this worker's share of what refilled.
    /// Without it every request that arrived during the call passed the precheck too, and a
    /// binding limit cost a call per connection per hold (issue 10 §3).
    pub fn begin_ask(&mut self, buckets: &[&Bucket], now_ns: u64, timeout_ns: u64) {
        for b in buckets {
            if let Some(s) = self.buckets.get_mut(&b.key) {
                if s.saturated {
                    s.asking_until_ns = now_ns.saturating_add(timeout_ns);
                }
            }
        }
    }

    /// The ask of [`LocalTable::begin_ask`] ended (answered, failed or not sent).
    pub fn ask_done(&mut self, buckets: &[&Bucket]) {
        for b in buckets {
            if let Some(s) = self.buckets.get_mut(&b.key) {
                s.asking_until_ns = 0;
            }
        }
    }

    /// A renewal finished (granted or not): allow the next one.
    pub fn renewal_done(&mut self, buckets: &[&Bucket]) {
        for b in buckets {
            if let Some(s) = self.buckets.get_mut(&b.key) {
                s.renewing = false;
            }
        }
    }

    /// Leased capacity this worker holds for one bucket and has not spent yet. The mirror
    /// counts a lease as spent when it is granted, so a bucket's `remaining` as a caller
    /// sees it is the mirror's plus this.
    pub fn lease_left(&self, bucket: &Bucket, now_ns: u64) -> u32 {
        self.buckets
            .get(&bucket.key)
            .map_or(0, |s| s.lease_left(now_ns))
    }

    /// Unspent leased capacity held by this worker, summed over buckets (a gauge: it is the
    /// most by which the fleet can under-admit, since leases are pre-paid).
    pub fn outstanding_lease(&self, now_ns: u64) -> u64 {
        self.buckets
            .values()
            .map(|s| u64::from(s.lease_left(now_ns)))
            .sum()
    }

    /// Record capacity the service granted this worker for a bucket.
    pub fn grant(&mut self, bucket: &Bucket, requests: u32, valid_until_ns: u64, now_ns: u64) {
        if valid_until_ns <= now_ns {
            return;
        }
        self.make_room(now_ns, 1);
        let s = self.buckets.entry(bucket.key.clone()).or_default();
        if s.lease_until_ns <= now_ns {
            // An expired lease keeps no promises: [`LocalTable::redeem`] fails them.
            s.promised = 0;
        }
        // Grants add up: what is left of an earlier one was paid for too.
        s.lease = s.lease_left(now_ns).saturating_add(requests);
        s.lease_until_ns = s.lease_until_ns.max(valid_until_ns);
        s.last_grant = requests;
        s.renewing = false;
        // Little left after the grant ([`saturated`]; the mirror has just synced with the
        // service's answer): the bucket is saturated, and this lease is the worker's share of
        // what had refilled since the last ask (the service grants all of the room, up to
        // half the burst: [`lease_room`]). Spend it, then refuse locally for a hold rather
        // than ask again at once; the capacity refilling meanwhile waits in the service's
        // bucket for the next ask (of this worker or another), which it cannot overflow since
        // the hold ends before the bucket is full ([`hold_ns`]). A slow bucket with more
        // left than [`SATURATED_ROOM_NS`] (5 an hour with 1 left) is not held: refusing
        // would turn away requests the service has room for, and its calls are bounded by
        // what it admits anyway.
        let interval = bucket.rate.interval_ns();
        let capacity = interval.saturating_mul(u64::from(bucket.rate.burst.get()));
        let debt = s.gcra.tat_ns().saturating_sub(now_ns);
        let room = capacity.saturating_sub(debt);
        // A grant at the cap after a hold on a saturated bucket: the worker came back later
        // than one grant's refill ([`hold_limit_ns`]). It stays saturated (what is left is
        // less than what it held for), with short holds from now on.
        let cap = max_grant(bucket.rate.burst.get());
        let capped = s.saturated && requests >= cap && room >= capacity / 4 && room < capacity / 2;
        // Short holds last while the grants stay near the cap: a worker alone on the bucket.
        let near_cap = s.short(now_ns) && requests >= cap - cap / 4;
        if capped || near_cap {
            s.short_until_ns = now_ns.saturating_add(SHORT_HOLD_NS);
        }
        if leasable(bucket) && (capped || saturated(&bucket.rate, room)) {
            let until_room = interval.saturating_sub(room);
            let limit = hold_limit_ns(&bucket.rate, s.short(now_ns));
            let hold = now_ns.saturating_add(hold_ns(until_room, debt, limit));
            s.hold_until_ns = s.hold_until_ns.max(hold);
            s.saturated = true;
            // Spend the lease paced over the hold, not at once: one unit every
            // `hold / lease`. What the fleet admits is the same (the lease is this worker's
            // share of the refill either way), but it comes evenly instead of in one clump
            // per hold, so a short window's count is right whatever the hold's length
            // (which is what lets [`MAX_HOLD_NS`] be long). Within the lease's validity
            // ([`LocalBucket::pace_span`]).
            let lease = u64::from(s.free_lease(now_ns).max(1));
            s.pace_ns = s.pace_span(now_ns) / lease;
            s.pace_tat_ns = now_ns;
        } else {
            s.saturated = false;
            s.pace_ns = 0;
        }
    }

    /// Take the service's slot for a saturated bucket ([`ask_slot`]): hold it `hold_ns`
    /// from now instead of this worker's own hold ([`hold_ns`]), and spend its lease paced
    /// over that. Call it after [`LocalTable::sync`] and [`LocalTable::grant`] with the
    /// same answer. The hold is at most [`MAX_SLOT_HOLD_NS`] and the lease's validity, and
    /// at least the time until the bucket has room for one request. Buckets that are never
    /// leased ([`leasable`]) and a `hold_ns` of 0 are ignored.
    pub fn coordinate(&mut self, bucket: &Bucket, hold_ns: u64, now_ns: u64) {
        if hold_ns == 0 || !leasable(bucket) {
            return;
        }
        self.make_room(now_ns, 1);
        let s = self.buckets.entry(bucket.key.clone()).or_default();
        let until_room =
            bucket
                .rate
                .interval_ns()
                .saturating_sub(room_ns(&s.gcra, &bucket.rate, now_ns));
        let lease = s.lease_left(now_ns);
        let mut hold = hold_ns.min(MAX_SLOT_HOLD_NS);
        if lease > 0 {
            hold = hold.min(s.lease_until_ns - now_ns);
        }
        let hold = hold.max(until_room);
        s.hold_until_ns = now_ns.saturating_add(hold);
        s.saturated = true;
        // Units promised to queued requests keep the slots they took.
        let free = s.free_lease(now_ns);
        if free > 0 {
            s.pace_ns = s.pace_span(now_ns) / u64::from(free);
            s.pace_tat_ns = now_ns;
        } else {
            s.pace_ns = 0;
        }
    }

    /// Drop buckets that are full again and hold no lease: they carry no information.
    pub fn prune(&mut self, now_ns: u64) {
        self.buckets.retain(|_, b| {
            !(b.gcra.is_idle(now_ns)
                && b.lease_left(now_ns) == 0
                && !b.renewing
                && b.hold_until_ns <= now_ns
                && b.asking_until_ns <= now_ns)
        });
    }

    fn make_room(&mut self, now_ns: u64, incoming: usize) {
        if self.buckets.len() + incoming <= self.max_buckets {
            return;
        }
        self.prune(now_ns);
        if self.buckets.len() + incoming <= self.max_buckets {
            return;
        }
        // Still full of live buckets: evict the ones closest to full (least state lost), a
        // sixteenth of the table at once, so that the O(n) pass that finds them runs once
        // per n/16 new buckets rather than on every one.
        let excess = self.buckets.len() + incoming - self.max_buckets;
        let batch = excess.max(self.max_buckets / 16).min(self.buckets.len());
        if batch == 0 {
            return;
        }
        let mut by_tat: Vec<(u64, String)> = self
            .buckets
            .iter()
            .map(|(k, b)| (b.gcra.tat_ns(), k.clone()))
            .collect();
        if batch < by_tat.len() {
            by_tat.select_nth_unstable(batch - 1);
        }
        for (_, k) in by_tat.into_iter().take(batch) {
            if self.buckets.remove(&k).is_some() {
                self.evicted = self.evicted.saturating_add(1);
            }
        }
    }
}

/// Whether a hit admitted without the service goes into the ledger ([`Unreported`]) to be
/// reported. `service_may_have_counted`: the call reached the service and may have been
/// charged there (a timeout, an answer that could not be read), as opposed to a call that
/// certainly was not (a dispatch failure, a refused connection, an error status).
///
/// A hung service (a long GC pause, SIGSTOP) works through its backlog of calls when it
/// resumes, although every caller gave up on them, and charges them. Reporting those hits as
/// well counted each twice and put a protected reserve into debt, starving a lane that had
/// stayed within it (issue 14, item 2). So a request on a reserve whose call may have been
/// counted is not reported (none of its buckets: the reserve and its user, tool or purpose
/// buckets, which the same call charged): a reserve is sized to its class's own rate, and
/// the worst case of not reporting (the service really never saw the call) is that the
/// protected class may use those few units again, bounded by what it was admitted during
/// the outage. Unprotected requests are reported as before: the tenant's ceiling errs on
/// the side of counting. A hit that borrowed the shared pool locally (`borrowed`) is
/// reported: the call the service may have counted was for the reserve, not for the pool.
pub fn report_unanswered(plan: &Plan, borrowed: bool, service_may_have_counted: bool) -> bool {
    !(service_may_have_counted && plan.on_reserve() && !borrowed)
}

/// gRPC `DEADLINE_EXCEEDED`.
const GRPC_DEADLINE_EXCEEDED: u32 = 4;

/// Whether a call that ended with the non-OK gRPC `status` after `elapsed_ns` timed out.
/// Envoy reports its own timeout of the call as UNAVAILABLE (14), not DEADLINE_EXCEEDED, so
/// the elapsed time (at least 90% of `timeout_ms`) tells a timeout apart.
pub fn call_timed_out(status: u32, elapsed_ns: u64, timeout_ms: u32) -> bool {
    let elapsed_ms = elapsed_ns / 1_000_000;
    status == GRPC_DEADLINE_EXCEEDED || elapsed_ms * 10 >= u64::from(timeout_ms) * 9
}

/// The most buckets one [`Unreported`] holds: a worker's ledger between two sync ticks
/// (about 200 bytes a bucket, so a few MiB of the VM's memory at most). Hits for a bucket
/// not yet in a full ledger are forgotten and counted ([`Unreported::take_dropped`]); the
/// buckets already in it keep counting.
pub const MAX_UNREPORTED_BUCKETS: usize = 20_000;

/// The origin of units a report charges in full ([`Unreported::add`]): in the future, so
/// their age is 0 ([`report_age_ms`]). An entry that also holds hits of an outage takes the
/// outage's (earlier) origin.
pub const IN_FULL: u64 = u64::MAX;

/// Hits of one bucket waiting in a ledger ([`Unreported`]): how many, and their origin.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub bucket: Bucket,
    pub hits: u64,
    /// When an empty bucket would have had to start refilling to hold the room this worker's
    /// mirror showed when the first of these hits was admitted (wall clock, ns): the time of
    /// that hit less that room ([`Unreported::add_seen`]). The report says how long ago this
    /// was ([`report_age_ms`]), and the service charges the hits as if onto a bucket that was
    /// empty then ([`charge_reported`]).
    pub since_ns: u64,
}

/// Hits this worker admitted without the service (fail-open or local degraded decisions),
/// per bucket, waiting to be reported with `hits_addend` so the central accounting
/// converges once the service is back. Holds at most [`MAX_UNREPORTED_BUCKETS`] buckets.
///
/// Each bucket's entry remembers when its first hit was admitted, so that the report can say
/// how long ago that was ([`report_age_ms`]) and the service charges only what the hits
/// exceeded the bucket's refill over that time by ([`charge_reported`]).
#[derive(Debug, Clone, Default)]
pub struct Unreported {
    hits: HashMap<String, Pending>,
    dropped: u64,
}

impl Unreported {
    /// Units to be charged in full when reported (age 0: [`IN_FULL`]): tokens an AI request
    /// used beyond its reservation while the service answered, and refunds.
    pub fn add(&mut self, buckets: &[&Bucket], cost: u32) {
        self.add_at(buckets, cost, IN_FULL);
    }

    /// Hits with an explicit origin ([`Pending::since_ns`]).
    pub fn add_at(&mut self, buckets: &[&Bucket], cost: u32, origin_ns: u64) {
        for b in buckets {
            self.add_one(b, u64::from(cost), origin_ns);
        }
    }

    /// Hits admitted without the service, at a cost per bucket ([`Plan::costed`]), with
    /// what this worker's mirror shows of each bucket: a new entry's origin is `now` less the
    /// bucket's room in the mirror ([`Pending::since_ns`]). So the report of hits that began
    /// on a bucket with room is not charged for room the bucket had, and that of hits on a
    /// saturated bucket is charged the burst its refilled central twin will hand out again.
    pub fn add_seen(&mut self, table: &LocalTable, buckets: &[(&Bucket, u32)], now_ns: u64) {
        for (b, cost) in buckets {
            let origin = now_ns.saturating_sub(table.room_ns(b, now_ns));
            self.add_one(b, u64::from(*cost), origin);
        }
    }

    /// Put back hits taken earlier (a publish or a report that failed), keeping the
    /// earliest `since` of what is already there and what comes back.
    pub fn put_back(&mut self, pending: Pending) {
        let Pending {
            bucket,
            hits,
            since_ns,
        } = pending;
        self.add_one(&bucket, hits, since_ns);
    }

    fn add_one(&mut self, b: &Bucket, hits: u64, since_ns: u64) {
        if let Some(e) = self.hits.get_mut(&b.key) {
            e.hits = e.hits.saturating_add(hits);
            e.since_ns = e.since_ns.min(since_ns);
        } else if self.hits.len() < MAX_UNREPORTED_BUCKETS {
            self.hits.insert(
                b.key.clone(),
                Pending {
                    bucket: b.clone(),
                    hits,
                    since_ns,
                },
            );
        } else {
            self.dropped = self.dropped.saturating_add(hits);
        }
    }

    /// The hits forgotten because the ledger was full, since the last call.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Take everything, leaving the ledger empty.
    pub fn take(&mut self) -> Vec<Pending> {
        self.hits.drain().map(|(_, v)| v).collect()
    }

    pub fn total(&self) -> u64 {
        self.hits.values().map(|p| p.hits).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.hits.is_empty()
    }
}

/// How long ago, in whole milliseconds (rounded down), hits first admitted at `since_ns`
/// were, at `now_ns`: what a report says of them (the descriptor entry `lg.age_ms`). Rounded
/// down, so a report is never charged earlier than its hits were admitted.
pub fn report_age_ms(since_ns: u64, now_ns: u64) -> u64 {
    now_ns.saturating_sub(since_ns) / 1_000_000
}

/// Charge `cost` reported hits to a bucket as if onto a bucket that was empty `age_ns` before
/// `now_ns` ([`Pending::since_ns`]: the first hit's time less the room the worker saw then):
/// its TAT becomes max(TAT, now) + min(spent, max(0, spent + capacity − age)), where spent =
/// cost × interval and capacity = burst × interval.
///
/// The service did not see an outage's hits, so its bucket refilled while they were
/// admitted, and its traffic resumes (from that refilled bucket) as soon as it is back,
/// before the report lands. What the report adds is what the hits took beyond the refill
/// of their age on a bucket that was empty at its start: hits at the ceiling's rate on a
/// saturated bucket charge one burst, exactly the burst the refilled bucket handed out
/// again after the restart; hits beyond the rate charge that much more; hits that began on
/// a bucket with room, and stayed under the rate, charge nothing. Never more than the old
/// rule (every hit as of now: spent), which closed the bucket for as long as the outage had
/// lasted (the accuracy benchmark's restart run admitted 57% under its ceiling in the 7 s
/// after a 4 s outage). Charging as of the first hit (max(TAT, now − age) + spent) is not
/// enough: the resumed traffic has moved the TAT past the outage's start already, and the
/// whole outage lands on top of it (−56.9% measured). What this gives up: in a partial
/// outage (one Envoy cut off, the others deciding centrally at the full rate) the cut-off
/// Envoy's hits, at most its `local_share` of the rate, are paid back only up to one burst.
pub fn charge_reported(state: &mut Gcra, rate: &Rate, cost: u32, age_ns: u64, now_ns: u64) {
    let interval = rate.interval_ns();
    let spent = interval.saturating_mul(u64::from(cost));
    let capacity = interval.saturating_mul(u64::from(rate.burst.get()));
    let charge = spent
        .saturating_add(capacity)
        .saturating_sub(age_ns)
        .min(spent);
    *state = Gcra::from_tat(state.tat_ns().max(now_ns).saturating_add(charge));
}

/// An attempt's buckets at the plan's cost, then the extra buckets at theirs.
pub fn with_costs<'a>(
    plan: &'a Plan,
    borrowing: bool,
    extra: &[(&'a Bucket, u32)],
) -> Vec<(&'a Bucket, u32)> {
    plan.costed(borrowing)
        .into_iter()
        .chain(extra.iter().copied())
        .collect()
}

/// A rate scaled by a share in (0, 1], never below one request and a burst of one.
fn scaled(rate: &Rate, share: f64) -> Rate {
    if share >= 1.0 {
        return *rate;
    }
    let n = ((f64::from(rate.requests.get()) * share).floor() as u32).max(1);
    let b = ((f64::from(rate.burst.get()) * share).floor() as u32).max(1);
    Rate::new(n, rate.window, b).unwrap_or(*rate)
}

#[cfg(test)]
pub(crate) mod tests;
