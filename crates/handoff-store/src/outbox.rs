//! Delivery's state in `outbox.db`, beside the journal: each destination's cursor over the
//! journal, its retry set (the `outbox` table: decided payloads whose first attempt failed,
//! and replayed dead letters) and dead letters, each destination's state (active, paused,
//! killed), and the subject stage's position.
//!
//! The subject stage commits a batch and its position in one transaction
//! ([`OutboxStore::route_with`]); a destination commits a round's ledger records, the
//! failures it copies and its new cursor in one ([`OutboxStore::commit_round`]). After a crash
//! each resumes from what it committed: a round sent but not recorded is sent again, with the
//! same delivery ids. A retry set is FIFO per destination (the row id orders it).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use ed25519_dalek::SigningKey;

use crate::ledger::{self, Entry};
use crate::sqlite::now_ms;
use crate::subjects;
use crate::{Seq, StoreError};

pub const OUTBOX_FILE: &str = "outbox.db";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox (
    id            INTEGER PRIMARY KEY,
    destination   TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    message_id    TEXT    NOT NULL,
    payload       TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    subject       TEXT    NOT NULL DEFAULT '',
    vendor        TEXT    NOT NULL DEFAULT '',
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_at_ms    INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT
);
CREATE INDEX IF NOT EXISTS outbox_by_destination ON outbox (destination, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id            INTEGER PRIMARY KEY,
    destination   TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    message_id    TEXT    NOT NULL,
    payload       TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    subject       TEXT    NOT NULL DEFAULT '',
    vendor        TEXT    NOT NULL DEFAULT '',
    failed_at_ms  INTEGER NOT NULL,
    attempts      INTEGER NOT NULL,
    reason        TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_destination ON dead_letters (destination, id);
CREATE TABLE IF NOT EXISTS cursors (
    destination TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,
    -- Where the cursor started: the ledger has records for what it passed after that.
    started_at  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS router (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    seq      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS blocked (
    destination TEXT NOT NULL,
    reason      TEXT NOT NULL,
    count       INTEGER NOT NULL,
    PRIMARY KEY (destination, reason)
);
CREATE TABLE IF NOT EXISTS destination_state (
    destination   TEXT PRIMARY KEY,
    state         TEXT NOT NULL,
    reason        TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
";

/// Columns added after the first release, added to older files on open.
const ADDED_COLUMNS: [(&str, &str, &str); 16] = [
    ("cursors", "started_at", "INTEGER NOT NULL DEFAULT 0"),
    // Ledger records of many events (see `ledger_records`).
    ("ledger", "items", "BLOB"),
    ("ledger", "first_seq", "INTEGER NOT NULL DEFAULT 0"),
    ("ledger", "last_seq", "INTEGER NOT NULL DEFAULT 0"),
    ("outbox", "subject", "TEXT NOT NULL DEFAULT ''"),
    ("outbox", "vendor", "TEXT NOT NULL DEFAULT ''"),
    ("outbox", "shape", "INTEGER NOT NULL DEFAULT 0"),
    ("dead_letters", "subject", "TEXT NOT NULL DEFAULT ''"),
    ("dead_letters", "vendor", "TEXT NOT NULL DEFAULT ''"),
    ("dead_letters", "shape", "INTEGER NOT NULL DEFAULT 0"),
    ("dsr_tasks", "named", "TEXT NOT NULL DEFAULT ''"),
    // Keyed by source and a secret; '' for items queued before, which keep the unkeyed id
    // their first attempt used.
    ("outbox", "delivery_id", "TEXT NOT NULL DEFAULT ''"),
    ("dead_letters", "delivery_id", "TEXT NOT NULL DEFAULT ''"),
    // What the running gateway's worker last said about the destination, for operators.
    (
        "destination_state",
        "breaker",
        "TEXT NOT NULL DEFAULT 'closed'",
    ),
    ("destination_state", "last_error", "TEXT"),
    ("destination_state", "last_error_at_ms", "INTEGER"),
];

/// The ledger columns an item carries from its decision to its outcome (`shape`: what was
/// sent and why, see [`ledger::Shape`]).
const LEDGER_COLUMNS: &str = "destination, vendor, seq, message_id, subject, shape";

/// What the ledger keeps of a dead-letter reason: its head ("HTTP 400", "not delivered within
/// 3600 s after 9 attempt(s); last error"), never the vendor's answer after it, which may echo
/// personal data back (the dead letter itself keeps that, and erasure purges it).
pub fn ledger_reason(reason: &str) -> &str {
    let head = reason.split(':').next().unwrap_or("");
    match head.char_indices().nth(120) {
        Some((i, _)) => &head[..i],
        None => head,
    }
}

/// The outcome entry of an item (its shape id second, to be filled in).
fn outcome_entry(
    r: &rusqlite::Row<'_>,
    outcome: &str,
    detail: &str,
) -> rusqlite::Result<(Entry, i64)> {
    Ok((
        Entry {
            kind: ledger::kind::DELIVERY,
            destination: r.get(0)?,
            vendor: r.get(1)?,
            event_seq: r.get::<_, i64>(2)? as Seq,
            message_id: r.get(3)?,
            subject: r.get(4)?,
            outcome: outcome.to_owned(),
            detail: detail.to_owned(),
            ..Entry::default()
        },
        r.get(5)?,
    ))
}

/// A decided payload to store.
#[derive(Debug, Clone)]
pub struct NewItem {
    pub destination: String,
    pub vendor: String,
    pub seq: Seq,
    pub message_id: String,
    /// The id the vendor deduplicates on (keyed by source and a secret).
    pub delivery_id: String,
    /// The subject id (empty when the event names nobody).
    pub subject: String,
    /// What is sent and why, for the ledger entry of the outcome.
    pub shape: ledger::Shape,
    pub payload: String,
}

/// An item a vendor accepted, as the worker sent it.
#[derive(Debug, Clone)]
pub struct Sent {
    pub id: i64,
    pub destination: String,
    pub vendor: String,
    pub seq: Seq,
    pub message_id: String,
    pub subject: String,
    /// The person's identifiers as the vendor was sent them: what an erasure that purged the
    /// item while it was on its way names the person by.
    pub ids: SentIds,
}

/// A sent payload's `userId`, `anonymousId` and e-mail, as the vendor got them (see
/// [`handoff_core::policy::identifiers_in_payload`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentIds {
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub email: Option<String>,
}

impl SentIds {
    pub fn of(payload: &serde_json::Value) -> Self {
        let (user_id, anonymous_id, email) = handoff_core::policy::identifiers_in_payload(payload);
        SentIds {
            user_id,
            anonymous_id,
            email,
        }
    }
}

/// A delivery that landed after its subject's erasure purged it: the erasure request gets (or
/// gets again) a task for this destination, reopened if it had completed, naming the person as
/// this item did (added to what a pending call already names). Manual tasks stay with the
/// operator.
fn late_for_erasure(
    tx: &rusqlite::Transaction<'_>,
    item: &Sent,
    vendor_ref: Option<&String>,
) -> Result<(), StoreError> {
    use serde_json::{Value, json};
    if item.subject.is_empty() {
        return Ok(());
    }
    let root = subjects::root(tx, &item.subject)?;
    let Some(dsr) = crate::dsr::existing(tx, &root, "erasure")? else {
        return Ok(());
    };
    let task = crate::dsr::get(tx, &dsr)?.and_then(|r| {
        r.tasks
            .into_iter()
            .find(|t| t.destination == item.destination)
    });
    let pending = match task.as_ref().map(|t| (&t.method, &t.status, &t.target)) {
        // An operator confirmed this vendor erased the person by hand; it has data of theirs
        // again, so the operator must ask again.
        Some((method, status, _)) if method != "api" && status == crate::dsr::status::DONE => {
            crate::dsr::ask_operator_again(
                tx,
                &dsr,
                &item.destination,
                "Delivered again after the erasure was confirmed (it was on its way): ask the vendor again to erase this person, then confirm again.",
            )?;
            return crate::dsr::reopen(tx, &dsr);
        }
        Some((method, _, _)) if method != "api" => return Ok(()),
        Some((_, status, target)) if status == crate::dsr::status::PENDING => target.as_deref(),
        _ => None,
    };
    let mut target = match pending.and_then(|t| serde_json::from_str(t).ok()) {
        Some(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    target.insert("dsr_id".into(), json!(dsr));
    target.insert("subject_id".into(), json!(item.subject));
    for (key, value) in [
        ("user_ids", item.ids.user_id.as_ref()),
        ("anonymous_ids", item.ids.anonymous_id.as_ref()),
        ("emails", item.ids.email.as_ref()),
        ("vendor_refs", vendor_ref),
    ] {
        if let Some(v) = value
            && let Some(list) = target
                .entry(key)
                .or_insert_with(|| json!([]))
                .as_array_mut()
            && !list.contains(&json!(v))
        {
            list.push(json!(v));
        }
    }
    let target = Value::Object(target).to_string();
    match task {
        Some(t) => crate::dsr::rename_task(tx, &dsr, &item.destination, &t.named, Some(&target))?,
        None => crate::dsr::add_task(
            tx,
            &dsr,
            &crate::dsr::NewTask {
                destination: item.destination.clone(),
                vendor: item.vendor.clone(),
                manual: false,
                target,
                instructions: String::new(),
                named: String::new(),
            },
        )?,
    }
    crate::dsr::reopen(tx, &dsr)
}

/// Whether `subject` (or the subject it was merged into) is suppressed now; `false` for none.
fn suppressed_now(tx: &Connection, subject: &str) -> Result<bool, StoreError> {
    if subject.is_empty() {
        return Ok(false);
    }
    Ok(subjects::basis(tx, &subjects::root(tx, subject)?)?.is_some_and(|b| b.1.is_some()))
}

/// A delivery that landed after an erasure purged what it found of the person: the vendor has
/// it all the same, so the ledger says so (the entry returned) and the erasure gets this vendor
/// (see [`late_for_erasure`]).
fn delivered_after_erasure(
    tx: &rusqlite::Transaction<'_>,
    item: &Sent,
    vendor_ref: Option<&String>,
) -> Result<Entry, StoreError> {
    late_for_erasure(tx, item, vendor_ref)?;
    Ok(Entry {
        kind: ledger::kind::DELIVERY,
        destination: item.destination.clone(),
        vendor: item.vendor.clone(),
        event_seq: item.seq,
        message_id: item.message_id.clone(),
        subject: item.subject.clone(),
        outcome: "delivered".into(),
        detail: "delivered while an erasure purged it".into(),
        ..Entry::default()
    })
}

/// How many of a subject's payloads wait in queues and in dead letters (an access export says
/// what Handoff still holds).
pub fn held_for_subject(conn: &Connection, subject: &str) -> Result<(u64, u64), StoreError> {
    let count = |sql: &str| -> Result<u64, StoreError> {
        Ok(conn.query_row(sql, [subject], |r| r.get::<_, i64>(0))? as u64)
    };
    Ok((
        count("SELECT count(*) FROM outbox WHERE subject = ?1")?,
        count("SELECT count(*) FROM dead_letters WHERE subject = ?1")?,
    ))
}

/// An identifier a vendor was sent, not recorded lately: its item, kind, value, digest and
/// cache key.
struct FreshId<'a> {
    item: &'a Sent,
    kind: &'static str,
    value: &'a str,
    digest: [u8; 16],
    key: [u8; 16],
}

/// What one destination did with the journal events after its cursor (see
/// [`OutboxStore::commit_round`]).
#[derive(Debug, Default)]
pub struct Round {
    pub destination: String,
    /// The new cursor: every event up to it is accounted for below or earlier.
    pub upto: Seq,
    /// Accepted by the vendor: the item and the vendor's id for the subject.
    pub delivered: Vec<(Sent, Option<String>)>,
    /// The subject epoch the round decided at: if subjects changed since, the store checks
    /// whether an erasure landed while the deliveries were on their way.
    pub epoch: u64,
    /// To try again (copied into the retry set).
    pub retry: Vec<Failed>,
    /// Refused for good (copied into the dead letters).
    pub dead: Vec<Failed>,
    /// Decisions not to send, counted per reason.
    pub blocked: Vec<(&'static str, u64)>,
    /// The ledger records: one per vendor request, one per kind of outcome for the rest.
    pub records: Vec<Record>,
}

/// A ledger record of many events of one destination (see [`crate::ledger_records`]).
#[derive(Debug, Clone)]
pub struct Record {
    /// [`ledger::kind::DECISION`] (blocks; items kept to retry) or
    /// [`ledger::kind::DELIVERY`] (delivered, dead-lettered).
    pub kind: &'static str,
    pub outcome: &'static str,
    pub vendor: String,
    pub items: Vec<RecordItem>,
}

/// One event of a [`Record`].
#[derive(Debug, Clone)]
pub struct RecordItem {
    pub seq: Seq,
    pub shape: ledger::Shape,
    pub reasons: String,
    pub detail: String,
}

/// A decided item that failed its first attempt.
#[derive(Debug, Clone)]
pub struct Failed {
    pub item: NewItem,
    pub created_at_ms: i64,
    pub attempts: u32,
    pub next_at_ms: i64,
    pub error: String,
}

/// A payload in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    pub id: i64,
    pub destination: String,
    pub seq: Seq,
    pub message_id: String,
    /// The id the vendor deduplicates on; empty for items queued before ids were keyed.
    pub delivery_id: String,
    pub subject: String,
    /// The id the vendor gave this subject on an earlier delivery (a Stripe customer id).
    pub vendor_ref: Option<String>,
    pub payload: String,
    pub created_at_ms: i64,
    pub attempts: u32,
    pub next_at_ms: i64,
    pub last_error: Option<String>,
}

/// A payload that will not be delivered without an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: i64,
    pub destination: String,
    pub seq: Seq,
    pub message_id: String,
    pub subject: String,
    pub payload: String,
    pub created_at_ms: i64,
    pub failed_at_ms: i64,
    pub attempts: u32,
    pub reason: String,
}

/// Whether a destination delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationState {
    Active,
    /// Keeps its queue, sends nothing (an operator, or refused credentials).
    Paused,
    /// Sends nothing, and no new decisions are made for it.
    Killed,
}

impl DestinationState {
    pub fn as_str(self) -> &'static str {
        match self {
            DestinationState::Active => "active",
            DestinationState::Paused => "paused",
            DestinationState::Killed => "killed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => DestinationState::Active,
            "paused" => DestinationState::Paused,
            "killed" => DestinationState::Killed,
            _ => return None,
        })
    }
}

/// Queue figures of one destination.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Items in the retry set plus [`QueueStats::behind`].
    pub depth: u64,
    /// Journal events after the destination's cursor that the subject stage has passed.
    pub behind: u64,
    pub oldest_created_at_ms: Option<i64>,
    pub dead_letters: u64,
    /// The circuit breaker as the gateway's worker last recorded it: closed, half_open, open.
    pub breaker: String,
    /// The last error the vendor (or the connection to it) gave, and when.
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<i64>,
}

pub struct OutboxStore {
    conn: Mutex<Connection>,
    /// Read-only connections (WAL readers, each on its own snapshot): queue reads, status and
    /// reports never wait for the writer, and a long report does not hold delivery's writes.
    readers: Vec<Mutex<Connection>>,
    next_reader: std::sync::atomic::AtomicUsize,
    path: PathBuf,
    /// Signs ledger checkpoints (the gateway sets it; operator commands run without).
    signer: OnceLock<SigningKey>,
    /// Seals the identifiers each vendor is sent (see `sent_ids`); without it none are kept.
    sealer: OnceLock<std::sync::Arc<dyn crate::sent_ids::Sealer>>,
    /// Digests of (subject, destination, identifier) recorded lately, so a person's every
    /// event does not seal and write what is stored already. Cleared past
    /// [`RECORDED_CACHE_ENTRIES`].
    recorded: Mutex<std::collections::HashSet<[u8; 16]>>,
    shapes: ledger::ShapeCache,
    /// Copies the WAL into the database in the background (the gateway starts it).
    checkpointer: Mutex<Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
}

/// Read-only connections kept open: the workers' queue reads, the state poller and a report
/// at once; past that, callers wait for one.
const READERS: usize = 4;

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(64);
    conn.pragma_update(None, "cache_size", -8_192)?;
    Ok(conn)
}

/// Entries of the recently-recorded identifier cache (16 bytes each, about 6 MB at most with the
/// set's overhead) before it starts over.
const RECORDED_CACHE_ENTRIES: usize = 200_000;

/// How often the background checkpointer copies committed pages into `outbox.db`.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// WAL frames (about 4 KiB each) past which the checkpointer rewinds the WAL. Passive
/// checkpoints never rewind it while writes keep coming, and a WAL that only grows costs the
/// kernel a zeroed block per frame (5.5 GB of WAL after 280k events, before this).
const REWIND_WAL_AFTER_FRAMES: i64 = 8192;
/// How long the checkpointer waits for the writer or a reader before giving a rewind up.
const REWIND_WAIT: Duration = Duration::from_millis(50);
/// After a rewind that the writer or a reader on an old snapshot (such as `audit verify`) kept
/// from finishing, the next is tried this much later, doubling while it keeps failing (up to
/// 5 s), so that writers are not held back again and again while that reader lasts.
const REWIND_RETRY: Duration = Duration::from_millis(250);
const REWIND_RETRY_MAX: Duration = Duration::from_secs(5);

/// What one pass of the checkpointer found.
#[derive(Debug, PartialEq, Eq)]
enum Pass {
    /// More than 1024 frames are left to copy: go again at once.
    Behind,
    /// Copied what there was (and rewound the WAL when it was long).
    CaughtUp,
    /// Caught up, but the writer or a reader kept the WAL from being rewound.
    RewindBusy,
}

/// One pass of the checkpointer.
///
/// Passive, so it never waits for the router or the workers. When it has caught up but the
/// WAL is longer than `rewind_after` frames, it copies the last few frames while new writers
/// wait (a few frames' copy and the database's fsync, after waiting at most [`REWIND_WAIT`]
/// for the writer and for readers), so that the next commit starts the WAL from its beginning
/// and overwrites blocks the file already has.
fn checkpoint(conn: &Connection, rewind_after: i64) -> rusqlite::Result<Pass> {
    let (frames, done) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    })?;
    if frames - done > 1024 {
        return Ok(Pass::Behind);
    }
    if frames > rewind_after {
        let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get(0))?;
        if busy != 0 {
            return Ok(Pass::RewindBusy);
        }
    }
    Ok(Pass::CaughtUp)
}

/// One transaction of the subject stage: it resolves subjects, stores preferences and records
/// who the events are about through it (tests also fill retry sets through it);
/// [`OutboxStore::route_with`] commits everything with the position.
pub struct Routing<'c> {
    tx: &'c rusqlite::Transaction<'c>,
    shapes: &'c ledger::ShapeCache,
    now: i64,
    ledger: Vec<Entry>,
}

impl Routing<'_> {
    pub fn set_preferences(&mut self, subject: &str, json: &str) -> Result<(), StoreError> {
        subjects::set_preferences(self.tx, subject, json)
    }

    /// The subject of identifier hashes (kind, hash), created or merged as needed (merges are
    /// recorded in the ledger with this transaction).
    pub fn resolve(
        &mut self,
        hashes: &[(&str, String)],
    ) -> Result<Option<subjects::Subject>, StoreError> {
        let r = subjects::resolve(self.tx, hashes, self.now)?;
        if let Some(s) = &r.subject {
            for m in &r.merged {
                self.ledger.push(Entry {
                    kind: ledger::kind::SUBJECT,
                    subject: s.id.clone(),
                    outcome: "merged".into(),
                    detail: format!("{m} is the same person"),
                    ..Entry::default()
                });
            }
        }
        Ok(r.subject)
    }

    /// Records who the events of this batch are about (one ledger record for the batch).
    pub fn record_events(
        &mut self,
        items: &[crate::ledger_records::EventItem],
    ) -> Result<(), StoreError> {
        if let Some(e) = ledger::events_record(self.tx, items)? {
            self.ledger.push(e);
        }
        Ok(())
    }

    /// See [`subjects::changed`], as this transaction sees it.
    pub fn subject_epoch(&mut self) -> Result<u64, StoreError> {
        subjects::epoch(self.tx)
    }

    pub fn queue(&mut self, item: &NewItem) -> Result<(), StoreError> {
        let shape = self.shapes.id(self.tx, &item.shape)?;
        self.tx
            .prepare_cached(
                "INSERT INTO outbox (destination, vendor, seq, message_id, subject, shape, payload, created_at_ms, delivery_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                item.destination,
                item.vendor,
                item.seq as i64,
                item.message_id,
                item.subject,
                shape,
                item.payload,
                self.now,
                item.delivery_id
            ])?;
        Ok(())
    }

    /// Counts a decision not to send.
    pub fn block(&mut self, destination: &str, reason: &str) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(
                "INSERT INTO blocked (destination, reason, count) VALUES (?1, ?2, 1)
                 ON CONFLICT (destination, reason) DO UPDATE SET count = count + 1",
            )?
            .execute(params![destination, reason])?;
        Ok(())
    }
}

impl Drop for OutboxStore {
    fn drop(&mut self) {
        let taken = self
            .checkpointer
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((stop, handle)) = taken {
            let _ = stop.send(());
            let _ = handle.join();
        }
    }
}

impl OutboxStore {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        crate::files::create_dir(data_dir)?;
        let path = data_dir.join(OUTBOX_FILE);
        crate::files::create_file(&path)?;
        let conn = Connection::open(&path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
        // NORMAL, not FULL: in WAL mode a commit survives a crash of the process, and what a
        // power cut could lose is recoverable by design: the events are in the journal
        // (synchronous = FULL), and a cursor rolls back together with the records and copies
        // of its round, so the round is decided and sent again; a delivery recorded as done but
        // lost is sent again and deduplicated by the vendor on its delivery id. This saves an
        // fsync per delivery, which bounded one-event destinations to ~500 deliveries/s.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // The router, workers and DSR executor prepare some 40 statements; the default cache
        // of 16 would prepare them again and again.
        conn.set_prepared_statement_cache_capacity(128);
        // A routing batch dirties more pages than SQLite's default 2 MiB cache holds, which
        // made it spill pages into the WAL mid-transaction (and write some twice).
        conn.pragma_update(None, "cache_size", -32_768)?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(subjects::SCHEMA)?;
        conn.execute_batch(ledger::SCHEMA)?;
        conn.execute_batch(crate::dsr::SCHEMA)?;
        conn.execute_batch(crate::sent_ids::SCHEMA)?;
        crate::sqlite::add_missing_columns(&conn, &ADDED_COLUMNS)?;
        conn.execute_batch(ledger::RECORD_SCHEMA)?;
        conn.execute_batch(
            // Erasure finds a subject's items by scanning the queues (rare, and queues are
            // short when vendors keep up); an index would cost every item a write.
            "DROP INDEX IF EXISTS outbox_by_subject;
             DROP INDEX IF EXISTS dead_letters_by_subject;",
        )?;
        let readers = (0..READERS)
            .map(|_| open_reader(&path).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OutboxStore {
            conn: Mutex::new(conn),
            readers,
            next_reader: std::sync::atomic::AtomicUsize::new(0),
            path,
            signer: OnceLock::new(),
            sealer: OnceLock::new(),
            recorded: Mutex::new(std::collections::HashSet::new()),
            shapes: ledger::ShapeCache::default(),
            checkpointer: Mutex::new(None),
        })
    }

    /// Moves WAL checkpoints off the committing threads: a thread of its own copies committed
    /// pages into the database every 250 ms (PASSIVE: it never waits for the router or the
    /// workers), instead of the commit that crosses SQLite's 1000-page mark doing it, fsync
    /// included, while holding the outbox. Stops when the store is dropped.
    pub fn start_checkpointer(&self) -> Result<(), StoreError> {
        let mut slot = self.checkpointer.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Ok(());
        }
        let conn = Connection::open(&self.path)?;
        conn.busy_timeout(REWIND_WAIT)?;
        self.conn().pragma_update(None, "wal_autocheckpoint", 0)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("outbox-checkpoint".into())
            .spawn(move || {
                let mut wait = CHECKPOINT_EVERY;
                let mut rewind_from = std::time::Instant::now();
                let mut rewind_retry = REWIND_RETRY;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(wait)
                {
                    let rewind_after = if std::time::Instant::now() >= rewind_from {
                        REWIND_WAL_AFTER_FRAMES
                    } else {
                        i64::MAX
                    };
                    wait = match checkpoint(&conn, rewind_after) {
                        Ok(Pass::Behind) => Duration::ZERO,
                        Ok(Pass::CaughtUp) => {
                            rewind_retry = REWIND_RETRY;
                            CHECKPOINT_EVERY
                        }
                        Ok(Pass::RewindBusy) => {
                            rewind_from = std::time::Instant::now() + rewind_retry;
                            rewind_retry = (rewind_retry * 2).min(REWIND_RETRY_MAX);
                            CHECKPOINT_EVERY
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "outbox checkpoint failed; will retry");
                            CHECKPOINT_EVERY
                        }
                    };
                }
                let _ = conn.busy_timeout(Duration::from_secs(5));
                let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
            })?;
        *slot = Some((stop, handle));
        Ok(())
    }

    /// Lets this store sign ledger checkpoints.
    pub fn set_ledger_signer(&self, key: SigningKey) {
        let _ = self.signer.set(key);
    }

    /// Keeps the identifiers each vendor is sent, sealed with `sealer` (the gateway sets it).
    pub fn set_identifier_sealer(&self, sealer: std::sync::Arc<dyn crate::sent_ids::Sealer>) {
        let _ = self.sealer.set(sealer);
    }

    /// The sealer set with [`OutboxStore::set_identifier_sealer`].
    pub fn identifier_sealer(&self) -> Option<&std::sync::Arc<dyn crate::sent_ids::Sealer>> {
        self.sealer.get()
    }

    /// Walks the ledger (the chain, the checkpoints against `public_key`, and every
    /// destination's cursor) on a connection of its own, in one read transaction: a consistent snapshot
    /// while the gateway keeps writing, and the outbox is not held for the walk.
    pub fn verify_ledger(
        &self,
        public_key: &ed25519_dalek::VerifyingKey,
    ) -> Result<ledger::Verification, StoreError> {
        let mut conn = open_reader(&self.path)?;
        let tx = conn.transaction()?;
        let cursors: Vec<(String, Seq)> = tx
            .prepare(
                "SELECT destination, seq FROM cursors WHERE seq > started_at ORDER BY destination",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as Seq)))?
            .collect::<Result<_, _>>()?;
        ledger::verify(&tx, public_key, Some(&cursors))
    }

    /// Runs `f` on a read-only connection, on a snapshot of what is committed now: for
    /// reads that must not wait for (or hold) the writer. Writes through it fail.
    pub fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.reader();
        // One read transaction: every query of `f` sees the same snapshot.
        let tx = conn.unchecked_transaction()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        let start = self
            .next_reader
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = self.readers.len();
        for i in 0..n {
            if let Ok(guard) = self.readers[(start + i) % n].try_lock() {
                return guard;
            }
        }
        self.readers[start % n]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the connection (for the ledger, subject and DSR modules).
    pub fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        f(&self.conn())
    }

    /// Runs `f` in a transaction, then appends the ledger entries it returns (checkpointing
    /// when due) and commits.
    pub fn transact<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<(T, Vec<Entry>), StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let result = f(&tx).and_then(|(out, entries)| {
            ledger::append(&tx, &self.shapes, &entries, now_ms(), self.signer.get())?;
            tx.commit()?;
            Ok(out)
        });
        if result.is_err() {
            // A shape stored by the rolled-back transaction is gone again.
            self.shapes.clear();
        }
        result
    }

    /// Signs a checkpoint at the ledger's head now (at shutdown).
    pub fn checkpoint_ledger(&self) -> Result<(), StoreError> {
        match self.signer.get() {
            Some(key) => ledger::checkpoint_now(&self.conn(), key, now_ms()),
            None => Ok(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last journal position the router committed.
    pub fn router_position(&self) -> Result<Seq, StoreError> {
        let seq: Option<i64> = self
            .reader()
            .query_row("SELECT seq FROM router WHERE id = 1", [], |r| r.get(0))
            .optional()?;
        Ok(seq.unwrap_or(0) as Seq)
    }

    /// Runs one routing batch: `f` resolves subjects, queues and records decisions through
    /// [`Routing`]; then the ledger entries, and the router's move to `upto`, commit with it
    /// in one transaction. Nothing of a failed batch stays.
    pub fn route_with<T>(
        &self,
        upto: Seq,
        f: impl FnOnce(&mut Routing<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.transact(|tx| {
            let mut routing = Routing {
                tx,
                shapes: &self.shapes,
                now: now_ms(),
                ledger: Vec::new(),
            };
            let out = f(&mut routing)?;
            tx.execute(
                "INSERT INTO router (id, seq) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET seq = max(seq, excluded.seq)",
                [upto as i64],
            )?;
            Ok((out, routing.ledger))
        })
    }

    /// The first `limit` items of a destination's queue, in order.
    pub fn head(&self, destination: &str, limit: usize) -> Result<Vec<OutboxItem>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT o.id, o.destination, o.seq, o.message_id, o.payload, o.created_at_ms, o.attempts,
                    o.next_at_ms, o.last_error, o.subject, r.ref, o.delivery_id
             FROM outbox o LEFT JOIN vendor_refs r ON r.destination = o.destination AND r.subject = o.subject
             WHERE o.destination = ?1 ORDER BY o.id LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![destination, limit as i64], |r| {
                Ok(OutboxItem {
                    id: r.get(0)?,
                    destination: r.get(1)?,
                    seq: r.get::<_, i64>(2)? as Seq,
                    message_id: r.get(3)?,
                    payload: r.get(4)?,
                    created_at_ms: r.get(5)?,
                    attempts: r.get::<_, i64>(6)? as u32,
                    next_at_ms: r.get(7)?,
                    last_error: r.get(8)?,
                    subject: r.get(9)?,
                    vendor_ref: r.get(10)?,
                    delivery_id: r.get(11)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Removes delivered items, records each handoff in the ledger, and keeps the ids the
    /// vendor gave (item id, vendor's id for the subject).
    pub fn delivered(&self, sent: &[Sent], refs: &[(i64, String)]) -> Result<(), StoreError> {
        let fresh = self.fresh_sent_ids(sent.iter());
        self.transact(|tx| {
            self.record_sent_ids(tx, &fresh)?;
            let mut entries = Vec::with_capacity(sent.len());
            {
                let mut take = tx.prepare_cached(&format!(
                    "DELETE FROM outbox WHERE id = ?1 RETURNING {LEDGER_COLUMNS}"
                ))?;
                for item in sent {
                    let vendor_ref = refs.iter().find(|(i, _)| *i == item.id).map(|(_, r)| r);
                    let entry = match take
                        .query_row([item.id], |r| outcome_entry(r, "delivered", ""))
                        .optional()?
                    {
                        Some((mut entry, shape)) => {
                            entry.set_shape(self.shapes.get(tx, shape)?);
                            entry
                        }
                        None => delivered_after_erasure(tx, item, vendor_ref)?,
                    };
                    if let Some(r) = vendor_ref
                        && !entry.subject.is_empty()
                    {
                        subjects::set_vendor_ref(tx, &entry.destination, &entry.subject, r)?;
                    }
                    entries.push(entry);
                }
            }
            Ok(((), entries))
        })?;
        self.remember_sent_ids(&fresh);
        Ok(())
    }

    /// The identifiers in `sent` not recorded lately, sealed, for [`Self::record_sent_ids`]:
    /// what each vendor now holds about each person, for a later erasure.
    fn fresh_sent_ids<'a>(&self, sent: impl Iterator<Item = &'a Sent>) -> Vec<FreshId<'a>> {
        let mut fresh: Vec<FreshId<'_>> = Vec::new();
        if let Some(sealer) = self.sealer.get() {
            let recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
            for item in sent.filter(|i| !i.subject.is_empty()) {
                for (kind, value) in crate::sent_ids::pairs(&item.ids) {
                    let digest = sealer.digest(kind, value);
                    let key = sealer.digest(
                        "recorded",
                        &format!(
                            "{}\u{1f}{}\u{1f}{}",
                            item.subject,
                            item.destination,
                            base16ct::lower::encode_string(&digest)
                        ),
                    );
                    if !recorded.contains(&key) {
                        fresh.push(FreshId {
                            item,
                            kind,
                            value,
                            digest,
                            key,
                        });
                    }
                }
            }
        }
        fresh
    }

    fn record_sent_ids(&self, tx: &Connection, fresh: &[FreshId<'_>]) -> Result<(), StoreError> {
        if let Some(sealer) = self.sealer.get() {
            for f in fresh {
                crate::sent_ids::record(
                    tx,
                    sealer.as_ref(),
                    &f.item.subject,
                    &f.item.destination,
                    f.kind,
                    &f.digest,
                    f.value,
                )?;
            }
        }
        Ok(())
    }

    /// Remembers identifiers committed by [`Self::record_sent_ids`].
    fn remember_sent_ids(&self, fresh: &[FreshId<'_>]) {
        if fresh.is_empty() {
            return;
        }
        let mut recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        if recorded.len() + fresh.len() > RECORDED_CACHE_ENTRIES {
            recorded.clear();
        }
        recorded.extend(fresh.iter().map(|f| f.key));
    }

    /// Copies a failed item into the retry set or the dead letters (`sql` takes the item's
    /// columns, then attempts, `at_ms` and the error, in that order).
    fn copy_failed(
        &self,
        tx: &Connection,
        sql: &str,
        f: &Failed,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let shape = self.shapes.id(tx, &f.item.shape)?;
        tx.prepare_cached(sql)?.execute(params![
            f.item.destination,
            f.item.vendor,
            f.item.seq as i64,
            f.item.message_id,
            f.item.subject,
            shape,
            f.item.payload,
            f.created_at_ms,
            f.item.delivery_id,
            f.attempts,
            at_ms,
            f.error
        ])?;
        Ok(())
    }

    /// A destination's position in the journal: every event up to it is delivered, blocked,
    /// waiting in its retry set or dead-lettered. Before the destination had one, the router's
    /// position (what an older version had decided and queued).
    pub fn cursor(&self, destination: &str) -> Result<Seq, StoreError> {
        let conn = self.reader();
        let seq: Option<i64> = conn
            .prepare_cached("SELECT seq FROM cursors WHERE destination = ?1")?
            .query_row([destination], |r| r.get(0))
            .optional()?;
        match seq {
            Some(s) => Ok(s as Seq),
            None => Ok(conn
                .query_row("SELECT seq FROM router WHERE id = 1", [], |r| {
                    r.get::<_, i64>(0)
                })
                .optional()?
                .unwrap_or(0) as Seq),
        }
    }

    /// Gives `destination` a cursor if it has none: the router's position (a destination
    /// new to the configuration starts with the events after it; one an older version
    /// delivered has what it queued in its retry set).
    pub fn ensure_cursor(&self, destination: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO cursors (destination, seq, started_at)
             SELECT ?1, p, p FROM (SELECT coalesce((SELECT seq FROM router WHERE id = 1), 0) AS p)",
            [destination],
        )?;
        Ok(())
    }

    /// The lowest position of the subject stage and `destinations`: the journal keeps every
    /// event after it.
    pub fn lowest_cursor(&self, destinations: &[String]) -> Result<Seq, StoreError> {
        let mut lowest = self.router_position()?;
        for d in destinations {
            lowest = lowest.min(self.cursor(d)?);
        }
        Ok(lowest)
    }

    /// See [`subjects::changed`].
    pub fn subject_epoch(&self) -> Result<u64, StoreError> {
        subjects::epoch(&self.reader())
    }

    /// The current state of each subject (following merges), on one snapshot.
    pub fn subjects_now(&self, ids: &[&str]) -> Result<Vec<Option<subjects::Subject>>, StoreError> {
        self.with_reader(|c| {
            ids.iter()
                .map(|id| {
                    if id.is_empty() {
                        return Ok(None);
                    }
                    let root = subjects::root(c, id)?;
                    subjects::load(c, &root)
                })
                .collect()
        })
    }

    /// The subject each list of identifier hashes belongs to, without creating or merging
    /// any (for events the subject stage resolved already), on one snapshot.
    pub fn find_subjects(
        &self,
        ids: &[Vec<(&str, String)>],
    ) -> Result<Vec<Option<subjects::Subject>>, StoreError> {
        self.with_reader(|c| {
            ids.iter()
                .map(|hashes| {
                    // A merge points every identifier of the merged subject at the one it was
                    // merged into, so an identifier's subject is always a root.
                    for (_, hash) in hashes {
                        if let Some(s) = subjects::find(c, hash)? {
                            return Ok(Some(s));
                        }
                    }
                    Ok(None)
                })
                .collect()
        })
    }

    /// The ids `destination` gave these subjects on earlier deliveries.
    pub fn vendor_refs_of(
        &self,
        destination: &str,
        subjects: &[&str],
    ) -> Result<std::collections::HashMap<String, String>, StoreError> {
        self.with_reader(|c| {
            let mut out = std::collections::HashMap::new();
            for s in subjects.iter().filter(|s| !s.is_empty()) {
                if let Some(r) = subjects::vendor_ref(c, destination, s)? {
                    out.insert((*s).to_owned(), r);
                }
            }
            Ok(out)
        })
    }

    /// The subjects with an item in `destination`'s retry set (their later events must not
    /// overtake it), and whether the set is empty.
    pub fn retry_subjects(
        &self,
        destination: &str,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let conn = self.reader();
        let mut stmt =
            conn.prepare_cached("SELECT DISTINCT subject FROM outbox WHERE destination = ?1")?;
        let rows = stmt
            .query_map([destination], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Whether `destination`'s retry set holds anything (replayed dead letters, failures).
    pub fn has_retries(&self, destination: &str) -> Result<bool, StoreError> {
        Ok(self
            .reader()
            .prepare_cached("SELECT 1 FROM outbox WHERE destination = ?1 LIMIT 1")?
            .query_row([destination], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Commits what one destination did with the journal events after its cursor, up to
    /// `round.upto`, in one transaction: the ledger records, the failures copied into the retry
    /// set or the dead letters, the blocked counts and the new cursor.
    pub fn commit_round(&self, round: Round) -> Result<(), StoreError> {
        let Round {
            destination,
            upto,
            delivered,
            epoch,
            retry,
            dead,
            blocked,
            records,
        } = round;
        let fresh = self.fresh_sent_ids(delivered.iter().map(|(s, _)| s));
        self.transact(|tx| {
            self.record_sent_ids(tx, &fresh)?;
            let now = now_ms();
            let mut entries = Vec::with_capacity(records.len());
            for r in &records {
                let (Some(first), Some(last)) = (
                    r.items.iter().map(|i| i.seq).min(),
                    r.items.iter().map(|i| i.seq).max(),
                ) else {
                    continue;
                };
                let items = r
                    .items
                    .iter()
                    .map(|i| {
                        Ok(crate::ledger_records::HandoffItem {
                            seq: i.seq,
                            shape: self.shapes.id(tx, &i.shape)?,
                            reasons: i.reasons.clone(),
                            detail: i.detail.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?;
                entries.push(Entry {
                    kind: r.kind,
                    event_seq: first,
                    destination: destination.clone(),
                    vendor: r.vendor.clone(),
                    outcome: r.outcome.into(),
                    items: Some(crate::ledger_records::encode_handoffs(&items)),
                    first_seq: first,
                    last_seq: last,
                    ..Entry::default()
                });
            }
            let check_erasure = subjects::epoch(tx)? != epoch;
            for (item, vendor_ref) in &delivered {
                if check_erasure && suppressed_now(tx, &item.subject)? {
                    entries.push(delivered_after_erasure(tx, item, vendor_ref.as_ref())?);
                }
                if let Some(r) = vendor_ref
                    && !item.subject.is_empty()
                {
                    subjects::set_vendor_ref(tx, &item.destination, &item.subject, r)?;
                }
            }
            // A failure of a person erased (or opted out) since the round decided is not kept:
            // the erasure purged what it found, and this was not there yet.
            let no_longer =
                |f: &Failed| -> Result<bool, StoreError> { Ok(check_erasure && suppressed_now(tx, &f.item.subject)?) };
            let mut kept_retry = Vec::with_capacity(retry.len());
            let mut kept_dead = Vec::with_capacity(dead.len());
            for (list, kept) in [(&retry, &mut kept_retry), (&dead, &mut kept_dead)] {
                for f in list {
                    if no_longer(f)? {
                        entries.push(Entry {
                            kind: ledger::kind::DECISION,
                            destination: f.item.destination.clone(),
                            vendor: f.item.vendor.clone(),
                            event_seq: f.item.seq,
                            message_id: f.item.message_id.clone(),
                            subject: f.item.subject.clone(),
                            outcome: "block".into(),
                            reasons: "subject.suppressed".into(),
                            detail: "erased while it waited: not kept".into(),
                            ..Entry::default()
                        });
                    } else {
                        kept.push(f);
                    }
                }
            }
            for f in kept_retry {
                self.copy_failed(
                    tx,
                    "INSERT INTO outbox (destination, vendor, seq, message_id, subject, shape, payload, created_at_ms,
                       delivery_id, attempts, next_at_ms, last_error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                    f,
                    f.next_at_ms,
                )?;
            }
            for f in kept_dead {
                self.copy_failed(
                    tx,
                    "INSERT INTO dead_letters (destination, vendor, seq, message_id, subject, shape, payload, created_at_ms,
                       delivery_id, attempts, failed_at_ms, reason)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                    f,
                    now,
                )?;
            }
            for (reason, n) in &blocked {
                tx.prepare_cached(
                    "INSERT INTO blocked (destination, reason, count) VALUES (?1, ?2, ?3)
                     ON CONFLICT (destination, reason) DO UPDATE SET count = count + excluded.count",
                )?
                .execute(params![destination, reason, *n as i64])?;
            }
            tx.prepare_cached(
                "INSERT INTO cursors (destination, seq) VALUES (?1, ?2)
                 ON CONFLICT (destination) DO UPDATE SET seq = max(seq, excluded.seq)",
            )?
            .execute(params![destination, upto as i64])?;
            Ok(((), entries))
        })?;
        self.remember_sent_ids(&fresh);
        Ok(())
    }

    /// Schedules items for another attempt.
    pub fn retry(&self, ids: &[i64], next_at_ms: i64, error: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut up = tx.prepare_cached(
                "UPDATE outbox SET attempts = attempts + 1, next_at_ms = ?2, last_error = ?3 WHERE id = ?1",
            )?;
            for id in ids {
                up.execute(params![id, next_at_ms, error])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Moves items to the dead-letter queue with `reason`.
    pub fn dead_letter(&self, ids: &[i64], reason: &str) -> Result<(), StoreError> {
        self.transact(|tx| {
            let mut entries = Vec::with_capacity(ids.len());
            {
                let mut mv = tx.prepare_cached(&format!(
                    "INSERT INTO dead_letters ({LEDGER_COLUMNS}, payload, created_at_ms, failed_at_ms, attempts, reason, delivery_id)
                     SELECT {LEDGER_COLUMNS}, payload, created_at_ms, ?2, attempts + 1, ?3, delivery_id FROM outbox WHERE id = ?1
                     RETURNING {LEDGER_COLUMNS}"
                ))?;
                let mut del = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
                let now = now_ms();
                for id in ids {
                    let moved = mv
                        .query_row(params![id, now, reason], |r| {
                            outcome_entry(r, "dead_lettered", ledger_reason(reason))
                        })
                        .optional()?;
                    del.execute([id])?;
                    if let Some((mut entry, shape)) = moved {
                        entry.set_shape(self.shapes.get(tx, shape)?);
                        entries.push(entry);
                    }
                }
            }
            Ok(((), entries))
        })
    }

    /// Dead letters, oldest first, optionally of one destination, after `after_id`.
    pub fn dead_letters(
        &self,
        destination: Option<&str>,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT id, destination, seq, message_id, payload, created_at_ms, failed_at_ms, attempts, reason, subject
             FROM dead_letters WHERE (?1 IS NULL OR destination = ?1) AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![destination, after_id, limit as i64], |r| {
                Ok(DeadLetter {
                    id: r.get(0)?,
                    destination: r.get(1)?,
                    seq: r.get::<_, i64>(2)? as Seq,
                    message_id: r.get(3)?,
                    payload: r.get(4)?,
                    created_at_ms: r.get(5)?,
                    failed_at_ms: r.get(6)?,
                    attempts: r.get::<_, i64>(7)? as u32,
                    reason: r.get(8)?,
                    subject: r.get(9)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Puts dead letters of `destination` (all, or those in `ids`) back at the end of its
    /// queue, attempts reset. Returns how many.
    pub fn replay(&self, destination: &str, ids: Option<&[i64]>) -> Result<usize, StoreError> {
        self.take_dead(destination, ids, true)
    }

    /// Deletes dead letters of `destination` (all, or those in `ids`). Returns how many.
    pub fn discard(&self, destination: &str, ids: Option<&[i64]>) -> Result<usize, StoreError> {
        self.take_dead(destination, ids, false)
    }

    fn take_dead(
        &self,
        destination: &str,
        ids: Option<&[i64]>,
        requeue: bool,
    ) -> Result<usize, StoreError> {
        self.transact(|tx| {
            let chosen: Vec<i64> = match ids {
                Some(ids) => ids.to_vec(),
                None => {
                    let mut stmt = tx
                        .prepare("SELECT id FROM dead_letters WHERE destination = ?1 ORDER BY id")?;
                    let ids = stmt.query_map([destination], |r| r.get(0))?;
                    ids.collect::<Result<Vec<i64>, _>>()?
                }
            };
            let mut entries = Vec::new();
            {
                let mut requeue_stmt = tx.prepare_cached(&format!(
                    "INSERT INTO outbox ({LEDGER_COLUMNS}, payload, created_at_ms, delivery_id)
                     SELECT {LEDGER_COLUMNS}, payload, ?2, delivery_id FROM dead_letters WHERE id = ?1 AND destination = ?3"
                ))?;
                let mut del = tx.prepare_cached(&format!(
                    "DELETE FROM dead_letters WHERE id = ?1 AND destination = ?2 RETURNING {LEDGER_COLUMNS}"
                ))?;
                let now = now_ms();
                let outcome = if requeue { "replayed" } else { "discarded" };
                for id in &chosen {
                    if requeue {
                        requeue_stmt.execute(params![id, now, destination])?;
                    }
                    let gone = del
                        .query_row(params![id, destination], |r| outcome_entry(r, outcome, ""))
                        .optional()?;
                    if let Some((mut entry, shape)) = gone {
                        entry.set_shape(self.shapes.get(tx, shape)?);
                        entries.push(entry);
                    }
                }
            }
            Ok((entries.len(), entries))
        })
    }

    /// Queue figures per destination.
    pub fn stats(&self, destination: &str) -> Result<QueueStats, StoreError> {
        let conn = self.reader();
        // Index-only count; the oldest item is the first (replays get new ids, and a
        // replayed item's age counts from its replay).
        let depth: i64 = conn
            .prepare_cached("SELECT count(*) FROM outbox WHERE destination = ?1")?
            .query_row([destination], |r| r.get(0))?;
        let oldest: Option<i64> = conn
            .prepare_cached(
                "SELECT created_at_ms FROM outbox WHERE destination = ?1 ORDER BY id LIMIT 1",
            )?
            .query_row([destination], |r| r.get(0))
            .optional()?;
        let dead: i64 = conn
            .prepare_cached("SELECT count(*) FROM dead_letters WHERE destination = ?1")?
            .query_row([destination], |r| r.get(0))?;
        let (breaker, last_error, last_error_at_ms) = conn
            .prepare_cached(
                "SELECT breaker, last_error, last_error_at_ms FROM destination_state WHERE destination = ?1",
            )?
            .query_row([destination], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?
            .unwrap_or_else(|| ("closed".to_owned(), None, None));
        drop(conn);
        // Journal events the subject stage passed that this destination has not yet: at most
        // that many more to send (some will be blocked).
        let behind = self
            .router_position()?
            .saturating_sub(self.cursor(destination)?);
        Ok(QueueStats {
            depth: depth as u64 + behind,
            behind,
            oldest_created_at_ms: oldest,
            dead_letters: dead as u64,
            breaker,
            last_error,
            last_error_at_ms,
        })
    }

    /// Records the destination's circuit breaker (`closed`, `half_open`, `open`) and, when
    /// given, its last error, so `destinations status` can show them. The worker calls it on
    /// changes only. Creates the destination's row if it has none (as active).
    pub fn record_breaker(
        &self,
        destination: &str,
        breaker: &str,
        last_error: Option<&str>,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        self.conn()
            .prepare_cached(
                "INSERT INTO destination_state (destination, state, reason, updated_at_ms, breaker, last_error, last_error_at_ms)
                 VALUES (?1, 'active', '', ?2, ?3, ?4, CASE WHEN ?4 IS NULL THEN NULL ELSE ?2 END)
                 ON CONFLICT (destination) DO UPDATE SET
                   breaker = excluded.breaker,
                   last_error = coalesce(excluded.last_error, last_error),
                   last_error_at_ms = coalesce(excluded.last_error_at_ms, last_error_at_ms)",
            )?
            .execute(params![destination, now, breaker, last_error])?;
        Ok(())
    }

    /// Every destination the outbox knows of (queued items, dead letters or a state).
    pub fn destinations(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT destination FROM outbox UNION SELECT destination FROM dead_letters
             UNION SELECT destination FROM destination_state ORDER BY 1",
        )?;
        let rows = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(rows)
    }

    /// Decisions not to send, per destination and reason.
    pub fn blocked(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        let conn = self.reader();
        let mut stmt =
            conn.prepare_cached("SELECT destination, reason, count FROM blocked ORDER BY 1, 2")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// A destination's state and the reason it was set (active when never set).
    pub fn state(&self, destination: &str) -> Result<(DestinationState, String), StoreError> {
        let row: Option<(String, String)> = self
            .reader()
            .query_row(
                "SELECT state, reason FROM destination_state WHERE destination = ?1",
                [destination],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(match row {
            Some((s, reason)) => (
                DestinationState::parse(&s).unwrap_or(DestinationState::Paused),
                reason,
            ),
            None => (DestinationState::Active, String::new()),
        })
    }

    /// A destination's state and since when it holds (0 when never set).
    pub fn state_since(&self, destination: &str) -> Result<(DestinationState, i64), StoreError> {
        let row: Option<(String, i64)> = self
            .reader()
            .prepare_cached(
                "SELECT state, updated_at_ms FROM destination_state WHERE destination = ?1",
            )?
            .query_row([destination], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(match row {
            Some((s, at)) => (
                DestinationState::parse(&s).unwrap_or(DestinationState::Paused),
                at,
            ),
            None => (DestinationState::Active, 0),
        })
    }

    pub fn set_state(
        &self,
        destination: &str,
        state: DestinationState,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO destination_state (destination, state, reason, updated_at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (destination) DO UPDATE SET state = excluded.state, reason = excluded.reason,
               updated_at_ms = CASE WHEN state = excluded.state THEN updated_at_ms ELSE excluded.updated_at_ms END",
            params![destination, state.as_str(), reason, now_ms()],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checkpointer_rewinds_a_wal_that_writes_never_let_go_of() {
        let dir = tempfile::tempdir().unwrap();
        let store = OutboxStore::open(dir.path()).unwrap();
        store
            .conn()
            .pragma_update(None, "wal_autocheckpoint", 0)
            .unwrap();
        let wal = dir.path().join(format!("{OUTBOX_FILE}-wal"));
        let write = |n: usize| {
            store
                .with_conn(|c| {
                    c.execute_batch("CREATE TABLE IF NOT EXISTS filler (b BLOB)")?;
                    for _ in 0..n {
                        c.execute("INSERT INTO filler VALUES (zeroblob(3000))", [])?;
                    }
                    Ok(())
                })
                .unwrap()
        };
        // Under load a commit always lands while the passive checkpoint copies, so the WAL
        // never ends up fully copied and SQLite never starts it over. A reader holding the
        // snapshot before the last write does the same here; it lets go only when the
        // checkpointer waits for it, which only a rewind does.
        use std::sync::atomic::{AtomicBool, Ordering};
        static RELEASE: AtomicBool = AtomicBool::new(false);
        fn release_reader(_: i32) -> bool {
            RELEASE.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
            true
        }
        let mut checkpointer = Connection::open(dir.path().join(OUTBOX_FILE)).unwrap();
        checkpointer.busy_handler(Some(release_reader)).unwrap();
        write(200);
        let (pinned, is_pinned) = std::sync::mpsc::channel();
        let path = dir.path().join(OUTBOX_FILE);
        let reader = std::thread::spawn(move || {
            let c = Connection::open(path).unwrap();
            c.execute_batch("BEGIN").unwrap();
            let _: i64 = c
                .query_row("SELECT count(*) FROM filler", [], |r| r.get(0))
                .unwrap();
            pinned.send(()).unwrap();
            while !RELEASE.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            c.execute_batch("COMMIT").unwrap();
        });
        is_pinned.recv().unwrap();
        write(5);
        assert_eq!(checkpoint(&checkpointer, 8).unwrap(), Pass::CaughtUp);
        RELEASE.store(true, Ordering::SeqCst);
        reader.join().unwrap();
        let long = std::fs::metadata(&wal).unwrap().len();
        write(200);
        assert!(
            std::fs::metadata(&wal).unwrap().len() <= long,
            "the second round of writes reused the WAL from its start"
        );
        // A reader that does not let go: the rewind gives up (and is tried again later).
        let stuck = Connection::open(dir.path().join(OUTBOX_FILE)).unwrap();
        stuck.execute_batch("BEGIN").unwrap();
        let _: i64 = stuck
            .query_row("SELECT count(*) FROM filler", [], |r| r.get(0))
            .unwrap();
        write(5);
        let impatient = Connection::open(dir.path().join(OUTBOX_FILE)).unwrap();
        impatient.busy_timeout(Duration::from_millis(10)).unwrap();
        assert_eq!(checkpoint(&impatient, 8).unwrap(), Pass::RewindBusy);
    }

    fn item(dest: &str, seq: Seq) -> NewItem {
        NewItem {
            destination: dest.into(),
            vendor: "acme".into(),
            seq,
            message_id: format!("m-{seq}"),
            delivery_id: format!("hd_{seq}"),
            subject: format!("sub_{seq}"),
            shape: ledger::Shape {
                purposes: "support".into(),
                legal_basis: "contract".into(),
                categories: "activity".into(),
                fields: "event".into(),
            },
            payload: format!("{{\"seq\":{seq}}}"),
        }
    }

    impl OutboxStore {
        fn route(
            &self,
            upto: Seq,
            items: &[NewItem],
            blocked: &[(String, &'static str)],
        ) -> Result<(), StoreError> {
            self.route_with(upto, |r| {
                for i in items {
                    r.queue(i)?;
                }
                for (d, reason) in blocked {
                    r.block(d, reason)?;
                }
                Ok(())
            })
        }
    }

    #[test]
    fn a_failure_of_a_person_erased_while_the_round_was_out_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = OutboxStore::open(dir.path()).unwrap();
        store.ensure_cursor("d").unwrap();
        let subject = store
            .transact(|tx| {
                let r = subjects::resolve(tx, &[("user_id", "h-jane".into())], 1)?;
                Ok((r.subject.unwrap().id, Vec::new()))
            })
            .unwrap();
        let epoch = store.subject_epoch().unwrap();
        // The round decided at `epoch`; the erasure lands before it is recorded.
        store
            .transact(|tx| {
                subjects::suppress(tx, &subject, 2)?;
                Ok(((), Vec::new()))
            })
            .unwrap();
        let failed = |mut item: NewItem, subject: &str| Failed {
            created_at_ms: 1,
            attempts: 1,
            next_at_ms: 0,
            error: "HTTP 503".into(),
            item: {
                item.subject = subject.into();
                item
            },
        };
        store
            .commit_round(Round {
                destination: "d".into(),
                upto: 3,
                epoch,
                retry: vec![failed(item("d", 1), &subject), failed(item("d", 2), "")],
                dead: vec![failed(item("d", 3), &subject)],
                ..Round::default()
            })
            .unwrap();
        let kept = store.head("d", 10).unwrap();
        assert_eq!(kept.iter().map(|i| i.seq).collect::<Vec<_>>(), [2]);
        assert!(store.dead_letters(Some("d"), 0, 10).unwrap().is_empty());
        assert_eq!(store.cursor("d").unwrap(), 3);
        let blocked: i64 = store
            .with_conn(|c| {
                Ok(c.query_row(
                    "SELECT count(*) FROM ledger WHERE outcome = 'block' AND reasons = 'subject.suppressed'",
                    [],
                    |r| r.get(0),
                )?)
            })
            .unwrap();
        assert_eq!(blocked, 2, "the ledger says why they were not kept");
    }

    #[test]
    fn killing_a_destination_again_keeps_when_it_was_killed() {
        let dir = tempfile::tempdir().unwrap();
        let store = OutboxStore::open(dir.path()).unwrap();
        store
            .set_state("d", DestinationState::Killed, "incident")
            .unwrap();
        // As if killed long ago.
        store
            .with_conn(|c| Ok(c.execute("UPDATE destination_state SET updated_at_ms = 1000", [])?))
            .unwrap();
        store
            .set_state("d", DestinationState::Killed, "still")
            .unwrap();
        assert_eq!(
            store.state_since("d").unwrap(),
            (DestinationState::Killed, 1000)
        );
        store.set_state("d", DestinationState::Active, "").unwrap();
        assert!(store.state_since("d").unwrap().1 > 1000);
    }

    #[test]
    fn a_delivery_that_lands_after_the_erasure_purged_it_reopens_the_request() {
        use crate::dsr::{self, NewTask};
        let dir = tempfile::tempdir().unwrap();
        let store = OutboxStore::open(dir.path()).unwrap();
        store
            .route(
                3,
                &[item("hook", 1), item("stripe", 2), item("meta", 3)],
                &[],
            )
            .unwrap();
        let queued = |d: &str| store.head(d, 1).unwrap().remove(0);
        let (hook, stripe, meta) = (queued("hook"), queued("stripe"), queued("meta"));
        // The two items are on their way when the erasure is filed: it purges them; the
        // webhook's part is done at once, Stripe's call is still to be made.
        let task = |destination: &str, target: &str| NewTask {
            destination: destination.into(),
            vendor: "acme".into(),
            manual: false,
            target: target.into(),
            instructions: String::new(),
            named: String::new(),
        };
        store
            .transact(|tx| {
                dsr::insert(
                    tx,
                    "dsr_1",
                    "erasure",
                    "sub_1",
                    "dpo",
                    1,
                    2,
                    &[
                        task("hook", r#"{"user_ids":["u-1"]}"#),
                        task("stripe", r#"{"vendor_refs":["cus_1"]}"#),
                        NewTask {
                            manual: true,
                            ..task("meta", "")
                        },
                    ],
                )?;
                for subject in ["sub_1", "sub_2", "sub_3"] {
                    dsr::purge_queues(tx, subject)?;
                }
                // The webhook confirmed at once, Meta by hand.
                let mut done = Vec::new();
                for d in ["hook", "meta"] {
                    done.extend(dsr::confirm_erasure(tx, "dsr_1", d, "acme", "ok", None, 3)?);
                }
                Ok(((), done))
            })
            .unwrap();
        assert_eq!(
            store
                .with_conn(|c| dsr::get(c, "dsr_1"))
                .unwrap()
                .unwrap()
                .tasks[0]
                .status,
            "done"
        );
        let sent = |i: &OutboxItem, user: &str| Sent {
            id: i.id,
            destination: i.destination.clone(),
            vendor: "acme".into(),
            seq: i.seq,
            message_id: i.message_id.clone(),
            subject: "sub_1".into(),
            ids: SentIds::of(
                &serde_json::json!({"userId": user, "context": {"traits": {"email": "j@example.com"}}}),
            ),
        };
        store
            .delivered(
                &[sent(&hook, "u-1"), sent(&stripe, "u-1"), sent(&meta, "u-1")],
                &[(stripe.id, "cus_2".to_owned())],
            )
            .unwrap();
        let request = store.with_conn(|c| dsr::get(c, "dsr_1")).unwrap().unwrap();
        assert_eq!(request.status, "open");
        let target = |i: usize| -> serde_json::Value {
            serde_json::from_str(request.tasks[i].target.as_deref().unwrap()).unwrap()
        };
        // Tasks in destination order: hook, meta, stripe.
        assert_eq!(
            request.tasks[1].status, "manual",
            "Meta must be asked again"
        );
        assert!(request.tasks[1].instructions.starts_with("Delivered again"));
        assert_eq!(
            request.tasks[0].status, "pending",
            "the webhook is asked again"
        );
        assert_eq!(
            (&target(0)["user_ids"], &target(0)["emails"]),
            (
                &serde_json::json!(["u-1"]),
                &serde_json::json!(["j@example.com"])
            ),
            "by the ids this delivery carried"
        );
        assert_eq!(
            target(2)["vendor_refs"],
            serde_json::json!(["cus_1", "cus_2"]),
            "the pending call also deletes the customer the late create made"
        );
        let late: i64 = store
            .with_conn(|c| {
                Ok(c.query_row(
                    "SELECT count(*) FROM ledger WHERE kind = 'delivery' AND detail = ?1",
                    ["delivered while an erasure purged it"],
                    |r| r.get(0),
                )?)
            })
            .unwrap();
        assert_eq!(late, 3, "the ledger says each vendor has it");
    }

    #[test]
    fn route_is_atomic_and_queues_are_fifo_per_destination() {
        let dir = tempfile::tempdir().unwrap();
        let store = OutboxStore::open(dir.path()).unwrap();
        assert_eq!(store.router_position().unwrap(), 0);
        store
            .route(
                3,
                &[item("a", 1), item("b", 1), item("a", 2), item("a", 3)],
                &[("b".into(), "consent.missing")],
            )
            .unwrap();
        assert_eq!(store.router_position().unwrap(), 3);
        let head = store.head("a", 10).unwrap();
        assert_eq!(head.iter().map(|i| i.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(
            store.blocked().unwrap(),
            vec![("b".into(), "consent.missing".into(), 1)]
        );

        // A failing insert rolls back the batch and the position.
        drop(store);
        let conn = Connection::open(dir.path().join(OUTBOX_FILE)).unwrap();
        conn.execute_batch("CREATE TRIGGER no_c BEFORE INSERT ON outbox WHEN NEW.destination = 'c' BEGIN SELECT RAISE(ABORT, 'refused'); END;").unwrap();
        drop(conn);
        let store = OutboxStore::open(dir.path()).unwrap();
        assert!(store.route(5, &[item("a", 4), item("c", 5)], &[]).is_err());
        assert_eq!(store.router_position().unwrap(), 3);
        assert_eq!(store.head("a", 10).unwrap().len(), 3);
    }

    #[test]
    fn retries_dead_letters_replay_and_discard() {
        let dir = tempfile::tempdir().unwrap();
        let store = OutboxStore::open(dir.path()).unwrap();
        store
            .route(3, &[item("a", 1), item("a", 2), item("a", 3)], &[])
            .unwrap();
        let ids: Vec<i64> = store.head("a", 10).unwrap().iter().map(|i| i.id).collect();
        store.retry(&ids[..1], 12_345, "HTTP 503").unwrap();
        let first = &store.head("a", 1).unwrap()[0];
        assert_eq!(
            (
                first.attempts,
                first.next_at_ms,
                first.last_error.as_deref()
            ),
            (1, 12_345, Some("HTTP 503"))
        );
        let sent: Vec<Sent> = store.head("a", 10).unwrap()[2..]
            .iter()
            .map(|i| Sent {
                id: i.id,
                destination: i.destination.clone(),
                vendor: "acme".into(),
                seq: i.seq,
                message_id: i.message_id.clone(),
                subject: i.subject.clone(),
                ids: SentIds::default(),
            })
            .collect();
        store.delivered(&sent, &[]).unwrap();
        store
            .dead_letter(&ids[1..2], "HTTP 400: bad event")
            .unwrap();
        assert_eq!(store.head("a", 10).unwrap().len(), 1);
        let dead = store.dead_letters(Some("a"), 0, 10).unwrap();
        assert_eq!(
            (dead.len(), dead[0].reason.as_str(), dead[0].seq),
            (1, "HTTP 400: bad event", 2)
        );
        assert_eq!(store.stats("a").unwrap().dead_letters, 1);
        assert_eq!(store.replay("a", None).unwrap(), 1);
        assert_eq!(
            store
                .head("a", 10)
                .unwrap()
                .iter()
                .map(|i| i.seq)
                .collect::<Vec<_>>(),
            [1, 2]
        );
        store
            .dead_letter(&[store.head("a", 10).unwrap()[1].id], "again")
            .unwrap();
        assert_eq!(
            store.discard("b", None).unwrap(),
            0,
            "other destinations are not touched"
        );
        assert_eq!(store.discard("a", None).unwrap(), 1);
        assert!(store.dead_letters(None, 0, 10).unwrap().is_empty());
    }

    #[test]
    fn the_ledger_keeps_a_dead_letters_reason_but_not_the_vendors_answer() {
        assert_eq!(
            ledger_reason(r#"HTTP 400: {"error":"jane@example.com is invalid"}"#),
            "HTTP 400"
        );
        assert_eq!(
            ledger_reason("the queued payload is not JSON"),
            "the queued payload is not JSON"
        );
    }

    #[test]
    fn destination_states_persist() {
        let dir = tempfile::tempdir().unwrap();
        let store = OutboxStore::open(dir.path()).unwrap();
        assert_eq!(store.state("a").unwrap().0, DestinationState::Active);
        store
            .set_state("a", DestinationState::Paused, "credentials refused")
            .unwrap();
        drop(store);
        let store = OutboxStore::open(dir.path()).unwrap();
        assert_eq!(
            store.state("a").unwrap(),
            (DestinationState::Paused, "credentials refused".into())
        );
    }
}
