//! Transforms applied to a minimised payload: hashing with each vendor's normalisation, keyed
//! pseudonymisation, IP truncation, generalisation, move and drop.

use std::net::IpAddr;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;

use super::paths::FieldPath;

/// How a value is normalised before it is hashed or pseudonymised. The rules are the vendors'
/// published ones; each says whose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalize {
    /// No change.
    None,
    /// Trim only (`external_id`).
    Trim,
    /// Meta `em`: trim, lower-case.
    Email,
    /// Google enhanced conversions: trim, lower-case, and for gmail.com / googlemail.com remove
    /// the dots before the `@`.
    EmailGoogle,
    /// Meta `ph`: digits only, no leading zeros, with a country code.
    Phone,
    /// Google: E.164, `+` and digits.
    PhoneE164,
    /// Meta `fn`/`ln`: lower-case, no punctuation (UTF-8 letters kept, NFC).
    Name,
    /// Meta `ct`: lower-case, letters and digits only, no spaces.
    City,
    /// Meta `st`: lower-case, letters and digits only (the 2-letter ANSI code for US states).
    State,
    /// Meta `zp`: lower-case, no spaces or dashes; US ZIP codes cut to their first 5 digits.
    Zip,
    /// Meta `country`: ISO 3166-1 alpha-2, lower-case.
    Country,
    /// Meta `db`: `YYYYMMDD`.
    DateOfBirth,
    /// Meta `ge`: `f` or `m`.
    Gender,
}

impl Normalize {
    pub const NAMES: &'static [&'static str] = &[
        "none",
        "trim",
        "email",
        "email_google",
        "phone",
        "phone_e164",
        "name",
        "city",
        "state",
        "zip",
        "country",
        "date_of_birth",
        "gender",
    ];

    pub fn parse(s: &str) -> Option<Normalize> {
        Some(match s {
            "none" => Normalize::None,
            "trim" => Normalize::Trim,
            "email" => Normalize::Email,
            "email_google" => Normalize::EmailGoogle,
            "phone" => Normalize::Phone,
            "phone_e164" => Normalize::PhoneE164,
            "name" => Normalize::Name,
            "city" => Normalize::City,
            "state" => Normalize::State,
            "zip" => Normalize::Zip,
            "country" => Normalize::Country,
            "date_of_birth" => Normalize::DateOfBirth,
            "gender" => Normalize::Gender,
            _ => return None,
        })
    }

    /// Normalises `raw`; `None` when the value cannot be what the rule expects (an e-mail
    /// without `@`, a gender that is not f/m): such values are dropped, not sent malformed.
    pub fn apply(self, raw: &str, country_code: Option<&str>) -> Option<String> {
        let t = raw.trim();
        let out = match self {
            Normalize::None => raw.to_owned(),
            Normalize::Trim => t.to_owned(),
            Normalize::Email => {
                let e = t.to_lowercase();
                valid_email(&e).then_some(e)?
            }
            Normalize::EmailGoogle => {
                let e: String = t
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .collect::<String>()
                    .to_lowercase();
                if !valid_email(&e) {
                    return None;
                }
                let (local, domain) = e.rsplit_once('@')?;
                if domain == "gmail.com" || domain == "googlemail.com" {
                    format!("{}@{domain}", local.replace('.', ""))
                } else {
                    e
                }
            }
            Normalize::Phone | Normalize::PhoneE164 => {
                let international = t.starts_with('+') || t.starts_with("00");
                let digits: String = t.chars().filter(|c| c.is_ascii_digit()).collect();
                let digits = digits.trim_start_matches('0');
                // Without a + or 00 prefix the number is national: it needs the configured
                // calling code, and without one it cannot be matched, so it is not sent. A
                // national-looking number that already starts with the code at full length
                // (`1 650 555 1212` with code 1) is taken as international.
                let full = match country_code {
                    _ if international => digits.to_owned(),
                    Some(cc) if digits.starts_with(cc) && digits.len() >= 11 => digits.to_owned(),
                    Some(cc) => format!("{cc}{digits}"),
                    None => return None,
                };
                // E.164: at most 15 digits; fewer than 7 cannot be a reachable number.
                if !(7..=15).contains(&full.len()) {
                    return None;
                }
                if self == Normalize::PhoneE164 {
                    format!("+{full}")
                } else {
                    full
                }
            }
            Normalize::Name => {
                let s: String = t
                    .nfc()
                    .flat_map(char::to_lowercase)
                    .filter(|c| !c.is_ascii_punctuation() && !is_unicode_punctuation(*c))
                    .collect();
                let s = s.trim().to_owned();
                (!s.is_empty()).then_some(s)?
            }
            Normalize::City | Normalize::State => {
                let s: String = t
                    .nfc()
                    .flat_map(char::to_lowercase)
                    .filter(|c| c.is_alphanumeric())
                    .collect();
                (!s.is_empty()).then_some(s)?
            }
            Normalize::Zip => {
                let s: String = t
                    .chars()
                    .filter(|c| !c.is_whitespace() && *c != '-')
                    .flat_map(char::to_lowercase)
                    .collect();
                let us = (s.len() == 5 || s.len() == 9) && s.bytes().all(|b| b.is_ascii_digit());
                if us {
                    s[..5].to_owned()
                } else if s.is_empty() {
                    return None;
                } else {
                    s
                }
            }
            Normalize::Country => {
                let s = t.to_ascii_lowercase();
                (s.len() == 2 && s.bytes().all(|b| b.is_ascii_lowercase())).then_some(s)?
            }
            Normalize::DateOfBirth => date_of_birth(t)?,
            Normalize::Gender => match t.to_lowercase().as_str() {
                "f" | "female" | "w" | "woman" => "f".to_owned(),
                "m" | "male" | "man" => "m".to_owned(),
                _ => return None,
            },
        };
        Some(out)
    }
}

fn is_unicode_punctuation(c: char) -> bool {
    matches!(
        c,
        '\u{2010}'..='\u{2027}' | '\u{00A1}' | '\u{00BF}' | '\u{00AB}' | '\u{00BB}'
    )
}

fn valid_email(e: &str) -> bool {
    match e.split_once('@') {
        Some((local, domain)) => !local.is_empty() && domain.contains('.') && !domain.contains('@'),
        None => false,
    }
}

/// `YYYY-MM-DD`, `YYYYMMDD`, an ISO date-time, or the US `M/D/YYYY` → `YYYYMMDD`.
fn date_of_birth(s: &str) -> Option<String> {
    let (y, m, d): (u32, u32, u32) = if let Some((m, rest)) = s.split_once('/') {
        let (d, y) = rest.split_once('/')?;
        (
            y.trim().parse().ok()?,
            m.trim().parse().ok()?,
            d.trim().parse().ok()?,
        )
    } else {
        let digits: String = s.chars().take(10).filter(|c| c.is_ascii_digit()).collect();
        if digits.len() != 8 {
            return None;
        }
        (
            digits[..4].parse().ok()?,
            digits[4..6].parse().ok()?,
            digits[6..].parse().ok()?,
        )
    };
    if !(1900..=2100).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    Some(format!("{y:04}{m:02}{d:02}"))
}

/// Lower-case hex of SHA-256. A value that already is a SHA-256 hex digest is passed through, so
/// a client that hashed on the device is not hashed twice.
pub fn sha256_hex(normalised: &str) -> String {
    if is_sha256_hex(normalised) {
        return normalised.to_ascii_lowercase();
    }
    base16ct::lower::encode_string(&Sha256::digest(normalised.as_bytes()))
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// HMAC-SHA-256 under a destination's own key, as lower-case hex: stable for that destination,
/// and unjoinable across destinations with different keys.
pub fn hmac_hex(key: &[u8], value: &str) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(value.as_bytes());
    base16ct::lower::encode_string(&mac.finalize().into_bytes())
}

/// IPv4 to its /24, IPv6 to its /48, written as an address with the rest zeroed.
pub fn truncate_ip(s: &str) -> Option<String> {
    match s.trim().parse::<IpAddr>().ok()? {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            Some(std::net::Ipv4Addr::new(a, b, c, 0).to_string())
        }
        IpAddr::V6(v6) => {
            let mut seg = v6.segments();
            for s in &mut seg[3..] {
                *s = 0;
            }
            Some(std::net::Ipv6Addr::from(seg).to_string())
        }
    }
}

/// Generalisations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generalise {
    /// A date (of birth) → its year.
    Year,
    /// A postcode → its first `n` characters (spaces removed).
    Prefix(usize),
}

impl Generalise {
    pub fn apply(self, raw: &str) -> Option<String> {
        match self {
            Generalise::Year => {
                let dob = date_of_birth(raw.trim())?;
                Some(dob[..4].to_owned())
            }
            Generalise::Prefix(n) => {
                let s: String = raw.chars().filter(|c| !c.is_whitespace()).collect();
                (s.chars().count() > n).then(|| s.chars().take(n).collect())
            }
        }
    }
}

/// One configured transform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transform {
    Hash {
        field: FieldPath,
        normalize: Normalize,
        country_code: Option<String>,
    },
    Hmac {
        field: FieldPath,
        normalize: Normalize,
        country_code: Option<String>,
    },
    TruncateIp {
        field: FieldPath,
    },
    Generalise {
        field: FieldPath,
        to: Generalise,
    },
    Move {
        field: FieldPath,
        to: FieldPath,
    },
    Drop {
        field: FieldPath,
    },
}

impl Transform {
    pub fn field(&self) -> &FieldPath {
        match self {
            Transform::Hash { field, .. }
            | Transform::Hmac { field, .. }
            | Transform::TruncateIp { field }
            | Transform::Generalise { field, .. }
            | Transform::Move { field, .. }
            | Transform::Drop { field } => field,
        }
    }

    pub fn op(&self) -> &'static str {
        match self {
            Transform::Hash { .. } => "hash",
            Transform::Hmac { .. } => "hmac",
            Transform::TruncateIp { .. } => "truncate_ip",
            Transform::Generalise { .. } => "generalise",
            Transform::Move { .. } => "move",
            Transform::Drop { .. } => "drop",
        }
    }
}

/// The text of a scalar for transforms: strings as they are, numbers as written.
pub fn scalar_text(v: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match v {
        Value::String(s) => Some(std::borrow::Cow::Borrowed(s)),
        Value::Number(n) => Some(std::borrow::Cow::Owned(n.to_string())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashed(n: Normalize, raw: &str, cc: Option<&str>) -> String {
        sha256_hex(&n.apply(raw, cc).unwrap())
    }

    /// Vectors from Meta's "Customer Information Parameters" page (Conversions API).
    #[test]
    fn meta_documented_examples() {
        assert_eq!(
            hashed(Normalize::Email, " John_Smith@gmail.com ", None),
            "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
        );
        assert_eq!(
            Normalize::Phone.apply("(650)555-1212", Some("1")).unwrap(),
            "16505551212"
        );
        assert_eq!(
            hashed(Normalize::Phone, "(650)555-1212", Some("1")),
            "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"
        );
        assert_eq!(
            hashed(Normalize::Phone, "+1 234-567-8901", None),
            "254aa248acb47dd654ca3ea53f48c2c26d641d23d7e2e93a1ec56258df7674c4"
        );
        assert_eq!(
            hashed(Normalize::Name, "Mary", None),
            "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"
        );
        assert_eq!(
            hashed(Normalize::Name, "정", None),
            "8fa8cd9c440be61d0151429310034083132b35975c4bea67fdd74158eb51db14"
        );
        // Decomposed "e" + combining acute must hash like the precomposed é (NFC).
        assert_eq!(
            hashed(Normalize::Name, "Vale\u{301}ry", None),
            "08e1996b5dd49e62a4b4c010d44e4345592a863bb9f8e3976219bac29417149c"
        );
        assert_eq!(
            Normalize::DateOfBirth.apply("2/16/1997", None).unwrap(),
            "19970216"
        );
        assert_eq!(
            hashed(Normalize::DateOfBirth, "1997-02-16", None),
            "01acdbf6ec7b4f478a225f1a246e5d6767eeab1a7ffa17f025265b5b94f40f0c"
        );
        assert_eq!(
            hashed(Normalize::Country, "US", None),
            "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621"
        );
        assert_eq!(Normalize::City.apply("New York", None).unwrap(), "newyork");
        assert_eq!(Normalize::Zip.apply("94035-1234", None).unwrap(), "94035");
        assert_eq!(Normalize::Zip.apply("M1 1AE", None).unwrap(), "m11ae");
        assert_eq!(Normalize::Gender.apply("Female", None).unwrap(), "f");
        assert_eq!(Normalize::Gender.apply("x", None), None);
        // A national number needs the calling code; one that already carries it is not doubled.
        assert_eq!(Normalize::Phone.apply("(650)555-1212", None), None);
        assert_eq!(
            Normalize::Phone.apply("1 650 555 1212", Some("1")).unwrap(),
            "16505551212"
        );
        assert_eq!(
            Normalize::Phone.apply("0044 20 7946 0958", None).unwrap(),
            "442079460958"
        );
        assert_eq!(Normalize::Email.apply("not-an-email", None), None);
    }

    /// Google enhanced conversions: dots before the @ removed for gmail.com / googlemail.com only.
    #[test]
    fn google_email_rule() {
        assert_eq!(
            Normalize::EmailGoogle
                .apply(" Jane.Doe@Gmail.com", None)
                .unwrap(),
            "janedoe@gmail.com"
        );
        assert_eq!(
            Normalize::EmailGoogle
                .apply("j.d@googlemail.com", None)
                .unwrap(),
            "jd@googlemail.com"
        );
        assert_eq!(
            Normalize::EmailGoogle
                .apply("j.d@example.com", None)
                .unwrap(),
            "j.d@example.com"
        );
        assert_eq!(
            Normalize::PhoneE164
                .apply("(800)555-0100", Some("1"))
                .unwrap(),
            "+18005550100"
        );
    }

    #[test]
    fn already_hashed_values_pass_through() {
        let h = "62A14E44F765419D10FEA99367361A727C12365E2520F32218D505ED9AA0F62F";
        assert_eq!(sha256_hex(h), h.to_ascii_lowercase());
    }

    #[test]
    fn hmac_depends_on_the_key() {
        let a = hmac_hex(b"key-a-0123456789abcdef0123456789", "user-1");
        let b = hmac_hex(b"key-b-0123456789abcdef0123456789", "user-1");
        assert_ne!(a, b);
        assert_eq!(a, hmac_hex(b"key-a-0123456789abcdef0123456789", "user-1"));
        // RFC 4231 test case 2.
        assert_eq!(
            hmac_hex(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn ip_truncation_and_generalisation() {
        assert_eq!(truncate_ip("203.0.113.77").unwrap(), "203.0.113.0");
        assert_eq!(
            truncate_ip("2001:db8:85a3:8d3:1319:8a2e:370:7348").unwrap(),
            "2001:db8:85a3::"
        );
        assert_eq!(truncate_ip("nope"), None);
        assert_eq!(Generalise::Year.apply("1997-02-16").unwrap(), "1997");
        assert_eq!(Generalise::Prefix(3).apply("SW1A 1AA").unwrap(), "SW1");
        assert_eq!(Generalise::Prefix(3).apply("SW"), None);
    }
}
