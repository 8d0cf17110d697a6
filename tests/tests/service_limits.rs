//! The service's memory is bounded against a hostile caller (issue 14 item 5), through
//! gRPC straight to the real `laneguard-service` binary, no Envoy in front: oversized
//! entries and keys are refused with an INVALID_ARGUMENT that names the field and the
//! limit, and the memory store holds at most `--max-buckets` buckets however many distinct
//! per-day buckets arrive, counting what it evicts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_protos::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use laneguard_protos::envoy::r#type::v3::RateLimitUnit;
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::Code;
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use laneguard_protos::envoy::service::ratelimit::v3::RateLimitRequest;
use laneguard_service::limits::{MAX_ENTRY_BYTES, MAX_KEY_BYTES};
use laneguard_tests::{RunDir, Scrape, Service};
use tonic::transport::Channel;

fn request(descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "laneguard".into(),
        descriptors,
        hits_addend: 1,
    }
}

fn per_day(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor::with_entries(entries, Some((1, RateLimitUnit::Day)))
}

struct Rpc {
    rt: tokio::runtime::Runtime,
    client: RateLimitServiceClient<Channel>,
}

impl Rpc {
    fn connect(service: &Service) -> Rpc {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let channel = rt
            .block_on(
                Channel::from_shared(format!("http://{}", service.addr()))
                    .unwrap()
                    .timeout(std::time::Duration::from_secs(10))
                    .connect(),
            )
            .unwrap();
        Rpc {
            rt,
            client: RateLimitServiceClient::new(channel),
        }
    }

    fn call(&mut self, r: RateLimitRequest) -> Result<i32, tonic::Status> {
        self.rt
            .block_on(self.client.should_rate_limit(r))
            .map(|r| r.into_inner().overall_code)
    }
}

#[test]
fn oversized_entries_and_keys_are_refused_naming_the_limit() {
    let dir = RunDir::new("service-limits-sizes").unwrap();
    let service = Service::start(&dir, &[]).unwrap();
    let mut rpc = Rpc::connect(&service);
    // 1.3 MB values (the probe) and one byte past the limit are refused alike.
    for size in [1_300_000, MAX_ENTRY_BYTES + 1] {
        let big = "x".repeat(size);
        let d = per_day(&[("tenant", "acme"), ("user", big.as_str())]);
        let err = rpc
            .call(request(vec![per_day(&[("tenant", "ok")]), d]))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert_eq!(
            err.message(),
            format!(
                "invalid request: descriptors[1].entries[1].value: {size} bytes, over the limit of {MAX_ENTRY_BYTES} bytes"
            )
        );
    }
    let big_key = "k".repeat(MAX_ENTRY_BYTES + 1);
    let err = rpc
        .call(request(vec![per_day(&[(big_key.as_str(), "v")])]))
        .unwrap_err();
    assert!(
        err.message()
            .contains("descriptors[0].entries[0].key: 1025 bytes, over the limit of 1024"),
        "{err:?}"
    );
    // Entries within their limit whose escaped key passes the key limit.
    let spaces = " ".repeat(MAX_ENTRY_BYTES);
    let err = rpc
        .call(request(vec![per_day(&[
            ("tenant", "acme"),
            ("user", spaces.as_str()),
        ])]))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains(&format!("over the limit of {MAX_KEY_BYTES} bytes")),
        "{err:?}"
    );
    // At the limit: served.
    let at = "u".repeat(MAX_ENTRY_BYTES);
    assert_eq!(
        rpc.call(request(vec![per_day(&[
            ("tenant", "acme"),
            ("user", at.as_str())
        ])]))
        .unwrap(),
        Code::Ok as i32
    );
}

#[test]
fn the_memory_store_holds_at_most_max_buckets_and_counts_evictions() {
    const CAP: usize = 200;
    const TENANTS: usize = 2000;
    let dir = RunDir::new("service-limits-buckets").unwrap();
    let cap = CAP.to_string();
    let service = Service::start(
        &dir,
        &["--max-buckets", &cap, "--metrics-addr", "127.0.0.1:0"],
    )
    .unwrap();
    let url = service.metrics_url().unwrap();
    let mut rpc = Rpc::connect(&service);
    // Each tenant spends its one request a day: every bucket stays in debt (never idle).
    for i in 0..TENANTS {
        let t = format!("t{i}");
        let code = rpc
            .call(request(vec![per_day(&[("tenant", t.as_str())])]))
            .unwrap();
        assert_eq!(code, Code::Ok as i32, "tenant {i}");
    }
    let s = Scrape::get(&url).unwrap();
    let held = s.must("laneguard_service_memory_buckets").unwrap();
    let evicted = s.must("laneguard_service_memory_evictions_total").unwrap();
    assert!(held <= CAP as f64, "{held} buckets held\n{}", s.text);
    assert!(held >= (CAP - CAP / 8) as f64, "{held}\n{}", s.text);
    assert_eq!(held + evicted, TENANTS as f64, "{}", s.text);
    // The most recent tenant is still remembered (refused); the first was evicted, so its
    // bucket reads as full again: the documented cost of the cap.
    let last = format!("t{}", TENANTS - 1);
    assert_eq!(
        rpc.call(request(vec![per_day(&[("tenant", last.as_str())])]))
            .unwrap(),
        Code::OverLimit as i32
    );
    assert_eq!(
        rpc.call(request(vec![per_day(&[("tenant", "t0")])]))
            .unwrap(),
        Code::Ok as i32
    );
}
