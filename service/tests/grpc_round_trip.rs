//! In-process gRPC round trip: the real tonic server on 127.0.0.1:0, called with the
//! generated client. No child processes (those live in the workspace's `tests/` crate).

// clippy.toml allows unwrap/expect inside #[test] fns only; the helpers here are test code too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use laneguard_protos::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use laneguard_protos::envoy::r#type::v3::RateLimitUnit;
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::{quota, Code};
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use laneguard_protos::envoy::service::ratelimit::v3::RateLimitRequest;
use laneguard_service::{
    server, Config, Grants, ManualClock, MemoryStore, Options, RateLimiter, LEASE_METADATA,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const T0: u64 = 1_700_000_000_000_000_000;

struct Running {
    channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

async fn start(clock: Arc<ManualClock>, rules: Option<Config>) -> Running {
    start_with(clock, rules, Options::default()).await
}

async fn start_with(clock: Arc<ManualClock>, rules: Option<Config>, options: Options) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limiter = RateLimiter::new(
        Arc::new(MemoryStore::new()),
        rules.map(Arc::new),
        clock,
        options,
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::serve(listener, limiter, async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    Running {
        channel,
        stop: Some(stop),
        task,
    }
}

impl Running {
    /// Stop the server while the client's connection is still open (as Envoy's would be),
    /// and require it to finish promptly.
    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops after shutdown")
            .expect("server task joins");
        result.expect("server exits cleanly");
    }
}

fn descriptor(
    entries: &[(&str, &str)],
    limit: Option<(u32, RateLimitUnit)>,
) -> RateLimitDescriptor {
    RateLimitDescriptor::with_entries(entries, limit)
}

#[tokio::test]
async fn should_rate_limit_round_trip() {
    let clock = Arc::new(ManualClock::new(T0));
    let running = start(clock.clone(), None).await;
    let mut client = RateLimitServiceClient::new(running.channel.clone());

    let request = RateLimitRequest {
        domain: "laneguard".into(),
        descriptors: vec![
            descriptor(
                &[("tenant", "acme"), ("bucket", "shared"), ("lg.burst", "3")],
                Some((60, RateLimitUnit::Minute)),
            ),
            descriptor(
                &[
                    ("tenant", "acme"),
                    ("bucket", "reserve"),
                    ("class", "repair"),
                    ("lg.burst", "2"),
                ],
                Some((60, RateLimitUnit::Minute)),
            ),
        ],
        hits_addend: 1,
    };

    let first = client
        .should_rate_limit(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.overall_code, Code::Ok as i32);
    assert_eq!(first.statuses.len(), 2);
    assert_eq!(first.statuses[0].limit_remaining, 2);
    assert_eq!(first.statuses[1].limit_remaining, 1);
    let limit = first.statuses[0].current_limit.clone().unwrap();
    assert_eq!(limit.requests_per_unit, 60);

    let second = client
        .should_rate_limit(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.overall_code, Code::Ok as i32);

    // The reserve bucket (burst 2) is spent; the shared one still has one left and is not
    // charged by the refused request.
    let third = client
        .should_rate_limit(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(third.overall_code, Code::OverLimit as i32);
    assert_eq!(third.statuses[0].code, Code::Ok as i32);
    assert_eq!(third.statuses[0].limit_remaining, 1);
    assert_eq!(third.statuses[1].code, Code::OverLimit as i32);
    let reset = third.statuses[1].duration_until_reset.unwrap();
    assert_eq!((reset.seconds, reset.nanos), (2, 0));

    // One emission interval (1 s at 60/min) later, there is room again.
    clock.advance(Duration::from_secs(1));
    let fourth = client
        .should_rate_limit(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fourth.overall_code, Code::Ok as i32);
    // Shared: 2 spent at T0, 1 refilled by T0+1s, 1 spent now: 1 of 3 left.
    assert_eq!(fourth.statuses[0].limit_remaining, 1);
    assert_eq!(fourth.statuses[1].limit_remaining, 0);

    // Invalid requests are refused with INVALID_ARGUMENT, not guessed at.
    let bad = RateLimitRequest {
        domain: "laneguard".into(),
        descriptors: vec![descriptor(
            &[("tenant", "acme"), ("lg.burst", "lots")],
            Some((1, RateLimitUnit::Second)),
        )],
        hits_addend: 1,
    };
    let status = client.should_rate_limit(bad).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    running.shutdown().await;
}

#[tokio::test]
async fn config_rules_limit_native_envoy_descriptors() {
    let rules = Config::parse(include_str!("../testdata/config/good.yaml"), "good.yaml").unwrap();
    let running = start(Arc::new(ManualClock::new(T0)), Some(rules)).await;
    let mut client = RateLimitServiceClient::new(running.channel.clone());
    // Like Envoy's native filter: no `limit`, one descriptor per action list.
    let request = RateLimitRequest {
        domain: "laneguard".into(),
        descriptors: vec![
            descriptor(
                &[("tenant", "acme"), ("bucket", "class"), ("class", "export")],
                None,
            ),
            descriptor(&[("tenant", "acme"), ("path", "/x")], None),
        ],
        hits_addend: 0,
    };
    let mut admitted = 0;
    for _ in 0..15 {
        let r = client
            .should_rate_limit(request.clone())
            .await
            .unwrap()
            .into_inner();
        // The unmatched descriptor is unlimited, whatever the overall answer.
        assert_eq!(r.statuses[1].code, Code::Ok as i32);
        assert_eq!(r.statuses[1].current_limit, None);
        if r.overall_code == Code::Ok as i32 {
            admitted += 1;
        }
    }
    // 10 per second, burst defaults to 10, and the clock does not move.
    assert_eq!(admitted, 10);
    running.shutdown().await;
}

#[tokio::test]
async fn health_serves_both_names() {
    let running = start(Arc::new(ManualClock::new(T0)), None).await;
    let mut health = HealthClient::new(running.channel.clone());
    for service in ["", "envoy.service.ratelimit.v3.RateLimitService"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    running.shutdown().await;
}

#[tokio::test]
async fn shutdown_with_an_open_connection_is_prompt() {
    let running = start(Arc::new(ManualClock::new(T0)), None).await;
    let mut client = RateLimitServiceClient::new(running.channel.clone());
    let ok = client
        .should_rate_limit(RateLimitRequest {
            domain: "d".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.overall_code, Code::Ok as i32);
    // `client` and `running.channel` keep the HTTP/2 connection open across the shutdown.
    running.shutdown().await;
    drop(client);
}

fn leased(request: &RateLimitRequest, lease: &str) -> tonic::Request<RateLimitRequest> {
    let mut r = tonic::Request::new(request.clone());
    r.metadata_mut()
        .insert(LEASE_METADATA, lease.parse().unwrap());
    r
}

#[tokio::test]
async fn leases_ride_on_request_metadata_and_quota() {
    let clock = Arc::new(ManualClock::new(T0));
    let running = start(clock.clone(), None).await;
    let mut client = RateLimitServiceClient::new(running.channel.clone());
    let request = RateLimitRequest {
        domain: "laneguard".into(),
        descriptors: vec![
            descriptor(
                &[
                    ("tenant", "acme"),
                    ("bucket", "shared"),
                    ("lg.burst", "100"),
                ],
                Some((6000, RateLimitUnit::Minute)),
            ),
            descriptor(&[("unlimited", "x")], None),
            descriptor(
                &[("tenant", "acme"), ("bucket", "user"), ("user", "u")],
                Some((40, RateLimitUnit::Second)),
            ),
        ],
        hits_addend: 1,
    };

    // A plain RLS client (no metadata) gets no quota.
    let plain = client
        .should_rate_limit(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plain.overall_code, Code::Ok as i32);
    assert!(plain.statuses.iter().all(|s| s.quota.is_none()));

    // Asking for 16: the user bucket has 38 left after the request (burst 40: it would
    // give up to 20), the shared one 98 (up to 50): the ask decides.
    let r = client
        .should_rate_limit(leased(&request, "16"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    let quota = r.statuses[0].quota.clone().expect("a grant");
    assert_eq!(quota.requests, 16);
    let valid_until = match quota.expiration_specifier {
        Some(quota::ExpirationSpecifier::ValidUntil(ts)) => ts,
        None => panic!("no valid_until"),
    };
    // now + the default lease TTL (2 s).
    assert_eq!(
        valid_until.seconds,
        i64::try_from(T0 / 1_000_000_000).unwrap() + 2
    );
    assert_eq!(valid_until.nanos, 0);
    // The same grant on every limited descriptor; none on the unlimited one.
    assert_eq!(r.statuses[2].quota, Some(quota.clone()));
    assert_eq!(r.statuses[1].quota, None);
    // The grant is pre-paid: the statuses count it as spent.
    assert_eq!(r.statuses[2].limit_remaining, 40 - 2 - 16);

    // Bad metadata is refused, not guessed at.
    let bad = client
        .should_rate_limit(leased(&request, "lots"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains(LEASE_METADATA), "{}", bad.message());

    // Drain the user bucket: an OVER_LIMIT answer carries no quota.
    loop {
        let r = client
            .should_rate_limit(leased(&request, "16"))
            .await
            .unwrap()
            .into_inner();
        if r.overall_code == Code::OverLimit as i32 {
            assert!(r.statuses.iter().all(|s| s.quota.is_none()));
            break;
        }
    }
    running.shutdown().await;
}

#[tokio::test]
async fn grants_off_never_grants() {
    let running = start_with(
        Arc::new(ManualClock::new(T0)),
        None,
        Options::with_grants(Grants::Off),
    )
    .await;
    let mut client = RateLimitServiceClient::new(running.channel.clone());
    let request = RateLimitRequest {
        domain: "laneguard".into(),
        descriptors: vec![descriptor(
            &[("tenant", "acme"), ("bucket", "shared")],
            Some((600, RateLimitUnit::Minute)),
        )],
        hits_addend: 1,
    };
    let r = client
        .should_rate_limit(leased(&request, "50"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses[0].quota, None);
    assert_eq!(r.statuses[0].limit_remaining, 599);
    running.shutdown().await;
}
