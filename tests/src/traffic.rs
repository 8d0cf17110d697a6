//! Paced request streams: several callers sending at their own rates at the same time,
//! each on its own thread and connection, for a bounded number of requests. (Pacing waits
//! are the traffic shape, not readiness waits.)

use crate::client::Client;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// One caller: who, what, and how fast.
#[derive(Clone, Debug)]
pub struct Stream {
    pub name: String,
    pub token: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// Requests per second this caller sends.
    pub per_second: f64,
}

impl Stream {
    pub fn new(name: &str, token: &str, path: &str, per_second: f64) -> Stream {
        Stream {
            name: name.to_string(),
            token: token.to_string(),
            path: path.to_string(),
            headers: Vec::new(),
            per_second,
        }
    }

    pub fn header(mut self, k: &str, v: &str) -> Stream {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
}

/// One answered (or failed) request.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// HTTP status, or 0 when the request failed at the transport level.
    pub status: u16,
    /// The upstream's JSON echo fields (empty for local replies).
    pub lane: String,
    pub class: String,
    pub tenant: String,
    /// The body's `class` / `bucket` / `tenant` for a 429.
    pub body: String,
    /// When the response was complete, from the common start.
    pub done: Duration,
    pub error: String,
}

/// What one stream got.
#[derive(Clone, Debug)]
pub struct StreamResult {
    pub stream: Stream,
    pub outcomes: Vec<Outcome>,
}

impl StreamResult {
    pub fn count(&self, status: u16) -> usize {
        self.outcomes.iter().filter(|o| o.status == status).count()
    }

    pub fn sent(&self) -> usize {
        self.outcomes.len()
    }

    /// `200: 12, 429: 30` style summary.
    pub fn summary(&self) -> String {
        let mut by: std::collections::BTreeMap<u16, usize> = Default::default();
        for o in &self.outcomes {
            *by.entry(o.status).or_default() += 1;
        }
        let parts: Vec<String> = by.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        format!(
            "{} ({} sent at {}/s): {}",
            self.stream.name,
            self.sent(),
            self.stream.per_second,
            parts.join(", ")
        )
    }

    /// The latest completion time among this stream's requests.
    pub fn last_done(&self) -> Duration {
        self.outcomes
            .iter()
            .map(|o| o.done)
            .max()
            .unwrap_or_default()
    }
}

fn json_field(v: &serde_json::Value, k: &str) -> String {
    v.get(k)
        .and_then(|x| x.as_str())
        .unwrap_or_default()
        .to_string()
}

/// Run every stream for `duration`, all starting together. Request i of a stream is sent
/// at `start + i / per_second` (or as soon as the previous one returns, if later).
pub fn run(base: &str, streams: &[Stream], duration: Duration) -> (Vec<StreamResult>, Duration) {
    let barrier = Arc::new(Barrier::new(streams.len() + 1));
    let handles: Vec<_> = streams
        .iter()
        .cloned()
        .map(|stream| {
            let barrier = barrier.clone();
            let client = Client::new(base.to_string());
            thread::spawn(move || {
                let n = (stream.per_second * duration.as_secs_f64())
                    .floor()
                    .max(1.0) as usize;
                let interval = Duration::from_secs_f64(1.0 / stream.per_second);
                let headers: Vec<(&str, &str)> = stream
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let mut outcomes = Vec::with_capacity(n);
                barrier.wait();
                let start = Instant::now();
                for i in 0..n {
                    let at = start + interval.mul_f64(i as f64);
                    let now = Instant::now();
                    if at > now {
                        thread::sleep(at - now);
                    }
                    let outcome = match client.get_as(&stream.path, &stream.token, &headers) {
                        Ok(r) => {
                            let v = r.json().unwrap_or(serde_json::Value::Null);
                            Outcome {
                                status: r.status,
                                lane: json_field(&v, "lane"),
                                class: json_field(&v, "class"),
                                tenant: json_field(&v, "tenant"),
                                body: r.body.clone(),
                                done: start.elapsed(),
                                error: String::new(),
                            }
                        }
                        Err(e) => Outcome {
                            status: 0,
                            lane: String::new(),
                            class: String::new(),
                            tenant: String::new(),
                            body: String::new(),
                            done: start.elapsed(),
                            error: e.to_string(),
                        },
                    };
                    outcomes.push(outcome);
                }
                StreamResult { stream, outcomes }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let results: Vec<StreamResult> = handles.into_iter().filter_map(|h| h.join().ok()).collect();
    (results, start.elapsed())
}
