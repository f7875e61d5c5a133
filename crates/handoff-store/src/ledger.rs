//! The handoff ledger: an append-only, hash-chained record of every policy decision and every
//! handoff outcome, with Ed25519-signed checkpoints.
//!
//! Each entry's hash is SHA-256 over the previous entry's hash and the entry's canonical form
//! (a JSON array of its fields in a fixed order, sequence number included), so editing,
//! deleting or reordering entries breaks the chain at the first entry touched. Rewriting the
//! whole chain from some point on is caught by the checkpoints: every so often the head's
//! sequence number and hash are signed with a key that the database does not hold (it is
//! sealed under the master key), and a truncated tail is caught by checkpoints (and the
//! destinations' cursors) pointing past the end.
//!
//! Most entries are records of many events (see [`crate::ledger_records`]): the subject stage
//! writes one per batch naming who each event is about, and each destination one per vendor
//! request (and one per round for its blocks, retries and dead letters) listing its events by
//! sequence number with what was sent and why. Readers expand them into a [`Row`] per event.
//!
//! The ledger holds field names and data categories, never values.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use sha2::{Digest, Sha256};

use crate::{Seq, StoreError};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ledger (
    seq          INTEGER PRIMARY KEY,
    at_ms        INTEGER NOT NULL,
    kind         TEXT    NOT NULL,
    event_seq    INTEGER NOT NULL,
    message_id   TEXT    NOT NULL,
    subject      TEXT    NOT NULL,
    destination  TEXT    NOT NULL,
    vendor       TEXT    NOT NULL,
    shape        INTEGER NOT NULL,
    outcome      TEXT    NOT NULL,
    reasons      TEXT    NOT NULL,
    detail       TEXT    NOT NULL,
    prev_hash    BLOB    NOT NULL,
    hash         BLOB    NOT NULL
);
-- Indexes are what writing the ledger costs. Every entry about a person is found by subject
-- (a delivery straight from the journal has no decision entry before it); deliveries by vendor
-- and time.
DROP INDEX IF EXISTS ledger_by_subject;
DROP INDEX IF EXISTS ledger_deliveries_by_event;
CREATE INDEX IF NOT EXISTS ledger_by_subject_any ON ledger (subject, seq) WHERE subject != '';
CREATE INDEX IF NOT EXISTS ledger_deliveries_by_vendor ON ledger (vendor, at_ms) WHERE kind = 'delivery';
-- What was sent, and why, repeats from event to event: stored once, referenced by id. The hash
-- of each entry covers the text, so editing a shape shows as every entry using it altered.
CREATE TABLE IF NOT EXISTS ledger_shapes (
    id          INTEGER PRIMARY KEY,
    purposes    TEXT NOT NULL,
    legal_basis TEXT NOT NULL,
    categories  TEXT NOT NULL,
    fields      TEXT NOT NULL,
    UNIQUE (purposes, legal_basis, categories, fields)
);
CREATE TABLE IF NOT EXISTS ledger_checkpoints (
    seq        INTEGER PRIMARY KEY,
    hash       TEXT    NOT NULL,
    at_ms      INTEGER NOT NULL,
    public_key TEXT    NOT NULL,
    signature  TEXT    NOT NULL
);
";

/// The hash before the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// A checkpoint is signed after this many entries…
pub const CHECKPOINT_EVERY_ENTRIES: u64 = 1000;
/// …or when the last one is this old and entries came since.
pub const CHECKPOINT_EVERY_MS: i64 = 10_000;

/// What a kind of entry records.
pub mod kind {
    /// The policy decided for one event and one destination (outcome `send` or `block`).
    pub const DECISION: &str = "decision";
    /// What became of a queued handoff: `delivered`, `dead_lettered`, `replayed`, `discarded`,
    /// `purged` (erasure).
    pub const DELIVERY: &str = "delivery";
    /// A data-subject request was filed, or a vendor's part of one changed.
    pub const DSR: &str = "dsr";
    /// Identifiers of two subjects turned out to be one person.
    pub const SUBJECT: &str = "subject";
    /// The events of one batch the subject stage resolved: who each is about (see
    /// [`crate::ledger_records`]). Handoff records name their events by sequence number.
    pub const EVENTS: &str = "events";
}

/// One ledger entry as written; empty strings where a field does not apply.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    pub kind: &'static str,
    pub event_seq: Seq,
    pub message_id: String,
    pub subject: String,
    pub destination: String,
    pub vendor: String,
    /// Comma-separated.
    pub purposes: String,
    pub legal_basis: String,
    /// Comma-separated data categories of the fields sent.
    pub categories: String,
    /// Comma-separated field names sent (never values).
    pub fields: String,
    pub outcome: String,
    /// Comma-separated reason codes.
    pub reasons: String,
    pub detail: String,
    /// A record of many events: the first and last event's sequence numbers and the items
    /// (see [`crate::ledger_records`]); `None` for an entry of one.
    pub items: Option<Vec<u8>>,
    pub first_seq: Seq,
    pub last_seq: Seq,
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    pub seq: u64,
    pub at_ms: i64,
    pub kind: String,
    pub event_seq: Seq,
    pub message_id: String,
    pub subject: String,
    pub destination: String,
    pub vendor: String,
    pub purposes: String,
    pub legal_basis: String,
    pub categories: String,
    pub fields: String,
    pub outcome: String,
    pub reasons: String,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
    /// A record's items (`None` for an entry of one, and for rows expanded from a record).
    #[serde(skip)]
    pub items: Option<Vec<u8>>,
    #[serde(skip)]
    pub first_seq: Seq,
    #[serde(skip)]
    pub last_seq: Seq,
}

/// Selects stored entries as [`Row`]s (add `WHERE l.…` and `ORDER BY l.seq`).
pub const ROW_SELECT: &str = "SELECT l.seq, l.at_ms, l.kind, l.event_seq, l.message_id, l.subject, l.destination, l.vendor,
       coalesce(s.purposes, ''), coalesce(s.legal_basis, ''), coalesce(s.categories, ''), coalesce(s.fields, ''),
       l.outcome, l.reasons, l.detail, l.prev_hash, l.hash, l.items, l.first_seq, l.last_seq
FROM ledger l LEFT JOIN ledger_shapes s ON s.id = l.shape";

/// Purposes, legal basis, categories and fields of an entry: what [`ShapeCache`] interns.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape {
    pub purposes: String,
    pub legal_basis: String,
    pub categories: String,
    pub fields: String,
}

/// Shape ids known to this process. Cleared when a transaction that may have added one rolls
/// back (its id would point nowhere).
#[derive(Default)]
pub struct ShapeCache(std::sync::Mutex<ShapeMaps>);

#[derive(Default)]
struct ShapeMaps {
    ids: std::collections::HashMap<Shape, i64>,
    shapes: std::collections::HashMap<i64, Shape>,
}

impl ShapeCache {
    fn maps(&self) -> std::sync::MutexGuard<'_, ShapeMaps> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn clear(&self) {
        let mut m = self.maps();
        m.ids.clear();
        m.shapes.clear();
    }

    /// The id of `shape`, stored now if new (inside the caller's transaction).
    pub fn id(&self, conn: &Connection, shape: &Shape) -> Result<i64, StoreError> {
        if shape == &Shape::default() {
            return Ok(0);
        }
        if let Some(id) = self.maps().ids.get(shape) {
            return Ok(*id);
        }
        conn.prepare_cached(
            "INSERT OR IGNORE INTO ledger_shapes (purposes, legal_basis, categories, fields) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![shape.purposes, shape.legal_basis, shape.categories, shape.fields])?;
        let id: i64 = conn
            .prepare_cached(
                "SELECT id FROM ledger_shapes WHERE purposes = ?1 AND legal_basis = ?2 AND categories = ?3 AND fields = ?4",
            )?
            .query_row(
                params![shape.purposes, shape.legal_basis, shape.categories, shape.fields],
                |r| r.get(0),
            )?;
        let mut m = self.maps();
        m.ids.insert(shape.clone(), id);
        m.shapes.insert(id, shape.clone());
        Ok(id)
    }

    /// The shape stored under `id` (empty for 0 or an unknown id).
    pub fn get(&self, conn: &Connection, id: i64) -> Result<Shape, StoreError> {
        if id == 0 {
            return Ok(Shape::default());
        }
        if let Some(s) = self.maps().shapes.get(&id) {
            return Ok(s.clone());
        }
        let shape = conn
            .prepare_cached(
                "SELECT purposes, legal_basis, categories, fields FROM ledger_shapes WHERE id = ?1",
            )?
            .query_row([id], |r| {
                Ok(Shape {
                    purposes: r.get(0)?,
                    legal_basis: r.get(1)?,
                    categories: r.get(2)?,
                    fields: r.get(3)?,
                })
            })
            .optional()?
            .unwrap_or_default();
        let mut m = self.maps();
        m.ids.insert(shape.clone(), id);
        m.shapes.insert(id, shape.clone());
        Ok(shape)
    }
}

impl Entry {
    pub fn shape(&self) -> Shape {
        Shape {
            purposes: self.purposes.clone(),
            legal_basis: self.legal_basis.clone(),
            categories: self.categories.clone(),
            fields: self.fields.clone(),
        }
    }

    pub fn set_shape(&mut self, s: Shape) {
        self.purposes = s.purposes;
        self.legal_basis = s.legal_basis;
        self.categories = s.categories;
        self.fields = s.fields;
    }
}

pub fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        seq: r.get::<_, i64>(0)? as u64,
        at_ms: r.get(1)?,
        kind: r.get(2)?,
        event_seq: r.get::<_, i64>(3)? as Seq,
        message_id: r.get(4)?,
        subject: r.get(5)?,
        destination: r.get(6)?,
        vendor: r.get(7)?,
        purposes: r.get(8)?,
        legal_basis: r.get(9)?,
        categories: r.get(10)?,
        fields: r.get(11)?,
        outcome: r.get(12)?,
        reasons: r.get(13)?,
        detail: r.get(14)?,
        prev_hash: hex(&r.get::<_, Vec<u8>>(15)?),
        hash: hex(&r.get::<_, Vec<u8>>(16)?),
        // Whatever type an edit left there: a tampered ledger gets a verdict, not an error.
        items: match r.get::<_, rusqlite::types::Value>(17)? {
            rusqlite::types::Value::Blob(b) => Some(b),
            rusqlite::types::Value::Text(t) => Some(t.into_bytes()),
            rusqlite::types::Value::Null => None,
            other => Some(format!("{other:?}").into_bytes()),
        },
        first_seq: r.get::<_, i64>(18)? as Seq,
        last_seq: r.get::<_, i64>(19)? as Seq,
    })
}

/// The canonical form an entry's hash covers: a JSON array of its fields in a fixed order.
/// Works on an [`Entry`] being written and a [`Row`] being verified (same field names).
macro_rules! canonical {
    ($seq:expr, $at_ms:expr, $kind:expr, $e:expr) => {
        serde_json::to_string(&(
            $seq,
            $at_ms,
            $kind,
            $e.event_seq,
            &$e.message_id,
            &$e.subject,
            &$e.destination,
            &$e.vendor,
            &$e.purposes,
            &$e.legal_basis,
            &$e.categories,
            &$e.fields,
            &$e.outcome,
            &$e.reasons,
            &$e.detail,
        ))
        .expect("a tuple of strings and numbers serialises")
    };
}

/// SHA-256 over the previous entry's hash (hex) and this entry's canonical form.
#[cfg(test)]
fn chain(prev_hash: &str, canonical: &str) -> [u8; 32] {
    chain_record(prev_hash, canonical, None)
}

/// [`chain`], for a record of many events also over its range and items.
fn chain_record(prev_hash: &str, canonical: &str, record: Option<(Seq, Seq, &[u8])>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(canonical.as_bytes());
    if let Some((first, last, items)) = record {
        h.update(format!("\n{first}\n{last}\n").as_bytes());
        h.update(items);
    }
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    base16ct::lower::encode_string(bytes)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    base16ct::mixed::decode_vec(s).ok()
}

/// What a checkpoint signature covers.
fn checkpoint_message(seq: u64, hash: &str, at_ms: i64) -> Vec<u8> {
    format!("handoff ledger checkpoint v1\n{seq}\n{hash}\n{at_ms}").into_bytes()
}

/// The public half of a ledger key, hex (what `audit verify --public-key` takes).
pub fn public_key_hex(key: &SigningKey) -> String {
    hex(key.verifying_key().as_bytes())
}

pub fn parse_public_key(s: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = unhex(s.trim())?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// The last entry's sequence number and hash (0 and [`GENESIS`] when empty).
pub fn tail(conn: &Connection) -> Result<(u64, String), StoreError> {
    let row: Option<(i64, Vec<u8>)> = conn
        .prepare_cached("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row.map_or((0, GENESIS.to_owned()), |(s, h)| (s as u64, hex(&h))))
}

/// Appends `entries` in order (inside the caller's transaction) and signs a checkpoint when one
/// is due and a key is given.
pub fn append(
    tx: &Transaction<'_>,
    shapes: &ShapeCache,
    entries: &[Entry],
    at_ms: i64,
    signer: Option<&SigningKey>,
) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let (mut seq, mut prev) = tail(tx)?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO ledger (seq, at_ms, kind, event_seq, message_id, subject, destination, vendor, shape,
           outcome, reasons, detail, prev_hash, hash, items, first_seq, last_seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )?;
    let mut prev_bytes: [u8; 32] = unhex(&prev)
        .and_then(|b| b.try_into().ok())
        .unwrap_or([0; 32]);
    // The last checkpoint: one is signed every CHECKPOINT_EVERY_ENTRIES entries (also inside a
    // batch), so `verify` can require that no longer stretch goes unsigned.
    let last: Option<(u64, i64)> = tx
        .prepare_cached("SELECT seq, at_ms FROM ledger_checkpoints ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
        .optional()?;
    let (mut last_seq, last_at) = last.map_or((0, None), |(s, t)| (s, Some(t)));
    for e in entries {
        seq += 1;
        let hash_bytes = chain_record(
            &prev,
            &canonical!(seq, at_ms, e.kind, e),
            e.items
                .as_deref()
                .map(|items| (e.first_seq, e.last_seq, items)),
        );
        let hash = hex(&hash_bytes);
        let shape = shapes.id(tx, &e.shape())?;
        insert.execute(params![
            seq as i64,
            at_ms,
            e.kind,
            e.event_seq as i64,
            e.message_id,
            e.subject,
            e.destination,
            e.vendor,
            shape,
            e.outcome,
            e.reasons,
            e.detail,
            &prev_bytes[..],
            &hash_bytes[..],
            e.items,
            e.first_seq as i64,
            e.last_seq as i64
        ])?;
        if let Some(key) = signer
            && seq - last_seq >= CHECKPOINT_EVERY_ENTRIES
        {
            sign_checkpoint(tx, key, seq, &hash, at_ms)?;
            last_seq = seq;
        }
        prev = hash;
        prev_bytes = hash_bytes;
    }
    if let Some(key) = signer
        && last_seq < seq
        && last_at.is_none_or(|t| at_ms - t >= CHECKPOINT_EVERY_MS)
    {
        sign_checkpoint(tx, key, seq, &prev, at_ms)?;
    }
    Ok(())
}

/// The longest stretch of entries `verify` accepts without a signed checkpoint: the signing
/// cadence, with room for entries appended by operator commands while no gateway signed.
pub const MAX_UNSIGNED: u64 = 10 * CHECKPOINT_EVERY_ENTRIES;

fn sign_checkpoint(
    conn: &Connection,
    key: &SigningKey,
    seq: u64,
    hash: &str,
    at_ms: i64,
) -> Result<(), StoreError> {
    let sig = key.sign(&checkpoint_message(seq, hash, at_ms));
    conn.execute(
        "INSERT OR REPLACE INTO ledger_checkpoints (seq, hash, at_ms, public_key, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            seq as i64,
            hash,
            at_ms,
            public_key_hex(key),
            hex(&sig.to_bytes())
        ],
    )?;
    Ok(())
}

/// Signs a checkpoint at the current head (at shutdown, or on demand), unless one is there.
pub fn checkpoint_now(conn: &Connection, key: &SigningKey, at_ms: i64) -> Result<(), StoreError> {
    let (seq, hash) = tail(conn)?;
    if seq == 0 {
        return Ok(());
    }
    let exists: Option<i64> = conn
        .query_row(
            "SELECT seq FROM ledger_checkpoints WHERE seq = ?1",
            [seq as i64],
            |r| r.get(0),
        )
        .optional()?;
    if exists.is_none() {
        sign_checkpoint(conn, key, seq, &hash, at_ms)?;
    }
    Ok(())
}

/// The result of walking the ledger.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verification {
    pub entries: u64,
    pub checkpoints: u64,
    pub head_seq: u64,
    pub head_hash: String,
    /// The first problem found: the entry (or checkpoint) that does not verify, and why.
    pub problem: Option<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub seq: u64,
    pub code: &'static str,
    pub message: String,
}

/// Walks the whole chain and every checkpoint. `cursors` (each destination's position in the
/// journal), when given, must be covered by that destination's entries: every event a
/// destination passed has one, so a ledger cut short together with its checkpoints still
/// disagrees with them.
pub fn verify(
    conn: &Connection,
    key: &VerifyingKey,
    cursors: Option<&[(String, Seq)]>,
) -> Result<Verification, StoreError> {
    let mut stmt = conn.prepare(&format!("{ROW_SELECT} ORDER BY l.seq"))?;
    let mut rows = stmt.query([])?;
    let mut prev = GENESIS.to_owned();
    let mut expected_seq = 1u64;
    let mut entries = 0u64;
    let mut problem: Option<Problem> = None;
    let mut hashes: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    let mut last_recorded: std::collections::HashMap<String, Seq> =
        std::collections::HashMap::new();
    // (seq, hash, at_ms, public key, signature), in order.
    let cps = conn
        .prepare(
            "SELECT seq, hash, at_ms, public_key, signature FROM ledger_checkpoints ORDER BY seq",
        )?
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    while let Some(r) = rows.next()? {
        let row = read_row(r)?;
        entries += 1;
        if problem.is_none() {
            if row.seq != expected_seq {
                problem = Some(Problem {
                    seq: expected_seq,
                    code: "ledger.entry.missing",
                    message: format!(
                        "entry {expected_seq} is missing: the next entry is {}",
                        row.seq
                    ),
                });
            } else if row.prev_hash != prev {
                problem = Some(Problem {
                    seq: row.seq,
                    code: "ledger.chain.broken",
                    message: format!(
                        "entry {} does not follow entry {}: its previous-hash differs",
                        row.seq,
                        row.seq - 1
                    ),
                });
            } else if hex(&chain_record(
                &prev,
                &canonical!(row.seq, row.at_ms, &row.kind, row),
                row.items
                    .as_deref()
                    .map(|items| (row.first_seq, row.last_seq, items)),
            )) != row.hash
                || row.items.as_deref().is_some_and(|items| {
                    if row.kind == kind::EVENTS {
                        crate::ledger_records::decode_events(items).is_err()
                    } else {
                        crate::ledger_records::decode_handoffs(items).is_err()
                    }
                })
            {
                problem = Some(Problem {
                    seq: row.seq,
                    code: "ledger.entry.altered",
                    message: format!(
                        "entry {} was altered: its content does not match its hash",
                        row.seq
                    ),
                });
            }
        }
        if cps.binary_search_by_key(&row.seq, |c| c.0).is_ok() {
            hashes.insert(row.seq, row.hash.clone());
        }
        if (row.kind == kind::DECISION || row.kind == kind::DELIVERY)
            && (cursors.is_some_and(|c| c.iter().any(|(d, _)| *d == row.destination)))
        {
            let last = last_recorded.entry(row.destination.clone()).or_default();
            *last = (*last).max(row.event_seq).max(row.last_seq);
        }
        expected_seq = row.seq + 1;
        prev = row.hash;
    }
    let head_seq = expected_seq - 1;
    let mut checkpoints = 0u64;
    if problem.is_none() {
        let mut signed_up_to = 0u64;
        for (seq, hash, at_ms, public_key, signature) in cps {
            checkpoints += 1;
            let sig = unhex(&signature)
                .and_then(|b| <[u8; 64]>::try_from(b).ok())
                .map(|b| Signature::from_bytes(&b));
            let signed = public_key.eq_ignore_ascii_case(&hex(key.as_bytes()))
                && sig.is_some_and(|s| {
                    key.verify(&checkpoint_message(seq, &hash, at_ms), &s)
                        .is_ok()
                });
            let p = if !signed {
                Some((
                    "ledger.checkpoint.forged",
                    format!("the checkpoint at entry {seq} is not signed by the ledger key"),
                ))
            } else if seq > head_seq {
                Some((
                    "ledger.truncated",
                    format!(
                        "a signed checkpoint covers entry {seq}, but the ledger ends at entry {head_seq}: entries were removed"
                    ),
                ))
            } else if hashes.get(&seq) != Some(&hash) {
                Some((
                    "ledger.rewritten",
                    format!(
                        "entry {seq} differs from what the checkpoint signed: the chain was rewritten"
                    ),
                ))
            } else if seq - signed_up_to > MAX_UNSIGNED {
                Some((
                    "ledger.checkpoint.missing",
                    format!(
                        "entries {} to {seq} have no signed checkpoint: checkpoints were removed",
                        signed_up_to + 1
                    ),
                ))
            } else {
                None
            };
            if let Some((code, message)) = p {
                let at = if code == "ledger.checkpoint.missing" {
                    signed_up_to + 1
                } else {
                    seq
                };
                problem = Some(Problem {
                    seq: at,
                    code,
                    message,
                });
                break;
            }
            signed_up_to = seq;
        }
        // Every entry but a short unsigned tail (appended since the last checkpoint) must be
        // under a signature; a ledger whose checkpoints were deleted is not.
        if problem.is_none()
            && head_seq > 0
            && (checkpoints == 0 || head_seq - signed_up_to > MAX_UNSIGNED)
        {
            problem = Some(Problem {
                seq: signed_up_to + 1,
                code: "ledger.checkpoint.missing",
                message: format!(
                    "entries {} to {head_seq} have no signed checkpoint: checkpoints were removed",
                    signed_up_to + 1
                ),
            });
        }
    }
    if problem.is_none()
        && let Some(cursors) = cursors
        && let Some((destination, pos, last)) = cursors.iter().find_map(|(d, pos)| {
            let last = last_recorded.get(d).copied().unwrap_or(0);
            (*pos > last).then_some((d, *pos, last))
        })
    {
        problem = Some(Problem {
            seq: head_seq + 1,
            code: "ledger.truncated",
            message: format!(
                "destination {destination} passed journal event {pos}, but the ledger's last record for it is of event {last}: entries were removed"
            ),
        });
    }
    Ok(Verification {
        entries,
        checkpoints,
        head_seq,
        head_hash: prev,
        problem,
    })
}

/// The widest range of event sequence numbers one record may cover: what a query for the
/// records holding an event scans past it. Records are written per batch of at most a few
/// hundred consecutive events, so this is never reached; writers cut batches at it.
pub const RECORD_SPAN: Seq = 10_000;

/// Schema that needs the columns records added (created after they are).
pub const RECORD_SCHEMA: &str = "
CREATE INDEX IF NOT EXISTS ledger_records_by_last_seq ON ledger (last_seq) WHERE items IS NOT NULL;
-- Derived from the events records: which events are about whom.
CREATE TABLE IF NOT EXISTS ledger_subjects (
    subject   TEXT    NOT NULL,
    event_seq INTEGER NOT NULL,
    PRIMARY KEY (subject, event_seq)
) WITHOUT ROWID;
";

/// An events record for `items` (see [`kind::EVENTS`]), and indexes who each event is about.
pub fn events_record(
    conn: &Connection,
    items: &[crate::ledger_records::EventItem],
) -> Result<Option<Entry>, StoreError> {
    let (Some(first), Some(last)) = (items.first(), items.last()) else {
        return Ok(None);
    };
    let mut index = conn.prepare_cached(
        "INSERT OR IGNORE INTO ledger_subjects (subject, event_seq) VALUES (?1, ?2)",
    )?;
    for i in items.iter().filter(|i| !i.subject.is_empty()) {
        index.execute(params![i.subject, i.seq as i64])?;
    }
    Ok(Some(Entry {
        kind: kind::EVENTS,
        event_seq: first.seq,
        first_seq: first.seq,
        last_seq: last.seq,
        items: Some(crate::ledger_records::encode_events(items)),
        ..Entry::default()
    }))
}

/// Journal events about `subject` (not following merges), per the events records.
pub fn subject_events(conn: &Connection, subject: &str) -> Result<Vec<Seq>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT event_seq FROM ledger_subjects WHERE subject = ?1")?;
    let seqs = stmt
        .query_map([subject], |r| r.get::<_, i64>(0).map(|s| s as Seq))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(seqs)
}

/// What one report has decoded already: shapes by id, events records by their entry's
/// sequence number (a batch's events record serves every destination's records of it).
#[derive(Default)]
struct Decoded {
    shapes: std::collections::HashMap<i64, Shape>,
    events: std::collections::HashMap<u64, std::sync::Arc<Vec<crate::ledger_records::EventItem>>>,
}

/// Who each event in `[first, last]` is about: sequence number → (message id, subject).
fn named_events(
    conn: &Connection,
    first: Seq,
    last: Seq,
    decoded: &mut Decoded,
) -> Result<std::collections::HashMap<Seq, (String, String)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq FROM ledger WHERE items IS NOT NULL AND kind = 'events'
           AND last_seq >= ?1 AND last_seq <= ?2 + ?3 AND first_seq <= ?2",
    )?;
    let records = stmt
        .query_map(
            params![first as i64, last as i64, RECORD_SPAN as i64],
            |r| r.get::<_, i64>(0),
        )?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = std::collections::HashMap::new();
    for record in records {
        let items = match decoded.events.get(&(record as u64)) {
            Some(items) => items.clone(),
            None => {
                let blob: Vec<u8> = conn
                    .prepare_cached("SELECT items FROM ledger WHERE seq = ?1")?
                    .query_row([record], |r| r.get(0))?;
                let items = std::sync::Arc::new(crate::ledger_records::decode_events(&blob)?);
                decoded.events.insert(record as u64, items.clone());
                items
            }
        };
        let from = items.partition_point(|e| e.seq < first);
        for e in items[from..].iter().take_while(|e| e.seq <= last) {
            out.insert(e.seq, (e.message_id.clone(), e.subject.clone()));
        }
    }
    Ok(out)
}

/// The rows of a handoff record, one per event `keep` accepts (a row of one is kept as is).
fn expand(
    conn: &Connection,
    row: Row,
    keep: &dyn Fn(Seq) -> bool,
    decoded: &mut Decoded,
) -> Result<Vec<Row>, StoreError> {
    let Some(items) = row.items.as_deref() else {
        return Ok(vec![row]);
    };
    if row.kind == kind::EVENTS {
        return Ok(Vec::new());
    }
    let items: Vec<_> = crate::ledger_records::decode_handoffs(items)?
        .into_iter()
        .filter(|i| keep(i.seq))
        .collect();
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let names = named_events(conn, row.first_seq, row.last_seq, decoded)?;
    let mut out = Vec::new();
    for i in items {
        let shape = match decoded.shapes.get(&i.shape) {
            Some(s) => s.clone(),
            None => {
                let s = ShapeCache::default().get(conn, i.shape)?;
                decoded.shapes.insert(i.shape, s.clone());
                s
            }
        };
        let (message_id, subject) = names.get(&i.seq).cloned().unwrap_or_default();
        out.push(Row {
            event_seq: i.seq,
            message_id,
            subject,
            purposes: shape.purposes,
            legal_basis: shape.legal_basis,
            categories: shape.categories,
            fields: shape.fields,
            reasons: i.reasons,
            detail: i.detail,
            items: None,
            first_seq: 0,
            last_seq: 0,
            ..row.clone()
        });
    }
    Ok(out)
}

/// The (destination, vendor) of every record that delivered one of `seqs` (events records
/// are not read: only whether the vendor got the event matters).
pub fn delivered_to(
    conn: &Connection,
    seqs: &std::collections::BTreeSet<Seq>,
) -> Result<std::collections::BTreeSet<(String, String)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, destination, vendor, items FROM ledger WHERE items IS NOT NULL
           AND kind = 'delivery' AND outcome = 'delivered'
           AND last_seq >= ?1 AND last_seq <= ?1 + ?2 AND first_seq <= ?1",
    )?;
    let mut checked: std::collections::HashSet<i64> = std::collections::HashSet::new();
    let mut out = std::collections::BTreeSet::new();
    for seq in seqs {
        let rows = stmt
            .query_map(params![*seq as i64, RECORD_SPAN as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        for (record, destination, vendor, items) in rows {
            if out.contains(&(destination.clone(), vendor.clone())) || !checked.insert(record) {
                continue;
            }
            if crate::ledger_records::decode_handoffs(&items)?
                .iter()
                .any(|i| seqs.contains(&i.seq))
            {
                out.insert((destination, vendor));
            }
        }
    }
    Ok(out)
}

/// Every entry about `subject` and the subjects merged into it, oldest first (a record of
/// many events gives a row for each of theirs).
pub fn for_subject(conn: &Connection, subject: &str) -> Result<Vec<Row>, StoreError> {
    let mut rows = Vec::new();
    let mut seqs = std::collections::BTreeSet::new();
    for id in crate::subjects::aliases(conn, subject)? {
        rows.extend(for_one_subject(conn, &id)?);
        seqs.extend(subject_events(conn, &id)?);
    }
    // The handoff records holding any of those events.
    let mut records: std::collections::BTreeMap<u64, Row> = std::collections::BTreeMap::new();
    {
        let mut stmt = conn.prepare_cached(&format!(
            "{ROW_SELECT} WHERE l.items IS NOT NULL AND l.kind != 'events'
               AND l.last_seq >= ?1 AND l.last_seq <= ?1 + ?2 AND l.first_seq <= ?1"
        ))?;
        for seq in &seqs {
            for r in stmt.query_map(params![*seq as i64, RECORD_SPAN as i64], read_row)? {
                let r = r?;
                records.entry(r.seq).or_insert(r);
            }
        }
    }
    let mut decoded = Decoded::default();
    for (_, r) in records {
        rows.extend(expand(conn, r, &|s| seqs.contains(&s), &mut decoded)?);
    }
    rows.sort_by_key(|r| (r.seq, r.event_seq));
    Ok(rows)
}

fn for_one_subject(conn: &Connection, subject: &str) -> Result<Vec<Row>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "{ROW_SELECT} WHERE l.subject = ?1 AND l.subject != '' ORDER BY l.seq"
    ))?;
    let rows = stmt
        .query_map([subject], read_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Handoffs vendors accepted in `[from_ms, to_ms)`, of one vendor or all, oldest first.
pub fn delivered(
    conn: &Connection,
    to: Recipient<'_>,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<Row>, StoreError> {
    let (vendor, destination) = match to {
        Recipient::All => (None, None),
        Recipient::Vendor(v) => (Some(v), None),
        Recipient::Destination(d) => (None, Some(d)),
    };
    let mut stmt = conn.prepare_cached(&format!(
        "{ROW_SELECT}
         WHERE l.kind = 'delivery' AND l.outcome = 'delivered' AND (?1 IS NULL OR l.vendor = ?1)
           AND (?4 IS NULL OR l.destination = ?4)
           AND l.at_ms >= ?2 AND l.at_ms < ?3 ORDER BY l.seq"
    ))?;
    let found = stmt
        .query_map(params![vendor, from_ms, to_ms, destination], read_row)?
        .collect::<Result<Vec<_>, _>>()?;
    let mut rows = Vec::with_capacity(found.len());
    let mut decoded = Decoded::default();
    for r in found {
        rows.extend(expand(conn, r, &|_| true, &mut decoded)?);
    }
    Ok(rows)
}

/// Whose handoffs a report reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipient<'a> {
    All,
    Vendor(&'a str),
    Destination(&'a str),
}

/// Every (vendor, destination) the ledger records a delivery to.
pub fn recipients(conn: &Connection) -> Result<Vec<(String, String)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT vendor, destination FROM ledger WHERE kind = 'delivery' ORDER BY 1, 2",
    )?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::OutboxStore;

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    fn entry(i: u64) -> Entry {
        Entry {
            kind: kind::DECISION,
            event_seq: i,
            message_id: format!("m-{i}"),
            subject: format!("sub_{}", i % 3),
            destination: "hook".into(),
            vendor: "acme".into(),
            purposes: "support".into(),
            legal_basis: "contract".into(),
            categories: "activity".into(),
            fields: "event,userId".into(),
            outcome: "send".into(),
            ..Entry::default()
        }
    }

    /// A store with `n` entries in batches of 5, a checkpoint signed after each batch of 1000
    /// or 10 s (here: the first batch) and one at the head.
    fn ledger(n: u64) -> (tempfile::TempDir, OutboxStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = OutboxStore::open(dir.path()).unwrap();
        store.set_ledger_signer(key(7));
        for batch in (1..=n).collect::<Vec<_>>().chunks(5) {
            store
                .transact(|_| Ok(((), batch.iter().map(|i| entry(*i)).collect())))
                .unwrap();
        }
        store.checkpoint_ledger().unwrap();
        (dir, store)
    }

    fn check(store: &OutboxStore) -> Verification {
        store
            .with_conn(|c| verify(c, &key(7).verifying_key(), None))
            .unwrap()
    }

    fn tamper(store: &OutboxStore, sql: &str) {
        store.with_conn(|c| Ok(c.execute_batch(sql)?)).unwrap();
    }

    #[test]
    fn an_untouched_ledger_verifies() {
        let (_d, store) = ledger(20);
        let v = check(&store);
        assert_eq!(v.problem, None);
        assert_eq!((v.entries, v.head_seq), (20, 20));
        assert!(v.checkpoints >= 2, "the first batch's and the head's");
    }

    #[test]
    fn an_edited_entry_is_named() {
        let (_d, store) = ledger(20);
        tamper(&store, "UPDATE ledger SET outcome = 'block' WHERE seq = 7");
        let p = check(&store).problem.unwrap();
        assert_eq!((p.seq, p.code), (7, "ledger.entry.altered"));
    }

    #[test]
    fn an_edited_shape_shows_as_the_first_entry_using_it_altered() {
        let (_d, store) = ledger(20);
        tamper(&store, "UPDATE ledger_shapes SET fields = 'event'");
        let p = check(&store).problem.unwrap();
        assert_eq!((p.seq, p.code), (1, "ledger.entry.altered"));
        tamper(&store, "DELETE FROM ledger_shapes");
        assert_eq!(check(&store).problem.unwrap().seq, 1);
    }

    #[test]
    fn a_deleted_entry_is_named() {
        let (_d, store) = ledger(20);
        tamper(&store, "DELETE FROM ledger WHERE seq = 12");
        let p = check(&store).problem.unwrap();
        assert_eq!((p.seq, p.code), (12, "ledger.entry.missing"));
    }

    #[test]
    fn reordered_entries_are_detected() {
        let (_d, store) = ledger(20);
        // Swap the contents of entries 4 and 5 (hashes and all).
        tamper(
            &store,
            "UPDATE ledger SET seq = -4 WHERE seq = 4; UPDATE ledger SET seq = 4 WHERE seq = 5;
             UPDATE ledger SET seq = 5 WHERE seq = -4;",
        );
        let p = check(&store).problem.unwrap();
        assert_eq!(p.seq, 4);
        assert_eq!(p.code, "ledger.chain.broken");
    }

    #[test]
    fn a_truncated_tail_is_detected_by_the_checkpoint_past_the_end() {
        let (_d, store) = ledger(20);
        tamper(&store, "DELETE FROM ledger WHERE seq > 15");
        let p = check(&store).problem.unwrap();
        assert_eq!((p.seq, p.code), (20, "ledger.truncated"));
    }

    #[test]
    fn a_truncated_tail_without_its_checkpoints_disagrees_with_the_router() {
        let (_d, store) = ledger(20);
        tamper(
            &store,
            "DELETE FROM ledger WHERE seq > 15; DELETE FROM ledger_checkpoints WHERE seq > 15;",
        );
        assert_eq!(check(&store).problem, None, "the chain alone cannot tell");
        let p = store
            .with_conn(|c| verify(c, &key(7).verifying_key(), Some(&[("hook".into(), 20)])))
            .unwrap()
            .problem
            .unwrap();
        assert_eq!(p.code, "ledger.truncated");
    }

    #[test]
    fn a_rewritten_chain_fails_the_signed_checkpoints() {
        let (_d, store) = ledger(20);
        // An intruder rewrites entry 3 and re-chains everything after it, consistently.
        let rows: Vec<Row> = store
            .with_conn(|c| {
                let mut s = c.prepare(&format!("{ROW_SELECT} ORDER BY l.seq"))?;
                let rows = s.query_map([], read_row)?.collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .unwrap();
        let mut prev = GENESIS.to_owned();
        for mut r in rows {
            if r.seq == 3 {
                r.outcome = "block".into();
            }
            let h = hex(&chain(&prev, &canonical!(r.seq, r.at_ms, &r.kind, r)));
            tamper(
                &store,
                &format!(
                    "UPDATE ledger SET outcome = '{}', prev_hash = x'{prev}', hash = x'{h}' WHERE seq = {}",
                    r.outcome, r.seq
                ),
            );
            prev = h;
        }
        let p = check(&store).problem.unwrap();
        assert_eq!(p.code, "ledger.rewritten");
        // …and re-signing with a key of their own does not help.
        store
            .with_conn(|c| {
                c.execute("DELETE FROM ledger_checkpoints", [])?;
                checkpoint_now(c, &key(9), 1)
            })
            .unwrap();
        let p = check(&store).problem.unwrap();
        assert_eq!(p.code, "ledger.checkpoint.forged");
    }

    #[test]
    fn deleting_the_checkpoints_is_detected() {
        let (_d, store) = ledger(20);
        tamper(&store, "DELETE FROM ledger_checkpoints");
        let p = check(&store).problem.unwrap();
        assert_eq!((p.seq, p.code), (1, "ledger.checkpoint.missing"));
    }

    #[test]
    fn long_batches_are_signed_every_thousand_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = OutboxStore::open(dir.path()).unwrap();
        store.set_ledger_signer(key(7));
        store
            .transact(|_| Ok(((), (1..=2500).map(entry).collect())))
            .unwrap();
        let seqs: Vec<i64> = store
            .with_conn(|c| {
                let mut s = c.prepare("SELECT seq FROM ledger_checkpoints ORDER BY seq")?;
                let v = s.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
                Ok(v)
            })
            .unwrap();
        assert_eq!(seqs, [1000, 2000, 2500]);
        assert_eq!(check(&store).problem, None);
    }

    #[test]
    fn a_forged_signature_is_detected() {
        let (_d, store) = ledger(10);
        tamper(
            &store,
            "UPDATE ledger_checkpoints SET signature = substr(signature, 3) || '00' WHERE seq = 5",
        );
        let p = check(&store).problem.unwrap();
        assert_eq!((p.seq, p.code), (5, "ledger.checkpoint.forged"));
    }

    /// A store holding an events record for events 1-6 (two people) and one handoff record of
    /// a vendor request with events 2, 4 and 6.
    fn records() -> (tempfile::TempDir, OutboxStore) {
        use crate::ledger_records::{EventItem, HandoffItem, encode_handoffs};
        let dir = tempfile::tempdir().unwrap();
        let store = OutboxStore::open(dir.path()).unwrap();
        store.set_ledger_signer(key(7));
        store
            .transact(|tx| {
                let named: Vec<EventItem> = (1..=6)
                    .map(|i| EventItem {
                        seq: i,
                        message_id: format!("m-{i}"),
                        subject: if i % 2 == 0 { "sub_ann" } else { "sub_bob" }.into(),
                    })
                    .collect();
                let events = events_record(tx, &named)?.unwrap();
                let shape = ShapeCache::default().id(
                    tx,
                    &Shape {
                        purposes: "advertising".into(),
                        legal_basis: "consent".into(),
                        categories: "contact".into(),
                        fields: "data.user_data.em".into(),
                    },
                )?;
                let items: Vec<HandoffItem> = [2, 4, 6]
                    .iter()
                    .map(|seq| HandoffItem {
                        seq: *seq,
                        shape,
                        reasons: String::new(),
                        detail: String::new(),
                    })
                    .collect();
                let sent = Entry {
                    kind: kind::DELIVERY,
                    event_seq: 2,
                    destination: "meta".into(),
                    vendor: "meta".into(),
                    outcome: "delivered".into(),
                    items: Some(encode_handoffs(&items)),
                    first_seq: 2,
                    last_seq: 6,
                    ..Entry::default()
                };
                Ok(((), vec![events, sent]))
            })
            .unwrap();
        store.checkpoint_ledger().unwrap();
        (dir, store)
    }

    #[test]
    fn a_record_of_many_events_reads_as_a_row_for_each_and_names_the_person() {
        let (_d, store) = records();
        assert_eq!(check(&store).problem, None);
        let ann = store.with_conn(|c| for_subject(c, "sub_ann")).unwrap();
        let seen: Vec<(u64, &str, &str, &str)> = ann
            .iter()
            .map(|r| {
                (
                    r.event_seq,
                    r.message_id.as_str(),
                    r.outcome.as_str(),
                    r.fields.as_str(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (2, "m-2", "delivered", "data.user_data.em"),
                (4, "m-4", "delivered", "data.user_data.em"),
                (6, "m-6", "delivered", "data.user_data.em"),
            ]
        );
        assert!(ann.iter().all(|r| r.subject == "sub_ann" && r.seq == 2));
        assert!(
            store
                .with_conn(|c| for_subject(c, "sub_bob"))
                .unwrap()
                .is_empty(),
            "bob's events were not sent"
        );
        let all = store
            .with_conn(|c| delivered(c, Recipient::All, 0, i64::MAX))
            .unwrap();
        assert_eq!(all.len(), 3);
        let to = |seqs: &[Seq]| {
            store
                .with_conn(|c| delivered_to(c, &seqs.iter().copied().collect()))
                .unwrap()
        };
        assert_eq!(
            to(&[4]).into_iter().collect::<Vec<_>>(),
            [("meta".to_owned(), "meta".to_owned())]
        );
        assert!(to(&[3, 5]).is_empty(), "in the record's range, not in it");
    }

    #[test]
    fn an_edited_record_is_named_whether_its_items_or_its_range_changed() {
        for edit in [
            // Another event said to have been sent (the last item's seq changed).
            "UPDATE ledger SET items = substr(items, 1, length(items) - 4) || x'03' || substr(items, length(items) - 2) WHERE seq = 2",
            "UPDATE ledger SET last_seq = 9 WHERE seq = 2",
            "UPDATE ledger SET items = x'01ff' WHERE seq = 2",
            // Who an event was about.
            "UPDATE ledger SET items = replace(items, CAST('sub_ann' AS BLOB), CAST('sub_eve' AS BLOB)) WHERE seq = 1",
        ] {
            let (_d, store) = records();
            tamper(&store, edit);
            let p = check(&store).problem.expect(edit);
            assert_eq!(p.code, "ledger.entry.altered", "{edit}");
            assert!(p.seq == 1 || p.seq == 2, "{edit}: {}", p.seq);
        }
    }

    #[test]
    fn a_destination_whose_records_were_cut_off_disagrees_with_its_cursor() {
        let (_d, store) = records();
        let v = store
            .with_conn(|c| verify(c, &key(7).verifying_key(), Some(&[("meta".into(), 6)])))
            .unwrap();
        assert_eq!(v.problem, None, "meta's record covers event 6");
        let p = store
            .with_conn(|c| verify(c, &key(7).verifying_key(), Some(&[("meta".into(), 8)])))
            .unwrap()
            .problem
            .unwrap();
        assert_eq!(p.code, "ledger.truncated");
    }

    #[test]
    fn public_keys_round_trip_as_hex() {
        let k = key(7);
        assert_eq!(
            parse_public_key(&public_key_hex(&k)),
            Some(k.verifying_key())
        );
        assert_eq!(parse_public_key("zz"), None);
        assert_eq!(parse_public_key(&"0".repeat(63)), None);
    }
}
