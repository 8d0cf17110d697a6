//! Command-line arguments. Three flags do not need a parser crate; errors name the flag.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

pub const USAGE: &str = "\
Usage: laneguard-service [--listen ADDR] [--config FILE] [--store memory]

Serves envoy.service.ratelimit.v3.RateLimitService and grpc.health.v1.Health over gRPC.

Options:
  --listen ADDR    address to listen on, IP:PORT (PORT may be 0) [default: 127.0.0.1:8081]
  --config FILE    YAML descriptor rules for clients that send no per-descriptor limit
                   (see docs/service.md)
  --store KIND     where bucket state lives: memory [default: memory]
  -h, --help       print this help
  -V, --version    print the version

Once listening, prints `LANEGUARD_READY addr=IP:PORT` on stdout. Logs go to stderr; set
LANEGUARD_LOG=error|warn|info|debug|trace (default info).";

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";

/// The bucket store backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub listen: SocketAddr,
    pub config: Option<PathBuf>,
    pub store: StoreKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run(Args),
    Help,
    Version,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    #[error("{flag} needs a value")]
    MissingValue { flag: String },
    #[error("--listen: `{value}` is not an IP:PORT address")]
    BadListen { value: String },
    #[error("--store: `{value}` is not supported (supported: memory)")]
    BadStore { value: String },
    #[error("{flag} given more than once")]
    Repeated { flag: String },
    #[error("unexpected argument `{arg}`")]
    Unexpected { arg: String },
    #[error("argument is not valid UTF-8: {arg:?}")]
    NotUtf8 { arg: OsString },
}

/// Parse the arguments after the program name. Accepts `--flag value` and `--flag=value`.
pub fn parse<I>(args: I) -> Result<Command, CliError>
where
    I: IntoIterator<Item = OsString>,
{
    let mut listen: Option<String> = None;
    let mut config: Option<PathBuf> = None;
    let mut store: Option<String> = None;

    let mut args = args.into_iter();
    while let Some(raw) = args.next() {
        let arg = raw
            .clone()
            .into_string()
            .map_err(|arg| CliError::NotUtf8 { arg })?;
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--listen" | "--config" | "--store" => {}
            _ => return Err(CliError::Unexpected { arg }),
        }
        let value = match inline {
            Some(v) => v,
            None => match args.next() {
                Some(v) => v.into_string().map_err(|arg| CliError::NotUtf8 { arg })?,
                None => return Err(CliError::MissingValue { flag }),
            },
        };
        let slot_taken = match flag.as_str() {
            "--listen" => listen.replace(value).is_some(),
            "--config" => config.replace(PathBuf::from(value)).is_some(),
            _ => store.replace(value).is_some(),
        };
        if slot_taken {
            return Err(CliError::Repeated { flag });
        }
    }

    let listen_text = listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listen = listen_text
        .parse::<SocketAddr>()
        .map_err(|_| CliError::BadListen { value: listen_text })?;
    let store = match store.as_deref() {
        None | Some("memory") => StoreKind::Memory,
        Some(other) => {
            return Err(CliError::BadStore {
                value: other.to_string(),
            })
        }
    };
    Ok(Command::Run(Args {
        listen,
        config,
        store,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, CliError> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn defaults() {
        assert_eq!(
            p(&[]).unwrap(),
            Command::Run(Args {
                listen: "127.0.0.1:8081".parse().unwrap(),
                config: None,
                store: StoreKind::Memory,
            })
        );
    }

    #[test]
    fn all_flags_both_spellings() {
        let want = Command::Run(Args {
            listen: "127.0.0.1:0".parse().unwrap(),
            config: Some(PathBuf::from("rules.yaml")),
            store: StoreKind::Memory,
        });
        assert_eq!(
            p(&[
                "--listen",
                "127.0.0.1:0",
                "--config",
                "rules.yaml",
                "--store",
                "memory"
            ])
            .unwrap(),
            want
        );
        assert_eq!(
            p(&[
                "--listen=127.0.0.1:0",
                "--config=rules.yaml",
                "--store=memory"
            ])
            .unwrap(),
            want
        );
    }

    #[test]
    fn errors_name_the_flag() {
        assert_eq!(
            p(&["--listen"]).unwrap_err(),
            CliError::MissingValue {
                flag: "--listen".into()
            }
        );
        assert!(matches!(
            p(&["--listen", "localhost"]),
            Err(CliError::BadListen { .. })
        ));
        assert!(matches!(
            p(&["--store", "redis://x"]),
            Err(CliError::BadStore { .. })
        ));
        assert!(matches!(
            p(&["--config", "a", "--config", "b"]),
            Err(CliError::Repeated { .. })
        ));
        assert!(matches!(
            p(&["--port", "1"]),
            Err(CliError::Unexpected { .. })
        ));
        assert_eq!(p(&["--listen", "x", "--help"]).unwrap(), Command::Help);
        assert_eq!(p(&["-V"]).unwrap(), Command::Version);
    }
}
