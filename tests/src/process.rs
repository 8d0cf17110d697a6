//! The project's own binaries, started the way `docs/architecture.md` specifies: on
//! `--listen 127.0.0.1:0`, ready once they print `LANEGUARD_READY addr=...` to stdout.

use crate::{built_binary, tail, Context, Error, Result, RunDir};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

/// How long a binary may take to print its READY line.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A child process that announced its address. Killed (and reaped) on Drop.
pub struct ReadyChild {
    name: String,
    child: Child,
    addr: SocketAddr,
    stdout_log: PathBuf,
    stderr_log: PathBuf,
    _dir: RunDir,
}

impl ReadyChild {
    /// Spawn `program args...`, tee its stdout to `<name>.stdout.log`, send its stderr to
    /// `<name>.stderr.log`, and wait (bounded) for the READY line.
    pub fn spawn(dir: &RunDir, name: &str, program: &Path, args: &[String]) -> Result<ReadyChild> {
        let stdout_log = dir.file(&format!("{name}.stdout.log"));
        let stderr_log = dir.file(&format!("{name}.stderr.log"));
        let stderr = std::fs::File::create(&stderr_log)
            .context(|| format!("creating {}", stderr_log.display()))?;
        let mut child = Command::new(program)
            .args(args)
            .current_dir(crate::repo_root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .context(|| format!("starting {} {}", program.display(), args.join(" ")))?;

        // A thread copies stdout to the log for the child's whole life (so the child never
        // blocks on a full pipe) and reports the READY line once.
        let (tx, rx) = mpsc::channel::<String>();
        let out = child.stdout.take();
        let log_path = stdout_log.clone();
        thread::spawn(move || {
            let Some(out) = out else { return };
            let mut log = std::fs::File::create(&log_path).ok();
            let mut tx = Some(tx);
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(log) = log.as_mut() {
                    let _ = writeln!(log, "{line}");
                }
                if let Some(rest) = line.trim().strip_prefix("LANEGUARD_READY addr=") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(rest.trim().to_string());
                    }
                }
            }
        });

        let mut ready = ReadyChild {
            name: name.to_string(),
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stdout_log,
            stderr_log,
            _dir: dir.clone(),
        };
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(addr) => {
                ready.addr = addr.parse().context(|| {
                    format!("{name} printed READY with an unparsable address {addr:?}")
                })?;
                Ok(ready)
            }
            Err(e) => {
                let why = match e {
                    mpsc::RecvTimeoutError::Timeout => {
                        format!("did not print `LANEGUARD_READY addr=...` within {READY_TIMEOUT:?}")
                    }
                    mpsc::RecvTimeoutError::Disconnected => {
                        let status = ready
                            .child
                            .wait()
                            .map(|s| s.to_string())
                            .unwrap_or_default();
                        format!("exited ({status}) before printing `LANEGUARD_READY addr=...`")
                    }
                };
                Err(Error(format!(
                    "{name} ({} {}) {why}\n--- {name} stderr (tail) ---\n{}\n--- {name} stdout (tail) ---\n{}",
                    program.display(),
                    args.join(" "),
                    tail(&ready.stderr_log, 40),
                    tail(&ready.stdout_log, 20),
                )))
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of a `PREFIX addr=IP:PORT` line the child printed before its READY line
    /// (`LANEGUARD_METRICS`), from its stdout log.
    pub fn announced(&self, prefix: &str) -> Option<SocketAddr> {
        let text = std::fs::read_to_string(&self.stdout_log).ok()?;
        let want = format!("{prefix} addr=");
        text.lines()
            .find_map(|l| l.trim().strip_prefix(want.as_str()))
            .and_then(|a| a.trim().parse().ok())
    }

    /// Send the process a signal (SIGSTOP/SIGCONT to hang and resume it).
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = i32::try_from(self.child.id()).context(|| "pid out of range".to_string())?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .context(|| format!("sending {signal} to {}", self.name))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The tails of both logs, for error messages.
    pub fn logs(&self) -> String {
        format!(
            "--- {n} stderr (tail) ---\n{}\n--- {n} stdout (tail) ---\n{}",
            tail(&self.stderr_log, 30),
            tail(&self.stdout_log, 10),
            n = self.name
        )
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ReadyChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `laneguard-service`: the rate-limit service. It can be stopped mid-test (to exercise the
/// failure modes) and restarted on the same port.
pub struct Service {
    dir: RunDir,
    args: Vec<String>,
    port: u16,
    child: Option<ReadyChild>,
    starts: usize,
}

impl Service {
    /// Start on an ephemeral port with extra arguments (for example `--config FILE`).
    pub fn start(dir: &RunDir, extra: &[&str]) -> Result<Service> {
        let mut service = Service {
            dir: dir.clone(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            port: 0,
            child: None,
            starts: 0,
        };
        service.spawn(0)?;
        Ok(service)
    }

    fn spawn(&mut self, port: u16) -> Result<()> {
        let bin = built_binary("laneguard-service")?;
        let mut args = vec!["--listen".to_string(), format!("127.0.0.1:{port}")];
        args.extend(self.args.iter().cloned());
        let name = if self.starts == 0 {
            "service".to_string()
        } else {
            format!("service.{}", self.starts)
        };
        let child = ReadyChild::spawn(&self.dir, &name, &bin, &args)?;
        self.port = child.addr().port();
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kill the service (SIGKILL, as a crash would). Its port stays reserved for
    /// [`Service::restart`] only by convention.
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// Hang the service (SIGSTOP): it keeps its port and connections but answers nothing,
    /// as a service stuck in a long pause would, until [`Service::resume`].
    pub fn pause(&self) -> Result<()> {
        self.running()?.signal(nix::sys::signal::Signal::SIGSTOP)
    }

    /// Resume a paused service (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.running()?.signal(nix::sys::signal::Signal::SIGCONT)
    }

    fn running(&self) -> Result<&ReadyChild> {
        self.child
            .as_ref()
            .context(|| "the service is stopped".to_string())
    }

    /// Start it again on the same port, so Envoy's cluster reaches it again.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn(self.port)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ReadyChild::is_running)
    }

    /// The running service's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.child.id())
    }

    /// `http://IP:PORT/metrics` of a service started with `--metrics-addr`, from the
    /// `LANEGUARD_METRICS addr=...` line it printed before READY.
    pub fn metrics_url(&self) -> Result<String> {
        self.child
            .as_ref()
            .and_then(|c| c.announced("LANEGUARD_METRICS"))
            .map(|a| format!("http://{a}/metrics"))
            .ok_or_else(|| {
                Error::new(format!(
                    "the service printed no LANEGUARD_METRICS line (started with --metrics-addr?)\n{}",
                    self.logs()
                ))
            })
    }

    pub fn logs(&self) -> String {
        self.child
            .as_ref()
            .map(ReadyChild::logs)
            .unwrap_or_else(|| "(service stopped)".into())
    }
}

/// `laneguard-upstream`: answers 200 with a JSON echo of what Envoy forwarded.
pub struct Upstream {
    child: ReadyChild,
}

impl Upstream {
    pub fn start(dir: &RunDir) -> Result<Upstream> {
        let bin = built_binary("laneguard-upstream")?;
        let args = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
        Ok(Upstream {
            child: ReadyChild::spawn(dir, "upstream", &bin, &args)?,
        })
    }

    pub fn port(&self) -> u16 {
        self.child.addr().port()
    }

    pub fn logs(&self) -> String {
        self.child.logs()
    }
}

/// A TCP server that accepts connections and never answers: a rate-limit service that
/// hangs. Not a process: a thread in the test binary, stopped on Drop.
pub struct BlackHole {
    port: u16,
    stop: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl BlackHole {
    pub fn start() -> Result<BlackHole> {
        let listener =
            TcpListener::bind("127.0.0.1:0").context(|| "binding a black hole".into())?;
        let port = listener
            .local_addr()
            .context(|| "black hole address".into())?
            .port();
        listener
            .set_nonblocking(true)
            .context(|| "black hole nonblocking".into())?;
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let (stop2, held2) = (stop.clone(), held.clone());
        thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Ok(mut h) = held2.lock() {
                            h.push(stream);
                        }
                    }
                    // Nothing to accept: poll again shortly (this is an accept loop, not
                    // a readiness wait).
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(BlackHole { port, stop, held })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many connections it has swallowed so far.
    pub fn connections(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(mut h) = self.held.lock() {
            h.clear();
        }
    }
}
