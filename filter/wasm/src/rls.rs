//! The `ShouldRateLimit` wire: build the request for a set of buckets and read the answer.

use laneguard_core::{Bucket, Plan, Window};
use laneguard_protos::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::{Entry, RateLimitOverride},
    RateLimitDescriptor,
};
use laneguard_protos::envoy::service::ratelimit::v3::{
    rate_limit_response::{Code, DescriptorStatus},
    RateLimitRequest, RateLimitResponse,
};
use laneguard_protos::prost::Message;

pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

/// `envoy.type.v3.RateLimitUnit` / `RateLimitResponse.RateLimit.Unit` values.
fn unit(w: Window) -> i32 {
    match w {
        Window::Second => 1,
        Window::Minute => 2,
        Window::Hour => 3,
        Window::Day => 4,
    }
}

/// One descriptor for a bucket. `hits` overrides the request-level `hits_addend` for this
/// descriptor (renewals send 0, reports send what was admitted without the service).
pub fn descriptor(b: &Bucket, hits: Option<u64>) -> RateLimitDescriptor {
    let mut entries: Vec<Entry> = b
        .entries()
        .into_iter()
        .map(|(k, v)| Entry {
            key: k.to_string(),
            value: v.to_string(),
        })
        .collect();
    entries.push(Entry {
        key: "lg.burst".to_string(),
        value: b.rate.burst.get().to_string(),
    });
    RateLimitDescriptor {
        entries,
        limit: Some(RateLimitOverride {
            requests_per_unit: b.rate.requests.get(),
            unit: unit(b.rate.window),
        }),
        hits_addend: hits,
    }
}

/// A decision request for the first `take` buckets of a plan's attempt: every bucket
/// charged its own cost (the request buckets `plan.cost`, an AI request's token buckets
/// the reservation).
pub fn encode_plan(domain: &str, plan: &Plan, borrowing: bool, take: usize) -> Vec<u8> {
    let descriptors = plan
        .costed(borrowing)
        .into_iter()
        .take(take)
        .map(|(b, c)| descriptor(b, b.kind.is_tokens().then_some(u64::from(c))))
        .collect();
    encode_descriptors(domain, descriptors, plan.cost)
}

pub fn encode_descriptors(
    domain: &str,
    descriptors: Vec<RateLimitDescriptor>,
    cost: u32,
) -> Vec<u8> {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors,
        hits_addend: cost,
    }
    .encode_to_vec()
}

/// The descriptor entry of a report saying how long ago (whole ms) the first of its hits
/// was admitted: the service charges only what they exceeded the bucket's refill over that
/// time by (docs/service.md, "Reports").
pub const AGE_ENTRY: &str = "lg.age_ms";

pub fn age_entry(age_ms: u64) -> Entry {
    Entry {
        key: AGE_ENTRY.to_string(),
        value: age_ms.to_string(),
    }
}

/// gRPC metadata asking the service to lease `want` requests per bucket (ignored by
/// servers that do not grant).
pub const LEASE_HEADER: &str = "x-laneguard-lease";
/// gRPC metadata marking a report of hits already admitted: charge them unconditionally.
/// With the value [`REFUND`], the opposite: give the hits back (token settlements).
pub const REPORT_HEADER: &str = "x-laneguard-report";
pub const REFUND: &[u8] = b"refund";

/// `DescriptorStatus.code` of a bucket without room.
pub const OVER_LIMIT: i32 = Code::OverLimit as i32;

/// The service's verdict on one attempt.
pub struct Verdict {
    pub allowed: bool,
    /// Index of the first descriptor reported over its limit.
    pub tripped: Option<usize>,
    pub statuses: Vec<DescriptorStatus>,
    /// The service's slot for each status (ns; 0: none; empty: none at all):
    /// `laneguard_protos::slots`, applied by `LocalTable::coordinate`.
    pub holds: Vec<u64>,
}

pub fn decode(bytes: &[u8]) -> Result<Verdict, String> {
    let resp = RateLimitResponse::decode(bytes).map_err(|e| e.to_string())?;
    let over = Code::OverLimit as i32;
    let allowed = match Code::try_from(resp.overall_code) {
        Ok(Code::Ok) => true,
        Ok(Code::OverLimit) => false,
        _ => {
            return Err(format!(
                "overall_code {} is neither OK nor OVER_LIMIT",
                resp.overall_code
            ))
        }
    };
    let tripped = resp.statuses.iter().position(|s| s.code == over);
    let holds =
        laneguard_protos::slots::decode(resp.dynamic_metadata.as_ref(), resp.statuses.len());
    Ok(Verdict {
        allowed,
        tripped,
        statuses: resp.statuses,
        holds,
    })
}

/// Nanoseconds from a protobuf Duration, saturating; negative counts as zero.
pub fn duration_ns(d: &laneguard_protos::prost_types::Duration) -> u64 {
    let secs = u64::try_from(d.seconds).unwrap_or(0);
    let nanos = u64::try_from(d.nanos).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}
