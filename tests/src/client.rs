//! A small blocking HTTP client for the gateway and the admin API. Every request has a
//! client-side timeout, and the reply records how long it took (the failure-mode tests
//! assert that nothing hangs).

use crate::{Error, Result};
use std::time::{Duration, Instant};

/// Default client-side timeout for one request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
    timeout: Duration,
}

/// One response, fully read.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Wall time from sending the request to reading the whole body.
    pub elapsed: Duration,
}

impl Reply {
    /// The first value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body).map_err(|e| {
            Error(format!(
                "response body is not JSON ({e}): {}",
                self.describe()
            ))
        })
    }

    /// A JSON string field of the body ("" when absent or not a string).
    pub fn json_str(&self, field: &str) -> String {
        self.json()
            .ok()
            .and_then(|v| v.get(field).and_then(|f| f.as_str()).map(String::from))
            .unwrap_or_default()
    }

    /// Status, headers and body, for assertion messages.
    pub fn describe(&self) -> String {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        format!(
            "HTTP {} in {:?}\n{}\n\n{}",
            self.status,
            self.elapsed,
            headers.join("\n"),
            self.body
        )
    }
}

impl Client {
    /// A client for `base` (`http://127.0.0.1:PORT`).
    pub fn new(base: impl Into<String>) -> Client {
        Client::with_timeout(base, DEFAULT_TIMEOUT)
    }

    pub fn with_timeout(base: impl Into<String>, timeout: Duration) -> Client {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            // Tests talk to 127.0.0.1 only: never through a proxy from the environment.
            .proxy(None)
            .build();
        Client {
            base: base.into(),
            agent: ureq::Agent::new_with_config(config),
            timeout,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// GET `path` with extra headers.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<Reply> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.agent.get(&url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let start = Instant::now();
        let resp = req
            .call()
            .map_err(|e| Error(format!("GET {url} failed after {:?}: {e}", start.elapsed())))?;
        read_reply("GET", &url, start, resp)
    }

    /// POST `body` to `path` with extra headers.
    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<Reply> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.agent.post(&url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let start = Instant::now();
        let resp = req.send(body).map_err(|e| {
            Error(format!(
                "POST {url} failed after {:?}: {e}",
                start.elapsed()
            ))
        })?;
        read_reply("POST", &url, start, resp)
    }

    /// POST `body` as a demo identity (`Authorization: Bearer TOKEN`).
    pub fn post_as(
        &self,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Reply> {
        let auth = format!("Bearer {token}");
        let mut all: Vec<(&str, &str)> = vec![("authorization", auth.as_str())];
        all.extend_from_slice(headers);
        self.post(path, &all, body)
    }

    /// GET `path` as a demo identity (`Authorization: Bearer TOKEN`) with extra headers.
    pub fn get_as(&self, path: &str, token: &str, headers: &[(&str, &str)]) -> Result<Reply> {
        let auth = format!("Bearer {token}");
        let mut all: Vec<(&str, &str)> = vec![("authorization", auth.as_str())];
        all.extend_from_slice(headers);
        self.get(path, &all)
    }
}

fn read_reply(
    method: &str,
    url: &str,
    start: Instant,
    mut resp: ureq::http::Response<ureq::Body>,
) -> Result<Reply> {
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp.body_mut().read_to_string().map_err(|e| {
        Error(format!(
            "{method} {url}: reading the body failed after {:?}: {e}",
            start.elapsed()
        ))
    })?;
    Ok(Reply {
        status,
        headers,
        body,
        elapsed: start.elapsed(),
    })
}
