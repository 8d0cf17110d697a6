//! Finding a policy in a file, for every CLI: a laneguard policy (YAML or JSON), or an Envoy
//! config whose `envoy.filters.http.wasm` filters with `root_id: laneguard` embed one in
//! `configuration.value`. Pure: the CLI reads the file and hands over its text.

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
