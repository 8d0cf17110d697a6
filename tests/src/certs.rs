//! Throwaway certificates for the TLS tests, made with `rcgen` at test time (nothing is
//! committed): one CA, a server certificate for `localhost` and `127.0.0.1`, and client
//! certificates signed by that CA or by another one. The server's certificate names
//! `localhost`, `laneguard-service` (the name `envoy/service-mtls.tls.yaml` checks) and
//! `127.0.0.1`.

use crate::{Context, Result, RunDir};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

/// PEM files written into a run directory.
#[derive(Clone, Debug)]
pub struct Pem {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA, the server's certificate it signed, and a client certificate it signed.
#[derive(Clone, Debug)]
pub struct TestPki {
    pub ca: PathBuf,
    pub server: Pem,
    pub client: Pem,
    /// A client certificate from a CA the server does not trust.
    pub stranger: Pem,
}

fn err(what: &'static str) -> impl FnOnce(rcgen::Error) -> crate::Error {
    move |e| crate::Error(format!("rcgen: {what}: {e}"))
}

fn ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err("CA params"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().map_err(err("CA key"))?;
    CertifiedIssuer::self_signed(params, key).map_err(err("CA certificate"))
}

fn leaf(
    dir: &RunDir,
    name: &str,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<Pem> {
    let mut params = CertificateParams::new(vec![
        "localhost".to_string(),
        "laneguard-service".to_string(),
    ])
    .map_err(err("leaf params"))?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().map_err(err("leaf key"))?;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(err("leaf certificate"))?;
    let pem = Pem {
        cert: dir.file(&format!("{name}.crt.pem")),
        key: dir.file(&format!("{name}.key.pem")),
    };
    std::fs::write(&pem.cert, cert.pem()).context(|| format!("writing {}", pem.cert.display()))?;
    std::fs::write(&pem.key, key.serialize_pem())
        .context(|| format!("writing {}", pem.key.display()))?;
    Ok(pem)
}

impl TestPki {
    /// Generate everything into `dir`.
    pub fn generate(dir: &RunDir) -> Result<TestPki> {
        let authority = ca("laneguard test CA")?;
        let ca_path = dir.file("ca.crt.pem");
        std::fs::write(&ca_path, authority.pem())
            .context(|| format!("writing {}", ca_path.display()))?;
        let other = ca("some other CA")?;
        Ok(TestPki {
            ca: ca_path,
            server: leaf(
                dir,
                "service",
                &authority,
                ExtendedKeyUsagePurpose::ServerAuth,
            )?,
            client: leaf(
                dir,
                "envoy",
                &authority,
                ExtendedKeyUsagePurpose::ClientAuth,
            )?,
            stranger: leaf(dir, "stranger", &other, ExtendedKeyUsagePurpose::ClientAuth)?,
        })
    }

    /// `laneguard-service` arguments for mutual TLS with this PKI.
    pub fn service_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.server.cert.display().to_string(),
            "--tls-key".into(),
            self.server.key.display().to_string(),
            "--tls-client-ca".into(),
            self.ca.display().to_string(),
        ]
    }
}
