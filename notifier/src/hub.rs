//! The fan-out hub: earner id → a bounded broadcast channel of ready-to-send frames.
//! Each event is serialised once, whatever the number of subscribers; a subscriber that falls
//! more than the channel's capacity behind gets `Lagged` and is closed by its connection task.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use upline_common::events::EarningEvent;
use upline_common::UserId;

/// One earning event, serialised once for every protocol.
#[derive(Debug)]
pub struct Frame {
    pub earner_id: UserId,
    pub seq: i64,
    pub earning_id: i64,
    /// The event of SPEC §4 as JSON (the SSE `data:`).
    pub event_json: String,
    /// `{"type":"earning","earning":…}` (the WebSocket text frame).
    pub ws_text: String,
}

impl Frame {
    /// Builds a frame from an event.
    pub fn new(event: &EarningEvent) -> Self {
        let event_json = serde_json::to_string(event).expect("an EarningEvent always serialises");
        Self::from_json(event.earner_id, event.seq, event.earning_id, event_json)
    }

    /// Builds a frame around an event's JSON text that is already known to be valid.
    pub fn from_json(earner_id: UserId, seq: i64, earning_id: i64, event_json: String) -> Self {
        let ws_text = format!(r#"{{"type":"earning","earning":{event_json}}}"#);
        Frame {
            earner_id,
            seq,
            earning_id,
            event_json,
            ws_text,
        }
    }
}

/// What flows to subscribers.
#[derive(Debug, Clone)]
pub enum Signal {
    Earning(Arc<Frame>),
    /// The notifier's broker connection was re-established: events may have been missed,
    /// so every subscription catches up from PostgreSQL.
    Resync,
    /// The user's tokens may have been revoked (or the revocation feed was interrupted):
    /// each subscription opened with a user token checks it again, and ends if it no longer
    /// holds.
    TokensChanged,
}

/// Subscriptions by earner, plus the admin feed of everything.
pub struct Hub {
    capacity: usize,
    users: Mutex<HashMap<UserId, broadcast::Sender<Signal>>>,
    all: broadcast::Sender<Signal>,
}

impl Hub {
    /// `capacity` = frames buffered per subscription before it lags.
    pub fn new(capacity: usize) -> Self {
        let (all, _) = broadcast::channel(capacity);
        Hub {
            capacity,
            users: Mutex::new(HashMap::new()),
            all,
        }
    }

    /// Subscribes to one earner's events.
    pub fn subscribe(&self, user_id: UserId) -> broadcast::Receiver<Signal> {
        let mut users = self
            .users
            .lock()
            .expect("hub lock is never poisoned: no panics while held");
        users
            .entry(user_id)
            .or_insert_with(|| broadcast::channel(self.capacity).0)
            .subscribe()
    }

    /// Subscribes to every earner's events (admin).
    pub fn subscribe_all(&self) -> broadcast::Receiver<Signal> {
        self.all.subscribe()
    }

    /// Delivers a frame to its earner's subscribers and the admin feed.
    pub fn publish(&self, frame: Frame) {
        let frame = Arc::new(frame);
        {
            let mut users = self
                .users
                .lock()
                .expect("hub lock is never poisoned: no panics while held");
            if let Some(tx) = users.get(&frame.earner_id) {
                if tx.send(Signal::Earning(frame.clone())).is_err() {
                    // Nobody listens any more.
                    users.remove(&frame.earner_id);
                }
            }
        }
        let _ = self.all.send(Signal::Earning(frame));
        metrics::counter!("upline_notifier_events_total").increment(1);
    }

    /// Tells every subscription to catch up from the database.
    pub fn resync(&self) {
        let mut users = self
            .users
            .lock()
            .expect("hub lock is never poisoned: no panics while held");
        users.retain(|_, tx| tx.send(Signal::Resync).is_ok());
        let _ = self.all.send(Signal::Resync);
    }

    /// Tells `user_id`'s subscriptions that its tokens may have been revoked.
    pub fn tokens_changed(&self, user_id: UserId) {
        let mut users = self
            .users
            .lock()
            .expect("hub lock is never poisoned: no panics while held");
        if let Some(tx) = users.get(&user_id) {
            if tx.send(Signal::TokensChanged).is_err() {
                users.remove(&user_id);
            }
        }
    }

    /// Tells every subscription to check its token again (revocations may have been missed).
    pub fn all_tokens_changed(&self) {
        let mut users = self
            .users
            .lock()
            .expect("hub lock is never poisoned: no panics while held");
        users.retain(|_, tx| tx.send(Signal::TokensChanged).is_ok());
    }

    /// Earners with at least one subscription.
    pub fn subscribed_users(&self) -> usize {
        self.users
            .lock()
            .expect("hub lock is never poisoned: no panics while held")
            .len()
    }
}
