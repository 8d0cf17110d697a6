//! `laneguard-service`: parse arguments, load the rules, bind, print the readiness line,
//! serve until SIGINT or SIGTERM.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use laneguard_service::audit::{AuditLog, AuditService};
use laneguard_service::cli::{self, Args, Command, StoreKind};
use laneguard_service::{
    logger, server, Config, Grants, MemoryStore, Options, RateLimiter, RedisSettings, RedisStore,
    Store, SystemClock,
};
use tokio::net::TcpListener;

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
    let store: Arc<dyn Store> = match &args.store {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Redis(url) => Arc::new(
            redis_store(RedisStore::standalone(url, redis_settings).map_err(|e| e.to_string())?)
                .await,
        ),
        StoreKind::RedisCluster(nodes) => Arc::new(
            redis_store(RedisStore::cluster(nodes, redis_settings).map_err(|e| e.to_string())?)
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
    let audit = match &args.audit_log {
        Some(path) => {
            let log = AuditLog::open(path).map_err(|e| format!("audit log: {e}"))?;
            log::info!("appending audit records to {}", path.display());
            Some(AuditService::new(Arc::new(log)))
        }
        None => None,
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    let store_name = store.name();
    let limiter = RateLimiter::new(
        store,
        rules,
        Arc::new(SystemClock),
        Options::with_grants(grants),
    );

    // The contract with scripts/ and tests/: exactly this line, flushed, once listening.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "LANEGUARD_READY addr={addr}")
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot write the readiness line: {e}"))?;
    drop(stdout);
    log::info!(
        "serving RLS v3 and gRPC health on {addr} (store: {store_name}, grants: {grants:?})"
    );

    server::serve_with_audit(listener, limiter, audit, shutdown_signal())
        .await
        .map_err(|e| format!("server failed: {e}"))?;
    log::info!("stopped");
    Ok(())
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
