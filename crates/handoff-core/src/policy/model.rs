//! The vendor registry and destination policies: `[policy]`, `[[vendors]]` and `[[destinations]]`
//! in the configuration file. Each entry is read with serde (unknown keys refused), then checked
//! as a whole; every problem is reported with the key it concerns.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::Deserialize;
use time::Date;
use toml::Value;

use super::paths::FieldPath;
use super::payload::Compiled;
use super::transform::{Generalise, Normalize, Transform};
use crate::consent::ConsentFields;
use crate::ids::MessageKind;

/// Default longest time since a vendor's last security assessment.
pub const DEFAULT_MAX_ASSESSMENT_AGE_DAYS: u32 = 365;
/// Where a subject's region (ISO 3166-1 alpha-2 country) is read from by default.
pub const DEFAULT_REGION_FIELD: &str = "context.location.country";
/// Shortest pseudonymisation key accepted (bytes): 256 bits.
pub const MIN_PSEUDONYMISATION_KEY_LEN: usize = 32;
/// Keys every payload keeps: they say what the event is and identify it for idempotency, and
/// carry no personal data.
pub const ENVELOPE_KEYS: &[&str] = &["type", "messageId", "timestamp"];

/// `[policy]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySettings {
    pub max_assessment_age_days: u32,
    pub consent_fields: ConsentFields,
    pub region_field: String,
    /// Days a data-subject request has until it must be complete (30 by default, GDPR's
    /// month; 45 for CCPA). A request may ask for fewer or more.
    pub dsr_deadline_days: u32,
}

pub const DEFAULT_DSR_DEADLINE_DAYS: u32 = 30;

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            max_assessment_age_days: DEFAULT_MAX_ASSESSMENT_AGE_DAYS,
            consent_fields: ConsentFields::default(),
            region_field: DEFAULT_REGION_FIELD.into(),
            dsr_deadline_days: DEFAULT_DSR_DEADLINE_DAYS,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferMechanism {
    /// The destination country has an adequacy decision (or the vendor is certified under a
    /// framework that has one, such as the EU–US Data Privacy Framework).
    Adequacy,
    /// Standard contractual clauses.
    Scc,
    /// Binding corporate rules.
    Bcr,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RiskTier {
    Low,
    Medium,
    High,
    Critical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    Advertising,
    Analytics,
    #[serde(alias = "personalization")]
    Personalisation,
    Payments,
    Support,
    Security,
    Operations,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Advertising => "advertising",
            Purpose::Analytics => "analytics",
            Purpose::Personalisation => "personalisation",
            Purpose::Payments => "payments",
            Purpose::Support => "support",
            Purpose::Security => "security",
            Purpose::Operations => "operations",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LegalBasis {
    Consent,
    Contract,
    LegitimateInterest,
    LegalObligation,
}

impl LegalBasis {
    pub fn as_str(self) -> &'static str {
        match self {
            LegalBasis::Consent => "consent",
            LegalBasis::Contract => "contract",
            LegalBasis::LegitimateInterest => "legitimate_interest",
            LegalBasis::LegalObligation => "legal_obligation",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectorKind {
    Webhook,
    MetaCapi,
    Ga4,
    Stripe,
    Segment,
}

/// What to do when free text about to leave contains PII.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiAction {
    /// Replace each finding by `[redacted:<kind>]` and send.
    #[default]
    Redact,
    /// Do not send the event (`pii.found`).
    Block,
    /// Send unchanged, and report the findings.
    Alert,
}

/// A vendor: who receives data, where they process it, and on what paper.
#[derive(Debug, Clone, PartialEq)]
pub struct Vendor {
    pub id: String,
    pub legal_name: String,
    /// ISO 3166-1 alpha-2, upper-case, of where the vendor processes the data.
    pub country: String,
    pub dpa_signed: Option<Date>,
    pub certifications: Vec<String>,
    pub last_assessment: Option<Date>,
    pub risk_tier: RiskTier,
    pub transfer_mechanism: TransferMechanism,
    pub sub_processors: Vec<String>,
    pub notes: Option<String>,
}

/// What a consent-based destination needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConsentRequirement {
    /// Consent categories that must all be granted (when no TC string decides).
    pub categories: Vec<String>,
    /// The vendor's id in the IAB Global Vendor List, and the TCF purposes it needs.
    pub tcf_vendor_id: Option<u16>,
    pub tcf_purposes: Vec<u8>,
    pub tcf_special_features: Vec<u8>,
}

/// TLS for calls to a destination. Certificates are always verified: against the public
/// roots (Mozilla's list, built in), plus `ca_file` when a private vendor or a test uses its own
/// CA. A client certificate (mTLS) is presented when both of its files are given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundTls {
    /// PEM file of CA certificates to trust besides the public roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM certificate chain (leaf first) and private key presented to the vendor.
    pub client_cert_file: Option<std::path::PathBuf>,
    pub client_key_file: Option<std::path::PathBuf>,
}

/// A pseudonymisation key; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(pub Vec<u8>);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A destination: one vendor integration with its purpose, legal basis and data contract.
#[derive(Debug, Clone, PartialEq)]
pub struct Destination {
    pub id: String,
    pub name: String,
    pub vendor: Vendor,
    pub connector: ConnectorKind,
    pub enabled: bool,
    pub purposes: Vec<Purpose>,
    pub legal_basis: LegalBasis,
    pub consent: ConsentRequirement,
    /// Sending here is a "sale or sharing" (US state laws): GPC and US Privacy opt-outs apply.
    /// Defaults to true for advertising destinations.
    pub sale_or_sharing: bool,
    pub event_types: Vec<MessageKind>,
    /// For `track`: the event names allowed; `None` allows every name.
    pub event_names: Option<Vec<String>>,
    pub allow: Vec<FieldPath>,
    /// `allow` and `transforms` compiled for the payload walk.
    pub compiled: Compiled,
    pub transforms: Vec<Transform>,
    pub pii: PiiAction,
    /// Fields that are meant to carry PII here (a CRM gets the e-mail): not scanned.
    pub pii_expected: Vec<FieldPath>,
    /// Regions (ISO alpha-2, or `EEA`) whose subjects may be sent here; `None` for any.
    pub allowed_regions: Option<Vec<String>>,
    pub pseudonymisation_key: Option<SecretKey>,
    pub max_assessment_age_days: u32,
    /// Overrides the vendor's base URL (tests, proxies, private vendors).
    pub endpoint: Option<String>,
    /// How calls to this destination verify the vendor and present themselves.
    pub tls: OutboundTls,
    /// Most requests per second sent to the vendor (bursts up to the same number).
    pub rate_limit_per_sec: Option<u32>,
    /// Connector settings (pixel id, API secret reference, …), checked by the connector.
    pub settings: toml::Table,
}

/// Countries whose subjects are under the GDPR (EEA) or a close copy of it (UK, Switzerland).
/// Sorted, for binary search.
pub const GDPR_COUNTRIES: &[&str] = &[
    "AT", "BE", "BG", "CH", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GB", "GR", "HR", "HU",
    "IE", "IS", "IT", "LI", "LT", "LU", "LV", "MT", "NL", "NO", "PL", "PT", "RO", "SE", "SI", "SK",
];

/// ISO 3166-1 alpha-2: the officially assigned codes (249), sorted.
pub const COUNTRIES: &[&str] = &[
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ",
    "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS",
    "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN",
    "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE",
    "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF",
    "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM",
    "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM",
    "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC",
    "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK",
    "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA",
    "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG",
    "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW",
    "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS",
    "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO",
    "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI",
    "VN", "VU", "WF", "WS", "YE", "YT", "ZA", "ZM", "ZW",
];

/// The ISO 3166-1 alpha-2 code for a country code as events carry it: upper-cased, with the
/// two common non-ISO aliases mapped (`UK` → `GB`, `EL` → `GR`, as the EU writes Greece).
/// `None` for anything that is not an assigned code (`EU`, `XX`, `T1`…): such a subject's
/// region is unknown, and treated as protected.
pub fn country_code(raw: &str) -> Option<&'static str> {
    let upper = raw.trim().to_ascii_uppercase();
    let code = match upper.as_str() {
        "UK" => "GB",
        "EL" => "GR",
        other => other,
    };
    COUNTRIES.binary_search(&code).ok().map(|i| COUNTRIES[i])
}

pub fn in_gdpr_area(country: &str) -> bool {
    // Binary search: this runs for every decision, and a linear scan showed in profiles.
    GDPR_COUNTRIES.binary_search(&country).is_ok()
}

// ---- reading ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyToml {
    max_assessment_age_days: Option<u32>,
    dsr_deadline_days: Option<u32>,
    tcf_field: Option<String>,
    us_privacy_field: Option<String>,
    categories_field: Option<String>,
    gpc_field: Option<String>,
    region_field: Option<String>,
}

/// `[delivery]`: how queued payloads are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverySettings {
    /// First retry delay; each failure doubles it (full jitter), up to `retry_max`.
    pub retry_base: std::time::Duration,
    pub retry_max: std::time::Duration,
    /// An item not delivered this long after it was queued goes to the dead-letter queue.
    pub max_age: std::time::Duration,
    /// Consecutive failures that open a destination's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker waits before one probe request (half-open).
    pub breaker_cooldown: std::time::Duration,
    /// How long one call to a vendor may take.
    pub request_timeout: std::time::Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        use std::time::Duration;
        DeliverySettings {
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            max_age: Duration::from_secs(24 * 3600),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveryToml {
    retry_base_ms: Option<u64>,
    retry_max_ms: Option<u64>,
    max_age_secs: Option<u64>,
    breaker_failures: Option<u32>,
    breaker_cooldown_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
}

pub(crate) fn read_delivery(v: Option<&Value>, problems: &mut Vec<Problem>) -> DeliverySettings {
    use std::time::Duration;
    let mut d = DeliverySettings::default();
    let Some(v) = v else { return d };
    let t: DeliveryToml = match read_as(v, "delivery") {
        Ok(t) => t,
        Err((key, message)) => {
            problems.push((key, "config.delivery.invalid", message));
            return d;
        }
    };
    let mut positive =
        |key: &str, value: Option<u64>, slot: &mut Duration, unit: fn(u64) -> Duration| match value
        {
            Some(0) => problems.push((
                format!("delivery.{key}"),
                "config.delivery.invalid",
                "must be more than 0".into(),
            )),
            Some(n) => *slot = unit(n),
            None => {}
        };
    positive(
        "retry_base_ms",
        t.retry_base_ms,
        &mut d.retry_base,
        Duration::from_millis,
    );
    positive(
        "retry_max_ms",
        t.retry_max_ms,
        &mut d.retry_max,
        Duration::from_millis,
    );
    positive(
        "max_age_secs",
        t.max_age_secs,
        &mut d.max_age,
        Duration::from_secs,
    );
    positive(
        "breaker_cooldown_ms",
        t.breaker_cooldown_ms,
        &mut d.breaker_cooldown,
        Duration::from_millis,
    );
    positive(
        "request_timeout_ms",
        t.request_timeout_ms,
        &mut d.request_timeout,
        Duration::from_millis,
    );
    match t.breaker_failures {
        Some(0) => problems.push((
            "delivery.breaker_failures".into(),
            "config.delivery.invalid",
            "must be at least 1".into(),
        )),
        Some(n) => d.breaker_failures = n,
        None => {}
    }
    if d.retry_max < d.retry_base {
        problems.push((
            "delivery.retry_max_ms".into(),
            "config.delivery.invalid",
            "must not be less than retry_base_ms".into(),
        ));
    }
    d
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VendorToml {
    id: String,
    legal_name: String,
    country: String,
    dpa_signed: Option<Value>,
    #[serde(default)]
    certifications: Vec<String>,
    last_assessment: Option<Value>,
    risk_tier: RiskTier,
    transfer_mechanism: TransferMechanism,
    #[serde(default)]
    sub_processors: Vec<String>,
    notes: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConsentToml {
    #[serde(default)]
    categories: Vec<String>,
    tcf_vendor_id: Option<u16>,
    #[serde(default)]
    tcf_purposes: Vec<u8>,
    #[serde(default)]
    tcf_special_features: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransformToml {
    op: String,
    field: String,
    normalize: Option<String>,
    country_code: Option<String>,
    to: Option<String>,
    length: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationToml {
    id: String,
    name: Option<String>,
    vendor: String,
    connector: ConnectorKind,
    #[serde(default = "yes")]
    enabled: bool,
    purposes: Vec<Purpose>,
    legal_basis: LegalBasis,
    #[serde(default)]
    consent: Option<ConsentToml>,
    sale_or_sharing: Option<bool>,
    event_types: Vec<String>,
    event_names: Option<Vec<String>>,
    allow: Vec<String>,
    #[serde(default)]
    transforms: Vec<TransformToml>,
    #[serde(default)]
    pii: PiiAction,
    #[serde(default)]
    pii_expected: Vec<String>,
    allowed_regions: Option<Vec<String>>,
    pseudonymisation_key: Option<String>,
    endpoint: Option<String>,
    tls_ca_file: Option<String>,
    tls_client_cert_file: Option<String>,
    tls_client_key_file: Option<String>,
    rate_limit_per_sec: Option<u32>,
    #[serde(default)]
    settings: toml::Table,
}

fn yes() -> bool {
    true
}

/// Collects problems as `(key, code, message)`; the caller turns them into `ConfigProblem`s.
pub(crate) type Problem = (String, &'static str, String);

fn date_value(v: &Value) -> Result<Date, String> {
    let text = match v {
        Value::Datetime(dt) => dt.to_string(),
        Value::String(s) => s.clone(),
        other => {
            return Err(format!(
                "must be a date like 2025-01-31, found {}",
                other.type_str()
            ));
        }
    };
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(&text, &fmt).map_err(|_| format!("{text:?} is not a date like 2025-01-31"))
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn valid_country(c: &str) -> bool {
    COUNTRIES.binary_search(&c).is_ok()
}

pub(crate) fn read_policy(v: Option<&Value>, problems: &mut Vec<Problem>) -> PolicySettings {
    let mut settings = PolicySettings::default();
    let Some(v) = v else { return settings };
    let parsed: PolicyToml = match read_as(v, "policy") {
        Ok(p) => p,
        Err((key, message)) => {
            problems.push((key, "config.policy.invalid", message));
            return settings;
        }
    };
    if let Some(days) = parsed.dsr_deadline_days {
        if !(1..=365).contains(&days) {
            problems.push((
                "policy.dsr_deadline_days".into(),
                "config.policy.dsr_deadline.invalid",
                "must be between 1 and 365 days".into(),
            ));
        }
        settings.dsr_deadline_days = days;
    }
    if let Some(days) = parsed.max_assessment_age_days {
        if days == 0 {
            problems.push((
                "policy.max_assessment_age_days".into(),
                "config.policy.assessment_age.invalid",
                "must be at least 1 day".into(),
            ));
        }
        settings.max_assessment_age_days = days;
    }
    for (key, value, slot) in [
        (
            "tcf_field",
            parsed.tcf_field,
            &mut settings.consent_fields.tcf,
        ),
        (
            "us_privacy_field",
            parsed.us_privacy_field,
            &mut settings.consent_fields.us_privacy,
        ),
        (
            "categories_field",
            parsed.categories_field,
            &mut settings.consent_fields.categories,
        ),
        (
            "gpc_field",
            parsed.gpc_field,
            &mut settings.consent_fields.gpc,
        ),
        (
            "region_field",
            parsed.region_field,
            &mut settings.region_field,
        ),
    ] {
        if let Some(path) = value {
            match FieldPath::parse(&path) {
                Ok(p) if !p.has_wildcard() => *slot = path,
                Ok(_) => problems.push((
                    format!("policy.{key}"),
                    "config.policy.field.invalid",
                    "must name one field, without '*'".into(),
                )),
                Err(e) => {
                    problems.push((format!("policy.{key}"), "config.policy.field.invalid", e))
                }
            }
        }
    }
    settings
}

/// Reads `v` (the table at `path`) as `T`; on failure, the key that failed (an unknown
/// variant names its key, not only its table) and the message.
fn read_as<T: serde::de::DeserializeOwned>(v: &Value, path: &str) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(v.clone()).map_err(
        |e: serde_path_to_error::Error<toml::de::Error>| {
            let inner = e.path().to_string();
            let key = if inner == "." || inner.is_empty() {
                path.to_owned()
            } else if path.is_empty() {
                inner
            } else if inner.starts_with('[') {
                format!("{path}{inner}")
            } else {
                format!("{path}.{inner}")
            };
            (key, e.inner().message().trim_end().to_owned())
        },
    )
}

pub(crate) fn read_vendors(v: Option<&Value>, problems: &mut Vec<Problem>) -> Vec<Vendor> {
    let mut out = Vec::new();
    let Some(v) = v else { return out };
    let Value::Array(items) = v else {
        problems.push((
            "vendors".into(),
            "config.value.type",
            format!(
                "must be an array of tables ([[vendors]]), found {}",
                v.type_str()
            ),
        ));
        return out;
    };
    let mut ids = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("vendors[{i}]");
        let t: VendorToml = match read_as(item, &path) {
            Ok(t) => t,
            Err((key, message)) => {
                problems.push((key, "config.vendor.invalid", message));
                continue;
            }
        };
        let mut ok = true;
        if !valid_id(&t.id) {
            problems.push((
                format!("{path}.id"),
                "config.vendor.id.invalid",
                format!(
                    "{:?} must be 1-64 lowercase letters, digits, '-' or '_'",
                    t.id
                ),
            ));
            ok = false;
        } else if !ids.insert(t.id.clone()) {
            problems.push((
                format!("{path}.id"),
                "config.vendor.id.duplicate",
                format!("vendor id {:?} is declared more than once", t.id),
            ));
            ok = false;
        }
        if !valid_country(&t.country) {
            problems.push((
                format!("{path}.country"),
                "config.vendor.country.invalid",
                format!(
                    "{:?} is not an ISO 3166-1 alpha-2 code in capitals, like \"US\" or \"IE\"",
                    t.country
                ),
            ));
            ok = false;
        }
        let dpa_signed = match &t.dpa_signed {
            None | Some(Value::Boolean(false)) => None,
            Some(v) => match date_value(v) {
                Ok(d) => Some(d),
                Err(e) => {
                    problems.push((
                        format!("{path}.dpa_signed"),
                        "config.vendor.date.invalid",
                        format!("{e} (the day the DPA was signed), or false"),
                    ));
                    ok = false;
                    None
                }
            },
        };
        let last_assessment = match &t.last_assessment {
            None => None,
            Some(v) => match date_value(v) {
                Ok(d) => Some(d),
                Err(e) => {
                    problems.push((
                        format!("{path}.last_assessment"),
                        "config.vendor.date.invalid",
                        e,
                    ));
                    ok = false;
                    None
                }
            },
        };
        if ok {
            out.push(Vendor {
                id: t.id,
                legal_name: t.legal_name,
                country: t.country,
                dpa_signed,
                certifications: t.certifications,
                last_assessment,
                risk_tier: t.risk_tier,
                transfer_mechanism: t.transfer_mechanism,
                sub_processors: t.sub_processors,
                notes: t.notes,
            });
        }
    }
    out
}

/// Why a vendor may not receive data on `today`, as a decision reason code and message.
pub fn vendor_unapproved(
    vendor: &Vendor,
    max_age_days: u32,
    today: Date,
) -> Option<(&'static str, String)> {
    if vendor.dpa_signed.is_none() {
        return Some((
            "vendor.no_dpa",
            format!(
                "vendor {:?} has no signed data processing agreement",
                vendor.id
            ),
        ));
    }
    let Some(assessed) = vendor.last_assessment else {
        return Some((
            "vendor.assessment_missing",
            format!("vendor {:?} has never had a security assessment", vendor.id),
        ));
    };
    let age = (today - assessed).whole_days();
    if age > i64::from(max_age_days) {
        return Some((
            "vendor.assessment_expired",
            format!(
                "vendor {:?} was last assessed on {assessed}, {age} days ago (the maximum is {max_age_days})",
                vendor.id
            ),
        ));
    }
    None
}

fn read_transform(t: TransformToml, path: &str, problems: &mut Vec<Problem>) -> Option<Transform> {
    let field = match FieldPath::parse(&t.field) {
        Ok(f) => f,
        Err(e) => {
            problems.push((
                format!("{path}.field"),
                "config.destination.transform.invalid",
                e,
            ));
            return None;
        }
    };
    let normalize = match t.normalize.as_deref() {
        None => Normalize::None,
        Some(n) => match Normalize::parse(n) {
            Some(n) => n,
            None => {
                problems.push((
                    format!("{path}.normalize"),
                    "config.destination.transform.invalid",
                    format!(
                        "{n:?} is not a normalisation; use one of: {}",
                        Normalize::NAMES.join(", ")
                    ),
                ));
                return None;
            }
        },
    };
    let unexpected = |problems: &mut Vec<Problem>, key: &str| {
        problems.push((
            format!("{path}.{key}"),
            "config.destination.transform.invalid",
            format!("{key:?} does not apply to op {:?}", t.op),
        ));
    };
    let concrete = |problems: &mut Vec<Problem>, p: &FieldPath, key: &str| {
        if p.has_wildcard() {
            problems.push((
                format!("{path}.{key}"),
                "config.destination.transform.invalid",
                format!("op {:?} needs one field, without '*'", t.op),
            ));
            false
        } else {
            true
        }
    };
    let transform = match t.op.as_str() {
        "hash" => Transform::Hash {
            field,
            normalize,
            country_code: t.country_code.clone(),
        },
        "hmac" => Transform::Hmac {
            field,
            normalize,
            country_code: t.country_code.clone(),
        },
        "truncate_ip" => Transform::TruncateIp { field },
        "generalise" | "generalize" => {
            let to = match (t.to.as_deref(), t.length) {
                (Some("year"), None) => Generalise::Year,
                (Some("prefix"), Some(n)) if n > 0 => Generalise::Prefix(n),
                _ => {
                    problems.push((
                        path.to_owned(),
                        "config.destination.transform.invalid",
                        "generalise needs to = \"year\", or to = \"prefix\" with length = N".into(),
                    ));
                    return None;
                }
            };
            Transform::Generalise { field, to }
        }
        "move" => {
            let Some(to) = t.to.as_deref() else {
                problems.push((
                    format!("{path}.to"),
                    "config.destination.transform.invalid",
                    "move needs to = \"new.path\"".into(),
                ));
                return None;
            };
            let to = match FieldPath::parse(to) {
                Ok(to) => to,
                Err(e) => {
                    problems.push((
                        format!("{path}.to"),
                        "config.destination.transform.invalid",
                        e,
                    ));
                    return None;
                }
            };
            if !concrete(problems, &field, "field") || !concrete(problems, &to, "to") {
                return None;
            }
            Transform::Move { field, to }
        }
        "drop" => Transform::Drop { field },
        other => {
            problems.push((
                format!("{path}.op"),
                "config.destination.transform.invalid",
                format!("{other:?} is not a transform; use hash, hmac, truncate_ip, generalise, move or drop"),
            ));
            return None;
        }
    };
    let op = transform.op();
    if t.normalize.is_some() && !matches!(op, "hash" | "hmac") {
        unexpected(problems, "normalize");
    }
    if t.country_code.is_some() && !matches!(op, "hash" | "hmac") {
        unexpected(problems, "country_code");
    }
    if let Some(cc) = &t.country_code
        && (cc.is_empty() || cc.len() > 3 || !cc.bytes().all(|b| b.is_ascii_digit()))
    {
        problems.push((
            format!("{path}.country_code"),
            "config.destination.transform.invalid",
            format!("{cc:?} is not a calling code like \"1\" or \"44\""),
        ));
    }
    if t.to.is_some() && !matches!(op, "move" | "generalise") {
        unexpected(problems, "to");
    }
    if t.length.is_some() && op != "generalise" {
        unexpected(problems, "length");
    }
    Some(transform)
}

pub(crate) fn read_destinations(
    v: Option<&Value>,
    vendors: &[Vendor],
    settings: &PolicySettings,
    today: Date,
    problems: &mut Vec<Problem>,
) -> Vec<Destination> {
    let mut out = Vec::new();
    let Some(v) = v else { return out };
    let Value::Array(items) = v else {
        problems.push((
            "destinations".into(),
            "config.value.type",
            format!(
                "must be an array of tables ([[destinations]]), found {}",
                v.type_str()
            ),
        ));
        return out;
    };
    let vendors: HashMap<&str, &Vendor> = vendors.iter().map(|v| (v.id.as_str(), v)).collect();
    let mut ids = HashSet::new();
    let mut keys: HashMap<Vec<u8>, String> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("destinations[{i}]");
        let t: DestinationToml = match read_as(item, &path) {
            Ok(t) => t,
            Err((key, message)) => {
                problems.push((key, "config.destination.invalid", message));
                continue;
            }
        };
        let before = problems.len();
        let mut add = |key: &str, code: &'static str, message: String| {
            problems.push((format!("{path}.{key}"), code, message));
        };
        if !valid_id(&t.id) {
            add(
                "id",
                "config.destination.id.invalid",
                format!(
                    "{:?} must be 1-64 lowercase letters, digits, '-' or '_'",
                    t.id
                ),
            );
        } else if !ids.insert(t.id.clone()) {
            add(
                "id",
                "config.destination.id.duplicate",
                format!("destination id {:?} is declared more than once", t.id),
            );
        }
        let vendor = vendors.get(t.vendor.as_str()).map(|v| (*v).clone());
        match &vendor {
            None => add(
                "vendor",
                "config.destination.vendor.unknown",
                format!("no [[vendors]] entry has id {:?}", t.vendor),
            ),
            Some(v) if t.enabled => {
                if let Some((code, message)) =
                    vendor_unapproved(v, settings.max_assessment_age_days, today)
                {
                    let code = match code {
                        "vendor.no_dpa" => "config.destination.vendor.no_dpa",
                        "vendor.assessment_missing" => {
                            "config.destination.vendor.assessment_missing"
                        }
                        _ => "config.destination.vendor.assessment_expired",
                    };
                    add(
                        "vendor",
                        code,
                        format!("{message}; sign one (or set enabled = false) before sending data"),
                    );
                }
            }
            Some(_) => {}
        }
        if t.purposes.is_empty() {
            add(
                "purposes",
                "config.destination.purposes.missing",
                "name at least one purpose".into(),
            );
        }
        let consent = t.consent.unwrap_or_default();
        if t.legal_basis == LegalBasis::Consent
            && consent.categories.is_empty()
            && consent.tcf_vendor_id.is_none()
        {
            add(
                "consent",
                "config.destination.consent.missing",
                "legal_basis = \"consent\" needs consent.categories or consent.tcf_vendor_id, \
                 or nothing could ever be sent"
                    .into(),
            );
        }
        if consent.tcf_vendor_id.is_some() && consent.tcf_purposes.is_empty() {
            add(
                "consent.tcf_purposes",
                "config.destination.consent.tcf_purposes",
                "name the TCF purposes (1-11) this vendor needs".into(),
            );
        }
        if consent.tcf_vendor_id.is_none()
            && (!consent.tcf_purposes.is_empty() || !consent.tcf_special_features.is_empty())
        {
            add(
                "consent.tcf_vendor_id",
                "config.destination.consent.tcf_vendor_id",
                "TCF purposes need the vendor's Global Vendor List id".into(),
            );
        }
        if let Some(p) = consent.tcf_purposes.iter().find(|p| !(1..=11).contains(*p)) {
            add(
                "consent.tcf_purposes",
                "config.destination.consent.tcf_purposes",
                format!("{p} is not a TCF v2.2 purpose (1-11)"),
            );
        }
        if let Some(f) = consent
            .tcf_special_features
            .iter()
            .find(|f| !(1..=2).contains(*f))
        {
            add(
                "consent.tcf_special_features",
                "config.destination.consent.tcf_purposes",
                format!("{f} is not a TCF v2.2 special feature (1-2)"),
            );
        }
        if t.legal_basis == LegalBasis::LegitimateInterest
            && let Some(p) = consent
                .tcf_purposes
                .iter()
                .find(|p| super::TCF_CONSENT_ONLY_PURPOSES.contains(p))
        {
            add(
                "consent.tcf_purposes",
                "config.destination.consent.tcf_purposes",
                format!(
                    "TCF v2.2 allows purpose {p} only with consent, not legitimate interest (purposes 1 and 3-6)"
                ),
            );
        }
        // Consent settings a basis never reads would look enforced while they are not.
        let consent_unused = match t.legal_basis {
            LegalBasis::Consent => false,
            LegalBasis::LegitimateInterest => !consent.categories.is_empty(),
            LegalBasis::Contract | LegalBasis::LegalObligation => {
                !consent.categories.is_empty() || consent.tcf_vendor_id.is_some()
            }
        };
        if consent_unused {
            add(
                "consent",
                "config.destination.consent.unused",
                format!(
                    "legal_basis = {:?} does not rest on consent, so these consent settings would never be checked; \
                     remove them or use legal_basis = \"consent\"",
                    t.legal_basis.as_str()
                ),
            );
        }
        if t.sale_or_sharing == Some(false) && t.purposes.contains(&Purpose::Advertising) {
            add(
                "sale_or_sharing",
                "config.destination.sale_or_sharing.advertising",
                "an advertising destination is a sale or sharing: GPC and opt-outs must apply to it".into(),
            );
        }
        let mut event_types = Vec::new();
        for (j, et) in t.event_types.iter().enumerate() {
            match MessageKind::parse(et) {
                Some(k) => event_types.push(k),
                None => add(
                    &format!("event_types[{j}]"),
                    "config.destination.event_types.invalid",
                    format!(
                        "{et:?} is not an event type; use track, identify, page, screen, group or alias"
                    ),
                ),
            }
        }
        if t.event_types.is_empty() {
            add(
                "event_types",
                "config.destination.event_types.invalid",
                "name at least one event type".into(),
            );
        }
        let mut allow = Vec::new();
        for (j, a) in t.allow.iter().enumerate() {
            match FieldPath::parse(a) {
                Ok(p) => allow.push(p),
                Err(e) => add(
                    &format!("allow[{j}]"),
                    "config.destination.allow.invalid",
                    e,
                ),
            }
        }
        let mut pii_expected = Vec::new();
        for (j, a) in t.pii_expected.iter().enumerate() {
            match FieldPath::parse(a) {
                Ok(p) => pii_expected.push(p),
                Err(e) => add(
                    &format!("pii_expected[{j}]"),
                    "config.destination.allow.invalid",
                    e,
                ),
            }
        }
        let mut transforms = Vec::new();
        // Moves run after every other transform, so nothing may target where a move puts things.
        let mut moved_to: Vec<FieldPath> = Vec::new();
        for (j, tt) in t.transforms.into_iter().enumerate() {
            let tpath = format!("{path}.transforms[{j}]");
            let Some(tr) = read_transform(tt, &tpath, problems) else {
                continue;
            };
            let field = tr.field();
            if let Some(to) = moved_to.iter().find(|to| field.is_covered_by(to)) {
                problems.push((
                    format!("{tpath}.field"),
                    "config.destination.transform.after_move",
                    format!(
                        "{field} is where a move puts {to}; moves run after every other transform, \
                         so transform the field before it is moved"
                    ),
                ));
            } else if !allow.iter().any(|a| field.is_covered_by(a)) {
                problems.push((
                    format!("{tpath}.field"),
                    "config.destination.transform.not_allowed",
                    format!(
                        "{field} is not in the allowlist, so it is never there to {}",
                        tr.op()
                    ),
                ));
            }
            if matches!(tr, Transform::Drop { .. } | Transform::Move { .. })
                && let Some(a) = allow.iter().find(|a| *a == field)
            {
                problems.push((
                    format!("{tpath}.field"),
                    "config.destination.transform.drops_allowed",
                    format!(
                        "allow names {a}, and this transform then removes it; remove one of the two"
                    ),
                ));
            }
            if let Transform::Move { to, .. } = &tr {
                moved_to.push(to.clone());
            }
            transforms.push(tr);
        }
        let needs_key = transforms
            .iter()
            .any(|t| matches!(t, Transform::Hmac { .. }));
        let pseudonymisation_key = match (t.pseudonymisation_key, needs_key) {
            (None, true) => {
                problems.push((
                    format!("{path}.pseudonymisation_key"),
                    "config.destination.key.missing",
                    "an hmac transform needs pseudonymisation_key = \"${ENV_NAME}\" (32 or more random bytes)".into(),
                ));
                None
            }
            (Some(_), false) => {
                problems.push((
                    format!("{path}.pseudonymisation_key"),
                    "config.destination.key.unused",
                    "no hmac transform uses this key".into(),
                ));
                None
            }
            (None, false) => None,
            (Some(k), true) if k.len() < MIN_PSEUDONYMISATION_KEY_LEN => {
                problems.push((
                    format!("{path}.pseudonymisation_key"),
                    "config.destination.key.too_short",
                    format!("is {} bytes; use at least {MIN_PSEUDONYMISATION_KEY_LEN} (openssl rand -hex 32)", k.len()),
                ));
                None
            }
            (Some(k), true) => {
                let bytes = k.into_bytes();
                if let Some(other) = keys.get(&bytes) {
                    problems.push((
                        format!("{path}.pseudonymisation_key"),
                        "config.destination.key.shared",
                        format!("destination {other:?} uses the same key; with one key two vendors could join their identifiers"),
                    ));
                }
                keys.insert(bytes.clone(), t.id.clone());
                Some(SecretKey(bytes))
            }
        };
        let allowed_regions = match t.allowed_regions {
            None => None,
            Some(regions) => {
                for (j, r) in regions.iter().enumerate() {
                    if r != "EEA" && !valid_country(r) {
                        problems.push((
                            format!("{path}.allowed_regions[{j}]"),
                            "config.destination.residency.invalid",
                            format!(
                                "{r:?} is not \"EEA\" or an ISO alpha-2 country code in capitals"
                            ),
                        ));
                    }
                }
                Some(regions)
            }
        };
        if let Some(ep) = &t.endpoint
            && !(ep.starts_with("https://") || ep.starts_with("http://"))
        {
            problems.push((
                format!("{path}.endpoint"),
                "config.destination.endpoint.invalid",
                format!("{ep:?} is not an http(s) URL"),
            ));
        }
        if t.tls_client_cert_file.is_some() != t.tls_client_key_file.is_some() {
            problems.push((
                format!("{path}.tls_client_cert_file"),
                "config.destination.tls.client_cert",
                "a client certificate needs both tls_client_cert_file and tls_client_key_file"
                    .into(),
            ));
        }
        if t.rate_limit_per_sec == Some(0) {
            problems.push((
                format!("{path}.rate_limit_per_sec"),
                "config.destination.rate_limit.invalid",
                "must be at least 1 request per second (leave it out for no limit)".into(),
            ));
        }
        let tls = OutboundTls {
            ca_file: t.tls_ca_file.map(Into::into),
            client_cert_file: t.tls_client_cert_file.map(Into::into),
            client_key_file: t.tls_client_key_file.map(Into::into),
        };
        let (Some(vendor), true) = (vendor, problems.len() == before) else {
            continue;
        };
        let sale_or_sharing = t
            .sale_or_sharing
            .unwrap_or(t.purposes.contains(&Purpose::Advertising));
        out.push(Destination {
            name: t.name.unwrap_or_else(|| t.id.clone()),
            id: t.id,
            vendor,
            connector: t.connector,
            enabled: t.enabled,
            purposes: t.purposes,
            legal_basis: t.legal_basis,
            consent: ConsentRequirement {
                categories: consent.categories,
                tcf_vendor_id: consent.tcf_vendor_id,
                tcf_purposes: consent.tcf_purposes,
                tcf_special_features: consent.tcf_special_features,
            },
            sale_or_sharing,
            event_types,
            event_names: t.event_names,
            compiled: Compiled::new(&allow, &transforms),
            allow,
            transforms,
            pii: t.pii,
            pii_expected,
            allowed_regions,
            pseudonymisation_key,
            max_assessment_age_days: settings.max_assessment_age_days,
            endpoint: t.endpoint,
            tls,
            rate_limit_per_sec: t.rate_limit_per_sec,
            settings: t.settings,
        });
    }
    out
}
