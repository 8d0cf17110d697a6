//! # laneguard-wasm
//!
//! The Envoy proxy-wasm filter: a thin shell that translates Envoy's calls into
//! `laneguard_core` calls. The root context parses the policy once per VM in `on_configure`
//! (a bad policy returns false, so Envoy refuses the configuration) and hands each request
//! an [`http::Request`] that shares the policy, the worker's [`LocalTable`] and the metrics.
//!
//! Each Envoy worker runs its own VM, so buckets are per worker. A request is decided
//! locally when it can be (spending leased capacity, or refusing when the local mirror
//! already shows no room, which is sound because the mirror only under-counts the fleet);
//! otherwise the filter asks the rate-limit service with `ShouldRateLimit` and waits at most
//! `service.timeout_ms`. Every failure of that call takes the class's failure mode.
//!
//! Operability (issue 4): rollout modes and fallbacks are applied per request in
//! [`http`]; the root context's tick resumes queued requests (it makes a paused request's
//! context the effective one and resumes it) and ships audit records to the service in
//! batches ([`audit`]), so neither adds latency to a request.
//!
//! No code path here may panic: a panic poisons the VM for every later request. The
//! workspace denies `unwrap`, `expect` and `panic` outside tests.

mod audit;
mod http;
mod metrics;
mod reconcile;
mod rls;

use laneguard_core::degrade::WaitQueue;
use laneguard_core::rollout::{Watch, DEFAULT_WATCH_TENANTS};
use laneguard_core::{Bucket, LocalTable, Policy, Unreported};
use laneguard_protos::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use metrics::Metrics;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(Root::new(id)) });
}}

/// State one VM (one Envoy worker) shares between its root context and its requests.
pub(crate) struct Shared {
    pub policy: Policy,
    pub table: RefCell<LocalTable>,
    pub metrics: Metrics,
    /// Bucket sets whose lease runs low: the root context renews them on its next tick,
    /// so no request waits for a renewal.
    pub renewals: RefCell<Vec<Vec<Bucket>>>,
    /// Hits admitted without the service, to report on the sync tick.
    pub unreported: RefCell<Unreported>,
    /// Which classes of which tenants were active lately; squeezes already reported.
    pub watch: RefCell<Watch>,
    /// Requests held by the `queue` fallback, resumed from the root tick.
    pub queue: RefCell<WaitQueue>,
    /// Audit records waiting to be shipped to the service.
    pub audit: RefCell<audit::Outbox>,
}

/// A call the root context is waiting for.
enum RootCall {
    Renew(Vec<Bucket>),
    Report(Vec<(String, RateLimitDescriptor, u64)>),
    Audit(Vec<String>),
}

struct Root {
    /// This root context's id, to make it the effective context again after resuming a
    /// queued request's.
    id: u32,
    shared: Option<Rc<Shared>>,
    /// This VM's id for the reporter lease: random (WASI `random_get`, through std).
    vm: u64,
    ticks: u64,
    calls: HashMap<u32, RootCall>,
}

impl Root {
    fn new(id: u32) -> Root {
        Root {
            id,
            shared: None,
            vm: RandomState::new().hash_one(0u8),
            ticks: 0,
            calls: HashMap::new(),
        }
    }
}

/// The root tick: renewals go out within one tick of a lease running low.
const TICK: Duration = Duration::from_millis(100);
const TICKS_PER_SECOND: u64 = 10;
/// Prune idle buckets every this many ticks.
const PRUNE_EVERY: u64 = 50;
/// Ask for a renewal when the lease would run out within this horizon.
pub(crate) const RENEW_HORIZON_NS: u64 = 300_000_000;

pub(crate) fn now_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Root {
    /// Resume the queued requests whose wait is over. Their buckets were charged when they
    /// were queued, so there is nothing left to decide: make each one's context effective
    /// and continue it. A request whose client went away was removed from the queue by its
    /// own `on_done`; if Envoy still refuses the context, it is counted and forgotten.
    fn resume_queued(&mut self, shared: &Shared, now: u64) {
        let ready = shared.queue.borrow_mut().take_ready(now);
        if ready.is_empty() {
            return;
        }
        for id in ready {
            let resumed = proxy_wasm::hostcalls::set_effective_context(id)
                .and_then(|()| proxy_wasm::hostcalls::resume_http_request());
            match resumed {
                Ok(()) => shared.metrics.queue_resumed.inc(),
                Err(e) => {
                    shared.metrics.queue_abandoned.inc();
                    log::warn!("laneguard: cannot resume queued request {id}: {e:?}");
                }
            }
        }
        // Later calls in this tick (gRPC dispatches) belong to the root context.
        let _ = proxy_wasm::hostcalls::set_effective_context(self.id);
    }

    /// Ship one batch of audit records, if any wait and no batch is in flight.
    fn ship_audit(&mut self, shared: &Shared) {
        let audit = &shared.policy.ops.audit;
        let next = shared
            .audit
            .borrow_mut()
            .next_batch(audit.ship, audit.max_batch as usize);
        let Some(batch) = next else {
            return;
        };
        let msg = audit::encode(&batch);
        match self.dispatch_grpc_call(
            &audit.cluster,
            audit::SERVICE,
            audit::METHOD,
            Vec::new(),
            Some(&msg),
            Duration::from_millis(audit::TIMEOUT_MS),
        ) {
            Ok(token) => {
                self.calls.insert(token, RootCall::Audit(batch));
            }
            Err(status) => {
                log::debug!("laneguard: cannot dispatch audit records: {status:?}");
                audit::shipped(shared, batch, audit::DISPATCH_FAILED, None);
            }
        }
    }

    fn dispatch(
        &mut self,
        shared: &Shared,
        message: &[u8],
        metadata: Vec<(&str, &[u8])>,
        call: RootCall,
    ) -> bool {
        let svc = &shared.policy.service;
        match self.dispatch_grpc_call(
            &svc.cluster,
            rls::SERVICE,
            rls::METHOD,
            metadata,
            Some(message),
            Duration::from_millis(u64::from(svc.timeout_ms)),
        ) {
            Ok(token) => {
                self.calls.insert(token, call);
                true
            }
            Err(_) => {
                shared.metrics.service_error_dispatch.inc();
                false
            }
        }
    }

    fn renew(&mut self, shared: &Rc<Shared>, now: u64) {
        let pending: Vec<Vec<Bucket>> = std::mem::take(&mut *shared.renewals.borrow_mut());
        for buckets in pending {
            let refs: Vec<&Bucket> = buckets.iter().collect();
            let want = shared
                .table
                .borrow()
                .want(&refs, 1, now, shared.policy.service.max_lease);
            let descriptors = refs.iter().map(|b| rls::descriptor(b, Some(0))).collect();
            let msg = rls::encode_descriptors(&shared.policy.service.domain, descriptors, 0);
            let want = want.to_string();
            let metadata = vec![(rls::LEASE_HEADER, want.as_bytes())];
            shared.metrics.lease_renewals.inc();
            if !self.dispatch(shared, &msg, metadata, RootCall::Renew(buckets.clone())) {
                shared.table.borrow_mut().renewal_done(&refs);
            }
        }
    }

    fn reconcile(&mut self, shared: &Rc<Shared>, now: u64) {
        let mine = shared.unreported.borrow_mut().take();
        if !mine.is_empty() {
            for (bucket, hits) in reconcile::publish(self.vm, mine) {
                shared
                    .unreported
                    .borrow_mut()
                    .add(&[&bucket], u32::try_from(hits).unwrap_or(u32::MAX));
            }
        }
        let interval_ns = u64::from(shared.policy.service.sync_interval_s) * 1_000_000_000;
        if !reconcile::lead(self.vm, now, interval_ns.saturating_mul(3)) {
            return;
        }
        let entries = reconcile::drain();
        if entries.is_empty() {
            return;
        }
        let descriptors = entries
            .iter()
            .map(|(_, d, hits)| RateLimitDescriptor {
                hits_addend: Some(*hits),
                ..d.clone()
            })
            .collect();
        let msg = rls::encode_descriptors(&shared.policy.service.domain, descriptors, 0);
        let total: u64 = entries.iter().map(|(_, _, h)| h).sum();
        log::info!("laneguard: reporting {total} hits admitted without the service");
        shared.metrics.reported_hits.add(total);
        if !self.dispatch(
            shared,
            &msg,
            vec![(rls::REPORT_HEADER, b"1")],
            RootCall::Report(entries.clone()),
        ) {
            reconcile::give_back(&entries);
        }
    }
}

impl Context for Root {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some(call) = self.calls.remove(&token_id) else {
            return;
        };
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let now = now_ns(self.get_current_time());
        let body = if status_code == 0 {
            self.get_grpc_call_response_body(0, response_size)
        } else {
            None
        };
        if let RootCall::Audit(records) = call {
            audit::shipped(&shared, records, status_code, body.as_deref());
            return;
        }
        let verdict = body.and_then(|b| rls::decode(&b).ok());
        match call {
            RootCall::Renew(buckets) => {
                let refs: Vec<&Bucket> = buckets.iter().collect();
                let mut table = shared.table.borrow_mut();
                if let Some(v) = verdict {
                    http::apply_statuses(&mut table, &refs, &v.statuses, now);
                }
                table.renewal_done(&refs);
            }
            RootCall::Report(entries) => {
                if verdict.is_none() {
                    reconcile::give_back(&entries);
                }
            }
            RootCall::Audit(_) => {}
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let Some(bytes) = self.get_plugin_configuration() else {
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
        let metrics = Metrics::define(&policy);
        let classes = policy.classes.len();
        let max_buffer = policy.ops.audit.max_buffer as usize;
        log::info!(
            "laneguard: policy loaded: {} classes, {} principals, {} tenant overrides, service cluster {:?}",
            policy.classes.len(),
            policy.principals.len(),
            policy.tenant_plans.len(),
            policy.service.cluster
        );
        self.shared = Some(Rc::new(Shared {
            policy,
            table: RefCell::new(LocalTable::default()),
            metrics,
            renewals: RefCell::new(Vec::new()),
            unreported: RefCell::new(Unreported::default()),
            watch: RefCell::new(Watch::new(classes, DEFAULT_WATCH_TENANTS)),
            queue: RefCell::new(WaitQueue::default()),
            audit: RefCell::new(audit::Outbox::new(max_buffer)),
        }));
        self.set_tick_period(TICK);
        true
    }

    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        reconcile::seed();
        true
    }

    fn on_tick(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        self.ticks = self.ticks.wrapping_add(1);
        let now = now_ns(self.get_current_time());
        self.renew(&shared, now);
        let sync_ticks = u64::from(shared.policy.service.sync_interval_s) * TICKS_PER_SECOND;
        if self.ticks.is_multiple_of(sync_ticks) {
            self.reconcile(&shared, now);
        }
        self.resume_queued(&shared, now);
        self.ship_audit(&shared);
        if self.ticks.is_multiple_of(PRUNE_EVERY) {
            shared.table.borrow_mut().prune(now);
        }
        if self.ticks.is_multiple_of(TICKS_PER_SECOND) {
            let table = shared.table.borrow();
            shared
                .metrics
                .lease_outstanding
                .set(table.outstanding_lease(now));
            shared.metrics.buckets.set(table.len() as u64);
            shared
                .metrics
                .unreported_hits
                .set(shared.unreported.borrow().total());
            shared
                .metrics
                .queue_depth
                .set(shared.queue.borrow().len() as u64);
            shared
                .metrics
                .audit_buffered
                .set(shared.audit.borrow().len() as u64);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Without a policy on_configure returned false and Envoy refused the configuration,
        // so this branch is not reached in practice. Returning None would panic in the SDK,
        // so an unconfigured VM answers 500 instead of guessing.
        match self.shared.clone() {
            Some(shared) => Some(Box::new(http::Request::new(shared, context_id))),
            None => Some(Box::new(http::Unconfigured)),
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
