//! TLS termination with rustls: TLS 1.3 only unless 1.2 is allowed, certificate and key reloaded
//! without a restart when their files change.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum_server::tls_rustls::RustlsConfig;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How often the certificate and key files are checked for changes.
pub const CERT_POLL_INTERVAL: Duration = Duration::from_secs(2);

pub use handoff_core::config::TlsSettings;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate file {0}: {1}")]
    Cert(String, String),
    #[error("cannot read the private key file {0}: {1}")]
    Key(String, String),
    #[error("the certificate and key cannot be used together: {0}")]
    Config(String),
}

/// The cryptography behind TLS: *ring*, chosen explicitly rather than by feature unification.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server's TLS configuration from the files named in `settings`.
pub fn server_config(settings: &TlsSettings) -> Result<ServerConfig, TlsError> {
    let cert_path = settings.cert_file.display().to_string();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&settings.cert_file)
        .and_then(|certs| certs.collect())
        .map_err(|e| TlsError::Cert(cert_path.clone(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Cert(
            cert_path,
            "no certificate in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&settings.key_file)
        .map_err(|e| TlsError::Key(settings.key_file.display().to_string(), e.to_string()))?;
    let versions: &[&rustls::SupportedProtocolVersion] = if settings.allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Watches the certificate and key files and swaps the configuration in when they change.
/// A change that does not load (a half-written file, a key that does not match) keeps the old
/// configuration and is logged; the next change is tried again.
pub fn watch(settings: TlsSettings, live: RustlsConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let stamp = |s: &TlsSettings| (modified(&s.cert_file), modified(&s.key_file));
        let mut seen = stamp(&settings);
        loop {
            tokio::time::sleep(CERT_POLL_INTERVAL).await;
            let now = stamp(&settings);
            if now == seen {
                continue;
            }
            match server_config(&settings) {
                Ok(config) => {
                    live.reload_from_config(Arc::new(config));
                    seen = now;
                    tracing::info!(cert = %settings.cert_file.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    // Once per change: the next change to the files is tried again.
                    seen = now;
                    tracing::warn!(error = %e, "TLS files changed but do not load; keeping the current certificate")
                }
            }
        }
    })
}
