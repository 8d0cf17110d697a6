//! The `ShouldRateLimit` handler: plan the request's buckets, read the clock once, let the
//! store decide all-or-nothing (and size a lease when the caller asked for one), and
//! translate the outcome into a `RateLimitResponse`.
//!
//! Leases ride on the standard protocol. A caller that wants one sends the gRPC request
//! metadata [`LEASE_METADATA`] (`x-laneguard-lease: N`, the cost units it would like to admit
//! locally per bucket). The grant is pre-paid: the store charges it to every bucket in the
//! same atomic step as the request, so what the fleet admits never exceeds the limit, and
//! the response carries it in every limited descriptor's `DescriptorStatus.quota`
//! (`requests` = units granted, `valid_until` = now + the lease TTL). Plain RLS clients send
//! no metadata and get no quota.
//!
//! Reports ride on it too: [`REPORT_METADATA`] (`x-laneguard-report: 1`) marks a request whose
//! descriptors carry hits already admitted without the service (the filter's degraded mode,
//! sent on its sync tick). The store charges them unconditionally and the answer is `OK`.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::{
    quota, Code, DescriptorStatus, Quota, RateLimit,
};
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use laneguard_protos::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use laneguard_protos::prost_types::{Duration, Timestamp};
use tonic::{Request, Response, Status};

use crate::clock::Clock;
use crate::config::Config;
use crate::limits::{self, RequestError};
use crate::metrics::{self, Metrics, StoreOp};
use crate::store::{BucketStatus, Charge, Store, StoreError};
use crate::unit::Unit;
use crate::usage::UsageBook;
use laneguard_core::usage;

/// The gRPC request metadata a caller sends to ask for a lease: the number of cost units it
/// would like to admit locally, per bucket. Absent (or 0) asks for none.
pub const LEASE_METADATA: &str = "x-laneguard-lease";

/// The gRPC request metadata that marks a report of hits already admitted (`1`): they are
/// charged unconditionally, even into debt, and never refused. `refund` marks the opposite:
/// capacity to give back (AI requests that used fewer tokens than they reserved).
pub const REPORT_METADATA: &str = "x-laneguard-report";

/// What a caller asks for beyond the descriptors, from the gRPC request metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// An all-or-nothing decision, and a lease of up to `lease` units per bucket (0: none).
    Decide { lease: u32 },
    /// A report of hits already admitted: charge them unconditionally.
    Report,
    /// A refund of capacity charged earlier and not used: give it back, never past full.
    Refund,
}

impl Default for Ask {
    fn default() -> Self {
        Ask::Decide { lease: 0 }
    }
}

impl Ask {
    /// Read [`LEASE_METADATA`] and [`REPORT_METADATA`]. A malformed value is an error, not a
    /// guess.
    pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Result<Ask, ServiceError> {
        let text = |name: &'static str| {
            metadata.get(name).map(|v| {
                v.to_str()
                    .map(|t| t.trim().to_string())
                    .map_err(|_| ServiceError::BadMetadata {
                        name,
                        value: crate::limits::quoted(&String::from_utf8_lossy(v.as_bytes())),
                    })
            })
        };
        let bad = |name: &'static str, value: String| ServiceError::BadMetadata {
            name,
            value: crate::limits::quoted(&value),
        };
        match text(REPORT_METADATA).transpose()?.as_deref() {
            None | Some("0") => {}
            Some("1") => return Ok(Ask::Report),
            Some("refund") => return Ok(Ask::Refund),
            Some(other) => return Err(bad(REPORT_METADATA, other.to_string())),
        }
        match text(LEASE_METADATA).transpose()? {
            None => Ok(Ask::default()),
            Some(v) => v
                .parse::<u32>()
                .map(|lease| Ask::Decide { lease })
                .map_err(|_| bad(LEASE_METADATA, v)),
        }
    }
}

/// The default lifetime of a lease (`--lease-ttl-ms`).
pub const DEFAULT_LEASE_TTL: StdDuration = StdDuration::from_millis(2000);

/// Whether the service hands out leases in `DescriptorStatus.quota`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Grants {
    /// Never grant: every answer is a plain per-call decision, as from envoyproxy/ratelimit.
    Off,
    /// Grant leases to callers that ask ([`LEASE_METADATA`]); each one is valid for
    /// `lease_ttl` from the request's `now`.
    On { lease_ttl: StdDuration },
}

impl Default for Grants {
    fn default() -> Self {
        Grants::On {
            lease_ttl: DEFAULT_LEASE_TTL,
        }
    }
}

/// Service behaviour that is not part of the store or the rules.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Options {
    pub grants: Grants,
    /// Where decisions, grants, reports and store calls are counted (`--metrics-addr`).
    pub metrics: Metrics,
    /// The usage ledger decisions and the filters' tallies are counted into
    /// (`crate::usage`); `None` keeps none.
    pub usage: Option<Arc<UsageBook>>,
}

impl Options {
    pub fn with_grants(grants: Grants) -> Options {
        Options {
            grants,
            ..Options::default()
        }
    }

    /// Count into `metrics` (a handle that shares its values with the one registered).
    pub fn with_metrics(mut self, metrics: Metrics) -> Options {
        self.metrics = metrics;
        self
    }

    /// Keep the usage ledger in `book`.
    pub fn with_usage(mut self, book: Arc<UsageBook>) -> Options {
        self.usage = Some(book);
        self
    }
}

/// What a caller says for the usage ledger, from the gRPC request metadata: the class of a
/// decision or renewal ([`usage::CLASS_METADATA`]) and a worker's tally
/// ([`usage::METADATA`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageMeta {
    pub class: Option<String>,
    pub tally: Vec<(usage::Key, usage::Counts)>,
}

/// The longest class name [`usage::CLASS_METADATA`] may carry.
pub const MAX_CLASS_BYTES: usize = 256;

impl UsageMeta {
    /// Read both. A malformed value is an error naming the metadata, not a guess.
    pub fn from_metadata(
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<UsageMeta, ServiceError> {
        let text = |name: &'static str| -> Result<Option<String>, ServiceError> {
            metadata
                .get(name)
                .map(|v| {
                    v.to_str()
                        .map(|t| t.trim().to_string())
                        .map_err(|_| ServiceError::BadUsage {
                            name,
                            reason: "not visible ASCII".into(),
                        })
                })
                .transpose()
        };
        let class = text(usage::CLASS_METADATA)?;
        if let Some(c) = &class {
            if c.is_empty() || c.len() > MAX_CLASS_BYTES {
                return Err(ServiceError::BadUsage {
                    name: usage::CLASS_METADATA,
                    reason: format!(
                        "a class name of 1 to {MAX_CLASS_BYTES} bytes, got {}",
                        c.len()
                    ),
                });
            }
        }
        let tally = match text(usage::METADATA)? {
            None => Vec::new(),
            Some(t) => usage::decode(&t).map_err(|e| ServiceError::BadUsage {
                name: usage::METADATA,
                reason: e.to_string(),
            })?,
        };
        Ok(UsageMeta { class, tally })
    }
}

/// The tenant a request is for: its descriptors' first `tenant` entry.
fn tenant_of(request: &RateLimitRequest) -> Option<&str> {
    request
        .descriptors
        .iter()
        .flat_map(|d| d.entries.iter())
        .find(|e| e.key == "tenant")
        .map(|e| e.value.as_str())
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid request: {0}")]
    Request(#[from] RequestError),
    #[error(
        "invalid request: metadata `{name}`: `{value}` is not valid (`{LEASE_METADATA}` takes \
         a non-negative 32-bit integer, `{REPORT_METADATA}` takes 0, 1 or refund)"
    )]
    BadMetadata { name: &'static str, value: String },
    #[error("invalid request: metadata `{name}`: {reason}")]
    BadUsage { name: &'static str, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ServiceError {
    /// The `outcome` label of the gRPC error this becomes.
    fn outcome(&self) -> metrics::Outcome {
        match self {
            ServiceError::Request(_)
            | ServiceError::BadMetadata { .. }
            | ServiceError::BadUsage { .. } => metrics::Outcome::InvalidArgument,
            ServiceError::Store(s) if s.is_transient() => metrics::Outcome::Unavailable,
            ServiceError::Store(_) => metrics::Outcome::Internal,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        match &e {
            ServiceError::Request(_)
            | ServiceError::BadMetadata { .. }
            | ServiceError::BadUsage { .. } => Status::invalid_argument(e.to_string()),
            // UNAVAILABLE sends the caller down its configured failure mode.
            ServiceError::Store(s) if s.is_transient() => Status::unavailable(e.to_string()),
            ServiceError::Store(_) => Status::internal(e.to_string()),
        }
    }
}

/// The rate-limit service: a store, optional `--config` rules, a clock and options.
#[derive(Clone)]
pub struct RateLimiter {
    store: Arc<dyn Store>,
    rules: Option<Arc<Config>>,
    clock: Arc<dyn Clock>,
    options: Options,
}

impl RateLimiter {
    pub fn new(
        store: Arc<dyn Store>,
        rules: Option<Arc<Config>>,
        clock: Arc<dyn Clock>,
        options: Options,
    ) -> RateLimiter {
        RateLimiter {
            store,
            rules,
            clock,
            options,
        }
    }

    /// The store the decisions are made in (the health probe uses it).
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    /// Answer one request that asks for no lease.
    pub async fn evaluate(
        &self,
        request: &RateLimitRequest,
    ) -> Result<RateLimitResponse, ServiceError> {
        self.evaluate_with_lease(request, 0).await
    }

    /// Answer one request that asks for a lease of up to `lease` units ([`LEASE_METADATA`]);
    /// the ask is ignored while grants are off.
    pub async fn evaluate_with_lease(
        &self,
        request: &RateLimitRequest,
        lease: u32,
    ) -> Result<RateLimitResponse, ServiceError> {
        self.evaluate_ask(request, Ask::Decide { lease }).await
    }

    /// Answer one request (the transport-free core of `ShouldRateLimit`), and count it.
    pub async fn evaluate_ask(
        &self,
        request: &RateLimitRequest,
        ask: Ask,
    ) -> Result<RateLimitResponse, ServiceError> {
        self.evaluate_with_usage(request, ask, &UsageMeta::default())
            .await
    }

    /// [`RateLimiter::evaluate_ask`], counting into the usage ledger what `meta` says: an
    /// answered decision or renewal of a named class, and a worker's tally (only when the
    /// call is answered: a failed call's tally is sent again).
    pub async fn evaluate_with_usage(
        &self,
        request: &RateLimitRequest,
        ask: Ask,
        meta: &UsageMeta,
    ) -> Result<RateLimitResponse, ServiceError> {
        let result = self.answer(request, ask).await;
        if let (Some(book), Ok(a)) = (&self.options.usage, &result) {
            if let (Ask::Decide { .. }, Some(class), Some(tenant)) =
                (ask, &meta.class, tenant_of(request))
            {
                let admitted = a.response.overall_code == Code::Ok as i32;
                book.decided(tenant, class, admitted, a.charged > 0, a.grant, a.now_ns);
            }
            book.reported(&meta.tally);
        }
        let m = &self.options.metrics;
        let outcome = match &result {
            Ok(a) if a.response.overall_code == Code::OverLimit as i32 => {
                metrics::Outcome::OverLimit
            }
            Ok(_) => metrics::Outcome::Ok,
            Err(e) => e.outcome(),
        };
        match ask {
            Ask::Decide { .. } => {
                let granted = result.as_ref().map_or(0, |a| a.grant);
                m.decision(outcome, granted);
            }
            Ask::Report | Ask::Refund => {
                let op = if ask == Ask::Report {
                    StoreOp::Report
                } else {
                    StoreOp::Refund
                };
                let units = result.as_ref().map_or(0, |a| a.charged);
                m.report(op, outcome, units);
            }
        }
        result.map(|a| a.response)
    }

    async fn answer(&self, request: &RateLimitRequest, ask: Ask) -> Result<Answer, ServiceError> {
        let plan = limits::plan(request, self.rules.as_deref())?;
        if ask != Ask::Report {
            if let Some(index) = plan
                .iter()
                .position(|c| c.as_ref().is_some_and(|c| c.age_ns > 0))
            {
                return Err(limits::RequestError::AgeOutsideReport { index }.into());
            }
        }
        let charges: Vec<Charge> = plan.iter().flatten().cloned().collect();
        if charges.is_empty() {
            // Empty or wholly unlimited: OK without touching the store.
            let response = RateLimitResponse {
                overall_code: Code::Ok as i32,
                statuses: plan.iter().map(|_| unlimited_status()).collect(),
                ..Default::default()
            };
            return Ok(Answer {
                response,
                grant: 0,
                charged: 0,
                now_ns: self.clock.now_ns(),
            });
        }

        let (lease, lease_ttl) = match (ask, self.options.grants) {
            (Ask::Decide { lease }, Grants::On { lease_ttl }) if lease > 0 => (lease, lease_ttl),
            _ => (0, StdDuration::ZERO),
        };
        let now_ns = self.clock.now_ns();
        let started = std::time::Instant::now();
        let (op, result) = match ask {
            Ask::Decide { .. } => (
                StoreOp::Decide,
                self.store.check_and_charge(&charges, lease, now_ns).await,
            ),
            Ask::Report => (StoreOp::Report, self.store.report(&charges, now_ns).await),
            Ask::Refund => (StoreOp::Refund, self.store.refund(&charges, now_ns).await),
        };
        self.options
            .metrics
            .store_call(op, started.elapsed(), result.as_ref().err());
        let outcome = result?;
        let quota = (outcome.admitted && outcome.grant > 0).then(|| Quota {
            requests: outcome.grant,
            id: String::new(),
            expiration_specifier: Some(quota::ExpirationSpecifier::ValidUntil(timestamp(
                now_ns.saturating_add(u64::try_from(lease_ttl.as_nanos()).unwrap_or(u64::MAX)),
            ))),
        });

        let mut buckets = outcome.buckets.iter();
        let mut statuses = Vec::with_capacity(plan.len());
        let mut holds = Vec::with_capacity(plan.len());
        for planned in &plan {
            let status = match planned {
                None => {
                    holds.push(0);
                    unlimited_status()
                }
                Some(charge) => match buckets.next() {
                    Some(bucket) => {
                        holds.push(bucket.hold_ns);
                        bucket_status(charge, bucket, quota.clone())
                    }
                    None => {
                        return Err(StoreError::Corrupt {
                            key: charge.key.clone(),
                            reason: "store answered fewer buckets than it was given".into(),
                        }
                        .into())
                    }
                },
            };
            statuses.push(status);
        }
        // A report is never refused (its statuses still say which buckets are now full).
        let overall = if outcome.admitted || matches!(ask, Ask::Report | Ask::Refund) {
            Code::Ok
        } else {
            Code::OverLimit
        };
        log::debug!(
            "domain={} {ask:?} descriptors={} buckets={} overall={:?} lease_asked={} granted={}",
            request.domain,
            plan.len(),
            charges.len(),
            overall,
            lease,
            outcome.grant
        );
        if holds.iter().any(|&h| h > 0) {
            self.options.metrics.slot();
        }
        let response = RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            // The slots of coordinated holds (laneguard_protos::slots); only a lease ask
            // that left a bucket saturated gets one.
            dynamic_metadata: laneguard_protos::slots::encode(&holds),
            ..Default::default()
        };
        Ok(Answer {
            response,
            grant: outcome.grant,
            charged: charges.iter().map(|c| u64::from(c.cost)).sum(),
            now_ns,
        })
    }
}

/// What [`RateLimiter::answer`] did, for the metrics.
struct Answer {
    response: RateLimitResponse,
    /// Lease units granted.
    grant: u32,
    /// Cost units over the request's buckets (charged, reported or refunded); 0 for a
    /// renewal, which asks for a lease and charges no request.
    charged: u64,
    /// The `now` the request was decided at (its ledger hour).
    now_ns: u64,
}

fn bucket_status(charge: &Charge, bucket: &BucketStatus, quota: Option<Quota>) -> DescriptorStatus {
    let code = if bucket.has_room {
        Code::Ok
    } else {
        Code::OverLimit
    };
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(RateLimit {
            name: String::new(),
            requests_per_unit: charge.rate.requests.get(),
            unit: Unit::from_window(charge.rate.window).to_response() as i32,
        }),
        limit_remaining: bucket.remaining,
        duration_until_reset: Some(duration(bucket.reset_ns)),
        quota,
    }
}

fn unlimited_status() -> DescriptorStatus {
    DescriptorStatus {
        code: Code::Ok as i32,
        ..Default::default()
    }
}

fn timestamp(ns: u64) -> Timestamp {
    const NS: u64 = 1_000_000_000;
    Timestamp {
        seconds: i64::try_from(ns / NS).unwrap_or(i64::MAX),
        nanos: i32::try_from(ns % NS).unwrap_or(0),
    }
}

fn duration(ns: u64) -> Duration {
    const NS: u64 = 1_000_000_000;
    Duration {
        seconds: i64::try_from(ns / NS).unwrap_or(i64::MAX),
        // Always below 1e9, so it fits.
        nanos: i32::try_from(ns % NS).unwrap_or(0),
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimiter {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let ask = Ask::from_metadata(request.metadata());
        let meta = UsageMeta::from_metadata(request.metadata());
        let request = request.into_inner();
        let result = match (ask, meta) {
            (Ok(ask), Ok(meta)) => self.evaluate_with_usage(&request, ask, &meta).await,
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        match result {
            Ok(response) => Ok(Response::new(response)),
            Err(e) => {
                match &e {
                    ServiceError::Request(_)
                    | ServiceError::BadMetadata { .. }
                    | ServiceError::BadUsage { .. } => {
                        log::debug!("domain={}: {e}", request.domain)
                    }
                    ServiceError::Store(_) => log::warn!("domain={}: {e}", request.domain),
                }
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::{MemoryStore, Outcome, StoreFuture};
    use laneguard_protos::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use laneguard_protos::envoy::r#type::v3::RateLimitUnit;
    use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::rate_limit;

    const S: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * S;

    fn descriptor(
        entries: &[(&str, &str)],
        limit: Option<(u32, RateLimitUnit)>,
    ) -> RateLimitDescriptor {
        RateLimitDescriptor::with_entries(entries, limit)
    }

    fn limiter(clock: Arc<ManualClock>) -> RateLimiter {
        RateLimiter::new(
            Arc::new(MemoryStore::new()),
            None,
            clock,
            Options::default(),
        )
    }

    /// Coordinated holds on the wire (`laneguard_protos::slots`): a lease ask that leaves a
    /// bucket saturated gets its slot in `dynamic_metadata`, one number per status; the
    /// next asker is one gap behind; a plain check carries none.
    #[tokio::test]
    async fn a_saturating_lease_ask_carries_its_slot_in_the_metadata() {
        use laneguard_protos::slots;
        let clock = Arc::new(ManualClock::new(T0));
        let svc = limiter(clock.clone());
        let req = RateLimitRequest {
            domain: "laneguard".into(),
            descriptors: vec![
                descriptor(&[("unlimited", "x")], None),
                descriptor(
                    &[("tenant", "t"), ("bucket", "shared"), ("lg.burst", "100")],
                    Some((1000, RateLimitUnit::Second)),
                ),
            ],
            hits_addend: 0,
        };
        let gap = 43_750_000;
        let r = svc.evaluate_with_lease(&req, 1000).await.unwrap();
        assert_eq!(r.statuses[1].quota.as_ref().map(|q| q.requests), Some(50));
        assert_eq!(slots::decode(r.dynamic_metadata.as_ref(), 2), vec![0, gap]);
        clock.advance(std::time::Duration::from_millis(1));
        let r = svc.evaluate_with_lease(&req, 1000).await.unwrap();
        assert_eq!(
            slots::decode(r.dynamic_metadata.as_ref(), 2),
            vec![0, 2 * gap - 1_000_000]
        );
        let r = svc.evaluate(&req).await.unwrap();
        assert_eq!(r.dynamic_metadata, None, "no lease asked, no slot");
    }

    #[tokio::test]
    async fn statuses_follow_the_descriptors() {
        let clock = Arc::new(ManualClock::new(T0));
        let svc = limiter(clock.clone());
        let req = RateLimitRequest {
            domain: "laneguard".into(),
            descriptors: vec![
                descriptor(
                    &[("tenant", "t"), ("bucket", "shared"), ("lg.burst", "2")],
                    Some((60, RateLimitUnit::Minute)),
                ),
                descriptor(&[("unlimited", "x")], None),
                descriptor(
                    &[("tenant", "t"), ("bucket", "user"), ("user", "u")],
                    Some((1, RateLimitUnit::Second)),
                ),
            ],
            hits_addend: 0,
        };
        let r = svc.evaluate(&req).await.unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses.len(), 3);
        let s0 = &r.statuses[0];
        assert_eq!(s0.code, Code::Ok as i32);
        assert_eq!(
            s0.current_limit,
            Some(RateLimit {
                name: String::new(),
                requests_per_unit: 60,
                unit: rate_limit::Unit::Minute as i32
            })
        );
        assert_eq!(s0.limit_remaining, 1);
        assert_eq!(
            s0.duration_until_reset,
            Some(Duration {
                seconds: 1,
                nanos: 0
            })
        );
        assert_eq!(s0.quota, None);
        assert_eq!(r.statuses[1], unlimited_status());
        assert_eq!(r.statuses[2].limit_remaining, 0);

        // The user bucket is spent: OVER_LIMIT names it, and the shared bucket is not charged.
        let r = svc.evaluate(&req).await.unwrap();
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        assert_eq!(r.statuses[0].code, Code::Ok as i32);
        assert_eq!(r.statuses[0].limit_remaining, 1);
        assert_eq!(r.statuses[2].code, Code::OverLimit as i32);

        clock.advance(std::time::Duration::from_secs(1));
        let r = svc.evaluate(&req).await.unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32);
    }

    #[tokio::test]
    async fn empty_and_unlimited_requests_are_ok() {
        let svc = limiter(Arc::new(ManualClock::new(T0)));
        let empty = RateLimitRequest {
            domain: "d".into(),
            ..Default::default()
        };
        let r = svc.evaluate(&empty).await.unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert!(r.statuses.is_empty());
    }

    struct DownStore;
    impl Store for DownStore {
        fn name(&self) -> &'static str {
            "down"
        }
        fn check_and_charge<'a>(
            &'a self,
            _: &'a [Charge],
            _: u32,
            _: u64,
        ) -> StoreFuture<'a, Outcome> {
            Box::pin(async { Err(StoreError::Unavailable("connection refused".into())) })
        }
        fn report<'a>(&'a self, _: &'a [Charge], _: u64) -> StoreFuture<'a, Outcome> {
            Box::pin(async { Err(StoreError::Unavailable("connection refused".into())) })
        }
    }

    #[tokio::test]
    async fn errors_map_to_grpc_codes() {
        let svc = RateLimiter::new(
            Arc::new(DownStore),
            None,
            Arc::new(ManualClock::new(T0)),
            Options::default(),
        );
        let req = RateLimitRequest {
            domain: "d".into(),
            descriptors: vec![descriptor(&[("k", "v")], Some((1, RateLimitUnit::Second)))],
            hits_addend: 1,
        };
        let status: Status = svc.evaluate(&req).await.unwrap_err().into();
        assert_eq!(status.code(), tonic::Code::Unavailable);

        // An unlimited request never reaches the (broken) store.
        let unlimited = RateLimitRequest {
            domain: "d".into(),
            descriptors: vec![descriptor(&[("k", "v")], None)],
            hits_addend: 1,
        };
        assert!(svc.evaluate(&unlimited).await.is_ok());

        let bad = RateLimitRequest {
            domain: "d".into(),
            descriptors: vec![descriptor(&[("k", "v")], Some((0, RateLimitUnit::Second)))],
            hits_addend: 1,
        };
        let status: Status = svc.evaluate(&bad).await.unwrap_err().into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("descriptors[0]"),
            "{}",
            status.message()
        );

        let corrupt: Status = ServiceError::Store(StoreError::Corrupt {
            key: "k".into(),
            reason: "r".into(),
        })
        .into();
        assert_eq!(corrupt.code(), tonic::Code::Internal);
    }

    #[test]
    fn durations_split_seconds_and_nanos() {
        assert_eq!(
            duration(1_500_000_000),
            Duration {
                seconds: 1,
                nanos: 500_000_000
            }
        );
        assert_eq!(
            duration(0),
            Duration {
                seconds: 0,
                nanos: 0
            }
        );
    }

    #[test]
    fn metadata_asks_for_a_lease_or_a_report() {
        use tonic::metadata::MetadataMap;
        let with = |pairs: &[(&'static str, &str)]| {
            let mut m = MetadataMap::new();
            for (k, v) in pairs {
                m.insert(*k, v.parse().unwrap());
            }
            Ask::from_metadata(&m)
        };
        assert_eq!(with(&[]).unwrap(), Ask::Decide { lease: 0 });
        assert_eq!(
            with(&[(LEASE_METADATA, "12")]).unwrap(),
            Ask::Decide { lease: 12 }
        );
        assert_eq!(with(&[(REPORT_METADATA, "1")]).unwrap(), Ask::Report);
        assert_eq!(
            with(&[(REPORT_METADATA, "0"), (LEASE_METADATA, "3")]).unwrap(),
            Ask::Decide { lease: 3 }
        );
        for bad in [
            &[(LEASE_METADATA, "-1")][..],
            &[(LEASE_METADATA, "many")],
            &[(LEASE_METADATA, "4294967296")],
            &[(REPORT_METADATA, "yes")],
        ] {
            let e = with(bad).unwrap_err();
            assert_eq!(Status::from(e).code(), tonic::Code::InvalidArgument);
        }
    }

    #[tokio::test]
    async fn reports_are_charged_unconditionally_and_answered_ok() {
        let clock = Arc::new(ManualClock::new(T0));
        let svc = limiter(clock.clone());
        let bucket = |hits| {
            let mut d = descriptor(
                &[("tenant", "t"), ("bucket", "shared")],
                Some((10, RateLimitUnit::Second)),
            );
            d.hits_addend = Some(hits);
            d
        };
        let report = RateLimitRequest {
            domain: "laneguard".into(),
            descriptors: vec![bucket(12)],
            hits_addend: 0,
        };
        // 12 hits into a bucket of 10: accepted, and the bucket is now in debt.
        let r = svc.evaluate_ask(&report, Ask::Report).await.unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
        assert_eq!(r.statuses[0].limit_remaining, 0);
        assert_eq!(r.statuses[0].quota, None);
        // The debt holds decisions shut until it has drained below the burst: 300 ms.
        let ask = RateLimitRequest {
            domain: "laneguard".into(),
            descriptors: vec![bucket(1)],
            hits_addend: 1,
        };
        let r = svc.evaluate(&ask).await.unwrap();
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        clock.advance(std::time::Duration::from_millis(300));
        let r = svc.evaluate(&ask).await.unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32);
        // A report asks for no lease, even with grants on.
        let r = svc.evaluate_ask(&report, Ask::Report).await.unwrap();
        assert!(r.statuses.iter().all(|s| s.quota.is_none()));
    }

    #[tokio::test]
    async fn a_report_is_charged_as_of_its_age_and_only_a_report_has_one() {
        let clock = Arc::new(ManualClock::new(T0));
        let svc = limiter(clock.clone());
        // 10/s, burst 10. 40 hits admitted over the last 4 s (the ceiling's rate), on a
        // bucket taken as empty when they began: it is empty now, not closed for 4 s.
        let d = |hits, age: Option<&str>| {
            let mut entries = vec![("tenant", "t"), ("bucket", "shared")];
            if let Some(a) = age {
                entries.push(("lg.age_ms", a));
            }
            let mut d = descriptor(&entries, Some((10, RateLimitUnit::Second)));
            d.hits_addend = Some(hits);
            d
        };
        let request = |d| RateLimitRequest {
            domain: "laneguard".into(),
            descriptors: vec![d],
            hits_addend: 0,
        };
        let r = svc
            .evaluate_ask(&request(d(40, Some("4000"))), Ask::Report)
            .await
            .unwrap();
        assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
        assert_eq!(r.statuses[0].limit_remaining, 0);
        let reset = r.statuses[0]
            .duration_until_reset
            .as_ref()
            .map(|d| (d.seconds, d.nanos));
        assert_eq!(reset, Some((1, 0)), "empty, not 4 s in debt");
        // The same report as of now: 4 s of debt on a bucket that holds 1 s.
        let r = svc
            .evaluate_ask(&request(d(40, None)), Ask::Report)
            .await
            .unwrap();
        assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
        assert_eq!(r.statuses[0].limit_remaining, 0);
        // A decision or a refund is as of now: an age there is refused, and names its
        // descriptor.
        for ask in [Ask::Decide { lease: 0 }, Ask::Refund] {
            let e = svc
                .evaluate_ask(&request(d(1, Some("10"))), ask)
                .await
                .unwrap_err();
            let status = Status::from(e);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(
                status.message().contains("descriptors[0]")
                    && status.message().contains("lg.age_ms"),
                "{}",
                status.message()
            );
        }
    }

    #[tokio::test]
    async fn refunds_give_capacity_back_and_answer_ok() {
        let clock = Arc::new(ManualClock::new(T0));
        let svc = limiter(clock.clone());
        let bucket = |hits| {
            let mut d = descriptor(
                &[("tenant", "t"), ("bucket", "model_tokens"), ("model", "m")],
                Some((1000, RateLimitUnit::Minute)),
            );
            d.hits_addend = Some(hits);
            d
        };
        let ask = |hits| RateLimitRequest {
            domain: "laneguard".into(),
            descriptors: vec![bucket(hits)],
            hits_addend: 1,
        };
        // Reserve 800 of 1000, then 300 more does not fit.
        assert_eq!(
            svc.evaluate(&ask(800)).await.unwrap().overall_code,
            Code::Ok as i32
        );
        assert_eq!(
            svc.evaluate(&ask(300)).await.unwrap().overall_code,
            Code::OverLimit as i32
        );
        // It used 100: 700 come back, and the 300 fit.
        let r = svc.evaluate_ask(&ask(700), Ask::Refund).await.unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].limit_remaining, 900);
        assert_eq!(
            svc.evaluate(&ask(300)).await.unwrap().overall_code,
            Code::Ok as i32
        );
        // A refund never fills a bucket past full.
        let r = svc.evaluate_ask(&ask(5000), Ask::Refund).await.unwrap();
        assert_eq!(r.statuses[0].limit_remaining, 1000);
        let m = {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert(REPORT_METADATA, "refund".parse().unwrap());
            m
        };
        assert_eq!(Ask::from_metadata(&m).unwrap(), Ask::Refund);
    }
}
