//! Retention: accepted events leave the journal once every destination has passed them and
//! `[server] retention_hours` has elapsed (the replay window); refused messages leave the
//! quarantine after `[server] quarantine_retention_days`.

use std::sync::Arc;
use std::time::Duration;

use handoff_store::{Journal, Seq, StoreError};

use crate::metrics::Metrics;

/// How often retention runs. Retention is counted in hours and days, so an hour's lag is noise;
/// each pass deletes in chunks through the journal's writer, between ingest's commits.
pub const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// The lowest position every consumer of the journal has passed (events at or after it are
/// still needed); [`Seq::MAX`] when nothing consumes the journal. Called off the async threads.
pub type LowestCursor = Arc<dyn Fn() -> Result<Seq, StoreError> + Send + Sync>;

/// What retention keeps.
#[derive(Clone)]
pub struct Retention {
    /// Events stay at least this long after they were received…
    pub events: Duration,
    /// …and until every consumer has passed them.
    pub lowest_cursor: LowestCursor,
    /// Refused messages stay this long.
    pub quarantine: Duration,
}

/// One pass: the journal's events, then the quarantine. Returns (events, messages) deleted.
pub async fn purge_once(
    journal: &dyn Journal,
    retention: &Retention,
    now_ms: i64,
) -> Result<(u64, u64), StoreError> {
    let cursor = retention.lowest_cursor.clone();
    let lowest = tokio::task::spawn_blocking(move || cursor())
        .await
        .map_err(|_| StoreError::Closed)??;
    // Events at or before a consumer's position are passed; the one at it is kept too (the
    // journal keeps its newest event anyway).
    let upto = lowest;
    let events = journal
        .purge_events(upto, now_ms - retention.events.as_millis() as i64)
        .await?;
    let messages = journal
        .purge_quarantine(now_ms - retention.quarantine.as_millis() as i64)
        .await?;
    Ok((events, messages))
}

/// Starts the supervised task that applies retention now and every [`PURGE_EVERY`].
pub fn start(
    journal: Arc<dyn Journal>,
    retention: Retention,
    metrics: &Metrics,
) -> tokio::task::JoinHandle<()> {
    let (events_purged, quarantine_purged) = (
        metrics.journal_purged.clone(),
        metrics.quarantine_purged.clone(),
    );
    crate::supervisor::supervise("retention", metrics.task_restarts.clone(), move || {
        let journal = journal.clone();
        let retention = retention.clone();
        let (events_purged, quarantine_purged) = (events_purged.clone(), quarantine_purged.clone());
        async move {
            let mut tick = tokio::time::interval(PURGE_EVERY);
            loop {
                tick.tick().await;
                let now = handoff_store::sqlite::now_ms();
                match purge_once(journal.as_ref(), &retention, now).await {
                    Ok((events, messages)) => {
                        events_purged.inc_by(events);
                        quarantine_purged.inc_by(messages);
                        if events + messages > 0 {
                            tracing::info!(
                                events,
                                quarantined = messages,
                                "retention: deleted what every destination has passed and is past retention"
                            );
                        }
                    }
                    Err(StoreError::Closed) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "retention pass failed; tried again next hour")
                    }
                }
            }
        }
    })
}
