//! `laneguard-redis-cluster`: a Redis Cluster on ephemeral loopback ports for as long as it
//! runs (at most `--lifetime-s`), for benchmarks that are not written in Rust
//! (`make bench-accuracy`). The same setup as the tests' `RedisCluster`.
//!
//! With `--front CMD`, each node gets `CMD --listen 127.0.0.1:0 --target 127.0.0.1:PORT` in
//! front of it (a delay proxy) and announces that front's port, so that clients go through
//! it. Once the cluster is healthy it prints, one per line:
//!
//! ```text
//! LANEGUARD_NODE index=0 port=P announced=Q pid=N
//! ...
//! LANEGUARD_CLUSTER spec=redis-cluster://127.0.0.1:Q0,...
//! LANEGUARD_READY addr=127.0.0.1:Q0
//! ```
//!
//! `port` is the node itself (for INFO, ROLE and signals), `announced` what clients use.
//! Killing this process's group kills every node and front.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::time::Duration;

use clap::Parser;
use laneguard_redis_harness::{Error, RedisCluster, Result, Shape};

#[derive(Parser, Debug)]
#[command(about = "A Redis Cluster on ephemeral loopback ports, for benchmarks")]
struct Args {
    /// Where the nodes keep their logs and data (emptied first).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 3)]
    masters: usize,
    /// Replicas per primary.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// cluster-node-timeout, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    node_timeout_ms: u32,
    /// A command (words separated by spaces) to put in front of each node; it is given
    /// `--listen 127.0.0.1:0 --target 127.0.0.1:PORT` and must print
    /// `LANEGUARD_READY addr=IP:PORT` (laneguard-delay-proxy does).
    #[arg(long)]
    front: Option<String>,
    /// Exit (and stop every node) after this many seconds.
    #[arg(long, default_value_t = 900)]
    lifetime_s: u64,
}

/// A front process, killed on Drop; its stdout is kept open so that it never writes to a
/// closed pipe.
struct Front {
    child: Child,
    _stdout: Option<ChildStdout>,
}

impl Drop for Front {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_front(cmd: &str, port: u16) -> Result<(Front, u16)> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let (exe, rest) = words
        .split_first()
        .ok_or_else(|| Error("--front is empty".into()))?;
    let mut child = Command::new(exe)
        .args(rest)
        .args(["--listen", "127.0.0.1:0", "--target"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Error(format!("cannot start {exe}: {e}")))?;
    let mut reader = child.stdout.take().map(BufReader::new);
    let mut line = String::new();
    let addr = reader.as_mut().and_then(|r| {
        r.read_line(&mut line).ok()?;
        line.trim()
            .strip_prefix("LANEGUARD_READY addr=")
            .map(str::to_string)
    });
    let front = Front {
        child,
        _stdout: reader.map(BufReader::into_inner),
    };
    let public = addr
        .as_deref()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| {
            Error(format!(
                "{exe} did not print LANEGUARD_READY addr=… ({line:?})"
            ))
        })?;
    Ok((front, public))
}

fn run(args: &Args) -> Result<()> {
    // A fresh directory: a node that finds an old nodes.conf rejoins that old cluster.
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .map_err(|e| Error(format!("removing {}: {e}", args.dir.display())))?;
    }
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| Error(format!("creating {}: {e}", args.dir.display())))?;
    let shape = Shape {
        masters: args.masters,
        replicas: args.replicas,
        node_timeout_ms: args.node_timeout_ms,
    };
    let mut fronts = Vec::new();
    let cluster = RedisCluster::start_fronted(Some(&args.dir), shape, |port| match &args.front {
        Some(cmd) => {
            let (front, public) = start_front(cmd, port)?;
            fronts.push(front);
            Ok(public)
        }
        None => Ok(port),
    })?;
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| writeln!(out, "{line}").and_then(|()| out.flush());
    let io = |e: std::io::Error| Error(format!("stdout: {e}"));
    for (i, node) in cluster.nodes().iter().enumerate() {
        say(format!(
            "LANEGUARD_NODE index={i} port={} announced={} pid={}",
            node.port(),
            cluster.announced_port(i).unwrap_or(node.port()),
            node.pid().unwrap_or(0)
        ))
        .map_err(io)?;
    }
    say(format!("LANEGUARD_CLUSTER spec={}", cluster.spec())).map_err(io)?;
    say(format!(
        "LANEGUARD_READY addr=127.0.0.1:{}",
        cluster.announced_port(0).unwrap_or(0)
    ))
    .map_err(io)?;
    std::thread::sleep(Duration::from_secs(args.lifetime_s));
    drop(cluster);
    drop(fronts);
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("laneguard-redis-cluster: {e}");
            ExitCode::FAILURE
        }
    }
}
