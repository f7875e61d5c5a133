//! Delivery: the journal is the queue. The subject stage (`router.rs`) resolves each event's
//! subject in journal order; one worker per destination is a consumer with its own cursor,
//! which decides, maps, sends and records the events after it (`worker.rs`).
//!
//! Isolation: each destination has its own cursor, retry set, worker, HTTP client and circuit
//! breaker, so a slow or dead vendor only ever delays itself. Ingest never waits on any of it.
//!
//! Guarantees: a worker commits the ledger records of a round, the failures it copies into
//! its retry set or dead letters, and its new cursor in one transaction (see
//! [`OutboxStore::commit_round`]), after the vendor answered; a crash at any point means, at
//! worst, one more attempt, which the vendor deduplicates on the item's delivery id. Every
//! event is delivered, blocked with a recorded reason, dead-lettered with a reason, or waits
//! while its destination is paused; nothing is dropped silently.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use handoff_connectors::connector::Connector;
use handoff_connectors::wire::{Classification, Item, wire_fields};
use handoff_core::consent::{ConsentContext, SubjectState};
use handoff_core::policy::model::{DeliverySettings, Destination};
use handoff_core::policy::{Outcome, PreparedEvent, decide};
use handoff_core::subject::{SubjectKey, identifiers};
use handoff_store::ledger::{self, Entry};
use handoff_store::outbox::{DestinationState, OutboxItem, OutboxStore, Sent, SentIds};
use handoff_store::{Journal, StoreError};
use serde_json::Value;
use tokio::sync::{Notify, watch};

use crate::metrics::{BlockedLabel, DeliveryMetrics};

mod backoff;
mod batching;
mod breaker;
mod decide;
mod erasures;
mod retry;
mod round;
mod router;
mod worker;

use crate::policy_http::PolicyConfig;
pub use backoff::backoff;
pub(crate) use worker::send_with;

/// Events the subject stage resolves per transaction, and a batching destination decides
/// per round (Meta's largest request). 1,000 instead of 500: 37,000-38,000 batching events/s
/// end to end instead of 33,000 (fewer transactions and ledger records per event).
const ROUTE_BATCH: usize = 1000;
/// How often destination states (set by `handoff destinations …` from another process) are
/// re-read: a pause or kill takes effect within this.
const STATE_POLL: Duration = Duration::from_millis(250);
/// Requests in flight at once to a destination that takes one event per request.
const PARALLEL: usize = 16;
/// Items a one-event destination sends per round (PARALLEL at a time), recorded together:
/// each round reads the queue and records its deliveries once, so rounds of only PARALLEL
/// items spent most of their time waiting for the store while the router wrote.
const ROUND: usize = 256;
/// Reason recorded when a killed destination is not decided for.
pub const KILLED_REASON: &str = "destination.killed";
/// Reason recorded when a stored event cannot be read back (it is blocked for every
/// destination, never guessed at).
pub const UNREADABLE_REASON: &str = "journal.unreadable";
/// The reason codes delivery writes to the ledger besides the policy's
/// [`handoff_core::policy::REASON_CODES`].
pub const LEDGER_REASON_CODES: &[&str] = &[KILLED_REASON, UNREADABLE_REASON, UNDECIDABLE_REASON];
/// Reason recorded when deciding or mapping an event failed (a bug, logged with the event's
/// sequence number): it is blocked for every destination and the pipeline goes on.
pub const UNDECIDABLE_REASON: &str = "event.undecidable";
/// Reason recorded when the destination's connector cannot map a decided event (GA4 without a
/// client id, Stripe given a track call): it would never be sent.
pub const REFUSED_REASON: &str = handoff_core::policy::CONNECTOR_REFUSED;

/// One destination at run time.
pub struct Lane {
    pub destination: Destination,
    /// Shared with data-subject requests, which call the same connector's erasure.
    pub connector: Arc<dyn Connector>,
    /// The destination's purposes as the ledger writes them ("advertising,analytics").
    purposes: String,
    client: reqwest::Client,
    state: AtomicU8,
    killed_since: std::sync::atomic::AtomicI64,
    /// The worker's committed cursor, for the subject stage's pacing.
    cursor: std::sync::atomic::AtomicU64,
    wake: Notify,
    /// The destination's `rate_limit_per_sec`, as requests per second.
    limiter: Option<governor::DefaultDirectRateLimiter>,
}

impl Lane {
    pub fn state(&self) -> DestinationState {
        match self.state.load(Ordering::Relaxed) {
            0 => DestinationState::Active,
            1 => DestinationState::Paused,
            _ => DestinationState::Killed,
        }
    }

    /// When the destination was killed (events received since are blocked for it); 0 when
    /// it is not.
    pub fn killed_since_ms(&self) -> i64 {
        self.killed_since.load(Ordering::Relaxed)
    }

    /// Sets the state, which holds since `since_ms`.
    fn set_state_since(&self, s: DestinationState, since_ms: i64) {
        // Killed again (a new reason): the kill still dates from the first time.
        let before = self.killed_since.load(Ordering::Relaxed);
        let killed = match s {
            DestinationState::Killed if before > 0 => before.min(since_ms.max(1)),
            DestinationState::Killed => since_ms.max(1),
            _ => 0,
        };
        self.killed_since.store(killed, Ordering::Relaxed);
        self.set_state(s);
    }

    fn set_state(&self, s: DestinationState) {
        let v = match s {
            DestinationState::Active => 0,
            DestinationState::Paused => 1,
            DestinationState::Killed => 2,
        };
        if self.state.swap(v, Ordering::Relaxed) != v {
            self.wake.notify_one();
        }
    }
}

/// Everything delivery needs, shared by the router and the workers.
pub struct Delivery {
    pub store: Arc<OutboxStore>,
    pub lanes: Vec<Arc<Lane>>,
    pub settings: DeliverySettings,
    /// Identifiers are resolved to subjects under this key.
    pub subject_key: SubjectKey,
    /// Delivery ids are keyed by source under this secret.
    pub delivery_ids: handoff_connectors::wire::DeliveryIdKey,
    /// The batches the subject stage resolved lately.
    recent: router::Recent,
    /// The batches lagging workers resolved again lately.
    lagging: router::Recent,
    /// The subject stage's committed position: workers read the journal up to it.
    position: watch::Sender<handoff_store::Seq>,
    /// Told when a worker's cursor moves (the subject stage waits for the fastest).
    progress: Notify,
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("destination {0}: {1}")]
    Connector(String, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Delivery {
    /// Builds every destination's connector and HTTP client (failing on unusable settings).
    pub fn new(
        store: Arc<OutboxStore>,
        policy: &PolicyConfig,
        settings: DeliverySettings,
        subject_key: SubjectKey,
        delivery_ids: handoff_connectors::wire::DeliveryIdKey,
    ) -> Result<Self, DeliveryError> {
        let mut lanes = Vec::new();
        for d in &policy.destinations {
            let connector = handoff_connectors::connector::for_destination(d)
                .map_err(|e| DeliveryError::Connector(d.id.clone(), e.to_string()))?;
            let client = handoff_connectors::http::client(&d.tls, settings.request_timeout)
                .map_err(|e| DeliveryError::Connector(d.id.clone(), e.to_string()))?;
            store.ensure_cursor(&d.id)?;
            let (state, since) = store.state_since(&d.id)?;
            let lane = Lane {
                destination: d.clone(),
                connector: connector.into(),
                purposes: d
                    .purposes
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                client,
                state: AtomicU8::new(0),
                killed_since: std::sync::atomic::AtomicI64::new(0),
                cursor: std::sync::atomic::AtomicU64::new(store.cursor(&d.id)?),
                wake: Notify::new(),
                limiter: d
                    .rate_limit_per_sec
                    .and_then(std::num::NonZeroU32::new)
                    .map(|n| governor::RateLimiter::direct(governor::Quota::per_second(n))),
            };
            lane.set_state_since(state, since);
            lanes.push(Arc::new(lane));
        }
        let (position, _) = watch::channel(store.router_position()?);
        Ok(Delivery {
            store,
            lanes,
            settings,
            subject_key,
            delivery_ids,
            recent: router::Recent::new(router::RECENT_BATCHES),
            lagging: router::Recent::new(router::LAGGING_BATCHES),
            position,
            progress: Notify::new(),
        })
    }

    /// Applies a state change made through the admin API at once (the poller would within
    /// 250 ms).
    pub fn apply_state(&self, destination: &str, state: DestinationState) {
        if let Some(lane) = self.lanes.iter().find(|l| l.destination.id == destination) {
            lane.set_state_since(state, handoff_store::sqlite::now_ms());
        }
    }

    pub fn lane(&self, destination: &str) -> Option<&Arc<Lane>> {
        self.lanes.iter().find(|l| l.destination.id == destination)
    }

    /// Tells a destination's worker that its queue changed.
    pub fn wake(&self, destination: &str) {
        if let Some(lane) = self.lanes.iter().find(|l| l.destination.id == destination) {
            lane.wake.notify_one();
        }
    }

    /// Starts the router, the state poller and one worker per destination; they stop when
    /// `stop` turns true.
    pub fn start(
        self: &Arc<Self>,
        journal: Arc<dyn Journal>,
        app: Arc<crate::AppState>,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        if self.lanes.is_empty() {
            return tasks;
        }
        // Each task is supervised: a panic is logged, counted and the task started again
        // from what the store holds (the subject stage from its committed position, a worker
        // from its cursor and retry set), so one bug never silently ends a destination's
        // delivery.
        let restarts = app.metrics.task_restarts.clone();
        {
            let (delivery, journal, app, stop) =
                (self.clone(), journal.clone(), app.clone(), stop.clone());
            tasks.push(crate::supervisor::supervise(
                "delivery-subjects",
                restarts.clone(),
                move || {
                    router::router(delivery.clone(), journal.clone(), app.clone(), stop.clone())
                },
            ));
        }
        {
            let (delivery, journal, app, stop) =
                (self.clone(), journal.clone(), app.clone(), stop.clone());
            tasks.push(crate::supervisor::supervise(
                "delivery-states",
                restarts.clone(),
                move || poll_states(delivery.clone(), journal.clone(), app.clone(), stop.clone()),
            ));
        }
        {
            let (delivery, app, stop) = (self.clone(), app.clone(), stop.clone());
            tasks.push(crate::supervisor::supervise(
                "dsr-erasures",
                restarts.clone(),
                move || erasures::erasures(delivery.clone(), app.clone(), stop.clone()),
            ));
        }
        for lane in &self.lanes {
            let (delivery, lane, journal, app, stop) = (
                self.clone(),
                lane.clone(),
                journal.clone(),
                app.clone(),
                stop.clone(),
            );
            tasks.push(crate::supervisor::supervise(
                "delivery-worker",
                restarts.clone(),
                move || {
                    worker::worker(
                        delivery.clone(),
                        lane.clone(),
                        journal.clone(),
                        app.clone(),
                        stop.clone(),
                    )
                },
            ));
        }
        tasks
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| StoreError::Closed)?
}

/// Sleeps `d`, or less if `stop` turns true or `wake` fires.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>, wake: Option<&Notify>) {
    let woken = async {
        match wake {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.changed() => {}
        _ = woken => {}
    }
}

async fn poll_states(
    delivery: Arc<Delivery>,
    journal: Arc<dyn Journal>,
    app: Arc<crate::AppState>,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        for lane in &delivery.lanes {
            let store = delivery.store.clone();
            let id = lane.destination.id.clone();
            let stats_id = id.clone();
            let store2 = delivery.store.clone();
            if let Ok((state, since)) = blocking(move || store.state_since(&id)).await
                && (state != lane.state()
                    || (state == DestinationState::Killed && since != lane.killed_since_ms()))
            {
                lane.set_state_since(state, since);
            }
            let label = DeliveryMetrics::label(&lane.destination.id);
            app.metrics
                .delivery
                .state
                .get_or_create(&label)
                .set(lane.state() as i64);
            if let Ok(stats) = blocking(move || store2.stats(&stats_id)).await {
                app.metrics
                    .delivery
                    .queue_depth
                    .get_or_create(&label)
                    .set(stats.depth as i64);
                // The oldest of the retry set and of the journal events after the cursor.
                let mut oldest = stats.oldest_created_at_ms;
                if stats.behind > 0 {
                    let store = delivery.store.clone();
                    let id = lane.destination.id.clone();
                    if let Ok(cursor) = blocking(move || store.cursor(&id)).await
                        && let Ok(next) = journal.read(cursor, 1).await
                        && let Some(e) = next.first()
                    {
                        oldest = Some(oldest.map_or(e.received_at_ms, |o| o.min(e.received_at_ms)));
                    }
                }
                let age = oldest.map_or(0, |t| (handoff_store::sqlite::now_ms() - t).max(0) / 1000);
                app.metrics
                    .delivery
                    .oldest_age_seconds
                    .get_or_create(&label)
                    .set(age);
            }
        }
        pause(STATE_POLL, &mut stop, None).await;
    }
}
