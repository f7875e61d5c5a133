//! The SQLite journal against a real database file.

use std::sync::Arc;

use handoff_core::SourceId;
use handoff_store::sqlite::{JournalReader, SqliteJournal};
use handoff_store::{Consumer, DEDUP_WINDOW_MS, Journal, NewEvent, QuarantineEntry, Seq};

fn event(source: &str, id: &str, at: i64) -> NewEvent {
    NewEvent {
        source: SourceId::parse(source).unwrap(),
        message_id: id.to_owned(),
        received_at_ms: at,
        payload: format!(r#"{{"messageId":"{id}"}}"#),
    }
}

/// Now, so that the journal's own pruning (by wall clock) leaves the test's entries alone.
fn t0() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_read_dedup_and_quarantine() {
    let t0 = t0();
    let dir = tempfile::tempdir().unwrap();
    let j = SqliteJournal::open(dir.path()).unwrap();
    let out = j
        .append(
            vec![
                event("web", "a", t0),
                event("web", "b", t0),
                event("web", "a", t0),
                event("app", "a", t0),
            ],
            vec![QuarantineEntry {
                source: SourceId::parse("web").unwrap(),
                received_at_ms: t0,
                index: 4,
                code: "message.identity.missing",
                message: "needs an id".into(),
                raw: "{}".into(),
            }],
        )
        .await
        .unwrap();
    assert_eq!((out.stored, out.duplicates), (3, 1));

    // Within the window: still a duplicate. After it: accepted again, and then a duplicate again.
    let out = j
        .append(vec![event("web", "a", t0 + DEDUP_WINDOW_MS - 1)], vec![])
        .await
        .unwrap();
    assert_eq!((out.stored, out.duplicates), (0, 1));
    let out = j
        .append(vec![event("web", "a", t0 + DEDUP_WINDOW_MS)], vec![])
        .await
        .unwrap();
    assert_eq!((out.stored, out.duplicates), (1, 0));
    let out = j
        .append(vec![event("web", "a", t0 + DEDUP_WINDOW_MS + 5)], vec![])
        .await
        .unwrap();
    assert_eq!((out.stored, out.duplicates), (0, 1));

    let events = j.read(0, 100).await.unwrap();
    let ids: Vec<(u64, &str, &str)> = events
        .iter()
        .map(|e| (e.seq, e.source.as_str(), e.message_id.as_str()))
        .collect();
    assert_eq!(
        ids,
        vec![
            (1, "web", "a"),
            (2, "web", "b"),
            (3, "app", "a"),
            (4, "web", "a")
        ]
    );
    assert_eq!(j.read(2, 1).await.unwrap()[0].seq, 3);

    let stats = j.stats().await.unwrap();
    assert_eq!(stats.head, 4);
    assert_eq!(stats.quarantined, 1);
    assert!(stats.bytes > 0);

    // The read-only reader sees the same, while the journal is open.
    let reader = JournalReader::open(dir.path()).unwrap();
    let mut seen = Vec::new();
    reader
        .for_each_event(1, |e| {
            seen.push(e.seq);
            Ok(())
        })
        .unwrap();
    assert_eq!(seen, vec![2, 3, 4]);
    let mut q = Vec::new();
    reader
        .for_each_quarantined(0, |m| {
            q.push((m.index, m.code.clone()));
            Ok(())
        })
        .unwrap();
    assert_eq!(q, vec![(4, "message.identity.missing".to_string())]);
    assert!(reader.verify().unwrap().is_empty());
    j.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_resumes_from_its_last_ack_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j: Arc<dyn Journal> = Arc::new(SqliteJournal::open(dir.path()).unwrap());
        let batch: Vec<_> = (0..10)
            .map(|i| event("web", &format!("m{i}"), t0()))
            .collect();
        j.append(batch, vec![]).await.unwrap();
        let mut c = Consumer::open(j.clone(), "router").await.unwrap();
        let got = c.next(4).await.unwrap();
        assert_eq!(
            got.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        c.ack(4).await.unwrap();
        // Handed out but never acknowledged: must come back after the restart.
        let got = c.next(3).await.unwrap();
        assert_eq!(got.last().unwrap().seq, 7);
        // Acks never move backwards.
        c.ack(2).await.unwrap();
        assert_eq!(j.acked("router").await.unwrap(), 4);
        j.close().await;
    }
    let j: Arc<dyn Journal> = Arc::new(SqliteJournal::open(dir.path()).unwrap());
    let mut c = Consumer::open(j.clone(), "router").await.unwrap();
    let got = c.next(100).await.unwrap();
    assert_eq!(
        got.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![5, 6, 7, 8, 9, 10]
    );
    assert_eq!(
        j.stats().await.unwrap().consumers,
        vec![("router".to_string(), 4)]
    );

    // A consumer waiting at the head wakes up when a new event is appended.
    let waiter = tokio::spawn(async move { c.next(10).await.unwrap() });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    j.append(vec![event("web", "late", t0())], vec![])
        .await
        .unwrap();
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got[0].message_id, "late");
    assert_eq!(got[0].seq, 11);
    j.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(SqliteJournal::open(dir.path()).unwrap());
    let tasks = 64;
    let per_task = 20;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let j = j.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..per_task {
                j.append(vec![event("web", &format!("{t}-{i}"), t0())], vec![])
                    .await
                    .unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let stats = j.stats().await.unwrap();
    assert_eq!(stats.head, (tasks * per_task) as u64);
    // Group commit: many appends ride on one transaction (one fsync).
    assert!(
        stats.commits < (tasks * per_task) as u64 / 2,
        "{} commits for {} appends",
        stats.commits,
        tasks * per_task
    );
    assert!(j.accepts_writes());
    j.close().await;
    assert!(!j.accepts_writes(), "readiness can see a stopped writer");
    // After close, appends are refused with a clear error rather than lost.
    let err = j
        .append(vec![event("web", "after-close", t0())], vec![])
        .await
        .unwrap_err();
    assert_eq!(err.code(), "journal.closed");
}

#[test]
fn missing_journal_is_a_clear_error_for_readers() {
    let dir = tempfile::tempdir().unwrap();
    let err = JournalReader::open(dir.path()).err().unwrap();
    assert!(err.to_string().contains("no journal at"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_is_an_error_and_its_ids_are_not_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let j = SqliteJournal::open(dir.path()).unwrap();
    // Make the database refuse one event, as a full disk or an I/O error would.
    let admin = rusqlite::Connection::open(dir.path().join("journal.db")).unwrap();
    admin
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.message_id = 'doomed'
             BEGIN SELECT RAISE(ABORT, 'refused for the test'); END;",
        )
        .unwrap();
    let err = j
        .append(
            vec![event("web", "fine", t0()), event("web", "doomed", t0())],
            vec![],
        )
        .await
        .unwrap_err();
    assert_ne!(err.code(), "journal.closed", "{err}");
    assert!(
        j.read(0, 10).await.unwrap().is_empty(),
        "nothing of a failed group is stored"
    );

    // Once the fault is gone, the retry is stored: a failed attempt is not a duplicate.
    admin.execute_batch("DROP TRIGGER refuse").unwrap();
    let out = j
        .append(
            vec![event("web", "fine", t0()), event("web", "doomed", t0())],
            vec![],
        )
        .await
        .unwrap();
    assert_eq!((out.stored, out.duplicates), (2, 0));
    assert_eq!(
        j.read(0, 10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    j.close().await;
}

#[test]
fn one_gateway_per_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _first = SqliteJournal::open(dir.path()).unwrap();
    let err = SqliteJournal::open(dir.path())
        .err()
        .expect("a second open must fail");
    assert_eq!(err.code(), "journal.locked");
    assert!(err.to_string().contains("another Handoff process"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_finds_quarantined_messages_by_the_person_s_identifiers_only() {
    let dir = tempfile::tempdir().unwrap();
    let j = SqliteJournal::open(dir.path()).unwrap();
    let refused = |raw: &str| QuarantineEntry {
        source: SourceId::parse("web").unwrap(),
        received_at_ms: t0(),
        index: 0,
        code: "message.event.missing",
        message: format!("refused {raw}"),
        raw: raw.into(),
    };
    let raws = [
        r#"{"type": "track", "userId": "u-1"}"#,
        r#"{"type": "track", "userId": 42}"#,
        r#"{"type": "track", "anonymousId": "a-7", "context": {"traits": {"email": " Jane@Example.COM "}}}"#,
        // Not the person: their id is only a value elsewhere, or a longer id.
        r#"{"type": "track", "userId": "u-10", "properties": {"ref": "u-1", "n": "42"}}"#,
        // Not JSON: found by the id as a JSON string.
        r#"{"type": "track", "userId": "u-1", "#,
        // Refused for their shape: the id is still theirs.
        r#"[{"type": "track", "userId": "u-1"}]"#,
        r#"{"type": "track", "userId": ["u-1"]}"#,
        r#"{"type": "track", "userId": {"id": "u-1"}}"#,
        r#"{"type": "track", "userIdentity": "u-1"}"#,
    ];
    j.append(vec![], raws.iter().map(|r| refused(r)).collect())
        .await
        .unwrap();
    j.close().await;
    let erased =
        handoff_store::sqlite::erase_quarantined(dir.path(), &["u-1", "42"], &["jane@example.com"])
            .unwrap();
    assert_eq!(erased, 7);
    let mut left = Vec::new();
    JournalReader::open(dir.path())
        .unwrap()
        .for_each_quarantined(0, |m| {
            left.push((m.raw.clone(), m.message.clone()));
            Ok(())
        })
        .unwrap();
    let erased_at: Vec<bool> = left
        .iter()
        .map(|(r, _)| r == r#"{"erased":true}"#)
        .collect();
    assert_eq!(
        erased_at,
        [true, true, true, false, true, true, true, true, false],
        "{left:?}"
    );
    assert!(
        left.iter()
            .all(|(r, m)| m == "erased" || r.contains("u-10") || r.contains("userIdentity"))
    );
    assert_eq!(
        handoff_store::sqlite::erase_quarantined(dir.path(), &["u-1"], &[]).unwrap(),
        0,
        "once"
    );
}

#[tokio::test]
async fn the_quarantine_ages_out_and_an_erasure_leaves_no_index_of_the_person() {
    let dir = tempfile::tempdir().unwrap();
    let j = SqliteJournal::open(dir.path()).unwrap();
    let refused = |raw: &str, at: i64| QuarantineEntry {
        source: SourceId::parse("web").unwrap(),
        received_at_ms: at,
        index: 0,
        code: "message.event.missing",
        message: "refused".into(),
        raw: raw.into(),
    };
    let keys = |dir: &std::path::Path| -> i64 {
        let c = rusqlite::Connection::open(dir.join("journal.db")).unwrap();
        c.query_row("SELECT count(*) FROM quarantine_keys", [], |r| r.get(0))
            .unwrap()
    };
    j.append(
        vec![],
        vec![
            refused(
                r#"{"type": "track", "userId": "old-1"}"#,
                t0() - 40 * 86_400_000,
            ),
            refused(
                r#"{"type": "track", "userId": "new-1", "traits": {"email": "a@b.example"}}"#,
                t0(),
            ),
        ],
    )
    .await
    .unwrap();
    assert_eq!(keys(dir.path()), 3, "old-1, new-1 and the e-mail");
    // A message naming more identifiers than the index takes is kept without its raw text.
    let many = format!(
        r#"{{"userId": [{}]}}"#,
        (0..40)
            .map(|i| format!("\"u{i}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    j.append(vec![], vec![refused(&many, t0())]).await.unwrap();
    let mut kept = Vec::new();
    JournalReader::open(dir.path())
        .unwrap()
        .for_each_quarantined(0, |m| {
            kept.push((m.raw.clone(), m.message.clone()));
            Ok(())
        })
        .unwrap();
    assert_eq!(kept.len(), 3);
    assert_eq!(kept[2].0, "");
    assert!(kept[2].1.contains("raw input not kept"), "{:?}", kept[2]);
    assert_eq!(j.purge_quarantine(t0() - 30 * 86_400_000).await.unwrap(), 1);
    assert_eq!(j.stats().await.unwrap().quarantined, 2);
    assert_eq!(keys(dir.path()), 2, "the purged row's index went with it");
    assert_eq!(j.purge_quarantine(t0() - 30 * 86_400_000).await.unwrap(), 0);
    j.close().await;
    assert_eq!(
        handoff_store::sqlite::erase_quarantined(dir.path(), &[], &["A@B.example"]).unwrap(),
        1
    );
    assert_eq!(
        keys(dir.path()),
        0,
        "no hash of the person's identifiers is left"
    );
}

#[tokio::test]
async fn a_journal_of_schema_1_migrates_and_keeps_what_it_held() {
    let dir = tempfile::tempdir().unwrap();
    {
        // The layout the previous release wrote.
        let c = rusqlite::Connection::open(dir.path().join("journal.db")).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE events (seq INTEGER PRIMARY KEY, source TEXT NOT NULL, message_id TEXT NOT NULL,
                                  received_at_ms INTEGER NOT NULL, payload TEXT NOT NULL);
             CREATE TABLE quarantine (id INTEGER PRIMARY KEY, source TEXT NOT NULL, received_at_ms INTEGER NOT NULL,
                                      batch_index INTEGER NOT NULL, code TEXT NOT NULL, message TEXT NOT NULL, raw TEXT NOT NULL);
             CREATE TABLE consumers (name TEXT PRIMARY KEY, acked_seq INTEGER NOT NULL, updated_at_ms INTEGER NOT NULL);
             CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE sources (id TEXT PRIMARY KEY, name TEXT NOT NULL, write_key_sha256 BLOB NOT NULL,
                                   created_at_ms INTEGER NOT NULL);
             INSERT INTO sources VALUES ('default', 'Default source', x'00', 1);
             INSERT INTO quarantine (source, received_at_ms, batch_index, code, message, raw)
                VALUES ('web', 1, 0, 'message.event.missing', 'refused', '{\"userId\": \"old-1\"}');
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let reader = JournalReader::open(dir.path()).unwrap();
    assert!(
        reader
            .sources()
            .unwrap_err()
            .to_string()
            .contains("run `handoff serve` once")
    );
    drop(reader);
    let j = SqliteJournal::open(dir.path()).unwrap();
    let sources = j.sources().unwrap();
    assert_eq!(
        (sources[0].id.as_str(), sources[0].previous_until_ms),
        ("default", None)
    );
    assert_eq!(j.stats().await.unwrap().quarantined, 1);
    j.close().await;
    drop(j);
    // Opening again finds the columns there and changes nothing.
    let j = SqliteJournal::open(dir.path()).unwrap();
    j.close().await;
    drop(j);
    // The old, unindexed row is still found by an erasure.
    assert_eq!(
        handoff_store::sqlite::erase_quarantined(dir.path(), &["old-1"], &[]).unwrap(),
        1
    );
    assert_eq!(
        JournalReader::open(dir.path())
            .unwrap()
            .sources()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_what_every_consumer_passed_and_is_old_enough() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = t0();
    {
        let j = SqliteJournal::open(dir.path()).unwrap();
        // Ten old events, then five recent ones.
        let old: Vec<_> = (0..10)
            .map(|i| event("web", &format!("old{i}"), t0 - 10_000))
            .collect();
        j.append(old, vec![]).await.unwrap();
        let recent: Vec<_> = (0..5)
            .map(|i| event("web", &format!("new{i}"), t0))
            .collect();
        j.append(recent, vec![]).await.unwrap();

        // The consumer is at 4: only 1..=3 may go (the one at its position stays).
        assert_eq!(j.purge_events(4, t0 - 1).await.unwrap(), 3);
        assert_eq!(j.read(0, 100).await.unwrap()[0].seq, 4);
        // Past every event, but only the old ones are past retention.
        assert_eq!(j.purge_events(Seq::MAX, t0 - 1).await.unwrap(), 7);
        let left: Vec<Seq> = j
            .read(0, 100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(left, [11, 12, 13, 14, 15]);
        // Everything old enough: the newest event is kept all the same.
        assert_eq!(j.purge_events(Seq::MAX, t0 + 1).await.unwrap(), 4);
        assert_eq!(j.read(0, 100).await.unwrap()[0].seq, 15);
        j.close().await;
    }
    // The journal still verifies, and numbering goes on after a restart (no reuse).
    assert!(
        JournalReader::open(dir.path())
            .unwrap()
            .verify()
            .unwrap()
            .is_empty()
    );
    let j = SqliteJournal::open(dir.path()).unwrap();
    j.append(vec![event("web", "after", t0)], vec![])
        .await
        .unwrap();
    let after = j.read(15, 10).await.unwrap();
    assert_eq!((after[0].seq, after[0].message_id.as_str()), (16, "after"));
    // A repeated id within the window is still a duplicate after its event was deleted.
    let out = j
        .append(vec![event("web", "new0", t0 + 1)], vec![])
        .await
        .unwrap();
    assert_eq!(out.duplicates, 1);
    j.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_never_leaves_a_gap_when_times_are_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = t0();
    let j = SqliteJournal::open(dir.path()).unwrap();
    // Received times are taken before numbering: a young event can come before an old one.
    j.append(
        vec![
            event("web", "a", t0 - 10_000),
            event("web", "b", t0),
            event("web", "c", t0 - 10_000),
            event("web", "d", t0),
        ],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(
        j.purge_events(Seq::MAX, t0 - 1).await.unwrap(),
        1,
        "only the leading run"
    );
    let left: Vec<Seq> = j.read(0, 10).await.unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(left, [2, 3, 4]);
    j.close().await;
    assert!(
        JournalReader::open(dir.path())
            .unwrap()
            .verify()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_are_sealed_and_another_installations_keys_are_refused() {
    use handoff_store::sealed_payloads::PayloadCipher;
    let dir = tempfile::tempdir().unwrap();
    {
        let j = SqliteJournal::open(dir.path()).unwrap();
        j.set_cipher(Arc::new(PayloadCipher::new(1, [(1, [7u8; 32])])))
            .unwrap();
        j.append(vec![event("web", "secret-id-1", t0())], vec![])
            .await
            .unwrap();
        assert_eq!(
            j.read(0, 1).await.unwrap()[0].payload,
            r#"{"messageId":"secret-id-1"}"#
        );
        j.close().await;
    }
    let j = SqliteJournal::open(dir.path()).unwrap();
    // The same key id under another key: the newest sealed payload does not open.
    let err = j
        .set_cipher(Arc::new(PayloadCipher::new(1, [(1, [8u8; 32])])))
        .unwrap_err();
    assert_eq!(err.code(), "journal.payload.undecryptable", "{err}");
    // Keys with no key of the payload's id: reading is an error, never an empty event.
    let other = JournalReader::open(dir.path())
        .unwrap()
        .with_cipher(Arc::new(PayloadCipher::new(2, [(2, [7u8; 32])])));
    assert!(other.for_each_event(0, |_| Ok(())).is_err());
    // Without any key, likewise.
    assert!(
        JournalReader::open(dir.path())
            .unwrap()
            .for_each_event(0, |_| Ok(()))
            .is_err()
    );
    // With the right key it reads.
    let right = JournalReader::open(dir.path())
        .unwrap()
        .with_cipher(Arc::new(PayloadCipher::new(1, [(1, [7u8; 32])])));
    let mut seen = Vec::new();
    right
        .for_each_event(0, |e| {
            seen.push(e.payload.clone());
            Ok(())
        })
        .unwrap();
    assert_eq!(seen, [r#"{"messageId":"secret-id-1"}"#]);
    j.close().await;
}
