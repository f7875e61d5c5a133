//! TLS termination against the real binary: TLS 1.3 only by default, 1.2 when allowed, and a new
//! certificate served without a restart.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Gateway;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};

struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Handoff test CA");
        Pki {
            ca: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// Writes a certificate for 127.0.0.1 named `cn` and its key into `dir`.
    fn issue(&self, dir: &Path, cn: &str) {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        // Write to temporary names first, so a reload never sees a half-written pair.
        std::fs::write(dir.join("cert.pem.new"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem.new"), key.serialize_pem()).unwrap();
        std::fs::rename(dir.join("key.pem.new"), dir.join("key.pem")).unwrap();
        std::fs::rename(dir.join("cert.pem.new"), dir.join("cert.pem")).unwrap();
    }
}

/// Connects with the given protocol versions, sends GET /healthz, and returns the negotiated
/// version, the server certificate and the HTTP status line.
fn get_healthz(
    pki: &Pki,
    addr: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<(rustls::ProtocolVersion, CertificateDer<'static>, String), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    let mut response = String::new();
    tls.read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let version = tls.conn.protocol_version().unwrap();
    let cert = tls.conn.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    Ok((
        version,
        cert,
        response.lines().next().unwrap_or_default().to_owned(),
    ))
}

fn start(dir: &Path, min_version: Option<&str>) -> Gateway {
    let mut config = format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    );
    if let Some(v) = min_version {
        config.push_str(&format!("min_version = \"{v}\"\n"));
    }
    config.push_str("[[sources]]\nid = \"web\"\nwrite_key = \"tls-test-write-key-0123\"\n");
    std::fs::write(dir.join("handoff.toml"), config).unwrap();
    Gateway::start(
        &dir.join("data"),
        &["--config", dir.join("handoff.toml").to_str().unwrap()],
        &[],
    )
}

#[test]
fn tls13_only_by_default_and_certificates_reload_without_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    pki.issue(tmp.path(), "first");
    let gw = start(tmp.path(), None);
    assert!(gw.url.starts_with("https://"), "{}", gw.url);
    let addr = gw.url.trim_start_matches("https://").to_owned();

    let (version, first, status) = get_healthz(&pki, &addr, &[&rustls::version::TLS13]).unwrap();
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
    assert_eq!(status, "HTTP/1.1 200 OK");
    let refused = get_healthz(&pki, &addr, &[&rustls::version::TLS12]);
    assert!(
        refused.is_err(),
        "a TLS 1.2-only client must be refused: {refused:?}"
    );

    // A new certificate in place of the old one is served without a restart.
    std::thread::sleep(Duration::from_millis(1100)); // a distinct modification time
    pki.issue(tmp.path(), "second");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, cert, status) = get_healthz(&pki, &addr, &[&rustls::version::TLS13]).unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
        if cert != first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Files that do not load keep the current certificate in service.
    std::fs::write(tmp.path().join("cert.pem"), "not a certificate").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(get_healthz(&pki, &addr, &[&rustls::version::TLS13]).is_ok());
}

#[test]
fn tls12_when_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    pki.issue(tmp.path(), "only");
    let gw = start(tmp.path(), Some("1.2"));
    let addr = gw.url.trim_start_matches("https://").to_owned();
    let (version, _, status) = get_healthz(&pki, &addr, &[&rustls::version::TLS12]).unwrap();
    assert_eq!(
        (version, status.as_str()),
        (rustls::ProtocolVersion::TLSv1_2, "HTTP/1.1 200 OK")
    );
    let (version, _, _) = get_healthz(&pki, &addr, &[&rustls::version::TLS13]).unwrap();
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
}

#[test]
fn an_unusable_certificate_stops_the_start_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("cert.pem"), "nope").unwrap();
    std::fs::write(tmp.path().join("key.pem"), "nope").unwrap();
    std::fs::write(
        tmp.path().join("handoff.toml"),
        format!(
            "[server.tls]\ncert_file = \"{0}/cert.pem\"\nkey_file = \"{0}/key.pem\"\n[[sources]]\nid = \"web\"\nwrite_key = \"tls-test-write-key-0123\"\n",
            tmp.path().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(tmp.path().join("handoff.toml"))
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("certificate file"), "{stderr}");
}
