//! The demo model server: a stand-in for an OpenAI-style provider behind the gateway.
//!
//! `POST /v1/chat/completions` takes `model` (`large` or `small`), `messages`,
//! `max_tokens` / `max_completion_tokens` and `stream`, and answers OpenAI-shaped JSON with
//! `usage` (or, with `"stream": true`, `text/event-stream` chunks whose final chunk carries
//! `usage`, then `data: [DONE]`). The answer names the model that served it (`model`, and
//! the `x-served-model` response header), so a client can see a downgrade.
//!
//! Token counts are deterministic, so tests can predict them: `prompt_tokens` is the
//! message contents' length in bytes divided by 4, rounded up (at least 1);
//! `completion_tokens` is 16, or the `x-demo-completion-tokens` request header, capped by
//! the request's `max_tokens`, which the server honours (`finish_reason: length`).
//!
//! Demo knobs (request headers, for tests and the README walkthrough):
//! - `x-demo-completion-tokens: N` how many tokens to "generate" before `max_tokens`;
//! - `x-demo-usage: body | omit | invalid | header` where usage is reported: in the body
//!   (default), nowhere, as a negative number, or only in the `x-upstream-total-tokens`
//!   response header;
//! - `x-demo-chunk-delay-ms: N` pause between stream chunks (at most 1000).
//!
//! `GET /v1/models` lists the models with `cache-control: public, max-age=300`, so Envoy's
//! cache filter may keep it. `GET /_upstream/stats` reports how many requests reached this
//! process (every other request counts), per model for completions: tests read it to prove
//! that a request was, or was not, answered by the upstream.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{HeaderMap, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub const COMPLETIONS: &str = "/v1/chat/completions";
pub const MODELS: &str = "/v1/models";
pub const STATS: &str = "/_upstream/stats";
/// The demo's two models.
pub const KNOWN_MODELS: [&str; 2] = ["large", "small"];
pub const DEFAULT_COMPLETION_TOKENS: u64 = 16;
/// Request bodies above this are refused (413).
pub const MAX_BODY: usize = 1024 * 1024;
pub const USAGE_HEADER: &str = "x-upstream-total-tokens";

static REQUESTS: AtomicU64 = AtomicU64::new(0);
static BY_MODEL: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Count a request that reached the upstream.
pub fn count_request() {
    REQUESTS.fetch_add(1, Ordering::Relaxed);
}

fn count_model(model: &str) {
    if let Ok(mut m) = BY_MODEL.lock() {
        *m.entry(model.to_string()).or_default() += 1;
    }
}

/// `GET /_upstream/stats`.
pub fn stats() -> Value {
    let by_model = BY_MODEL.lock().map(|m| m.clone()).unwrap_or_default();
    json!({ "requests": REQUESTS.load(Ordering::Relaxed), "completions": by_model })
}

/// A response body: whole, or a stream fed by a task.
pub enum Reply {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Reply::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Reply::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Reply::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Reply::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Reply::Full(None) => SizeHint::with_exact(0),
            Reply::Stream(_) => SizeHint::default(),
        }
    }
}

pub fn json_reply(status: StatusCode, v: &Value) -> Response<Reply> {
    let mut body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    let mut resp = Response::new(Reply::Full(Some(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, message: &str) -> Response<Reply> {
    json_reply(
        status,
        &json!({ "error": { "message": message, "type": "invalid_request_error" } }),
    )
}

/// `GET /v1/models`: cacheable.
pub fn models() -> Response<Reply> {
    let data: Vec<Value> = KNOWN_MODELS
        .iter()
        .map(|m| json!({ "id": m, "object": "model", "owned_by": "laneguard-demo" }))
        .collect();
    let mut resp = json_reply(
        StatusCode::OK,
        &json!({ "object": "list", "data": data, "served_at": REQUESTS.load(Ordering::Relaxed) }),
    );
    resp.headers_mut().insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    resp
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UsageMode {
    Body,
    Omit,
    Invalid,
    Header,
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn limit_of(v: &Value) -> Result<Option<u64>, String> {
    match v {
        Value::Null => Ok(None),
        v => match v.as_u64() {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err("max_tokens must be a positive integer".into()),
        },
    }
}

/// What a completion request asks for, read from its body and the demo headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub truncated: bool,
    pub stream: bool,
}

pub fn ask(headers: &HeaderMap, body: &[u8]) -> Result<Ask, (StatusCode, String)> {
    let bad = |m: &str| (StatusCode::BAD_REQUEST, m.to_string());
    let v: Value = serde_json::from_slice(body).map_err(|_| bad("the body is not JSON"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("the body is not a JSON object"))?;
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("`model` is required"))?;
    if !KNOWN_MODELS.contains(&model) {
        return Err((
            StatusCode::NOT_FOUND,
            format!("model {model:?} does not exist (large, small)"),
        ));
    }
    let limit = match (
        obj.get("max_completion_tokens").map(limit_of).transpose(),
        obj.get("max_tokens").map(limit_of).transpose(),
    ) {
        (Err(e), _) | (_, Err(e)) => return Err(bad(&e)),
        (Ok(a), Ok(b)) => a.flatten().or(b.flatten()),
    };
    let chars: usize = obj
        .get("messages")
        .and_then(Value::as_array)
        .map(|msgs| {
            msgs.iter()
                .filter_map(|m| m.get("content").and_then(Value::as_str))
                .map(str::len)
                .sum()
        })
        .unwrap_or(0);
    let prompt_tokens = (chars as u64).div_ceil(4).max(1);
    let wanted = header_str(headers, "x-demo-completion-tokens")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_COMPLETION_TOKENS)
        .min(100_000);
    let completion_tokens = limit.map_or(wanted, |l| wanted.min(l));
    Ok(Ask {
        model: model.to_string(),
        prompt_tokens,
        completion_tokens,
        truncated: completion_tokens < wanted,
        stream: obj.get("stream") == Some(&Value::Bool(true)),
    })
}

fn usage_mode(h: &HeaderMap) -> UsageMode {
    match header_str(h, "x-demo-usage") {
        Some("omit") => UsageMode::Omit,
        Some("invalid") => UsageMode::Invalid,
        Some("header") => UsageMode::Header,
        _ => UsageMode::Body,
    }
}

fn usage(a: &Ask, mode: UsageMode) -> Value {
    match mode {
        UsageMode::Invalid => {
            json!({ "prompt_tokens": -1, "completion_tokens": -1, "total_tokens": -5 })
        }
        _ => json!({
            "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.completion_tokens,
            "total_tokens": a.prompt_tokens + a.completion_tokens,
        }),
    }
}

/// `POST /v1/chat/completions`.
pub fn complete(headers: &HeaderMap, body: &[u8]) -> Response<Reply> {
    let a = match ask(headers, body) {
        Ok(a) => a,
        Err((status, message)) => return error(status, &message),
    };
    count_model(&a.model);
    let id = format!("chatcmpl-demo-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let mode = usage_mode(headers);
    let finish = if a.truncated { "length" } else { "stop" };
    let mut resp = if a.stream {
        stream(&a, &id, mode, finish, headers)
    } else {
        let content = words(&a);
        let mut v = json!({
            "id": id,
            "object": "chat.completion",
            "created": 0,
            "model": a.model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": content },
                "finish_reason": finish,
            }],
        });
        if matches!(mode, UsageMode::Body | UsageMode::Invalid) {
            if let Some(o) = v.as_object_mut() {
                o.insert("usage".into(), usage(&a, mode));
            }
        }
        json_reply(StatusCode::OK, &v)
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&a.model) {
        h.insert("x-served-model", v);
    }
    if mode == UsageMode::Header {
        if let Ok(v) = HeaderValue::from_str(&(a.prompt_tokens + a.completion_tokens).to_string()) {
            h.insert(USAGE_HEADER, v);
        }
    }
    resp
}

fn words(a: &Ask) -> String {
    let mut s = format!("[{}]", a.model);
    for i in 0..a.completion_tokens.min(4096) {
        s.push_str(&format!(" t{i}"));
    }
    s
}

fn stream(
    a: &Ask,
    id: &str,
    mode: UsageMode,
    finish: &str,
    headers: &HeaderMap,
) -> Response<Reply> {
    let delay = header_str(headers, "x-demo-chunk-delay-ms")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .min(1000);
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let chunk = |delta: Value, finish: Option<&str>| {
        let v = json!({
            "id": id, "object": "chat.completion.chunk", "created": 0, "model": a.model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
        });
        Bytes::from(format!("data: {v}\n\n"))
    };
    let mut events = vec![chunk(
        json!({ "role": "assistant", "content": format!("[{}]", a.model) }),
        None,
    )];
    for i in 0..a.completion_tokens.min(4096) {
        events.push(chunk(json!({ "content": format!(" t{i}") }), None));
    }
    events.push(chunk(json!({}), Some(finish)));
    if matches!(mode, UsageMode::Body | UsageMode::Invalid) {
        let v = json!({
            "id": id, "object": "chat.completion.chunk", "created": 0, "model": a.model,
            "choices": [], "usage": usage(a, mode),
        });
        events.push(Bytes::from(format!("data: {v}\n\n")));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    tokio::spawn(async move {
        for e in events {
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if tx.send(e).await.is_err() {
                // The client (Envoy) went away: stop generating.
                return;
            }
        }
    });
    let mut resp = Response::new(Reply::Stream(rx));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn token_counts_are_predictable_and_max_tokens_is_honoured() {
        let body = br#"{"model":"large","messages":[{"role":"user","content":"hello world!"}],"max_tokens":5}"#;
        let a = ask(&HeaderMap::new(), body).unwrap();
        assert_eq!(a.prompt_tokens, 3);
        assert_eq!(a.completion_tokens, 5);
        assert!(a.truncated);
        let a = ask(&headers(&[("x-demo-completion-tokens", "2")]), body).unwrap();
        assert_eq!((a.completion_tokens, a.truncated), (2, false));
        let a = ask(
            &HeaderMap::new(),
            br#"{"model":"small","max_completion_tokens":100}"#,
        )
        .unwrap();
        assert_eq!(
            (a.prompt_tokens, a.completion_tokens),
            (1, DEFAULT_COMPLETION_TOKENS)
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        let h = HeaderMap::new();
        assert_eq!(ask(&h, b"nope").unwrap_err().0, StatusCode::BAD_REQUEST);
        assert_eq!(ask(&h, b"{}").unwrap_err().0, StatusCode::BAD_REQUEST);
        assert_eq!(
            ask(&h, br#"{"model":"huge"}"#).unwrap_err().0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            ask(&h, br#"{"model":"large","max_tokens":-2}"#)
                .unwrap_err()
                .0,
            StatusCode::BAD_REQUEST
        );
    }
}
