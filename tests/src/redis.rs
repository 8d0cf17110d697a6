//! Real `redis-server`s and Redis Clusters on ephemeral loopback ports, for tests where Redis
//! is involved: the shared setup of `tools/redis-harness` (the service's store tests and
//! `make bench-accuracy` use the same one). A server started in a [`crate::RunDir`] keeps its
//! log there. `make test` installs redis-server when it is missing
//! (scripts/bootstrap.sh --with-redis).

pub use laneguard_redis_harness::{RedisCluster, RedisServer, Shape};
