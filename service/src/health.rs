//! gRPC health (`grpc.health.v1.Health`) follows the store: `SERVING` while the store answers
//! a probe, `NOT_SERVING` while it does not (Redis down, paused past `--redis-timeout-ms`, a
//! cluster primary lost until a replica takes over), and `SERVING` again once it answers.
//! An Envoy health check on the rate-limit cluster (`grpc_health_check`) can then route
//! around a replica whose store is broken, instead of sending it requests that can only be
//! answered `UNAVAILABLE`.
//!
//! The store is probed every [`PROBE_EVERY`]; a probe is one bounded store call (a Redis
//! `PING`, bounded by `--redis-timeout-ms`), so a status is at most one interval plus one
//! timeout old. The memory store always answers. Both names the server reports are set: the
//! server as a whole (`""`) and `envoy.service.ratelimit.v3.RateLimitService`.

use std::sync::Arc;
use std::time::Duration;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::store::Store;

/// How often the store is probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);

/// The names whose status follows the store.
pub const NAMES: [&str; 2] = ["", "envoy.service.ratelimit.v3.RateLimitService"];

/// Probe `store` every `every` and set every name in [`NAMES`] from the result, logging each
/// change. Runs until the runtime stops.
pub async fn follow_store(reporter: HealthReporter, store: Arc<dyn Store>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving = true;
    loop {
        tick.tick().await;
        let probe = store.probe().await;
        let now = probe.is_ok();
        if now == serving {
            continue;
        }
        match &probe {
            Ok(()) => log::info!("{} answers again: health SERVING", store.name()),
            Err(e) => log::warn!("{} does not answer ({e}): health NOT_SERVING", store.name()),
        }
        let status = if now {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in NAMES {
            reporter.set_service_status(name, status).await;
        }
        serving = now;
    }
}
