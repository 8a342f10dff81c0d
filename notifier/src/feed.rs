//! A subscription's stream of earnings, shared by WebSocket and SSE: replay from PostgreSQL
//! after `since`, then live frames from the hub, with no gap and no duplicate at the seam.
//!
//! The hub subscription is taken *before* the first replay query, so an earning committed
//! during the replay is either in the replay or in the hub's buffer; frames with `seq` at or
//! below the last one read are dropped.
//!
//! **Memory is bounded whatever `since` is.** The replay reads one page
//! (`notifier.replay_page_size`) at a time, and the next page only once the client has been
//! handed the previous one. While replaying, the hub's (bounded) channel is drained at each
//! page and its earning frames dropped: they are committed before they are published, so the
//! replay reaches them. The replay ends with a page shorter than a full one: everything
//! committed when it was read has been read, and every later earning is published after that
//! query began, so it is still in the hub's channel.
//!
//! The same paged replay is how the feed recovers whenever the hub cannot be trusted to be
//! complete: a frame that jumps ahead (events of one earner can be published out of order by
//! several workers' relays), a broker reconnect ([`Signal::Resync`]), or a channel that lagged
//! (the client or the replay took longer than `notifier.user_buffer` frames): the feed goes back to
//! the database after the last `seq` it read instead of ending the client with `lagged`.

use std::collections::VecDeque;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use upline_common::auth::UserToken;
use upline_common::protocol::Target;
use upline_common::UserId;

use crate::hub::{Frame, Hub, Signal, Subscription};

/// Why a feed ended.
#[derive(Debug, thiserror::Error)]
pub enum FeedEnd {
    /// The client fell too far behind the admin feed of every earner (user feeds catch up
    /// from the database instead); it should reconnect.
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
    rx: Subscription,
    db: PgPool,
    /// Earnings read per replay query (at least 1).
    page_size: usize,
    /// The last `seq` read from the database or the hub (user feeds): the "replayed up to"
    /// cursor, after which the next replay page starts.
    read_seq: i64,
    /// The `seq` of the last frame handed out (user feeds).
    sent_seq: i64,
    /// Reading the database page by page (after `read_seq`) until a short page: on open with
    /// `since`, after a gap, a lag or a resync.
    replaying: bool,
    /// Frames read but not yet handed out, at most one page: keeps [`Feed::next`] cancel-safe.
    pending: VecDeque<Arc<Frame>>,
    /// The most frames `pending` ever held (what [`Feed::max_pending`] reports).
    max_pending: usize,
    /// The user token the feed was opened with (none for the admin key): it ends the feed
    /// when it expires or is revoked.
    token: Option<UserToken>,
    /// A [`Signal::TokensChanged`] arrived and the token is still to be checked (a flag, so
    /// that a cancelled [`Feed::next`] checks on its next call).
    token_check_due: bool,
}

impl Feed {
    /// Subscribes. With `since`, [`Feed::next`] first yields every earning after it (the
    /// replay, read `page_size` earnings at a time; 0 counts as 1); without, the feed starts
    /// from now.
    ///
    /// # Errors
    /// Database errors (reading the user's latest `seq`, or the first page of the replay).
    pub async fn open(
        hub: &Arc<Hub>,
        db: PgPool,
        target: Target,
        since: Option<i64>,
        token: Option<UserToken>,
        page_size: usize,
    ) -> Result<Feed, FeedEnd> {
        let rx = match target {
            Target::User(id) => hub.subscribe(id),
            Target::All => hub.subscribe_all(),
        };
        let mut feed = Feed {
            target,
            rx,
            db,
            page_size: page_size.max(1),
            read_seq: 0,
            sent_seq: 0,
            replaying: false,
            pending: VecDeque::new(),
            max_pending: 0,
            token,
            token_check_due: false,
        };
        match (target, since) {
            (Target::User(id), Some(since)) => {
                feed.read_seq = since.max(0);
                feed.sent_seq = feed.read_seq;
                feed.replaying = true;
                // The first page now, so that a database failure refuses the subscription.
                feed.read_page(id).await?;
            }
            (Target::User(id), None) => {
                feed.read_seq = upline_common::db::latest_seq(&feed.db, id)
                    .await?
                    .unwrap_or(0);
                feed.sent_seq = feed.read_seq;
            }
            (Target::All, _) => {}
        }
        Ok(feed)
    }

    /// The last `seq` delivered: what the client resumes from (`since`).
    pub fn last_seq(&self) -> i64 {
        self.sent_seq
    }

    /// The most frames this feed has held in memory at once: never more than one page.
    pub fn max_pending(&self) -> usize {
        self.max_pending
    }

    /// Whether the feed is still reading the database page by page.
    pub fn is_replaying(&self) -> bool {
        self.replaying
    }

    /// Reads the next replay page into `pending` (which is empty). Cancel-safe: the state
    /// changes only once the query has returned.
    async fn read_page(&mut self, user_id: UserId) -> Result<(), FeedEnd> {
        let limit = i64::try_from(self.page_size).unwrap_or(i64::MAX);
        let page =
            upline_common::db::earnings_after(&self.db, user_id, self.read_seq, limit).await?;
        if page.len() < self.page_size {
            // Everything committed when the page was read is in it; later earnings are
            // published after it began, so they are in the hub's channel.
            self.replaying = false;
        }
        for event in page {
            self.read_seq = event.seq;
            self.pending.push_back(Arc::new(Frame::new(&event)));
        }
        self.max_pending = self.max_pending.max(self.pending.len());
        Ok(())
    }

    /// While replaying: takes what waits in the hub's channel, so that it does not lag for
    /// nothing and so that token changes are seen. Earning frames are dropped (the replay
    /// reads them), and so is a lag (the replay continues from the database anyway).
    fn drain_while_replaying(&mut self) -> Result<(), FeedEnd> {
        loop {
            match self.rx.try_recv() {
                Ok(Signal::TokensChanged) => self.token_check_due = self.token.is_some(),
                Ok(Signal::Earning(_) | Signal::Resync) | Err(TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Closed) => return Err(FeedEnd::Closed),
            }
        }
    }

    /// Hands out a frame read earlier.
    fn hand_out(&mut self, frame: Arc<Frame>) -> Arc<Frame> {
        if self.target != Target::All {
            self.sent_seq = frame.seq;
        }
        frame
    }

    /// Waits for the next frame to send, in `seq` order. Cancel-safe: a frame read from the
    /// database or the hub is kept until it is handed out, and a replay page is read only when
    /// nothing is pending.
    ///
    /// # Errors
    /// [`FeedEnd`] when the token expired or was revoked, the admin feed lagged, the hub
    /// closed, or the database failed.
    pub async fn next(&mut self) -> Result<Arc<Frame>, FeedEnd> {
        loop {
            if self.token.as_ref().is_some_and(token_expired) {
                return Err(FeedEnd::Expired);
            }
            if self.token_check_due {
                if let Some(token) = &self.token {
                    // Boxed, as every database read of a feed: its future is kilobytes, and
                    // inline it would size every idle connection's task (see ws.rs).
                    if !Box::pin(upline_common::auth::token_is_current(&self.db, token)).await? {
                        return Err(FeedEnd::Revoked);
                    }
                }
                self.token_check_due = false;
            }
            if let Some(frame) = self.pending.pop_front() {
                return Ok(self.hand_out(frame));
            }
            if let (Target::User(id), true) = (self.target, self.replaying) {
                self.drain_while_replaying()?;
                if self.token_check_due {
                    continue;
                }
                Box::pin(self.read_page(id)).await?;
                continue;
            }
            let expiry = expiry_sleep(self.token.as_ref());
            let received = tokio::select! {
                () = expiry => return Err(FeedEnd::Expired),
                received = self.rx.recv() => received,
            };
            let signal = match (self.target, received) {
                (_, Ok(s)) => s,
                (Target::All, Err(RecvError::Lagged(_))) => {
                    return Err(FeedEnd::Lagged {
                        last_seq: self.sent_seq,
                    })
                }
                // Whatever was dropped from the channel is committed: read it from the database.
                (Target::User(_), Err(RecvError::Lagged(missed))) => {
                    metrics::counter!("upline_notifier_lag_recoveries_total").increment(1);
                    tracing::debug!(missed, "feed lagged; catching up from the database");
                    self.replaying = true;
                    continue;
                }
                (_, Err(RecvError::Closed)) => return Err(FeedEnd::Closed),
            };
            match (self.target, signal) {
                (_, Signal::TokensChanged) => self.token_check_due = self.token.is_some(),
                (Target::All, Signal::Earning(frame)) => return Ok(frame),
                (Target::All, Signal::Resync) => {}
                (Target::User(_), Signal::Resync) => self.replaying = true,
                (Target::User(_), Signal::Earning(frame)) => {
                    if frame.seq <= self.read_seq {
                        continue; // already sent (replay, or an event published twice)
                    }
                    if frame.seq == self.read_seq + 1 {
                        self.read_seq = frame.seq;
                        return Ok(self.hand_out(frame));
                    }
                    // A gap: the missing earnings (and this one) are committed; read them.
                    self.replaying = true;
                }
            }
        }
    }
}

/// Whether `token` has expired.
fn token_expired(token: &UserToken) -> bool {
    token.expires_at <= time::OffsetDateTime::now_utc()
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
