//! A typo in `service.cluster` (issue 14 item 8): the policy parses and Envoy loads it, and
//! then every decision is degraded. The filter says so at startup (an error log line and
//! `laneguard.service_cluster_unknown`), and `laneguard-policy check --envoy` refuses the
//! policy before a rollout, naming the field and the clusters that exist.

// Test code: a failed unwrap or panic is a failed test (clippy.toml allows them inside
// #[test] functions; this extends that to the helpers of this file).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::config::{self, set_path};
use laneguard_tests::{demo_policy, run_cli, token, EnvoyOptions, Stack};
use std::time::Duration;

const TYPO: &str = "laneguard_rsl";

/// `laneguard-policy ARGS...` from the repository root: (exit code, stdout, stderr).
fn policy_cli(args: &[&str]) -> (i32, String, String) {
    run_cli("laneguard-policy", args).unwrap()
}

#[test]
fn an_unknown_service_cluster_is_logged_counted_and_refused_by_check() {
    let stack = Stack::start_with(
        "service-cluster-typo",
        &demo_policy().unwrap(),
        EnvoyOptions::default(),
        |cfg| config::edit_policy(cfg, |p| set_path(p, &["service", "cluster"], TYPO.into())),
    )
    .unwrap();

    // At startup, before any request: the log line and the counter.
    let line = stack.envoy.wait_log_line(Duration::from_secs(10), |l| {
        l.contains("[error]") && l.contains("service.cluster") && l.contains(TYPO)
    });
    assert!(
        line.as_deref()
            .is_some_and(|l| l.contains("is not a cluster Envoy knows")),
        "no error line naming service.cluster {TYPO:?} at startup: {line:?}\n{}",
        stack.logs()
    );
    let unknown = stack
        .envoy
        .wait_counter("service_cluster_unknown", 1)
        .unwrap();
    assert!(
        unknown >= 1,
        "service_cluster_unknown = {unknown}\n{}",
        stack.logs()
    );

    // What a caller sees: served degraded, and the reason says why.
    let web = token("NORTHWIND_WEB").unwrap();
    let r = stack.client.get_as("/orders/1", &web, &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(
        r.header("x-laneguard-degraded"),
        Some("unknown_cluster"),
        "{}",
        r.describe()
    );

    // The same Envoy config, as the operator would check it before the rollout.
    let written = stack.envoy.dir().file("envoy.yaml");
    let written = written.to_str().unwrap();
    let (code, out, err) = policy_cli(&["check", "--envoy", written]);
    assert_eq!(code, 1, "check --envoy accepted the typo:\n{out}{err}");
    assert!(
        err.contains("service.cluster")
            && err.contains(&format!("\"{TYPO}\" is not a cluster of the Envoy config"))
            && err.contains("laneguard_rls"),
        "the error must name the field, the typo and the clusters that exist:\n{err}"
    );
    // A plain policy file checked against that config: refused the same way.
    let cfg: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(written).unwrap()).unwrap();
    let policy = stack.envoy.dir().file("typo-policy.yaml");
    std::fs::write(&policy, config::policy(&cfg).unwrap()).unwrap();
    let (code, _, err) = policy_cli(&[
        "check",
        policy.to_str().unwrap(),
        "--envoy",
        "envoy/demo/envoy.yaml",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("service.cluster"), "{err}");
}

#[test]
fn check_envoy_accepts_the_demo() {
    let (code, out, err) = policy_cli(&["check", "--envoy", "envoy/demo/envoy.yaml"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok (") && out.contains("clusters checked"),
        "{out}"
    );
    // The demo's policy file on its own, against the demo's Envoy config: fine too.
    let (code, out, err) = policy_cli(&["check", "envoy/demo/envoy.yaml"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("clusters checked"), "{out}");
}
