//! # laneguard-bench-noop
//!
//! A proxy-wasm HTTP filter that returns `Continue` from every callback and does nothing
//! else. `make bench` runs it in the same V8 runtime, with the same `vm_config` as the
//! laneguard filter, so its cost over the router-only baseline is what entering a Wasm
//! filter costs at all: the floor under laneguard's own logic. It reads no configuration,
//! no headers and no clock, and defines no stats.
//!
//! Built with `cargo build --release --target wasm32-wasip1 -p laneguard-bench-noop` into
//! `target/wasm32-wasip1/release/laneguard_bench_noop.wasm`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot) });
}}

struct NoopRoot;

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request. Every callback keeps the SDK's default, `Continue`, except request headers,
/// which is spelled out so that the filter visibly takes part in the request.
struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }
}
