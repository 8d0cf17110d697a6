//! Failure behaviour of the Redis store, through the real gRPC server: Redis down answers
//! `UNAVAILABLE` quickly and the service recovers by itself when Redis is back; a Redis that
//! accepts connections but never answers cannot make a request hang; corrupt state is
//! `INTERNAL`, not `UNAVAILABLE`. gRPC health follows the store: `NOT_SERVING` while Redis is
//! down or paused, `SERVING` again once it answers.

// clippy.toml allows unwrap/expect/panic inside #[test] fns only; the helpers are test code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use laneguard_core::key;
use laneguard_protos::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use laneguard_protos::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use laneguard_protos::envoy::r#type::v3::RateLimitUnit;
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::Code;
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use laneguard_protos::envoy::service::ratelimit::v3::RateLimitRequest;
use laneguard_service::store::Charge;
use laneguard_service::{
    server, ManualClock, Options, RateLimiter, RedisSettings, RedisStore, Store, StoreError,
};
use support::{RedisCluster, RedisServer, Shape};
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const T0: u64 = 1_700_000_000_000_000_000;
const TIMEOUT: Duration = Duration::from_millis(200);

fn settings() -> RedisSettings {
    RedisSettings {
        timeout: TIMEOUT,
        ..RedisSettings::default()
    }
}

/// The gRPC server on 127.0.0.1:0 over `store`; returns a connected client. The server task
/// ends with the test's runtime.
async fn serve(store: Arc<dyn Store>) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::new(serve_channel(store).await)
}

async fn serve_channel(store: Arc<dyn Store>) -> Channel {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limiter = RateLimiter::new(
        store,
        None,
        Arc::new(ManualClock::new(T0)),
        Options::default(),
    );
    tokio::spawn(server::serve(listener, limiter, std::future::pending()));
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap()
}

/// The status of each health name (`""`, then the RLS service).
async fn health_both(client: &mut HealthClient<Channel>) -> [ServingStatus; 2] {
    let mut seen = [ServingStatus::Unknown; 2];
    for (i, service) in ["", "envoy.service.ratelimit.v3.RateLimitService"]
        .into_iter()
        .enumerate()
    {
        let r = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        seen[i] = ServingStatus::try_from(r.status).unwrap();
    }
    seen
}

/// The status of the RLS service name.
async fn health(client: &mut HealthClient<Channel>) -> ServingStatus {
    health_both(client).await[1]
}

/// Poll health until it reports `want`, for at most `within`.
async fn health_becomes(client: &mut HealthClient<Channel>, want: ServingStatus, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        // Both names follow the store (set one after the other, so poll until both agree).
        let now = health_both(client).await;
        if now == [want, want] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health still {now:?} after {within:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Within a probe interval plus the store timeout, with slack for a loaded machine.
const HEALTH_WITHIN: Duration = Duration::from_secs(10);

#[tokio::test]
async fn health_is_not_serving_while_redis_is_down_or_paused() {
    let mut redis = RedisServer::start_scratch().unwrap();
    let store = Arc::new(RedisStore::standalone(&redis.url(), settings()).unwrap());
    let channel = serve_channel(store).await;
    let mut rls = RateLimitServiceClient::new(channel.clone());
    let mut hc = HealthClient::new(channel);
    health_becomes(&mut hc, ServingStatus::Serving, HEALTH_WITHIN).await;
    assert_eq!(call(&mut rls, "acme").await.0, tonic::Code::Ok);

    // Killed: NOT_SERVING; requests are UNAVAILABLE meanwhile.
    redis.stop();
    health_becomes(&mut hc, ServingStatus::NotServing, HEALTH_WITHIN).await;
    assert_eq!(call(&mut rls, "acme").await.0, tonic::Code::Unavailable);
    redis.restart().unwrap();
    health_becomes(&mut hc, ServingStatus::Serving, HEALTH_WITHIN).await;
    assert_eq!(call(&mut rls, "acme").await.0, tonic::Code::Ok);

    // Paused (SIGSTOP) past the store timeout: the port accepts, nothing answers.
    redis.pause().unwrap();
    health_becomes(&mut hc, ServingStatus::NotServing, HEALTH_WITHIN).await;
    let (code, took) = call(&mut rls, "acme").await;
    redis.resume().unwrap();
    assert_eq!(code, tonic::Code::Unavailable);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    health_becomes(&mut hc, ServingStatus::Serving, HEALTH_WITHIN).await;
    assert_eq!(call(&mut rls, "acme").await.0, tonic::Code::Ok);
}

#[tokio::test]
async fn health_serves_on_the_memory_store() {
    let channel = serve_channel(Arc::new(laneguard_service::MemoryStore::new())).await;
    let mut hc = HealthClient::new(channel);
    // Several probe intervals: it stays SERVING.
    for _ in 0..4 {
        assert_eq!(health(&mut hc).await, ServingStatus::Serving);
        tokio::time::sleep(laneguard_service::health::PROBE_EVERY).await;
    }
}

fn request(tenant: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: "failures".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![
                Entry {
                    key: "tenant".into(),
                    value: tenant.into(),
                },
                Entry {
                    key: "bucket".into(),
                    value: "shared".into(),
                },
            ],
            limit: Some(RateLimitOverride {
                requests_per_unit: 1000,
                unit: RateLimitUnit::Minute as i32,
            }),
            hits_addend: None,
        }],
        hits_addend: 1,
    }
}

/// Call once; return the gRPC code (Ok for an answer) and how long it took.
async fn call(
    client: &mut RateLimitServiceClient<Channel>,
    tenant: &str,
) -> (tonic::Code, Duration) {
    let started = Instant::now();
    let code = match client.should_rate_limit(request(tenant)).await {
        Ok(r) => {
            assert_eq!(r.into_inner().overall_code, Code::Ok as i32);
            tonic::Code::Ok
        }
        Err(status) => status.code(),
    };
    (code, started.elapsed())
}

#[tokio::test]
async fn redis_down_is_unavailable_quickly_and_the_service_recovers() {
    let mut redis = RedisServer::start_scratch().unwrap();
    let store = Arc::new(RedisStore::standalone(&redis.url(), settings()).unwrap());
    let mut client = serve(store).await;
    assert_eq!(call(&mut client, "acme").await.0, tonic::Code::Ok);

    redis.stop();
    for _ in 0..5 {
        let (code, took) = call(&mut client, "acme").await;
        assert_eq!(code, tonic::Code::Unavailable);
        assert!(took < Duration::from_secs(1), "took {took:?}");
    }

    redis.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, took) = call(&mut client, "acme").await;
        assert!(took < Duration::from_secs(1), "took {took:?}");
        if code == tonic::Code::Ok {
            break;
        }
        assert_eq!(code, tonic::Code::Unavailable);
        assert!(
            Instant::now() < deadline,
            "no recovery after Redis restarted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn redis_that_never_answers_times_out() {
    // Accepts connections and reads nothing back: a hung or black-holed Redis.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().take(16).flatten() {
            held.push(stream);
        }
    });
    let url = format!("redis://127.0.0.1:{port}");
    let store = Arc::new(RedisStore::standalone(&url, settings()).unwrap());
    let mut client = serve(store).await;
    for _ in 0..3 {
        let (code, took) = call(&mut client, "acme").await;
        assert_eq!(code, tonic::Code::Unavailable);
        assert!(took < TIMEOUT * 4, "took {took:?}");
    }
}

#[tokio::test]
async fn corrupt_state_is_internal() {
    let redis = support::shared_redis();
    let key = key::encode("failures", &[("tenant", "mangled"), ("bucket", "shared")]);
    redis.cli(&["SET", &key, "not-a-timestamp"]).unwrap();
    let store = Arc::new(RedisStore::standalone(&redis.url(), settings()).unwrap());
    let charge = Charge {
        key: key.clone(),
        rate: laneguard_core::Rate::new(10, laneguard_core::Window::Second, 10).unwrap(),
        cost: 1,
        age_ns: 0,
    };
    match store.check_and_charge(&[charge], 0, T0).await {
        Err(e @ StoreError::Corrupt { .. }) => {
            assert!(!e.is_transient());
            assert!(e.to_string().contains(&key), "{e}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let mut client = serve(store).await;
    assert_eq!(call(&mut client, "mangled").await.0, tonic::Code::Internal);
    // Other tenants are unaffected.
    assert_eq!(call(&mut client, "fine").await.0, tonic::Code::Ok);
}

#[tokio::test]
async fn cluster_primary_down_is_unavailable_quickly() {
    let cluster = RedisCluster::start_scratch(Shape::primaries(3)).unwrap();
    let store = Arc::new(RedisStore::from_spec(&cluster.spec(), settings()).unwrap());
    let mut client = serve(store).await;
    // Tenants spread over the three primaries.
    let tenants: Vec<String> = (0..12).map(|i| format!("tenant-{i}")).collect();
    for t in &tenants {
        assert_eq!(call(&mut client, t).await.0, tonic::Code::Ok, "{t}");
    }

    let mut nodes = cluster.into_nodes();
    nodes[1].stop();
    let mut unavailable = 0;
    for t in &tenants {
        let (code, took) = call(&mut client, t).await;
        assert!(
            code == tonic::Code::Ok || code == tonic::Code::Unavailable,
            "{t}: {code:?}"
        );
        if code == tonic::Code::Unavailable {
            unavailable += 1;
        }
        // Bounded by the store timeout per call (a request spans at most a few calls).
        assert!(took < Duration::from_secs(2), "{t} took {took:?}");
    }
    assert!(unavailable > 0, "no tenant lived on the stopped primary");
}

#[tokio::test]
async fn health_is_not_serving_while_a_cluster_primary_is_down() {
    let cluster = RedisCluster::start_scratch(Shape::primaries(3)).unwrap();
    let store = Arc::new(RedisStore::from_spec(&cluster.spec(), settings()).unwrap());
    let channel = serve_channel(store).await;
    let mut hc = HealthClient::new(channel);
    health_becomes(&mut hc, ServingStatus::Serving, HEALTH_WITHIN).await;
    let mut nodes = cluster.into_nodes();
    // No replica takes over (this cluster has none): unreachable until the test ends.
    nodes[2].stop();
    health_becomes(&mut hc, ServingStatus::NotServing, HEALTH_WITHIN).await;
}
