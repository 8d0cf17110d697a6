//! Audit records out of the worker: into Envoy's filter state (for the access log) at once,
//! and to the service's hash-chained log in batches from the root tick.
//!
//! Shipping never delays a request: a request only pushes its record into this worker's
//! [`Outbox`]. One batch is in flight at a time, and it carries the whole backlog (up to
//! `audit.max_batch` records and [`MAX_BATCH_BYTES`]); when it is answered and more records
//! wait, the next batch goes out at once, not on the next tick. So the shipping rate follows
//! the flood: a batch per round trip to the service, each as large as what came in
//! meanwhile (issue 14 item 4: a fixed 100 records per 100 ms tick dropped most records of
//! a flood). The outbox is bounded (`audit.max_buffer`): when the service is unreachable (or
//! slower than the flood) and it fills, new records are dropped and counted
//! (`laneguard.audit.dropped`); the access log still has them. After a failure the outbox
//! waits (1 s, doubling up to 30 s) before it tries again.

use crate::host::Host;
use crate::root::Shared;
use laneguard_protos::laneguard::audit::v1::{AppendRequest, AppendResponse};
use laneguard_protos::prost::Message;
use std::collections::VecDeque;

pub const SERVICE: &str = laneguard_protos::AUDIT_SERVICE_NAME;
pub const METHOD: &str = laneguard_protos::AUDIT_APPEND_METHOD;
pub const TIMEOUT_MS: u64 = 2_000;
/// The filter-state key: Envoy stores it as `wasm.laneguard_audit`, which the access log
/// prints with `%FILTER_STATE(wasm.laneguard_audit:PLAIN)%`.
pub const FILTER_STATE: &str = "laneguard_audit";
/// The caller's fields for the access log (`tenant=.. principal=.. user=.. declared=..
/// request_id=..`, `laneguard_core::logsafe::caller_fields`), printed with
/// `%FILTER_STATE(wasm.laneguard_caller:PLAIN)%`.
pub const CALLER_STATE: &str = "laneguard_caller";
/// A status for a call that could not even be dispatched.
pub const DISPATCH_FAILED: u32 = u32::MAX;
/// Bytes of records per call, well under the service's 4 MiB gRPC message limit.
pub const MAX_BATCH_BYTES: usize = 512 * 1024;
const GRPC_UNIMPLEMENTED: u32 = 12;
const FIRST_BACKOFF_TICKS: u32 = 10;
const MAX_BACKOFF_TICKS: u32 = 300;

pub struct Outbox {
    records: VecDeque<String>,
    max: usize,
    in_flight: bool,
    /// Ticks to wait before the next try, and the wait after the next failure.
    cooldown: u32,
    backoff: u32,
    /// The last call failed (so a recovery is logged once, and a failure once).
    failing: bool,
}

impl Outbox {
    pub fn new(max: usize) -> Outbox {
        Outbox {
            records: VecDeque::new(),
            max: max.max(1),
            in_flight: false,
            cooldown: 0,
            backoff: FIRST_BACKOFF_TICKS,
            failing: false,
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Queue a record. False when the buffer is full (the record is dropped).
    pub fn push(&mut self, record: String) -> bool {
        if self.records.len() >= self.max {
            return false;
        }
        self.records.push_back(record);
        true
    }

    /// The next batch to send, if one may go: the oldest records, at most `max_batch` of
    /// them and [`MAX_BATCH_BYTES`] (at least one). Called once per tick, and again when a
    /// batch was answered; a tick spends one tick of the back-off after a failure.
    pub fn next_batch(&mut self, ship: bool, max_batch: usize) -> Option<Vec<String>> {
        if !ship || self.in_flight || self.records.is_empty() {
            return None;
        }
        if self.cooldown > 0 {
            self.cooldown -= 1;
            return None;
        }
        let mut bytes = 0;
        let n = self
            .records
            .iter()
            .take(max_batch.max(1))
            .take_while(|r| {
                bytes += r.len();
                bytes <= MAX_BATCH_BYTES
            })
            .count()
            .max(1);
        self.in_flight = true;
        Some(self.records.drain(..n).collect())
    }

    /// Put a batch back at the front, as far as there is room. Returns how many were lost.
    fn give_back(&mut self, batch: Vec<String>) -> usize {
        let room = self.max.saturating_sub(self.records.len());
        let lost = batch.len().saturating_sub(room);
        // Keep the newest of the batch, so what stays is contiguous with the buffer.
        for r in batch.into_iter().skip(lost).rev() {
            self.records.push_front(r);
        }
        lost
    }
}

pub fn encode(batch: &[String]) -> Vec<u8> {
    AppendRequest {
        records: batch.to_vec(),
    }
    .encode_to_vec()
}

/// Take in the outcome of a shipped batch.
pub fn shipped(
    h: &dyn Host,
    shared: &Shared,
    batch: Vec<String>,
    status: u32,
    body: Option<&[u8]>,
) {
    let m = &shared.metrics;
    let mut out = shared.audit.borrow_mut();
    out.in_flight = false;
    if status == 0 {
        let resp = body
            .and_then(|b| AppendResponse::decode(b).ok())
            .unwrap_or_default();
        m.audit_shipped.add(h, u64::from(resp.appended));
        if resp.rejected > 0 {
            m.audit_dropped.add(h, u64::from(resp.rejected));
        }
        if out.failing {
            log::info!("laneguard: audit records reach the service again");
        }
        out.failing = false;
        out.backoff = FIRST_BACKOFF_TICKS;
        return;
    }
    m.audit_ship_errors.inc(h);
    let n = batch.len();
    let lost = if status == GRPC_UNIMPLEMENTED {
        // This service keeps no audit log (no --audit-log): resending will not help.
        out.backoff = MAX_BACKOFF_TICKS;
        n
    } else {
        out.give_back(batch)
    };
    if lost > 0 {
        m.audit_dropped.add(h, lost as u64);
    }
    if !out.failing {
        let cluster = &shared.policy.ops.audit.cluster;
        if status == GRPC_UNIMPLEMENTED {
            log::warn!(
                "laneguard: the service on cluster {cluster:?} keeps no audit log (start it with --audit-log FILE, \
                 or set audit.ship: false); {n} records dropped, the access log still has them"
            );
        } else {
            log::warn!(
                "laneguard: cannot ship audit records to cluster {cluster:?} (status {status}); \
                 keeping up to {} and retrying",
                shared.policy.ops.audit.max_buffer
            );
        }
    }
    out.failing = true;
    out.cooldown = out.backoff;
    out.backoff = (out.backoff * 2).min(MAX_BACKOFF_TICKS);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_is_bounded_and_batches_one_at_a_time() {
        let mut o = Outbox::new(3);
        for i in 0..5 {
            let kept = o.push(format!("r{i}"));
            assert_eq!(kept, i < 3);
        }
        assert_eq!(o.next_batch(true, 2), Some(vec!["r0".into(), "r1".into()]));
        assert_eq!(o.next_batch(true, 2), None, "one in flight");
        o.in_flight = false;
        assert!(o.push("r3".into()));
        // The batch comes back in front; one of the two no longer fits.
        assert_eq!(o.give_back(vec!["r0".into(), "r1".into()]), 1);
        assert_eq!(
            o.next_batch(true, 10),
            Some(vec!["r1".into(), "r2".into(), "r3".into()])
        );
        assert_eq!(Outbox::new(3).next_batch(false, 1), None);
    }

    #[test]
    fn a_batch_is_the_backlog_up_to_the_record_and_byte_bounds() {
        let mut o = Outbox::new(10_000);
        let record = "r".repeat(1000);
        for _ in 0..2000 {
            assert!(o.push(record.clone()));
        }
        let b = o.next_batch(true, 5000).unwrap();
        assert_eq!(b.len(), MAX_BATCH_BYTES / 1000, "bounded by bytes");
        o.in_flight = false;
        assert_eq!(o.next_batch(true, 10).unwrap().len(), 10, "by records");
        o.in_flight = false;
        // One record larger than the byte bound still goes, alone.
        let mut big = Outbox::new(3);
        big.push("x".repeat(MAX_BATCH_BYTES + 1));
        big.push("y".into());
        assert_eq!(big.next_batch(true, 10).unwrap().len(), 1);
    }
}
