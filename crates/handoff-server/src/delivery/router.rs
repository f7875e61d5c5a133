//! The subject stage: reads the journal in order, resolves each event's subject (creating and
//! merging subjects), applies the preference updates of identify calls, erases the events of
//! suppressed subjects, and commits its position. It copies nothing: each destination's worker
//! reads the journal after its own cursor and decides for itself (see `worker.rs`), taking the
//! batches this stage resolved from [`Recent`] while it keeps up, and resolving read-only what
//! it reads itself when it lags.

use std::collections::VecDeque;
use std::sync::Mutex;

use handoff_core::consent::batch::{StoredSubject, batch_states};
use handoff_store::subjects::Subject;

use super::*;

/// Journal events resolved as one batch, shared by every destination's worker.
pub(super) struct Resolved {
    /// The batch holds the events after this position, up to [`Resolved::upto`].
    pub after: handoff_store::Seq,
    pub upto: handoff_store::Seq,
    pub events: Vec<handoff_store::StoredEvent>,
    /// The events, read once for every destination.
    pub prepared: Vec<Prepared>,
    /// Each event's subject id ("" when it names nobody).
    pub subjects: Vec<String>,
    /// Each event's subject state as its identify calls in journal order left it.
    pub states: Vec<SubjectState>,
    /// The subject epoch the states were read at (see `handoff_store::subjects::changed`).
    pub epoch: u64,
}

/// A journal event as the subject stage read it.
pub(super) enum Prepared {
    Event(PreparedEvent),
    /// Erased before it was read (its subject's erasure).
    Erased,
    /// Not JSON: blocked for every destination, never guessed at.
    Unreadable,
    /// Reading it failed (a bug): blocked with `event.undecidable`.
    Undecidable,
}

impl Prepared {
    pub fn value(&self) -> Option<&Value> {
        match self {
            Prepared::Event(p) => Some(p.value()),
            _ => None,
        }
    }
}

/// Reads an event once for every destination (its PII index included).
pub(super) fn prepare(
    e: &handoff_store::StoredEvent,
    settings: &handoff_core::policy::model::PolicySettings,
) -> Prepared {
    let Some(value) = parse_event(e) else {
        return if e.payload == handoff_store::sqlite::ERASED_PAYLOAD {
            Prepared::Erased
        } else {
            Prepared::Unreadable
        };
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        PreparedEvent::new(value, settings)
    })) {
        Ok(p) => Prepared::Event(p),
        Err(_) => {
            tracing::error!(seq = e.seq, source = %e.source, "event.undecidable: reading this event failed; blocked for every destination");
            Prepared::Undecidable
        }
    }
}

impl Resolved {
    /// The index of the first event after `cursor`.
    pub fn start_after(&self, cursor: handoff_store::Seq) -> usize {
        self.events.partition_point(|e| e.seq <= cursor)
    }
}

/// The batches the subject stage resolved lately, for workers that keep up (and, in a second
/// one, the batches lagging workers resolved again, which others as far behind share).
pub(super) struct Recent {
    batches: Mutex<VecDeque<Arc<Resolved>>>,
    keep: usize,
}

/// Batches kept in [`Recent`]: 8 × [`ROUTE_BATCH`] events (about 15 MB of parsed JSON at
/// most; with 16 × 500 the gateway's RSS was the same, and 32 × 500 cost 40 MiB more).
pub(super) const RECENT_BATCHES: usize = 8;
/// Events [`Recent`] holds at least.
const WINDOW: u64 = ((RECENT_BATCHES - 1) * ROUTE_BATCH) as u64;
/// How far the subject stage runs ahead of the slowest destination still served from
/// [`Recent`], in events: half of what it keeps. Resolving again what fell out of it costs
/// each destination the subject look-ups and the reading of every event, which cost a third
/// of the throughput after a burst of ingest, and made a destination that fell out slower still.
const AHEAD_MAX: u64 = WINDOW / 2;
/// How long the stage waits for such a destination per batch: one much slower than the others
/// (a one-event webhook beside batching ones) falls out of [`Recent`] rather than hold the
/// others back.
const WAIT_FOR_SLOWER: Duration = Duration::from_millis(20);

/// Batches resolved again by lagging workers kept for the others.
pub(super) const LAGGING_BATCHES: usize = 4;

impl Recent {
    pub fn new(keep: usize) -> Self {
        Recent {
            batches: Mutex::new(VecDeque::with_capacity(keep)),
            keep,
        }
    }

    pub fn push(&self, batch: Arc<Resolved>) {
        let mut q = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.keep {
            q.pop_front();
        }
        q.push_back(batch);
    }

    /// The batch holding the event after `cursor`, if still kept.
    pub fn covering(&self, cursor: handoff_store::Seq) -> Option<Arc<Resolved>> {
        let q = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        q.iter()
            .find(|b| b.after <= cursor && cursor < b.upto)
            .cloned()
    }
}

/// The event, or `None` when it was erased before routing or cannot be read.
pub(super) fn parse_event(e: &handoff_store::StoredEvent) -> Option<Value> {
    if e.payload == handoff_store::sqlite::ERASED_PAYLOAD {
        return None;
    }
    serde_json::from_str(&e.payload).ok()
}

/// The identifier hashes of each event (kind, keyed hash).
fn hashes(delivery: &Delivery, prepared: &[Prepared]) -> Vec<Vec<(&'static str, String)>> {
    prepared
        .iter()
        .map(|v| {
            v.value().map_or_else(Vec::new, |v| {
                identifiers(v)
                    .iter()
                    .map(|i| (i.kind.as_str(), delivery.subject_key.hash(i)))
                    .collect()
            })
        })
        .collect()
}

fn stored(subjects: &[Option<Subject>]) -> Vec<Option<StoredSubject<'_>>> {
    subjects
        .iter()
        .map(|s| {
            s.as_ref().map(|s| StoredSubject {
                id: &s.id,
                suppressed: s.suppressed_at_ms.is_some(),
                preferences: s.preferences.as_deref(),
            })
        })
        .collect()
}

fn ids(subjects: &[Option<Subject>]) -> Vec<String> {
    subjects
        .iter()
        .map(|s| s.as_ref().map_or_else(String::new, |s| s.id.clone()))
        .collect()
}

/// Keeps the events a ledger record may cover (see [`handoff_store::ledger::RECORD_SPAN`]);
/// the rest are read again next time.
pub(super) fn within_record_span(events: &mut Vec<handoff_store::StoredEvent>) {
    if let Some(first) = events.first().map(|e| e.seq) {
        events.retain(|e| e.seq - first <= handoff_store::ledger::RECORD_SPAN);
    }
}

/// A batch read from the journal and read once (parsed, PII indexed, identifiers hashed),
/// before its subjects are resolved: the stage prepares the next batch while the current one
/// commits.
struct Ready {
    after: handoff_store::Seq,
    events: Vec<handoff_store::StoredEvent>,
    prepared: Vec<Prepared>,
    hashes: Vec<Vec<(&'static str, String)>>,
}

fn make_ready(
    delivery: &Delivery,
    settings: &handoff_core::policy::model::PolicySettings,
    after: handoff_store::Seq,
    mut events: Vec<handoff_store::StoredEvent>,
) -> Ready {
    within_record_span(&mut events);
    let prepared: Vec<Prepared> = events.iter().map(|e| prepare(e, settings)).collect();
    let hashes = hashes(delivery, &prepared);
    Ready {
        after,
        events,
        prepared,
        hashes,
    }
}

/// Reads the events after `after` and prepares them off the async threads (`None`: the
/// journal has none yet).
async fn read_ready(
    delivery: Arc<Delivery>,
    journal: Arc<dyn Journal>,
    settings: Arc<handoff_core::policy::model::PolicySettings>,
    after: handoff_store::Seq,
) -> Result<Option<Ready>, StoreError> {
    let events = journal.read(after, ROUTE_BATCH).await?;
    if events.is_empty() {
        return Ok(None);
    }
    tokio::task::spawn_blocking(move || Some(make_ready(&delivery, &settings, after, events)))
        .await
        .map_err(|_| StoreError::Closed)
}

/// Resolves a prepared batch's subjects and commits it with the stage's new position; returns
/// it with the events to erase (their subject is suppressed).
fn resolve_batch(
    delivery: &Delivery,
    ready: Ready,
) -> Result<(Resolved, Vec<handoff_store::Seq>), StoreError> {
    let Ready {
        after,
        events,
        prepared,
        hashes,
    } = ready;
    let upto = events.last().map_or(after, |e| e.seq);
    delivery.store.route_with(upto, |r| {
        let subjects = hashes
            .iter()
            .map(|h| r.resolve(h))
            .collect::<Result<Vec<_>, _>>()?;
        let epoch = r.subject_epoch()?;
        let named: Vec<handoff_store::ledger_records::EventItem> = events
            .iter()
            .zip(&subjects)
            .map(|(e, s)| handoff_store::ledger_records::EventItem {
                seq: e.seq,
                message_id: e.message_id.clone(),
                subject: s.as_ref().map_or_else(String::new, |s| s.id.clone()),
            })
            .collect();
        r.record_events(&named)?;
        let values: Vec<Option<&Value>> = prepared.iter().map(Prepared::value).collect();
        let s = batch_states(&values, &stored(&subjects));
        for (subject, json) in &s.preferences {
            r.set_preferences(subject, json)?;
        }
        let erase = s
            .suppressed
            .iter()
            .map(|i| &events[*i])
            .filter(|e| e.payload != handoff_store::sqlite::ERASED_PAYLOAD)
            .map(|e| e.seq)
            .collect();
        Ok((
            Resolved {
                after,
                upto,
                subjects: ids(&subjects),
                states: s.states,
                events,
                prepared,
                epoch,
            },
            erase,
        ))
    })
}

/// Resolves events the subject stage has passed, read-only, for a worker that lags behind
/// [`Recent`]: subjects as stored now (their preferences already hold every identify call the
/// stage has passed).
pub(super) fn resolve_again(
    delivery: &Delivery,
    settings: &handoff_core::policy::model::PolicySettings,
    after: handoff_store::Seq,
    events: Vec<handoff_store::StoredEvent>,
) -> Result<Resolved, StoreError> {
    let epoch = delivery.store.subject_epoch()?;
    let mut events = events;
    within_record_span(&mut events);
    let prepared: Vec<Prepared> = events.iter().map(|e| prepare(e, settings)).collect();
    let hashes = hashes(delivery, &prepared);
    let subjects = delivery.store.find_subjects(&hashes)?;
    let values: Vec<Option<&Value>> = prepared.iter().map(Prepared::value).collect();
    let s = batch_states(&values, &stored(&subjects));
    Ok(Resolved {
        after,
        upto: events.last().map_or(after, |e| e.seq),
        subjects: ids(&subjects),
        states: s.states,
        events,
        prepared,
        epoch,
    })
}

/// The lowest cursor of the destinations [`Recent`] still serves at `position` (`None`: all
/// have fallen out).
fn slowest_follower(
    delivery: &Delivery,
    position: handoff_store::Seq,
) -> Option<handoff_store::Seq> {
    delivery
        .lanes
        .iter()
        .map(|l| l.cursor.load(Ordering::Relaxed))
        .filter(|c| c + WINDOW >= position)
        .min()
}

/// The subject stage's loop: it reads and prepares the next batch while the current one
/// commits. A batch that fails to commit is read and resolved again (nothing of it stays); its
/// position only moves with a committed batch.
pub(super) async fn router(
    delivery: Arc<Delivery>,
    journal: Arc<dyn Journal>,
    app: Arc<crate::AppState>,
    mut stop: watch::Receiver<bool>,
) {
    let mut head = journal.subscribe();
    let mut position: Option<handoff_store::Seq> = None;
    let mut failures = 0u32;
    let mut waiting_since: Option<tokio::time::Instant> = None;
    let settings = Arc::new(app.policy.settings.clone());
    let mut ahead: Option<tokio::task::JoinHandle<Result<Option<Ready>, StoreError>>> = None;
    while !*stop.borrow() {
        let after = match position {
            Some(p) => p,
            None => {
                let store = delivery.store.clone();
                match blocking(move || store.router_position()).await {
                    Ok(p) => {
                        delivery.position.send_replace(p);
                        p
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the subject stage cannot read its position; retrying");
                        pause(Duration::from_secs(1), &mut stop, None).await;
                        continue;
                    }
                }
            }
        };
        position = Some(after);
        if let Some(slowest) = slowest_follower(&delivery, after)
            && after > slowest + AHEAD_MAX
        {
            // Never longer: while no destination moves (all paused, or their vendors down) the
            // stage goes on, so erasures and opt-outs reach the events that wait.
            let waited = waiting_since.get_or_insert_with(tokio::time::Instant::now);
            if waited.elapsed() < WAIT_FOR_SLOWER {
                tokio::select! {
                    _ = delivery.progress.notified() => {}
                    _ = stop.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
                continue;
            }
        }
        waiting_since = None;
        // The batch after `after`: prepared already while the last one committed, or now.
        let ready = match ahead.take() {
            Some(task) => match task.await {
                Ok(Ok(Some(r))) if r.after == after => Ok(Some(r)),
                Ok(Ok(_)) | Err(_) => {
                    read_ready(delivery.clone(), journal.clone(), settings.clone(), after).await
                }
                Ok(Err(e)) => Err(e),
            },
            None => read_ready(delivery.clone(), journal.clone(), settings.clone(), after).await,
        };
        let ready = match ready {
            Ok(Some(r)) => r,
            Ok(None) => {
                tokio::select! {
                    _ = head.changed() => {}
                    _ = stop.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "the subject stage cannot read the journal; retrying");
                pause(Duration::from_secs(1), &mut stop, None).await;
                continue;
            }
        };
        // Read and prepare the next batch while this one commits.
        let next_after = ready.events.last().map_or(after, |e| e.seq);
        ahead = Some(tokio::spawn(read_ready(
            delivery.clone(),
            journal.clone(),
            settings.clone(),
            next_after,
        )));
        let d = delivery.clone();
        let resolved = tokio::task::spawn_blocking(move || resolve_batch(&d, ready))
            .await
            .unwrap_or(Err(StoreError::Closed));
        let (batch, erase) = match resolved {
            Ok(r) => r,
            Err(e) => {
                failures += 1;
                tracing::error!(error = %e, failures, "the subject stage cannot commit a batch; retrying");
                // Read again from the committed position.
                if let Some(task) = ahead.take() {
                    task.abort();
                }
                pause(
                    Duration::from_millis(200 * u64::from(failures.min(25))),
                    &mut stop,
                    None,
                )
                .await;
                continue;
            }
        };
        failures = 0;
        if !erase.is_empty() {
            // Events of suppressed subjects are kept no longer than resolving took (erased
            // through the journal's own writer).
            if let Err(e) = journal.erase_events(erase).await {
                tracing::error!(error = %e, "cannot erase the events of suppressed subjects; the next erasure request for them will");
            }
        }
        let upto = batch.upto;
        delivery.recent.push(Arc::new(batch));
        position = Some(upto);
        delivery.position.send_replace(upto);
        // For the consumer-lag metric; the position that counts is in the outbox.
        let _ = journal.ack("router", upto).await;
    }
}
