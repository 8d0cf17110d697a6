//! `laneguard-audit`: verify and query the service's hash-chained audit log
//! (`laneguard-service --audit-log FILE`), and write the rollout review card from it.
//!
//! ```text
//! laneguard-audit verify [--expect-head HASH] [--hmac-key-file KEY] FILE...
//! laneguard-audit query FILE [--tenant T] [--bucket B] [--caller C] [--event E]
//!                            [--since TIME] [--until TIME]
//! laneguard-audit card --policy FILE (--audit LOG | --trace TRACE)... [--stats SCRAPE] [--owner TEAM]
//!                      [--change NAME] [--goal GOAL] [--html | --json] [--strict]
//! ```
//!
//! `verify` checks every line's hash and link (one FILE that is the active log: with its
//! rotated files `FILE.<first seq>`; several FILEs: as one chain in that order) and
//! `--expect-head` fails unless that hash, published earlier, is some line's (a cut tail);
//! it prints the record count and the head hash
//! (exit 0), or the first line that breaks the chain (exit 1). `query` prints the matching
//! records, one JSON object per line, for `jq`. TIME is RFC 3339 UTC
//! (`2026-11-24T05:25:00Z`), a date (`2026-11-24`) or Unix seconds. `card` prints the
//! Rate-Limit Rollout Review Card computed by `laneguard_core::card` (exit 0; with `--strict`
//! exit 1 when it is not ready to enforce). Exit 2: usage or I/O.

use clap::{Args, Parser, Subcommand};
use laneguard_core::card::{self, Fields, Inputs, Thresholds};
use laneguard_core::policy::source::one_policy;
use laneguard_core::replay::trace::Reader;
use laneguard_core::replay::trace_evidence;
use laneguard_service::audit::{
    parse_time, query, read_evidence, segments, verify_files, Chain, Filter,
};
use laneguard_service::report;
use std::fs::File;
use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "laneguard-audit",
    about = "Verify and query laneguard's audit log; write the rollout review card"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn time(v: &str) -> Result<u64, String> {
    parse_time(v).ok_or_else(|| {
        format!("`{v}` is not a time (RFC 3339 UTC, a date like 2026-11-24, or Unix seconds)")
    })
}

#[derive(Subcommand)]
enum Command {
    /// Check every line's hash and link.
    Verify {
        /// The active log (verified with its rotated files FILE.<seq>), or several files
        /// verified as one chain in the order given.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A head hash published earlier (the service logs `audit head: seq=N hash=H`):
        /// fails if no line has it, i.e. lines were cut off the end.
        #[arg(long, value_parser = head_hash)]
        expect_head: Option<String>,
        /// The key the service chained with (`--audit-hmac-key-file`).
        #[arg(long)]
        hmac_key_file: Option<PathBuf>,
    },
    /// Print matching records, one JSON object per line.
    Query {
        file: String,
        #[arg(long)]
        tenant: Option<String>,
        /// The bucket that tripped: a name (class:integration) or a kind (class).
        #[arg(long)]
        bucket: Option<String>,
        /// A principal, a user or a request id.
        #[arg(long)]
        caller: Option<String>,
        /// limited, shadow_limited, degraded, near_miss or forged_class.
        #[arg(long)]
        event: Option<String>,
        /// Inclusive.
        #[arg(long, value_parser = time)]
        since: Option<u64>,
        /// Exclusive.
        #[arg(long, value_parser = time)]
        until: Option<u64>,
    },
    /// Write the Rate-Limit Rollout Review Card from the policy and the shadow evidence.
    Card(CardArgs),
}

#[derive(Args)]
struct CardArgs {
    /// The policy about to be enforced (a policy file, or an Envoy YAML that embeds one).
    #[arg(long)]
    policy: String,
    /// In an Envoy config with several laneguard filters: the listener's.
    #[arg(long)]
    listener: Option<String>,
    /// The audit records: the service's hash-chained log, bare records (JSONL), or an Envoy
    /// access log with an `audit=` field.
    #[arg(long, required_unless_present = "trace")]
    audit: Option<String>,
    /// A recorded trace (JSONL, or the demo's access log) replayed against the policy as a
    /// would-have-been-throttled phase: what it would have refused are records named
    /// `trace line N`, and its first and last request widen the covered period.
    #[arg(long)]
    trace: Option<String>,
    /// A Prometheus scrape of Envoy (`/stats/prometheus`): exact per-class counters.
    #[arg(long)]
    stats: Option<String>,
    #[arg(long)]
    owner: Option<String>,
    #[arg(long)]
    change: Option<String>,
    /// fairness, abuse control, platform protection or plan differentiation.
    #[arg(long)]
    goal: Option<String>,
    /// The shadow phase ran from this time (widens the covered period beyond the records).
    #[arg(long, value_parser = time)]
    observed_since: Option<u64>,
    /// ...until this time.
    #[arg(long, value_parser = time)]
    observed_until: Option<u64>,
    /// A protected class refused over a stretch this long misses its convergence threshold.
    #[arg(long, default_value_t = Thresholds::default().convergence_s)]
    convergence_s: u64,
    /// Near misses on protected lanes that are still acceptable.
    #[arg(long, default_value_t = Thresholds::default().max_near_misses)]
    max_near_misses: u64,
    /// How long the shadow evidence must cover to be a full business cycle.
    #[arg(long, default_value_t = Thresholds::default().business_cycle_s / 3_600)]
    business_cycle_h: u64,
    /// HTML instead of Markdown.
    #[arg(long, conflicts_with = "json")]
    html: bool,
    /// The card as one JSON object.
    #[arg(long)]
    json: bool,
    /// Exit 1 when the card is not ready to enforce.
    #[arg(long)]
    strict: bool,
}

fn open(path: &str) -> Result<BufReader<File>, ExitCode> {
    File::open(path).map(BufReader::new).map_err(|e| {
        eprintln!("laneguard-audit: {path}: {e}");
        ExitCode::from(2)
    })
}

fn read(path: &str) -> Result<String, ExitCode> {
    std::fs::read_to_string(path).map_err(|e| {
        eprintln!("laneguard-audit: {path}: {e}");
        ExitCode::from(2)
    })
}

fn run_card(a: CardArgs) -> Result<ExitCode, ExitCode> {
    let policy_text = read(&a.policy)?;
    let found = one_policy(&policy_text, a.listener.as_deref()).map_err(|e| {
        eprintln!("laneguard-audit: {}: {e}", a.policy);
        ExitCode::from(2)
    })?;
    let policy = laneguard_core::parse(&found.text).map_err(|e| {
        eprintln!("laneguard-audit: {}: invalid policy: {e}", a.policy);
        ExitCode::from(2)
    })?;
    let mut evidence = match &a.audit {
        Some(path) => read_evidence(&read(path)?),
        None => Default::default(),
    };
    let mut notes: Vec<String> = evidence
        .chain
        .iter()
        .map(|c| format!("hash chain verified: {} lines, head {}", c.records, c.head))
        .collect();
    let stats = match &a.stats {
        Some(path) => Some(card::parse_stats(&read(path)?, &policy)),
        None => None,
    };
    let mut observed = match (a.observed_since, a.observed_until) {
        (Some(s), Some(u)) => Some((s, u)),
        (Some(s), None) => Some((s, s)),
        (None, Some(u)) => Some((u, u)),
        (None, None) => None,
    };
    if let Some(path) = &a.trace {
        let reader = Reader::new(open(path)?);
        let t = trace_evidence(&policy, path, reader).map_err(|e| {
            eprintln!("laneguard-audit: {path}: {e}");
            ExitCode::from(2)
        })?;
        evidence.records.extend(t.records);
        evidence.problems.extend(t.problems);
        notes.push(t.note);
        observed = match (observed, t.observed) {
            (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
            (x, y) => x.or(y),
        };
    }
    let inputs = Inputs {
        policy: &policy,
        records: &evidence.records,
        stats: stats.as_ref(),
        integrity: evidence.problems,
        notes,
        observed,
        fields: Fields {
            change: a.change,
            owner: a.owner,
            goal: a.goal,
        },
        thresholds: Thresholds {
            convergence_s: a.convergence_s,
            max_near_misses: a.max_near_misses,
            business_cycle_s: a.business_cycle_h.saturating_mul(3_600),
        },
    };
    let c = card::card(&inputs);
    let out = if a.json {
        serde_json::to_string_pretty(&c).map_err(|e| {
            eprintln!("laneguard-audit: {e}");
            ExitCode::from(2)
        })?
    } else if a.html {
        report::card_html(&c)
    } else {
        report::card_markdown(&c)
    };
    print!("{out}");
    Ok(if a.strict && !c.ready_to_enforce {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn head_hash(v: &str) -> Result<String, String> {
    if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(v.to_ascii_lowercase())
    } else {
        Err(format!("`{v}` is not a 64-digit hex hash"))
    }
}

fn verify_command(
    mut files: Vec<PathBuf>,
    expect: Option<String>,
    key: Option<PathBuf>,
) -> ExitCode {
    let chain = match key {
        Some(k) => match Chain::from_key_file(&k) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("laneguard-audit: --hmac-key-file: {e}");
                return ExitCode::from(2);
            }
        },
        None => Chain::plain(),
    };
    let label = match files.as_slice() {
        [one] => one.display().to_string(),
        [first, ..] => format!("{} (+{} files)", first.display(), files.len() - 1),
        [] => return ExitCode::from(2),
    };
    if let [one] = files.as_slice() {
        if !one.exists() {
            eprintln!("laneguard-audit: {}: no such file", one.display());
            return ExitCode::from(2);
        }
        match segments(one) {
            Ok(set) if !set.is_empty() => files = set,
            Ok(_) => {}
            Err(e) => {
                eprintln!("laneguard-audit: {}: {e}", one.display());
                return ExitCode::from(2);
            }
        }
    }
    match verify_files(&files, chain, expect) {
        Ok(s) => {
            let mut msg = format!("{label}: ok: {} records, head {}", s.records, s.head);
            if files.len() > 1 {
                msg.push_str(&format!(" ({} files)", files.len()));
            }
            if let Some((seq, prev)) = &s.starts_after {
                msg.push_str(&format!(
                    "; the chain starts after seq {seq} (prev {prev}): the files before it are not here"
                ));
            }
            if let Some(at) = s.expected_at {
                msg.push_str(&format!(
                    "; the expected head is seq {at}, {} records after it",
                    s.last_seq - at
                ));
            }
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(b) => {
            if b.file.is_some() {
                println!("{b}");
            } else {
                println!("{label}: {b}");
            }
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Verify {
            files,
            expect_head,
            hmac_key_file,
        } => verify_command(files, expect_head, hmac_key_file),
        Command::Query {
            file,
            tenant,
            bucket,
            caller,
            event,
            since,
            until,
        } => {
            let filter = Filter {
                tenant,
                bucket,
                caller,
                event,
                since_ns: since,
                until_ns: until,
            };
            let reader = match open(&file) {
                Ok(r) => r,
                Err(code) => return code,
            };
            let mut out = std::io::stdout().lock();
            for record in query(reader, &filter) {
                if writeln!(out, "{record}").is_err() {
                    // The reader went away (`| head`): stop quietly.
                    break;
                }
            }
            ExitCode::SUCCESS
        }
        Command::Card(a) => run_card(a).unwrap_or_else(|code| code),
    }
}
