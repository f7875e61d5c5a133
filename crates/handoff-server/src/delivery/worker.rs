//! One worker per destination, a consumer of the journal with its own cursor: it reads the
//! events after the cursor (from the subject stage's recent batches while it keeps up),
//! decides and maps them, sends them within the rate limit and the circuit breaker, and
//! commits the outcome with its new cursor in one transaction (`round.rs`). Only failures are
//! copied: into its retry set (sent first, in order: `retry.rs`) or its dead letters.

use tokio::time::Instant;

use super::breaker::{Admit, Breaker};
use super::router::{Resolved, resolve_again};
use super::*;

/// What a round did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
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
                match super::retry::retry_round(&mut cx, limit, probe, single).await {
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
        match super::round::journal_round(
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
pub(super) struct Cx<'a> {
    pub delivery: &'a Arc<Delivery>,
    pub lane: &'a Arc<Lane>,
    pub app: &'a Arc<crate::AppState>,
    pub stop: &'a mut watch::Receiver<bool>,
    pub breaker: &'a mut Breaker,
    pub recorded: &'a mut (&'static str, Option<String>),
    pub label: &'a crate::metrics::DestinationLabel,
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

/// Refused credentials: burning the queue on a bad key helps nobody, so the destination is
/// paused until an operator fixes them.
pub(super) async fn credentials_refused(cx: &mut Cx<'_>, why: &str) {
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
pub(super) async fn note_error(cx: &mut Cx<'_>, why: String) {
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

/// Waits until an item is due in `in_ms` (at least `floor_ms`, at most a second, so state
/// changes are seen), or less if the destination's queue changes or the gateway stops.
pub(super) async fn wait_until_due(
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
pub(super) async fn send(
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
