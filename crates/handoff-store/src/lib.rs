//! Durable storage behind traits.
//!
//! [`Journal`] is the append-only event log that ingest writes to and consumers read from with
//! acknowledgements. The embedded default is [`sqlite::SqliteJournal`]; a scale-out
//! implementation (NATS JetStream for the log, PostgreSQL for state) plugs in behind the same
//! trait without touching the ingest code.

use std::sync::Arc;

use async_trait::async_trait;
use handoff_core::SourceId;
use tokio::sync::watch;

mod dedup;
pub mod dsr;
pub mod files;
pub mod ledger;
pub mod ledger_records;
pub mod operator;
pub mod outbox;
/// A connection to one of the stores' databases, as the store's module functions take it (the
/// DSR service composes them inside [`outbox::OutboxStore::transact`]). Callers above the store
/// never write SQL through it.
pub type Conn = rusqlite::Connection;

pub mod quarantine;
pub mod sealed_payloads;
pub mod sent_ids;
pub mod sqlite;
pub mod state;
pub mod subjects;

pub use dedup::DEDUP_FILE;

/// Position of an event in the journal. Sequence numbers start at 1 and only grow; 0 means
/// "before the first event".
pub type Seq = u64;

/// How long a `messageId` is remembered per source for deduplication (24 hours, as Segment
/// documents for its own deduplication window).
pub const DEDUP_WINDOW_MS: i64 = 24 * 60 * 60 * 1000;

/// An event accepted by ingest, ready to be made durable.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub source: SourceId,
    pub message_id: String,
    pub received_at_ms: i64,
    /// The normalised message as JSON.
    pub payload: String,
}

/// A message refused by ingest, kept so that nothing disappears silently.
#[derive(Debug, Clone)]
pub struct QuarantineEntry {
    pub source: SourceId,
    pub received_at_ms: i64,
    /// Position of the message in its batch (0 for single-message requests).
    pub index: u32,
    pub code: &'static str,
    pub message: String,
    /// The message exactly as received.
    pub raw: String,
}

/// What one append did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Events newly stored.
    pub stored: usize,
    /// Events whose `messageId` the same source already sent within [`DEDUP_WINDOW_MS`].
    pub duplicates: usize,
}

/// An event as the journal holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: Seq,
    pub source: String,
    pub message_id: String,
    pub received_at_ms: i64,
    pub payload: String,
}

/// A quarantined message as the journal holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedMessage {
    pub id: u64,
    pub source: String,
    pub received_at_ms: i64,
    pub index: u32,
    pub code: String,
    pub message: String,
    pub raw: String,
}

/// Figures for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Sequence number of the newest event (0 when empty).
    pub head: Seq,
    /// Bytes on disk, including the write-ahead log.
    pub bytes: u64,
    /// Messages in quarantine.
    pub quarantined: u64,
    /// Transactions committed (each one fsync) since the journal was opened.
    pub commits: u64,
    /// Each consumer with the last sequence number it acknowledged.
    pub consumers: Vec<(String, Seq)>,
}

/// Storage errors. Each has a stable code for logs and API errors.
///
/// The SQLite and I/O causes are part of the message, not a separate `source`: an error chain
/// printed whole (`{:#}`) would otherwise say them twice.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    #[error("I/O error: {0}")]
    Io(std::io::Error),
    #[error("the journal is closed")]
    Closed,
    /// What a decision was based on changed before it could be committed; decide again.
    #[error("changed meanwhile: {0}")]
    Conflict(String),
    #[error(
        "another Handoff process is using the data directory {0}; stop it or choose another --data-dir"
    )]
    Locked(String),
    #[error("the deduplication index is damaged: {0}")]
    IndexDamaged(String),
    #[error("the journal could not commit ({code}): {message}")]
    CommitFailed { code: &'static str, message: String },
    #[error("the payload of event {seq} cannot be read: {why}")]
    Undecryptable { seq: Seq, why: String },
    /// A ledger record's items do not decode (`audit verify` names the record).
    #[error("the ledger is damaged: {0}")]
    LedgerDamaged(String),
    #[error(
        "the journal at {path} was written by a newer Handoff (schema {found}, this build knows {known})"
    )]
    SchemaTooNew {
        path: String,
        found: i64,
        known: i64,
    },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e)
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(e)
    }
}

impl StoreError {
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Sqlite(_) => "journal.database",
            StoreError::Io(_) => "journal.io",
            StoreError::Closed => "journal.closed",
            StoreError::Conflict(_) => "store.conflict",
            StoreError::Locked(_) => "journal.locked",
            StoreError::IndexDamaged(_) => "journal.dedup.damaged",
            StoreError::CommitFailed { code, .. } => code,
            StoreError::SchemaTooNew { .. } => "journal.schema.too_new",
            StoreError::Undecryptable { .. } => "journal.payload.undecryptable",
            StoreError::LedgerDamaged(_) => "ledger.record.damaged",
        }
    }
}

/// The durable, append-only event log.
#[async_trait]
pub trait Journal: Send + Sync + 'static {
    /// Stores `events` (deduplicated by source and `messageId`) and `quarantine` entries, and
    /// returns only once they are durable on disk.
    async fn append(
        &self,
        events: Vec<NewEvent>,
        quarantine: Vec<QuarantineEntry>,
    ) -> Result<AppendOutcome, StoreError>;

    /// Up to `limit` events with a sequence number greater than `after`, oldest first.
    async fn read(&self, after: Seq, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;

    /// Records that `consumer` has processed every event up to and including `upto`.
    /// Acknowledgements never move backwards.
    async fn ack(&self, consumer: &str, upto: Seq) -> Result<(), StoreError>;

    /// Deletes the quarantined messages received before `before_ms` (the quarantine's
    /// retention); returns how many.
    async fn purge_quarantine(&self, before_ms: i64) -> Result<u64, StoreError>;

    /// Overwrites the payloads of the events `seqs` by the erased marker (erasure), through the
    /// journal's own writer; freed content is overwritten in the file. Returns how many.
    async fn erase_events(&self, seqs: Vec<Seq>) -> Result<u64, StoreError>;

    /// Deletes the events with a sequence number below `upto` received before `before_ms`
    /// (the journal's retention: every consumer has passed them and they are older than the
    /// replay window); the newest event is always kept. Returns how many were deleted.
    async fn purge_events(&self, upto: Seq, before_ms: i64) -> Result<u64, StoreError>;

    /// The last sequence number `consumer` acknowledged (0 if never).
    async fn acked(&self, consumer: &str) -> Result<Seq, StoreError>;

    async fn stats(&self) -> Result<JournalStats, StoreError>;

    /// Watches the head sequence number, so consumers can wait for new events without polling.
    fn subscribe(&self) -> watch::Receiver<Seq>;

    /// `false` once the journal can no longer store events (closed, or its writer stopped).
    fn accepts_writes(&self) -> bool;

    /// Finishes pending writes and stops accepting new ones.
    async fn close(&self);
}

/// A named reader that resumes from its last acknowledgement, also after a restart.
pub struct Consumer {
    journal: Arc<dyn Journal>,
    name: String,
    cursor: Seq,
    head: watch::Receiver<Seq>,
}

impl Consumer {
    pub async fn open(journal: Arc<dyn Journal>, name: &str) -> Result<Self, StoreError> {
        let cursor = journal.acked(name).await?;
        let head = journal.subscribe();
        Ok(Self {
            journal,
            name: name.to_owned(),
            cursor,
            head,
        })
    }

    /// The next events after the ones already handed out, waiting until there is at least one.
    /// Events handed out but not acknowledged are handed out again after a restart.
    pub async fn next(&mut self, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        loop {
            let events = self.journal.read(self.cursor, limit).await?;
            if let Some(last) = events.last() {
                self.cursor = last.seq;
                return Ok(events);
            }
            let cursor = self.cursor;
            if self.head.wait_for(|head| *head > cursor).await.is_err() {
                return Err(StoreError::Closed);
            }
        }
    }

    /// Acknowledges every event up to and including `upto`.
    pub async fn ack(&self, upto: Seq) -> Result<(), StoreError> {
        self.journal.ack(&self.name, upto).await
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}
