//! Crash safety: every event answered 200 survives SIGKILL, and SIGTERM drains in-flight requests.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{BIN, Gateway, client, dump, stored_ids};
use serde_json::json;

const KEY: &str = "crash-test-write-key-0123";
const WORKERS: usize = 16;

fn start(dir: &std::path::Path) -> Gateway {
    let config = dir.join("handoff.toml");
    std::fs::write(
        &config,
        format!("[[sources]]\nid = \"load\"\nwrite_key = \"{KEY}\"\n"),
    )
    .unwrap();
    Gateway::start(
        &dir.join("data"),
        &["--config", config.to_str().unwrap()],
        &[],
    )
}

/// Sends track and batch requests from many tasks until `stop_after`, recording each messageId
/// that was answered 200. Errors (the server dying under us) are expected and not recorded.
async fn drive_load(url: String, run_for: Duration) -> (HashSet<String>, usize) {
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let errors = Arc::new(Mutex::new(0usize));
    let deadline = Instant::now() + run_for;
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (url, acked, errors) = (url.clone(), acked.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let http = client();
            let mut i = 0;
            while Instant::now() < deadline {
                i += 1;
                let (path, body, ids): (&str, serde_json::Value, Vec<String>) = if i % 2 == 0 {
                    let id = format!("w{w}-t{i}");
                    ("/v1/track", json!({"userId": "u", "event": "load", "messageId": id}), vec![id])
                } else {
                    let ids: Vec<String> = (0..20).map(|j| format!("w{w}-b{i}-{j}")).collect();
                    let batch: Vec<_> = ids
                        .iter()
                        .map(|id| json!({"type": "track", "userId": "u", "event": "load", "messageId": id}))
                        .collect();
                    ("/v1/batch", json!({"batch": batch}), ids)
                };
                match http.post(format!("{url}{path}")).basic_auth(KEY, Some("")).json(&body).send().await {
                    Ok(r) if r.status().is_success() => acked.lock().unwrap().extend(ids),
                    Ok(r) => panic!("unexpected status {} while the server was up", r.status()),
                    Err(_) => {
                        *errors.lock().unwrap() += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let errors = *errors.lock().unwrap();
    (acked, errors)
}

fn verify(data_dir: &std::path::Path) {
    let out = Command::new(BIN)
        .args(["journal", "verify", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "journal verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_event_survives_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path());
    let load = tokio::spawn(drive_load(gw.url.clone(), Duration::from_secs(4)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw.signal("KILL");
    let data_dir = gw.data_dir.clone();
    let status = gw.wait();
    assert!(!status.success(), "the gateway was killed, not stopped");
    let (acked, errors) = load.await.unwrap();
    assert!(
        acked.len() > 100,
        "the load did run before the kill ({} acked)",
        acked.len()
    );
    assert!(
        errors > 0,
        "the kill happened while requests were being sent"
    );

    // The journal opens cleanly after the crash and holds every acknowledged event.
    verify(&data_dir);
    let gw = start(tmp.path());
    let stored = stored_ids(&data_dir);
    let lost: Vec<_> = acked.difference(&stored).take(10).collect();
    assert!(
        lost.is_empty(),
        "{} events got a 200 but are missing, e.g. {lost:?}",
        acked.difference(&stored).count()
    );

    // Deduplication survives the crash: acknowledged ids sent again are recognised, not stored
    // twice (the index is rebuilt from the journal for what it had not flushed).
    let again: Vec<serde_json::Value> = acked
        .iter()
        .take(50)
        .map(|id| json!({"type": "track", "userId": "u", "event": "retry", "messageId": id}))
        .collect();
    let resp: serde_json::Value = client()
        .post(format!("{}/v1/batch", gw.url))
        .basic_auth(KEY, Some(""))
        .json(&json!({"batch": again}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (resp["accepted"].as_u64(), resp["duplicates"].as_u64()),
        (Some(0), Some(50)),
        "{resp}"
    );

    // And it goes on accepting events after the restart, continuing the sequence.
    let resp = client()
        .post(format!("{}/v1/track", gw.url))
        .basic_auth(KEY, Some(""))
        .json(&json!({"userId": "u", "event": "after restart"}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let events = dump(&data_dir, &[]);
    assert_eq!(
        events.last().unwrap()["seq"].as_u64().unwrap(),
        events.len() as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_delay_reports_not_ready_but_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("handoff.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndrain_delay_secs = 2\n[[sources]]\nid = \"load\"\nwrite_key = \"{KEY}\"\n"
        ),
    )
    .unwrap();
    let gw = Gateway::start(
        &tmp.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &[],
    );
    let http = client();
    assert!(
        http.get(format!("{}/readyz", gw.url))
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    gw.signal("TERM");
    let mut not_ready = false;
    for _ in 0..50 {
        let resp = http.get(format!("{}/readyz", gw.url)).send().await.unwrap();
        if resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            let body: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], "server.shutting_down");
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(not_ready, "/readyz turns 503 as soon as shutdown begins");
    let resp = http
        .post(format!("{}/v1/track", gw.url))
        .basic_auth(KEY, Some(""))
        .json(&json!({"userId": "u", "event": "during drain", "messageId": "drain-1"}))
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "still serving during the drain delay"
    );
    let data_dir = gw.data_dir.clone();
    let status = tokio::task::spawn_blocking(move || gw.wait())
        .await
        .unwrap();
    assert!(status.success());
    assert!(stored_ids(&data_dir).contains("drain-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_cleanly() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path());
    // A request in flight when SIGTERM arrives: headers and half the body sent before the
    // signal, the rest after. Draining means it still completes and is stored.
    let body = json!({"userId": "u", "event": "in flight", "messageId": "in-flight-1"}).to_string();
    let (first, rest) = body.split_at(body.len() / 2);
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let auth = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{KEY}:"))
    };
    let head = format!(
        "POST /v1/track HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{first}",
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();

    let load = tokio::spawn(drive_load(gw.url.clone(), Duration::from_secs(3)));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    slow.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the in-flight request completes: {answer}"
    );
    let data_dir = gw.data_dir.clone();
    let status = tokio::task::spawn_blocking(move || gw.wait())
        .await
        .unwrap();
    assert!(status.success(), "SIGTERM is a clean exit: {status}");
    let (acked, _) = load.await.unwrap();
    assert!(acked.len() > 100);
    verify(&data_dir);
    let stored = stored_ids(&data_dir);
    assert!(
        acked.is_subset(&stored),
        "every event answered 200 before shutdown is stored"
    );
    // A clean shutdown checkpoints the write-ahead log into the database file.
    let wal = data_dir.join("journal.db-wal");
    assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0);
}
