//! `laneguard-replay`: what would this policy have done to this traffic?
//!
//! ```text
//! laneguard-replay --policy FILE --trace TRACE [--compare OTHER] [--listener NAME]
//!                  [--format text|json] [--html OUT] [--strict]
//!                  [--watch CLASS]... [--step-s N] [--reorder-s N]
//! ```
//!
//! A thin shell over `laneguard_core::replay`: it finds the policy in FILE (a policy, or an
//! Envoy YAML that embeds one: `laneguard_core::policy::source`), reads TRACE (JSONL or the
//! demo's Envoy access log; `-` is stdin) line by line with `laneguard_core::replay::trace`,
//! feeds every record to one replay per policy in a single pass, and prints what the core
//! computed. Nothing here decides.
//!
//! A malformed line is named by its number on stderr, skipped and counted (with `--strict`
//! it is fatal: exit 1, no report). Unknown tenants, classes and principals are warnings in
//! the report. Exit status: 0 a report was written, 1 `--strict` and a malformed line,
//! 2 usage, I/O or an invalid policy.

mod render;

use clap::{Parser, ValueEnum};
use laneguard_core::policy::source::one_policy;
use laneguard_core::replay::trace::{Item, Reader};
use laneguard_core::replay::{Options, Replay, Report};
use laneguard_core::Policy;
use std::io::{BufRead, BufReader, Write};
use std::process::ExitCode;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Parser)]
#[command(
    name = "laneguard-replay",
    about = "Replay a recorded trace against a laneguard policy, offline (the core engine on a virtual clock)"
)]
struct Cli {
    /// The policy: a laneguard policy file, or an Envoy YAML that embeds one.
    #[arg(long)]
    policy: String,
    /// The trace: JSONL (one request a line) or Envoy's access log in the demo's format;
    /// `-` reads stdin.
    #[arg(long)]
    trace: String,
    /// A second policy, replayed against the same trace and shown side by side.
    #[arg(long)]
    compare: Option<String>,
    /// In an Envoy config with several laneguard filters: the listener's (both policies).
    #[arg(long)]
    listener: Option<String>,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Also write an HTML report with SVG plots (admitted vs limited per class over time).
    #[arg(long, value_name = "OUT")]
    html: Option<String>,
    /// A malformed trace line is fatal (exit 1) instead of skipped and counted.
    #[arg(long)]
    strict: bool,
    /// Report this class as a lane to watch (served %, refusal runs, overlap windows) even
    /// where a policy does not protect it. With --compare, the classes either policy
    /// protects are watched in both.
    #[arg(long, value_name = "CLASS")]
    watch: Vec<String>,
    /// The step of the plotted time series, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    step_s: u64,
    /// How far out of time order a record may arrive and still be replayed at its time
    /// (an access log is written when a request completes).
    #[arg(long, default_value_t = 60)]
    reorder_s: u64,
}

/// What went wrong, already said on stderr; the exit code.
struct Fail(u8);

fn err(msg: impl std::fmt::Display, code: u8) -> Fail {
    eprintln!("laneguard-replay: {msg}");
    Fail(code)
}

fn load_policy(path: &str, listener: Option<&str>) -> Result<Policy, Fail> {
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("{path}: {e}"), 2))?;
    let found = one_policy(&text, listener).map_err(|e| err(format!("{path}: {e}"), 2))?;
    laneguard_core::parse(&found.text).map_err(|e| err(format!("{path}: invalid policy: {e}"), 2))
}

fn protected_classes(p: &Policy) -> impl Iterator<Item = String> + '_ {
    p.classes
        .iter()
        .filter(|c| c.consequence.is_protected())
        .map(|c| c.name.clone())
}

/// How many malformed lines are named on stderr as they are read (all are counted).
const STDERR_LINES: u64 = 20;

fn run(cli: &Cli) -> Result<ExitCode, Fail> {
    let mut labels = vec![cli.policy.clone()];
    let mut policies = vec![load_policy(&cli.policy, cli.listener.as_deref())?];
    if let Some(other) = &cli.compare {
        policies.push(load_policy(other, cli.listener.as_deref())?);
        labels.push(other.clone());
    }
    let mut watch = cli.watch.clone();
    if policies.len() > 1 {
        for p in &policies {
            watch.extend(protected_classes(p));
        }
    }
    watch.sort();
    watch.dedup();
    let opts = Options {
        watch,
        reorder_ns: cli.reorder_s.saturating_mul(1_000_000_000),
        step_s: cli.step_s,
        evidence: false,
    };
    let input: Box<dyn BufRead> = if cli.trace == "-" {
        Box::new(BufReader::new(std::io::stdin().lock()))
    } else {
        let f =
            std::fs::File::open(&cli.trace).map_err(|e| err(format!("{}: {e}", cli.trace), 2))?;
        Box::new(BufReader::with_capacity(1 << 20, f))
    };
    let mut replays: Vec<Replay<'_>> = policies
        .iter()
        .zip(&labels)
        .map(|(p, l)| Replay::new(p, l, opts.clone()))
        .collect();
    let mut malformed = 0u64;
    for item in Reader::new(input) {
        match item {
            Item::Request(r) => {
                let (last, rest) = match replays.split_last_mut() {
                    Some(x) => x,
                    None => break,
                };
                for replay in rest {
                    replay.push(r.clone());
                }
                last.push(r);
            }
            Item::Bad(e) => {
                if e.kind == laneguard_core::replay::trace::LineErrorKind::Malformed {
                    if cli.strict {
                        return Err(err(
                            format!("{}: {e} (--strict: a malformed line is fatal)", cli.trace),
                            1,
                        ));
                    }
                    malformed += 1;
                    if malformed <= STDERR_LINES {
                        eprintln!("laneguard-replay: {}: {e} (skipped)", cli.trace);
                    }
                }
                for replay in &mut replays {
                    replay.bad_line(&e);
                }
            }
            Item::Io(e) => return Err(err(format!("{}: {e}", cli.trace), 2)),
        }
    }
    if malformed > STDERR_LINES {
        eprintln!(
            "laneguard-replay: {}: {malformed} malformed lines skipped in all ({} more than named above)",
            cli.trace,
            malformed - STDERR_LINES
        );
    }
    let reports: Vec<Report> = replays.into_iter().map(Replay::finish).collect();
    if let Some(out) = &cli.html {
        std::fs::write(out, render::html(&reports, &cli.trace))
            .map_err(|e| err(format!("{out}: {e}"), 2))?;
    }
    let text = match cli.format {
        Format::Json => {
            let v = if reports.len() == 1 {
                serde_json::to_string_pretty(&reports[0])
            } else {
                serde_json::to_string_pretty(&reports)
            };
            v.map_err(|e| err(e, 2))? + "\n"
        }
        Format::Text => render::text(&reports, &cli.trace),
    };
    let mut stdout = std::io::stdout().lock();
    // A reader that went away (`| head`) is not an error worth a message.
    let _ = stdout.write_all(text.as_bytes());
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run(&cli).unwrap_or_else(|Fail(code)| ExitCode::from(code))
}
