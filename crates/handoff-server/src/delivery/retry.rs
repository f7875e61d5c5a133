//! A destination's round over its retry set: failures and replayed dead letters, sent before
//! the journal's events (strictly in order for batching connectors; for one-event connectors one
//! per subject, none overtaking its subject's earlier item).

use tokio::time::Instant;

use super::batching;
use super::worker::{Cx, Step, send, wait_until_due};
use super::*;

/// Sends what is due in the retry set (strictly in order for batching connectors; for
/// one-event connectors one per subject, none overtaking its subject's earlier item).
pub(super) async fn retry_round(
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
