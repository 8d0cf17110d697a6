//! TLS on the service's listener (issue 14 item 5): Envoy reaches laneguard-service over
//! mutual TLS, with certificates made by `rcgen` for this run (`laneguard_tests::certs`), and
//! a client without a certificate the service's CA signed is refused.
//!
//! The demo stack, with the service started with `--tls-cert --tls-key --tls-client-ca` and
//! the demo's `laneguard_rls` cluster given the transport socket of
//! `envoy/service-mtls.tls.yaml` (the example docs/deploy.md points to), which is also
//! validated here: `make lint` cannot, since Envoy reads its certificate files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::certs::{Pem, TestPki};
use laneguard_tests::envoy::envoy_command;
use laneguard_tests::{demo_policy, repo_root, token, EnvoyOptions, RunDir, Scrape, Stack};
use serde_yaml::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The example, `envoy/service-mtls.tls.yaml`, with its certificate paths pointed at
/// `dir` (the test PKI writes files of the same names there).
fn example_in(dir: &Path) -> String {
    let text = std::fs::read_to_string(repo_root().join(EXAMPLE)).unwrap();
    assert!(
        text.contains(EXAMPLE_DIR),
        "{EXAMPLE} names no {EXAMPLE_DIR} files"
    );
    text.replace(EXAMPLE_DIR, &format!("{}/", dir.display()))
}

const EXAMPLE: &str = "envoy/service-mtls.tls.yaml";
const EXAMPLE_DIR: &str = "/etc/laneguard/tls/";

/// The demo's `laneguard_rls` cluster gets the example's transport socket: what the docs
/// tell an operator to add is what this test runs.
fn mtls_cluster(cfg: &mut Value, example: &str) -> laneguard_tests::Result<()> {
    let example: Value = serde_yaml::from_str(example).unwrap();
    let socket = example["static_resources"]["clusters"][0]["transport_socket"].clone();
    assert!(socket.is_mapping(), "{EXAMPLE} has no transport_socket");
    let clusters = cfg["static_resources"]["clusters"]
        .as_sequence_mut()
        .ok_or_else(|| laneguard_tests::Error::new("no clusters"))?;
    let rls = clusters
        .iter_mut()
        .find(|c| c["name"].as_str() == Some("laneguard_rls"))
        .ok_or_else(|| laneguard_tests::Error::new("no laneguard_rls cluster"))?;
    rls["transport_socket"] = socket;
    Ok(())
}

#[test]
fn the_mtls_example_validates_with_its_certificates_present() {
    let dir = RunDir::new("tls-example").unwrap();
    let _pki = TestPki::generate(&dir).unwrap();
    let path = dir.file("service-mtls.yaml");
    std::fs::write(&path, example_in(dir.path())).unwrap();
    let words = envoy_command().unwrap();
    let out = std::process::Command::new(&words[0])
        .args(&words[1..])
        .args(["--mode", "validate", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{EXAMPLE} does not validate:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One gRPC health check against `addr` with `tls` (None: plaintext). Ok(status) or the
/// error the client saw.
fn health(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<i32, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Channel::from_shared(format!("{scheme}://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5));
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).map_err(|e| format!("{e:?}"))?;
        }
        let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status)
            .map_err(|e| format!("{e:?}"))
    })
}

fn client_tls(ca: &Path, identity: Option<&Pem>) -> ClientTlsConfig {
    let ca = std::fs::read(ca).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    match identity {
        Some(pem) => tls.identity(Identity::from_pem(
            std::fs::read(&pem.cert).unwrap(),
            std::fs::read(&pem.key).unwrap(),
        )),
        None => tls,
    }
}

#[test]
fn envoy_reaches_the_service_over_mutual_tls_and_clients_without_a_trusted_certificate_are_refused()
{
    let dir = RunDir::new("tls").unwrap();
    let pki = TestPki::generate(&dir).unwrap();
    let mut args = pki.service_args();
    args.extend(["--metrics-addr".to_string(), "127.0.0.1:0".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let example = example_in(dir.path());
    let stack = Stack::start_in(
        dir,
        &demo_policy().unwrap(),
        &args,
        EnvoyOptions::default(),
        |cfg| mtls_cluster(cfg, &example),
    )
    .unwrap();

    // Through Envoy: decided by the service, never degraded.
    let web = token("NORTHWIND_WEB").unwrap();
    for _ in 0..3 {
        let r = stack.client.get_as("/orders/1", &web, &[]).unwrap();
        assert_eq!(r.status, 200, "{}\n{}", r.describe(), stack.logs());
        assert_eq!(
            r.header("x-laneguard-degraded"),
            None,
            "{}\n{}\n{}",
            r.describe(),
            stack.logs(),
            stack.service.logs()
        );
    }
    let scrape = Scrape::get(&stack.service.metrics_url().unwrap()).unwrap();
    let decided = scrape
        .must("laneguard_service_decisions_total{outcome=\"ok\"}")
        .unwrap();
    assert!(decided >= 1.0, "{}", scrape.text);
    let handshakes = stack
        .envoy
        .counter_sum("cluster.laneguard_rls.ssl", "ssl.handshake")
        .unwrap();
    assert!(
        handshakes >= 1,
        "Envoy made no TLS handshake with the service"
    );

    // Straight to the service: no certificate, a certificate from another CA, or plaintext
    // is refused; the CA's client certificate is served (so the refusals are about the
    // certificate, not the address).
    let addr = stack.service.addr();
    let no_cert = health(addr, Some(client_tls(&pki.ca, None)));
    assert!(
        no_cert.is_err(),
        "a client without a certificate was served"
    );
    let stranger = health(addr, Some(client_tls(&pki.ca, Some(&pki.stranger))));
    assert!(stranger.is_err(), "a client of another CA was served");
    let plain = health(addr, None);
    assert!(plain.is_err(), "a plaintext client was served");
    let trusted = health(addr, Some(client_tls(&pki.ca, Some(&pki.client))));
    assert_eq!(
        trusted,
        Ok(1),
        "the CA's client was not served (1 = SERVING)\n{}",
        stack.service.logs()
    );
    // The refused handshakes did not stop the service: Envoy still gets decisions.
    let r = stack.client.get_as("/orders/1", &web, &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.header("x-laneguard-degraded"), None, "{}", r.describe());
}

#[test]
fn bad_tls_files_stop_the_service_with_the_flag_named() {
    let dir = RunDir::new("tls-bad").unwrap();
    let pki = TestPki::generate(&dir).unwrap();
    // A missing key, and a key that is not PEM: refused before the READY line, naming the
    // flag and why.
    let junk = dir.file("junk.pem");
    std::fs::write(&junk, "not a key\n").unwrap();
    for (key, why) in [
        (dir.file("missing.pem"), "No such file"),
        (junk, "no RSA or PKCS8-encoded keys found"),
    ] {
        let err = laneguard_tests::Service::start(
            &dir,
            &[
                "--tls-cert",
                pki.server.cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ],
        )
        .err()
        .unwrap_or_else(|| panic!("started with --tls-key {}", key.display()));
        let err = err.to_string();
        assert!(err.contains("--tls-key") && err.contains(why), "{err}");
    }
}
