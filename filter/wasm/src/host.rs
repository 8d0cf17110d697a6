//! The host, behind a trait: everything the filter asks of Envoy.
//!
//! The request state machine ([`crate::request`]) and the root context's logic
//! ([`crate::root`]) reach Envoy only through [`Host`], so they depend on this trait and on
//! `laneguard-core`, never on proxy-wasm. The proxy-wasm implementation is
//! [`crate::wasm_host::ProxyWasmHost`] (the cdylib's glue); the unit tests drive the same
//! code through a scripted mock (`crate::mock::MockHost`, tests only).
//!
//! Every method is infallible where a failure cannot change the outcome (a header that
//! cannot be set, a stat that cannot be bumped): the implementation logs or swallows it, so
//! no host error can panic the VM.

use std::time::Duration;

/// What Envoy should do with the request after a callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// Why a gRPC call could not be dispatched. The string is the host's status, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DispatchError {
    /// The cluster is not configured (proxy-wasm `ParseFailure` from Envoy 1.3x, `NotFound`
    /// or `BadArgument` from other hosts).
    UnknownCluster(String),
    /// Any other refusal.
    Failed(String),
}

/// A failed host call whose detail only matters to the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostError(pub String);

/// Why a shared-data write failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SharedDataError {
    /// Someone wrote the key since it was read (compare-and-swap lost).
    CasMismatch,
    Other(String),
}

/// A shared-data value (absent if never written) and its compare-and-swap token.
pub type SharedValue = (Option<Vec<u8>>, Option<u32>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// A unary gRPC call.
pub struct GrpcCall<'a> {
    pub cluster: &'a str,
    pub service: &'a str,
    pub method: &'a str,
    pub metadata: Vec<(&'a str, &'a [u8])>,
    pub message: &'a [u8],
    pub timeout: Duration,
}

pub trait Host {
    /// Wall-clock time in nanoseconds since the Unix epoch.
    fn now_ns(&self) -> u64;

    // The current request (HTTP contexts only).
    /// Every request header, in one host call. Names are lower case.
    fn request_headers(&self) -> Vec<(String, String)>;
    fn request_header(&self, name: &str) -> Option<String>;
    fn set_request_header(&self, name: &str, value: &str);
    // Not called yet: here so that a change that strips a header does not grow the trait.
    #[allow(dead_code)]
    fn remove_request_header(&self, name: &str);
    fn set_response_header(&self, name: &str, value: &str);
    fn response_header(&self, name: &str) -> Option<String>;
    /// The buffered request body (`size` bytes from `start`), while the request is held.
    fn request_body(&self, start: usize, size: usize) -> Option<Vec<u8>>;
    /// Replace the first `old_size` bytes of the buffered request body with `body`.
    fn set_request_body(&self, old_size: usize, body: &[u8]) -> Result<(), HostError>;
    /// The response body chunk being delivered (`size` bytes from `start`).
    fn response_body(&self, start: usize, size: usize) -> Option<Vec<u8>>;
    /// Answer the request locally; the upstream is not called.
    fn send_reply(&self, status: u32, headers: Vec<(&str, &str)>, body: &[u8]);
    /// Continue the paused current request.
    fn resume_request(&self) -> Result<(), HostError>;
    /// Write a filter-state value (the access log prints it).
    fn set_filter_state(&self, key: &str, value: &[u8]) -> Result<(), HostError>;

    // Calls out.
    /// Dispatch a unary gRPC call; its answer arrives on the dispatching context.
    fn dispatch_grpc(&self, call: GrpcCall<'_>) -> Result<u32, DispatchError>;
    /// The body of the gRPC answer being delivered.
    fn grpc_response_body(&self, size: usize) -> Option<Vec<u8>>;

    // Root contexts.
    /// Make another context (a queued request's) the effective one.
    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError>;
    fn set_tick_period(&self, period: Duration);
    fn plugin_configuration(&self) -> Option<Vec<u8>>;

    // Shared data, across the VMs of one Envoy.
    /// The value and its CAS token.
    fn get_shared_data(&self, key: &str) -> Result<SharedValue, HostError>;
    /// Write `value`; with `cas` only if the key is unchanged since that token (`None` writes
    /// unconditionally: proxy-wasm has no create-if-absent).
    fn set_shared_data(
        &self,
        key: &str,
        value: &[u8],
        cas: Option<u32>,
    ) -> Result<(), SharedDataError>;

    // Stats.
    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError>;
    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), HostError>;
}

/// This VM's linear memory in bytes (WebAssembly pages of 64 KiB); 0 off wasm32 (tests).
pub fn vm_memory_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        (core::arch::wasm32::memory_size(0) as u64).saturating_mul(65_536)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}
