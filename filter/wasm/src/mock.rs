//! A scripted [`Host`] for unit tests: it records every call the filter makes, and answers
//! from a script (the next dispatch results, the gRPC answer's body, the clock).
//! Not every test reads every record it keeps.
#![allow(dead_code)]

use crate::host::{
    DispatchError, GrpcCall, Host, HostError, MetricKind, SharedDataError, SharedValue,
};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
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
    next_token: Cell<u32>,
    /// The body `grpc_response_body` returns.
    pub grpc_body: RefCell<Option<Vec<u8>>>,
    pub plugin_config: RefCell<Option<Vec<u8>>>,
    pub tick_period: Cell<Option<Duration>>,
    pub shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    metrics: RefCell<Vec<(String, MetricKind, i64)>>,
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

    pub fn request_header_value(&self, name: &str) -> Option<String> {
        find(&self.request_headers.borrow(), name).map(str::to_string)
    }

    pub fn response_header(&self, name: &str) -> Option<String> {
        find(&self.response_headers.borrow(), name).map(str::to_string)
    }

    pub fn last_reply(&self) -> Option<Reply> {
        self.replies.borrow().last().cloned()
    }

    pub fn last_call(&self) -> Option<Call> {
        self.calls.borrow().last().cloned()
    }

    /// A metric's value (0 if never defined).
    pub fn metric(&self, name: &str) -> i64 {
        self.metrics
            .borrow()
            .iter()
            .find(|(n, _, _)| n == name)
            .map_or(0, |(_, _, v)| *v)
    }
}

impl Host for MockHost {
    fn now_ns(&self) -> u64 {
        self.now.get()
    }

    fn request_headers(&self) -> Vec<(String, String)> {
        self.request_headers.borrow().clone()
    }

    fn request_header(&self, name: &str) -> Option<String> {
        self.request_header_value(name)
    }

    fn set_request_header(&self, name: &str, value: &str) {
        let mut hs = self.request_headers.borrow_mut();
        hs.retain(|(k, _)| k != name);
        hs.push((name.to_string(), value.to_string()));
    }

    fn remove_request_header(&self, name: &str) {
        self.request_headers.borrow_mut().retain(|(k, _)| k != name);
    }

    fn set_response_header(&self, name: &str, value: &str) {
        let mut hs = self.response_headers.borrow_mut();
        hs.retain(|(k, _)| k != name);
        hs.push((name.to_string(), value.to_string()));
    }

    fn send_reply(&self, status: u32, headers: Vec<(&str, &str)>, body: &[u8]) {
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
        self.resumed.set(self.resumed.get() + 1);
        Ok(())
    }

    fn set_filter_state(&self, key: &str, value: &[u8]) -> Result<(), HostError> {
        self.filter_state
            .borrow_mut()
            .insert(key.to_string(), value.to_vec());
        Ok(())
    }

    fn dispatch_grpc(&self, call: GrpcCall<'_>) -> Result<u32, DispatchError> {
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
        self.grpc_body.borrow().clone()
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError> {
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
        Ok(match self.shared.borrow().get(key) {
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
            Some((_, _, v)) => {
                *v += delta;
                Ok(())
            }
            None => Err(HostError("NotFound".to_string())),
        }
    }
}
