//! The identifiers each vendor was sent about each subject, as the vendor received them (raw,
//! hashed or pseudonymised), so an erasure names the person to the vendor by everything it
//! holds, not only by what the requester typed.
//!
//! Values are sealed (AES-256-GCM under a key kept sealed under the master key, bound to their
//! subject, destination and kind) and found by a keyed digest, so a copied `outbox.db` reveals
//! nobody. A vendor's rows are deleted when its part of an erasure is confirmed: they are kept
//! exactly as long as they are needed to ask for the deletion.

use rusqlite::{Connection, params};

use crate::StoreError;
use crate::outbox::SentIds;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sent_identifiers (
    subject     TEXT NOT NULL,
    destination TEXT NOT NULL,
    kind        TEXT NOT NULL,
    digest      BLOB NOT NULL,
    sealed      BLOB NOT NULL,
    PRIMARY KEY (subject, destination, kind, digest)
) WITHOUT ROWID;
";

/// Seals and digests identifier values; the server implements it with keys sealed under the
/// master key (the store holds no keys of its own).
pub trait Sealer: Send + Sync {
    /// A keyed digest of `value` (16 bytes): the same value gives the same digest.
    fn digest(&self, kind: &str, value: &str) -> [u8; 16];
    /// `value` encrypted, authenticated together with `aad`.
    fn seal(&self, aad: &[u8], value: &[u8]) -> Vec<u8>;
    /// The value, if `sealed` opens with `aad`.
    fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>>;
}

/// Kinds of identifier, as stored.
pub const USER_ID: &str = "user_id";
pub const ANONYMOUS_ID: &str = "anonymous_id";
pub const EMAIL: &str = "email";

fn aad(subject: &str, destination: &str, kind: &str) -> Vec<u8> {
    [subject, destination, kind].join("\u{1f}").into_bytes()
}

/// The (kind, value) pairs of `ids`.
pub fn pairs(ids: &SentIds) -> impl Iterator<Item = (&'static str, &str)> {
    [
        (USER_ID, ids.user_id.as_deref()),
        (ANONYMOUS_ID, ids.anonymous_id.as_deref()),
        (EMAIL, ids.email.as_deref()),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
}

/// Records `value` (of `kind`) as sent to `destination` about `subject`, once.
pub(crate) fn record(
    tx: &Connection,
    sealer: &dyn Sealer,
    subject: &str,
    destination: &str,
    kind: &str,
    digest: &[u8; 16],
    value: &str,
) -> Result<(), StoreError> {
    let sealed = sealer.seal(&aad(subject, destination, kind), value.as_bytes());
    tx.prepare_cached(
        "INSERT INTO sent_identifiers (subject, destination, kind, digest, sealed)
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
    )?
    .execute(params![subject, destination, kind, &digest[..], sealed])?;
    Ok(())
}

/// What `destination` was sent about any of `subjects`: (kind, value), each once. A row that
/// does not open (tampered, or sealed under a key since lost) is skipped and counted in the
/// second value.
pub fn read(
    conn: &Connection,
    sealer: &dyn Sealer,
    subjects: &[String],
    destination: &str,
) -> Result<(Vec<(String, String)>, usize), StoreError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut unreadable = 0;
    let mut stmt = conn.prepare_cached(
        "SELECT kind, sealed FROM sent_identifiers WHERE subject = ?1 AND destination = ?2",
    )?;
    for subject in subjects {
        let rows = stmt.query_map(params![subject, destination], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        for row in rows {
            let (kind, sealed) = row?;
            match sealer
                .open(&aad(subject, destination, &kind), &sealed)
                .and_then(|v| String::from_utf8(v).ok())
            {
                Some(value) if !out.iter().any(|(k, v)| *k == kind && *v == value) => {
                    out.push((kind, value))
                }
                Some(_) => {}
                None => unreadable += 1,
            }
        }
    }
    Ok((out, unreadable))
}

/// Forgets what `destination` was sent about `subject` (its part of an erasure is done).
pub fn forget(conn: &Connection, subject: &str, destination: &str) -> Result<usize, StoreError> {
    Ok(conn.execute(
        "DELETE FROM sent_identifiers WHERE subject = ?1 AND destination = ?2",
        params![subject, destination],
    )?)
}
