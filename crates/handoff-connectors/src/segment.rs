//! Segment-compatible forward: `POST {endpoint}/v1/batch` with the write key as the HTTP Basic
//! user, to any endpoint speaking the Segment HTTP Tracking API (another Handoff, Segment,
//! RudderStack).
//!
//! Each message's `messageId` is replaced by its delivery id: the receiver deduplicates on it
//! across retries, and it cannot be joined with what other destinations received.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::wire::{Item, WireRequest};

/// Segment takes batches up to 500 KB; 100 typical messages stay well below.
pub const MAX_BATCH: usize = 100;

#[derive(Debug, Clone)]
pub struct SegmentForward {
    pub destination: String,
    pub base_url: String,
    pub write_key: String,
}

impl SegmentForward {
    /// The body of one request for `items`.
    pub fn body(items: &[Item<'_>], sent_at: &str) -> Value {
        let batch: Vec<Value> = items
            .iter()
            .map(|i| {
                let mut m = i.payload.clone();
                m["messageId"] = json!(i.delivery_id);
                m
            })
            .collect();
        json!({ "batch": batch, "sentAt": sent_at })
    }

    pub fn request(&self, items: &[Item<'_>], sent_at: &str) -> WireRequest {
        let body = Self::body(items, sent_at);
        WireRequest {
            method: "POST",
            url: format!("{}/v1/batch", self.base_url.trim_end_matches('/')),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                (
                    "authorization".into(),
                    format!("Basic {}", STANDARD.encode(format!("{}:", self.write_key))),
                ),
            ],
            body: serde_json::to_vec(&body).expect("a Value always serialises"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_a_batch_with_the_write_key_and_delivery_ids() {
        let fwd = SegmentForward {
            destination: "mirror".into(),
            base_url: "http://127.0.0.1:9/".into(),
            write_key: "wk_0123456789abcdef".into(),
        };
        let payload =
            json!({"type": "track", "event": "Viewed", "userId": "u1", "messageId": "m-1"});
        let req = fwd.request(
            &[Item {
                message_id: "m-1",
                delivery_id: "hd_m-1",
                vendor_ref: None,
                mapped: None,
                payload: &payload,
            }],
            "2026-11-25T10:00:00.000Z",
        );
        assert_eq!(req.url, "http://127.0.0.1:9/v1/batch");
        assert_eq!(
            req.header("authorization"),
            Some("Basic d2tfMDEyMzQ1Njc4OWFiY2RlZjo=")
        );
        let body: Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body["batch"][0]["messageId"], "hd_m-1");
        assert_eq!(body["batch"][0]["event"], "Viewed");
        assert_eq!(body["sentAt"], "2026-11-25T10:00:00.000Z");
    }
}
