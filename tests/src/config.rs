//! Rewriting the Envoy YAML in `envoy/` for a test: ephemeral ports for the admin and the
//! listeners, the clusters pointed at this test's processes, the absolute `.wasm` path, and
//! optionally a test policy. The structure is walked by names (listener `gateway`, filter
//! `envoy.filters.http.wasm`, cluster names), never by position, so the demo file can be
//! reorganised without breaking the tests.

use crate::{repo_root, wasm_path, Context, Error, Result};
use serde_yaml::{Mapping, Value};
use std::path::Path;

pub const WASM_FILTER: &str = "envoy.filters.http.wasm";
pub const RLS_CLUSTER: &str = "laneguard_rls";
pub const UPSTREAM_CLUSTERS: [&str; 3] =
    ["upstream_shared", "upstream_protected", "upstream_fallback"];

/// Load a YAML file of the repository (`envoy/demo/envoy.yaml`, ...).
pub fn load(relative: &str) -> Result<Value> {
    let path = repo_root().join(relative);
    let text = std::fs::read_to_string(&path).context(|| {
        format!(
            "reading {} (the integration tests start Envoy with it)",
            path.display()
        )
    })?;
    serde_yaml::from_str(&text).context(|| format!("parsing {}", path.display()))
}

/// `envoy/demo/envoy.yaml`, unchanged.
pub fn demo_config() -> Result<Value> {
    load("envoy/demo/envoy.yaml")
}

/// The demo policy: the wasm plugin's configuration in `envoy/demo/envoy.yaml`.
pub fn demo_policy() -> Result<String> {
    policy(&demo_config()?)
}

/// The ports of this test's processes, for [`rewrite_demo`].
pub struct DemoPorts {
    pub service: u16,
    pub upstream: u16,
}

/// Make the demo configuration runnable in a test: admin and `gateway` on port 0, the
/// rate-limit cluster on the test service, the three lanes on the test upstream, and the
/// absolute path of the built filter.
pub fn rewrite_demo(cfg: &mut Value, ports: &DemoPorts) -> Result<()> {
    set_admin_port(cfg, 0)?;
    set_all_listener_ports(cfg, 0)?;
    point_cluster(cfg, RLS_CLUSTER, ports.service)?;
    for name in UPSTREAM_CLUSTERS {
        point_cluster(cfg, name, ports.upstream)?;
    }
    set_wasm_path(cfg, &wasm_path()?)?;
    Ok(())
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_mapping().and_then(|m| m.get(key))
}

fn get_mut<'a>(v: &'a mut Value, key: &str) -> Option<&'a mut Value> {
    v.as_mapping_mut().and_then(|m| m.get_mut(key))
}

fn set(v: &mut Value, key: &str, value: Value) -> Result<()> {
    let m = v
        .as_mapping_mut()
        .context(|| format!("cannot set {key}: not a mapping"))?;
    m.insert(Value::from(key), value);
    Ok(())
}

fn socket_address_mut(addr: &mut Value) -> Option<&mut Value> {
    get_mut(addr, "socket_address")
}

/// Point `admin.address` at 127.0.0.1:`port`.
pub fn set_admin_port(cfg: &mut Value, port: u16) -> Result<()> {
    let sa = get_mut(cfg, "admin")
        .and_then(|a| get_mut(a, "address"))
        .and_then(socket_address_mut)
        .context(|| "the Envoy config has no admin.address.socket_address".into())?;
    set(sa, "address", Value::from("127.0.0.1"))?;
    set(sa, "port_value", Value::from(port))
}

fn listeners_mut(cfg: &mut Value) -> Result<&mut Vec<Value>> {
    get_mut(cfg, "static_resources")
        .and_then(|s| get_mut(s, "listeners"))
        .and_then(Value::as_sequence_mut)
        .context(|| "the Envoy config has no static_resources.listeners".into())
}

fn clusters_mut(cfg: &mut Value) -> Result<&mut Vec<Value>> {
    get_mut(cfg, "static_resources")
        .and_then(|s| get_mut(s, "clusters"))
        .and_then(Value::as_sequence_mut)
        .context(|| "the Envoy config has no static_resources.clusters".into())
}

/// Names of the static listeners.
pub fn listener_names(cfg: &Value) -> Vec<String> {
    get(cfg, "static_resources")
        .and_then(|s| get(s, "listeners"))
        .and_then(Value::as_sequence)
        .map(|ls| {
            ls.iter()
                .filter_map(|l| get(l, "name").and_then(Value::as_str).map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Names of the static clusters.
pub fn cluster_names(cfg: &Value) -> Vec<String> {
    get(cfg, "static_resources")
        .and_then(|s| get(s, "clusters"))
        .and_then(Value::as_sequence)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| get(c, "name").and_then(Value::as_str).map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Move one listener to 127.0.0.1:`port`.
pub fn set_listener_port(cfg: &mut Value, listener: &str, port: u16) -> Result<()> {
    let l = listeners_mut(cfg)?
        .iter_mut()
        .find(|l| get(l, "name").and_then(Value::as_str) == Some(listener))
        .context(|| format!("the Envoy config has no listener named {listener:?}"))?;
    let sa = get_mut(l, "address")
        .and_then(socket_address_mut)
        .context(|| format!("listener {listener:?} has no address.socket_address"))?;
    set(sa, "address", Value::from("127.0.0.1"))?;
    set(sa, "port_value", Value::from(port))
}

/// Move every listener to 127.0.0.1:`port` (0: each gets its own ephemeral port).
pub fn set_all_listener_ports(cfg: &mut Value, port: u16) -> Result<()> {
    for name in listener_names(cfg) {
        set_listener_port(cfg, &name, port)?;
    }
    Ok(())
}

/// Point every endpoint of cluster `name` at 127.0.0.1:`port`.
pub fn point_cluster(cfg: &mut Value, name: &str, port: u16) -> Result<()> {
    let cluster = clusters_mut(cfg)?
        .iter_mut()
        .find(|c| get(c, "name").and_then(Value::as_str) == Some(name))
        .context(|| format!("the Envoy config has no cluster named {name:?}"))?;
    let groups = get_mut(cluster, "load_assignment")
        .and_then(|la| get_mut(la, "endpoints"))
        .and_then(Value::as_sequence_mut)
        .context(|| format!("cluster {name:?} has no load_assignment.endpoints"))?;
    let mut n = 0;
    for group in groups.iter_mut() {
        if let Some(lbs) = get_mut(group, "lb_endpoints").and_then(Value::as_sequence_mut) {
            for lb in lbs.iter_mut() {
                if let Some(sa) = get_mut(lb, "endpoint")
                    .and_then(|e| get_mut(e, "address"))
                    .and_then(socket_address_mut)
                {
                    set(sa, "address", Value::from("127.0.0.1"))?;
                    set(sa, "port_value", Value::from(port))?;
                    n += 1;
                }
            }
        }
    }
    if n == 0 {
        return Err(Error(format!(
            "cluster {name:?} has no endpoint socket_address to rewrite"
        )));
    }
    Ok(())
}

/// Every mapping in the document whose `name` is `name`, depth first (HTTP filters are
/// nested inside listeners, filter chains and the connection manager).
fn find_named_mut<'a>(v: &'a mut Value, name: &str, out: &mut Vec<&'a mut Value>) {
    let is_match = get(v, "name").and_then(Value::as_str) == Some(name);
    if is_match {
        out.push(v);
        return;
    }
    match v {
        Value::Mapping(m) => {
            for (_, child) in m.iter_mut() {
                find_named_mut(child, name, out);
            }
        }
        Value::Sequence(s) => {
            for child in s.iter_mut() {
                find_named_mut(child, name, out);
            }
        }
        Value::Tagged(t) => find_named_mut(&mut t.value, name, out),
        _ => {}
    }
}

fn find_named<'a>(v: &'a Value, name: &str, out: &mut Vec<&'a Value>) {
    if get(v, "name").and_then(Value::as_str) == Some(name) {
        out.push(v);
        return;
    }
    match v {
        Value::Mapping(m) => m.iter().for_each(|(_, c)| find_named(c, name, out)),
        Value::Sequence(s) => s.iter().for_each(|c| find_named(c, name, out)),
        Value::Tagged(t) => find_named(&t.value, name, out),
        _ => {}
    }
}

/// The one HTTP filter named `name`.
pub fn http_filter_mut<'a>(cfg: &'a mut Value, name: &str) -> Result<&'a mut Value> {
    let mut found = Vec::new();
    find_named_mut(cfg, name, &mut found);
    let n = found.len();
    match found.pop() {
        Some(f) if n == 1 => Ok(f),
        _ => Err(Error(format!(
            "expected exactly one filter named {name:?} in the Envoy config, found {n}"
        ))),
    }
}

/// The one HTTP filter named `name`, read-only.
pub fn http_filter<'a>(cfg: &'a Value, name: &str) -> Result<&'a Value> {
    let mut found = Vec::new();
    find_named(cfg, name, &mut found);
    let n = found.len();
    match found.pop() {
        Some(f) if n == 1 => Ok(f),
        _ => Err(Error(format!(
            "expected exactly one filter named {name:?} in the Envoy config, found {n}"
        ))),
    }
}

/// Remove the HTTP filter named `name` from every filter list that has it; error if none did.
pub fn remove_http_filter(cfg: &mut Value, name: &str) -> Result<()> {
    fn walk(v: &mut Value, name: &str) -> usize {
        match v {
            Value::Mapping(m) => m.iter_mut().map(|(_, c)| walk(c, name)).sum(),
            Value::Sequence(s) => {
                let before = s.len();
                s.retain(|f| get(f, "name").and_then(Value::as_str) != Some(name));
                let removed = before - s.len();
                removed + s.iter_mut().map(|c| walk(c, name)).sum::<usize>()
            }
            Value::Tagged(t) => walk(&mut t.value, name),
            _ => 0,
        }
    }
    if walk(cfg, name) == 0 {
        return Err(Error(format!(
            "the Envoy config has no filter named {name:?}"
        )));
    }
    Ok(())
}

fn wasm_plugin_config_mut(cfg: &mut Value) -> Result<&mut Value> {
    let f = http_filter_mut(cfg, WASM_FILTER)?;
    get_mut(f, "typed_config")
        .and_then(|t| get_mut(t, "config"))
        .context(|| format!("filter {WASM_FILTER} has no typed_config.config"))
}

/// Load the filter from `path` (absolute).
pub fn set_wasm_path(cfg: &mut Value, path: &Path) -> Result<()> {
    let plugin = wasm_plugin_config_mut(cfg)?;
    let local = get_mut(plugin, "vm_config")
        .and_then(|v| get_mut(v, "code"))
        .and_then(|c| get_mut(c, "local"))
        .context(|| "the wasm filter has no vm_config.code.local".into())?;
    let mut m = Mapping::new();
    m.insert(
        Value::from("filename"),
        Value::from(path.display().to_string()),
    );
    *local = Value::Mapping(m);
    Ok(())
}

/// The policy text: the wasm plugin's `configuration.value`.
pub fn policy(cfg: &Value) -> Result<String> {
    let f = http_filter(cfg, WASM_FILTER)?;
    get(f, "typed_config")
        .and_then(|t| get(t, "config"))
        .and_then(|c| get(c, "configuration"))
        .and_then(|c| get(c, "value"))
        .and_then(Value::as_str)
        .map(String::from)
        .context(|| {
            format!("filter {WASM_FILTER} has no typed_config.config.configuration.value string")
        })
}

/// Replace the policy text.
pub fn set_policy(cfg: &mut Value, policy: &str) -> Result<()> {
    let plugin = wasm_plugin_config_mut(cfg)?;
    let configuration = get_mut(plugin, "configuration")
        .context(|| "the wasm filter has no configuration".into())?;
    set(configuration, "value", Value::from(policy))
}

/// Set one top-level field of the policy, keeping the rest (for example `service.cluster`).
pub fn edit_policy(cfg: &mut Value, edit: impl FnOnce(&mut Value) -> Result<()>) -> Result<()> {
    let text = policy(cfg)?;
    let mut doc: Value = serde_yaml::from_str(&text).context(|| "parsing the policy".into())?;
    edit(&mut doc)?;
    let text = serde_yaml::to_string(&doc).context(|| "writing the policy".into())?;
    set_policy(cfg, &text)
}

/// `doc[a][b]... = value`, creating mappings on the way.
pub fn set_path(doc: &mut Value, path: &[&str], value: Value) -> Result<()> {
    let Some((last, parents)) = path.split_last() else {
        return Err(Error::new("empty path"));
    };
    let mut v = doc;
    for key in parents {
        let m = v
            .as_mapping_mut()
            .context(|| format!("{key}: parent is not a mapping"))?;
        v = m
            .entry(Value::from(*key))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
    }
    set(v, last, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINI: &str = r#"
admin: { address: { socket_address: { address: 0.0.0.0, port_value: 9901 } } }
static_resources:
  listeners:
  - name: gateway
    address: { socket_address: { address: 0.0.0.0, port_value: 10000 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              config:
                vm_config: { code: { local: { filename: rel/x.wasm } } }
                configuration: { "@type": t, value: "version: 1\nservice: { cluster: a }\n" }
          - name: envoy.filters.http.router
  clusters:
  - name: laneguard_rls
    load_assignment:
      endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 1.2.3.4, port_value: 8081 } } } } ] } ]
"#;

    #[test]
    fn rewrites_by_name() {
        let mut cfg: Value = serde_yaml::from_str(MINI).unwrap();
        set_admin_port(&mut cfg, 0).unwrap();
        set_listener_port(&mut cfg, "gateway", 0).unwrap();
        point_cluster(&mut cfg, "laneguard_rls", 4242).unwrap();
        set_wasm_path(&mut cfg, Path::new("/abs/x.wasm")).unwrap();
        edit_policy(&mut cfg, |p| {
            set_path(p, &["service", "cluster"], Value::from("nope"))
        })
        .unwrap();
        let text = serde_yaml::to_string(&cfg).unwrap();
        assert!(text.contains("port_value: 4242"), "{text}");
        assert!(text.contains("/abs/x.wasm"), "{text}");
        assert!(!text.contains("9901") && !text.contains("10000"), "{text}");
        assert!(policy(&cfg).unwrap().contains("cluster: nope"));
        assert!(point_cluster(&mut cfg, "missing", 1).is_err());
    }
}
