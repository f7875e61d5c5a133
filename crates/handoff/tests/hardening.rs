//! What an attacker with the public write key tried, sent again through the real server: each
//! input is refused with a stable code at a cost in proportion to the request, and nothing it
//! sends makes an acknowledged event unreadable later.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{Gateway, client, dump, metric, until};
use reqwest::StatusCode;
use serde_json::Value;

const KEY: &str = "hardening-key-0123456789";

fn config(extra_server: &str) -> String {
    format!(
        r#"
[server]
{extra_server}

[[sources]]
id = "web"
write_key = "{KEY}"
"#
    )
}

fn start(dir: &std::path::Path, extra_server: &str) -> Gateway {
    let path = dir.join("handoff.toml");
    std::fs::write(&path, config(extra_server)).unwrap();
    Gateway::start(
        &dir.join("data"),
        &["--config", path.to_str().unwrap()],
        &[],
    )
}

/// POSTs `body` (gzip-compressed when `zip`) and returns the status, the body's size and JSON.
async fn post(gw: &Gateway, path: &str, body: &[u8], zip: bool) -> (StatusCode, usize, Value) {
    let mut req = client()
        .post(format!("{}{path}", gw.url))
        .basic_auth(KEY, Some(""))
        .header("content-type", "application/json");
    req = if zip {
        req.header("content-encoding", "gzip")
            .body(common::gzip(body))
    } else {
        req.body(body.to_vec())
    };
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:.200}"));
    (status, text.len(), json)
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn a_batch_envelope_cannot_multiply_what_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path(), "");
    let tracks = vec![r#"{"type":"track","userId":"u","event":"e"}"#; 1000].join(",");
    // The attack as found: 3 KB of gzip, a 200 KB context copied into 1,000 messages.
    let body = format!(
        r#"{{"batch":[{tracks}],"context":{{"pad":"{}"}}}}"#,
        "x".repeat(200_000)
    );
    assert!(common::gzip(body.as_bytes()).len() < 4_000);
    let (status, _, resp) = post(&gw, "/v1/batch", body.as_bytes(), true).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{resp}");
    assert_eq!(code(&resp), "batch.envelope.too_large");
    // A context under the message limit, still copied into too many messages.
    let body = format!(
        r#"{{"batch":[{tracks}],"context":{{"pad":"{}"}}}}"#,
        "x".repeat(30_000)
    );
    let (status, _, resp) = post(&gw, "/v1/batch", body.as_bytes(), true).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{resp}");
    assert_eq!(code(&resp), "batch.expansion.too_large");
    assert!(
        dump(&gw.data_dir, &[]).is_empty(),
        "nothing of either was stored"
    );

    // An ordinary envelope still applies to its messages.
    let body =
        r#"{"batch":[{"type":"track","userId":"u","event":"e"}],"context":{"ip":"10.1.2.3"}}"#;
    let (status, _, resp) = post(&gw, "/v1/batch", body.as_bytes(), false).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(
        dump(&gw.data_dir, &[])[0]["event"]["context"]["ip"],
        "10.1.2.3"
    );
}

#[tokio::test]
async fn a_batch_of_junk_costs_one_small_answer_and_no_quarantine_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path(), "");
    // As found: 548 bytes of gzip holding 255,000 entries.
    let body = format!(r#"{{"batch":[{}]}}"#, vec!["1"; 255_000].join(","));
    let (status, size, resp) = post(&gw, "/v1/batch", body.as_bytes(), true).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{resp}");
    assert_eq!(code(&resp), "batch.too_many_messages");
    assert!(size < 1_000, "{size} bytes");

    // Within the count, but mostly invalid: refused whole, nothing quarantined, a short list.
    let mut entries = vec!["1"; 2_000];
    entries.push(r#"{"type":"track","userId":"u","event":"e"}"#);
    let body = format!(r#"{{"batch":[{}]}}"#, entries.join(","));
    let (status, size, resp) = post(&gw, "/v1/batch", body.as_bytes(), true).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{resp}");
    assert_eq!(code(&resp), "batch.rejected");
    assert_eq!(resp["rejected_count"], 2_000);
    assert_eq!(resp["rejected"].as_array().unwrap().len(), 100);
    assert!(size < 20_000, "{size} bytes");
    assert!(dump(&gw.data_dir, &["--quarantine"]).is_empty());
    assert!(
        dump(&gw.data_dir, &[]).is_empty(),
        "a refused batch stores nothing"
    );

    // A small batch with a bad message keeps its good ones and quarantines the bad one.
    let body =
        r#"{"batch":[{"type":"track","userId":"u","event":"e"},{"type":"track","userId":"u"}]}"#;
    let (status, _, resp) = post(&gw, "/v1/batch", body.as_bytes(), false).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(
        (resp["accepted"].as_u64(), resp["rejected_count"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(dump(&gw.data_dir, &["--quarantine"]).len(), 1);
    let metrics = gw.metrics().await;
    assert_eq!(metric(&metrics, "handoff_quarantine_messages"), 1.0);
}

#[tokio::test]
async fn what_a_later_stage_cannot_read_is_refused_with_its_own_code() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path(), "");
    let deep = format!("{}1{}", "[".repeat(129), "]".repeat(129));
    let cases = [
        (
            format!(r#"{{"userId":"u","event":"e","properties":{{"deep":{deep}}}}}"#),
            "message.depth.exceeded",
        ),
        (
            r#"{"userId":"u","event":"e","properties":{"total":1e400}}"#.to_string(),
            "message.number.out_of_range",
        ),
        (
            r#"{"userId":"\ud800","event":"e"}"#.to_string(),
            "message.string.invalid",
        ),
    ];
    for (body, want) in &cases {
        let (status, _, resp) = post(&gw, "/v1/track", body.as_bytes(), false).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{want}: {resp}");
        assert_eq!(code(&resp), *want);
    }
    // The same in a batch: each refused alone, the good one stored.
    let body = format!(
        r#"{{"batch":[{},{{"type":"track","userId":"u","event":"ok"}}]}}"#,
        cases
            .iter()
            .map(|(b, _)| b.replacen('{', r#"{"type":"track","#, 1))
            .collect::<Vec<_>>()
            .join(",")
    );
    let (status, _, resp) = post(&gw, "/v1/batch", body.as_bytes(), false).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let codes: Vec<&str> = resp["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, cases.iter().map(|(_, c)| *c).collect::<Vec<_>>());
    // Every stored event dumps (the dump once stopped at the first unreadable one).
    let events = dump(&gw.data_dir, &[]);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["event"]["event"], "ok");
}

/// Reads from `s` until the server closes it (or 15 s pass): `true` if it closed.
fn closed_by_server(s: &mut std::net::TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn idle_and_half_sent_connections_are_closed_and_never_lock_out_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path(), "max_connections = 20\nheader_timeout_secs = 1");
    let addr = gw.url.trim_start_matches("http://").to_owned();

    // A half-sent header block is closed after the header timeout.
    let mut half = std::net::TcpStream::connect(&addr).unwrap();
    half.write_all(b"POST /v1/track HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    assert!(closed_by_server(&mut half), "half-sent headers stayed open");
    // So is a keep-alive connection left idle after its request.
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(
        closed_by_server(&mut idle),
        "an idle keep-alive stayed open"
    );

    // The cap: 30 idle sockets against a cap of 20. The oldest idle ones give way, and
    // /healthz and a real client are served meanwhile.
    let sockets: Vec<std::net::TcpStream> = (0..30)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let resp = client()
        .get(format!("{}/healthz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (status, _, resp) = post(
        &gw,
        "/v1/track",
        br#"{"userId":"u","event":"Still served"}"#,
        false,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let metrics = gw.metrics().await;
    assert!(
        metric(&metrics, "handoff_connections_evicted_total") >= 10.0,
        "{metrics}"
    );
    assert!(metric(&metrics, "handoff_connections_open") <= 20.0);
    drop(sockets);
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn the_data_directory_is_private_whatever_the_umask_and_loose_modes_are_fixed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let gw = start(tmp.path(), "");
    let (status, _, _) = post(&gw, "/v1/track", br#"{"userId":"u","event":"e"}"#, false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(mode(&data), 0o700);
    let files: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        files.iter().any(|p| p.ends_with("journal.db-wal")),
        "{files:?}"
    );
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    drop(gw);

    // A restore left everything readable: serve tightens it at start and says so.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in &files {
        if f.exists() {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let log = tmp.path().join("serve.log");
    let path = tmp.path().join("handoff.toml");
    let gw = Gateway::start_logging(
        &data,
        &["--config", path.to_str().unwrap()],
        &[],
        Some(&log),
    );
    until(10, "the warning about loose modes", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("tightened to owner-only"))
    })
    .await;
    let written = std::fs::read_to_string(&log).unwrap();
    assert!(
        !written.contains('\u{1b}'),
        "no colour codes in a log file: {written}"
    );
    assert_eq!(mode(&data), 0o700);
    for f in files.iter().filter(|f| f.exists()) {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    drop(gw);
}

#[tokio::test]
async fn every_route_answers_every_error_in_the_json_format() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path(), "");
    let admin = common::create_client(&gw.data_dir, &["--name", "ops", "--role", "admin"]).unwrap();
    let token = common::fetch_token(&gw.url, &admin, None).await;
    // Over every route's limit but /v1/batch's (which calls it malformed JSON), and small
    // enough to sit in loopback's socket buffers: a server that refuses a body before reading it
    // closes the connection, and a client still writing a larger one may see a broken pipe.
    let big = vec![b'{'; 100 * 1024];
    let routes: &[(&str, &str)] = &[
        ("POST", "/v1/track"),
        ("POST", "/v1/batch"),
        ("POST", "/oauth/token"),
        ("POST", "/oauth/revoke"),
        ("POST", "/oauth/introspect"),
        ("POST", "/admin/v1/clients"),
        ("POST", "/admin/v1/plan"),
        ("POST", "/admin/v1/destinations/x/pause"),
        ("POST", "/admin/v1/dead-letters/replay"),
        ("POST", "/v1/dsr"),
        ("POST", "/v1/dsr/x/confirm"),
        ("GET", "/admin/v1/audit?limit=many"),
        ("GET", "/admin/v1/dead-letters?after=-x"),
        ("GET", "/admin/v1/reports/exposure?from=yesterday"),
        ("GET", "/v1/dsr?limit=all"),
        ("DELETE", "/v1/track"),
        ("GET", "/no/such/route"),
    ];
    let mut answers = Vec::new();
    for (method, path) in routes {
        for body in [Some(&big[..]), Some(&b"{not json"[..]), None] {
            let mut req = client()
                .request(method.parse().unwrap(), format!("{}{path}", gw.url))
                .bearer_auth(&token)
                .header("content-type", "application/json");
            if let Some(b) = body {
                req = req.body(b.to_vec());
            }
            let resp = match req.send().await {
                Ok(resp) => resp,
                // The refusal raced the upload (see `big`); the other routes still answer.
                Err(e) if body.is_some_and(|b| b.len() == big.len()) && e.is_request() => continue,
                Err(e) => panic!("{method} {path}: {e}"),
            };
            let status = resp.status();
            if status.is_success() {
                continue;
            }
            let kind = resp
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let text = resp.text().await.unwrap();
            let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            // RFC 6749's format on the OAuth endpoints, ours everywhere else.
            let (code, message) = if path.starts_with("/oauth/") {
                (json["error"].as_str(), json["error_description"].as_str())
            } else {
                (
                    json["error"]["code"].as_str(),
                    json["error"]["message"].as_str(),
                )
            };
            let (code, message) = (code.unwrap_or(""), message.unwrap_or(""));
            assert!(
                kind.starts_with("application/json") && !code.is_empty() && !message.is_empty(),
                "{method} {path} ({} bytes): {status} {kind} {text:.200}",
                body.map_or(0, <[u8]>::len)
            );
            answers.push((status.as_u16(), code.to_owned()));
        }
    }
    // The refusals the attack met as plain text now have their codes.
    assert!(
        answers.contains(&(413, "request.body.too_large".into())),
        "{answers:?}"
    );
    assert!(
        answers.contains(&(400, "request.query.invalid".into())),
        "{answers:?}"
    );
}

#[tokio::test]
async fn names_cannot_fake_rows_and_clients_only_send_as_sources_that_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path(), "");
    let cfg = tmp.path().join("handoff.toml");
    let cfg = cfg.to_str().unwrap();
    // The CLI: a NUL and a newline in a name, and a source nobody serves, are refused.
    let faked = common::create_client(
        &gw.data_dir,
        &["--name", "x\n hc_fake  active  admin", "--role", "viewer"],
    );
    assert!(faked.unwrap_err().contains("control characters"));
    let nosuch = common::create_client(
        &gw.data_dir,
        &[
            "--name", "shop", "--role", "ingest", "--source", "shop", "--config", cfg,
        ],
    );
    let why = nosuch.unwrap_err();
    assert!(
        why.contains("no source \"shop\"") && why.contains("web"),
        "{why}"
    );
    let nosuch = common::create_client(
        &gw.data_dir,
        &["--name", "shop", "--role", "ingest", "--source", "shop"],
    );
    assert!(nosuch.unwrap_err().contains("--config"));
    common::create_client(
        &gw.data_dir,
        &[
            "--name", "backend", "--role", "ingest", "--source", "web", "--config", cfg,
        ],
    )
    .unwrap();

    // The admin API: the same refusals, with codes.
    let admin = common::create_client(&gw.data_dir, &["--name", "ops", "--role", "admin"]).unwrap();
    let token = common::fetch_token(&gw.url, &admin, None).await;
    for (body, want) in [
        (
            serde_json::json!({"name": "a\u{0}b", "role": "viewer"}),
            "client.invalid",
        ),
        (
            serde_json::json!({"name": "shop", "role": "ingest", "source": "shop"}),
            "client.source.unknown",
        ),
    ] {
        let resp = client()
            .post(format!("{}/admin/v1/clients", gw.url))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(code(&v), want, "{v}");
    }
}

#[test]
fn commands_other_than_serve_refuse_a_data_directory_that_does_not_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("handoff-data");
    let runs: &[&[&str]] = &[
        &["clients", "create", "--name", "x", "--role", "viewer"],
        &["clients", "list"],
        &["keys", "rotate-signing"],
        &["journal", "dump"],
        &["journal", "verify"],
        &["destinations", "status"],
        &["dead-letters", "list"],
        &[
            "report",
            "exposure",
            "--vendor",
            "meta",
            "--from",
            "2026-01-01",
            "--to",
            "2026-01-02",
        ],
    ];
    for args in runs {
        let out = std::process::Command::new(common::BIN)
            .args(*args)
            .arg("--data-dir")
            .arg(&missing)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(err.matches("is --data-dir").count(), 1, "{args:?}: {err}");
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
    }
}

#[tokio::test]
async fn a_body_that_never_arrives_is_timed_out_on_every_route() {
    // Busy connections are never evicted at the cap, so no route may wait for a body forever.
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path(), "");
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let write_key = {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{KEY}:"))
        )
    };
    let mut streams = Vec::new();
    for (path, kind, auth) in [
        (
            "/oauth/token",
            "application/x-www-form-urlencoded",
            "Bearer x",
        ),
        ("/admin/v1/plan", "application/json", "Bearer x"),
        ("/v1/track", "application/json", write_key.as_str()),
    ] {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: {kind}\r\nContent-Length: 100\r\n\r\n{{"
        )
        .unwrap();
        streams.push((path, s));
    }
    let answers: Vec<(String, String)> = tokio::task::spawn_blocking(move || {
        streams
            .into_iter()
            .map(|(path, mut s)| {
                s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
                let mut text = String::new();
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    text.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if text.contains("\r\n\r\n") && text.contains('}') {
                        break;
                    }
                }
                (path.to_owned(), text)
            })
            .collect()
    })
    .await
    .unwrap();
    for (path, text) in answers {
        assert!(text.starts_with("HTTP/1.1 408"), "{path}: {text}");
        assert!(text.contains("request.body.timeout"), "{path}: {text}");
    }
}

#[tokio::test]
async fn past_the_in_flight_cap_requests_get_503_and_slow_senders_hold_no_place() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path(), "max_in_flight = 1");
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let write_key = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{KEY}:"))
    };
    // Requests whose bodies are still on their way hold no place: the one place stays free.
    let body = r#"{"type":"track","event":"Slow","userId":"u1"}"#;
    let mut slow = Vec::new();
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {write_key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
            body.len(),
            &body[..1]
        )
        .unwrap();
        slow.push(s);
    }
    let track = serde_json::json!({"type": "track", "event": "Fast", "userId": "u2"}).to_string();
    for _ in 0..5 {
        let (status, _, answer) = post(&gw, "/v1/track", track.as_bytes(), false).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }

    // Many whole requests at once: past the one place they are refused at once.
    let batch = serde_json::json!({"batch": (0..200).map(|i| serde_json::json!(
        {"type": "track", "event": "Burst", "userId": format!("u{i}")})).collect::<Vec<_>>()})
    .to_string();
    let mut shed = None;
    for _ in 0..50 {
        let calls: Vec<_> = (0..32)
            .map(|_| {
                client()
                    .post(format!("{}/v1/batch", gw.url))
                    .basic_auth(KEY, Some(""))
                    .header("content-type", "application/json")
                    .body(batch.clone())
                    .send()
            })
            .collect();
        for resp in futures_join_all(calls).await {
            let resp = resp.unwrap();
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::SERVICE_UNAVAILABLE => shed = Some(resp),
                other => panic!("{other}"),
            }
        }
        if shed.is_some() {
            break;
        }
    }
    let resp = shed.expect("a request past the cap is refused");
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let err: Value = resp.json().await.unwrap();
    assert_eq!(code(&err), "server.busy", "{err}");
    let health = client()
        .get(format!("{}/healthz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    // The slow requests finish and are served.
    let finished = tokio::task::spawn_blocking(move || {
        slow.into_iter()
            .map(|mut s| {
                s.write_all(&body.as_bytes()[1..]).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).unwrap();
                String::from_utf8_lossy(&buf[..n]).into_owned()
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for answer in finished {
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let metrics = gw.metrics().await;
    assert!(
        metric(&metrics, "handoff_requests_shed_total") >= 1.0,
        "{metrics}"
    );
}

/// Runs the futures at once and returns their outputs in order.
async fn futures_join_all<F: std::future::Future + Send + 'static>(calls: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = calls.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_copied_journal_reveals_nobody_and_the_gateway_still_reads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path(), "");
    let data = tmp.path().join("data");
    let email = "unmistakable.person.4711@example.org";
    let event = serde_json::json!({"type": "identify", "userId": "copy-test-user",
        "traits": {"email": email, "name": "Wilhelmina Unmistakable"}});
    let (status, _, body) = post(&gw, "/v1/identify", event.to_string().as_bytes(), false).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // What a copy of the journal's files (database and write-ahead log) holds: no name, no
    // e-mail, no user id.
    let mut raw = Vec::new();
    for file in ["journal.db", "journal.db-wal"] {
        if let Ok(bytes) = std::fs::read(data.join(file)) {
            raw.extend(bytes);
        }
    }
    assert!(!raw.is_empty());
    for secret in [email, "Wilhelmina", "copy-test-user"] {
        assert!(
            !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} is readable in journal.db"
        );
    }
    // With the master key the operator reads it back.
    let events = dump(&data, &[]);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["event"]["traits"]["email"], email);

    // A copy with another master key reads nothing.
    let copy = tmp.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for file in [
        "journal.db",
        "journal.db-wal",
        "journal.db-shm",
        "state.db",
        "state.db-wal",
        "state.db-shm",
    ] {
        if data.join(file).exists() {
            std::fs::copy(data.join(file), copy.join(file)).unwrap();
        }
    }
    let other_key = tmp.path().join("other.key");
    std::fs::write(&other_key, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n").unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["journal", "dump", "--data-dir"])
        .arg(&copy)
        .arg("--master-key-file")
        .arg(&other_key)
        .output()
        .unwrap();
    let printed =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{printed}");
    assert!(printed.contains("sealed under master key"), "{printed}");
    assert!(!printed.contains(email), "{printed}");
}
