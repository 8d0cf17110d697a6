//! A flood faster than the harness's own client can send: `h2load --h1` (nghttp2-client,
//! installed by `scripts/bootstrap.sh --with-load`, which `make test` runs), bounded in
//! count and in time, with its summary parsed.

use crate::{Context, Error, Result};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What h2load reported.
#[derive(Debug, Clone, Default)]
pub struct Flood {
    pub done: u64,
    /// Responses by class: 2xx, 4xx, 5xx.
    pub s2xx: u64,
    pub s4xx: u64,
    pub s5xx: u64,
    pub took: Duration,
    pub output: String,
}

/// Send `requests` GETs of `url` over `clients` HTTP/1.1 connections, with `headers`
/// (`name: value`). Killed after `limit` if it has not finished.
pub fn h2load(
    url: &str,
    headers: &[String],
    requests: u64,
    clients: u64,
    limit: Duration,
) -> Result<Flood> {
    let mut cmd = Command::new("h2load");
    cmd.args([
        "--h1",
        "-n",
        &requests.to_string(),
        "-c",
        &clients.to_string(),
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let out_path = std::env::temp_dir().join(format!(
        "laneguard-h2load-{}-{nanos}.txt",
        std::process::id()
    ));
    let out = std::fs::File::create(&out_path).context(|| "creating h2load's output".into())?;
    let started = Instant::now();
    let mut child = cmd
        .arg(url)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .context(|| {
            "starting h2load (apt-get install nghttp2-client; scripts/bootstrap.sh --with-load)"
                .into()
        })?;
    loop {
        if child
            .try_wait()
            .context(|| "waiting for h2load".into())?
            .is_some()
        {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = started.elapsed();
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let (done, s2xx, s4xx, s5xx) = summary(&output);
    let flood = Flood {
        done,
        s2xx,
        s4xx,
        s5xx,
        took,
        output,
    };
    if flood.done == 0 {
        return Err(Error::new(format!(
            "h2load sent nothing in {took:?}:\n{}",
            flood.output
        )));
    }
    Ok(flood)
}

/// (done, 2xx, 4xx, 5xx) from h2load's summary lines:
/// `requests: 6000 total, 6000 started, 6000 done, ...` and
/// `status codes: 2 2xx, 0 3xx, 5998 4xx, 0 5xx`.
fn summary(output: &str) -> (u64, u64, u64, u64) {
    let field = |line: &str, suffix: &str| -> u64 {
        output
            .lines()
            .find(|l| l.trim_start().starts_with(line))
            .and_then(|l| {
                l.split([',', ':'])
                    .find(|w| w.trim().ends_with(suffix))
                    .and_then(|w| w.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    };
    (
        field("requests:", " done"),
        field("status codes:", " 2xx"),
        field("status codes:", " 4xx"),
        field("status codes:", " 5xx"),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_h2load_summary_lines() {
        let out = "finished in 1.20s, 5000.00 req/s, 1.00MB/s\n\
                   requests: 6000 total, 6000 started, 5999 done, 5999 succeeded, 1 failed\n\
                   status codes: 2 2xx, 0 3xx, 5997 4xx, 0 5xx\n";
        assert_eq!(super::summary(out), (5999, 2, 5997, 0));
        assert_eq!(super::summary("nothing"), (0, 0, 0, 0));
    }
}
