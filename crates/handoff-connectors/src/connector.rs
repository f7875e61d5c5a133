//! One interface over the vendor modules, built from a destination's configuration.

use std::time::Duration;

use handoff_core::policy::model::{ConnectorKind, Destination};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::ga4::Ga4;
use crate::meta_capi::MetaCapi;
use crate::segment::SegmentForward;
use crate::stripe::Stripe;
use crate::webhook::{Secret, Webhook};
use crate::wire::{Classification, Item, WireRequest, classify_status};

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
    fn classify(&self, status: u16, retry_after: Option<Duration>, body: &[u8]) -> Classification;
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
            known(dest, &["measurement_id", "api_secret"])?;
            Box::new(Ga4 {
                base_url: base(dest, crate::ga4::DEFAULT_BASE_URL),
                measurement_id: setting(dest, "measurement_id")?,
                api_secret: setting(dest, "api_secret")?,
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
    fn classify(&self, status: u16, retry_after: Option<Duration>, body: &[u8]) -> Classification {
        classify_status(status, retry_after, body, &[])
    }
}

impl Connector for MetaCapi {
    fn max_batch(&self) -> usize {
        crate::meta_capi::MAX_BATCH
    }
    fn request(&self, items: &[Item<'_>], _now: OffsetDateTime) -> Result<WireRequest, String> {
        Ok(MetaCapi::request(self, items))
    }
    fn classify(&self, status: u16, retry_after: Option<Duration>, body: &[u8]) -> Classification {
        MetaCapi::classify(self, status, retry_after, body)
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
    fn classify(&self, status: u16, retry_after: Option<Duration>, body: &[u8]) -> Classification {
        classify_status(status, retry_after, body, &[&self.api_secret])
    }
}

impl Connector for Stripe {
    fn max_batch(&self) -> usize {
        1
    }
    fn request(&self, items: &[Item<'_>], _now: OffsetDateTime) -> Result<WireRequest, String> {
        let item = items.first().ok_or("nothing to send")?;
        match item.payload.get("type").and_then(|t| t.as_str()) {
            Some("identify") => Ok(self.create_customer(item)),
            other => Err(format!(
                "the Stripe connector sends identify calls only, not {}",
                other.unwrap_or("untyped")
            )),
        }
    }
    fn classify(&self, status: u16, retry_after: Option<Duration>, body: &[u8]) -> Classification {
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
    fn classify(&self, status: u16, retry_after: Option<Duration>, body: &[u8]) -> Classification {
        classify_status(status, retry_after, body, &[&self.write_key])
    }
}
