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
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    AppendOutcome, DEDUP_WINDOW_MS, Journal, JournalStats, NewEvent, QuarantineEntry,
    QuarantinedMessage, Seq, StoreError, StoredEvent,
};

/// File name of the journal database inside the data directory.
pub const DB_FILE: &str = "journal.db";
/// Schema version this build writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;
/// Requests waiting for the writer before senders are made to wait: bounds memory under overload
/// while leaving plenty of room to gather a large group.
const QUEUE_CAPACITY: usize = 4096;
/// Most requests written in one transaction; caps the latency one commit can add.
const MAX_GROUP: usize = 1024;
/// How often expired deduplication entries are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Most deduplication entries removed per prune, so one prune never stalls a commit for long.
const PRUNE_CHUNK: i64 = 50_000;
/// WAL pages between automatic checkpoints. Larger than SQLite's 1000 so that checkpoints, which
/// run inside a commit, happen less often under heavy ingest.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 4000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq            INTEGER PRIMARY KEY,
    source         TEXT    NOT NULL,
    message_id     TEXT    NOT NULL,
    received_at_ms INTEGER NOT NULL,
    payload        TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS dedup (
    id         INTEGER PRIMARY KEY,
    source     TEXT    NOT NULL,
    message_id TEXT    NOT NULL,
    seen_at_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS dedup_key ON dedup (source, message_id);
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
CREATE TABLE IF NOT EXISTS sources (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    write_key_sha256 BLOB NOT NULL,
    created_at_ms    INTEGER NOT NULL
);
";

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
    Shutdown,
}

/// A source registered in the store (the embedded default's own source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSource {
    pub id: String,
    pub name: String,
    pub write_key_sha256: Vec<u8>,
}

struct Shared {
    head: AtomicU64,
    quarantined: AtomicU64,
    commits: AtomicU64,
}

/// The SQLite journal. Open one per data directory per process.
pub struct SqliteJournal {
    tx: mpsc::Sender<Command>,
    reader: Arc<Mutex<Connection>>,
    shared: Arc<Shared>,
    head_rx: watch::Receiver<Seq>,
    writer: Mutex<Option<JoinHandle<()>>>,
    path: PathBuf,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(())
}

impl SqliteJournal {
    /// Opens (creating if needed) the journal in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(DB_FILE);
        let conn = Connection::open(&path)?;
        configure(&conn)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        debug_assert_eq!(mode.to_lowercase(), "wal");
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                path: path.display().to_string(),
                found: version,
                known: SCHEMA_VERSION,
            });
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;

        let head: i64 =
            conn.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))?;
        let quarantined: i64 =
            conn.query_row("SELECT count(*) FROM quarantine", [], |r| r.get(0))?;
        let shared = Arc::new(Shared {
            head: AtomicU64::new(head as u64),
            quarantined: AtomicU64::new(quarantined as u64),
            commits: AtomicU64::new(0),
        });

        let reader = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        configure(&reader)?;

        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let (head_tx, head_rx) = watch::channel(head as Seq);
        let mut writer = Writer {
            conn,
            next_seq: head as Seq + 1,
            shared: shared.clone(),
            head_tx,
            last_prune: Instant::now(),
        };
        let handle = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
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
    let mut stmt = conn.prepare("SELECT id, name, write_key_sha256 FROM sources ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok(StoredSource {
            id: r.get(0)?,
            name: r.get(1)?,
            write_key_sha256: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn read_events(
    conn: &Connection,
    after: Seq,
    limit: usize,
) -> Result<Vec<StoredEvent>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, source, message_id, received_at_ms, payload FROM events
         WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after as i64, limit as i64], |r| {
        Ok(StoredEvent {
            seq: r.get::<_, i64>(0)? as Seq,
            source: r.get(1)?,
            message_id: r.get(2)?,
            received_at_ms: r.get(3)?,
            payload: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
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
        self.with_reader(move |c| read_events(c, after, limit))
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

    async fn close(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

struct Writer {
    conn: Connection,
    next_seq: Seq,
    shared: Arc<Shared>,
    head_tx: watch::Sender<Seq>,
    last_prune: Instant,
}

enum Reply {
    Append(
        oneshot::Sender<Result<AppendOutcome, StoreError>>,
        AppendOutcome,
    ),
    Ack(oneshot::Sender<Result<(), StoreError>>),
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
            if shutdown {
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
        let result = (|| -> Result<(), StoreError> {
            let tx = self.conn.transaction()?;
            let mut seq = start_seq;
            for cmd in group.drain(..) {
                match cmd {
                    Command::Append {
                        events,
                        quarantine,
                        reply,
                    } => {
                        let outcome = append_in(&tx, &mut seq, &events, &quarantine)?;
                        new_quarantined += quarantine.len() as u64;
                        replies.push(Reply::Append(reply, outcome));
                    }
                    Command::Ack {
                        consumer,
                        upto,
                        reply,
                    } => {
                        tx.prepare_cached(
                            "INSERT INTO consumers (name, acked_seq, updated_at_ms) VALUES (?1, ?2, ?3)
                             ON CONFLICT (name) DO UPDATE SET
                               acked_seq = max(acked_seq, excluded.acked_seq),
                               updated_at_ms = excluded.updated_at_ms",
                        )?
                        .execute(params![consumer, upto as i64, now_ms()])?;
                        replies.push(Reply::Ack(reply));
                    }
                    Command::Shutdown => {}
                }
            }
            if self.last_prune.elapsed() >= PRUNE_EVERY {
                prune_dedup(&tx, now_ms() - DEDUP_WINDOW_MS)?;
                self.last_prune = Instant::now();
            }
            tx.commit()?;
            self.next_seq = seq;
            Ok(())
        })();
        // Commands not reached because of an error are dropped here; their senders see `Closed`.
        group.clear();
        match result {
            Ok(()) => {
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .quarantined
                    .fetch_add(new_quarantined, Ordering::Relaxed);
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
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, code = e.code(), "journal commit failed; the requests in it are answered with an error");
                for r in replies {
                    match r {
                        Reply::Append(tx, _) => {
                            let _ =
                                tx.send(Err(StoreError::Io(std::io::Error::other(e.to_string()))));
                        }
                        Reply::Ack(tx) => {
                            let _ =
                                tx.send(Err(StoreError::Io(std::io::Error::other(e.to_string()))));
                        }
                    }
                }
            }
        }
    }
}

fn append_in(
    tx: &rusqlite::Transaction<'_>,
    seq: &mut Seq,
    events: &[NewEvent],
    quarantine: &[QuarantineEntry],
) -> Result<AppendOutcome, StoreError> {
    let mut outcome = AppendOutcome {
        fresh: Vec::with_capacity(events.len()),
        ..AppendOutcome::default()
    };
    let mut remember = tx.prepare_cached(
        "INSERT OR IGNORE INTO dedup (source, message_id, seen_at_ms) VALUES (?1, ?2, ?3)",
    )?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO events (seq, source, message_id, received_at_ms, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for e in events {
        let source = e.source.as_str();
        let mut fresh = remember.execute(params![source, e.message_id, e.received_at_ms])? == 1;
        if !fresh {
            // Seen before: a duplicate only if within the window. An expired entry is replaced
            // (deleted and inserted again) so that entry ids stay in time order for pruning.
            let seen_at: i64 = tx
                .prepare_cached(
                    "SELECT seen_at_ms FROM dedup WHERE source = ?1 AND message_id = ?2",
                )?
                .query_row(params![source, e.message_id], |r| r.get(0))?;
            if seen_at <= e.received_at_ms - DEDUP_WINDOW_MS {
                tx.prepare_cached("DELETE FROM dedup WHERE source = ?1 AND message_id = ?2")?
                    .execute(params![source, e.message_id])?;
                remember.execute(params![source, e.message_id, e.received_at_ms])?;
                fresh = true;
            }
        }
        if fresh {
            insert.execute(params![
                *seq as i64,
                source,
                e.message_id,
                e.received_at_ms,
                e.payload
            ])?;
            *seq += 1;
            outcome.stored += 1;
        } else {
            outcome.duplicates += 1;
        }
        outcome.fresh.push(fresh);
    }
    if !quarantine.is_empty() {
        let mut q = tx.prepare_cached(
            "INSERT INTO quarantine (source, received_at_ms, batch_index, code, message, raw)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for m in quarantine {
            q.execute(params![
                m.source.as_str(),
                m.received_at_ms,
                m.index,
                m.code,
                m.message,
                m.raw
            ])?;
        }
    }
    Ok(outcome)
}

/// Removes deduplication entries older than `cutoff_ms`, oldest first, at most
/// [`PRUNE_CHUNK`] per call. Entry ids follow time order, so the scan stops at the first entry
/// still inside the window.
fn prune_dedup(tx: &rusqlite::Transaction<'_>, cutoff_ms: i64) -> Result<usize, StoreError> {
    let removed = tx.execute(
        "DELETE FROM dedup WHERE id < min(
             coalesce((SELECT id FROM dedup WHERE seen_at_ms > ?1 ORDER BY id LIMIT 1),
                      (SELECT coalesce(max(id), 0) + 1 FROM dedup)),
             (SELECT coalesce(min(id), 0) FROM dedup) + ?2)",
        params![cutoff_ms, PRUNE_CHUNK],
    )?;
    Ok(removed)
}

/// Read-only access for operators (`handoff journal dump`), safe while the server runs.
pub struct JournalReader {
    conn: Connection,
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
        Ok(Self { conn })
    }

    /// Calls `f` for each event after `after`, oldest first, reading in pages.
    pub fn for_each_event(
        &self,
        mut after: Seq,
        mut f: impl FnMut(&StoredEvent) -> std::io::Result<()>,
    ) -> Result<u64, StoreError> {
        let mut n = 0;
        loop {
            let page = read_events(&self.conn, after, 1000)?;
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
