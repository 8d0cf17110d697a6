//! `laneguard-audit`: verify and query the service's hash-chained audit log
//! (`laneguard-service --audit-log FILE`).
//!
//! ```text
//! laneguard-audit verify FILE
//! laneguard-audit query FILE [--tenant T] [--bucket B] [--caller C] [--event E]
//!                            [--since TIME] [--until TIME]
//! ```
//!
//! `verify` checks every line's hash and link and prints the record count and the head hash
//! (exit 0), or the first line that breaks the chain (exit 1). `query` prints the matching
//! records, one JSON object per line, for `jq`. TIME is RFC 3339 UTC
//! (`2026-11-24T05:25:00Z`), a date (`2026-11-24`) or Unix seconds. Exit 2: usage or I/O.

use laneguard_service::audit::{parse_time, query, verify, Filter};
use std::fs::File;
use std::io::{BufReader, Write};
use std::process::ExitCode;

const USAGE: &str = "\
usage: laneguard-audit verify FILE
       laneguard-audit query FILE [--tenant T] [--bucket B] [--caller C] [--event E]
                                  [--since TIME] [--until TIME]

  --bucket   the bucket that tripped: a name (class:integration) or a kind (class)
  --caller   a principal, a user or a request id
  --event    limited, shadow_limited, degraded, near_miss or forged_class
  TIME       RFC 3339 UTC (2026-11-24T05:25:00Z), a date (2026-11-24) or Unix seconds;
             --since is inclusive, --until exclusive";

fn usage(msg: &str) -> ExitCode {
    eprintln!("laneguard-audit: {msg}\n\n{USAGE}");
    ExitCode::from(2)
}

fn open(path: &str) -> Result<BufReader<File>, ExitCode> {
    File::open(path).map(BufReader::new).map_err(|e| {
        eprintln!("laneguard-audit: {path}: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("verify") => {
            let [_, file] = args.as_slice() else {
                return usage("verify takes exactly one FILE");
            };
            let reader = match open(file) {
                Ok(r) => r,
                Err(code) => return code,
            };
            match verify(reader) {
                Ok(s) => {
                    println!("{file}: ok: {} records, head {}", s.records, s.head);
                    ExitCode::SUCCESS
                }
                Err(b) => {
                    println!("{file}: line {}: {}", b.line, b.reason);
                    ExitCode::from(1)
                }
            }
        }
        Some("query") => {
            let Some(file) = args.get(1) else {
                return usage("query needs a FILE");
            };
            let mut filter = Filter::default();
            let mut rest = args[2..].iter();
            while let Some(flag) = rest.next() {
                let (flag, value) = match flag.split_once('=') {
                    Some((f, v)) => (f.to_string(), Some(v.to_string())),
                    None => (flag.clone(), rest.next().cloned()),
                };
                let Some(value) = value else {
                    return usage(&format!("{flag} needs a value"));
                };
                let time = |v: &str| parse_time(v);
                match flag.as_str() {
                    "--tenant" => filter.tenant = Some(value),
                    "--bucket" => filter.bucket = Some(value),
                    "--caller" => filter.caller = Some(value),
                    "--event" => filter.event = Some(value),
                    "--since" | "--until" => {
                        let Some(t) = time(&value) else {
                            return usage(&format!("{flag}: `{value}` is not a time"));
                        };
                        if flag == "--since" {
                            filter.since_ns = Some(t);
                        } else {
                            filter.until_ns = Some(t);
                        }
                    }
                    _ => return usage(&format!("unknown option {flag}")),
                }
            }
            let reader = match open(file) {
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
        Some("-h" | "--help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => usage("expected `verify` or `query`"),
    }
}
