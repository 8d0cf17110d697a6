//! The request state machine against the scripted host: every path, deterministically.

use crate::host::{Action, DispatchError};
use crate::mock::MockHost;
use crate::root::Root;
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus,
};
use laneguard_protos::envoy::service::ratelimit::v3::RateLimitResponse;
use laneguard_protos::prost::Message;

const T0: u64 = 1_700_000_000_000_000_000;

const POLICY: &str = r#"
version: 1
service: { cluster: laneguard_rls, timeout_ms: 200 }
classes:
  - { name: web, consequence: time_sensitive, budget: { per_minute: 60, burst: 10 } }
  - { name: batch, consequence: low, failure_mode: closed, budget: { per_minute: 60, burst: 10 } }
  - { name: repair, consequence: repair, reserve: { per_minute: 20, burst: 5 } }
principals:
  - { name: app, default_class: web, may_declare: [web, batch] }
tenants:
  default: { ceiling: { per_minute: 100, burst: 20 } }
"#;

/// A configured root context on a fresh mock host.
fn configured(policy: &str) -> (MockHost, Root) {
    let h = MockHost::new(T0);
    *h.plugin_config.borrow_mut() = Some(policy.as_bytes().to_vec());
    let mut root = Root::with_vm(1, 7);
    assert!(root.on_vm_start(&h));
    assert!(root.on_configure(&h), "the test policy parses");
    (h, root)
}

fn answer(code: Code, n: usize) -> Vec<u8> {
    RateLimitResponse {
        overall_code: code as i32,
        statuses: (0..n)
            .map(|_| DescriptorStatus {
                code: code as i32,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn central_allow_resumes_the_request() {
    let (h, root) = configured(POLICY);
    let mut req = root.new_request(2).unwrap();
    h.start_request(&[
        (":method", "GET"),
        (":path", "/"),
        ("x-laneguard-tenant", "acme"),
        ("x-laneguard-principal", "app"),
    ]);
    assert_eq!(req.on_request_headers(&h), Action::Pause);
    assert_eq!(
        h.request_header_value("x-laneguard-class").as_deref(),
        Some("web")
    );
    let call = h.last_call().unwrap();
    assert_eq!(call.method, "ShouldRateLimit");
    *h.grpc_body.borrow_mut() = Some(answer(Code::Ok, 2));
    req.on_grpc_response(&h, call.token, 0, 10);
    assert_eq!(h.resumed.get(), 1);
    assert_eq!(h.metric("laneguard.decided.central"), 1);
    assert_eq!(req.on_response_headers(&h), Action::Continue);
    assert!(
        h.response_header("ratelimit-limit").is_some()
            || h.response_header("x-ratelimit-limit").is_some()
    );
}

#[test]
fn dispatch_error_under_closed_replies_503() {
    let (h, root) = configured(POLICY);
    let mut req = root.new_request(2).unwrap();
    h.start_request(&[
        ("x-laneguard-tenant", "acme"),
        ("x-laneguard-principal", "app"),
        ("x-traffic-class", "batch"),
    ]);
    h.dispatch_script
        .borrow_mut()
        .push_back(DispatchError::Failed("InternalFailure".into()));
    assert_eq!(req.on_request_headers(&h), Action::Pause);
    let reply = h.last_reply().unwrap();
    assert_eq!(reply.status, 503);
    assert_eq!(
        reply.header("x-laneguard-degraded"),
        Some("dispatch_failed")
    );
    assert_eq!(h.metric("laneguard.service_error.dispatch"), 1);
}
