//! Small types that carry meaning instead of bare strings.

use std::fmt;

/// Identifier of a source (one website, app or server that sends events), as declared in
/// configuration. Lowercase ASCII letters, digits, `-` and `_`, 1 to 64 characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId(String);

/// Longest source id we accept; ids appear in metric labels and log lines, so keep them short.
pub const MAX_SOURCE_ID_LEN: usize = 64;

impl SourceId {
    /// Checks the syntax of a source id, returning a human explanation when it is invalid.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("must not be empty".into());
        }
        if raw.len() > MAX_SOURCE_ID_LEN {
            return Err(format!(
                "is {} characters long; at most {MAX_SOURCE_ID_LEN} are allowed",
                raw.len()
            ));
        }
        if let Some(c) = raw
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "contains {c:?}; use lowercase letters, digits, '-' and '_' only"
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The six message types of the Segment spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    Track,
    Identify,
    Page,
    Screen,
    Group,
    Alias,
}

impl MessageKind {
    pub const ALL: [MessageKind; 6] = [
        MessageKind::Track,
        MessageKind::Identify,
        MessageKind::Page,
        MessageKind::Screen,
        MessageKind::Group,
        MessageKind::Alias,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Track => "track",
            MessageKind::Identify => "identify",
            MessageKind::Page => "page",
            MessageKind::Screen => "screen",
            MessageKind::Group => "group",
            MessageKind::Alias => "alias",
        }
    }

    /// Parses a `type` value. Case is ignored: some older clients send `"Track"`.
    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_id_syntax() {
        assert!(SourceId::parse("web-1_prod").is_ok());
        assert!(SourceId::parse("").is_err());
        assert!(SourceId::parse("Web").is_err());
        assert!(SourceId::parse("a b").is_err());
        assert!(SourceId::parse(&"a".repeat(65)).is_err());
        assert!(SourceId::parse(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn kinds_round_trip_and_ignore_case() {
        for k in MessageKind::ALL {
            assert_eq!(MessageKind::parse(k.as_str()), Some(k));
            assert_eq!(MessageKind::parse(&k.as_str().to_uppercase()), Some(k));
        }
        assert_eq!(MessageKind::parse("purchase"), None);
    }
}
