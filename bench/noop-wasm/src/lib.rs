//! # laneguard-bench-noop
//!
//! A proxy-wasm HTTP filter that returns `Continue` from every callback and, by default, does
//! nothing else. `make bench` runs it in the same V8 runtime, with the same `vm_config` as
//! the laneguard filter, so its cost over the router-only baseline is what entering a Wasm
//! filter costs at all: the floor under laneguard's own logic (configuration `wasm_noop`).
//!
//! With a plugin configuration such as `headers=1,time=2,metrics=3,set_request=1,
//! set_response=2` it also makes that many host calls per request, of each kind, and nothing
//! else: the same host calls laneguard makes on its fast path, without its logic. `make bench`
//! runs it as `wasm_hostcalls`, which splits laneguard's cost into "crossing into Envoy" and
//! "deciding". Keys: `headers` (get the whole request header map), `time` (read the clock),
//! `metrics` (increment a counter), `set_request` / `set_response` (set a header),
//! `filter_state` (set a filter-state value). An empty
//! configuration, or `{}`, is the pure no-op.
//!
//! Built with `cargo build --release --target wasm32-wasip1 -p laneguard-bench-noop` into
//! `target/wasm32-wasip1/release/laneguard_bench_noop.wasm`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(NoopRoot { calls: Rc::new(Calls::default()) })
    });
}}

/// Host calls to make per request (all zero for the pure no-op).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Calls {
    headers: u32,
    time: u32,
    metrics: u32,
    set_request: u32,
    set_response: u32,
    /// Set a filter-state value (`proxy_set_property`), as laneguard does for the access
    /// log's caller fields.
    filter_state: u32,
    /// Counter ids, defined once per VM.
    counters: Vec<u32>,
}

impl Calls {
    /// `key=n,key=n`; `{}` or nothing is the no-op. An unknown key or a bad number is an
    /// error, so a typo cannot silently measure the wrong thing.
    fn parse(text: &str) -> Result<Calls, String> {
        let mut c = Calls::default();
        let text = text.trim();
        if text.is_empty() || text == "{}" {
            return Ok(c);
        }
        for item in text.split(',') {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("`{item}` is not key=n"))?;
            let n: u32 = v
                .trim()
                .parse()
                .map_err(|_| format!("`{v}` is not a number"))?;
            match k.trim() {
                "headers" => c.headers = n,
                "time" => c.time = n,
                "metrics" => c.metrics = n,
                "set_request" => c.set_request = n,
                "set_response" => c.set_response = n,
                "filter_state" => c.filter_state = n,
                other => return Err(format!("unknown key `{other}`")),
            }
        }
        Ok(c)
    }
}

struct NoopRoot {
    calls: Rc<Calls>,
}

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let text = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let mut calls = match Calls::parse(&text) {
            Ok(c) => c,
            Err(e) => {
                log::error!("noop: bad configuration: {e}");
                return false;
            }
        };
        for i in 0..calls.metrics {
            match hostcalls::define_metric(MetricType::Counter, &format!("noop.counter{i}")) {
                Ok(id) => calls.counters.push(id),
                Err(e) => {
                    log::error!("noop: cannot define a counter: {e:?}");
                    return false;
                }
            }
        }
        self.calls = Rc::new(calls);
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop {
            calls: Rc::clone(&self.calls),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request.
struct Noop {
    calls: Rc<Calls>,
}

impl Context for Noop {}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let c = &self.calls;
        let mut seen = 0usize;
        for _ in 0..c.headers {
            seen += self.get_http_request_headers().len();
        }
        for _ in 0..c.time {
            seen += usize::from(self.get_current_time().elapsed().is_ok());
        }
        for id in &c.counters {
            let _ = hostcalls::increment_metric(*id, 1);
        }
        for _ in 0..c.set_request {
            self.set_http_request_header("x-noop", Some("1"));
        }
        for _ in 0..c.filter_state {
            let _ = hostcalls::set_property(vec!["noop_caller"], Some(b"tenant=bench"));
        }
        std::hint::black_box(seen);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for i in 0..self.calls.set_response {
            self.set_http_response_header(if i == 0 { "x-noop-a" } else { "x-noop-b" }, Some("1"));
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_configuration_is_the_noop() {
        assert_eq!(Calls::parse(""), Ok(Calls::default()));
        assert_eq!(Calls::parse("{}"), Ok(Calls::default()));
    }

    #[test]
    fn counts_parse_and_typos_are_errors() {
        let c =
            Calls::parse("headers=1, time=2,metrics=3,set_request=1,set_response=2,filter_state=1");
        assert_eq!(
            c,
            Ok(Calls {
                headers: 1,
                time: 2,
                metrics: 3,
                set_request: 1,
                set_response: 2,
                filter_state: 1,
                counters: Vec::new(),
            })
        );
        assert!(Calls::parse("header=1").is_err());
        assert!(Calls::parse("headers=x").is_err());
        assert!(Calls::parse("headers").is_err());
    }
}
