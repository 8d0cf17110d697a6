//! Compiles the vendored protos in `proto/` into `OUT_DIR` (never into `src/`).
//!
//! protoc comes from `protoc-bin-vendored`, so no system package is needed. Without the
//! `server` feature only prost messages are generated (this is what the wasm filter builds);
//! with it, `tonic-prost-build` adds the `RateLimitService` and `RateLimitQuotaService` server
//! and client stubs.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/envoy/service/ratelimit/v3/rls.proto",
    "proto/envoy/extensions/common/ratelimit/v3/ratelimit.proto",
    "proto/envoy/type/v3/ratelimit_unit.proto",
    "proto/envoy/service/rate_limit_quota/v3/rlqs.proto",
    "proto/envoy/type/v3/ratelimit_strategy.proto",
    "proto/envoy/type/v3/token_bucket.proto",
    "proto/envoy/config/core/v3/base.proto",
    "proto/laneguard/audit/v1/audit.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // The well-known google/protobuf/*.proto files ship next to the vendored protoc.
    let well_known = protoc_bin_vendored::include_path()?;
    let includes = [PathBuf::from("proto"), well_known];

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);

    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-changed=build.rs");

    compile(config, &includes)
}

#[cfg(feature = "server")]
fn compile(
    config: prost_build::Config,
    includes: &[PathBuf],
) -> Result<(), Box<dyn std::error::Error>> {
    let protos: Vec<PathBuf> = PROTOS.iter().map(PathBuf::from).collect();
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_with_config(config, &protos, includes)?;
    Ok(())
}

#[cfg(not(feature = "server"))]
fn compile(
    mut config: prost_build::Config,
    includes: &[PathBuf],
) -> Result<(), Box<dyn std::error::Error>> {
    config.compile_protos(PROTOS, includes)?;
    Ok(())
}
