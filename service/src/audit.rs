//! The append-only, hash-chained audit log.
//!
//! The filter ships its audit records (`laneguard_core::audit::Record`, one JSON object
//! each) with `laneguard.audit.v1.AuditLog/Append`; the service appends each as one line:
//!
//! ```text
//! {"seq":7,"prev":"<hash of line 6>","hash":"<hash>","record":{...canonical JSON...}}
//! ```
//!
//! `hash = hex(sha256(prev || canonical(record)))`, where `canonical` is the record's JSON
//! with every object's keys sorted and no whitespace, and `prev` of the first line is 64
//! zeros. Editing, removing, reordering or inserting a line breaks the chain at that line,
//! which [`verify`] reports. (Cutting lines off the end leaves a valid shorter chain: keep
//! the head hash that `laneguard-audit verify` prints somewhere else to detect that.)
//!
//! [`query`] filters records by tenant, bucket, caller and time range; the
//! `laneguard-audit` binary puts both on the command line.

use laneguard_protos::laneguard::audit::v1::audit_log_server::AuditLog as AuditLogRpc;
use laneguard_protos::laneguard::audit::v1::{AppendRequest, AppendResponse};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Records larger than this are refused (a record is a few hundred bytes).
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {reason}")]
    Broken {
        path: PathBuf,
        line: u64,
        reason: String,
    },
}

/// The canonical JSON of a value: object keys sorted (by their UTF-8 bytes), no whitespace.
pub fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                if let Some(child) = m.get(*k) {
                    write_canonical(child, out);
                }
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, child) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(child, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `hex(sha256(prev || canonical))`.
pub fn chain_hash(prev: &str, canonical: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(canonical.as_bytes());
    let digest = h.finalize();
    let mut out = String::with_capacity(64);
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// One line of the log, for a record already in canonical form.
pub fn line(seq: u64, prev: &str, hash: &str, canonical_record: &str) -> String {
    format!(
        "{{\"seq\":{seq},\"prev\":\"{prev}\",\"hash\":\"{hash}\",\"record\":{canonical_record}}}"
    )
}

/// What a verified log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    /// The hash of the last line (GENESIS for an empty log).
    pub head: String,
}

/// Why a line breaks the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// 1-based line number.
    pub line: u64,
    pub reason: String,
}

/// A parsed line.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub prev: String,
    pub hash: String,
    pub record: Value,
}

fn parse_line(text: &str) -> Result<Entry, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let seq = v
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or("no numeric `seq`")?;
    let prev = v
        .get("prev")
        .and_then(Value::as_str)
        .ok_or("no `prev`")?
        .to_string();
    let hash = v
        .get("hash")
        .and_then(Value::as_str)
        .ok_or("no `hash`")?
        .to_string();
    let record = v.get("record").cloned().ok_or("no `record`")?;
    Ok(Entry {
        seq,
        prev,
        hash,
        record,
    })
}

/// Check every line of a log: sequence numbers count up from 1, each `prev` is the hash of
/// the line before, and each `hash` is the hash of `prev` and the record.
pub fn verify(reader: impl BufRead) -> Result<Summary, Break> {
    let mut prev = GENESIS.to_string();
    let mut n: u64 = 0;
    for (i, text) in reader.lines().enumerate() {
        let line_no = i as u64 + 1;
        let text = text.map_err(|e| Break {
            line: line_no,
            reason: format!("cannot read: {e}"),
        })?;
        let e = parse_line(&text).map_err(|reason| Break {
            line: line_no,
            reason,
        })?;
        if e.seq != n + 1 {
            return Err(Break {
                line: line_no,
                reason: format!(
                    "seq is {}, expected {} (a line was removed or moved)",
                    e.seq,
                    n + 1
                ),
            });
        }
        if e.prev != prev {
            return Err(Break {
                line: line_no,
                reason: "prev is not the hash of the line before (a line before it was removed, inserted or moved)".into(),
            });
        }
        let want = chain_hash(&prev, &canonical(&e.record));
        if e.hash != want {
            return Err(Break {
                line: line_no,
                reason: format!(
                    "the record does not match its hash (the line was edited): hash {} but the content hashes to {want}",
                    e.hash
                ),
            });
        }
        prev = e.hash;
        n += 1;
    }
    Ok(Summary {
        records: n,
        head: prev,
    })
}

/// Which records to show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub tenant: Option<String>,
    /// The bucket that tripped: a full name (`class:integration`) or a kind (`class`).
    pub bucket: Option<String>,
    /// The principal, the user or the request id.
    pub caller: Option<String>,
    /// An event (`limited`, `shadow_limited`, ...).
    pub event: Option<String>,
    /// Nanoseconds since the epoch, inclusive.
    pub since_ns: Option<u64>,
    /// Nanoseconds since the epoch, exclusive.
    pub until_ns: Option<u64>,
}

impl Filter {
    pub fn matches(&self, r: &Value) -> bool {
        let s = |k: &str| r.get(k).and_then(Value::as_str);
        if let Some(t) = &self.tenant {
            if s("tenant") != Some(t.as_str()) {
                return false;
            }
        }
        if let Some(b) = &self.bucket {
            let tripped = s("bucket").unwrap_or("");
            let kind = tripped.split(':').next().unwrap_or("");
            if tripped != b && kind != b {
                return false;
            }
        }
        if let Some(c) = &self.caller {
            let hit = ["principal", "user", "request_id"]
                .iter()
                .any(|k| s(k) == Some(c.as_str()));
            if !hit {
                return false;
            }
        }
        if let Some(e) = &self.event {
            let hit = r
                .get("events")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(e.as_str())));
            if !hit {
                return false;
            }
        }
        if self.since_ns.is_some() || self.until_ns.is_some() {
            let Some(t) = s("time").and_then(parse_time) else {
                return false;
            };
            if self.since_ns.is_some_and(|since| t < since) {
                return false;
            }
            if self.until_ns.is_some_and(|until| t >= until) {
                return false;
            }
        }
        true
    }
}

/// The records of a log that match, in order. Lines that do not parse are skipped (run
/// `verify` to find them).
pub fn query<'a, R: BufRead + 'a>(
    reader: R,
    filter: &'a Filter,
) -> impl Iterator<Item = Value> + 'a {
    reader
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| parse_line(&l).ok())
        .map(|e| e.record)
        .filter(move |r| filter.matches(r))
}

pub use laneguard_core::audit::parse_time;

/// The audit records of a file, for `laneguard-audit card`, and what was wrong with it.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    pub records: Vec<laneguard_core::card::EvidenceRecord>,
    /// Lines that are not audit records (`line N: why`), and a broken hash chain.
    pub problems: Vec<String>,
    /// The verified chain, when the file is the service's hash-chained log.
    pub chain: Option<Summary>,
}

/// Read audit records from the service's hash-chained log (ids `#seq`, and the chain is
/// verified), from bare records one per line, or from Envoy access log lines whose
/// `audit=` field holds one (ids `line N`). Lines without a record (`audit=-`) are skipped;
/// anything else unreadable is named in `problems`.
pub fn read_evidence(text: &str) -> Evidence {
    use laneguard_core::card::EvidenceRecord;
    let mut ev = Evidence::default();
    let mut chained = false;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Ok(e) = parse_line(line) {
            chained = true;
            match EvidenceRecord::from_json(format!("#{}", e.seq), &e.record) {
                Some(r) => ev.records.push(r),
                None => ev.problems.push(format!("line {n}: not an audit record")),
            }
            continue;
        }
        let json = if line.starts_with('{') {
            Some(line)
        } else if let Some((_, a)) = line.split_once(" audit=") {
            let a = a.trim();
            if !a.starts_with('{') {
                continue; // an access log line of a request without a record
            }
            Some(a)
        } else {
            None
        };
        let parsed = json
            .and_then(|j| serde_json::from_str::<Value>(j).ok())
            .and_then(|v| EvidenceRecord::from_json(format!("line {n}"), &v));
        match parsed {
            Some(r) => ev.records.push(r),
            None => ev.problems.push(format!("line {n}: not an audit record")),
        }
    }
    if chained {
        match verify(std::io::Cursor::new(text.as_bytes())) {
            Ok(s) => ev.chain = Some(s),
            Err(b) => ev.problems.push(format!(
                "the hash chain breaks at line {}: {}",
                b.line, b.reason
            )),
        }
    }
    ev
}

struct Tail {
    file: File,
    prev: String,
    seq: u64,
}

/// The log a service appends to. Appends are serialised by a lock, and each batch is
/// written and synced to disk before the call is answered.
pub struct AuditLog {
    path: PathBuf,
    tail: Mutex<Tail>,
}

impl AuditLog {
    /// Open (or create) a log. An existing log is verified first: a service does not extend
    /// a chain that is already broken (move the file aside, it is evidence, and restart).
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        };
        let summary = match File::open(path) {
            Ok(f) => verify(BufReader::new(f)).map_err(|b| AuditError::Broken {
                path: path.to_path_buf(),
                line: b.line,
                reason: b.reason,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Summary {
                records: 0,
                head: GENESIS.to_string(),
            },
            Err(e) => return Err(io(e)),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            tail: Mutex::new(Tail {
                file,
                prev: summary.head,
                seq: summary.records,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append records (each one JSON object). Returns (appended, rejected): anything that
    /// is not a JSON object, or is too large, is rejected and not written.
    pub fn append(&self, records: &[String]) -> Result<(u32, u32), AuditError> {
        let mut tail = self
            .tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut buf = String::new();
        let (mut prev, mut seq) = (tail.prev.clone(), tail.seq);
        let (mut appended, mut rejected) = (0u32, 0u32);
        for r in records {
            let parsed = if r.len() <= MAX_RECORD_BYTES {
                serde_json::from_str::<Value>(r)
                    .ok()
                    .filter(Value::is_object)
            } else {
                None
            };
            let Some(v) = parsed else {
                rejected += 1;
                continue;
            };
            let c = canonical(&v);
            let hash = chain_hash(&prev, &c);
            seq += 1;
            buf.push_str(&line(seq, &prev, &hash, &c));
            buf.push('\n');
            prev = hash;
            appended += 1;
        }
        if appended > 0 {
            let io = |source| AuditError::Io {
                path: self.path.clone(),
                source,
            };
            tail.file.write_all(buf.as_bytes()).map_err(io)?;
            tail.file.sync_data().map_err(io)?;
            tail.prev = prev;
            tail.seq = seq;
        }
        Ok((appended, rejected))
    }
}

/// The gRPC face of an [`AuditLog`].
#[derive(Clone)]
pub struct AuditService {
    log: Arc<AuditLog>,
}

impl AuditService {
    pub fn new(log: Arc<AuditLog>) -> AuditService {
        AuditService { log }
    }

    /// The tonic service to add to a server.
    pub fn server(
        self,
    ) -> laneguard_protos::laneguard::audit::v1::audit_log_server::AuditLogServer<AuditService>
    {
        laneguard_protos::laneguard::audit::v1::audit_log_server::AuditLogServer::new(self)
    }
}

#[tonic::async_trait]
impl AuditLogRpc for AuditService {
    async fn append(
        &self,
        request: tonic::Request<AppendRequest>,
    ) -> Result<tonic::Response<AppendResponse>, tonic::Status> {
        let records = request.into_inner().records;
        let log = Arc::clone(&self.log);
        let result = tokio::task::spawn_blocking(move || log.append(&records))
            .await
            .map_err(|e| tonic::Status::internal(format!("audit append task failed: {e}")))?;
        match result {
            Ok((appended, rejected)) => {
                if rejected > 0 {
                    log::warn!("audit: refused {rejected} records that are not JSON objects");
                }
                Ok(tonic::Response::new(AppendResponse { appended, rejected }))
            }
            Err(e) => {
                log::error!("audit: {e}");
                Err(tonic::Status::unavailable(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("laneguard-audit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        dir
    }

    fn records() -> Vec<String> {
        (0..5)
            .map(|i| {
                format!(
                    r#"{{"time":"2026-11-24T05:0{i}:00.000Z","tenant":"{}","principal":"erp","bucket":"class:integration","events":["limited"],"z":1,"a":[{{"b":2,"a":1}}]}}"#,
                    if i % 2 == 0 { "northwind" } else { "acme" }
                )
            })
            .collect()
    }

    #[test]
    fn canonical_sorts_keys_at_every_level() {
        let v: Value =
            serde_json::from_str(r#"{"b":1,"a":{"d":[{"y":1,"x":2}],"c":"é"}}"#).unwrap();
        assert_eq!(
            canonical(&v),
            r#"{"a":{"c":"é","d":[{"x":2,"y":1}]},"b":1}"#
        );
    }

    #[test]
    fn appended_logs_verify_and_survive_a_restart() {
        let path = temp("restart");
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.append(&records()[..3]).unwrap(), (3, 0));
        drop(log);
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.append(&records()[3..]).unwrap(), (2, 0));
        assert_eq!(
            log.append(&["not json".into(), "[1]".into()]).unwrap(),
            (0, 2)
        );
        let s = verify(BufReader::new(File::open(&path).unwrap())).unwrap();
        assert_eq!(s.records, 5);
        assert_ne!(s.head, GENESIS);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn one_edited_line_is_detected() {
        let path = temp("edit");
        let log = AuditLog::open(&path).unwrap();
        log.append(&records()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        // Change one character of line 3's record: acme -> acmf.
        let lines: Vec<&str> = text.lines().collect();
        let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        edited[2] = edited[2].replacen("northwind", "northwinD", 1);
        assert_ne!(edited[2], lines[2]);
        let b = verify(Cursor::new(edited.join("\n"))).unwrap_err();
        assert_eq!(b.line, 3, "{b:?}");
        // A removed line is detected at the line after it.
        let mut removed: Vec<&str> = lines.clone();
        removed.remove(1);
        assert_eq!(verify(Cursor::new(removed.join("\n"))).unwrap_err().line, 2);
        // Swapped lines too.
        let mut swapped = lines.clone();
        swapped.swap(0, 1);
        assert_eq!(verify(Cursor::new(swapped.join("\n"))).unwrap_err().line, 1);
        // A broken log is not extended.
        std::fs::write(&path, edited.join("\n") + "\n").unwrap();
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Broken { line: 3, .. })
        ));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn queries_filter_by_tenant_bucket_caller_and_time() {
        let path = temp("query");
        let log = AuditLog::open(&path).unwrap();
        log.append(&records()).unwrap();
        let count = |f: Filter| query(BufReader::new(File::open(&path).unwrap()), &f).count();
        assert_eq!(count(Filter::default()), 5);
        assert_eq!(
            count(Filter {
                tenant: Some("acme".into()),
                ..Default::default()
            }),
            2
        );
        assert_eq!(
            count(Filter {
                bucket: Some("class".into()),
                ..Default::default()
            }),
            5
        );
        assert_eq!(
            count(Filter {
                bucket: Some("class:integration".into()),
                ..Default::default()
            }),
            5
        );
        assert_eq!(
            count(Filter {
                bucket: Some("shared".into()),
                ..Default::default()
            }),
            0
        );
        assert_eq!(
            count(Filter {
                caller: Some("erp".into()),
                ..Default::default()
            }),
            5
        );
        assert_eq!(
            count(Filter {
                event: Some("limited".into()),
                ..Default::default()
            }),
            5
        );
        let f = Filter {
            since_ns: parse_time("2026-11-24T05:01:00Z"),
            until_ns: parse_time("2026-11-24T05:03:00Z"),
            ..Default::default()
        };
        assert_eq!(count(f), 2);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn times_parse() {
        assert_eq!(parse_time("0"), Some(0));
        assert_eq!(parse_time("1970-01-02"), Some(86_400_000_000_000));
        assert_eq!(
            parse_time("2000-02-29T00:00:00.123Z"),
            Some(951_782_400_123_000_000)
        );
        assert_eq!(
            parse_time("2026-11-18T11:06:40Z"),
            Some(1_795_000_000_000_000_000)
        );
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(parse_time("2026-13-01"), None);
    }
}
