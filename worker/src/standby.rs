//! Standby consumers (docs/perf.md, "Standby consumers"): across all workers, one consumer of
//! each number consumes at a time; the others stand by.
//!
//! The ledger gates ([`crate::ledger::Gate`]) let `worker.ledger_writers` batches hold earners
//! at once, but a batch that waits at a gate is still a transaction in PostgreSQL, and more
//! batches in flight made the ones writing slower: four workers drained at 0.82–0.93× the
//! rate of one ("Four workers, with one writer"). So a worker's consumer number i first takes
//! consumer slot i, the session-level advisory lock `(hashtext('upline.consumer_slot'), i)` on
//! a connection of its own, and only then asks the broker for purchases. While another
//! worker's consumer i holds the slot it consumes nothing and tries again every
//! `worker.standby_poll_ms`. When the holder's worker stops or dies, its connection closes,
//! PostgreSQL lets go of the lock, and a standby takes the slot within a poll; the holder's
//! unacknowledged deliveries went back to the queue with its channel. So any number of workers
//! have the batches in flight of one, and each worker past the first is a hot standby.
//!
//! The slots are for throughput only. Correctness never rests on them: the ledger is exactly
//! once under any number of writers (row locks, `purchase_id` uniqueness), so two holders for
//! a moment, while a lost connection is noticed, cost nothing but speed. `worker.standby =
//! false` turns them off: every consumer of every worker then consumes.

use std::time::Duration;

use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// Takes consumer slot `$1` if it is free; true when this session holds it. Session-level, so
/// it is held until the session ends; trying holds no snapshot while the slot is taken.
const TRY_TAKE: &str = "select pg_try_advisory_lock(hashtext('upline.consumer_slot'), $1)";

/// Ends the slot's session on the server's side after `$1` ms without a statement
/// (`idle_session_timeout`, PostgreSQL 14 and later).
const SET_IDLE_TIMEOUT: &str = "select set_config('idle_session_timeout', $1, false)";

/// A consumer slot held by this process: the connection whose session holds the slot's lock.
/// Dropping it closes the connection, which lets the slot go.
#[derive(Debug)]
pub struct ConsumerSlot {
    number: i32,
    conn: PgConnection,
}

impl ConsumerSlot {
    /// Waits until this process holds consumer slot `number` (the consumer's number within its
    /// worker), trying every `poll`; `None` once `cancel` fires. A slot another session holds,
    /// or a database that cannot be reached, is simply tried again at the next poll.
    ///
    /// The slot's connection is made with the pool's current connect options (so it follows
    /// a failover), and its session gets `idle_session_timeout` at three polls: a holder cut
    /// off from PostgreSQL loses its slot within three polls, since it checks in every poll
    /// ([`ConsumerSlot::lost`]).
    pub async fn take(
        db: &PgPool,
        number: u16,
        poll: Duration,
        cancel: &CancellationToken,
    ) -> Option<ConsumerSlot> {
        let number = i32::from(number);
        let mut conn: Option<PgConnection> = None;
        let mut announced = false;
        // Warned once per run of failed tries, so that a database that keeps refusing the
        // slot's session does not go unseen.
        let mut failing = false;
        loop {
            let attempt = async {
                if conn.is_none() {
                    let mut session = db.connect_options().connect().await?;
                    // PostgreSQL before 14 has no such setting; the slot works without it,
                    // only a holder cut off from the server keeps it until TCP gives up.
                    if let Err(e) = sqlx::query(SET_IDLE_TIMEOUT)
                        .bind((poll * 3).as_millis().to_string())
                        .execute(&mut session)
                        .await
                    {
                        tracing::debug!(error = %e, "no idle_session_timeout for the slot's session");
                    }
                    conn = Some(session);
                }
                let session = conn.as_mut().expect("connected above");
                sqlx::query_scalar::<_, bool>(TRY_TAKE)
                    .bind(number)
                    .fetch_one(session)
                    .await
            };
            let outcome = tokio::select! {
                () = cancel.cancelled() => return None,
                r = tokio::time::timeout(poll.max(Duration::from_secs(5)), attempt) => r,
            };
            if matches!(outcome, Ok(Ok(_))) {
                failing = false;
            }
            match outcome {
                Ok(Ok(true)) => {
                    let conn = conn.take().expect("connected above");
                    metrics::gauge!("upline_consumer_slots_held").increment(1.0);
                    return Some(ConsumerSlot { number, conn });
                }
                Ok(Ok(false)) if !announced => {
                    tracing::info!(
                        slot = number,
                        "another worker's consumer holds this consumer slot; standing by"
                    );
                    announced = true;
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(slot = number, error = %e, "could not try for the consumer slot; trying again every poll");
                    }
                    conn = None;
                }
                Err(_) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(
                            slot = number,
                            "trying for the consumer slot timed out; trying again every poll"
                        );
                    }
                    conn = None;
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return None,
                () = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// The slot's number: its holder's consumer number.
    pub fn number(&self) -> i32 {
        self.number
    }

    /// Resolves when this process may no longer hold the slot: its connection failed or did
    /// not answer within `poll`. Checks in every `poll`, which also keeps the session from
    /// reaching its `idle_session_timeout`.
    pub async fn lost(&mut self, poll: Duration) {
        loop {
            tokio::time::sleep(poll).await;
            match tokio::time::timeout(poll, self.conn.ping()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(slot = self.number, error = %e, "lost the consumer slot's connection");
                    return;
                }
                Err(_) => {
                    tracing::warn!(
                        slot = self.number,
                        "the consumer slot's connection did not answer"
                    );
                    return;
                }
            }
        }
    }

    /// Lets the slot go by closing its connection, so a standby can take it at its next poll.
    pub async fn release(self) {
        metrics::gauge!("upline_consumer_slots_held").decrement(1.0);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.close()).await;
    }
}
