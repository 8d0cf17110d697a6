//! Test support: private `redis-server` processes on ephemeral loopback ports.
//!
//! Each server runs under a small `sh` wrapper that holds the read end of a pipe from this
//! test process. When the pipe closes (on `Drop`, or because the test process exited or
//! died, which matters for servers kept in statics that are never dropped), the wrapper
//! kills its `redis-server` and removes the server's temporary directory. Nothing is left
//! running after `cargo test`.
//!
//! `redis-server` and `redis-cli` must be on PATH. They are not optional: a missing binary
//! fails the test with a message saying to run `make test`, which installs them.

// clippy.toml allows unwrap/expect/panic inside #[test] fns only; this module is test code too.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    unreachable_pub
)]

use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Kills `redis-server` when stdin (fd 3, the pipe from the test) reaches EOF, and removes
/// the data directory once the server has exited. `$1` is the directory; the rest are
/// `redis-server` arguments.
const WRAPPER: &str = r#"
dir=$1; shift
exec 3<&0
redis-server "$@" &
pid=$!
(read _ <&3; kill $pid 2>/dev/null) &
watch=$!
wait $pid
status=$?
kill $watch 2>/dev/null
rm -rf "$dir"
exit $status
"#;

const READY_WITHIN: Duration = Duration::from_secs(10);

fn require(binary: &str) {
    match Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "`{binary}` is not installed (not on PATH). The store contract tests need a real \
             Redis: run `make test`, which installs redis-server and redis-cli, or install \
             them yourself (Debian: apt-get install redis-server)."
        ),
        Err(e) => panic!("cannot run `{binary} --version`: {e}"),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}

fn scratch_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "laneguard-redis-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

/// One `redis-server` on `127.0.0.1:port`.
pub struct RedisServer {
    port: u16,
    extra: Vec<String>,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl RedisServer {
    /// A standalone server on a fresh ephemeral port.
    pub fn start() -> RedisServer {
        RedisServer::start_with(Vec::new)
    }

    /// Start a server; `extra` gives additional arguments (it may pick ports, so it is
    /// called again on each attempt).
    fn start_with(extra: impl Fn() -> Vec<String>) -> RedisServer {
        require("redis-server");
        let mut last = String::new();
        for _ in 0..5 {
            let mut server = RedisServer {
                port: free_port(),
                extra: extra(),
                child: None,
                stdin: None,
                log: PathBuf::new(),
            };
            match server.launch() {
                Ok(()) => return server,
                Err(why) => last = why,
            }
        }
        panic!("redis-server did not start after 5 attempts: {last}");
    }

    fn launch(&mut self) -> Result<(), String> {
        let dir = scratch_dir();
        self.log = dir.join("redis.log");
        let mut args: Vec<String> = vec![
            "--port".into(),
            self.port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--logfile".into(),
            self.log.display().to_string(),
        ];
        args.extend(self.extra.iter().cloned());
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WRAPPER)
            .arg("sh")
            .arg(&dir)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot spawn sh: {e}"))?;
        self.stdin = child.stdin.take();
        self.child = Some(child);

        let deadline = Instant::now() + READY_WITHIN;
        while Instant::now() < deadline {
            if self.ping() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .map(|c| matches!(c.try_wait(), Ok(Some(_))))
                .unwrap_or(true);
            if exited {
                self.child = None;
                self.stdin = None;
                return Err(format!(
                    "redis-server on port {} exited at start",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        self.stop();
        Err(format!(
            "redis-server on port {} did not answer PING within {READY_WITHIN:?}; log:\n{log}",
            self.port
        ))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// One synchronous command on a fresh connection, with short timeouts.
    pub fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.url())?;
        let mut conn = client.get_connection_with_timeout(Duration::from_millis(500))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        cmd.query(&mut conn)
    }

    fn ping(&self) -> bool {
        matches!(self.command::<String>(&redis::cmd("PING")), Ok(s) if s == "PONG")
    }

    /// Kill the server (the port is then closed: connections are refused).
    pub fn stop(&mut self) {
        // Closing the pipe makes the wrapper kill redis-server and clean up.
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }

    /// The `redis-server` process id (from `INFO server`), for signals.
    pub fn pid(&self) -> u32 {
        let info: String = self
            .command(redis::cmd("INFO").arg("server"))
            .expect("INFO server");
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok())
            .expect("INFO server names the process_id")
    }

    /// Send `signal` (`STOP`, `CONT`) to `redis-server` `pid`.
    pub fn signal(pid: u32, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// Start again on the same port, with empty state.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(why) if Instant::now() > deadline => panic!("restart failed: {why}"),
                // The old socket may linger for a moment.
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A 3-node Redis Cluster (3 primaries, no replicas) on ephemeral loopback ports.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        require("redis-server");
        require("redis-cli");
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(|| {
                    vec![
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-config-file".into(),
                        "nodes.conf".into(),
                        // The bus port defaults to port + 10000, which may be taken or out of
                        // range for an ephemeral port; pick it explicitly.
                        "--cluster-port".into(),
                        free_port().to_string(),
                        "--cluster-node-timeout".into(),
                        "5000".into(),
                    ]
                })
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok();
        cluster
    }

    fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = self.nodes.iter().all(|n| {
                n.command::<String>(redis::cmd("CLUSTER").arg("INFO"))
                    .map(|info| {
                        info.contains("cluster_state:ok")
                            && info.contains("cluster_slots_ok:16384")
                            && info.contains("cluster_known_nodes:3")
                    })
                    .unwrap_or(false)
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster did not reach cluster_state:ok"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis-cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3`.
    pub fn spec(&self) -> String {
        let list: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis-cluster://{}", list.join(","))
    }

    pub fn node_urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The nodes, to stop one of them.
    pub fn into_nodes(self) -> Vec<RedisServer> {
        self.nodes
    }
}

/// One standalone server per test process, shared by its tests (which use distinct keys).
pub fn shared_redis() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

/// One 3-node cluster per test process, shared by its tests (which use distinct keys).
pub fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start)
}
