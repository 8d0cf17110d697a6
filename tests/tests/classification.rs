//! Classification and identity: a caller cannot choose a class it may not use, and cannot
//! choose its identity at all.
//!
//! Policy `tests/policies/valid/fast.yaml` (limits far above what these tests send).

// Test code: a failed unwrap or panic is a failed test (clippy.toml allows them inside
// #[test] functions; this extends that to the helpers of this file).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::config::remove_http_filter;
use laneguard_tests::{test_policy, token, EnvoyOptions, Reply, Stack};
use std::time::Duration;

fn stack(label: &str) -> Stack {
    Stack::start(label, &test_policy("valid/fast.yaml").unwrap()).unwrap()
}

/// The upstream's echo: (lane, class, tenant, principal).
fn echo(r: &Reply) -> (String, String, String, String) {
    let v = r.json().unwrap_or_default();
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    (s("lane"), s("class"), s("tenant"), s("principal"))
}

fn wait_counter(stack: &Stack, needle: &str, want: u64) -> u64 {
    stack.envoy.wait_counter(needle, want).unwrap()
}

#[test]
fn erp_declaring_recovery_is_served_as_integration_and_the_attempt_is_counted() {
    let stack = stack("classification-forged");
    let erp = token("NORTHWIND_ERP").unwrap();
    let before = stack
        .envoy
        .counter_sum("laneguard", "forged_class")
        .unwrap();

    let r = stack
        .client
        .get_as("/replay/17", &erp, &[("x-traffic-class", "recovery")])
        .unwrap();
    let ctx = format!("{}\n{}", r.describe(), stack.logs());
    assert_eq!(r.status, 200, "{ctx}");
    let (lane, class, tenant, principal) = echo(&r);
    assert_eq!(
        class, "integration",
        "ERP got class {class:?} instead of its default\n{ctx}"
    );
    assert_eq!(lane, "shared", "ERP reached the {lane:?} lane\n{ctx}");
    assert_eq!(
        (tenant.as_str(), principal.as_str()),
        ("northwind", "erp"),
        "{ctx}"
    );

    let after = wait_counter(&stack, "forged_class", before + 1);
    let stats = stack.envoy.stats("laneguard").unwrap_or_default();
    assert_eq!(
        after,
        before + 1,
        "the forged_class counter did not count the attempt: {stats:?}\n{ctx}"
    );

    // Logged with tenant, principal and the declared class (any wording).
    let line = stack.envoy.wait_log_line(Duration::from_secs(5), |l| {
        l.contains("northwind") && l.contains("erp") && l.contains("recovery")
    });
    assert!(
        line.is_some(),
        "no log line names tenant northwind, principal erp and the declared class recovery\n{ctx}"
    );

    // Permitted declarations are honoured and not counted as forged.
    let recon = token("NORTHWIND_RECON").unwrap();
    let r = stack
        .client
        .get_as("/orders/1", &recon, &[("x-traffic-class", "interactive")])
        .unwrap();
    assert_eq!(
        (r.status, echo(&r).1, echo(&r).0),
        (200, "interactive".into(), "shared".into()),
        "{}",
        r.describe()
    );
    let support = token("NORTHWIND_SUPPORT").unwrap();
    let r = stack
        .client
        .get_as("/replay/1", &support, &[("x-traffic-class", "repair")])
        .unwrap();
    assert_eq!(
        (r.status, echo(&r).1, echo(&r).0),
        (200, "repair".into(), "protected".into()),
        "{}",
        r.describe()
    );
    let r = stack.client.get_as("/replay/1", &support, &[]).unwrap();
    assert_eq!(
        (r.status, echo(&r).1, echo(&r).0),
        (200, "recovery".into(), "protected".into()),
        "{}",
        r.describe()
    );
    let n = stack
        .envoy
        .counter_sum("laneguard", "forged_class")
        .unwrap();
    assert_eq!(
        n,
        before + 1,
        "honoured declarations were counted as forged\n{}",
        stack.logs()
    );

    // An unknown class is not honoured either.
    let r = stack
        .client
        .get_as("/orders/1", &erp, &[("x-traffic-class", "vip")])
        .unwrap();
    assert_eq!(
        (r.status, echo(&r).1),
        (200, "integration".into()),
        "{}",
        r.describe()
    );
    assert_eq!(
        wait_counter(&stack, "forged_class", before + 2),
        before + 2,
        "{}",
        stack.logs()
    );
}

#[test]
fn identity_comes_from_the_token_only() {
    let stack = stack("classification-identity");
    let web = token("NORTHWIND_WEB").unwrap();

    // No credentials at all.
    let r = stack.client.get("/orders/1", &[]).unwrap();
    assert_eq!(
        r.status,
        401,
        "no credentials\n{}\n{}",
        r.describe(),
        stack.logs()
    );

    // A token that does not verify.
    let r = stack
        .client
        .get_as("/orders/1", "not.a.token", &[])
        .unwrap();
    assert_eq!(
        r.status,
        401,
        "bad token\n{}\n{}",
        r.describe(),
        stack.logs()
    );

    // Forged identity headers without a token: still no identity.
    let forged = [
        ("x-laneguard-tenant", "acme"),
        ("x-laneguard-principal", "support"),
        ("x-laneguard-user", "mallory"),
        ("x-laneguard-class", "recovery"),
    ];
    let r = stack.client.get("/orders/1", &forged).unwrap();
    assert_eq!(
        r.status,
        401,
        "forged identity headers without a token\n{}\n{}",
        r.describe(),
        stack.logs()
    );

    // Forged identity headers with a northwind token: accounted to northwind, as the token's
    // principal and class; the forged class header does not pick the protected lane.
    let r = stack.client.get_as("/orders/1", &web, &forged).unwrap();
    let ctx = format!("{}\n{}", r.describe(), stack.logs());
    assert_eq!(r.status, 200, "{ctx}");
    let (lane, class, tenant, principal) = echo(&r);
    assert_eq!(
        tenant, "northwind",
        "a forged x-laneguard-tenant was believed\n{ctx}"
    );
    assert_eq!(
        principal, "web",
        "a forged x-laneguard-principal was believed\n{ctx}"
    );
    assert_eq!(class, "interactive", "{ctx}");
    assert_eq!(
        lane, "shared",
        "a forged x-laneguard-class reached the {lane:?} lane\n{ctx}"
    );
}

/// The filter's own identity outcomes (docs/policy.md, "Identity outcomes"), which the demo's
/// jwt_authn normally pre-empts: with authentication and header scrubbing removed from the
/// chain, the filter itself answers 401 without an identity and 400 for an invalid one.
#[test]
fn the_filter_refuses_requests_without_a_valid_trusted_identity() {
    let stack = Stack::start_with(
        "classification-filter-identity",
        &test_policy("valid/fast.yaml").unwrap(),
        EnvoyOptions::default(),
        |cfg| {
            remove_http_filter(cfg, "envoy.filters.http.jwt_authn")?;
            remove_http_filter(cfg, "envoy.filters.http.header_mutation")
        },
    )
    .unwrap();

    let r = stack.client.get("/orders/1", &[]).unwrap();
    let ctx = format!("{}\n{}", r.describe(), stack.logs());
    assert_eq!(r.status, 401, "{ctx}");
    assert_eq!(r.json().unwrap()["error"], "missing_identity", "{ctx}");

    let r = stack
        .client
        .get("/orders/1", &[("x-laneguard-tenant", "northwind")])
        .unwrap();
    let ctx = format!(
        "tenant without principal:\n{}\n{}",
        r.describe(),
        stack.logs()
    );
    assert_eq!(r.status, 401, "{ctx}");
    assert_eq!(r.json().unwrap()["error"], "missing_identity", "{ctx}");

    let long = "t".repeat(129);
    for (tenant, principal) in [
        ("north wind", "web"),
        ("northwind", "we/b"),
        (long.as_str(), "web"),
    ] {
        let r = stack
            .client
            .get(
                "/orders/1",
                &[
                    ("x-laneguard-tenant", tenant),
                    ("x-laneguard-principal", principal),
                ],
            )
            .unwrap();
        let ctx = format!(
            "tenant {tenant:?} principal {principal:?}:\n{}\n{}",
            r.describe(),
            stack.logs()
        );
        assert_eq!(r.status, 400, "{ctx}");
        assert_eq!(r.json().unwrap()["error"], "invalid_identity", "{ctx}");
    }

    // A valid trusted identity (here set directly, as jwt_authn would) is served.
    let r = stack
        .client
        .get(
            "/orders/1",
            &[
                ("x-laneguard-tenant", "northwind"),
                ("x-laneguard-principal", "web"),
            ],
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}\n{}", r.describe(), stack.logs());
    assert_eq!(echo(&r).1, "interactive", "{}", r.describe());
}

/// One raw HTTP/1.1 GET (the test client only sends text headers); returns the status code
/// and the response.
fn raw_get(stack: &Stack, path: &str, headers: &[(&str, &[u8])]) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = stack
        .client
        .base()
        .trim_start_matches("http://")
        .to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req =
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n").into_bytes();
    for (k, v) in headers {
        req.extend_from_slice(k.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    s.write_all(&req).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Found while fuzzing the planner (issue 12 §2): the SDK's text getter panicked on a header
/// value that is not UTF-8, which poisons the VM. Now the value is read as bytes: a declared
/// class with such bytes is an unknown class (the default, counted as forged), and the
/// worker keeps serving.
#[test]
fn a_header_value_that_is_not_utf8_is_a_forged_class_not_a_crash() {
    let stack = stack("classification-non-utf8");
    let web = token("NORTHWIND_WEB").unwrap();
    let auth = format!("Bearer {web}");
    for _ in 0..3 {
        let (status, text) = raw_get(
            &stack,
            "/replay/17",
            &[
                ("authorization", auth.as_bytes()),
                ("x-traffic-class", b"inter\xffactive"),
                ("x-unrelated", b"\xc3\x28\xa0\xa1"),
            ],
        );
        assert_eq!(status, 200, "{text}\n{}", stack.logs());
        assert!(text.contains("\"interactive\""), "{text}");
    }
    assert!(
        wait_counter(&stack, "forged_class", 3) >= 3,
        "{}",
        stack.logs()
    );
    let r = stack.client.get_as("/replay/17", &web, &[]).unwrap();
    assert_eq!(r.status, 200, "the VM still serves\n{}", stack.logs());
    assert!(!stack.logs().contains("panicked"), "{}", stack.logs());
}
