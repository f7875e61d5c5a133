//! A destination's round over the journal: the events after its cursor decided, sent and
//! recorded with its new cursor in one transaction; only what failed is copied.

use tokio::time::Instant;

use handoff_store::outbox::{Failed, Record, RecordItem, Round};

use super::batching;
use super::decide::{self, LaneDecision, ToSend, decide_for_lane};
use super::router::Resolved;
use super::worker::{Cx, credentials_refused, note_error, send};
use super::*;

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
pub(super) async fn journal_round(
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
            keep(
                &mut round,
                &mut kept,
                s,
                (0, now_ms),
                "waiting behind an earlier event of its subject".into(),
            );
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
                    let next_at_ms = now_ms + wait.as_millis() as i64;
                    keep(&mut round, &mut kept, s, (1, next_at_ms), why);
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
                    keep(&mut round, &mut kept, s, (0, now_ms), "not sent yet".into());
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

/// Copies a decided item into the retry set (`attempts` made so far, next one due at
/// `next_at_ms`), and adds it to the round's record of what was kept.
fn keep(
    round: &mut Round,
    kept: &mut Vec<RecordItem>,
    s: ToSend,
    (attempts, next_at_ms): (u32, i64),
    error: String,
) {
    kept.push(record_item(&s.entry, None));
    round.retry.push(Failed {
        created_at_ms: s.received_at_ms,
        attempts,
        next_at_ms,
        error,
        item: s.item,
    });
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
