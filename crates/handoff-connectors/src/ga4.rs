//! Google Analytics 4 Measurement Protocol: `POST /mp/collect?measurement_id=…&api_secret=…`
//! with `client_id`, `user_id` and up to 25 `events[]`.
//!
//! One request carries one `client_id` and one `timestamp_micros`, so items are batched by
//! both ([`Ga4::batch_key`]). The `client_id` is the event's `anonymousId`; a server-side event
//! with only a `userId` gets one derived from the `userId` as this destination sends it (the
//! pseudonym, where the destination pseudonymises it): `uid.` and 32 hex digits of its SHA-256,
//! the same for every event of the person, and telling GA4 nothing its `user_id` does not.
//! GA4 has no deduplication key: a retried request may be counted twice. GA4 answers 2xx even to payloads it drops; the names and values
//! are therefore made valid here: names of letters, digits and `_`, starting with a letter, at
//! most 40 characters; at most 25 parameters; string values cut to 100 characters.

use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::erasure::{Erasure, ErasureTarget};
use crate::wire::{Item, WireRequest, str_at};

pub const MAX_BATCH: usize = 25;
pub const DEFAULT_BASE_URL: &str = "https://www.google-analytics.com";
const MAX_NAME: usize = 40;
const MAX_PARAMS: usize = 25;
const MAX_VALUE_CHARS: usize = 100;

/// Segment's spec names and GA4's recommended events.
const RECOMMENDED: &[(&str, &str)] = &[
    ("Order Completed", "purchase"),
    ("Product Added", "add_to_cart"),
    ("Product Removed", "remove_from_cart"),
    ("Product Added to Wishlist", "add_to_wishlist"),
    ("Checkout Started", "begin_checkout"),
    ("Payment Info Entered", "add_payment_info"),
    ("Product Viewed", "view_item"),
    ("Product List Viewed", "view_item_list"),
    ("Products Searched", "search"),
    ("Order Refunded", "refund"),
    ("Signed Up", "sign_up"),
    ("Signed In", "login"),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ga4Error {
    #[error(
        "GA4 needs a client id: the payload has neither anonymousId nor userId (allow one of them for this destination)"
    )]
    NoClientId,
}

/// An identifier at `key`: a non-empty string, or a number as its text (ingest takes both).
fn id_at(payload: &Value, key: &str) -> Option<String> {
    match payload.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The `client_id` a user id gets when the event has no `anonymousId`.
pub fn derived_client_id(user_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest([b"handoff-ga4-client-id\0", user_id.as_bytes()].concat());
    crate::wire::prefixed_hex("uid.", &digest)
}

/// The `client_id` of an event: its `anonymousId`, else one derived from its `userId`.
pub fn client_id(payload: &Value) -> Option<String> {
    id_at(payload, "anonymousId")
        .or_else(|| id_at(payload, "userId").map(|u| derived_client_id(&u)))
}

/// The Segment path a field of a Measurement Protocol request carries (for its category).
pub fn segment_path(wire_field: &str) -> String {
    match wire_field {
        "client_id" => return "anonymousId".to_owned(),
        "user_id" => return "userId".to_owned(),
        "timestamp_micros" => return "timestamp".to_owned(),
        "events.name" => return "event".to_owned(),
        _ => {}
    }
    match wire_field.strip_prefix("events.params.") {
        Some("page_location") => "context.page.url".to_owned(),
        Some("page_title") => "context.page.title".to_owned(),
        Some("page_referrer") => "context.page.referrer".to_owned(),
        Some("screen_name") => "name".to_owned(),
        Some(param) => format!("properties.{param}"),
        None => wire_field.to_owned(),
    }
}

#[derive(Debug, Clone)]
pub struct Ga4 {
    pub base_url: String,
    pub measurement_id: String,
    pub api_secret: String,
    /// The GA4 property (numeric id) for the User Deletion API.
    pub property_id: Option<String>,
    /// An OAuth access token with the `analytics.user.deletion` scope.
    pub deletion_token: Option<String>,
    pub deletion_url: String,
}

/// Google Analytics User Deletion API (`userDeletionRequests:upsert`).
pub const DEFAULT_DELETION_URL: &str =
    "https://www.googleapis.com/analytics/v3/userDeletion/userDeletionRequests:upsert";

/// A GA4 name: `Order Completed` → `order_completed`.
pub fn name(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len().min(MAX_NAME));
    for c in raw.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') && !out.is_empty() {
            out.push('_');
        }
    }
    let mut out = out.trim_end_matches('_').to_owned();
    if !out.starts_with(|c: char| c.is_ascii_alphabetic()) {
        out.insert_str(0, "e_");
    }
    out.truncate(MAX_NAME);
    out
}

fn param_value(v: &Value) -> Option<Value> {
    match v {
        Value::String(s) => Some(json!(s.chars().take(MAX_VALUE_CHARS).collect::<String>())),
        Value::Number(_) => Some(v.clone()),
        Value::Bool(b) => Some(json!(if *b { 1 } else { 0 })),
        _ => None,
    }
}

impl Ga4 {
    /// One User Deletion API request per identifier GA4 can know: `USER_ID` for user ids (as
    /// sent: the pseudonym where the destination pseudonymises them), `CLIENT_ID` for anonymous
    /// ids (our mapping sends `anonymousId` as `client_id`) and for the client ids derived from
    /// user ids (events that had no `anonymousId`).
    pub fn erasure_requests(&self, target: &ErasureTarget) -> Erasure {
        let (Some(property), Some(token)) = (&self.property_id, &self.deletion_token) else {
            return Erasure::Manual(
                "This GA4 destination has no settings.property_id and settings.deletion_access_token, \
                 so Handoff cannot call Google's User Deletion API. Delete the user in Google \
                 Analytics (Admin → Data deletion requests, or the User Explorer) by the ids GA4 \
                 holds, listed in `quote`: the user ids as it was sent them (pseudonyms where the \
                 destination pseudonymises them) and the client ids (anonymous ids, and `uid.…` \
                 ids derived from user ids). Then confirm with \
                 `handoff dsr confirm DSR_ID DESTINATION --note \"…\"`."
                    .into(),
            );
        };
        let derived: Vec<String> = target
            .user_ids
            .iter()
            .map(|u| derived_client_id(u))
            .collect();
        let ids = target
            .user_ids
            .iter()
            .map(|u| ("USER_ID", u))
            .chain(target.anonymous_ids.iter().map(|a| ("CLIENT_ID", a)))
            .chain(derived.iter().map(|c| ("CLIENT_ID", c)));
        let calls: Vec<WireRequest> = ids
            .map(|(kind, id)| WireRequest {
                method: "POST",
                url: self.deletion_url.clone(),
                headers: vec![
                    ("content-type".into(), "application/json".into()),
                    ("authorization".into(), format!("Bearer {token}")),
                ],
                body: serde_json::to_vec(&json!({
                    "kind": "analytics#userDeletionRequest",
                    "id": {"type": kind, "userId": id},
                    "propertyId": property,
                }))
                .expect("a Value always serialises"),
            })
            .collect();
        if calls.is_empty() {
            Erasure::NothingHeld(
                "the request names no user id or anonymous id, the only ids GA4 can delete by"
                    .into(),
            )
        } else {
            Erasure::Calls(calls)
        }
    }

    /// Items with the same key may share a request: one `client_id`, `user_id` and
    /// `timestamp_micros` per request, so items differing in any of them never share one (each
    /// then goes out exactly as its own mapping, which the ledger records, says).
    pub fn batch_key(item: &Item<'_>) -> String {
        format!(
            "{}|{}|{}",
            client_id(item.payload).unwrap_or_default(),
            id_at(item.payload, "userId").unwrap_or_default(),
            str_at(item.payload, "timestamp").unwrap_or("")
        )
    }

    pub fn event(item: &Item<'_>) -> Value {
        let p = item.payload;
        let event_name = match str_at(p, "type") {
            Some("page") => "page_view".to_owned(),
            Some("screen") => "screen_view".to_owned(),
            _ => {
                let raw = str_at(p, "event").unwrap_or("event");
                RECOMMENDED
                    .iter()
                    .find(|(segment, _)| *segment == raw)
                    .map_or_else(|| name(raw), |(_, ga)| (*ga).to_owned())
            }
        };
        let mut params = Map::new();
        if let Some(Value::Object(props)) = p.get("properties") {
            for (k, v) in props {
                let key = match k.as_str() {
                    "order_id" => "transaction_id".to_owned(),
                    "revenue" | "total" => "value".to_owned(),
                    "products" => continue,
                    other => name(other),
                };
                if params.len() >= MAX_PARAMS {
                    break;
                }
                if let Some(v) = param_value(v) {
                    params.entry(key).or_insert(v);
                }
            }
            if let Some(Value::Array(products)) = props.get("products") {
                let items: Vec<Value> = products
                    .iter()
                    .map(|pr| {
                        let mut it = Map::new();
                        for (ga, seg) in [
                            ("item_id", "product_id"),
                            ("item_name", "name"),
                            ("quantity", "quantity"),
                            ("price", "price"),
                            ("item_category", "category"),
                        ] {
                            if let Some(v) = pr.get(seg).and_then(param_value) {
                                it.insert(ga.into(), v);
                            }
                        }
                        Value::Object(it)
                    })
                    .collect();
                params.insert("items".into(), Value::Array(items));
            }
        }
        if event_name == "screen_view"
            && let Some(v) = str_at(p, "name").or_else(|| str_at(p, "properties.name"))
        {
            params.insert(
                "screen_name".into(),
                json!(v.chars().take(MAX_VALUE_CHARS).collect::<String>()),
            );
        }
        if event_name == "page_view" {
            for (ga, seg) in [
                ("page_location", "context.page.url"),
                ("page_title", "context.page.title"),
                ("page_referrer", "context.page.referrer"),
            ] {
                if let Some(v) = str_at(p, seg) {
                    params.insert(
                        ga.into(),
                        json!(v.chars().take(MAX_VALUE_CHARS).collect::<String>()),
                    );
                }
            }
        }
        json!({ "name": event_name, "params": Value::Object(params) })
    }

    /// The request for items sharing one [`Ga4::batch_key`] (at most [`MAX_BATCH`]).
    pub fn request(&self, items: &[Item<'_>]) -> Result<WireRequest, Ga4Error> {
        let body = Self::body(items)?;
        let query = serde_urlencoded::to_string([
            ("measurement_id", &self.measurement_id),
            ("api_secret", &self.api_secret),
        ])
        .expect("strings always encode");
        Ok(WireRequest {
            method: "POST",
            url: format!("{}/mp/collect?{query}", self.base_url.trim_end_matches('/')),
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(&body).expect("a Value always serialises"),
        })
    }

    /// The body of one request for items sharing one [`Ga4::batch_key`].
    pub fn body(items: &[Item<'_>]) -> Result<Value, Ga4Error> {
        let first = items.first().ok_or(Ga4Error::NoClientId)?;
        let client_id = client_id(first.payload).ok_or(Ga4Error::NoClientId)?;
        let mut body = json!({
            "client_id": client_id,
            "events": items.iter().map(Ga4::event).collect::<Vec<_>>(),
        });
        if let Some(user) = id_at(first.payload, "userId") {
            body["user_id"] = json!(user);
        }
        if let Some(t) =
            str_at(first.payload, "timestamp").and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        {
            body["timestamp_micros"] = json!((t.unix_timestamp_nanos() / 1000) as i64);
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ga4() -> Ga4 {
        Ga4 {
            property_id: Some("123456789".into()),
            deletion_token: Some("ya29.token".into()),
            deletion_url: DEFAULT_DELETION_URL.into(),
            base_url: DEFAULT_BASE_URL.into(),
            measurement_id: "G-XXXXXXXXXX".into(),
            api_secret: "s3cr3t".into(),
        }
    }

    /// The shape of Google's documented Measurement Protocol request: `client_id`, optional
    /// `user_id` and `timestamp_micros`, `events[]` of `name` and `params`; a purchase with
    /// `transaction_id`, `value`, `currency` and `items`.
    #[test]
    fn maps_a_purchase_like_the_documented_request() {
        let payload = json!({
            "type": "track", "event": "Order Completed", "anonymousId": "123456.7654321", "userId": "pseudonym-1",
            "timestamp": "2026-11-25T10:00:00.000Z",
            "properties": {"order_id": "T_12345", "revenue": 25.42, "currency": "USD", "coupon": "SUMMER",
                           "products": [{"product_id": "SKU_12345", "name": "Stan and Friends Tee", "quantity": 3, "price": 9.99}]}
        });
        let req = ga4()
            .request(&[Item {
                message_id: "m-1",
                delivery_id: "hd_m-1",
                vendor_ref: None,
                mapped: None,
                payload: &payload,
            }])
            .unwrap();
        assert_eq!(
            req.url,
            "https://www.google-analytics.com/mp/collect?measurement_id=G-XXXXXXXXXX&api_secret=s3cr3t"
        );
        let body: Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body["client_id"], "123456.7654321");
        assert_eq!(body["user_id"], "pseudonym-1");
        assert_eq!(body["timestamp_micros"], 1_795_600_800_000_000i64);
        assert_eq!(
            body["events"][0],
            json!({
                "name": "purchase",
                "params": {
                    "transaction_id": "T_12345", "value": 25.42, "currency": "USD", "coupon": "SUMMER",
                    "items": [{"item_id": "SKU_12345", "item_name": "Stan and Friends Tee", "quantity": 3, "price": 9.99}]
                }
            })
        );
    }

    #[test]
    fn names_and_values_are_made_valid() {
        assert_eq!(name("Video Playback Started!"), "video_playback_started");
        assert_eq!(name("2fa enabled"), "e_2fa_enabled");
        assert_eq!(name(&"x".repeat(60)).len(), 40);
        let payload = json!({"type": "track", "event": "Long", "anonymousId": "a",
            "properties": {"note": "y".repeat(300), "ok": true}});
        let e = Ga4::event(&Item {
            message_id: "m",
            delivery_id: "hd_m",
            vendor_ref: None,
            mapped: None,
            payload: &payload,
        });
        assert_eq!(e["params"]["note"].as_str().unwrap().len(), 100);
        assert_eq!(e["params"]["ok"], 1);
        let no_client = json!({"type": "track", "event": "x"});
        assert_eq!(
            ga4()
                .request(&[Item {
                    message_id: "m",
                    delivery_id: "hd_m",
                    vendor_ref: None,
                    mapped: None,
                    payload: &no_client
                }])
                .unwrap_err(),
            Ga4Error::NoClientId
        );
    }

    #[test]
    fn a_server_side_event_with_only_a_user_id_gets_a_stable_client_id() {
        let event = |user: Value| json!({"type": "track", "event": "Signed Up", "userId": user});
        let request = |payload: &Value| {
            let req = ga4()
                .request(&[Item {
                    message_id: "m",
                    delivery_id: "hd_m",
                    vendor_ref: None,
                    mapped: None,
                    payload,
                }])
                .unwrap();
            serde_json::from_slice::<Value>(&req.body).unwrap()
        };
        let a = request(&event(json!("pseudonym-1")));
        assert_eq!(a["user_id"], "pseudonym-1");
        assert_eq!(a["client_id"], derived_client_id("pseudonym-1"));
        assert!(a["client_id"].as_str().unwrap().starts_with("uid."));
        assert_eq!(
            request(&event(json!("pseudonym-1")))["client_id"],
            a["client_id"]
        );
        assert_ne!(
            request(&event(json!("pseudonym-2")))["client_id"],
            a["client_id"]
        );
        let numeric = request(&event(json!(42)));
        assert_eq!(
            (numeric["user_id"].as_str(), numeric["client_id"].as_str()),
            (Some("42"), Some(derived_client_id("42").as_str()))
        );
        // Its erasure asks GA4 to delete the derived client id too.
        let target = ErasureTarget {
            user_ids: vec!["pseudonym-1".into()],
            ..ErasureTarget::default()
        };
        let Erasure::Calls(calls) = ga4().erasure_requests(&target) else {
            panic!("calls expected")
        };
        let ids: Vec<Value> = calls
            .iter()
            .map(|c| serde_json::from_slice::<Value>(&c.body).unwrap()["id"].clone())
            .collect();
        assert_eq!(
            ids,
            [
                json!({"type": "USER_ID", "userId": "pseudonym-1"}),
                json!({"type": "CLIENT_ID", "userId": derived_client_id("pseudonym-1")})
            ]
        );
    }

    #[test]
    fn a_screen_is_a_screen_view_with_its_name() {
        let payload = json!({"type": "screen", "anonymousId": "a", "name": "Checkout"});
        let e = Ga4::event(&Item {
            message_id: "m",
            delivery_id: "hd_m",
            vendor_ref: None,
            mapped: None,
            payload: &payload,
        });
        assert_eq!(e["name"], "screen_view");
        assert_eq!(e["params"]["screen_name"], "Checkout");
    }

    /// The User Deletion API's documented request: kind, id {type, userId}, propertyId.
    #[test]
    fn erasure_asks_the_user_deletion_api_per_identifier() {
        let target = ErasureTarget {
            user_ids: vec!["user-42".into()],
            anonymous_ids: vec!["anon-1".into()],
            ..ErasureTarget::default()
        };
        let Erasure::Calls(calls) = ga4().erasure_requests(&target) else {
            panic!("calls expected")
        };
        assert_eq!(
            calls.len(),
            3,
            "user id, anonymous id, and the client id derived from the user id"
        );
        assert_eq!(calls[0].url, DEFAULT_DELETION_URL);
        assert_eq!(calls[0].header("authorization"), Some("Bearer ya29.token"));
        let body: Value = serde_json::from_slice(&calls[1].body).unwrap();
        assert_eq!(
            body,
            json!({"kind": "analytics#userDeletionRequest",
                   "id": {"type": "CLIENT_ID", "userId": "anon-1"}, "propertyId": "123456789"})
        );
        let manual = Ga4 {
            deletion_token: None,
            ..ga4()
        };
        assert!(matches!(
            manual.erasure_requests(&target),
            Erasure::Manual(_)
        ));
        assert!(matches!(
            ga4().erasure_requests(&ErasureTarget::default()),
            Erasure::NothingHeld(_)
        ));
    }
}
