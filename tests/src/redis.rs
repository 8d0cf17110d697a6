//! A real `redis-server` on an ephemeral loopback port, for tests where Redis is involved.
//! `make test` installs redis-server when it is missing (scripts/bootstrap.sh --with-redis).
//! Stoppable and restartable on the same port, to exercise Redis going away; pausable
//! (SIGSTOP); killed on Drop. [`RedisCluster`]: primaries with one replica each.

use crate::{Context, Error, Result, RunDir};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisServer {
    dir: RunDir,
    port: u16,
    child: Option<Child>,
    starts: usize,
    /// Extra `redis-server` arguments (cluster mode).
    extra: Vec<String>,
    name: String,
}

impl RedisServer {
    pub fn start(dir: &RunDir) -> Result<RedisServer> {
        RedisServer::start_with(dir, "redis", Vec::new())
    }

    fn start_with(dir: &RunDir, name: &str, extra: Vec<String>) -> Result<RedisServer> {
        let mut r = RedisServer {
            dir: dir.clone(),
            port: free_port()?,
            child: None,
            starts: 0,
            extra,
            name: name.to_string(),
        };
        r.spawn()?;
        Ok(r)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = self.dir.file(&format!("{}.{}.log", self.name, self.starts));
        // Each node its own working directory (a cluster node writes nodes.conf there).
        let work = self.dir.file(&self.name);
        std::fs::create_dir_all(&work).context(|| format!("creating {}", work.display()))?;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                &log.display().to_string(),
            ])
            .args(&self.extra)
            .current_dir(&work)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                Error::new(format!(
                    "cannot start redis-server ({e}); `make test` installs it (scripts/bootstrap.sh --with-redis)"
                ))
            })?;
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if self.ping() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(Error::new(format!(
            "redis-server on port {} did not answer PING within {READY_TIMEOUT:?}",
            self.port
        )))
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

    /// Kill it (SIGKILL: Redis vanishes as in a crash).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port (empty: no persistence).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
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
        let child = self
            .child
            .as_ref()
            .context(|| "redis-server is not running".to_string())?;
        let pid = i32::try_from(child.id()).context(|| "redis-server pid".to_string())?;
        kill(Pid::from_raw(pid), signal).context(|| format!("{signal} redis-server {pid}"))
    }

    /// `redis-cli -p PORT ARGS...`: its stdout (bounded by redis-cli's own timeouts).
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        redis_cli(self.port, args)
    }

    /// The number of keys (`DBSIZE`).
    pub fn key_count(&self) -> Result<u64> {
        let out = self.cli(&["DBSIZE"])?;
        out.trim()
            .parse()
            .context(|| format!("DBSIZE answered {out:?}"))
    }
}

fn free_port() -> Result<u16> {
    // Ask the kernel for a free port, then hand it to redis-server (which has no "port 0,
    // tell me" mode).
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context(|| "finding a free port for redis-server".to_string())?
        .port())
}

fn redis_cli(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            Error::new(format!(
                "cannot run redis-cli ({e}); `make test` installs it (scripts/bootstrap.sh --with-redis)"
            ))
        })?;
    if !out.status.success() {
        return Err(Error::new(format!(
            "redis-cli -p {port} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Redis Cluster of `masters` primaries with one replica each, on ephemeral loopback
/// ports, with a short node timeout (1 s) so that a replica takes over a lost primary in a
/// few seconds. Every node is killed on Drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

const NODE_TIMEOUT_MS: u32 = 1000;

impl RedisCluster {
    pub fn start(dir: &RunDir, masters: usize) -> Result<RedisCluster> {
        let mut nodes = Vec::new();
        for i in 0..masters * 2 {
            nodes.push(RedisServer::start_with(
                dir,
                &format!("redis-node{i}"),
                vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    "nodes.conf".into(),
                    // The bus port defaults to port + 10000, which may be taken or out of
                    // range for an ephemeral port.
                    "--cluster-port".into(),
                    free_port()?.to_string(),
                    "--cluster-node-timeout".into(),
                    NODE_TIMEOUT_MS.to_string(),
                ],
            )?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .context(|| "running redis-cli --cluster create".to_string())?;
        if !out.status.success() {
            return Err(Error::new(format!(
                "redis-cli --cluster create failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_healthy(masters, Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// `redis-cluster://127.0.0.1:p1,...` over every node.
    pub fn spec(&self) -> String {
        let list: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis-cluster://{}", list.join(","))
    }

    /// Wait until every running node reports `cluster_state:ok` with `masters` primaries
    /// serving all slots.
    pub fn wait_healthy(&self, masters: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let ok = self.running().all(|n| {
                n.cli(&["CLUSTER", "INFO"])
                    .map(|info| {
                        info.contains("cluster_state:ok")
                            && info.contains("cluster_slots_ok:16384")
                            && info.contains(&format!("cluster_size:{masters}"))
                    })
                    .unwrap_or(false)
            }) && self.masters().map(|m| m.len() == masters).unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::new(format!(
                    "the Redis Cluster is not healthy after {within:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn running(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|n| n.child.is_some())
    }

    /// Indices (into `nodes`) of the running nodes that are primaries with slots, as the
    /// first running node sees them.
    pub fn masters(&self) -> Result<Vec<usize>> {
        let first = self
            .running()
            .next()
            .context(|| "no Redis node is running".to_string())?;
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
            if let Some(i) = self.nodes.iter().position(|n| Some(n.port()) == port) {
                if self.nodes[i].child.is_some() {
                    out.push(i);
                }
            }
        }
        Ok(out)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
