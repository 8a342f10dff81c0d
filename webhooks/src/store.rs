//! The webhooks service's SQL (tables of migration `20261203000004_webhooks.sql`): queueing
//! messages for the endpoints that subscribe to them, claiming due deliveries, recording each
//! attempt, reading purchase outcomes, and the retention sweep.

use std::time::Duration;

use rust_decimal::Decimal;
use sqlx::PgPool;
use time::OffsetDateTime;

/// An enabled endpoint and the event types it receives.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub endpoint_id: i64,
    pub event_types: Vec<String>,
}

/// The enabled endpoints.
///
/// # Errors
/// Database errors.
pub async fn subscriptions(db: &PgPool) -> sqlx::Result<Vec<Subscription>> {
    sqlx::query_as!(
        Subscription,
        "select id as endpoint_id, event_types from webhook_endpoints where disabled_at is null"
    )
    .fetch_all(db)
    .await
}

/// A message to queue: its `webhook-id`, event type and the exact body to sign and send.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: String,
    pub event_type: String,
    pub payload: String,
}

/// Stores `messages` (those already stored are left as they are: a redelivered event) and a
/// pending delivery of each new one to every enabled endpoint subscribed to its type, in one
/// transaction. Returns the deliveries queued.
///
/// # Errors
/// Database errors; nothing is stored then.
pub async fn queue(db: &PgPool, messages: &[NewMessage]) -> sqlx::Result<u64> {
    let mut conn = db.acquire().await?;
    queue_in(&mut conn, messages).await
}

async fn queue_in(conn: &mut sqlx::PgConnection, messages: &[NewMessage]) -> sqlx::Result<u64> {
    if messages.is_empty() {
        return Ok(0);
    }
    let ids: Vec<&str> = messages.iter().map(|m| m.id.as_str()).collect();
    let types: Vec<&str> = messages.iter().map(|m| m.event_type.as_str()).collect();
    let payloads: Vec<&str> = messages.iter().map(|m| m.payload.as_str()).collect();
    let done = sqlx::query!(
        r#"with new as (
               insert into webhook_messages (id, event_type, payload)
               select * from unnest($1::text[], $2::text[], $3::text[])
               on conflict (id) do nothing
               returning id, event_type)
           insert into webhook_deliveries (endpoint_id, message_id)
           select e.id, new.id from new
           join webhook_endpoints e on new.event_type = any (e.event_types)
                                   and e.disabled_at is null
           on conflict (endpoint_id, message_id) do nothing"#,
        &ids as &[&str],
        &types as &[&str],
        &payloads as &[&str],
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// A delivery claimed for one attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub delivery_id: i64,
    pub endpoint_id: i64,
    pub message_id: String,
    /// Attempts including this one.
    pub attempt: i32,
    pub url: String,
    /// The endpoint's key, then the rotated-out key while it is still valid (base64).
    pub secret: String,
    pub previous_secret: Option<String>,
    pub payload: String,
}

/// Claims due deliveries of enabled endpoints for one attempt each, at most `limit` in all and
/// at most `per_endpoint` less what is already in flight to an endpoint (`busy`: endpoint ids
/// and their counts). Each claimed delivery counts the attempt and is held for `lease`: a
/// service that dies mid-attempt leaves it to be tried again once the lease ends.
///
/// # Errors
/// Database errors.
pub async fn claim(
    db: &PgPool,
    busy: &[(i64, i32)],
    per_endpoint: i32,
    limit: i64,
    lease: Duration,
) -> sqlx::Result<Vec<Claimed>> {
    let busy_ids: Vec<i64> = busy.iter().map(|b| b.0).collect();
    let busy_counts: Vec<i32> = busy.iter().map(|b| b.1).collect();
    sqlx::query_as!(
        Claimed,
        r#"with due as materialized (
               select d.id from webhook_endpoints e
               left join unnest($1::int8[], $2::int4[]) as busy (endpoint_id, n)
                      on busy.endpoint_id = e.id
               cross join lateral (
                   select d.id from webhook_deliveries d
                   where d.endpoint_id = e.id and d.status = 'pending'
                     and d.next_attempt_at <= now()
                   order by d.next_attempt_at
                   limit greatest($3 - coalesce(busy.n, 0), 0)
                   for update of d skip locked) d
               where e.disabled_at is null
               limit $4)
           update webhook_deliveries d
              set attempts = d.attempts + 1,
                  started_at = case when d.attempts = 0 then now() else d.started_at end,
                  next_attempt_at = now() + make_interval(secs => $5)
             from due, webhook_endpoints e, webhook_messages m
            where d.id = due.id and e.id = d.endpoint_id and m.id = d.message_id
           returning d.id as delivery_id, d.endpoint_id, d.message_id, d.attempts as attempt,
                     e.url, e.secret,
                     case when e.previous_secret_expires_at > now() then e.previous_secret end
                       as previous_secret,
                     m.payload"#,
        &busy_ids,
        &busy_counts,
        per_endpoint,
        limit,
        lease.as_secs_f64(),
    )
    .fetch_all(db)
    .await
}

/// What one attempt came to.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    /// The HTTP status, when the endpoint answered.
    pub status_code: Option<u16>,
    /// Why it failed: the error, or the start of a non-2xx answer's body.
    pub error: Option<String>,
    pub duration: Duration,
}

impl AttemptResult {
    /// A 2xx answer.
    pub fn succeeded(&self) -> bool {
        self.status_code.is_some_and(|s| (200..300).contains(&s))
    }
}

/// What became of a delivery after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterFailure {
    /// Tried again after the wait.
    Retry,
    /// Every attempt failed; the delivery is `failed`.
    Failed,
    /// Every attempt failed with no success of the endpoint in between: the delivery is
    /// `failed` and the endpoint disabled.
    Disabled,
}

/// Records an attempt of `claimed`: the attempt row, and the delivery delivered, retried after
/// `retry_in`, or failed (`retry_in` = `None`). After a success the endpoint's run of failures
/// ends (`failing_since` is cleared); after a last failure the endpoint is disabled if its run
/// of failures began no later than this delivery's first failed attempt, that is, if nothing
/// was delivered to it since. Nothing happens if the delivery is gone (its endpoint was
/// deleted meanwhile).
///
/// # Errors
/// Database errors.
pub async fn record(
    db: &PgPool,
    claimed: &Claimed,
    result: &AttemptResult,
    retry_in: Option<Duration>,
) -> sqlx::Result<Option<AfterFailure>> {
    let mut tx = db.begin().await?;
    let status = result.status_code.map(i32::from);
    let duration_ms = i32::try_from(result.duration.as_millis()).unwrap_or(i32::MAX);
    let inserted = sqlx::query!(
        r#"insert into webhook_attempts (delivery_id, status_code, error, duration_ms)
           select id, $2, $3, $4 from webhook_deliveries where id = $1"#,
        claimed.delivery_id,
        status,
        result.error.as_deref(),
        duration_ms,
    )
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Ok(None);
    }
    if result.succeeded() {
        sqlx::query!(
            r#"update webhook_deliveries
                  set status = 'delivered', delivered_at = now(), next_attempt_at = null,
                      last_status_code = $2, last_error = null
                where id = $1"#,
            claimed.delivery_id,
            status,
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "update webhook_endpoints set failing_since = null where id = $1 and failing_since is not null",
            claimed.endpoint_id,
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        return Ok(None);
    }
    sqlx::query!(
        "update webhook_endpoints set failing_since = now() where id = $1 and failing_since is null",
        claimed.endpoint_id,
    )
    .execute(&mut *tx)
    .await?;
    let after = match retry_in {
        Some(wait) => {
            sqlx::query!(
                r#"update webhook_deliveries
                      set next_attempt_at = now() + make_interval(secs => $2),
                          last_status_code = $3, last_error = $4
                    where id = $1"#,
                claimed.delivery_id,
                wait.as_secs_f64(),
                status,
                result.error.as_deref(),
            )
            .execute(&mut *tx)
            .await?;
            AfterFailure::Retry
        }
        None => {
            sqlx::query!(
                r#"update webhook_deliveries
                      set status = 'failed', next_attempt_at = null,
                          last_status_code = $2, last_error = $3
                    where id = $1"#,
                claimed.delivery_id,
                status,
                result.error.as_deref(),
            )
            .execute(&mut *tx)
            .await?;
            let last = match (status, &result.error) {
                (Some(code), _) => format!("HTTP {code}"),
                (None, Some(e)) => e.clone(),
                (None, None) => "no answer".into(),
            };
            let reason = format!(
                "message {} failed all {} attempts, with no successful delivery to this endpoint since the first; last: {last}",
                claimed.message_id, claimed.attempt
            );
            let disabled = sqlx::query!(
                r#"update webhook_endpoints e
                      set disabled_at = now(), disabled_reason = $3
                     from webhook_deliveries d
                    where e.id = $1 and d.id = $2 and e.disabled_at is null
                      and e.failing_since <= (
                          select min(a.attempted_at) from webhook_attempts a
                           where a.delivery_id = d.id and a.attempted_at >= d.started_at)"#,
                claimed.endpoint_id,
                claimed.delivery_id,
                reason,
            )
            .execute(&mut *tx)
            .await?;
            if disabled.rows_affected() > 0 {
                AfterFailure::Disabled
            } else {
                AfterFailure::Failed
            }
        }
    };
    tx.commit().await?;
    Ok(Some(after))
}

/// A successful attempt, recorded in a batch by [`record_successes`].
#[derive(Debug, Clone, Copy)]
pub struct Success {
    pub delivery_id: i64,
    pub endpoint_id: i64,
    pub status_code: u16,
    pub duration: Duration,
}

/// Records successful attempts in one statement: an attempt row each, the deliveries
/// delivered, and their endpoints' runs of failures ended. Deliveries gone meanwhile (their
/// endpoint was deleted) are skipped. One commit for the batch instead of one per delivery:
/// what lets the webhooks service deliver at the database's pace.
///
/// # Errors
/// Database errors; nothing is recorded then.
pub async fn record_successes(db: &PgPool, successes: &[Success]) -> sqlx::Result<()> {
    let ids: Vec<i64> = successes.iter().map(|s| s.delivery_id).collect();
    let codes: Vec<i32> = successes.iter().map(|s| i32::from(s.status_code)).collect();
    let millis: Vec<i32> = successes
        .iter()
        .map(|s| i32::try_from(s.duration.as_millis()).unwrap_or(i32::MAX))
        .collect();
    let mut endpoints: Vec<i64> = successes.iter().map(|s| s.endpoint_id).collect();
    endpoints.sort_unstable();
    endpoints.dedup();
    sqlx::query!(
        r#"with done as (
               select * from unnest($1::int8[], $2::int4[], $3::int4[]) as x (id, code, ms)),
           attempts as (
               insert into webhook_attempts (delivery_id, status_code, duration_ms)
               select d.id, done.code, done.ms
               from done join webhook_deliveries d on d.id = done.id),
           delivered as (
               update webhook_deliveries d
                  set status = 'delivered', delivered_at = now(), next_attempt_at = null,
                      last_status_code = done.code, last_error = null
                 from done where d.id = done.id)
           update webhook_endpoints set failing_since = null
            where id = any ($4) and failing_since is not null"#,
        &ids,
        &codes,
        &millis,
        &endpoints,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// A recorded purchase, for its `purchase.*` event.
#[derive(Debug, Clone)]
pub struct PurchaseOutcome {
    pub purchase_id: String,
    /// `processed` or `rejected`.
    pub status: String,
    pub reason: Option<String>,
    pub buyer_id: Option<i64>,
    pub amount: Option<Decimal>,
    pub currency: Option<String>,
    pub processed_at: OffsetDateTime,
}

/// One level of a processed purchase.
#[derive(Debug, Clone)]
pub struct LevelOutcome {
    pub purchase_id: String,
    pub level: i16,
    pub earner_id: Option<i64>,
    pub outcome: String,
    pub amount: Decimal,
    pub earning_id: Option<i64>,
}

/// The purchases of `ids` that a worker has recorded, with their levels.
///
/// # Errors
/// Database errors.
pub async fn purchase_outcomes(
    db: &PgPool,
    ids: &[String],
) -> sqlx::Result<(Vec<PurchaseOutcome>, Vec<LevelOutcome>)> {
    let purchases = sqlx::query_as!(
        PurchaseOutcome,
        r#"select purchase_id, status, reason, buyer_id, amount, currency, processed_at
           from purchases where purchase_id = any ($1)"#,
        ids,
    )
    .fetch_all(db)
    .await?;
    if purchases.is_empty() {
        return Ok((purchases, Vec::new()));
    }
    let found: Vec<&str> = purchases.iter().map(|p| p.purchase_id.as_str()).collect();
    let levels = sqlx::query_as!(
        LevelOutcome,
        r#"select purchase_id as "purchase_id!", level as "level!", earner_id,
                  outcome as "outcome!", amount as "amount!", earning_id
           from purchase_level_outcomes where purchase_id = any ($1)
           order by purchase_id, level"#,
        &found as &[&str],
    )
    .fetch_all(db)
    .await?;
    Ok((purchases, levels))
}

/// Parks purchases that no worker has recorded yet (see migration
/// `20261203000005_webhook_purchase_waits.sql`); those already parked stay as they are.
///
/// # Errors
/// Database errors.
pub async fn park_purchases(db: &PgPool, ids: &[String]) -> sqlx::Result<()> {
    sqlx::query!(
        r#"insert into webhook_purchase_waits (purchase_id)
           select * from unnest($1::text[]) on conflict (purchase_id) do nothing"#,
        ids,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Up to `limit` parked purchases after `after` (by id), with whether a worker has recorded
/// each by now: one round of a sweep through the parked purchases.
///
/// # Errors
/// Database errors.
pub async fn parked_purchases(
    db: &PgPool,
    after: &str,
    limit: i64,
) -> sqlx::Result<Vec<(String, bool)>> {
    let rows = sqlx::query!(
        r#"select w.purchase_id,
                  exists (select 1 from purchases p where p.purchase_id = w.purchase_id)
                    as "recorded!"
           from webhook_purchase_waits w
           where w.purchase_id > $1 order by w.purchase_id limit $2"#,
        after,
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.purchase_id, r.recorded))
        .collect())
}

/// Queues `messages` (as [`queue`]) and deletes the parked purchases `resolved`, in one
/// transaction. Returns the deliveries queued.
///
/// # Errors
/// Database errors; nothing changes then.
pub async fn queue_resolved(
    db: &PgPool,
    messages: &[NewMessage],
    resolved: &[String],
) -> sqlx::Result<u64> {
    let mut tx = db.begin().await?;
    let queued = queue_in(&mut tx, messages).await?;
    sqlx::query!(
        "delete from webhook_purchase_waits where purchase_id = any ($1)",
        resolved,
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(queued)
}

/// Deletes messages older than `retention` none of whose deliveries is pending, with their
/// deliveries and attempts, at most 10,000 at a time, and purchases parked longer than
/// `retention` (never recorded). Returns how many messages.
///
/// # Errors
/// Database errors.
pub async fn sweep(db: &PgPool, retention: Duration) -> sqlx::Result<u64> {
    let done = sqlx::query!(
        r#"delete from webhook_messages m
            where m.id in (
                select id from webhook_messages
                 where created_at < now() - make_interval(secs => $1)
                 limit 10000)
              and not exists (select 1 from webhook_deliveries d
                               where d.message_id = m.id and d.status = 'pending')"#,
        retention.as_secs_f64(),
    )
    .execute(db)
    .await?;
    sqlx::query!(
        "delete from webhook_purchase_waits where received_at < now() - make_interval(secs => $1)",
        retention.as_secs_f64(),
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}
