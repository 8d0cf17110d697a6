//! The root context's logic, one per VM: load the policy, and on each tick renew leases,
//! report hits admitted without the service (one reporter per Envoy, elected in shared
//! data: [`crate::reconcile`]), resume queued requests and ship audit records
//! ([`crate::audit`]). It reaches Envoy only through [`Host`]; the proxy-wasm glue is
//! [`crate::wasm_host`].

use crate::host::{DispatchError, GrpcCall, Host};
use crate::metrics::Metrics;
use crate::request::{self, Request};
use crate::{audit, reconcile, rls};
use laneguard_core::degrade::WaitQueue;
use laneguard_core::headers::{error_body, limited_body};
use laneguard_core::logsafe::LogGate;
use laneguard_core::peer::Peer;
use laneguard_core::reconnect::{Due, ReportTrigger};
use laneguard_core::rollout::{Watch, DEFAULT_WATCH_TENANTS};
use laneguard_core::usage::{self, Admission, Counts, Key, Tally};
use laneguard_core::{Bucket, FailureMode, LocalTable, Pending, Plan, Policy, Unreported};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::rc::Rc;
use std::time::Duration;

/// State one VM (one Envoy worker) shares between its root context and its requests.
pub(crate) struct Shared {
    pub policy: Policy,
    pub table: RefCell<LocalTable>,
    pub metrics: Metrics,
    /// Bucket sets whose lease runs low: the root context renews them on its next tick,
    /// so no request waits for a renewal.
    /// Each with the class of the request that found the lease low (`x-laneguard-class`).
    pub renewals: RefCell<Vec<(String, Vec<Bucket>)>>,
    /// Hits admitted without the service, to report on the sync tick.
    pub unreported: RefCell<Unreported>,
    /// Which classes of which tenants were active lately; squeezes already reported.
    pub watch: RefCell<Watch>,
    /// Requests held by the `queue` fallback, resumed from the root tick.
    pub queue: RefCell<WaitQueue>,
    /// What each queued request must pay before it is released, by context id.
    pub queued: RefCell<HashMap<u32, Queued>>,
    /// Audit records waiting to be shipped to the service.
    pub audit: RefCell<audit::Outbox>,
    /// What the RLS server's answers have shown it to be (laneguard-service or a standard
    /// server), and so what they may be used for (`laneguard_core::peer`).
    pub peer: Cell<Peer>,
    /// Tokens reserved and not used (AI settlements), to give back on the sync tick.
    pub refunds: RefCell<Unreported>,
    /// Tokens reserved by this worker's AI requests not yet settled.
    pub tokens_in_flight: Cell<u64>,
    /// Whether the service answers; its first answer after a failure makes the report of
    /// the hits admitted without it due at once (`laneguard_core::reconnect`).
    pub reporting: RefCell<ReportTrigger>,
    /// What this worker admitted and refused, per tenant, class and hour, not yet sent to
    /// the service's usage ledger (`laneguard_core::usage`).
    pub usage: RefCell<Tally>,
    /// The per-request warnings about the service (a call that could not be sent, a
    /// non-OK status, an undecodable answer): at most one line a second each.
    pub log_gates: RefCell<ServiceLogGates>,
}

/// One [`LogGate`] (once a second) per kind of per-request warning: three about the service,
/// and the forged class, which any client can trigger on every request it sends.
#[derive(Default)]
pub(crate) struct ServiceLogGates {
    pub dispatch: LogGate,
    pub status: LogGate,
    pub decode: LogGate,
    pub forged: LogGate,
}

impl Shared {
    /// A VM's state for a parsed policy; defines the policy's stats.
    pub fn new(h: &dyn Host, policy: Policy) -> Shared {
        let metrics = Metrics::define(h, &policy);
        let classes = policy.classes.len();
        let max_buffer = policy.ops.audit.max_buffer as usize;
        let max_buckets = policy.service.max_buckets as usize;
        Shared {
            policy,
            table: RefCell::new(LocalTable::new(max_buckets)),
            metrics,
            renewals: RefCell::new(Vec::new()),
            unreported: RefCell::new(Unreported::default()),
            watch: RefCell::new(Watch::new(classes, DEFAULT_WATCH_TENANTS)),
            queue: RefCell::new(WaitQueue::default()),
            queued: RefCell::new(HashMap::new()),
            audit: RefCell::new(audit::Outbox::new(max_buffer)),
            peer: Cell::new(Peer::default()),
            refunds: RefCell::new(Unreported::default()),
            tokens_in_flight: Cell::new(0),
            reporting: RefCell::new(ReportTrigger::default()),
            usage: RefCell::new(Tally::default()),
            log_gates: RefCell::new(ServiceLogGates::default()),
        }
    }

    /// Count one request in the usage tally.
    pub fn note_usage(&self, plan: &Plan, how: Admission, now: u64) {
        self.usage
            .borrow_mut()
            .note(&plan.tenant, &plan.class_name, how, plan.cost, now);
    }

    /// A call to the service got a usable answer (`answered`) or none.
    pub fn service_answered(&self, answered: bool) {
        let mut r = self.reporting.borrow_mut();
        if answered {
            r.answered();
        } else {
            r.failed();
        }
    }
}

/// A queued request: its place on this worker's mirror is held (charged when it was
/// queued); it is paid for on release.
pub(crate) struct Queued {
    pub plan: Plan,
    pub borrowing: bool,
    /// Its cost is promised on this worker's lease, for its paced slot
    /// (`LocalTable::promise`): redeemed on release, given back if it leaves.
    pub promised: bool,
}

/// A call the root context is waiting for.
enum RootCall {
    /// A renewal, and the usage tally entries it carried.
    Renew(Vec<Bucket>, Vec<(Key, Counts)>),
    /// The usage tally sent on the sync tick (`x-laneguard-usage`, no descriptors).
    Usage(Vec<(Key, Counts)>),
    /// The central decision that pays for a queued request before it is released (its
    /// context, what it pays, when the call was sent).
    Release(u32, Box<Queued>, u64),
    /// A report of hits admitted without the service, and the usage tally entries it
    /// carried.
    Report(Vec<reconcile::Drained>, Vec<(Key, Counts)>),
    Audit(Vec<String>),
    Refund(Vec<Pending>),
    /// The startup probe of a cluster the policy names: only whether it could be sent matters.
    Probe,
}

pub struct Root {
    /// This root context's id, to make it the effective context again after resuming a
    /// queued request's.
    id: u32,
    shared: Option<Rc<Shared>>,
    /// This VM's id for the reporter lease: random (WASI `random_get`, through std).
    vm: u64,
    ticks: u64,
    calls: HashMap<u32, RootCall>,
}

/// The root tick: renewals go out within one tick of a lease running low.
pub(crate) const TICK: Duration = Duration::from_nanos(TICK_NS);
const TICK_NS: u64 = 100_000_000;
const TICKS_PER_SECOND: u64 = 10;
/// Prune idle buckets every this many ticks.
const PRUNE_EVERY: u64 = 50;
/// The most descriptors in one report call (about 100 KB).
const REPORT_BATCH: usize = 1_000;
/// The startup probe: `grpc.health.v1.Health/Check` with an empty request (any service).
const PROBE_SERVICE: &str = "grpc.health.v1.Health";
const PROBE_METHOD: &str = "Check";
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// gRPC `UNAVAILABLE`: what Envoy reports for a call that found no service (or timed out).
const GRPC_UNAVAILABLE: u32 = 14;
/// Ask for a renewal when the lease would run out within this horizon.
pub(crate) const RENEW_HORIZON_NS: u64 = 300_000_000;
/// Ask for a renewal when the worker would spend what is left of its lease within this
/// lead at its current rate: a renewal goes out on the next tick (at most [`TICK`] later)
/// and its answer takes a round trip (50 ms allowed for it).
pub(crate) const RENEW_LEAD_NS: u64 = TICK_NS + 50_000_000;

impl Root {
    pub fn new(id: u32) -> Root {
        Root::with_vm(id, RandomState::new().hash_one(0u8))
    }

    /// A root context with a given VM id (tests pick it, to be deterministic).
    /// The VM's state, once a policy loaded (tests).
    #[cfg(test)]
    pub(crate) fn shared(&self) -> Option<&Rc<Shared>> {
        self.shared.as_ref()
    }

    pub fn with_vm(id: u32, vm: u64) -> Root {
        Root {
            id,
            shared: None,
            vm,
            ticks: 0,
            calls: HashMap::new(),
        }
    }

    /// A new request's state machine; `None` when no policy loaded.
    pub fn new_request(&self, context_id: u32) -> Option<Request> {
        self.shared
            .clone()
            .map(|shared| Request::new(shared, context_id))
    }

    /// Release the queued requests whose wait is over. Each holds its place on this
    /// worker's mirror (charged when it was queued); before it goes it is paid like any
    /// admission: by capacity leased to this worker, else by a central decision, which may
    /// still refuse it when the fleet used the room meanwhile (then it gets its 429). So the
    /// queue admits no more than the service allows. A request whose client went away was
    /// removed by its own `on_done`.
    fn resume_queued(&mut self, h: &dyn Host, shared: &Shared, now: u64) {
        let ready = shared.queue.borrow_mut().take_ready(now);
        if ready.is_empty() {
            return;
        }
        for id in ready {
            let Some(q) = shared.queued.borrow_mut().remove(&id) else {
                continue;
            };
            let attempt = q.plan.attempt(q.borrowing);
            let leased = {
                let mut table = shared.table.borrow_mut();
                // A promise is spent whatever the pace says: the slot was its own. When the
                // lease expired meanwhile the request is paid like any other.
                let hit = (q.promised && table.redeem(&attempt, q.plan.cost, now))
                    || table.try_lease(&attempt, q.plan.cost, now);
                if hit {
                    // The lease was counted on the mirror when it was granted: give back
                    // the place held since the request was queued, not to count it twice.
                    table.refund(&attempt, q.plan.cost, now);
                }
                hit
            };
            if leased {
                shared.note_usage(&q.plan, Admission::Leased, now);
                release(h, shared, id);
                continue;
            }
            let svc = &shared.policy.service;
            let want = shared
                .table
                .borrow()
                .want(&attempt, q.plan.cost, now, svc.max_lease)
                .to_string();
            let msg = rls::encode_plan(&svc.domain, &q.plan, q.borrowing, attempt.len());
            let class = q.plan.class_name.clone();
            let metadata = vec![
                (rls::LEASE_HEADER, want.as_bytes()),
                (usage::CLASS_METADATA, class.as_bytes()),
            ];
            if let Err(RootCall::Release(id, q, _)) = self.dispatch(
                h,
                shared,
                &msg,
                metadata,
                RootCall::Release(id, Box::new(q), now),
            ) {
                // Not sent: the service certainly did not count it.
                release_degraded(h, shared, id, &q, now, false);
            }
        }
        // Later calls in this tick (gRPC dispatches) belong to the root context.
        let _ = h.set_effective_context(self.id);
    }

    /// The service's decision on a queued request (`None`: no usable answer; then
    /// `may_have_counted` says whether the call may still have been charged: a timeout or
    /// an unreadable answer).
    #[allow(clippy::too_many_arguments)]
    fn released(
        &self,
        h: &dyn Host,
        shared: &Shared,
        id: u32,
        q: &Queued,
        verdict: Option<rls::Verdict>,
        may_have_counted: bool,
        now: u64,
    ) {
        let attempt = q.plan.attempt(q.borrowing);
        match verdict {
            None => release_degraded(h, shared, id, q, now, may_have_counted),
            Some(v) => {
                let mut table = shared.table.borrow_mut();
                request::apply_statuses(
                    &mut table,
                    &attempt,
                    &v.statuses,
                    &v.holds,
                    shared.peer.get(),
                    now,
                );
                if v.allowed {
                    drop(table);
                    shared.note_usage(&q.plan, Admission::Central, now);
                    release(h, shared, id);
                } else {
                    // Refused fleet-wide: its place on the mirror was never used.
                    table.refund(&attempt, q.plan.cost, now);
                    let levels = table.levels(&attempt, now);
                    drop(table);
                    shared.metrics.queue_refused.inc(h);
                    shared.note_usage(&q.plan, Admission::Refused, now);
                    let bucket = v
                        .tripped
                        .and_then(|i| attempt.get(i))
                        .map(|b| b.name())
                        .unwrap_or_default();
                    let retry = laneguard_core::degrade::retry_after_s(&levels);
                    let body = limited_body(
                        &q.plan.tenant,
                        &q.plan.class_name,
                        &bucket,
                        retry,
                        "central",
                        None,
                    );
                    let headers = [
                        ("retry-after", retry.to_string()),
                        ("x-laneguard-fallback", "queue".to_string()),
                    ];
                    if h.set_effective_context(id).is_ok() {
                        request::reply(h, 429, &body, &headers);
                    } else {
                        shared.metrics.queue_abandoned.inc(h);
                    }
                }
            }
        }
        let _ = h.set_effective_context(self.id);
    }

    /// Ship one batch of audit records, if any wait, no batch is in flight and no back-off
    /// is running (after a failure, [`audit::shipped`] sets one, counted in ticks).
    fn ship_audit(&mut self, h: &dyn Host, shared: &Shared) {
        let audit = &shared.policy.ops.audit;
        let next = shared
            .audit
            .borrow_mut()
            .next_batch(audit.ship, audit.max_batch as usize);
        let Some(batch) = next else {
            return;
        };
        let msg = audit::encode(&batch);
        match h.dispatch_grpc(GrpcCall {
            cluster: &audit.cluster,
            service: audit::SERVICE,
            method: audit::METHOD,
            metadata: Vec::new(),
            message: &msg,
            timeout: Duration::from_millis(audit::TIMEOUT_MS),
        }) {
            Ok(token) => {
                self.calls.insert(token, RootCall::Audit(batch));
            }
            Err(status) => {
                log::debug!("laneguard: cannot dispatch audit records: {status:?}");
                audit::shipped(h, shared, batch, audit::DISPATCH_FAILED, None);
            }
        }
    }

    /// Dispatch one `ShouldRateLimit` for the root context; the call back when it could
    /// not be sent.
    fn dispatch(
        &mut self,
        h: &dyn Host,
        shared: &Shared,
        message: &[u8],
        metadata: Vec<(&str, &[u8])>,
        call: RootCall,
    ) -> Result<(), RootCall> {
        let svc = &shared.policy.service;
        match h.dispatch_grpc(GrpcCall {
            cluster: &svc.cluster,
            service: rls::SERVICE,
            method: rls::METHOD,
            metadata,
            message,
            timeout: Duration::from_millis(u64::from(svc.timeout_ms)),
        }) {
            Ok(token) => {
                self.calls.insert(token, call);
                Ok(())
            }
            Err(_) => {
                shared.metrics.service_error_dispatch.inc(h);
                shared.service_answered(false);
                Err(call)
            }
        }
    }

    /// On the first tick, find out whether Envoy has every cluster the policy names
    /// (`Policy::clusters`): a policy loads whatever its cluster names say, and a typo then
    /// degrades every decision. Envoy refuses to dispatch to an unknown cluster, so one
    /// health check per cluster shows it; its answer is ignored (the service may not
    /// implement health). An unknown cluster is logged at error level and counted.
    fn probe_clusters(&mut self, h: &dyn Host, shared: &Shared) {
        let mut probed: Vec<&str> = Vec::new();
        for (field, cluster) in shared.policy.clusters() {
            if probed.contains(&cluster) {
                continue;
            }
            probed.push(cluster);
            match h.dispatch_grpc(GrpcCall {
                cluster,
                service: PROBE_SERVICE,
                method: PROBE_METHOD,
                metadata: Vec::new(),
                message: &[],
                timeout: PROBE_TIMEOUT,
            }) {
                Ok(token) => {
                    self.calls.insert(token, RootCall::Probe);
                }
                Err(DispatchError::UnknownCluster(status)) => {
                    shared.metrics.service_cluster_unknown.inc(h);
                    log::error!(
                        "laneguard: {field} {cluster:?} is not a cluster Envoy knows ({status}): \
                         every call to it fails and its decisions are degraded; fix the policy \
                         or add the cluster (laneguard-policy check --envoy finds this)"
                    );
                }
                Err(DispatchError::Failed(status)) => {
                    log::warn!("laneguard: cannot probe {field} {cluster:?}: {status}");
                }
            }
        }
    }

    /// Renew the leases that ran low. Each renewal also carries a batch of the usage tally
    /// (`x-laneguard-usage`): the spent lease counts travel on calls the worker makes
    /// anyway.
    fn renew(&mut self, h: &dyn Host, shared: &Rc<Shared>, now: u64) {
        let pending: Vec<(String, Vec<Bucket>)> =
            std::mem::take(&mut *shared.renewals.borrow_mut());
        for (class, buckets) in pending {
            let refs: Vec<&Bucket> = buckets.iter().collect();
            let want = shared
                .table
                .borrow()
                .want(&refs, 1, now, shared.policy.service.max_lease);
            let descriptors = refs.iter().map(|b| rls::descriptor(b, Some(0))).collect();
            let msg = rls::encode_descriptors(&shared.policy.service.domain, descriptors, 0);
            let want = want.to_string();
            let entries = take_usage(shared);
            let tally = (!entries.is_empty()).then(|| usage::encode(&entries));
            let mut metadata = vec![
                (rls::LEASE_HEADER, want.as_bytes()),
                (usage::CLASS_METADATA, class.as_bytes()),
            ];
            if let Some(t) = &tally {
                metadata.push((usage::METADATA, t.as_bytes()));
            }
            shared.metrics.lease_renewals.inc(h);
            if let Err(RootCall::Renew(_, entries)) = self.dispatch(
                h,
                shared,
                &msg,
                metadata,
                RootCall::Renew(buckets.clone(), entries),
            ) {
                shared.table.borrow_mut().renewal_done(&refs);
                shared.usage.borrow_mut().give_back(entries);
            }
        }
    }

    /// Send what is left of the usage tally (the sync tick): calls without descriptors,
    /// carrying only `x-laneguard-usage`, at most [`usage::MAX_ENTRIES_PER_CALL`] entries
    /// each. A plain RLS server answers them like any empty request and ignores the
    /// metadata.
    fn send_usage(&mut self, h: &dyn Host, shared: &Rc<Shared>) {
        shared
            .metrics
            .usage_dropped
            .add(h, shared.usage.borrow_mut().take_dropped());
        let msg = rls::encode_descriptors(&shared.policy.service.domain, Vec::new(), 0);
        loop {
            let entries = take_usage(shared);
            if entries.is_empty() {
                return;
            }
            let tally = usage::encode(&entries);
            let metadata = vec![(usage::METADATA, tally.as_bytes())];
            if let Err(RootCall::Usage(entries)) =
                self.dispatch(h, shared, &msg, metadata, RootCall::Usage(entries))
            {
                shared.usage.borrow_mut().give_back(entries);
                return;
            }
        }
    }

    /// Report the hits admitted without the service: this VM publishes its ledger in shared
    /// data, and the reporter (one per Envoy) drains every VM's and sends them. When this VM
    /// saw the service answer again after failing (`due` is [`Due::Reconnected`]) it drains
    /// and sends at once, reporter or not (a drain is CAS to zero, so no hit is sent twice).
    fn reconcile(&mut self, h: &dyn Host, shared: &Rc<Shared>, now: u64, due: Due) {
        let mine = shared.unreported.borrow_mut().take();
        if !mine.is_empty() {
            let published = reconcile::publish(h, self.vm, mine);
            shared.metrics.unreported_dropped.add(h, published.dropped);
            let mut unreported = shared.unreported.borrow_mut();
            for pending in published.failed {
                unreported.put_back(pending);
            }
        }
        let interval_ns = u64::from(shared.policy.service.sync_interval_s) * 1_000_000_000;
        let reconnected = due == Due::Reconnected;
        if !reconnected && !reconcile::lead(h, self.vm, now, interval_ns.saturating_mul(3)) {
            return;
        }
        let entries = reconcile::drain(h);
        if entries.is_empty() {
            return;
        }
        let total: u64 = entries.iter().map(|d| d.hits).sum();
        let oldest = entries.iter().map(|d| d.since_ns).min().unwrap_or(now);
        log::info!(
            "laneguard: reporting {total} hits admitted without the service, the first {} ms ago",
            laneguard_core::engine::report_age_ms(oldest, now)
        );
        shared.metrics.reported_hits.add(h, total);
        if reconnected {
            shared.metrics.reported_on_reconnect.add(h, total);
        }
        // In calls of at most REPORT_BATCH descriptors: a ledger after a long outage may hold
        // many buckets, and the service refuses a request over 4 MiB.
        for batch in entries.chunks(REPORT_BATCH) {
            let descriptors = batch.iter().map(|d| d.report_descriptor(now)).collect();
            let msg = rls::encode_descriptors(&shared.policy.service.domain, descriptors, 0);
            // The degraded admissions' tally rides on the report of their hits.
            let usage = take_usage(shared);
            let tally = (!usage.is_empty()).then(|| usage::encode(&usage));
            let mut metadata = vec![(rls::REPORT_HEADER, &b"1"[..])];
            if let Some(t) = &tally {
                metadata.push((usage::METADATA, t.as_bytes()));
            }
            if let Err(RootCall::Report(_, usage)) = self.dispatch(
                h,
                shared,
                &msg,
                metadata,
                RootCall::Report(batch.to_vec(), usage),
            ) {
                reconcile::give_back(h, batch);
                shared.usage.borrow_mut().give_back(usage);
            }
        }
    }

    /// Give back the tokens this worker's AI requests reserved and did not use: one call
    /// per sync tick for all of them (`x-laneguard-report: refund`). A failed call keeps
    /// them for the next tick.
    fn refund(&mut self, h: &dyn Host, shared: &Rc<Shared>) {
        let entries = shared.refunds.borrow_mut().take();
        if entries.is_empty() {
            return;
        }
        let descriptors = entries
            .iter()
            .map(|p| rls::descriptor(&p.bucket, Some(p.hits)))
            .collect();
        let msg = rls::encode_descriptors(&shared.policy.service.domain, descriptors, 0);
        let total: u64 = entries.iter().map(|p| p.hits).sum();
        shared.metrics.tokens.refunds_sent.add(h, total);
        let metadata = vec![(rls::REPORT_HEADER, rls::REFUND)];
        if let Err(RootCall::Refund(entries)) =
            self.dispatch(h, shared, &msg, metadata, RootCall::Refund(entries))
        {
            Self::keep_refunds(shared, entries);
        }
    }

    fn keep_refunds(shared: &Shared, entries: Vec<Pending>) {
        let mut refunds = shared.refunds.borrow_mut();
        for pending in entries {
            refunds.put_back(pending);
        }
    }

    /// An answer to one of the root context's calls.
    pub fn on_grpc_response(
        &mut self,
        h: &dyn Host,
        token_id: u32,
        status_code: u32,
        response_size: usize,
    ) {
        let Some(call) = self.calls.remove(&token_id) else {
            return;
        };
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let now = h.now_ns();
        let body = if status_code == 0 {
            h.grpc_response_body(response_size)
        } else {
            None
        };
        if matches!(call, RootCall::Probe) {
            return;
        }
        if let RootCall::Audit(records) = call {
            audit::shipped(h, &shared, records, status_code, body.as_deref());
            // More records came in while this batch was in flight: send them now, so the
            // shipping rate follows the flood rather than the tick. (After a failure the
            // back-off runs on the tick.)
            if status_code == 0 {
                self.ship_audit(h, &shared);
            }
            return;
        }
        if let RootCall::Usage(entries) = call {
            // Kept for the next sync when the service could not be reached (or gave no
            // answer); an error status from a server that answers (a plain RLS server
            // refusing an empty request) drops the batch: such a server keeps no ledger.
            if status_code == GRPC_UNAVAILABLE || (status_code == 0 && body.is_none()) {
                shared.usage.borrow_mut().give_back(entries);
            }
            return;
        }
        let verdict = body.and_then(|b| rls::decode(&b).ok());
        shared.service_answered(verdict.is_some());
        match call {
            RootCall::Release(id, q, started_ns) => {
                // As on the request path: a call that timed out, or whose answer could not
                // be read, may have been charged by the service.
                let may_have_counted = if status_code == 0 {
                    verdict.is_none()
                } else {
                    laneguard_core::engine::call_timed_out(
                        status_code,
                        now.saturating_sub(started_ns),
                        shared.policy.service.timeout_ms,
                    )
                };
                self.released(h, &shared, id, &q, verdict, may_have_counted, now)
            }
            RootCall::Renew(buckets, entries) => {
                let refs: Vec<&Bucket> = buckets.iter().collect();
                let mut table = shared.table.borrow_mut();
                match verdict {
                    Some(v) => request::apply_statuses(
                        &mut table,
                        &refs,
                        &v.statuses,
                        &v.holds,
                        shared.peer.get(),
                        now,
                    ),
                    None => shared.usage.borrow_mut().give_back(entries),
                }
                table.renewal_done(&refs);
            }
            RootCall::Report(entries, usage) => {
                if verdict.is_none() {
                    reconcile::give_back(h, &entries);
                    shared.usage.borrow_mut().give_back(usage);
                }
            }
            RootCall::Refund(entries) => {
                if verdict.is_none() {
                    Self::keep_refunds(&shared, entries);
                }
            }
            RootCall::Audit(_) | RootCall::Probe | RootCall::Usage(_) => {}
        }
    }

    /// Parse the policy. False refuses the configuration (Envoy logs the error).
    pub fn on_configure(&mut self, h: &dyn Host) -> bool {
        let Some(bytes) = h.plugin_configuration() else {
            log::error!("laneguard: no policy: the plugin configuration is empty");
            return false;
        };
        let text = match std::str::from_utf8(&bytes) {
            Ok(t) => t,
            Err(e) => {
                log::error!("laneguard: the policy is not UTF-8: {e}");
                return false;
            }
        };
        let policy = match laneguard_core::parse(text) {
            Ok(p) => p,
            Err(e) => {
                log::error!("laneguard: invalid policy: {e}");
                return false;
            }
        };
        let shared = Shared::new(h, policy);
        let policy = &shared.policy;
        log::info!(
            "laneguard: policy loaded: {} classes, {} principals, {} tenant overrides, service cluster {:?}",
            policy.classes.len(),
            policy.principals.len(),
            policy.tenant_plans.len(),
            policy.service.cluster
        );
        self.shared = Some(Rc::new(shared));
        h.set_tick_period(TICK);
        true
    }

    pub fn on_vm_start(&mut self, h: &dyn Host) -> bool {
        reconcile::seed(h);
        true
    }

    pub fn on_tick(&mut self, h: &dyn Host) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks == 1 {
            self.probe_clusters(h, &shared);
        }
        shared.metrics.flush(h);
        let now = h.now_ns();
        self.renew(h, &shared, now);
        let sync_ticks = u64::from(shared.policy.service.sync_interval_s) * TICKS_PER_SECOND;
        let sync_tick = self.ticks.is_multiple_of(sync_ticks);
        let due = shared.reporting.borrow_mut().take(sync_tick);
        if due != Due::No {
            self.reconcile(h, &shared, now, due);
        }
        if sync_tick {
            self.refund(h, &shared);
            self.send_usage(h, &shared);
        }
        self.resume_queued(h, &shared, now);
        self.ship_audit(h, &shared);
        if self.ticks.is_multiple_of(PRUNE_EVERY) {
            shared.table.borrow_mut().prune(now);
            if let Some((keys, bytes)) = reconcile::footprint(h) {
                shared.metrics.shared_data_keys.set(h, keys);
                shared.metrics.shared_data_bytes.set(h, bytes);
            }
        }
        if self.ticks.is_multiple_of(TICKS_PER_SECOND) {
            let mut table = shared.table.borrow_mut();
            let m = &shared.metrics;
            m.buckets_evicted.add(h, table.take_evicted());
            m.vm_memory_bytes.set(h, crate::host::vm_memory_bytes());
            m.lease_outstanding.set(h, table.outstanding_lease(now));
            m.buckets.set(h, table.len() as u64);
            m.unreported_hits.set(h, shared.unreported.borrow().total());
            // What the worker's own ledgers (capped at MAX_UNREPORTED_BUCKETS) forgot.
            m.unreported_dropped
                .add(h, shared.unreported.borrow_mut().take_dropped());
            m.tokens
                .refunds_dropped
                .add(h, shared.refunds.borrow_mut().take_dropped());
            m.queue_depth.set(h, shared.queue.borrow().len() as u64);
            m.audit_buffered.set(h, shared.audit.borrow().len() as u64);
        }
    }
}

#[cfg(test)]
mod tests;

/// One call's batch of the usage tally.
fn take_usage(shared: &Shared) -> Vec<(Key, Counts)> {
    shared.usage.borrow_mut().take(usage::MAX_ENTRIES_PER_CALL)
}

/// Resume a queued request that is paid for.
fn release(h: &dyn Host, shared: &Shared, id: u32) {
    match h
        .set_effective_context(id)
        .and_then(|()| h.resume_request())
    {
        Ok(()) => shared.metrics.queue_resumed.inc(h),
        Err(e) => {
            shared.metrics.queue_abandoned.inc(h);
            log::warn!("laneguard: cannot resume queued request {id}: {e:?}");
        }
    }
}

/// The service could not decide a queued request: its class's failure mode. `open` and
/// `local` release it on the place it holds on this worker's mirror (reported to the service
/// with the next reconciliation, like any admission made without it, by the same rule as the
/// request path: `engine::report_unanswered`, so a queued request on a reserve whose call
/// may have reached a hung service is not reported again); `closed` answers 503.
fn release_degraded(
    h: &dyn Host,
    shared: &Shared,
    id: u32,
    q: &Queued,
    now: u64,
    may_have_counted: bool,
) {
    shared.metrics.degraded.inc(h);
    let attempt = q.plan.attempt(q.borrowing);
    match q.plan.failure_mode {
        FailureMode::Open | FailureMode::Local => {
            if laneguard_core::engine::report_unanswered(&q.plan, q.borrowing, may_have_counted) {
                let costed: Vec<(&Bucket, u32)> =
                    attempt.iter().map(|b| (*b, q.plan.cost)).collect();
                shared
                    .unreported
                    .borrow_mut()
                    .add_seen(&shared.table.borrow(), &costed, now);
            }
            shared.note_usage(&q.plan, Admission::Degraded, now);
            release(h, shared, id);
        }
        FailureMode::Closed => {
            shared.table.borrow_mut().refund(&attempt, q.plan.cost, now);
            let body = error_body(
                "rate_limit_service_unavailable",
                "the rate-limit service did not answer and this class fails closed",
            );
            let headers = [
                ("retry-after", "1".to_string()),
                ("x-laneguard-degraded", "service_error".to_string()),
            ];
            if h.set_effective_context(id).is_ok() {
                request::reply(h, 503, &body, &headers);
            }
        }
    }
}
