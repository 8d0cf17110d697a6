//! The writing side of the audit log: appends, the checkpoint, rotation, and the
//! verification that runs after the service is already serving.
//!
//! Startup never reads the whole log. After every batch the service writes a checkpoint
//! next to the log (`FILE.head`: the last seq, its hash and the byte offset after it).
//! On start it checks that the line at the checkpoint still carries that hash, verifies
//! only the lines after it (a crash can leave a few), and serves. A log shorter than its
//! checkpoint was cut: the service refuses to start. Without a checkpoint (a log from an
//! older version) it resumes from the last line. Either way the whole active file is then
//! verified in a background thread, and a break is logged as an error (and reported by
//! [`AuditLog::verification`]) while the service keeps serving.
//!
//! The active file is rotated by size and by age (checked on each append): it is renamed
//! `FILE.<seq of its first line>` and a new FILE continues the chain (its first `prev` is
//! the last hash of the rotated file). `laneguard-audit verify FILE` verifies the whole set.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    canonical, line, parse_line, rotated_name, segments, AuditError, Break, Chain, Summary,
    Verifier, GENESIS, MAX_RECORD_BYTES,
};

/// Rotate the active file once it holds this many bytes, by default.
pub const DEFAULT_ROTATE_BYTES: u64 = 64 * 1024 * 1024;
/// Rotate the active file once it is this old, by default.
pub const DEFAULT_ROTATE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// How the log is written.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub chain: Chain,
    /// Rotate once the active file holds at least this many bytes; 0: never by size.
    pub rotate_bytes: u64,
    /// Rotate once the active file is this old; `None`: never by age.
    pub rotate_after: Option<Duration>,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            chain: Chain::plain(),
            rotate_bytes: DEFAULT_ROTATE_BYTES,
            rotate_after: Some(DEFAULT_ROTATE_AFTER),
        }
    }
}

/// The checkpoint file, `FILE.head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Checkpoint {
    /// The seq and hash of the last line written (the chain's head).
    seq: u64,
    hash: String,
    /// The active file's length after that line.
    offset: u64,
    /// The seq the active file starts at.
    first_seq: u64,
    /// When the active file was started (Unix seconds), for rotation by age.
    started_s: u64,
}

/// How the log was resumed at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// A new log (or a new active file after the checkpoint).
    Fresh,
    /// From the checkpoint, after verifying the lines written after it.
    Checkpoint { seq: u64 },
    /// From the last line (no checkpoint: a log from an older version).
    LastLine { seq: u64 },
}

/// What [`AuditLog::open`] found.
#[derive(Debug)]
pub struct Opened {
    pub log: AuditLog,
    pub resumed: Resume,
    /// Lines verified before the log was ready (those after the checkpoint).
    pub verified_before_serving: u64,
}

/// The background verification of the active file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    Running,
    Ok(Summary),
    Broken(Break),
}

#[derive(Debug)]
struct Tail {
    file: File,
    prev: String,
    seq: u64,
    /// Bytes in the active file.
    offset: u64,
    first_seq: u64,
    started_s: u64,
}

/// The log a service appends to. Appends are serialised by a lock, and each batch is
/// written and synced to disk before the call is answered.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    options: AuditOptions,
    tail: Mutex<Tail>,
    verification: Arc<Mutex<Verification>>,
    /// The active file as it was at open, to verify in the background.
    pending: Mutex<Option<(File, u64, u64, String)>>,
}

fn checkpoint_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".head");
    PathBuf::from(name)
}

fn unix_s(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The last complete line of a file of `len` bytes, which must end with a newline.
fn last_line(file: &mut File, len: u64) -> Result<Option<String>, String> {
    if len == 0 {
        return Ok(None);
    }
    // A line is at most a record plus its envelope.
    let window = (MAX_RECORD_BYTES as u64 * 8 + 4096).min(len);
    file.seek(SeekFrom::Start(len - window))
        .map_err(|e| format!("cannot read: {e}"))?;
    let mut buf = Vec::with_capacity(window as usize);
    file.take(window)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read: {e}"))?;
    if buf.last() != Some(&b'\n') {
        return Err("the last line is incomplete (a torn write?)".into());
    }
    let body = &buf[..buf.len() - 1];
    let start = match body.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None if window == len => 0,
        None => return Err("the last line is longer than any record".into()),
    };
    String::from_utf8(body[start..].to_vec())
        .map(Some)
        .map_err(|_| "the last line is not UTF-8".into())
}

fn first_line(file: &mut File) -> Result<Option<String>, String> {
    file.seek(SeekFrom::Start(0))
        .map_err(|e| format!("cannot read: {e}"))?;
    let mut text = String::new();
    BufReader::new(file.take(MAX_RECORD_BYTES as u64 * 8 + 4096))
        .read_line(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    Ok((!text.is_empty()).then(|| text.trim_end_matches('\n').to_string()))
}

impl AuditLog {
    /// Open (or create) a log with the default options and an unkeyed chain.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        AuditLog::open_with(path, AuditOptions::default()).map(|o| o.log)
    }

    /// Open (or create) a log. Reads the checkpoint and the lines after it, never the whole
    /// file: call [`AuditLog::verify_in_background`] to check the rest while serving.
    pub fn open_with(path: &Path, options: AuditOptions) -> Result<Opened, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        };
        let broken = |line: u64, reason: String| AuditError::Broken {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let ckpt_path = checkpoint_path(path);
        let checkpoint = match std::fs::read_to_string(&ckpt_path) {
            Ok(text) => match serde_json::from_str::<Checkpoint>(&text) {
                Ok(c) => Some(c),
                Err(e) => {
                    log::warn!(
                        "audit: ignoring the unreadable checkpoint {}: {e}",
                        ckpt_path.display()
                    );
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };
        let len = match std::fs::metadata(path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(e)),
        };
        let now_s = unix_s(SystemTime::now());
        let chain = &options.chain;

        let mut verified = 0u64;
        let (seq, prev, first_seq, started_s, resumed) = match (&checkpoint, len) {
            (Some(c), _) if c.offset > len => {
                return Err(broken(
                    0,
                    format!(
                        "the file is {len} bytes but its checkpoint {} records seq {} (head {}) at byte {}: lines were cut off the end",
                        ckpt_path.display(),
                        c.seq,
                        c.hash,
                        c.offset
                    ),
                ))
            }
            (Some(c), _) => {
                let mut file = File::open(path).or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        File::create(path)
                    } else {
                        Err(e)
                    }
                }).map_err(io)?;
                let ckpt_line = c.seq.saturating_sub(c.first_seq) + 1;
                if c.offset > 0 {
                    let text = last_line(&mut file, c.offset).map_err(|r| broken(ckpt_line, r))?;
                    let e = text
                        .as_deref()
                        .map(parse_line)
                        .transpose()
                        .map_err(|r| broken(ckpt_line, r))?;
                    let intact = e.is_some_and(|e| {
                        e.seq == c.seq
                            && e.hash == c.hash
                            && chain.hash(&e.prev, &canonical(&e.record)) == e.hash
                    });
                    if !intact {
                        return Err(broken(
                            ckpt_line,
                            format!(
                                "the line at the checkpoint is no longer seq {} with hash {}: the log was rewritten",
                                c.seq, c.hash
                            ),
                        ));
                    }
                }
                file.seek(SeekFrom::Start(c.offset)).map_err(io)?;
                let mut v = Verifier::after(chain.clone(), c.seq, &c.hash);
                v.push_all(BufReader::new(file), None)
                    .map_err(|b| broken(ckpt_line + b.line, b.reason))?;
                let s = v.finish().map_err(|b| broken(0, b.reason))?;
                verified = s.records;
                (
                    s.last_seq,
                    s.head,
                    c.first_seq,
                    c.started_s,
                    Resume::Checkpoint { seq: c.seq },
                )
            }
            (None, 0) => {
                // A new active file: continue the last rotated file's chain, if any.
                let mut resume = (0, GENESIS.to_string());
                let rotated = segments(path).map_err(io)?;
                if let Some(last) = rotated.iter().rev().find(|p| p.as_path() != path) {
                    let mut f = File::open(last).map_err(|source| AuditError::Io {
                        path: last.clone(),
                        source,
                    })?;
                    let n = f.metadata().map_err(io)?.len();
                    let text = last_line(&mut f, n).map_err(|r| AuditError::Broken {
                        path: last.clone(),
                        line: 0,
                        reason: r,
                    })?;
                    if let Some(t) = text {
                        let e = parse_line(&t).map_err(|r| AuditError::Broken {
                            path: last.clone(),
                            line: 0,
                            reason: r,
                        })?;
                        resume = (e.seq, e.hash);
                    }
                }
                (resume.0, resume.1, resume.0 + 1, now_s, Resume::Fresh)
            }
            (None, _) => {
                let mut file = File::open(path).map_err(io)?;
                let last = last_line(&mut file, len)
                    .map_err(|r| broken(0, r))?
                    .map(|t| parse_line(&t))
                    .transpose()
                    .map_err(|r| broken(0, format!("the last line: {r}")))?;
                let first = first_line(&mut file)
                    .map_err(|r| broken(1, r))?
                    .map(|t| parse_line(&t))
                    .transpose()
                    .map_err(|r| broken(1, r))?;
                match (first, last) {
                    (Some(f), Some(l)) => {
                        let started = std::fs::metadata(path)
                            .and_then(|m| m.created().or_else(|_| m.modified()))
                            .map_or(now_s, unix_s);
                        let seq = l.seq;
                        (seq, l.hash, f.seq, started, Resume::LastLine { seq })
                    }
                    _ => return Err(broken(0, "no complete line".into())),
                }
            }
        };

        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        let offset = file.metadata().map_err(io)?.len();
        let pending = File::open(path)
            .ok()
            .map(|f| (f, offset, seq, prev.clone()));
        let log = AuditLog {
            path: path.to_path_buf(),
            options,
            tail: Mutex::new(Tail {
                file,
                prev,
                seq,
                offset,
                first_seq,
                started_s,
            }),
            verification: Arc::new(Mutex::new(Verification::Running)),
            pending: Mutex::new(pending),
        };
        {
            let tail = log.lock();
            log.write_checkpoint(&tail);
        }
        Ok(Opened {
            log,
            resumed,
            verified_before_serving: verified,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The chain's head: the seq and hash of the last line written.
    pub fn head(&self) -> (u64, String) {
        let t = self.lock();
        (t.seq, t.prev.clone())
    }

    /// The outcome of the background verification so far.
    pub fn verification(&self) -> Verification {
        self.verification
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Verify the active file as it was at open, in a thread. The result is logged (an
    /// error for a broken chain) and kept for [`AuditLog::verification`].
    pub fn verify_in_background(&self) -> Option<std::thread::JoinHandle<()>> {
        let (file, len, seq, head) = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        let chain = self.options.chain.clone();
        let path = self.path.clone();
        let status = Arc::clone(&self.verification);
        let spawned = std::thread::Builder::new()
            .name("audit-verify".into())
            .spawn(move || {
                let mut v = Verifier::new(chain, true);
                let outcome = v
                    .push_all(BufReader::new(file.take(len)), Some(&path))
                    .and_then(|()| v.finish())
                    .and_then(|s| {
                        if s.last_seq == seq && s.head == head {
                            Ok(s)
                        } else {
                            Err(Break {
                                file: Some(path.clone()),
                                line: 0,
                                reason: format!(
                                    "the file ends at seq {} (head {}) but the service resumed at seq {seq} (head {head})",
                                    s.last_seq, s.head
                                ),
                            })
                        }
                    });
                let result = match outcome {
                    Ok(s) => {
                        log::info!(
                            "audit: {} verified: {} records up to seq {}, head {}",
                            path.display(),
                            s.records,
                            s.last_seq,
                            s.head
                        );
                        Verification::Ok(s)
                    }
                    Err(b) => {
                        log::error!(
                            "audit: THE CHAIN IS BROKEN: {b}. The service keeps appending; keep the file as evidence and see docs/operations.md"
                        );
                        Verification::Broken(b)
                    }
                };
                *status.lock().unwrap_or_else(PoisonError::into_inner) = result;
            });
        match spawned {
            Ok(h) => Some(h),
            Err(e) => {
                log::error!("audit: cannot start the background verification: {e}");
                None
            }
        }
    }

    fn write_checkpoint(&self, t: &Tail) {
        let c = Checkpoint {
            seq: t.seq,
            hash: t.prev.clone(),
            offset: t.offset,
            first_seq: t.first_seq,
            started_s: t.started_s,
        };
        let path = checkpoint_path(&self.path);
        let mut tmp = path.as_os_str().to_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let written = serde_json::to_string(&c)
            .map_err(std::io::Error::other)
            .and_then(|text| std::fs::write(&tmp, text + "\n"))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            // The log itself is intact; the next start just verifies more of it.
            log::warn!("audit: cannot write the checkpoint {}: {e}", path.display());
        }
    }

    /// Append records (each one JSON object). Returns (appended, rejected): anything that
    /// is not a JSON object, or is too large, is rejected and not written.
    pub fn append(&self, records: &[String]) -> Result<(u32, u32), AuditError> {
        let mut tail = self.lock();
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
            let hash = self.options.chain.hash(&prev, &c);
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
            tail.offset += buf.len() as u64;
            self.maybe_rotate(&mut tail);
            self.write_checkpoint(&tail);
        }
        Ok((appended, rejected))
    }

    fn maybe_rotate(&self, tail: &mut Tail) {
        let now_s = unix_s(SystemTime::now());
        let by_size = self.options.rotate_bytes > 0 && tail.offset >= self.options.rotate_bytes;
        let by_age = self
            .options
            .rotate_after
            .is_some_and(|age| now_s.saturating_sub(tail.started_s) >= age.as_secs());
        if tail.offset == 0 || !(by_size || by_age) {
            return;
        }
        let target = rotated_name(&self.path, tail.first_seq);
        if target.exists() {
            log::error!(
                "audit: cannot rotate {}: {} already exists",
                self.path.display(),
                target.display()
            );
            return;
        }
        let rotated = std::fs::rename(&self.path, &target).and_then(|()| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
        });
        match rotated {
            Ok(file) => {
                log::info!(
                    "audit: rotated {} to {} (seq {} to {}, head {})",
                    self.path.display(),
                    target.display(),
                    tail.first_seq,
                    tail.seq,
                    tail.prev
                );
                tail.file = file;
                tail.offset = 0;
                tail.first_seq = tail.seq + 1;
                tail.started_s = now_s;
            }
            Err(e) => log::error!("audit: cannot rotate {}: {e}", self.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{verify_files, Chain};
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "laneguard-audit-writer-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn record(i: u64) -> String {
        format!(r#"{{"tenant":"t{i}","bucket":"shared","events":["limited"],"request_id":"r{i}"}}"#)
    }

    fn fill(log: &AuditLog, from: u64, n: u64) {
        let batch: Vec<String> = (from..from + n).map(record).collect();
        assert_eq!(log.append(&batch).unwrap().0 as u64, n);
    }

    fn no_rotation() -> AuditOptions {
        AuditOptions {
            rotate_bytes: 0,
            rotate_after: None,
            ..AuditOptions::default()
        }
    }

    #[test]
    fn a_restart_reads_only_what_follows_the_checkpoint() {
        let d = dir("restart");
        let path = d.join("audit.log");
        let o = AuditLog::open_with(&path, no_rotation()).unwrap();
        assert_eq!(o.resumed, Resume::Fresh);
        for i in 0..20 {
            fill(&o.log, i * 500, 500);
        }
        let head = o.log.head();
        drop(o);
        // 10,000 records on disk: a restart verifies none of them before serving.
        let o = AuditLog::open_with(&path, no_rotation()).unwrap();
        assert_eq!(o.resumed, Resume::Checkpoint { seq: 10_000 });
        assert_eq!(o.verified_before_serving, 0);
        assert_eq!(o.log.head(), head);
        // The rest is verified in the background.
        o.log.verify_in_background().unwrap().join().unwrap();
        assert!(matches!(o.log.verification(), Verification::Ok(ref s) if s.records == 10_000));
        // Lines written after a stale checkpoint (a crash between the write and the
        // checkpoint) are verified before serving.
        let stale = std::fs::read_to_string(checkpoint_path(&path)).unwrap();
        fill(&o.log, 10_000, 3);
        drop(o);
        std::fs::write(checkpoint_path(&path), stale).unwrap();
        let o = AuditLog::open_with(&path, no_rotation()).unwrap();
        assert_eq!(o.verified_before_serving, 3);
        assert_eq!(o.log.head().0, 10_003);
    }

    #[test]
    fn an_older_log_without_a_checkpoint_resumes_from_its_last_line() {
        let d = dir("legacy");
        let path = d.join("audit.log");
        let o = AuditLog::open_with(&path, no_rotation()).unwrap();
        fill(&o.log, 0, 50);
        let head = o.log.head();
        drop(o);
        std::fs::remove_file(checkpoint_path(&path)).unwrap();
        let o = AuditLog::open_with(&path, no_rotation()).unwrap();
        assert_eq!(o.resumed, Resume::LastLine { seq: 50 });
        assert_eq!(o.verified_before_serving, 0);
        assert_eq!(o.log.head(), head);
        fill(&o.log, 50, 1);
        let s = verify_files(std::slice::from_ref(&path), Chain::plain(), None).unwrap();
        assert_eq!((s.records, s.starts_after), (51, None));
    }

    #[test]
    fn an_edit_behind_the_checkpoint_is_found_while_serving() {
        let d = dir("edit");
        let path = d.join("audit.log");
        let o = AuditLog::open_with(&path, no_rotation()).unwrap();
        fill(&o.log, 0, 10);
        drop(o);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("\"t3\"", "\"t4\"", 1)).unwrap();
        let o = AuditLog::open_with(&path, no_rotation()).unwrap();
        o.log.verify_in_background().unwrap().join().unwrap();
        match o.log.verification() {
            Verification::Broken(b) => assert_eq!(b.line, 4, "{b}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_cut_tail_or_a_rewritten_checkpoint_line_refuses_to_start() {
        let d = dir("cut");
        let path = d.join("audit.log");
        let o = AuditLog::open_with(&path, no_rotation()).unwrap();
        fill(&o.log, 0, 10);
        drop(o);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(&path, lines[..8].join("\n") + "\n").unwrap();
        let e = AuditLog::open_with(&path, no_rotation()).unwrap_err();
        assert!(e.to_string().contains("cut off the end"), "{e}");
        // Same length, last line rewritten.
        std::fs::write(&path, text.replacen("\"t9\"", "\"t8\"", 1)).unwrap();
        let e = AuditLog::open_with(&path, no_rotation()).unwrap_err();
        assert!(matches!(e, AuditError::Broken { line: 10, .. }), "{e}");
    }

    #[test]
    fn rotation_carries_the_chain_across_files() {
        let d = dir("rotate");
        let path = d.join("audit.log");
        let options = AuditOptions {
            rotate_bytes: 2_000,
            rotate_after: None,
            ..AuditOptions::default()
        };
        let o = AuditLog::open_with(&path, options.clone()).unwrap();
        for i in 0..40 {
            fill(&o.log, i * 5, 5);
        }
        let head = o.log.head();
        drop(o);
        let files = segments(&path).unwrap();
        assert!(files.len() > 3, "{files:?}");
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() < 2_000 + 1_000, "{f:?}");
        }
        let s = verify_files(&files, Chain::plain(), Some(head.1.clone())).unwrap();
        assert_eq!((s.records, s.last_seq, &s.head), (200, 200, &head.1));
        assert_eq!(s.expected_at, Some(200));
        // A restart continues the chain in the active file.
        let o = AuditLog::open_with(&path, options.clone()).unwrap();
        fill(&o.log, 200, 1);
        drop(o);
        let files = segments(&path).unwrap();
        assert_eq!(
            verify_files(&files, Chain::plain(), None).unwrap().records,
            201
        );
        // Retention: the oldest file deleted, the rest still verifies, starting later.
        std::fs::remove_file(&files[0]).unwrap();
        let rest = segments(&path).unwrap();
        let s = verify_files(&rest, Chain::plain(), None).unwrap();
        assert!(s.starts_after.is_some());
        assert_eq!(s.last_seq, 201);
        // A middle file removed breaks the chain at the next file.
        let e =
            verify_files(&[rest[0].clone(), rest[2].clone()], Chain::plain(), None).unwrap_err();
        assert_eq!(e.file.as_deref(), Some(rest[2].as_path()));
        // An active file removed with its checkpoint: a new one continues the chain.
        let last_rotated_head = {
            let s = verify_files(&rest[..rest.len() - 1], Chain::plain(), None).unwrap();
            s.head
        };
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(checkpoint_path(&path)).unwrap();
        let o = AuditLog::open_with(&path, options).unwrap();
        assert_eq!(o.log.head().1, last_rotated_head);
    }

    #[test]
    fn a_keyed_chain_needs_the_key() {
        let d = dir("hmac");
        let path = d.join("audit.log");
        let chain = Chain::keyed(b"0123456789abcdef0123".to_vec()).unwrap();
        let o = AuditLog::open_with(
            &path,
            AuditOptions {
                chain: chain.clone(),
                ..no_rotation()
            },
        )
        .unwrap();
        fill(&o.log, 0, 5);
        drop(o);
        let files = vec![path.clone()];
        assert_eq!(verify_files(&files, chain, None).unwrap().records, 5);
        let e = verify_files(&files, Chain::plain(), None).unwrap_err();
        assert!(e.reason.contains("HMAC"), "{e}");
        let other = Chain::keyed(b"another key of 16+ bytes".to_vec()).unwrap();
        assert_eq!(verify_files(&files, other, None).unwrap_err().line, 1);
        assert!(Chain::keyed(b"short".to_vec()).is_err());
    }

    #[test]
    fn an_expected_head_detects_a_truncated_tail() {
        let d = dir("expect");
        let path = d.join("audit.log");
        let o = AuditLog::open_with(&path, no_rotation()).unwrap();
        fill(&o.log, 0, 10);
        let (_, head) = o.log.head();
        drop(o);
        let text = std::fs::read_to_string(&path).unwrap();
        let cut: Vec<&str> = text.lines().take(7).collect();
        let cut_path = d.join("cut.log");
        std::fs::write(&cut_path, cut.join("\n") + "\n").unwrap();
        // Without the published head, a shorter chain is still a valid chain.
        assert_eq!(
            verify_files(std::slice::from_ref(&cut_path), Chain::plain(), None)
                .unwrap()
                .records,
            7
        );
        let e = verify_files(&[cut_path], Chain::plain(), Some(head.clone())).unwrap_err();
        assert!(e.reason.contains("cut off the end"), "{e}");
        // A log that grew after the head was published still passes.
        let s = verify_files(&[path], Chain::plain(), Some(head)).unwrap();
        assert_eq!(s.expected_at, Some(10));
    }
}
