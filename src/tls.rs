//! rustls configurations from PEM files: the listener's server config (h2 and
//! http/1.1 by ALPN) and the upstream client config (web PKI roots plus an optional
//! extra CA bundle). Always the `ring` provider.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from `{path}`: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("cannot read a private key from `{path}`: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(String),
}

impl TlsError {
    /// The config field a listener error belongs to, under `prefix`.
    pub fn field(&self, prefix: &str) -> String {
        match self {
            TlsError::Cert { .. } | TlsError::Config(_) => format!("{prefix}.cert"),
            TlsError::Key { .. } => format!("{prefix}.key"),
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The largest PEM file read.
const MAX_PEM: u64 = 1 << 20;

/// Every certificate in a PEM file; at least one.
pub fn read_ca_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: path.to_path_buf(),
        reason,
    };
    let text = crate::files::read_capped(path, MAX_PEM).map_err(|e| cert_err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err(
            "expected at least one PEM `CERTIFICATE` block".into(),
        ));
    }
    Ok(certs)
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = read_ca_bundle(cert)?;
    let key_text = crate::files::read_capped(key, MAX_PEM).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    let key_der =
        PrivateKeyDer::from_pem_slice(key_text.as_bytes()).map_err(|e| TlsError::Key {
            path: key.to_path_buf(),
            reason: format!("{e} (expected a PEM private key)"),
        })?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| TlsError::Key {
            path: key.to_path_buf(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        TlsError::Config(format!("the key does not belong to the certificate: {e}"))
    })?;
    Ok(certified)
}

/// The listener's certificate, swapped in place when its files change so that
/// rotation (cert-manager and the like) needs no restart.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

impl ReloadingCert {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(ReloadingCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: ArcSwap::from_pointee(certified_key(cert, key)?),
        }))
    }

    /// Re-reads the files; on error the current certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.current
            .store(Arc::new(certified_key(&self.cert, &self.key)?));
        Ok(())
    }

    pub fn files(&self) -> [PathBuf; 2] {
        [self.cert.clone(), self.key.clone()]
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The listener's TLS configuration, offering h2 and http/1.1.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_with(ReloadingCert::load(cert, key)?)
}

pub fn server_config_with(cert: Arc<ReloadingCert>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The upstream client's TLS configuration.
pub fn client_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        for cert in read_ca_bundle(path)? {
            roots.add(cert).map_err(|e| TlsError::Cert {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
