//! The quarantine: messages refused at ingest, kept so operators can see what a client sent
//! wrong, for `[server] quarantine_retention_days`, and findable by the identifiers in them so
//! an erasure reaches them without reading every row.
//!
//! Refused input is not trusted to have a shape, so it is indexed by *tokens*: each value under
//! an identifier key (`userId`, `anonymousId`, `previousId`, `user_id`, `anonymous_id`) at any
//! depth, and each string holding an `@` (an e-mail), trimmed and lowercased, as the first 8
//! bytes of its SHA-256. The index only narrows the search: an erasure still tests each
//! candidate exactly. A message with more tokens than [`MAX_TOKENS`] is kept without its raw
//! text; rows written before the index existed are marked unindexed and always tested.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, params};
use sha2::{Digest, Sha256};

use crate::StoreError;
use crate::sqlite::{DB_FILE, ERASED_PAYLOAD, configure, erasing};

/// Keys whose values identify a person in a refused message.
const ID_KEYS: [&str; 5] = [
    "userId",
    "anonymousId",
    "previousId",
    "user_id",
    "anonymous_id",
];
/// Most tokens indexed for one row. A refused message is at most a request's body (500 KB for a
/// batch entry refused as too large); one with more identifiers than this (none that a client
/// sends by mistake) is tested at every erasure instead of costing the index hundreds of rows.
pub const MAX_TOKENS: usize = 32;
/// Rows purged per transaction, so a large purge never holds the journal's writer for long.
pub const PURGE_CHUNK: usize = 10_000;

/// The index key of one token.
pub fn token_key(token: &str) -> [u8; 8] {
    let digest = Sha256::digest(token.trim().to_lowercase().as_bytes());
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest[..8]);
    key
}

/// The index keys of a refused message, or `None` when it has more than [`MAX_TOKENS`].
/// Input that is not JSON has no tokens to find (`Some` of none); it is tested at every
/// erasure instead (see [`is_json`]).
pub fn tokens(raw: &str) -> Option<Vec<[u8; 8]>> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(raw) else {
        return Some(Vec::new());
    };
    let mut out = Vec::new();
    walk(&value, false, &mut out).then_some(())?;
    out.sort_unstable();
    out.dedup();
    Some(out)
}

/// `true` when `raw` is JSON (what ingest quarantines always is; older rows may not be).
pub fn is_json(raw: &str) -> bool {
    serde_json::from_str::<serde::de::IgnoredAny>(raw).is_ok()
}

/// Adds the tokens of `v` (under an identifier key when `under_id`); `false` past the cap.
fn walk(v: &serde_json::Value, under_id: bool, out: &mut Vec<[u8; 8]>) -> bool {
    use serde_json::Value;
    let mut add = |token: &str| {
        out.push(token_key(token));
        out.len() <= MAX_TOKENS
    };
    match v {
        Value::String(s) if under_id || s.contains('@') => add(s),
        Value::Number(n) if under_id => add(&n.to_string()),
        Value::Array(items) => items.iter().all(|i| walk(i, under_id, out)),
        Value::Object(members) => members
            .iter()
            .all(|(k, v)| walk(v, under_id || ID_KEYS.contains(&k.as_str()), out)),
        _ => true,
    }
}

/// Writes the index rows (`keys`, from [`tokens`]) of the quarantine row `id`, inside the
/// append's transaction, and marks it indexed.
pub(crate) fn index_row(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    raw: &str,
    keys: &[[u8; 8]],
) -> Result<(), StoreError> {
    if !raw.is_empty() && !is_json(raw) {
        return Ok(()); // stays `keyed = 0`: found by a scan of its text
    }
    let mut insert =
        tx.prepare_cached("INSERT OR IGNORE INTO quarantine_keys (key, id) VALUES (?1, ?2)")?;
    for key in keys {
        insert.execute(params![&key[..], id])?;
    }
    tx.prepare_cached("UPDATE quarantine SET keyed = 1 WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

/// Deletes up to [`PURGE_CHUNK`] quarantined messages received before `before_ms`, with their
/// index rows (inside the writer's transaction). Returns how many were deleted.
pub(crate) fn purge_in(tx: &rusqlite::Transaction<'_>, before_ms: i64) -> Result<u64, StoreError> {
    let ids: Vec<i64> = {
        let mut stmt = tx.prepare_cached(
            "SELECT id FROM quarantine WHERE received_at_ms < ?1 ORDER BY received_at_ms LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![before_ms, PURGE_CHUNK as i64], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut keys = tx.prepare_cached("DELETE FROM quarantine_keys WHERE id = ?1")?;
    let mut row = tx.prepare_cached("DELETE FROM quarantine WHERE id = ?1")?;
    for id in &ids {
        keys.execute([id])?;
        row.execute([id])?;
    }
    Ok(ids.len() as u64)
}

/// Overwrites the quarantined messages that name the person (erasure). Refused input is not
/// parsed, so it cannot be attributed to a subject: it is found by the identifiers the request
/// gives, as values under a `userId`, `anonymousId` or `previousId` key at any depth (also in
/// arrays and objects under them, as refused messages have them; as text, blanks trimmed),
/// e-mails as any value in any case; in a message that is not JSON, as a JSON string anywhere
/// in it. Candidates come from the token index (plus unindexed rows); each is then tested
/// exactly. Their `raw` becomes [`ERASED_PAYLOAD`], their `message` (which may quote the
/// input) `erased`, and their index rows are deleted; the code and time stay. Returns how many
/// were erased.
pub fn erase_quarantined(
    data_dir: &Path,
    ids: &[&str],
    emails: &[&str],
) -> Result<usize, StoreError> {
    if ids.is_empty() && emails.is_empty() {
        return Ok(0);
    }
    // Found first on a reader (ingest keeps writing meanwhile), then overwritten by id.
    let mut found: Vec<i64> = Vec::new();
    {
        let conn = Connection::open_with_flags(
            data_dir.join(DB_FILE),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        configure(&conn)?;
        let mut candidates: Vec<i64> = {
            let mut stmt =
                conn.prepare("SELECT id FROM quarantine WHERE keyed = 0 AND raw != ?1")?;
            let rows = stmt.query_map([ERASED_PAYLOAD], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        {
            let mut stmt = conn.prepare("SELECT id FROM quarantine_keys WHERE key = ?1")?;
            for v in ids.iter().chain(emails) {
                let rows = stmt.query_map([&token_key(v)[..]], |r| r.get(0))?;
                for id in rows {
                    candidates.push(id?);
                }
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        let quoted = |v: &str| serde_json::to_string(v).expect("a string serialises");
        let under_id_key = ID_KEYS
            .map(|k| {
                format!("instr(t.fullkey || '.', '.{k}.') > 0 OR instr(t.fullkey, '.{k}[') > 0")
            })
            .join(" OR ");
        let value = "trim(CAST(t.atom AS TEXT))";
        for (values, test, anywhere) in [
            (
                ids,
                format!("({under_id_key}) AND {value} = ?2"),
                "instr(raw, ?3) > 0",
            ),
            (
                emails,
                format!("lower({value}) = lower(trim(?2))"),
                "instr(lower(raw), lower(?3)) > 0",
            ),
        ] {
            let mut stmt = conn.prepare(&format!(
                "SELECT id FROM quarantine WHERE id = ?4 AND raw != ?1
                   AND CASE WHEN json_valid(raw)
                       THEN EXISTS (SELECT 1 FROM json_tree(raw) t WHERE t.atom IS NOT NULL AND {test})
                       ELSE {anywhere} END"
            ))?;
            for v in values {
                for id in &candidates {
                    let rows =
                        stmt.query_map(params![ERASED_PAYLOAD, v, quoted(v), id], |r| r.get(0))?;
                    for id in rows {
                        found.push(id?);
                    }
                }
            }
        }
    }
    found.sort_unstable();
    found.dedup();
    if found.is_empty() {
        return Ok(0);
    }
    erasing(data_dir, |tx| {
        let mut up = tx.prepare(
            "UPDATE quarantine SET raw = ?2, message = 'erased', keyed = 1 WHERE id = ?1",
        )?;
        let mut keys = tx.prepare("DELETE FROM quarantine_keys WHERE id = ?1")?;
        let mut n = 0;
        for id in &found {
            n += up.execute(params![id, ERASED_PAYLOAD])?;
            keys.execute([id])?;
        }
        Ok(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_identifiers_and_emails_only() {
        let keys = tokens(
            r#"{"userId":" U-1 ","context":{"traits":{"email":"Jane@Example.com","name":"Jane"}},
                "batch":[{"anonymousId":[7,{"x":"a-9"}]}],"n":42}"#,
        )
        .unwrap();
        let mut want = vec![
            token_key("u-1"),
            token_key("jane@example.com"),
            token_key("7"),
            token_key("a-9"),
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(tokens("1"), Some(vec![]));
        assert_eq!(tokens("not json"), Some(vec![]));
        assert!(!is_json("not json") && is_json("[1]"));
        let many = format!(
            r#"{{"userId":[{}]}}"#,
            (0..=MAX_TOKENS)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(
            tokens(&many),
            None,
            "past the cap the row keeps no raw text"
        );
    }
}
