//! One interface over the vendor modules, built from a destination's configuration.

use std::time::Duration;

use handoff_core::policy::model::{ConnectorKind, Destination};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::erasure::{Erasure, ErasureTarget};
use crate::ga4::Ga4;
use crate::meta_capi::MetaCapi;
use crate::segment::SegmentForward;
use crate::stripe::Stripe;
use crate::webhook::{Secret, Webhook};
use crate::wire::{Classification, Item, MASKED, WireRequest, classify_status, wire_fields};
use serde_json::Value;

/// A connector: how many items a request may carry, which may share one, the request, and what
/// the answer means.
pub trait Connector: Send + Sync {
    fn max_batch(&self) -> usize;
    /// Items with different keys never share a request.
    fn batch_key(&self, _item: &Item<'_>) -> String {
        String::new()
    }
    /// True when batch keys follow the subject (so batches are small and many requests may
    /// be in flight at once).
    fn batch_key_per_subject(&self) -> bool {
        false
    }
    /// The request for `items` (all with one batch key), or why they can never be sent.
    fn request(&self, items: &[Item<'_>], now: OffsetDateTime) -> Result<WireRequest, String>;
    /// The body of the request `item` alone would be sent in, as JSON (a form body as the
    /// object its fields describe), built by the code that builds [`Connector::request`], with
    /// secrets as [`MASKED`]: what the vendor receives about the item. `plan` shows it and the
    /// ledger records its field names ([`wire_fields`]). Err: why it can never be sent.
    fn wire_body(&self, item: &Item<'_>, now: OffsetDateTime) -> Result<Value, String>;
    /// The secrets this connector puts into its requests (masked in what `plan` shows).
    fn secrets(&self) -> Vec<&str>;
    /// The Segment path a wire field carries (`data.user_data.em` → `context.traits.email`),
    /// so its data category is found by the same rules as an event's
    /// ([`handoff_core::subject::data_category`]); a field with no Segment counterpart maps to
    /// itself.
    fn category_path(&self, wire_field: &str) -> String {
        wire_field.to_owned()
    }
    fn classify(&self, status: u16, retry_after: Option<Duration>, body: &[u8]) -> Classification;
    /// The vendor's own id for the subject in a successful answer (a Stripe customer id), kept
    /// to update and erase that record later.
    fn vendor_ref(&self, _body: &[u8]) -> Option<String> {
        None
    }
    /// The part of a one-item [`Connector::wire_body`] that a request of many items repeats
    /// per item (Meta: the event in `data`), kept from the decision so that building the
    /// request does not map the item again. `None` (the default): the request maps it. Only for
    /// a mapping that does not depend on [`Item::vendor_ref`] (the decision maps without it).
    fn mapped_item(&self, _wire_body: &Value) -> Option<Value> {
        None
    }
    /// Whether requests use the id [`Connector::vendor_ref`] kept (delivery looks it up only
    /// for connectors that do).
    fn uses_vendor_ref(&self) -> bool {
        false
    }
    /// How this vendor is told to erase a subject.
    fn erasure(&self, target: &ErasureTarget, now: OffsetDateTime) -> Erasure;
    /// What the answer to an erasure call means (by default as for deliveries).
    fn classify_erasure(
        &self,
        status: u16,
        retry_after: Option<Duration>,
        body: &[u8],
    ) -> Classification {
        self.classify(status, retry_after, body)
    }
}

/// What a plan shows where a delivery carries its delivery id (keyed per source with the
/// installation's secret, so only known when sent).
pub const PLANNED_DELIVERY_ID: &str = "(delivery id)";

/// The request a vendor receives for one item, as `plan` shows it: secrets masked, the body
/// as JSON, and the field names the ledger records for it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WireView {
    pub method: &'static str,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    pub fields: Vec<String>,
    /// The data categories of `fields`, as the ledger records them.
    pub categories: Vec<&'static str>,
}

/// The data categories of a connector's wire fields.
pub fn wire_categories(connector: &dyn Connector, fields: &[String]) -> Vec<&'static str> {
    let paths: Vec<String> = fields.iter().map(|f| connector.category_path(f)).collect();
    handoff_core::subject::categories_of(paths.iter().map(String::as_str))
}

/// `field` under `prefix.`, if it is.
fn under<'a>(field: &'a str, prefix: &str) -> Option<&'a str> {
    field.strip_prefix(prefix)?.strip_prefix('.')
}

/// What `connector` sends for `item` alone, secrets masked, or why it never would.
pub fn wire_view(
    connector: &dyn Connector,
    item: &Item<'_>,
    now: OffsetDateTime,
) -> Result<WireView, String> {
    let body = connector.wire_body(item, now)?;
    let request = connector.request(std::slice::from_ref(item), now)?;
    let secrets: Vec<&str> = connector
        .secrets()
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    let mask = |text: &str| {
        let mut out = text.to_owned();
        for secret in &secrets {
            let encoded: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
            out = out.replace(secret, MASKED).replace(&encoded, MASKED);
        }
        out
    };
    let headers = request
        .headers
        .iter()
        .map(|(name, value)| {
            // Basic credentials are the secret in base64, and a signature made with the
            // secret would be a valid one to replay: the whole value is masked.
            let value = if name.eq_ignore_ascii_case("authorization")
                || name.to_ascii_lowercase().ends_with("-signature")
            {
                MASKED.to_owned()
            } else {
                mask(value)
            };
            (name.clone(), value)
        })
        .collect();
    let fields = wire_fields(&body);
    Ok(WireView {
        method: request.method,
        url: mask(&request.url),
        headers,
        categories: wire_categories(connector, &fields),
        fields,
        body,
    })
}

/// Adds to each `send` of `plan` the request its destination's vendor would receive
/// ([`WireView`]), and turns each `send` its connector would refuse to map into a `block` with
/// `connector.refused`, so a plan never says SEND for what delivery would not send. The CLI's
/// `plan` and `POST /admin/v1/plan` both call it.
pub fn apply_wire(
    plan: &mut handoff_core::policy::Plan,
    destinations: &[Destination],
    now: OffsetDateTime,
) {
    for planned in plan
        .destinations
        .iter_mut()
        .filter(|p| p.decision == "send")
    {
        let (Some(dest), Some(payload)) = (
            destinations.iter().find(|d| d.id == planned.id),
            planned.payload.as_ref(),
        ) else {
            continue;
        };
        let Ok(connector) = for_destination(dest) else {
            continue; // `check` reports unusable settings on their own
        };
        let message_id = payload
            .get("messageId")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        let item = Item {
            message_id,
            delivery_id: PLANNED_DELIVERY_ID,
            vendor_ref: None,
            mapped: None,
            payload,
        };
        match wire_view(connector.as_ref(), &item, now) {
            Ok(view) => {
                planned.wire = Some(serde_json::to_value(view).expect("a view serialises"));
            }
            Err(why) => {
                planned.decision = "block";
                planned.reasons.push("connector.refused");
                planned
                    .details
                    .push(handoff_core::policy::Reason::connector_refused(why));
                planned.payload = None;
            }
        }
    }
}

/// Why a destination's connector settings are unusable.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SettingsError {
    pub code: &'static str,
    pub message: String,
}

fn setting(dest: &Destination, key: &str) -> Result<String, SettingsError> {
    match dest.settings.get(key) {
        Some(toml_value) => toml_value
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| SettingsError {
                code: "connector.settings.invalid",
                message: format!("settings.{key} must be a string"),
            }),
        None => Err(SettingsError {
            code: "connector.settings.missing",
            message: format!("the {:?} connector needs settings.{key}", dest.connector),
        }),
    }
}

fn known(dest: &Destination, keys: &[&str]) -> Result<(), SettingsError> {
    match dest.settings.keys().find(|k| !keys.contains(&k.as_str())) {
        Some(k) => Err(SettingsError {
            code: "connector.settings.unknown",
            message: format!(
                "settings.{k} is not a setting of this connector; expected one of: {}",
                keys.join(", ")
            ),
        }),
        None => Ok(()),
    }
}

fn base(dest: &Destination, default: &str) -> String {
    dest.endpoint.clone().unwrap_or_else(|| default.to_owned())
}

/// The connector of `dest`, with its settings checked.
pub fn for_destination(dest: &Destination) -> Result<Box<dyn Connector>, SettingsError> {
    Ok(match dest.connector {
        ConnectorKind::Webhook => {
            known(dest, &["secret"])?;
            let url = dest.endpoint.clone().ok_or_else(|| SettingsError {
                code: "connector.settings.missing",
                message: "a webhook needs endpoint = \"https://…\"".into(),
            })?;
            let secret = Secret::parse(&setting(dest, "secret")?).map_err(|e| SettingsError {
                code: "connector.settings.invalid",
                message: format!("settings.secret: {e}"),
            })?;
            Box::new(Webhook {
                destination: dest.id.clone(),
                url,
                secret,
            })
        }
        ConnectorKind::MetaCapi => {
            known(
                dest,
                &[
                    "pixel_id",
                    "access_token",
                    "api_version",
                    "action_source",
                    "test_event_code",
                ],
            )?;
            Box::new(MetaCapi {
                destination: dest.id.clone(),
                base_url: base(dest, crate::meta_capi::DEFAULT_BASE_URL),
                api_version: setting(dest, "api_version")
                    .unwrap_or_else(|_| crate::meta_capi::DEFAULT_API_VERSION.into()),
                pixel_id: setting(dest, "pixel_id")?,
                access_token: setting(dest, "access_token")?,
                action_source: setting(dest, "action_source").unwrap_or_else(|_| "website".into()),
                test_event_code: setting(dest, "test_event_code").ok(),
            })
        }
        ConnectorKind::Ga4 => {
            known(
                dest,
                &[
                    "measurement_id",
                    "api_secret",
                    "property_id",
                    "deletion_access_token",
                    "deletion_endpoint",
                ],
            )?;
            Box::new(Ga4 {
                base_url: base(dest, crate::ga4::DEFAULT_BASE_URL),
                measurement_id: setting(dest, "measurement_id")?,
                api_secret: setting(dest, "api_secret")?,
                property_id: setting(dest, "property_id").ok(),
                deletion_token: setting(dest, "deletion_access_token").ok(),
                deletion_url: setting(dest, "deletion_endpoint")
                    .unwrap_or_else(|_| crate::ga4::DEFAULT_DELETION_URL.into()),
            })
        }
        ConnectorKind::Stripe => {
            known(dest, &["api_key"])?;
            Box::new(Stripe {
                destination: dest.id.clone(),
                base_url: base(dest, crate::stripe::DEFAULT_BASE_URL),
                api_key: setting(dest, "api_key")?,
            })
        }
        ConnectorKind::Segment => {
            known(dest, &["write_key"])?;
            let base_url = dest.endpoint.clone().ok_or_else(|| SettingsError {
                code: "connector.settings.missing",
                message: "a Segment forward needs endpoint = \"https://…\" (the receiving API's base URL)".into(),
            })?;
            Box::new(SegmentForward {
                destination: dest.id.clone(),
                base_url,
                write_key: setting(dest, "write_key")?,
            })
        }
    })
}

impl Connector for Webhook {
    fn max_batch(&self) -> usize {
        1
    }
    fn request(&self, items: &[Item<'_>], now: OffsetDateTime) -> Result<WireRequest, String> {
        let item = items.first().ok_or("nothing to send")?;
        Ok(Webhook::request(self, item, now.unix_timestamp()))
    }
    fn wire_body(&self, item: &Item<'_>, _now: OffsetDateTime) -> Result<Value, String> {
        Ok(Webhook::body(item))
    }
    fn secrets(&self) -> Vec<&str> {
        Vec::new() // the signing key never travels; the signature is made with it
    }
    fn category_path(&self, wire_field: &str) -> String {
        under(wire_field, "data").unwrap_or(wire_field).to_owned()
    }
    fn classify(&self, status: u16, retry_after: Option<Duration>, body: &[u8]) -> Classification {
        classify_status(status, retry_after, body, &[])
    }
    fn erasure(&self, target: &ErasureTarget, now: OffsetDateTime) -> Erasure {
        self.erasure_calls(target, now.unix_timestamp())
    }
}

impl Connector for MetaCapi {
    fn max_batch(&self) -> usize {
        crate::meta_capi::MAX_BATCH
    }
    fn request(&self, items: &[Item<'_>], _now: OffsetDateTime) -> Result<WireRequest, String> {
        Ok(MetaCapi::request(self, items))
    }
    fn wire_body(&self, item: &Item<'_>, _now: OffsetDateTime) -> Result<Value, String> {
        let mut body = self.body(std::slice::from_ref(item));
        body["access_token"] = Value::from(MASKED);
        Ok(body)
    }
    fn mapped_item(&self, wire_body: &Value) -> Option<Value> {
        wire_body.get("data")?.get(0).cloned()
    }
    fn secrets(&self) -> Vec<&str> {
        vec![&self.access_token]
    }
    fn category_path(&self, wire_field: &str) -> String {
        crate::meta_capi::segment_path(wire_field)
    }
    fn classify(&self, status: u16, retry_after: Option<Duration>, body: &[u8]) -> Classification {
        MetaCapi::classify(self, status, retry_after, body)
    }
    fn erasure(&self, _target: &ErasureTarget, _now: OffsetDateTime) -> Erasure {
        Erasure::Manual(format!(
            "Meta offers no API to delete events sent through the Conversions API. Ask Meta \
             through its privacy channels (Business Help Center, data deletion request for \
             pixel {pixel}) to delete this person's data, naming them by the SHA-256 hashes \
             Meta received (user id as external_id, e-mail as em: see `quote`). Then confirm \
             with `handoff dsr confirm DSR_ID DESTINATION --note \"…\"`. Handoff already blocks \
             their new events. See https://developers.facebook.com/docs/marketing-api/conversions-api",
            pixel = self.pixel_id,
        ))
    }
}

impl Connector for Ga4 {
    fn max_batch(&self) -> usize {
        crate::ga4::MAX_BATCH
    }
    fn batch_key(&self, item: &Item<'_>) -> String {
        Ga4::batch_key(item)
    }
    fn batch_key_per_subject(&self) -> bool {
        true
    }
    fn request(&self, items: &[Item<'_>], _now: OffsetDateTime) -> Result<WireRequest, String> {
        Ga4::request(self, items).map_err(|e| e.to_string())
    }
    fn wire_body(&self, item: &Item<'_>, _now: OffsetDateTime) -> Result<Value, String> {
        Ga4::body(std::slice::from_ref(item)).map_err(|e| e.to_string())
    }
    fn secrets(&self) -> Vec<&str> {
        vec![&self.api_secret]
    }
    fn category_path(&self, wire_field: &str) -> String {
        crate::ga4::segment_path(wire_field)
    }
    fn classify(&self, status: u16, retry_after: Option<Duration>, body: &[u8]) -> Classification {
        classify_status(status, retry_after, body, &[&self.api_secret])
    }
    fn erasure(&self, target: &ErasureTarget, _now: OffsetDateTime) -> Erasure {
        self.erasure_requests(target)
    }
    fn classify_erasure(
        &self,
        status: u16,
        retry_after: Option<Duration>,
        body: &[u8],
    ) -> Classification {
        let secrets: Vec<&str> = self.deletion_token.iter().map(String::as_str).collect();
        classify_status(status, retry_after, body, &secrets)
    }
}

impl Connector for Stripe {
    fn max_batch(&self) -> usize {
        1
    }
    fn uses_vendor_ref(&self) -> bool {
        true
    }
    fn request(&self, items: &[Item<'_>], _now: OffsetDateTime) -> Result<WireRequest, String> {
        let item = items.first().ok_or("nothing to send")?;
        Stripe::body(item)?;
        Ok(match item.vendor_ref {
            Some(customer) => self.update_customer(customer, item),
            None => self.create_customer(item),
        })
    }
    fn wire_body(&self, item: &Item<'_>, _now: OffsetDateTime) -> Result<Value, String> {
        Stripe::body(item)
    }
    fn secrets(&self) -> Vec<&str> {
        vec![&self.api_key]
    }
    fn category_path(&self, wire_field: &str) -> String {
        match wire_field {
            "metadata.handoff_user_id" => "userId".to_owned(),
            "address.line1" => "traits.address.street".to_owned(),
            other => format!("traits.{other}"),
        }
    }
    fn classify(&self, status: u16, retry_after: Option<Duration>, body: &[u8]) -> Classification {
        classify_status(status, retry_after, body, &[&self.api_key])
    }
    fn vendor_ref(&self, body: &[u8]) -> Option<String> {
        Stripe::customer_id(body)
    }
    fn erasure(&self, target: &ErasureTarget, _now: OffsetDateTime) -> Erasure {
        if target.vendor_refs.is_empty() {
            return Erasure::NothingHeld(
                "no Stripe customer id was recorded for this subject".into(),
            );
        }
        Erasure::Calls(
            target
                .vendor_refs
                .iter()
                .map(|customer| self.delete_customer(customer))
                .collect(),
        )
    }
    fn classify_erasure(
        &self,
        status: u16,
        retry_after: Option<Duration>,
        body: &[u8],
    ) -> Classification {
        // Already deleted (by an earlier attempt or by hand) is what we asked for.
        if status == 404 {
            return Classification::Delivered;
        }
        classify_status(status, retry_after, body, &[&self.api_key])
    }
}

impl Connector for SegmentForward {
    fn max_batch(&self) -> usize {
        crate::segment::MAX_BATCH
    }
    fn request(&self, items: &[Item<'_>], now: OffsetDateTime) -> Result<WireRequest, String> {
        let sent_at = now.format(&Rfc3339).unwrap_or_default();
        Ok(SegmentForward::request(self, items, &sent_at))
    }
    fn wire_body(&self, item: &Item<'_>, now: OffsetDateTime) -> Result<Value, String> {
        let sent_at = now.format(&Rfc3339).unwrap_or_default();
        Ok(SegmentForward::body(std::slice::from_ref(item), &sent_at))
    }
    fn secrets(&self) -> Vec<&str> {
        vec![&self.write_key]
    }
    fn category_path(&self, wire_field: &str) -> String {
        under(wire_field, "batch").unwrap_or(wire_field).to_owned()
    }
    fn classify(&self, status: u16, retry_after: Option<Duration>, body: &[u8]) -> Classification {
        classify_status(status, retry_after, body, &[&self.write_key])
    }
    fn erasure(&self, _target: &ErasureTarget, _now: OffsetDateTime) -> Erasure {
        Erasure::Manual(format!(
            "The Segment HTTP API at {} has no deletion call. If it is Segment, file a \
             regulation (POST https://api.segmentapis.com/regulations, regulationType \
             SUPPRESS_WITH_DELETE, subjectType USER_ID) for this person's user ids; if it is \
             another Handoff, file the same request there (POST /v1/dsr), by the ids in \
             `quote`. Then confirm with `handoff dsr confirm DSR_ID DESTINATION --note \"…\"`.",
            self.base_url
        ))
    }
}
