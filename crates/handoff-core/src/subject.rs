//! Subjects: the person behind events, known only by keyed hashes of their identifiers.
//!
//! An event names its subject by `userId`, `anonymousId`, an e-mail address in its traits, and
//! (for `alias`) a `previousId`. Each identifier is stored as HMAC-SHA-256 under a key of this
//! installation, never as the value: the subject store can link identifiers and answer "is this
//! person suppressed" without holding anything a breach of it would reveal. Pure: the store
//! keeps the links, this module says which identifiers an event carries and how they hash.

use serde_json::Value;

use crate::policy::transform::hmac_hex;

/// What kind of identifier a hash stands for (kept for reports, not part of the hash: a
/// `userId` that is an e-mail address links to the same person's `traits.email`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdKind {
    UserId,
    AnonymousId,
    Email,
}

impl IdKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdKind::UserId => "user_id",
            IdKind::AnonymousId => "anonymous_id",
            IdKind::Email => "email",
        }
    }

    pub fn parse(s: &str) -> Option<IdKind> {
        Some(match s {
            "user_id" => IdKind::UserId,
            "anonymous_id" => IdKind::AnonymousId,
            "email" => IdKind::Email,
            _ => return None,
        })
    }
}

/// One identifier of an event, as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identifier {
    pub kind: IdKind,
    pub value: String,
}

/// The key identifiers are hashed under (32 random bytes per installation).
#[derive(Clone)]
pub struct SubjectKey([u8; 32]);

impl std::fmt::Debug for SubjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubjectKey(..)")
    }
}

impl SubjectKey {
    pub fn new(key: [u8; 32]) -> Self {
        SubjectKey(key)
    }

    /// The stored form of an identifier: HMAC-SHA-256 of its normalised value, hex.
    pub fn hash(&self, id: &Identifier) -> String {
        hmac_hex(&self.0, &normalise(id.kind, &id.value))
    }
}

/// E-mail addresses compare case-insensitively and without surrounding blanks; other
/// identifiers are the application's own and compare exactly (blanks trimmed).
pub fn normalise(kind: IdKind, value: &str) -> String {
    match kind {
        IdKind::Email => value.trim().to_lowercase(),
        IdKind::UserId | IdKind::AnonymousId => value.trim().to_owned(),
    }
}

fn id_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Every identifier an event carries: `userId`, `anonymousId`, `traits.email` or
/// `context.traits.email`, and an alias's `previousId` (which Segment defines as a former
/// `userId` or `anonymousId`; both are linked, so it is recorded as a user id).
pub fn identifiers(event: &Value) -> Vec<Identifier> {
    let mut out = Vec::with_capacity(3);
    let mut push = |kind, v: Option<String>| {
        if let Some(value) = v
            && !out.iter().any(|i: &Identifier| i.value == value)
        {
            out.push(Identifier { kind, value });
        }
    };
    push(IdKind::UserId, id_text(event.get("userId")));
    push(IdKind::AnonymousId, id_text(event.get("anonymousId")));
    let email = event
        .get("traits")
        .and_then(|t| t.get("email"))
        .or_else(|| event.get("context")?.get("traits")?.get("email"));
    if let Some(e) = id_text(email).filter(|e| e.contains('@')) {
        push(IdKind::Email, Some(e));
    }
    if event.get("type").and_then(Value::as_str) == Some("alias") {
        push(IdKind::UserId, id_text(event.get("previousId")));
    }
    out
}

/// The data category a field belongs to, for the ledger and its reports (records of
/// processing speak of categories, breach notices of both categories and fields).
pub fn data_category(path: &str) -> &'static str {
    let leaf = path.rsplit('.').next().unwrap_or(path).to_ascii_lowercase();
    let p = path.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| leaf.contains(w));
    // The envelope of every message: what happened and when, nobody's attributes.
    const ENVELOPE: [&str; 9] = [
        "type",
        "event",
        "name",
        "timestamp",
        "sentat",
        "receivedat",
        "originaltimestamp",
        "messageid",
        "channel",
    ];
    if !path.contains('.') && ENVELOPE.contains(&leaf.as_str()) {
        "activity"
    } else if p.starts_with("context.consent") || leaf == "gpc" || p.contains(".consent") {
        "consent"
    } else if has(&[
        "email",
        "phone",
        "firstname",
        "lastname",
        "first_name",
        "last_name",
    ]) || leaf == "name"
        || leaf == "fn"
        || leaf == "ln"
        || leaf == "em"
        || leaf == "ph"
    {
        "contact"
    } else if p == "context.ip"
        || has(&[
            "address",
            "city",
            "country",
            "postal",
            "zip",
            "state",
            "latitude",
            "longitude",
            "location",
            "region",
            "street",
        ])
        || leaf == "ct"
        || leaf == "st"
        || leaf == "zp"
    {
        "location"
    } else if has(&["birth", "dob", "gender"]) || leaf == "age" || leaf == "db" || leaf == "ge" {
        "demographics"
    } else if leaf.ends_with("id")
        || p.starts_with("context.device")
        || has(&["fbp", "fbc", "external_id", "client_id"])
    {
        "identifiers"
    } else if p.starts_with("context.useragent")
        || p.starts_with("context.os")
        || p.starts_with("context.screen")
        || p.starts_with("context.library")
        || p.starts_with("context.locale")
        || p.starts_with("context.timezone")
    {
        "device"
    } else if has(&[
        "revenue", "price", "total", "currency", "value", "amount", "tax", "discount", "shipping",
        "quantity", "products", "order", "coupon",
    ]) {
        "commercial"
    } else if p.starts_with("context.page")
        || p.starts_with("context.campaign")
        || p.starts_with("context.referrer")
        || p.starts_with("properties.url")
        || p.starts_with("properties.referrer")
    {
        "browsing"
    } else {
        "activity"
    }
}

/// The field names of a JSON payload as the ledger records them: dotted paths of the leaves,
/// arrays collapsed (`properties.products.price`), sorted, each once. Never values. Read as the
/// JSON streams by, without building the document (the router does this for every handoff).
/// An unreadable payload has none.
pub fn field_names(json: &str) -> Vec<String> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

    /// A value at `path`: records the path of each leaf under it.
    struct Walk<'a> {
        path: &'a mut String,
        out: &'a mut Vec<String>,
    }
    impl Walk<'_> {
        fn leaf(self) {
            if !self.path.is_empty() {
                self.out.push(self.path.clone());
            }
        }
        fn under(&mut self) -> Walk<'_> {
            Walk {
                path: self.path,
                out: self.out,
            }
        }
    }
    /// A key: appended to the path.
    struct Key<'a>(&'a mut String);

    impl<'de> DeserializeSeed<'de> for Key<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_str(self)
        }
    }
    impl<'de> Visitor<'de> for Key<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a key")
        }
        fn visit_str<E>(self, k: &str) -> Result<(), E> {
            if !self.0.is_empty() {
                self.0.push('.');
            }
            self.0.push_str(k);
            Ok(())
        }
    }
    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            self.leaf();
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            self.leaf();
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            self.leaf();
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            self.leaf();
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            self.leaf();
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            self.leaf();
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
            let mut any = false;
            while seq.next_element_seed(self.under())?.is_some() {
                any = true;
            }
            if !any {
                self.leaf();
            }
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
            let mut any = false;
            let len = self.path.len();
            while map.next_key_seed(Key(self.path))?.is_some() {
                any = true;
                map.next_value_seed(self.under())?;
                self.path.truncate(len);
            }
            if !any {
                self.leaf();
            }
            Ok(())
        }
    }
    let (mut path, mut out) = (String::new(), Vec::new());
    let mut de = serde_json::Deserializer::from_str(json);
    let walk = Walk {
        path: &mut path,
        out: &mut out,
    };
    if walk.deserialize(&mut de).and_then(|()| de.end()).is_err() {
        return Vec::new();
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The categories of a set of field names, sorted, each once.
pub fn categories_of<'a>(fields: impl IntoIterator<Item = &'a str>) -> Vec<&'static str> {
    let mut c: Vec<&'static str> = fields.into_iter().map(data_category).collect();
    c.sort_unstable();
    c.dedup();
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn identifiers_of_each_call() {
        let e = json!({"type": "identify", "userId": "u1", "anonymousId": "a1",
            "traits": {"email": " Jane@Example.com "}});
        let ids = identifiers(&e);
        assert_eq!(
            ids.iter().map(|i| i.kind).collect::<Vec<_>>(),
            [IdKind::UserId, IdKind::AnonymousId, IdKind::Email]
        );
        let alias = json!({"type": "alias", "userId": "u1", "previousId": "a1"});
        assert_eq!(identifiers(&alias).len(), 2);
        let numeric =
            json!({"type": "track", "userId": 42, "context": {"traits": {"email": "x@y.z"}}});
        assert_eq!(identifiers(&numeric)[0].value, "42");
        assert_eq!(identifiers(&numeric)[1].kind, IdKind::Email);
        assert!(
            identifiers(&json!({"type": "track", "userId": "  ", "traits": {"email": "no"}}))
                .is_empty()
        );
    }

    #[test]
    fn hashes_are_keyed_and_emails_case_insensitive() {
        let k1 = SubjectKey::new([1; 32]);
        let k2 = SubjectKey::new([2; 32]);
        let e = |v: &str| Identifier {
            kind: IdKind::Email,
            value: v.into(),
        };
        assert_eq!(
            k1.hash(&e("Jane@Example.com")),
            k1.hash(&e("jane@example.com "))
        );
        assert_ne!(
            k1.hash(&e("jane@example.com")),
            k2.hash(&e("jane@example.com"))
        );
        let u = |v: &str| Identifier {
            kind: IdKind::UserId,
            value: v.into(),
        };
        assert_ne!(k1.hash(&u("Abc")), k1.hash(&u("abc")), "user ids are exact");
        assert!(!k1.hash(&e("jane@example.com")).contains("jane"));
    }

    #[test]
    fn field_names_of_odd_payloads() {
        assert_eq!(
            field_names(r#"{"a": {}, "b": [], "c": null, "d\"e": {"f": [1, {"g": true}]}}"#),
            ["a", "b", "c", "d\"e.f", "d\"e.f.g"]
        );
        assert!(field_names("{\"a\": ").is_empty(), "unreadable: none");
        assert!(field_names("{} trailing").is_empty());
    }

    proptest::proptest! {
        /// Streamed, the names are those of the parsed document's leaves.
        #[test]
        fn field_names_match_the_parsed_document(v in crate::policy::tests::json_tree()) {
            fn walk(v: &Value, path: &str, out: &mut Vec<String>) {
                let at = |k: &str| if path.is_empty() { k.to_owned() } else { format!("{path}.{k}") };
                match v {
                    Value::Object(m) if !m.is_empty() => m.iter().for_each(|(k, c)| walk(c, &at(k), out)),
                    Value::Array(a) if !a.is_empty() => a.iter().for_each(|c| walk(c, path, out)),
                    _ if !path.is_empty() => out.push(path.to_owned()),
                    _ => {}
                }
            }
            let mut expected = Vec::new();
            walk(&v, "", &mut expected);
            expected.sort_unstable();
            expected.dedup();
            proptest::prop_assert_eq!(field_names(&v.to_string()), expected);
        }
    }

    #[test]
    fn field_names_and_categories() {
        let p = json!({"userId": "u", "traits": {"email": "x", "address": {"city": "c"}},
            "properties": {"revenue": 1, "products": [{"price": 1}, {"price": 2, "sku": "s"}]},
            "context": {"ip": "1.2.3.4"}, "event": "Order Completed"});
        let f = field_names(&p.to_string());
        assert_eq!(
            f,
            [
                "context.ip",
                "event",
                "properties.products.price",
                "properties.products.sku",
                "properties.revenue",
                "traits.address.city",
                "traits.email",
                "userId"
            ]
        );
        assert_eq!(
            categories_of(f.iter().map(String::as_str)),
            [
                "activity",
                "commercial",
                "contact",
                "identifiers",
                "location"
            ]
        );
        assert_eq!(data_category("user_data.em"), "contact");
        assert_eq!(data_category("messageId"), "activity");
        assert_eq!(data_category("traits.age"), "demographics");
        assert_eq!(data_category("properties.items"), "activity");
        assert_eq!(
            data_category("context.consent.categoryPreferences.ads"),
            "consent"
        );
    }
}
