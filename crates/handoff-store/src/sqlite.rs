//! The embedded journal: SQLite in WAL mode with group commit.
//!
//! One writer thread owns the write connection. Requests queue on a channel; the writer takes
//! everything queued, writes it in one transaction and commits once, so concurrent requests share
//! one fsync (`synchronous = FULL`: a commit is on disk when it returns). Reads use their own
//! connection, which WAL lets run beside the writer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::sealed_payloads::PayloadCipher;
use tokio::sync::{mpsc, oneshot, watch};

use crate::dedup::{self, Dedup};
use crate::{
    AppendOutcome, Journal, JournalStats, NewEvent, QuarantineEntry, QuarantinedMessage, Seq,
    StoreError, StoredEvent,
};

/// File name of the journal database inside the data directory.
pub const DB_FILE: &str = "journal.db";
/// File locked by the gateway that owns the data directory.
pub const LOCK_FILE: &str = "handoff.lock";
/// Schema version this build writes (`PRAGMA user_version`). 2: the quarantine's token index.
const SCHEMA_VERSION: i64 = 2;
/// Requests waiting for the writer before senders are made to wait: bounds memory under overload
/// while leaving plenty of room to gather a large group.
const QUEUE_CAPACITY: usize = 4096;
/// Most requests written in one transaction; caps the latency one commit can add.
const MAX_GROUP: usize = 1024;
/// A group commit slower than this is logged as a warning, with where the time went.
const SLOW_COMMIT: Duration = Duration::from_millis(50);
/// How often the checkpoint thread copies committed WAL pages into the database file. Checkpoints
/// run on their own thread and connection, never inside a commit, so ingest latency does not
/// carry their cost; this interval only bounds how large the WAL grows between them.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// Pause before another pass when the last one left only a few pages behind.
const CHECKPOINT_RETRY: Duration = Duration::from_millis(20);
/// WAL size (in pages) past which the writer is asked to finish a checkpoint itself. The WAL
/// restarts from its beginning when a checkpoint has copied all of it; when ingest leaves gaps
/// between commits the background thread manages that alone. Under sustained saturation it
/// never can (new pages arrive during every pass), so past this size the writer copies the small
/// remainder between two groups, at the cost of one commit's wait (tens of milliseconds on a busy
/// disk). 65536 pages of 4 KiB is 256 MiB.
const WAL_RESTART_PAGES: i64 = 65_536;
/// Most WAL pages the writer copies itself when it finishes a checkpoint (256 pages, 1 MiB): its
/// copy and fsync hold up the requests waiting for the next commit, so keep it small.
const CATCH_UP_PAGES: i64 = 256;
/// Size the WAL file is truncated back to after a checkpoint lets it restart, so a burst does not
/// leave a large file behind.
const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq            INTEGER PRIMARY KEY,
    source         TEXT    NOT NULL,
    message_id     TEXT    NOT NULL,
    received_at_ms INTEGER NOT NULL,
    payload        TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    id             INTEGER PRIMARY KEY,
    source         TEXT    NOT NULL,
    received_at_ms INTEGER NOT NULL,
    batch_index    INTEGER NOT NULL,
    code           TEXT    NOT NULL,
    message        TEXT    NOT NULL,
    raw            TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS consumers (
    name          TEXT PRIMARY KEY,
    acked_seq     INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sources (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    write_key_sha256 BLOB NOT NULL,
    created_at_ms    INTEGER NOT NULL
);
";

/// Schema 1 to 2: the quarantine's token index (see `quarantine.rs`) and its retention's index
/// by time. Rows from before stay `keyed = 0`: tested at every erasure until they age out.
const MIGRATE_TO_2: &str = "
CREATE TABLE IF NOT EXISTS quarantine_keys (
    key BLOB    NOT NULL,
    id  INTEGER NOT NULL,
    PRIMARY KEY (key, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS quarantine_keys_by_id ON quarantine_keys (id);
CREATE INDEX IF NOT EXISTS quarantine_received ON quarantine (received_at_ms);
";
/// Columns schema 2 adds, each added only where missing (so the migration can run again).
const COLUMNS_OF_2: [(&str, &str, &str); 3] = [
    ("quarantine", "keyed", "INTEGER NOT NULL DEFAULT 0"),
    ("sources", "previous_key_sha256", "BLOB"),
    ("sources", "previous_until_ms", "INTEGER"),
];

enum Command {
    Append {
        events: Vec<NewEvent>,
        quarantine: Vec<QuarantineEntry>,
        reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
    },
    Ack {
        consumer: String,
        upto: Seq,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Deletes quarantined messages received before `before_ms` (retention), a chunk at a time.
    PurgeQuarantine {
        before_ms: i64,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Overwrites the payloads of events (erasure).
    EraseEvents {
        seqs: Vec<Seq>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Deletes events before `upto` received before `before_ms` (retention), a chunk of
    /// sequence numbers at a time.
    PurgeEvents {
        upto: Seq,
        before_ms: i64,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Shutdown,
}

/// Sequence numbers one retention step looks at: a bounded range of the primary key, so a
/// step is short (the writer holds ingest's next commit while it runs).
pub const PURGE_EVENTS_CHUNK: Seq = 10_000;

/// Deletes, among the oldest [`PURGE_EVENTS_CHUNK`] sequence numbers, the events before
/// `upto` received before `before_ms`. The newest event is always kept: the next sequence
/// number is its successor, also after a restart. Returns how many were deleted.
fn purge_events_in(
    tx: &rusqlite::Transaction<'_>,
    upto: Seq,
    before_ms: i64,
) -> Result<u64, StoreError> {
    let (min, max): (Option<i64>, Option<i64>) =
        tx.query_row("SELECT min(seq), max(seq) FROM events", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let (Some(min), Some(max)) = (min, max) else {
        return Ok(0);
    };
    let below = i64::try_from(upto)
        .unwrap_or(i64::MAX)
        .min(max)
        .min(min.saturating_add(PURGE_EVENTS_CHUNK as i64));
    // Only a leading run goes, so the numbers left have no gaps: times are taken before the
    // writer numbers events, so they are not quite in order.
    let young: Option<i64> = tx
        .prepare_cached("SELECT min(seq) FROM events WHERE seq < ?1 AND received_at_ms >= ?2")?
        .query_row(params![below, before_ms], |r| r.get(0))?;
    let below = young.map_or(below, |y| y.min(below));
    let n = tx
        .prepare_cached("DELETE FROM events WHERE seq < ?1")?
        .execute([below])?;
    Ok(n as u64)
}

/// A source registered in the store (the embedded default's own source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSource {
    pub id: String,
    pub name: String,
    pub write_key_sha256: Vec<u8>,
    /// The key it replaced, accepted until `previous_until_ms` (ms since the epoch).
    pub previous_key_sha256: Option<Vec<u8>>,
    pub previous_until_ms: Option<i64>,
}

struct Shared {
    /// Encrypts payloads as they are stored and decrypts them as they are read (set by the
    /// gateway before it serves; without it payloads are stored as text).
    cipher: std::sync::OnceLock<Arc<PayloadCipher>>,
    /// Set by the checkpoint thread when the writer should finish a checkpoint (see
    /// [`WAL_RESTART_PAGES`]).
    restart_wal: std::sync::atomic::AtomicBool,
    head: AtomicU64,
    quarantined: AtomicU64,
    commits: AtomicU64,
}

/// The SQLite journal. Open one per data directory per process.
pub struct SqliteJournal {
    /// Held (locked) for as long as the journal is open.
    _lock: std::fs::File,
    tx: mpsc::Sender<Command>,
    reader: Arc<Mutex<Connection>>,
    shared: Arc<Shared>,
    head_rx: watch::Receiver<Seq>,
    writer: Mutex<Option<JoinHandle<()>>>,
    path: PathBuf,
}

/// Milliseconds since the Unix epoch, as the stores record times.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What an erased event's payload becomes: its sequence number stays (numbers are never
/// reused and consumers keep their positions), its content is gone.
pub const ERASED_PAYLOAD: &str = r#"{"erased":true}"#;

/// Gives the embedded default's source `id` a new write key (its SHA-256), keeping the current
/// one valid for `grace_ms` more. Safe while the gateway runs (SQLite serialises this write with
/// the journal's writer; the gateway re-reads sources every few seconds). `false` if there is no
/// such source.
pub fn rotate_source_key(
    data_dir: &Path,
    id: &str,
    new_key_sha256: &[u8],
    grace_ms: i64,
) -> Result<bool, StoreError> {
    let conn = Connection::open(data_dir.join(DB_FILE))?;
    configure(&conn)?;
    let n = conn.execute(
        "UPDATE sources SET previous_key_sha256 = write_key_sha256, previous_until_ms = ?3,
                            write_key_sha256 = ?2
         WHERE id = ?1",
        params![id, new_key_sha256, now_ms() + grace_ms],
    )?;
    Ok(n == 1)
}

/// Replaces the payloads of the events `seqs` in the journal of `data_dir` by
/// [`ERASED_PAYLOAD`] (erasure). Safe while the gateway runs: SQLite serialises this write
/// with the journal's writer. `secure_delete` overwrites the freed content in the file.
/// Returns how many events were erased.
///
/// For a process without the gateway (the CLI): the gateway itself erases through its
/// journal's writer ([`Journal::erase_events`]), one writer per file.
pub fn erase_events(data_dir: &Path, seqs: &[Seq]) -> Result<usize, StoreError> {
    if seqs.is_empty() {
        return Ok(0);
    }
    erasing(data_dir, |tx| erase_events_in(tx, seqs))
}

/// Events one erasure step overwrites.
const ERASE_CHUNK: usize = 1000;

fn erase_events_in(tx: &rusqlite::Transaction<'_>, seqs: &[Seq]) -> Result<usize, StoreError> {
    // What is overwritten is overwritten in the file too, not left in free space.
    tx.pragma_update(None, "secure_delete", "ON")?;
    let erased = (|| {
        let mut up = tx.prepare_cached(
            "UPDATE events SET payload = ?2 WHERE seq = ?1 AND payload IS NOT ?2",
        )?;
        let mut n = 0;
        for seq in seqs {
            n += up.execute(params![*seq as i64, ERASED_PAYLOAD])?;
        }
        Ok(n)
    })();
    tx.pragma_update(None, "secure_delete", "FAST")?;
    erased
}

/// Runs `f` in one durable transaction on the journal of `data_dir`, freed content overwritten.
pub(crate) fn erasing(
    data_dir: &Path,
    f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<usize, StoreError>,
) -> Result<usize, StoreError> {
    let mut conn = Connection::open(data_dir.join(DB_FILE))?;
    configure(&conn)?;
    conn.pragma_update(None, "secure_delete", "ON")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let n = f(&tx)?;
    tx.commit()?;
    Ok(n)
}

pub use crate::quarantine::erase_quarantined;

/// The payloads of the events `seqs` (for a data-subject access export), decrypted with
/// `cipher`.
pub fn read_events_at(
    data_dir: &Path,
    cipher: Option<&PayloadCipher>,
    seqs: &[Seq],
) -> Result<Vec<StoredEvent>, StoreError> {
    let conn = Connection::open_with_flags(
        data_dir.join(DB_FILE),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    configure(&conn)?;
    let mut out = Vec::new();
    for seq in seqs {
        out.extend(
            read_events(&conn, cipher, seq - 1, 1)?
                .into_iter()
                .filter(|e| e.seq == *seq),
        );
    }
    Ok(out)
}

/// Adds each (table, column, declaration) the table lacks: migrations that can run again.
pub(crate) fn add_missing_columns(
    conn: &Connection,
    columns: &[(&str, &str, &str)],
) -> Result<(), StoreError> {
    for (table, column, decl) in columns {
        let present: bool = conn.query_row(
            &format!("SELECT count(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
            [column],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}

pub(crate) fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(())
}

impl SqliteJournal {
    /// Opens (creating if needed) the journal in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        crate::files::create_dir(data_dir)?;
        // One gateway per data directory: a second writer would clash on sequence numbers and
        // share the deduplication index. The lock goes with the process, also on a crash.
        let lock_path = data_dir.join(LOCK_FILE);
        crate::files::create_file(&lock_path)?;
        let lock = std::fs::OpenOptions::new().write(true).open(&lock_path)?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Locked(data_dir.display().to_string()));
        }
        let path = data_dir.join(DB_FILE);
        crate::files::create_file(&path)?;
        let conn = Connection::open(&path)?;
        configure(&conn)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Io(std::io::Error::other(format!(
                "{} cannot use write-ahead logging (journal_mode is {mode}); is it on a network file system?",
                path.display()
            ))));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Retention's deletes zero what they free where that costs no extra I/O; erasure
        // turns full overwriting on for its own statements.
        conn.pragma_update(None, "secure_delete", "FAST")?;
        // Checkpoints belong to the checkpoint thread (below), not to commits.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                path: path.display().to_string(),
                found: version,
                known: SCHEMA_VERSION,
            });
        }
        conn.execute_batch(SCHEMA)?;
        {
            // One transaction, the version included: a crash midway leaves schema 1 whole.
            let tx = conn.unchecked_transaction()?;
            add_missing_columns(&tx, &COLUMNS_OF_2)?;
            tx.execute_batch(MIGRATE_TO_2)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            tx.commit()?;
        }
        // A random id for this journal, so that derived files (the deduplication index) can tell
        // when they were made from another one (say, before a restore from backup).
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('instance', lower(hex(randomblob(16))))",
            [],
        )?;
        let instance: String =
            conn.query_row("SELECT value FROM meta WHERE key = 'instance'", [], |r| {
                r.get(0)
            })?;

        let head: i64 =
            conn.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))?;
        let quarantined: i64 =
            conn.query_row("SELECT count(*) FROM quarantine", [], |r| r.get(0))?;
        let shared = Arc::new(Shared {
            cipher: std::sync::OnceLock::new(),
            restart_wal: std::sync::atomic::AtomicBool::new(false),
            head: AtomicU64::new(head as u64),
            quarantined: AtomicU64::new(quarantined as u64),
            commits: AtomicU64::new(0),
        });

        let reader = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        configure(&reader)?;

        let dedup = Dedup::open(data_dir, &conn, &instance, head as Seq, now_ms())?;
        let checkpointer = Checkpointer::start(&path, shared.clone())?;
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let (head_tx, head_rx) = watch::channel(head as Seq);
        let mut writer = Writer {
            conn,
            next_seq: head as Seq + 1,
            shared: shared.clone(),
            head_tx,
            dedup,
            checkpointer: Some(checkpointer),
        };
        let handle = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            _lock: lock,
            tx,
            reader: Arc::new(Mutex::new(reader)),
            shared,
            head_rx,
            writer: Mutex::new(Some(handle)),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Encrypts every payload stored from now on with `cipher` and decrypts what is read (the
    /// gateway sets it before it serves). Set once; later calls are ignored. Fails when the
    /// newest sealed payload does not open with it: the keys belong to another journal (a
    /// `state.db` restored from another backup), and every event would read as damaged.
    pub fn set_cipher(&self, cipher: Arc<PayloadCipher>) -> Result<(), StoreError> {
        // The newest sealed payloads (among the last 10,000 events): the keys are wrong when
        // one is under a key id this cipher does not hold, or when none of them opens (one
        // damaged row does not stop the start; it reads as unreadable).
        let newest: Vec<(i64, Vec<u8>)> = {
            let conn = self.reader.lock().unwrap_or_else(|e| e.into_inner());
            let mut stmt = conn.prepare(
                "SELECT seq, payload FROM events
                 WHERE seq > (SELECT coalesce(max(seq), 0) FROM events) - 10000
                   AND typeof(payload) = 'blob'
                 ORDER BY seq DESC LIMIT 8",
            )?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        let opened = newest
            .iter()
            .any(|(seq, stored)| cipher.open(*seq as Seq, stored).is_ok());
        let foreign = newest.iter().any(|(_, stored)| cipher.is_foreign(stored));
        if let Some((seq, stored)) = newest.first()
            && (foreign || !opened)
            && let Err(e) = cipher.open(*seq as Seq, stored)
        {
            let seq = *seq;
            return Err(StoreError::Undecryptable {
                seq: seq as Seq,
                why: format!(
                    "{e}; the data keys in state.db are not this journal's (restored from another backup?): start with the state.db and master key that belong to it"
                ),
            });
        }
        let _ = self.shared.cipher.set(cipher);
        Ok(())
    }

    /// Sources registered in the store (used by the embedded default, which has no config file).
    pub fn sources(&self) -> Result<Vec<StoredSource>, StoreError> {
        let conn = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        read_sources(&conn)
    }

    /// Registers a source with the SHA-256 of its write key. Fails if the id exists.
    pub fn insert_source(
        &self,
        id: &str,
        name: &str,
        write_key_sha256: &[u8],
    ) -> Result<(), StoreError> {
        // A rare administrative write: its own short-lived connection keeps it off the hot path.
        let conn = Connection::open(&self.path)?;
        configure(&conn)?;
        conn.execute(
            "INSERT INTO sources (id, name, write_key_sha256, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![id, name, write_key_sha256, now_ms()],
        )?;
        Ok(())
    }

    async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|e| e.into_inner());
            f(&conn)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }
}

fn read_sources(conn: &Connection) -> Result<Vec<StoredSource>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, name, write_key_sha256, previous_key_sha256, previous_until_ms FROM sources ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(StoredSource {
            id: r.get(0)?,
            name: r.get(1)?,
            write_key_sha256: r.get(2)?,
            previous_key_sha256: r.get(3)?,
            previous_until_ms: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn read_events(
    conn: &Connection,
    cipher: Option<&PayloadCipher>,
    after: Seq,
    limit: usize,
) -> Result<Vec<StoredEvent>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, source, message_id, received_at_ms, payload FROM events
         WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(params![after as i64, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as Seq,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, rusqlite::types::Value>(4)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut opener = cipher.map(PayloadCipher::opener);
    rows.into_iter()
        .map(|(seq, source, message_id, received_at_ms, stored)| {
            // A payload sealed under a data key this process does not hold is a configuration
            // fault (another installation's state.db): an error, so that nothing is decided
            // about events that only look unreadable.
            let foreign = match (&stored, cipher) {
                (rusqlite::types::Value::Blob(b), Some(c)) => c.is_foreign(b),
                _ => false,
            };
            let payload = match crate::sealed_payloads::read((&stored).into(), seq, opener.as_mut())
            {
                Ok(p) => p,
                // A damaged row: read as an unreadable payload, which delivery records
                // (`journal.unreadable`) and `journal dump` marks, instead of stopping every
                // reader at it.
                Err(e) if cipher.is_some() && !foreign => {
                    tracing::warn!(seq, error = %e, "a stored payload cannot be decrypted");
                    String::new()
                }
                Err(e) => return Err(e),
            };
            Ok(StoredEvent {
                seq,
                source,
                message_id,
                received_at_ms,
                payload,
            })
        })
        .collect()
}

fn read_acked(conn: &Connection, consumer: &str) -> Result<Seq, StoreError> {
    let seq: Option<i64> = conn
        .query_row(
            "SELECT acked_seq FROM consumers WHERE name = ?1",
            [consumer],
            |r| r.get(0),
        )
        .optional()?;
    Ok(seq.unwrap_or(0) as Seq)
}

#[async_trait]
impl Journal for SqliteJournal {
    async fn append(
        &self,
        events: Vec<NewEvent>,
        quarantine: Vec<QuarantineEntry>,
    ) -> Result<AppendOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Append {
                events,
                quarantine,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read(&self, after: Seq, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let shared = self.shared.clone();
        self.with_reader(move |c| {
            read_events(c, shared.cipher.get().map(Arc::as_ref), after, limit)
        })
        .await
    }

    async fn ack(&self, consumer: &str, upto: Seq) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Ack {
                consumer: consumer.to_owned(),
                upto,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn purge_quarantine(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let (reply, rx) = oneshot::channel();
            self.tx
                .send(Command::PurgeQuarantine { before_ms, reply })
                .await
                .map_err(|_| StoreError::Closed)?;
            let n = rx.await.map_err(|_| StoreError::Closed)??;
            total += n;
            if n < crate::quarantine::PURGE_CHUNK as u64 {
                return Ok(total);
            }
        }
    }

    async fn erase_events(&self, seqs: Vec<Seq>) -> Result<u64, StoreError> {
        // In steps, so a person with many events does not hold ingest's next commit long.
        let mut total = 0;
        for chunk in seqs.chunks(ERASE_CHUNK) {
            let (reply, rx) = oneshot::channel();
            self.tx
                .send(Command::EraseEvents {
                    seqs: chunk.to_vec(),
                    reply,
                })
                .await
                .map_err(|_| StoreError::Closed)?;
            total += rx.await.map_err(|_| StoreError::Closed)??;
        }
        Ok(total)
    }

    async fn purge_events(&self, upto: Seq, before_ms: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let (reply, rx) = oneshot::channel();
            self.tx
                .send(Command::PurgeEvents {
                    upto,
                    before_ms,
                    reply,
                })
                .await
                .map_err(|_| StoreError::Closed)?;
            let n = rx.await.map_err(|_| StoreError::Closed)??;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    async fn acked(&self, consumer: &str) -> Result<Seq, StoreError> {
        let consumer = consumer.to_owned();
        self.with_reader(move |c| read_acked(c, &consumer)).await
    }

    async fn stats(&self) -> Result<JournalStats, StoreError> {
        let path = self.path.clone();
        let mut stats = self
            .with_reader(move |c| {
                let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
                let page_size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
                let mut wal = path.into_os_string();
                wal.push("-wal");
                let wal_bytes = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
                let mut stmt =
                    c.prepare_cached("SELECT name, acked_seq FROM consumers ORDER BY name")?;
                let consumers = stmt
                    .query_map([], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as Seq))
                    })?
                    .collect::<Result<_, _>>()?;
                Ok(JournalStats {
                    bytes: (pages * page_size) as u64 + wal_bytes,
                    consumers,
                    ..JournalStats::default()
                })
            })
            .await?;
        stats.head = self.shared.head.load(Ordering::Acquire);
        stats.quarantined = self.shared.quarantined.load(Ordering::Relaxed);
        stats.commits = self.shared.commits.load(Ordering::Relaxed);
        Ok(stats)
    }

    fn subscribe(&self) -> watch::Receiver<Seq> {
        self.head_rx.clone()
    }

    fn accepts_writes(&self) -> bool {
        // The writer thread owns the receiving end; it is gone once that thread has stopped.
        !self.tx.is_closed()
    }

    async fn close(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

/// Copies committed WAL pages into the database file, off the writer's path.
struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    handle: JoinHandle<()>,
}

impl Checkpointer {
    fn start(path: &Path, shared: Arc<Shared>) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        configure(&conn)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("journal-checkpoint".into())
            .spawn(move || {
                let mut done_up_to = shared.head.load(Ordering::Acquire);
                let mut wait = CHECKPOINT_EVERY;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(wait)
                {
                    wait = CHECKPOINT_EVERY;
                    let head = shared.head.load(Ordering::Acquire);
                    if head == done_up_to {
                        continue;
                    }
                    // PASSIVE: copy what it can without waiting for the writer or readers.
                    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                    });
                    match result {
                        Ok((wal_pages, copied)) => {
                            let remainder = wal_pages - copied;
                            if remainder == 0 {
                                done_up_to = head;
                            }
                            if wal_pages > WAL_RESTART_PAGES && remainder <= CATCH_UP_PAGES {
                                shared.restart_wal.store(true, Ordering::Release);
                            }
                            // Behind: go again soon, so that a pass can finish between two
                            // commits (which lets the WAL restart without the writer's help).
                            if remainder > CATCH_UP_PAGES {
                                wait = Duration::ZERO;
                            } else if remainder > 0 {
                                wait = CHECKPOINT_RETRY;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "journal checkpoint failed; will retry")
                        }
                    }
                }
            })?;
        Ok(Self { stop, handle })
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.handle.join();
    }
}

struct Writer {
    conn: Connection,
    checkpointer: Option<Checkpointer>,
    next_seq: Seq,
    shared: Arc<Shared>,
    head_tx: watch::Sender<Seq>,
    dedup: Dedup,
}

enum Reply {
    Append(
        oneshot::Sender<Result<AppendOutcome, StoreError>>,
        AppendOutcome,
    ),
    Ack(oneshot::Sender<Result<(), StoreError>>),
    Purge(oneshot::Sender<Result<u64, StoreError>>, u64),
}

impl Writer {
    fn run(&mut self, mut rx: mpsc::Receiver<Command>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        loop {
            let Some(first) = rx.blocking_recv() else {
                return;
            };
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(cmd) => group.push(cmd),
                    Err(_) => break,
                }
            }
            let shutdown = group.iter().any(|c| matches!(c, Command::Shutdown));
            self.commit_group(&mut group);
            if self.shared.restart_wal.swap(false, Ordering::AcqRel) {
                // Nothing writes while this runs, so it copies the remainder and the next
                // transaction restarts the WAL from its beginning.
                let started = Instant::now();
                if let Err(e) =
                    self.conn
                        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                {
                    tracing::warn!(error = %e, "journal checkpoint in the writer failed");
                }
                if started.elapsed() >= SLOW_COMMIT {
                    tracing::warn!(
                        ms = started.elapsed().as_millis() as u64,
                        "slow WAL catch-up checkpoint in the writer"
                    );
                }
            }
            if shutdown {
                self.dedup.close(self.next_seq - 1);
                if let Some(c) = self.checkpointer.take() {
                    c.stop();
                }
                if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
                    tracing::warn!(error = %e, "journal checkpoint at shutdown failed");
                }
                return;
            }
        }
    }

    /// Writes every command of `group` in one transaction, commits once, then answers each.
    fn commit_group(&mut self, group: &mut Vec<Command>) {
        let start_seq = self.next_seq;
        let mut replies = Vec::with_capacity(group.len());
        let mut new_quarantined = 0u64;
        let mut purged = 0u64;
        let started = Instant::now();
        let mut written_at = started;
        let dedup = &mut self.dedup;
        let conn = &mut self.conn;
        let mut seq = start_seq;
        let result = (|| -> Result<(), StoreError> {
            let tx = conn.transaction();
            // Every command gets a reply slot before any work, so that if the group fails each
            // of its requests is answered with the cause, not left to find its channel closed.
            let mut failure: Option<StoreError> = tx.as_ref().err().map(|_| StoreError::Closed);
            for cmd in group.drain(..) {
                let (Ok(tx), None) = (&tx, &failure) else {
                    match cmd {
                        Command::Append { reply, .. } => {
                            replies.push(Reply::Append(reply, AppendOutcome::default()))
                        }
                        Command::Ack { reply, .. } => replies.push(Reply::Ack(reply)),
                        Command::PurgeQuarantine { reply, .. }
                        | Command::PurgeEvents { reply, .. }
                        | Command::EraseEvents { reply, .. } => {
                            replies.push(Reply::Purge(reply, 0))
                        }
                        Command::Shutdown => {}
                    }
                    continue;
                };
                match cmd {
                    Command::Append {
                        events,
                        quarantine,
                        reply,
                    } => match append_in(
                        tx,
                        dedup,
                        self.shared.cipher.get().map(Arc::as_ref),
                        &mut seq,
                        &events,
                        &quarantine,
                    ) {
                        Ok(outcome) => {
                            new_quarantined += quarantine.len() as u64;
                            replies.push(Reply::Append(reply, outcome));
                        }
                        Err(e) => {
                            failure = Some(e);
                            replies.push(Reply::Append(reply, AppendOutcome::default()));
                        }
                    },
                    Command::Ack {
                        consumer,
                        upto,
                        reply,
                    } => {
                        let acked = tx
                            .prepare_cached(
                                "INSERT INTO consumers (name, acked_seq, updated_at_ms) VALUES (?1, ?2, ?3)
                                 ON CONFLICT (name) DO UPDATE SET
                                   acked_seq = max(acked_seq, excluded.acked_seq),
                                   updated_at_ms = excluded.updated_at_ms",
                            )
                            .and_then(|mut stmt| stmt.execute(params![consumer, upto as i64, now_ms()]));
                        if let Err(e) = acked {
                            failure = Some(e.into());
                        }
                        replies.push(Reply::Ack(reply));
                    }
                    Command::EraseEvents { seqs, reply } => match erase_events_in(tx, &seqs) {
                        Ok(n) => replies.push(Reply::Purge(reply, n as u64)),
                        Err(e) => {
                            failure = Some(e);
                            replies.push(Reply::Purge(reply, 0));
                        }
                    },
                    Command::PurgeEvents {
                        upto,
                        before_ms,
                        reply,
                    } => match purge_events_in(tx, upto, before_ms) {
                        Ok(n) => replies.push(Reply::Purge(reply, n)),
                        Err(e) => {
                            failure = Some(e);
                            replies.push(Reply::Purge(reply, 0));
                        }
                    },
                    Command::PurgeQuarantine { before_ms, reply } => {
                        match crate::quarantine::purge_in(tx, before_ms) {
                            Ok(n) => {
                                purged += n;
                                replies.push(Reply::Purge(reply, n));
                            }
                            Err(e) => {
                                failure = Some(e);
                                replies.push(Reply::Purge(reply, 0));
                            }
                        }
                    }
                    Command::Shutdown => {}
                }
            }
            let tx = tx?;
            if let Some(e) = failure {
                return Err(e); // dropping `tx` rolls the whole group back
            }
            written_at = Instant::now();
            tx.commit()?;
            Ok(())
        })();
        let took = started.elapsed();
        if took >= SLOW_COMMIT {
            tracing::warn!(
                write_ms = (written_at - started).as_millis() as u64,
                commit_ms = written_at.elapsed().as_millis() as u64,
                requests = replies.len(),
                "slow journal commit: requests waited this long for durability"
            );
        }
        group.clear();
        match result {
            Ok(()) => {
                self.next_seq = seq;
                self.dedup.commit();
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .quarantined
                    .fetch_add(new_quarantined, Ordering::Relaxed);
                self.shared.quarantined.fetch_sub(purged, Ordering::Relaxed);
                let head = self.next_seq - 1;
                self.shared.head.store(head, Ordering::Release);
                self.head_tx.send_replace(head);
                for r in replies {
                    match r {
                        Reply::Append(tx, outcome) => {
                            let _ = tx.send(Ok(outcome));
                        }
                        Reply::Ack(tx) => {
                            let _ = tx.send(Ok(()));
                        }
                        Reply::Purge(tx, n) => {
                            let _ = tx.send(Ok(n));
                        }
                    }
                }
                // After answering: handing keys to the flusher may wait if it is far behind.
                self.dedup.maybe_flush(head);
            }
            Err(e) => {
                self.dedup.rollback();
                tracing::error!(error = %e, code = e.code(), "journal commit failed; the requests in it are answered with an error");
                for r in replies {
                    let failed = StoreError::CommitFailed {
                        code: e.code(),
                        message: e.to_string(),
                    };
                    match r {
                        Reply::Append(tx, _) => {
                            let _ = tx.send(Err(failed));
                        }
                        Reply::Ack(tx) => {
                            let _ = tx.send(Err(failed));
                        }
                        Reply::Purge(tx, _) => {
                            let _ = tx.send(Err(failed));
                        }
                    }
                }
            }
        }
    }
}

fn append_in(
    tx: &rusqlite::Transaction<'_>,
    dedup: &mut Dedup,
    cipher: Option<&PayloadCipher>,
    seq: &mut Seq,
    events: &[NewEvent],
    quarantine: &[QuarantineEntry],
) -> Result<AppendOutcome, StoreError> {
    let mut outcome = AppendOutcome::default();
    // One derived key for the events of this request.
    let sealer = cipher.map(PayloadCipher::sealer);
    let mut insert = tx.prepare_cached(
        "INSERT INTO events (seq, source, message_id, received_at_ms, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for e in events {
        let source = e.source.as_str();
        let fresh =
            dedup.check_and_remember(dedup::key(source, &e.message_id), e.received_at_ms)?;
        if fresh {
            let sealed;
            let payload: &dyn rusqlite::ToSql = match &sealer {
                Some(c) => {
                    sealed = c.seal(*seq, &e.payload);
                    &sealed
                }
                None => &e.payload,
            };
            insert.execute(params![
                *seq as i64,
                source,
                e.message_id,
                e.received_at_ms,
                payload
            ])?;
            *seq += 1;
            outcome.stored += 1;
        } else {
            outcome.duplicates += 1;
        }
    }
    if !quarantine.is_empty() {
        let mut q = tx.prepare_cached(
            "INSERT INTO quarantine (source, received_at_ms, batch_index, code, message, raw)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for m in quarantine {
            // A message naming more identifiers than the index takes is kept without its raw
            // text: otherwise every erasure would have to read it (an attacker could make many).
            let keys = crate::quarantine::tokens(&m.raw);
            let (raw, message) = match &keys {
                Some(_) => (
                    m.raw.as_str(),
                    std::borrow::Cow::Borrowed(m.message.as_str()),
                ),
                None => (
                    "",
                    std::borrow::Cow::Owned(format!(
                        "{} (raw input not kept: it names more than {} identifiers)",
                        m.message,
                        crate::quarantine::MAX_TOKENS
                    )),
                ),
            };
            q.execute(params![
                m.source.as_str(),
                m.received_at_ms,
                m.index,
                m.code,
                message,
                raw
            ])?;
            crate::quarantine::index_row(
                tx,
                tx.last_insert_rowid(),
                raw,
                keys.as_deref().unwrap_or(&[]),
            )?;
        }
    }
    Ok(outcome)
}

/// Read-only access for operators (`handoff journal dump`), safe while the server runs.
pub struct JournalReader {
    conn: Connection,
    /// Decrypts the events' payloads ([`JournalReader::with_cipher`]).
    cipher: Option<Arc<PayloadCipher>>,
    /// Schema version of the file (events and quarantine read the same in every version).
    version: i64,
    path: PathBuf,
}

impl JournalReader {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join(DB_FILE);
        if !path.exists() {
            return Err(StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no journal at {} (is --data-dir right?)", path.display()),
            )));
        }
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        configure(&conn)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        Ok(Self {
            conn,
            cipher: None,
            version,
            path,
        })
    }

    /// Reads encrypted payloads with `cipher` (without it, reading one is an error).
    pub fn with_cipher(mut self, cipher: Arc<PayloadCipher>) -> Self {
        self.cipher = Some(cipher);
        self
    }

    /// The sources the embedded default registered (none for a gateway run from a file).
    pub fn sources(&self) -> Result<Vec<StoredSource>, StoreError> {
        if self.version < SCHEMA_VERSION {
            return Err(StoreError::Io(std::io::Error::other(format!(
                "the journal at {} was written by an older Handoff (schema {}); run `handoff serve` once with this version to upgrade it",
                self.path.display(),
                self.version
            ))));
        }
        read_sources(&self.conn)
    }

    /// Calls `f` for each event after `after`, oldest first, reading in pages.
    pub fn for_each_event(
        &self,
        mut after: Seq,
        mut f: impl FnMut(&StoredEvent) -> std::io::Result<()>,
    ) -> Result<u64, StoreError> {
        let mut n = 0;
        loop {
            let page = read_events(&self.conn, self.cipher.as_deref(), after, 1000)?;
            let Some(last) = page.last() else {
                return Ok(n);
            };
            after = last.seq;
            for e in &page {
                f(e)?;
                n += 1;
            }
        }
    }

    /// Calls `f` for each quarantined message with an id greater than `after`.
    pub fn for_each_quarantined(
        &self,
        after: u64,
        mut f: impl FnMut(&QuarantinedMessage) -> std::io::Result<()>,
    ) -> Result<u64, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, source, received_at_ms, batch_index, code, message, raw FROM quarantine
             WHERE id > ?1 ORDER BY id",
        )?;
        let mut rows = stmt.query([after as i64])?;
        let mut n = 0;
        while let Some(r) = rows.next()? {
            let m = QuarantinedMessage {
                id: r.get::<_, i64>(0)? as u64,
                source: r.get(1)?,
                received_at_ms: r.get(2)?,
                index: r.get(3)?,
                code: r.get(4)?,
                message: r.get(5)?,
                raw: r.get(6)?,
            };
            f(&m)?;
            n += 1;
        }
        Ok(n)
    }

    /// Runs SQLite's integrity check and checks that sequence numbers have no gaps.
    /// Returns the problems found (empty when healthy).
    pub fn verify(&self) -> Result<Vec<String>, StoreError> {
        let mut problems = Vec::new();
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        for row in stmt.query_map([], |r| r.get::<_, String>(0))? {
            let row = row?;
            if row != "ok" {
                problems.push(row);
            }
        }
        let (count, min, max): (i64, i64, i64) = self.conn.query_row(
            "SELECT count(*), coalesce(min(seq), 1), coalesce(max(seq), 0) FROM events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        if count != max - min + 1 {
            problems.push(format!(
                "sequence numbers {min}..={max} should hold {} events but {count} are stored",
                max - min + 1
            ));
        }
        Ok(problems)
    }
}
