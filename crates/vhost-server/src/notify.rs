//! Rollout notifications: each `rollout` event (step, abort, promotion) is `POST`ed as JSON to
//! `[notifications] webhook_url`, in order, retried with exponential backoff.
//!
//! Where it sits: a task on the admin runtime, reading the admin API's event bus
//! ([`vhost_admin::events::Events`]) as any stream client would. Nothing waits for it: if the
//! receiver is down for long, events beyond the bus's buffer are skipped (logged and counted).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vhost_admin::events::Events;

/// Delivery attempts per event.
const ATTEMPTS: u32 = 6;
/// First retry delay; doubled after each failure (1, 2, 4, 8, 16 s).
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Time limit of one delivery attempt.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Runs until `stop`.
pub(crate) async fn run(events: Arc<Events>, url: String, mut stop: watch::Receiver<bool>) {
    let client = match reqwest::Client::builder().timeout(TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "notifications: cannot build an HTTP client; webhook disabled");
            return;
        }
    };
    let mut wake = events.subscribe();
    let mut sent = events.latest();
    loop {
        let batch = match events.since(sent) {
            Some(batch) => batch,
            None => {
                let latest = events.latest();
                tracing::warn!(
                    skipped_after = sent,
                    resumed_at = latest,
                    "notifications: the webhook fell too far behind; older events skipped"
                );
                metrics::counter!("notifications_failed_total").increment(1);
                sent = latest;
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                changed = wake.changed() => if changed.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            continue;
        }
        for event in batch {
            sent = event.id;
            if event.kind != "rollout" {
                continue;
            }
            let body =
                serde_json::json!({ "id": event.id, "event": event.kind, "data": event.data });
            let mut backoff = FIRST_BACKOFF;
            for attempt in 1..=ATTEMPTS {
                let result = client
                    .post(&url)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(body.to_string())
                    .send()
                    .await;
                match result {
                    Ok(r) if r.status().is_success() => {
                        metrics::counter!("notifications_sent_total").increment(1);
                        break;
                    }
                    outcome => {
                        let error = match outcome {
                            Ok(r) => format!("status {}", r.status()),
                            Err(e) => e.to_string(),
                        };
                        if attempt == ATTEMPTS {
                            metrics::counter!("notifications_failed_total").increment(1);
                            tracing::warn!(id = event.id, error, "notifications: webhook gave up");
                            break;
                        }
                        tracing::debug!(id = event.id, attempt, error, "notifications: retrying");
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            _ = stop.wait_for(|s| *s) => return,
                        }
                        backoff *= 2;
                    }
                }
            }
        }
    }
}

/// Registers the descriptions of the notification counters.
pub(crate) fn describe() {
    metrics::describe_counter!(
        "notifications_sent_total",
        "Rollout events delivered to the webhook"
    );
    metrics::describe_counter!(
        "notifications_failed_total",
        "Rollout events the webhook never accepted (after every retry, or skipped when it fell too far behind)"
    );
}
