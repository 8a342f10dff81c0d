//! The fan-out hub: earner id → a bounded broadcast channel of ready-to-send frames.
//! Each event is serialised once, whatever the number of subscribers; a subscriber that falls
//! more than the channel's capacity behind gets `Lagged` (a user's feed then reads what it
//! missed from PostgreSQL; the admin feed of everything is closed). An earner's entry lives
//! while it has subscribers: the last [`Subscription`] to go removes it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::value::RawValue;
use tokio::sync::broadcast::{
    self,
    error::{RecvError, TryRecvError},
};
use upline_common::events::EarningEvent;
use upline_common::protocol;
use upline_common::UserId;

/// One earning event, serialised once for every protocol.
#[derive(Debug)]
pub struct Frame {
    pub earner_id: UserId,
    pub seq: i64,
    pub earning_id: i64,
    /// The event of SPEC §4 as JSON (the SSE `data:`).
    pub event_json: String,
    /// [`protocol::ServerMessage::Earning`] as text, `{"type":"earning","earning":…}` (the
    /// WebSocket text frame).
    pub ws_text: String,
}

impl Frame {
    /// Builds a frame from an event.
    pub fn new(event: &EarningEvent) -> Self {
        let event_json =
            serde_json::value::to_raw_value(event).expect("an EarningEvent always serialises");
        Self::from_json(event.earner_id, event.seq, event.earning_id, event_json)
    }

    /// Builds a frame around an event's JSON (as it came from the broker, not re-serialised).
    pub fn from_json(
        earner_id: UserId,
        seq: i64,
        earning_id: i64,
        event_json: Box<RawValue>,
    ) -> Self {
        let ws_text = protocol::earning_text(&event_json);
        Frame {
            earner_id,
            seq,
            earning_id,
            event_json: String::from(Box::<str>::from(event_json)),
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
    /// Frames per earner's channel (`notifier.user_buffer`).
    user_capacity: usize,
    users: Mutex<HashMap<UserId, broadcast::Sender<Signal>>>,
    all: broadcast::Sender<Signal>,
}

/// One subscription to the hub: a bounded receiver of [`Signal`]s. Dropping the last
/// subscription of an earner removes the earner's entry from the hub.
pub struct Subscription {
    rx: broadcast::Receiver<Signal>,
    /// The hub and earner to clean up after (`None` for the admin feed).
    owner: Option<(Arc<Hub>, UserId)>,
}

impl Subscription {
    /// The next signal. Cancel-safe.
    ///
    /// # Errors
    /// [`RecvError::Lagged`] when more than the hub's capacity arrived unread (the oldest were
    /// dropped), [`RecvError::Closed`] when the channel is gone.
    pub async fn recv(&mut self) -> Result<Signal, RecvError> {
        self.rx.recv().await
    }

    /// The next signal if one is waiting.
    ///
    /// # Errors
    /// As [`broadcast::Receiver::try_recv`]: `Empty`, `Lagged` or `Closed`.
    pub fn try_recv(&mut self) -> Result<Signal, TryRecvError> {
        self.rx.try_recv()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some((hub, user_id)) = &self.owner else {
            return;
        };
        // Under the hub lock, so that no subscription can join this channel between the count
        // and the removal: the receiver still held here is the last one.
        let mut users = hub.lock_users();
        if users
            .get(user_id)
            .is_some_and(|tx| tx.receiver_count() <= 1 && self.rx.same_channel(&tx.subscribe()))
        {
            users.remove(user_id);
        }
        set_users_gauge(users.len());
    }
}

impl Hub {
    /// `user_capacity`: frames buffered in each earner's channel before its subscriptions lag
    /// (`notifier.user_buffer`); a tokio broadcast channel allocates its slots up front, so
    /// this is the hub's memory per subscribed earner. `all_capacity`: the same for the admin
    /// feed of every earner (`notifier.buffer`). Both at least 1.
    pub fn new(user_capacity: usize, all_capacity: usize) -> Self {
        let (all, _) = broadcast::channel(all_capacity);
        Hub {
            user_capacity,
            users: Mutex::new(HashMap::new()),
            all,
        }
    }

    /// The earners map. Never held across an `.await`; a panic while held cannot leave it
    /// inconsistent (every update is one map operation), so a poisoned lock is used as is.
    fn lock_users(&self) -> MutexGuard<'_, HashMap<UserId, broadcast::Sender<Signal>>> {
        self.users.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribes to one earner's events; the entry goes when the last subscription is dropped.
    pub fn subscribe(self: &Arc<Self>, user_id: UserId) -> Subscription {
        let mut users = self.lock_users();
        let rx = users
            .entry(user_id)
            .or_insert_with(|| broadcast::channel(self.user_capacity).0)
            .subscribe();
        set_users_gauge(users.len());
        Subscription {
            rx,
            owner: Some((self.clone(), user_id)),
        }
    }

    /// Subscribes to every earner's events (admin).
    pub fn subscribe_all(&self) -> Subscription {
        Subscription {
            rx: self.all.subscribe(),
            owner: None,
        }
    }

    /// Delivers a frame to its earner's subscribers and the admin feed.
    pub fn publish(&self, frame: Frame) {
        let frame = Arc::new(frame);
        {
            let mut users = self.lock_users();
            if let Some(tx) = users.get(&frame.earner_id) {
                if tx.send(Signal::Earning(frame.clone())).is_err() {
                    // Nobody listens any more.
                    users.remove(&frame.earner_id);
                    set_users_gauge(users.len());
                }
            }
        }
        let _ = self.all.send(Signal::Earning(frame));
        metrics::counter!("upline_notifier_events_total").increment(1);
    }

    /// Tells every subscription to catch up from the database.
    pub fn resync(&self) {
        let mut users = self.lock_users();
        users.retain(|_, tx| tx.send(Signal::Resync).is_ok());
        set_users_gauge(users.len());
        let _ = self.all.send(Signal::Resync);
    }

    /// Tells `user_id`'s subscriptions that its tokens may have been revoked.
    pub fn tokens_changed(&self, user_id: UserId) {
        let mut users = self.lock_users();
        if let Some(tx) = users.get(&user_id) {
            if tx.send(Signal::TokensChanged).is_err() {
                users.remove(&user_id);
                set_users_gauge(users.len());
            }
        }
    }

    /// Tells every subscription to check its token again (revocations may have been missed).
    pub fn all_tokens_changed(&self) {
        let mut users = self.lock_users();
        users.retain(|_, tx| tx.send(Signal::TokensChanged).is_ok());
        set_users_gauge(users.len());
    }

    /// Earners with at least one subscription (the hub's entries).
    pub fn subscribed_users(&self) -> usize {
        self.lock_users().len()
    }
}

/// `upline_notifier_hub_users`: earners with an entry in the hub (with several notifiers in one
/// process, as in the tests, the last one to change sets it).
fn set_users_gauge(n: usize) {
    metrics::gauge!("upline_notifier_hub_users").set(n as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: i64) -> UserId {
        UserId::new(id).expect("positive")
    }

    #[tokio::test]
    async fn an_earners_entry_goes_with_its_last_subscription() {
        let hub = Arc::new(Hub::new(8, 8));
        let first = hub.subscribe(user(7));
        let second = hub.subscribe(user(7));
        let other = hub.subscribe(user(8));
        let admin = hub.subscribe_all();
        assert_eq!(hub.subscribed_users(), 2);
        drop(first);
        assert_eq!(hub.subscribed_users(), 2, "7 still has a subscriber");
        drop(second);
        assert_eq!(hub.subscribed_users(), 1, "7's entry is gone");
        drop(admin);
        assert_eq!(hub.subscribed_users(), 1);
        let again = hub.subscribe(user(7));
        assert_eq!(hub.subscribed_users(), 2);
        drop(other);
        drop(again);
        assert_eq!(hub.subscribed_users(), 0);
    }

    #[tokio::test]
    async fn a_subscription_after_the_entry_went_gets_new_events() {
        let hub = Arc::new(Hub::new(8, 8));
        drop(hub.subscribe(user(7)));
        let mut sub = hub.subscribe(user(7));
        let event = RawValue::from_string("{}".to_owned()).expect("JSON");
        hub.publish(Frame::from_json(user(7), 1, 1, event));
        match sub.try_recv() {
            Ok(Signal::Earning(frame)) => assert_eq!(frame.seq, 1),
            other => panic!("expected the earning, got {other:?}"),
        }
    }
}
