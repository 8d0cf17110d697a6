//! `laneguard-policy check FILE…`: validate laneguard policies without starting Envoy.
//!
//! A FILE is either a policy (YAML or JSON) or an Envoy config: then every
//! `envoy.filters.http.wasm` filter whose plugin `root_id` is `laneguard` has its
//! `configuration.value` checked. It uses the same `laneguard_core::parse` as the filter's
//! `on_configure`, so a policy that passes here loads in Envoy, and an error names the same
//! path. Exit status: 0 all valid, 1 an invalid policy, 2 a usage or I/O error.

use serde_yaml::Value;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let files = match args.split_first() {
        Some((cmd, files)) if cmd == "check" && !files.is_empty() => files,
        _ => {
            eprintln!("usage: laneguard-policy check FILE...\n  FILE: a laneguard policy, or an Envoy YAML that embeds one");
            return ExitCode::from(2);
        }
    };
    let mut status = ExitCode::SUCCESS;
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{file}: {e}");
                return ExitCode::from(2);
            }
        };
        let policies = match embedded_policies(&text) {
            Some(found) if !found.is_empty() => found,
            Some(_) => {
                eprintln!("{file}: an Envoy config without a laneguard wasm filter");
                status = ExitCode::from(1);
                continue;
            }
            None => vec![(String::new(), text)],
        };
        for (location, policy) in policies {
            let label = if location.is_empty() {
                file.clone()
            } else {
                format!("{file} ({location})")
            };
            match laneguard_core::parse(&policy) {
                Ok(p) => println!(
                    "{label}: ok ({} classes, {} principals, {} tenant overrides)",
                    p.classes.len(),
                    p.principals.len(),
                    p.tenant_plans.len()
                ),
                Err(e) => {
                    eprintln!("{label}: invalid policy: {e}");
                    status = ExitCode::from(1);
                }
            }
        }
    }
    status
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
