//! The `ShouldRateLimit` handler: plan the request's buckets, read the clock once, let the
//! store decide all-or-nothing, and translate the outcome into a `RateLimitResponse`.

use std::sync::Arc;

use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, Quota, RateLimit,
};
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use laneguard_protos::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use laneguard_protos::prost_types::Duration;
use tonic::{Request, Response, Status};

use crate::clock::Clock;
use crate::config::Config;
use crate::limits::{self, RequestError};
use crate::store::{BucketStatus, Charge, Store, StoreError};
use crate::unit::Unit;

/// Whether the service hands out leases in `DescriptorStatus.quota`.
///
/// This is the seam for leases (a later issue): a grant policy will size a `Quota` from the
/// bucket's state after the charge and reserve it in the store. Today the only policy is
/// `Off`, and `quota` is always empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Grants {
    #[default]
    Off,
}

/// Service behaviour that is not part of the store or the rules.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Options {
    pub grants: Grants,
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid request: {0}")]
    Request(#[from] RequestError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        match &e {
            ServiceError::Request(_) => Status::invalid_argument(e.to_string()),
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

    /// Answer one request (the transport-free core of `ShouldRateLimit`).
    pub async fn evaluate(
        &self,
        request: &RateLimitRequest,
    ) -> Result<RateLimitResponse, ServiceError> {
        let plan = limits::plan(request, self.rules.as_deref())?;
        let charges: Vec<Charge> = plan.iter().flatten().cloned().collect();
        if charges.is_empty() {
            // Empty or wholly unlimited: OK without touching the store.
            return Ok(RateLimitResponse {
                overall_code: Code::Ok as i32,
                statuses: plan.iter().map(|_| unlimited_status()).collect(),
                ..Default::default()
            });
        }

        let now_ns = self.clock.now_ns();
        let outcome = self.store.check_and_charge(&charges, now_ns).await?;

        let mut buckets = outcome.buckets.iter();
        let mut statuses = Vec::with_capacity(plan.len());
        for planned in &plan {
            let status = match planned {
                None => unlimited_status(),
                Some(charge) => match buckets.next() {
                    Some(bucket) => self.status(charge, bucket),
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
        let overall = if outcome.admitted {
            Code::Ok
        } else {
            Code::OverLimit
        };
        log::debug!(
            "domain={} descriptors={} buckets={} overall={:?}",
            request.domain,
            plan.len(),
            charges.len(),
            overall
        );
        Ok(RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            ..Default::default()
        })
    }

    fn status(&self, charge: &Charge, bucket: &BucketStatus) -> DescriptorStatus {
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
            quota: self.grant(charge, bucket),
        }
    }

    /// The lease seam: what to grant for this bucket. Always nothing while `Grants::Off`.
    fn grant(&self, _charge: &Charge, _bucket: &BucketStatus) -> Option<Quota> {
        match self.options.grants {
            Grants::Off => None,
        }
    }
}

fn unlimited_status() -> DescriptorStatus {
    DescriptorStatus {
        code: Code::Ok as i32,
        ..Default::default()
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
        let request = request.into_inner();
        match self.evaluate(&request).await {
            Ok(response) => Ok(Response::new(response)),
            Err(e) => {
                match &e {
                    ServiceError::Request(_) => log::debug!("domain={}: {e}", request.domain),
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
    use laneguard_protos::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
        Entry, RateLimitOverride,
    };
    use laneguard_protos::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use laneguard_protos::envoy::r#type::v3::RateLimitUnit;
    use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::rate_limit;

    const S: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * S;

    fn descriptor(
        entries: &[(&str, &str)],
        limit: Option<(u32, RateLimitUnit)>,
    ) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| Entry {
                    key: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            limit: limit.map(|(n, u)| RateLimitOverride {
                requests_per_unit: n,
                unit: u as i32,
            }),
            hits_addend: None,
        }
    }

    fn limiter(clock: Arc<ManualClock>) -> RateLimiter {
        RateLimiter::new(
            Arc::new(MemoryStore::new()),
            None,
            clock,
            Options::default(),
        )
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
        fn check_and_charge<'a>(&'a self, _: &'a [Charge], _: u64) -> StoreFuture<'a, Outcome> {
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
}
