//! # laneguard-tests
//!
//! The integration-test harness, and the only code in the repository that starts processes
//! (STYLE rule 9). It runs the real parts the way an operator would: `laneguard-upstream`
//! and `laneguard-service` on ephemeral ports (each announces itself with the
//! `LANEGUARD_READY addr=...` line of `docs/architecture.md`), and a real Envoy whose
//! configuration is the demo YAML (`envoy/demo/envoy.yaml`) rewritten to point at them.
//! Readiness is polled (the READY line, Envoy's admin `/ready`), never slept for, and every
//! child is killed when its handle is dropped, including when a test panics.
//!
//! Every process writes its logs into a run directory under `target/laneguard-tests/`. The
//! directory is removed when the test passes and kept when it fails; assertion messages
//! include the tail of Envoy's log and the directory's path. `docs/testing.md` explains how to
//! run one test and where to look.

pub mod certs;
pub mod chaos;
pub mod client;
pub mod config;
pub mod envoy;
pub mod health;
pub mod load;
pub mod process;
pub mod prometheus;
pub mod redis;
pub mod rundir;
pub mod scrape;
pub mod traffic;

use std::fmt;
use std::path::{Path, PathBuf};

pub use client::{Client, Reply};
pub use config::{demo_config, demo_policy, DemoPorts};
pub use envoy::{Envoy, EnvoyFailure, EnvoyOptions};
pub use process::{BlackHole, Service, Upstream};
pub use redis::{RedisCluster, RedisServer, Shape};
pub use rundir::RunDir;
pub use scrape::Scrape;

/// A harness error: what failed, with enough context (log tails, paths) to debug it from
/// the test output alone. The same type as the Redis harness's, so its errors need no
/// conversion.
pub use laneguard_redis_harness::Error;

pub type Result<T> = std::result::Result<T, Error>;

/// Attach context to any displayable error.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {e}", what())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.ok_or_else(|| Error(what()))
    }
}

/// The repository root (the workspace), found from this crate's manifest directory.
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| here.to_path_buf())
}

/// The workspace's target directory (`CARGO_TARGET_DIR` if set, else `<root>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                repo_root().join(dir)
            }
        }
        None => repo_root().join("target"),
    }
}

/// A binary the Makefile builds before `cargo test` runs (`target/debug/NAME`).
pub fn built_binary(name: &str) -> Result<PathBuf> {
    let path = target_dir().join("debug").join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error(format!(
            "{} is missing: the integration tests run the built binaries. Run `make test` \
             (or `make build`, or `cargo build -p laneguard-service -p laneguard-upstream -p laneguard-replay`) first.",
            path.display()
        )))
    }
}

/// The filter, as the Makefile builds it.
pub fn wasm_path() -> Result<PathBuf> {
    let path = target_dir()
        .join("wasm32-wasip1")
        .join("release")
        .join("laneguard_wasm.wasm");
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error(format!(
            "{} is missing: run `make test` (or `make build`, or `cargo build --release \
             --target wasm32-wasip1 -p laneguard-wasm`) first.",
            path.display()
        )))
    }
}

/// The demo identities of `envoy/demo/tokens.env` (`NAME=TOKEN` lines, `#` comments).
pub fn tokens() -> Result<std::collections::HashMap<String, String>> {
    let path = repo_root().join("envoy/demo/tokens.env");
    let text = std::fs::read_to_string(&path).context(|| format!("reading {}", path.display()))?;
    Ok(parse_env(&text))
}

/// One demo token by name (`NORTHWIND_ERP`, `ACME_WEB`, ...).
pub fn token(name: &str) -> Result<String> {
    tokens()?
        .remove(name)
        .context(|| format!("envoy/demo/tokens.env has no {name}"))
}

/// A demo token for any claims, minted with the demo key (`envoy/demo/mint-tokens.py
/// --mint`): for identities the committed tokens do not cover (another tenant, a user id
/// with `|`, spaces or non-ASCII, a claim with control characters).
pub fn mint_token(tenant: &str, principal: &str, sub: &str) -> Result<String> {
    let script = repo_root().join("envoy/demo/mint-tokens.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args(["--mint", tenant, principal, sub])
        .output()
        .context(|| format!("running {} --mint", script.display()))?;
    if !out.status.success() {
        return Err(Error(format!(
            "{} --mint {tenant:?} {principal:?} {sub:?} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn parse_env(text: &str) -> std::collections::HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim().trim_matches('"').trim_matches('\'');
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

/// Read a policy file from `tests/policies/`.
pub fn test_policy(relative: &str) -> Result<String> {
    let path = repo_root().join("tests/policies").join(relative);
    std::fs::read_to_string(&path).context(|| format!("reading {}", path.display()))
}

/// The last `n` lines of a text file ("" if it cannot be read).
pub fn tail(path: &Path, n: usize) -> String {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => return String::new(),
    };
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Call `f` every 200 ms until it returns `Some`, for up to `timeout` (a readiness poll,
/// never a fixed sleep).
pub fn poll<T>(timeout: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The whole stack the demo runs: upstream, rate-limit service and Envoy with the demo
/// configuration, its policy replaced by `policy`. Dropping it stops all three.
pub struct Stack {
    pub envoy: Envoy,
    pub service: Service,
    pub upstream: Upstream,
    pub client: Client,
}

impl Stack {
    /// Start the stack with Envoy on one worker (deterministic local buckets).
    pub fn start(label: &str, policy: &str) -> Result<Stack> {
        Stack::start_with(label, policy, EnvoyOptions::default(), |_| Ok(()))
    }

    /// Start the stack, letting `edit` change the rewritten Envoy configuration last.
    pub fn start_with(
        label: &str,
        policy: &str,
        options: EnvoyOptions,
        edit: impl FnOnce(&mut serde_yaml::Value) -> Result<()>,
    ) -> Result<Stack> {
        Stack::start_in(RunDir::new(label)?, policy, &[], options, edit)
    }

    /// Start the stack in `dir`, with extra arguments for the service (`--store ...`).
    pub fn start_in(
        dir: RunDir,
        policy: &str,
        service_args: &[&str],
        options: EnvoyOptions,
        edit: impl FnOnce(&mut serde_yaml::Value) -> Result<()>,
    ) -> Result<Stack> {
        let upstream = Upstream::start(&dir)?;
        let service = Service::start(&dir, service_args)?;
        let mut cfg = demo_config()?;
        config::rewrite_demo(
            &mut cfg,
            &DemoPorts {
                service: service.port(),
                upstream: upstream.port(),
            },
        )?;
        config::set_policy(&mut cfg, policy)?;
        edit(&mut cfg)?;
        let envoy = Envoy::start_in(dir, &cfg, options)?;
        let client = Client::new(format!("http://127.0.0.1:{}", envoy.port("gateway")?));
        Ok(Stack {
            envoy,
            service,
            upstream,
            client,
        })
    }

    /// Context for assertion messages: Envoy's log tail and where all logs are.
    pub fn logs(&self) -> String {
        self.envoy.logs()
    }
}

/// Envoy's native `envoy.filters.http.ratelimit` (`envoy/native-ratelimit.yaml`) in front of
/// the upstream, with laneguard-service as its rate-limit service. Dropping it stops all three.
pub struct NativeStack {
    pub envoy: Envoy,
    pub service: Service,
    pub upstream: Upstream,
    pub client: Client,
}

impl NativeStack {
    /// `edit` may change the rewritten configuration (ports already point at the children).
    pub fn start(
        dir: RunDir,
        service_args: &[&str],
        edit: impl FnOnce(&mut serde_yaml::Value) -> Result<()>,
    ) -> Result<NativeStack> {
        let cfg = config::load("envoy/native-ratelimit.yaml")?;
        let rls = config::http_filter(&cfg, "envoy.filters.http.ratelimit")?["typed_config"]
            ["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"]
            .as_str()
            .ok_or_else(|| Error::new("native-ratelimit.yaml names no rate-limit cluster"))?
            .to_string();
        NativeStack::start_config(dir, cfg, &rls, service_args, edit)
    }

    /// Envoy's native `envoy.filters.http.rate_limit_quota` (`envoy/rlqs.yaml`), with
    /// laneguard-service as its RLQS server (`service_args` should include `--policy`).
    pub fn start_rlqs(
        dir: RunDir,
        service_args: &[&str],
        edit: impl FnOnce(&mut serde_yaml::Value) -> Result<()>,
    ) -> Result<NativeStack> {
        let cfg = config::load("envoy/rlqs.yaml")?;
        let rlqs = config::http_filter(&cfg, "envoy.filters.http.rate_limit_quota")?
            ["typed_config"]["rlqs_server"]["envoy_grpc"]["cluster_name"]
            .as_str()
            .ok_or_else(|| Error::new("rlqs.yaml names no RLQS cluster"))?
            .to_string();
        NativeStack::start_config(dir, cfg, &rlqs, service_args, edit)
    }

    /// `cfg` with its admin and listener ports made ephemeral, the cluster named `rls`
    /// pointed at a new laneguard-service and every other cluster at a new upstream.
    pub fn start_config(
        dir: RunDir,
        mut cfg: serde_yaml::Value,
        rls: &str,
        service_args: &[&str],
        edit: impl FnOnce(&mut serde_yaml::Value) -> Result<()>,
    ) -> Result<NativeStack> {
        let upstream = Upstream::start(&dir)?;
        let service = Service::start(&dir, service_args)?;
        config::set_admin_port(&mut cfg, 0)?;
        config::set_all_listener_ports(&mut cfg, 0)?;
        for cluster in config::cluster_names(&cfg) {
            let port = if cluster == rls {
                service.port()
            } else {
                upstream.port()
            };
            config::point_cluster(&mut cfg, &cluster, port)?;
        }
        edit(&mut cfg)?;
        let listener = config::listener_names(&cfg)
            .into_iter()
            .next()
            .ok_or_else(|| Error::new("the Envoy config has no listener"))?;
        let envoy = Envoy::start_in(dir, &cfg, EnvoyOptions::default())?;
        let client = Client::new(format!("http://127.0.0.1:{}", envoy.port(&listener)?));
        Ok(NativeStack {
            envoy,
            service,
            upstream,
            client,
        })
    }
}

/// One of the built CLIs (`laneguard-policy`, `laneguard-replay`, ...) with `args`, from the
/// repository root, as a user runs it: (exit code, stdout, stderr).
pub fn run_cli(binary: &str, args: &[&str]) -> Result<(i32, String, String)> {
    let out = std::process::Command::new(built_binary(binary)?)
        .args(args)
        .current_dir(repo_root())
        .output()
        .context(|| format!("running {binary} {}", args.join(" ")))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `laneguard-audit ARGS...`: (exit code, stdout followed by stderr).
pub fn audit_cli(args: &[&str]) -> Result<(i32, String)> {
    let out = std::process::Command::new(built_binary("laneguard-audit")?)
        .args(args)
        .output()
        .context(|| format!("running laneguard-audit {}", args.join(" ")))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_lines() {
        let env = parse_env("# c\nA=x.y.z\n\n B = 'q' \nnot a line\n");
        assert_eq!(env.get("A").map(String::as_str), Some("x.y.z"));
        assert_eq!(env.get("B").map(String::as_str), Some("q"));
        assert_eq!(env.len(), 2);
    }
}
