//! What `plan` shows is what the vendor receives, and what the ledger records: for every
//! connector and the documented example events of the Segment spec, the wire body `plan`
//! prints, the field names the ledger records and the bytes a fake vendor receives agree.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use common::{BIN, EXAMPLE_ENV, Gateway, client, create_client, fetch_token, until_async};
use handoff_connectors::wire::{MASKED, form_json, wire_fields};
use serde_json::{Value, json};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../handoff.example.toml");
const WRITE_KEY: &str = "0123456789abcdef0123";

/// A request a fake vendor received: path, headers, body.
type Received = (String, BTreeMap<String, String>, Vec<u8>);
type Seen = Arc<Mutex<Vec<Received>>>;

/// One fake for every vendor: records each request; Stripe's create answers with a customer.
async fn vendor() -> (String, Seen) {
    async fn record(
        State(seen): State<Seen>,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> (StatusCode, String) {
        let headers = headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let path = uri.path().to_owned();
        let answer = if path.starts_with("/v1/customers") {
            json!({"id": "cus_NffrFeUfNV2Hib", "object": "customer"}).to_string()
        } else {
            "{}".to_owned()
        };
        seen.lock().unwrap().push((path, headers, body.to_vec()));
        (StatusCode::OK, answer)
    }
    let seen: Seen = Arc::default();
    let app = Router::new()
        .fallback(axum::routing::post(record))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

/// The example configuration users start from, every vendor pointed at the fake, plus a
/// Segment-compatible forward (the example has none).
fn config(base: &str) -> String {
    let example = std::fs::read_to_string(EXAMPLE).unwrap();
    let mut cfg = String::new();
    for line in example.lines() {
        if line.starts_with("endpoint = ") {
            cfg.push_str(&format!("endpoint = \"{base}/hook\"\n"));
            continue;
        }
        cfg.push_str(line);
        cfg.push('\n');
        if [
            "connector = \"meta_capi\"",
            "connector = \"ga4\"",
            "connector = \"stripe\"",
        ]
        .contains(&line.trim())
        {
            cfg.push_str(&format!("endpoint = \"{base}\"\n"));
        }
    }
    cfg.push_str(&format!(
        r#"
[[destinations]]
id = "mirror"
vendor = "helpdesk"
connector = "segment"
purposes = ["support"]
legal_basis = "legitimate_interest"
event_types = ["track", "identify", "page"]
allow = ["event", "name", "userId", "anonymousId", "properties.*", "context.page.*"]
endpoint = "{base}"
settings = {{ write_key = "mirror-write-key-0123456789" }}
"#
    ));
    cfg
}

/// The Segment spec's documented examples (identify, page, the e-commerce events), one user
/// each, with the consent the example config asks for.
fn examples() -> Vec<Value> {
    let consent = json!({"categoryPreferences": {"Advertising": true, "Analytics": true}});
    vec![
        json!({"type": "identify", "userId": "97980cfea0067", "messageId": "ex-identify",
            "timestamp": "2026-11-25T10:00:00.000Z",
            "traits": {"name": "Peter Gibbons", "email": "peter@example.com", "phone": "555-555-5555",
                "address": {"street": "6th St", "city": "San Francisco", "state": "CA", "postalCode": "94103", "country": "USA"}},
            "context": {"consent": consent, "ip": "203.0.113.10"}}),
        json!({"type": "page", "name": "Pricing", "userId": "user-page-1", "anonymousId": "507f191e810c19729de860ea",
            "messageId": "ex-page", "timestamp": "2026-11-25T10:01:00.000Z",
            "properties": {"title": "Segment Pricing", "url": "https://segment.com/pricing"},
            "context": {"consent": consent, "ip": "203.0.113.11",
                "page": {"url": "https://segment.com/pricing", "title": "Segment Pricing", "referrer": "https://segment.com/warehouses"}}}),
        json!({"type": "track", "event": "Product Viewed", "userId": "user-view-1", "anonymousId": "anon-view-1",
            "messageId": "ex-viewed", "timestamp": "2026-11-25T10:02:00.000Z",
            "properties": {"product_id": "507f1f77bcf86cd799439011", "sku": "G-32", "category": "Games",
                "name": "Monopoly: 3rd Edition", "price": 18.99, "currency": "USD"},
            "context": {"consent": consent, "ip": "203.0.113.12", "userAgent": "Mozilla/5.0",
                "page": {"url": "https://shop.example/monopoly"}}}),
        json!({"type": "track", "event": "Order Completed", "userId": "user-order-1", "anonymousId": "anon-order-1",
            "messageId": "ex-order", "timestamp": "2026-11-25T10:03:00.000Z",
            "properties": {"order_id": "50314b8e9bcf000000000000", "total": 27.5, "revenue": 25.0,
                "currency": "USD", "coupon": "hasbros",
                "products": [{"product_id": "507f1f77bcf86cd799439011", "sku": "45790-32", "name": "Monopoly: 3rd Edition", "price": 19, "quantity": 1},
                             {"product_id": "505bd76785ebb509fc183733", "sku": "46493-32", "name": "Uno Card Game", "price": 3, "quantity": 2}]},
            "context": {"consent": consent, "ip": "203.0.113.13", "userAgent": "Mozilla/5.0",
                "traits": {"email": "order@example.com", "firstName": "Ann", "lastName": "Lee"}}}),
        // A server-side event naming only its user: GA4 gets a client id derived from the
        // user id as it is sent (the pseudonym).
        json!({"type": "track", "event": "Signed Up", "userId": "user-server-1", "messageId": "ex-server",
            "timestamp": "2026-11-25T10:04:00.000Z", "context": {"consent": consent}}),
    ]
}

/// The connector of each destination of the test configuration, and where its vendor is.
const DESTINATIONS: &[(&str, &str)] = &[
    ("meta-capi", "/v21.0/1234567890/events"),
    ("ga4", "/mp/collect"),
    ("stripe", "/v1/customers"),
    ("crm-webhook", "/hook"),
    ("mirror", "/v1/batch"),
];

/// A wire body with what differs between a plan and a delivery by design replaced: the
/// delivery id (a plan has none; the real one is keyed) and the send time.
fn normalised(destination: &str, mut body: Value) -> Value {
    let set = |v: &mut Value, key: &str| {
        if let Some(slot) = v.get_mut(key) {
            *slot = json!("<varies>");
        }
    };
    match destination {
        "meta-capi" => {
            for e in body["data"].as_array_mut().into_iter().flatten() {
                set(e, "event_id");
            }
        }
        "mirror" => {
            set(&mut body, "sentAt");
            for m in body["batch"].as_array_mut().into_iter().flatten() {
                set(m, "messageId");
            }
        }
        _ => {}
    }
    body
}

/// A received body as the vendor reads it, its secrets masked as `plan` masks them.
fn read_received(destination: &str, body: &[u8]) -> Value {
    if destination == "stripe" {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).unwrap();
        return form_json(&pairs);
    }
    let mut v: Value = serde_json::from_slice(body).unwrap();
    if destination == "meta-capi" {
        assert_eq!(
            v["access_token"], "EAAexampletoken",
            "the token travels in the body"
        );
        v["access_token"] = json!(MASKED);
    }
    v
}

fn report(data: &std::path::Path, user: &str) -> Value {
    let out = Command::new(BIN)
        .args(["report", "subject", "--user-id", user, "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn plan_the_ledger_and_the_vendor_agree_on_what_was_sent() {
    let (base, seen) = vendor().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("handoff.toml");
    std::fs::write(&cfg, config(&base)).unwrap();
    let gw = Gateway::start(&data, &["--config", cfg.to_str().unwrap()], EXAMPLE_ENV);
    let creds = create_client(&data, &["--name", "wire-test", "--role", "viewer"]).unwrap();
    let token = fetch_token(&gw.url, &creds, None).await;

    let mut checked: BTreeMap<String, usize> = BTreeMap::new();
    let mut category_checks = 0;
    for event in examples() {
        let user = event["userId"].as_str().unwrap().to_owned();
        let plan: Value = client()
            .post(format!("{}/admin/v1/plan", gw.url))
            .bearer_auth(&token)
            .json(&event)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let sends: Vec<&Value> = plan["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["decision"] == "send")
            .collect();
        assert!(!sends.is_empty(), "{plan}");
        for d in plan["destinations"].as_array().unwrap() {
            if d["decision"] == "send" {
                assert!(d["wire"].is_object(), "a send shows its wire request: {d}");
            } else {
                assert!(d["wire"].is_null(), "{d}");
            }
        }

        let before = seen.lock().unwrap().len();
        let (status, body) =
            common::post_json(&gw, WRITE_KEY, "/v1/batch", &json!({"batch": [event]})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let expected = sends.len();
        until_async(
            20,
            "every planned send arrived",
            || {
                let seen = seen.clone();
                async move { seen.lock().unwrap().len() - before >= expected }
            },
            true,
        )
        .await;
        // Nothing the plan blocked arrived.
        let arrived: Vec<Received> = seen.lock().unwrap()[before..].to_vec();
        assert_eq!(arrived.len(), expected, "{plan}");

        // The ledger's deliveries for this person, once every vendor's answer is recorded.
        let delivered = |data: std::path::PathBuf, user: String| async move {
            report(&data, &user)["entries"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["kind"] == "delivery" && e["outcome"] == "delivered")
                .count()
        };
        until_async(
            20,
            "every delivery recorded",
            || delivered(data.clone(), user.clone()),
            expected,
        )
        .await;
        let r = report(&data, &user);
        for d in sends {
            let id = d["id"].as_str().unwrap();
            let path = DESTINATIONS.iter().find(|(d, _)| *d == id).unwrap().1;
            let wire = &d["wire"];
            let plan_fields: Vec<String> = serde_json::from_value(wire["fields"].clone()).unwrap();
            assert!(!plan_fields.is_empty(), "{id}: {wire}");
            assert_eq!(plan_fields, wire_fields(&wire["body"]), "{id}");

            let (got_path, got_headers, got_body) = arrived
                .iter()
                .find(|(p, _, _)| p == path)
                .unwrap_or_else(|| panic!("{id}: nothing arrived at {path}: {arrived:?}"));
            assert!(
                wire["url"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{base}{got_path}")),
                "{id}: {wire}"
            );
            // Every header the plan shows was sent; those the plan does not mask or that do
            // not vary by send (ids, times, signatures over them) with the same value.
            for h in wire["headers"].as_array().unwrap() {
                let (name, value) = (h[0].as_str().unwrap(), h[1].as_str().unwrap());
                if name == "authorization" || name == "webhook-signature" {
                    // A signature made with the real secret would be valid to replay.
                    assert_eq!(value, MASKED, "{id}: {name} is masked in a plan");
                }
                let sent = got_headers
                    .get(name)
                    .unwrap_or_else(|| panic!("{id}: {name} not sent"));
                if value != MASKED
                    && ![
                        "webhook-id",
                        "webhook-timestamp",
                        "webhook-signature",
                        "idempotency-key",
                    ]
                    .contains(&name)
                {
                    assert_eq!(sent, value, "{id}: {name}");
                }
            }
            let received = read_received(id, got_body);
            assert_eq!(
                normalised(id, received.clone()),
                normalised(id, wire["body"].clone()),
                "{id}: the vendor received what plan showed"
            );
            assert_eq!(wire_fields(&received), plan_fields, "{id}");

            let recorded: Vec<&Value> = r["entries"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["destination"] == id && e["kind"] == "delivery")
                .collect();
            assert_eq!(recorded.len(), 1, "{id}: {r}");
            let ledger_fields: Vec<&str> =
                recorded[0]["fields"].as_str().unwrap().split(',').collect();
            assert_eq!(
                ledger_fields, plan_fields,
                "{id}: the ledger names what was sent"
            );
            // The categories of what was sent, found through the connector's field meanings.
            let plan_categories: Vec<&str> = wire["categories"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap())
                .collect();
            let ledger_categories: Vec<&str> = recorded[0]["categories"]
                .as_str()
                .unwrap()
                .split(',')
                .collect();
            assert_eq!(ledger_categories, plan_categories, "{id}");
            if event["messageId"] == "ex-order" {
                let has = |c: &str| plan_categories.contains(&c);
                match id {
                    // The IP and user agent travel as client_ip_address / client_user_agent,
                    // the e-mail hashed as em.
                    "meta-capi" => {
                        category_checks += 1;
                        assert!(
                            has("location") && has("device") && has("contact") && has("commercial"),
                            "{id}: {plan_categories:?}"
                        )
                    }
                    // GA4's mapping sends no IP, whatever the allowlist lets through.
                    "ga4" => {
                        category_checks += 1;
                        assert!(
                            !has("location") && has("commercial") && has("identifiers"),
                            "{id}: {plan_categories:?}"
                        )
                    }
                    _ => {}
                }
            }
            *checked.entry(id.to_owned()).or_default() += 1;
        }
    }
    assert_eq!(category_checks, 2, "the order reached Meta and GA4");
    // Every connector was proved on at least one example.
    assert_eq!(
        checked.keys().map(String::as_str).collect::<Vec<_>>(),
        ["crm-webhook", "ga4", "meta-capi", "mirror", "stripe"],
        "{checked:?}"
    );
}
