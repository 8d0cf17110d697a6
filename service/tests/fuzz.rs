//! Fuzz targets of the service (issue 12 §2, `docs/fuzzing.md`): arbitrary
//! `RateLimitRequest`s over real gRPC to the real server (in-process, 127.0.0.1:0, memory
//! store), and arbitrary lines through the audit-log reader. `make test` runs a few hundred
//! fixed-seed inputs; `make fuzz` (FUZZ_SECONDS) runs each for a bounded time.

// clippy.toml allows unwrap/expect/panic inside #[test] fns only; the helpers are test code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use laneguard_fuzz::{fuzz, gen, Budget, Outcome};
use laneguard_protos::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use laneguard_protos::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::Code;
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use laneguard_protos::envoy::service::ratelimit::v3::RateLimitRequest;
use laneguard_protos::prost::Message;
use laneguard_service::{server, Grants, ManualClock, MemoryStore, Options, RateLimiter};
use proptest::prelude::*;
use tonic::transport::Channel;

const T0: u64 = 1_700_000_000_000_000_000;

/// The most a single request may be: tonic's default decoding limit, which the service
/// keeps. A larger request is refused before it is decoded (docs/service.md).
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// A running service and a runtime to call it from synchronous checks.
struct Service {
    rt: tokio::runtime::Runtime,
    channel: Channel,
}

fn service() -> Service {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let channel = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limiter = RateLimiter::new(
            Arc::new(MemoryStore::new()),
            None,
            Arc::new(ManualClock::new(T0)),
            Options::with_grants(Grants::default()),
        );
        tokio::spawn(server::serve(listener, limiter, std::future::pending()));
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .unwrap()
    });
    Service { rt, channel }
}

/// A string a descriptor field may hold: the names the filter sends, empty, numbers that
/// are not `u32`s, any text, and very long ones.
fn text(words: &'static [&'static str], huge: bool) -> impl Strategy<Value = String> {
    let most = if huge { 70_000 } else { 2 };
    prop_oneof![
        4 => proptest::sample::select(words).prop_map(str::to_string),
        2 => ".{0,16}",
        1 => Just(String::new()),
        1 => (1usize..most).prop_map(|n| "k".repeat(n)),
    ]
}

const KEYS: &[&str] = &[
    "tenant", "bucket", "class", "user", "lg.burst", "lg.burst", "x",
];
const VALUES: &[&str] = &[
    "acme",
    "shared",
    "reserve",
    "0",
    "1",
    "10",
    "-1",
    "4294967295",
    "4294967296",
    "1e3",
    " 5",
];

/// A descriptor; `huge`: its entries may be up to 70 KB each.
fn descriptor(huge: bool) -> impl Strategy<Value = RateLimitDescriptor> {
    let limit = (
        prop_oneof![Just(0u32), Just(1), Just(60), Just(u32::MAX), any::<u32>()],
        prop_oneof![4 => -1i32..9, 1 => any::<i32>()],
    )
        .prop_map(|(requests_per_unit, unit)| RateLimitOverride {
            requests_per_unit,
            unit,
        });
    (
        proptest::collection::vec(
            (text(KEYS, huge), text(VALUES, huge)).prop_map(|(key, value)| Entry { key, value }),
            0..6,
        ),
        proptest::option::weighted(0.9, limit),
        proptest::option::of(prop_oneof![
            Just(0u64),
            Just(1),
            Just(u64::from(u32::MAX)),
            Just(u64::from(u32::MAX) + 1),
            Just(u64::MAX),
            any::<u64>()
        ]),
    )
        .prop_map(|(entries, limit, hits_addend)| RateLimitDescriptor {
            entries,
            limit,
            hits_addend,
        })
}

/// A request and the gRPC metadata sent with it.
#[derive(Clone, Debug)]
struct Call {
    request: RateLimitRequest,
    lease: Option<String>,
    report: Option<String>,
}

fn metadata_value() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        Just("0".to_string()),
        Just("1".to_string()),
        Just("5".to_string()),
        Just("refund".to_string()),
        Just("4294967296".to_string()),
        Just("-1".to_string()),
        "[ -~]{0,8}",
    ])
}

fn call() -> impl Strategy<Value = Call> {
    let descriptors = prop_oneof![
        8 => proptest::collection::vec(descriptor(true), 0..8),
        1 => Just(Vec::new()),
        // 10,000 copies of one descriptor, and 10,000 distinct tenants.
        1 => descriptor(false).prop_map(|d| vec![d; 10_000]),
        1 => (1u32..u32::MAX).prop_map(|n| (0..10_000)
            .map(|i| RateLimitDescriptor::with_entries(
                &[("tenant", format!("t{n}-{i}").as_str()), ("bucket", "shared")],
                Some((60, laneguard_protos::envoy::r#type::v3::RateLimitUnit::Minute)),
            ))
            .collect()),
    ];
    (
        prop_oneof![
            Just(String::new()),
            Just("laneguard".to_string()),
            ".{0,32}"
        ],
        descriptors,
        prop_oneof![Just(0u32), Just(1), Just(u32::MAX), any::<u32>()],
        metadata_value(),
        proptest::option::weighted(0.2, metadata_value().prop_map(Option::unwrap_or_default)),
    )
        .prop_map(|(domain, descriptors, hits_addend, lease, report)| Call {
            request: RateLimitRequest {
                domain,
                descriptors,
                hits_addend,
            },
            lease,
            report,
        })
}

/// Whether the service must refuse `c` with INVALID_ARGUMENT whatever else it holds: a
/// descriptor with an explicit limit of 0 per unit.
fn surely_invalid(c: &Call) -> bool {
    c.request
        .descriptors
        .iter()
        .any(|d| d.limit.as_ref().is_some_and(|l| l.requests_per_unit == 0))
        && c.report.is_none()
        && c.lease
            .as_deref()
            .is_none_or(|l| l.trim().parse::<u32>().is_ok())
}

fn check(svc: &Service, c: &Call) -> Outcome {
    let mut req = tonic::Request::new(c.request.clone());
    for (name, v) in [
        ("x-laneguard-lease", &c.lease),
        ("x-laneguard-report", &c.report),
    ] {
        if let Some(v) = v {
            if let Ok(v) = v.parse() {
                req.metadata_mut().insert(name, v);
            }
        }
    }
    let size = c.request.encoded_len();
    let mut client = RateLimitServiceClient::new(svc.channel.clone())
        .max_decoding_message_size(64 * 1024 * 1024);
    let result = svc.rt.block_on(client.should_rate_limit(req));
    match result {
        Ok(resp) => {
            let resp = resp.into_inner();
            if size > MAX_REQUEST_BYTES {
                return Err(format!("a request of {size} bytes was accepted"));
            }
            if surely_invalid(c) {
                return Err("a limit of 0 per unit was accepted".into());
            }
            let code = Code::try_from(resp.overall_code).unwrap_or(Code::Unknown);
            if !matches!(code, Code::Ok | Code::OverLimit) {
                return Err(format!("overall_code {:?}", resp.overall_code));
            }
            if c.report.is_none() && resp.statuses.len() != c.request.descriptors.len() {
                return Err(format!(
                    "{} statuses for {} descriptors",
                    resp.statuses.len(),
                    c.request.descriptors.len()
                ));
            }
            Ok(())
        }
        Err(s) => match s.code() {
            tonic::Code::InvalidArgument => {
                let m = s.message();
                if m.contains("descriptors[") || m.contains("x-laneguard-") {
                    Ok(())
                } else {
                    Err(format!("INVALID_ARGUMENT without a field: {m:?}"))
                }
            }
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
                if size > MAX_REQUEST_BYTES =>
            {
                Ok(())
            }
            other => Err(format!(
                "{other:?} for a {size}-byte request: {}",
                s.message()
            )),
        },
    }
}

#[test]
fn fuzz_service_requests() {
    let svc = service();
    let report = fuzz("service_requests", Budget::from_env(50), call(), |c| {
        check(&svc, c)
    });
    report.unwrap();
    // After all of that, the server still answers a plain request.
    let ok = Call {
        request: RateLimitRequest {
            domain: "laneguard".into(),
            descriptors: vec![RateLimitDescriptor::with_entries(
                &[("tenant", "after"), ("bucket", "shared")],
                Some((
                    60,
                    laneguard_protos::envoy::r#type::v3::RateLimitUnit::Minute,
                )),
            )],
            hits_addend: 1,
        },
        lease: None,
        report: None,
    };
    check(&svc, &ok).unwrap();
    if let Some(hwm) = peak_rss_kib() {
        println!(
            "fuzz service_requests: peak RSS of the test process {} MiB",
            hwm / 1024
        );
    }
}

/// A request just over the limit is refused with a clear status, not decoded.
#[test]
fn a_request_over_the_size_limit_is_refused_before_decoding() {
    let svc = service();
    let big = "v".repeat(64 * 1024);
    let c = Call {
        request: RateLimitRequest {
            domain: "laneguard".into(),
            descriptors: (0..70)
                .map(|i| {
                    RateLimitDescriptor::with_entries(
                        &[("tenant", format!("{i}{big}").as_str())],
                        None,
                    )
                })
                .collect(),
            hits_addend: 1,
        },
        lease: None,
        report: None,
    };
    assert!(c.request.encoded_len() > MAX_REQUEST_BYTES);
    let mut client = RateLimitServiceClient::new(svc.channel.clone());
    let err = svc
        .rt
        .block_on(client.should_rate_limit(c.request.clone()))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{err:?}");
}

fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

const AUDIT_WORDS: &[&str] = &[
    "seq",
    "prev",
    "hash",
    "record",
    "time",
    "events",
    "tenant",
    "limited",
    "acme",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "{",
    "}",
    "null",
];

/// A valid chain of `n` records, as the service writes it.
fn chain(n: usize) -> Vec<String> {
    let mut prev = laneguard_service::audit::GENESIS.to_string();
    (0..n)
        .map(|i| {
            let rec = format!("{{\"tenant\":\"t{i}\",\"events\":[\"limited\"]}}");
            let v: serde_json::Value = serde_json::from_str(&rec).unwrap();
            let canonical = laneguard_service::audit::canonical(&v);
            let hash = laneguard_service::audit::chain_hash(&prev, &canonical);
            let line = laneguard_service::audit::line(i as u64 + 1, &prev, &hash, &canonical);
            prev = hash;
            line
        })
        .collect()
}

#[test]
fn fuzz_audit_lines() {
    // Arbitrary lines, and a valid chain with lines replaced, inserted or cut.
    let lines = prop_oneof![
        proptest::collection::vec(gen::line(AUDIT_WORDS), 0..12),
        (
            1usize..8,
            proptest::collection::vec((any::<u8>(), gen::line(AUDIT_WORDS)), 0..4)
        )
            .prop_map(|(n, edits)| {
                let mut c = chain(n);
                for (at, l) in edits {
                    let i = at as usize % (c.len() + 1);
                    if at % 2 == 0 && i < c.len() {
                        c[i] = l;
                    } else {
                        c.insert(i, l);
                    }
                }
                c
            }),
    ];
    fuzz(
        "audit_lines",
        Budget::from_env(200),
        lines,
        |lines: &Vec<String>| {
            let text = lines.join("\n");
            let _ = laneguard_service::audit::verify(text.as_bytes());
            let _ = laneguard_service::audit::read_evidence(&text);
            let filter = laneguard_service::audit::Filter::default();
            let _ = laneguard_service::audit::query(text.as_bytes(), &filter).count();
            Ok(())
        },
    )
    .unwrap();
    // The reader is not blind: an intact chain verifies, and one changed record does not.
    let intact = chain(5).join("\n");
    assert!(laneguard_service::audit::verify(intact.as_bytes()).is_ok());
    let forged = intact.replacen("\"t2\"", "\"t9\"", 1);
    assert!(laneguard_service::audit::verify(forged.as_bytes()).is_err());
}

/// Found by `make fuzz` (`service_requests`): a 16 KB `lg.burst` value was echoed whole in
/// the INVALID_ARGUMENT message, whose `grpc-message` header then broke the client's HTTP/2
/// header limit: the caller saw "h2 protocol error" instead of the field that was wrong.
#[test]
fn a_huge_bad_burst_is_a_clear_invalid_argument_not_a_protocol_error() {
    let svc = service();
    let huge = "k".repeat(16 * 1024);
    let request = RateLimitRequest {
        domain: String::new(),
        descriptors: vec![RateLimitDescriptor::with_entries(
            &[("lg.burst", huge.as_str())],
            Some((
                60,
                laneguard_protos::envoy::r#type::v3::RateLimitUnit::Minute,
            )),
        )],
        hits_addend: 0,
    };
    let mut client = RateLimitServiceClient::new(svc.channel.clone());
    let err = svc
        .rt
        .block_on(client.should_rate_limit(request))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("descriptors[0]"), "{err:?}");
    assert!(err.message().contains("16384 bytes"), "{err:?}");
    assert!(err.message().len() < 300, "{err:?}");
}
