//! A real Prometheus (Debian's `prometheus` package; `make test-prometheus` installs it with
//! scripts/bootstrap.sh --with-prometheus) on an ephemeral loopback port, scraping the given
//! targets every second, with its data in the run directory. Killed on Drop.

use crate::client::Client;
use crate::{Context, Error, Result, RunDir};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One scrape job: a name and `127.0.0.1:port` + metrics path.
pub struct Target {
    pub job: String,
    pub port: u16,
    pub path: String,
}

pub struct Prometheus {
    child: Child,
    client: Client,
    log: std::path::PathBuf,
}

impl Prometheus {
    pub fn start(dir: &RunDir, targets: &[Target]) -> Result<Prometheus> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context(|| "finding a free port for prometheus".to_string())?
            .port();
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for t in targets {
            config.push_str(&format!(
                "  - job_name: {}\n    metrics_path: {}\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
                t.job, t.path, t.port
            ));
        }
        let config_path = dir.file("prometheus.yml");
        std::fs::write(&config_path, config).context(|| "writing prometheus.yml".into())?;
        let log = dir.file("prometheus.log");
        let out = std::fs::File::create(&log).context(|| "creating prometheus.log".into())?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.file("prometheus-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(out))
            .spawn()
            .map_err(|e| {
                Error::new(format!(
                    "cannot start prometheus ({e}); `make test-prometheus` installs it (scripts/bootstrap.sh --with-prometheus)"
                ))
            })?;
        let p = Prometheus {
            child,
            client: Client::new(format!("http://127.0.0.1:{port}")),
            log,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if p.client.get("/-/ready", &[]).is_ok_and(|r| r.status == 200) {
                return Ok(p);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(Error::new(format!(
            "prometheus did not become ready within {READY_TIMEOUT:?}\n{}",
            p.logs()
        )))
    }

    /// An instant PromQL query over the HTTP API: `(labels, value)` per series.
    pub fn query(
        &self,
        promql: &str,
    ) -> Result<Vec<(serde_json::Map<String, serde_json::Value>, f64)>> {
        let r = self
            .client
            .get(&format!("/api/v1/query?query={}", encode(promql)), &[])?;
        let v = r.json()?;
        if v["status"].as_str() != Some("success") {
            return Err(Error::new(format!("query {promql}: {}", r.body)));
        }
        Ok(v["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|s| {
                let labels = s["metric"].as_object().cloned().unwrap_or_default();
                let value = s["value"][1]
                    .as_str()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(f64::NAN);
                (labels, value)
            })
            .collect())
    }

    pub fn logs(&self) -> String {
        crate::tail(&self.log, 30)
    }
}

/// Percent-encode a query parameter (RFC 3986 unreserved characters stay).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
