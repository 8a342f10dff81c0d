//! A subscription's stream of earnings, shared by WebSocket and SSE: replay from PostgreSQL
//! after `since`, then live frames from the hub, with no gap and no duplicate at the seam.
//!
//! The hub subscription is taken *before* the replay query, so an earning committed during
//! the replay is either in the replay or in the buffer; frames with `seq` at or below the last
//! one sent are dropped, and a frame that jumps ahead (events of one earner can be published
//! out of order by several workers' relays) first fills the gap from the database.

use std::collections::VecDeque;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::broadcast::{self, error::RecvError};
use upline_common::auth::UserToken;
use upline_common::UserId;

use crate::hub::{Frame, Hub, Signal};

/// Earnings read from the database per query during replay and catch-up.
const PAGE: i64 = 500;

/// Whose earnings a subscription follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    User(UserId),
    /// Every earner (admin only); live, without replay.
    All,
}

/// Why a feed ended.
#[derive(Debug, thiserror::Error)]
pub enum FeedEnd {
    /// The client fell too far behind; it should resume with `since = last_seq`.
    #[error("too slow to keep up; resume with since={last_seq}")]
    Lagged { last_seq: i64 },
    #[error("the notifier is shutting down")]
    Closed,
    /// The user's tokens were revoked, or the user deactivated or erased.
    #[error("the token was revoked; sign in again")]
    Revoked,
    /// The token the feed was opened with has expired.
    #[error("the token has expired; renew it and resume with since")]
    Expired,
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// A live subscription.
pub struct Feed {
    target: Target,
    rx: broadcast::Receiver<Signal>,
    db: PgPool,
    /// The last `seq` taken from the database or the hub (user feeds).
    last_seq: i64,
    /// Frames read but not yet handed out: keeps [`Feed::next`] cancel-safe.
    pending: VecDeque<Arc<Frame>>,
    /// The user token the feed was opened with (none for the admin key): it ends the feed
    /// when it expires or is revoked.
    token: Option<UserToken>,
    /// A [`Signal::TokensChanged`] arrived and the token is still to be checked (a flag, so
    /// that a cancelled [`Feed::next`] checks on its next call).
    token_check_due: bool,
}

impl Feed {
    /// Subscribes. With `since`, [`Feed::next`] first yields every earning after it (the
    /// replay); without, the feed starts from now.
    ///
    /// # Errors
    /// Database errors.
    pub async fn open(
        hub: &Hub,
        db: PgPool,
        target: Target,
        since: Option<i64>,
        token: Option<UserToken>,
    ) -> Result<Feed, FeedEnd> {
        let rx = match target {
            Target::User(id) => hub.subscribe(id),
            Target::All => hub.subscribe_all(),
        };
        let mut feed = Feed {
            target,
            rx,
            db,
            last_seq: 0,
            pending: VecDeque::new(),
            token,
            token_check_due: false,
        };
        match (target, since) {
            (Target::User(id), Some(since)) => {
                feed.last_seq = since.max(0);
                feed.catch_up(id, None).await?;
            }
            (Target::User(id), None) => {
                feed.last_seq = upline_common::db::latest_seq(&feed.db, id)
                    .await?
                    .unwrap_or(0);
            }
            (Target::All, _) => {}
        }
        Ok(feed)
    }

    /// The last `seq` delivered.
    pub fn last_seq(&self) -> i64 {
        self.last_seq
    }

    /// Queues earnings from the database after `last_seq` (up to `until` inclusive, if given).
    async fn catch_up(&mut self, user_id: UserId, until: Option<i64>) -> Result<(), FeedEnd> {
        loop {
            let page =
                upline_common::db::earnings_after(&self.db, user_id, self.last_seq, PAGE).await?;
            let full = page.len() as i64 == PAGE;
            for event in page {
                if until.is_some_and(|u| event.seq > u) {
                    return Ok(());
                }
                self.last_seq = event.seq;
                self.pending.push_back(Arc::new(Frame::new(&event)));
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Waits for the next frame to send, in `seq` order. Cancel-safe: a frame read from the
    /// database or the hub is kept until it is handed out.
    ///
    /// # Errors
    /// [`FeedEnd`] when the subscription lagged, the hub closed, or the database failed.
    pub async fn next(&mut self) -> Result<Arc<Frame>, FeedEnd> {
        loop {
            if self.token_check_due {
                if let Some(token) = &self.token {
                    if !upline_common::auth::token_is_current(&self.db, token).await? {
                        return Err(FeedEnd::Revoked);
                    }
                }
                self.token_check_due = false;
            }
            if let Some(frame) = self.pending.pop_front() {
                return Ok(frame);
            }
            let expiry = expiry_sleep(self.token.as_ref());
            let received = tokio::select! {
                () = expiry => return Err(FeedEnd::Expired),
                received = self.rx.recv() => received,
            };
            let signal = match received {
                Ok(s) => s,
                Err(RecvError::Lagged(_)) => {
                    return Err(FeedEnd::Lagged {
                        last_seq: self.last_seq,
                    })
                }
                Err(RecvError::Closed) => return Err(FeedEnd::Closed),
            };
            match (self.target, signal) {
                (_, Signal::TokensChanged) => self.token_check_due = self.token.is_some(),
                (Target::All, Signal::Earning(frame)) => return Ok(frame),
                (Target::All, Signal::Resync) => {}
                (Target::User(id), Signal::Resync) => self.catch_up(id, None).await?,
                (Target::User(id), Signal::Earning(frame)) => {
                    if frame.seq <= self.last_seq {
                        continue; // already sent (replay, or an event published twice)
                    }
                    if frame.seq == self.last_seq + 1 {
                        self.last_seq = frame.seq;
                        return Ok(frame);
                    }
                    // A gap: the missing earnings are committed; read them (and this one) first.
                    self.catch_up(id, Some(frame.seq)).await?;
                }
            }
        }
    }
}

/// Sleeps until the token expires; forever for feeds opened with the admin key.
async fn expiry_sleep(token: Option<&UserToken>) {
    match token {
        None => std::future::pending().await,
        Some(token) => {
            let left = token.expires_at - time::OffsetDateTime::now_utc();
            let left = std::time::Duration::try_from(left).unwrap_or_default();
            tokio::time::sleep(left).await;
        }
    }
}
