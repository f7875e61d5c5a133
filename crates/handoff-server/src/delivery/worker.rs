//! One worker per destination, a consumer of the journal with its own cursor: it reads the
//! events after the cursor (from the subject stage's recent batches while it keeps up),
//! decides and maps them, sends them within the rate limit and the circuit breaker, and
//! commits the outcome with its new cursor in one transaction. Only failures are copied: into
//! its retry set (sent first, in order) or its dead letters.

use tokio::time::Instant;

use handoff_store::outbox::{Failed, Record, RecordItem, Round};

use super::batching;
use super::breaker::{Admit, Breaker};
use super::decide::{self, LaneDecision, ToSend, decide_for_lane};
use super::router::{Resolved, resolve_again};
use super::*;

/// What a round did.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Worked,
    /// The retry set has nothing due (or nothing at all).
    NothingDue,
}

pub(super) async fn worker(
    delivery: Arc<Delivery>,
    lane: Arc<Lane>,
    journal: Arc<dyn Journal>,
    app: Arc<crate::AppState>,
    mut stop: watch::Receiver<bool>,
) {
    let id = lane.destination.id.clone();
    let label = DeliveryMetrics::label(&id);
    let settings = delivery.settings.clone();
    let store = delivery.store.clone();
    let mut breaker = Breaker::new(settings.breaker_failures, settings.breaker_cooldown);
    // What the store says about the breaker and the last error, so operators see it
    // (`destinations status`); written on changes only.
    let mut recorded: (&'static str, Option<String>) = ("", None);
    let mut cursor: Option<handoff_store::Seq> = None;
    let mut position = delivery.position.subscribe();
    while !*stop.borrow() {
        let now_recorded = (breaker.name(), recorded.1.clone());
        if now_recorded.0 != recorded.0 {
            let (store, id, name) = (store.clone(), id.clone(), now_recorded.0);
            if blocking(move || store.record_breaker(&id, name, None))
                .await
                .is_ok()
            {
                recorded.0 = name;
            }
        }
        let killed = lane.state() == DestinationState::Killed;
        if lane.state() == DestinationState::Paused {
            pause(STATE_POLL, &mut stop, Some(&lane.wake)).await;
            continue;
        }
        let admit = if killed {
            // Sends nothing: its journal events are blocked (or kept in the retry set).
            Admit::All
        } else {
            breaker.admit(Instant::now())
        };
        app.metrics
            .delivery
            .breaker_state
            .get_or_create(&label)
            .set(breaker.gauge());
        if let Admit::Wait(wait) = admit {
            pause(wait, &mut stop, None).await;
            continue;
        }
        let probe = admit == Admit::Probe;
        // One-event (or per-subject-batch) connectors may send several requests at once.
        let single = lane.connector.max_batch() == 1 || lane.connector.batch_key_per_subject();
        let mut cx = Cx {
            delivery: &delivery,
            lane: &lane,
            app: &app,
            stop: &mut stop,
            breaker: &mut breaker,
            recorded: &mut recorded,
            label: &label,
        };
        // The retry set first: failures, and dead letters an operator replayed.
        let retrying = {
            let (store, id) = (store.clone(), id.clone());
            blocking(move || store.has_retries(&id)).await
        };
        let holdback = match retrying {
            Ok(false) => std::collections::HashSet::new(),
            Ok(true) if killed => {
                // Kept as they are; events of their subjects join them.
                let (store, d) = (store.clone(), id.clone());
                blocking(move || store.retry_subjects(&d))
                    .await
                    .unwrap_or_default()
            }
            Ok(true) => {
                let limit = if probe {
                    1
                } else if single {
                    ROUND * 2
                } else {
                    lane.connector.max_batch()
                };
                match retry_round(&mut cx, limit, probe, single).await {
                    Ok(Step::Worked) => continue,
                    Ok(Step::NothingDue) if !single => {
                        // A batching destination keeps its strict order: the journal waits
                        // for the retry set to drain.
                        pause(Duration::from_millis(10), cx.stop, Some(&lane.wake)).await;
                        continue;
                    }
                    Ok(Step::NothingDue) => {
                        let (store, d) = (store.clone(), id.clone());
                        match blocking(move || store.retry_subjects(&d)).await {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::error!(destination = %id, error = %e, "cannot read the retry set; retrying");
                                pause(Duration::from_secs(1), cx.stop, None).await;
                                continue;
                            }
                        }
                    }
                    Err(_) => {
                        pause(Duration::from_secs(1), cx.stop, None).await;
                        continue;
                    }
                }
            }
            Err(e) => {
                tracing::error!(destination = %id, error = %e, "cannot read the retry set; retrying");
                pause(Duration::from_secs(1), cx.stop, None).await;
                continue;
            }
        };
        // Then the journal after the cursor.
        let at = match cursor {
            Some(c) => c,
            None => {
                let (store, d) = (store.clone(), id.clone());
                match blocking(move || store.cursor(&d)).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(destination = %id, error = %e, "cannot read the cursor; retrying");
                        pause(Duration::from_secs(1), cx.stop, None).await;
                        continue;
                    }
                }
            }
        };
        cursor = Some(at);
        let passed = *position.borrow_and_update();
        if at >= passed {
            let wait = if holdback.is_empty() {
                Duration::from_secs(1)
            } else {
                // Retries fall due meanwhile.
                Duration::from_millis(100)
            };
            tokio::select! {
                _ = position.changed() => {}
                _ = lane.wake.notified() => {}
                _ = cx.stop.changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        let batch = match next_batch(&delivery, &journal, &app, at, passed).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(destination = %id, error = %e, "cannot read the journal; retrying");
                pause(Duration::from_secs(1), cx.stop, None).await;
                continue;
            }
        };
        let limit = if single { ROUND } else { ROUTE_BATCH };
        let max_sends = if probe { 1 } else { usize::MAX };
        match journal_round(
            &mut cx, &journal, batch, at, limit, max_sends, single, &holdback,
        )
        .await
        {
            Ok(next) => {
                cursor = Some(next);
                lane.cursor.store(next, Ordering::Relaxed);
                delivery.progress.notify_one();
            }
            Err(e) => {
                tracing::error!(destination = %id, error = %e, "cannot record a round; its events will be sent again");
                cursor = None;
                pause(Duration::from_secs(1), cx.stop, None).await;
            }
        }
    }
}

/// What a round works with.
struct Cx<'a> {
    delivery: &'a Arc<Delivery>,
    lane: &'a Arc<Lane>,
    app: &'a Arc<crate::AppState>,
    stop: &'a mut watch::Receiver<bool>,
    breaker: &'a mut Breaker,
    recorded: &'a mut (&'static str, Option<String>),
    label: &'a crate::metrics::DestinationLabel,
}

/// The resolved batch holding the events after `cursor`: the subject stage's, while kept;
/// otherwise read from the journal (up to what the stage has passed) and resolved read-only.
async fn next_batch(
    delivery: &Arc<Delivery>,
    journal: &Arc<dyn Journal>,
    app: &crate::AppState,
    cursor: handoff_store::Seq,
    passed: handoff_store::Seq,
) -> Result<Arc<Resolved>, StoreError> {
    if let Some(b) = delivery
        .recent
        .covering(cursor)
        .or_else(|| delivery.lagging.covering(cursor))
    {
        return Ok(b);
    }
    tracing::debug!(
        cursor,
        passed,
        "resolving journal events again (behind the recent batches)"
    );
    let mut events = journal.read(cursor, ROUTE_BATCH).await?;
    events.retain(|e| e.seq <= passed);
    let (d, settings) = (delivery.clone(), app.policy.settings.clone());
    let batch = tokio::task::spawn_blocking(move || resolve_again(&d, &settings, cursor, events))
        .await
        .map_err(|_| StoreError::Closed)??;
    let batch = Arc::new(batch);
    if !batch.events.is_empty() {
        delivery.lagging.push(batch.clone());
    }
    Ok(batch)
}

/// How one item of a journal round ended.
enum Ended {
    Delivered(Option<String>),
    Retry(Option<Duration>, String),
    Permanent(String),
    /// Not sent: the vendor failed another request, refused the credentials, the destination
    /// was paused or the gateway is stopping.
    NotSent,
}

/// Decides, sends and records the events after `cursor` in `batch` (at most `limit`).
/// Returns the new cursor.
#[allow(clippy::too_many_arguments)]
async fn journal_round(
    cx: &mut Cx<'_>,
    journal: &Arc<dyn Journal>,
    batch: Arc<Resolved>,
    cursor: handoff_store::Seq,
    limit: usize,
    max_sends: usize,
    single: bool,
    holdback: &std::collections::HashSet<String>,
) -> Result<handoff_store::Seq, StoreError> {
    let lane = cx.lane.clone();
    let delivery = cx.delivery.clone();
    let store = delivery.store.clone();
    let id = lane.destination.id.clone();
    let from = batch.start_after(cursor);
    // Subjects changed outside journal order (an erasure, an opt-out request, a merge) since
    // the batch was resolved: decide with what is stored now.
    let epoch = {
        let store = store.clone();
        blocking(move || store.subject_epoch()).await?
    };
    let states: Arc<Vec<SubjectState>> = if epoch == batch.epoch {
        Arc::new(Vec::new())
    } else {
        let (store, batch) = (store.clone(), batch.clone());
        Arc::new(
            blocking(move || {
                let ids: Vec<&str> = batch.subjects.iter().map(String::as_str).collect();
                Ok(store
                    .subjects_now(&ids)?
                    .into_iter()
                    .map(|s| SubjectState {
                        suppressed: s.as_ref().is_some_and(|s| s.suppressed_at_ms.is_some()),
                        preferences: s
                            .as_ref()
                            .and_then(|s| s.preferences.as_deref())
                            .and_then(handoff_core::consent::StoredPreferences::from_json),
                    })
                    .collect())
            })
            .await?,
        )
    };
    let decided = {
        let (batch, lane, states) = (batch.clone(), lane.clone(), states.clone());
        let settings = cx.app.policy.settings.clone();
        let delivery = delivery.clone();
        tokio::task::spawn_blocking(move || {
            let states: &[SubjectState] = if states.is_empty() {
                &batch.states
            } else {
                &states
            };
            decide_for_lane(
                &batch,
                states,
                from,
                limit,
                max_sends,
                &lane,
                &settings,
                &delivery.delivery_ids,
                time::OffsetDateTime::now_utc(),
            )
        })
        .await
        .map_err(|_| StoreError::Closed)?
    };
    let (decision, end) = decided;
    let Some(last) = end.checked_sub(1).filter(|_| end > from) else {
        // The journal holds nothing after the cursor although the subject stage passed it
        // (the outbox is ahead of a restored journal): an operator's problem, reported.
        return Err(StoreError::Conflict(format!(
            "the journal holds no event after position {cursor}, which the subject stage passed"
        )));
    };
    let upto = batch.events[last].seq;
    let LaneDecision {
        sends,
        entries,
        blocked,
        erase,
    } = decision;
    let vendor = lane.destination.vendor.id.clone();
    let blocks: Vec<RecordItem> = entries.iter().map(|e| record_item(e, None)).collect();
    // Decided to send and kept in the retry set; dead-lettered.
    let mut kept: Vec<RecordItem> = Vec::new();
    let mut dead_items: Vec<RecordItem> = Vec::new();
    let blocked_counts = decide::count(&blocked);
    if !erase.is_empty()
        && let Err(e) = journal.erase_events(erase).await
    {
        tracing::error!(error = %e, "cannot erase the events of suppressed subjects; the next erasure request for them will");
    }
    let settings = &delivery.settings;
    let now_ms = handoff_store::sqlite::now_ms();
    let max_age_ms = settings.max_age.as_millis() as i64;
    let mut round = Round {
        destination: id.clone(),
        upto,
        epoch,
        blocked: blocked_counts.clone(),
        ..Round::default()
    };
    // Too old to send, or behind an earlier item of its subject in the retry set.
    let mut live: Vec<ToSend> = Vec::with_capacity(sends.len());
    for s in sends {
        if now_ms - s.received_at_ms > max_age_ms {
            let error = format!(
                "not delivered within {} s after 0 attempt(s); last error: none",
                settings.max_age.as_secs()
            );
            dead_items.push(record_item(&s.entry, Some(&error)));
            round.dead.push(Failed {
                created_at_ms: s.received_at_ms,
                attempts: 0,
                next_at_ms: now_ms,
                error,
                item: s.item,
            });
        } else if single && !holdback.is_empty() && holdback.contains(subject_key(&s.item)) {
            kept.push(record_item(&s.entry, None));
            round.retry.push(Failed {
                created_at_ms: s.received_at_ms,
                attempts: 0,
                next_at_ms: now_ms,
                error: "waiting behind an earlier event of its subject".into(),
                item: s.item,
            });
        } else {
            live.push(s);
        }
    }
    let refs = if lane.connector.uses_vendor_ref() && !live.is_empty() {
        let subjects: Vec<String> = live.iter().map(|s| s.item.subject.clone()).collect();
        let (store, id) = (store.clone(), id.clone());
        blocking(move || {
            let s: Vec<&str> = subjects.iter().map(String::as_str).collect();
            store.vendor_refs_of(&id, &s)
        })
        .await?
    } else {
        std::collections::HashMap::new()
    };
    // The requests: per chain (one subject's events for one-event connectors, all of them
    // otherwise), runs sharing a batch key, sent one after the other.
    let keys: Vec<String> = live
        .iter()
        .map(|s| {
            lane.connector.batch_key(&Item {
                message_id: &s.item.message_id,
                delivery_id: &s.item.delivery_id,
                vendor_ref: refs.get(&s.item.subject).map(String::as_str),
                mapped: None,
                payload: &s.payload,
            })
        })
        .collect();
    let max_batch = lane.connector.max_batch();
    let subjects: Vec<&str> = live.iter().map(|s| subject_key(&s.item)).collect();
    let chains: Vec<Vec<usize>> = if single {
        batching::chains(&subjects)
    } else {
        // As many partitions (by subject) as the round has requests' worth of events, up to
        // PARALLEL: they go out side by side, each subject's events in order in one of them.
        let partitions = live.len().div_ceil(max_batch.max(1)).clamp(1, PARALLEL);
        batching::partitions(&subjects, partitions)
    };
    let mut ended: Vec<Ended> = (0..live.len()).map(|_| Ended::NotSent).collect();
    // A killed (or just paused) destination sends nothing: what may leave is kept.
    let chains = if lane.state() == DestinationState::Active {
        chains
    } else {
        Vec::new()
    };
    let mut answers: Vec<(Vec<usize>, Classification)> = Vec::new();
    {
        let live = Arc::new(live);
        let refs = Arc::new(refs);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut calls = tokio::task::JoinSet::new();
        for chain in chains {
            let chain_keys: Vec<&String> = chain.iter().map(|i| &keys[*i]).collect();
            let requests: Vec<Vec<usize>> = batching::runs(&chain_keys, max_batch)
                .into_iter()
                .map(|r| chain[r].to_vec())
                .collect();
            let (lane, in_flight, failing, stop, live, refs) = (
                lane.clone(),
                in_flight.clone(),
                failing.clone(),
                cx.stop.clone(),
                live.clone(),
                refs.clone(),
            );
            calls.spawn(async move {
                let _permit = in_flight.acquire_owned().await;
                let mut out: Vec<(Vec<usize>, Classification, Option<String>)> = Vec::new();
                for request in requests {
                    let go = || {
                        !failing.load(Ordering::Relaxed)
                            && lane.state() == DestinationState::Active
                            && !*stop.borrow()
                    };
                    if !go() {
                        break;
                    }
                    if let Some(limiter) = &lane.limiter {
                        limiter.until_ready().await;
                        if !go() {
                            break;
                        }
                    }
                    let items: Vec<Item<'_>> = request
                        .iter()
                        .map(|i| {
                            let s = &live[*i];
                            Item {
                                message_id: &s.item.message_id,
                                delivery_id: &s.item.delivery_id,
                                vendor_ref: refs.get(&s.item.subject).map(String::as_str),
                                mapped: s.mapped.as_ref(),
                                payload: &s.payload,
                            }
                        })
                        .collect();
                    let (class, vendor_ref) = match lane
                        .connector
                        .request(&items, time::OffsetDateTime::now_utc())
                    {
                        Ok(r) => send(&lane, r).await,
                        Err(why) => (Classification::Permanent { why }, None),
                    };
                    let delivered = matches!(class, Classification::Delivered);
                    if matches!(
                        class,
                        Classification::Retry { .. } | Classification::Credentials { .. }
                    ) {
                        failing.store(true, Ordering::Relaxed);
                    }
                    out.push((request, class, vendor_ref));
                    if !delivered {
                        // The rest of this subject's events wait behind it.
                        break;
                    }
                }
                out
            });
        }
        while let Some(r) = calls.join_next().await {
            if let Ok(results) = r {
                for (request, class, vendor_ref) in results {
                    for i in &request {
                        ended[*i] = match &class {
                            Classification::Delivered => Ended::Delivered(vendor_ref.clone()),
                            Classification::Retry { after, why } => {
                                Ended::Retry(*after, why.clone())
                            }
                            Classification::Permanent { why } => Ended::Permanent(why.clone()),
                            Classification::Credentials { .. } => Ended::NotSent,
                        };
                    }
                    answers.push((request, class));
                }
            }
        }
        let live = Arc::try_unwrap(live).unwrap_or_else(|_| unreachable!("every call ended"));
        // What the answers say about the vendor.
        for (request, class) in &answers {
            let n = request.len() as u64;
            let error = match class {
                Classification::Delivered => {
                    cx.breaker.succeeded();
                    None
                }
                Classification::Retry { why, .. } => {
                    if cx.breaker.failed(Instant::now()) {
                        tracing::warn!(destination = %id, failures = cx.breaker.failures(), reason = %why, "circuit breaker open");
                    }
                    cx.app
                        .metrics
                        .delivery
                        .retried
                        .get_or_create(cx.label)
                        .inc_by(n);
                    Some(why.clone())
                }
                Classification::Permanent { why } => {
                    tracing::warn!(destination = %id, items = n, reason = %why, "dead-lettered");
                    Some(why.clone())
                }
                Classification::Credentials { why } => {
                    credentials_refused(cx, why).await;
                    Some(why.clone())
                }
            };
            if let Some(why) = error {
                note_error(cx, why).await;
            }
        }
        cx.app
            .metrics
            .delivery
            .breaker_state
            .get_or_create(cx.label)
            .set(cx.breaker.gauge());
        let mut delivered = 0u64;
        let mut dead = 0u64;
        let mut latencies = Vec::new();
        // One record per vendor request that delivered.
        let mut request_of: Vec<usize> = vec![usize::MAX; live.len()];
        for (r, (request, _)) in answers.iter().enumerate() {
            for i in request {
                request_of[*i] = r;
            }
        }
        let mut requests: Vec<Vec<RecordItem>> = vec![Vec::new(); answers.len()];
        let mut killed_now: Vec<RecordItem> = Vec::new();
        for (n, (s, end)) in live.into_iter().zip(ended).enumerate() {
            match end {
                Ended::Delivered(vendor_ref) => {
                    delivered += 1;
                    latencies.push((now_ms - s.received_at_ms).max(0) as f64 / 1000.0);
                    if let Some(r) = requests.get_mut(request_of[n]) {
                        r.push(record_item(&s.entry, None));
                    }
                    let sent = handoff_store::outbox::Sent {
                        id: 0,
                        destination: s.item.destination.clone(),
                        vendor: s.item.vendor.clone(),
                        seq: s.item.seq,
                        message_id: s.item.message_id.clone(),
                        subject: s.item.subject.clone(),
                        ids: handoff_store::outbox::SentIds::of(&s.payload),
                    };
                    round.delivered.push((sent, vendor_ref));
                }
                Ended::Permanent(why) => {
                    dead += 1;
                    dead_items.push(record_item(&s.entry, Some(&why)));
                    round.dead.push(Failed {
                        created_at_ms: s.received_at_ms,
                        attempts: 1,
                        next_at_ms: now_ms,
                        error: why,
                        item: s.item,
                    });
                }
                Ended::Retry(after, why) => {
                    let wait = backoff(settings, 0).max(after.unwrap_or_default());
                    kept.push(record_item(&s.entry, None));
                    round.retry.push(Failed {
                        created_at_ms: s.received_at_ms,
                        attempts: 1,
                        next_at_ms: now_ms + wait.as_millis() as i64,
                        error: why,
                        item: s.item,
                    });
                }
                Ended::NotSent
                    if lane.killed_since_ms() > 0 && s.received_at_ms >= lane.killed_since_ms() =>
                {
                    // Killed before it went out: blocked, as if decided after the kill.
                    let mut e = s.entry;
                    e.outcome = "block".into();
                    e.reasons = KILLED_REASON.into();
                    killed_now.push(record_item(&e, None));
                }
                Ended::NotSent => {
                    kept.push(record_item(&s.entry, None));
                    round.retry.push(Failed {
                        created_at_ms: s.received_at_ms,
                        attempts: 0,
                        next_at_ms: now_ms,
                        error: "not sent yet".into(),
                        item: s.item,
                    });
                }
            }
        }
        let mut blocked_counts = blocked_counts;
        if !killed_now.is_empty() {
            let n = killed_now.len() as u64;
            round.blocked.push((KILLED_REASON, n));
            blocked_counts.push((KILLED_REASON, n));
        }
        let record = |kind, outcome, items: Vec<RecordItem>| Record {
            kind,
            outcome,
            vendor: vendor.clone(),
            items,
        };
        // A connector that takes one event per request gets one record for the round's
        // requests (each of its items one request): a record per event would cost the ledger
        // more than the event.
        let requests: Vec<Vec<RecordItem>> = if single {
            vec![requests.into_iter().flatten().collect()]
        } else {
            requests
        };
        round.records = requests
            .into_iter()
            .map(|items| record(ledger::kind::DELIVERY, "delivered", items))
            .chain([
                record(ledger::kind::DECISION, "block", blocks),
                record(ledger::kind::DECISION, "block", killed_now),
                record(ledger::kind::DECISION, "send", kept),
                record(ledger::kind::DELIVERY, "dead_lettered", dead_items),
            ])
            .filter(|r| !r.items.is_empty())
            .collect();
        let expired = round.dead.len() as u64 - dead;
        let store2 = store.clone();
        blocking(move || store2.commit_round(round)).await?;
        let m = &cx.app.metrics.delivery;
        if delivered > 0 {
            m.delivered.get_or_create(cx.label).inc_by(delivered);
            let hist = m.latency_seconds.get_or_create(cx.label);
            for l in latencies {
                hist.observe(l);
            }
        }
        if dead + expired > 0 {
            m.dead_lettered
                .get_or_create(cx.label)
                .inc_by(dead + expired);
        }
        for (reason, n) in blocked_counts {
            m.blocked
                .get_or_create(&BlockedLabel {
                    destination: id.clone(),
                    reason: reason.into(),
                })
                .inc_by(n);
        }
    }
    Ok(upto)
}

/// An event's part of a ledger record: what was sent and why; a dead letter's `error` as far
/// as the ledger keeps it (never the vendor's answer, which may echo personal data).
fn record_item(entry: &Entry, error: Option<&str>) -> RecordItem {
    RecordItem {
        seq: entry.event_seq,
        shape: entry.shape(),
        reasons: entry.reasons.clone(),
        detail: match error {
            Some(e) => handoff_store::outbox::ledger_reason(e).to_owned(),
            None => entry.detail.clone(),
        },
    }
}

/// Whose order an item keeps: its subject, or its message id when it names nobody.
fn subject_key(item: &handoff_store::outbox::NewItem) -> &str {
    if item.subject.is_empty() {
        &item.message_id
    } else {
        &item.subject
    }
}

/// Refused credentials: burning the queue on a bad key helps nobody, so the destination is
/// paused until an operator fixes them.
async fn credentials_refused(cx: &mut Cx<'_>, why: &str) {
    let id = cx.lane.destination.id.clone();
    tracing::error!(destination = %id, reason = %why, "credentials refused: destination paused; fix them and run `handoff destinations resume`");
    cx.app
        .metrics
        .delivery
        .credential_failures
        .get_or_create(cx.label)
        .inc();
    cx.lane.set_state(DestinationState::Paused);
    let store = cx.delivery.store.clone();
    let reason = format!("credentials refused: {why}");
    if let Err(e) = blocking(move || store.set_state(&id, DestinationState::Paused, &reason)).await
    {
        tracing::error!(error = %e, "cannot record the pause");
    }
}

/// Records the vendor's last error for operators, when it changed.
async fn note_error(cx: &mut Cx<'_>, why: String) {
    if cx.recorded.1.as_ref() == Some(&why) {
        return;
    }
    let (store, id, name, text) = (
        cx.delivery.store.clone(),
        cx.lane.destination.id.clone(),
        cx.breaker.name(),
        why.clone(),
    );
    if blocking(move || store.record_breaker(&id, name, Some(&text)))
        .await
        .is_ok()
    {
        *cx.recorded = (cx.breaker.name(), Some(why));
    }
}

/// Sends what is due in the retry set (strictly in order for batching connectors; for
/// one-event connectors one per subject, none overtaking its subject's earlier item).
async fn retry_round(
    cx: &mut Cx<'_>,
    limit: usize,
    probe: bool,
    single: bool,
) -> Result<Step, StoreError> {
    let (delivery, lane, app) = (cx.delivery.clone(), cx.lane.clone(), cx.app.clone());
    let id = lane.destination.id.clone();
    let label = cx.label.clone();
    let settings = delivery.settings.clone();
    let store = delivery.store.clone();
    let head = {
        let (store, id) = (store.clone(), id.clone());
        blocking(move || store.head(&id, limit)).await
    };
    let head = match head {
        Ok(mut h) => {
            // Items queued before delivery ids were keyed keep the id their first attempt
            // used, so the vendor still deduplicates their retries.
            for i in h.iter_mut().filter(|i| i.delivery_id.is_empty()) {
                i.delivery_id =
                    handoff_connectors::wire::delivery_id(&i.destination, &i.message_id);
            }
            h
        }
        Err(e) => {
            tracing::error!(destination = %id, error = %e, "cannot read the retry set; retrying");
            return Err(e);
        }
    };
    let Some(first) = head.first() else {
        return Ok(Step::NothingDue);
    };
    let now_ms = handoff_store::sqlite::now_ms();
    if !single && first.next_at_ms > now_ms {
        // Strict order per destination: the head waits for its retry time, and so does the
        // rest (the vendor is failing for all of them anyway).
        wait_until_due(first.next_at_ms - now_ms, 0, cx.stop, &lane.wake).await;
        return Ok(Step::Worked);
    }
    // Items past the maximum age are dead-lettered with their last error.
    let max_age_ms = settings.max_age.as_millis() as i64;
    let expired: Vec<&OutboxItem> = head
        .iter()
        .filter(|i| now_ms - i.created_at_ms > max_age_ms)
        .collect();
    if !expired.is_empty() {
        let ids: Vec<i64> = expired.iter().map(|i| i.id).collect();
        let reason = format!(
            "not delivered within {} s after {} attempt(s); last error: {}",
            settings.max_age.as_secs(),
            expired[0].attempts,
            expired[0].last_error.as_deref().unwrap_or("none")
        );
        let n = ids.len() as u64;
        let store = store.clone();
        if blocking(move || store.dead_letter(&ids, &reason))
            .await
            .is_ok()
        {
            app.metrics
                .delivery
                .dead_lettered
                .get_or_create(&label)
                .inc_by(n);
        }
        return Ok(Step::Worked);
    }
    // What to send this round. Connectors that take batches get one batch: consecutive due
    // items sharing the first one's batch key. One-event connectors (webhooks, Stripe) get
    // up to ROUND requests, PARALLEL at once, never two for the same subject, and never one that
    // would overtake an earlier item of its subject still waiting for a retry.
    let parsed: Vec<(&OutboxItem, Option<Value>)> = head
        .iter()
        .map(|i| (i, serde_json::from_str(&i.payload).ok()))
        .collect();
    let unreadable: Vec<i64> = parsed
        .iter()
        .filter(|(_, p)| p.is_none())
        .map(|(i, _)| i.id)
        .collect();
    if !unreadable.is_empty() {
        let n = unreadable.len() as u64;
        let store = store.clone();
        let _ = blocking(move || store.dead_letter(&unreadable, "the queued payload is not JSON"))
            .await;
        app.metrics
            .delivery
            .dead_lettered
            .get_or_create(&label)
            .inc_by(n);
        return Ok(Step::Worked);
    }
    let parallel = single && !probe;
    let mut groups: Vec<Vec<(&OutboxItem, &Value)>> = Vec::new();
    let readable: Vec<(&OutboxItem, &Value)> = parsed
        .iter()
        .map(|(i, p)| (*i, p.as_ref().expect("unreadable items were removed")))
        .collect();
    if parallel {
        let pending: Vec<batching::Pending<'_>> = readable
            .iter()
            .map(|(i, _)| batching::Pending {
                subject: if i.subject.is_empty() {
                    &i.message_id
                } else {
                    &i.subject
                },
                due: i.next_at_ms <= now_ms,
            })
            .collect();
        groups.extend(
            batching::one_per_subject(&pending, ROUND)
                .into_iter()
                .map(|i| vec![readable[i]]),
        );
        if groups.is_empty() {
            // Nothing due: the journal's events go on meanwhile (none overtakes its subject's
            // item waiting here).
            return Ok(Step::NothingDue);
        }
    } else {
        let keyed: Vec<(bool, String)> = readable
            .iter()
            .map(|(i, p)| {
                let key = lane.connector.batch_key(&Item {
                    message_id: &i.message_id,
                    delivery_id: &i.delivery_id,
                    vendor_ref: i.vendor_ref.as_deref(),
                    mapped: None,
                    payload: p,
                });
                (i.next_at_ms <= now_ms, key)
            })
            .collect();
        let n = batching::leading_batch(&keyed);
        if n == 0 {
            // The head is waiting for its retry time (a half-open probe of a one-event
            // connector ends up here too).
            wait_until_due(parsed[0].0.next_at_ms - now_ms, 10, cx.stop, &lane.wake).await;
            return Ok(Step::Worked);
        }
        groups.push(readable[..n].to_vec());
    }

    // Build every request, then send them, PARALLEL at a time, each within the rate limit.
    // What is not sent yet when the vendor fails one (unavailable, throttling,
    // credentials), the destination is paused or killed, or the gateway stops, stays queued
    // as it was; the breaker decides what happens next.
    let mut calls = tokio::task::JoinSet::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut mapping_failures: Vec<(Vec<i64>, String)> = Vec::new();
    for group in &groups {
        let items: Vec<Item<'_>> = group
            .iter()
            .map(|(i, p)| Item {
                message_id: &i.message_id,
                delivery_id: &i.delivery_id,
                vendor_ref: i.vendor_ref.as_deref(),
                mapped: None,
                payload: p,
            })
            .collect();
        let ids: Vec<i64> = group.iter().map(|(i, _)| i.id).collect();
        let oldest = group
            .iter()
            .map(|(i, _)| i.created_at_ms)
            .min()
            .unwrap_or(now_ms);
        let attempts = group.iter().map(|(i, _)| i.attempts).max().unwrap_or(0);
        match lane
            .connector
            .request(&items, time::OffsetDateTime::now_utc())
        {
            Ok(request) => {
                let (lane, in_flight, failing, stop) = (
                    lane.clone(),
                    in_flight.clone(),
                    failing.clone(),
                    cx.stop.clone(),
                );
                calls.spawn(async move {
                    let _permit = in_flight.acquire_owned().await;
                    let go = || {
                        !failing.load(Ordering::Relaxed)
                            && lane.state() == DestinationState::Active
                            && !*stop.borrow()
                    };
                    if !go() {
                        return None;
                    }
                    if let Some(limiter) = &lane.limiter {
                        limiter.until_ready().await;
                        if !go() {
                            return None;
                        }
                    }
                    let answer = send(&lane, request).await;
                    if matches!(
                        answer.0,
                        Classification::Retry { .. } | Classification::Credentials { .. }
                    ) {
                        failing.store(true, Ordering::Relaxed);
                    }
                    Some((ids, oldest, attempts, answer))
                });
            }
            Err(why) => mapping_failures.push((ids, why)),
        }
    }
    let mut results = Vec::with_capacity(groups.len());
    for (ids, why) in mapping_failures {
        results.push((ids, now_ms, 0, (Classification::Permanent { why }, None)));
    }
    while let Some(r) = calls.join_next().await {
        if let Ok(Some(r)) = r {
            results.push(r);
        }
    }
    // Delivered items are removed in one transaction.
    let mut delivered: Vec<i64> = Vec::new();
    let mut refs: Vec<(i64, String)> = Vec::new();
    let mut latencies: Vec<f64> = Vec::new();
    let mut outcome: Result<(), StoreError> = Ok(());
    for (ids, oldest, attempts, (class, vendor_ref)) in results {
        let n = ids.len() as u64;
        let error = match &class {
            Classification::Delivered => None,
            Classification::Retry { why, .. }
            | Classification::Permanent { why }
            | Classification::Credentials { why } => Some(why.clone()),
        };
        if let (Some(r), [id]) = (vendor_ref, ids.as_slice()) {
            refs.push((*id, r));
        }
        let step = match class {
            Classification::Delivered => {
                cx.breaker.succeeded();
                app.metrics
                    .delivery
                    .breaker_state
                    .get_or_create(&label)
                    .set(cx.breaker.gauge());
                latencies.push((handoff_store::sqlite::now_ms() - oldest).max(0) as f64 / 1000.0);
                delivered.extend(ids);
                Ok(())
            }
            Classification::Retry { after, why } => {
                if cx.breaker.failed(Instant::now()) {
                    tracing::warn!(destination = %id, failures = cx.breaker.failures(), reason = %why, "circuit breaker open");
                }
                let wait = backoff(&settings, attempts).max(after.unwrap_or_default());
                let next = handoff_store::sqlite::now_ms() + wait.as_millis() as i64;
                app.metrics.delivery.retried.get_or_create(&label).inc_by(n);
                let store = store.clone();
                blocking(move || store.retry(&ids, next, &why)).await
            }
            Classification::Permanent { why } => {
                tracing::warn!(destination = %id, items = n, reason = %why, "dead-lettered");
                app.metrics
                    .delivery
                    .dead_lettered
                    .get_or_create(&label)
                    .inc_by(n);
                let store = store.clone();
                blocking(move || store.dead_letter(&ids, &why)).await
            }
            Classification::Credentials { why } => {
                // Burning the queue on a bad key helps nobody: stop and call an operator.
                tracing::error!(destination = %id, reason = %why, "credentials refused: destination paused; fix them and run `handoff destinations resume`");
                app.metrics
                    .delivery
                    .credential_failures
                    .get_or_create(&label)
                    .inc();
                lane.set_state(DestinationState::Paused);
                let store = store.clone();
                let id = id.clone();
                blocking(move || {
                    store.set_state(
                        &id,
                        DestinationState::Paused,
                        &format!("credentials refused: {why}"),
                    )
                })
                .await
            }
        };
        if step.is_err() {
            outcome = step;
        }
        if let Some(why) = error.filter(|why| cx.recorded.1.as_ref() != Some(why)) {
            let (store, id, name, text) =
                (store.clone(), id.clone(), cx.breaker.name(), why.clone());
            if blocking(move || store.record_breaker(&id, name, Some(&text)))
                .await
                .is_ok()
            {
                *cx.recorded = (cx.breaker.name(), Some(why));
            }
        }
    }
    if !delivered.is_empty() {
        let n = delivered.len() as u64;
        let store = store.clone();
        let accepted: HashSet<i64> = delivered.iter().copied().collect();
        let sent: Vec<Sent> = parsed
            .iter()
            .filter(|(i, _)| accepted.contains(&i.id))
            .map(|(i, payload)| Sent {
                id: i.id,
                destination: i.destination.clone(),
                vendor: lane.destination.vendor.id.clone(),
                seq: i.seq,
                message_id: i.message_id.clone(),
                subject: i.subject.clone(),
                ids: payload.as_ref().map(SentIds::of).unwrap_or_default(),
            })
            .collect();
        let r = blocking(move || store.delivered(&sent, &refs)).await;
        if r.is_ok() {
            app.metrics
                .delivery
                .delivered
                .get_or_create(&label)
                .inc_by(n);
            let hist = app.metrics.delivery.latency_seconds.get_or_create(&label);
            for l in latencies {
                hist.observe(l);
            }
        } else {
            outcome = r;
        }
    }
    if let Err(e) = outcome {
        tracing::error!(destination = %id, error = %e, "cannot record a delivery outcome; the items will be sent again");
        return Err(e);
    }
    Ok(Step::Worked)
}

/// Waits until an item is due in `in_ms` (at least `floor_ms`, at most a second, so state
/// changes are seen), or less if the destination's queue changes or the gateway stops.
async fn wait_until_due(
    in_ms: i64,
    floor_ms: i64,
    stop: &mut watch::Receiver<bool>,
    wake: &Notify,
) {
    let wait = Duration::from_millis(in_ms.max(floor_ms).max(0) as u64);
    pause(wait.min(Duration::from_secs(1)), stop, Some(wake)).await;
}

/// Sends one request and classifies the answer; with the vendor's id for the subject when a
/// successful answer carries one.
async fn send(
    lane: &Lane,
    request: handoff_connectors::wire::WireRequest,
) -> (Classification, Option<String>) {
    send_with(lane, request, false).await
}

/// Sends one request; `erasure` classifies the answer as the answer to a deletion call.
pub(crate) async fn send_with(
    lane: &Lane,
    request: handoff_connectors::wire::WireRequest,
    erasure: bool,
) -> (Classification, Option<String>) {
    let method =
        reqwest::Method::from_bytes(request.method.as_bytes()).unwrap_or(reqwest::Method::POST);
    let mut call = lane.client.request(method, &request.url).body(request.body);
    for (k, v) in &request.headers {
        call = call.header(k.as_str(), v.as_str());
    }
    match call.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    handoff_connectors::wire::retry_after(v, time::OffsetDateTime::now_utc())
                });
            // Enough of the body to classify and quote; a vendor's error pages can be big.
            let body = resp.bytes().await.unwrap_or_default();
            let body = &body[..body.len().min(64 * 1024)];
            let class = if erasure {
                lane.connector.classify_erasure(status, after, body)
            } else {
                lane.connector.classify(status, after, body)
            };
            let vendor_ref = match class {
                Classification::Delivered if !erasure => lane.connector.vendor_ref(body),
                _ => None,
            };
            (class, vendor_ref)
        }
        Err(e) => (
            Classification::Retry {
                after: None,
                why: if e.is_timeout() {
                    "timed out".to_owned()
                } else if e.is_connect() {
                    "cannot connect".to_owned()
                } else {
                    "the connection failed".to_owned()
                },
            },
            None,
        ),
    }
}
