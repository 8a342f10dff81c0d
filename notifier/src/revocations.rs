//! Closes revoked users' streams at once: listens on PostgreSQL's `NOTIFY` channel
//! [`REVOCATIONS_CHANNEL`], on which the api announces a user id whenever it bumps that user's
//! token version (revoke, deactivation, erasure), and tells the hub, whose feeds check their
//! token again and end with `token_revoked`. After the listening connection was lost (and
//! announcements perhaps missed), every feed checks its token.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use upline_common::auth::REVOCATIONS_CHANNEL;

use crate::hub::Hub;

/// Listens until `cancel` fires, reconnecting with backoff, on a connection of its own (not one
/// of `db`'s: it is held for as long as the notifier runs) made with `db`'s current connect
/// options. Those lead to the primary even when `database.url` lists several hosts (issue 13):
/// the pool's options are moved to a promoted standby, and every reconnection here takes them
/// afresh, so after a failover the listener follows the pool to the new primary.
pub async fn listen(db: PgPool, hub: Arc<Hub>, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        match listen_once(&db, &hub, &cancel).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "token revocation listener lost; reconnecting");
                // Announcements may have been missed meanwhile.
                hub.all_tokens_changed();
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn listen_once(db: &PgPool, hub: &Hub, cancel: &CancellationToken) -> sqlx::Result<()> {
    // One connection, for the listener alone; PgListener reconnects through it.
    let own = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(db.connect_options().as_ref().clone());
    let mut listener = PgListener::connect_with(&own).await?;
    listener.listen(REVOCATIONS_CHANNEL).await?;
    loop {
        let notification = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            n = listener.try_recv() => n?,
        };
        match notification {
            Some(n) => match n.payload().parse() {
                Ok(user_id) => hub.tokens_changed(user_id),
                Err(_) => tracing::warn!(
                    payload = n.payload(),
                    "ignoring a revocation that is not a user id"
                ),
            },
            // The connection was lost and re-established: announcements may be missing.
            None => hub.all_tokens_changed(),
        }
    }
}
