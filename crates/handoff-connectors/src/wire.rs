//! What every connector shares: the items it maps, the request it builds, how a response is
//! classified, and the stable delivery id vendors deduplicate on.

use std::time::Duration;

use handoff_core::consent::get_path;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// One decided payload on its way to a vendor.
#[derive(Debug, Clone)]
pub struct Item<'a> {
    /// The event's `messageId`.
    pub message_id: &'a str,
    /// The id the vendor deduplicates this delivery on ([`DeliveryIdKey::id`]).
    pub delivery_id: &'a str,
    /// The id this vendor gave the subject on an earlier delivery (a Stripe customer id).
    pub vendor_ref: Option<&'a str>,
    /// The payload the policy decided (a minimised, transformed Segment message).
    pub payload: &'a Value,
    /// This item's part of the wire request as the decision mapped it
    /// ([`crate::connector::Connector::mapped_item`]), so the request does not map it again;
    /// `None`: mapped when the request is built.
    pub mapped: Option<&'a Value>,
}

/// An HTTP request, built without I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRequest {
    pub method: &'static str,
    pub url: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl WireRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What a vendor's answer means for the items sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classification {
    Delivered,
    /// Try again later (429, 5xx, timeouts, connection errors), after `after` if the vendor said.
    Retry {
        after: Option<Duration>,
        why: String,
    },
    /// The vendor will never take these items (other 4xx): dead-letter them with `why`.
    Permanent {
        why: String,
    },
    /// The credentials are refused (401, 403): pause the destination and alert.
    Credentials {
        why: String,
    },
}

/// Most bytes of a vendor's error body kept in a dead-letter reason.
pub const ERROR_EXCERPT_BYTES: usize = 300;

/// The usual HTTP classes; connectors refine them where their vendor differs.
pub fn classify_status(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
    secrets: &[&str],
) -> Classification {
    let why = || format!("HTTP {status}: {}", excerpt(body, secrets));
    match status {
        200..=299 => Classification::Delivered,
        401 | 403 => Classification::Credentials { why: why() },
        408 | 425 | 429 | 500..=599 => Classification::Retry {
            after: retry_after,
            why: why(),
        },
        _ => Classification::Permanent { why: why() },
    }
}

/// The start of a response body, printable, with every secret the connector holds replaced by
/// `[secret]` (vendors sometimes echo the request).
pub fn excerpt(body: &[u8], secrets: &[&str]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s: String = text.chars().filter(|c| !c.is_control()).collect();
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        s = s.replace(secret, "[secret]");
    }
    if s.len() > ERROR_EXCERPT_BYTES {
        let cut = (0..=ERROR_EXCERPT_BYTES)
            .rev()
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(0);
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The secret delivery ids are keyed with (one per installation, sealed under the master key).
#[derive(Clone)]
pub struct DeliveryIdKey([u8; 32]);

impl DeliveryIdKey {
    pub fn new(key: [u8; 32]) -> Self {
        Self(key)
    }

    /// The id a delivery carries to the vendor (Meta `event_id`, Stripe `Idempotency-Key`,
    /// Segment `messageId`, `webhook-id`): the same for every retry of the same event to the
    /// same destination; different across destinations, so two vendors cannot join on it;
    /// different across sources, so one source's `messageId` never collides with another's
    /// (by the vendors' rules the second would be dropped or refused); and keyed with a secret,
    /// so nobody outside can compute it from a predictable `messageId` (an order number) and
    /// send first under it with the public write key.
    pub fn id(&self, destination: &str, source: &str, message_id: &str) -> String {
        use hmac::{KeyInit, Mac};
        let mut mac =
            hmac::Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any size");
        for part in [destination, source, message_id] {
            mac.update(part.as_bytes());
            mac.update(&[0]);
        }
        hex_id(&mac.finalize().into_bytes())
    }
}

impl std::fmt::Debug for DeliveryIdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeliveryIdKey(<secret>)")
    }
}

/// `hd_` and the first 16 bytes of `digest` in hex.
fn hex_id(digest: &[u8]) -> String {
    prefixed_hex("hd_", digest)
}

/// `prefix` and the first 16 bytes of `digest` in hex: the ids the connectors make up.
pub(crate) fn prefixed_hex(prefix: &str, digest: &[u8]) -> String {
    let mut s = String::with_capacity(prefix.len() + 32);
    s.push_str(prefix);
    for b in &digest[..16] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// An unkeyed id derived from `destination` and `name`: for ids the gateway makes up itself
/// (an erasure's `webhook-id`, from the request's random id), and for items queued before
/// delivery ids were keyed, so their retries keep the id their first attempt used.
pub fn delivery_id(destination: &str, name: &str) -> String {
    let mut h = Sha256::new();
    h.update(destination.as_bytes());
    h.update([0]);
    h.update(name.as_bytes());
    hex_id(&h.finalize())
}

/// How long a vendor asked us to wait (`Retry-After`: seconds, or an HTTP date, which is
/// counted from `now`; a date in the past means now). `None` when the value is neither.
pub fn retry_after(value: &str, now: time::OffsetDateTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let fmt = time::format_description::parse_borrowed::<2>(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT",
    )
    .ok()?;
    let at = time::PrimitiveDateTime::parse(v, &fmt).ok()?.assume_utc();
    Some(Duration::from_secs((at - now).whole_seconds().max(0) as u64))
}

/// What stands in for a secret in what `plan` prints (and what the ledger's field names skip).
pub const MASKED: &str = "[secret]";

/// The object a form body describes, as the vendor reads it: `address[city]=…` is `city`
/// inside `address` (Stripe's documented encoding of nested parameters); values are text.
pub fn form_json(pairs: &[(String, String)]) -> Value {
    let mut out = serde_json::Map::new();
    for (key, value) in pairs {
        let mut parts = key.split('[').map(|p| p.trim_end_matches(']'));
        let first = parts.next().unwrap_or_default();
        let rest: Vec<&str> = parts.collect();
        let mut at = out
            .entry(first.to_owned())
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
        for part in rest {
            if !at.is_object() {
                *at = Value::Object(serde_json::Map::new());
            }
            at = at
                .as_object_mut()
                .expect("made an object above")
                .entry(part.to_owned())
                .or_insert_with(|| Value::Object(serde_json::Map::new()));
        }
        *at = Value::String(value.clone());
    }
    Value::Object(out)
}

/// The field names of a wire body as the ledger records them: dotted paths of its leaves,
/// arrays collapsed (`data.custom_data.contents.id`), sorted, each once; a masked secret is
/// not a field about anybody and is left out. Never values.
pub fn wire_fields(body: &Value) -> Vec<String> {
    fn walk(v: &Value, path: &mut String, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k);
                    walk(child, path, out);
                    path.truncate(len);
                }
            }
            Value::Array(items) => {
                for child in items {
                    walk(child, path, out);
                }
            }
            Value::String(s) if s == MASKED => {}
            _ => {
                if !path.is_empty() {
                    out.push(path.clone());
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(body, &mut String::new(), &mut out);
    out.sort_unstable();
    out.dedup();
    out
}

/// A string at a dotted `path`, if it is one.
pub fn str_at<'v>(v: &'v Value, path: &str) -> Option<&'v str> {
    get_path(v, path).and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_excerpts() {
        assert_eq!(
            classify_status(204, None, b"", &[]),
            Classification::Delivered
        );
        assert!(
            matches!(classify_status(429, Some(Duration::from_secs(3)), b"slow down", &[]),
            Classification::Retry { after: Some(d), .. } if d == Duration::from_secs(3))
        );
        assert!(matches!(
            classify_status(503, None, b"", &[]),
            Classification::Retry { .. }
        ));
        assert!(matches!(
            classify_status(401, None, b"", &[]),
            Classification::Credentials { .. }
        ));
        let Classification::Permanent { why } = classify_status(
            400,
            None,
            b"bad token sk_live_abc123 here\n",
            &["sk_live_abc123"],
        ) else {
            panic!()
        };
        assert_eq!(why, "HTTP 400: bad token [secret] here");
        assert_eq!(
            excerpt(&[b'x'; 1000], &[]).chars().count(),
            ERROR_EXCERPT_BYTES + 1
        );
    }

    #[test]
    fn keyed_delivery_ids_differ_per_source_and_key() {
        let key = DeliveryIdKey::new([7; 32]);
        let a = key.id("meta-capi", "web", "order-1001");
        assert_eq!(a, key.id("meta-capi", "web", "order-1001"));
        assert_ne!(a, key.id("meta-capi", "backend", "order-1001"));
        assert_ne!(a, key.id("ga4", "web", "order-1001"));
        assert_ne!(
            a,
            DeliveryIdKey::new([8; 32]).id("meta-capi", "web", "order-1001")
        );
        // Parts are separated: ("a", "bc") and ("ab", "c") are different deliveries.
        assert_ne!(key.id("d", "a", "bc"), key.id("d", "ab", "c"));
        assert_ne!(a, delivery_id("meta-capi", "order-1001"));
        assert!(a.starts_with("hd_") && a.len() == 35, "{a}");
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        // 2015-10-21 07:27:00 UTC.
        let now = time::OffsetDateTime::from_unix_timestamp(1_445_412_420).unwrap();
        assert_eq!(retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            retry_after(
                "Wed, 21 Oct 2015 07:28:00 GMT",
                now + Duration::from_secs(3600)
            ),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn form_bodies_read_as_nested_objects_and_fields_skip_secrets() {
        let pairs = [
            ("email".to_owned(), "a@b.c".to_owned()),
            ("address[city]".to_owned(), "Berlin".to_owned()),
            ("metadata[handoff_user_id]".to_owned(), "u1".to_owned()),
        ];
        let v = form_json(&pairs);
        assert_eq!(v["address"]["city"], "Berlin");
        assert_eq!(
            wire_fields(&v),
            ["address.city", "email", "metadata.handoff_user_id"]
        );
        let body = serde_json::json!({"data": [{"a": 1, "b": {"c": null}}, {"a": 2, "d": [1, 2]}],
            "access_token": MASKED});
        assert_eq!(wire_fields(&body), ["data.a", "data.b.c", "data.d"]);
    }

    #[test]
    fn delivery_ids_are_stable_and_differ_per_destination() {
        let a = delivery_id("meta-capi", "m-1");
        assert_eq!(a, delivery_id("meta-capi", "m-1"));
        assert_ne!(a, delivery_id("ga4", "m-1"));
        assert_ne!(a, delivery_id("meta-capi", "m-2"));
        assert_eq!(a.len(), 35);
    }
}
