//! Finding a policy in a file, for every CLI: a laneguard policy (YAML or JSON), or an Envoy
//! config whose `envoy.filters.http.wasm` filters with `root_id: laneguard` embed one in
//! `configuration.value`. Pure: the CLI reads the file and hands over its text.
//!
//! An Envoy config also says which clusters exist ([`envoy_clusters`]): a policy that names
//! a cluster Envoy does not have loads fine, and then every decision is degraded, so
//! [`check_clusters`] refuses it when the policy is checked against its Envoy config.

use super::{Policy, PolicyError};
use serde_yaml::Value;

/// One policy found in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Empty for a plain policy file; `listener NAME` for one embedded in an Envoy config.
    pub location: String,
    pub text: String,
}

/// Every policy in `text`. An Envoy config without a laneguard filter gives an empty list.
pub fn policies(text: &str) -> Vec<Found> {
    match embedded_policies(text) {
        Some(found) => found
            .into_iter()
            .map(|(location, text)| Found { location, text })
            .collect(),
        None => vec![Found {
            location: String::new(),
            text: text.to_string(),
        }],
    }
}

/// The one policy in `text`, or why there is not exactly one (`listener` picks one of several).
pub fn one_policy(text: &str, listener: Option<&str>) -> Result<Found, String> {
    let mut found = policies(text);
    if let Some(l) = listener {
        found.retain(|f| f.location == format!("listener {l}"));
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(match listener {
            Some(l) => format!("no laneguard policy on listener {l}"),
            None => "an Envoy config without a laneguard wasm filter".into(),
        }),
        n => Err(format!(
            "{n} laneguard policies ({}); choose one with --listener NAME",
            found
                .iter()
                .map(|f| f.location.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// `None` when the text is not an Envoy config; else every laneguard policy inside it, with
/// the listener it belongs to.
fn embedded_policies(text: &str) -> Option<Vec<(String, String)>> {
    let doc: Value = serde_yaml::from_str(text).ok()?;
    doc.get("static_resources")?;
    let mut found = Vec::new();
    walk(&doc, "", &mut found);
    Some(found)
}

fn walk(v: &Value, listener: &str, found: &mut Vec<(String, String)>) {
    match v {
        Value::Mapping(m) => {
            let listener = match (
                m.get("name").and_then(Value::as_str),
                m.get("filter_chains"),
            ) {
                (Some(name), Some(_)) => name,
                _ => listener,
            };
            if m.get("name").and_then(Value::as_str) == Some("envoy.filters.http.wasm") {
                let config = m.get("typed_config").and_then(|t| t.get("config"));
                let is_laneguard = config
                    .and_then(|c| c.get("root_id"))
                    .and_then(Value::as_str)
                    == Some("laneguard");
                let policy = config
                    .and_then(|c| c.get("configuration"))
                    .and_then(|c| c.get("value"))
                    .and_then(Value::as_str);
                if let (true, Some(p)) = (is_laneguard, policy) {
                    found.push((format!("listener {listener}"), p.to_string()));
                }
            }
            for (_, child) in m {
                walk(child, listener, found);
            }
        }
        Value::Sequence(s) => s.iter().for_each(|c| walk(c, listener, found)),
        _ => {}
    }
}

/// The clusters an Envoy config defines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyClusters {
    /// `static_resources.clusters[].name`, in the file's order.
    pub names: Vec<String>,
    /// The config also takes clusters from CDS (`dynamic_resources.cds_config`): a name
    /// missing from `names` may still arrive from the control plane.
    pub dynamic: bool,
}

/// The clusters of the Envoy config in `text`; `None` when it is not an Envoy config.
pub fn envoy_clusters(text: &str) -> Option<EnvoyClusters> {
    let doc: Value = serde_yaml::from_str(text).ok()?;
    let statics = doc.get("static_resources")?;
    let names = statics
        .get("clusters")
        .and_then(Value::as_sequence)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.get("name").and_then(Value::as_str))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let dynamic = doc
        .get("dynamic_resources")
        .and_then(|d| d.get("cds_config"))
        .is_some();
    Some(EnvoyClusters { names, dynamic })
}

/// Refuse a policy that names a cluster (`service.cluster`, `audit.cluster`:
/// [`Policy::clusters`]) the Envoy config does not define. With CDS a missing name may come
/// from the control plane, so nothing is refused.
pub fn check_clusters(policy: &Policy, envoy: &EnvoyClusters) -> Result<(), PolicyError> {
    if envoy.dynamic {
        return Ok(());
    }
    for (field, name) in policy.clusters() {
        if !envoy.names.iter().any(|n| n == name) {
            let known = if envoy.names.is_empty() {
                "it defines none".to_string()
            } else {
                format!("its clusters: {}", envoy.names.join(", "))
            };
            return Err(PolicyError::new(
                field,
                format!(
                    "{name:?} is not a cluster of the Envoy config ({known}); Envoy would \
                     degrade every decision"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENVOY: &str =
        "static_resources:\n  clusters:\n  - name: laneguard_rls\n  - name: upstream\n";
    use crate::policy::tests::BASE as POLICY;

    fn policy(extra: &str) -> Policy {
        crate::parse(&format!("{POLICY}{extra}")).unwrap()
    }

    #[test]
    fn clusters_are_read_from_static_resources() {
        let c = envoy_clusters(ENVOY).unwrap();
        assert_eq!(c.names, vec!["laneguard_rls", "upstream"]);
        assert!(!c.dynamic);
        assert_eq!(envoy_clusters(POLICY), None);
    }

    #[test]
    fn a_known_cluster_passes_and_an_unknown_one_is_named() {
        let envoy = envoy_clusters(ENVOY).unwrap();
        assert_eq!(check_clusters(&policy(""), &envoy), Ok(()));
        let e =
            check_clusters(&policy("service: { cluster: laneguard_rsl }\n"), &envoy).unwrap_err();
        assert_eq!(e.path, "service.cluster");
        assert!(e.message.contains("\"laneguard_rsl\""), "{e}");
        assert!(e.message.contains("laneguard_rls, upstream"), "{e}");
        let e = check_clusters(&policy("audit: { cluster: auditz }\n"), &envoy).unwrap_err();
        assert_eq!(e.path, "audit.cluster");
    }

    #[test]
    fn clusters_from_cds_are_not_refused() {
        let envoy = envoy_clusters(&format!(
            "{ENVOY}dynamic_resources:\n  cds_config: {{ ads: {{}} }}\n"
        ))
        .unwrap();
        assert!(envoy.dynamic);
        assert_eq!(
            check_clusters(&policy("service: { cluster: elsewhere }\n"), &envoy),
            Ok(())
        );
    }
}
