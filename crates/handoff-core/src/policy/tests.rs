//! Decisions against the example configuration users start from, one test per check, plus
//! property tests of the engine's promises.

use std::collections::HashSet;

use proptest::prelude::*;
use serde_json::{Value, json};
use time::macros::date;

use super::*;
use crate::config::Config;
use crate::consent::tcf::tests_support::tc_string;
use crate::consent::{ConsentContext, StoredPreferences, SubjectState};
use model::ENVELOPE_KEYS;
use paths::FieldPath;

const TODAY: Date = date!(2026 - 11 - 25);

fn env(name: &str) -> Option<String> {
    Some(match name {
        "HANDOFF_WEB_WRITE_KEY" => "0123456789abcdef0123".into(),
        "HANDOFF_BACKEND_WRITE_KEY" => "fedcba98765432100123".into(),
        "HANDOFF_GA4_PSEUDONYMISATION_KEY" => "ga4-key-0123456789abcdef0123456789abcdef".into(),
        "HANDOFF_META_ACCESS_TOKEN" => "EAAexampletoken".into(),
        "HANDOFF_GA4_API_SECRET" => "ga4-api-secret".into(),
        "HANDOFF_STRIPE_API_KEY" => "sk_test_example".into(),
        "HANDOFF_CRM_WEBHOOK_SECRET" => "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        _ => return None,
    })
}

fn example() -> Config {
    Config::from_toml_on(
        include_str!("../../../../handoff.example.toml"),
        &env,
        TODAY,
    )
    .unwrap_or_else(|e| panic!("the example config must be valid:\n{e}"))
}

fn with(extra: &str) -> Result<Config, Vec<(String, &'static str)>> {
    let base = include_str!("../../../../handoff.example.toml");
    Config::from_toml_on(&format!("{base}\n{extra}"), &env, TODAY)
        .map_err(|e| e.0.into_iter().map(|p| (p.key, p.code)).collect())
}

fn dest<'c>(config: &'c Config, id: &str) -> &'c Destination {
    config.destinations.iter().find(|d| d.id == id).unwrap()
}

/// A purchase by a US shopper who granted every consent category.
fn order() -> Value {
    json!({
        "type": "track",
        "messageId": "m-1",
        "timestamp": "2026-11-25T10:00:00.000Z",
        "event": "Order Completed",
        "userId": "user-42",
        "anonymousId": "anon-7",
        "properties": {"order_id": "o-1", "value": 30.5, "currency": "USD", "coupon": "XMAS",
                       "products": [{"product_id": "p1", "quantity": 1, "price": 30.5}],
                       "message": "please call me"},
        "context": {
            "ip": "203.0.113.77",
            "userAgent": "Mozilla/5.0",
            "library": {"name": "analytics.js", "version": "2.0"},
            "page": {"url": "https://shop.example/checkout", "title": "Checkout"},
            "location": {"country": "US"},
            "traits": {"email": " John_Smith@gmail.com ", "phone": "(650)555-1212",
                       "firstName": "Mary", "lastName": "Smith", "address": {"country": "US", "city": "New York"}},
            "consent": {"categoryPreferences": {"Advertising": true, "Analytics": true}}
        }
    })
}

fn run(config: &Config, event: Value, subject: SubjectState, id: &str) -> Decision {
    let prepared = PreparedEvent::new(event, &config.policy);
    let consent =
        ConsentContext::from_event(prepared.value(), &config.policy.consent_fields, subject);
    decide(&prepared, &consent, dest(config, id), TODAY)
}

fn code(d: &Decision) -> &'static str {
    assert!(!d.is_send(), "expected a block, got {d:?}");
    d.reasons[0].code
}

fn set(v: &mut Value, path: &str, new: Value) {
    let p = FieldPath::parse(path).unwrap();
    paths::put(v, &p, new).unwrap();
}

fn unset(v: &mut Value, path: &str) {
    paths::take(v, &FieldPath::parse(path).unwrap());
}

#[test]
fn country_lists_are_sorted_for_binary_search() {
    for list in [model::COUNTRIES, model::GDPR_COUNTRIES] {
        assert!(list.windows(2).all(|w| w[0] < w[1]));
    }
    assert!(
        model::GDPR_COUNTRIES
            .iter()
            .all(|c| model::COUNTRIES.contains(c))
    );
    assert!(model::in_gdpr_area("DE") && model::in_gdpr_area("GB") && !model::in_gdpr_area("US"));
}

#[test]
fn reason_codes_are_unique() {
    let unique: HashSet<_> = REASON_CODES.iter().collect();
    assert_eq!(unique.len(), REASON_CODES.len());
}

#[test]
fn the_example_declares_the_documented_destinations() {
    let c = example();
    let ids: Vec<&str> = c.destinations.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["meta-capi", "ga4", "stripe", "crm-webhook"]);
    assert!(dest(&c, "meta-capi").sale_or_sharing);
    assert!(!dest(&c, "stripe").sale_or_sharing);
}

#[test]
fn meta_gets_hashed_user_data_and_only_allowed_fields() {
    let c = example();
    let d = run(&c, order(), SubjectState::default(), "meta-capi");
    let p = &d.payload().expect("sent").to_value();
    let t = &p["context"]["traits"];
    // Meta's documented vectors (customer information parameters).
    assert_eq!(
        t["email"],
        "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
    );
    assert_eq!(
        t["phone"],
        "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"
    );
    assert_eq!(
        t["firstName"],
        "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"
    );
    assert_eq!(
        t["address"]["country"],
        "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621"
    );
    assert_eq!(
        p["context"]["ip"], "203.0.113.77",
        "Meta needs the address unhashed"
    );
    assert_eq!(p["messageId"], "m-1");
    assert_eq!(
        p["properties"]["products"],
        json!([{"product_id": "p1", "quantity": 1}])
    );
    for gone in [
        "anonymousId",
        "properties.coupon",
        "properties.message",
        "context.library",
        "context.page.title",
        "context.consent",
        "context.location",
        "properties.products[].price",
    ] {
        assert!(
            d.dropped.iter().any(|x| x == gone),
            "{gone} not in {:?}",
            d.dropped
        );
    }
    assert!(p.get("anonymousId").is_none());
}

#[test]
fn no_consent_data_blocks_every_consent_based_destination() {
    let c = example();
    let mut e = order();
    unset(&mut e, "context.consent");
    assert_eq!(
        code(&run(&c, e.clone(), SubjectState::default(), "meta-capi")),
        "consent.missing"
    );
    assert_eq!(
        code(&run(&c, e.clone(), SubjectState::default(), "ga4")),
        "consent.missing"
    );
    // Legitimate interest and contract do not rest on consent.
    assert!(run(&c, e.clone(), SubjectState::default(), "crm-webhook").is_send());
    set(&mut e, "type", json!("identify"));
    set(&mut e, "traits", json!({"email": "a@b.co"}));
    assert!(run(&c, e, SubjectState::default(), "stripe").is_send());
}

#[test]
fn categories_decide_without_a_tc_string() {
    let c = example();
    let mut e = order();
    set(
        &mut e,
        "context.consent.categoryPreferences",
        json!({"Advertising": false, "Analytics": true}),
    );
    assert_eq!(
        code(&run(&c, e.clone(), SubjectState::default(), "meta-capi")),
        "consent.denied"
    );
    assert!(run(&c, e.clone(), SubjectState::default(), "ga4").is_send());
    set(
        &mut e,
        "context.consent.categoryPreferences",
        json!({"Analytics": true}),
    );
    assert_eq!(
        code(&run(&c, e.clone(), SubjectState::default(), "meta-capi")),
        "consent.missing"
    );
    set(
        &mut e,
        "context.consent.categoryPreferences",
        json!({"Advertising": "yes"}),
    );
    assert_eq!(
        code(&run(&c, e, SubjectState::default(), "meta-capi")),
        "consent.malformed"
    );
}

#[test]
fn gpc_blocks_sale_and_sharing_only() {
    let c = example();
    let mut e = order();
    set(&mut e, "context.gpc", json!(true));
    assert_eq!(
        code(&run(&c, e.clone(), SubjectState::default(), "meta-capi")),
        "gpc.opt_out"
    );
    assert!(run(&c, e.clone(), SubjectState::default(), "ga4").is_send());
    assert!(run(&c, e, SubjectState::default(), "crm-webhook").is_send());
}

#[test]
fn us_privacy_string() {
    let c = example();
    let mut e = order();
    set(&mut e, "context.consent.usPrivacy", json!("1YYN"));
    assert_eq!(
        code(&run(&c, e.clone(), SubjectState::default(), "meta-capi")),
        "usp.opt_out"
    );
    set(&mut e, "context.consent.usPrivacy", json!("1YNN"));
    assert!(run(&c, e.clone(), SubjectState::default(), "meta-capi").is_send());
    set(&mut e, "context.consent.usPrivacy", json!("yes please"));
    assert_eq!(
        code(&run(&c, e.clone(), SubjectState::default(), "meta-capi")),
        "usp.malformed"
    );
    assert!(
        run(&c, e, SubjectState::default(), "ga4").is_send(),
        "analytics is not a sale"
    );
}

#[test]
fn a_tc_string_decides_for_destinations_with_a_tcf_vendor_id() {
    let c = example();
    let mut e = order();
    // Categories refuse analytics, but a TC string travels with the event: it decides for GA4.
    set(
        &mut e,
        "context.consent.categoryPreferences",
        json!({"Advertising": true, "Analytics": false}),
    );
    set(
        &mut e,
        "context.consent.tcf",
        json!(tc_string(&[1, 7, 8, 9], &[755], &[])),
    );
    assert!(run(&c, e.clone(), SubjectState::default(), "ga4").is_send());
    // ...and not for Meta, which has no TCF vendor id: its category decides.
    assert!(run(&c, e.clone(), SubjectState::default(), "meta-capi").is_send());

    set(
        &mut e,
        "context.consent.tcf",
        json!(tc_string(&[1, 7, 8, 9], &[754], &[])),
    );
    assert_eq!(
        code(&run(&c, e.clone(), SubjectState::default(), "ga4")),
        "tcf.vendor_no_consent"
    );
    set(
        &mut e,
        "context.consent.tcf",
        json!(tc_string(&[1, 7, 8], &[755], &[])),
    );
    assert_eq!(
        code(&run(&c, e.clone(), SubjectState::default(), "ga4")),
        "tcf.purpose_no_consent"
    );
    set(
        &mut e,
        "context.consent.tcf",
        json!(tc_string(&[1, 7, 8, 9], &[755], &[(8, 0, 755)])),
    );
    assert_eq!(
        code(&run(&c, e.clone(), SubjectState::default(), "ga4")),
        "tcf.publisher_restricted"
    );
    set(
        &mut e,
        "context.consent.tcf",
        json!("COwGVJOOwGVJOADACHENAOCAAAAAAAAAAAAAAAAAAA"),
    );
    assert_eq!(
        code(&run(&c, e.clone(), SubjectState::default(), "ga4")),
        "tcf.malformed"
    );
    set(&mut e, "context.consent.tcf", json!(12));
    assert_eq!(
        code(&run(&c, e, SubjectState::default(), "ga4")),
        "tcf.malformed"
    );
}

#[test]
fn stored_preferences_apply_when_the_event_has_none() {
    let c = example();
    let mut e = order();
    unset(&mut e, "context.consent");
    let identify = json!({"traits": {"consent": {"categoryPreferences": {"advertising": true}}}});
    let update = crate::consent::PreferenceUpdate::from_identify(&identify)
        .unwrap()
        .unwrap();
    let prefs = StoredPreferences::default().apply(&update);
    let subject = SubjectState {
        suppressed: false,
        preferences: Some(prefs.clone()),
    };
    assert!(run(&c, e.clone(), subject, "meta-capi").is_send());
    assert_eq!(
        code(&run(
            &c,
            e.clone(),
            SubjectState {
                suppressed: false,
                preferences: Some(prefs.clone())
            },
            "ga4"
        )),
        "consent.missing"
    );
    let opted_out = StoredPreferences {
        opt_out_of_sale: true,
        ..prefs
    };
    let subject = SubjectState {
        suppressed: false,
        preferences: Some(opted_out),
    };
    assert_eq!(
        code(&run(&c, order(), subject, "meta-capi")),
        "subject.opt_out"
    );
}

#[test]
fn a_suppressed_subject_is_blocked_everywhere() {
    let c = example();
    for id in ["meta-capi", "ga4", "crm-webhook"] {
        let s = SubjectState {
            suppressed: true,
            preferences: None,
        };
        assert_eq!(code(&run(&c, order(), s, id)), "subject.suppressed", "{id}");
    }
}

#[test]
fn event_types_and_names() {
    let c = example();
    let mut e = order();
    set(&mut e, "type", json!("identify"));
    assert_eq!(
        code(&run(&c, e.clone(), SubjectState::default(), "meta-capi")),
        "event.type_not_allowed"
    );
    set(&mut e, "type", json!("nonsense"));
    assert_eq!(
        code(&run(&c, e, SubjectState::default(), "ga4")),
        "event.type_not_allowed"
    );
    let c = with(
        r#"
[[destinations]]
id = "orders-only"
vendor = "helpdesk"
connector = "webhook"
purposes = ["support"]
legal_basis = "contract"
event_types = ["track"]
event_names = ["Order Completed"]
allow = ["event"]
"#,
    )
    .unwrap();
    assert!(run(&c, order(), SubjectState::default(), "orders-only").is_send());
    let mut e = order();
    set(&mut e, "event", json!("Page Scrolled"));
    assert_eq!(
        code(&run(&c, e, SubjectState::default(), "orders-only")),
        "event.name_not_allowed"
    );
}

#[test]
fn vendor_approval_is_checked_at_decision_time() {
    let c = example();
    let prepared = PreparedEvent::new(order(), &c.policy);
    let consent = ConsentContext::from_event(
        prepared.value(),
        &c.policy.consent_fields,
        SubjectState::default(),
    );
    let later = date!(2028 - 01 - 01);
    let d = decide(&prepared, &consent, dest(&c, "meta-capi"), later);
    assert_eq!(code(&d), "vendor.assessment_expired");
    let mut disabled = dest(&c, "meta-capi").clone();
    disabled.enabled = false;
    assert_eq!(
        code(&decide(&prepared, &consent, &disabled, TODAY)),
        "destination.disabled"
    );
    let mut no_dpa = dest(&c, "meta-capi").clone();
    no_dpa.vendor.dpa_signed = None;
    assert_eq!(
        code(&decide(&prepared, &consent, &no_dpa, TODAY)),
        "vendor.no_dpa"
    );
}

#[test]
fn residency_needs_a_transfer_mechanism_for_protected_subjects() {
    let c = example();
    let mut crm = dest(&c, "crm-webhook").clone();
    crm.vendor.transfer_mechanism = model::TransferMechanism::None;
    let run_on = |e: Value, d: &Destination| {
        let prepared = PreparedEvent::new(e, &c.policy);
        let consent = ConsentContext::from_event(
            prepared.value(),
            &c.policy.consent_fields,
            SubjectState::default(),
        );
        decide(&prepared, &consent, d, TODAY)
    };
    let mut e = order();
    assert!(
        run_on(e.clone(), &crm).is_send(),
        "a US subject to a US vendor needs nothing"
    );
    set(&mut e, "context.location.country", json!("de"));
    assert_eq!(
        code(&run_on(e.clone(), &crm)),
        "residency.no_transfer_mechanism"
    );
    unset(&mut e, "context.location");
    assert_eq!(
        code(&run_on(e.clone(), &crm)),
        "residency.no_transfer_mechanism",
        "unknown region is treated as protected"
    );
    crm.allowed_regions = Some(vec!["EEA".into()]);
    assert_eq!(code(&run_on(e.clone(), &crm)), "residency.region_unknown");
    set(&mut e, "context.location.country", json!("US"));
    assert_eq!(
        code(&run_on(e.clone(), &crm)),
        "residency.region_not_allowed"
    );
    crm.vendor.transfer_mechanism = model::TransferMechanism::Scc;
    set(&mut e, "context.location.country", json!("FR"));
    assert!(run_on(e, &crm).is_send());
}

#[test]
fn pii_in_free_text_is_redacted_blocked_or_reported() {
    let c = example();
    let mut e = order();
    set(
        &mut e,
        "properties.message",
        json!("my card is 4111 1111 1111 1111, mail jane@example.org"),
    );
    let d = run(&c, e.clone(), SubjectState::default(), "crm-webhook");
    let p = &d.payload().unwrap().to_value();
    assert_eq!(
        p["properties"]["message"],
        "my card is [redacted:card], mail [redacted:email]"
    );
    assert_eq!(d.reasons[0].code, "pii.redacted");
    // Expected identifiers are not scanned: the CRM is meant to get the e-mail.
    assert_eq!(p["context"]["traits"]["email"], " John_Smith@gmail.com ");
    // Meta blocks instead; hashed fields are never mistaken for PII.
    set(
        &mut e,
        "properties.order_id",
        json!("call +44 20 7946 0958"),
    );
    let d = run(&c, e, SubjectState::default(), "meta-capi");
    assert_eq!(code(&d), "pii.found");
    assert_eq!(
        d.pii,
        vec![PiiHit {
            path: "properties.order_id".into(),
            kind: "phone"
        }]
    );
    assert!(
        run(&c, order(), SubjectState::default(), "meta-capi")
            .pii
            .is_empty()
    );
}

#[test]
fn hmac_pseudonyms_differ_per_destination_and_ips_are_truncated() {
    let key2 = "other-key-0123456789abcdef0123456789abcdef";
    let c = with(&format!(
        r#"
[[destinations]]
id = "ga4-copy"
vendor = "google"
connector = "ga4"
purposes = ["analytics"]
legal_basis = "contract"
event_types = ["track"]
allow = ["userId"]
transforms = [{{ op = "hmac", field = "userId" }}]
pseudonymisation_key = "{key2}"
"#
    ))
    .unwrap();
    let a = run(&c, order(), SubjectState::default(), "ga4");
    let b = run(&c, order(), SubjectState::default(), "ga4-copy");
    let (a, b) = (
        a.payload().unwrap().to_value(),
        b.payload().unwrap().to_value(),
    );
    assert_eq!(
        a["userId"],
        transform::hmac_hex(b"ga4-key-0123456789abcdef0123456789abcdef", "user-42")
    );
    assert_ne!(a["userId"], b["userId"]);
    assert_eq!(a["context"]["ip"], "203.0.113.0");
}

#[test]
fn unusable_values_are_dropped_and_reported() {
    let c = example();
    let mut e = order();
    set(&mut e, "context.traits.email", json!("not an e-mail"));
    let d = run(&c, e, SubjectState::default(), "meta-capi");
    assert!(
        d.payload().unwrap().to_value()["context"]["traits"]
            .get("email")
            .is_none()
    );
    assert!(d.dropped.contains("context.traits.email"));
    assert_eq!(d.reasons[0].code, "transform.invalid_value");
}

#[test]
fn validation_refuses_unsafe_or_meaningless_destinations() {
    let base = r#"
[[destinations]]
id = "x"
vendor = "helpdesk"
connector = "webhook"
purposes = ["support"]
legal_basis = "contract"
event_types = ["track"]
allow = ["properties.email"]
"#;
    let cases: &[(&str, &str, &str)] = &[
        (
            "legal_basis = \"contract\"",
            "legal_basis = \"consent\"",
            "config.destination.consent.missing",
        ),
        (
            "allow = [\"properties.email\"]",
            "allow = [\"properties.email\"]\ntransforms = [{ op = \"drop\", field = \"properties.email\" }]",
            "config.destination.transform.drops_allowed",
        ),
        (
            "allow = [\"properties.email\"]",
            "allow = [\"properties.email\"]\ntransforms = [{ op = \"hash\", field = \"traits.email\", normalize = \"email\" }]",
            "config.destination.transform.not_allowed",
        ),
        (
            "allow = [\"properties.email\"]",
            "allow = [\"properties.email\"]\ntransforms = [{ op = \"hmac\", field = \"properties.email\" }]",
            "config.destination.key.missing",
        ),
        (
            "allow = [\"properties.email\"]",
            "allow = [\"properties.email\"]\ntransforms = [{ op = \"hash\", field = \"properties.email\", normalize = \"emial\" }]",
            "config.destination.transform.invalid",
        ),
        (
            "id = \"x\"",
            "id = \"ga4\"",
            "config.destination.id.duplicate",
        ),
        (
            "vendor = \"helpdesk\"",
            "vendor = \"nobody\"",
            "config.destination.vendor.unknown",
        ),
        (
            "event_types = [\"track\"]",
            "event_types = [\"purchase\"]",
            "config.destination.event_types.invalid",
        ),
        (
            "connector = \"webhook\"",
            "connector = \"webhook\"\nsurprise = 1",
            "config.destination.invalid",
        ),
        (
            "allow = [\"properties.email\"]",
            "allow = [\"properties..email\"]",
            "config.destination.allow.invalid",
        ),
    ];
    for (from, to, expected) in cases {
        let text = base.replace(from, to);
        let errors = with(&text).expect_err(to);
        assert!(
            errors.iter().any(|(_, c)| c == expected),
            "{to}: {errors:?}"
        );
    }
    assert!(with(base).is_ok());
}

#[test]
fn validation_refuses_unapproved_vendors() {
    let no_dpa = r#"
[[vendors]]
id = "shady"
legal_name = "Shady Ads Ltd"
country = "US"
risk_tier = "high"
transfer_mechanism = "none"
last_assessment = 2026-11-01

[[destinations]]
id = "shady-ads"
vendor = "shady"
connector = "webhook"
purposes = ["advertising"]
legal_basis = "consent"
consent = { categories = ["advertising"] }
event_types = ["track"]
allow = ["event"]
"#;
    let errors = with(no_dpa).unwrap_err();
    assert_eq!(
        errors,
        vec![(
            "destinations[4].vendor".into(),
            "config.destination.vendor.no_dpa"
        )]
    );
    let old = no_dpa
        .replace("risk_tier", "dpa_signed = 2020-01-01\nrisk_tier")
        .replace("2026-11-01", "2024-01-01");
    assert_eq!(
        with(&old).unwrap_err(),
        vec![(
            "destinations[4].vendor".into(),
            "config.destination.vendor.assessment_expired"
        )]
    );
    // A disabled destination may stay declared while its paperwork is done.
    assert!(with(&no_dpa.replace("connector =", "enabled = false\nconnector =")).is_ok());
    let dup = with("[[vendors]]\nid = \"meta\"\nlegal_name = \"x\"\ncountry = \"usa\"\nrisk_tier = \"low\"\ntransfer_mechanism = \"none\"\nsmell = 1").unwrap_err();
    assert_eq!(
        dup,
        vec![("vendors[4].smell".into(), "config.vendor.invalid")]
    );
    let dup = with("[[vendors]]\nid = \"meta\"\nlegal_name = \"x\"\ncountry = \"usa\"\nrisk_tier = \"low\"\ntransfer_mechanism = \"none\"").unwrap_err();
    assert_eq!(
        dup,
        vec![
            ("vendors[4].id".into(), "config.vendor.id.duplicate"),
            ("vendors[4].country".into(), "config.vendor.country.invalid")
        ]
    );
}

#[test]
fn two_destinations_may_not_share_a_pseudonymisation_key() {
    let errors = with(
        r#"
[[destinations]]
id = "ga4-copy"
vendor = "google"
connector = "ga4"
purposes = ["analytics"]
legal_basis = "contract"
event_types = ["track"]
allow = ["userId"]
transforms = [{ op = "hmac", field = "userId" }]
pseudonymisation_key = "ga4-key-0123456789abcdef0123456789abcdef"
"#,
    )
    .unwrap_err();
    assert_eq!(
        errors,
        vec![(
            "destinations[4].pseudonymisation_key".into(),
            "config.destination.key.shared"
        )]
    );
}

// ---- properties ----

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|n| json!(n)),
        "[a-z0-9@. +-]{0,12}".prop_map(Value::String),
    ]
}

pub(crate) fn json_tree() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[abc]", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every concrete path of a value (arrays written `[]`), leaves only.
fn leaf_paths(v: &Value, at: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                let p = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                leaf_paths(c, &p, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for c in items {
                leaf_paths(c, &format!("{at}[]"), out);
            }
        }
        _ => out.push(at.to_owned()),
    }
}

proptest! {
    /// Nothing outside the allowlist (or the envelope) ever reaches a payload, and the
    /// one-pass writer keeps exactly what the plain `Value` minimiser keeps.
    #[test]
    fn payload_paths_stay_inside_the_allowlist(
        event in prop::collection::btree_map("[abc]|messageId", json_tree(), 0..5),
        allow in prop::collection::vec("[abc*](\\.[abc*]){0,2}", 0..4),
    ) {
        let allow: Vec<FieldPath> = allow.iter().map(|a| FieldPath::parse(a).unwrap()).collect();
        let mut event = Value::Object(event.into_iter().collect());
        event["type"] = json!("track");
        let c = example();
        let mut d = dest(&c, "crm-webhook").clone();
        d.event_types = vec![MessageKind::Track];
        d.event_names = None;
        d.pii = model::PiiAction::Alert;
        d.transforms = Vec::new();
        d.compiled = payload::Compiled::new(&allow, &[]);
        d.allow = allow.clone();
        let prepared = PreparedEvent::new(event.clone(), &c.policy);
        let decision = decide(&prepared, &ConsentContext::default(), &d, TODAY);
        let out = decision.payload().expect("legitimate interest, no transforms: sent").to_value();
        let mut leaves = Vec::new();
        leaf_paths(&out, "", &mut leaves);
        for leaf in leaves.iter().filter(|l| !l.is_empty()) {
            let top = leaf.split(['.', '[']).next().unwrap();
            if ENVELOPE_KEYS.contains(&top) { continue; }
            let plain = FieldPath::parse(&leaf.replace("[]", "")).unwrap();
            prop_assert!(allow.iter().any(|a| plain.is_covered_by(a)), "{leaf} escaped {allow:?}");
        }
        let (reference, dropped) = paths::Allowlist::new(&allow).apply(&event, ENVELOPE_KEYS);
        prop_assert_eq!(out, reference);
        prop_assert_eq!(decision.dropped.to_vec(), dropped);
    }

    /// Malformed consent never yields consent: with a TC string that does not decode, every
    /// destination with a TCF vendor id blocks even when the categories grant everything; with
    /// unreadable categories too, every consent-based destination blocks.
    #[test]
    fn malformed_consent_never_consents(
        garbage in "[A-Za-z0-9_.-]{1,60}",
        cut in 0usize..200,
        flip in 0usize..200,
        which in 0u8..3,
        cats in json_tree().prop_filter("unreadable", |v| crate::consent::Categories::from_json(v).is_err()),
    ) {
        // Garbage, or a string that granted everything, truncated or with one character changed:
        // most of those still get far into the decoder before they fail.
        let valid = tc_string(&[1, 7, 8, 9], &[755], &[]);
        let tc = match which {
            0 => garbage,
            1 => valid[..cut.min(valid.len())].to_owned(),
            _ => {
                let mut b = valid.into_bytes();
                let i = flip % b.len();
                b[i] = if b[i] == b'A' { b'_' } else { b'A' };
                String::from_utf8(b).unwrap()
            }
        };
        prop_assume!(crate::consent::tcf::decode(&tc).is_err());
        let c = example();
        let granted = json!({"Advertising": true, "Analytics": true});
        for (categories, all_consent_based) in [(granted, false), (cats, true)] {
            let mut e = order();
            set(&mut e, "context.consent", json!({"tcf": tc, "categoryPreferences": categories}));
            let prepared = PreparedEvent::new(e, &c.policy);
            let consent = ConsentContext::from_event(prepared.value(), &c.policy.consent_fields, SubjectState::default());
            for d in c.destinations.iter().filter(|d| d.legal_basis == model::LegalBasis::Consent) {
                let decision = decide(&prepared, &consent, d, TODAY);
                if all_consent_based || d.consent.tcf_vendor_id.is_some() {
                    prop_assert!(!decision.is_send(), "{} sent on {consent:?}", d.id);
                    prop_assert!(decision.payload().is_none() && !decision.reasons.is_empty());
                }
            }
        }
    }

    /// Hashing is stable and normalisation makes equivalent inputs equal.
    #[test]
    fn hashing_is_stable(local in "[a-z0-9]{1,10}", pad in " {0,3}") {
        let a = transform::Normalize::Email.apply(&format!("{pad}{}@Example.COM{pad}", local.to_uppercase()), None).unwrap();
        let b = transform::Normalize::Email.apply(&format!("{local}@example.com"), None).unwrap();
        prop_assert_eq!(transform::sha256_hex(&a), transform::sha256_hex(&b));
    }
}

// ---- findings of the security review ----

fn crm_with(event_extra: Value) -> Decision {
    let c = example();
    let mut e = order();
    for (k, v) in event_extra.as_object().unwrap() {
        set(&mut e, k, v.clone());
    }
    run(&c, e, SubjectState::default(), "crm-webhook")
}

#[test]
fn pii_in_keys_numbers_and_message_ids_is_caught() {
    let c = example();
    let mut e = order();
    e["properties"]["jane@example.com"] = json!(true);
    set(&mut e, "properties.card", json!(4111111111111111u64));
    set(&mut e, "messageId", json!("jane.doe@example.com-1"));
    // ga4 allows properties.* and redacts.
    let d = run(&c, e, SubjectState::default(), "ga4");
    let text = d.payload().unwrap().as_str().to_owned();
    assert!(
        !text.contains("jane@example.com") && !text.contains("jane.doe@example.com"),
        "{text}"
    );
    assert!(!text.contains("4111111111111111"), "{text}");
    let p = d.payload().unwrap().to_value();
    assert_eq!(p["properties"]["card"], "[redacted:card]");
    assert_eq!(p["messageId"], "[redacted:email]-1");
    // The dropped key is listed without the address in it.
    assert!(
        d.dropped.contains("properties.[redacted:email]"),
        "{:?}",
        d.dropped
    );
    assert!(
        d.pii
            .iter()
            .any(|h| h.path == "properties.card" && h.kind == "card")
    );
}

#[test]
fn expected_pii_fields_take_one_identifier_and_nothing_else() {
    // crm-webhook expects context.traits.email: one address is fine...
    let d = crm_with(json!({"context.traits.email": "jane@example.org"}));
    assert!(d.pii.is_empty());
    // ...but an address with an SSN beside it is scanned like any other field.
    let d = crm_with(json!({"context.traits.email": "jane@example.org, SSN 078-05-1120"}));
    let p = d.payload().unwrap().to_value();
    assert_eq!(
        p["context"]["traits"]["email"],
        "[redacted:email], SSN [redacted:ssn]"
    );
    // And an object under an expected path is not exempt as a whole.
    let c = example();
    let mut e = order();
    set(&mut e, "type", json!("identify"));
    set(
        &mut e,
        "traits",
        json!({"email": "a@b.co", "address": {"line1": "card 4111 1111 1111 1111"}}),
    );
    let d = run(&c, e, SubjectState::default(), "stripe");
    assert_eq!(
        code(&d),
        "pii.found",
        "stripe blocks: traits.* covers traits.address, not what is inside it"
    );
}

#[test]
fn categories_that_differ_only_in_case_cannot_grant_a_refusal() {
    let c = example();
    let mut e = order();
    set(
        &mut e,
        "context.consent.categoryPreferences",
        json!({"Advertising": false, "advertising": true}),
    );
    assert_eq!(
        code(&run(&c, e, SubjectState::default(), "meta-capi")),
        "consent.denied"
    );
}

#[test]
fn unrecognised_regions_are_treated_as_protected() {
    let c = example();
    let mut crm = dest(&c, "crm-webhook").clone();
    crm.vendor.transfer_mechanism = model::TransferMechanism::None;
    for region in ["UK", "EL", "XX", "EU", "de"] {
        let mut e = order();
        set(&mut e, "context.location.country", json!(region));
        let prepared = PreparedEvent::new(e, &c.policy);
        let consent = ConsentContext::from_event(
            prepared.value(),
            &c.policy.consent_fields,
            SubjectState::default(),
        );
        assert_eq!(
            code(&decide(&prepared, &consent, &crm, TODAY)),
            "residency.no_transfer_mechanism",
            "{region}"
        );
    }
}

#[test]
fn legitimate_interest_and_tcf_rules() {
    let li = r#"
[[destinations]]
id = "li-tcf"
vendor = "helpdesk"
connector = "webhook"
purposes = ["analytics"]
legal_basis = "legitimate_interest"
consent = { tcf_vendor_id = 10, tcf_purposes = [7] }
event_types = ["track"]
allow = ["event"]
"#;
    let c = with(li).unwrap();
    let mut e = order();
    // Vendor 10 has legitimate interest in the helper's strings, and purpose 7 is LI-disclosed.
    set(
        &mut e,
        "context.consent.tcf",
        json!(tc_string(&[], &[], &[])),
    );
    assert!(run(&c, e.clone(), SubjectState::default(), "li-tcf").is_send());
    set(&mut e, "context.consent.tcf", json!("garbage"));
    assert_eq!(
        code(&run(&c, e, SubjectState::default(), "li-tcf")),
        "tcf.malformed"
    );

    // TCF v2.2: purposes 3-6 may not rest on legitimate interest.
    let bad = with(&li.replace("tcf_purposes = [7]", "tcf_purposes = [4]")).unwrap_err();
    assert!(
        bad.iter()
            .any(|(_, code)| *code == "config.destination.consent.tcf_purposes"),
        "{bad:?}"
    );

    // A consent destination is not switched to legitimate interest by a publisher restriction.
    let c = example();
    let mut e = order();
    set(
        &mut e,
        "context.consent.tcf",
        json!(tc_string(&[1, 7, 8, 9], &[755], &[(7, 2, 755)])),
    );
    assert_eq!(
        code(&run(&c, e, SubjectState::default(), "ga4")),
        "tcf.publisher_restricted"
    );
}

#[test]
fn consent_settings_a_basis_never_reads_are_refused() {
    let contract = r#"
[[destinations]]
id = "x"
vendor = "helpdesk"
connector = "webhook"
purposes = ["support"]
legal_basis = "contract"
consent = { categories = ["advertising"] }
event_types = ["track"]
allow = ["event"]
"#;
    let errors = with(contract).unwrap_err();
    assert_eq!(
        errors,
        vec![(
            "destinations[4].consent".into(),
            "config.destination.consent.unused"
        )]
    );
    let ads = contract
        .replace(
            "consent = { categories = [\"advertising\"] }",
            "sale_or_sharing = false",
        )
        .replace("purposes = [\"support\"]", "purposes = [\"advertising\"]");
    let errors = with(&ads).unwrap_err();
    assert_eq!(
        errors,
        vec![(
            "destinations[4].sale_or_sharing".into(),
            "config.destination.sale_or_sharing.advertising"
        )]
    );
}

#[test]
fn values_hashed_on_the_device_are_kept() {
    let c = example();
    let mut e = order();
    let digest = "62A14E44F765419D10FEA99367361A727C12365E2520F32218D505ED9AA0F62F";
    set(&mut e, "context.traits.email", json!(digest));
    let d = run(&c, e, SubjectState::default(), "meta-capi");
    assert_eq!(
        d.payload().unwrap().to_value()["context"]["traits"]["email"],
        digest.to_ascii_lowercase()
    );
}

#[test]
fn erasure_names_the_person_as_each_destination_sent_them() {
    let c = example();
    // GA4 received an HMAC of the user id, never the id itself: it must be asked to delete that.
    let (user, anon, email) = identifiers_as_sent(
        dest(&c, "ga4"),
        &c.policy,
        Some("user-42"),
        Some("anon-1"),
        Some("jane@example.com"),
    );
    assert_eq!(
        user.as_deref(),
        Some(transform::hmac_hex(b"ga4-key-0123456789abcdef0123456789abcdef", "user-42").as_str())
    );
    assert_eq!(anon.as_deref(), Some("anon-1"));
    assert_eq!(email, None, "GA4 is not sent e-mail addresses");
    // Stripe gets them as they are.
    let (user, _, email) = identifiers_as_sent(
        dest(&c, "stripe"),
        &c.policy,
        Some("user-42"),
        None,
        Some("jane@example.com"),
    );
    assert_eq!(
        (user.as_deref(), email.as_deref()),
        (Some("user-42"), Some("jane@example.com"))
    );
}
