//! The Envoy rate-limit service protocol (`envoy.service.ratelimit.v3`), as prost types.
//!
//! The `.proto` files in `proto/` are vendored from envoyproxy/envoy and trimmed to what the
//! `ShouldRateLimit` wire needs; package, message and field names and numbers are unchanged,
//! so these types talk to Envoy's native `envoy.filters.http.ratelimit` and to any RLS v3
//! server. Modules mirror the proto packages (`envoy::service::ratelimit::v3`, ...), and
//! `google.protobuf` types are `prost_types` (re-exported as [`google::protobuf`]).
//!
//! The default build is prost-only and compiles for `wasm32-wasip1` (the filter encodes
//! requests and decodes responses itself and hands the bytes to proxy-wasm's
//! `dispatch_grpc_call`). The `server` feature adds tonic's
//! `rate_limit_service_server` and `rate_limit_service_client` modules inside
//! `envoy::service::ratelimit::v3`, for the service and the tests.
//!
//! `envoy::service::rate_limit_quota::v3` is the RLQS protocol of Envoy's native
//! `envoy.filters.http.rate_limit_quota` filter (vendored and trimmed the same way, with
//! `envoy.type.v3`'s `RateLimitStrategy` and `TokenBucket`).
//!
//! [`laneguard::audit::v1`] is laneguard's own small protocol (not Envoy's): the filter ships
//! audit records to the service's hash-chained log with `AuditLog/Append`.

pub use prost;
pub use prost_types;

/// Envoy API packages.
pub mod envoy {
    pub mod config {
        pub mod core {
            /// `envoy.config.core.v3`: only `HeaderValue`.
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.config.core.v3.rs"));
            }
        }
    }

    pub mod extensions {
        pub mod common {
            pub mod ratelimit {
                /// `envoy.extensions.common.ratelimit.v3`: `RateLimitDescriptor`.
                pub mod v3 {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/envoy.extensions.common.ratelimit.v3.rs"
                    ));
                }
            }
        }
    }

    pub mod service {
        pub mod rate_limit_quota {
            /// `envoy.service.rate_limit_quota.v3` (RLQS): usage reports, assignments and
            /// (with the `server` feature) the tonic stubs of `RateLimitQuotaService`.
            pub mod v3 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/envoy.service.rate_limit_quota.v3.rs"
                ));
            }
        }

        pub mod ratelimit {
            /// `envoy.service.ratelimit.v3`: the request, the response and (with the `server`
            /// feature) the tonic stubs.
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.ratelimit.v3.rs"));
            }
        }
    }

    pub mod r#type {
        /// `envoy.type.v3`: `RateLimitUnit`, and RLQS's `RateLimitStrategy` and `TokenBucket`.
        pub mod v3 {
            include!(concat!(env!("OUT_DIR"), "/envoy.r#type.v3.rs"));
        }
    }
}

/// laneguard's own protocols.
pub mod laneguard {
    pub mod audit {
        /// `laneguard.audit.v1`: the filter ships audit records to the service's
        /// hash-chained log (`AuditLog/Append`). With the `server` feature, tonic stubs too.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/laneguard.audit.v1.rs"));
        }
    }
}

impl envoy::extensions::common::ratelimit::v3::RateLimitDescriptor {
    /// A descriptor from `(key, value)` entries, with an optional per-descriptor limit
    /// (`requests_per_unit`, unit) and no `hits_addend`.
    pub fn with_entries<K: AsRef<str>, V: AsRef<str>>(
        entries: &[(K, V)],
        limit: Option<(u32, envoy::r#type::v3::RateLimitUnit)>,
    ) -> Self {
        use envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
            Entry, RateLimitOverride,
        };
        Self {
            entries: entries
                .iter()
                .map(|(k, v)| Entry {
                    key: k.as_ref().to_string(),
                    value: v.as_ref().to_string(),
                })
                .collect(),
            limit: limit.map(|(n, unit)| RateLimitOverride {
                requests_per_unit: n,
                unit: unit as i32,
            }),
            hits_addend: None,
        }
    }
}

/// Google well-known types, as `prost_types`.
pub mod google {
    pub mod protobuf {
        pub use prost_types::*;
    }
}

/// The fully qualified gRPC service name, as used in paths and in `grpc.health.v1` checks.
pub const RATE_LIMIT_SERVICE_NAME: &str = "envoy.service.ratelimit.v3.RateLimitService";

/// The RLQS service's fully qualified name (`grpc.health.v1` answers SERVING for it when the
/// service has a policy).
pub const RATE_LIMIT_QUOTA_SERVICE_NAME: &str =
    "envoy.service.rate_limit_quota.v3.RateLimitQuotaService";

/// The audit service's name and method, as `dispatch_grpc_call` takes them.
pub const AUDIT_SERVICE_NAME: &str = "laneguard.audit.v1.AuditLog";
pub const AUDIT_APPEND_METHOD: &str = "Append";

/// The gRPC method path of `ShouldRateLimit` (what proxy-wasm's `dispatch_grpc_call` takes as
/// service and method name, joined).
pub const SHOULD_RATE_LIMIT_PATH: &str =
    "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

#[cfg(test)]
mod tests {
    use super::envoy::extensions::common::ratelimit::v3::{
        rate_limit_descriptor, RateLimitDescriptor,
    };
    use super::envoy::r#type::v3::RateLimitUnit;
    use super::envoy::service::ratelimit::v3::{
        rate_limit_response, RateLimitRequest, RateLimitResponse,
    };
    use prost::Message;

    /// Field numbers are the wire contract; pin a few of them with hand-encoded bytes.
    #[test]
    fn request_field_numbers_match_upstream() {
        let req = RateLimitRequest {
            domain: "d".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![rate_limit_descriptor::Entry {
                    key: "k".into(),
                    value: "v".into(),
                }],
                limit: Some(rate_limit_descriptor::RateLimitOverride {
                    requests_per_unit: 5,
                    unit: RateLimitUnit::Week as i32,
                }),
                hits_addend: Some(2),
            }],
            hits_addend: 3,
        };
        let bytes = req.encode_to_vec();
        // domain = 1 (LEN): tag 0x0a, len 1, "d".
        assert_eq!(&bytes[..3], &[0x0a, 0x01, b'd']);
        // hits_addend = 3 (VARINT): tag 0x18, 3, last.
        assert_eq!(&bytes[bytes.len() - 2..], &[0x18, 0x03]);
        let descriptor = [
            0x0a, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01,
            b'v', // entries = 1 {key = 1, value = 2}
            0x12, 0x04, 0x08, 0x05, 0x10,
            0x07, // limit = 2 {requests_per_unit = 1, unit = 2 (WEEK = 7)}
            0x1a, 0x02, 0x08, 0x02, // hits_addend = 3 {value = 1}
        ];
        // descriptors = 2 (LEN).
        assert_eq!(bytes[3], 0x12);
        assert_eq!(usize::from(bytes[4]), descriptor.len());
        assert_eq!(&bytes[5..5 + descriptor.len()], &descriptor);
        assert_eq!(RateLimitRequest::decode(bytes.as_slice()).unwrap(), req);
    }

    #[test]
    fn response_field_numbers_match_upstream() {
        let resp = RateLimitResponse {
            overall_code: rate_limit_response::Code::OverLimit as i32,
            statuses: vec![rate_limit_response::DescriptorStatus {
                code: rate_limit_response::Code::Ok as i32,
                current_limit: None,
                limit_remaining: 9,
                duration_until_reset: None,
                quota: Some(rate_limit_response::Quota {
                    requests: 4,
                    id: String::new(),
                    expiration_specifier: None,
                }),
            }],
            raw_body: b"x".to_vec(),
            ..Default::default()
        };
        let bytes = resp.encode_to_vec();
        assert_eq!(
            bytes,
            vec![
                0x08, 0x02, // overall_code = 1: OVER_LIMIT
                0x12, 0x08, 0x08, 0x01, 0x18, 0x09, 0x2a, 0x02, 0x08,
                0x04, // statuses = 2 {code = 1, limit_remaining = 3, quota = 5 {requests = 1}}
                0x2a, 0x01, b'x', // raw_body = 5
            ]
        );
        assert_eq!(
            rate_limit_response::rate_limit::Unit::Week as i32,
            7,
            "WEEK was appended after YEAR upstream"
        );
    }
}

/// laneguard's one extension of the `ShouldRateLimit` answer: the slots of coordinated holds
/// (`laneguard_core::engine::ask_slot`, docs/leases.md step 3b). The service puts them in
/// `RateLimitResponse.dynamic_metadata` under [`slots::HOLDS_FIELD`]: a list with one
/// number per status, the microseconds the asker should hold that bucket before it asks
/// again (0: no slot). Envoy's native filter would only copy it into the stream's dynamic
/// metadata; a server that gives no slots sends none, and the filter holds on its own.
pub mod slots {
    use prost_types::{value::Kind, ListValue, Struct, Value};

    /// The `dynamic_metadata` field that carries the holds.
    pub const HOLDS_FIELD: &str = "laneguard.holds_us";

    /// The metadata for these holds (ns, one per status), or `None` when none is a slot.
    pub fn encode(holds_ns: &[u64]) -> Option<Struct> {
        if holds_ns.iter().all(|&h| h == 0) {
            return None;
        }
        let values = holds_ns
            .iter()
            .map(|&h| Value {
                kind: Some(Kind::NumberValue((h / 1_000) as f64)),
            })
            .collect();
        let mut s = Struct::default();
        s.fields.insert(
            HOLDS_FIELD.to_string(),
            Value {
                kind: Some(Kind::ListValue(ListValue { values })),
            },
        );
        Some(s)
    }

    /// The holds (ns) for `statuses` statuses, from an answer's `dynamic_metadata`. Empty
    /// when there are none, or when they are not a list of `statuses` numbers; an entry that
    /// is not a finite, non-negative number reads as 0 (no slot). The caller bounds them.
    pub fn decode(metadata: Option<&Struct>, statuses: usize) -> Vec<u64> {
        let Some(Value {
            kind: Some(Kind::ListValue(list)),
        }) = metadata.and_then(|m| m.fields.get(HOLDS_FIELD))
        else {
            return Vec::new();
        };
        if list.values.len() != statuses {
            return Vec::new();
        }
        list.values
            .iter()
            .map(|v| match v.kind {
                Some(Kind::NumberValue(us)) if us.is_finite() && us >= 0.0 => {
                    // Saturating: `as` clamps a huge double to u64::MAX.
                    (us as u64).saturating_mul(1_000)
                }
                _ => 0,
            })
            .collect()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn holds_round_trip_and_bad_ones_read_as_none() {
            let m = encode(&[0, 175_000_000, 999]).unwrap();
            assert_eq!(decode(Some(&m), 3), vec![0, 175_000_000, 0]);
            assert!(encode(&[0, 0]).is_none());
            // The wrong count: ignored, the filter holds on its own.
            assert!(decode(Some(&m), 2).is_empty());
            assert!(decode(None, 3).is_empty());
            let mut bad = m.clone();
            if let Some(Value {
                kind: Some(Kind::ListValue(l)),
            }) = bad.fields.get_mut(HOLDS_FIELD)
            {
                l.values[0].kind = Some(Kind::NumberValue(-5.0));
                l.values[1].kind = Some(Kind::StringValue("soon".into()));
                l.values[2].kind = Some(Kind::NumberValue(f64::NAN));
            }
            assert_eq!(decode(Some(&bad), 3), vec![0, 0, 0]);
        }
    }
}
