//! Private `redis-server` processes and Redis Clusters on ephemeral loopback ports: the one
//! Redis setup shared by the integration tests (`tests/src/redis.rs` re-exports it), the
//! service's store tests (`service/tests/support`) and `make bench-accuracy` (through the
//! `laneguard-redis-cluster` binary).
//!
//! Each server runs under a small `sh` wrapper that holds the read end of a pipe from this
//! process. When the pipe closes (on `Drop`, or because the owning process exited or died,
//! which matters for servers kept in statics that are never dropped), the wrapper kills its
//! `redis-server`. A server started in a caller's directory ([`RedisServer::start`]) keeps its
//! log there; a scratch server ([`RedisServer::start_scratch`]) lives in a temporary
//! directory that the wrapper removes once the server has exited. Nothing is left running.
//!
//! `redis-server` and `redis-cli` must be on PATH; `make test` and `make bench` install them
//! (`scripts/bootstrap.sh --with-redis`). A missing binary is an error that says so.

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// What went wrong, in words (which binary, which port, what it answered).
pub struct Error(pub String);

impl Error {
    pub fn new(msg: impl Into<String>) -> Error {
        Error(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// What `unwrap` prints in a failing test: keep real newlines.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const INSTALL_HINT: &str = "`make test` installs it (scripts/bootstrap.sh --with-redis)";

/// `$1` is the server's directory, `$2` is 1 when that directory is a scratch one to remove
/// after the server exits; the rest are `redis-server` arguments. Prints redis-server's pid,
/// then kills it (SIGKILL, which also ends a SIGSTOPped server) when stdin reaches EOF.
const WRAPPER: &str = r#"
dir=$1; scratch=$2; shift 2
exec 3<&0
redis-server "$@" </dev/null >/dev/null 2>&1 &
pid=$!
echo "$pid"
exec 1>/dev/null
(read _ <&3; kill -KILL $pid 2>/dev/null) &
watch=$!
wait $pid
status=$?
kill $watch 2>/dev/null
if [ "$scratch" = 1 ]; then rm -rf "$dir"; fi
exit $status
"#;

/// A port that was free a moment ago (redis-server has no "port 0, tell me" mode).
pub fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::new(format!("finding a free loopback port: {e}")))
}

fn scratch_dir() -> Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "laneguard-redis-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::new(format!("creating {}: {e}", dir.display())))?;
    Ok(dir)
}

/// `redis-cli -h 127.0.0.1 -p PORT ARGS...`: its stdout (bounded by redis-cli's own timeouts).
pub fn redis_cli(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::new(format!("cannot run redis-cli ({e}); {INSTALL_HINT}")))?;
    if !out.status.success() {
        return Err(Error::new(format!(
            "redis-cli -p {port} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One `redis-server` on `127.0.0.1:port`. Stoppable (SIGKILL, as in a crash) and restartable
/// on the same port (empty: no persistence), pausable (SIGSTOP); killed on Drop.
pub struct RedisServer {
    /// The caller's directory (logs are kept there); `None`: a scratch directory.
    home: Option<PathBuf>,
    name: String,
    port: u16,
    /// Extra `redis-server` arguments (cluster mode).
    extra: Vec<String>,
    /// The `sh` wrapper, and the write end of its pipe.
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    /// `redis-server`'s own pid, as the wrapper printed it.
    pid: Option<u32>,
    starts: usize,
    log: PathBuf,
}

impl RedisServer {
    /// A standalone server whose log (`redis.N.log`) and data directory are in `dir`.
    pub fn start(dir: impl AsRef<Path>) -> Result<RedisServer> {
        RedisServer::start_with(Some(dir.as_ref()), "redis", || Ok(Vec::new()))
    }

    /// A standalone server in a temporary directory, removed when the server exits.
    pub fn start_scratch() -> Result<RedisServer> {
        RedisServer::start_with(None, "redis", || Ok(Vec::new()))
    }

    /// Start a server on a fresh port; `extra` gives additional arguments (it may pick
    /// ports, so it is called again on each attempt).
    fn start_with(
        home: Option<&Path>,
        name: &str,
        extra: impl Fn() -> Result<Vec<String>>,
    ) -> Result<RedisServer> {
        let mut last = Error::new("not started");
        for _ in 0..5 {
            let mut server = RedisServer {
                home: home.map(Path::to_path_buf),
                name: name.to_string(),
                port: free_port()?,
                extra: extra()?,
                child: None,
                stdin: None,
                pid: None,
                starts: 0,
                log: PathBuf::new(),
            };
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(why) => last = why,
            }
        }
        Err(Error::new(format!(
            "redis-server did not start after 5 attempts: {last}"
        )))
    }

    fn launch(&mut self) -> Result<()> {
        let (dir, scratch) = match &self.home {
            Some(home) => (home.join(&self.name), false),
            None => (scratch_dir()?, true),
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::new(format!("creating {}: {e}", dir.display())))?;
        self.log = match &self.home {
            Some(home) => home.join(format!("{}.{}.log", self.name, self.starts)),
            None => dir.join("redis.log"),
        };
        self.starts += 1;
        let mut args: Vec<String> = vec![
            "--port".into(),
            self.port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            // A cluster node writes nodes.conf here.
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
            .arg(if scratch { "1" } else { "0" })
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::new(format!("cannot spawn sh for redis-server: {e}")))?;
        self.stdin = child.stdin.take();
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            // One line, printed as soon as the server is spawned.
            let _ = BufReader::new(out).read_line(&mut line);
        }
        self.pid = line.trim().parse().ok();
        self.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
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
                self.pid = None;
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(Error::new(format!(
                    "redis-server on port {} exited at start (is it installed? {INSTALL_HINT}); log:\n{log}",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        self.stop();
        Err(Error::new(format!(
            "redis-server on port {} did not answer PING within {READY_TIMEOUT:?}; log:\n{log}",
            self.port
        )))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-server`'s process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.pid.filter(|_| self.child.is_some())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
    }

    /// Kill it (SIGKILL: Redis vanishes as in a crash; the port then refuses connections).
    pub fn stop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = self.signal_pid(pid, Signal::SIGKILL);
        }
        // Closing the pipe also makes the wrapper kill redis-server (and clean up).
        self.stdin = None;
        self.pid = None;
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

    /// Start again on the same port, with empty state (the old socket may linger for a
    /// moment, so it retries for a while).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(why) if Instant::now() > deadline => {
                    return Err(Error::new(format!("restart failed: {why}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Pause it (SIGSTOP): the port still accepts connections, nothing answers.
    pub fn pause(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// Resume it after [`RedisServer::pause`] (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| Error::new("redis-server is not running"))?;
        self.signal_pid(pid, signal)
    }

    fn signal_pid(&self, pid: u32, signal: Signal) -> Result<()> {
        let raw = i32::try_from(pid).map_err(|e| Error::new(format!("pid {pid}: {e}")))?;
        kill(Pid::from_raw(raw), signal)
            .map_err(|e| Error::new(format!("{signal} redis-server {pid}: {e}")))
    }

    /// `redis-cli -p PORT ARGS...`: its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        redis_cli(self.port, args)
    }

    /// The number of keys (`DBSIZE`).
    pub fn key_count(&self) -> Result<u64> {
        let out = self.cli(&["DBSIZE"])?;
        out.trim()
            .parse()
            .map_err(|_| Error::new(format!("DBSIZE answered {out:?}")))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The shape of a [`RedisCluster`].
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub masters: usize,
    /// Replicas per primary.
    pub replicas: usize,
    /// `cluster-node-timeout`: how long a silent node takes to be marked failed (and a
    /// replica to take over).
    pub node_timeout_ms: u32,
}

impl Shape {
    /// `masters` primaries with one replica each and a 1 s node timeout, so that a replica
    /// takes over a lost primary in a few seconds.
    pub fn with_replicas(masters: usize) -> Shape {
        Shape {
            masters,
            replicas: 1,
            node_timeout_ms: 1000,
        }
    }

    /// `masters` primaries and no replicas (a lost primary's slots stay down), 5 s timeout.
    pub fn primaries(masters: usize) -> Shape {
        Shape {
            masters,
            replicas: 0,
            node_timeout_ms: 5000,
        }
    }
}

/// A Redis Cluster on ephemeral loopback ports. Every node is killed on Drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// The port each node announces to clients (its own, or the port of what fronts it).
    announced: Vec<u16>,
    shape: Shape,
}

impl RedisCluster {
    /// Nodes with their logs in `dir` (`redis-nodeN.M.log`).
    pub fn start(dir: impl AsRef<Path>, shape: Shape) -> Result<RedisCluster> {
        RedisCluster::start_fronted(Some(dir.as_ref()), shape, Ok)
    }

    /// Nodes in scratch directories.
    pub fn start_scratch(shape: Shape) -> Result<RedisCluster> {
        RedisCluster::start_fronted(None, shape, Ok)
    }

    /// Like [`RedisCluster::start`], with something in front of each node: `front(port)`
    /// starts it (a delay proxy, say) and returns the port clients should use instead. Each
    /// node announces that port (`cluster-announce-port`), so a cluster client that follows
    /// `CLUSTER SLOTS` keeps going through the fronts; the cluster bus stays direct.
    pub fn start_fronted(
        dir: Option<&Path>,
        shape: Shape,
        mut front: impl FnMut(u16) -> Result<u16>,
    ) -> Result<RedisCluster> {
        let mut nodes = Vec::new();
        let mut announced = Vec::new();
        for i in 0..shape.masters * (1 + shape.replicas) {
            let node = RedisServer::start_with(dir, &format!("redis-node{i}"), || {
                Ok(vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    "nodes.conf".into(),
                    // The bus port defaults to port + 10000, which may be taken or out of
                    // range for an ephemeral port; pick it explicitly.
                    "--cluster-port".into(),
                    free_port()?.to_string(),
                    "--cluster-node-timeout".into(),
                    shape.node_timeout_ms.to_string(),
                    // A replica's first sync starts at once (the default waits 5 s for more
                    // replicas to share one diskless transfer).
                    "--repl-diskless-sync-delay".into(),
                    "0".into(),
                ])
            })?;
            let public = front(node.port())?;
            if public != node.port() {
                node.cli(&[
                    "CONFIG",
                    "SET",
                    "cluster-announce-port",
                    &public.to_string(),
                ])?;
            }
            announced.push(public);
            nodes.push(node);
        }
        let addrs: Vec<String> = announced.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args([
                "--cluster-replicas",
                &shape.replicas.to_string(),
                "--cluster-yes",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::new(format!("cannot run redis-cli ({e}); {INSTALL_HINT}")))?;
        if !out.status.success() {
            return Err(Error::new(format!(
                "redis-cli --cluster create failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let cluster = RedisCluster {
            nodes,
            announced,
            shape,
        };
        cluster.wait_healthy(shape.masters, Duration::from_secs(30))?;
        cluster.wait_replicas_synced(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Wait until every running replica has finished its sync with its primary
    /// (`master_link_status:up`). A replica that never synced refuses to take over ("Disconnected
    /// from master for longer than allowed"), so a test that kills a primary right after the
    /// start would find its slots down for good.
    pub fn wait_replicas_synced(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let mut pending = Vec::new();
            for n in self.running() {
                let info = n.cli(&["INFO", "replication"]).unwrap_or_default();
                if info.contains("role:slave") && !info.contains("master_link_status:up") {
                    pending.push(n.name.clone());
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::new(format!(
                    "Redis Cluster replicas not in sync with their primaries after {within:?}: {}",
                    pending.join(", ")
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis-cluster://127.0.0.1:p1,...` over every node (the announced ports).
    pub fn spec(&self) -> String {
        let list: Vec<String> = self
            .announced
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis-cluster://{}", list.join(","))
    }

    /// The port node `i` announces to clients.
    pub fn announced_port(&self, i: usize) -> Option<u16> {
        self.announced.get(i).copied()
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

    /// Wait until every running node reports `cluster_state:ok` with `masters` primaries
    /// serving all slots, and knows every node.
    pub fn wait_healthy(&self, masters: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let known = format!("cluster_known_nodes:{}", self.nodes.len());
        loop {
            let ok = self.running().all(|n| {
                n.cli(&["CLUSTER", "INFO"])
                    .map(|info| {
                        info.contains("cluster_state:ok")
                            && info.contains("cluster_slots_ok:16384")
                            && info.contains(&format!("cluster_size:{masters}"))
                            && info.contains(&known)
                    })
                    .unwrap_or(false)
            }) && self.masters().map(|m| m.len() == masters).unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::new(format!(
                    "the Redis Cluster ({} primaries, {} replicas each) is not healthy after {within:?}",
                    self.shape.masters, self.shape.replicas
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn running(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|n| n.is_running())
    }

    /// Indices (into `nodes`) of the running nodes that are primaries with slots, as the
    /// first running node sees them.
    pub fn masters(&self) -> Result<Vec<usize>> {
        let first = self
            .running()
            .next()
            .ok_or_else(|| Error::new("no Redis node is running"))?;
        let table = first.cli(&["CLUSTER", "NODES"])?;
        let mut out = Vec::new();
        for line in table.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            // id addr flags master ping pong epoch link slot...
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let port = f[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok());
            if let Some(i) = self.announced.iter().position(|&a| Some(a) == port) {
                if self.nodes[i].is_running() {
                    out.push(i);
                }
            }
        }
        Ok(out)
    }
}
