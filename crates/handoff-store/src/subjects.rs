//! The subject store: which identifier hashes belong to one person, whether that person is
//! suppressed (erasure), their stored preferences, and the ids vendors gave them (a Stripe
//! customer id). Identifiers are stored only as keyed hashes (see `handoff_core::subject`).
//!
//! Functions take a connection or transaction of `outbox.db`, so the router resolves subjects,
//! decides and queues in one transaction.

use rusqlite::{Connection, OptionalExtension, params};

use crate::StoreError;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS subjects (
    id               TEXT PRIMARY KEY,
    created_at_ms    INTEGER NOT NULL,
    merged_into      TEXT,
    suppressed_at_ms INTEGER,
    preferences      TEXT
);
CREATE TABLE IF NOT EXISTS identities (
    hash    TEXT PRIMARY KEY,
    kind    TEXT NOT NULL,
    subject TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS identities_by_subject ON identities (subject);
CREATE TABLE IF NOT EXISTS vendor_refs (
    destination TEXT NOT NULL,
    subject     TEXT NOT NULL,
    ref         TEXT NOT NULL,
    PRIMARY KEY (destination, subject)
) WITHOUT ROWID;
-- Counts changes to subjects that the state delivery decided with may not show (erasures,
-- opt-outs filed as requests, merges that suppress or opt out): delivery re-reads it then.
CREATE TABLE IF NOT EXISTS subject_epoch (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  INTEGER NOT NULL
);
";

/// Marks that a subject's state changed other than by an identify call in journal order (an
/// erasure, an opt-out request, a merge): what delivery decided with may be stale.
pub fn changed(conn: &Connection) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO subject_epoch (id, n) VALUES (1, 1) ON CONFLICT (id) DO UPDATE SET n = n + 1",
    )?
    .execute([])?;
    Ok(())
}

/// How many times [`changed`] was called.
pub fn epoch(conn: &Connection) -> Result<u64, StoreError> {
    let n: Option<i64> = conn
        .prepare_cached("SELECT n FROM subject_epoch WHERE id = 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(n.unwrap_or(0) as u64)
}

/// What the store knows of a subject.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Subject {
    pub id: String,
    pub created_at_ms: i64,
    pub suppressed_at_ms: Option<i64>,
    /// Stored preferences, as JSON (see `handoff_core::consent::StoredPreferences`).
    pub preferences: Option<String>,
}

/// What [`resolve`] did, for the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resolution {
    pub subject: Option<Subject>,
    /// Subjects found to be the same person, merged into `subject`.
    pub merged: Vec<String>,
}

/// The subject `id` (`None` when there is no such subject).
pub fn load(conn: &Connection, id: &str) -> Result<Option<Subject>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, created_at_ms, suppressed_at_ms, preferences FROM subjects WHERE id = ?1",
    )?;
    Ok(stmt
        .query_row([id], |r| {
            Ok(Subject {
                id: r.get(0)?,
                created_at_ms: r.get(1)?,
                suppressed_at_ms: r.get(2)?,
                preferences: r.get(3)?,
            })
        })
        .optional()?)
}

/// What decisions about a subject depend on: (merged into, suppressed at, preferences).
pub type Basis = (Option<String>, Option<i64>, Option<String>);

/// The current [`Basis`] of a subject (`None` when there is no such subject).
pub fn basis(conn: &Connection, id: &str) -> Result<Option<Basis>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT merged_into, suppressed_at_ms, preferences FROM subjects WHERE id = ?1",
        )?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?)
}

/// The subject an identifier hash belongs to, if any.
pub fn find(conn: &Connection, hash: &str) -> Result<Option<Subject>, StoreError> {
    let id: Option<String> = conn
        .prepare_cached("SELECT subject FROM identities WHERE hash = ?1")?
        .query_row([hash], |r| r.get(0))
        .optional()?;
    match id {
        Some(id) => load(conn, &id),
        None => Ok(None),
    }
}

/// Finds the subject of `ids` (kind, hash), creating one when none is known and linking the
/// hashes not yet linked. When the hashes belong to different subjects, those are one person:
/// they are merged into the oldest, which keeps the union of their state (suppressed if any
/// was; opted out if any was).
pub fn resolve(
    conn: &Connection,
    ids: &[(&str, String)],
    now_ms: i64,
) -> Result<Resolution, StoreError> {
    if ids.is_empty() {
        return Ok(Resolution::default());
    }
    let mut found: Vec<Subject> = Vec::new();
    let mut unlinked: Vec<&(&str, String)> = Vec::new();
    for id in ids {
        match find(conn, &id.1)? {
            Some(s) => {
                if !found.iter().any(|f| f.id == s.id) {
                    found.push(s);
                }
            }
            None => unlinked.push(id),
        }
    }
    let mut merged = Vec::new();
    let subject = if found.is_empty() {
        // Time first, then random: new subjects sort after older ones, so what is indexed by
        // subject (identities, decisions in the ledger) is appended for them rather than
        // written into pages all over the indexes.
        let id: String = conn
            .prepare_cached("SELECT 'sub_' || printf('%012x', ?1) || lower(hex(randomblob(6)))")?
            .query_row([now_ms.max(0)], |r| r.get(0))?;
        conn.prepare_cached("INSERT INTO subjects (id, created_at_ms) VALUES (?1, ?2)")?
            .execute(params![id, now_ms])?;
        Subject {
            id,
            created_at_ms: now_ms,
            suppressed_at_ms: None,
            preferences: None,
        }
    } else {
        found.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        let mut target = found.remove(0);
        let mut restricted = false;
        for other in found {
            conn.execute(
                "UPDATE identities SET subject = ?1 WHERE subject = ?2",
                params![target.id, other.id],
            )?;
            conn.execute(
                "UPDATE subjects SET merged_into = ?1 WHERE id = ?2",
                params![target.id, other.id],
            )?;
            // The merged subject keeps its vendor ids and its history under its own id;
            // [`aliases`] finds them (erasure, reports).
            if target.suppressed_at_ms.is_none() && other.suppressed_at_ms.is_some() {
                target.suppressed_at_ms = other.suppressed_at_ms;
            }
            if target.preferences.is_none() {
                target.preferences = other.preferences.clone();
                restricted |= other.preferences.is_some();
            } else if let (Some(t), Some(o)) = (&target.preferences, &other.preferences)
                && o.contains("\"opt_out_of_sale\":true")
                && !t.contains("\"opt_out_of_sale\":true")
            {
                // An opt-out of either side survives the merge.
                target.preferences = Some(o.clone());
                restricted = true;
            }
            conn.execute(
                "UPDATE subjects SET suppressed_at_ms = ?2, preferences = ?3 WHERE id = ?1",
                params![target.id, target.suppressed_at_ms, target.preferences],
            )?;
            merged.push(other.id);
        }
        // What the stage resolved before, under the merged subjects, was decided on their own
        // state: when the merge suppresses or opts out one of them, delivery must look again.
        if !merged.is_empty() && (target.suppressed_at_ms.is_some() || restricted) {
            changed(conn)?;
        }
        if target.suppressed_at_ms.is_some() {
            // One side was erased: what the other side still has queued must not leave.
            for m in &merged {
                crate::dsr::purge_queues(conn, m)?;
            }
            crate::dsr::purge_queues(conn, &target.id)?;
        }
        target
    };
    let mut link = conn.prepare_cached(
        "INSERT INTO identities (hash, kind, subject) VALUES (?1, ?2, ?3)
         ON CONFLICT (hash) DO UPDATE SET subject = excluded.subject",
    )?;
    for (kind, hash) in unlinked {
        link.execute(params![hash, kind, subject.id])?;
    }
    Ok(Resolution {
        subject: Some(subject),
        merged,
    })
}

/// The subject `id` was merged into (at any depth), or `id` itself.
pub fn root(conn: &Connection, id: &str) -> Result<String, StoreError> {
    let root: Option<String> = conn
        .prepare_cached(
            "WITH RECURSIVE up(id, into_id) AS (
                SELECT id, merged_into FROM subjects WHERE id = ?1
                UNION SELECT s.id, s.merged_into FROM subjects s JOIN up ON s.id = up.into_id)
             SELECT id FROM up WHERE into_id IS NULL",
        )?
        .query_row([id], |r| r.get(0))
        .optional()?;
    Ok(root.unwrap_or_else(|| id.to_owned()))
}

/// A subject's id and the ids of every subject merged into it (at any depth).
pub fn aliases(conn: &Connection, id: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "WITH RECURSIVE a(id) AS (SELECT ?1 UNION SELECT s.id FROM subjects s JOIN a ON s.merged_into = a.id)
         SELECT id FROM a",
    )?;
    let ids = stmt
        .query_map([id], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(ids)
}

/// The vendor's ids for a subject and its aliases.
pub fn vendor_refs(
    conn: &Connection,
    destination: &str,
    subject: &str,
) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for id in aliases(conn, subject)? {
        out.extend(vendor_ref(conn, destination, &id)?);
    }
    Ok(out)
}

pub fn set_preferences(conn: &Connection, subject: &str, json: &str) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE subjects SET preferences = ?2 WHERE id = ?1")?
        .execute(params![subject, json])?;
    Ok(())
}

pub fn suppress(conn: &Connection, subject: &str, at_ms: i64) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE subjects SET suppressed_at_ms = coalesce(suppressed_at_ms, ?2) WHERE id = ?1",
        params![subject, at_ms],
    )?;
    changed(conn)
}

/// The kinds of identifiers linked to a subject, with how many of each (never the hashes'
/// values in reports: they are pseudonymous data of their own).
pub fn identifier_kinds(
    conn: &Connection,
    subject: &str,
) -> Result<Vec<(String, u64)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT kind, count(*) FROM identities WHERE subject = ?1 GROUP BY kind ORDER BY kind",
    )?;
    let rows = stmt
        .query_map([subject], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn vendor_ref(
    conn: &Connection,
    destination: &str,
    subject: &str,
) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT ref FROM vendor_refs WHERE destination = ?1 AND subject = ?2")?
        .query_row([destination, subject], |r| r.get(0))
        .optional()?)
}

pub fn set_vendor_ref(
    conn: &Connection,
    destination: &str,
    subject: &str,
    reference: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO vendor_refs (destination, subject, ref) VALUES (?1, ?2, ?3)
         ON CONFLICT (destination, subject) DO UPDATE SET ref = excluded.ref",
    )?
    .execute(params![destination, subject, reference])?;
    Ok(())
}

pub fn delete_vendor_ref(
    conn: &Connection,
    destination: &str,
    subject: &str,
) -> Result<(), StoreError> {
    conn.execute(
        "DELETE FROM vendor_refs WHERE destination = ?1 AND subject = ?2",
        [destination, subject],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::OutboxStore;

    #[test]
    fn identifiers_link_into_one_subject_and_merge_keeps_the_strictest_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = OutboxStore::open(dir.path()).unwrap();
        store
            .with_conn(|c| {
                let anon = resolve(c, &[("anonymous_id", "h-anon".into())], 1)?
                    .subject
                    .unwrap();
                let same = resolve(c, &[("anonymous_id", "h-anon".into())], 2)?
                    .subject
                    .unwrap();
                assert_eq!(anon.id, same.id);
                // A user signs up elsewhere first: a second subject…
                let user = resolve(c, &[("user_id", "h-user".into())], 3)?
                    .subject
                    .unwrap();
                assert_ne!(user.id, anon.id);
                assert!(
                    user.id > anon.id,
                    "ids sort by creation: {} {}",
                    user.id,
                    anon.id
                );
                suppress(c, &user.id, 4)?;
                set_vendor_ref(c, "stripe", &user.id, "cus_1")?;
                // …then an event names both: one person, the older subject, suppressed.
                let r = resolve(
                    c,
                    &[
                        ("user_id", "h-user".into()),
                        ("anonymous_id", "h-anon".into()),
                    ],
                    5,
                )?;
                let merged = r.subject.unwrap();
                assert_eq!(merged.id, anon.id);
                assert_eq!(r.merged, vec![user.id.clone()]);
                assert_eq!(merged.suppressed_at_ms, Some(4));
                assert_eq!(find(c, "h-user")?.unwrap().id, anon.id);
                assert_eq!(vendor_refs(c, "stripe", &anon.id)?, ["cus_1"]);
                assert_eq!(aliases(c, &anon.id)?.len(), 2);
                assert_eq!(root(c, &user.id)?, anon.id);
                assert_eq!(root(c, &anon.id)?, anon.id);
                // An erasure filed for the user before the merge is the person's erasure.
                crate::dsr::insert(c, "dsr_1", "erasure", &user.id, "dpo", 4, 5, &[])?;
                assert_eq!(
                    crate::dsr::existing(c, &anon.id, "erasure")?.as_deref(),
                    Some("dsr_1")
                );
                assert_eq!(crate::dsr::existing(c, &anon.id, "access")?, None);
                assert_eq!(
                    identifier_kinds(c, &anon.id)?,
                    vec![("anonymous_id".into(), 1), ("user_id".into(), 1)]
                );
                assert!(resolve(c, &[], 6)?.subject.is_none());
                Ok(())
            })
            .unwrap();
    }
}
