//! A generic HTTPS endpoint, signed per the Standard Webhooks specification
//! (<https://www.standardwebhooks.com>): `webhook-id`, `webhook-timestamp` and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, with a `whsec_` secret.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::erasure::{Erasure, ErasureTarget};
use crate::wire::{Item, WireRequest, delivery_id};

/// Secrets are `whsec_` followed by base64 of the key.
pub const SECRET_PREFIX: &str = "whsec_";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error(
        "the webhook secret must start with \"whsec_\" followed by base64 (24 to 64 bytes of key)"
    )]
    Secret,
}

/// A signing secret; never printed.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    pub fn parse(s: &str) -> Result<Secret, WebhookError> {
        let b64 = s.strip_prefix(SECRET_PREFIX).ok_or(WebhookError::Secret)?;
        let key = STANDARD.decode(b64).map_err(|_| WebhookError::Secret)?;
        if !(24..=64).contains(&key.len()) {
            return Err(WebhookError::Secret);
        }
        Ok(Secret(key))
    }
}

/// `v1,<signature>` of one message.
pub fn sign(secret: &Secret, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&secret.0).expect("HMAC takes any key");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The webhook destination: one event per request, so each carries its own id and signature.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub destination: String,
    pub url: String,
    pub secret: Secret,
}

impl Webhook {
    /// The request for one item, signed at `now` (Unix seconds). The body follows the Standard
    /// Webhooks payload shape: `type`, `timestamp`, `data`.
    /// A signed `subject.erasure` event asking the receiver to erase a subject, with the
    /// identifiers the request gave as this destination sent them; its id is stable per
    /// request, destination and identifiers, so retries are deduplicated like deliveries.
    /// Nothing to send when the request names none of them: the receiver could not tell whom.
    pub fn erasure_calls(&self, target: &ErasureTarget, now: i64) -> Erasure {
        if target.user_ids.is_empty() && target.anonymous_ids.is_empty() && target.emails.is_empty()
        {
            return Erasure::NothingHeld(
                "the request names none of the user ids, anonymous ids or e-mails this webhook was sent".into(),
            );
        }
        Erasure::Calls(vec![self.erasure_request(target, now)])
    }

    fn erasure_request(&self, target: &ErasureTarget, now: i64) -> WireRequest {
        // Stable across retries; a request filed again naming more of the person is a new
        // message (receivers deduplicate on webhook-id).
        let named = [&target.user_ids, &target.anonymous_ids, &target.emails]
            .map(|ids| ids.join("\u{1f}"))
            .join("\u{1e}");
        let id = delivery_id(
            &self.destination,
            &format!("erasure:{}:{named}", target.dsr_id),
        );
        let body = serde_json::to_vec(&json!({
            "type": "subject.erasure",
            "timestamp": time::OffsetDateTime::from_unix_timestamp(now)
                .map(handoff_core::time_fmt::format_millis)
                .unwrap_or_default(),
            "data": {
                "dsrId": target.dsr_id,
                "subjectId": target.subject_id,
                "userIds": target.user_ids,
                "anonymousIds": target.anonymous_ids,
                "emails": target.emails,
            },
        }))
        .expect("a Value always serialises");
        self.signed(id, now, body)
    }

    fn signed(&self, id: String, now: i64, body: Vec<u8>) -> WireRequest {
        let signature = sign(&self.secret, &id, now, &body);
        WireRequest {
            method: "POST",
            url: self.url.clone(),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("webhook-id".into(), id),
                ("webhook-timestamp".into(), now.to_string()),
                ("webhook-signature".into(), signature),
            ],
            body,
        }
    }

    pub fn request(&self, item: &Item<'_>, now: i64) -> WireRequest {
        let body = serde_json::to_vec(&Self::body(item)).expect("a Value always serialises");
        self.signed(item.delivery_id.to_owned(), now, body)
    }

    /// The body of one item's request.
    pub fn body(item: &Item<'_>) -> Value {
        let kind = item
            .payload
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("event");
        let timestamp = item
            .payload
            .get("timestamp")
            .cloned()
            .unwrap_or(Value::Null);
        json!({
            "type": format!("event.{kind}"),
            "timestamp": timestamp,
            "data": item.payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks reference libraries (checked with the Python
    /// `standardwebhooks` package, 1.1.0).
    #[test]
    fn signs_like_the_reference_implementation() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(
                &secret,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_must_be_whsec_base64() {
        for bad in [
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_!!!",
            "whsec_c2hvcnQ=",
        ] {
            assert_eq!(
                Secret::parse(bad).unwrap_err(),
                WebhookError::Secret,
                "{bad}"
            );
        }
        assert!(
            !format!(
                "{:?}",
                Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()
            )
            .contains("MfK")
        );
    }

    #[test]
    fn an_erasure_is_one_message_per_set_of_identifiers() {
        let hook = Webhook {
            destination: "crm-webhook".into(),
            url: "https://crm.example.com/hooks/handoff".into(),
            secret: Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(),
        };
        let target = ErasureTarget {
            dsr_id: "dsr_1".into(),
            subject_id: "sub_1".into(),
            user_ids: vec!["user-1".into()],
            ..ErasureTarget::default()
        };
        let id = |t: &ErasureTarget, now| match hook.erasure_calls(t, now) {
            Erasure::Calls(calls) => calls[0].header("webhook-id").unwrap().to_owned(),
            other => panic!("{other:?}"),
        };
        assert_eq!(id(&target, 1), id(&target, 2), "retries keep the id");
        let more = ErasureTarget {
            emails: vec!["jane@example.com".into()],
            ..target.clone()
        };
        assert_ne!(id(&target, 1), id(&more, 1), "naming more is a new message");
        let none = ErasureTarget {
            user_ids: vec![],
            ..target
        };
        assert!(matches!(
            hook.erasure_calls(&none, 1),
            Erasure::NothingHeld(_)
        ));
    }

    #[test]
    fn a_request_carries_a_stable_id_and_a_fresh_signature() {
        let hook = Webhook {
            destination: "crm-webhook".into(),
            url: "https://crm.example.com/hooks/handoff".into(),
            secret: Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(),
        };
        let payload = json!({"type": "track", "messageId": "m-1", "timestamp": "2026-11-25T10:00:00.000Z", "event": "Order Completed"});
        let item = Item {
            message_id: "m-1",
            delivery_id: "hd_m-1",
            vendor_ref: None,
            mapped: None,
            payload: &payload,
        };
        let a = hook.request(&item, 1_700_000_000);
        let b = hook.request(&item, 1_700_000_060);
        assert_eq!(
            a.header("webhook-id"),
            b.header("webhook-id"),
            "retries keep the id"
        );
        assert_ne!(a.header("webhook-signature"), b.header("webhook-signature"));
        let body: Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(body["type"], "event.track");
        assert_eq!(body["data"]["event"], "Order Completed");
        assert_eq!(
            a.header("webhook-signature").unwrap(),
            sign(
                &hook.secret,
                a.header("webhook-id").unwrap(),
                1_700_000_000,
                &a.body
            )
        );
    }
}
