//! The proxy-wasm side: [`ProxyWasmHost`] implements [`Host`] with proxy-wasm host calls,
//! and the SDK's context traits forward each callback to [`Root`] and [`Request`].
//! Nothing here decides anything.
//!
//! The host calls are made directly (not through the SDK's context methods, which
//! `unwrap` every host status): a refused call is logged or ignored, never a panic.

use crate::host::{
    Action, DispatchError, GrpcCall, Host, HostError, MetricKind, SharedDataError, SharedValue,
};
use crate::request::Request;
use crate::root::Root;
use laneguard_core::headers::error_body;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, MapType, MetricType, Status};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The host the filter runs in: Envoy, through proxy-wasm.
pub struct ProxyWasmHost;

fn now_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A header value as text: bytes that are not UTF-8 become U+FFFD, so a value that carried
/// them can never equal a policy name or pass identity validation (`[A-Za-z0-9._:@-]`): a
/// tenant or principal with such bytes is refused with 400 `invalid_identity`, a declared
/// class with them is an unknown (forged) class. Header names need no conversion: Envoy's
/// codecs accept only token characters in a name.
pub(crate) fn text(value: Vec<u8>) -> String {
    match String::from_utf8(value) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

fn err(s: Status) -> HostError {
    HostError(format!("{s:?}"))
}

impl Host for ProxyWasmHost {
    fn now_ns(&self) -> u64 {
        hostcalls::get_current_time().map(now_ns).unwrap_or(0)
    }

    // The SDK's text getters (`get_map`, `get_map_value`) `unwrap` a UTF-8 conversion of
    // every value, and HTTP allows any byte above 0x7f in a header value: one such header
    // would panic the VM. So values are read as bytes and converted here ([`text`]).
    fn request_headers(&self) -> Vec<(String, String)> {
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders)
            .map(|hs| hs.into_iter().map(|(k, v)| (k, text(v))).collect())
            .unwrap_or_default()
    }

    fn request_header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
            .map(text)
    }

    fn set_request_header(&self, name: &str, value: &str) {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
    }

    fn remove_request_header(&self, name: &str) {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
    }

    fn set_response_header(&self, name: &str, value: &str) {
        let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
    }

    fn response_header(&self, name: &str) -> Option<String> {
        // Bytes, like the request headers: an upstream's non-UTF-8 value must not panic.
        hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
            .ok()
            .flatten()
            .map(text)
    }

    fn request_body(&self, start: usize, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, start, size)
            .ok()
            .flatten()
    }

    fn set_request_body(&self, old_size: usize, body: &[u8]) -> Result<(), HostError> {
        hostcalls::set_buffer(BufferType::HttpRequestBody, 0, old_size, body).map_err(err)
    }

    fn response_body(&self, start: usize, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, start, size)
            .ok()
            .flatten()
    }

    fn send_reply(&self, status: u32, headers: Vec<(&str, &str)>, body: &[u8]) {
        if let Err(e) = hostcalls::send_http_response(status, headers, Some(body)) {
            log::warn!("laneguard: cannot send a local reply {status}: {e:?}");
        }
    }

    fn resume_request(&self) -> Result<(), HostError> {
        hostcalls::resume_http_request().map_err(err)
    }

    fn set_filter_state(&self, key: &str, value: &[u8]) -> Result<(), HostError> {
        hostcalls::set_property(vec![key], Some(value)).map_err(err)
    }

    fn dispatch_grpc(&self, call: GrpcCall<'_>) -> Result<u32, DispatchError> {
        hostcalls::dispatch_grpc_call(
            call.cluster,
            call.service,
            call.method,
            call.metadata,
            Some(call.message),
            call.timeout,
        )
        .map_err(|s| match s {
            // Envoy 1.3x answers ParseFailure for a cluster it does not have (the filter
            // always passes a cluster name, never a serialized GrpcService); older hosts
            // answered BadArgument, the ABI suggests NotFound.
            Status::NotFound | Status::BadArgument | Status::ParseFailure => {
                DispatchError::UnknownCluster(format!("{s:?}"))
            }
            _ => DispatchError::Failed(format!("{s:?}")),
        })
    }

    fn grpc_response_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
            .ok()
            .flatten()
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError> {
        hostcalls::set_effective_context(context_id).map_err(err)
    }

    fn set_tick_period(&self, period: Duration) {
        let _ = hostcalls::set_tick_period(period);
    }

    fn plugin_configuration(&self) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
    }

    fn get_shared_data(&self, key: &str) -> Result<SharedValue, HostError> {
        hostcalls::get_shared_data(key).map_err(err)
    }

    fn set_shared_data(
        &self,
        key: &str,
        value: &[u8],
        cas: Option<u32>,
    ) -> Result<(), SharedDataError> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|s| match s {
            Status::CasMismatch => SharedDataError::CasMismatch,
            _ => SharedDataError::Other(format!("{s:?}")),
        })
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let t = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
        };
        hostcalls::define_metric(t, name).map_err(err)
    }

    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), HostError> {
        hostcalls::increment_metric(id, delta).map_err(err)
    }
}

fn action(a: Action) -> proxy_wasm::types::Action {
    match a {
        Action::Continue => proxy_wasm::types::Action::Continue,
        Action::Pause => proxy_wasm::types::Action::Pause,
    }
}

/// The SDK's root context: forwards to [`Root`].
pub struct RootGlue(pub Root);

impl Context for RootGlue {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        self.0
            .on_grpc_response(&ProxyWasmHost, token_id, status_code, response_size);
    }
}

impl RootContext for RootGlue {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        self.0.on_configure(&ProxyWasmHost)
    }

    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        self.0.on_vm_start(&ProxyWasmHost)
    }

    fn on_tick(&mut self) {
        self.0.on_tick(&ProxyWasmHost);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Without a policy on_configure returned false and Envoy refused the configuration,
        // so this branch is not reached in practice. Returning None would panic in the SDK,
        // so an unconfigured VM answers 500 instead of guessing.
        match self.0.new_request(context_id) {
            Some(request) => Some(Box::new(RequestGlue(request))),
            None => Some(Box::new(Unconfigured)),
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The SDK's HTTP context: forwards to [`Request`].
pub struct RequestGlue(pub Request);

impl Context for RequestGlue {
    fn on_done(&mut self) -> bool {
        self.0.on_done(&ProxyWasmHost)
    }

    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        self.0
            .on_grpc_response(&ProxyWasmHost, token_id, status_code, response_size);
    }
}

impl HttpContext for RequestGlue {
    fn on_http_request_headers(
        &mut self,
        _num_headers: usize,
        end_of_stream: bool,
    ) -> proxy_wasm::types::Action {
        action(self.0.on_request_headers_end(&ProxyWasmHost, end_of_stream))
    }

    fn on_http_request_body(
        &mut self,
        body_size: usize,
        end_of_stream: bool,
    ) -> proxy_wasm::types::Action {
        action(
            self.0
                .on_request_body(&ProxyWasmHost, body_size, end_of_stream),
        )
    }

    fn on_http_response_headers(
        &mut self,
        _num_headers: usize,
        end_of_stream: bool,
    ) -> proxy_wasm::types::Action {
        action(
            self.0
                .on_response_headers_end(&ProxyWasmHost, end_of_stream),
        )
    }

    fn on_http_response_body(
        &mut self,
        body_size: usize,
        end_of_stream: bool,
    ) -> proxy_wasm::types::Action {
        action(
            self.0
                .on_response_body(&ProxyWasmHost, body_size, end_of_stream),
        )
    }
}

/// The request context of a VM without a valid policy: fail closed, visibly.
pub struct Unconfigured;

impl Context for Unconfigured {}

impl HttpContext for Unconfigured {
    fn on_http_request_headers(
        &mut self,
        _num_headers: usize,
        _end_of_stream: bool,
    ) -> proxy_wasm::types::Action {
        let body = error_body(
            "laneguard_not_configured",
            "the laneguard policy did not load",
        );
        ProxyWasmHost.send_reply(
            500,
            vec![("content-type", "application/json")],
            body.as_bytes(),
        );
        proxy_wasm::types::Action::Pause
    }
}

#[cfg(test)]
mod tests {
    use super::text;

    /// Found by reading the SDK for the fuzzing work (issue 12 §2): proxy-wasm 0.2.5's
    /// `get_map` unwraps `String::from_utf8` on every header value, so one header value with
    /// a byte above 0x7f (legal in HTTP/1.1 as obs-text) panicked the VM.
    #[test]
    fn non_utf8_header_value_is_text_not_a_panic() {
        assert_eq!(text(b"acme".to_vec()), "acme");
        assert_eq!(text(vec![b'a', 0xff, b'c']), "a\u{fffd}c");
        assert_eq!(text(vec![0xc3]), "\u{fffd}", "a cut multi-byte sequence");
        assert_eq!(text("é".as_bytes().to_vec()), "é");
    }
}
