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
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// How each line's hash is computed: plain SHA-256, or HMAC-SHA-256 under a key
/// (`--audit-hmac-key-file`). Without a key, anyone who can write the file can rewrite a
/// record *and every hash after it*, and the chain verifies again; with a key they also need
/// the key.
#[derive(Clone, Default)]
pub struct Chain {
    key: Option<Vec<u8>>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Chain")
            .field("keyed", &self.key.is_some())
            .finish()
    }
}

/// The shortest HMAC key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 16;

impl Chain {
    /// Unkeyed SHA-256.
    pub fn plain() -> Chain {
        Chain { key: None }
    }

    /// HMAC-SHA-256 under `key` (at least [`MIN_KEY_BYTES`] bytes).
    pub fn keyed(key: Vec<u8>) -> Result<Chain, String> {
        if key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the HMAC key is {} bytes; use at least {MIN_KEY_BYTES} (for example `head -c 32 /dev/urandom > key`)",
                key.len()
            ));
        }
        Ok(Chain { key: Some(key) })
    }

    /// Read a key file: its bytes, without trailing whitespace.
    pub fn from_key_file(path: &Path) -> Result<Chain, String> {
        let mut key = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        while key.last().is_some_and(u8::is_ascii_whitespace) {
            key.pop();
        }
        Chain::keyed(key).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn is_keyed(&self) -> bool {
        self.key.is_some()
    }

    /// `hex(sha256(prev || canonical))`, or `hex(hmac_sha256(key, prev || canonical))`.
    pub fn hash(&self, prev: &str, canonical: &str) -> String {
        match &self.key {
            None => chain_hash(prev, canonical),
            Some(key) => {
                use hmac::{Hmac, Mac};
                // new_from_slice accepts keys of any length for HMAC.
                match Hmac::<Sha256>::new_from_slice(key) {
                    Ok(mut mac) => {
                        mac.update(prev.as_bytes());
                        mac.update(canonical.as_bytes());
                        hex(&mac.finalize().into_bytes())
                    }
                    Err(_) => chain_hash(prev, canonical),
                }
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// `hex(sha256(prev || canonical))`.
pub fn chain_hash(prev: &str, canonical: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(canonical.as_bytes());
    hex(&h.finalize())
}

/// One line of the log, for a record already in canonical form.
pub fn line(seq: u64, prev: &str, hash: &str, canonical_record: &str) -> String {
    format!(
        "{{\"seq\":{seq},\"prev\":\"{prev}\",\"hash\":\"{hash}\",\"record\":{canonical_record}}}"
    )
}

/// What a verified log (one file, or a rotated set) holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    /// The hash of the last line (`prev` of the first line for an empty log).
    pub head: String,
    /// The `seq` of the last line (0 for an empty log from genesis).
    pub last_seq: u64,
    /// `Some((seq, prev))` when the first line is not the chain's first (`seq` 1 after
    /// GENESIS): the files before it were rotated away, or were not given.
    pub starts_after: Option<(u64, String)>,
    /// The seq of the line whose hash is the `--expect-head` hash, when it was found.
    pub expected_at: Option<u64>,
}

/// Why a line breaks the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The file, when verifying several.
    pub file: Option<PathBuf>,
    /// 1-based line number in that file (0: the file as a whole).
    pub line: u64,
    pub reason: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if self.line > 0 {
            write!(f, "line {}: ", self.line)?;
        }
        f.write_str(&self.reason)
    }
}

/// A parsed line.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub prev: String,
    pub hash: String,
    pub record: Value,
}

pub(crate) fn parse_line(text: &str) -> Result<Entry, String> {
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

/// Checks lines one at a time, across files: sequence numbers count up by one, each `prev`
/// is the hash of the line before, and each `hash` is the hash of `prev` and the record.
#[derive(Debug, Clone)]
pub struct Verifier {
    chain: Chain,
    /// (seq, hash) of the last line checked; `None` before the first line when the start
    /// is open (the first line may continue a chain from files not given).
    last: Option<(u64, String)>,
    starts_after: Option<(u64, String)>,
    expect: Option<String>,
    expected_at: Option<u64>,
    records: u64,
}

impl Verifier {
    /// A chain that starts at GENESIS, or whose first line may continue an earlier file
    /// that is not given (`open_start`; a first line with `seq` 1 must still follow
    /// GENESIS).
    pub fn new(chain: Chain, open_start: bool) -> Verifier {
        Verifier {
            chain,
            last: (!open_start).then(|| (0, GENESIS.to_string())),
            starts_after: None,
            expect: None,
            expected_at: None,
            records: 0,
        }
    }

    /// A chain that continues after the line `(seq, hash)` (an audit log resuming from its
    /// checkpoint).
    pub fn after(chain: Chain, seq: u64, hash: &str) -> Verifier {
        Verifier {
            last: Some((seq, hash.to_string())),
            ..Verifier::new(chain, false)
        }
    }

    /// Look for this hash among the lines (a head published earlier).
    pub fn expect_head(mut self, hash: Option<String>) -> Verifier {
        if let (Some(h), Some((_, last))) = (&hash, &self.last) {
            if h == last {
                self.expected_at = self.last.as_ref().map(|l| l.0);
            }
        }
        self.expect = hash;
        self
    }

    /// Check one line (without its newline).
    pub fn push(&mut self, text: &str) -> Result<(), String> {
        let e = parse_line(text)?;
        let (want_seq, prev) = match &self.last {
            Some((seq, hash)) => (seq + 1, hash.clone()),
            None if e.seq == 1 => (1, GENESIS.to_string()),
            None => {
                self.starts_after = Some((e.seq - 1, e.prev.clone()));
                (e.seq, e.prev.clone())
            }
        };
        if e.seq != want_seq {
            return Err(format!(
                "seq is {}, expected {want_seq} (a line was removed or moved)",
                e.seq
            ));
        }
        if e.prev != prev {
            return Err(
                "prev is not the hash of the line before (a line before it was removed, inserted or moved)".into(),
            );
        }
        let want = self.chain.hash(&prev, &canonical(&e.record));
        if e.hash != want {
            let hint = if e.seq == 1 || self.records == 0 {
                if self.chain.is_keyed() {
                    " (or the log was not written with this HMAC key)"
                } else {
                    " (or the log was written with an HMAC key: pass --hmac-key-file)"
                }
            } else {
                ""
            };
            return Err(format!(
                "the record does not match its hash (the line was edited){hint}: hash {} but the content hashes to {want}",
                e.hash
            ));
        }
        if self.expect.as_deref() == Some(e.hash.as_str()) {
            self.expected_at = Some(e.seq);
        }
        self.last = Some((e.seq, e.hash));
        self.records += 1;
        Ok(())
    }

    /// Check every line of one reader; `file` names it in a break.
    pub fn push_all(&mut self, reader: impl BufRead, file: Option<&Path>) -> Result<(), Break> {
        for (i, text) in reader.lines().enumerate() {
            let line = i as u64 + 1;
            let fail = |reason| Break {
                file: file.map(Path::to_path_buf),
                line,
                reason,
            };
            let text = text.map_err(|e| fail(format!("cannot read: {e}")))?;
            self.push(&text).map_err(fail)?;
        }
        Ok(())
    }

    /// The summary; with an `--expect-head` hash that was never seen, the break that says
    /// the tail was cut.
    pub fn finish(self) -> Result<Summary, Break> {
        let (last_seq, head) = self.last.unwrap_or((0, GENESIS.to_string()));
        if let (Some(want), None) = (&self.expect, self.expected_at) {
            return Err(Break {
                file: None,
                line: 0,
                reason: format!(
                    "the expected head {want} is not the hash of any line: lines were cut off the end of the log, or rewritten (the log ends at seq {last_seq}, head {head})"
                ),
            });
        }
        Ok(Summary {
            records: self.records,
            head,
            last_seq,
            starts_after: self.starts_after,
            expected_at: self.expected_at,
        })
    }
}

/// Check every line of one log from GENESIS, unkeyed (see [`Verifier`] for the rest).
pub fn verify(reader: impl BufRead) -> Result<Summary, Break> {
    let mut v = Verifier::new(Chain::plain(), false);
    v.push_all(reader, None)?;
    v.finish()
}

/// The files of a log, oldest first: the rotated segments `FILE.<first seq>` (see
/// `--audit-rotate-bytes`), then FILE itself if it exists.
pub fn segments(path: &Path) -> Result<Vec<PathBuf>, std::io::Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(vec![path.to_path_buf()]);
    };
    let prefix = format!("{name}.");
    let mut rotated: Vec<(u64, PathBuf)> = Vec::new();
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                let file_name = entry.file_name();
                let Some(n) = file_name.to_str() else {
                    continue;
                };
                let Some(suffix) = n.strip_prefix(&prefix) else {
                    continue;
                };
                if !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()) {
                    if let Ok(first) = suffix.parse::<u64>() {
                        rotated.push((first, entry.path()));
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    rotated.sort();
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        out.push(path.to_path_buf());
    }
    Ok(out)
}

/// The name a segment gets when it is rotated: `FILE.<seq of its first line, 12 digits>`.
pub fn rotated_name(path: &Path, first_seq: u64) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".{first_seq:012}"));
    PathBuf::from(name)
}

/// Verify files as one chain, in the order given; the first may continue a chain whose
/// earlier files are gone (retention), which the summary reports.
pub fn verify_files(
    files: &[PathBuf],
    chain: Chain,
    expect_head: Option<String>,
) -> Result<Summary, Break> {
    let mut v = Verifier::new(chain, true).expect_head(expect_head);
    for file in files {
        let f = File::open(file).map_err(|e| Break {
            file: Some(file.clone()),
            line: 0,
            reason: format!("cannot open: {e}"),
        })?;
        v.push_all(BufReader::new(f), Some(file))?;
    }
    v.finish()
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

mod writer;
pub use writer::{AuditLog, AuditOptions, Opened, Resume, Verification};

/// The gRPC face of an [`AuditLog`].
#[derive(Clone)]
pub struct AuditService {
    log: Arc<AuditLog>,
    metrics: crate::Metrics,
}

impl AuditService {
    pub fn new(log: Arc<AuditLog>) -> AuditService {
        AuditService {
            log,
            metrics: crate::Metrics::default(),
        }
    }

    /// Count appended and refused records into `metrics`.
    pub fn with_metrics(mut self, metrics: crate::Metrics) -> AuditService {
        self.metrics = metrics;
        self
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
                self.metrics.audit_appended(appended, rejected);
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
        // A break behind the checkpoint is found by the background verification.
        std::fs::write(&path, edited.join("\n") + "\n").unwrap();
        let log = AuditLog::open(&path).unwrap();
        log.verify_in_background().unwrap().join().unwrap();
        assert!(
            matches!(log.verification(), Verification::Broken(ref b) if b.line == 3),
            "{:?}",
            log.verification()
        );
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
