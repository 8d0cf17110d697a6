//! Reconciliation through proxy-wasm shared data: one reporter per Envoy, not one per VM.
//!
//! Hits a worker admitted without the service (fail-open, or local decisions in degraded
//! mode) must reach the service so its accounting converges. Every worker VM publishes its
//! own ledger under one key of its own (`laneguard/unreported/<vm>`: every bucket's hits and
//! descriptor in one value), so no two workers ever write the same key; a shared index
//! lists those keys. Every VM's root ticks, so the VMs elect one reporter with a lease in
//! shared data (`laneguard/reconciler`, `"<vm id> <expiry ns>"`, taken with
//! compare-and-swap). The reporter drains each ledger with CAS (so a concurrent publish is
//! never lost) and sends the hits with `hits_addend`.
//!
//! proxy-wasm has no delete: a shared-data key, once written, lives as long as the Envoy.
//! So keys never carry a tenant, user or bucket: there are two fixed keys plus one per VM
//! ever started (workers times configuration loads), whatever the traffic. A drained ledger
//! is written back empty, so its bytes go back to a few; while the service is down a ledger
//! holds at most [`MAX_LEDGER_ENTRIES`] buckets (beyond that the buckets with the fewest
//! hits are forgotten, counted in `unreported_dropped`). [`footprint`] counts the keys and
//! their bytes (stats `shared_data.keys`, `shared_data.bytes`).
//!
//! proxy-wasm has no atomic create-if-absent (CAS with no token is an unconditional write),
//! so the two shared keys are seeded at VM start when absent, and a worker only creates
//! keys that carry its own VM id.

use crate::host::{Host, SharedDataError};
use laneguard_core::Bucket;
use laneguard_protos::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use laneguard_protos::prost::Message;
use std::collections::HashMap;

const INDEX: &str = "laneguard/unreported/index";
const LEADER: &str = "laneguard/reconciler";
const CAS_TRIES: usize = 8;
/// The most buckets one VM's published ledger holds (the default `service.max_buckets`).
pub const MAX_LEDGER_ENTRIES: usize = 100_000;

/// Seed the shared keys if no VM has yet (see the module doc).
pub fn seed(h: &dyn Host) {
    for key in [INDEX, LEADER] {
        if let Ok((None, _)) = h.get_shared_data(key) {
            let _ = h.set_shared_data(key, b"", None);
        }
    }
}

/// This VM's ledger key.
fn ledger_key(vm: u64) -> String {
    format!("laneguard/unreported/{vm:016x}")
}

/// A ledger: (hits, encoded descriptor) per bucket, in a value of
/// `[hits u64 LE][descriptor length u32 LE][descriptor]...`.
type Ledger = Vec<(u64, Vec<u8>)>;

fn encode_ledger(entries: &Ledger) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.iter().map(|(_, d)| 12 + d.len()).sum());
    for (hits, d) in entries {
        v.extend_from_slice(&hits.to_le_bytes());
        v.extend_from_slice(&u32::try_from(d.len()).unwrap_or(u32::MAX).to_le_bytes());
        v.extend_from_slice(d);
    }
    v
}

/// Decode a ledger; a damaged tail is dropped (it cannot be attributed).
fn decode_ledger(mut bytes: &[u8]) -> Ledger {
    let mut out = Vec::new();
    while let Some((head, rest)) = bytes.split_at_checked(12) {
        let (h8, l4) = head.split_at(8);
        let (Ok(h8), Ok(l4)) = (<[u8; 8]>::try_from(h8), <[u8; 4]>::try_from(l4)) else {
            break;
        };
        let len = u32::from_le_bytes(l4) as usize;
        let Some((d, rest)) = rest.split_at_checked(len) else {
            break;
        };
        out.push((u64::from_le_bytes(h8), d.to_vec()));
        bytes = rest;
    }
    out
}

/// Merge `add` into `ledger` (by descriptor), keeping at most [`MAX_LEDGER_ENTRIES`]: beyond
/// that the entries with the fewest hits go. Returns how many hits were dropped.
fn merge(ledger: &mut Ledger, add: &[(u64, Vec<u8>)]) -> u64 {
    let mut at: HashMap<Vec<u8>, usize> = ledger
        .iter()
        .enumerate()
        .map(|(i, (_, d))| (d.clone(), i))
        .collect();
    for (hits, d) in add {
        match at.get(d) {
            Some(&i) => {
                if let Some(e) = ledger.get_mut(i) {
                    e.0 = e.0.saturating_add(*hits);
                }
            }
            None => {
                at.insert(d.clone(), ledger.len());
                ledger.push((*hits, d.clone()));
            }
        }
    }
    if ledger.len() <= MAX_LEDGER_ENTRIES {
        return 0;
    }
    ledger.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
    ledger
        .split_off(MAX_LEDGER_ENTRIES)
        .iter()
        .map(|(h, _)| *h)
        .sum()
}

/// Merge entries into a ledger key with CAS. `Err` when it could not (the caller keeps
/// them); `Ok(dropped hits)`.
fn add(h: &dyn Host, key: &str, entries: &[(u64, Vec<u8>)]) -> Result<u64, ()> {
    for _ in 0..CAS_TRIES {
        let (current, cas) = h.get_shared_data(key).map_err(|_| ())?;
        let mut ledger = current.as_deref().map(decode_ledger).unwrap_or_default();
        let dropped = merge(&mut ledger, entries);
        match h.set_shared_data(key, &encode_ledger(&ledger), cas) {
            Ok(()) => return Ok(dropped),
            Err(SharedDataError::CasMismatch) => continue,
            Err(_) => return Err(()),
        }
    }
    Err(())
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

/// What [`publish`] did.
#[derive(Debug, Default)]
pub struct Published {
    /// Hits that could not be published: the caller keeps them for the next round.
    pub failed: Vec<(Bucket, u64)>,
    /// Hits forgotten because the ledger was at [`MAX_LEDGER_ENTRIES`].
    pub dropped: u64,
}

/// Publish this worker's unreported hits into its ledger key.
pub fn publish(h: &dyn Host, vm: u64, hits: Vec<(Bucket, u64)>) -> Published {
    let key = ledger_key(vm);
    let entries: Ledger = hits
        .iter()
        .map(|(b, n)| (*n, crate::rls::descriptor(b, None).encode_to_vec()))
        .collect();
    if !index_add(h, &key) {
        return Published {
            failed: hits,
            dropped: 0,
        };
    }
    match add(h, &key, &entries) {
        Ok(dropped) => Published {
            failed: Vec::new(),
            dropped,
        },
        Err(()) => Published {
            failed: hits,
            dropped: 0,
        },
    }
}

/// Shared data this filter holds in this Envoy: (keys, bytes of their values). Keys: the
/// index, the reporter lease and every VM's ledger the index lists.
pub fn footprint(h: &dyn Host) -> (u64, u64) {
    let size = |k: &str| match h.get_shared_data(k) {
        Ok((Some(v), _)) => Some(v.len() as u64),
        _ => None,
    };
    let mut keys = 0;
    let mut bytes = 0;
    let ledgers = index_keys(h).map(|(k, _)| k).unwrap_or_default();
    for k in [INDEX, LEADER]
        .into_iter()
        .chain(ledgers.iter().map(String::as_str))
    {
        if let Some(n) = size(k) {
            keys += 1;
            bytes += n;
        }
    }
    (keys, bytes)
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

/// Drain every published ledger (CAS to empty). Returns the descriptors with the hits to
/// report and the ledger key each came from (to give them back on failure).
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
            if value.is_empty() {
                break;
            }
            match h.set_shared_data(&key, b"", cas) {
                Ok(()) => {
                    for (hits, d) in decode_ledger(&value) {
                        if let (true, Ok(descriptor)) =
                            (hits > 0, RateLimitDescriptor::decode(&d[..]))
                        {
                            out.push((key.clone(), descriptor, hits));
                        }
                    }
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
    let mut by_key: HashMap<&str, Ledger> = HashMap::new();
    for (key, descriptor, hits) in entries {
        by_key
            .entry(key.as_str())
            .or_default()
            .push((*hits, descriptor.encode_to_vec()));
    }
    for (key, ledger) in by_key {
        match add(h, key, &ledger) {
            Ok(0) => {}
            Ok(dropped) => {
                log::warn!("laneguard: ledger full, {dropped} unreported hits forgotten")
            }
            Err(()) => {
                let lost: u64 = ledger.iter().map(|(n, _)| n).sum();
                log::warn!("laneguard: lost {lost} unreported hits for {key}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_round_trips_and_merges_by_descriptor() {
        let mut l: Ledger = vec![(3, b"a".to_vec()), (1, b"bb".to_vec())];
        let bytes = encode_ledger(&l);
        assert_eq!(decode_ledger(&bytes), l);
        assert_eq!(merge(&mut l, &[(2, b"a".to_vec()), (5, b"".to_vec())]), 0);
        assert_eq!(
            l,
            vec![(5, b"a".to_vec()), (1, b"bb".to_vec()), (5, Vec::new())]
        );
        // A damaged tail is dropped, the whole entries before it kept.
        let bytes = encode_ledger(&l);
        assert_eq!(decode_ledger(&bytes[..bytes.len() - 1]).len(), 2);
        assert!(decode_ledger(b"short").is_empty());
    }

    #[test]
    fn a_full_ledger_forgets_the_buckets_with_the_fewest_hits() {
        let mut l: Ledger = (0..MAX_LEDGER_ENTRIES as u64)
            .map(|i| (i + 10, i.to_le_bytes().to_vec()))
            .collect();
        let dropped = merge(&mut l, &[(1, b"new-a".to_vec()), (2, b"new-b".to_vec())]);
        assert_eq!(dropped, 3, "the two newcomers had the fewest hits");
        assert_eq!(l.len(), MAX_LEDGER_ENTRIES);
    }
}
