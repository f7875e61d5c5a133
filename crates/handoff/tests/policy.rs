//! `handoff plan`, `handoff consent decode` and the policy in the admin API, against the
//! example configuration users start from; and `Sec-GPC` recorded at ingest.

mod common;

use std::process::Command;

use common::{BIN, Gateway, client, create_client, fetch_token};
use reqwest::StatusCode;
use serde_json::{Value, json};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../handoff.example.toml");
const SAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/order-completed.json"
);
const ENV: &[(&str, &str)] = common::EXAMPLE_ENV;

/// Runs `handoff plan` on the example config as of a fixed day, with `event` on stdin.
fn plan(event: &Value, extra: &[&str]) -> (bool, Value, String) {
    plan_with(EXAMPLE, event, extra)
}

/// Runs `handoff plan` on the config at `config` as of a fixed day, with `event` on stdin.
fn plan_with(config: &str, event: &Value, extra: &[&str]) -> (bool, Value, String) {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "plan",
        "--config",
        config,
        "--event",
        "-",
        "--format",
        "json",
        "--as-of",
        "2026-11-25",
    ])
    .args(extra)
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    for (k, v) in ENV {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(event.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.success(), json, stderr)
}

fn sample() -> Value {
    serde_json::from_str(&std::fs::read_to_string(SAMPLE).unwrap()).unwrap()
}

fn by_id<'p>(plan: &'p Value, id: &str) -> &'p Value {
    plan["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .unwrap()
}

#[test]
fn plan_never_says_send_for_what_the_connector_would_refuse() {
    // A server-side event with only a userId: GA4 gets a client id derived from its pseudonym.
    let mut event = sample();
    event.as_object_mut().unwrap().remove("anonymousId");
    let (ok, p, err) = plan(&event, &[]);
    assert!(ok, "{err}");
    let ga4 = by_id(&p, "ga4");
    assert_eq!(ga4["decision"], "send", "{ga4}");

    // A GA4 destination allowed neither id cannot be sent to: BLOCK, with the reason.
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let (head, ga4_and_after) = text.split_once(r#"id = "ga4""#).unwrap();
    let narrowed = format!(
        r#"{head}id = "ga4"{}"#,
        ga4_and_after
            .replacen(
                r#"allow = ["event", "name", "anonymousId", "userId", "#,
                r#"allow = ["event", "name", "#,
                1,
            )
            .replacen(r#"  { op = "hmac", field = "userId" },"#, "", 1)
            .replacen(
                r#"pseudonymisation_key = "${HANDOFF_GA4_PSEUDONYMISATION_KEY}""#,
                "",
                1
            )
    );
    assert_ne!(narrowed, text);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("narrow.toml");
    std::fs::write(&path, narrowed).unwrap();
    let (ok, p, err) = plan_with(path.to_str().unwrap(), &sample(), &[]);
    assert!(ok, "{err}");
    let ga4 = by_id(&p, "ga4");
    assert_eq!(ga4["decision"], "block", "{ga4}");
    assert!(
        ga4["reasons"]
            .as_array()
            .unwrap()
            .contains(&json!("connector.refused"))
    );
    assert!(ga4["payload"].is_null());
}

#[test]
fn plan_shows_what_each_destination_receives_and_why() {
    let (ok, plan, stderr) = plan(&sample(), &[]);
    assert!(ok, "{stderr}");
    let ids: Vec<&str> = plan["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["meta-capi", "ga4", "stripe", "crm-webhook"]);

    let meta = by_id(&plan, "meta-capi");
    assert_eq!(meta["decision"], "send");
    assert_eq!(meta["reasons"], json!([]));
    // Meta's documented hash of John_Smith@gmail.com; the raw address never appears.
    assert_eq!(
        meta["payload"]["context"]["traits"]["email"],
        "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
    );
    assert!(!meta["payload"].to_string().contains("John_Smith"));
    for dropped in [
        "anonymousId",
        "properties.coupon",
        "properties.message",
        "context.consent",
    ] {
        assert!(
            meta["dropped"]
                .as_array()
                .unwrap()
                .contains(&json!(dropped)),
            "{dropped}: {meta}"
        );
    }

    let ga4 = by_id(&plan, "ga4");
    assert_eq!(ga4["decision"], "send");
    assert_eq!(ga4["payload"]["context"]["ip"], "203.0.113.0");
    assert_ne!(ga4["payload"]["userId"], "user-42", "pseudonymised");
    assert_eq!(ga4["reasons"], json!(["pii.redacted"]));
    assert!(
        ga4["payload"]["properties"]["message"]
            .as_str()
            .unwrap()
            .ends_with("[redacted:phone]")
    );

    let stripe = by_id(&plan, "stripe");
    assert_eq!(
        (&stripe["decision"], &stripe["reasons"]),
        (&json!("block"), &json!(["event.type_not_allowed"]))
    );
    assert_eq!(stripe["payload"], Value::Null);

    let crm = by_id(&plan, "crm-webhook");
    assert_eq!(crm["decision"], "send");
    assert_eq!(
        crm["payload"]["context"]["traits"]["email"], "John_Smith@gmail.com",
        "expected PII is kept"
    );
}

#[test]
fn consent_signals_change_the_plan() {
    let (_, plan_gpc, _) = plan(&sample(), &["--gpc"]);
    assert_eq!(
        by_id(&plan_gpc, "meta-capi")["reasons"],
        json!(["gpc.opt_out"])
    );
    assert_eq!(by_id(&plan_gpc, "ga4")["decision"], "send");

    let mut none = sample();
    none["context"].as_object_mut().unwrap().remove("consent");
    let (_, plan_none, _) = plan(&none, &[]);
    for id in ["meta-capi", "ga4"] {
        assert_eq!(
            by_id(&plan_none, id)["reasons"],
            json!(["consent.missing"]),
            "{id}"
        );
    }
    assert_eq!(by_id(&plan_none, "crm-webhook")["decision"], "send");

    let mut denied = sample();
    denied["context"]["consent"]["categoryPreferences"]["Advertising"] = json!(false);
    denied["context"]["consent"]["usPrivacy"] = json!("1YYN");
    let (_, plan_denied, _) = plan(&denied, &[]);
    assert_eq!(
        by_id(&plan_denied, "meta-capi")["reasons"],
        json!(["consent.denied"])
    );

    let mut identify = sample();
    identify["type"] = json!("identify");
    identify["traits"] = json!({"email": "jane@example.org", "name": "Jane", "nickname": "jd"});
    let (_, plan_identify, _) = plan(&identify, &["--gpc"]);
    let stripe = by_id(&plan_identify, "stripe");
    assert_eq!(stripe["decision"], "send", "contract: GPC does not apply");
    assert_eq!(
        stripe["payload"]["traits"],
        json!({"email": "jane@example.org", "name": "Jane"})
    );
}

#[test]
fn plan_refuses_what_ingest_would_refuse() {
    for (event, code) in [
        (json!({"batch": [{"type": "track"}]}), "plan.batch"),
        (json!({"event": "x", "userId": "u"}), "plan.type_missing"),
        (
            json!({"type": "track", "userId": "u"}),
            "message.event.missing",
        ),
    ] {
        let (ok, _, stderr) = plan(&event, &[]);
        assert!(!ok);
        assert!(stderr.contains(code), "{code}: {stderr}");
    }
}

#[test]
fn consent_decode_prints_json_and_refuses_garbage() {
    // The example string of the IAB's TCF v2 documentation era: core segment only.
    let out = Command::new(BIN)
        .args([
            "consent",
            "decode",
            "COw4XqLOw4XqLAAAAAENAPCAAAAAAAAAAAAAAAAAAAAA",
            "garbage!",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["version"], 2);
    assert_eq!(lines[0]["consent_language"], "EN");
    assert_eq!(lines[1]["error"]["code"], "consent.tcf.malformed");
}

#[tokio::test]
async fn admin_api_plans_exactly_like_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let gw = Gateway::start(&data, &["--config", EXAMPLE], ENV);
    let creds = create_client(&data, &["--name", "policy-test", "--role", "viewer"]).unwrap();
    let token = fetch_token(&gw.url, &creds, None).await;

    let resp = client()
        .get(format!("{}/admin/v1/destinations", gw.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let list: Value = resp.json().await.unwrap();
    let ids: Vec<&str> = list["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["meta-capi", "ga4", "stripe", "crm-webhook"]);
    let vendors: Value = client()
        .get(format!("{}/admin/v1/vendors", gw.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(vendors["vendors"][0]["dpa_signed"], "2025-06-02");

    let body = std::fs::read(SAMPLE).unwrap();
    let resp = client()
        .post(format!("{}/admin/v1/plan?gpc=true", gw.url))
        .bearer_auth(&token)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut api: Value = resp.json().await.unwrap();
    let (_, mut cli, _) = plan(&sample(), &["--gpc"]);
    // The two ran at different instants: only the times ingest stamped may differ.
    for p in [&mut api, &mut cli] {
        for d in p["destinations"].as_array_mut().unwrap() {
            if let Some(payload) = d["payload"].as_object_mut() {
                assert!(payload.remove("timestamp").is_some());
            }
            // The wire request carries those times too (and a signature over them): the
            // field names and the URL do not change with them.
            if let Some(wire) = d["wire"].as_object_mut() {
                wire.remove("body");
                wire.remove("headers");
            }
        }
    }
    assert_eq!(api, cli);
    assert!(
        api["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["wire"]["fields"]
                .as_array()
                .is_some_and(|f| !f.is_empty())),
        "{api}"
    );

    let resp = client()
        .post(format!("{}/admin/v1/plan", gw.url))
        .bearer_auth(&token)
        .body(r#"{"batch": []}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "plan.batch");
}

#[tokio::test]
async fn sec_gpc_on_an_ingest_request_is_recorded_with_the_event() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let gw = Gateway::start(&data, &["--config", EXAMPLE], ENV);
    for gpc in [Some("1"), None] {
        let mut req = client()
            .post(format!("{}/v1/track", gw.url))
            .basic_auth("0123456789abcdef0123", Some(""))
            .json(&json!({"event": "Viewed", "userId": "u1", "messageId": format!("gpc-{}", gpc.is_some())}));
        if let Some(v) = gpc {
            req = req.header("Sec-GPC", v);
        }
        assert_eq!(req.send().await.unwrap().status(), StatusCode::OK);
    }
    let out = Command::new(BIN)
        .args(["journal", "dump", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let rows: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let event = |id: &str| {
        rows.iter()
            .find(|r| r["messageId"] == id)
            .map(|r| r["event"].clone())
            .unwrap()
    };
    assert_eq!(event("gpc-true")["context"]["gpc"], true);
    assert_eq!(event("gpc-false").get("context"), None);
}

#[test]
fn check_loads_each_destinations_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = std::fs::read_to_string(EXAMPLE).unwrap();
    text = text.replace(
        "endpoint = \"https://crm.example.com/hooks/handoff\"",
        "endpoint = \"https://crm.example.com/hooks/handoff\"\ntls_ca_file = \"/nonexistent/ca.pem\"\ntls_client_cert_file = \"/nonexistent/cert.pem\"",
    );
    let path = dir.path().join("handoff.toml");
    std::fs::write(&path, &text).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .envs(ENV.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success());
    assert!(
        stderr.contains("config.destination.tls.client_cert"),
        "{stderr}"
    );

    let text = text.replace("tls_client_cert_file = \"/nonexistent/cert.pem\"", "");
    std::fs::write(&path, &text).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .envs(ENV.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success());
    assert!(
        stderr.contains("destinations[3].tls: cannot read the CA file /nonexistent/ca.pem")
            && stderr.contains("[connector.tls.ca]"),
        "{stderr}"
    );
}
