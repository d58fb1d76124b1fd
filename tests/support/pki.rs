//! A private CA, a localhost certificate, and the stand-in serving TLS with it
//! (h2 and http/1.1 by ALPN).

use std::path::PathBuf;
use std::sync::Arc;

use keygate::dev::confluence_standin::{Standin, StandinState};

pub struct Pki {
    _dir: tempfile::TempDir,
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    pub ca_der: rustls::pki_types::CertificateDer<'static>,
}

pub fn make_pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let tmp = super::temp_dir("pki");
    let dir = tmp.path().to_path_buf();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let pki = Pki {
        _dir: tmp,
        ca_pem: dir.join("ca.pem"),
        cert_pem: dir.join("cert.pem"),
        key_pem: dir.join("key.pem"),
        ca_der: ca_cert.der().clone(),
    };
    std::fs::write(&pki.ca_pem, ca_cert.pem()).unwrap();
    std::fs::write(&pki.cert_pem, leaf.pem()).unwrap();
    std::fs::write(&pki.key_pem, leaf_key.serialize_pem()).unwrap();
    pki
}

/// The stand-in serving TLS with the test PKI's leaf certificate.
pub async fn tls_standin(pki: &Pki) -> Standin {
    let config = keygate::tls::server_config(&pki.cert_pem, &pki.key_pem).unwrap();
    let state = Arc::new(StandinState::new(super::ADMIN_EMAIL, super::ADMIN_TOKEN));
    Standin::start_tls(state, tokio_rustls::TlsAcceptor::from(config))
        .await
        .unwrap()
}

pub fn client_tls(pki: &Pki, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}
