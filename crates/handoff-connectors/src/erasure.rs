//! Telling a vendor to erase a subject: each connector's own deletion call, or, where the
//! vendor has none, instructions for an operator (tracked as a manual task).

use serde::{Deserialize, Serialize};

use crate::wire::WireRequest;

/// Whom to erase, as the vendor can know them: the identifiers given in the request (kept
/// only until the vendor confirms) and the vendor's own id for the subject.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureTarget {
    pub dsr_id: String,
    pub subject_id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anonymous_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emails: Vec<String>,
    /// The vendor's own ids for the person (several when two subjects turned out to be one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vendor_refs: Vec<String>,
}

/// How a vendor is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Erasure {
    /// Calls to make; the vendor's part is done when every one succeeded.
    Calls(Vec<WireRequest>),
    /// No API: an operator does it by hand (the instructions say how) and confirms it.
    Manual(String),
    /// Nothing of the subject is at the vendor under an id we could name (said why).
    NothingHeld(String),
}

impl ErasureTarget {
    /// What an operator quotes to a vendor that has no deletion API: every identifier the
    /// vendor received about the person, exactly as it received it (hashed or pseudonymised
    /// where the destination transforms it), and the vendor's own ids.
    pub fn quote(&self) -> String {
        let mut parts = Vec::new();
        // GA4 knows events without an anonymousId by a client id derived from the user id.
        let derived: Vec<String> = self
            .user_ids
            .iter()
            .map(|u| crate::ga4::derived_client_id(u))
            .collect();
        for (label, values) in [
            ("user ids", &self.user_ids),
            ("anonymous ids", &self.anonymous_ids),
            ("e-mails", &self.emails),
            ("the vendor's own ids", &self.vendor_refs),
            ("GA4 client ids derived from user ids", &derived),
        ] {
            if !values.is_empty() {
                parts.push(format!("{label}: {}", values.join(", ")));
            }
        }
        if parts.is_empty() {
            "Handoff holds no identifier this vendor received about the person".into()
        } else {
            format!(
                "Quote exactly, as the vendor received them: {}",
                parts.join("; ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quote_lists_every_identifier_as_received() {
        let t = ErasureTarget {
            user_ids: vec![
                "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            ],
            emails: vec!["62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f".into()],
            ..ErasureTarget::default()
        };
        let q = t.quote();
        assert!(
            q.contains("user ids: 9f86d0") && q.contains("e-mails: 62a14e"),
            "{q}"
        );
        assert!(q.contains("derived from user ids: uid."), "{q}");
        assert!(!q.contains("anonymous ids"));
        assert!(ErasureTarget::default().quote().contains("no identifier"));
    }
}
