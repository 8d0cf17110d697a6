//! A real `redis-server` on an ephemeral loopback port, for tests where Redis is involved.
//! `make test` installs redis-server when it is missing (scripts/bootstrap.sh --with-redis).
//! Stoppable and restartable on the same port, to exercise Redis going away; killed on Drop.

use crate::{Context, Error, Result, RunDir};
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
}

impl RedisServer {
    pub fn start(dir: &RunDir) -> Result<RedisServer> {
        // Ask the kernel for a free port, then hand it to redis-server (which has no
        // "port 0, tell me" mode).
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context(|| "finding a free port for redis-server".to_string())?
            .port();
        let mut r = RedisServer {
            dir: dir.clone(),
            port,
            child: None,
            starts: 0,
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
        let log = self.dir.file(&format!("redis.{}.log", self.starts));
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
            .current_dir(self.dir.path())
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
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
