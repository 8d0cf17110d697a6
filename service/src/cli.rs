//! Command-line arguments. A handful of flags do not need a parser crate; errors name the
//! flag.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::store::redis::{cluster_nodes, CLUSTER_SCHEME, REDIS_SCHEME};

pub const USAGE: &str = "\
Usage: laneguard-service [--listen ADDR] [--config FILE] [--store STORE]
                         [--grants on|off] [--lease-ttl-ms MS] [--redis-timeout-ms MS]
                         [--audit-log FILE] [--audit-rotate-size SIZE] [--audit-rotate-hours H]
                         [--audit-hmac-key-file FILE] [--audit-head-every-s S]
                         [--metrics-addr ADDR] [--policy FILE] [--rlqs-ttl-s S]
                         [--max-buckets N] [--tls-cert FILE --tls-key FILE
                         [--tls-client-ca FILE]] [--usage-flush-ms MS]

Serves envoy.service.ratelimit.v3.RateLimitService and grpc.health.v1.Health over gRPC.

Options:
  --listen ADDR           address to listen on, IP:PORT (PORT may be 0)
                          [default: 127.0.0.1:8081]
  --config FILE           YAML descriptor rules for clients that send no per-descriptor
                          limit (see docs/service.md)
  --store STORE           where bucket state lives [default: memory]:
                            memory
                            redis://[USER:PASSWORD@]HOST:PORT[/DB]
                            redis-cluster://HOST:PORT,HOST:PORT,...
  --max-buckets N         the memory store holds at most N buckets; at the cap, idle
                          buckets go first, then the least recently used
                          (docs/operations.md, Service memory) [default: 1000000]
  --grants on|off         grant leases (DescriptorStatus.quota) to callers that send the
                          x-laneguard-lease metadata [default: on]
  --lease-ttl-ms MS       how long a granted lease is valid [default: 2000]
  --redis-timeout-ms MS   bound on every Redis call, connecting included [default: 250]
  --audit-log FILE        keep the filter's audit records in FILE, an append-only
                          hash-chained log (laneguard-audit verify|query FILE)
  --audit-rotate-size SIZE
                          rotate FILE to FILE.<first seq> once it holds SIZE bytes
                          (suffix K, M or G; 0: never by size) [default: 64M]
  --audit-rotate-hours H  rotate FILE once it is H hours old (0: never by age)
                          [default: 24]
  --audit-hmac-key-file FILE
                          chain the log with HMAC-SHA-256 under the key in FILE (at
                          least 16 bytes); verify with laneguard-audit --hmac-key-file
  --audit-head-every-s S  log the chain's head hash every S seconds when it moved
                          [default: 60]
  --metrics-addr ADDR     serve Prometheus metrics (text format) at http://ADDR/metrics,
                          IP:PORT (PORT may be 0); off unless given. Series:
                          docs/operations.md (Service metrics); also the usage ledger
                          at http://ADDR/usage (laneguard-usage export, docs/usage.md)
  --usage-flush-ms MS     how often the usage ledger's counts are written to the store
                          (a crash loses at most this much) [default: 1000]
  --policy FILE           a laneguard policy (or an Envoy YAML embedding one): serve
                          envoy.service.rate_limit_quota.v3.RateLimitQuotaService (RLQS)
                          for Envoy's native rate_limit_quota filter (docs/rlqs.md)
  --rlqs-ttl-s S          how long an RLQS assignment stays valid without a refresh
                          (Envoy reports every 5 s) [default: 15]
  --tls-cert FILE         serve gRPC over TLS with this PEM certificate chain
                          (needs --tls-key); plaintext otherwise
  --tls-key FILE          the PEM private key of --tls-cert
  --tls-client-ca FILE    mutual TLS: accept only clients whose certificate this PEM CA
                          bundle signed (needs --tls-cert); docs/deploy.md
  -h, --help              print this help
  -V, --version           print the version

Once listening, prints `LANEGUARD_READY addr=IP:PORT` on stdout (after
`LANEGUARD_METRICS addr=IP:PORT` when --metrics-addr is given). Logs go to stderr; set
LANEGUARD_LOG=error|warn|info|debug|trace (default info).";

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";
pub const DEFAULT_LEASE_TTL_MS: u64 = 2000;
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 250;
pub const DEFAULT_USAGE_FLUSH_MS: u64 = 1000;
/// Upper bound of the millisecond flags: one hour.
const MAX_MS: u64 = 3_600_000;

/// The bucket store backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    /// A standalone Redis URL (`redis://...`).
    Redis(String),
    /// Redis Cluster seed node URLs (from `redis-cluster://h1:p1,h2:p2`).
    RedisCluster(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub listen: SocketAddr,
    pub config: Option<PathBuf>,
    pub store: StoreKind,
    /// `--grants on|off`.
    pub grants: bool,
    pub lease_ttl: Duration,
    pub redis_timeout: Duration,
    /// `--audit-log FILE`: serve `laneguard.audit.v1.AuditLog` and append to FILE.
    pub audit_log: Option<PathBuf>,
    /// `--audit-rotate-size` in bytes; 0: never by size.
    pub audit_rotate_bytes: u64,
    /// `--audit-rotate-hours`; `None`: never by age.
    pub audit_rotate_after: Option<Duration>,
    pub audit_hmac_key_file: Option<PathBuf>,
    pub audit_head_every: Duration,
    /// `--metrics-addr`: where to serve `/metrics`; `None`: no metrics endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// `--policy FILE`: serve RLQS over this policy.
    pub policy: Option<PathBuf>,
    /// `--rlqs-ttl-s`: the assignment TTL, whole seconds.
    pub rlqs_ttl_s: u32,
    /// `--max-buckets`: the memory store's cap.
    pub max_buckets: usize,
    /// `--tls-cert`/`--tls-key`/`--tls-client-ca`: TLS on the listener.
    pub tls: Option<TlsFiles>,
    /// `--usage-flush-ms`: how often the usage ledger's counts are written to the store.
    pub usage_flush: Duration,
}

/// The listener's TLS files, all PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require a client certificate signed by this CA bundle (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
// Parsed once at startup; boxing the arguments would buy nothing.
#[allow(clippy::large_enum_variant)]
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
    #[error("--metrics-addr: `{value}` is not an IP:PORT address")]
    BadMetricsAddr { value: String },
    #[error(
        "--store: `{value}` is not supported (supported: memory, {REDIS_SCHEME}HOST:PORT, \
         {CLUSTER_SCHEME}HOST:PORT,HOST:PORT,...)"
    )]
    BadStore { value: String },
    #[error("--grants: `{value}` is not `on` or `off`")]
    BadGrants { value: String },
    #[error("{flag}: `{value}` is not a whole number of milliseconds from 1 to {MAX_MS}")]
    BadMillis { flag: String, value: String },
    #[error("{flag}: `{value}` is not a whole number from {min} to {max}")]
    BadNumber {
        flag: String,
        value: String,
        min: u64,
        max: u64,
    },
    #[error("--audit-rotate-size: `{value}` is not a size (bytes, or a number with K, M or G)")]
    BadSize { value: String },
    #[error("{flag} needs --audit-log")]
    NeedsAuditLog { flag: String },
    #[error("{flag} needs --policy")]
    NeedsPolicy { flag: String },
    #[error("{flag} needs {needs}")]
    Needs {
        flag: &'static str,
        needs: &'static str,
    },
    #[error("--max-buckets applies to the memory store only (Redis evicts by TTL)")]
    MaxBucketsNeedsMemory,
    #[error("{flag} given more than once")]
    Repeated { flag: String },
    #[error("unexpected argument `{arg}`")]
    Unexpected { arg: String },
    #[error("argument is not valid UTF-8: {arg:?}")]
    NotUtf8 { arg: OsString },
}

const FLAGS: [&str; 19] = [
    "--listen",
    "--config",
    "--store",
    "--grants",
    "--lease-ttl-ms",
    "--redis-timeout-ms",
    "--audit-log",
    "--audit-rotate-size",
    "--audit-rotate-hours",
    "--audit-hmac-key-file",
    "--audit-head-every-s",
    "--metrics-addr",
    "--policy",
    "--rlqs-ttl-s",
    "--max-buckets",
    "--tls-cert",
    "--tls-key",
    "--tls-client-ca",
    "--usage-flush-ms",
];

/// Parse the arguments after the program name. Accepts `--flag value` and `--flag=value`.
pub fn parse<I>(args: I) -> Result<Command, CliError>
where
    I: IntoIterator<Item = OsString>,
{
    let mut values: [Option<String>; FLAGS.len()] = Default::default();

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
        let slot = match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            f => match FLAGS.iter().position(|known| *known == f) {
                Some(slot) => slot,
                None => return Err(CliError::Unexpected { arg }),
            },
        };
        let value = match inline {
            Some(v) => v,
            None => match args.next() {
                Some(v) => v.into_string().map_err(|arg| CliError::NotUtf8 { arg })?,
                None => return Err(CliError::MissingValue { flag }),
            },
        };
        if values[slot].replace(value).is_some() {
            return Err(CliError::Repeated { flag });
        }
    }
    let [listen, config, store, grants, lease_ttl, redis_timeout, audit_log, rotate_size, rotate_hours, hmac_key, head_every, metrics_addr, policy, rlqs_ttl, max_buckets, tls_cert, tls_key, tls_client_ca, usage_flush] =
        values;
    let tls = match (tls_cert, tls_key, tls_client_ca) {
        (None, None, None) => None,
        (Some(cert), Some(key), client_ca) => Some(TlsFiles {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
            client_ca: client_ca.map(PathBuf::from),
        }),
        (Some(_), None, _) => {
            return Err(CliError::Needs {
                flag: "--tls-cert",
                needs: "--tls-key",
            })
        }
        (None, Some(_), _) => {
            return Err(CliError::Needs {
                flag: "--tls-key",
                needs: "--tls-cert",
            })
        }
        (None, None, Some(_)) => {
            return Err(CliError::Needs {
                flag: "--tls-client-ca",
                needs: "--tls-cert and --tls-key",
            })
        }
    };
    if policy.is_none() && rlqs_ttl.is_some() {
        return Err(CliError::NeedsPolicy {
            flag: "--rlqs-ttl-s".into(),
        });
    }
    let rlqs_ttl_s = number(
        "--rlqs-ttl-s",
        rlqs_ttl,
        u64::from(laneguard_core::quota::DEFAULT_TTL_S),
        1,
        3600,
    )?;
    if audit_log.is_none() {
        for (flag, v) in [
            ("--audit-rotate-size", &rotate_size),
            ("--audit-rotate-hours", &rotate_hours),
            ("--audit-hmac-key-file", &hmac_key),
            ("--audit-head-every-s", &head_every),
        ] {
            if v.is_some() {
                return Err(CliError::NeedsAuditLog { flag: flag.into() });
            }
        }
    }
    let rotate_bytes = match rotate_size {
        None => 64 * 1024 * 1024,
        Some(text) => size(&text).ok_or(CliError::BadSize { value: text })?,
    };
    let rotate_hours = number("--audit-rotate-hours", rotate_hours, 24, 0, 24 * 366)?;
    let head_every = number("--audit-head-every-s", head_every, 60, 1, 86_400)?;

    let listen_text = listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listen = listen_text
        .parse::<SocketAddr>()
        .map_err(|_| CliError::BadListen { value: listen_text })?;
    let metrics_addr = metrics_addr
        .map(|v| {
            v.parse::<SocketAddr>()
                .map_err(|_| CliError::BadMetricsAddr { value: v })
        })
        .transpose()?;
    let store = match store.as_deref() {
        None | Some("memory") => StoreKind::Memory,
        Some(spec) => parse_store(spec).ok_or_else(|| CliError::BadStore {
            value: spec.to_string(),
        })?,
    };
    if max_buckets.is_some() && store != StoreKind::Memory {
        return Err(CliError::MaxBucketsNeedsMemory);
    }
    let max_buckets = number(
        "--max-buckets",
        max_buckets,
        crate::store::DEFAULT_MAX_BUCKETS as u64,
        1,
        1_000_000_000,
    )?;
    let grants = match grants.as_deref() {
        None | Some("on") => true,
        Some("off") => false,
        Some(other) => {
            return Err(CliError::BadGrants {
                value: other.to_string(),
            })
        }
    };
    Ok(Command::Run(Args {
        listen,
        config: config.map(PathBuf::from),
        store,
        grants,
        lease_ttl: millis("--lease-ttl-ms", lease_ttl, DEFAULT_LEASE_TTL_MS)?,
        redis_timeout: millis(
            "--redis-timeout-ms",
            redis_timeout,
            DEFAULT_REDIS_TIMEOUT_MS,
        )?,
        audit_log: audit_log.map(PathBuf::from),
        audit_rotate_bytes: rotate_bytes,
        audit_rotate_after: (rotate_hours > 0).then(|| Duration::from_secs(rotate_hours * 3600)),
        audit_hmac_key_file: hmac_key.map(PathBuf::from),
        audit_head_every: Duration::from_secs(head_every),
        metrics_addr,
        policy: policy.map(PathBuf::from),
        rlqs_ttl_s: u32::try_from(rlqs_ttl_s).unwrap_or(laneguard_core::quota::DEFAULT_TTL_S),
        max_buckets: usize::try_from(max_buckets).unwrap_or(crate::store::DEFAULT_MAX_BUCKETS),
        tls,
        usage_flush: millis("--usage-flush-ms", usage_flush, DEFAULT_USAGE_FLUSH_MS)?,
    }))
}

/// `4096`, `512K`, `64M`, `1G` (powers of 1024).
fn size(text: &str) -> Option<u64> {
    let (digits, unit) = match text.char_indices().last()? {
        (i, 'K' | 'k') => (&text[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&text[..i], 1 << 20),
        (i, 'G' | 'g') => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

fn number(
    flag: &str,
    value: Option<String>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, CliError> {
    let Some(text) = value else {
        return Ok(default);
    };
    match text.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(CliError::BadNumber {
            flag: flag.to_string(),
            value: text,
            min,
            max,
        }),
    }
}

fn parse_store(spec: &str) -> Option<StoreKind> {
    if spec.starts_with(CLUSTER_SCHEME) {
        return cluster_nodes(spec).map(StoreKind::RedisCluster);
    }
    let rest = spec.strip_prefix(REDIS_SCHEME)?;
    // The client library validates the rest when the store is built; refuse the obvious.
    (!rest.is_empty()).then(|| StoreKind::Redis(spec.to_string()))
}

fn millis(flag: &str, value: Option<String>, default: u64) -> Result<Duration, CliError> {
    let Some(text) = value else {
        return Ok(Duration::from_millis(default));
    };
    match text.parse::<u64>() {
        Ok(ms) if (1..=MAX_MS).contains(&ms) => Ok(Duration::from_millis(ms)),
        _ => Err(CliError::BadMillis {
            flag: flag.to_string(),
            value: text,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, CliError> {
        parse(args.iter().map(OsString::from))
    }

    fn defaults_with(f: impl FnOnce(&mut Args)) -> Command {
        let mut args = Args {
            listen: "127.0.0.1:8081".parse().unwrap(),
            config: None,
            store: StoreKind::Memory,
            grants: true,
            lease_ttl: Duration::from_millis(2000),
            redis_timeout: Duration::from_millis(250),
            audit_log: None,
            audit_rotate_bytes: 64 * 1024 * 1024,
            audit_rotate_after: Some(Duration::from_secs(24 * 3600)),
            audit_hmac_key_file: None,
            audit_head_every: Duration::from_secs(60),
            metrics_addr: None,
            policy: None,
            rlqs_ttl_s: 15,
            max_buckets: 1_000_000,
            tls: None,
            usage_flush: Duration::from_millis(1000),
        };
        f(&mut args);
        Command::Run(args)
    }

    #[test]
    fn defaults() {
        assert_eq!(p(&[]).unwrap(), defaults_with(|_| {}));
    }

    #[test]
    fn policy_and_rlqs_ttl() {
        assert_eq!(
            p(&["--policy", "p.yaml", "--rlqs-ttl-s=6"]).unwrap(),
            defaults_with(|a| {
                a.policy = Some(PathBuf::from("p.yaml"));
                a.rlqs_ttl_s = 6;
            })
        );
        assert!(matches!(
            p(&["--rlqs-ttl-s", "6"]),
            Err(CliError::NeedsPolicy { .. })
        ));
        assert!(matches!(
            p(&["--policy", "p.yaml", "--rlqs-ttl-s", "0"]),
            Err(CliError::BadNumber { .. })
        ));
    }

    #[test]
    fn audit_log() {
        assert_eq!(
            p(&["--audit-log", "audit.log"]).unwrap(),
            defaults_with(|a| a.audit_log = Some(PathBuf::from("audit.log")))
        );
        assert_eq!(
            p(&[
                "--audit-log=a",
                "--audit-rotate-size=8K",
                "--audit-rotate-hours",
                "1",
                "--audit-hmac-key-file=k",
                "--audit-head-every-s=5"
            ])
            .unwrap(),
            defaults_with(|a| {
                a.audit_log = Some(PathBuf::from("a"));
                a.audit_rotate_bytes = 8192;
                a.audit_rotate_after = Some(Duration::from_secs(3600));
                a.audit_hmac_key_file = Some(PathBuf::from("k"));
                a.audit_head_every = Duration::from_secs(5);
            })
        );
        assert!(matches!(
            p(&["--audit-rotate-size", "1"]),
            Err(CliError::NeedsAuditLog { .. })
        ));
        for bad in ["", "K", "1T", "-1", "1.5M"] {
            assert!(
                matches!(
                    p(&["--audit-log", "a", "--audit-rotate-size", bad]),
                    Err(CliError::BadSize { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            p(&["--audit-log", "a", "--audit-head-every-s", "0"]),
            Err(CliError::BadNumber { .. })
        ));
    }

    #[test]
    fn stores_grants_and_timeouts() {
        assert_eq!(
            p(&["--store", "redis://127.0.0.1:6379"]).unwrap(),
            defaults_with(|a| a.store = StoreKind::Redis("redis://127.0.0.1:6379".into()))
        );
        assert_eq!(
            p(&["--store=redis-cluster://127.0.0.1:7000,127.0.0.1:7001"]).unwrap(),
            defaults_with(|a| {
                a.store = StoreKind::RedisCluster(vec![
                    "redis://127.0.0.1:7000".into(),
                    "redis://127.0.0.1:7001".into(),
                ])
            })
        );
        assert_eq!(
            p(&[
                "--grants",
                "off",
                "--lease-ttl-ms",
                "500",
                "--redis-timeout-ms=40"
            ])
            .unwrap(),
            defaults_with(|a| {
                a.grants = false;
                a.lease_ttl = Duration::from_millis(500);
                a.redis_timeout = Duration::from_millis(40);
            })
        );
        for bad in [
            &["--store", "redis://"][..],
            &["--store", "redis-cluster://a:1,,b:2"],
            &["--store", "postgres://x"],
        ] {
            assert!(matches!(p(bad), Err(CliError::BadStore { .. })), "{bad:?}");
        }
        assert!(matches!(
            p(&["--grants", "yes"]),
            Err(CliError::BadGrants { .. })
        ));
        for bad in ["0", "-1", "1.5", "3600001"] {
            assert!(
                matches!(p(&["--lease-ttl-ms", bad]), Err(CliError::BadMillis { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            p(&["--grants", "on", "--grants", "off"]),
            Err(CliError::Repeated { .. })
        ));
    }

    #[test]
    fn all_flags_both_spellings() {
        let want = defaults_with(|a| {
            a.listen = "127.0.0.1:0".parse().unwrap();
            a.config = Some(PathBuf::from("rules.yaml"));
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
    fn metrics_addr() {
        assert_eq!(
            p(&["--metrics-addr", "127.0.0.1:0"]).unwrap(),
            defaults_with(|a| a.metrics_addr = Some("127.0.0.1:0".parse().unwrap()))
        );
        assert_eq!(
            p(&["--metrics-addr", ":9090"]).unwrap_err().to_string(),
            "--metrics-addr: `:9090` is not an IP:PORT address"
        );
    }

    #[test]
    fn max_buckets_and_tls() {
        assert_eq!(
            p(&["--max-buckets", "5000"]).unwrap(),
            defaults_with(|a| a.max_buckets = 5000)
        );
        assert!(matches!(
            p(&["--max-buckets", "0"]),
            Err(CliError::BadNumber { .. })
        ));
        assert_eq!(
            p(&["--store", "redis://h:1", "--max-buckets", "5"]).unwrap_err(),
            CliError::MaxBucketsNeedsMemory
        );
        assert_eq!(
            p(&[
                "--tls-cert=c.pem",
                "--tls-key=k.pem",
                "--tls-client-ca=ca.pem"
            ])
            .unwrap(),
            defaults_with(|a| {
                a.tls = Some(TlsFiles {
                    cert: "c.pem".into(),
                    key: "k.pem".into(),
                    client_ca: Some("ca.pem".into()),
                })
            })
        );
        assert_eq!(
            p(&["--tls-cert", "c.pem"]).unwrap_err().to_string(),
            "--tls-cert needs --tls-key"
        );
        assert_eq!(
            p(&["--tls-client-ca", "ca.pem"]).unwrap_err().to_string(),
            "--tls-client-ca needs --tls-cert and --tls-key"
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
            p(&["--store", "redis"]),
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
