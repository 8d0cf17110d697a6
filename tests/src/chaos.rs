//! Open-ended load for fault tests: every stream runs on its own thread and connection until
//! [`Load::stop`], recording each request's send time, wall time, status and whether it was
//! decided in degraded mode. Faults are injected while it runs; the records are then cut into
//! phases by time (before, during, after) and checked. Streams are paced (`per_second`) or
//! flat out (`per_second` = 0: the next request as soon as the previous one returns). Every
//! request has a client-side timeout, so a stream cannot hang.

use crate::client::Client;
use crate::traffic::Stream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// One request of a stream.
#[derive(Clone, Debug)]
pub struct Record {
    /// When it was sent, from the load's start.
    pub sent: Duration,
    /// Wall time to the whole response (or to the transport error).
    pub elapsed: Duration,
    /// HTTP status, 0 for a transport error.
    pub status: u16,
    /// `x-laneguard-degraded` was set (decided without the service).
    pub degraded: bool,
    /// The upstream's `lane` for a 200, the `error` field of a local reply otherwise.
    pub detail: String,
}

/// A running load. Dropping it stops it too.
pub struct Load {
    start: Instant,
    stop: Arc<AtomicBool>,
    handles: Vec<(String, JoinHandle<Vec<Record>>)>,
}

/// What each stream got, by stream name (streams with the same name are merged).
pub struct Recorded {
    pub streams: Vec<(String, Vec<Record>)>,
}

impl Load {
    /// Start every stream now.
    pub fn start(base: &str, streams: &[Stream]) -> Load {
        let start = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let handles = streams
            .iter()
            .cloned()
            .map(|stream| {
                let stop = stop.clone();
                let client = Client::new(base.to_string());
                let name = stream.name.clone();
                let handle = thread::spawn(move || run_stream(&client, &stream, start, &stop));
                (name, handle)
            })
            .collect();
        Load {
            start,
            stop,
            handles,
        }
    }

    /// Time since the load started, on the records' clock.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Stop every stream and collect the records.
    pub fn stop(mut self) -> Recorded {
        self.stop.store(true, Ordering::SeqCst);
        let mut streams: Vec<(String, Vec<Record>)> = Vec::new();
        for (name, h) in self.handles.drain(..) {
            let records = h.join().unwrap_or_default();
            match streams.iter_mut().find(|(n, _)| *n == name) {
                Some((_, all)) => all.extend(records),
                None => streams.push((name, records)),
            }
        }
        for (_, records) in &mut streams {
            records.sort_by_key(|r| r.sent);
        }
        Recorded { streams }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn run_stream(client: &Client, stream: &Stream, start: Instant, stop: &AtomicBool) -> Vec<Record> {
    let headers: Vec<(&str, &str)> = stream
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let interval =
        (stream.per_second > 0.0).then(|| Duration::from_secs_f64(1.0 / stream.per_second));
    let mut records = Vec::new();
    let mut i: u32 = 0;
    while !stop.load(Ordering::SeqCst) {
        if let Some(interval) = interval {
            // Pacing (the traffic's shape), not a readiness wait.
            let at = interval * i;
            let now = start.elapsed();
            if at > now {
                thread::sleep(at - now);
            }
            i = i.saturating_add(1);
        }
        let sent = start.elapsed();
        let record = match client.get_as(&stream.path, &stream.token, &headers) {
            Ok(r) => {
                let v = r.json().unwrap_or(serde_json::Value::Null);
                let field = if r.status == 200 { "lane" } else { "error" };
                Record {
                    sent,
                    elapsed: r.elapsed,
                    status: r.status,
                    degraded: r.header("x-laneguard-degraded").is_some(),
                    detail: v
                        .get(field)
                        .and_then(|x| x.as_str())
                        .unwrap_or_default()
                        .to_string(),
                }
            }
            Err(e) => Record {
                sent,
                elapsed: start.elapsed() - sent,
                status: 0,
                degraded: false,
                detail: e.to_string(),
            },
        };
        records.push(record);
    }
    records
}

impl Recorded {
    /// The records of stream `name` (empty if there is none).
    pub fn of(&self, name: &str) -> &[Record] {
        self.streams
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r.as_slice())
            .unwrap_or(&[])
    }

    /// Records of `name` sent in `[from, to)`.
    pub fn between(&self, name: &str, from: Duration, to: Duration) -> Vec<&Record> {
        self.of(name)
            .iter()
            .filter(|r| r.sent >= from && r.sent < to)
            .collect()
    }

    /// The slowest request of any stream.
    pub fn slowest(&self) -> Duration {
        self.streams
            .iter()
            .flat_map(|(_, r)| r.iter().map(|r| r.elapsed))
            .max()
            .unwrap_or_default()
    }

    /// `name: 200: 120, 503: 4 (degraded 30)` for every stream, for messages and reports.
    pub fn summary(&self) -> String {
        self.streams
            .iter()
            .map(|(name, records)| {
                let mut by: std::collections::BTreeMap<u16, usize> = Default::default();
                for r in records {
                    *by.entry(r.status).or_default() += 1;
                }
                let parts: Vec<String> = by.iter().map(|(s, n)| format!("{s}: {n}")).collect();
                let degraded = records.iter().filter(|r| r.degraded).count();
                format!("{name}: {} (degraded {degraded})", parts.join(", "))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Admitted (200) requests of `records` against `per_second` × the window: the signed error
/// in percent. The window is `[from, to)` on the send clock.
pub fn drift_pct(records: &[&Record], per_second: f64, from: Duration, to: Duration) -> f64 {
    let admitted = records.iter().filter(|r| r.status == 200).count() as f64;
    let limit = per_second * (to - from).as_secs_f64();
    (admitted - limit) / limit * 100.0
}
