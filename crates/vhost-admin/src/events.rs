//! Live events: configuration changes, health transitions and rollout decisions, served as
//! Server-Sent Events at `GET /api/v1/events`.
//!
//! Where it sits: beside the admin API's state. Producers (the history after each accepted
//! change, the server's health-transition and rollout tasks) call [`Events::publish`], which
//! appends to a bounded buffer (the last [`BUFFER`] events) and bumps a watch channel; it never
//! waits on a consumer. Each stream follows the watch channel and sends the buffered events it
//! has not sent yet, in id order; `Last-Event-ID` resumes after that id while it is still
//! buffered. A consumer that falls more than the buffer behind is dropped (its stream ends
//! with an `overflow` event) — a slow client never holds the proxy back.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use serde::Serialize;
use tokio::sync::watch;

/// Events kept for `Last-Event-ID` resumption.
pub const BUFFER: usize = 1024;

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Increases by one per event, from 1 in each process.
    pub id: u64,
    /// `config`, `health`, `rollout`.
    pub kind: &'static str,
    /// What happened (JSON object).
    pub data: serde_json::Value,
}

/// The event bus (see the module docs).
#[derive(Debug)]
pub struct Events {
    buffer: ArcSwap<VecDeque<Arc<Event>>>,
    latest: watch::Sender<u64>,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            buffer: ArcSwap::default(),
            latest: watch::Sender::new(0),
        }
    }
}

impl Events {
    /// Appends an event of `kind` and wakes the streams; returns its id.
    pub fn publish(&self, kind: &'static str, data: serde_json::Value) -> u64 {
        let mut id = 0;
        self.buffer.rcu(|buffer| {
            let mut next = VecDeque::clone(buffer);
            id = next.back().map_or(1, |e| e.id + 1);
            next.push_back(Arc::new(Event {
                id,
                kind,
                data: data.clone(),
            }));
            while next.len() > BUFFER {
                next.pop_front();
            }
            next
        });
        self.latest.send_if_modified(|latest| {
            let newer = id > *latest;
            if newer {
                *latest = id;
            }
            newer
        });
        id
    }

    /// Buffered events after `after`, in order; `None` if some were already dropped from the
    /// buffer (the reader fell too far behind).
    pub fn since(&self, after: u64) -> Option<Vec<Arc<Event>>> {
        let buffer = self.buffer.load();
        if let Some(first) = buffer.front() {
            if first.id > after + 1 {
                return None;
            }
        }
        Some(buffer.iter().filter(|e| e.id > after).cloned().collect())
    }

    /// A receiver woken at each new event (its value: the newest id).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// The newest id (0 before any event).
    pub fn latest(&self) -> u64 {
        *self.latest.borrow()
    }

    /// An SSE response: events after `after` (`None`: only new ones), then live ones.
    pub fn stream(
        self: &Arc<Self>,
        after: Option<u64>,
    ) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
        struct Reader {
            events: Arc<Events>,
            watch: watch::Receiver<u64>,
            sent: u64,
            pending: VecDeque<Arc<Event>>,
            done: bool,
        }
        let reader = Reader {
            events: Arc::clone(self),
            watch: self.latest.subscribe(),
            sent: after.unwrap_or_else(|| self.latest()),
            pending: VecDeque::new(),
            done: false,
        };
        let stream = futures_util::stream::unfold(reader, |mut r| async move {
            loop {
                if r.done {
                    return None;
                }
                if let Some(event) = r.pending.pop_front() {
                    r.sent = event.id;
                    let sse = SseEvent::default()
                        .id(event.id.to_string())
                        .event(event.kind)
                        .json_data(&event.data)
                        .unwrap_or_else(|_| SseEvent::default().comment("unencodable event"));
                    return Some((Ok(sse), r));
                }
                match r.events.since(r.sent) {
                    Some(new) if !new.is_empty() => r.pending.extend(new),
                    Some(_) => {
                        if r.watch.changed().await.is_err() {
                            return None;
                        }
                    }
                    None => {
                        r.done = true;
                        let overflow = SseEvent::default().event("overflow").data(
                            "this client fell too far behind; reconnect without Last-Event-ID",
                        );
                        return Some((Ok(overflow), r));
                    }
                }
            }
        });
        Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_is_bounded_and_ordered() {
        let events = Events::default();
        for i in 0..BUFFER + 10 {
            assert_eq!(
                events.publish("config", serde_json::json!({ "n": i })),
                i as u64 + 1
            );
        }
        assert_eq!(events.latest(), BUFFER as u64 + 10);
        assert!(events.since(0).is_none(), "the first ten are gone");
        let tail = events.since(BUFFER as u64 + 5).unwrap();
        assert_eq!(
            tail.iter().map(|e| e.id).collect::<Vec<_>>(),
            (BUFFER as u64 + 6..=BUFFER as u64 + 10).collect::<Vec<_>>()
        );
        assert_eq!(events.since(10).unwrap().len(), BUFFER);
    }
}
