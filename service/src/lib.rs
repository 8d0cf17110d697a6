//! # laneguard-service
//!
//! The authoritative rate-limit service. It speaks Envoy's standard RLS v3 protocol
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`), so both laneguard's wasm
//! filter and Envoy's native `envoy.filters.http.ratelimit` can call it, and serves
//! `grpc.health.v1.Health`.
//!
//! A request names one descriptor per bucket ([`limits`] maps descriptors to buckets with
//! `laneguard_core::key`); the [`store`] checks every bucket with `laneguard_core::gcra` and
//! charges all of them or none, at a `now` read once per request from an injectable
//! [`clock`], in memory or in Redis / Redis Cluster (one Lua script per hash slot). A caller
//! that asks for a lease (`x-laneguard-lease` metadata) gets a pre-paid grant charged in the
//! same atomic step. [`rls`] turns the outcome into per-descriptor statuses and quotas;
//! [`server`] puts it on a socket; [`metrics`] counts what happened for Prometheus. With a
//! policy (`--policy`), [`quota`] also serves RLQS, the protocol of Envoy's native
//! `rate_limit_quota` filter, over `laneguard_core::quota`. The binary (`src/main.rs`) is a thin shell: arguments ([`cli`]), rules
//! ([`config`]), logging, signals, the readiness line. Operator docs: `docs/service.md`.
//! The usage ledger that billing exports ([`usage`], `docs/usage.md`) is counted from the
//! decisions and from the filters' tallies, by the rules of `laneguard_core::usage`.

pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod health;
pub mod limits;
pub mod logger;
pub mod metrics;
pub mod quota;
pub mod report;
pub mod rls;
pub mod server;
pub mod store;
pub mod unit;
pub mod usage;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{Config, ConfigError};
pub use metrics::Metrics;
pub use rls::{Ask, Grants, Options, RateLimiter, ServiceError, LEASE_METADATA, REPORT_METADATA};
pub use store::{MemoryStore, RedisSettings, RedisStore, Store, StoreError};
