//! The gRPC server: `RateLimitService` plus `grpc.health.v1.Health`, on a listener the caller
//! has already bound (so the binary can print the real port before serving, and tests can
//! bind `127.0.0.1:0`).

use std::future::Future;

use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::audit::AuditService;
use crate::quota::QuotaService;
use crate::rls::RateLimiter;
use laneguard_protos::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::RateLimitQuotaServiceServer;

/// Serve until `shutdown` resolves, then stop accepting and let in-flight calls finish.
///
/// Health answers for `""` and for `envoy.service.ratelimit.v3.RateLimitService`: SERVING
/// while the store answers its probe, NOT_SERVING while it does not (`crate::health`).
pub async fn serve<F>(
    listener: TcpListener,
    limiter: RateLimiter,
    shutdown: F,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = ()> + Send,
{
    serve_with_audit(listener, limiter, None, shutdown).await
}

/// [`serve`], plus `laneguard.audit.v1.AuditLog` when the service keeps an audit log
/// (`--audit-log`). Without one, an Append call answers UNIMPLEMENTED.
pub async fn serve_with_audit<F>(
    listener: TcpListener,
    limiter: RateLimiter,
    audit: Option<AuditService>,
    shutdown: F,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = ()> + Send,
{
    serve_with(listener, limiter, audit, None, None, shutdown).await
}

/// TLS for the listener (`--tls-cert`, `--tls-key`, `--tls-client-ca`): the server's
/// identity, and with `client_ca` mutual TLS (a client without a certificate signed by it
/// is refused during the handshake).
pub fn tls_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> ServerTlsConfig {
    let config = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
    match client_ca_pem {
        Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
        None => config,
    }
}

/// [`serve_with_audit`], plus RLQS (`envoy.service.rate_limit_quota.v3`) when the service
/// has a policy (`--policy`). Health answers SERVING for it: its assignments live in memory
/// and do not depend on the store. With `tls` ([`tls_config`]), every service (health too)
/// is served over TLS only.
pub async fn serve_with<F>(
    listener: TcpListener,
    limiter: RateLimiter,
    audit: Option<AuditService>,
    quota: Option<QuotaService>,
    tls: Option<ServerTlsConfig>,
    shutdown: F,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = ()> + Send,
{
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<RateLimitServiceServer<RateLimiter>>()
        .await;
    if quota.is_some() {
        reporter
            .set_serving::<RateLimitQuotaServiceServer<QuotaService>>()
            .await;
    }
    tokio::spawn(crate::health::follow_store(
        reporter,
        limiter.store(),
        crate::health::PROBE_EVERY,
    ));
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(health)
        .add_service(RateLimitServiceServer::new(limiter))
        .add_optional_service(audit.map(AuditService::server))
        .add_optional_service(quota.map(QuotaService::server))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
