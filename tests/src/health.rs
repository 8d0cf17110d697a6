//! One `grpc.health.v1.Health/Check` call, blocking, bounded by short timeouts: what an Envoy
//! health check on the rate-limit cluster would see.

use crate::{Context, Result};
use std::net::SocketAddr;
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The service name the rate-limit cluster is health-checked with.
pub const RLS: &str = "envoy.service.ratelimit.v3.RateLimitService";

/// `SERVING`, `NOT_SERVING`, ... for `service` at `addr`, or an error if it cannot be asked.
pub fn check(addr: SocketAddr, service: &str) -> Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context(|| "a runtime for the health check".to_string())?;
    rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .context(|| format!("health check address {addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .context(|| format!("connecting to {addr} for a health check"))?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .context(|| format!("Health/Check {service:?} at {addr}"))?
            .into_inner();
        let status = ServingStatus::try_from(reply.status)
            .map(|s| s.as_str_name().to_string())
            .unwrap_or_else(|_| format!("status {}", reply.status));
        Ok(status)
    })
}
