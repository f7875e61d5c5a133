//! The outbound client against real TLS servers on loopback: a vendor with a private CA, a
//! vendor the client must not trust, and a vendor that requires a client certificate (mTLS).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use axum_server::tls_rustls::RustlsConfig;
use handoff_connectors::http::{ClientError, client};
use handoff_core::policy::model::OutboundTls;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// Issues a certificate for 127.0.0.1 and writes `NAME.pem`, `NAME.key` into `dir`.
    fn issue(&self, dir: &Path, name: &str) {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    fn write(&self, dir: &Path, name: &str) {
        std::fs::write(dir.join(name), self.issuer.pem()).unwrap();
    }
}

/// Serves `GET /` over TLS with `dir/server.pem`; with `client_ca`, requires a client
/// certificate signed by it.
async fn vendor(dir: &Path, client_ca: Option<&Ca>) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let config = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.issuer.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
                .unwrap()
        }
        None => builder
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/", get(|| async { "vendor ok" }));
    let server =
        axum_server::from_tcp_rustls(listener, RustlsConfig::from_config(Arc::new(config)))
            .unwrap();
    tokio::spawn(async move { server.serve(app.into_make_service()).await });
    addr
}

async fn call(tls: &OutboundTls, addr: SocketAddr) -> Result<String, String> {
    let client = client(tls, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let resp = client
        .get(format!("https://127.0.0.1:{}/", addr.port()))
        .send()
        .await;
    match resp {
        Ok(r) => Ok(r.text().await.unwrap()),
        Err(e) => {
            // The TLS failure is the source chain of reqwest's connect error.
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why.push_str(": ");
                why.push_str(&s.to_string());
                source = s.source();
            }
            Err(why)
        }
    }
}

#[tokio::test]
async fn vendors_are_verified_against_public_roots_and_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let private_ca = Ca::new("Private vendor CA");
    private_ca.issue(dir.path(), "server");
    private_ca.write(dir.path(), "ca.pem");
    let addr = vendor(dir.path(), None).await;

    let trusted = OutboundTls {
        ca_file: Some(dir.path().join("ca.pem")),
        ..OutboundTls::default()
    };
    assert_eq!(call(&trusted, addr).await.unwrap(), "vendor ok");

    // Without the CA, the certificate is refused: there is no switch to skip verification.
    let err = call(&OutboundTls::default(), addr).await.unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("unknown issuer"),
        "{err}"
    );

    // Trusting some other CA does not help.
    let other = Ca::new("Someone else");
    other.write(dir.path(), "other.pem");
    let wrong = OutboundTls {
        ca_file: Some(dir.path().join("other.pem")),
        ..OutboundTls::default()
    };
    assert!(call(&wrong, addr).await.is_err());
}

#[tokio::test]
async fn a_client_certificate_is_presented_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let vendor_ca = Ca::new("Vendor CA");
    vendor_ca.issue(dir.path(), "server");
    vendor_ca.write(dir.path(), "ca.pem");
    let clients_ca = Ca::new("Vendor's client CA");
    clients_ca.issue(dir.path(), "handoff");
    let addr = vendor(dir.path(), Some(&clients_ca)).await;

    let mtls = OutboundTls {
        ca_file: Some(dir.path().join("ca.pem")),
        client_cert_file: Some(dir.path().join("handoff.pem")),
        client_key_file: Some(dir.path().join("handoff.key")),
    };
    assert_eq!(call(&mtls, addr).await.unwrap(), "vendor ok");

    let without = OutboundTls {
        ca_file: Some(dir.path().join("ca.pem")),
        ..OutboundTls::default()
    };
    assert!(
        call(&without, addr).await.is_err(),
        "the vendor requires a client certificate"
    );

    // A certificate from a CA the vendor does not trust is refused too.
    let stranger = Ca::new("Stranger");
    stranger.issue(dir.path(), "stranger");
    let wrong_cert = OutboundTls {
        client_cert_file: Some(dir.path().join("stranger.pem")),
        client_key_file: Some(dir.path().join("stranger.key")),
        ..mtls.clone()
    };
    assert!(call(&wrong_cert, addr).await.is_err());
}

#[test]
fn unreadable_tls_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = OutboundTls {
        ca_file: Some(dir.path().join("nope.pem")),
        ..OutboundTls::default()
    };
    let err = client(&missing, Duration::from_secs(1)).unwrap_err();
    assert_eq!(err.code(), "connector.tls.ca");
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let empty = OutboundTls {
        ca_file: Some(dir.path().join("empty.pem")),
        ..OutboundTls::default()
    };
    assert!(matches!(
        client(&empty, Duration::from_secs(1)),
        Err(ClientError::CaEmpty(_))
    ));
    std::fs::write(dir.path().join("garbage.key"), "not a key").unwrap();
    let ca = Ca::new("x");
    ca.issue(dir.path(), "c");
    let bad_key = OutboundTls {
        client_cert_file: Some(dir.path().join("c.pem")),
        client_key_file: Some(dir.path().join("garbage.key")),
        ..OutboundTls::default()
    };
    assert_eq!(
        client(&bad_key, Duration::from_secs(1)).unwrap_err().code(),
        "connector.tls.client_key"
    );
}
