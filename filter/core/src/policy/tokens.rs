//! The AI part of the policy: token budgets next to the request budgets, how much of a body
//! the filter may buffer to read `max_tokens` and `usage`, the default reservations, and the
//! header an upstream may report usage in. Everything is optional: a policy without
//! `tokens` and without `models.list[].tokens` has no token buckets and inspects no body.
//!
//! A token budget is a [`Rate`] whose unit is a token: `{ per_minute: 20000, burst: 4000 }`
//! is 20,000 tokens per minute of which 4,000 may be spent at once (the burst credit of
//! seed 003's fair-share section: a tenant under its allocation builds credit up to the
//! burst, and it refills at the allocation's rate).

use super::raw::{RawModel, RawTokens};
use super::{allocation, check_name, header_name, rate, PolicyError};
use crate::rate::Rate;
use std::collections::HashMap;

/// Paths whose request bodies are inspected when `tokens.path_prefixes` is not given.
pub const DEFAULT_PATHS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];
pub const DEFAULT_INSPECT_BYTES: u32 = 64 * 1024;
pub const MIN_INSPECT_BYTES: u32 = 1024;
pub const MAX_INSPECT_BYTES: u32 = 1024 * 1024;
/// The reservation of a request whose body names no `max_tokens`, when neither its model
/// nor its endpoint family sets a default.
pub const DEFAULT_ESTIMATE: u32 = 256;

/// A model's token capacity (the provider's tokens-per-window quota) and its allocations.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelTokens {
    pub capacity: Rate,
    pub default_allocation: Rate,
    pub tenant_allocations: HashMap<String, Rate>,
    /// The reservation for this model when the body names no `max_tokens`.
    pub default_estimate: Option<u32>,
}

/// Token settings of one endpoint family (the tool dimension).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ToolTokens {
    pub limit: Option<Rate>,
    pub default_estimate: Option<u32>,
}

/// Policy-wide AI settings. Present when `tokens` is set or any model has token budgets.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    /// Requests on these path prefixes are AI requests: their bodies are inspected.
    pub path_prefixes: Vec<String>,
    /// Request and response bodies are read (and the request body buffered) up to this.
    pub inspect_bytes: u32,
    pub default_estimate: u32,
    /// A response header in which the upstream reports the total tokens used.
    pub usage_header: Option<String>,
    /// Per (tenant, user) token budget.
    pub users: Option<Rate>,
    /// Per (tenant, purpose) token budgets; the purpose comes from `purposes.header`.
    pub purposes: HashMap<String, Rate>,
    /// Per endpoint family.
    pub tools: HashMap<String, ToolTokens>,
}

impl Tokens {
    /// Whether a request to `path` is an AI request (its body is inspected).
    pub fn inspects(&self, path: &str) -> bool {
        let path = path.split('?').next().unwrap_or("");
        self.path_prefixes
            .iter()
            .any(|p| path.starts_with(p.as_str()))
    }
}

fn estimate(value: Option<u32>, path: &str) -> Result<Option<u32>, PolicyError> {
    match value {
        Some(0) => Err(PolicyError::new(path, "must be at least 1")),
        v => Ok(v),
    }
}

/// The token budgets of one model (`models.list[i].tokens`).
pub(super) fn model_tokens(m: &RawModel, path: &str) -> Result<Option<ModelTokens>, PolicyError> {
    let Some(t) = &m.tokens else {
        return Ok(None);
    };
    let path = format!("{path}.tokens");
    let capacity = rate(&t.capacity, &format!("{path}.capacity"))?;
    let default_allocation = match &t.allocation {
        Some(a) => allocation(a, &capacity, &format!("{path}.allocation"))?,
        // Without an allocation every tenant may use the whole capacity.
        None => capacity,
    };
    let mut tenant_allocations = HashMap::new();
    let mut shares = 0.0;
    for (tenant, a) in &t.tenants {
        let apath = format!("{path}.tenants.{tenant}");
        check_name(tenant, &apath)?;
        shares += a.share.unwrap_or(0.0);
        if shares > 1.0 + 1e-9 {
            return Err(PolicyError::new(
                format!("{apath}.share"),
                "the tenants' shares of this model's tokens add up to more than 1",
            ));
        }
        tenant_allocations.insert(tenant.clone(), allocation(a, &capacity, &apath)?);
    }
    let default_estimate = estimate(t.default_estimate, &format!("{path}.default_estimate"))?;
    let tokens = ModelTokens {
        capacity,
        default_allocation,
        tenant_allocations,
        default_estimate,
    };
    if let Some(e) = default_estimate {
        let smallest = std::iter::once(&tokens.capacity)
            .chain(std::iter::once(&tokens.default_allocation))
            .chain(tokens.tenant_allocations.values())
            .map(|r| r.burst.get())
            .min()
            .unwrap_or(u32::MAX);
        if e > smallest {
            return Err(PolicyError::new(
                format!("{path}.default_estimate"),
                format!(
                    "{e} tokens is more than the smallest burst ({smallest}) of this model's token \
                     budgets: a request reserving it could never pass"
                ),
            ));
        }
    }
    Ok(Some(tokens))
}

/// `cheaper_model` names another model of the list, and following it never loops.
pub(super) fn check_cheaper(list: &[RawModel]) -> Result<(), PolicyError> {
    let index: HashMap<&str, usize> = list
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.as_str(), i))
        .collect();
    for (i, m) in list.iter().enumerate() {
        let Some(target) = &m.cheaper_model else {
            continue;
        };
        let path = format!("models.list[{i}].cheaper_model");
        if !index.contains_key(target.as_str()) {
            return Err(PolicyError::new(
                path,
                format!("unknown model {target:?} (list it in models.list)"),
            ));
        }
        let mut at = i;
        for _ in 0..=list.len() {
            match list[at].cheaper_model.as_deref().and_then(|n| index.get(n)) {
                Some(&next) if next == i => {
                    return Err(PolicyError::new(
                        path,
                        format!("following cheaper_model from {:?} comes back to it", m.name),
                    ))
                }
                Some(&next) => at = next,
                None => break,
            }
        }
    }
    Ok(())
}

/// The policy-wide settings. `families` and `purposes` are the names the policy declares.
pub(super) fn validate(
    raw: Option<&RawTokens>,
    any_model_tokens: bool,
    families: &[String],
    purposes: Option<&HashMap<String, Rate>>,
) -> Result<Option<Tokens>, PolicyError> {
    let default_raw = RawTokens::default();
    let t = match raw {
        Some(t) => t,
        None if any_model_tokens => &default_raw,
        None => return Ok(None),
    };
    let path_prefixes = match &t.path_prefixes {
        None => DEFAULT_PATHS.iter().map(|s| s.to_string()).collect(),
        Some(list) => {
            if list.is_empty() {
                return Err(PolicyError::new(
                    "tokens.path_prefixes",
                    "list at least one prefix, or leave the field out",
                ));
            }
            for (j, p) in list.iter().enumerate() {
                if !p.starts_with('/') {
                    return Err(PolicyError::new(
                        format!("tokens.path_prefixes[{j}]"),
                        "must start with '/'",
                    ));
                }
            }
            list.clone()
        }
    };
    let inspect_bytes = t.inspect_bytes.unwrap_or(DEFAULT_INSPECT_BYTES);
    if !(MIN_INSPECT_BYTES..=MAX_INSPECT_BYTES).contains(&inspect_bytes) {
        return Err(PolicyError::new(
            "tokens.inspect_bytes",
            format!("must be between {MIN_INSPECT_BYTES} and {MAX_INSPECT_BYTES}"),
        ));
    }
    let default_estimate =
        estimate(t.default_estimate, "tokens.default_estimate")?.unwrap_or(DEFAULT_ESTIMATE);
    let usage_header = match &t.usage_header {
        None => None,
        Some(h) => Some(header_name(Some(h.clone()), "", "tokens.usage_header")?),
    };
    let users = t
        .users
        .as_ref()
        .map(|r| rate(r, "tokens.users"))
        .transpose()?;
    let mut purpose_budgets = HashMap::new();
    for (name, r) in &t.purposes {
        let path = format!("tokens.purposes.{name}");
        check_name(name, &path)?;
        if purposes.is_none() {
            return Err(PolicyError::new(
                path,
                "a purpose token budget needs the `purposes` section (it names the header)",
            ));
        }
        purpose_budgets.insert(name.clone(), rate(r, &path)?);
    }
    let mut tools = HashMap::new();
    for (name, tool) in &t.tools {
        let path = format!("tokens.tools.{name}");
        if !families.iter().any(|f| f == name) {
            return Err(PolicyError::new(
                path,
                format!("unknown endpoint family {name:?}"),
            ));
        }
        let limit = tool
            .limit
            .as_ref()
            .map(|r| rate(r, &format!("{path}.limit")))
            .transpose()?;
        let default_estimate =
            estimate(tool.default_estimate, &format!("{path}.default_estimate"))?;
        if let (Some(l), Some(e)) = (limit, default_estimate) {
            if e > l.burst.get() {
                return Err(PolicyError::new(
                    format!("{path}.default_estimate"),
                    format!(
                        "{e} tokens is more than this family's token burst {}",
                        l.burst
                    ),
                ));
            }
        }
        tools.insert(
            name.clone(),
            ToolTokens {
                limit,
                default_estimate,
            },
        );
    }
    let smallest_burst = users
        .iter()
        .chain(purpose_budgets.values())
        .map(|r| r.burst.get())
        .min();
    if let (Some(b), None) = (smallest_burst, t.default_estimate) {
        // The built-in default must not make every request without max_tokens impossible.
        if DEFAULT_ESTIMATE > b {
            return Err(PolicyError::new(
                "tokens.default_estimate",
                format!(
                    "the default reservation ({DEFAULT_ESTIMATE}) is more than a token burst of {b}: set a smaller default_estimate"
                ),
            ));
        }
    } else if let Some(b) = smallest_burst {
        if default_estimate > b {
            return Err(PolicyError::new(
                "tokens.default_estimate",
                format!("{default_estimate} tokens is more than a token burst of {b}"),
            ));
        }
    }
    Ok(Some(Tokens {
        path_prefixes,
        inspect_bytes,
        default_estimate,
        usage_header,
        users,
        purposes: purpose_budgets,
        tools,
    }))
}

#[cfg(test)]
mod tests {
    use crate::policy::parse;
    use crate::policy::tests::BASE;

    const MODELS: &str = r#"
models:
  header: x-model
  default: small
  list:
    - name: large
      capacity: { per_minute: 100, burst: 20 }
      allocation: { share: 0.5, burst: 10 }
      cheaper_model: small
      tokens:
        capacity: { per_minute: 20000, burst: 5000 }
        allocation: { share: 0.5, burst: 2000 }
        tenants:
          northwind: { per_minute: 6000, burst: 3000 }
        default_estimate: 400
    - name: small
      capacity: { per_minute: 100, burst: 20 }
      allocation: { share: 1.0, burst: 20 }
      tokens:
        capacity: { per_minute: 50000, burst: 10000 }
"#;

    fn with(extra: &str) -> String {
        format!("{BASE}{MODELS}{extra}")
    }

    fn err_path(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.path,
        }
    }

    #[test]
    fn a_policy_without_tokens_inspects_nothing() {
        let p = parse(BASE).unwrap();
        assert!(p.tokens.is_none());
    }

    #[test]
    fn model_token_budgets_switch_inspection_on_with_defaults() {
        let p = parse(&with("")).unwrap();
        let t = p.tokens.as_ref().unwrap();
        assert_eq!(t.inspect_bytes, super::DEFAULT_INSPECT_BYTES);
        assert_eq!(t.default_estimate, super::DEFAULT_ESTIMATE);
        assert!(t.inspects("/v1/chat/completions?x=1"));
        assert!(!t.inspects("/orders/1"));
        let models = p.models.as_ref().unwrap();
        let large = &models.list["large"];
        let lt = large.tokens.as_ref().unwrap();
        assert_eq!(lt.default_allocation.requests.get(), 10_000);
        assert_eq!(lt.default_allocation.burst.get(), 2000);
        assert_eq!(lt.tenant_allocations["northwind"].requests.get(), 6000);
        assert_eq!(large.cheaper_model.as_deref(), Some("small"));
        // Without an allocation a tenant may use the whole capacity.
        let st = models.list["small"].tokens.as_ref().unwrap();
        assert_eq!(st.default_allocation, st.capacity);
    }

    #[test]
    fn errors_name_their_path() {
        let cases = [
            (
                with("tokens: { inspect_bytes: 10 }\n"),
                "tokens.inspect_bytes".to_string(),
            ),
            (
                with("tokens: { default_estimate: 0 }\n"),
                "tokens.default_estimate".into(),
            ),
            (
                with("tokens: { usage_header: \"bad header\" }\n"),
                "tokens.usage_header".into(),
            ),
            (
                with("tokens: { tools: { nope: { default_estimate: 5 } } }\n"),
                "tokens.tools.nope".into(),
            ),
            (
                with("tokens: { purposes: { summarize: { per_minute: 10, burst: 5 } } }\n"),
                "tokens.purposes.summarize".into(),
            ),
            (
                with("tokens: { path_prefixes: [v1] }\n"),
                "tokens.path_prefixes[0]".into(),
            ),
            (
                with("tokens: { surprise: 1 }\n"),
                "tokens.surprise".into(),
            ),
            (
                with("").replace("cheaper_model: small", "cheaper_model: tiny"),
                "models.list[0].cheaper_model".into(),
            ),
            (
                with("").replace(
                    "      tokens:\n        capacity: { per_minute: 50000",
                    "      cheaper_model: large\n      tokens:\n        capacity: { per_minute: 50000",
                ),
                "models.list[0].cheaper_model".into(),
            ),
            (
                with("").replace("default_estimate: 400", "default_estimate: 2500"),
                "models.list[0].tokens.default_estimate".into(),
            ),
            (
                with("").replace(
                    "allocation: { share: 0.5, burst: 2000 }",
                    "allocation: { share: 0.5, burst: 9000 }",
                ),
                "models.list[0].tokens.allocation.burst".into(),
            ),
            (
                with("").replace(
                    "northwind: { per_minute: 6000, burst: 3000 }",
                    "northwind: { per_minute: 60000, burst: 3000 }",
                ),
                "models.list[0].tokens.tenants.northwind".into(),
            ),
            (
                with("tokens: { users: { per_minute: 1000, burst: 100 } }\n"),
                "tokens.default_estimate".into(),
            ),
        ];
        for (text, path) in cases {
            assert_eq!(err_path(&text), path, "{text}");
        }
    }

    #[test]
    fn user_purpose_and_tool_token_budgets() {
        let text = format!(
            "{BASE}endpoint_families:\n  - {{ name: chat, path_prefixes: [/v1/chat] }}\npurposes:\n  unknown: refuse\n  limits: {{}}\n{MODELS}tokens:\n  inspect_bytes: 8192\n  usage_header: X-Usage-Total\n  users: {{ per_minute: 9000, burst: 3000 }}\n  purposes: {{ summarize: {{ per_minute: 1000, burst: 500 }} }}\n  tools: {{ chat: {{ limit: {{ per_minute: 4000, burst: 1000 }}, default_estimate: 100 }} }}\n"
        );
        let p = parse(&text).unwrap();
        let t = p.tokens.unwrap();
        assert_eq!(t.inspect_bytes, 8192);
        assert_eq!(t.usage_header.as_deref(), Some("x-usage-total"));
        assert_eq!(t.users.unwrap().burst.get(), 3000);
        assert_eq!(t.purposes["summarize"].requests.get(), 1000);
        assert_eq!(t.tools["chat"].default_estimate, Some(100));
    }
}
