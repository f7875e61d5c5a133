//! The policy engine: for one event and one destination, what may leave, in what form, and why.
//!
//! [`decide`] is pure. Its checks run in this order, and the first that fails decides:
//!
//! 1. destination enabled                      `destination.disabled`
//! 2. vendor approved: DPA, assessment age     `vendor.no_dpa`, `vendor.assessment_missing`, `vendor.assessment_expired`
//! 3. event type (and track name) allowed      `event.type_not_allowed`, `event.name_not_allowed`
//! 4. subject not suppressed (erasure)         `subject.suppressed`
//! 5. legal basis:
//!    - consent: a TC string decides for destinations with a TCF vendor id
//!      (`tcf.malformed`, `tcf.vendor_no_consent`, `tcf.purpose_no_consent`,
//!      `tcf.special_feature_no_opt_in`, `tcf.publisher_restricted`); otherwise the consent
//!      categories in the event, else those stored for the subject (`consent.missing`,
//!      `consent.denied`, `consent.malformed`);
//!    - legitimate interest with a TCF vendor id: the TC string must not record an objection
//!      (`tcf.legitimate_interest_objected`);
//!    - contract and legal obligation need no consent;
//!    - then, for destinations that sell or share: GPC (`gpc.opt_out`), the US Privacy string
//!      (`usp.opt_out`, `usp.malformed`), a stored opt-out (`subject.opt_out`);
//! 6. residency                                `residency.region_unknown`, `residency.region_not_allowed`, `residency.no_transfer_mechanism`
//! 7. minimise (allowlist), 8. transform, 9. PII scan (`pii.found` when the action is block).

pub mod model;
pub mod paths;
pub mod payload;
pub mod pii;
pub mod transform;

use serde::Serialize;
use serde_json::Value;
use time::Date;

use crate::consent::{ConsentContext, Signal, SubjectState, get_path};
use crate::ids::MessageKind;
use model::{
    Destination, LegalBasis, PiiAction, TransferMechanism, in_gdpr_area, vendor_unapproved,
};
use tcf_check::check_tcf;

pub use model::{PolicySettings, Vendor};
pub use payload::PathList;

/// Every reason code a decision can carry. Blocking reasons first, then notes on a send.
pub const REASON_CODES: &[&str] = &[
    "destination.disabled",
    "vendor.no_dpa",
    "vendor.assessment_missing",
    "vendor.assessment_expired",
    "event.type_not_allowed",
    "event.name_not_allowed",
    "subject.suppressed",
    "consent.missing",
    "consent.denied",
    "consent.malformed",
    "tcf.malformed",
    "tcf.vendor_no_consent",
    "tcf.purpose_no_consent",
    "tcf.special_feature_no_opt_in",
    "tcf.publisher_restricted",
    "tcf.legitimate_interest_objected",
    "gpc.opt_out",
    "usp.opt_out",
    "usp.malformed",
    "subject.opt_out",
    "residency.region_unknown",
    "residency.region_not_allowed",
    "residency.no_transfer_mechanism",
    "pii.found",
    "pii.redacted",
    "pii.alert",
    "transform.invalid_value",
    CONNECTOR_REFUSED,
];

/// The connector cannot map the decided payload into a request: it would never be sent.
pub const CONNECTOR_REFUSED: &str = "connector.refused";

/// A reason: a stable code from [`REASON_CODES`] and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    pub code: &'static str,
    pub message: String,
}

impl Reason {
    /// The destination's connector cannot map the decided payload into a request (GA4 with
    /// neither `anonymousId` nor `userId`): it would never be sent.
    pub fn connector_refused(message: impl Into<String>) -> Reason {
        Reason::new(CONNECTOR_REFUSED, message)
    }

    fn new(code: &'static str, message: impl Into<String>) -> Reason {
        debug_assert!(
            REASON_CODES.contains(&code),
            "{code} is not in REASON_CODES"
        );
        Reason {
            code,
            message: message.into(),
        }
    }
}

/// PII found in a payload about to leave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PiiHit {
    pub path: String,
    pub kind: &'static str,
}

/// A decided payload: the minimised, transformed event as JSON text, in the form the outbox
/// stores and connectors read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload(pub String);

impl Payload {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The payload as a `Value` (for tests, `handoff plan` and connectors' mappings).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(&self.0).expect("payloads are written as valid JSON")
    }
}

/// Send this payload, or do not send.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Send(Payload),
    Block,
}

/// The decision for one event and one destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    /// For a block, the reason it was blocked; for a send, notes (PII redacted, values dropped).
    pub reasons: Vec<Reason>,
    /// Paths removed from the event (not allowed, dropped by a transform, or unusable values).
    pub dropped: PathList,
    pub pii: Vec<PiiHit>,
}

impl Decision {
    fn block(reason: Reason) -> Decision {
        Decision {
            outcome: Outcome::Block,
            reasons: vec![reason],
            dropped: PathList::default(),
            pii: Vec::new(),
        }
    }

    pub fn is_send(&self) -> bool {
        matches!(self.outcome, Outcome::Send(_))
    }

    pub fn payload(&self) -> Option<&Payload> {
        match &self.outcome {
            Outcome::Send(p) => Some(p),
            Outcome::Block => None,
        }
    }
}

/// An event read once and shared by every destination's decision.
/// Not `Clone`: its PII index is keyed by the addresses of its own strings.
#[derive(Debug)]
pub struct PreparedEvent {
    value: Value,
    pub kind: Option<MessageKind>,
    /// The subject's country (ISO 3166-1 alpha-2) when the event says, and says it with an
    /// assigned code; otherwise unknown (and, for residency, treated as protected).
    pub region: Option<String>,
    /// PII in the event's strings, found once for all destinations: `(address of the string's
    /// bytes, findings)`, sorted, for the strings that have any. Addresses are stable because
    /// `value` is never changed after this is built.
    pii: Vec<(usize, Vec<pii::Finding>)>,
}

impl PreparedEvent {
    pub fn new(value: Value, settings: &PolicySettings) -> PreparedEvent {
        let kind = value
            .get("type")
            .and_then(Value::as_str)
            .and_then(MessageKind::parse);
        let region = get_path(&value, &settings.region_field)
            .and_then(Value::as_str)
            .and_then(model::country_code)
            .map(str::to_owned);
        let mut found = Vec::new();
        index_pii(&value, &mut found);
        found.sort_unstable_by_key(|(at, _)| *at);
        PreparedEvent {
            value,
            kind,
            region,
            pii: found,
        }
    }

    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The PII found in `s`, a string (or key) inside this event's value.
    pub(crate) fn pii_in(&self, s: &str) -> &[pii::Finding] {
        match self
            .pii
            .binary_search_by_key(&(s.as_ptr() as usize), |(at, _)| *at)
        {
            Ok(i) => &self.pii[i].1,
            Err(_) => &[],
        }
    }
}

fn index_pii(v: &Value, out: &mut Vec<(usize, Vec<pii::Finding>)>) {
    match v {
        Value::String(s) => {
            let mut f = Vec::new();
            pii::scan(s, &mut f);
            if !f.is_empty() {
                out.push((s.as_ptr() as usize, f));
            }
        }
        Value::Array(items) => items.iter().for_each(|i| index_pii(i, out)),
        Value::Object(map) => {
            for (k, v) in map {
                // Keys too: an e-mail address can be a key (`{"jane@example.com": true}`).
                let mut f = Vec::new();
                pii::scan(k, &mut f);
                if !f.is_empty() {
                    out.push((k.as_ptr() as usize, f));
                }
                index_pii(v, out);
            }
        }
        _ => {}
    }
}

/// TCF v2.2 purposes that may not rest on legitimate interest: storing or accessing
/// information on a device (1) and the personalised advertising and content purposes (3-6).
pub const TCF_CONSENT_ONLY_PURPOSES: &[u8] = &[1, 3, 4, 5, 6];

mod tcf_check {
    use super::{Reason, TCF_CONSENT_ONLY_PURPOSES};
    use crate::consent::tcf::{RestrictionType, TcString};
    use crate::policy::model::{ConsentRequirement, LegalBasis};

    /// The TCF verdict for a destination with a vendor id; `None` means allowed.
    pub(super) fn check_tcf(
        tc: &TcString,
        req: &ConsentRequirement,
        vendor: u16,
        basis: LegalBasis,
    ) -> Option<Reason> {
        for &purpose in &req.tcf_purposes {
            let restriction = tc.restriction(purpose, vendor);
            if restriction == Some(RestrictionType::NotAllowed) {
                return Some(Reason::new(
                    "tcf.publisher_restricted",
                    format!(
                        "the publisher does not allow vendor {vendor} to process for purpose {purpose}"
                    ),
                ));
            }
            // The basis the vendor must use: the publisher may require one; otherwise ours. A
            // destination configured for consent is never switched to legitimate interest by
            // a restriction: whether the vendor may do so is in the vendor list, not here.
            let use_li = match (restriction, basis) {
                (Some(RestrictionType::RequireLegitimateInterest), LegalBasis::Consent) => {
                    return Some(Reason::new(
                        "tcf.publisher_restricted",
                        format!(
                            "the publisher requires legitimate interest for purpose {purpose}, and this destination relies on consent"
                        ),
                    ));
                }
                (Some(RestrictionType::RequireLegitimateInterest), _) => true,
                (Some(RestrictionType::RequireConsent), _) => false,
                _ => basis == LegalBasis::LegitimateInterest,
            };
            if use_li {
                if TCF_CONSENT_ONLY_PURPOSES.contains(&purpose) {
                    return Some(Reason::new(
                        "tcf.publisher_restricted",
                        format!("TCF v2.2 allows purpose {purpose} only with consent"),
                    ));
                }
                if !tc.purposes_li_transparency.contains(&purpose)
                    || !tc.vendor_legitimate_interests.contains(vendor)
                {
                    return Some(Reason::new(
                        "tcf.legitimate_interest_objected",
                        format!(
                            "the TC string records no legitimate interest for vendor {vendor} and purpose {purpose} (objected or not disclosed)"
                        ),
                    ));
                }
            } else {
                if !tc.vendor_consents.contains(vendor) {
                    return Some(Reason::new(
                        "tcf.vendor_no_consent",
                        format!("the TC string gives no consent to vendor {vendor}"),
                    ));
                }
                if !tc.purposes_consent.contains(&purpose) {
                    return Some(Reason::new(
                        "tcf.purpose_no_consent",
                        format!("the TC string gives no consent for purpose {purpose}"),
                    ));
                }
            }
        }
        for &feature in &req.tcf_special_features {
            if !tc.special_feature_opt_ins.contains(&feature) {
                return Some(Reason::new(
                    "tcf.special_feature_no_opt_in",
                    format!("the TC string has no opt-in for special feature {feature}"),
                ));
            }
        }
        None
    }
}

fn legal_basis(consent: &ConsentContext, dest: &Destination) -> Option<Reason> {
    let req = &dest.consent;
    match dest.legal_basis {
        LegalBasis::Consent => {
            let tcf_decides = req.tcf_vendor_id.is_some() && consent.tcf.is_present();
            if let (true, Some(vendor)) = (tcf_decides, req.tcf_vendor_id) {
                match &consent.tcf {
                    Signal::Malformed(why) => {
                        return Some(Reason::new(
                            "tcf.malformed",
                            format!("the TC string cannot be read: {why}"),
                        ));
                    }
                    Signal::Present(tc) => {
                        if let Some(r) = check_tcf(tc, req, vendor, LegalBasis::Consent) {
                            return Some(r);
                        }
                    }
                    Signal::Absent => unreachable!("tcf_decides checked presence"),
                }
            } else {
                let stored = consent.subject.preferences.as_ref().map(|p| &p.categories);
                let categories = match (&consent.categories, stored) {
                    (Signal::Present(c), _) => c,
                    (Signal::Malformed(why), _) => {
                        return Some(Reason::new(
                            "consent.malformed",
                            format!("the consent categories cannot be read: {why}"),
                        ));
                    }
                    (Signal::Absent, Some(c)) => c,
                    (Signal::Absent, None) => {
                        let what = if req.tcf_vendor_id.is_some() {
                            "no TC string and no consent categories"
                        } else {
                            "no consent categories"
                        };
                        return Some(Reason::new(
                            "consent.missing",
                            format!(
                                "the event carries {what}, and none are stored for the subject"
                            ),
                        ));
                    }
                };
                if req.categories.is_empty() {
                    // Only a TC string could grant consent here, and none came with the event.
                    return Some(Reason::new(
                        "consent.missing",
                        "this destination is decided by a TC string, and the event carries none",
                    ));
                }
                for c in &req.categories {
                    match categories.get(c) {
                        Some(true) => {}
                        Some(false) => {
                            return Some(Reason::new(
                                "consent.denied",
                                format!("consent for category {c:?} was refused"),
                            ));
                        }
                        None => {
                            return Some(Reason::new(
                                "consent.missing",
                                format!("no consent recorded for category {c:?}"),
                            ));
                        }
                    }
                }
            }
        }
        LegalBasis::LegitimateInterest => match (req.tcf_vendor_id, &consent.tcf) {
            (Some(vendor), Signal::Present(tc)) => {
                if let Some(r) = check_tcf(tc, req, vendor, LegalBasis::LegitimateInterest) {
                    return Some(r);
                }
            }
            // An objection recorded in a string we cannot read must still count.
            (Some(_), Signal::Malformed(why)) => {
                return Some(Reason::new(
                    "tcf.malformed",
                    format!("the TC string cannot be read: {why}"),
                ));
            }
            _ => {}
        },
        LegalBasis::Contract | LegalBasis::LegalObligation => {}
    }
    if dest.sale_or_sharing {
        if consent.gpc {
            return Some(Reason::new(
                "gpc.opt_out",
                "Global Privacy Control is on: an opt-out of sale and sharing",
            ));
        }
        match &consent.us_privacy {
            Signal::Present(u) if u.opt_out_sale == Some(true) => {
                return Some(Reason::new(
                    "usp.opt_out",
                    "the US Privacy string records an opt-out of sale",
                ));
            }
            Signal::Malformed(why) => {
                return Some(Reason::new(
                    "usp.malformed",
                    format!("the US Privacy string cannot be read: {why}"),
                ));
            }
            _ => {}
        }
        if consent
            .subject
            .preferences
            .as_ref()
            .is_some_and(|p| p.opt_out_of_sale)
        {
            return Some(Reason::new(
                "subject.opt_out",
                "the subject opted out of sale and sharing",
            ));
        }
    }
    None
}

fn residency(event: &PreparedEvent, dest: &Destination) -> Option<Reason> {
    let region = event.region.as_deref();
    if let Some(allowed) = &dest.allowed_regions {
        let Some(r) = region else {
            return Some(Reason::new(
                "residency.region_unknown",
                "this destination only takes subjects of some regions, and the event does not say where its subject is",
            ));
        };
        let ok = allowed
            .iter()
            .any(|a| a == r || (a == "EEA" && in_gdpr_area(r) && r != "GB" && r != "CH"));
        if !ok {
            return Some(Reason::new(
                "residency.region_not_allowed",
                format!(
                    "subjects in {r} may not be sent here (allowed: {})",
                    allowed.join(", ")
                ),
            ));
        }
    }
    let vendor = &dest.vendor;
    // A transfer out of the GDPR area needs a mechanism. An unknown region is treated as inside.
    let subject_protected = region.is_none_or(in_gdpr_area);
    if subject_protected
        && !in_gdpr_area(&vendor.country)
        && vendor.transfer_mechanism == TransferMechanism::None
    {
        return Some(Reason::new(
            "residency.no_transfer_mechanism",
            format!(
                "vendor {:?} processes in {} with no transfer mechanism, and the subject is {}",
                vendor.id,
                vendor.country,
                region.map_or("of unknown region".to_owned(), |r| format!("in {r}"))
            ),
        ));
    }
    None
}

/// The identifiers as `dest` sends them, after its allowlist, transforms and PII handling:
/// what the vendor knows the person by, for its deletion call (a destination that hashes or
/// pseudonymises `userId` must be asked to delete the hash). `None` where it does not send
/// one, or sends it redacted. Returns (userId, anonymousId, e-mail).
pub fn identifiers_as_sent(
    dest: &Destination,
    settings: &PolicySettings,
    user_id: Option<&str>,
    anonymous_id: Option<&str>,
    email: Option<&str>,
) -> (Option<String>, Option<String>, Option<String>) {
    let event = serde_json::json!({
        "type": "identify",
        "userId": user_id,
        "anonymousId": anonymous_id,
        "traits": {"email": email},
        "context": {"traits": {"email": email}},
    });
    let written = payload::write(&PreparedEvent::new(event, settings), dest);
    let out: Value = serde_json::from_str(&written.json).unwrap_or(Value::Null);
    let (user, anonymous, mail) = identifiers_in_payload(&out);
    (
        user_id.and(user),
        anonymous_id.and(anonymous),
        email.and(mail),
    )
}

/// The person's identifiers in a payload as written for a destination: `userId`,
/// `anonymousId` and the e-mail (`traits.email`, else `context.traits.email`), as the vendor
/// got them (hashed where the destination hashes them). Redacted, blank and non-text values
/// are none. Returns (userId, anonymousId, e-mail).
pub fn identifiers_in_payload(out: &Value) -> (Option<String>, Option<String>, Option<String>) {
    let text = |v: Option<&Value>| match v? {
        Value::String(s) if !s.trim().is_empty() && !s.starts_with("[redacted") => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    (
        text(out.get("userId")),
        text(out.get("anonymousId")),
        text(get_path(out, "traits.email")).or_else(|| text(get_path(out, "context.traits.email"))),
    )
}

/// Decides what `dest` may receive of `event`. `today` is the day the decision is made (vendor
/// assessments age).
pub fn decide(
    event: &PreparedEvent,
    consent: &ConsentContext,
    dest: &Destination,
    today: Date,
) -> Decision {
    if !dest.enabled {
        return Decision::block(Reason::new(
            "destination.disabled",
            format!("destination {:?} is disabled", dest.id),
        ));
    }
    if let Some((code, message)) =
        vendor_unapproved(&dest.vendor, dest.max_assessment_age_days, today)
    {
        return Decision::block(Reason::new(code, message));
    }
    match event.kind {
        Some(k) if dest.event_types.contains(&k) => {}
        k => {
            return Decision::block(Reason::new(
                "event.type_not_allowed",
                format!(
                    "{} events are not sent here",
                    k.map_or("untyped", MessageKind::as_str)
                ),
            ));
        }
    }
    if let (Some(MessageKind::Track), Some(names)) = (event.kind, &dest.event_names) {
        let name = event
            .value
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !names.iter().any(|n| n == name) {
            return Decision::block(Reason::new(
                "event.name_not_allowed",
                format!("track event {name:?} is not sent here"),
            ));
        }
    }
    if consent.subject.suppressed {
        return Decision::block(Reason::new(
            "subject.suppressed",
            "an erasure request suppressed this subject",
        ));
    }
    if let Some(r) = legal_basis(consent, dest) {
        return Decision::block(r);
    }
    if let Some(r) = residency(event, dest) {
        return Decision::block(r);
    }

    let payload::Written {
        json,
        dropped,
        mut reasons,
        hits,
        more_hits,
    } = payload::write(event, dest);
    if !hits.is_empty() {
        let mut kinds: Vec<&str> = hits.iter().map(|h| h.kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let mut at: Vec<&str> = hits.iter().map(|h| h.path.as_str()).take(10).collect();
        at.dedup();
        let mut at = at.join(", ");
        if at.len() > 500 {
            let cut = (0..=500)
                .rev()
                .find(|i| at.is_char_boundary(*i))
                .unwrap_or(0);
            at.truncate(cut);
            at.push('…');
        }
        let distinct = hits.len() + more_hits;
        if distinct > 10 {
            at.push_str(&format!(" and {} more", distinct - 10));
        }
        let kinds = kinds.join(", ");
        match dest.pii {
            PiiAction::Block => {
                return Decision {
                    outcome: Outcome::Block,
                    reasons: vec![Reason::new("pii.found", format!("{kinds} found in {at}"))],
                    dropped: PathList::default(),
                    pii: hits,
                };
            }
            PiiAction::Redact => reasons.push(Reason::new(
                "pii.redacted",
                format!("{kinds} redacted in {at}"),
            )),
            PiiAction::Alert => reasons.push(Reason::new(
                "pii.alert",
                format!("{kinds} sent in {at} (alert only)"),
            )),
        }
    }
    Decision {
        outcome: Outcome::Send(Payload(json)),
        reasons,
        dropped,
        pii: hits,
    }
}

/// What each destination would receive of one event, and why: the output of `handoff plan`
/// and of `POST /admin/v1/plan`.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub destinations: Vec<PlannedDestination>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedDestination {
    pub id: String,
    pub vendor: String,
    pub connector: model::ConnectorKind,
    pub purposes: Vec<model::Purpose>,
    pub legal_basis: LegalBasis,
    /// `send` or `block`.
    pub decision: &'static str,
    /// Reason codes (see [`REASON_CODES`]).
    pub reasons: Vec<&'static str>,
    /// The same reasons with a sentence each.
    pub details: Vec<Reason>,
    /// The minimised event the policy decided, before the connector's mapping; `null` when
    /// blocked.
    pub payload: Option<Value>,
    /// The request the vendor would receive (method, URL, headers and body with secrets
    /// masked, and the field names the ledger records), set by the connectors'
    /// `apply_wire`; `null` when blocked.
    pub wire: Option<Value>,
    pub dropped: Vec<String>,
    pub pii: Vec<PiiHit>,
}

/// Decides `event` (a normalised message) for every destination of `destinations`.
pub fn plan(
    settings: &PolicySettings,
    destinations: &[Destination],
    event: Value,
    subject: SubjectState,
    today: Date,
) -> Plan {
    let prepared = PreparedEvent::new(event, settings);
    let consent = ConsentContext::from_event(prepared.value(), &settings.consent_fields, subject);
    let destinations = destinations
        .iter()
        .map(|dest| {
            let d = decide(&prepared, &consent, dest, today);
            let send = d.is_send();
            PlannedDestination {
                id: dest.id.clone(),
                vendor: dest.vendor.id.clone(),
                connector: dest.connector,
                purposes: dest.purposes.clone(),
                legal_basis: dest.legal_basis,
                decision: if send { "send" } else { "block" },
                reasons: d.reasons.iter().map(|r| r.code).collect(),
                details: d.reasons.clone(),
                payload: match &d.outcome {
                    Outcome::Send(p) => Some(p.to_value()),
                    Outcome::Block => None,
                },
                wire: None,
                dropped: d.dropped.to_vec(),
                pii: d.pii.clone(),
            }
        })
        .collect();
    Plan { destinations }
}

/// Why a sample message cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PlanError {
    /// `plan.batch`, `plan.type_missing`, or the ingest code that would refuse the message.
    pub code: &'static str,
    pub message: String,
}

/// Plans one message given as an SDK would send it (JSON bytes): it is first normalised exactly
/// as ingest would (ids, times, `Sec-GPC`), then decided for every destination. This is what
/// `handoff plan` and `POST /admin/v1/plan` run.
pub fn plan_message(
    settings: &PolicySettings,
    destinations: &[Destination],
    body: &[u8],
    signals: crate::ingest::RequestSignals,
    now: time::OffsetDateTime,
    subject: SubjectState,
) -> Result<Plan, PlanError> {
    use crate::ingest::{self, Endpoint};
    let raw: Value = serde_json::from_slice(body).map_err(|e| PlanError {
        code: "request.json.malformed",
        message: format!("the message is not valid JSON: {e}"),
    })?;
    if raw.get("batch").is_some() {
        return Err(PlanError {
            code: "plan.batch",
            message: "plan takes one message, not a batch".into(),
        });
    }
    let Some(kind) = raw
        .get("type")
        .and_then(Value::as_str)
        .and_then(MessageKind::parse)
    else {
        return Err(PlanError {
            code: "plan.type_missing",
            message: "the message needs \"type\": track, identify, page, screen, group or alias"
                .into(),
        });
    };
    let mut n = 0;
    let mut new_id = || {
        n += 1;
        format!("planned-message-{n}")
    };
    let parsed =
        ingest::parse_with_signals(Endpoint::Single(kind), body, now, signals, &mut new_id)
            .map_err(|e| PlanError {
                code: e.code(),
                message: e.to_string(),
            })?;
    if let Some(r) = parsed.rejected.first() {
        return Err(PlanError {
            code: r.error.code(),
            message: format!("ingest would refuse this message: {}", r.error),
        });
    }
    let Some(accepted) = parsed.accepted.first() else {
        return Err(PlanError {
            code: "plan.type_missing",
            message: "ingest accepted nothing".into(),
        });
    };
    let event: Value = serde_json::from_str(&accepted.payload).expect("ingest writes valid JSON");
    Ok(plan(settings, destinations, event, subject, now.date()))
}

#[cfg(test)]
pub(crate) mod tests;
