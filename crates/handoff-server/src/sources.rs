//! Write keys → sources. Keys are held only as SHA-256 digests, so the table never holds a usable
//! credential, and lookup compares digests rather than secrets.

use std::collections::HashMap;

use handoff_core::SourceId;
use sha2::{Digest, Sha256};

/// The SHA-256 digest of a write key.
pub fn write_key_digest(write_key: &str) -> [u8; 32] {
    Sha256::digest(write_key.as_bytes()).into()
}

#[derive(Default, Clone)]
pub struct SourceKeys {
    by_digest: HashMap<[u8; 32], SourceId>,
}

impl SourceKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a source by the digest of its write key.
    pub fn insert_digest(&mut self, digest: [u8; 32], source: SourceId) {
        self.by_digest.insert(digest, source);
    }

    pub fn insert(&mut self, write_key: &str, source: SourceId) {
        self.insert_digest(write_key_digest(write_key), source);
    }

    /// The source a write key belongs to. The key is hashed first: the map is probed with a
    /// digest, so lookup time reveals nothing useful about the secret.
    pub fn lookup(&self, write_key: &str) -> Option<&SourceId> {
        self.by_digest.get(&write_key_digest(write_key))
    }

    /// `true` if `id` is one of the sources served.
    pub fn contains(&self, id: &SourceId) -> bool {
        self.by_digest.values().any(|s| s == id)
    }

    pub fn sources(&self) -> impl Iterator<Item = &SourceId> {
        self.by_digest.values()
    }
}
