//! `laneguard-policy`: validate, map and lint laneguard policies without starting Envoy.
//!
//! ```text
//! laneguard-policy check FILE... [--envoy ENVOY_YAML]
//! laneguard-policy check --envoy ENVOY_YAML
//! laneguard-policy map FILE [--format markdown|json|svg] [--listener NAME]
//! laneguard-policy lint FILE... [--strict] [--format text|json]
//! ```
//!
//! A FILE is either a policy (YAML or JSON) or an Envoy config: then every
//! `envoy.filters.http.wasm` filter whose plugin `root_id` is `laneguard` has its
//! `configuration.value` read. `check` uses the same `laneguard_core::parse` as the filter's
//! `on_configure`, so a policy that passes here loads in Envoy, and an error names the same
//! path. A policy checked inside an Envoy config (embedded in it, or given with `--envoy`)
//! must also name only clusters that config defines (`service.cluster`, `audit.cluster`:
//! `laneguard_core::policy::source::check_clusters`); `--envoy` alone checks the policies
//! the Envoy config embeds. `map` prints the competition map (`laneguard_core::map`), `lint` its rollout risks
//! (`laneguard_core::lint`). Exit status: 0 fine, 1 an invalid policy (or, with
//! `lint --strict`, a warning), 2 a usage or I/O error.

use clap::{Parser, Subcommand, ValueEnum};
use laneguard_core::policy::source::{
    check_clusters, envoy_clusters, one_policy, policies, EnvoyClusters, Found,
};
use laneguard_service::report;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "laneguard-policy",
    about = "Validate, map and lint laneguard policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum MapFormat {
    Markdown,
    Json,
    Svg,
}

#[derive(Clone, Copy, ValueEnum)]
enum LintFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate policies (exit 1 if one is invalid, or names a cluster its Envoy config lacks).
    Check {
        /// A laneguard policy, or an Envoy YAML that embeds one (then its clusters are checked
        /// against that YAML's).
        #[arg(required_unless_present = "envoy")]
        files: Vec<String>,
        /// The Envoy YAML the policies run in: `service.cluster` and `audit.cluster` must be
        /// clusters it defines. Without FILE, the policies it embeds are checked.
        #[arg(long, value_name = "ENVOY_YAML")]
        envoy: Option<String>,
    },
    /// Print the traffic competition map: classes, who shares identity, who shares a budget.
    Map {
        file: String,
        #[arg(long, value_enum, default_value = "markdown")]
        format: MapFormat,
        /// In an Envoy config with several laneguard filters: the listener's.
        #[arg(long)]
        listener: Option<String>,
    },
    /// Warn about rollout risks in valid policies (a path and what to change, per warning).
    Lint {
        #[arg(required = true)]
        files: Vec<String>,
        /// Exit 1 if there is any warning.
        #[arg(long)]
        strict: bool,
        #[arg(long, value_enum, default_value = "text")]
        format: LintFormat,
    },
}

fn read(file: &str) -> Result<String, ExitCode> {
    std::fs::read_to_string(file).map_err(|e| {
        eprintln!("{file}: {e}");
        ExitCode::from(2)
    })
}

fn label(file: &str, f: &Found) -> String {
    if f.location.is_empty() {
        file.to_string()
    } else {
        format!("{file} ({})", f.location)
    }
}

/// Run `each` on every policy in `files` (a file may embed several), with the clusters of the
/// Envoy config it was found in; `each` returns whether the policy passed. Exit 2 on an I/O
/// error, 1 if a policy failed or a file had none.
fn each_policy(
    files: &[String],
    mut each: impl FnMut(&str, &str, Option<&EnvoyClusters>) -> bool,
) -> ExitCode {
    let mut status = ExitCode::SUCCESS;
    for file in files {
        let text = match read(file) {
            Ok(t) => t,
            Err(code) => return code,
        };
        let clusters = envoy_clusters(&text);
        let found = policies(&text);
        if found.is_empty() {
            eprintln!("{file}: an Envoy config without a laneguard wasm filter");
            status = ExitCode::from(1);
        }
        for f in found {
            if !each(&label(file, &f), &f.text, clusters.as_ref()) {
                status = ExitCode::from(1);
            }
        }
    }
    status
}

/// `check`: parse each policy; check its clusters against `envoy` (the `--envoy` file), or
/// against the Envoy config it was found in.
fn check(files: &[String], envoy: Option<&str>) -> ExitCode {
    let against = match envoy {
        Some(path) => {
            let text = match read(path) {
                Ok(t) => t,
                Err(code) => return code,
            };
            match envoy_clusters(&text) {
                Some(c) => Some(c),
                None => {
                    eprintln!("{path}: --envoy: not an Envoy config (no static_resources)");
                    return ExitCode::from(2);
                }
            }
        }
        None => None,
    };
    let files: Vec<String> = match (files.is_empty(), envoy) {
        (true, Some(path)) => vec![path.to_string()],
        _ => files.to_vec(),
    };
    each_policy(&files, |label, text, found_in| {
        let clusters = against.as_ref().or(found_in);
        let checked = laneguard_core::parse(text).and_then(|p| {
            clusters
                .map_or(Ok(()), |c| check_clusters(&p, c))
                .map(|()| p)
        });
        match checked {
            Ok(p) => {
                let clusters = match clusters {
                    Some(c) if c.dynamic => ", clusters from CDS not checked",
                    Some(_) => ", clusters checked",
                    None => "",
                };
                println!(
                    "{label}: ok ({} classes, {} principals, {} tenant overrides{clusters})",
                    p.classes.len(),
                    p.principals.len(),
                    p.tenant_plans.len()
                );
                true
            }
            Err(e) => {
                eprintln!("{label}: invalid policy: {e}");
                false
            }
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files, envoy } => check(&files, envoy.as_deref()),
        Command::Map {
            file,
            format,
            listener,
        } => {
            let text = match read(&file) {
                Ok(t) => t,
                Err(code) => return code,
            };
            let found = match one_policy(&text, listener.as_deref()) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("{file}: {e}");
                    return ExitCode::from(1);
                }
            };
            let policy = match laneguard_core::parse(&found.text) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{}: invalid policy: {e}", label(&file, &found));
                    return ExitCode::from(1);
                }
            };
            let m = laneguard_core::map::map(&policy);
            let out = match format {
                MapFormat::Markdown => report::map_markdown(&m),
                MapFormat::Svg => report::map_svg(&m),
                MapFormat::Json => match serde_json::to_string_pretty(&m) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("laneguard-policy: {e}");
                        return ExitCode::from(2);
                    }
                },
            };
            println!("{out}");
            ExitCode::SUCCESS
        }
        Command::Lint {
            files,
            strict,
            format,
        } => {
            let mut json = Vec::new();
            let status = each_policy(&files, |label, text, _| {
                let parsed = laneguard_core::parse_raw(text)
                    .and_then(|raw| laneguard_core::parse(text).map(|p| (raw, p)));
                let (raw, policy) = match parsed {
                    Ok(x) => x,
                    Err(e) => {
                        eprintln!("{label}: invalid policy: {e}");
                        return false;
                    }
                };
                let warnings = laneguard_core::lint::lint(&raw, &policy);
                let ok = !strict || warnings.is_empty();
                match format {
                    LintFormat::Text => print!("{}", report::lint_text(label, &warnings)),
                    LintFormat::Json => json.push(serde_json::json!({
                        "file": label,
                        "warnings": warnings,
                    })),
                }
                ok
            });
            if matches!(format, LintFormat::Json) {
                println!("{}", serde_json::Value::Array(json));
            }
            status
        }
    }
}
