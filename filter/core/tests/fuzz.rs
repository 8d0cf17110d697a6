//! Fuzz targets of the core (issue 12 §2, `docs/fuzzing.md`): the policy parser and the
//! trace reader. `make test` runs each for a few hundred fixed-seed inputs; `make fuzz`
//! (FUZZ_SECONDS) runs them for a bounded time with a fresh seed.

use laneguard_core::replay::trace::{Item, Reader};
use laneguard_fuzz::{fuzz, gen, Budget, Outcome};
use serde_yaml::Value;
use std::path::PathBuf;

/// Field names and values of the policy (docs/policy.md), so that generated documents get
/// past the first unknown field often.
const POLICY_WORDS: &[&str] = &[
    "version",
    "identity",
    "tenant_header",
    "principal_header",
    "user_header",
    "classification",
    "header",
    "granted_header",
    "default_class",
    "service",
    "cluster",
    "domain",
    "timeout_ms",
    "local_share",
    "sync_interval_s",
    "max_lease",
    "headers",
    "draft03",
    "rollout",
    "mode",
    "near_miss_pct",
    "buckets",
    "user",
    "audit",
    "ship",
    "max_buffer",
    "max_batch",
    "classes",
    "name",
    "consequence",
    "source",
    "purpose",
    "owner",
    "budget",
    "failure_mode",
    "must_not_compete_with",
    "fallbacks",
    "queue",
    "max_wait_ms",
    "max_depth",
    "families",
    "fallback_route",
    "value",
    "reserve",
    "borrow",
    "principals",
    "may_declare",
    "tenants",
    "default",
    "ceiling",
    "overrides",
    "endpoint_families",
    "path_prefixes",
    "methods",
    "cost",
    "limit",
    "users",
    "purposes",
    "limits",
    "models",
    "list",
    "capacity",
    "allocation",
    "share",
    "per_second",
    "per_minute",
    "per_hour",
    "per_day",
    "burst",
    "tokens",
    "cheaper_model",
    "low",
    "time_sensitive",
    "repair",
    "recovery",
    "open",
    "closed",
    "local",
    "enforce",
    "shadow",
    "off",
    "reject",
    "class",
    "tool",
    "model",
    "model_total",
    "GET",
    "/exports",
    "interactive",
    "export",
    "web",
    "acme",
];

fn policies_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/policies")
}

/// Every policy fixture's text: the valid ones, then the invalid ones.
fn fixture_texts() -> Vec<String> {
    let mut out = Vec::new();
    for dir in ["valid", "invalid"] {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(policies_dir().join(dir))
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        paths.sort();
        for p in paths {
            if p.extension().is_some_and(|x| x == "yaml") {
                out.extend(std::fs::read_to_string(&p).ok());
            }
        }
    }
    assert!(out.len() >= 10, "the fixtures are found");
    out
}

fn valid_fixtures() -> Vec<Value> {
    let valid = fixture_texts()
        .into_iter()
        .filter(|t| laneguard_core::parse(t).is_ok())
        .filter_map(|t| serde_yaml::from_str(&t).ok())
        .collect::<Vec<Value>>();
    assert!(valid.len() >= 5, "valid fixtures parse");
    valid
}

/// Whether `path` (`classes[2].reserve.per_minute`) leads somewhere in `v`. A key may itself
/// contain dots, so each mapping key is tried as a prefix of the rest; `?` (serde's unknown
/// step) matches any key. The last step may be missing from a mapping: the error then
/// names the field to add.
fn leads(v: &Value, rest: &str) -> bool {
    let rest = rest.strip_prefix('.').unwrap_or(rest);
    if rest.is_empty() {
        return true;
    }
    match v {
        Value::Tagged(t) => leads(&t.value, rest),
        Value::Sequence(xs) => {
            let Some(inner) = rest.strip_prefix('[') else {
                return false;
            };
            let Some((i, after)) = inner.split_once(']') else {
                return false;
            };
            i.parse::<usize>()
                .ok()
                .and_then(|i| xs.get(i))
                .is_some_and(|x| leads(x, after))
        }
        Value::Mapping(m) => {
            let found = m.iter().any(|(k, x)| {
                let name = match k {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                };
                let after = rest
                    .strip_prefix('?')
                    .or_else(|| rest.strip_prefix(name.as_str()));
                after.is_some_and(|a| {
                    (a.is_empty() || a.starts_with('.') || a.starts_with('[')) && leads(x, a)
                })
            });
            found || !rest.contains('[')
        }
        _ => false,
    }
}

/// The property every policy error must have: its path names a place in the input (every
/// step but the last exists; the last exists too, or is the field the error asks to add).
fn error_names_the_input(text: &str) -> Outcome {
    let Err(e) = laneguard_core::parse(text) else {
        return Ok(());
    };
    if e.message.trim().is_empty() {
        return Err(format!("an error without a message at {:?}", e.path));
    }
    if e.path.is_empty() {
        return Err(format!("an error without a path: {}", e.message));
    }
    // A document that is not YAML at all: the path can only be approximate.
    let Ok(doc) = serde_yaml::from_str::<Value>(text) else {
        return Ok(());
    };
    if e.path == "(document)" {
        return Ok(());
    }
    if leads(&doc, &e.path) {
        return Ok(());
    }
    Err(format!(
        "error path {:?} is not in the input ({})",
        e.path, e.message
    ))
}

#[test]
fn fuzz_policy_documents() {
    fuzz(
        "policy_documents",
        Budget::from_env(100),
        gen::document(POLICY_WORDS),
        |t: &String| error_names_the_input(t),
    )
    .unwrap();
}

#[test]
fn fuzz_policy_mutations() {
    fuzz(
        "policy_mutations",
        Budget::from_env(100),
        gen::mutated(valid_fixtures(), POLICY_WORDS),
        |t: &String| error_names_the_input(t),
    )
    .unwrap();
}

#[test]
fn fuzz_policy_bytes() {
    fuzz(
        "policy_bytes",
        Budget::from_env(100),
        gen::damaged(fixture_texts()),
        |t: &String| error_names_the_input(t),
    )
    .unwrap();
}

const TRACE_WORDS: &[&str] = &[
    "time",
    "tenant",
    "principal",
    "user",
    "class",
    "method",
    "path",
    "purpose",
    "model",
    "cost",
    "status",
    "request_id",
    "2026-11-24T05:25:22.123Z",
    "acme",
    "GET",
    "/orders",
    "[2026-11-24T05:25:22.123Z]",
    "\"GET /orders HTTP/1.1\"",
    "tenant=acme",
    "principal=web",
    "user=u1",
    "declared=repair",
    "class=web",
    "200",
    "429",
    "-",
];

#[test]
fn fuzz_trace_lines() {
    let lines = proptest::collection::vec(gen::line(TRACE_WORDS), 0..20);
    fuzz(
        "trace_lines",
        Budget::from_env(100),
        lines,
        |lines: &Vec<String>| {
            let text = lines.join("\n");
            let mut seen = 0u64;
            for item in Reader::new(text.as_bytes()) {
                seen += 1;
                match item {
                    Item::Request(_) => {}
                    Item::Bad(e) => {
                        if e.line == 0 || e.line > text.lines().count() as u64 {
                            return Err(format!("bad line numbered {} of {}", e.line, lines.len()));
                        }
                        if e.message.is_empty() {
                            return Err("a bad line without a reason".into());
                        }
                    }
                    Item::Io(e) => return Err(format!("I/O error from a byte slice: {e}")),
                }
            }
            if seen > text.lines().count() as u64 {
                return Err("more items than lines".into());
            }
            Ok(())
        },
    )
    .unwrap();
}

#[test]
fn fuzz_trace_bytes() {
    // Not UTF-8, NUL bytes, lines cut anywhere: every one is a bad line, never a panic.
    let bytes = proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2_000);
    fuzz(
        "trace_bytes",
        Budget::from_env(100),
        bytes,
        |b: &Vec<u8>| {
            for item in Reader::new(b.as_slice()) {
                if let Item::Io(e) = item {
                    return Err(format!("I/O error from a byte slice: {e}"));
                }
            }
            Ok(())
        },
    )
    .unwrap();
}
