//! The Segment-compatible ingest API, end to end against the real binary.

mod common;

use common::{Gateway, client, dump, metric};
use reqwest::StatusCode;
use serde_json::{Value, json};

const KEY: &str = "test-write-key-0123456789";
const CONFIG: &str = r#"
[[sources]]
id = "web"
write_key = "${TEST_WEB_KEY}"

[[sources]]
id = "server"
write_key = "server-write-key-0123456789"
"#;

fn start(dir: &std::path::Path) -> Gateway {
    let config = dir.join("handoff.toml");
    std::fs::write(&config, CONFIG).unwrap();
    Gateway::start(
        &dir.join("data"),
        &["--config", config.to_str().unwrap()],
        &[("TEST_WEB_KEY", KEY)],
    )
}

async fn post(gw: &Gateway, path: &str, body: Value) -> (StatusCode, Value) {
    common::post_json(gw, KEY, path, &body).await
}

async fn post_raw(
    gw: &Gateway,
    path: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut req = client().post(format!("{}{path}", gw.url)).body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}")),
    )
}

fn basic(key: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
}

#[tokio::test]
async fn every_route_stores_its_message_type() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path());
    let cases = [
        (
            "/v1/track",
            json!({"userId": "u1", "event": "Order Completed", "properties": {"total": 9.5}}),
        ),
        (
            "/v1/identify",
            json!({"userId": "u1", "traits": {"plan": "pro"}}),
        ),
        ("/v1/page", json!({"anonymousId": "a1", "name": "Home"})),
        (
            "/v1/screen",
            json!({"anonymousId": "a1", "name": "Settings"}),
        ),
        ("/v1/group", json!({"userId": "u1", "groupId": "g1"})),
        ("/v1/alias", json!({"userId": "u1", "previousId": "a1"})),
    ];
    for (path, body) in &cases {
        let (status, resp) = post(&gw, path, body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{path}: {resp}");
        assert_eq!(resp["success"], true);
    }
    for path in ["/v1/batch", "/v1/import"] {
        let (status, resp) = post(
            &gw,
            path,
            json!({"batch": [{"type": "track", "userId": "u2", "event": path}]}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{resp}");
        assert_eq!(resp["accepted"], 1);
    }
    let events = dump(&gw.data_dir, &[]);
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["event"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "track", "identify", "page", "screen", "group", "alias", "track", "track"
        ]
    );
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1);
        assert_eq!(e["source"], "web");
        assert_eq!(e["messageId"], e["event"]["messageId"]);
        assert_eq!(e["receivedAt"], e["event"]["receivedAt"]);
        assert!(e["event"].get("writeKey").is_none());
    }
    assert_eq!(events[0]["event"]["properties"]["total"], 9.5);
    assert_eq!(events[4]["event"]["groupId"], "g1");

    // --after skips what an operator has already seen.
    assert_eq!(dump(&gw.data_dir, &["--after", "6"]).len(), 2);

    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "handoff_events_accepted_total{source=\"web\"}"),
        8.0
    );
    assert_eq!(metric(&metrics, "handoff_journal_head_sequence"), 8.0);
    assert!(metric(&metrics, "handoff_journal_commit_seconds_count") >= 8.0);
    assert!(metric(&metrics, "handoff_journal_bytes") > 0.0);
}

#[tokio::test]
async fn write_key_in_body_gzip_and_liberal_content_types() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path());

    // writeKey in the body, no Authorization header, declared as text/plain (as browsers send it).
    let body = json!({"writeKey": KEY, "userId": "u1", "event": "in body"}).to_string();
    let (status, resp) = post_raw(
        &gw,
        "/v1/track",
        body.into_bytes(),
        &[("content-type", "text/plain")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resp}");

    let batch = json!({"writeKey": "server-write-key-0123456789",
                       "batch": [{"type": "identify", "userId": "u9"}]})
    .to_string();
    let (status, _) = post_raw(&gw, "/v1/batch", batch.into_bytes(), &[]).await;
    assert_eq!(status, StatusCode::OK);

    // gzip with the header, and gzip whose client forgot the header.
    let auth = basic(KEY);
    let gz = common::gzip(
        json!({"batch": [{"type": "track", "userId": "u1", "event": "gz"}]})
            .to_string()
            .as_bytes(),
    );
    let (status, resp) = post_raw(
        &gw,
        "/v1/batch",
        gz.clone(),
        &[
            ("authorization", &auth),
            ("content-encoding", "gzip"),
            ("content-type", "application/octet-stream"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let (status, _) = post_raw(&gw, "/v1/batch", gz, &[("authorization", &auth)]).await;
    assert_eq!(status, StatusCode::OK);

    let events = dump(&gw.data_dir, &[]);
    let seen: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap(),
                e["event"]["type"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("web", "track"),
            ("server", "identify"),
            ("web", "track"),
            ("web", "track")
        ]
    );
    assert!(
        events.iter().all(|e| e["event"].get("writeKey").is_none()),
        "write keys are never stored"
    );
}

/// Path, body, headers, expected status, expected error code.
type Case<'a> = (
    &'a str,
    Vec<u8>,
    Vec<(&'a str, &'a str)>,
    StatusCode,
    &'a str,
);

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path());
    let auth = basic(KEY);
    let a: &[(&str, &str)] = &[("authorization", &auth)];
    let unknown = basic("nope-not-a-key");
    let ok_track = json!({"userId": "u", "event": "e"})
        .to_string()
        .into_bytes();

    let cases: Vec<Case> = vec![
        (
            "/v1/track",
            b"{\"userId\": ".to_vec(),
            a.to_vec(),
            StatusCode::BAD_REQUEST,
            "request.json.malformed",
        ),
        (
            "/v1/track",
            b"[]".to_vec(),
            a.to_vec(),
            StatusCode::BAD_REQUEST,
            "request.body.not_object",
        ),
        (
            "/v1/track",
            br#"{"event": "e"}"#.to_vec(),
            a.to_vec(),
            StatusCode::BAD_REQUEST,
            "message.identity.missing",
        ),
        (
            "/v1/track",
            br#"{"userId": "u"}"#.to_vec(),
            a.to_vec(),
            StatusCode::BAD_REQUEST,
            "message.event.missing",
        ),
        (
            "/v1/batch",
            b"{}".to_vec(),
            a.to_vec(),
            StatusCode::BAD_REQUEST,
            "batch.missing",
        ),
        (
            "/v1/batch",
            br#"{"batch": []}"#.to_vec(),
            a.to_vec(),
            StatusCode::BAD_REQUEST,
            "batch.empty",
        ),
        (
            "/v1/track",
            ok_track.clone(),
            vec![],
            StatusCode::UNAUTHORIZED,
            "auth.write_key.missing",
        ),
        (
            "/v1/track",
            ok_track.clone(),
            vec![("authorization", "Basic !!!")],
            StatusCode::UNAUTHORIZED,
            "auth.header.malformed",
        ),
        (
            "/v1/track",
            ok_track.clone(),
            vec![("authorization", "Bearer abc")],
            StatusCode::UNAUTHORIZED,
            "auth.token.malformed",
        ),
        (
            "/v1/track",
            ok_track.clone(),
            vec![("authorization", &unknown)],
            StatusCode::UNAUTHORIZED,
            "auth.write_key.unknown",
        ),
        (
            "/v1/track",
            ok_track.clone(),
            vec![("authorization", &auth), ("content-encoding", "br")],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "request.encoding.unsupported",
        ),
        (
            "/v1/track",
            b"\x1f\x8b\x08garbage".to_vec(),
            a.to_vec(),
            StatusCode::BAD_REQUEST,
            "request.gzip.invalid",
        ),
        (
            "/v1/track",
            vec![b' '; 33 * 1024],
            a.to_vec(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "request.body.too_large",
        ),
        (
            "/v1/batch",
            vec![b' '; 501 * 1024],
            a.to_vec(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "request.body.too_large",
        ),
        // A gzip bomb: 100 KB on the wire, inflating far past the 500 KB batch limit.
        (
            "/v1/batch",
            common::gzip(&vec![b' '; 50 * 1024 * 1024]),
            a.to_vec(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "request.body.too_large",
        ),
        (
            "/v1/track",
            common::gzip(&vec![b' '; 40 * 1024]),
            a.to_vec(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "request.body.too_large",
        ),
    ];
    for (path, body, headers, status, code) in cases {
        let (got, resp) = post_raw(&gw, path, body, &headers).await;
        assert_eq!(
            (got, error_code(&resp)),
            (status, code),
            "{path} {headers:?}: {resp}"
        );
        assert!(!resp["error"]["message"].as_str().unwrap().is_empty());
    }

    // Wrong method and unknown route are JSON errors too.
    let resp = client()
        .get(format!("{}/v1/track", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        error_code(&resp.json().await.unwrap()),
        "request.method.not_allowed"
    );
    let resp = client()
        .post(format!("{}/v2/track", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(&resp.json().await.unwrap()), "route.not_found");

    // Nothing was stored, but the two refused messages are in quarantine with their codes.
    assert!(dump(&gw.data_dir, &[]).is_empty());
    let q = dump(&gw.data_dir, &["--quarantine"]);
    let codes: Vec<&str> = q.iter().map(|m| m["code"].as_str().unwrap()).collect();
    assert_eq!(codes, ["message.identity.missing", "message.event.missing"]);
    assert_eq!(q[0]["raw"], r#"{"event": "e"}"#);

    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "handoff_events_rejected_total{code=\"request.body.too_large\"}"
        ),
        4.0
    );
    assert_eq!(
        metric(
            &metrics,
            "handoff_events_rejected_total{code=\"message.identity.missing\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "handoff_auth_failures_total{code=\"auth.write_key.unknown\"}"
        ),
        1.0
    );
    assert_eq!(metric(&metrics, "handoff_quarantine_messages"), 2.0);

    // The server is still healthy after all of that.
    let resp = client()
        .get(format!("{}/healthz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = client()
        .get(format!("{}/readyz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn batch_keeps_good_messages_and_names_the_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path());
    let (status, resp) = post(
        &gw,
        "/v1/batch",
        json!({"batch": [
            {"type": "track", "userId": "u", "event": "first"},
            {"type": "track", "event": "no id"},
            {"type": "track", "userId": "u", "event": "third", "properties": {"big": "x".repeat(33 * 1024)}},
            {"type": "screen", "anonymousId": "a"},
            {"type": "refund", "userId": "u"}
        ]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["accepted"], 2);
    let rejected: Vec<(u64, &str)> = resp["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        rejected,
        [
            (1, "message.identity.missing"),
            (2, "message.too_large"),
            (4, "message.type.unknown")
        ]
    );

    let events = dump(&gw.data_dir, &[]);
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["event"]["event"], "first");
    assert_eq!(events[1]["event"]["type"], "screen");
    let q = dump(&gw.data_dir, &["--quarantine"]);
    assert_eq!(
        q.iter()
            .map(|m| m["index"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 4]
    );

    // A batch of nothing but bad messages fails as a whole, and still names each one.
    let (status, resp) = post(&gw, "/v1/batch", json!({"batch": [{"type": "track"}, 7]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&resp), "batch.rejected");
    assert_eq!(resp["rejected"].as_array().unwrap().len(), 2);
    assert_eq!(dump(&gw.data_dir, &["--quarantine"]).len(), 5);

    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "handoff_events_rejected_total{code=\"message.too_large\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "handoff_events_rejected_total{code=\"message.identity.missing\"}"
        ),
        2.0
    );
}

#[tokio::test]
async fn duplicates_skew_and_unknown_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path());
    let msg = json!({"userId": "u", "event": "Signed Up", "messageId": "dup-1",
                     "timestamp": "2020-01-01T00:00:00Z", "sentAt": "2020-01-01T00:00:10Z",
                     "vendorSpecific": {"keep": ["me", 1]}});
    let (status, first) = post(&gw, "/v1/track", msg.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(first.get("duplicate").is_none());
    let (status, second) = post(&gw, "/v1/track", msg.clone()).await;
    assert_eq!(status, StatusCode::OK, "a duplicate is still answered 200");
    assert_eq!(second["duplicate"], true);
    let (_, third) = post(
        &gw,
        "/v1/batch",
        json!({"batch": [{"type": "track", "userId": "u", "event": "x", "messageId": "dup-1"}]}),
    )
    .await;
    assert_eq!(
        (third["accepted"].as_u64(), third["duplicates"].as_u64()),
        (Some(0), Some(1))
    );

    // The same messageId from another source is a different event.
    let resp = client()
        .post(format!("{}/v1/track", gw.url))
        .basic_auth("server-write-key-0123456789", Some(""))
        .json(&msg)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    let events = dump(&gw.data_dir, &[]);
    assert_eq!(events.len(), 2);
    let e = &events[0]["event"];
    assert_eq!(e["vendorSpecific"], json!({"keep": ["me", 1]}));
    assert_eq!(e["originalTimestamp"], "2020-01-01T00:00:00Z");
    // Sent 10 s after it happened, by a clock years off: corrected to 10 s before receipt.
    let received = time::OffsetDateTime::parse(
        e["receivedAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let corrected = time::OffsetDateTime::parse(
        e["timestamp"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(received - corrected, time::Duration::seconds(10));

    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "handoff_events_duplicate_total{source=\"web\"}"),
        2.0
    );
}

#[tokio::test]
async fn ingest_accepts_an_events_write_token_bound_to_a_source() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(tmp.path());
    // The CLI checks a client's source against the gateway's configuration; this one also
    // declares a source the running gateway does not serve.
    let other = tmp.path().join("other.toml");
    std::fs::write(
        &other,
        format!(
            "{CONFIG}\n[[sources]]\nid = \"ghost\"\nwrite_key = \"ghost-write-key-0123456789\"\n"
        )
        .replace("${TEST_WEB_KEY}", KEY),
    )
    .unwrap();
    let other = other.to_str().unwrap().to_owned();
    let create = |args: &[&str]| {
        let mut all = vec!["--name", "backend", "--config", &other];
        all.extend(args);
        common::create_client(&gw.data_dir, &all)
    };
    let token_for = |creds: (String, String)| {
        let url = gw.url.clone();
        async move { common::fetch_token(&url, &creds, None).await }
    };
    // An events:write client must name its source, and only such a client may.
    let refused = create(&["--role", "ingest"]).unwrap_err();
    assert!(refused.contains("needs a source"), "{refused}");
    let refused = create(&["--role", "viewer", "--source", "web"]).unwrap_err();
    assert!(refused.contains("only applies"), "{refused}");

    let ingest_token =
        token_for(create(&["--role", "ingest", "--source", "server"]).unwrap()).await;
    let send = |token: String| {
        let url = format!("{}/v1/track", gw.url);
        async move {
            let resp = client()
                .post(url)
                .bearer_auth(token)
                .json(&json!({"userId": "u", "event": "by token"}))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = send(ingest_token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = dump(&gw.data_dir, &[]);
    assert_eq!(
        (events.len(), events[0]["source"].as_str()),
        (1, Some("server"))
    );

    // A token without events:write, or bound to a source this gateway does not serve, is refused.
    let viewer = create(&["--role", "viewer"]).unwrap();
    let (status, body) = send(token_for(viewer).await).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::FORBIDDEN, "auth.scope.insufficient")
    );
    let ghost = create(&["--role", "ingest", "--source", "ghost"]).unwrap();
    let (status, body) = send(token_for(ghost).await).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::FORBIDDEN, "auth.token.source_unknown")
    );
    let (status, body) = send("not.a.token".into()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(dump(&gw.data_dir, &[]).len(), 1);
}
