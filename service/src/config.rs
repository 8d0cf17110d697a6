//! `--config FILE`: descriptor rules for clients that send no per-descriptor `limit`
//! (Envoy's native `envoy.filters.http.ratelimit`). The format is close to
//! envoyproxy/ratelimit's and is documented in `docs/service.md`.
//!
//! Parsing has two phases, like the policy in `laneguard-core`: a raw serde model that
//! rejects unknown fields, read through `serde_path_to_error` so every error names its path
//! (`descriptors[0].descriptors[1].rate_limit.unit`), then validation into [`Config`].

use std::num::NonZeroU32;
use std::path::Path;

use laneguard_core::{Rate, Window};
use serde::Deserialize;

use crate::unit::Unit;

/// Validated descriptor rules for one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    domain: String,
    rules: Vec<Rule>,
}

/// One node of the rule tree: it matches one descriptor entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub key: String,
    /// `None` matches any value of `key`.
    pub value: Option<String>,
    /// The rate of a descriptor whose last entry lands on this rule. `None`: unlimited.
    pub rate: Option<Rate>,
    pub children: Vec<Rule>,
}

/// A config file that cannot be used. Every variant names the file; `Invalid` names the
/// path inside it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: at `{path}`: {message}")]
    Invalid {
        file: String,
        path: String,
        message: String,
    },
}

impl ConfigError {
    /// The path inside the document that the error is about (`""` for I/O errors).
    pub fn path(&self) -> &str {
        match self {
            ConfigError::Io { .. } => "",
            ConfigError::Invalid { path, .. } => path,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    domain: String,
    #[serde(default)]
    descriptors: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    descriptors: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    unit: Unit,
    requests_per_unit: NonZeroU32,
    #[serde(default)]
    burst: Option<NonZeroU32>,
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: file.clone(),
            source,
        })?;
        Config::parse(&text, &file)
    }

    /// Parse and validate a config document. `origin` names it in errors (usually the file).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." {
                "(top level)".to_string()
            } else {
                path
            };
            let message = e.into_inner().to_string();
            // serde_yaml prefixes its own (shorter) path; ours is already in the error.
            let message = match message.split_once(": ") {
                Some((head, rest)) if path.starts_with(head) => rest.to_string(),
                _ => message,
            };
            ConfigError::Invalid {
                file: origin.to_string(),
                path,
                message,
            }
        })?;
        let invalid = |path: String, message: String| ConfigError::Invalid {
            file: origin.to_string(),
            path,
            message,
        };
        if raw.domain.is_empty() {
            return Err(invalid("domain".into(), "must not be empty".into()));
        }
        let rules = convert(raw.descriptors, "descriptors", &invalid)?;
        Ok(Config {
            domain: raw.domain,
            rules,
        })
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rate for a descriptor in `domain` with these entries (without `lg.burst`), if a
    /// rule gives it one. Entries are matched in order, one tree level per entry; at each
    /// level a rule with the entry's exact value wins over a rule without a value. The
    /// descriptor gets the rate of the rule its last entry lands on; if some entry matches
    /// no rule, or that rule has no `rate_limit`, the descriptor is unlimited.
    pub fn lookup(&self, domain: &str, entries: &[(&str, &str)]) -> Option<Rate> {
        if domain != self.domain || entries.is_empty() {
            return None;
        }
        let mut level = self.rules.as_slice();
        let mut matched = None;
        for (key, value) in entries {
            let rule = level
                .iter()
                .find(|r| r.key == *key && r.value.as_deref() == Some(*value))
                .or_else(|| level.iter().find(|r| r.key == *key && r.value.is_none()))?;
            level = &rule.children;
            matched = Some(rule);
        }
        matched.and_then(|r| r.rate)
    }
}

fn convert<F>(raw: Vec<RawRule>, at: &str, invalid: &F) -> Result<Vec<Rule>, ConfigError>
where
    F: Fn(String, String) -> ConfigError,
{
    let mut rules: Vec<Rule> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let path = format!("{at}[{i}]");
        if r.key.is_empty() {
            return Err(invalid(format!("{path}.key"), "must not be empty".into()));
        }
        if let Some(j) = rules
            .iter()
            .position(|earlier| earlier.key == r.key && earlier.value == r.value)
        {
            let what = match &r.value {
                Some(v) => format!("key `{}` with value `{v}`", r.key),
                None => format!("key `{}` without a value", r.key),
            };
            return Err(invalid(path, format!("duplicates {at}[{j}] ({what})")));
        }
        let rate = match r.rate_limit {
            None => None,
            Some(rl) => {
                let window = rl.unit.window().ok_or_else(|| {
                    invalid(
                        format!("{path}.rate_limit.unit"),
                        format!(
                            "unit `{}` is not supported yet (use second, minute, hour or day)",
                            rl.unit.name()
                        ),
                    )
                })?;
                Some(rate(rl.requests_per_unit, window, rl.burst))
            }
        };
        let children = convert(r.descriptors, &format!("{path}.descriptors"), invalid)?;
        rules.push(Rule {
            key: r.key,
            value: r.value,
            rate,
            children,
        });
    }
    Ok(rules)
}

fn rate(requests: NonZeroU32, window: Window, burst: Option<NonZeroU32>) -> Rate {
    Rate {
        requests,
        window,
        burst: burst.unwrap_or(requests),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = include_str!("../testdata/config/good.yaml");

    fn bad(name: &str, text: &str) -> ConfigError {
        match Config::parse(text, name) {
            Ok(c) => panic!("{name} parsed: {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn good_file_parses_and_matches() {
        let c = Config::parse(GOOD, "good.yaml").unwrap();
        assert_eq!(c.domain(), "laneguard");
        let shared = c.lookup("laneguard", &[("tenant", "acme"), ("bucket", "shared")]);
        let shared = shared.unwrap();
        assert_eq!(shared.requests.get(), 600);
        assert_eq!(shared.window, Window::Minute);
        assert_eq!(shared.burst.get(), 100);

        // An exact value beats the wildcard at the same level.
        let vip = c
            .lookup("laneguard", &[("tenant", "vip"), ("bucket", "shared")])
            .unwrap();
        assert_eq!(vip.requests.get(), 6000);
        // Burst defaults to requests_per_unit.
        assert_eq!(vip.burst.get(), 6000);

        // The wildcard on `class` matches any class.
        let class = c
            .lookup(
                "laneguard",
                &[("tenant", "acme"), ("bucket", "class"), ("class", "export")],
            )
            .unwrap();
        assert_eq!((class.requests.get(), class.window), (10, Window::Second));

        // Landing on a rule without rate_limit, stopping early, an unmatched entry, or another
        // domain: unlimited.
        assert_eq!(c.lookup("laneguard", &[("tenant", "acme")]), None);
        assert_eq!(
            c.lookup("laneguard", &[("tenant", "acme"), ("bucket", "class")]),
            None
        );
        assert_eq!(
            c.lookup("laneguard", &[("tenant", "acme"), ("bucket", "nope")]),
            None
        );
        assert_eq!(c.lookup("laneguard", &[("user", "u")]), None);
        assert_eq!(
            c.lookup("other", &[("tenant", "acme"), ("bucket", "shared")]),
            None
        );
        assert_eq!(c.lookup("laneguard", &[]), None);

        // A deeper entry than the tree has: unlimited.
        assert_eq!(
            c.lookup(
                "laneguard",
                &[("tenant", "acme"), ("bucket", "shared"), ("x", "y")]
            ),
            None
        );
        let total = c
            .lookup("laneguard", &[("bucket", "model_total"), ("model", "m1")])
            .unwrap();
        assert_eq!((total.requests.get(), total.window), (100_000, Window::Day));
    }

    #[test]
    fn unknown_field_is_rejected_with_its_path() {
        let e = bad(
            "bad_unknown_field.yaml",
            include_str!("../testdata/config/bad_unknown_field.yaml"),
        );
        // The path ends at the unknown field itself.
        assert_eq!(
            e.path(),
            "descriptors[0].descriptors[0].rate_limit.requests_per_second"
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "bad_unknown_field.yaml: at `descriptors[0].descriptors[0].rate_limit.requests_per_second`: unknown field"
            ),
            "{msg}"
        );
    }

    #[test]
    fn unknown_top_level_field_is_rejected() {
        let e = bad("t.yaml", "domain: d\nshadow_mode: true\n");
        assert!(e.to_string().contains("shadow_mode"), "{e}");
    }

    #[test]
    fn bad_unit_names_the_unit_path() {
        let e = bad(
            "bad_unit.yaml",
            include_str!("../testdata/config/bad_unit.yaml"),
        );
        assert_eq!(e.path(), "descriptors[0].rate_limit.unit");
        assert!(e.to_string().contains("fortnight"), "{e}");
    }

    #[test]
    fn unsupported_unit_is_named() {
        let e = bad(
            "bad_unsupported_unit.yaml",
            include_str!("../testdata/config/bad_unsupported_unit.yaml"),
        );
        assert_eq!(e.path(), "descriptors[0].rate_limit.unit");
        assert!(e.to_string().contains("`week` is not supported"), "{e}");
    }

    #[test]
    fn zero_rate_is_rejected() {
        let e = bad(
            "bad_zero_rate.yaml",
            include_str!("../testdata/config/bad_zero_rate.yaml"),
        );
        assert_eq!(
            e.path(),
            "descriptors[0].descriptors[0].rate_limit.requests_per_unit"
        );
    }

    #[test]
    fn duplicate_sibling_is_rejected() {
        let e = bad(
            "bad_duplicate.yaml",
            include_str!("../testdata/config/bad_duplicate.yaml"),
        );
        assert_eq!(e.path(), "descriptors[0].descriptors[2]");
        assert!(
            e.to_string()
                .contains("duplicates descriptors[0].descriptors[0]"),
            "{e}"
        );
    }

    #[test]
    fn missing_domain_and_empty_key_are_rejected() {
        let e = bad("m.yaml", "descriptors: []\n");
        assert!(e.to_string().contains("domain"), "{e}");
        let e = bad("k.yaml", "domain: d\ndescriptors:\n  - key: \"\"\n");
        assert_eq!(e.path(), "descriptors[0].key");
        let e = bad("d.yaml", "domain: \"\"\n");
        assert_eq!(e.path(), "domain");
    }

    #[test]
    fn unit_is_case_insensitive_like_envoyproxy_ratelimit() {
        let c = Config::parse(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: MINUTE, requests_per_unit: 5}\n",
            "u.yaml",
        )
        .unwrap();
        assert_eq!(
            c.lookup("d", &[("k", "any")]).unwrap().window,
            Window::Minute
        );
    }

    #[test]
    fn missing_file_names_the_file() {
        let e = Config::load(Path::new("/nonexistent/laneguard.yaml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/laneguard.yaml: cannot read"),
            "{e}"
        );
    }
}
