//! `fixed-window-rls`: a minimal Envoy RLS v3 server that this repository did not write the
//! limiting of. Counting is Kuadrant's `limitador` (crates.io), with its in-memory fixed-window
//! counters; this file only translates `ShouldRateLimit` to it, the way
//! envoyproxy/ratelimit behaves on the wire:
//!
//! - every descriptor is its own counter (keyed by its entries), limited by the descriptor's
//!   `limit` override (`requests_per_unit` per unit; a descriptor without one is unlimited);
//! - each descriptor is checked and charged on its own, so on a denial the descriptors that
//!   had room **are charged** (envoyproxy/ratelimit increments every matched counter);
//! - `duration_until_reset` is the time left in the counter's current window, whatever its
//!   level; `limit_remaining` is what is left in it;
//! - no leases, ever: no `DescriptorStatus.quota`, and the `x-laneguard-*` metadata is ignored.
//!
//! A request-level `hits_addend` of 0 counts as 1 (proto3 cannot tell unset from 0, and the
//! RLS proto says an unset value adds 1); a per-descriptor `hits_addend` wins.
//!
//! Used by `tests/tests/third_party_rls.rs`. `--listen ADDR`, prints `LANEGUARD_READY
//! addr=...` like the project's own binaries (docs/architecture.md).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use laneguard_protos::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use laneguard_protos::prost_types::Duration;
use limitador::limit::{Context, Limit};
use limitador::RateLimiter;
use tonic::{Request, Response, Status};

struct FixedWindow {
    limiter: RateLimiter,
    /// Namespaces whose limit was added already (a descriptor's entries name one counter).
    known: Mutex<std::collections::HashSet<String>>,
}

fn unit_seconds(unit: i32) -> Option<u64> {
    // envoy.type.v3.RateLimitUnit: SECOND 1, MINUTE 2, HOUR 3, DAY 4.
    match unit {
        1 => Some(1),
        2 => Some(60),
        3 => Some(3_600),
        4 => Some(86_400),
        _ => None,
    }
}

fn duration(d: StdDuration) -> Duration {
    Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

impl FixedWindow {
    fn check(&self, request: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        let request_hits = u64::from(request.hits_addend.max(1));
        let mut statuses = Vec::with_capacity(request.descriptors.len());
        let mut over = false;
        for d in &request.descriptors {
            let Some(limit) = &d.limit else {
                statuses.push(DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                });
                continue;
            };
            let seconds = unit_seconds(limit.unit)
                .ok_or_else(|| Status::invalid_argument(format!("unit {}", limit.unit)))?;
            let key: Vec<String> = d
                .entries
                .iter()
                .map(|e| format!("{}={}", e.key, e.value))
                .collect();
            let namespace = format!(
                "{}|{}|{}/{}s",
                request.domain,
                key.join(","),
                limit.requests_per_unit,
                seconds
            );
            {
                let mut known = self
                    .known
                    .lock()
                    .map_err(|_| Status::internal("poisoned"))?;
                if known.insert(namespace.clone()) {
                    let l = Limit::new(
                        namespace.as_str(),
                        u64::from(limit.requests_per_unit),
                        seconds,
                        Vec::<limitador::limit::Predicate>::new(),
                        Vec::<limitador::limit::Expression>::new(),
                    );
                    self.limiter.add_limit(l);
                }
            }
            let hits = d.hits_addend.unwrap_or(request_hits);
            let ns = namespace.as_str().into();
            let result = self
                .limiter
                .check_rate_limited_and_update(&ns, &Context::default(), hits)
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let counter = result.counters.first();
            let remaining = counter
                .and_then(|c| c.remaining())
                .unwrap_or(u64::from(limit.requests_per_unit));
            let reset = counter
                .and_then(|c| c.expires_in())
                .unwrap_or(StdDuration::from_secs(seconds));
            over |= result.limited;
            statuses.push(DescriptorStatus {
                code: if result.limited {
                    Code::OverLimit
                } else {
                    Code::Ok
                } as i32,
                current_limit: Some(RateLimit {
                    name: String::new(),
                    requests_per_unit: limit.requests_per_unit,
                    unit: limit.unit,
                }),
                limit_remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                duration_until_reset: Some(duration(reset)),
                quota: None,
            });
        }
        Ok(RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            ..Default::default()
        })
    }
}

#[derive(Clone)]
struct Server(Arc<FixedWindow>);

#[tonic::async_trait]
impl RateLimitService for Server {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.into_inner();
        let response = self.0.check(&request)?;
        eprintln!(
            "ShouldRateLimit domain={} descriptors={} hits_addend={} overall={}",
            request.domain,
            request.descriptors.len(),
            request.hits_addend,
            response.overall_code
        );
        Ok(Response::new(response))
    }
}

fn listen_arg() -> Result<SocketAddr, String> {
    let mut args = std::env::args().skip(1);
    let mut listen = "127.0.0.1:0".to_string();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs ADDR")?,
            other => return Err(format!("unknown argument {other:?} (usage: --listen ADDR)")),
        }
    }
    listen
        .parse()
        .map_err(|e| format!("--listen {listen}: {e}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), String> {
    let addr = listen_arg()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let server = Server(Arc::new(FixedWindow {
        limiter: RateLimiter::new(10_000),
        known: Mutex::new(Default::default()),
    }));
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "LANEGUARD_READY addr={bound}")
            .and_then(|()| out.flush())
            .map_err(|e| e.to_string())?;
    }
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(server))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
        .await
        .map_err(|e| e.to_string())
}
