//! Reconciliation through proxy-wasm shared data: one reporter per Envoy, not one per VM.
//!
//! Hits a worker admitted without the service (fail-open, or local decisions in degraded
//! mode) must reach the service so its accounting converges. Every worker VM publishes its
//! own ledger under one key of its own (`laneguard/ledger2/<vm>`: every bucket's hits, the
//! time of its first hit, and its descriptor in one value), so no two workers ever write the same key; a shared index
//! lists those keys. Every VM's root ticks, so the VMs elect one reporter with a lease in
//! shared data (`laneguard/reconciler`, `"<vm id> <expiry ns>"`, taken with
//! compare-and-swap). The reporter drains each ledger with CAS (so a concurrent publish is
//! never lost) and sends the hits with `hits_addend`.
//!
//! proxy-wasm has no delete: a shared-data key, once written, lives as long as the Envoy.
//! So keys never carry a tenant, user or bucket: there are two fixed keys plus one per VM
//! ever started (workers times configuration loads), whatever the traffic. A drained ledger
//! is written back empty, so its bytes go back to a few; while the service is down a ledger
//! holds at most [`MAX_LEDGER_BYTES`] (beyond that the buckets with the fewest hits are
//! forgotten, counted in `unreported_dropped`), so neither the shared data nor the VM
//! memory that reads and rewrites it grows with the tenants an outage sees. [`footprint`]
//! counts the keys and their bytes (stats `shared_data.keys`, `shared_data.bytes`).
//!
//! proxy-wasm has no atomic create-if-absent (CAS with no token is an unconditional write),
//! so the two shared keys are seeded at VM start when absent, and a worker only creates
//! keys that carry its own VM id.

use crate::host::{Host, SharedDataError};
use laneguard_core::Pending;
use laneguard_protos::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use laneguard_protos::prost::Message;
use std::collections::HashMap;

/// The keys carry the ledger format's version: `laneguard/unreported/...` held no time of
/// first hit, and a filter of that version loaded in the same Envoy keeps its own keys.
const INDEX: &str = "laneguard/ledger2/index";
const LEADER: &str = "laneguard/reconciler";
const CAS_TRIES: usize = 8;
/// The most bytes one VM's published ledger holds: about 10,000 buckets of a tenant, a
/// user and a class (some 100 bytes each). Every publish reads, merges and rewrites the
/// whole value, and the reporter decodes every ledger at once, so this bounds the shared
/// data (one ledger per worker VM), the VM memory a publish or a report needs, and the
/// time a worker spends on it in a tick. The million-tenant soak (docs/reliability.md)
/// reached 54 MB of shared data and 234 MiB of VM memory with a 100,000-bucket cap instead.
pub const MAX_LEDGER_BYTES: usize = 1 << 20;

/// One ledger entry's encoded size.
fn entry_bytes(descriptor: &[u8]) -> usize {
    ENTRY_HEAD + descriptor.len()
}

/// An entry's fixed part: hits (u64), since (u64), descriptor length (u32).
const ENTRY_HEAD: usize = 20;

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
    format!("laneguard/ledger2/{vm:016x}")
}

/// One bucket's entry in a ledger: its hits, the wall-clock time of the first of them (ns),
/// and its encoded descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    hits: u64,
    since_ns: u64,
    descriptor: Vec<u8>,
}

/// A ledger: an [`Entry`] per bucket, in a value of
/// `[hits u64 LE][since u64 LE][descriptor length u32 LE][descriptor]...`.
type Ledger = Vec<Entry>;

fn encode_ledger(entries: &Ledger) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.iter().map(|e| entry_bytes(&e.descriptor)).sum());
    for e in entries {
        v.extend_from_slice(&e.hits.to_le_bytes());
        v.extend_from_slice(&e.since_ns.to_le_bytes());
        let len = u32::try_from(e.descriptor.len()).unwrap_or(u32::MAX);
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&e.descriptor);
    }
    v
}

/// Decode a ledger; a damaged tail is dropped (it cannot be attributed).
fn decode_ledger(mut bytes: &[u8]) -> Ledger {
    let mut out = Vec::new();
    while let Some((head, rest)) = bytes.split_at_checked(ENTRY_HEAD) {
        let (h8, rest8) = head.split_at(8);
        let (s8, l4) = rest8.split_at(8);
        let (Ok(h8), Ok(s8), Ok(l4)) = (
            <[u8; 8]>::try_from(h8),
            <[u8; 8]>::try_from(s8),
            <[u8; 4]>::try_from(l4),
        ) else {
            break;
        };
        let len = u32::from_le_bytes(l4) as usize;
        let Some((d, rest)) = rest.split_at_checked(len) else {
            break;
        };
        out.push(Entry {
            hits: u64::from_le_bytes(h8),
            since_ns: u64::from_le_bytes(s8),
            descriptor: d.to_vec(),
        });
        bytes = rest;
    }
    out
}

/// Merge `add` into `ledger` (by descriptor: hits add up, the earliest time of first hit
/// stays), keeping at most [`MAX_LEDGER_BYTES`] encoded: beyond that the entries with the
/// fewest hits go (of equal hits, the newest). Returns how many hits were dropped.
fn merge(ledger: &mut Ledger, add: &[Entry]) -> u64 {
    let mut at: HashMap<Vec<u8>, usize> = ledger
        .iter()
        .enumerate()
        .map(|(i, e)| (e.descriptor.clone(), i))
        .collect();
    for e in add {
        match at.get(&e.descriptor) {
            Some(&i) => {
                if let Some(old) = ledger.get_mut(i) {
                    old.hits = old.hits.saturating_add(e.hits);
                    old.since_ns = old.since_ns.min(e.since_ns);
                }
            }
            None => {
                at.insert(e.descriptor.clone(), ledger.len());
                ledger.push(e.clone());
            }
        }
    }
    drop(at);
    if ledger
        .iter()
        .map(|e| entry_bytes(&e.descriptor))
        .sum::<usize>()
        <= MAX_LEDGER_BYTES
    {
        return 0;
    }
    // Stable: of equal hits the entries already published stay.
    ledger.sort_by_key(|e| std::cmp::Reverse(e.hits));
    let mut bytes = 0usize;
    let keep = ledger
        .iter()
        .take_while(|e| {
            bytes += entry_bytes(&e.descriptor);
            bytes <= MAX_LEDGER_BYTES
        })
        .count();
    ledger.split_off(keep).iter().map(|e| e.hits).sum()
}

/// Merge entries into a ledger key with CAS. `Err` when it could not (the caller keeps
/// them); `Ok(dropped hits)`.
fn add(h: &dyn Host, key: &str, entries: &[Entry]) -> Result<u64, ()> {
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
    pub failed: Vec<Pending>,
    /// Hits forgotten because the ledger was at [`MAX_LEDGER_BYTES`].
    pub dropped: u64,
}

/// Publish this worker's unreported hits into its ledger key.
pub fn publish(h: &dyn Host, vm: u64, hits: Vec<Pending>) -> Published {
    let key = ledger_key(vm);
    let entries: Ledger = hits
        .iter()
        .map(|p| Entry {
            hits: p.hits,
            since_ns: p.since_ns,
            descriptor: crate::rls::descriptor(&p.bucket, None).encode_to_vec(),
        })
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

/// Shared data this filter holds in this Envoy: (keys, bytes of their values), or `None`
/// when the index cannot be read (the caller keeps its last figure). Keys: the index and
/// the reporter lease (both seeded at VM start) and every ledger the index lists. They are
/// counted from the index, not by reading each key: Envoy hands an empty value back as
/// absent (it allocates nothing for 0 bytes), so a drained ledger, which still exists (there
/// is no delete), would not be counted by reading it, and the count would fall and rise with
/// every drain. A ledger is listed just before its first write and never unlisted.
pub fn footprint(h: &dyn Host) -> Option<(u64, u64)> {
    let size = |k: &str| match h.get_shared_data(k) {
        Ok((Some(v), _)) => v.len() as u64,
        _ => 0,
    };
    let (ledgers, _) = index_keys(h)?;
    let bytes = [INDEX, LEADER]
        .into_iter()
        .chain(ledgers.iter().map(String::as_str))
        .map(size)
        .sum();
    Some((2 + ledgers.len() as u64, bytes))
}

/// The hits in every published ledger (tests: what a drain would report).
#[cfg(test)]
pub(crate) fn published_hits(h: &dyn Host) -> u64 {
    let keys = index_keys(h).map(|(k, _)| k).unwrap_or_default();
    keys.iter()
        .filter_map(|k| h.get_shared_data(k).ok().and_then(|(v, _)| v))
        .flat_map(|v| decode_ledger(&v))
        .map(|e| e.hits)
        .sum()
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

/// Hits drained from a ledger, to report.
#[derive(Debug, Clone, PartialEq)]
pub struct Drained {
    /// The ledger key they came from (to give them back on failure).
    pub key: String,
    pub descriptor: RateLimitDescriptor,
    pub hits: u64,
    /// The wall-clock time of the first of them (ns): the report says how long ago that was.
    pub since_ns: u64,
}

impl Drained {
    /// The descriptor a report sends: the bucket's, with the hits as its `hits_addend` and
    /// the age of the first of them at `now_ns` (`lg.age_ms`, `laneguard_core::engine::
    /// report_age_ms`), so the service charges only what they exceeded the bucket's refill
    /// over that time by.
    pub fn report_descriptor(&self, now_ns: u64) -> RateLimitDescriptor {
        let mut d = self.descriptor.clone();
        d.hits_addend = Some(self.hits);
        let age = laneguard_core::engine::report_age_ms(self.since_ns, now_ns);
        d.entries.push(crate::rls::age_entry(age));
        d
    }
}

/// Drain every published ledger (CAS to empty). Returns the descriptors with the hits to
/// report and the ledger key each came from.
pub fn drain(h: &dyn Host) -> Vec<Drained> {
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
                    for e in decode_ledger(&value) {
                        if let (true, Ok(descriptor)) =
                            (e.hits > 0, RateLimitDescriptor::decode(&e.descriptor[..]))
                        {
                            out.push(Drained {
                                key: key.clone(),
                                descriptor,
                                hits: e.hits,
                                since_ns: e.since_ns,
                            });
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
pub fn give_back(h: &dyn Host, entries: &[Drained]) {
    let mut by_key: HashMap<&str, Ledger> = HashMap::new();
    for d in entries {
        by_key.entry(d.key.as_str()).or_default().push(Entry {
            hits: d.hits,
            since_ns: d.since_ns,
            descriptor: d.descriptor.encode_to_vec(),
        });
    }
    for (key, ledger) in by_key {
        match add(h, key, &ledger) {
            Ok(0) => {}
            Ok(dropped) => {
                log::warn!("laneguard: ledger full, {dropped} unreported hits forgotten")
            }
            Err(()) => {
                let lost: u64 = ledger.iter().map(|e| e.hits).sum();
                log::warn!("laneguard: lost {lost} unreported hits for {key}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(hits: u64, since_ns: u64, descriptor: &[u8]) -> Entry {
        Entry {
            hits,
            since_ns,
            descriptor: descriptor.to_vec(),
        }
    }

    #[test]
    fn a_ledger_round_trips_and_merges_by_descriptor() {
        let mut l: Ledger = vec![e(3, 50, b"a"), e(1, 60, b"bb")];
        let bytes = encode_ledger(&l);
        assert_eq!(decode_ledger(&bytes), l);
        // Hits add up; the earliest time of a first hit stays, whichever side holds it.
        assert_eq!(
            merge(&mut l, &[e(2, 40, b"a"), e(5, 70, b""), e(1, 90, b"bb")]),
            0
        );
        assert_eq!(l, vec![e(5, 40, b"a"), e(2, 60, b"bb"), e(5, 70, b"")]);
        // A damaged tail is dropped, the whole entries before it kept.
        let bytes = encode_ledger(&l);
        assert_eq!(decode_ledger(&bytes[..bytes.len() - 1]).len(), 2);
        assert!(decode_ledger(b"short").is_empty());
    }

    #[test]
    fn a_full_ledger_forgets_the_buckets_with_the_fewest_hits() {
        // Entries of 20 + 8 bytes: the ledger holds this many.
        let fit = (MAX_LEDGER_BYTES / 28) as u64;
        let mut l: Ledger = (0..fit).map(|i| e(i + 10, i, &i.to_le_bytes())).collect();
        assert_eq!(
            merge(&mut l, &[e(4, 0, &3u64.to_le_bytes())]),
            0,
            "no room needed"
        );
        let dropped = merge(&mut l, &[e(1, 0, b"new-a-xx"), e(2, 0, b"new-b-xx")]);
        assert_eq!(dropped, 3, "the two newcomers had the fewest hits");
        assert_eq!(l.len() as u64, fit);
        assert_eq!(
            l.iter()
                .find(|x| x.descriptor == 3u64.to_le_bytes())
                .map(|x| (x.hits, x.since_ns)),
            Some((17, 0))
        );
        assert!(encode_ledger(&l).len() <= MAX_LEDGER_BYTES);
    }

    #[test]
    fn a_ledger_stays_under_its_byte_cap_however_many_tenants_an_outage_sees() {
        // 200,000 tenants' buckets of a realistic size, published 1,000 a tick: the value
        // never passes the cap, and the hits it forgets are exactly the ones it lost.
        let descriptor = |i: u64| {
            crate::rls::descriptor(
                &laneguard_core::Bucket {
                    kind: laneguard_core::BucketKind::Class,
                    tenant: format!("r{i:016x}"),
                    label: "interactive".into(),
                    rate: laneguard_core::Rate::new(50, laneguard_core::Window::Second, 50)
                        .unwrap(),
                    key: format!("laneguard|r{i:016x}|interactive"),
                },
                None,
            )
            .encode_to_vec()
        };
        let mut l = Ledger::new();
        let mut dropped = 0;
        let mut total = 0;
        for tick in 0..200u64 {
            let add: Ledger = (0..1_000)
                .map(|i| Entry {
                    hits: 1 + i % 3,
                    since_ns: tick,
                    descriptor: descriptor(tick * 1_000 + i),
                })
                .collect();
            total += add.iter().map(|e| e.hits).sum::<u64>();
            dropped += merge(&mut l, &add);
            assert!(encode_ledger(&l).len() <= MAX_LEDGER_BYTES, "tick {tick}");
        }
        let kept: u64 = l.iter().map(|e| e.hits).sum();
        assert_eq!(kept + dropped, total, "every hit is kept or counted");
        assert!(
            l.len() > 5_000,
            "the cap holds thousands of buckets: {}",
            l.len()
        );
        assert!(
            l.iter().all(|e| e.hits == 3),
            "the buckets with the most hits stay"
        );
    }
}
