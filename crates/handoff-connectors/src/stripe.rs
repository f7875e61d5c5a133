//! Stripe: an `identify` becomes a Customer (`POST /v1/customers`, form-encoded), with the
//! delivery id as `Idempotency-Key` so a retried create never makes a second customer. The
//! user id is kept in `metadata[handoff_user_id]` for finding the customer again.

use serde_json::Value;

use crate::wire::{Item, WireRequest, delivery_id, str_at};

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
        let body = serde_urlencoded::to_string(Self::customer_fields(item.payload))
            .expect("strings always encode");
        WireRequest {
            method: "POST",
            url: format!("{}/v1/customers", self.base_url.trim_end_matches('/')),
            headers: vec![
                (
                    "content-type".into(),
                    "application/x-www-form-urlencoded".into(),
                ),
                ("authorization".into(), format!("Bearer {}", self.api_key)),
                (
                    "idempotency-key".into(),
                    delivery_id(&self.destination, item.message_id),
                ),
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
            payload: &payload,
        });
        assert_eq!(req.url, "https://api.stripe.com/v1/customers");
        assert_eq!(req.header("authorization"), Some("Bearer sk_test_123"));
        assert_eq!(
            req.header("idempotency-key"),
            Some(delivery_id("stripe", "m-1").as_str())
        );
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
}
