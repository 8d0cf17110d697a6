//! RLQS: `envoy.service.rate_limit_quota.v3.RateLimitQuotaService/StreamRateLimitQuotas`,
//! the server side of Envoy's native `envoy.filters.http.rate_limit_quota` filter.
//!
//! A thin shell around `laneguard_core::quota::QuotaBook`, which decides everything: each
//! Envoy opens one stream; every usage report goes into the book with `now_ns`, and the
//! actions it returns go out as `BucketAction`s, to this stream or (when another Envoy's
//! share shrank) to another one. Operator docs: `docs/rlqs.md`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use laneguard_core::quota::{Action, BucketId, QuotaBook, QuotaSettings, StreamId, Usage};
use laneguard_core::Policy;
use laneguard_protos::envoy::r#type::v3::{
    rate_limit_strategy::{BlanketRule, Strategy},
    RateLimitStrategy, TokenBucket,
};
use laneguard_protos::envoy::service::rate_limit_quota::v3::{
    rate_limit_quota_response::{
        bucket_action::{self, AbandonAction, QuotaAssignmentAction},
        BucketAction,
    },
    rate_limit_quota_service_server::{RateLimitQuotaService, RateLimitQuotaServiceServer},
    BucketId as ProtoBucketId, RateLimitQuotaResponse, RateLimitQuotaUsageReports,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::clock::Clock;

/// Responses queued per stream before the service drops one (the next report, at most 5 s
/// later, sends every bucket's action again).
const STREAM_QUEUE: usize = 64;

type Outbox = mpsc::Sender<Result<RateLimitQuotaResponse, Status>>;

/// The RLQS service. Cheap to clone; all clones share one book.
#[derive(Clone)]
pub struct QuotaService {
    hub: Arc<Hub>,
}

struct Hub {
    policy: Arc<Policy>,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    next_stream: AtomicU64,
}

struct State {
    book: QuotaBook,
    streams: HashMap<StreamId, Outbox>,
}

impl QuotaService {
    pub fn new(
        policy: Arc<Policy>,
        clock: Arc<dyn Clock>,
        settings: QuotaSettings,
    ) -> QuotaService {
        QuotaService {
            hub: Arc::new(Hub {
                policy,
                clock,
                state: Mutex::new(State {
                    book: QuotaBook::new(settings),
                    streams: HashMap::new(),
                }),
                next_stream: AtomicU64::new(1),
            }),
        }
    }

    pub fn server(self) -> RateLimitQuotaServiceServer<QuotaService> {
        RateLimitQuotaServiceServer::new(self)
    }
}

impl Hub {
    fn open(&self, outbox: Outbox) -> StreamId {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut state) = self.state.lock() {
            state.streams.insert(id, outbox);
        }
        log::info!("rlqs stream {id}: opened");
        id
    }

    fn close(&self, id: StreamId) {
        if let Ok(mut state) = self.state.lock() {
            state.streams.remove(&id);
            state.book.close(id);
        }
        log::info!("rlqs stream {id}: closed");
    }

    fn report(&self, id: StreamId, reports: RateLimitQuotaUsageReports) {
        let now_ns = self.clock.now_ns();
        let usages: Vec<Usage> = reports
            .bucket_quota_usages
            .into_iter()
            .map(|u| Usage {
                bucket_id: u
                    .bucket_id
                    .map(|b| b.bucket.into_iter().collect())
                    .unwrap_or_default(),
                allowed: u.num_requests_allowed,
                denied: u.num_requests_denied,
                elapsed_s: u
                    .time_elapsed
                    .map(|d| u64::try_from(d.seconds).unwrap_or(0))
                    .unwrap_or(0),
            })
            .collect();
        for u in &usages {
            log::info!(
                "rlqs report: stream={id} bucket={} allowed={} denied={} elapsed_s={}",
                describe(&u.bucket_id),
                u.allowed,
                u.denied,
                u.elapsed_s
            );
        }
        let Ok(mut state) = self.state.lock() else {
            log::error!("rlqs: the quota book's lock is poisoned; report dropped");
            return;
        };
        let out = state.book.report(&self.policy, id, &usages, now_ns);
        let mut per_stream: HashMap<StreamId, Vec<BucketAction>> = HashMap::new();
        for (stream, bucket, action) in out {
            match &action {
                Action::DenyAll { reason, .. } => log::info!(
                    "rlqs: stream={stream} bucket={}: DENY_ALL ({reason})",
                    describe(&bucket)
                ),
                Action::Abandon => log::info!(
                    "rlqs: stream={stream} bucket={}: abandoned (idle)",
                    describe(&bucket)
                ),
                Action::Assign { bucket: tb, .. } => log::debug!(
                    "rlqs: stream={stream} bucket={}: {} tokens per {} s, max {}",
                    describe(&bucket),
                    tb.tokens_per_fill,
                    tb.fill_interval_s,
                    tb.max_tokens
                ),
            }
            per_stream
                .entry(stream)
                .or_default()
                .push(bucket_action(bucket, action));
        }
        for (stream, actions) in per_stream {
            let Some(outbox) = state.streams.get(&stream) else {
                continue;
            };
            let response = RateLimitQuotaResponse {
                bucket_action: actions,
            };
            if let Err(e) = outbox.try_send(Ok(response)) {
                log::warn!(
                    "rlqs stream {stream}: response dropped ({e}); the next report resends it"
                );
            }
        }
    }
}

fn describe(bucket: &BucketId) -> String {
    bucket
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn seconds(s: u32) -> Option<laneguard_protos::prost_types::Duration> {
    Some(laneguard_protos::prost_types::Duration {
        seconds: i64::from(s),
        nanos: 0,
    })
}

/// The wire form of one action.
fn bucket_action(bucket: BucketId, action: Action) -> BucketAction {
    let assignment = |ttl_s: u32, strategy: Strategy| {
        bucket_action::BucketAction::QuotaAssignmentAction(QuotaAssignmentAction {
            assignment_time_to_live: seconds(ttl_s),
            rate_limit_strategy: Some(RateLimitStrategy {
                strategy: Some(strategy),
            }),
        })
    };
    let action = match action {
        Action::Assign { bucket, ttl_s } => assignment(
            ttl_s,
            Strategy::TokenBucket(TokenBucket {
                max_tokens: bucket.max_tokens,
                tokens_per_fill: Some(bucket.tokens_per_fill),
                fill_interval: seconds(bucket.fill_interval_s),
            }),
        ),
        Action::DenyAll { ttl_s, .. } => {
            assignment(ttl_s, Strategy::BlanketRule(BlanketRule::DenyAll as i32))
        }
        Action::Abandon => bucket_action::BucketAction::AbandonAction(AbandonAction {}),
    };
    BucketAction {
        bucket_id: Some(ProtoBucketId {
            bucket: bucket.into_iter().collect(),
        }),
        bucket_action: Some(action),
    }
}

#[tonic::async_trait]
impl RateLimitQuotaService for QuotaService {
    type StreamRateLimitQuotasStream = ReceiverStream<Result<RateLimitQuotaResponse, Status>>;

    async fn stream_rate_limit_quotas(
        &self,
        request: Request<Streaming<RateLimitQuotaUsageReports>>,
    ) -> Result<Response<Self::StreamRateLimitQuotasStream>, Status> {
        let mut inbound = request.into_inner();
        let (outbox, responses) = mpsc::channel(STREAM_QUEUE);
        let hub = Arc::clone(&self.hub);
        let id = hub.open(outbox);
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(reports)) => hub.report(id, reports),
                    Ok(None) => break,
                    Err(status) => {
                        log::info!("rlqs stream {id}: {status}");
                        break;
                    }
                }
            }
            hub.close(id);
        });
        Ok(Response::new(ReceiverStream::new(responses)))
    }
}
