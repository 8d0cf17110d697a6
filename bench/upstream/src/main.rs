//! `laneguard-upstream`: the demo and benchmark upstream behind Envoy.
//!
//! It stands in for the real backend in `make run`, in the integration tests and (later) in
//! the benchmarks, so it must be cheap enough never to be the bottleneck and honest enough to
//! show what Envoy forwarded. Every request gets `200` with a small JSON echo of the path,
//! the method and the `x-laneguard-*` headers that Envoy set (lane, class, tenant, principal,
//! route), and the `x-laneguard-lane` request header is echoed back as a response header, so
//! a client can see which lane (cluster) served it. HTTP/1.1 with keep-alive, on a
//! multi-threaded tokio runtime.
//!
//! It is also the demo's model server (`ai`): `POST /v1/chat/completions` answers like an
//! OpenAI-style provider with `usage` (SSE when `"stream": true`), `GET /v1/models` is
//! cacheable, and `GET /_upstream/stats` counts the requests that reached it.
//!
//! The process contract (see `docs/architecture.md`): `--listen ADDR` (default
//! `127.0.0.1:8080`, port 0 picks a free one), and once the socket accepts connections the
//! process prints exactly one line, `LANEGUARD_READY addr=127.0.0.1:PORT`, to stdout.

mod ai;

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

const USAGE: &str = "\
usage: laneguard-upstream [--listen ADDR]

Answers every HTTP/1.1 request 200 with a JSON echo of what Envoy forwarded, and is the
demo's model server: POST /v1/chat/completions (models large and small), GET /v1/models
(cacheable), GET /_upstream/stats (requests that reached it).

options:
  --listen ADDR   address to listen on (default 127.0.0.1:8080; port 0 picks a free port)
  -h, --help      print this help
";

const LANE: HeaderName = HeaderName::from_static("x-laneguard-lane");
const CLASS: HeaderName = HeaderName::from_static("x-laneguard-class");
const TENANT: HeaderName = HeaderName::from_static("x-laneguard-tenant");
const PRINCIPAL: HeaderName = HeaderName::from_static("x-laneguard-principal");
const ROUTE: HeaderName = HeaderName::from_static("x-laneguard-route");

/// The response body. Field names and order are part of the contract in
/// `docs/architecture.md`; absent headers are `null`.
#[derive(Serialize)]
struct Echo<'a> {
    path: &'a str,
    method: &'a str,
    lane: Option<String>,
    class: Option<String>,
    tenant: Option<String>,
    principal: Option<String>,
    route: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum Command {
    Serve { listen: SocketAddr },
    Help,
}

fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    let mut listen = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--listen" => args
                .next()
                .ok_or_else(|| "--listen needs a value (for example 127.0.0.1:8080)".to_owned())?,
            other => match other.strip_prefix("--listen=") {
                Some(value) => value.to_owned(),
                None => return Err(format!("unknown argument `{other}`")),
            },
        };
        let addr = value
            .parse::<SocketAddr>()
            .map_err(|e| format!("--listen `{value}`: {e} (expected IP:PORT)"))?;
        listen = Some(addr);
    }
    let listen = match listen {
        Some(addr) => addr,
        None => DEFAULT_LISTEN
            .parse()
            .map_err(|e| format!("default listen address: {e}"))?,
    };
    Ok(Command::Serve { listen })
}

fn header(req: &Request<Incoming>, name: &HeaderName) -> Option<String> {
    req.headers()
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Builds the echo for a request. Infallible: a body that cannot be serialized (it always
/// can) falls back to `{}` rather than failing the request.
fn respond(req: &Request<Incoming>) -> Response<ai::Reply> {
    let echo = Echo {
        path: req.uri().path(),
        method: req.method().as_str(),
        lane: header(req, &LANE),
        class: header(req, &CLASS),
        tenant: header(req, &TENANT),
        principal: header(req, &PRINCIPAL),
        route: header(req, &ROUTE),
    };
    let mut body = serde_json::to_vec(&echo).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    let mut resp = Response::new(ai::Reply::Full(Some(Bytes::from(body))));
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(lane) = req.headers().get(&LANE) {
        headers.insert(LANE, lane.clone());
    }
    resp
}

async fn handle(req: Request<Incoming>) -> Result<Response<ai::Reply>, Infallible> {
    let path = req.uri().path().to_owned();
    if path == ai::STATS {
        return Ok(ai::json_reply(hyper::StatusCode::OK, &ai::stats()));
    }
    ai::count_request();
    if path == ai::COMPLETIONS && req.method() == hyper::Method::POST {
        let headers = req.headers().clone();
        let body = match Limited::new(req.into_body(), ai::MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return Ok(ai::json_reply(
                    hyper::StatusCode::PAYLOAD_TOO_LARGE,
                    &serde_json::json!({ "error": { "message": "body too large or broken" } }),
                ))
            }
        };
        return Ok(ai::complete(&headers, &body));
    }
    if path == ai::MODELS && req.method() == hyper::Method::GET {
        return Ok(ai::models());
    }
    let resp = respond(&req);
    // Drain the request body without buffering it, so the connection can be reused.
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
    Ok(resp)
}

async fn serve(listener: TcpListener) {
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Typically EMFILE under a load test: back off instead of spinning.
                eprintln!("laneguard-upstream: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service_fn(handle));
            // Clients hanging up mid-request are normal under load; nothing to report.
            let _ = conn.await;
        });
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(listen: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("listen on {listen}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("local address of {listen}: {e}"))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "LANEGUARD_READY addr={addr}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("write ready line: {e}"))?;
    }
    tokio::select! {
        () = serve(listener) => {}
        () = shutdown_signal() => {}
    }
    Ok(())
}

fn main() -> ExitCode {
    let command = match parse_args(std::env::args().skip(1)) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("laneguard-upstream: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listen = match command {
        Command::Help => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Command::Serve { listen } => listen,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("laneguard-upstream: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("laneguard-upstream: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn listen_defaults_to_demo_port() {
        assert_eq!(
            parse_args(args(&[])),
            Ok(Command::Serve {
                listen: "127.0.0.1:8080".parse().unwrap()
            })
        );
    }

    #[test]
    fn listen_accepts_both_spellings_and_port_zero() {
        let want = Ok(Command::Serve {
            listen: "127.0.0.1:0".parse().unwrap(),
        });
        assert_eq!(parse_args(args(&["--listen", "127.0.0.1:0"])), want);
        assert_eq!(parse_args(args(&["--listen=127.0.0.1:0"])), want);
    }

    #[test]
    fn bad_arguments_are_errors_not_panics() {
        assert!(parse_args(args(&["--listen"])).is_err());
        assert!(parse_args(args(&["--listen", "localhost"])).is_err());
        assert!(parse_args(args(&["--port", "1"])).is_err());
        assert_eq!(parse_args(args(&["--help"])), Ok(Command::Help));
    }

    #[test]
    fn echo_serializes_in_contract_order_with_nulls() {
        let echo = Echo {
            path: "/orders/1",
            method: "GET",
            lane: Some("protected".to_owned()),
            class: None,
            tenant: Some("northwind".to_owned()),
            principal: None,
            route: None,
        };
        assert_eq!(
            serde_json::to_string(&echo).unwrap(),
            r#"{"path":"/orders/1","method":"GET","lane":"protected","class":null,"tenant":"northwind","principal":null,"route":null}"#
        );
    }
}
