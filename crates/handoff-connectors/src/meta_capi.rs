//! Meta Conversions API: `POST /{api_version}/{pixel_id}/events` with `data[]` of server events.
//!
//! Customer information (`user_data`) is sent only in the form the policy decided: the fields
//! Meta requires hashed are taken only when they are SHA-256 hex digests (the destination's
//! `hash` transforms make them so), never as plain text.

use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use handoff_core::consent::get_path;

use crate::wire::{Classification, Item, WireRequest, classify_status, str_at};

/// Meta takes up to 1,000 events per request.
pub const MAX_BATCH: usize = 1000;
pub const DEFAULT_BASE_URL: &str = "https://graph.facebook.com";
pub const DEFAULT_API_VERSION: &str = "v21.0";

/// Segment's e-commerce spec names and Meta's standard events.
const STANDARD_EVENTS: &[(&str, &str)] = &[
    ("Order Completed", "Purchase"),
    ("Product Added", "AddToCart"),
    ("Product Added to Wishlist", "AddToWishlist"),
    ("Checkout Started", "InitiateCheckout"),
    ("Payment Info Entered", "AddPaymentInfo"),
    ("Product Viewed", "ViewContent"),
    ("Products Searched", "Search"),
    ("Signed Up", "CompleteRegistration"),
    ("Lead Generated", "Lead"),
    ("Subscription Started", "Subscribe"),
];

/// `user_data` fields Meta requires hashed, and where a Segment message carries them.
const HASHED: &[(&str, &[&str])] = &[
    ("em", &["context.traits.email", "traits.email"]),
    ("ph", &["context.traits.phone", "traits.phone"]),
    ("fn", &["context.traits.firstName", "traits.firstName"]),
    ("ln", &["context.traits.lastName", "traits.lastName"]),
    ("ge", &["context.traits.gender", "traits.gender"]),
    ("db", &["context.traits.birthday", "traits.birthday"]),
    (
        "ct",
        &["context.traits.address.city", "traits.address.city"],
    ),
    (
        "st",
        &["context.traits.address.state", "traits.address.state"],
    ),
    (
        "zp",
        &[
            "context.traits.address.postalCode",
            "traits.address.postalCode",
        ],
    ),
    (
        "country",
        &["context.traits.address.country", "traits.address.country"],
    ),
];

/// The Segment path a field of Meta's request carries (for its data category).
pub fn segment_path(wire_field: &str) -> String {
    let Some(f) = wire_field.strip_prefix("data.") else {
        return wire_field.to_owned();
    };
    if let Some(user) = f.strip_prefix("user_data.") {
        if let Some((_, paths)) = HASHED.iter().find(|(name, _)| *name == user) {
            return paths[0].to_owned();
        }
        return match user {
            "external_id" => "userId",
            "client_ip_address" => "context.ip",
            "client_user_agent" => "context.userAgent",
            "fbc" | "fbp" => "context.fbp",
            other => return format!("context.{other}"),
        }
        .to_owned();
    }
    if let Some(custom) = f.strip_prefix("custom_data.") {
        return format!("properties.{custom}");
    }
    match f {
        "event_name" => "event",
        "event_time" => "timestamp",
        "event_id" => "messageId",
        "event_source_url" => "context.page.url",
        "action_source" => "channel",
        other => other,
    }
    .to_owned()
}

#[derive(Debug, Clone)]
pub struct MetaCapi {
    pub destination: String,
    pub base_url: String,
    pub api_version: String,
    pub pixel_id: String,
    pub access_token: String,
    /// `website`, `app`, `email`, `phone_call`, `chat`, `physical_store`, `system_generated`,
    /// `business_messaging` or `other`.
    pub action_source: String,
    /// Sends to Meta's Test Events tool instead of production when set.
    pub test_event_code: Option<String>,
}

fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl MetaCapi {
    /// One server event for a decided payload.
    pub fn event(&self, item: &Item<'_>) -> Value {
        let p = item.payload;
        let kind = str_at(p, "type").unwrap_or("track");
        let event_name = match kind {
            "page" | "screen" => "PageView".to_owned(),
            _ => {
                let name = str_at(p, "event").unwrap_or("Event");
                STANDARD_EVENTS
                    .iter()
                    .find(|(segment, _)| *segment == name)
                    .map_or_else(|| name.to_owned(), |(_, meta)| (*meta).to_owned())
            }
        };
        let event_time = str_at(p, "timestamp")
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            .map_or(0, OffsetDateTime::unix_timestamp);

        let mut user = Map::new();
        for (field, paths) in HASHED {
            if let Some(v) = paths
                .iter()
                .find_map(|path| str_at(p, path))
                .filter(|v| is_digest(v))
            {
                user.insert((*field).into(), json!([v.to_ascii_lowercase()]));
            }
        }
        if let Some(id) = str_at(p, "userId").filter(|v| is_digest(v)) {
            user.insert("external_id".into(), json!([id]));
        }
        for (field, path) in [
            ("client_ip_address", "context.ip"),
            ("client_user_agent", "context.userAgent"),
            ("fbc", "context.fbc"),
            ("fbp", "context.fbp"),
        ] {
            if let Some(v) = str_at(p, path) {
                user.insert(field.into(), json!(v));
            }
        }

        let mut custom = Map::new();
        let props = p.get("properties");
        if let Some(props) = props {
            let value = ["value", "revenue", "total"]
                .iter()
                .find_map(|k| props.get(*k).filter(|v| v.is_number()));
            if let Some(v) = value {
                custom.insert("value".into(), v.clone());
            }
            for (meta, segment) in [
                ("currency", "currency"),
                ("order_id", "order_id"),
                ("search_string", "query"),
            ] {
                if let Some(v) = props.get(segment).filter(|v| v.is_string()) {
                    custom.insert(meta.into(), v.clone());
                }
            }
            if let Some(Value::Array(products)) = props.get("products") {
                let contents: Vec<Value> = products
                    .iter()
                    .filter_map(|pr| {
                        let id = pr.get("product_id").or_else(|| pr.get("sku"))?;
                        let mut c = Map::new();
                        c.insert(
                            "id".into(),
                            json!(id.as_str().map_or_else(|| id.to_string(), str::to_owned)),
                        );
                        if let Some(q) = pr.get("quantity").filter(|q| q.is_number()) {
                            c.insert("quantity".into(), q.clone());
                        }
                        if let Some(price) = pr.get("price").filter(|q| q.is_number()) {
                            c.insert("item_price".into(), price.clone());
                        }
                        Some(Value::Object(c))
                    })
                    .collect();
                if !contents.is_empty() {
                    let ids: Vec<Value> = contents.iter().map(|c| c["id"].clone()).collect();
                    custom.insert("content_ids".into(), Value::Array(ids));
                    custom.insert("contents".into(), Value::Array(contents));
                    custom.insert("content_type".into(), json!("product"));
                }
            } else if let Some(id) = props.get("product_id").and_then(Value::as_str) {
                custom.insert("content_ids".into(), json!([id]));
                custom.insert("content_type".into(), json!("product"));
            }
        }

        let mut event = json!({
            "event_name": event_name,
            "event_time": event_time,
            "event_id": item.delivery_id,
            "action_source": self.action_source,
            "user_data": Value::Object(user),
        });
        if let Some(url) = str_at(p, "context.page.url") {
            event["event_source_url"] = json!(url);
        }
        if !custom.is_empty() {
            event["custom_data"] = Value::Object(custom);
        }
        event
    }

    /// The body of one request for `items`.
    pub fn body(&self, items: &[Item<'_>]) -> Value {
        let data: Vec<Value> = items
            .iter()
            .map(|i| i.mapped.cloned().unwrap_or_else(|| self.event(i)))
            .collect();
        let mut body = json!({ "data": data, "access_token": self.access_token });
        if let Some(code) = &self.test_event_code {
            body["test_event_code"] = json!(code);
        }
        body
    }

    /// One request for up to [`MAX_BATCH`] items. The access token travels in the body, not the
    /// URL, so it never lands in a proxy's access log.
    pub fn request(&self, items: &[Item<'_>]) -> WireRequest {
        let body = self.body(items);
        WireRequest {
            method: "POST",
            url: format!(
                "{}/{}/{}/events",
                self.base_url.trim_end_matches('/'),
                self.api_version,
                self.pixel_id
            ),
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(&body).expect("a Value always serialises"),
        }
    }

    /// Meta answers an expired or revoked token with HTTP 400 and error code 190: that is a
    /// credentials problem, not a bad event.
    pub fn classify(
        &self,
        status: u16,
        retry_after: Option<std::time::Duration>,
        body: &[u8],
    ) -> Classification {
        let class = classify_status(status, retry_after, body, &[&self.access_token]);
        let code = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| get_path(&v, "error.code").and_then(Value::as_i64));
        match (class, code) {
            (Classification::Permanent { why }, Some(190)) => Classification::Credentials { why },
            (class, _) => class,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> MetaCapi {
        MetaCapi {
            destination: "meta-capi".into(),
            base_url: DEFAULT_BASE_URL.into(),
            api_version: "v21.0".into(),
            pixel_id: "1234567890".into(),
            access_token: "EAAtoken123".into(),
            action_source: "website".into(),
            test_event_code: None,
        }
    }

    /// Meta's documented example request (Conversions API, "Using the API"): a Purchase with
    /// hashed e-mail and phone, the browser's IP and user agent, value, currency and content
    /// ids. The same facts, as a decided Segment payload, must map to the same shape.
    #[test]
    fn a_request_built_from_the_decisions_mapping_is_the_same_request() {
        use crate::connector::Connector;
        let payloads = [
            json!({"type": "track", "event": "Order Completed", "messageId": "m-1",
                "timestamp": "2021-10-06T20:38:08.000Z",
                "context": {"ip": "192.19.9.9", "traits": {"email": "jane@example.com"}},
                "properties": {"value": 10, "currency": "EUR"}}),
            json!({"type": "track", "event": "Viewed", "messageId": "m-2",
                "timestamp": "2021-10-06T20:38:09.000Z"}),
        ];
        let ids = ["hd_1", "hd_2"];
        fn items<'a>(
            payloads: &'a [Value; 2],
            ids: [&'a str; 2],
            mapped: [Option<&'a Value>; 2],
        ) -> Vec<Item<'a>> {
            (0..2)
                .map(|i| Item {
                    message_id: "m",
                    delivery_id: ids[i],
                    vendor_ref: None,
                    mapped: mapped[i],
                    payload: &payloads[i],
                })
                .collect()
        }
        let now = time::OffsetDateTime::now_utc();
        let mapped: Vec<Value> = items(&payloads, ids, [None, None])
            .iter()
            .map(|i| {
                let body = meta().wire_body(i, now).unwrap();
                meta().mapped_item(&body).unwrap()
            })
            .collect();
        let fresh = meta().request(&items(&payloads, ids, [None, None]));
        let reused = meta().request(&items(&payloads, ids, [Some(&mapped[0]), Some(&mapped[1])]));
        assert_eq!(fresh, reused);
    }

    #[test]
    fn maps_like_metas_documented_example() {
        let payload = json!({
            "type": "track", "event": "Order Completed", "messageId": "m-1",
            "timestamp": "2021-10-06T20:38:08.000Z",
            "context": {
                "ip": "192.19.9.9", "userAgent": "test ua",
                "page": {"url": "http://jaspers-market.com/product/123"},
                "fbc": "fb.1.1554763741205.AbCdEfGhIjKlMnOpQrStUvWxYz1234567890",
                "fbp": "fb.1.1558571054389.1098115397",
                "traits": {
                    "email": "309a0a5c3e211326ae75ca18196d301a9bdbd1a882a4d2569511033da23f0abd",
                    "phone": "254aa248acb47dd654ca3ea53f48c2c26d641d23d7e2e93a1ec56258df7674c4"
                }
            },
            "properties": {"value": 100.2, "currency": "USD", "products": [{"product_id": "product.id.123"}]}
        });
        let req = meta().request(&[Item {
            message_id: "m-1",
            delivery_id: "hd_m-1",
            vendor_ref: None,
            mapped: None,
            payload: &payload,
        }]);
        assert_eq!(
            req.url,
            "https://graph.facebook.com/v21.0/1234567890/events"
        );
        let body: Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body["access_token"], "EAAtoken123");
        let e = &body["data"][0];
        assert_eq!(e["event_name"], "Purchase");
        assert_eq!(e["event_time"], 1633552688);
        assert_eq!(e["event_id"], "hd_m-1");
        assert_eq!(
            e["event_source_url"],
            "http://jaspers-market.com/product/123"
        );
        assert_eq!(e["action_source"], "website");
        assert_eq!(
            e["user_data"],
            json!({
                "em": ["309a0a5c3e211326ae75ca18196d301a9bdbd1a882a4d2569511033da23f0abd"],
                "ph": ["254aa248acb47dd654ca3ea53f48c2c26d641d23d7e2e93a1ec56258df7674c4"],
                "client_ip_address": "192.19.9.9",
                "client_user_agent": "test ua",
                "fbc": "fb.1.1554763741205.AbCdEfGhIjKlMnOpQrStUvWxYz1234567890",
                "fbp": "fb.1.1558571054389.1098115397"
            })
        );
        assert_eq!(e["custom_data"]["value"], 100.2);
        assert_eq!(e["custom_data"]["currency"], "USD");
        assert_eq!(e["custom_data"]["content_ids"], json!(["product.id.123"]));
        assert_eq!(e["custom_data"]["content_type"], "product");
    }

    #[test]
    fn plain_text_identifiers_are_never_sent() {
        let payload = json!({"type": "track", "event": "Lead Generated", "userId": "user-42",
            "context": {"traits": {"email": "jane@example.org", "firstName": "Jane"}}});
        let e = meta().event(&Item {
            message_id: "m",
            delivery_id: "hd_m",
            vendor_ref: None,
            mapped: None,
            payload: &payload,
        });
        assert_eq!(e["event_name"], "Lead");
        assert_eq!(e["user_data"], json!({}));
        let page = json!({"type": "page", "name": "Home"});
        assert_eq!(
            meta().event(&Item {
                message_id: "p",
                delivery_id: "hd_p",
                vendor_ref: None,
                mapped: None,
                payload: &page
            })["event_name"],
            "PageView"
        );
    }

    #[test]
    fn an_invalid_token_is_a_credentials_failure() {
        let body = br#"{"error":{"message":"Error validating access token: EAAtoken123 expired","type":"OAuthException","code":190}}"#;
        let Classification::Credentials { why } = meta().classify(400, None, body) else {
            panic!()
        };
        assert!(
            why.contains("[secret]") && !why.contains("EAAtoken123"),
            "{why}"
        );
        let bad_event = br#"{"error":{"message":"Invalid parameter","code":100}}"#;
        assert!(matches!(
            meta().classify(400, None, bad_event),
            Classification::Permanent { .. }
        ));
    }
}
