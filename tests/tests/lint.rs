//! `laneguard-policy lint` and `map`, run as a user runs them (the built binary on files).
//!
//! One fixture per lint rule in `tests/policies/lint/`: each is the clean fixture
//! (`00-clean.yaml`) with one thing changed, and must give exactly one warning, at the path
//! asserted here; `--strict` turns it into exit 1.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::run_cli;
use serde_json::Value;
/// `laneguard-policy ARGS...`: (exit code, stdout, stderr).
fn policy_cli(args: &[&str]) -> (i32, String, String) {
    run_cli("laneguard-policy", args).unwrap()
}

fn warnings(file: &str, strict: bool) -> (i32, Vec<Value>) {
    let mut args = vec!["lint", "--format", "json", file];
    if strict {
        args.insert(1, "--strict");
    }
    let (code, out, err) = policy_cli(&args);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    (
        code,
        v[0]["warnings"].as_array().cloned().unwrap_or_default(),
    )
}

#[test]
fn each_lint_rule_names_the_field_to_change() {
    let cases = [
        ("01-no-owner", "no_owner", "classes[1].owner"),
        (
            "02-protected-without-fallback",
            "protected_without_fallback",
            "classes[2].fallbacks",
        ),
        (
            "03-mixed-identity",
            "mixed_identity",
            "principals[2].may_declare[1]",
        ),
        ("04-undeclarable-class", "undeclarable_class", "classes[1]"),
        (
            "05-rivals-share-pool",
            "rivals_share_pool",
            "classes[2].must_not_compete_with[0]",
        ),
        (
            "06-shared-pool-too-small",
            "shared_pool_too_small",
            "tenants.default.ceiling",
        ),
        (
            "07-overlapping-families",
            "overlapping_families",
            "endpoint_families[1].path_prefixes[0]",
        ),
        ("08-loose-default", "loose_default", "purposes.default"),
    ];
    let (code, clean) = warnings("tests/policies/lint/00-clean.yaml", true);
    assert_eq!((code, clean.len()), (0, 0), "{clean:?}");
    for (fixture, rule, path) in cases {
        let file = format!("tests/policies/lint/{fixture}.yaml");
        let (code, ws) = warnings(&file, false);
        assert_eq!(
            code, 0,
            "{fixture}: warnings alone do not fail without --strict"
        );
        assert_eq!(ws.len(), 1, "{fixture}: {ws:#?}");
        assert_eq!(ws[0]["rule"], rule, "{fixture}");
        assert_eq!(ws[0]["path"], path, "{fixture}");
        assert!(
            !ws[0]["fix"].as_str().unwrap_or_default().is_empty(),
            "{fixture}: a warning says what to change"
        );
        let (code, _) = warnings(&file, true);
        assert_eq!(code, 1, "{fixture}: --strict fails on a warning");
        // The text form names the path too.
        let (_, text, _) = policy_cli(&["lint", &file]);
        assert!(text.contains(&format!("warning: {path}: ")), "{text}");
    }
}

#[test]
fn lint_of_an_invalid_policy_is_the_parse_error() {
    let (code, _, err) = policy_cli(&["lint", "tests/policies/invalid/03-zero-rate.yaml"]);
    assert_eq!(code, 1);
    assert!(err.contains("classes[2].reserve.per_minute"), "{err}");
}

#[test]
fn the_demo_map_shows_shared_identity_and_pools() {
    let (code, out, err) = policy_cli(&["map", "envoy/demo/envoy.yaml", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let m: Value = serde_json::from_str(&out).unwrap();
    let class = |name: &str| {
        m["classes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap()
    };
    // One row per class, with the seed's fields.
    let repair = class("repair");
    assert_eq!(repair["lane"], "reserve");
    assert_eq!(repair["owner"], "order-platform");
    assert_eq!(repair["source"], "reconciliation worker");
    assert_eq!(repair["must_not_compete_with"][0], "integration");
    // Who shares identity: recon lands in repair and interactive.
    let recon = m["principals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "recon")
        .unwrap();
    assert_eq!(recon["mixes_protected"], true);
    // Who shares a budget: the per-user limit, through recon.
    let user_collision = m["collisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["pool"] == "user")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(user_collision["guaranteed"], true);
    assert_eq!(
        (user_collision["a"].as_str(), user_collision["b"].as_str()),
        (Some("repair"), Some("interactive"))
    );

    let (code, md, _) = policy_cli(&["map", "envoy/demo/envoy.yaml"]);
    assert_eq!(code, 0);
    assert!(md.contains("## Traffic class: repair (protected)"), "{md}");
    assert!(
        md.contains("| Must not compete with | integration, interactive |"),
        "{md}"
    );

    let (code, svg, _) = policy_cli(&["map", "envoy/demo/envoy.yaml", "--format", "svg"]);
    assert_eq!(code, 0);
    assert!(svg.trim_start().starts_with("<svg"), "{svg}");
    assert!(svg.contains("tenant ceiling"));
    // One red edge: the user-bucket collision.
    assert_eq!(svg.matches("class=\"collision\"").count(), 1, "{svg}");
}
