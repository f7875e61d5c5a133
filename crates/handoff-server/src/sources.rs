//! Write keys → sources. Keys are held only as SHA-256 digests, so the table never holds a usable
//! credential, and lookup compares digests rather than secrets.
//!
//! A rotated key stays valid until the end of its grace period, so SDKs can move to the new key
//! without losing events; the embedded default re-reads its sources while it runs
//! ([`RELOAD_EVERY`]), so `handoff sources rotate-key` takes effect without a restart.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use handoff_core::SourceId;
use sha2::{Digest, Sha256};

/// How often the embedded default re-reads its sources (a rotated key is accepted this soon).
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The SHA-256 digest of a write key.
pub fn write_key_digest(write_key: &str) -> [u8; 32] {
    Sha256::digest(write_key.as_bytes()).into()
}

/// A write key as stored: its digest, its source, and until when (ms since the epoch) it is
/// still accepted if it was replaced.
#[derive(Clone, Debug)]
pub struct StoredKey {
    pub digest: [u8; 32],
    pub source: SourceId,
    pub until_ms: Option<i64>,
}

/// A key's source, and until when (ms since the epoch) a replaced key is still accepted.
#[derive(Clone, Debug)]
struct Entry {
    source: SourceId,
    until_ms: Option<i64>,
}

#[derive(Default)]
pub struct SourceKeys {
    by_digest: RwLock<HashMap<[u8; 32], Entry>>,
}

impl SourceKeys {
    pub fn new() -> Self {
        Self::default()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<[u8; 32], Entry>> {
        self.by_digest.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<[u8; 32], Entry>> {
        self.by_digest.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a source by the digest of its write key.
    pub fn insert_digest(&mut self, digest: [u8; 32], source: SourceId) {
        self.write().insert(
            digest,
            Entry {
                source,
                until_ms: None,
            },
        );
    }

    pub fn insert(&mut self, write_key: &str, source: SourceId) {
        self.insert_digest(write_key_digest(write_key), source);
    }

    /// Replaces every key by `keys`.
    pub fn replace_all(&self, keys: Vec<StoredKey>) {
        let map = keys
            .into_iter()
            .map(|k| {
                (
                    k.digest,
                    Entry {
                        source: k.source,
                        until_ms: k.until_ms,
                    },
                )
            })
            .collect();
        *self.write() = map;
    }

    /// The source a write key belongs to, as of `now_ms`. The key is hashed first: the map is
    /// probed with a digest, so lookup time reveals nothing useful about the secret.
    pub fn lookup_at(&self, write_key: &str, now_ms: i64) -> Option<SourceId> {
        self.read()
            .get(&write_key_digest(write_key))
            .filter(|e| e.until_ms.is_none_or(|until| now_ms < until))
            .map(|e| e.source.clone())
    }

    /// The source a write key belongs to now.
    pub fn lookup(&self, write_key: &str) -> Option<SourceId> {
        self.lookup_at(write_key, handoff_store::sqlite::now_ms())
    }

    /// `true` if `id` is one of the sources served.
    pub fn contains(&self, id: &SourceId) -> bool {
        self.read().values().any(|e| &e.source == id)
    }

    /// The sources served, each once, in order.
    pub fn sources(&self) -> Vec<SourceId> {
        let mut ids: Vec<SourceId> = self.read().values().map(|e| e.source.clone()).collect();
        ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_key_works_until_its_grace_ends() {
        let keys = SourceKeys::new();
        let web = SourceId::parse("web").unwrap();
        keys.replace_all(vec![
            StoredKey {
                digest: write_key_digest("new-key"),
                source: web.clone(),
                until_ms: None,
            },
            StoredKey {
                digest: write_key_digest("old-key"),
                source: web.clone(),
                until_ms: Some(1_000),
            },
        ]);
        assert_eq!(keys.lookup_at("new-key", 5_000), Some(web.clone()));
        assert_eq!(keys.lookup_at("old-key", 999), Some(web.clone()));
        assert_eq!(keys.lookup_at("old-key", 1_000), None);
        assert_eq!(keys.lookup_at("guess", 0), None);
        assert_eq!(keys.sources(), vec![web]);
    }
}
