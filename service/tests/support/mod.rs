//! Test support: private `redis-server` processes on ephemeral loopback ports, from the
//! shared setup in `tools/redis-harness` (the integration tests use the same one). Scratch
//! servers: their directories are removed, and nothing is left running after `cargo test`,
//! even for the servers kept in statics that are never dropped.
//!
//! `redis-server` and `redis-cli` must be on PATH. They are not optional: a missing binary
//! fails the test with a message saying to run `make test`, which installs them.

// clippy.toml allows unwrap/expect/panic inside #[test] fns only; this module is test code too.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    unreachable_pub
)]

use std::sync::OnceLock;

pub use laneguard_redis_harness::{RedisCluster, RedisServer, Shape};

/// One standalone server per test process, shared by its tests (which use distinct keys).
pub fn shared_redis() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(|| RedisServer::start_scratch().expect("a redis-server for the tests"))
}

/// One 3-node cluster (3 primaries, no replicas) per test process, shared by its tests
/// (which use distinct keys).
pub fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        RedisCluster::start_scratch(Shape::primaries(3)).expect("a Redis Cluster for the tests")
    })
}
