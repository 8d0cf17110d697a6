//! A real Envoy, started from a rewritten configuration.
//!
//! Envoy runs in its own process group (`ENVOY` may be a wrapper such as `func-e run`, which
//! runs Envoy as its child), and the whole group is killed on Drop. Readiness is the admin
//! `/ready` endpoint answering `LIVE`, polled; the listeners' ephemeral ports come from the
//! admin `/listeners?format=json`.

use crate::client::Client;
use crate::{repo_root, tail, Context, Error, Result, RunDir};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(25);

#[derive(Clone, Debug)]
pub struct EnvoyOptions {
    /// Worker threads (`--concurrency`). One worker makes local buckets deterministic.
    pub concurrency: u32,
    /// Bound on reaching LIVE (Envoy compiles the .wasm at start).
    pub ready_timeout: Duration,
    /// `-l`.
    pub log_level: String,
}

impl Default for EnvoyOptions {
    fn default() -> EnvoyOptions {
        EnvoyOptions {
            concurrency: 1,
            ready_timeout: Duration::from_secs(60),
            log_level: "info".into(),
        }
    }
}

/// The Envoy command: `$ENVOY` (may be several words, e.g. `func-e run`), else
/// `<root>/.venv/bin/envoy` (what `make` installs).
pub fn envoy_command() -> Result<Vec<String>> {
    if let Some(cmd) = std::env::var_os("ENVOY") {
        let words: Vec<String> = cmd
            .to_string_lossy()
            .split_whitespace()
            .map(String::from)
            .collect();
        if words.is_empty() {
            return Err(Error::new("ENVOY is set but empty"));
        }
        return Ok(words);
    }
    let default = repo_root().join(".venv/bin/envoy");
    if default.is_file() {
        Ok(vec![default.display().to_string()])
    } else {
        Err(Error(format!(
            "no Envoy: {} does not exist and ENVOY is not set. Run `make test` (it installs \
             Envoy into .venv), or set ENVOY to an Envoy binary or wrapper (ENVOY=\"func-e run\").",
            default.display()
        )))
    }
}

/// A running Envoy. Dropping it kills its process group.
pub struct Envoy {
    child: Child,
    dir: RunDir,
    admin: Client,
    listeners: HashMap<String, u16>,
}

/// What happened to an Envoy that was expected not to start.
#[derive(Debug)]
pub struct EnvoyFailure {
    /// Its exit status, if it exited within the time allowed.
    pub status: Option<ExitStatus>,
    /// Whether the admin `/ready` ever said LIVE.
    pub became_live: bool,
    /// The listeners it reported (if it became live).
    pub listeners: HashMap<String, u16>,
    /// The status of a request to each reported listener (connection errors are absent).
    pub served: Vec<(String, u16)>,
    /// Envoy's log (application log, then stderr).
    pub log: String,
    pub dir: PathBuf,
}

struct Spawned {
    child: Child,
    dir: RunDir,
    admin_path: PathBuf,
}

fn spawn(dir: &RunDir, cfg: &serde_yaml::Value, options: &EnvoyOptions) -> Result<Spawned> {
    let cfg_path = dir.file("envoy.yaml");
    let text = serde_yaml::to_string(cfg).context(|| "serialising the Envoy config".into())?;
    std::fs::write(&cfg_path, text).context(|| format!("writing {}", cfg_path.display()))?;
    let admin_path = dir.file("admin-address.txt");
    let log_path = dir.file("envoy.log");
    let stdout = std::fs::File::create(dir.file("envoy.stdout.log"))
        .context(|| "creating envoy.stdout.log".into())?;
    let stderr = std::fs::File::create(dir.file("envoy.stderr.log"))
        .context(|| "creating envoy.stderr.log".into())?;
    let words = envoy_command()?;
    let (program, pre) = words
        .split_first()
        .context(|| "empty Envoy command".into())?;
    let mut cmd = Command::new(program);
    cmd.args(pre)
        .arg("-c")
        .arg(&cfg_path)
        .arg("--concurrency")
        .arg(options.concurrency.to_string())
        // A free shared-memory base id, so parallel tests' Envoys never collide.
        .arg("--use-dynamic-base-id")
        .arg("--admin-address-path")
        .arg(&admin_path)
        .arg("--log-path")
        .arg(&log_path)
        // Flush the log files every 50 ms (default 10 s), so a test can read what Envoy
        // just logged and a failure message shows the latest lines.
        .arg("--file-flush-interval-msec")
        .arg("50")
        .arg("-l")
        .arg(&options.log_level)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .process_group(0);
    let child = cmd
        .spawn()
        .context(|| format!("starting Envoy ({})", words.join(" ")))?;
    Ok(Spawned {
        child,
        dir: dir.clone(),
        admin_path,
    })
}

fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // The child leads its own group (process_group(0)): kill the leader and anything it
        // started (func-e's Envoy).
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The tail of Envoy's log, without the start-up listing of compiled-in extensions.
fn log_tail(dir: &RunDir, lines: usize) -> String {
    let text = std::fs::read_to_string(dir.file("envoy.log")).unwrap_or_default();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !(l.contains("[main]") && l.contains("]   ")))
        .collect();
    kept[kept.len().saturating_sub(lines)..].join("\n")
}

fn logs_of(dir: &RunDir, lines: usize) -> String {
    format!(
        "--- Envoy log (tail of {}) ---\n{}\n--- Envoy stderr (tail) ---\n{}\n--- all logs: {} ---",
        dir.file("envoy.log").display(),
        log_tail(dir, lines),
        tail(&dir.file("envoy.stderr.log"), 20),
        dir.path().display()
    )
}

/// Ask the admin API whether Envoy is LIVE.
fn admin_client(s: &Spawned) -> Option<Client> {
    let addr = std::fs::read_to_string(&s.admin_path).ok()?;
    let addr = addr.trim();
    if addr.is_empty() {
        return None;
    }
    Some(Client::with_timeout(
        format!("http://{addr}"),
        Duration::from_secs(2),
    ))
}

fn is_live(admin: &Client) -> bool {
    admin
        .get("/ready", &[])
        .is_ok_and(|r| r.status == 200 && r.body.trim() == "LIVE")
}

fn listeners(admin: &Client) -> Result<HashMap<String, u16>> {
    let reply = admin.get("/listeners?format=json", &[])?;
    let v = reply.json()?;
    let mut out = HashMap::new();
    let statuses = v
        .get("listener_statuses")
        .and_then(|s| s.as_array())
        .cloned()
        .unwrap_or_default();
    for l in statuses {
        let name = l.get("name").and_then(|n| n.as_str()).unwrap_or_default();
        let port = l
            .pointer("/local_address/socket_address/port_value")
            .and_then(serde_json::Value::as_u64)
            .and_then(|p| u16::try_from(p).ok());
        if let Some(port) = port {
            out.insert(name.to_string(), port);
        }
    }
    Ok(out)
}

impl Envoy {
    /// Start Envoy with `cfg` in a new run directory and wait until it is LIVE.
    pub fn start(label: &str, cfg: &serde_yaml::Value) -> Result<Envoy> {
        Envoy::start_in(RunDir::new(label)?, cfg, EnvoyOptions::default())
    }

    /// Start Envoy with `cfg`, its files in `dir`, and wait until it is LIVE.
    pub fn start_in(dir: RunDir, cfg: &serde_yaml::Value, options: EnvoyOptions) -> Result<Envoy> {
        let mut s = spawn(&dir, cfg, &options)?;
        let deadline = Instant::now() + options.ready_timeout;
        let admin = loop {
            if let Ok(Some(status)) = s.child.try_wait() {
                return Err(Error(format!(
                    "Envoy exited ({status}) before it became LIVE\n{}",
                    logs_of(&dir, 60)
                )));
            }
            if let Some(admin) = admin_client(&s) {
                if is_live(&admin) {
                    break admin;
                }
            }
            if Instant::now() > deadline {
                kill_group(&mut s.child);
                return Err(Error(format!(
                    "Envoy did not become LIVE within {:?}\n{}",
                    options.ready_timeout,
                    logs_of(&dir, 60)
                )));
            }
            thread::sleep(POLL);
        };
        let mut envoy = Envoy {
            child: s.child,
            dir: s.dir,
            admin,
            listeners: HashMap::new(),
        };
        envoy.listeners =
            listeners(&envoy.admin).map_err(|e| Error(format!("{e}\n{}", envoy.logs())))?;
        Ok(envoy)
    }

    /// Start Envoy with a configuration it should refuse. Waits until it exits or `within`
    /// passes; if it became LIVE, records its listeners and what each one answers.
    pub fn start_expecting_failure(
        label: &str,
        cfg: &serde_yaml::Value,
        options: EnvoyOptions,
        within: Duration,
    ) -> Result<EnvoyFailure> {
        let dir = RunDir::new(label)?;
        let mut s = spawn(&dir, cfg, &options)?;
        let deadline = Instant::now() + within;
        let mut became_live = false;
        let mut found = HashMap::new();
        let mut served = Vec::new();
        let status = loop {
            if let Ok(Some(status)) = s.child.try_wait() {
                break Some(status);
            }
            if !became_live {
                if let Some(admin) = admin_client(&s) {
                    if is_live(&admin) {
                        became_live = true;
                        found = listeners(&admin).unwrap_or_default();
                        for (name, port) in &found {
                            let c = Client::with_timeout(
                                format!("http://127.0.0.1:{port}"),
                                Duration::from_secs(2),
                            );
                            if let Ok(r) = c.get("/", &[]) {
                                served.push((name.clone(), r.status));
                            }
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                break None;
            }
            thread::sleep(POLL);
        };
        kill_group(&mut s.child);
        let log = format!(
            "{}\n{}",
            std::fs::read_to_string(dir.file("envoy.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.file("envoy.stderr.log")).unwrap_or_default()
        );
        Ok(EnvoyFailure {
            status,
            became_live,
            listeners: found,
            served,
            log,
            dir: dir.path().to_path_buf(),
        })
    }

    /// The ephemeral port of a listener, by name.
    pub fn port(&self, listener: &str) -> Result<u16> {
        self.listeners.get(listener).copied().ok_or_else(|| {
            Error(format!(
                "Envoy reports no listener {listener:?} (it has {:?})\n{}",
                self.listeners,
                self.logs()
            ))
        })
    }

    pub fn listeners(&self) -> &HashMap<String, u16> {
        &self.listeners
    }

    /// The process id of the child started (Envoy, or a wrapper such as func-e that runs
    /// Envoy in the same process group, whose id this is).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client for the admin API.
    pub fn admin(&self) -> &Client {
        &self.admin
    }

    /// `/stats?filter=REGEX` as (name, value) pairs; values are kept as text (histograms
    /// are not numbers).
    pub fn stats(&self, filter: &str) -> Result<Vec<(String, String)>> {
        let reply = self.admin.get(&format!("/stats?filter={filter}"), &[])?;
        Ok(reply
            .body
            .lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect())
    }

    /// The sum of every counter whose name contains `needle`, among `/stats?filter=filter`.
    pub fn counter_sum(&self, filter: &str, needle: &str) -> Result<u64> {
        Ok(self
            .stats(filter)?
            .iter()
            .filter(|(k, _)| k.contains(needle))
            .filter_map(|(_, v)| v.parse::<u64>().ok())
            .sum())
    }

    /// Poll [`Envoy::counter_sum`] of the `laneguard` stats until it reaches `want` or 5 s
    /// pass (stats are read live, but give Envoy a moment); the last sum read.
    pub fn wait_counter(&self, needle: &str, want: u64) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = self.counter_sum("laneguard", needle)?;
            if n >= want || Instant::now() > deadline {
                return Ok(n);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether Envoy is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Envoy's whole application log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.file("envoy.log")).unwrap_or_default()
    }

    /// The access log (Envoy's stdout in the demo config).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.file("envoy.stdout.log")).unwrap_or_default()
    }

    /// Wait (bounded, polling) until Envoy's log has a line for which `pred` holds.
    pub fn wait_log_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log().lines().find(|l| pred(l)) {
                return Some(l.to_string());
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    /// The log tails and where every log is: append this to assertion messages.
    pub fn logs(&self) -> String {
        logs_of(&self.dir, 40)
    }

    pub fn dir(&self) -> &RunDir {
        &self.dir
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}
