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
//! No code path here may panic: a panic poisons the VM for every later request. The
//! workspace denies `unwrap`, `expect` and `panic` outside tests.

mod http;
mod metrics;
mod rls;

use laneguard_core::{LocalTable, Policy};
use metrics::Metrics;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// State one VM (one Envoy worker) shares between its root context and its requests.
pub(crate) struct Shared {
    pub policy: Policy,
    pub table: RefCell<LocalTable>,
    pub metrics: Metrics,
}

#[derive(Default)]
struct Root {
    shared: Option<Rc<Shared>>,
}

/// How often the root context prunes idle buckets.
const TICK: Duration = Duration::from_secs(5);

pub(crate) fn now_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Context for Root {}

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
        }));
        self.set_tick_period(TICK);
        true
    }

    fn on_tick(&mut self) {
        if let Some(shared) = &self.shared {
            let now = now_ns(self.get_current_time());
            shared.table.borrow_mut().prune(now);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Without a policy on_configure returned false and Envoy refused the configuration,
        // so this branch is not reached in practice. Returning None would panic in the SDK,
        // so an unconfigured VM answers 500 instead of guessing.
        match self.shared.clone() {
            Some(shared) => Some(Box::new(http::Request::new(shared))),
            None => Some(Box::new(http::Unconfigured)),
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
