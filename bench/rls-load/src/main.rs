//! `laneguard-rls-load`: drives `laneguard-service` (or any RLS v3 server) with
//! `ShouldRateLimit` calls and prints one JSON line with decisions per second and latency
//! percentiles. `bench/run.py` uses it to measure the service alone, without Envoy.
//!
//! The load is closed-loop: `--concurrency` tasks, spread over `--connections` HTTP/2
//! connections, each send a call as soon as the previous one is answered, for `--duration`
//! seconds after a `--warmup` that is not counted. Each call carries the descriptors the
//! laneguard filter sends for one request: the tenant's shared pool, and with `--buckets 3`
//! also a class budget and a user bucket, each with a `limit` and an `lg.burst` entry. Calls
//! rotate over `--tenants` distinct tenants. The rates are far above the offered load, so the
//! answers are OK and the measurement is of deciding, not of refusing.
//!
//! With `--lease N` every call also carries the gRPC metadata `x-laneguard-lease: N`, as the
//! filter does when it asks for a lease.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use laneguard_protos::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use laneguard_protos::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::Code;
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use laneguard_protos::envoy::service::ratelimit::v3::RateLimitRequest;
use tonic::transport::Channel;

const USAGE: &str = "\
usage: laneguard-rls-load --target IP:PORT [options]

options:
  --target IP:PORT     the rate-limit service (required)
  --duration SECS      measured time [default: 10]
  --warmup SECS        unmeasured time before it [default: 1]
  --connections N      HTTP/2 connections [default: 4]
  --concurrency N      calls in flight [default: 64]
  --tenants N          distinct tenants the calls rotate over [default: 1000]
  --buckets 1|3        descriptors per call: shared pool; + class budget and user [default: 1]
  --lease N            send x-laneguard-lease: N metadata (0: none) [default: 0]
  --domain NAME        [default: laneguard]
";

#[derive(Debug, Clone)]
struct Args {
    target: String,
    duration: Duration,
    warmup: Duration,
    connections: usize,
    concurrency: usize,
    tenants: u64,
    buckets: u32,
    lease: u32,
    domain: String,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut a = Args {
        target: String::new(),
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(1),
        connections: 4,
        concurrency: 64,
        tenants: 1000,
        buckets: 1,
        lease: 0,
        domain: "laneguard".to_string(),
    };
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: `{v}` is not a whole number"))
        };
        match flag.as_str() {
            "--target" => a.target = value,
            "--duration" => a.duration = Duration::from_secs_f64(secs(&flag, &value)?),
            "--warmup" => a.warmup = Duration::from_secs_f64(secs(&flag, &value)?),
            "--connections" => a.connections = usize::try_from(num(&value)?.max(1)).unwrap_or(1),
            "--concurrency" => a.concurrency = usize::try_from(num(&value)?.max(1)).unwrap_or(1),
            "--tenants" => a.tenants = num(&value)?.max(1),
            "--buckets" => {
                a.buckets = match value.as_str() {
                    "1" => 1,
                    "3" => 3,
                    _ => return Err(format!("--buckets: `{value}` is not 1 or 3")),
                }
            }
            "--lease" => a.lease = u32::try_from(num(&value)?).map_err(|e| e.to_string())?,
            "--domain" => a.domain = value,
            _ => return Err(format!("unknown flag `{flag}`")),
        }
    }
    if a.target.is_empty() {
        return Err("--target is required".to_string());
    }
    Ok(Some(a))
}

fn secs(flag: &str, v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Ok(s),
        _ => Err(format!("{flag}: `{v}` is not a number of seconds")),
    }
}

fn entry(key: &str, value: &str) -> Entry {
    Entry {
        key: key.to_string(),
        value: value.to_string(),
    }
}

/// The descriptor the filter sends for one bucket: entries, `lg.burst`, and a `limit`.
fn descriptor(mut entries: Vec<Entry>, per_second: u32) -> RateLimitDescriptor {
    entries.push(entry("lg.burst", &per_second.to_string()));
    RateLimitDescriptor {
        entries,
        limit: Some(RateLimitOverride {
            requests_per_unit: per_second,
            unit: 1, // SECOND
        }),
        hits_addend: None,
    }
}

fn request(args: &Args, n: u64) -> RateLimitRequest {
    let tenant = format!("t{}", n % args.tenants);
    // Far above what one tenant can be offered here: every call is admitted.
    const RATE: u32 = 1_000_000_000;
    let mut descriptors = vec![descriptor(
        vec![entry("tenant", &tenant), entry("bucket", "shared")],
        RATE,
    )];
    if args.buckets == 3 {
        descriptors.push(descriptor(
            vec![
                entry("tenant", &tenant),
                entry("bucket", "class"),
                entry("class", "interactive"),
            ],
            RATE,
        ));
        descriptors.push(descriptor(
            vec![
                entry("tenant", &tenant),
                entry("bucket", "user"),
                entry("user", &format!("u{}", n % 7)),
            ],
            RATE,
        ));
    }
    RateLimitRequest {
        domain: args.domain.clone(),
        descriptors,
        hits_addend: 1,
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    over: u64,
    errors: u64,
    /// Latency of every measured call, in microseconds.
    latencies_us: Vec<u32>,
    first_error: Option<String>,
}

async fn worker(
    args: Arc<Args>,
    mut client: RateLimitServiceClient<Channel>,
    id: u64,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut t = Tally::default();
    let mut n = id;
    let stride = args.concurrency as u64;
    while !stop.load(Ordering::Relaxed) {
        let mut req = tonic::Request::new(request(&args, n));
        n = n.wrapping_add(stride);
        if args.lease > 0 {
            if let Ok(v) = args.lease.to_string().parse() {
                req.metadata_mut().insert("x-laneguard-lease", v);
            }
        }
        let start = Instant::now();
        let result = client.should_rate_limit(req).await;
        let elapsed = start.elapsed();
        if !measuring.load(Ordering::Relaxed) {
            continue;
        }
        match result {
            Ok(resp) => {
                if resp.get_ref().overall_code == Code::OverLimit as i32 {
                    t.over += 1;
                } else {
                    t.ok += 1;
                }
                t.latencies_us
                    .push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX));
            }
            Err(status) => {
                t.errors += 1;
                if t.first_error.is_none() {
                    t.first_error = Some(status.to_string());
                }
            }
        }
    }
    t
}

/// A JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run(args: Args) -> Result<String, String> {
    let args = Arc::new(args);
    let uri = format!("http://{}", args.target);
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let channel = Channel::from_shared(uri.clone())
            .map_err(|e| format!("--target {}: {e}", args.target))?
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {uri}: {e}"))?;
        channels.push(channel);
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(args.concurrency);
    for i in 0..args.concurrency {
        let channel = channels[i % channels.len()].clone();
        tasks.push(tokio::spawn(worker(
            Arc::clone(&args),
            RateLimitServiceClient::new(channel),
            i as u64,
            Arc::clone(&measuring),
            Arc::clone(&stop),
        )));
    }
    tokio::time::sleep(args.warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(args.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);

    let mut all = Tally::default();
    for task in tasks {
        let t = task.await.map_err(|e| format!("a load task failed: {e}"))?;
        all.ok += t.ok;
        all.over += t.over;
        all.errors += t.errors;
        all.latencies_us.extend(t.latencies_us);
        if all.first_error.is_none() {
            all.first_error = t.first_error;
        }
    }
    all.latencies_us.sort_unstable();
    let decisions = all.ok + all.over;
    let lat = &all.latencies_us;
    Ok(format!(
        "{{\"decisions\":{decisions},\"ok\":{},\"over_limit\":{},\"errors\":{},\"elapsed_s\":{elapsed:.3},\"rps\":{:.1},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"first_error\":{}}}",
        all.ok,
        all.over,
        all.errors,
        decisions as f64 / elapsed.max(1e-9),
        percentile(lat, 50.0),
        percentile(lat, 99.0),
        percentile(lat, 99.9),
        match &all.first_error {
            Some(e) => json_string(e),
            None => "null".to_string(),
        }
    ))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("laneguard-rls-load: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("laneguard-rls-load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(line) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("laneguard-rls-load: {e}");
            ExitCode::FAILURE
        }
    }
}
