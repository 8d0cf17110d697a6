//! From a `RateLimitRequest` to the buckets it charges (the "Descriptor protocol" in
//! `docs/architecture.md`).
//!
//! A descriptor's rate is its `limit` (a `RateLimitOverride`, which laneguard's filter always
//! sends) or else the `--config` rule its entries match; with neither it is unlimited. The
//! parameter entry `("lg.burst", n)` sets the burst and is not part of the bucket's identity:
//! it is stripped before the key is computed with `laneguard_core::key::encode`, the same
//! codec the filter uses. The cost is the descriptor's own `hits_addend` if set, else the
//! request's (`0` on the wire means 1).

use std::num::NonZeroU32;

use laneguard_core::{key, Rate};
use laneguard_protos::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use laneguard_protos::envoy::service::ratelimit::v3::RateLimitRequest;

use crate::config::Config;
use crate::store::Charge;
use crate::unit::Unit;

/// The parameter entry that carries a bucket's burst.
pub const BURST_ENTRY: &str = "lg.burst";

/// The parameter entry of a report's descriptor: how long ago, in whole milliseconds, the
/// first of its hits was admitted (`laneguard_core::engine::report_age_ms`). Only what the
/// hits exceeded the bucket's refill over that time by is charged
/// (`laneguard_core::engine::charge_reported`). Only reports carry it.
pub const AGE_ENTRY: &str = "lg.age_ms";

/// A request the service cannot evaluate: answered with gRPC `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("descriptors[{index}]: `lg.burst` value `{value}` is not a positive 32-bit integer")]
    BadBurst { index: usize, value: String },
    #[error("descriptors[{index}]: `lg.burst` appears more than once")]
    DuplicateBurst { index: usize },
    #[error(
        "descriptors[{index}]: `lg.age_ms` value `{value}` is not a non-negative 64-bit integer"
    )]
    BadAge { index: usize, value: String },
    #[error("descriptors[{index}]: `lg.age_ms` appears more than once")]
    DuplicateAge { index: usize },
    #[error(
        "descriptors[{index}]: `lg.age_ms` is only for reports (`x-laneguard-report: 1`); a decision or a refund is as of now"
    )]
    AgeOutsideReport { index: usize },
    #[error("descriptors[{index}].limit.requests_per_unit: must be positive")]
    ZeroLimit { index: usize },
    #[error("descriptors[{index}].limit.unit: {unit} is not a defined RateLimitUnit")]
    UnknownUnit { index: usize, unit: i32 },
    #[error(
        "descriptors[{index}].limit.unit: `{unit}` is not supported yet (second, minute, hour, day)"
    )]
    UnsupportedUnit { index: usize, unit: Unit },
    #[error(
        "descriptors[{index}].entries[{entry}].{field}: {bytes} bytes, over the limit of {MAX_ENTRY_BYTES} bytes"
    )]
    EntryTooLarge {
        index: usize,
        entry: usize,
        field: &'static str,
        bytes: usize,
    },
    #[error(
        "descriptors[{index}]: its bucket key is {bytes} bytes, over the limit of {MAX_KEY_BYTES} bytes (domain and entries, escaped)"
    )]
    KeyTooLarge { index: usize, bytes: usize },
}

/// The most bytes of one descriptor entry's key or value. The filter's largest value is a
/// user id (256 bytes, `laneguard_core::engine::MAX_USER_LEN`); anything much larger is not
/// a bucket identity but a way to fill the store (issue 14 item 5: 300 keys of 1.3 MB each
/// cost the service 380 MB).
pub const MAX_ENTRY_BYTES: usize = 1024;

/// The most bytes of one bucket key (`laneguard_core::key::encode`: domain and entries,
/// percent-escaped). Bounds what one bucket costs in the store, whatever the entries.
pub const MAX_KEY_BYTES: usize = 2048;

/// The most of a caller's value an error message repeats. The message travels back in the
/// `grpc-message` header, and an HTTP/2 client refuses a header block past its limit (16 KiB
/// by default): echoing a 16 KB value turned a clear INVALID_ARGUMENT into a protocol
/// error (found by `make fuzz`, target `service_requests`).
pub const MAX_ECHO_BYTES: usize = 64;

/// `value` as an error message may repeat it: whole, or its first [`MAX_ECHO_BYTES`] and
/// its length.
pub fn quoted(value: &str) -> String {
    if value.len() <= MAX_ECHO_BYTES {
        return value.to_string();
    }
    let mut end = MAX_ECHO_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &value[..end], value.len())
}

/// The buckets of a request: `plan[i]` is `Some(charge)` for a limited `descriptors[i]`,
/// `None` for an unlimited one.
pub fn plan(
    request: &RateLimitRequest,
    rules: Option<&Config>,
) -> Result<Vec<Option<Charge>>, RequestError> {
    let request_cost = if request.hits_addend == 0 {
        1
    } else {
        request.hits_addend
    };
    request
        .descriptors
        .iter()
        .enumerate()
        .map(|(index, d)| plan_descriptor(&request.domain, d, index, request_cost, rules))
        .collect()
}

fn plan_descriptor(
    domain: &str,
    descriptor: &RateLimitDescriptor,
    index: usize,
    request_cost: u32,
    rules: Option<&Config>,
) -> Result<Option<Charge>, RequestError> {
    let mut burst: Option<NonZeroU32> = None;
    let mut age_ms: Option<u64> = None;
    let mut entries: Vec<(&str, &str)> = Vec::with_capacity(descriptor.entries.len());
    for (entry, e) in descriptor.entries.iter().enumerate() {
        for (field, text) in [("key", &e.key), ("value", &e.value)] {
            if text.len() > MAX_ENTRY_BYTES {
                return Err(RequestError::EntryTooLarge {
                    index,
                    entry,
                    field,
                    bytes: text.len(),
                });
            }
        }
        if e.key == BURST_ENTRY {
            if burst.is_some() {
                return Err(RequestError::DuplicateBurst { index });
            }
            let n = e
                .value
                .parse::<NonZeroU32>()
                .map_err(|_| RequestError::BadBurst {
                    index,
                    value: quoted(&e.value),
                })?;
            burst = Some(n);
        } else if e.key == AGE_ENTRY {
            if age_ms.is_some() {
                return Err(RequestError::DuplicateAge { index });
            }
            let n = e.value.parse::<u64>().map_err(|_| RequestError::BadAge {
                index,
                value: quoted(&e.value),
            })?;
            age_ms = Some(n);
        } else {
            entries.push((e.key.as_str(), e.value.as_str()));
        }
    }

    let rate = match &descriptor.limit {
        Some(limit) => {
            let requests = NonZeroU32::new(limit.requests_per_unit)
                .ok_or(RequestError::ZeroLimit { index })?;
            let unit = Unit::from_proto(limit.unit).ok_or(RequestError::UnknownUnit {
                index,
                unit: limit.unit,
            })?;
            let window = unit
                .window()
                .ok_or(RequestError::UnsupportedUnit { index, unit })?;
            Rate {
                requests,
                window,
                burst: burst.unwrap_or(requests),
            }
        }
        None => match rules.and_then(|c| c.lookup(domain, &entries)) {
            Some(rule_rate) => Rate {
                burst: burst.unwrap_or(rule_rate.burst),
                ..rule_rate
            },
            None => return Ok(None),
        },
    };

    let cost = descriptor
        .hits_addend
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
        .unwrap_or(request_cost);
    let key = key::encode(domain, &entries);
    if key.len() > MAX_KEY_BYTES {
        return Err(RequestError::KeyTooLarge {
            index,
            bytes: key.len(),
        });
    }
    Ok(Some(Charge {
        key,
        rate,
        cost,
        age_ns: age_ms.unwrap_or(0).saturating_mul(1_000_000),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use laneguard_core::Window;
    use laneguard_protos::envoy::r#type::v3::RateLimitUnit;

    fn descriptor(
        entries: &[(&str, &str)],
        limit: Option<(u32, RateLimitUnit)>,
    ) -> RateLimitDescriptor {
        RateLimitDescriptor::with_entries(entries, limit)
    }

    fn request(descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
        RateLimitRequest {
            domain: "laneguard".into(),
            descriptors,
            hits_addend: hits,
        }
    }

    #[test]
    fn parameter_entries_are_stripped_from_the_key_and_set_the_burst_and_age() {
        let with = descriptor(
            &[
                ("tenant", "acme"),
                ("lg.age_ms", "4000"),
                ("bucket", "shared"),
                ("lg.burst", "7"),
            ],
            Some((60, RateLimitUnit::Minute)),
        );
        let without = descriptor(
            &[("tenant", "acme"), ("bucket", "shared")],
            Some((60, RateLimitUnit::Minute)),
        );
        let p = plan(&request(vec![with, without], 0), None).unwrap();
        let (a, b) = (p[0].clone().unwrap(), p[1].clone().unwrap());
        assert_eq!(
            a.key, b.key,
            "lg.burst and lg.age_ms are not the bucket's identity"
        );
        assert_eq!(
            a.key,
            key::encode("laneguard", &[("tenant", "acme"), ("bucket", "shared")])
        );
        assert_eq!(a.rate, Rate::new(60, Window::Minute, 7).unwrap());
        // Default burst = requests_per_unit.
        assert_eq!(b.rate, Rate::new(60, Window::Minute, 60).unwrap());
        // hits_addend 0 on the wire means 1.
        assert_eq!(a.cost, 1);
        assert_eq!(a.age_ns, 4_000_000_000);
        assert_eq!(b.age_ns, 0);
    }

    #[test]
    fn age_entry_values_are_checked() {
        // Huge ages saturate rather than wrap (such a report charges nothing).
        let d = descriptor(
            &[("tenant", "t"), ("lg.age_ms", &u64::MAX.to_string())],
            Some((1, RateLimitUnit::Second)),
        );
        assert_eq!(
            plan(&request(vec![d], 1), None).unwrap()[0]
                .as_ref()
                .unwrap()
                .age_ns,
            u64::MAX
        );
        for bad in ["-1", "1.5", "", "soon"] {
            let d = descriptor(
                &[("tenant", "t"), ("lg.age_ms", bad)],
                Some((1, RateLimitUnit::Second)),
            );
            assert_eq!(
                plan(&request(vec![d], 1), None).unwrap_err(),
                RequestError::BadAge {
                    index: 0,
                    value: bad.into()
                }
            );
        }
        let twice = descriptor(
            &[("lg.age_ms", "1"), ("tenant", "t"), ("lg.age_ms", "2")],
            Some((1, RateLimitUnit::Second)),
        );
        assert_eq!(
            plan(&request(vec![twice], 1), None).unwrap_err(),
            RequestError::DuplicateAge { index: 0 }
        );
    }

    #[test]
    fn cost_comes_from_the_descriptor_then_the_request() {
        let mut d = descriptor(&[("tenant", "t")], Some((10, RateLimitUnit::Second)));
        let p = plan(&request(vec![d.clone()], 3), None).unwrap();
        assert_eq!(p[0].as_ref().unwrap().cost, 3);
        d.hits_addend = Some(5);
        let p = plan(&request(vec![d.clone()], 3), None).unwrap();
        assert_eq!(p[0].as_ref().unwrap().cost, 5);
        d.hits_addend = Some(u64::MAX);
        let p = plan(&request(vec![d], 3), None).unwrap();
        assert_eq!(p[0].as_ref().unwrap().cost, u32::MAX);
    }

    #[test]
    fn no_limit_and_no_rule_is_unlimited() {
        let d = descriptor(&[("tenant", "t"), ("lg.burst", "3")], None);
        assert_eq!(plan(&request(vec![d], 1), None).unwrap(), vec![None]);
        assert_eq!(plan(&request(vec![], 1), None).unwrap(), vec![]);
    }

    #[test]
    fn config_rule_applies_when_no_limit_is_sent() {
        let rules = Config::parse(
            "domain: laneguard\ndescriptors:\n  - key: tenant\n    rate_limit: {unit: second, requests_per_unit: 5, burst: 2}\n",
            "inline",
        )
        .unwrap();
        let d = descriptor(&[("tenant", "t")], None);
        let c = plan(&request(vec![d], 1), Some(&rules)).unwrap()[0]
            .clone()
            .unwrap();
        assert_eq!(c.rate, Rate::new(5, Window::Second, 2).unwrap());
        // lg.burst overrides the rule's burst and does not affect matching.
        let d = descriptor(&[("tenant", "t"), ("lg.burst", "4")], None);
        let c = plan(&request(vec![d], 1), Some(&rules)).unwrap()[0]
            .clone()
            .unwrap();
        assert_eq!(c.rate, Rate::new(5, Window::Second, 4).unwrap());
        // A sent limit wins over the rule.
        let d = descriptor(&[("tenant", "t")], Some((9, RateLimitUnit::Hour)));
        let c = plan(&request(vec![d], 1), Some(&rules)).unwrap()[0]
            .clone()
            .unwrap();
        assert_eq!(c.rate, Rate::new(9, Window::Hour, 9).unwrap());
    }

    #[test]
    fn invalid_descriptors_are_named() {
        let bad_burst = descriptor(
            &[("tenant", "t"), ("lg.burst", "0")],
            Some((1, RateLimitUnit::Second)),
        );
        let ok = descriptor(&[("tenant", "t")], Some((1, RateLimitUnit::Second)));
        assert_eq!(
            plan(&request(vec![ok.clone(), bad_burst], 1), None).unwrap_err(),
            RequestError::BadBurst {
                index: 1,
                value: "0".into()
            }
        );
        let twice = descriptor(
            &[("lg.burst", "1"), ("tenant", "t"), ("lg.burst", "2")],
            Some((1, RateLimitUnit::Second)),
        );
        assert_eq!(
            plan(&request(vec![twice], 1), None).unwrap_err(),
            RequestError::DuplicateBurst { index: 0 }
        );
        let zero = descriptor(&[("tenant", "t")], Some((0, RateLimitUnit::Second)));
        assert_eq!(
            plan(&request(vec![zero], 1), None).unwrap_err(),
            RequestError::ZeroLimit { index: 0 }
        );
        let unknown = descriptor(&[("tenant", "t")], Some((1, RateLimitUnit::Unknown)));
        assert_eq!(
            plan(&request(vec![unknown], 1), None).unwrap_err(),
            RequestError::UnknownUnit { index: 0, unit: 0 }
        );
        let week = descriptor(&[("tenant", "t")], Some((1, RateLimitUnit::Week)));
        let e = plan(&request(vec![week], 1), None).unwrap_err();
        assert_eq!(
            e,
            RequestError::UnsupportedUnit {
                index: 0,
                unit: Unit::Week
            }
        );
        assert!(e.to_string().contains("`week` is not supported"), "{e}");
    }

    #[test]
    fn entries_and_keys_over_their_limits_are_named() {
        let at = "v".repeat(MAX_ENTRY_BYTES);
        let over = "v".repeat(MAX_ENTRY_BYTES + 1);
        let limit = Some((10, RateLimitUnit::Minute));
        let ok = descriptor(&[("tenant", "t"), ("user", at.as_str())], limit);
        assert!(plan(&request(vec![ok.clone()], 1), None).is_ok());
        let big_value = descriptor(&[("tenant", "t"), ("user", over.as_str())], limit);
        let e = plan(&request(vec![ok.clone(), big_value], 1), None).unwrap_err();
        assert_eq!(
            e,
            RequestError::EntryTooLarge {
                index: 1,
                entry: 1,
                field: "value",
                bytes: MAX_ENTRY_BYTES + 1
            }
        );
        assert_eq!(
            e.to_string(),
            "descriptors[1].entries[1].value: 1025 bytes, over the limit of 1024 bytes"
        );
        // Unlimited descriptors are checked too: a key is never built from them, but the
        // request still carried them.
        let big_key = descriptor(&[(over.as_str(), "v")], None);
        assert!(matches!(
            plan(&request(vec![big_key], 1), None).unwrap_err(),
            RequestError::EntryTooLarge { field: "key", .. }
        ));
        // One entry within its limit can still escape past the key limit (`%20` triples).
        let spaces = " ".repeat(MAX_ENTRY_BYTES);
        let wide = descriptor(&[("tenant", "t"), ("user", spaces.as_str())], limit);
        let e = plan(&request(vec![wide], 1), None).unwrap_err();
        assert!(
            matches!(e, RequestError::KeyTooLarge { index: 0, bytes } if bytes > MAX_KEY_BYTES),
            "{e}"
        );
        assert!(e.to_string().contains("limit of 2048 bytes"), "{e}");
    }

    #[test]
    fn every_protocol_bucket_shape_gets_a_distinct_key() {
        let shapes: &[&[(&str, &str)]] = &[
            &[("tenant", "t"), ("bucket", "shared")],
            &[("tenant", "t"), ("bucket", "reserve"), ("class", "repair")],
            &[("tenant", "t"), ("bucket", "class"), ("class", "repair")],
            &[("tenant", "t"), ("bucket", "user"), ("user", "u")],
            &[("tenant", "t"), ("bucket", "tool"), ("tool", "search")],
            &[("tenant", "t"), ("bucket", "purpose"), ("purpose", "p")],
            &[("tenant", "t"), ("bucket", "model"), ("model", "m")],
            &[("bucket", "model_total"), ("model", "m")],
        ];
        let descriptors = shapes
            .iter()
            .map(|e| descriptor(e, Some((10, RateLimitUnit::Minute))))
            .collect();
        let p = plan(&request(descriptors, 1), None).unwrap();
        let mut keys: Vec<String> = p.into_iter().map(|c| c.unwrap().key).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), shapes.len());
    }
}
