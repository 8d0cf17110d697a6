//! The root context's tick against the scripted host: lease renewal, the report of hits
//! admitted without the service (reconciliation through shared data), queued requests
//! (in `request::tests`), audit shipping, and the gauges.

use crate::host::DispatchError;
use crate::mock::{
    configured, deliver, headers, lease_answer, refused_centrally, rls_answer, seen, start, Call,
    MockHost, Status, MS, POLICY,
};
use crate::root::Root;
use laneguard_protos::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::Code;
use laneguard_protos::laneguard::audit::v1::{AppendRequest, AppendResponse};
use laneguard_protos::prost::Message;

/// Answer one of the root context's calls.
fn answer_root(h: &MockHost, root: &mut Root, call: &Call, status: u32, body: Option<Vec<u8>>) {
    let size = body.as_ref().map_or(0, Vec::len);
    *h.grpc_body.borrow_mut() = body;
    root.on_grpc_response(h, call.token, status, size);
}

fn tick(h: &MockHost, root: &mut Root, n: usize) {
    for _ in 0..n {
        h.advance(100 * MS);
        root.on_tick(h);
    }
}

/// The calls dispatched since `from`.
fn calls_since(h: &MockHost, from: usize) -> Vec<Call> {
    h.calls.borrow()[from..].to_vec()
}

#[test]
fn the_tick_renews_a_lease_running_low() {
    let (h, mut root) = configured(POLICY);
    let (mut req, _) = start(&h, &root, 2, &headers(""));
    let body = lease_answer(&h, 4, 60_000);
    deliver(&h, &mut req, 0, Some(body));
    // A quarter of the grant left after three lease hits: a renewal is claimed.
    for id in 3..6 {
        let (_, a) = start(&h, &root, id, &headers(""));
        assert_eq!(a, crate::host::Action::Continue);
    }
    assert_eq!(h.call_count(), 1, "no request waits for a renewal");
    tick(&h, &mut root, 1);
    assert_eq!(h.metric("laneguard.lease.renewals"), 1);
    let renewal = h.last_call().unwrap();
    assert_eq!(h.call_count(), 2);
    let rl = renewal.rls_request();
    assert_eq!(rl.hits_addend, 0);
    assert!(
        rl.descriptors.iter().all(|d| d.hits_addend == Some(0)),
        "a renewal charges nothing: {rl:?}"
    );
    assert!(renewal.metadata_value("x-laneguard-lease").is_some());
    assert!(renewal.metadata_value("x-laneguard-class").is_some());
    // The renewal carries the tally: one central admission and three on the lease.
    let tally = renewal
        .metadata_value("x-laneguard-usage")
        .expect("a tally");
    let entries = laneguard_core::usage::decode(&tally).unwrap();
    assert_eq!(entries.len(), 1, "{tally}");
    assert_eq!(
        (entries[0].1.central, entries[0].1.leased),
        (1, 3),
        "{tally}"
    );
    tick(&h, &mut root, 1);
    assert_eq!(h.call_count(), 2, "one renewal at a time");

    answer_root(
        &h,
        &mut root,
        &renewal,
        0,
        Some(lease_answer(&h, 10, 60_000)),
    );
    // One left of the first grant and ten more: eleven requests without a call.
    for id in 10..21 {
        let (_, a) = start(&h, &root, id, &headers(""));
        assert_eq!(a, crate::host::Action::Continue, "lease hit {id}");
    }
    assert_eq!(h.metric("laneguard.decided.local"), 14);
    assert_eq!(h.call_count(), 2, "no request waited on a call");
}

#[test]
fn a_failed_renewal_lets_the_next_one_go() {
    let (h, mut root) = configured(POLICY);
    let (mut req, _) = start(&h, &root, 2, &headers(""));
    let body = lease_answer(&h, 4, 60_000);
    deliver(&h, &mut req, 0, Some(body));
    for id in 3..6 {
        start(&h, &root, id, &headers(""));
    }
    h.dispatch_script
        .borrow_mut()
        .push_back(DispatchError::Failed("InternalFailure".into()));
    tick(&h, &mut root, 1);
    assert_eq!(h.metric("laneguard.service_error.dispatch"), 1);
    // The next lease hit claims a renewal again, and the tick sends it.
    start(&h, &root, 6, &headers(""));
    tick(&h, &mut root, 1);
    assert_eq!(h.metric("laneguard.lease.renewals"), 2);
    assert_eq!(h.call_count(), 2);
}

/// Requests `ids` of tenant `tenant` in a fail-open class, each call failing to dispatch:
/// admitted without the service.
fn fail_open_while_unreachable(h: &MockHost, root: &Root, ids: std::ops::Range<u32>, tenant: &str) {
    for id in ids {
        h.dispatch_script
            .borrow_mut()
            .push_back(DispatchError::Failed("InternalFailure".into()));
        let hs: Vec<(&str, &str)> = headers("feed")
            .into_iter()
            .map(|(k, v)| (k, if k == "x-laneguard-tenant" { tenant } else { v }))
            .collect();
        let (mut req, a) = start(h, root, id, &hs);
        assert!(seen(h, &mut req, a).passed);
    }
}

#[test]
fn hits_admitted_without_the_service_are_reported_on_the_sync_tick() {
    let (h, mut root) = configured(POLICY);
    // Two requests of a fail-open class while the service is unreachable.
    fail_open_while_unreachable(&h, &root, 2..4, "acme");
    // sync_interval_s defaults to 10: the 100th tick reports.
    tick(&h, &mut root, 99);
    assert_eq!(h.call_count(), 0);
    tick(&h, &mut root, 1);
    let report = h.last_call().expect("a report");
    assert_eq!(
        report.metadata_value("x-laneguard-report").as_deref(),
        Some("1")
    );
    let rl = report.rls_request();
    assert!(!rl.descriptors.is_empty());
    assert!(
        rl.descriptors.iter().all(|d| d.hits_addend == Some(2)),
        "both hits, on every bucket they charged: {rl:?}"
    );
    assert_eq!(
        h.metric("laneguard.reported_hits"),
        2 * rl.descriptors.len() as i64
    );
    // Each says how long ago an empty bucket would have had to start to hold the room the
    // mirror showed at the first hit: 100 ticks of 100 ms, plus that room (the class: burst
    // 10 at 1/s, 9 s left after the first hit; the shared pool: 9.973 s).
    let age = |d: &RateLimitDescriptor| {
        d.entries
            .iter()
            .find(|e| e.key == "lg.age_ms")
            .map(|e| e.value.clone())
    };
    let ages = |ds: &[RateLimitDescriptor]| {
        let mut v: Vec<String> = ds.iter().filter_map(age).collect();
        v.sort();
        v
    };
    assert_eq!(ages(&rl.descriptors), ["19000", "19973"], "{rl:?}");

    // The service failed: the hits are given back and reported again next round, with
    // the same origin, now 10 s longer ago.
    answer_root(&h, &mut root, &report, 14, None);
    tick(&h, &mut root, 100);
    assert_eq!(h.call_count(), 2);
    let again = h.last_call().unwrap();
    let strip = |ds: Vec<RateLimitDescriptor>| -> Vec<RateLimitDescriptor> {
        ds.into_iter()
            .map(|mut d| {
                d.entries.retain(|e| e.key != "lg.age_ms");
                d
            })
            .collect()
    };
    assert_eq!(ages(&again.rls_request().descriptors), ["29000", "29973"]);
    assert_eq!(
        strip(again.rls_request().descriptors),
        strip(rl.descriptors.clone())
    );
    let n = rl.descriptors.len();
    answer_root(
        &h,
        &mut root,
        &again,
        0,
        Some(rls_answer(Code::Ok, &vec![Status::ok(1); n])),
    );
    tick(&h, &mut root, 100);
    assert_eq!(h.call_count(), 2, "nothing left to report");
}

#[test]
fn the_first_answer_after_a_failure_reports_at_once_not_on_the_sync_tick() {
    let (h, mut root) = configured(POLICY);
    // Two requests of a fail-open class while the service is unreachable.
    fail_open_while_unreachable(&h, &root, 2..4, "acme");
    tick(&h, &mut root, 5);
    assert_eq!(h.call_count(), 0, "still down: nothing to report yet");
    // The service answers again (a request of another tenant): the report goes out on the
    // next tick, 95 ticks before the sync tick.
    let (mut req, _) = start(&h, &root, 4, &headers(""));
    let n = h.last_call().unwrap().rls_request().descriptors.len();
    deliver(
        &h,
        &mut req,
        0,
        Some(rls_answer(Code::Ok, &vec![Status::ok(5); n])),
    );
    let before = h.call_count();
    tick(&h, &mut root, 1);
    let report = h.last_call().expect("a report");
    assert_eq!(h.call_count(), before + 1);
    assert_eq!(
        report.metadata_value("x-laneguard-report").as_deref(),
        Some("1")
    );
    let rl = report.rls_request();
    assert!(
        rl.descriptors.iter().all(|d| d.hits_addend == Some(2)),
        "{rl:?}"
    );
    let reported = 2 * rl.descriptors.len() as i64;
    assert_eq!(h.metric("laneguard.reported_on_reconnect"), reported);
    assert_eq!(h.metric("laneguard.reported_hits"), reported);
    answer_root(
        &h,
        &mut root,
        &report,
        0,
        Some(rls_answer(
            Code::Ok,
            &vec![Status::ok(1); rl.descriptors.len()],
        )),
    );
    tick(&h, &mut root, 100);
    assert_eq!(
        h.call_count(),
        before + 1,
        "reported once, nothing left for the sync tick"
    );
}

#[test]
fn an_outage_with_more_tenants_than_a_ledger_holds_keeps_it_under_its_byte_cap() {
    use crate::reconcile::{footprint, published_hits, MAX_LEDGER_BYTES};
    let (h, mut root) = configured(POLICY);
    // Another VM holds the reporter lease: this one only publishes (no drain empties it).
    h.shared.borrow_mut().insert(
        "laneguard/reconciler".into(),
        (format!("{:016x} {}", 99, u64::MAX).into_bytes(), 1),
    );
    // One tenant first: the hits a request leaves in the ledger.
    fail_open_while_unreachable(&h, &root, 2..3, "probe");
    tick(&h, &mut root, 100);
    let per_request = published_hits(&h);
    assert!(per_request > 0);
    // Then 18,000 tenants over three sync intervals, each admitted fail-open once.
    let mut id = 10;
    for round in 0..3 {
        for t in 0..6_000 {
            fail_open_while_unreachable(&h, &root, id..id + 1, &format!("t{round}-{t:05}"));
            id += 1;
        }
        tick(&h, &mut root, 100);
        let (keys, bytes) = footprint(&h).expect("the index is readable");
        assert_eq!(keys, 3, "round {round}");
        assert!(
            bytes <= MAX_LEDGER_BYTES as u64 + 100,
            "round {round}: {bytes} bytes of shared data"
        );
    }
    let dropped = h.metric("laneguard.unreported_dropped") as u64;
    assert!(dropped > 0, "18,000 tenants do not fit in one ledger");
    assert_eq!(
        published_hits(&h) + dropped,
        per_request * 18_001,
        "every hit admitted is published or counted as forgotten"
    );
}

#[test]
fn shared_data_keys_do_not_grow_with_tenants() {
    let (h, mut root) = configured(POLICY);
    // 300 tenants admitted fail-open while the service is unreachable: one ledger key for
    // this VM, however many tenants.
    for id in 0..300u32 {
        fail_open_while_unreachable(&h, &root, 10 + id..11 + id, &format!("t{id}"));
    }
    // The sync tick publishes and reports (the report fails: given back to the ledger).
    h.dispatch_script
        .borrow_mut()
        .push_back(DispatchError::Failed("InternalFailure".into()));
    tick(&h, &mut root, 100);
    let keys = h.shared.borrow().len();
    assert_eq!(
        keys, 3,
        "the index, the reporter lease and this VM's ledger"
    );
    let (n, bytes) = crate::reconcile::footprint(&h).expect("the index is readable");
    assert_eq!(n, 3);
    assert!(
        bytes > 300 * 20,
        "the ledger holds every tenant's hits: {bytes} bytes"
    );
    assert_eq!(h.metric("laneguard.shared_data.keys"), 3);
    // Reported: the ledger is empty again, the keys stay (proxy-wasm has no delete).
    tick(&h, &mut root, 100);
    let report = h.last_call().expect("a report");
    let d = report.rls_request().descriptors.len();
    answer_root(
        &h,
        &mut root,
        &report,
        0,
        Some(rls_answer(Code::Ok, &vec![Status::ok(1); d])),
    );
    let (n, bytes) = crate::reconcile::footprint(&h).expect("the index is readable");
    assert_eq!((n, h.shared.borrow().len()), (3, 3));
    assert!(bytes < 100, "drained: {bytes} bytes");
}

#[test]
fn audit_records_are_shipped_in_batches_from_the_tick() {
    let (h, mut root) = configured(POLICY);
    refused_centrally(&h, &root, 2, "batch", 2_000);
    let record = h.filter_state.borrow()[crate::audit::FILTER_STATE].clone();
    let before = h.call_count();
    tick(&h, &mut root, 1);
    let shipped = calls_since(&h, before);
    assert_eq!(shipped.len(), 1);
    let call = &shipped[0];
    assert_eq!(call.cluster, "laneguard_rls");
    assert_eq!(call.service, laneguard_protos::AUDIT_SERVICE_NAME);
    assert_eq!(call.method, laneguard_protos::AUDIT_APPEND_METHOD);
    let batch = AppendRequest::decode(call.message.as_slice()).unwrap();
    assert_eq!(batch.records, vec![String::from_utf8(record).unwrap()]);
    let ok = AppendResponse {
        appended: 1,
        rejected: 0,
    };
    answer_root(&h, &mut root, call, 0, Some(ok.encode_to_vec()));
    assert_eq!(h.metric("laneguard.audit.shipped"), 1);
    tick(&h, &mut root, 5);
    assert_eq!(h.call_count(), before + 1, "nothing more to ship");
}

#[test]
fn an_audit_backlog_ships_whole_and_the_next_batch_goes_out_on_the_answer() {
    // Issue 14 item 4: a fixed 100 records per 100 ms tick lost most records of a flood.
    let (h, mut root) = configured(POLICY);
    for id in 0..250 {
        refused_centrally(&h, &root, 10 + id, "batch", 2_000);
    }
    let before = h.call_count();
    tick(&h, &mut root, 1);
    let first = h.last_call().unwrap();
    assert_eq!(h.call_count(), before + 1, "one batch in flight");
    let batch = AppendRequest::decode(first.message.as_slice()).unwrap();
    assert_eq!(batch.records.len(), 250, "the whole backlog in one call");
    // More refusals while it is in flight: they go out as soon as the answer is in,
    // without waiting for the next tick.
    for id in 0..40 {
        refused_centrally(&h, &root, 1_000 + id, "batch", 2_000);
    }
    let ok = |n| {
        AppendResponse {
            appended: n,
            rejected: 0,
        }
        .encode_to_vec()
    };
    let calls = h.call_count();
    answer_root(&h, &mut root, &first, 0, Some(ok(250)));
    assert_eq!(
        h.call_count(),
        calls + 1,
        "the rest is shipped on the answer"
    );
    let second = h.last_call().unwrap();
    let batch = AppendRequest::decode(second.message.as_slice()).unwrap();
    assert_eq!(batch.records.len(), 40);
    answer_root(&h, &mut root, &second, 0, Some(ok(40)));
    assert_eq!(h.call_count(), calls + 1, "nothing left: no call");
    assert_eq!(h.metric("laneguard.audit.shipped"), 290);
    assert_eq!(h.metric("laneguard.audit.dropped"), 0);
}

#[test]
fn audit_shipping_retries_after_a_failure_and_gives_up_on_unimplemented() {
    let (h, mut root) = configured(POLICY);
    refused_centrally(&h, &root, 2, "batch", 2_000);
    let before = h.call_count();
    tick(&h, &mut root, 1);
    let first = h.last_call().unwrap();
    answer_root(&h, &mut root, &first, 14, None);
    assert_eq!(h.metric("laneguard.audit.ship_errors"), 1);
    assert_eq!(h.metric("laneguard.audit.dropped"), 0, "kept for the retry");
    // A second of back-off, then the same record again.
    tick(&h, &mut root, 10);
    assert_eq!(h.call_count(), before + 1);
    tick(&h, &mut root, 1);
    assert_eq!(h.call_count(), before + 2);
    let retry = h.last_call().unwrap();
    assert_eq!(retry.message, first.message);
    // A service without an audit log: the records are dropped, not resent.
    answer_root(&h, &mut root, &retry, 12, None);
    assert_eq!(h.metric("laneguard.audit.dropped"), 1);
    tick(&h, &mut root, 400);
    // Only the usage tally (the two 429s) went out since, once, on the sync tick.
    assert_eq!(h.call_count(), before + 3);
    let usage = h.last_call().unwrap();
    assert!(usage.metadata_value("x-laneguard-usage").is_some());
    assert_eq!(usage.message, retry_rls_empty());
}

/// An empty `ShouldRateLimit` of the test policy's domain: the usage call's message.
fn retry_rls_empty() -> Vec<u8> {
    crate::rls::encode_descriptors(
        &laneguard_core::parse(POLICY).unwrap().service.domain,
        Vec::new(),
        0,
    )
}

#[test]
fn audit_records_that_cannot_be_dispatched_wait_for_the_next_try() {
    let (h, mut root) = configured(POLICY);
    refused_centrally(&h, &root, 2, "batch", 2_000);
    h.dispatch_script
        .borrow_mut()
        .push_back(DispatchError::UnknownCluster("NotFound".into()));
    tick(&h, &mut root, 1);
    assert_eq!(h.metric("laneguard.audit.ship_errors"), 1);
    assert_eq!(h.metric("laneguard.audit.dropped"), 0);
    let before = h.call_count();
    tick(&h, &mut root, 11);
    assert_eq!(h.call_count(), before + 1, "sent once the back-off is over");
}

#[test]
fn the_gauges_follow_the_worker_each_second() {
    let (h, mut root) = configured(POLICY);
    let (mut req, _) = start(&h, &root, 2, &headers(""));
    let body = lease_answer(&h, 4, 60_000);
    deliver(&h, &mut req, 0, Some(body));
    tick(&h, &mut root, 10);
    assert_eq!(
        h.metric("laneguard.lease.outstanding"),
        8,
        "4 on each of 2 buckets"
    );
    assert_eq!(h.metric("laneguard.buckets"), 2);
    assert_eq!(h.metric("laneguard.queue.depth"), 0);
}

#[test]
fn the_first_tick_probes_each_named_cluster_once_and_counts_an_unknown_one() {
    let (h, mut root) = configured(POLICY);
    tick(&h, &mut root, 3);
    // service.cluster and audit.cluster are the same by default: one probe, only at start.
    assert_eq!(*h.probes.borrow(), vec!["laneguard_rls".to_string()]);
    assert_eq!(h.metric("laneguard.service_cluster_unknown"), 0);

    let typo = POLICY.replace("cluster: laneguard_rls", "cluster: laneguard_rsl");
    let (h, mut root) = configured(&typo);
    h.unknown_clusters.borrow_mut().push("laneguard_rsl".into());
    tick(&h, &mut root, 3);
    assert_eq!(h.metric("laneguard.service_cluster_unknown"), 1);
    assert!(h.probes.borrow().is_empty());
}

#[test]
fn the_usage_tally_goes_out_on_the_sync_tick_and_survives_an_unreachable_service() {
    let (h, mut root) = configured(POLICY);
    refused_centrally(&h, &root, 2, "batch", 2_000);
    refused_centrally(&h, &root, 3, "batch", 2_000);
    let before = h.call_count();
    tick(&h, &mut root, 100);
    let usage = calls_since(&h, before)
        .into_iter()
        .find(|c| c.metadata_value("x-laneguard-usage").is_some())
        .expect("the sync tick sends the tally");
    assert!(
        usage.rls_request().descriptors.is_empty(),
        "no bucket is charged"
    );
    let entries =
        laneguard_core::usage::decode(&usage.metadata_value("x-laneguard-usage").unwrap()).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1.refused, 2);
    // The service was unreachable: kept, and sent again on the next sync tick.
    answer_root(&h, &mut root, &usage, 14, None);
    let before = h.call_count();
    tick(&h, &mut root, 100);
    let again = calls_since(&h, before)
        .into_iter()
        .find(|c| c.metadata_value("x-laneguard-usage").is_some())
        .expect("sent again");
    assert_eq!(
        again.metadata_value("x-laneguard-usage"),
        usage.metadata_value("x-laneguard-usage")
    );
    // Answered: nothing left to send.
    answer_root(&h, &mut root, &again, 0, Some(rls_answer(Code::Ok, &[])));
    let before = h.call_count();
    tick(&h, &mut root, 100);
    assert!(calls_since(&h, before)
        .iter()
        .all(|c| c.metadata_value("x-laneguard-usage").is_none()));
}
