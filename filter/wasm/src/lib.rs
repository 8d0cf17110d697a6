//! # laneguard-wasm
//!
//! The Envoy proxy-wasm filter: a thin shell that translates Envoy's calls into
//! `laneguard_core` calls. The root context parses the policy once per VM in `on_configure`
//! (a bad policy returns false, so Envoy refuses the configuration) and hands each request
//! a [`request::Request`] that shares the policy, the worker's local table and the metrics.
//!
//! Each Envoy worker runs its own VM, so buckets are per worker. A request is decided
//! locally when it can be (spending leased capacity, or refusing when the local mirror
//! already shows no room, which is sound because the mirror only under-counts the fleet);
//! otherwise the filter asks the rate-limit service with `ShouldRateLimit` and waits at most
//! `service.timeout_ms`. Every failure of that call takes the class's failure mode.
//!
//! Operability (issue 4): rollout modes and fallbacks are applied per request in
//! [`request`]; the root context's tick resumes queued requests (it makes a paused request's
//! context the effective one and resumes it) and ships audit records to the service in
//! batches ([`audit`]), so neither adds latency to a request.
//!
//! Layout: [`host`] is the trait every call to Envoy goes through; [`request`] (the request
//! state machine, one file per phase) and [`root`] (the root context's logic) use only
//! that trait and `laneguard-core`; [`wasm_host`] is the proxy-wasm implementation and the
//! SDK glue. The unit tests drive `request` and `root` through `mock::MockHost`.
//!
//! No code path here may panic: a panic poisons the VM for every later request. The
//! workspace denies `unwrap`, `expect` and `panic` outside tests.

mod audit;
mod host;
mod metrics;
#[cfg(test)]
mod mock;
mod reconcile;
mod request;
mod rls;
mod root;
mod wasm_host;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> {
        Box::new(wasm_host::RootGlue(root::Root::new(id)))
    });
}}
