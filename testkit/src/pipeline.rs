//! What the pipeline has recorded so far, read straight from its database: how many purchases
//! are in the ledger, how many earning events still wait in the outbox.

use std::time::{Duration, Instant};

use anyhow::bail;
use sqlx::PgPool;

/// Purchases recorded (processed or rejected), all ids.
///
/// # Errors
/// Database errors.
pub async fn purchases(db: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("select count(*) from purchases")
        .fetch_one(db)
        .await
}

/// Earning events committed but not yet confirmed by the broker (`earning_outbox`).
///
/// # Errors
/// Database errors.
pub async fn outbox(db: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("select count(*) from earning_outbox")
        .fetch_one(db)
        .await
}

/// Waits until the outbox is empty (every earning event published), polling every 50 ms.
///
/// # Errors
/// Database errors, or events still in the outbox after `within`.
pub async fn wait_outbox_empty(db: &PgPool, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let pending = outbox(db).await?;
        if pending == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{pending} earnings never left the outbox (waited {within:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
