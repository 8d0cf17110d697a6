//! A scripted [`Host`] for unit tests: it records every call the filter makes, and answers
//! from a script (the next dispatch results, the gRPC answer's body, the clock).
//! Helpers at the end build a configured root context and the service's answers.

use crate::host::{
    Action, DispatchError, GrpcCall, Host, HostError, MetricKind, SharedDataError, SharedValue,
};
use crate::request::Request;
use crate::root::Root;
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::{
    quota::ExpirationSpecifier, Code, DescriptorStatus, Quota, RateLimit,
};
use laneguard_protos::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use laneguard_protos::prost::Message;
use laneguard_protos::prost_types;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

/// A local reply the filter sent.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }
}

/// A gRPC call the filter dispatched.
#[derive(Clone, Debug)]
pub struct Call {
    pub token: u32,
    pub cluster: String,
    pub service: String,
    pub method: String,
    pub metadata: Vec<(String, Vec<u8>)>,
    pub message: Vec<u8>,
    pub timeout: Duration,
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[derive(Default)]
pub struct MockHost {
    pub now: Cell<u64>,
    pub request_headers: RefCell<Vec<(String, String)>>,
    pub response_headers: RefCell<Vec<(String, String)>>,
    pub replies: RefCell<Vec<Reply>>,
    /// How many times the current request was resumed.
    pub resumed: Cell<u32>,
    /// Contexts made effective, in order.
    pub effective: RefCell<Vec<u32>>,
    /// Contexts the host refuses to make effective (a request that went away).
    pub gone: RefCell<Vec<u32>>,
    pub filter_state: RefCell<HashMap<String, Vec<u8>>>,
    pub calls: RefCell<Vec<Call>>,
    /// Results for the next dispatches; empty means accept.
    pub dispatch_script: RefCell<VecDeque<DispatchError>>,
    /// The root context's startup probes (health checks), apart from `calls`, so that
    /// tests counting calls see only the filter's own; clusters in `unknown_clusters` refuse
    /// the probe as Envoy does.
    pub probes: RefCell<Vec<String>>,
    pub unknown_clusters: RefCell<Vec<String>>,
    next_token: Cell<u32>,
    /// The body `grpc_response_body` returns.
    pub grpc_body: RefCell<Option<Vec<u8>>>,
    pub plugin_config: RefCell<Option<Vec<u8>>>,
    pub tick_period: Cell<Option<Duration>>,
    pub shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    /// The buffered request body, and the response body chunk being delivered.
    pub request_body: RefCell<Vec<u8>>,
    pub response_body: RefCell<Vec<u8>>,
    metrics: RefCell<Vec<(String, MetricKind, i64)>>,
    /// Every host call since the last [`MockHost::take_host_calls`], in order, as
    /// `method` or `method name` (a header, a key, a metric): what a request costs in
    /// crossings into Envoy. Metric definitions are not listed (they happen once per VM).
    host_calls: RefCell<Vec<String>>,
    /// The VM states whose batched counters [`MockHost::metric`] flushes first, as the root
    /// tick would (`Metrics::flush`), so that a test reads what Envoy shows after a tick.
    flushed: RefCell<Vec<std::rc::Weak<crate::root::Shared>>>,
}

impl MockHost {
    pub fn new(now_ns: u64) -> MockHost {
        let h = MockHost::default();
        h.now.set(now_ns);
        h.next_token.set(1);
        h
    }

    pub fn advance(&self, ns: u64) {
        self.now.set(self.now.get() + ns);
    }

    /// The headers of a new request (clears what the last one left).
    pub fn start_request(&self, headers: &[(&str, &str)]) {
        *self.request_headers.borrow_mut() = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.response_headers.borrow_mut().clear();
        self.replies.borrow_mut().clear();
        self.resumed.set(0);
    }

    pub fn response_header_value(&self, name: &str) -> Option<String> {
        find(&self.response_headers.borrow(), name).map(str::to_string)
    }

    pub fn request_header_value(&self, name: &str) -> Option<String> {
        find(&self.request_headers.borrow(), name).map(str::to_string)
    }

    pub fn last_reply(&self) -> Option<Reply> {
        self.replies.borrow().last().cloned()
    }

    pub fn last_call(&self) -> Option<Call> {
        self.calls.borrow().last().cloned()
    }

    /// Every gRPC call dispatched so far.
    pub fn call_count(&self) -> usize {
        self.calls.borrow().len()
    }

    /// The audit record the last decision left in the access log's filter state.
    pub fn audit_record(&self) -> Option<serde_json::Value> {
        let fs = self.filter_state.borrow();
        let bytes = fs.get(crate::audit::FILTER_STATE)?;
        serde_json::from_slice(bytes).ok()
    }

    /// The host calls made since the last call of this, and forget them.
    pub fn take_host_calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.host_calls.borrow_mut())
    }

    fn note(&self, call: &str, arg: &str) {
        let entry = if arg.is_empty() {
            call.to_string()
        } else {
            format!("{call} {arg}")
        };
        self.host_calls.borrow_mut().push(entry);
    }

    /// Flush `root`'s batched counters whenever a test reads a metric.
    pub fn flush_on_read(&self, root: &Root) {
        if let Some(s) = root.shared() {
            self.flushed.borrow_mut().push(Rc::downgrade(s));
        }
    }

    /// A metric's value (0 if never defined), after a flush of the batched counters.
    pub fn metric(&self, name: &str) -> i64 {
        let live: Vec<_> = self
            .flushed
            .borrow()
            .iter()
            .filter_map(|w| w.upgrade())
            .collect();
        for s in live {
            s.metrics.flush(self);
        }
        self.metrics
            .borrow()
            .iter()
            .find(|(n, _, _)| n == name)
            .map_or(0, |(_, _, v)| *v)
    }
}

impl Host for MockHost {
    fn now_ns(&self) -> u64 {
        self.note("now_ns", "");
        self.now.get()
    }

    fn request_headers(&self) -> Vec<(String, String)> {
        self.note("request_headers", "");
        self.request_headers.borrow().clone()
    }

    fn request_header(&self, name: &str) -> Option<String> {
        self.note("request_header", name);
        self.request_header_value(name)
    }

    fn set_request_header(&self, name: &str, value: &str) {
        self.note("set_request_header", name);
        let mut hs = self.request_headers.borrow_mut();
        hs.retain(|(k, _)| k != name);
        hs.push((name.to_string(), value.to_string()));
    }

    fn remove_request_header(&self, name: &str) {
        self.note("remove_request_header", name);
        self.request_headers.borrow_mut().retain(|(k, _)| k != name);
    }

    fn set_response_header(&self, name: &str, value: &str) {
        self.note("set_response_header", name);
        let mut hs = self.response_headers.borrow_mut();
        hs.retain(|(k, _)| k != name);
        hs.push((name.to_string(), value.to_string()));
    }

    fn response_header(&self, name: &str) -> Option<String> {
        self.note("response_header", name);
        find(&self.response_headers.borrow(), name).map(str::to_string)
    }

    fn request_body(&self, start: usize, size: usize) -> Option<Vec<u8>> {
        self.note("request_body", "");
        let b = self.request_body.borrow();
        let end = start.saturating_add(size).min(b.len());
        b.get(start.min(end)..end).map(<[u8]>::to_vec)
    }

    fn set_request_body(&self, old_size: usize, body: &[u8]) -> Result<(), HostError> {
        self.note("set_request_body", "");
        let mut b = self.request_body.borrow_mut();
        let at = old_size.min(b.len());
        let keep = b.split_off(at);
        *b = body.to_vec();
        b.extend_from_slice(&keep);
        Ok(())
    }

    fn response_body(&self, start: usize, size: usize) -> Option<Vec<u8>> {
        self.note("response_body", "");
        let b = self.response_body.borrow();
        let end = start.saturating_add(size).min(b.len());
        b.get(start.min(end)..end).map(<[u8]>::to_vec)
    }

    fn send_reply(&self, status: u32, headers: Vec<(&str, &str)>, body: &[u8]) {
        self.note("send_reply", "");
        self.replies.borrow_mut().push(Reply {
            status,
            headers: headers
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: String::from_utf8_lossy(body).into_owned(),
        });
    }

    fn resume_request(&self) -> Result<(), HostError> {
        self.note("resume_request", "");
        self.resumed.set(self.resumed.get() + 1);
        Ok(())
    }

    fn set_filter_state(&self, key: &str, value: &[u8]) -> Result<(), HostError> {
        self.note("set_filter_state", key);
        self.filter_state
            .borrow_mut()
            .insert(key.to_string(), value.to_vec());
        Ok(())
    }

    fn dispatch_grpc(&self, call: GrpcCall<'_>) -> Result<u32, DispatchError> {
        self.note("dispatch_grpc", call.service);
        if call.service == "grpc.health.v1.Health" {
            if self
                .unknown_clusters
                .borrow()
                .iter()
                .any(|c| c == call.cluster)
            {
                return Err(DispatchError::UnknownCluster("ParseFailure".into()));
            }
            self.probes.borrow_mut().push(call.cluster.to_string());
            let token = self.next_token.get();
            self.next_token.set(token + 1);
            return Ok(token);
        }
        if let Some(e) = self.dispatch_script.borrow_mut().pop_front() {
            return Err(e);
        }
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        self.calls.borrow_mut().push(Call {
            token,
            cluster: call.cluster.to_string(),
            service: call.service.to_string(),
            method: call.method.to_string(),
            metadata: call
                .metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
            message: call.message.to_vec(),
            timeout: call.timeout,
        });
        Ok(token)
    }

    fn grpc_response_body(&self, _size: usize) -> Option<Vec<u8>> {
        self.note("grpc_response_body", "");
        self.grpc_body.borrow().clone()
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError> {
        self.note("set_effective_context", "");
        if self.gone.borrow().contains(&context_id) {
            return Err(HostError("NotFound".to_string()));
        }
        self.effective.borrow_mut().push(context_id);
        Ok(())
    }

    fn set_tick_period(&self, period: Duration) {
        self.tick_period.set(Some(period));
    }

    fn plugin_configuration(&self) -> Option<Vec<u8>> {
        self.plugin_config.borrow().clone()
    }

    fn get_shared_data(&self, key: &str) -> Result<SharedValue, HostError> {
        self.note("get_shared_data", key);
        // As Envoy does: an empty value comes back as absent (nothing is allocated for 0
        // bytes), with its compare-and-swap token.
        Ok(match self.shared.borrow().get(key) {
            Some((v, cas)) if v.is_empty() => (None, Some(*cas)),
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        })
    }

    fn set_shared_data(
        &self,
        key: &str,
        value: &[u8],
        cas: Option<u32>,
    ) -> Result<(), SharedDataError> {
        self.note("set_shared_data", key);
        let mut data = self.shared.borrow_mut();
        let current = data.get(key).map_or(0, |(_, c)| *c);
        if cas.is_some_and(|c| c != current) {
            return Err(SharedDataError::CasMismatch);
        }
        data.insert(key.to_string(), (value.to_vec(), current + 1));
        Ok(())
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let mut m = self.metrics.borrow_mut();
        if let Some(i) = m.iter().position(|(n, _, _)| n == name) {
            return u32::try_from(i).map_err(|e| HostError(e.to_string()));
        }
        m.push((name.to_string(), kind, 0));
        u32::try_from(m.len() - 1).map_err(|e| HostError(e.to_string()))
    }

    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), HostError> {
        let mut m = self.metrics.borrow_mut();
        match m.get_mut(id as usize) {
            Some((name, _, v)) => {
                self.host_calls
                    .borrow_mut()
                    .push(format!("increment_metric {name}"));
                *v += delta;
                Ok(())
            }
            None => Err(HostError("NotFound".to_string())),
        }
    }
}

/// A root context on a fresh mock host, configured with `policy` (which must parse).
pub fn configured(policy: &str) -> (MockHost, Root) {
    if let Err(e) = laneguard_core::parse(policy) {
        panic!("the test policy does not parse: {e}");
    }
    let h = MockHost::new(T0);
    *h.plugin_config.borrow_mut() = Some(policy.as_bytes().to_vec());
    let mut root = Root::with_vm(1, 7);
    assert!(root.on_vm_start(&h));
    assert!(root.on_configure(&h));
    h.flush_on_read(&root);
    (h, root)
}

/// The mock's clock at start: a real date (late 2023), so record timestamps are plausible.
pub const T0: u64 = 1_700_000_000_000_000_000;

impl Call {
    /// The `ShouldRateLimit` request this call carries.
    pub fn rls_request(&self) -> RateLimitRequest {
        RateLimitRequest::decode(self.message.as_slice()).unwrap_or_default()
    }

    /// A gRPC metadata value, as text.
    pub fn metadata_value(&self, key: &str) -> Option<String> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// A service's answer: `overall` and one status per descriptor, as the laneguard service
/// sends them (the limit, what remains, when the bucket is full again, an optional lease).
pub fn rls_answer(overall: Code, statuses: &[Status]) -> Vec<u8> {
    RateLimitResponse {
        overall_code: overall as i32,
        statuses: statuses.iter().map(Status::encode).collect(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// [`rls_answer`] with the service's slots (`laneguard_protos::slots`): `holds_ns[i]` for
/// `statuses[i]`.
pub fn rls_answer_with_holds(overall: Code, statuses: &[Status], holds_ns: &[u64]) -> Vec<u8> {
    RateLimitResponse {
        overall_code: overall as i32,
        statuses: statuses.iter().map(Status::encode).collect(),
        dynamic_metadata: laneguard_protos::slots::encode(holds_ns),
        ..Default::default()
    }
    .encode_to_vec()
}

/// One descriptor's status in a scripted answer.
#[derive(Clone, Copy)]
pub struct Status {
    pub code: Code,
    pub remaining: u32,
    /// Milliseconds until the bucket is full again (0: none sent).
    pub reset_ms: u64,
    /// A lease: this many requests, valid until this time (ns since the epoch).
    pub lease: Option<(u32, u64)>,
}

impl Status {
    pub fn ok(remaining: u32) -> Status {
        Status {
            code: Code::Ok,
            remaining,
            reset_ms: 0,
            lease: None,
        }
    }

    pub fn over(reset_ms: u64) -> Status {
        Status {
            code: Code::OverLimit,
            remaining: 0,
            reset_ms,
            lease: None,
        }
    }

    fn encode(&self) -> DescriptorStatus {
        DescriptorStatus {
            code: self.code as i32,
            current_limit: Some(RateLimit {
                requests_per_unit: 60,
                unit: 2,
                ..Default::default()
            }),
            limit_remaining: self.remaining,
            duration_until_reset: (self.reset_ms > 0).then(|| prost_types::Duration {
                seconds: i64::try_from(self.reset_ms / 1_000).unwrap_or(0),
                nanos: i32::try_from((self.reset_ms % 1_000) * 1_000_000).unwrap_or(0),
            }),
            quota: self.lease.map(|(requests, until)| Quota {
                requests,
                expiration_specifier: Some(ExpirationSpecifier::ValidUntil(
                    prost_types::Timestamp {
                        seconds: i64::try_from(until / 1_000_000_000).unwrap_or(0),
                        nanos: i32::try_from(until % 1_000_000_000).unwrap_or(0),
                    },
                )),
                ..Default::default()
            }),
        }
    }
}

// The request paths' harness: a policy with one class per path, and a request's life.

/// One class per path under test. Budgets are small so that a few requests exhaust them;
/// the tenant ceiling is large so that it never is the bucket that trips.
pub const POLICY: &str = r#"
version: 1
service: { cluster: laneguard_rls, timeout_ms: 200 }
classes:
  - { name: web, consequence: time_sensitive, budget: { per_minute: 60, burst: 10 } }
  - { name: batch, consequence: low, budget: { per_minute: 60, burst: 10 } }
  - { name: feed, consequence: low, failure_mode: open, budget: { per_minute: 60, burst: 10 } }
  - name: queued
    consequence: low
    budget: { per_minute: 60, burst: 2 }
    fallbacks: [queue, reject]
    queue: { max_wait_ms: 5000, max_depth: 1 }
  - { name: routed, consequence: low, budget: { per_minute: 60, burst: 2 }, fallbacks: [fallback_route, reject] }
  - { name: trial, consequence: low, mode: shadow, budget: { per_minute: 60, burst: 2 } }
  - { name: legacy, consequence: low, mode: off, budget: { per_minute: 60, burst: 2 } }
  - { name: repair, consequence: repair, reserve: { per_minute: 20, burst: 5 }, borrow: true }
principals:
  - name: app
    default_class: web
    may_declare: [web, batch, feed, queued, routed, trial, legacy, repair]
tenants:
  default: { ceiling: { per_minute: 6000, burst: 1000 } }
"#;

pub const MS: u64 = 1_000_000;

/// The headers of a request from tenant acme's `app` declaring `class` (none if empty).
pub fn headers(class: &str) -> Vec<(&str, &str)> {
    let mut hs = vec![
        (":method", "GET"),
        (":path", "/orders"),
        ("x-request-id", "req-1"),
        ("x-laneguard-tenant", "acme"),
        ("x-laneguard-principal", "app"),
    ];
    if !class.is_empty() {
        hs.push(("x-traffic-class", class));
    }
    hs
}

/// What the client and the upstream saw of one request.
#[derive(Debug)]
pub struct Seen {
    /// The local reply, if the filter answered itself.
    pub reply: Option<Reply>,
    /// The request went on to the upstream (continued at once, or resumed later).
    pub passed: bool,
    /// Headers the filter added to the upstream's response.
    pub response: Vec<(String, String)>,
}

impl Seen {
    pub fn status(&self) -> u32 {
        self.reply.as_ref().map_or(200, |r| r.status)
    }

    /// A header of the local reply, or else of the response.
    pub fn header(&self, name: &str) -> Option<&str> {
        match &self.reply {
            Some(r) => r.header(name),
            None => self
                .response
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        self.reply
            .as_ref()
            .and_then(|r| serde_json::from_str(&r.body).ok())
            .unwrap_or_default()
    }
}

/// Start a request; returns its state machine and what `on_request_headers` answered.
pub fn start(h: &MockHost, root: &Root, id: u32, hs: &[(&str, &str)]) -> (Request, Action) {
    let mut req = root.new_request(id).expect("configured");
    h.start_request(hs);
    let action = req.on_request_headers(h);
    (req, action)
}

/// Deliver the service's answer to the request's last call.
pub fn deliver(h: &MockHost, req: &mut Request, status: u32, body: Option<Vec<u8>>) {
    let call = h.last_call().expect("a call was dispatched");
    let size = body.as_ref().map_or(0, Vec::len);
    *h.grpc_body.borrow_mut() = body;
    req.on_grpc_response(h, call.token, status, size);
}

/// What the request came to, once the filter is done with it (the upstream answered).
pub fn seen(h: &MockHost, req: &mut Request, action: Action) -> Seen {
    let reply = h.last_reply();
    let passed = reply.is_none() && (action == Action::Continue || h.resumed.get() > 0);
    if passed {
        req.on_response_headers(h);
    }
    Seen {
        reply,
        passed,
        response: h.response_headers.borrow().clone(),
    }
}

/// An OK answer for every descriptor of the last call, with `remaining` left in each.
pub fn ok_answer(h: &MockHost, remaining: u32) -> Vec<u8> {
    let n = h
        .last_call()
        .map_or(0, |c| c.rls_request().descriptors.len());
    rls_answer(Code::Ok, &vec![Status::ok(remaining); n])
}

/// An OK answer to the last call that leases `n` requests on each of its descriptors, valid
/// for `valid_ms`.
pub fn lease_answer(h: &MockHost, n: u32, valid_ms: u64) -> Vec<u8> {
    let descriptors = h
        .last_call()
        .map_or(0, |c| c.rls_request().descriptors.len());
    let lease = Status {
        lease: Some((n, h.now.get() + valid_ms * MS)),
        ..Status::ok(9)
    };
    rls_answer(Code::Ok, &vec![lease; descriptors])
}

/// One request decided by the service with an OK answer.
pub fn allowed_centrally(h: &MockHost, root: &Root, id: u32, class: &str) -> Seen {
    let (mut req, action) = start(h, root, id, &headers(class));
    assert_eq!(action, Action::Pause, "{class}: asks the service");
    let body = ok_answer(h, 5);
    deliver(h, &mut req, 0, Some(body));
    seen(h, &mut req, action)
}

/// One request the service refuses: its lane has room, its class budget (the second
/// descriptor) is full again in `reset_ms`.
pub fn refused_centrally(h: &MockHost, root: &Root, id: u32, class: &str, reset_ms: u64) -> Seen {
    let (mut req, action) = start(h, root, id, &headers(class));
    let answer = rls_answer(Code::OverLimit, &[Status::ok(900), Status::over(reset_ms)]);
    deliver(h, &mut req, 0, Some(answer));
    seen(h, &mut req, action)
}

/// A request decided without the service (its outcome, and no call was made).
pub fn decided_locally(h: &MockHost, root: &Root, id: u32, class: &str) -> Seen {
    let calls = h.call_count();
    let (mut req, action) = start(h, root, id, &headers(class));
    assert_eq!(h.call_count(), calls, "{class}: no call to the service");
    seen(h, &mut req, action)
}
