//! Data-subject requests and each vendor's part of them, in `outbox.db` (so an erasure
//! suppresses, purges and files its vendor tasks in one transaction with its ledger entry).

use rusqlite::{Connection, OptionalExtension, params};

use crate::{Seq, StoreError};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dsr (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    subject         TEXT NOT NULL,
    status          TEXT NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    deadline_at_ms  INTEGER NOT NULL,
    completed_at_ms INTEGER,
    requested_by    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dsr_by_subject ON dsr (subject, kind);
CREATE TABLE IF NOT EXISTS dsr_tasks (
    dsr_id       TEXT NOT NULL,
    destination  TEXT NOT NULL,
    vendor       TEXT NOT NULL,
    method       TEXT NOT NULL,
    status       TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at_ms   INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    done_at_ms   INTEGER,
    target       TEXT,
    instructions TEXT NOT NULL DEFAULT '',
    named        TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (dsr_id, destination)
) WITHOUT ROWID;
";

pub mod status {
    /// Being worked on: some vendor has not confirmed yet.
    pub const OPEN: &str = "open";
    pub const COMPLETED: &str = "completed";
    /// A vendor task: Handoff will call the vendor (again).
    pub const PENDING: &str = "pending";
    /// A vendor task: an operator must do it by hand and then confirm it.
    pub const MANUAL: &str = "manual";
    /// A vendor task: confirmed by the vendor, or by an operator for manual ones.
    pub const DONE: &str = "done";
}

/// A request as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Request {
    pub id: String,
    pub kind: String,
    pub subject: String,
    pub status: String,
    pub created_at_ms: i64,
    pub deadline_at_ms: i64,
    pub completed_at_ms: Option<i64>,
    pub requested_by: String,
    pub tasks: Vec<Task>,
}

/// One vendor's part of a request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Task {
    pub destination: String,
    pub vendor: String,
    /// `api` (Handoff calls the vendor's deletion endpoint) or `manual`.
    pub method: String,
    pub status: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub done_at_ms: Option<i64>,
    pub instructions: String,
    /// What the deletion call needs, or what an operator quotes for a manual part (identifiers
    /// as the vendor received them, the vendor's id); removed once done.
    #[serde(skip)]
    pub target: Option<String>,
    /// The identifiers this vendor has been asked about (see [`NewTask`]).
    #[serde(skip)]
    pub named: String,
    #[serde(skip)]
    pub next_at_ms: i64,
}

/// A task about to be filed.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub destination: String,
    pub vendor: String,
    pub manual: bool,
    pub target: String,
    pub instructions: String,
    /// The identifiers the request named, each as its kind and keyed hash (as subjects store
    /// them: `user_id:…`), comma separated: filing the erasure again naming others asks the
    /// vendor again about those.
    pub named: String,
}

/// Destinations (and their vendor) that were handed data about `subject` (or a subject merged
/// into it), per the ledger.
pub fn recipients(conn: &Connection, subject: &str) -> Result<Vec<(String, String)>, StoreError> {
    let mut out = std::collections::BTreeSet::new();
    let mut seqs = std::collections::BTreeSet::new();
    let mut single = conn.prepare_cached(
        "SELECT DISTINCT destination, vendor FROM ledger
         WHERE subject = ?1 AND kind = 'delivery' AND outcome = 'delivered'",
    )?;
    for id in crate::subjects::aliases(conn, subject)? {
        for row in single.query_map([&id], |r| Ok((r.get(0)?, r.get(1)?)))? {
            out.insert(row?);
        }
        seqs.extend(crate::ledger::subject_events(conn, &id)?);
    }
    out.extend(crate::ledger::delivered_to(conn, &seqs)?);
    Ok(out.into_iter().collect())
}

/// Journal events of `subject` (and subjects merged into it), per the ledger's records.
pub fn event_seqs(conn: &Connection, subject: &str) -> Result<Vec<Seq>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT event_seq FROM ledger WHERE subject = ?1 AND kind IN ('decision', 'delivery') AND event_seq > 0",
    )?;
    let mut out = std::collections::BTreeSet::new();
    for id in crate::subjects::aliases(conn, subject)? {
        for seq in stmt.query_map([&id], |r| r.get::<_, i64>(0).map(|s| s as Seq))? {
            out.insert(seq?);
        }
        out.extend(crate::ledger::subject_events(conn, &id)?);
    }
    Ok(out.into_iter().collect())
}

/// Deletes the queued and dead-lettered payloads of `subject` and subjects merged into it.
/// Returns (queued, dead) removed.
pub fn purge_queues(conn: &Connection, subject: &str) -> Result<(usize, usize), StoreError> {
    let (mut queued, mut dead) = (0, 0);
    for id in crate::subjects::aliases(conn, subject)? {
        queued += conn.execute("DELETE FROM outbox WHERE subject = ?1", [&id])?;
        dead += conn.execute("DELETE FROM dead_letters WHERE subject = ?1", [&id])?;
    }
    Ok((queued, dead))
}

/// The request of this kind already filed for this subject: an erasure is filed once; an
/// access or opt-out request again once the last one completed (an opt-out may have been
/// withdrawn since, and an export should be current).
pub fn existing(
    conn: &Connection,
    subject: &str,
    kind: &str,
) -> Result<Option<String>, StoreError> {
    // Filed for the subject, or for one merged into it since.
    Ok(conn
        .prepare_cached(
            "WITH RECURSIVE a(id) AS (SELECT ?1 UNION SELECT s.id FROM subjects s JOIN a ON s.merged_into = a.id)
             SELECT d.id FROM dsr d JOIN a ON d.subject = a.id
             WHERE d.kind = ?2 AND (d.kind = 'erasure' OR d.status = 'open')
             ORDER BY d.created_at_ms LIMIT 1",
        )?
        .query_row([subject, kind], |r| r.get(0))
        .optional()?)
}

/// The request is about `subject` now (the one it was filed for was merged into it): its
/// vendors' ids and history are found through the subject it became.
pub fn set_subject(conn: &Connection, id: &str, subject: &str) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE dsr SET subject = ?2 WHERE id = ?1",
        params![id, subject],
    )?;
    Ok(())
}

/// Hands a vendor's part to an operator: Handoff cannot do it (the vendor refused for good, or
/// has no deletion call). `why` says what to do. Not if the task's target is no longer the one
/// the vendor refused (`called_with`): the request was filed again meanwhile, naming more.
pub fn task_manual(
    conn: &Connection,
    id: &str,
    destination: &str,
    why: &str,
    called_with: Option<&str>,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE dsr_tasks SET status = 'manual', method = 'manual', instructions = ?3, last_error = NULL
         WHERE dsr_id = ?1 AND destination = ?2 AND status = 'pending' AND target IS ?4",
        params![id, destination, why, called_with],
    )?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn insert(
    conn: &Connection,
    id: &str,
    kind: &str,
    subject: &str,
    requested_by: &str,
    now_ms: i64,
    deadline_at_ms: i64,
    tasks: &[NewTask],
) -> Result<(), StoreError> {
    let open = !tasks.is_empty();
    conn.execute(
        "INSERT INTO dsr (id, kind, subject, status, created_at_ms, deadline_at_ms, completed_at_ms, requested_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            id,
            kind,
            subject,
            if open { status::OPEN } else { status::COMPLETED },
            now_ms,
            deadline_at_ms,
            if open { None } else { Some(now_ms) },
            requested_by
        ],
    )?;
    for t in tasks {
        add_task(conn, id, t)?;
    }
    Ok(())
}

/// Adds a vendor's part to a request (one that is open, or reopened with [`reopen`]).
pub fn add_task(conn: &Connection, id: &str, t: &NewTask) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO dsr_tasks (dsr_id, destination, vendor, method, status, target, instructions, named)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        id,
        t.destination,
        t.vendor,
        if t.manual { "manual" } else { "api" },
        if t.manual {
            status::MANUAL
        } else {
            status::PENDING
        },
        // A manual task keeps its target too, until confirmed: what the operator must quote.
        Some(&t.target).filter(|t| !t.is_empty()),
        t.instructions,
        t.named
    ])?;
    Ok(())
}

/// A manual part an operator confirmed must be done by hand again; `why` goes before its
/// instructions.
pub fn ask_operator_again(
    conn: &Connection,
    id: &str,
    destination: &str,
    why: &str,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE dsr_tasks SET status = 'manual', done_at_ms = NULL, instructions = ?3 || ' ' || instructions
         WHERE dsr_id = ?1 AND destination = ?2",
        params![id, destination, why],
    )?;
    Ok(())
}

/// The request is being worked on again (filed again naming more of the person, or a vendor
/// that received them has no part yet).
pub fn reopen(conn: &Connection, id: &str) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE dsr SET status = 'open', completed_at_ms = NULL WHERE id = ?1",
        [id],
    )?;
    Ok(())
}

/// Records that a vendor has been asked about the identifiers in `named`, and, with a
/// `target`, that Handoff must call it (again) with it: the task is pending once more.
pub fn rename_task(
    conn: &Connection,
    id: &str,
    destination: &str,
    named: &str,
    target: Option<&str>,
) -> Result<(), StoreError> {
    match target {
        Some(target) => conn.execute(
            "UPDATE dsr_tasks SET named = ?3, target = ?4, method = 'api', status = 'pending',
                 attempts = 0, next_at_ms = 0, last_error = NULL, done_at_ms = NULL,
                 instructions = ''
             WHERE dsr_id = ?1 AND destination = ?2",
            params![id, destination, named, target],
        )?,
        None => conn.execute(
            "UPDATE dsr_tasks SET named = ?3 WHERE dsr_id = ?1 AND destination = ?2",
            params![id, destination, named],
        )?,
    };
    Ok(())
}

fn tasks(conn: &Connection, id: &str) -> Result<Vec<Task>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT destination, vendor, method, status, attempts, last_error, done_at_ms, instructions, target, next_at_ms, named
         FROM dsr_tasks WHERE dsr_id = ?1 ORDER BY destination",
    )?;
    let rows = stmt
        .query_map([id], |r| {
            Ok(Task {
                destination: r.get(0)?,
                vendor: r.get(1)?,
                method: r.get(2)?,
                status: r.get(3)?,
                attempts: r.get::<_, i64>(4)? as u32,
                last_error: r.get(5)?,
                done_at_ms: r.get(6)?,
                instructions: r.get(7)?,
                target: r.get(8)?,
                next_at_ms: r.get(9)?,
                named: r.get(10)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn get(conn: &Connection, id: &str) -> Result<Option<Request>, StoreError> {
    let row = conn
        .query_row(
            "SELECT id, kind, subject, status, created_at_ms, deadline_at_ms, completed_at_ms, requested_by
             FROM dsr WHERE id = ?1",
            [id],
            |r| {
                Ok(Request {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    subject: r.get(2)?,
                    status: r.get(3)?,
                    created_at_ms: r.get(4)?,
                    deadline_at_ms: r.get(5)?,
                    completed_at_ms: r.get(6)?,
                    requested_by: r.get(7)?,
                    tasks: Vec::new(),
                })
            },
        )
        .optional()?;
    match row {
        Some(mut req) => {
            req.tasks = tasks(conn, id)?;
            Ok(Some(req))
        }
        None => Ok(None),
    }
}

/// Every request, newest first.
pub fn list(conn: &Connection) -> Result<Vec<Request>, StoreError> {
    let ids: Vec<String> = conn
        .prepare("SELECT id FROM dsr ORDER BY created_at_ms DESC, id")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    ids.iter()
        .filter_map(|id| get(conn, id).transpose())
        .collect()
}

/// Vendor calls due now: (request id, task).
pub fn due(
    conn: &Connection,
    now_ms: i64,
    limit: usize,
) -> Result<Vec<(String, Task)>, StoreError> {
    let ids: Vec<(String, String)> = conn
        .prepare_cached(
            "SELECT dsr_id, destination FROM dsr_tasks WHERE status = 'pending' AND next_at_ms <= ?1
             ORDER BY next_at_ms LIMIT ?2",
        )?
        .query_map(params![now_ms, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for (id, dest) in ids {
        if let Some(t) = tasks(conn, &id)?
            .into_iter()
            .find(|t| t.destination == dest)
        {
            out.push((id, t));
        }
    }
    Ok(out)
}

/// Marks a vendor's part done (forgetting the identifiers kept for the call) and completes the
/// request when it was the last. With `called_with`, only if the task's target is still the one
/// the vendor was called with (the request may have been filed again meanwhile, naming more).
/// Returns whether the task was marked done.
fn task_done(
    conn: &Connection,
    id: &str,
    destination: &str,
    called_with: Option<&str>,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let n = conn.execute(
        "UPDATE dsr_tasks SET status = 'done', done_at_ms = ?3, target = NULL, last_error = NULL
         WHERE dsr_id = ?1 AND destination = ?2 AND status != 'done' AND (?4 IS NULL OR target = ?4)",
        params![id, destination, now_ms, called_with],
    )?;
    if n == 0 {
        return Ok(false);
    }
    let left: i64 = conn.query_row(
        "SELECT count(*) FROM dsr_tasks WHERE dsr_id = ?1 AND status != 'done'",
        [id],
        |r| r.get(0),
    )?;
    if left == 0 {
        conn.execute(
            "UPDATE dsr SET status = 'completed', completed_at_ms = ?2 WHERE id = ?1",
            params![id, now_ms],
        )?;
    }
    Ok(true)
}

/// A vendor's part of an erasure is done (the vendor accepted the call made with target
/// `called_with`, or an operator confirmed it, `None`): marks it done, forgets the vendor's ids
/// for the person, and returns the ledger entry to record, with `how` as its detail. `None`
/// when there was nothing to confirm: already done, or filed again since the call, naming
/// more (the task stays pending, with the fuller target).
pub fn confirm_erasure(
    conn: &Connection,
    id: &str,
    destination: &str,
    vendor: &str,
    how: &str,
    called_with: Option<&str>,
    now_ms: i64,
) -> Result<Option<crate::ledger::Entry>, StoreError> {
    let subject: String =
        conn.query_row("SELECT subject FROM dsr WHERE id = ?1", [id], |r| r.get(0))?;
    if !task_done(conn, id, destination, called_with, now_ms)? {
        return Ok(None);
    }
    for alias in crate::subjects::aliases(conn, &subject)? {
        crate::subjects::delete_vendor_ref(conn, destination, &alias)?;
        // What the vendor was sent about them was kept to ask for this deletion only.
        crate::sent_ids::forget(conn, &alias, destination)?;
    }
    Ok(Some(crate::ledger::Entry {
        kind: crate::ledger::kind::DSR,
        subject,
        destination: destination.to_owned(),
        vendor: vendor.to_owned(),
        outcome: "erasure.confirmed".into(),
        detail: format!("request {id}; {how}"),
        ..crate::ledger::Entry::default()
    }))
}

/// The call with `called_with` failed; the next is due at `next_at_ms` (unless the request was
/// filed again meanwhile: the fuller target is called at once).
pub fn task_retry(
    conn: &Connection,
    id: &str,
    destination: &str,
    next_at_ms: i64,
    error: &str,
    called_with: Option<&str>,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE dsr_tasks SET attempts = attempts + 1, next_at_ms = ?3, last_error = ?4
         WHERE dsr_id = ?1 AND destination = ?2 AND target IS ?5",
        params![id, destination, next_at_ms, error, called_with],
    )?;
    Ok(())
}

/// Open requests past their deadline.
pub fn overdue(conn: &Connection, now_ms: i64) -> Result<u64, StoreError> {
    Ok(conn.query_row(
        "SELECT count(*) FROM dsr WHERE status = 'open' AND deadline_at_ms < ?1",
        [now_ms],
        |r| r.get::<_, i64>(0),
    )? as u64)
}

/// Open requests.
pub fn open_count(conn: &Connection) -> Result<u64, StoreError> {
    Ok(
        conn.query_row("SELECT count(*) FROM dsr WHERE status = 'open'", [], |r| {
            r.get::<_, i64>(0)
        })? as u64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_made_before_the_request_named_more_does_not_complete_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::outbox::OutboxStore::open(dir.path()).unwrap();
        store
            .with_conn(|c| {
                let task = NewTask {
                    destination: "hook".into(),
                    vendor: "acme".into(),
                    manual: false,
                    target: r#"{"user_ids":["u"]}"#.into(),
                    instructions: String::new(),
                    named: "h1".into(),
                };
                insert(c, "dsr_1", "erasure", "sub_1", "dpo", 1, 2, &[task])?;
                // Filed again naming an e-mail while the first call was on its way.
                let fuller = r#"{"user_ids":["u"],"emails":["e"]}"#;
                rename_task(c, "dsr_1", "hook", "h1,h2", Some(fuller))?;
                let stale = r#"{"user_ids":["u"]}"#;
                // Whatever the vendor answered the stale call, the fuller one is still to make.
                task_retry(c, "dsr_1", "hook", 99, "HTTP 503", Some(stale))?;
                task_manual(c, "dsr_1", "hook", "refused", Some(stale))?;
                let t = get(c, "dsr_1")?.unwrap().tasks.remove(0);
                assert_eq!(
                    (t.status.as_str(), t.attempts, t.next_at_ms),
                    ("pending", 0, 0)
                );
                assert_eq!(
                    confirm_erasure(c, "dsr_1", "hook", "acme", "accepted", Some(stale), 3)?,
                    None
                );
                let r = get(c, "dsr_1")?.unwrap();
                assert_eq!(
                    (r.status.as_str(), r.tasks[0].status.as_str()),
                    ("open", "pending")
                );
                assert_eq!(r.tasks[0].target.as_deref(), Some(fuller));
                assert_eq!(r.tasks[0].named, "h1,h2");
                let entry =
                    confirm_erasure(c, "dsr_1", "hook", "acme", "accepted", Some(fuller), 4)?;
                assert_eq!(entry.unwrap().outcome, "erasure.confirmed");
                let r = get(c, "dsr_1")?.unwrap();
                assert_eq!(
                    (r.status.as_str(), r.completed_at_ms),
                    ("completed", Some(4))
                );
                assert_eq!(r.tasks[0].target, None, "identifiers forgotten once done");
                // Reopened: pending again, the request open again.
                rename_task(
                    c,
                    "dsr_1",
                    "hook",
                    "h1,h2,h3",
                    Some(r#"{"anonymous_ids":["a"]}"#),
                )?;
                reopen(c, "dsr_1")?;
                let r = get(c, "dsr_1")?.unwrap();
                assert_eq!((r.status.as_str(), r.completed_at_ms), ("open", None));
                assert_eq!(
                    (r.tasks[0].status.as_str(), r.tasks[0].done_at_ms),
                    ("pending", None)
                );
                Ok(())
            })
            .unwrap();
    }
}
