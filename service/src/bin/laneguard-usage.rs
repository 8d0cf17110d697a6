//! `laneguard-usage`: export the service's usage ledger for billing.
//!
//! ```text
//! laneguard-usage export --service http://HOST:PORT --since TIME --until TIME
//!                        [--format csv|jsonl] [--output FILE]
//! ```
//!
//! It asks the service (`GET /usage` on its `--metrics-addr` port) rather than reading a
//! store: the service flushes what it counted before it answers, and the same command works
//! over the memory store, Redis and Redis Cluster. A row is one tenant's class in one hour
//! (`docs/usage.md`); the export covers the whole hours from the one `--since` falls in to
//! the one before `--until` (rounded up). TIME is RFC 3339 (`2026-12-04T02:00:00Z`), a date
//! (`2026-12-04`) or Unix seconds. Exit 0; 2 on a usage error, an unreachable service or a
//! failed read.

use clap::{Parser, Subcommand, ValueEnum};
use laneguard_core::usage::{self, COLUMNS};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "laneguard-usage",
    about = "Export laneguard's usage ledger (per tenant, class and hour) for billing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Csv,
    Jsonl,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ledger's rows for the hours from --since to --until.
    Export {
        /// The service's HTTP endpoint: its --metrics-addr, as http://HOST:PORT.
        #[arg(long, value_parser = service_url)]
        service: String,
        /// The first hour: RFC 3339, a date, or Unix seconds (rounded down to its hour).
        #[arg(long, value_parser = time)]
        since: u64,
        /// The end, exclusive (rounded up to a whole hour).
        #[arg(long, value_parser = time)]
        until: u64,
        #[arg(long, value_enum, default_value = "csv")]
        format: Format,
        /// Write here instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Give up on the service after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout_s: u64,
    },
}

fn time(v: &str) -> Result<u64, String> {
    usage::parse_time(v)
}

fn service_url(v: &str) -> Result<String, String> {
    let v = v.trim_end_matches('/');
    match v.strip_prefix("http://") {
        Some(rest) if !rest.is_empty() && !rest.contains('/') => Ok(v.to_string()),
        _ => Err(format!(
            "`{v}` is not http://HOST:PORT (the service's --metrics-addr; https is not served)"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("laneguard-usage: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> Result<(), String> {
    let Command::Export {
        service,
        since,
        until,
        format,
        output,
        timeout_s,
    } = command;
    if until <= since {
        return Err(format!(
            "--until ({}) must be after --since ({})",
            usage::format_hour(until / 3600),
            usage::format_hour(since / 3600)
        ));
    }
    let url = format!("{service}/usage?since={since}&until={until}");
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(timeout_s.max(1))))
        .http_status_as_error(false)
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let mut resp = agent
        .get(&url)
        .call()
        .map_err(|e| format!("--service {service}: cannot reach the service: {e}"))?;
    let status = resp.status().as_u16();
    if status != 200 {
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        let hint = if status == 404 {
            " (is it a laneguard-service with --metrics-addr at this address?)"
        } else {
            ""
        };
        return Err(format!(
            "--service {service}: HTTP {status}{hint}: {}",
            body.trim()
        ));
    }
    let mut out: Box<dyn Write> = match &output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).map_err(|e| format!("--output {}: {e}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let write_err = |e: std::io::Error| format!("cannot write the export: {e}");
    if matches!(format, Format::Csv) {
        writeln!(out, "{}", COLUMNS.join(",")).map_err(write_err)?;
    }
    let reader = BufReader::new(resp.body_mut().as_reader());
    let mut rows = 0u64;
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| format!("reading the service's answer: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let (key, row) = usage::parse_json_line(&line)
            .map_err(|e| format!("the service's answer, line {}: {e}", n + 1))?;
        let text = match format {
            Format::Csv => usage::csv_line(&usage::export_values(&key, &row)),
            Format::Jsonl => usage::json_line(&key, &row),
        };
        writeln!(out, "{text}").map_err(write_err)?;
        rows += 1;
    }
    out.flush().map_err(write_err)?;
    eprintln!(
        "laneguard-usage: {rows} rows, {} to {}",
        usage::format_hour(since / 3600),
        usage::format_hour(until.div_ceil(3600))
    );
    Ok(())
}
