//! The policy engine's cost: a typical event decided for 10 destinations (the target is at most
//! 2 µs per event per destination), and its parts: TC string decoding and PII scanning, the
//! latter against the obvious alternative of one regex per kind.
//!
//! Run: `cargo bench -p handoff-core --bench policy` (or `benches/run.sh policy`).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::Value;
use time::macros::date;

use handoff_core::config::Config;
use handoff_core::consent::{ConsentContext, SubjectState};
use handoff_core::policy::{PreparedEvent, decide, pii};

/// The allocator the gateway runs with (see crates/handoff/src/main.rs), so the figures match.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXAMPLE: &str = include_str!("../../../handoff.example.toml");

/// The example's four destinations plus six more of the usual kinds: 10 in all.
fn config() -> Config {
    let mut text = EXAMPLE.to_owned();
    for i in 0..6 {
        let (basis, consent, transforms) = match i % 3 {
            0 => (
                "consent",
                "consent = { categories = [\"analytics\"] }",
                "transforms = [{ op = \"truncate_ip\", field = \"context.ip\" }]",
            ),
            1 => (
                "legitimate_interest",
                "",
                "transforms = [{ op = \"hash\", field = \"context.traits.email\", normalize = \"email\" }]",
            ),
            _ => (
                "consent",
                "consent = { categories = [\"advertising\"], tcf_vendor_id = 42, tcf_purposes = [1, 3, 4] }",
                "",
            ),
        };
        text.push_str(&format!(
            r#"
[[destinations]]
id = "extra-{i}"
vendor = "helpdesk"
connector = "webhook"
purposes = ["analytics"]
legal_basis = "{basis}"
{consent}
event_types = ["track", "page", "identify"]
allow = ["event", "userId", "anonymousId", "properties.*", "context.ip", "context.page.url", "context.traits.email"]
{transforms}
"#
        ));
    }
    let env = |name: &str| match name {
        "HANDOFF_GA4_PSEUDONYMISATION_KEY" => {
            Some("bench-key-0123456789abcdef0123456789abcdef".to_owned())
        }
        other => Some(format!("{other}-0123456789abcdef")),
    };
    let c =
        Config::from_toml_on(&text, &env, date!(2026 - 11 - 25)).expect("bench config is valid");
    assert_eq!(c.destinations.len(), 10);
    c
}

/// An `Order Completed` event as analytics.js sends it, after ingest normalisation.
const EVENT: &str = r#"{"type":"track","messageId":"ajs-next-1732532400000-6c0f1f1e","timestamp":"2026-11-25T10:00:00.000Z","receivedAt":"2026-11-25T10:00:00.120Z","event":"Order Completed","userId":"user-42","anonymousId":"7d1e4b2c-5f0a-4c1b-9a7e-2f3d4c5b6a79","properties":{"order_id":"ord-1001","value":64.5,"revenue":60.0,"currency":"EUR","coupon":"WINTER","products":[{"product_id":"sku-9","name":"Wool scarf","quantity":2,"price":32.25}],"message":"Please leave it with the neighbour if nobody answers"},"context":{"ip":"203.0.113.77","userAgent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36","library":{"name":"analytics.js","version":"next-1.70.0"},"locale":"de-DE","page":{"path":"/checkout","url":"https://shop.example/checkout","title":"Checkout","referrer":"https://shop.example/cart"},"location":{"country":"DE"},"traits":{"email":"John_Smith@gmail.com","phone":"+1 (650) 555-1212","firstName":"Mary","lastName":"Smith","address":{"city":"Berlin","postalCode":"10115","country":"DE"}},"consent":{"categoryPreferences":{"Advertising":true,"Analytics":true}}}}"#;

fn decisions(c: &mut Criterion) {
    let config = config();
    let today = date!(2026 - 11 - 25);
    let mut g = c.benchmark_group("policy");
    g.throughput(Throughput::Elements(config.destinations.len() as u64));
    g.bench_function("parse_only", |b| {
        b.iter(|| {
            let value: Value = serde_json::from_str(black_box(EVENT)).unwrap();
            let event = PreparedEvent::new(value, &config.policy);
            ConsentContext::from_event(
                event.value(),
                &config.policy.consent_fields,
                SubjectState::default(),
            )
        })
    });
    g.bench_function("parse_and_decide_10_destinations", |b| {
        b.iter(|| {
            let value: Value = serde_json::from_str(black_box(EVENT)).unwrap();
            let event = PreparedEvent::new(value, &config.policy);
            let consent = ConsentContext::from_event(
                event.value(),
                &config.policy.consent_fields,
                SubjectState::default(),
            );
            let mut sent = 0;
            for d in &config.destinations {
                sent += usize::from(decide(&event, &consent, d, today).is_send());
            }
            assert!(
                sent >= 6,
                "the bench event must be sent to most destinations: {sent}"
            );
            sent
        })
    });
    g.finish();
}

const TEXT: &str = "Hi, my order ord-1001 has not arrived. You can reach me at john.smith@example.org or +44 20 7946 0958; I paid with 4111 1111 1111 1111 on 2026-11-20.";
const CLEAN: &str = "Please leave the parcel with the neighbour at number 12 if nobody answers the door before 6pm.";

fn scanning(c: &mut Criterion) {
    let mut g = c.benchmark_group("pii");
    let regexes: Vec<regex::Regex> = [
        r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
        r"\+\d[\d .-]{7,18}\d",
        r"\b(?:\d[ -]?){12,18}\d\b",
        r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b",
        r"\b\d{3}-\d{2}-\d{4}\b",
    ]
    .iter()
    .map(|r| regex::Regex::new(r).unwrap())
    .collect();
    for (name, text) in [("with_pii", TEXT), ("clean", CLEAN)] {
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(format!("one_pass_{name}"), |b| {
            let mut found = Vec::new();
            b.iter(|| {
                found.clear();
                pii::scan(black_box(text), &mut found);
                found.len()
            })
        });
        // Matching only; the regexes would still need Luhn and mod-97 checks afterwards.
        g.bench_function(format!("five_regexes_{name}"), |b| {
            b.iter(|| {
                regexes
                    .iter()
                    .map(|r| r.find_iter(black_box(text)).count())
                    .sum::<usize>()
            })
        });
    }
    g.finish();
}

fn tcf(c: &mut Criterion) {
    // A real-world-sized string: ~80 vendors with consent, LI ranges, one publisher restriction.
    let tc = "CQuPXIAQuPXIA7-4t7ENCMEsAP_gAH7gAAYgJXu___7_7wAABCARgDBAgBAAIQAgAAABZAAAAAAAACCAAAgIAATAmCAQGEAYCJAAAAAgAQAIgCgAAAQBIIAAggQGIAACAmAAAACAAASBKBAgIEQJAADAJAgCUABETAwCyACxDAAAAgACAgAhKABtCEACAAEAAAQSBAAAhAAAgAACAYRgACEAQiAwDAAAEAAAEAAATIAgAQglU9__7___AAAEIBGAMECAEAAhACAAAAFgAAIAAAAAIAAACAgABMCYIBAIQBgIkAAAACEBAAiAKAAABAEigACCBAYgAAICYAAAAIAABIEoEAAgRAgAAIAkCALQAEBEBAJIALEcAAAAAAICACEoAGwIQAIAAQAABBIEAACAIAAAAAIBhGAAIQBKIDAMAAAQAAAQAAAMgCABABJAAQHxgAAA.bJQADigAAKAA";
    assert!(handoff_core::consent::tcf::decode(tc).is_ok());
    c.bench_function("tcf/decode_typical", |b| {
        b.iter(|| handoff_core::consent::tcf::decode(black_box(tc)).unwrap())
    });
}

criterion_group!(benches, decisions, scanning, tcf);
criterion_main!(benches);
