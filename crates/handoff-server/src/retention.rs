//! Retention: refused messages leave the quarantine after `[server] quarantine_retention_days`.

use std::sync::Arc;
use std::time::Duration;

use handoff_store::Journal;

use crate::metrics::Metrics;

/// How often the quarantine is purged. Retention is counted in days, so an hour's lag is noise;
/// each pass deletes in chunks through the journal's writer, between ingest's commits.
pub const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Starts the supervised task that purges the quarantine now and every [`PURGE_EVERY`].
pub fn start(
    journal: Arc<dyn Journal>,
    retention: Duration,
    metrics: &Metrics,
) -> tokio::task::JoinHandle<()> {
    let purged = metrics.quarantine_purged.clone();
    crate::supervisor::supervise(
        "quarantine-retention",
        metrics.task_restarts.clone(),
        move || {
            let journal = journal.clone();
            let purged = purged.clone();
            async move {
                let mut tick = tokio::time::interval(PURGE_EVERY);
                loop {
                    tick.tick().await;
                    let before_ms = handoff_store::sqlite::now_ms() - retention.as_millis() as i64;
                    match journal.purge_quarantine(before_ms).await {
                        Ok(0) => {}
                        Ok(n) => {
                            purged.inc_by(n);
                            tracing::info!(
                                messages = n,
                                "quarantine: purged messages past retention"
                            );
                        }
                        Err(handoff_store::StoreError::Closed) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "quarantine purge failed; tried again next hour")
                        }
                    }
                }
            }
        },
    )
}
