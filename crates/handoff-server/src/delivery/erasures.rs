//! Sends the vendor calls of erasure requests, with retries, and keeps the DSR metrics.

use super::*;

/// How often due vendor erasure calls are looked for.
const ERASURE_POLL: Duration = Duration::from_secs(1);

/// Sends the vendor calls of erasure requests, with retries, and keeps the DSR metrics.
pub(super) async fn erasures(
    delivery: Arc<Delivery>,
    app: Arc<crate::AppState>,
    mut stop: watch::Receiver<bool>,
) {
    use handoff_connectors::erasure::{Erasure, ErasureTarget};
    use handoff_store::dsr;
    while !*stop.borrow() {
        let store = delivery.store.clone();
        let now = handoff_store::sqlite::now_ms();
        let due = blocking(move || {
            store.with_reader(|c| {
                Ok((
                    dsr::due(c, now, 16)?,
                    dsr::open_count(c)?,
                    dsr::overdue(c, now)?,
                ))
            })
        })
        .await;
        let due = match due {
            Ok((due, open, overdue)) => {
                app.metrics.delivery.dsr_open.set(open as i64);
                app.metrics.delivery.dsr_overdue.set(overdue as i64);
                due
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read data-subject requests; retrying");
                Vec::new()
            }
        };
        for (id, task) in due {
            let target: Option<ErasureTarget> = task
                .target
                .as_deref()
                .and_then(|t| serde_json::from_str(t).ok());
            // Ok: the vendor confirmed. Retry: try again later (not before `after`). Manual:
            // Handoff cannot do it; an operator must (the reason says what to do).
            enum Step {
                Done,
                Retry(String, Option<Duration>),
                Manual(String),
            }
            let step = match (delivery.lane(&task.destination), target) {
                (None, _) => Step::Manual(format!(
                    "{} is no longer configured: ask the vendor to erase the person by hand, then confirm",
                    task.destination
                )),
                (_, None) => Step::Manual(
                    "the request's target is unreadable; ask the vendor by hand, then confirm"
                        .into(),
                ),
                (Some(lane), Some(target)) => {
                    match lane
                        .connector
                        .erasure(&target, time::OffsetDateTime::now_utc())
                    {
                        Erasure::Calls(calls) => {
                            let mut step = Step::Done;
                            for call in calls {
                                match send_with(lane, call, true).await.0 {
                                    Classification::Delivered => {}
                                    Classification::Retry { why, after } => {
                                        step = Step::Retry(why, after);
                                        break;
                                    }
                                    Classification::Permanent { why }
                                    | Classification::Credentials { why } => {
                                        step = Step::Manual(format!(
                                            "the vendor refused the deletion call ({why}); fix the destination's settings and ask again, or erase by hand and confirm"
                                        ));
                                        break;
                                    }
                                }
                            }
                            step
                        }
                        Erasure::NothingHeld(why) | Erasure::Manual(why) => Step::Manual(why),
                    }
                }
            };
            let outcome: Result<(), (String, Option<Duration>, bool)> = match step {
                Step::Done => Ok(()),
                Step::Retry(why, after) => Err((why, after, false)),
                Step::Manual(why) => Err((why, None, true)),
            };
            let store = delivery.store.clone();
            let now = handoff_store::sqlite::now_ms();
            let recorded = match outcome {
                Ok(()) => {
                    tracing::info!(dsr = %id, destination = %task.destination, "vendor confirmed the erasure");
                    blocking(move || {
                        store.transact(|tx| {
                            // Not if the request was filed again meanwhile, naming more:
                            // the vendor is called again with the fuller target.
                            let entry = dsr::confirm_erasure(
                                tx,
                                &id,
                                &task.destination,
                                &task.vendor,
                                "the vendor accepted the deletion",
                                task.target.as_deref(),
                                now,
                            )?;
                            Ok(((), entry.into_iter().collect()))
                        })
                    })
                    .await
                }
                Err((why, _, true)) => {
                    // The reason may quote the vendor's answer, which may name the person: the
                    // task holds it; the log only says that an operator is needed.
                    tracing::warn!(dsr = %id, destination = %task.destination, "erasure needs an operator: see `handoff dsr status`");
                    blocking(move || {
                        store.with_conn(|c| {
                            dsr::task_manual(
                                c,
                                &id,
                                &task.destination,
                                &why,
                                task.target.as_deref(),
                            )
                        })
                    })
                    .await
                }
                Err((why, after, false)) => {
                    tracing::warn!(dsr = %id, destination = %task.destination, reason = %why, "erasure call failed; will retry");
                    app.metrics
                        .delivery
                        .dsr_call_failures
                        .get_or_create(&DeliveryMetrics::label(&task.destination))
                        .inc();
                    let wait = backoff(
                        &DeliverySettings {
                            retry_base: Duration::from_secs(1),
                            retry_max: Duration::from_secs(3600),
                            ..delivery.settings.clone()
                        },
                        task.attempts,
                    )
                    .max(Duration::from_millis(200))
                    .max(after.unwrap_or_default());
                    let next = now + wait.as_millis() as i64;
                    blocking(move || {
                        store.with_conn(|c| {
                            dsr::task_retry(
                                c,
                                &id,
                                &task.destination,
                                next,
                                &why,
                                task.target.as_deref(),
                            )
                        })
                    })
                    .await
                }
            };
            if let Err(e) = recorded {
                tracing::error!(error = %e, "cannot record an erasure call's outcome; it will be made again");
            }
        }
        pause(ERASURE_POLL, &mut stop, None).await;
    }
}
