//! Subjects, the ledger and data-subject requests through the running gateway: reports answer
//! what each vendor received about whom (never values), an erasure suppresses the person,
//! purges the journal and queues, and reaches each vendor through its own deletion call; an
//! opt-out blocks advertising destinations; `audit verify` passes, and fails on a tampered
//! ledger, naming the entry.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::{BIN, Gateway, client, create_client, fetch_token, metric, until};
use handoff_connectors::webhook::{Secret, sign};
use serde_json::{Value, json};

const KEY: &str = "privacy-test-key-0123456789";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Everything a fake vendor was sent: (path, headers of interest, body).
type Seen = Arc<Mutex<Vec<(String, Value)>>>;

async fn vendor() -> (String, Seen) {
    let seen: Seen = Arc::default();
    async fn hook(State(seen): State<Seen>, headers: HeaderMap, body: Bytes) -> StatusCode {
        let h = |n: &str| {
            headers
                .get(n)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        let ts = h("webhook-timestamp").parse().unwrap_or(0);
        if sign(&Secret::parse(SECRET).unwrap(), &h("webhook-id"), ts, &body)
            != h("webhook-signature")
        {
            return StatusCode::UNAUTHORIZED;
        }
        seen.lock()
            .unwrap()
            .push(("/hook".into(), serde_json::from_slice(&body).unwrap()));
        StatusCode::NO_CONTENT
    }
    async fn ga4(
        State(seen): State<Seen>,
        uri: axum::http::Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let path = uri.path().to_owned();
        if path.starts_with("/deletion") {
            // Google's User Deletion API wants its OAuth token.
            if headers.get("authorization").and_then(|v| v.to_str().ok())
                != Some("Bearer ga-deletion-token")
            {
                return StatusCode::UNAUTHORIZED;
            }
        }
        seen.lock()
            .unwrap()
            .push((path, serde_json::from_slice(&body).unwrap()));
        StatusCode::NO_CONTENT
    }
    let app = Router::new()
        .route("/hook", post(hook))
        .route("/mp/collect", post(ga4))
        .route("/deletion", post(ga4))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

fn config(base: &str) -> String {
    format!(
        r#"
[[sources]]
id = "web"
write_key = "{KEY}"

[delivery]
retry_base_ms = 20
retry_max_ms = 200

[[vendors]]
id = "acme"
legal_name = "Acme Support Inc."
country = "IE"
dpa_signed = 2025-01-01
last_assessment = {today}
risk_tier = "low"
transfer_mechanism = "adequacy"

[[vendors]]
id = "google"
legal_name = "Google Ireland Ltd."
country = "IE"
dpa_signed = 2025-01-01
last_assessment = {today}
risk_tier = "medium"
transfer_mechanism = "adequacy"

[[destinations]]
id = "support-hook"
vendor = "acme"
connector = "webhook"
purposes = ["support"]
legal_basis = "contract"
event_types = ["track", "identify"]
allow = ["event", "userId", "traits.email", "properties.plan"]
pii_expected = ["traits.email"]
endpoint = "{base}/hook"
settings = {{ secret = "{SECRET}" }}

[[destinations]]
id = "ads-hook"
vendor = "acme"
connector = "webhook"
purposes = ["advertising"]
legal_basis = "consent"
consent = {{ categories = ["advertising"] }}
event_types = ["track"]
allow = ["event", "userId"]
endpoint = "{base}/hook"
settings = {{ secret = "{SECRET}" }}

[[destinations]]
id = "ga4"
vendor = "google"
connector = "ga4"
purposes = ["analytics"]
legal_basis = "legitimate_interest"
event_types = ["track"]
allow = ["event", "userId", "anonymousId", "properties.plan"]
endpoint = "{base}"
settings = {{ measurement_id = "G-TEST", api_secret = "mp-secret", property_id = "123456789", deletion_access_token = "ga-deletion-token", deletion_endpoint = "{base}/deletion" }}
"#,
        today = time::OffsetDateTime::now_utc().date(),
    )
}

async fn send(gw: &Gateway, batch: Vec<Value>) {
    let (status, body) = common::post_json(gw, KEY, "/v1/batch", &json!({ "batch": batch })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

fn track(user: &str, anon: &str, n: usize) -> Value {
    json!({"type": "track", "event": "Plan Chosen", "userId": user, "anonymousId": anon,
        "messageId": format!("{user}-{n}"), "properties": {"plan": "pro"},
        "context": {"consent": {"categoryPreferences": {"advertising": true}}}})
}

fn cli(data: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.success(),
        text + &String::from_utf8_lossy(&out.stderr),
    )
}

fn count(seen: &Seen, f: impl Fn(&str, &Value) -> bool) -> usize {
    seen.lock().unwrap().iter().filter(|(p, b)| f(p, b)).count()
}

#[tokio::test]
async fn erasure_reaches_every_vendor_and_the_ledger_tells_the_whole_story() {
    let (base, seen) = vendor().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg_path = dir.path().join("handoff.toml");
    std::fs::write(&cfg_path, config(&base)).unwrap();
    let gw = Gateway::start(&data, &["--config", cfg_path.to_str().unwrap()], &[]);
    let privacy = create_client(&data, &["--name", "dpo", "--role", "privacy"]).unwrap();
    let token = fetch_token(&gw.url, &privacy, None).await;

    // Jane: an identify with her e-mail, then 3 events; Bob: 2 events.
    let mut batch = vec![
        json!({"type": "identify", "userId": "jane-1", "anonymousId": "anon-j",
        "messageId": "jane-id", "traits": {"email": "Jane@Example.com", "plan": "pro"}}),
    ];
    batch.extend((0..3).map(|i| track("jane-1", "anon-j", i)));
    batch.extend((0..2).map(|i| track("bob-2", "anon-b", i)));
    send(&gw, batch).await;
    // support-hook: 1 identify + 5 tracks; ads-hook: 5 tracks; ga4: 5 tracks (batched per user).
    until(20, "every handoff delivered", || {
        count(&seen, |p, _| p == "/hook") >= 11 && count(&seen, |p, _| p == "/mp/collect") >= 2
    })
    .await;

    // What did each vendor receive about Jane? (found by her e-mail, any case; the vendors'
    // answers are recorded just after they arrive, so ask until all 10 are there)
    let deadline = Instant::now() + Duration::from_secs(10);
    let report: Value = loop {
        let (ok, out) = cli(&data, &["report", "subject", "--email", "jane@example.com"]);
        assert!(ok, "{out}");
        let report: Value = serde_json::from_str(&out).unwrap();
        let handoffs: u64 = report["vendors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["handoffs"].as_u64().unwrap())
            .sum();
        if handoffs >= 10 || Instant::now() > deadline {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let subject = report["subject"].as_str().unwrap().to_owned();
    assert!(subject.starts_with("sub_"));
    let vendors = report["vendors"].as_array().unwrap();
    let acme = vendors.iter().find(|v| v["vendor"] == "acme").unwrap();
    assert_eq!(acme["handoffs"], 7, "support: identify + 3, ads: 3: {acme}");
    assert!(
        acme["fields"]
            .as_array()
            .unwrap()
            .contains(&json!("data.traits.email")),
        "the webhook's body carries the event under `data`: {acme}"
    );
    assert!(
        acme["categories"]
            .as_array()
            .unwrap()
            .contains(&json!("contact"))
    );
    let google = vendors.iter().find(|v| v["vendor"] == "google").unwrap();
    assert_eq!(google["handoffs"], 3);
    // What GA4 received, named as its Measurement Protocol request names it.
    let google_fields: Vec<&str> = google["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(
        google_fields.contains(&"client_id") && google_fields.contains(&"events.name"),
        "{google}"
    );
    assert!(
        google_fields.iter().all(|f| !f.starts_with("context.")),
        "{google}"
    );
    assert_eq!(google["legal_bases"], json!(["legitimate_interest"]));
    for value in ["jane", "Jane@Example.com", "anon-j"] {
        let ledger_text = report["vendors"].to_string()
            + &report["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["fields"].to_string() + &e["detail"].to_string())
                .collect::<String>();
        assert!(
            !ledger_text.contains(value),
            "the ledger holds names, never values ({value})"
        );
    }
    // An incident at Acme: whom did it touch, with which data? (CSV for the breach notice)
    let (ok, csv) = cli(
        &data,
        &["report", "exposure", "--vendor", "acme", "--format", "csv"],
    );
    assert!(ok, "{csv}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "subject,handoffs,first,last,categories,fields");
    assert_eq!(lines.len(), 3, "Jane and Bob: {csv}");
    assert!(csv.contains(&subject));
    // A name that is no vendor is an error naming the known ones, never an empty report; a
    // destination's id is taken too.
    let (ok, out) = cli(&data, &["report", "exposure", "--vendor", "facebook"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("report.vendor.unknown")
            || out.contains("no vendor or destination \"facebook\""),
        "{out}"
    );
    assert!(out.contains("acme") && out.contains("ads-hook"), "{out}");
    let (ok, out) = cli(&data, &["report", "exposure", "--vendor", "ads-hook"]);
    assert!(ok, "{out}");
    let by_destination: Value = serde_json::from_str(&out).unwrap();
    assert!(
        !by_destination["affected"].as_array().unwrap().is_empty(),
        "{out}"
    );
    // Records of processing, per vendor and purpose.
    let resp = client()
        .get(format!("{}/admin/v1/reports/processing", gw.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let processing: Value = resp.json().await.unwrap();
    let rows = processing["rows"].as_array().unwrap();
    let ads = rows.iter().find(|r| r["purpose"] == "advertising").unwrap();
    assert_eq!(
        (ads["handoffs"].as_u64(), ads["subjects"].as_u64()),
        (Some(5), Some(2))
    );

    // Bob opts out of sale/sharing: advertising stops for him, support goes on.
    let resp = client()
        .post(format!("{}/v1/dsr", gw.url))
        .bearer_auth(&token)
        .json(&json!({"type": "opt_out", "userId": "bob-2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let opt_out: Value = resp.json().await.unwrap();
    assert_eq!(opt_out["status"], "completed");

    // Two messages refused at ingest (no event name) sit in quarantine, one naming Jane by her
    // client id and e-mail (in another case), one naming Bob.
    for refused in [
        json!({"type": "track", "anonymousId": "anon-j", "traits": {"email": "jane@EXAMPLE.com"}}),
        json!({"type": "track", "userId": "bob-2"}),
    ] {
        let (status, body) = common::post_json(&gw, KEY, "/v1/track", &refused).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }
    assert_eq!(common::dump(&data, &["--quarantine"]).len(), 2);

    // What each vendor was sent about her is kept for the erasure, sealed: no value in clear.
    let sent_rows = |subject: &str| -> Vec<Vec<u8>> {
        let conn = rusqlite::Connection::open(data.join("outbox.db")).unwrap();
        let mut stmt = conn
            .prepare("SELECT sealed FROM sent_identifiers WHERE subject = ?1")
            .unwrap();
        stmt.query_map([subject], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let sealed = sent_rows(&subject);
    assert!(
        sealed.len() >= 5,
        "user id, client id and e-mail, per vendor: {}",
        sealed.len()
    );
    for row in &sealed {
        let text = String::from_utf8_lossy(row);
        assert!(
            !text.contains("Jane@Example.com")
                && !text.contains("anon-j")
                && !text.contains("jane-1")
        );
    }

    // Jane asks to be erased; asking twice is the same request.
    let file = || async {
        client()
            .post(format!("{}/v1/dsr", gw.url))
            .bearer_auth(&token)
            .json(&json!({"type": "erasure", "userId": "jane-1"}))
            .send()
            .await
            .unwrap()
    };
    let first = file().await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    let again = file().await;
    assert_eq!(again.status(), StatusCode::OK);
    let again: Value = again.json().await.unwrap();
    assert_eq!(first["id"], again["id"]);
    assert_eq!(first["subject"], subject.as_str());
    let id = first["id"].as_str().unwrap().to_owned();
    let tasks = first["tasks"].as_array().unwrap();
    let destinations: Vec<&str> = tasks
        .iter()
        .map(|t| t["destination"].as_str().unwrap())
        .collect();
    assert_eq!(destinations, ["ads-hook", "ga4", "support-hook"]);
    assert!(first["deadline"].as_str().is_some());

    // Each vendor gets its own deletion call; the request completes.
    let mut status = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        status = client()
            .get(format!("{}/v1/dsr/{id}", gw.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status["status"], "completed", "{status}");
    assert!(
        status["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["status"] == "done")
    );
    let erasures: Vec<Value> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, b)| p == "/hook" && b["type"] == "subject.erasure")
        .map(|(_, b)| b.clone())
        .collect();
    assert_eq!(
        erasures.len(),
        2,
        "both webhooks, signed (checked by the fake)"
    );
    assert_eq!(erasures[0]["data"]["userIds"], json!(["jane-1"]));
    assert_eq!(erasures[0]["data"]["dsrId"], id.as_str());
    // Filed by her user id only, the erasure still names her e-mail to the vendor that received
    // it (support-hook allows traits.email), as it received it; ads-hook never got it.
    let emails: Vec<&Value> = erasures.iter().map(|e| &e["data"]["emails"]).collect();
    assert!(emails.contains(&&json!(["Jane@Example.com"])), "{emails:?}");
    assert!(emails.contains(&&json!([])), "{emails:?}");
    let deletions: Vec<Value> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| p == "/deletion")
        .map(|(_, b)| b.clone())
        .collect();
    // Her user id; the client id GA4 received with her events (her anonymousId), though the
    // request did not name it; and the client id GA4 gets for events without one.
    let derived = handoff_connectors::ga4::derived_client_id("jane-1");
    assert_eq!(
        deletions,
        [
            json!({"kind": "analytics#userDeletionRequest",
                "id": {"type": "USER_ID", "userId": "jane-1"}, "propertyId": "123456789"}),
            json!({"kind": "analytics#userDeletionRequest",
                "id": {"type": "CLIENT_ID", "userId": "anon-j"}, "propertyId": "123456789"}),
            json!({"kind": "analytics#userDeletionRequest",
                "id": {"type": "CLIENT_ID", "userId": derived}, "propertyId": "123456789"})
        ]
    );

    // Filed again naming more of her: the same request, reopened for the vendors that were
    // sent those identifiers (GA4 her client id, support her e-mail); ads-hook was sent
    // neither, so it is not asked again.
    let resp = client()
        .post(format!("{}/v1/dsr", gw.url))
        .bearer_auth(&token)
        .json(
            &json!({"type": "erasure", "userId": "jane-1", "anonymousId": "anon-j",
            "email": "Jane@Example.com"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let reopened: Value = resp.json().await.unwrap();
    assert_eq!(reopened["id"], id.as_str());
    assert_eq!(reopened["status"], "open", "{reopened}");
    let pending: Vec<&str> = reopened["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["status"] == "pending")
        .map(|t| t["destination"].as_str().unwrap())
        .collect();
    assert_eq!(pending, ["ga4", "support-hook"]);
    until(20, "the request completed again", || {
        count(&seen, |p, _| p == "/deletion") == 4
            && count(&seen, |p, b| p == "/hook" && b["type"] == "subject.erasure") == 3
    })
    .await;
    let last = |path: &str| {
        seen.lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(p, b)| p == path && (path != "/hook" || b["type"] == "subject.erasure"))
            .map(|(_, b)| b.clone())
            .unwrap()
    };
    assert_eq!(
        last("/deletion")["id"],
        json!({"type": "CLIENT_ID", "userId": "anon-j"})
    );
    let again = last("/hook");
    assert_eq!(
        &again["data"]["emails"],
        &json!(["Jane@Example.com"]),
        "what this filing names, with everything the vendor holds"
    );
    until(10, "the request completed", || {
        let (ok, out) = cli(&data, &["dsr", "status", &id]);
        ok && out.contains("completed")
    })
    .await;
    assert!(
        sent_rows(&subject).is_empty(),
        "kept only until each vendor confirmed"
    );
    // Quarantined input that named her by those is erased too; Bob's is not.
    let raws: Vec<String> = common::dump(&data, &["--quarantine"])
        .iter()
        .map(|m| m["raw"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(raws.len(), 2);
    assert_eq!(raws[0], r#"{"erased":true}"#);
    assert!(raws[1].contains("bob-2"), "{raws:?}");

    // Nothing of Jane is left in the journal; Bob's events are untouched.
    let events = common::dump(&data, &[]);
    let text = serde_json::to_string(&events).unwrap();
    // (message ids stay: they deduplicate retries and name ledger entries.)
    assert!(
        !text.contains(r#""jane-1""#) && !text.contains("Jane@Example.com"),
        "{text}"
    );
    assert!(text.contains(r#""bob-2""#));

    // New events: Jane's are blocked as suppressed (and not kept), Bob's ads are blocked by
    // his opt-out while his support events flow.
    let before = count(&seen, |p, b| p == "/hook" && b["type"] == "event.track");
    send(
        &gw,
        vec![track("jane-1", "anon-j", 10), track("bob-2", "anon-b", 10)],
    )
    .await;
    until(10, "Bob's support event", || {
        count(&seen, |p, b| p == "/hook" && b["type"] == "event.track") > before
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(&seen, |p, b| p == "/hook" && b["type"] == "event.track"),
        before + 1,
        "only Bob's support event left"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"handoff_policy_blocked_total{destination="support-hook",reason="subject.suppressed"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            r#"handoff_policy_blocked_total{destination="ads-hook",reason="subject.opt_out"}"#
        ),
        1.0
    );
    assert_eq!(metric(&metrics, "handoff_dsr_overdue"), 0.0);
    let text = serde_json::to_string(&common::dump(&data, &[])).unwrap();
    assert!(
        !text.contains(r#""jane-1""#),
        "a suppressed subject's new event is erased too"
    );

    // Access: what Handoff holds about Bob, and what each vendor received.
    let resp = client()
        .post(format!("{}/v1/dsr", gw.url))
        .bearer_auth(&token)
        .json(&json!({"type": "access", "anonymousId": "anon-b"}))
        .send()
        .await
        .unwrap();
    let access: Value = resp.json().await.unwrap();
    let export = &access["export"];
    assert_eq!(export["held"]["events"].as_array().unwrap().len(), 3);
    assert_eq!(export["preferences"]["opt_out_of_sale"], true);
    assert!(export["vendors"].as_array().unwrap().len() == 2);
    // Asking about someone never seen answers "no data held", and creates nobody.
    let resp = client()
        .post(format!("{}/v1/dsr", gw.url))
        .bearer_auth(&token)
        .json(&json!({"type": "access", "email": "stranger@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "dsr.no_data_held", "{answer}");
    let (ok, out) = cli(
        &data,
        &["report", "subject", "--email", "stranger@example.com"],
    );
    assert!(!ok && out.contains("no events of this person"), "{out}");

    // The ledger verifies, over the API and the CLI…
    let resp = client()
        .get(format!("{}/admin/v1/audit/verify", gw.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (ok, out) = cli(&data, &["audit", "verify"]);
    assert!(ok, "{out}");
    assert!(out.starts_with("ledger intact"), "{out}");
    let (ok, public_key) = cli(&data, &["audit", "public-key"]);
    assert!(ok);
    let the_story = cli(&data, &["report", "subject", "--id", &subject]).1;
    for step in [
        "\"delivered\"",
        "erasure.filed",
        "erasure.extended",
        "erasure.confirmed",
        "subject.suppressed",
    ] {
        assert!(
            the_story.contains(step),
            "the ledger tells {step}: {the_story}"
        );
    }
    drop(gw);

    // …and a ledger edited behind Handoff's back does not, naming the entry.
    let conn = rusqlite::Connection::open(data.join("outbox.db")).unwrap();
    conn.execute("UPDATE ledger SET outcome = 'tampered' WHERE seq = 3", [])
        .unwrap();
    drop(conn);
    let (ok, out) = cli(
        &data,
        &["audit", "verify", "--public-key", public_key.trim()],
    );
    assert!(!ok);
    assert!(out.contains("NOT intact at entry 3"), "{out}");
}
