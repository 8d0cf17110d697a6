//! The Kubernetes manifests in `deploy/` (Istio, Envoy Gateway, the service as a Deployment).
//! They cannot run here (no cluster); this checks what a reader would check by hand: every
//! document parses and has a kind, the policy each one carries is accepted by the filter's own
//! parser and is the same policy everywhere, and the cluster the policy calls is the one the
//! manifests define. docs/deploy.md says plainly that nothing more was exercised.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::repo_root;
use serde::Deserialize;
use serde_yaml::Value;

fn documents(relative: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo_root().join(relative)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{relative}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// A policy written as YAML structure inside a manifest: the filter receives it as JSON.
fn policy_of(v: &Value) -> laneguard_core::Policy {
    let json = serde_json::to_string(v).unwrap();
    laneguard_core::parse(&json).unwrap_or_else(|e| panic!("{e}\n{json}"))
}

#[test]
fn deploy_manifests_parse_and_carry_one_valid_policy() {
    let service = documents("deploy/service/laneguard-service.yaml");
    let istio = documents("deploy/istio/wasmplugin.yaml");
    let gateway = documents("deploy/envoy-gateway/envoyextensionpolicy.yaml");
    for d in service.iter().chain(&istio).chain(&gateway) {
        assert!(
            d["apiVersion"].as_str().is_some() && d["kind"].as_str().is_some(),
            "{d:?}"
        );
        assert!(d["metadata"]["name"].as_str().is_some(), "{d:?}");
    }

    let configmap = kind(&service, "ConfigMap");
    let from_configmap =
        laneguard_core::parse(configmap["data"]["policy.yaml"].as_str().unwrap()).unwrap();
    let deployment = kind(&service, "Deployment");
    let args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"--policy=/etc/laneguard/policy.yaml"),
        "{args:?}"
    );
    // The service's own CLI accepts the arguments (the store is not contacted by parsing).
    match laneguard_service::cli::parse(args.iter().map(std::ffi::OsString::from)) {
        Ok(laneguard_service::cli::Command::Run(_)) => {}
        other => panic!("{other:?}"),
    }

    let plugin = kind(&istio, "WasmPlugin");
    assert_eq!(plugin["spec"]["pluginName"].as_str(), Some("laneguard"));
    let from_istio = policy_of(&plugin["spec"]["pluginConfig"]);
    let svc = kind(&service, "Service");
    let istio_cluster = format!(
        "outbound|{}||{}.{}.svc.cluster.local",
        svc["spec"]["ports"][0]["port"].as_u64().unwrap(),
        svc["metadata"]["name"].as_str().unwrap(),
        svc["metadata"]["namespace"].as_str().unwrap()
    );
    assert_eq!(from_istio.service.cluster, istio_cluster);

    let extension = kind(&gateway, "EnvoyExtensionPolicy");
    let wasm = &extension["spec"]["wasm"][0];
    assert_eq!(wasm["rootID"].as_str(), Some("laneguard"));
    let from_gateway = policy_of(&wasm["config"]);
    let patch = kind(&gateway, "EnvoyPatchPolicy");
    assert_eq!(
        patch["spec"]["jsonPatches"][0]["operation"]["value"]["name"].as_str(),
        Some(from_gateway.service.cluster.as_str())
    );

    // One policy everywhere (the cluster name differs by platform).
    let same = |mut p: laneguard_core::Policy| {
        p.service.cluster = String::new();
        p.ops.audit.cluster = String::new();
        p
    };
    assert_eq!(same(from_istio), same(from_configmap.clone()));
    assert_eq!(same(from_gateway), same(from_configmap));
}
