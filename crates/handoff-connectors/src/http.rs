//! The outbound HTTP client of one destination.
//!
//! Each destination gets its own client (its own connection pool and TLS settings), so a slow
//! vendor's connections never queue behind another's. TLS is rustls with *ring*, TLS 1.2 or
//! 1.3, and certificate verification cannot be turned off: roots are Mozilla's list (built in,
//! so the result does not depend on the host's CA store) plus the destination's `tls_ca_file`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use handoff_core::policy::model::OutboundTls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How long one call to a vendor may take, connection included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long establishing a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read the CA file {path}: {why}")]
    CaFile { path: String, why: String },
    #[error("the CA file {0} holds no certificate")]
    CaEmpty(String),
    #[error("cannot read the client certificate {path}: {why}")]
    ClientCert { path: String, why: String },
    #[error("cannot read the client key {path}: {why}")]
    ClientKey { path: String, why: String },
    #[error("the TLS settings cannot be used: {0}")]
    Tls(String),
    #[error("the HTTP client cannot be built: {0}")]
    Build(String),
}

impl ClientError {
    /// Stable code for logs and `handoff check`.
    pub fn code(&self) -> &'static str {
        match self {
            ClientError::CaFile { .. } | ClientError::CaEmpty(_) => "connector.tls.ca",
            ClientError::ClientCert { .. } => "connector.tls.client_cert",
            ClientError::ClientKey { .. } => "connector.tls.client_key",
            ClientError::Tls(_) => "connector.tls.invalid",
            ClientError::Build(_) => "connector.client.build",
        }
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|e| e.to_string())
}

/// The rustls configuration for `tls`.
pub fn tls_config(tls: &OutboundTls) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &tls.ca_file {
        let path = ca.display().to_string();
        let found = certs(ca).map_err(|why| ClientError::CaFile {
            path: path.clone(),
            why,
        })?;
        if found.is_empty() {
            return Err(ClientError::CaEmpty(path));
        }
        for cert in found {
            roots.add(cert).map_err(|e| ClientError::CaFile {
                path: path.clone(),
                why: e.to_string(),
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => {
            let cert_path = cert.display().to_string();
            let chain = certs(cert).map_err(|why| ClientError::ClientCert {
                path: cert_path.clone(),
                why,
            })?;
            if chain.is_empty() {
                return Err(ClientError::ClientCert {
                    path: cert_path,
                    why: "no certificate in the file".into(),
                });
            }
            let key_path = key.display().to_string();
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| ClientError::ClientKey {
                path: key_path,
                why: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientError::Tls(e.to_string()))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// An HTTP client for one destination.
pub fn client(tls: &OutboundTls, timeout: Duration) -> Result<reqwest::Client, ClientError> {
    let config = tls_config(tls)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .timeout(timeout)
        .connect_timeout(CONNECT_TIMEOUT.min(timeout))
        .user_agent(concat!("Handoff/", env!("CARGO_PKG_VERSION")))
        // A vendor redirecting elsewhere is not followed: the data goes only where configured.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ClientError::Build(e.to_string()))
}
