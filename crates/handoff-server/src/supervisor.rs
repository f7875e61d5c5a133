//! Long-running tasks that survive their own panics: a panic is logged, counted
//! (`handoff_task_restarts_total{task}`) and the task started again after a pause, instead of
//! silently ending the work it did.

use std::future::Future;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::TaskLabel;

/// Pause before a panicked task is started again, so a task that panics at once does not spin.
pub const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Runs `task()` until it returns; if it panics, logs and counts it and runs a fresh one.
pub fn supervise<F, Fut>(
    name: &'static str,
    restarts: Family<TaskLabel, Counter>,
    mut task: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let run = tokio::spawn(task());
            // Aborting the supervisor aborts the run it watches.
            let _abort = AbortOnDrop(run.abort_handle());
            match run.await {
                Ok(()) => return,
                Err(e) if e.is_cancelled() => return,
                Err(e) => {
                    tracing::error!(task = name, error = %e, "task panicked; restarting it");
                    restarts.get_or_create(&TaskLabel { task: name }).inc();
                    tokio::time::sleep(RESTART_PAUSE).await;
                }
            }
        }
    })
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_and_counted() {
        let restarts = Family::<TaskLabel, Counter>::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let handle = supervise("test", restarts.clone(), move || {
            let runs = counted.clone();
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
            }
        });
        handle.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(restarts.get_or_create(&TaskLabel { task: "test" }).get(), 2);
    }
}
