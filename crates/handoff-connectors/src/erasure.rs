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
