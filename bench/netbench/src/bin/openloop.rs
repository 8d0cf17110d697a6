//! `laneguard-openloop`: open-loop HTTP/1.1 load at a fixed offered rate, with latency
//! measured from each request's *scheduled* send time (as wrk2 does), so a slow answer
//! cannot hide the requests that should have been sent meanwhile (no coordinated omission).
//!
//! A dispatcher thread wakes at each scheduled time (precise OS sleeps, not tokio's 1 ms
//! timer) and queues the request; `--connections` keep-alive connections take requests from
//! the queue as they become free. A request that waits for a free connection has that wait in
//! its latency. When the backlog passes `--max-backlog` the offered rate is not sustainable:
//! the run stops early and says `"sustainable": false`.
//!
//! Prints one JSON line: offered and achieved rate, counts by status, p50/p99/p99.9/max in µs.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use laneguard_netbench::{percentiles_us, precise_timers, Sleeper};
use tokio::sync::mpsc;

#[derive(Parser, Debug, Clone)]
#[command(about = "Open-loop HTTP/1.1 load at a fixed rate, latency from the scheduled time")]
struct Args {
    /// http://IP:PORT/path
    #[arg(long)]
    url: String,
    /// Offered requests per second.
    #[arg(long)]
    rate: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring (not recorded).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Keep-alive connections (the most requests in flight).
    #[arg(long, default_value_t = 256)]
    connections: usize,
    /// Requests queued for a connection beyond which the rate counts as unsustainable.
    #[arg(long, default_value_t = 20_000)]
    max_backlog: u64,
    /// Extra request header, `name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
}

struct Target {
    addr: String,
    host: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--url must start with http:// (got {url})"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("--url has no host: {url}"));
    }
    Ok(Target {
        addr: authority.to_string(),
        host: authority.to_string(),
        path: path.to_string(),
    })
}

#[derive(Default)]
struct Tally {
    ok2xx: AtomicU64,
    r429: AtomicU64,
    other: AtomicU64,
    errors: AtomicU64,
    completed: AtomicU64,
    /// Responses that arrived inside the measured window, whenever they were scheduled:
    /// the throughput actually delivered (a backlog does not count as achieved).
    completed_in_window: AtomicU64,
}

struct Shared {
    target: Target,
    headers: Vec<(String, String)>,
    measure_from: Instant,
    measure_until: Instant,
    hist: Mutex<hdrhistogram::Histogram<u64>>,
    tally: Tally,
    stop: AtomicBool,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("laneguard-openloop: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    if !(args.rate > 0.0 && args.rate <= 1e6) {
        return Err("--rate must be in (0, 1000000]".into());
    }
    if args.duration <= 0.0 || args.warmup < 0.0 || args.connections == 0 {
        return Err("--duration must be > 0, --warmup >= 0, --connections >= 1".into());
    }
    let mut headers = Vec::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| format!("--header needs `name: value`: {h}"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    precise_timers();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let measure_until = measure_from + Duration::from_secs_f64(args.duration);
    let shared = Arc::new(Shared {
        target: parse_url(&args.url)?,
        headers,
        measure_from,
        measure_until,
        hist: Mutex::new(hdrhistogram::Histogram::new(3).map_err(|e| e.to_string())?),
        tally: Tally::default(),
        stop: AtomicBool::new(false),
    });
    let (tx, rx) = mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        workers.push(rt.spawn(worker(shared.clone(), rx.clone())));
    }

    // The dispatcher: one OS thread, precise sleeps to each scheduled time.
    let interval = 1.0 / args.rate;
    let total = ((args.warmup + args.duration) * args.rate).ceil() as u64;
    let mut sent = 0u64;
    let mut sent_measured = 0u64;
    let mut sustainable = true;
    let mut sleeper = Sleeper::new();
    for i in 0..total {
        let at = start + Duration::from_secs_f64(i as f64 * interval);
        sleeper.sleep_until(at);
        if tx.send(at).is_err() {
            break;
        }
        sent += 1;
        if at >= measure_from {
            sent_measured += 1;
        }
        if i % 64 == 0 && sent - shared.tally.completed.load(Ordering::Relaxed) > args.max_backlog {
            sustainable = false;
            break;
        }
    }
    drop(tx);
    // Let what is in flight finish (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    while shared.tally.completed.load(Ordering::Relaxed)
        + shared.tally.errors.load(Ordering::Relaxed)
        < sent
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    shared.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.abort();
    }
    let measured_s = if sustainable {
        args.duration
    } else {
        (Instant::now().min(measure_until) - measure_from.min(Instant::now()))
            .as_secs_f64()
            .max(1e-9)
    };
    let h = shared
        .hist
        .lock()
        .map_err(|_| "histogram lock poisoned")?
        .clone();
    let t = &shared.tally;
    let mut row = percentiles_us(&h);
    if let Some(o) = row.as_object_mut() {
        o.insert("offered_rps".into(), args.rate.into());
        o.insert(
            "achieved_rps".into(),
            (t.completed_in_window.load(Ordering::Relaxed) as f64 / measured_s).into(),
        );
        o.insert("sent".into(), sent.into());
        o.insert("sent_measured".into(), sent_measured.into());
        o.insert(
            "completed".into(),
            t.completed.load(Ordering::Relaxed).into(),
        );
        o.insert("status_2xx".into(), t.ok2xx.load(Ordering::Relaxed).into());
        o.insert("status_429".into(), t.r429.load(Ordering::Relaxed).into());
        o.insert(
            "status_other".into(),
            t.other.load(Ordering::Relaxed).into(),
        );
        o.insert("errors".into(), t.errors.load(Ordering::Relaxed).into());
        o.insert("sustainable".into(), sustainable.into());
    }
    println!("{row}");
    Ok(())
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(s: &Shared) -> Option<Sender> {
    let stream = tokio::net::TcpStream::connect(&s.target.addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(sender)
}

async fn worker(s: Arc<Shared>, rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Instant>>>) {
    let mut sender: Option<Sender> = None;
    loop {
        let next = { rx.lock().await.recv().await };
        let Some(scheduled) = next else { return };
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        if sender.as_ref().is_none_or(|x| x.is_closed()) {
            sender = connect(&s).await;
        }
        let Some(tx) = sender.as_mut() else {
            s.tally.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let mut req = hyper::Request::builder()
            .uri(s.target.path.as_str())
            .header("host", s.target.host.as_str());
        for (k, v) in &s.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let Ok(req) = req.body(Empty::<Bytes>::new()) else {
            s.tally.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let ok = async {
            let _ = tx.ready().await;
            let resp = tx.send_request(req).await.ok()?;
            let status = resp.status().as_u16();
            resp.into_body().collect().await.ok()?;
            Some(status)
        }
        .await;
        let done = Instant::now();
        match ok {
            Some(status) => {
                s.tally.completed.fetch_add(1, Ordering::Relaxed);
                if done >= s.measure_from && done < s.measure_until {
                    s.tally.completed_in_window.fetch_add(1, Ordering::Relaxed);
                }
                if scheduled >= s.measure_from && scheduled < s.measure_until {
                    match status {
                        200..=299 => s.tally.ok2xx.fetch_add(1, Ordering::Relaxed),
                        429 => s.tally.r429.fetch_add(1, Ordering::Relaxed),
                        _ => s.tally.other.fetch_add(1, Ordering::Relaxed),
                    };
                    if let Ok(mut h) = s.hist.lock() {
                        let _ = h.record((done - scheduled).as_micros() as u64);
                    }
                }
            }
            None => {
                s.tally.errors.fetch_add(1, Ordering::Relaxed);
                sender = None;
            }
        }
    }
}
