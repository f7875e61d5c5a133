//! Stripe: the first `identify` of a subject creates a Customer (`POST /v1/customers`,
//! form-encoded) and Handoff keeps the customer id Stripe answers with; later ones update that
//! customer (`POST /v1/customers/{id}`); an erasure deletes it (`DELETE /v1/customers/{id}`).
//! The delivery id is the `Idempotency-Key`, so a retried create never makes a second
//! customer. The user id is also kept in `metadata[handoff_user_id]`.

use serde_json::Value;

use crate::wire::{Item, WireRequest, str_at};

pub const DEFAULT_BASE_URL: &str = "https://api.stripe.com";

#[derive(Debug, Clone)]
pub struct Stripe {
    pub destination: String,
    pub base_url: String,
    pub api_key: String,
}

impl Stripe {
    /// The form fields of a Customer from an identify's traits.
    pub fn customer_fields(payload: &Value) -> Vec<(String, String)> {
        let mut form = Vec::new();
        let text = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        for (stripe, trait_) in [
            ("email", "email"),
            ("name", "name"),
            ("phone", "phone"),
            ("description", "description"),
        ] {
            if let Some(v) = payload
                .get("traits")
                .and_then(|t| t.get(trait_))
                .and_then(text)
            {
                form.push((stripe.to_owned(), v));
            }
        }
        if let Some(Value::Object(addr)) = payload.get("traits").and_then(|t| t.get("address")) {
            for (stripe, segment) in [
                ("line1", "street"),
                ("city", "city"),
                ("state", "state"),
                ("postal_code", "postalCode"),
                ("country", "country"),
            ] {
                if let Some(v) = addr.get(segment).and_then(text) {
                    form.push((format!("address[{stripe}]"), v));
                }
            }
        }
        if let Some(user) = str_at(payload, "userId") {
            form.push(("metadata[handoff_user_id]".into(), user.to_owned()));
        }
        form
    }

    pub fn create_customer(&self, item: &Item<'_>) -> WireRequest {
        self.customer_request(
            format!("{}/v1/customers", self.base_url.trim_end_matches('/')),
            item,
        )
    }

    pub fn update_customer(&self, customer: &str, item: &Item<'_>) -> WireRequest {
        self.customer_request(self.customer_url(customer), item)
    }

    fn customer_url(&self, customer: &str) -> String {
        // A customer id is ours to trust only as far as the URL path: encode it.
        let id: String = form_urlencoded::byte_serialize(customer.as_bytes()).collect();
        format!("{}/v1/customers/{id}", self.base_url.trim_end_matches('/'))
    }

    /// Stripe's documented delete: `DELETE /v1/customers/{id}` (idempotent by itself, so no
    /// `Idempotency-Key`, which Stripe ignores on DELETE).
    pub fn delete_customer(&self, customer: &str) -> WireRequest {
        WireRequest {
            method: "DELETE",
            url: self.customer_url(customer),
            headers: vec![("authorization".into(), format!("Bearer {}", self.api_key))],
            body: Vec::new(),
        }
    }

    /// The id of the customer a create answered with.
    pub fn customer_id(body: &[u8]) -> Option<String> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let id = v.get("id")?.as_str()?;
        (v.get("object").and_then(Value::as_str) == Some("customer") && id.starts_with("cus_"))
            .then(|| id.to_owned())
    }

    /// An identify's customer request body as Stripe reads it, or why the item is not one.
    pub fn body(item: &Item<'_>) -> Result<Value, String> {
        match item.payload.get("type").and_then(|t| t.as_str()) {
            Some("identify") => Ok(crate::wire::form_json(&Self::customer_fields(item.payload))),
            other => Err(format!(
                "the Stripe connector sends identify calls only, not {}",
                other.unwrap_or("untyped")
            )),
        }
    }

    fn customer_request(&self, url: String, item: &Item<'_>) -> WireRequest {
        let body = serde_urlencoded::to_string(Self::customer_fields(item.payload))
            .expect("strings always encode");
        WireRequest {
            method: "POST",
            url,
            headers: vec![
                (
                    "content-type".into(),
                    "application/x-www-form-urlencoded".into(),
                ),
                ("authorization".into(), format!("Bearer {}", self.api_key)),
                ("idempotency-key".into(), item.delivery_id.to_owned()),
            ],
            body: body.into_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Stripe's documented create-customer parameters: `email`, `name`, `phone`,
    /// `address[line1|city|state|postal_code|country]`, `metadata[key]`.
    #[test]
    fn an_identify_becomes_a_form_encoded_customer() {
        let stripe = Stripe {
            destination: "stripe".into(),
            base_url: DEFAULT_BASE_URL.into(),
            api_key: "sk_test_123".into(),
        };
        let payload = json!({"type": "identify", "userId": "user-42", "traits": {
            "email": "jenny.rosen@example.com", "name": "Jenny Rosen", "phone": "+15555550123",
            "address": {"street": "510 Townsend St", "city": "San Francisco", "state": "CA", "postalCode": "98140", "country": "US"}}});
        let req = stripe.create_customer(&Item {
            message_id: "m-1",
            delivery_id: "hd_m-1",
            vendor_ref: None,
            mapped: None,
            payload: &payload,
        });
        assert_eq!(req.url, "https://api.stripe.com/v1/customers");
        assert_eq!(req.header("authorization"), Some("Bearer sk_test_123"));
        assert_eq!(req.header("idempotency-key"), Some("hd_m-1"));
        let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&req.body).unwrap();
        let get = |k: &str| {
            form.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("email"), Some("jenny.rosen@example.com"));
        assert_eq!(get("name"), Some("Jenny Rosen"));
        assert_eq!(get("address[line1]"), Some("510 Townsend St"));
        assert_eq!(get("address[postal_code]"), Some("98140"));
        assert_eq!(get("metadata[handoff_user_id]"), Some("user-42"));
    }

    #[test]
    fn later_identifies_update_the_customer_and_erasure_deletes_it() {
        let stripe = Stripe {
            destination: "stripe".into(),
            base_url: "http://127.0.0.1:8420/".into(),
            api_key: "sk_test_123".into(),
        };
        let payload = json!({"type": "identify", "userId": "user-42", "traits": {"name": "Jenny"}});
        let item = Item {
            message_id: "m-2",
            delivery_id: "hd_m-2",
            vendor_ref: Some("cus_NffrFeUfNV2Hib"),
            mapped: None,
            payload: &payload,
        };
        let req = stripe.update_customer("cus_NffrFeUfNV2Hib", &item);
        assert_eq!(
            (req.method, req.url.as_str()),
            (
                "POST",
                "http://127.0.0.1:8420/v1/customers/cus_NffrFeUfNV2Hib"
            )
        );
        let del = stripe.delete_customer("cus_../../charges");
        assert_eq!(del.method, "DELETE");
        assert_eq!(
            del.url,
            "http://127.0.0.1:8420/v1/customers/cus_..%2F..%2Fcharges"
        );
        // Stripe's documented create answer.
        let created = br#"{"id": "cus_NffrFeUfNV2Hib", "object": "customer", "email": "jennyrosen@example.com"}"#;
        assert_eq!(
            Stripe::customer_id(created).as_deref(),
            Some("cus_NffrFeUfNV2Hib")
        );
        assert_eq!(
            Stripe::customer_id(br#"{"id": "ch_1", "object": "charge"}"#),
            None
        );
        assert_eq!(Stripe::customer_id(b"not json"), None);
    }
}
