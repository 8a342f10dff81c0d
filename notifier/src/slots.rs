//! Connection caps (README "Live updates"): open WebSocket and SSE connections counted
//! together, in all (`notifier.max_connections`, always enforced), per client address
//! (`notifier.max_connections_per_address`) and per user (`notifier.max_connections_per_user`);
//! the last two are abuse limits, off with `limits.enabled = false`.
//!
//! A connection holds a [`ConnectionSlot`] from its first byte (so that sockets which never
//! subscribe count too) and, once authorized for one user's feed, a [`UserSlot`]. Both are
//! guards: every way a connection ends drops them, and dropping releases the slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use upline_common::protocol::{CloseCode, ErrorCode};
use upline_common::UserId;

/// How long a refused client is told to wait (`Retry-After`): a slot frees only when another
/// connection ends, which nothing predicts; this keeps retries slow without stranding clients.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// The caps of one notifier; `None` is no cap.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub total: usize,
    pub per_address: Option<usize>,
    pub per_user: Option<usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapExceeded {
    /// The user already has `notifier.max_connections_per_user` subscriptions open.
    #[error("this user has too many open streams ({0}); close one (another tab?) first")]
    User(usize),
    /// The client address already has `notifier.max_connections_per_address` connections.
    #[error("too many open connections from this address ({0})")]
    Address(usize),
    /// The notifier has `notifier.max_connections` connections: try again later, or another
    /// notifier.
    #[error("the notifier is at its connection limit; try again later")]
    Full,
}

impl CapExceeded {
    /// The stable machine code clients see.
    pub fn code(&self) -> ErrorCode {
        match self {
            CapExceeded::User(_) => ErrorCode::TooManyConnectionsForUser,
            CapExceeded::Address(_) => ErrorCode::TooManyConnectionsFromAddress,
            CapExceeded::Full => ErrorCode::NotifierFull,
        }
    }

    /// The WebSocket close code of the refusal.
    pub fn close_code(&self) -> CloseCode {
        match self {
            CapExceeded::User(_) => CloseCode::TooManyForUser,
            CapExceeded::Address(_) => CloseCode::TooManyFromAddress,
            CapExceeded::Full => CloseCode::TryAgainLater,
        }
    }

    /// The metric label of the refusal.
    fn reason(&self) -> &'static str {
        match self {
            CapExceeded::User(_) => "user",
            CapExceeded::Address(_) => "address",
            CapExceeded::Full => "total",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
    per_user: HashMap<UserId, usize>,
}

struct Inner {
    caps: Caps,
    /// Never held across an `.await`.
    counts: Mutex<Counts>,
}

impl Inner {
    /// Every update is a few integer operations that cannot panic half-way, so a poisoned
    /// lock is used as is.
    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The connection counts of one notifier, shared by its handlers. Cheap to clone.
#[derive(Clone)]
pub struct Slots {
    inner: Arc<Inner>,
}

impl Slots {
    pub fn new(caps: Caps) -> Self {
        Slots {
            inner: Arc::new(Inner {
                caps,
                counts: Mutex::new(Counts::default()),
            }),
        }
    }

    /// Takes a connection slot for a client at `ip` (`None`: unknown, not capped per address).
    ///
    /// # Errors
    /// [`CapExceeded::Full`] or [`CapExceeded::Address`].
    pub fn connect(&self, ip: Option<IpAddr>) -> Result<ConnectionSlot, CapExceeded> {
        let caps = self.inner.caps;
        let mut counts = self.inner.lock();
        let refused = if counts.total >= caps.total {
            Some(CapExceeded::Full)
        } else {
            match (ip, caps.per_address) {
                (Some(ip), Some(cap))
                    if counts.per_address.get(&ip).copied().unwrap_or(0) >= cap =>
                {
                    Some(CapExceeded::Address(cap))
                }
                _ => None,
            }
        };
        if let Some(refused) = refused {
            drop(counts);
            metrics::counter!("upline_notifier_refused_total", "reason" => refused.reason())
                .increment(1);
            return Err(refused);
        }
        counts.total += 1;
        // Only counted when capped: the map stays empty with abuse limits off.
        let address = ip.filter(|_| caps.per_address.is_some());
        if let Some(ip) = address {
            *counts.per_address.entry(ip).or_default() += 1;
        }
        metrics::gauge!("upline_notifier_open_connections").set(counts.total as f64);
        Ok(ConnectionSlot {
            slots: self.inner.clone(),
            address,
        })
    }

    /// Takes one of `user_id`'s subscription slots.
    ///
    /// # Errors
    /// [`CapExceeded::User`].
    pub fn subscribe(&self, user_id: UserId) -> Result<UserSlot, CapExceeded> {
        let Some(cap) = self.inner.caps.per_user else {
            return Ok(UserSlot {
                slots: self.inner.clone(),
                user_id: None,
            });
        };
        let mut counts = self.inner.lock();
        let n = counts.per_user.entry(user_id).or_default();
        if *n >= cap {
            drop(counts);
            let refused = CapExceeded::User(cap);
            metrics::counter!("upline_notifier_refused_total", "reason" => refused.reason())
                .increment(1);
            return Err(refused);
        }
        *n += 1;
        Ok(UserSlot {
            slots: self.inner.clone(),
            user_id: Some(user_id),
        })
    }

    /// Open connections (for tests and metrics).
    pub fn open(&self) -> usize {
        self.inner.lock().total
    }
}

/// A connection's place in the total and per-address counts; released on drop.
pub struct ConnectionSlot {
    slots: Arc<Inner>,
    address: Option<IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.slots.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(ip) = self.address {
            release(&mut counts.per_address, ip);
        }
        metrics::gauge!("upline_notifier_open_connections").set(counts.total as f64);
    }
}

/// A subscription's place in its user's count; released on drop.
pub struct UserSlot {
    slots: Arc<Inner>,
    /// `None` when users are not capped.
    user_id: Option<UserId>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        if let Some(user_id) = self.user_id {
            release(&mut self.slots.lock().per_user, user_id);
        }
    }
}

/// Decrements `key`'s count, forgetting it at zero (so the maps hold only open connections).
fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let Some(n) = map.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: i64) -> UserId {
        UserId::new(id).expect("positive")
    }

    fn slots(total: usize, per_address: Option<usize>, per_user: Option<usize>) -> Slots {
        Slots::new(Caps {
            total,
            per_address,
            per_user,
        })
    }

    #[test]
    fn the_total_cap_refuses_until_a_slot_is_released() {
        let s = slots(2, None, None);
        let a = s.connect(None).expect("first");
        let _b = s.connect(None).expect("second");
        assert_eq!(s.connect(None).err(), Some(CapExceeded::Full));
        drop(a);
        assert!(s.connect(None).is_ok());
        assert_eq!(s.open(), 1, "the temporary slot was released too");
    }

    #[test]
    fn addresses_and_users_are_capped_separately_and_forgotten_at_zero() {
        let s = slots(100, Some(2), Some(1));
        let one = Some(IpAddr::from([10, 0, 0, 1]));
        let two = Some(IpAddr::from([10, 0, 0, 2]));
        let a = s.connect(one).expect("first");
        let b = s.connect(one).expect("second");
        assert_eq!(s.connect(one).err(), Some(CapExceeded::Address(2)));
        assert!(s.connect(two).is_ok(), "another address is unaffected");
        let stream = s.subscribe(user(7)).expect("first stream");
        assert_eq!(s.subscribe(user(7)).err(), Some(CapExceeded::User(1)));
        assert!(s.subscribe(user(8)).is_ok());
        drop((a, b, stream));
        let counts = s.inner.lock();
        assert!(counts.per_address.is_empty() && counts.per_user.is_empty());
        assert_eq!(counts.total, 0);
    }

    #[test]
    fn without_abuse_caps_only_the_total_counts() {
        let s = slots(3, None, None);
        let ip = Some(IpAddr::from([10, 0, 0, 1]));
        let held: Vec<_> = (0..3)
            .map(|_| {
                (
                    s.connect(ip).expect("slot"),
                    s.subscribe(user(7)).expect("user"),
                )
            })
            .collect();
        assert_eq!(s.connect(ip).err(), Some(CapExceeded::Full));
        drop(held);
        assert!(s.inner.lock().per_address.is_empty());
    }
}
