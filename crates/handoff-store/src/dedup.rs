//! Deduplication of `messageId`s per source over [`DEDUP_WINDOW_MS`], as an index derived from
//! the journal.
//!
//! A B-tree that takes one random insert per event dirties one page per event, and WAL mode writes
//! every dirtied page again at each commit: kept inside the journal, the index cost ~4 KiB of disk
//! writes per event and capped ingest. So the index is shaped like a small LSM tree:
//!
//! - **hot**: recent keys in memory, checked and updated by the journal writer;
//! - **cold**: older keys in `dedup.db`, written by a flusher thread in sorted batches (each page
//!   written once per flush), read by the writer when a key is not hot.
//!
//! The journal stays the only source of truth: `dedup.db` records the highest sequence number it
//! covers, and on open the events after it are replayed into the hot set. So the index needs no
//! fsync of its own, and a lost or damaged `dedup.db` is rebuilt from the journal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use crate::sqlite::now_ms;
use crate::{DEDUP_WINDOW_MS, Seq, StoreError};

/// File name of the deduplication index inside the data directory.
pub const DEDUP_FILE: &str = "dedup.db";
/// Most keys held hot before they are flushed: about 48 bytes each in memory, so ~24 MiB at most
/// (twice that while one flush is under way). Larger batches would make flushes cheaper per key
/// but the gateway's memory larger; at 10,000 events/s this flushes every 50 s.
const HOT_CAPACITY: usize = 500_000;
/// Hot keys are flushed at least this often, so a restart has little to replay.
const HOT_MAX_AGE: Duration = Duration::from_secs(300);
/// How often the flusher removes keys older than the window from `dedup.db`.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// 128 bits of SHA-256 over the source and the messageId: collisions are out of reach, even for
/// a client choosing its ids to provoke one.
pub type Key = [u8; 16];

pub fn key(source: &str, message_id: &str) -> Key {
    let mut h = Sha256::new();
    h.update((source.len() as u32).to_le_bytes());
    h.update(source.as_bytes());
    h.update(message_id.as_bytes());
    let digest = h.finalize();
    let mut k = [0u8; 16];
    k.copy_from_slice(&digest[..16]);
    k
}

struct FlushJob {
    keys: Arc<HashMap<Key, i64>>,
    covers: Seq,
}

pub(crate) struct Dedup {
    hot: HashMap<Key, i64>,
    hot_since: Instant,
    /// Keys handed to the flusher and not yet committed to `dedup.db`.
    flushing: Option<Arc<HashMap<Key, i64>>>,
    /// Keys remembered in the current group, with what they replaced, to undo if it fails.
    pending: Vec<(Key, Option<i64>)>,
    cold: Connection,
    jobs: Option<Sender<FlushJob>>,
    done: Receiver<Result<(), String>>,
    flusher: Option<JoinHandle<()>>,
}

fn damaged(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            StoreError::IndexDamaged(e.to_string())
        }
        _ => StoreError::Sqlite(e),
    }
}

/// Opens (creating if needed) the index; [`StoreError::IndexDamaged`] when the file is not a
/// healthy SQLite database, any other error as it is (a busy or unwritable file is not damage).
fn open_index(path: &Path) -> Result<Connection, StoreError> {
    crate::files::create_file(path)?;
    let conn = Connection::open(path).map_err(damaged)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
        .map_err(damaged)?;
    // NORMAL: commits are not fsynced (a lost tail is replayed from the journal), but checkpoints
    // are, so a power cut cannot leave the file damaged or its `covered` position ahead of its keys.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS dedup (key BLOB PRIMARY KEY, seen_at_ms INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS covered (
             id      INTEGER PRIMARY KEY CHECK (id = 1),
             journal TEXT    NOT NULL,
             seq     INTEGER NOT NULL
         );",
    )
    .map_err(damaged)?;
    let check: String = conn
        .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
        .map_err(damaged)?;
    if check != "ok" {
        return Err(StoreError::IndexDamaged(check));
    }
    Ok(conn)
}

/// Writes `keys` in key order (each B-tree page once) and records that the index now covers the
/// journal up to `covers`.
fn write_batch(
    conn: &mut Connection,
    keys: &HashMap<Key, i64>,
    journal: &str,
    covers: Seq,
) -> Result<(), StoreError> {
    let mut sorted: Vec<(&Key, &i64)> = keys.iter().collect();
    sorted.sort_unstable_by_key(|(k, _)| **k);
    let tx = conn.transaction()?;
    {
        let mut put =
            tx.prepare_cached("INSERT OR REPLACE INTO dedup (key, seen_at_ms) VALUES (?1, ?2)")?;
        for (k, at) in sorted {
            put.execute(params![&k[..], at])?;
        }
        tx.execute(
            "INSERT INTO covered (id, journal, seq) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET seq = max(seq, excluded.seq)",
            params![journal, covers as i64],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// The first sequence number whose event was received after `cutoff_ms`, found by bisection
/// (sequence order follows arrival order), so a replay need not scan older events.
fn first_seq_after(
    journal: &Connection,
    from: Seq,
    head: Seq,
    cutoff_ms: i64,
) -> Result<Seq, StoreError> {
    let mut stmt = journal
        .prepare("SELECT received_at_ms FROM events WHERE seq >= ?1 ORDER BY seq LIMIT 1")?;
    let (mut lo, mut hi) = (from + 1, head + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let at: Option<i64> = stmt.query_row([mid as i64], |r| r.get(0)).optional()?;
        match at {
            Some(at) if at <= cutoff_ms => lo = mid + 1,
            _ => hi = mid,
        }
    }
    Ok(lo)
}

impl Dedup {
    /// Opens the index beside the journal (whose random id is `journal_id` and newest sequence
    /// number `head`) and brings it up to date by replaying the events it does not cover.
    pub(crate) fn open(
        data_dir: &Path,
        journal: &Connection,
        journal_id: &str,
        head: Seq,
        now_ms: i64,
    ) -> Result<Self, StoreError> {
        let path = data_dir.join(DEDUP_FILE);
        let mut writer = match open_index(&path) {
            Ok(c) => c,
            Err(StoreError::IndexDamaged(why)) => {
                // Derived data: set the damaged file aside and rebuild from the journal.
                let aside = format!("{}.damaged-{now_ms}", path.display());
                tracing::warn!(%why, %aside, "deduplication index damaged; rebuilding it from the journal");
                for suffix in ["", "-wal", "-shm"] {
                    let from = PathBuf::from(format!("{}{suffix}", path.display()));
                    if from.exists() {
                        std::fs::rename(&from, format!("{aside}{suffix}"))?;
                    }
                }
                open_index(&path)?
            }
            Err(e) => return Err(e),
        };
        let recorded: Option<(String, i64)> = writer
            .query_row("SELECT journal, seq FROM covered WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let covered = match recorded {
            Some((id, seq)) if id == journal_id && seq as Seq <= head => seq as Seq,
            other => {
                if other.is_some() {
                    // Made from another journal, or from this one before it was restored from
                    // an older backup: its keys would turn new events into false duplicates.
                    tracing::warn!("deduplication index does not match the journal; rebuilding it");
                }
                writer.execute_batch("DELETE FROM dedup; DELETE FROM covered;")?;
                writer.execute(
                    "INSERT INTO covered (id, journal, seq) VALUES (1, ?1, 0)",
                    [journal_id],
                )?;
                0
            }
        };

        // Replay what the index does not cover, in bounded batches.
        let cutoff = now_ms - DEDUP_WINDOW_MS;
        let start = first_seq_after(journal, covered, head, cutoff)?;
        let mut hot = HashMap::new();
        let mut replayed = 0u64;
        {
            let mut stmt = journal.prepare(
                "SELECT seq, source, message_id, received_at_ms FROM events WHERE seq >= ?1 ORDER BY seq",
            )?;
            let mut rows = stmt.query([start as i64])?;
            while let Some(r) = rows.next()? {
                let (seq, source, id, at): (i64, String, String, i64) =
                    (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
                if at <= cutoff {
                    continue;
                }
                let slot = hot.entry(key(&source, &id)).or_insert(at);
                *slot = (*slot).max(at);
                replayed += 1;
                if hot.len() >= HOT_CAPACITY {
                    write_batch(&mut writer, &hot, journal_id, seq as Seq)?;
                    hot.clear();
                }
            }
        }
        if replayed > 0 {
            tracing::info!(
                events = replayed,
                after_seq = covered,
                "deduplication index caught up from the journal"
            );
        }

        let cold = Connection::open(&path)?;
        cold.busy_timeout(Duration::from_secs(5))?;
        let (jobs, job_rx) = channel::<FlushJob>();
        let (done_tx, done) = channel();
        let journal_id = journal_id.to_owned();
        let flusher = std::thread::Builder::new()
            .name("dedup-flusher".into())
            .spawn(move || flusher(writer, journal_id, job_rx, done_tx))?;
        Ok(Self {
            hot,
            hot_since: Instant::now(),
            flushing: None,
            pending: Vec::new(),
            cold,
            jobs: Some(jobs),
            done,
            flusher: Some(flusher),
        })
    }

    /// `true` if no event with this key was stored within the window before `at_ms`; then the key
    /// is remembered as seen at `at_ms` (undone by [`Dedup::rollback`] if the group fails).
    pub(crate) fn check_and_remember(&mut self, key: Key, at_ms: i64) -> Result<bool, StoreError> {
        let within = |seen: i64| seen > at_ms - DEDUP_WINDOW_MS;
        let seen = match self.hot.get(&key) {
            Some(&seen) => Some(seen),
            None => match self.flushing.as_ref().and_then(|f| f.get(&key)) {
                Some(&seen) => Some(seen),
                None => self
                    .cold
                    .prepare_cached("SELECT seen_at_ms FROM dedup WHERE key = ?1")?
                    .query_row([&key[..]], |r| r.get::<_, i64>(0))
                    .optional()?,
            },
        };
        if seen.is_some_and(within) {
            return Ok(false);
        }
        let before = self.hot.insert(key, at_ms);
        self.pending.push((key, before));
        Ok(true)
    }

    /// The group was committed: its keys stay.
    pub(crate) fn commit(&mut self) {
        self.pending.clear();
    }

    /// The group failed: forget the keys it remembered, so a retry is not taken for a duplicate.
    pub(crate) fn rollback(&mut self) {
        for (key, before) in self.pending.drain(..).rev() {
            match before {
                Some(seen) => self.hot.insert(key, seen),
                None => self.hot.remove(&key),
            };
        }
    }

    /// After a commit that made events up to `head` durable: hands hot keys to the flusher when
    /// there are many or they are old.
    pub(crate) fn maybe_flush(&mut self, head: Seq) {
        if let Ok(result) = self.done.try_recv() {
            self.flush_finished(result);
        }
        let due = self.hot.len() >= HOT_CAPACITY
            || (!self.hot.is_empty() && self.hot_since.elapsed() >= HOT_MAX_AGE);
        if !due {
            return;
        }
        if self.flushing.is_some() {
            if self.hot.len() < 2 * HOT_CAPACITY {
                return;
            }
            // The flusher is behind by a whole batch: wait for it rather than grow without bound.
            let result = self
                .done
                .recv()
                .unwrap_or_else(|_| Err("the flusher thread has stopped".into()));
            self.flush_finished(result);
        }
        let keys = Arc::new(std::mem::take(&mut self.hot));
        self.hot_since = Instant::now();
        self.flushing = Some(keys.clone());
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(FlushJob { keys, covers: head }).is_ok());
        if !sent {
            // No flusher: keep every key in memory (correct, if larger) and say so.
            tracing::error!(
                "the deduplication flusher has stopped; keys stay in memory until restart"
            );
            self.jobs = None;
            self.flush_finished(Err("the flusher thread has stopped".into()));
        }
    }

    fn flush_finished(&mut self, result: Result<(), String>) {
        match result {
            Ok(()) => self.flushing = None,
            Err(e) => {
                // Keep the keys hot; they go out again with the next flush.
                tracing::warn!(error = %e, "deduplication index flush failed; will retry");
                if let Some(keys) = self.flushing.take() {
                    for (k, v) in keys.iter() {
                        self.hot.entry(*k).or_insert(*v);
                    }
                }
            }
        }
    }

    /// Flushes everything and stops the flusher (clean shutdown: nothing to replay next time).
    pub(crate) fn close(&mut self, head: Seq) {
        if self.flushing.is_some()
            && let Ok(result) = self.done.recv()
        {
            self.flush_finished(result);
        }
        if let Some(jobs) = self.jobs.take() {
            let keys = Arc::new(std::mem::take(&mut self.hot));
            let _ = jobs.send(FlushJob { keys, covers: head });
            let _ = self.done.recv();
        }
        if let Some(handle) = self.flusher.take() {
            let _ = handle.join();
        }
    }
}

fn flusher(
    mut conn: Connection,
    journal: String,
    jobs: Receiver<FlushJob>,
    done: Sender<Result<(), String>>,
) {
    let mut last_prune = Instant::now();
    for job in jobs {
        let mut result = write_batch(&mut conn, &job.keys, &journal, job.covers);
        if result.is_ok() && last_prune.elapsed() >= PRUNE_EVERY {
            result = conn
                .execute(
                    "DELETE FROM dedup WHERE seen_at_ms <= ?1",
                    [now_ms() - DEDUP_WINDOW_MS],
                )
                .map(|_| ())
                .map_err(StoreError::from);
            last_prune = Instant::now();
        }
        if done.send(result.map_err(|e| e.to_string())).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(dir: &Path) -> Connection {
        let c = Connection::open(dir.join("j.db")).unwrap();
        c.execute_batch(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY, source TEXT, message_id TEXT, received_at_ms INTEGER, payload TEXT)",
        )
        .unwrap();
        c
    }

    const NOW: i64 = 1_790_000_000_000;

    fn head(j: &Connection) -> Seq {
        j.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap() as Seq
    }

    #[test]
    fn keys_separate_sources_and_ids() {
        assert_ne!(key("web", "a"), key("app", "a"));
        assert_ne!(
            key("ab", "c"),
            key("a", "bc"),
            "the source length is part of the key"
        );
        assert_eq!(key("web", "a"), key("web", "a"));
    }

    #[test]
    fn hot_flushed_and_replayed_keys_all_count() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal(dir.path());
        let mut d = Dedup::open(dir.path(), &j, "journal-a", head(&j), NOW).unwrap();
        let (a, b) = (key("web", "a"), key("web", "b"));
        assert!(d.check_and_remember(a, NOW).unwrap());
        assert!(!d.check_and_remember(a, NOW + 1).unwrap(), "hot");
        d.commit();
        d.hot_since -= HOT_MAX_AGE;
        d.maybe_flush(1);
        assert!(!d.check_and_remember(a, NOW + 2).unwrap(), "while flushing");
        let r = d.done.recv().unwrap();
        d.flush_finished(r);
        assert!(d.flushing.is_none() && d.hot.is_empty());
        assert!(!d.check_and_remember(a, NOW + 3).unwrap(), "cold");
        assert!(
            d.check_and_remember(a, NOW + DEDUP_WINDOW_MS).unwrap(),
            "expired in cold: fresh again"
        );
        d.commit();

        // A failed group forgets what it remembered.
        assert!(d.check_and_remember(b, NOW).unwrap());
        d.rollback();
        assert!(
            d.check_and_remember(b, NOW).unwrap(),
            "a retry after a failed commit is not a duplicate"
        );
        d.commit();
        d.close(1);

        // Events the index did not cover (seq > 1) are replayed from the journal on open.
        j.execute("INSERT INTO events VALUES (2, 'web', 'c', ?1, '{}')", [NOW])
            .unwrap();
        let mut d = Dedup::open(dir.path(), &j, "journal-a", head(&j), NOW).unwrap();
        assert!(
            !d.check_and_remember(key("web", "c"), NOW + 5).unwrap(),
            "replayed"
        );
        assert!(
            !d.check_and_remember(b, NOW + 5).unwrap(),
            "flushed at close"
        );
        d.close(2);
    }

    #[test]
    fn an_index_from_another_or_newer_journal_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal(dir.path());
        j.execute(
            "INSERT INTO events VALUES (1, 'web', 'kept', ?1, '{}')",
            [NOW],
        )
        .unwrap();
        let mut d = Dedup::open(dir.path(), &j, "journal-a", 1, NOW).unwrap();
        assert!(d.check_and_remember(key("web", "later"), NOW).unwrap());
        d.commit();
        d.close(5); // covers events up to 5 of journal-a

        // The journal was restored from a backup that ends at 1: "later" is not in it, so it must
        // not be taken for a duplicate when it is sent again.
        let mut d = Dedup::open(dir.path(), &j, "journal-a", 1, NOW).unwrap();
        assert!(d.check_and_remember(key("web", "later"), NOW + 1).unwrap());
        assert!(
            !d.check_and_remember(key("web", "kept"), NOW + 1).unwrap(),
            "replayed"
        );
        d.rollback();
        d.close(1);

        // Another journal altogether.
        let mut d = Dedup::open(dir.path(), &j, "journal-b", 1, NOW).unwrap();
        assert!(!d.check_and_remember(key("web", "kept"), NOW + 1).unwrap());
        d.close(1);
    }

    #[test]
    fn a_crash_after_a_flush_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal(dir.path());
        let mut d = Dedup::open(dir.path(), &j, "journal-a", 0, NOW).unwrap();
        // Each key is remembered as its event is committed to the journal.
        assert!(d.check_and_remember(key("web", "flushed"), NOW).unwrap());
        j.execute(
            "INSERT INTO events VALUES (1, 'web', 'flushed', ?1, '{}')",
            [NOW],
        )
        .unwrap();
        d.commit();
        d.hot_since -= HOT_MAX_AGE;
        d.maybe_flush(1);
        let r = d.done.recv().unwrap();
        d.flush_finished(r);
        assert!(d.check_and_remember(key("web", "hot"), NOW).unwrap());
        j.execute(
            "INSERT INTO events VALUES (2, 'web', 'hot', ?1, '{}')",
            [NOW],
        )
        .unwrap();
        d.commit();
        drop(d); // a crash: no close, the hot key was never flushed

        let mut d = Dedup::open(dir.path(), &j, "journal-a", 2, NOW).unwrap();
        assert!(
            !d.check_and_remember(key("web", "flushed"), NOW + 1)
                .unwrap(),
            "from dedup.db"
        );
        assert!(
            !d.check_and_remember(key("web", "hot"), NOW + 1).unwrap(),
            "replayed from the journal"
        );
        d.close(2);
    }

    #[test]
    fn replay_starts_at_the_window_not_at_the_beginning() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal(dir.path());
        for (seq, at) in [
            (1, NOW - DEDUP_WINDOW_MS - 10),
            (2, NOW - DEDUP_WINDOW_MS),
            (3, NOW - 5),
            (4, NOW),
        ] {
            j.execute(
                "INSERT INTO events VALUES (?1, 'web', ?1, ?2, '{}')",
                params![seq, at],
            )
            .unwrap();
        }
        assert_eq!(first_seq_after(&j, 0, 4, NOW - DEDUP_WINDOW_MS).unwrap(), 3);
        assert_eq!(first_seq_after(&j, 3, 4, NOW - DEDUP_WINDOW_MS).unwrap(), 4);
        assert_eq!(first_seq_after(&j, 0, 4, NOW).unwrap(), 5, "none inside");
    }

    #[test]
    fn a_damaged_index_is_rebuilt_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal(dir.path());
        j.execute("INSERT INTO events VALUES (1, 'web', 'x', ?1, '{}')", [NOW])
            .unwrap();
        std::fs::write(dir.path().join(DEDUP_FILE), b"this is not a database").unwrap();
        let mut d = Dedup::open(dir.path(), &j, "journal-a", head(&j), NOW).unwrap();
        assert!(!d.check_and_remember(key("web", "x"), NOW + 1).unwrap());
        d.close(1);
    }
}
