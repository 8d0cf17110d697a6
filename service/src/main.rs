//! `laneguard-service`: parse arguments, load the rules, bind, print the readiness line,
//! serve until SIGINT or SIGTERM.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use laneguard_core::quota::QuotaSettings;
use laneguard_service::audit::{AuditLog, AuditOptions, AuditService, Chain};
use laneguard_service::cli::{self, Args, Command, StoreKind, TlsFiles};
use laneguard_service::metrics::{self, AuditHead};
use laneguard_service::quota::QuotaService;
use laneguard_service::usage::UsageBook;
use laneguard_service::{
    logger, server, Config, Grants, MemoryStore, Metrics, Options, RateLimiter, RedisSettings,
    RedisStore, Store, SystemClock,
};
use tokio::net::TcpListener;

/// mimalloc rather than glibc's malloc: a Redis decision allocates and frees a few dozen
/// small buffers (the gRPC frames, the script call, its reply) across the runtime's threads,
/// where glibc's allocator showed as 15% of the service's CPU in a profile. Interleaved
/// laneguard-rls-load runs (docs/benchmarks.md, fleet scale) measured 5-9% more decisions
/// per core-second on the Redis Cluster, about 2% on memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    logger::init();
    let args = match cli::parse(std::env::args_os().skip(1)) {
        Ok(Command::Run(args)) => args,
        Ok(Command::Help) => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("laneguard-service {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("laneguard-service: {e}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let rules = match &args.config {
        Some(path) => {
            let config = Config::load(path).map_err(|e| e.to_string())?;
            log::info!(
                "loaded {} top-level rules for domain {:?} from {}",
                config.rules().len(),
                config.domain(),
                path.display()
            );
            Some(Arc::new(config))
        }
        None => None,
    };
    let redis_settings = RedisSettings {
        timeout: args.redis_timeout,
        ..RedisSettings::default()
    };
    let metrics = Metrics::new();
    let round_trips = metrics.redis_round_trips();
    let store: Arc<dyn Store> = match &args.store {
        StoreKind::Memory => Arc::new(
            MemoryStore::with_max_buckets(args.max_buckets).with_metrics(metrics.memory_store()),
        ),
        StoreKind::Redis(url) => Arc::new(
            redis_store(
                RedisStore::standalone(url, redis_settings)
                    .map_err(|e| e.to_string())?
                    .with_round_trips(round_trips),
            )
            .await,
        ),
        StoreKind::RedisCluster(nodes) => Arc::new(
            redis_store(
                RedisStore::cluster(nodes, redis_settings)
                    .map_err(|e| e.to_string())?
                    .with_round_trips(round_trips),
            )
            .await,
        ),
    };
    let grants = if args.grants {
        Grants::On {
            lease_ttl: args.lease_ttl,
        }
    } else {
        Grants::Off
    };
    let mut registry = metrics.registry();
    let audit = match &args.audit_log {
        Some(path) => {
            let (log, service) = open_audit_log(path, &args)?;
            registry.register_collector(Box::new(AuditHead(log)));
            Some(service.with_metrics(metrics.clone()))
        }
        None => None,
    };
    let quota = match &args.policy {
        Some(path) => Some(quota_service(path, args.rlqs_ttl_s)?),
        None => None,
    };
    let metrics_listener = match args.metrics_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("--metrics-addr: cannot listen on {addr}: {e}"))?,
        ),
        None => None,
    };
    let tls = match &args.tls {
        Some(files) => Some(tls_config(files)?),
        None => None,
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    let store_name = store.name();
    let book = Arc::new(UsageBook::new(Arc::clone(&store), metrics.clone()));
    book.spawn_flusher(Arc::new(SystemClock), args.usage_flush);
    let limiter = RateLimiter::new(
        store,
        rules,
        Arc::new(SystemClock),
        Options::with_grants(grants)
            .with_metrics(metrics)
            .with_usage(Arc::clone(&book)),
    );

    // The contract with scripts/ and tests/: exactly this line, flushed, once listening;
    // the metrics address comes first, so that whoever waits for READY also has it.
    let mut stdout = std::io::stdout().lock();
    if let Some(listener) = metrics_listener {
        let at = listener
            .local_addr()
            .map_err(|e| format!("cannot read the metrics address: {e}"))?;
        writeln!(stdout, "LANEGUARD_METRICS addr={at}")
            .map_err(|e| format!("cannot write the metrics line: {e}"))?;
        log::info!("serving Prometheus metrics at http://{at}/metrics and the usage ledger at http://{at}/usage");
        let book = Arc::clone(&book);
        tokio::spawn(async move {
            if let Err(e) =
                metrics::serve(listener, registry, Some(book), std::future::pending()).await
            {
                log::error!("the metrics endpoint stopped: {e}");
            }
        });
    }
    writeln!(stdout, "LANEGUARD_READY addr={addr}")
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot write the readiness line: {e}"))?;
    drop(stdout);
    let security = match &args.tls {
        None => "plaintext: bind a private address (docs/deploy.md)".to_string(),
        Some(TlsFiles {
            client_ca: None, ..
        }) => "TLS".to_string(),
        Some(TlsFiles {
            client_ca: Some(ca),
            ..
        }) => format!("mutual TLS, clients signed by {}", ca.display()),
    };
    log::info!(
        "serving RLS v3 and gRPC health on {addr} ({security}; store: {store_name}, grants: {grants:?})"
    );

    server::serve_with(listener, limiter, audit, quota, tls, shutdown_signal())
        .await
        .map_err(|e| format!("server failed: {e}"))?;
    // What was counted since the last flush goes to the store before the process ends.
    if let Err(e) = book.flush().await {
        log::warn!("usage ledger: the last flush failed: {e}");
    }
    log::info!("stopped");
    Ok(())
}

/// Open the audit log without reading it whole (its checkpoint, then the lines after it),
/// verify the rest in the background, and log the chain's head periodically.
fn open_audit_log(
    path: &std::path::Path,
    args: &Args,
) -> Result<(Arc<AuditLog>, AuditService), String> {
    let chain = match &args.audit_hmac_key_file {
        Some(key) => {
            Chain::from_key_file(key).map_err(|e| format!("--audit-hmac-key-file: {e}"))?
        }
        None => Chain::plain(),
    };
    let keyed = chain.is_keyed();
    let opened = AuditLog::open_with(
        path,
        AuditOptions {
            chain,
            rotate_bytes: args.audit_rotate_bytes,
            rotate_after: args.audit_rotate_after,
        },
    )
    .map_err(|e| format!("audit log: {e}"))?;
    let log = Arc::new(opened.log);
    let (seq, head) = log.head();
    log::info!(
        "appending audit records to {} ({:?}, {} lines verified before serving, hmac: {keyed}); head seq={seq} hash={head}",
        path.display(),
        opened.resumed,
        opened.verified_before_serving,
    );
    let _ = log.verify_in_background();
    let every = args.audit_head_every;
    let published = Arc::clone(&log);
    tokio::spawn(async move {
        let mut last = seq;
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let (seq, head) = published.head();
            if seq != last {
                log::info!("audit head: seq={seq} hash={head}");
                last = seq;
            }
        }
    });
    Ok((Arc::clone(&log), AuditService::new(log)))
}

/// Read the `--tls-*` files. A missing or unreadable file stops the service with its flag
/// named, and so does one that is not a PEM certificate or key (checked before the READY
/// line, by building the server's TLS configuration once).
fn tls_config(files: &TlsFiles) -> Result<tonic::transport::ServerTlsConfig, String> {
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
    };
    let cert = read("--tls-cert", &files.cert)?;
    let key = read("--tls-key", &files.key)?;
    let ca = match &files.client_ca {
        Some(path) => Some(read("--tls-client-ca", path)?),
        None => None,
    };
    let config = server::tls_config(&cert, &key, ca.as_deref());
    if let Err(e) = tonic::transport::Server::builder().tls_config(config.clone()) {
        // tonic's error says "transport error"; the reason is in its sources.
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            why.push_str(&format!(": {s}"));
            source = s.source();
        }
        let ca = files
            .client_ca
            .as_ref()
            .map(|ca| format!(" / --tls-client-ca {}", ca.display()))
            .unwrap_or_default();
        return Err(format!(
            "--tls-cert {} / --tls-key {}{ca}: {why}",
            files.cert.display(),
            files.key.display(),
        ));
    }
    Ok(config)
}

/// `--policy FILE`: RLQS assignments over this policy (docs/rlqs.md).
fn quota_service(path: &std::path::Path, ttl_s: u32) -> Result<QuotaService, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--policy {}: {e}", path.display()))?;
    let found = laneguard_core::policy::source::one_policy(&text, None)
        .map_err(|e| format!("--policy {}: {e}", path.display()))?;
    let policy = laneguard_core::parse(&found.text)
        .map_err(|e| format!("--policy {}: {e}", path.display()))?;
    log::info!(
        "serving RLQS over the policy in {} ({} classes, assignment TTL {ttl_s} s)",
        path.display(),
        policy.classes.len()
    );
    let settings = QuotaSettings {
        ttl_s,
        ..QuotaSettings::default()
    };
    Ok(QuotaService::new(
        Arc::new(policy),
        Arc::new(SystemClock),
        settings,
    ))
}

/// Try the Redis store once at startup. A Redis that is not up yet does not stop the service:
/// requests answer UNAVAILABLE (the callers' failure modes apply) until it is reachable.
async fn redis_store(store: RedisStore) -> RedisStore {
    match store.ping().await {
        Ok(()) => log::info!("{} is reachable", store.name()),
        Err(e) => log::warn!(
            "{} is not reachable yet ({e}); answering UNAVAILABLE until it is",
            store.name()
        ),
    }
    store
}

/// Resolves on the first SIGINT or SIGTERM. If a handler cannot be installed, that signal is
/// logged and ignored rather than stopping the server.
async fn shutdown_signal() {
    let interrupt = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => log::info!("SIGINT: shutting down"),
            Err(e) => {
                log::warn!("cannot listen for SIGINT: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
                log::info!("SIGTERM: shutting down");
            }
            Err(e) => {
                log::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
