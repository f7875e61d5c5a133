//! Starts the real `handoff` binary on port 0 with its own temp data dir, and cleans up after.
#![allow(dead_code)] // each test file uses a different part of this harness

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_handoff");

/// The environment `handoff.example.toml` reads its secrets from, with test values.
pub const EXAMPLE_ENV: &[(&str, &str)] = &[
    ("HANDOFF_WEB_WRITE_KEY", "0123456789abcdef0123"),
    ("HANDOFF_BACKEND_WRITE_KEY", "fedcba98765432100123"),
    (
        "HANDOFF_GA4_PSEUDONYMISATION_KEY",
        "ga4-key-0123456789abcdef0123456789abcdef",
    ),
    ("HANDOFF_META_ACCESS_TOKEN", "EAAexampletoken"),
    ("HANDOFF_GA4_API_SECRET", "ga4-api-secret"),
    ("HANDOFF_STRIPE_API_KEY", "sk_test_example"),
    (
        "HANDOFF_CRM_WEBHOOK_SECRET",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    ),
];

pub struct Gateway {
    child: Option<Child>,
    pub url: String,
    pub data_dir: PathBuf,
    /// What the gateway printed on standard output up to "listening on".
    pub banner: Vec<String>,
    /// Credentials of a `monitor` client, made on first use of [`Gateway::metrics`].
    monitor: std::sync::OnceLock<(String, String)>,
}

impl Gateway {
    /// Starts `handoff serve --listen 127.0.0.1:0 --data-dir DIR ARGS…` and waits until it listens.
    pub fn start(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Gateway {
        Self::start_logging(data_dir, args, env, None)
    }

    /// Like [`Gateway::start`], writing the gateway's log (standard error) to `log` if given.
    pub fn start_logging(
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: Option<&Path>,
    ) -> Gateway {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(match log {
                Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
                None => Stdio::inherit(),
            });
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning handoff");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("listening on ") {
                        let url = url.trim().to_owned();
                        banner.push(line);
                        return Gateway {
                            child: Some(child),
                            url,
                            data_dir: data_dir.to_owned(),
                            banner,
                            monitor: std::sync::OnceLock::new(),
                        };
                    }
                    banner.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().unwrap();
                    panic!("handoff did not start ({status}); it printed: {banner:?}");
                }
            }
        }
    }

    /// The write key from the embedded default's first-start banner.
    pub fn printed_write_key(&self) -> Option<String> {
        self.banner
            .iter()
            .find_map(|l| l.trim().strip_prefix("write key: ").map(str::to_owned))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its status.
    pub fn wait(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        for _ in 0..300 {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        panic!("handoff did not exit within 30 s");
    }

    /// The gateway's `/metrics` page, read as Prometheus would: with a `monitor` client's token.
    pub async fn metrics(&self) -> String {
        let monitor = self.monitor.get_or_init(|| {
            create_client(
                &self.data_dir,
                &["--name", "prometheus", "--role", "monitor"],
            )
            .unwrap()
        });
        let token = fetch_token(&self.url, monitor, None).await;
        let resp = client()
            .get(format!("{}/metrics", self.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "/metrics: {}", resp.status());
        resp.text().await.unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The value of the first sample whose name-and-labels start with `name` in a Prometheus page.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Like [`sample`], failing the test when it is not there.
pub fn metric(body: &str, name: &str) -> f64 {
    sample(body, name).unwrap_or_else(|| panic!("metric {name} not found in:\n{body}"))
}

/// Like [`sample`], 0 when the sample is not there yet.
pub fn metric_or_zero(body: &str, name: &str) -> f64 {
    sample(body, name).unwrap_or(0.0)
}

/// Waits until `f` holds, for at most `secs`.
pub async fn until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `f()` answers `want` (an observable state behind an async call), for at most
/// `secs`.
pub async fn until_async<T: PartialEq + std::fmt::Debug, Fut: std::future::Future<Output = T>>(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> Fut,
    want: T,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = f().await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what} (last: {got:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `data` gzip-compressed, as an SDK sends a `Content-Encoding: gzip` body.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `handoff journal dump` as parsed JSON lines.
pub fn dump(data_dir: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["journal", "dump", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each dump line is JSON"))
        .collect()
}

/// `handoff clients create ARGS… --format json --data-dir DIR`: the new client's id and secret,
/// or what the command said on standard error when it refused.
pub fn create_client(data_dir: &Path, args: &[&str]) -> Result<(String, String), String> {
    let out = Command::new(BIN)
        .args(["clients", "create", "--format", "json", "--data-dir"])
        .arg(data_dir)
        .args(args)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Ok((
        v["client_id"].as_str().unwrap().to_owned(),
        v["client_secret"].as_str().unwrap().to_owned(),
    ))
}

/// An access token by client credentials (`client_secret_basic`) from the gateway at `url`.
pub async fn fetch_token(
    url: &str,
    (id, secret): &(String, String),
    scope: Option<&str>,
) -> String {
    let mut form = vec![("grant_type", "client_credentials")];
    if let Some(scope) = scope {
        form.push(("scope", scope));
    }
    let resp = client()
        .post(format!("{url}/oauth/token"))
        .basic_auth(id, Some(secret))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        reqwest::StatusCode::OK,
        "token request refused"
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// The messageIds of every stored event.
pub fn stored_ids(data_dir: &Path) -> std::collections::HashSet<String> {
    dump(data_dir, &[])
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_owned())
        .collect()
}

/// POSTs `body` as JSON to the gateway's `path` with a source's write key; the answer.
pub async fn post_json(
    gw: &Gateway,
    write_key: &str,
    path: &str,
    body: &serde_json::Value,
) -> (reqwest::StatusCode, serde_json::Value) {
    let resp = client()
        .post(format!("{}{path}", gw.url))
        .basic_auth(write_key, Some(""))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or_default())
}

pub fn client() -> reqwest::Client {
    // reqwest is built with TLS support for the connectors, which leaves the crypto provider
    // to the application: the tests use the gateway's own (ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}
