//! Consent signals, read from what travels with an event and from what is stored for its subject.
//!
//! Every source keeps "absent" and "malformed" apart from "present", because the policy treats
//! absence and malformation alike as *no consent*, but reports them with different reasons.

pub mod batch;
pub mod tcf;

use std::collections::BTreeMap;

use serde_json::Value;

pub use tcf::{TcString, TcfError};

/// Where in an event the consent signals are read. Defaults match what Segment's consent
/// feature and common CMP integrations send; `[policy]` in the config can point elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentFields {
    pub tcf: String,
    pub us_privacy: String,
    pub categories: String,
    pub gpc: String,
}

pub const DEFAULT_TCF_FIELD: &str = "context.consent.tcf";
pub const DEFAULT_US_PRIVACY_FIELD: &str = "context.consent.usPrivacy";
pub const DEFAULT_CATEGORIES_FIELD: &str = "context.consent.categoryPreferences";
/// Ingest writes `Sec-GPC: 1` here when the event itself does not say.
pub const DEFAULT_GPC_FIELD: &str = "context.gpc";

impl Default for ConsentFields {
    fn default() -> Self {
        ConsentFields {
            tcf: DEFAULT_TCF_FIELD.into(),
            us_privacy: DEFAULT_US_PRIVACY_FIELD.into(),
            categories: DEFAULT_CATEGORIES_FIELD.into(),
            gpc: DEFAULT_GPC_FIELD.into(),
        }
    }
}

/// A signal that was absent, present and understood, or present and malformed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Signal<T> {
    #[default]
    Absent,
    Present(T),
    Malformed(String),
}

impl<T> Signal<T> {
    pub fn is_present(&self) -> bool {
        !matches!(self, Signal::Absent)
    }
}

/// An IAB US Privacy string (`1YNN`): version, notice given, opted out of sale, LSPA covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsPrivacy {
    pub notice: Option<bool>,
    pub opt_out_sale: Option<bool>,
    pub lspa_covered: Option<bool>,
}

impl UsPrivacy {
    /// Parses the four-character string; `-` means "not applicable".
    pub fn parse(s: &str) -> Result<UsPrivacy, String> {
        let b = s.as_bytes();
        if b.len() != 4 {
            return Err(format!("{s:?} is not 4 characters"));
        }
        if b[0] != b'1' {
            return Err(format!("version {:?} is not 1", b[0] as char));
        }
        let flag = |c: u8| match c {
            b'Y' | b'y' => Ok(Some(true)),
            b'N' | b'n' => Ok(Some(false)),
            b'-' => Ok(None),
            other => Err(format!("{:?} is not Y, N or -", other as char)),
        };
        Ok(UsPrivacy {
            notice: flag(b[1])?,
            opt_out_sale: flag(b[2])?,
            lspa_covered: flag(b[3])?,
        })
    }
}

/// Consent categories as `{"Advertising": true, "Analytics": false}`. Names are compared without
/// regard to ASCII case, so `advertising` in the config matches a CMP's `Advertising`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Categories(BTreeMap<String, bool>);

impl Categories {
    pub fn from_json(v: &Value) -> Result<Categories, String> {
        let Value::Object(map) = v else {
            return Err("is not an object of category names to true/false".into());
        };
        let mut out = BTreeMap::new();
        for (k, v) in map {
            let Value::Bool(b) = v else {
                return Err(format!("category {k:?} is not true or false"));
            };
            // Names differing only in case are one category: a refusal under any spelling wins.
            out.entry(k.to_ascii_lowercase())
                .and_modify(|granted: &mut bool| *granted &= *b)
                .or_insert(*b);
        }
        Ok(Categories(out))
    }

    /// `Some(granted)` when the category is listed, `None` when it is not.
    pub fn get(&self, category: &str) -> Option<bool> {
        self.0.get(&category.to_ascii_lowercase()).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, bool)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

/// Preferences stored for a subject: set by an `identify` call carrying
/// `traits.consent.categoryPreferences` / `traits.consent.optOut`, by an operator, or by a
/// data-subject request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredPreferences {
    pub categories: Categories,
    /// The subject opted out of sale and sharing (a DSR `opt_out`, or `traits.consent.optOut`).
    pub opt_out_of_sale: bool,
}

/// What one `identify` (or API call) says about a subject's preferences. Only what it says
/// changes: a later call without `optOut` does not undo an opt-out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PreferenceUpdate {
    pub categories: Option<Categories>,
    pub opt_out_of_sale: Option<bool>,
}

impl StoredPreferences {
    /// The stored form: `{"categories": {...}, "opt_out_of_sale": bool}`.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "categories": self.categories.0,
            "opt_out_of_sale": self.opt_out_of_sale,
        })
        .to_string()
    }

    /// Reads [`StoredPreferences::to_json`]'s form; `None` when it is not that.
    pub fn from_json(text: &str) -> Option<StoredPreferences> {
        let v: Value = serde_json::from_str(text).ok()?;
        Some(StoredPreferences {
            categories: Categories::from_json(v.get("categories")?).ok()?,
            opt_out_of_sale: v.get("opt_out_of_sale")?.as_bool()?,
        })
    }

    /// The preferences after `update`: categories it names replace the stored ones one by one;
    /// the opt-out changes only when the update says `optOut` explicitly.
    pub fn apply(&self, update: &PreferenceUpdate) -> StoredPreferences {
        let mut next = self.clone();
        if let Some(c) = &update.categories {
            for (name, granted) in c.iter() {
                next.categories.0.insert(name.to_owned(), granted);
            }
        }
        if let Some(o) = update.opt_out_of_sale {
            next.opt_out_of_sale = o;
        }
        next
    }
}

impl PreferenceUpdate {
    /// What an `identify` event asks to store, if anything.
    pub fn from_identify(event: &Value) -> Option<Result<PreferenceUpdate, String>> {
        let consent = event.get("traits")?.get("consent")?;
        let categories = match consent.get("categoryPreferences") {
            None => None,
            Some(v) => match Categories::from_json(v) {
                Ok(c) => Some(c),
                Err(e) => return Some(Err(format!("traits.consent.categoryPreferences {e}"))),
            },
        };
        let opt_out_of_sale = match consent.get("optOut") {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => return Some(Err("traits.consent.optOut is not true or false".into())),
        };
        Some(Ok(PreferenceUpdate {
            categories,
            opt_out_of_sale,
        }))
    }
}

/// What Handoff knows about the subject of an event, from its own state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubjectState {
    /// An erasure request suppressed this subject.
    pub suppressed: bool,
    pub preferences: Option<StoredPreferences>,
}

/// Every consent signal for one event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsentContext {
    pub tcf: Signal<TcString>,
    pub us_privacy: Signal<UsPrivacy>,
    pub categories: Signal<Categories>,
    /// Global Privacy Control: `Sec-GPC: 1` or `context.gpc: true`.
    pub gpc: bool,
    pub subject: SubjectState,
}

/// Reads a dotted path (`context.consent.tcf`) from a JSON value.
pub fn get_path<'v>(v: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(v, |v, key| v.get(key))
}

impl ConsentContext {
    /// Reads every consent signal carried by `event`.
    pub fn from_event(event: &Value, fields: &ConsentFields, subject: SubjectState) -> Self {
        let tcf = match get_path(event, &fields.tcf) {
            None | Some(Value::Null) => Signal::Absent,
            Some(Value::String(s)) => match tcf::decode(s) {
                Ok(tc) => Signal::Present(tc),
                Err(e) => Signal::Malformed(e.to_string()),
            },
            Some(_) => Signal::Malformed("the TC string is not a string".into()),
        };
        let us_privacy = match get_path(event, &fields.us_privacy) {
            None | Some(Value::Null) => Signal::Absent,
            Some(Value::String(s)) => match UsPrivacy::parse(s) {
                Ok(u) => Signal::Present(u),
                Err(e) => Signal::Malformed(e),
            },
            Some(_) => Signal::Malformed("the US Privacy string is not a string".into()),
        };
        let categories = match get_path(event, &fields.categories) {
            None | Some(Value::Null) => Signal::Absent,
            Some(v) => match Categories::from_json(v) {
                Ok(c) => Signal::Present(c),
                Err(e) => Signal::Malformed(e),
            },
        };
        // GPC is an opt-out: anything that is not clearly "off" counts as on. Ingest records
        // `Sec-GPC: 1` in `context.gpc`, which counts whatever field is configured.
        let on = |path: &str| match get_path(event, path) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::String(s)) => s != "0" && !s.eq_ignore_ascii_case("false"),
            Some(Value::Number(n)) => n.as_f64() != Some(0.0),
            Some(_) => true,
        };
        let gpc = on(&fields.gpc) || on(DEFAULT_GPC_FIELD);
        ConsentContext {
            tcf,
            us_privacy,
            categories,
            gpc,
            subject,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn us_privacy_strings() {
        let u = UsPrivacy::parse("1YYN").unwrap();
        assert_eq!(u.opt_out_sale, Some(true));
        assert_eq!(UsPrivacy::parse("1---").unwrap().opt_out_sale, None);
        assert!(UsPrivacy::parse("2YNN").is_err());
        assert!(UsPrivacy::parse("1YN").is_err());
        assert!(UsPrivacy::parse("1YXN").is_err());
    }

    #[test]
    fn reads_signals_from_the_event() {
        let event = json!({"context": {"gpc": true, "consent": {
            "usPrivacy": "1YNN",
            "categoryPreferences": {"Advertising": false, "Analytics": true},
            "tcf": "not-a-tc-string"
        }}});
        let c =
            ConsentContext::from_event(&event, &ConsentFields::default(), SubjectState::default());
        assert!(c.gpc);
        assert!(matches!(c.tcf, Signal::Malformed(_)));
        let Signal::Present(cats) = &c.categories else {
            panic!("{:?}", c.categories)
        };
        assert_eq!(cats.get("advertising"), Some(false));
        assert_eq!(cats.get("ANALYTICS"), Some(true));
        assert_eq!(cats.get("functional"), None);
        assert_eq!(
            c.us_privacy,
            Signal::Present(UsPrivacy::parse("1YNN").unwrap())
        );

        let none = ConsentContext::from_event(
            &json!({}),
            &ConsentFields::default(),
            SubjectState::default(),
        );
        assert!(!none.gpc && !none.tcf.is_present() && !none.categories.is_present());
        let bad =
            json!({"context": {"gpc": "1", "consent": {"categoryPreferences": {"ads": "yes"}}}});
        let bad =
            ConsentContext::from_event(&bad, &ConsentFields::default(), SubjectState::default());
        assert!(bad.gpc);
        assert!(matches!(bad.categories, Signal::Malformed(_)));
    }

    #[test]
    fn identify_traits_update_stored_preferences() {
        let e = json!({"traits": {"consent": {"categoryPreferences": {"Analytics": true}, "optOut": true}}});
        let u = PreferenceUpdate::from_identify(&e).unwrap().unwrap();
        let p = StoredPreferences::default().apply(&u);
        assert_eq!(StoredPreferences::from_json(&p.to_json()), Some(p.clone()));
        assert_eq!(StoredPreferences::from_json("{}"), None);
        assert!(p.opt_out_of_sale);
        assert_eq!(p.categories.get("analytics"), Some(true));
        // A later identify that does not mention the opt-out leaves it in place.
        let later = json!({"traits": {"consent": {"categoryPreferences": {"Advertising": true}}}});
        let p = p.apply(&PreferenceUpdate::from_identify(&later).unwrap().unwrap());
        assert!(p.opt_out_of_sale);
        assert_eq!(
            (
                p.categories.get("analytics"),
                p.categories.get("advertising")
            ),
            (Some(true), Some(true))
        );
        let back_in = json!({"traits": {"consent": {"optOut": false}}});
        assert!(
            !p.apply(&PreferenceUpdate::from_identify(&back_in).unwrap().unwrap())
                .opt_out_of_sale
        );
        assert!(PreferenceUpdate::from_identify(&json!({"traits": {}})).is_none());
        assert!(
            PreferenceUpdate::from_identify(&json!({"traits": {"consent": {"optOut": 1}}}))
                .unwrap()
                .is_err()
        );
    }

    #[test]
    fn a_refusal_under_any_spelling_wins() {
        let c = Categories::from_json(&json!({"Advertising": false, "advertising": true})).unwrap();
        assert_eq!(c.get("advertising"), Some(false));
        let c = Categories::from_json(&json!({"ADVERTISING": true, "advertising": false})).unwrap();
        assert_eq!(c.get("Advertising"), Some(false));
    }

    #[test]
    fn sec_gpc_counts_whatever_gpc_field_is_configured() {
        let fields = ConsentFields {
            gpc: "properties.gpc".into(),
            ..ConsentFields::default()
        };
        let from_header = json!({"context": {"gpc": true}});
        assert!(ConsentContext::from_event(&from_header, &fields, SubjectState::default()).gpc);
        let from_field = json!({"properties": {"gpc": "1"}});
        assert!(ConsentContext::from_event(&from_field, &fields, SubjectState::default()).gpc);
        assert!(!ConsentContext::from_event(&json!({}), &fields, SubjectState::default()).gpc);
    }
}
