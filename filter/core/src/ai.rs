//! AI traffic: token quotas reserved at admission and settled from the response.
//!
//! A token bill is known only after the response, so charging after the fact lets N
//! concurrent requests overshoot by everything they spend at once. laneguard reserves
//! instead: at admission each token bucket the request touches is charged an estimate
//! ([`TokenPlan::reserve`]: the body's `max_completion_tokens` / `max_tokens`, else the
//! model's, the endpoint family's or the policy's default), all or nothing together with the
//! request buckets. When the response arrives, the real usage ([`Usage`], from the JSON body's
//! `usage`, the final SSE chunk's `usage`, or a header the policy names) settles the
//! difference ([`settle`]): a refund when it used less, an extra charge when it used more.
//!
//! **The bound.** Reservations are admitted all or nothing against each bucket's room, so
//! what is reserved never exceeds a bucket's limit. Only an extra charge (usage above the
//! reservation) can push a bucket past it, and only by that excess: over any window a token
//! bucket admits at most its limit plus the sum, over the requests it admitted, of
//! `max(0, usage - reservation)`. The filter exports that sum (`laneguard.tokens.over_reservation`)
//! and the reservations in flight (`laneguard.tokens.in_flight_reserved`). A request that
//! honours `max_tokens` exceeds its reservation by at most its prompt tokens.
//!
//! Every bad input has one outcome, chosen here: see [`BodyError`] (400), [`TokenReject`]
//! (400), [`NoUsage`] (settle at the reservation). Nothing here panics or allocates without
//! bound: bodies are read only up to `tokens.inspect_bytes`.

use crate::declared::Dimension;
use crate::engine::{model_buckets, Bucket, BucketKind, Plan};
use crate::policy::tokens::Tokens;
use crate::policy::Policy;
use serde::Deserialize;
use serde_json::Value;

/// What the filter reads from an AI request's JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestBody {
    pub model: Option<String>,
    /// `max_completion_tokens` if present, else `max_tokens`.
    pub max_tokens: Option<u32>,
    pub stream: bool,
}

/// A request body that cannot be inspected: answered 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Not a JSON object.
    NotJson,
    /// `max_tokens` or `max_completion_tokens` is not a positive integer.
    BadMaxTokens,
}

impl BodyError {
    pub fn code(self) -> &'static str {
        match self {
            BodyError::NotJson => "invalid_body",
            BodyError::BadMaxTokens => "invalid_max_tokens",
        }
    }

    pub fn detail(self) -> &'static str {
        match self {
            BodyError::NotJson => "the request body of an AI endpoint must be a JSON object",
            BodyError::BadMaxTokens => {
                "max_tokens / max_completion_tokens must be a positive integer"
            }
        }
    }
}

#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    model: Option<Value>,
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    max_completion_tokens: Option<Value>,
    #[serde(default)]
    stream: Option<Value>,
}

fn positive(v: &Value) -> Result<u32, BodyError> {
    match v.as_u64() {
        // Larger than any bucket: the reservation check refuses it by name.
        Some(n) if n > 0 => Ok(u32::try_from(n).unwrap_or(u32::MAX)),
        _ => Err(BodyError::BadMaxTokens),
    }
}

/// Read `model`, `max_tokens` / `max_completion_tokens` and `stream` from a request body.
/// Other fields are skipped without being built. `null` counts as absent; `stream` is a
/// stream only when it is `true`.
pub fn parse_request(body: &[u8]) -> Result<RequestBody, BodyError> {
    // serde would also read a struct from a JSON array, positionally: only objects count.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(BodyError::NotJson);
    }
    let head: Head = serde_json::from_slice(body).map_err(|_| BodyError::NotJson)?;
    let limit = |v: &Option<Value>| match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => positive(v).map(Some),
    };
    let max_completion = limit(&head.max_completion_tokens)?;
    let max_tokens = limit(&head.max_tokens)?;
    Ok(RequestBody {
        model: head.model.and_then(|m| m.as_str().map(str::to_string)),
        max_tokens: max_completion.or(max_tokens),
        stream: head.stream == Some(Value::Bool(true)),
    })
}

/// The body with its `model` field set to `model` (the `cheaper_model` fallback). `None`
/// when the body is not a JSON object (then only the model header is rewritten).
pub fn rewrite_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    v.as_object_mut()?
        .insert("model".to_string(), Value::String(model.to_string()));
    serde_json::to_vec(&v).ok()
}

/// Where a reservation came from (for records and counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Estimate {
    /// The body's `max_completion_tokens` / `max_tokens`.
    Body,
    /// `models.list[].tokens.default_estimate`.
    Model,
    /// `tokens.tools.<family>.default_estimate`.
    Tool,
    /// `tokens.default_estimate`.
    Default,
}

impl Estimate {
    pub fn as_str(self) -> &'static str {
        match self {
            Estimate::Body => "body",
            Estimate::Model => "model",
            Estimate::Tool => "tool",
            Estimate::Default => "default",
        }
    }
}

/// An AI request's token buckets and what it reserves in each.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenPlan {
    pub model: Option<String>,
    /// Tokens reserved in every bucket at admission.
    pub reserve: u32,
    pub estimate: Estimate,
    /// User, tool, purpose, model allocation, model total: the order of the request buckets.
    pub buckets: Vec<Bucket>,
}

impl TokenPlan {
    /// The buckets with the reservation as their cost, to check and charge with the
    /// request buckets (`LocalTable::precheck_with`).
    pub fn costed(&self) -> Vec<(&Bucket, u32)> {
        self.buckets.iter().map(|b| (b, self.reserve)).collect()
    }

    pub fn refs(&self) -> Vec<&Bucket> {
        self.buckets.iter().collect()
    }
}

/// A reservation no bucket could ever hold: answered 400, naming the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReject {
    pub bucket: String,
    pub reserve: u32,
    pub burst: u32,
}

impl TokenReject {
    pub const CODE: &'static str = "max_tokens_too_large";

    pub fn detail(&self) -> String {
        format!(
            "the request reserves {} tokens but {} holds at most {}",
            self.reserve, self.bucket, self.burst
        )
    }
}

/// The token buckets of an AI request (`None` when the policy has no token settings or
/// none of its token budgets applies). `model` is the model the request names (header,
/// else body), `max_tokens` the body's limit.
pub fn token_plan(
    policy: &Policy,
    plan: &Plan,
    model: Option<&str>,
    purpose: Option<&str>,
    max_tokens: Option<u32>,
) -> Result<Option<TokenPlan>, TokenReject> {
    let Some(tokens) = &policy.tokens else {
        return Ok(None);
    };
    let domain = policy.service.domain.as_str();
    let tenant = plan.tenant.as_str();
    let mut buckets = Vec::new();
    if let (Some(u), Some(rate)) = (&plan.user, tokens.users) {
        buckets.push(Bucket::new(domain, BucketKind::UserTokens, tenant, u, rate));
    }
    let tool = plan.family.as_deref().and_then(|f| tokens.tools.get(f));
    if let (Some(f), Some(rate)) = (&plan.family, tool.and_then(|t| t.limit)) {
        buckets.push(Bucket::new(domain, BucketKind::ToolTokens, tenant, f, rate));
    }
    if let Some(rate) = purpose.and_then(|p| tokens.purposes.get(p)) {
        if let Some(p) = purpose {
            buckets.push(Bucket::new(
                domain,
                BucketKind::PurposeTokens,
                tenant,
                p,
                *rate,
            ));
        }
    }
    let model_def = model.and_then(|m| policy.models.as_ref()?.list.get(m));
    let model_tokens = model_def.and_then(|m| m.tokens.as_ref());
    if let (Some(m), Some(t)) = (model_def, model_tokens) {
        buckets.extend(token_model_buckets(domain, &m.name, t, tenant));
    }
    if buckets.is_empty() {
        return Ok(None);
    }
    let (reserve, estimate) = match (
        max_tokens,
        model_tokens.and_then(|t| t.default_estimate),
        tool.and_then(|t| t.default_estimate),
    ) {
        (Some(n), _, _) => (n, Estimate::Body),
        (None, Some(n), _) => (n, Estimate::Model),
        (None, None, Some(n)) => (n, Estimate::Tool),
        (None, None, None) => (tokens.default_estimate, Estimate::Default),
    };
    if let Some(b) = buckets.iter().find(|b| reserve > b.rate.burst.get()) {
        return Err(TokenReject {
            bucket: b.name(),
            reserve,
            burst: b.rate.burst.get(),
        });
    }
    Ok(Some(TokenPlan {
        model: model_def.map(|m| m.name.clone()),
        reserve,
        estimate,
        buckets,
    }))
}

fn token_model_buckets(
    domain: &str,
    model: &str,
    t: &crate::policy::tokens::ModelTokens,
    tenant: &str,
) -> [Bucket; 2] {
    let alloc = t
        .tenant_allocations
        .get(tenant)
        .copied()
        .unwrap_or(t.default_allocation);
    [
        Bucket::new(domain, BucketKind::ModelTokens, tenant, model, alloc),
        Bucket::new(domain, BucketKind::ModelTotalTokens, "", model, t.capacity),
    ]
}

/// The model the `cheaper_model` fallback would send a request for `model` to.
pub fn cheaper<'a>(policy: &'a Policy, model: &str) -> Option<&'a str> {
    policy
        .models
        .as_ref()?
        .list
        .get(model)?
        .cheaper_model
        .as_deref()
}

/// The same request sent to `model` instead: its model buckets (request and token) are
/// replaced by that model's, and a reservation that came from the old model's default is
/// re-estimated. `None` if the policy does not know `model` or it cannot hold the request.
pub fn with_model(
    policy: &Policy,
    plan: &Plan,
    tokens: Option<&TokenPlan>,
    model: &str,
    purpose: Option<&str>,
    max_tokens: Option<u32>,
) -> Option<(Plan, Option<TokenPlan>)> {
    let def = policy.models.as_ref()?.list.get(model)?;
    let mut next = plan.clone();
    next.model = Some(def.name.clone());
    next.buckets.retain(|b| !b.kind.is_model());
    next.buckets.extend(model_buckets(
        policy.service.domain.as_str(),
        def,
        &plan.tenant,
    ));
    let next_tokens = match tokens {
        None if def.tokens.is_none() => None,
        _ => token_plan(policy, &next, Some(model), purpose, max_tokens).ok()?,
    };
    Some((next, next_tokens))
}

/// What the response said about the tokens it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// Total tokens used (`total_tokens`, or `prompt_tokens + completion_tokens`).
    Tokens(u64),
    /// No usage reported.
    Missing,
    /// A usage that is negative, not a number, or in a body that is not JSON.
    Invalid,
}

/// Why a request settles at its reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoUsage {
    /// The response reported no usage (including a stream that ended without it).
    Missing,
    /// The usage was negative, not a number, or the body was not JSON.
    Invalid,
    /// The response body was larger than `tokens.inspect_bytes`.
    TooLarge,
    /// The client went away before the response ended.
    Disconnected,
}

impl NoUsage {
    pub fn as_str(self) -> &'static str {
        match self {
            NoUsage::Missing => "missing",
            NoUsage::Invalid => "invalid",
            NoUsage::TooLarge => "too_large",
            NoUsage::Disconnected => "disconnected",
        }
    }
}

/// The outcome of settling one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Used exactly what it reserved.
    Exact,
    /// Used less: give this much back to every token bucket.
    Refund(u32),
    /// Used more: charge this much more to every token bucket (it already happened, so
    /// unconditionally, like a report).
    Extra(u32),
    /// No usable usage: the reservation stands.
    AtReservation(NoUsage),
}

/// Settle a reservation against what the response reported.
pub fn settle(reserve: u32, usage: Usage) -> Settle {
    match usage {
        Usage::Missing => Settle::AtReservation(NoUsage::Missing),
        Usage::Invalid => Settle::AtReservation(NoUsage::Invalid),
        Usage::Tokens(used) => {
            let reserved = u64::from(reserve);
            if used < reserved {
                Settle::Refund(u32::try_from(reserved - used).unwrap_or(u32::MAX))
            } else if used > reserved {
                Settle::Extra(u32::try_from(used - reserved).unwrap_or(u32::MAX))
            } else {
                Settle::Exact
            }
        }
    }
}

fn count(v: &Value) -> Option<u64> {
    v.as_u64()
}

/// The usage in a parsed JSON value (a whole body, or one SSE chunk): `Missing` when there
/// is no `usage` or it is `null`.
pub fn usage_of(v: &Value) -> Usage {
    let u = match v.get("usage") {
        None | Some(Value::Null) => return Usage::Missing,
        Some(u) => u,
    };
    if let Some(total) = u.get("total_tokens") {
        return count(total).map_or(Usage::Invalid, Usage::Tokens);
    }
    match (
        u.get("prompt_tokens").map(count),
        u.get("completion_tokens").map(count),
    ) {
        (Some(Some(p)), Some(Some(c))) => Usage::Tokens(p.saturating_add(c)),
        (None, Some(Some(c))) => Usage::Tokens(c),
        _ => Usage::Invalid,
    }
}

/// The usage of a whole (non-streamed) JSON response body.
pub fn usage_from_json(body: &[u8]) -> Usage {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => usage_of(&v),
        Err(_) => Usage::Invalid,
    }
}

/// The usage in the policy's usage header (`tokens.usage_header`): total tokens.
pub fn usage_from_header(value: &str) -> Usage {
    value
        .trim()
        .parse::<u64>()
        .map_or(Usage::Invalid, Usage::Tokens)
}

/// Whether an SSE event's data can carry a usage: it has a `"usage"` that is not the key of
/// a `null` (OpenAI streams with `include_usage` send `"usage":null` in every content chunk).
/// A JSON string cannot hold an unescaped quote, so these bytes are a key or a string
/// value; skipping the others changes nothing, since `usage_of` finds no usage in them.
fn may_carry_usage(data: &[u8]) -> bool {
    const KEY: &[u8] = b"\"usage\"";
    let mut rest = data;
    while let Some(i) = rest.windows(KEY.len()).position(|w| w == KEY) {
        let after = rest
            .get(i + KEY.len()..)
            .unwrap_or_default()
            .trim_ascii_start();
        let value = after.strip_prefix(b":").map(<[u8]>::trim_ascii_start);
        if !value.is_some_and(|v| v.starts_with(b"null")) {
            return true;
        }
        rest = after;
    }
    false
}

/// Reads a `text/event-stream` response as it passes, without holding it up: it keeps only
/// the event being received (at most `limit` bytes) and the last usage seen. OpenAI-style
/// streams carry `usage` in their final chunk, before `data: [DONE]`.
#[derive(Debug, Clone)]
pub struct SseScanner {
    pending: Vec<u8>,
    limit: usize,
    usage: Usage,
    skipping: bool,
    last: u8,
    /// An event longer than `limit` was skipped.
    pub overflowed: bool,
    /// `data: [DONE]` was seen.
    pub done: bool,
}

impl SseScanner {
    pub fn new(limit: usize) -> SseScanner {
        SseScanner {
            pending: Vec::new(),
            limit: limit.max(1),
            usage: Usage::Missing,
            skipping: false,
            last: 0,
            overflowed: false,
            done: false,
        }
    }

    /// Feed the next bytes of the stream. A line at a time (its bytes copied in one go):
    /// a stream is read as it passes, so this runs on every chunk of every AI answer.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while !rest.is_empty() {
            if self.skipping {
                rest = self.skip(rest);
                continue;
            }
            let line_end = rest.iter().position(|&b| b == b'\n');
            let take = line_end.map_or(rest.len(), |i| i + 1);
            let room = self.limit.saturating_sub(self.pending.len());
            if take > room {
                // The event passes the limit before this line ends: keep what fits, and the
                // next byte starts the skip (the line's newline lies beyond `room`).
                let (fits, after) = rest.split_at(room);
                self.pending.extend_from_slice(fits);
                rest = self.overflow(after);
                continue;
            }
            let (line, after) = rest.split_at(take);
            self.pending.extend_from_slice(line);
            rest = after;
            if line_end.is_some()
                && (self.pending.ends_with(b"\n\n") || self.pending.ends_with(b"\r\n\r\n"))
            {
                let event = std::mem::take(&mut self.pending);
                self.event(&event);
                // Keep the buffer's capacity for the next event.
                self.pending = event;
                self.pending.clear();
            }
        }
    }

    /// The event being received is `limit` bytes long and `rest` goes on: drop it, and skip
    /// to its end. Returns what is left of `rest`.
    fn overflow<'a>(&mut self, rest: &'a [u8]) -> &'a [u8] {
        let Some((&byte, after)) = rest.split_first() else {
            return rest;
        };
        self.overflowed = true;
        self.skipping = true;
        self.last = self.pending.last().copied().unwrap_or(0);
        self.pending.clear();
        if byte == b'\n' && self.last == b'\n' {
            self.skipping = false;
        }
        self.last = byte;
        after
    }

    /// The rest of an oversized event: wait for its blank line. Returns what follows it.
    fn skip<'a>(&mut self, rest: &'a [u8]) -> &'a [u8] {
        for (i, &byte) in rest.iter().enumerate() {
            if byte == b'\r' {
                continue;
            }
            let blank = byte == b'\n' && self.last == b'\n';
            self.last = byte;
            if blank {
                self.skipping = false;
                return rest.get(i + 1..).unwrap_or_default();
            }
        }
        &[]
    }

    fn event(&mut self, event: &[u8]) {
        for line in event.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.trim_ascii();
            if data == b"[DONE]" {
                self.done = true;
                continue;
            }
            // Most events are content deltas without a usage: not worth a JSON parse.
            if !may_carry_usage(data) {
                continue;
            }
            let parsed = serde_json::from_slice::<Value>(data)
                .or_else(|_| serde_json::from_str::<Value>(&String::from_utf8_lossy(data)));
            if let Ok(v) = parsed {
                match usage_of(&v) {
                    Usage::Missing => {}
                    u => self.usage = u,
                }
            }
        }
    }

    /// The stream ended: its usage (an event without a trailing blank line counts too).
    pub fn finish(&mut self) -> Usage {
        if !self.pending.is_empty() {
            let event = std::mem::take(&mut self.pending);
            self.event(&event);
        }
        self.usage
    }
}

/// The fallback name the `cheaper_model` downgrade reports (`x-laneguard-fallback`, the
/// audit record's `fallback`).
pub const CHEAPER_MODEL: &str = "cheaper_model";

/// What the filter keeps of an AI request's body once admitted: enough to re-plan it for a
/// cheaper model and to read its response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inspected {
    /// The model the request is for (the body's `model`, else the model header).
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub stream: bool,
    pub purpose: Option<String>,
}

/// An AI request refused before any bucket is charged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmitError {
    /// The body could not be inspected (400).
    Body(BodyError),
    /// The body is larger than `tokens.inspect_bytes` (413): it is never buffered further.
    TooLarge { limit: u32 },
    /// The reservation cannot fit a bucket's burst (400, naming the bucket).
    Tokens(TokenReject),
    /// The model the request names (body, else header) is refused by the policy's rule for
    /// declared models (`crate::declared`): 400 or 403, as for a header refused at once.
    Declared(crate::engine::Reject),
}

impl AdmitError {
    pub fn status(&self) -> u32 {
        match self {
            AdmitError::TooLarge { .. } => 413,
            AdmitError::Declared(r) => r.status(),
            _ => 400,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AdmitError::Body(e) => e.code(),
            AdmitError::TooLarge { .. } => "body_too_large",
            AdmitError::Tokens(_) => TokenReject::CODE,
            AdmitError::Declared(r) => r.code(),
        }
    }

    pub fn detail(&self) -> String {
        match self {
            AdmitError::Body(e) => e.detail().to_string(),
            AdmitError::TooLarge { limit } => format!(
                "the request body of an AI endpoint is larger than the {limit} bytes the \
                 gateway inspects (tokens.inspect_bytes)"
            ),
            AdmitError::Tokens(t) => t.detail(),
            AdmitError::Declared(r) => r.detail().to_string(),
        }
    }
}

/// Whether the filter must read this request's body before deciding it.
pub fn inspects(policy: &Policy, path: &str) -> bool {
    policy.tokens.as_ref().is_some_and(|t| t.inspects(path))
}

/// Whether a body of `len` bytes so far may still be buffered.
pub fn within_limit(policy: &Policy, len: usize) -> bool {
    policy
        .tokens
        .as_ref()
        .is_none_or(|t| len <= t.inspect_bytes as usize)
}

/// From an AI request's plan (made from its headers) and its whole body to the plan to
/// decide: the body's `model` names the model (it is what the provider serves; the model
/// header only when the body has none), its `max_tokens` the reservation. The model
/// buckets are those of that model, and the token buckets are attached
/// ([`Plan::tokens`]). Returns the plan, what was read, and the model header to set when
/// the body's model differs from the header's (so routing sees the same model).
pub fn admit(
    policy: &Policy,
    mut plan: Plan,
    header_model: Option<&str>,
    body: &[u8],
) -> Result<(Plan, Inspected, Option<String>), AdmitError> {
    if !within_limit(policy, body.len()) {
        let limit = policy.tokens.as_ref().map_or(0, |t| t.inspect_bytes);
        return Err(AdmitError::TooLarge { limit });
    }
    let req = parse_request(body).map_err(AdmitError::Body)?;
    // The model is declared by the caller, in the body or the header: the same rule as for
    // any declared model decides what it is charged to (`crate::declared`).
    let declared = req.model.as_deref().or(header_model);
    let resolved = crate::declared::resolve(
        policy,
        Dimension::Model,
        &plan.principal,
        plan.family.as_deref(),
        declared,
    )
    .map_err(AdmitError::Declared)?;
    if resolved.value != plan.model.as_deref() {
        plan.buckets.retain(|b| !b.kind.is_model());
        if let Some(def) = resolved
            .value
            .and_then(|m| policy.models.as_ref()?.list.get(m))
        {
            plan.buckets.extend(model_buckets(
                policy.service.domain.as_str(),
                def,
                &plan.tenant,
            ));
        }
    }
    plan.model = resolved.value.map(str::to_string);
    plan.defaulted.retain(|d| *d != Dimension::Model);
    if resolved.defaulted {
        plan.defaulted.push(Dimension::Model);
    }
    let mut set_header = None;
    if let (Some(m), true) = (&req.model, req.model.as_deref() != header_model) {
        if policy.models.is_some() {
            set_header = Some(m.clone());
        }
    }
    let model = plan.model.clone();
    let purpose = plan.purpose.clone();
    plan.tokens = token_plan(
        policy,
        &plan,
        model.as_deref(),
        purpose.as_deref(),
        req.max_tokens,
    )
    .map_err(AdmitError::Tokens)?;
    let inspected = Inspected {
        model,
        max_tokens: req.max_tokens,
        stream: req.stream,
        purpose,
    };
    Ok((plan, inspected, set_header))
}

/// The `cheaper_model` fallback: `tripped` (a bucket of the request's model) has no room
/// and the policy names a cheaper model. Returns that model and the request re-planned for
/// it (its model buckets, request and token, and a reservation re-estimated if it came
/// from the old model's default); `None` when the fallback does not apply.
pub fn downgrade(
    policy: &Policy,
    plan: &Plan,
    inspected: &Inspected,
    tripped: &Bucket,
) -> Option<(String, Plan)> {
    if !tripped.kind.is_model() {
        return None;
    }
    let from = inspected.model.as_deref()?;
    if tripped.label != from {
        return None;
    }
    let to = cheaper(policy, from)?.to_string();
    let (mut next, tokens) = with_model(
        policy,
        plan,
        plan.tokens.as_ref(),
        &to,
        inspected.purpose.as_deref(),
        inspected.max_tokens,
    )?;
    next.tokens = tokens;
    Some((to, next))
}

/// Reads the usage of an AI response as it passes (never holding it up): from the usage
/// header, the final SSE chunk, or the JSON body (a copy of at most `inspect_bytes`).
#[derive(Debug, Clone)]
pub enum ResponseReader {
    /// The usage header was present.
    Header(Usage),
    Sse(SseScanner),
    Json {
        copy: Vec<u8>,
        limit: usize,
        too_large: bool,
    },
}

impl ResponseReader {
    /// `content_type` and `usage_header` (the value of `tokens.usage_header`, if the policy
    /// names one and the response carries it) from the response headers.
    pub fn new(
        tokens: &Tokens,
        content_type: Option<&str>,
        usage_header: Option<&str>,
    ) -> ResponseReader {
        let limit = tokens.inspect_bytes as usize;
        if let Some(v) = usage_header {
            return ResponseReader::Header(usage_from_header(v));
        }
        let sse = content_type.is_some_and(|c| {
            c.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
        });
        if sse {
            ResponseReader::Sse(SseScanner::new(limit))
        } else {
            ResponseReader::Json {
                copy: Vec::new(),
                limit,
                too_large: false,
            }
        }
    }

    /// Whether the body must be read at all.
    pub fn wants_body(&self) -> bool {
        !matches!(self, ResponseReader::Header(_))
    }

    /// The next bytes of the response body.
    pub fn feed(&mut self, chunk: &[u8]) {
        match self {
            ResponseReader::Header(_) => {}
            ResponseReader::Sse(s) => s.feed(chunk),
            ResponseReader::Json {
                copy,
                limit,
                too_large,
            } => {
                if *too_large {
                    return;
                }
                if copy.len() + chunk.len() > *limit {
                    *too_large = true;
                    *copy = Vec::new();
                } else {
                    copy.extend_from_slice(chunk);
                }
            }
        }
    }

    /// The response ended: how to settle a reservation of `reserve`.
    pub fn finish(&mut self, reserve: u32) -> Settle {
        match self {
            ResponseReader::Header(u) => settle(reserve, *u),
            ResponseReader::Sse(s) => settle(reserve, s.finish()),
            ResponseReader::Json {
                too_large: true, ..
            } => Settle::AtReservation(NoUsage::TooLarge),
            ResponseReader::Json { copy, .. } => settle(reserve, usage_from_json(copy)),
        }
    }
}

#[cfg(test)]
mod tests;
