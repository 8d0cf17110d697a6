//! Reconciliation through proxy-wasm shared data: one reporter per Envoy, not one per VM.
//!
//! Hits a worker admitted without the service (fail-open, or local decisions in degraded
//! mode) must reach the service so its accounting converges. Every worker VM publishes its
//! own ledger under its own keys (`laneguard/unreported/<vm>/<bucket key>`), so no two
//! workers ever write the same key; a shared index lists those keys. Every VM's root ticks,
//! so the VMs elect one reporter with a lease in shared data (`laneguard/reconciler`,
//! `"<vm id> <expiry ns>"`, taken with compare-and-swap). The reporter drains each key with
//! CAS (so a concurrent publish is never lost) and sends the hits with `hits_addend`.
//!
//! proxy-wasm has no atomic create-if-absent (CAS with no token is an unconditional write),
//! so the two shared keys are seeded at VM start when absent, and a worker only creates
//! keys that carry its own VM id.

use crate::host::{Host, SharedDataError};
use laneguard_core::Bucket;
use laneguard_protos::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use laneguard_protos::prost::Message;

const INDEX: &str = "laneguard/unreported/index";
const LEADER: &str = "laneguard/reconciler";
const CAS_TRIES: usize = 8;

/// Seed the shared keys if no VM has yet (see the module doc).
pub fn seed(h: &dyn Host) {
    for key in [INDEX, LEADER] {
        if let Ok((None, _)) = h.get_shared_data(key) {
            let _ = h.set_shared_data(key, b"", None);
        }
    }
}

fn encode_entry(hits: u64, descriptor: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + descriptor.len());
    v.extend_from_slice(&hits.to_le_bytes());
    v.extend_from_slice(descriptor);
    v
}

fn decode_entry(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (head, rest) = bytes.split_at_checked(8)?;
    let hits = u64::from_le_bytes(head.try_into().ok()?);
    Some((hits, rest))
}

/// Add `hits` to a shared key with CAS. Returns false if it could not (the caller keeps
/// the hits for the next round).
fn add(h: &dyn Host, key: &str, hits: u64, descriptor: &[u8]) -> bool {
    for _ in 0..CAS_TRIES {
        let (current, cas) = match h.get_shared_data(key) {
            Ok(x) => x,
            Err(_) => return false,
        };
        let (have, desc) = match current.as_deref().and_then(decode_entry) {
            Some((h, d)) => (h, d.to_vec()),
            None => (0, descriptor.to_vec()),
        };
        let value = encode_entry(have.saturating_add(hits), &desc);
        match h.set_shared_data(key, &value, cas) {
            Ok(()) => return true,
            Err(SharedDataError::CasMismatch) => continue,
            Err(_) => return false,
        }
    }
    false
}

fn index_keys(h: &dyn Host) -> Option<(Vec<String>, Option<u32>)> {
    let (value, cas) = h.get_shared_data(INDEX).ok()?;
    let text = value
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default();
    Some((
        text.lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        cas,
    ))
}

fn index_add(h: &dyn Host, key: &str) -> bool {
    for _ in 0..CAS_TRIES {
        let Some((mut keys, cas)) = index_keys(h) else {
            return false;
        };
        if keys.iter().any(|k| k == key) {
            return true;
        }
        keys.push(key.to_string());
        match h.set_shared_data(INDEX, keys.join("\n").as_bytes(), cas) {
            Ok(()) => return true,
            Err(SharedDataError::CasMismatch) => continue,
            Err(_) => return false,
        }
    }
    false
}

/// Publish this worker's unreported hits. Returns what could not be published.
pub fn publish(h: &dyn Host, vm: u64, hits: Vec<(Bucket, u64)>) -> Vec<(Bucket, u64)> {
    let mut failed = Vec::new();
    for (bucket, n) in hits {
        let key = format!("laneguard/unreported/{vm:016x}/{}", bucket.key);
        let descriptor = crate::rls::descriptor(&bucket, None).encode_to_vec();
        if !(index_add(h, &key) && add(h, &key, n, &descriptor)) {
            failed.push((bucket, n));
        }
    }
    failed
}

/// Take or renew the reporter lease. Exactly one VM holds it at a time (CAS); it expires
/// after `ttl_ns` so a VM that goes away hands over.
pub fn lead(h: &dyn Host, vm: u64, now_ns: u64, ttl_ns: u64) -> bool {
    let Ok((value, cas)) = h.get_shared_data(LEADER) else {
        return false;
    };
    let text = value
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default();
    let mut parts = text.split_whitespace();
    let holder = parts.next().and_then(|h| u64::from_str_radix(h, 16).ok());
    let expiry = parts
        .next()
        .and_then(|e| e.parse::<u64>().ok())
        .unwrap_or(0);
    if holder.is_some_and(|h| h != vm) && expiry > now_ns {
        return false;
    }
    let claim = format!("{vm:016x} {}", now_ns.saturating_add(ttl_ns));
    h.set_shared_data(LEADER, claim.as_bytes(), cas).is_ok()
}

/// Drain every published ledger entry (CAS to zero). Returns the descriptors with the
/// hits to report, and the shared keys they came from (to give them back on failure).
pub fn drain(h: &dyn Host) -> Vec<(String, RateLimitDescriptor, u64)> {
    let mut out = Vec::new();
    let Some((keys, _)) = index_keys(h) else {
        return out;
    };
    for key in keys {
        for _ in 0..CAS_TRIES {
            let Ok((Some(value), cas)) = h.get_shared_data(&key) else {
                break;
            };
            let Some((hits, desc)) = decode_entry(&value) else {
                break;
            };
            if hits == 0 {
                break;
            }
            let Ok(descriptor) = RateLimitDescriptor::decode(desc) else {
                break;
            };
            match h.set_shared_data(&key, &encode_entry(0, desc), cas) {
                Ok(()) => {
                    out.push((key.clone(), descriptor, hits));
                    break;
                }
                Err(SharedDataError::CasMismatch) => continue,
                Err(_) => break,
            }
        }
    }
    out
}

/// A report failed: put the hits back where they came from.
pub fn give_back(h: &dyn Host, entries: &[(String, RateLimitDescriptor, u64)]) {
    for (key, descriptor, hits) in entries {
        if !add(h, key, *hits, &descriptor.encode_to_vec()) {
            log::warn!("laneguard: lost {hits} unreported hits for {key}");
        }
    }
}
