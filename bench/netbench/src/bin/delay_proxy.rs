//! `laneguard-delay-proxy`: a TCP forwarder that adds a round-trip time, for benchmarks on
//! machines without `tc netem`.
//!
//! Each accepted connection gets a connection to `--target`. Every chunk read in either
//! direction is stamped on arrival and written out `--rtt-ms / 2` later, so a request/answer
//! exchange pays the whole RTT once while the stream stays pipelined (a chunk never waits for
//! the one before it to be answered, only for its own deadline). Each direction is two OS
//! threads (reader, writer) with blocking sockets and precise sleeps: the connections it
//! carries are few and long-lived (Envoy to the rate-limit service, the service to Redis).
//!
//! `--ping N` checks the proxy instead: it starts an echo server behind a proxy of the given
//! RTT, sends N 64-byte ping-pongs through it and directly, and prints one JSON line with the
//! measured added RTT and its error.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use laneguard_netbench::{percentiles_us, precise_timers, Sleeper};

#[derive(Parser, Debug)]
#[command(about = "TCP forwarder that adds a round-trip time (half each way)")]
struct Args {
    /// Address to listen on; port 0 picks one. The bound address is printed as
    /// `LANEGUARD_READY addr=IP:PORT`.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Where to forward to (required unless --ping).
    #[arg(long)]
    target: Option<String>,
    /// Round-trip time to add, in milliseconds (fractions allowed). 0 forwards at once.
    #[arg(long, default_value_t = 1.0)]
    rtt_ms: f64,
    /// Instead of serving: measure the proxy's accuracy with N ping-pongs and exit.
    #[arg(long)]
    ping: Option<u32>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !(0.0..=10_000.0).contains(&args.rtt_ms) {
        eprintln!("laneguard-delay-proxy: --rtt-ms must be between 0 and 10000");
        return ExitCode::from(2);
    }
    if !precise_timers() {
        eprintln!(
            "laneguard-delay-proxy: could not lower the timer slack; sleeps may be ~50 µs late"
        );
    }
    let one_way = Duration::from_secs_f64(args.rtt_ms / 2000.0);
    let result = match (args.ping, &args.target) {
        (Some(n), _) => ping(n, args.rtt_ms, one_way),
        (None, Some(target)) => serve(&args.listen, target, one_way),
        (None, None) => Err("--target is required (or --ping N)".to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("laneguard-delay-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bind(listen: &str) -> Result<TcpListener, String> {
    TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))
}

fn serve(listen: &str, target: &str, one_way: Duration) -> Result<(), String> {
    let listener = bind(listen)?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("LANEGUARD_READY addr={addr}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    accept_loop(listener, target.to_string(), one_way);
    Ok(())
}

fn accept_loop(listener: TcpListener, target: String, one_way: Duration) {
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let target = target.clone();
        thread::spawn(move || {
            let upstream = match TcpStream::connect(&target) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("laneguard-delay-proxy: cannot connect to {target}: {e}");
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
                return;
            };
            let a = thread::spawn(move || pipe(client, upstream, one_way));
            pipe(u2, c2, one_way);
            let _ = a.join();
        });
    }
}

/// Copy `from` to `to`, each chunk delayed by `delay` from the moment it was read.
fn pipe(mut from: TcpStream, to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let mut writer_to = match to.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let writer = thread::spawn(move || {
        let mut sleeper = Sleeper::new();
        for (at, chunk) in rx {
            sleeper.sleep_until(at + delay);
            if writer_to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = writer_to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

fn echo_server() -> Result<std::net::SocketAddr, String> {
    let l = bind("127.0.0.1:0")?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

fn ping_pongs(addr: std::net::SocketAddr, n: u32) -> Result<hdrhistogram::Histogram<u64>, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut h = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg).map_err(|e| e.to_string())?;
        s.read_exact(&mut back).map_err(|e| e.to_string())?;
        let _ = h.record(t.elapsed().as_micros() as u64);
    }
    Ok(h)
}

fn ping(n: u32, rtt_ms: f64, one_way: Duration) -> Result<(), String> {
    let echo = echo_server()?;
    let proxy = bind("127.0.0.1:0")?;
    let paddr = proxy.local_addr().map_err(|e| e.to_string())?;
    let target = echo.to_string();
    thread::spawn(move || accept_loop(proxy, target, one_way));
    let direct = ping_pongs(echo, n)?;
    let through = ping_pongs(paddr, n)?;
    let want_us = rtt_ms * 1000.0;
    let added_p50 = through.value_at_quantile(0.5) as f64 - direct.value_at_quantile(0.5) as f64;
    let added_p99 = through.value_at_quantile(0.99) as f64 - direct.value_at_quantile(0.5) as f64;
    let row = serde_json::json!({
        "rtt_ms": rtt_ms,
        "pings": n,
        "direct": percentiles_us(&direct),
        "through_proxy": percentiles_us(&through),
        "added_p50_us": added_p50,
        "added_p99_us": added_p99,
        "error_p50_us": added_p50 - want_us,
        "error_p99_us": added_p99 - want_us,
    });
    println!("{row}");
    Ok(())
}
