//! `laneguard-policy`: validate, map and lint laneguard policies without starting Envoy.
//!
//! ```text
//! laneguard-policy check FILE...
//! laneguard-policy map FILE [--format markdown|json|svg] [--listener NAME]
//! laneguard-policy lint FILE... [--strict] [--format text|json]
//! ```
//!
//! A FILE is either a policy (YAML or JSON) or an Envoy config: then every
//! `envoy.filters.http.wasm` filter whose plugin `root_id` is `laneguard` has its
//! `configuration.value` read. `check` uses the same `laneguard_core::parse` as the filter's
//! `on_configure`, so a policy that passes here loads in Envoy, and an error names the same
//! path. `map` prints the competition map (`laneguard_core::map`), `lint` its rollout risks
//! (`laneguard_core::lint`). Exit status: 0 fine, 1 an invalid policy (or, with
//! `lint --strict`, a warning), 2 a usage or I/O error.

use clap::{Parser, Subcommand, ValueEnum};
use laneguard_core::policy::source::{one_policy, policies, Found};
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
    /// Validate policies (exit 1 if one is invalid).
    Check {
        /// A laneguard policy, or an Envoy YAML that embeds one.
        #[arg(required = true)]
        files: Vec<String>,
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

/// Run `each` on every policy in `files` (a file may embed several); `each` returns whether
/// the policy passed. Exit 2 on an I/O error, 1 if a policy failed or a file had none.
fn each_policy(files: &[String], mut each: impl FnMut(&str, &str) -> bool) -> ExitCode {
    let mut status = ExitCode::SUCCESS;
    for file in files {
        let text = match read(file) {
            Ok(t) => t,
            Err(code) => return code,
        };
        let found = policies(&text);
        if found.is_empty() {
            eprintln!("{file}: an Envoy config without a laneguard wasm filter");
            status = ExitCode::from(1);
        }
        for f in found {
            if !each(&label(file, &f), &f.text) {
                status = ExitCode::from(1);
            }
        }
    }
    status
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files } => {
            each_policy(&files, |label, text| match laneguard_core::parse(text) {
                Ok(p) => {
                    println!(
                        "{label}: ok ({} classes, {} principals, {} tenant overrides)",
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
            })
        }
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
            let status = each_policy(&files, |label, text| {
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
