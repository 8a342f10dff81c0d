//! The api's persistence module: every SQL statement the REST handlers run.

use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor, PgPool};
use time::OffsetDateTime;
use upline_common::auth::REVOCATIONS_CHANNEL;
use upline_common::money::Money;
use upline_common::rules::Outcome;
use upline_common::{Level, PurchaseStatus, UserId};

use crate::error::{ApiError, ResultExt};

/// A user as the API shows it (the token is added at registration only).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"id": 7, "name": "Asha", "email": "asha@example.com", "referral_code": "K7QM2XPA",
    "referrer_id": 3, "is_active": true, "direct_referrals": 2, "total_earnings": "1530.00",
    "show_on_leaderboard": true, "erased_at": null, "created_at": "2026-11-20T10:00:00Z"}))]
pub struct User {
    #[schema(value_type = i64, minimum = 1)]
    pub id: UserId,
    /// The user's name; [`ERASED_NAME`] once erased.
    pub name: String,
    /// `null` once erased.
    pub email: Option<String>,
    /// The code others sign up with; `null` once erased.
    pub referral_code: Option<String>,
    #[schema(value_type = Option<i64>)]
    pub referrer_id: Option<UserId>,
    pub is_active: bool,
    pub direct_referrals: i32,
    #[serde(serialize_with = "money")]
    #[schema(value_type = crate::openapi::Money)]
    pub total_earnings: Decimal,
    /// Whether the user appears on the public leaderboard (`PATCH /api/users/{id}`).
    pub show_on_leaderboard: bool,
    /// When the user's personal data was erased (`DELETE /api/users/{id}`), else `null`.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub erased_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

/// The name an erased user is shown under in reports: earnings stay, the person does not.
pub const ERASED_NAME: &str = "erased user";

fn money<S: serde::Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
    Money::from_total(*d).serialize(s)
}

/// Fetches a user.
///
/// # Errors
/// Database errors.
pub async fn user(db: impl PgExecutor<'_>, id: UserId) -> sqlx::Result<Option<User>> {
    sqlx::query_as!(
        User,
        r#"select u.id as "id: UserId", u.name, u.email, u.referral_code,
                  u.referrer_id as "referrer_id: UserId", u.is_active, u.direct_referrals,
                  b.total_earnings, u.show_on_leaderboard, u.erased_at, u.created_at
           from users u join earner_balances b on b.user_id = u.id where u.id = $1"#,
        id.get(),
    )
    .fetch_optional(db)
    .await
}

/// Users with id greater than `after`, by id.
///
/// # Errors
/// Database errors.
pub async fn users_page(db: &PgPool, after: i64, limit: i64) -> sqlx::Result<Vec<User>> {
    sqlx::query_as!(
        User,
        r#"select u.id as "id: UserId", u.name, u.email, u.referral_code,
                  u.referrer_id as "referrer_id: UserId", u.is_active, u.direct_referrals,
                  b.total_earnings, u.show_on_leaderboard, u.erased_at, u.created_at
           from users u join earner_balances b on b.user_id = u.id
           where u.id > $1 order by u.id limit $2"#,
        after,
        limit,
    )
    .fetch_all(db)
    .await
}

/// The id of the user with this referral code.
///
/// # Errors
/// Database errors.
pub async fn user_id_by_code(db: impl PgExecutor<'_>, code: &str) -> sqlx::Result<Option<UserId>> {
    sqlx::query_scalar!(
        r#"select id as "id: UserId" from users where referral_code = $1"#,
        code.trim().to_ascii_uppercase(),
    )
    .fetch_optional(db)
    .await
}

/// Takes one of the referrer's direct-referral slots, atomically: the row lock on the
/// referrer serialises concurrent sign-ups, so the limit holds under any concurrency.
///
/// # Errors
/// 404 `referrer_not_found`, 409 `referrer_inactive`, 409 `referral_limit_reached`.
pub async fn take_referral_slot(
    tx: &mut PgConnection,
    referrer_id: UserId,
    max_direct: i32,
) -> Result<(), ApiError> {
    let row = sqlx::query!(
        "select is_active, direct_referrals from users where id = $1 for no key update",
        referrer_id.get(),
    )
    .fetch_optional(&mut *tx)
    .await?;
    match row {
        None => Err(ApiError::ReferrerNotFound),
        Some(r) if !r.is_active => Err(ApiError::ReferrerInactive),
        Some(r) if r.direct_referrals >= max_direct => {
            Err(ApiError::ReferralLimitReached(max_direct))
        }
        Some(_) => {
            sqlx::query!(
                "update users set direct_referrals = direct_referrals + 1 where id = $1",
                referrer_id.get(),
            )
            .execute(&mut *tx)
            .await?;
            Ok(())
        }
    }
}

/// Inserts a new user.
///
/// # Errors
/// 409 `email_taken`; a duplicate referral code is reported as `Ok(None)` so the caller can
/// draw another.
pub async fn insert_user(
    tx: &mut PgConnection,
    name: &str,
    email: &str,
    referral_code: &str,
    referrer_id: Option<UserId>,
) -> Result<Option<User>, ApiError> {
    let inserted = sqlx::query_as!(
        User,
        r#"insert into users (name, email, referral_code, referrer_id) values ($1, $2, $3, $4)
           returning id as "id: UserId", name, email, referral_code, referrer_id as "referrer_id: UserId",
                     is_active, direct_referrals, 0::numeric as "total_earnings!", show_on_leaderboard,
                     erased_at, created_at"#,
        name,
        email,
        referral_code,
        referrer_id.map(UserId::get),
    )
    .fetch_one(&mut *tx)
    .await
    .on_constraint("users_email_key", || ApiError::EmailTaken);
    match inserted {
        Ok(user) => Ok(Some(user)),
        Err(ApiError::Internal(e)) if matches!(e.downcast_ref::<sqlx::Error>(), Some(sqlx::Error::Database(d)) if d.constraint() == Some("users_referral_code_key")) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Serialises every change of an existing user's referrer, so that two concurrent changes
/// cannot close a cycle between them. Held until the transaction ends.
///
/// # Errors
/// Database errors.
pub async fn lock_referral_graph(tx: &mut PgConnection) -> sqlx::Result<()> {
    // An arbitrary constant naming "the referral graph" among advisory locks.
    sqlx::query!(r#"select pg_advisory_xact_lock(7001001) as "locked: ()""#)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Locks a user's row and returns its current referrer (`Err` 404 if there is no such user).
///
/// # Errors
/// 404 when the user does not exist.
pub async fn lock_user_referrer(
    tx: &mut PgConnection,
    id: UserId,
) -> Result<Option<UserId>, ApiError> {
    sqlx::query_scalar!(
        r#"select referrer_id as "referrer_id: UserId" from users where id = $1 for no key update"#,
        id.get(),
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no user with id {id}")))
}

/// Whether `user` is `candidate` or one of its ancestors, i.e. making `user` refer to
/// `candidate`… would close a cycle when `candidate`'s upline contains `user`.
///
/// # Errors
/// Database errors.
pub async fn upline_contains(
    tx: &mut PgConnection,
    start: UserId,
    user: UserId,
) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"with recursive up (id, referrer_id) as (
               select id, referrer_id from users where id = $1
               union all
               select u.id, u.referrer_id from users u join up on u.id = up.referrer_id
           )
           select exists (select 1 from up where id = $2) as "contains!""#,
        start.get(),
        user.get(),
    )
    .fetch_one(&mut *tx)
    .await
}

/// Sets a user's referrer.
///
/// # Errors
/// Database errors.
pub async fn set_referrer(
    tx: &mut PgConnection,
    id: UserId,
    referrer_id: UserId,
) -> sqlx::Result<()> {
    sqlx::query!(
        "update users set referrer_id = $2 where id = $1",
        id.get(),
        referrer_id.get(),
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Activates or deactivates a user; `None` if there is no such user. Deactivation also
/// revokes the user's tokens ([`revoke_tokens`]).
///
/// # Errors
/// 409 `user_erased` for an erased user; database errors.
pub async fn set_active(
    tx: &mut PgConnection,
    id: UserId,
    active: bool,
) -> Result<Option<User>, ApiError> {
    let Some(erased) = lock_user(tx, id).await? else {
        return Ok(None);
    };
    if erased {
        return Err(ApiError::UserErased);
    }
    sqlx::query!(
        "update users set is_active = $2 where id = $1",
        id.get(),
        active,
    )
    .execute(&mut *tx)
    .await?;
    if !active {
        revoke_tokens(tx, id).await?;
    }
    Ok(user(&mut *tx, id).await?)
}

/// Locks a user's row for an update; `Some(erased)` when the user exists.
async fn lock_user(tx: &mut PgConnection, id: UserId) -> sqlx::Result<Option<bool>> {
    sqlx::query_scalar!(
        r#"select erased_at is not null as "erased!" from users where id = $1 for no key update"#,
        id.get(),
    )
    .fetch_optional(&mut *tx)
    .await
}

/// Revokes every token of a user at once: bumps `users.token_version` and announces the user
/// on [`REVOCATIONS_CHANNEL`] (delivered when the transaction commits), so notifiers close the
/// user's streams.
///
/// # Errors
/// Database errors.
pub async fn revoke_tokens(tx: &mut PgConnection, id: UserId) -> sqlx::Result<()> {
    sqlx::query!(
        "update users set token_version = token_version + 1 where id = $1",
        id.get(),
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        r#"select pg_notify($1, $2) as "notified: ()""#,
        REVOCATIONS_CHANNEL,
        id.to_string(),
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A user's current token version, for issuing a token.
///
/// # Errors
/// 404 for no such user, 409 `user_erased` or `user_inactive`; database errors.
pub async fn token_version_for_issue(db: &PgPool, id: UserId) -> Result<i64, ApiError> {
    let row = sqlx::query!(
        r#"select token_version, is_active, erased_at is not null as "erased!"
           from users where id = $1"#,
        id.get(),
    )
    .fetch_optional(db)
    .await?;
    match row {
        None => Err(ApiError::NotFound(format!("no user with id {id}"))),
        Some(r) if r.erased => Err(ApiError::UserErased),
        Some(r) if !r.is_active => Err(ApiError::UserInactive),
        Some(r) => Ok(r.token_version),
    }
}

/// Erases a user's personal data: the name becomes [`ERASED_NAME`], email and referral code
/// are removed, the user is deactivated, hidden from the leaderboard and its tokens revoked.
/// Earnings, totals and the referral tree stay as they are, so the ledger remains exact.
/// `false` if there is no such user; erasing twice changes nothing more.
///
/// # Errors
/// Database errors.
pub async fn erase_user(tx: &mut PgConnection, id: UserId) -> sqlx::Result<bool> {
    let Some(erased) = lock_user(tx, id).await? else {
        return Ok(false);
    };
    if !erased {
        sqlx::query!(
            r#"update users set name = $2, email = null, referral_code = null, is_active = false,
                   show_on_leaderboard = false, erased_at = now()
               where id = $1"#,
            id.get(),
            ERASED_NAME,
        )
        .execute(&mut *tx)
        .await?;
        revoke_tokens(tx, id).await?;
    }
    Ok(true)
}

/// Shows or hides a user on the leaderboard; `None` if there is no such user.
///
/// # Errors
/// 409 `user_erased` when showing an erased user; database errors.
pub async fn set_leaderboard_visibility(
    tx: &mut PgConnection,
    id: UserId,
    visible: bool,
) -> Result<Option<User>, ApiError> {
    let Some(erased) = lock_user(tx, id).await? else {
        return Ok(None);
    };
    if erased && visible {
        return Err(ApiError::UserErased);
    }
    sqlx::query!(
        "update users set show_on_leaderboard = $2 where id = $1",
        id.get(),
        visible,
    )
    .execute(&mut *tx)
    .await?;
    Ok(user(&mut *tx, id).await?)
}

/// Releases one of a referrer's direct referrals: the referral loses its referrer (and may
/// choose another) and the referrer gets the slot back. Unless `by_admin`, only a referral
/// that has brought the referrer nothing and has no referrals of its own may be released: the
/// remedy for sign-ups that squat a referrer's slots, not a way to drop a paying leg.
///
/// # Errors
/// 404 when `referral_id` is not a direct referral of `referrer_id`; 409
/// `referral_not_releasable`; database errors.
pub async fn release_referral(
    tx: &mut PgConnection,
    referrer_id: UserId,
    referral_id: UserId,
    by_admin: bool,
) -> Result<(), ApiError> {
    lock_referral_graph(tx).await?;
    let row = sqlx::query!(
        r#"select direct_referrals,
                  exists (select 1 from earner_referrals
                          where user_id = $1 and source_user_id = $2) as "has_paid!"
           from users
           where id = $2 and referrer_id = $1
           for no key update"#,
        referrer_id.get(),
        referral_id.get(),
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(ApiError::NotFound(format!(
            "user {referral_id} is not a direct referral of user {referrer_id}"
        )));
    };
    if !by_admin && (row.direct_referrals > 0 || row.has_paid) {
        return Err(ApiError::ReferralNotReleasable);
    }
    sqlx::query!(
        "update users set referrer_id = null where id = $1",
        referral_id.get(),
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "update users set direct_referrals = direct_referrals - 1 where id = $1",
        referrer_id.get(),
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Whether a user exists.
///
/// # Errors
/// Database errors.
pub async fn user_exists(db: &PgPool, id: UserId) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"select exists (select 1 from users where id = $1) as "exists!""#,
        id.get(),
    )
    .fetch_one(db)
    .await
}

/// Ids known to belong to users, so that purchase intake checks the buyer without a database
/// round trip after the first time. Users are never deleted, so a remembered id stays true;
/// the set is bounded (it is emptied when full, and refills from the database).
#[derive(Debug, Default)]
pub struct KnownUsers(std::sync::Mutex<std::collections::HashSet<UserId>>);

impl KnownUsers {
    /// Most ids remembered (8 bytes each, a few MiB at most).
    const CAPACITY: usize = 500_000;

    /// Whether `id` is a user, asking the database only for ids not seen before.
    ///
    /// # Errors
    /// Database errors.
    pub async fn contains(&self, db: &PgPool, id: UserId) -> sqlx::Result<bool> {
        if self
            .0
            .lock()
            .expect("never poisoned: no panics while held")
            .contains(&id)
        {
            return Ok(true);
        }
        let exists = user_exists(db, id).await?;
        if exists {
            let mut known = self.0.lock().expect("never poisoned: no panics while held");
            if known.len() >= Self::CAPACITY {
                known.clear();
            }
            known.insert(id);
        }
        Ok(exists)
    }
}

/// A purchase as recorded by a worker.
#[derive(Debug)]
pub struct PurchaseRow {
    pub purchase_id: String,
    pub status: PurchaseStatus,
    pub reason: Option<String>,
    pub buyer_id: Option<UserId>,
    pub amount: Option<Decimal>,
    pub currency: Option<String>,
    pub profit: Option<Decimal>,
    pub occurred_at: Option<OffsetDateTime>,
    pub processed_at: OffsetDateTime,
}

/// One level's outcome of a purchase.
#[derive(Debug)]
pub struct LevelRow {
    pub level: Level,
    pub earner_id: Option<UserId>,
    pub outcome: Outcome,
    pub rate: Decimal,
    pub amount: Decimal,
    pub earning_id: Option<i64>,
}

/// A later message that reused the purchase id with other content.
#[derive(Debug)]
pub struct ConflictRow {
    /// `None` once past `privacy.raw_body_retention`.
    pub body: Option<Json<serde_json::Value>>,
    pub received_at: OffsetDateTime,
}

/// A purchase with its levels and conflicts.
///
/// # Errors
/// Database errors.
pub async fn purchase(
    db: &PgPool,
    id: &str,
) -> sqlx::Result<Option<(PurchaseRow, Vec<LevelRow>, Vec<ConflictRow>)>> {
    let Some(row) = sqlx::query_as!(
        PurchaseRow,
        r#"select purchase_id, status as "status: PurchaseStatus", reason,
                  buyer_id as "buyer_id: UserId", amount, currency, profit, occurred_at, processed_at
           from purchases where purchase_id = $1"#,
        id,
    )
    .fetch_optional(db)
    .await?
    else {
        return Ok(None);
    };
    let levels = sqlx::query_as!(
        LevelRow,
        r#"select level as "level!: Level", earner_id as "earner_id: UserId",
                  outcome as "outcome!: Outcome", rate as "rate!", amount as "amount!", earning_id
           from purchase_level_outcomes where purchase_id = $1 order by level"#,
        id,
    )
    .fetch_all(db)
    .await?;
    let conflicts = sqlx::query_as!(
        ConflictRow,
        r#"select body as "body: Json<serde_json::Value>", received_at
           from purchase_conflicts where purchase_id = $1 order by id limit 100"#,
        id,
    )
    .fetch_all(db)
    .await?;
    Ok(Some((row, levels, conflicts)))
}

/// A user's money by state (contract §10): the `users` columns the earnings report shows.
#[derive(Debug)]
pub struct EarningsBalances {
    /// `pending + approved + paid`, net of reversals.
    pub total: Decimal,
    /// Commissions within their holding period.
    pub pending: Decimal,
    /// Approved and not yet paid out; below zero after a clawback of money already paid out.
    pub approved: Decimal,
    /// Paid out (payouts marked paid).
    pub paid: Decimal,
    /// Everything clawed back by reversals.
    pub reversed: Decimal,
}

/// A user's total and money by state; `None` when there is no such user.
///
/// # Errors
/// Database errors.
pub async fn earnings_balances(
    db: &PgPool,
    user_id: UserId,
) -> sqlx::Result<Option<EarningsBalances>> {
    sqlx::query_as!(
        EarningsBalances,
        r#"select total_earnings as total, pending_earnings as pending,
                  approved_earnings as approved, paid_earnings as paid,
                  reversed_earnings as reversed
           from earner_balances where user_id = $1"#,
        user_id.get(),
    )
    .fetch_optional(db)
    .await
}

/// A user's total per level.
///
/// # Errors
/// Database errors.
pub async fn level_totals(
    db: &PgPool,
    user_id: UserId,
) -> sqlx::Result<Vec<(Level, Decimal, i64)>> {
    let rows = sqlx::query!(
        r#"select level as "level: Level", total, count
           from earner_levels where user_id = $1 order by level"#,
        user_id.get(),
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.level, r.total, r.count))
        .collect())
}

/// What each referral (buyer) brought a user, per level, largest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReferralEarnings {
    #[schema(value_type = i64)]
    pub source_user_id: UserId,
    pub name: String,
    #[schema(value_type = i16, minimum = 1)]
    pub level: Level,
    #[serde(serialize_with = "money")]
    #[schema(value_type = crate::openapi::Money)]
    pub total: Decimal,
    pub count: i64,
}

/// The `by_referral` report, at most `limit` rows.
///
/// # Errors
/// Database errors.
pub async fn earnings_by_referral(
    db: &PgPool,
    user_id: UserId,
    limit: i64,
) -> sqlx::Result<Vec<ReferralEarnings>> {
    sqlx::query_as!(
        ReferralEarnings,
        r#"select r.source_user_id as "source_user_id: UserId", u.name, r.level as "level: Level",
                  r.total, r.count
           from earner_referrals r join users u on u.id = r.source_user_id
           where r.user_id = $1 order by r.total desc, r.source_user_id, r.level limit $2"#,
        user_id.get(),
        limit,
    )
    .fetch_all(db)
    .await
}

/// What one leg of a user brought at one level: a leg is a direct referral of the user
/// together with everyone below them (`by_leg` of the earnings report, contract §10).
#[derive(Debug)]
pub struct LegLevelRow {
    /// The direct referral heading the leg.
    pub leg_user_id: UserId,
    /// The leg's name ([`ERASED_NAME`] once erased).
    pub name: String,
    pub level: Level,
    /// Rupees, net of reversals.
    pub total: Decimal,
    /// How many commissions.
    pub count: i64,
}

/// The `by_leg` report, per (leg, level), computed at read time from `earner_referrals`: the
/// leg of a row at level L is the ancestor of its buyer L−1 steps up the referral tree
/// (level 1: the buyer itself), found by walking `users.referrer_id`. A row whose buyer has
/// fewer than L−1 ancestors now (the tree was changed by an admin since) belongs to no leg
/// and is left out.
///
/// # Errors
/// Database errors.
pub async fn earnings_by_leg(db: &PgPool, user_id: UserId) -> sqlx::Result<Vec<LegLevelRow>> {
    sqlx::query_as!(
        LegLevelRow,
        r#"with recursive up (level, total, count, node, steps) as (
               select r.level, r.total, r.count, r.source_user_id, r.level::integer - 1
               from earner_referrals r where r.user_id = $1
               union all
               select up.level, up.total, up.count, u.referrer_id, up.steps - 1
               from up join users u on u.id = up.node
               where up.steps > 0 and u.referrer_id is not null
           )
           select up.node as "leg_user_id!: UserId", u.name, up.level as "level!: Level",
                  sum(up.total) as "total!", sum(up.count)::bigint as "count!"
           from up join users u on u.id = up.node
           where up.steps = 0
           group by up.node, u.name, up.level
           order by up.node, up.level"#,
        user_id.get(),
    )
    .fetch_all(db)
    .await
}

/// A member of someone's downline.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Referral {
    #[schema(value_type = i64)]
    pub id: UserId,
    pub name: String,
    pub is_active: bool,
    #[schema(value_type = Option<i64>)]
    pub referrer_id: Option<UserId>,
    pub direct_referrals: i32,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

/// Direct referrals of any of `ids`, by id.
///
/// # Errors
/// Database errors.
pub async fn referrals_of(db: &PgPool, ids: &[UserId]) -> sqlx::Result<Vec<Referral>> {
    sqlx::query_as!(
        Referral,
        r#"select id as "id: UserId", name, is_active, referrer_id as "referrer_id: UserId",
                  direct_referrals, created_at
           from users where referrer_id = any($1) order by id"#,
        &ids.iter().map(|id| id.get()).collect::<Vec<_>>(),
    )
    .fetch_all(db)
    .await
}

/// A leaderboard entry; no emails.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Leader {
    #[schema(value_type = i64)]
    pub user_id: UserId,
    pub name: String,
    #[serde(serialize_with = "money")]
    #[schema(value_type = crate::openapi::Money)]
    pub total_earnings: Decimal,
}

/// The top `limit` earners (at most 100, the snapshot's size) as of the workers' last refresh
/// of the snapshot (`worker.leaderboard_refresh_ms`, docs/contract.md §6), largest total first.
/// Names and `show_on_leaderboard` are read now: a user who hides or is erased is left out at
/// once, and the list is one shorter until the next refresh.
///
/// # Errors
/// Database errors.
pub async fn leaderboard(db: &PgPool, limit: i64) -> sqlx::Result<Vec<Leader>> {
    sqlx::query_as!(
        Leader,
        r#"select e.user_id as "user_id: UserId", u.name, e.total_earnings
           from leaderboard_entries e join users u on u.id = e.user_id
           where u.show_on_leaderboard
           order by e.rank limit $1"#,
        limit,
    )
    .fetch_all(db)
    .await
}

// ---------------------------------------------------------------------------------------------
// Commission lifecycle (contract §10): refunds, payout batches, the ledger history.

/// A refund as a worker recorded it (`refunds`).
#[derive(Debug)]
pub struct RefundRow {
    pub refund_id: String,
    pub purchase_id: String,
    /// As asked; `None` = everything still refundable.
    pub requested: Option<Decimal>,
    /// What it refunded, once applied.
    pub amount: Option<Decimal>,
    /// `waiting`, `applied` or `rejected`.
    pub status: String,
    pub reason: Option<String>,
    pub received_at: OffsetDateTime,
    pub applied_at: Option<OffsetDateTime>,
}

/// The stored fingerprint of refund `refund_id`, if a worker has recorded it.
///
/// # Errors
/// Database errors.
pub async fn refund_fingerprint(db: &PgPool, refund_id: &str) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar!(
        "select fingerprint from refunds where refund_id = $1",
        refund_id,
    )
    .fetch_optional(db)
    .await
}

/// A recorded refund.
///
/// # Errors
/// Database errors.
pub async fn refund(db: &PgPool, refund_id: &str) -> sqlx::Result<Option<RefundRow>> {
    sqlx::query_as!(
        RefundRow,
        r#"select refund_id, purchase_id, requested, amount, status, reason, received_at, applied_at
           from refunds where refund_id = $1"#,
        refund_id,
    )
    .fetch_optional(db)
    .await
}

/// What has been refunded of a purchase (`purchases.refunded`, zero when it is not recorded)
/// and its recorded refunds, oldest first (at most 1000).
///
/// # Errors
/// Database errors.
pub async fn purchase_refunds(
    db: &PgPool,
    purchase_id: &str,
) -> sqlx::Result<(Decimal, Vec<RefundRow>)> {
    let refunded = sqlx::query_scalar!(
        "select refunded from purchases where purchase_id = $1",
        purchase_id,
    )
    .fetch_optional(db)
    .await?
    .unwrap_or_default();
    let refunds = sqlx::query_as!(
        RefundRow,
        r#"select refund_id, purchase_id, requested, amount, status, reason, received_at, applied_at
           from refunds where purchase_id = $1 order by received_at, refund_id limit 1000"#,
        purchase_id,
    )
    .fetch_all(db)
    .await?;
    Ok((refunded, refunds))
}

/// A payout batch without its lines (`payouts`).
#[derive(Debug)]
pub struct PayoutRow {
    pub id: i64,
    /// `created` or `paid`.
    pub status: String,
    pub label: Option<String>,
    pub period_start: Option<OffsetDateTime>,
    pub period_end: OffsetDateTime,
    pub minimum: Decimal,
    pub currency: String,
    pub total: Decimal,
    pub line_count: i32,
    pub created_at: OffsetDateTime,
    pub paid_at: Option<OffsetDateTime>,
}

/// One earner's line of a payout batch, with the earner's name.
#[derive(Debug)]
pub struct PayoutLineRow {
    pub user_id: UserId,
    pub name: String,
    pub amount: Decimal,
    pub through_seq: i64,
}

/// A new payout batch, as `POST /api/payouts` asks for it.
#[derive(Debug)]
pub struct NewPayout<'a> {
    pub idempotency_key: &'a str,
    /// Tells a retry from a conflicting reuse of the key.
    pub fingerprint: &'a str,
    pub label: Option<&'a str>,
    /// Smallest approved balance that gets a line (`payout.minimum`).
    pub minimum: Money,
    pub currency: &'a str,
}

/// What [`create_payout`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayoutCreation {
    /// A new batch with this id.
    Created(i64),
    /// The key was used before with the same request: that batch.
    Existing(i64),
}

/// Serialises payout batch creation: an arbitrary constant naming "payout batches" among
/// advisory locks (held until the transaction ends).
const PAYOUT_LOCK: i64 = 7_001_002;

/// Creates a payout batch (contract §10) in `tx`, under a transaction-level advisory lock so
/// that two creations serialise: a line for every user whose approved balance is at least
/// `minimum` and above zero and who has no line in a batch not yet paid; the line pays the
/// whole approved balance, through the earner's current `seq`. The users read are locked
/// (`for no key update`, in id order) so that no ledger entry slips between the balance and
/// its `seq`. `period_start` is the previous batch's `period_end`; `period_end` is now.
///
/// # Errors
/// 409 `idempotency_conflict` when the key was used with another fingerprint; database errors.
pub async fn create_payout(
    tx: &mut PgConnection,
    new: &NewPayout<'_>,
) -> Result<PayoutCreation, ApiError> {
    sqlx::query!(
        r#"select pg_advisory_xact_lock($1) as "locked: ()""#,
        PAYOUT_LOCK
    )
    .execute(&mut *tx)
    .await?;
    if let Some(existing) = sqlx::query!(
        "select id, fingerprint from payouts where idempotency_key = $1",
        new.idempotency_key,
    )
    .fetch_optional(&mut *tx)
    .await?
    {
        return if existing.fingerprint == new.fingerprint {
            Ok(PayoutCreation::Existing(existing.id))
        } else {
            Err(ApiError::IdempotencyConflict)
        };
    }
    let lines = sqlx::query!(
        r#"select b.user_id as id, b.approved_earnings, b.earnings_seq from earner_balances b
           where b.approved_earnings >= $1 and b.approved_earnings > 0
             and not exists (select 1 from payout_lines l join payouts p on p.id = l.payout_id
                             where l.user_id = b.user_id and p.status = 'created')
           order by b.user_id
           for no key update of b"#,
        new.minimum.as_decimal(),
    )
    .fetch_all(&mut *tx)
    .await?;
    let total: Decimal = lines.iter().map(|l| l.approved_earnings).sum();
    let id = sqlx::query_scalar!(
        r#"insert into payouts (idempotency_key, fingerprint, status, label, period_start, period_end,
                                minimum, currency, total, line_count)
           values ($1, $2, 'created', $3, (select period_end from payouts order by id desc limit 1),
                   now(), $4, $5, $6, $7)
           returning id"#,
        new.idempotency_key,
        new.fingerprint,
        new.label,
        new.minimum.as_decimal(),
        new.currency,
        Money::from_total(total).as_decimal(),
        i32::try_from(lines.len()).unwrap_or(i32::MAX),
    )
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query!(
        r#"insert into payout_lines (payout_id, user_id, amount, through_seq)
           select $1, * from unnest($2::int8[], $3::numeric[], $4::int8[])"#,
        id,
        &lines.iter().map(|l| l.id).collect::<Vec<_>>(),
        &lines
            .iter()
            .map(|l| Money::from_total(l.approved_earnings).as_decimal())
            .collect::<Vec<_>>(),
        &lines.iter().map(|l| l.earnings_seq).collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?;
    Ok(PayoutCreation::Created(id))
}

/// A payout batch with its lines (by user id).
///
/// # Errors
/// Database errors.
pub async fn payout(
    conn: &mut PgConnection,
    id: i64,
) -> sqlx::Result<Option<(PayoutRow, Vec<PayoutLineRow>)>> {
    let Some(row) = sqlx::query_as!(
        PayoutRow,
        r#"select id, status, label, period_start, period_end, minimum, currency, total, line_count,
                  created_at, paid_at
           from payouts where id = $1"#,
        id,
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let lines = sqlx::query_as!(
        PayoutLineRow,
        r#"select l.user_id as "user_id: UserId", u.name, l.amount, l.through_seq
           from payout_lines l join users u on u.id = l.user_id
           where l.payout_id = $1 order by l.user_id"#,
        id,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some((row, lines)))
}

/// Payout batches with id below `before` (all when `None`), newest first.
///
/// # Errors
/// Database errors.
pub async fn payouts_page(
    db: &PgPool,
    before: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<PayoutRow>> {
    sqlx::query_as!(
        PayoutRow,
        r#"select id, status, label, period_start, period_end, minimum, currency, total, line_count,
                  created_at, paid_at
           from payouts where $1::int8 is null or id < $1
           order by id desc limit $2"#,
        before,
        limit,
    )
    .fetch_all(db)
    .await
}

/// Marks a payout batch paid (contract §10), idempotently: `false` if there is no such batch.
/// Under the batch's row lock and the line users' locks (`for no key update`, in id order),
/// appends to each earner's ledger a `payout` entry of the line's amount with the earner's
/// next `seq` and its totals after moving the amount from `approved` to `paid` (whatever the
/// approved balance is now: after a clawback it may go below zero, and later payouts recover
/// it), queues each entry in `earning_outbox` for the relay to publish, updates the users'
/// `seq` and balances, and sets the batch `paid`. A batch already paid is left as it is.
///
/// # Errors
/// Database errors.
pub async fn mark_payout_paid(tx: &mut PgConnection, id: i64, levels: usize) -> sqlx::Result<bool> {
    use upline_common::events::Totals;
    use upline_common::rules::{Balances, Movement};

    let Some(status) =
        sqlx::query_scalar!("select status from payouts where id = $1 for update", id)
            .fetch_optional(&mut *tx)
            .await?
    else {
        return Ok(false);
    };
    if status == "paid" {
        return Ok(true);
    }
    let lines = sqlx::query!(
        "select user_id, amount from payout_lines where payout_id = $1 order by user_id",
        id,
    )
    .fetch_all(&mut *tx)
    .await?;
    let ids: Vec<i64> = lines.iter().map(|l| l.user_id).collect();
    let users = sqlx::query!(
        r#"select user_id as id, earnings_seq, total_earnings, pending_earnings, approved_earnings,
                  paid_earnings, reversed_earnings
           from earner_balances where user_id = any($1) order by user_id for no key update"#,
        &ids,
    )
    .fetch_all(&mut *tx)
    .await?;
    let level_rows = sqlx::query!(
        r#"select user_id, level, total from earner_levels where user_id = any($1)"#,
        &ids,
    )
    .fetch_all(&mut *tx)
    .await?;
    let currency = sqlx::query_scalar!("select currency from payouts where id = $1", id)
        .fetch_one(&mut *tx)
        .await?;
    let mut earners = Vec::with_capacity(users.len());
    let mut seqs = Vec::with_capacity(users.len());
    let mut amounts = Vec::with_capacity(users.len());
    let mut approved = Vec::with_capacity(users.len());
    let mut paid = Vec::with_capacity(users.len());
    let mut totals = Vec::with_capacity(users.len());
    for user in &users {
        let Some(line) = lines.iter().find(|l| l.user_id == user.id) else {
            continue;
        };
        let amount = Money::from_total(line.amount);
        let mut balances = Balances {
            pending: Money::from_total(user.pending_earnings),
            approved: Money::from_total(user.approved_earnings),
            paid: Money::from_total(user.paid_earnings),
            reversed: Money::from_total(user.reversed_earnings),
        };
        balances.apply(Movement::PayOut, amount);
        let mut by_level = vec![Money::ZERO; levels];
        for row in level_rows.iter().filter(|r| r.user_id == user.id) {
            let slot = usize::try_from(row.level)
                .ok()
                .and_then(|l| l.checked_sub(1))
                .and_then(|i| by_level.get_mut(i));
            if let Some(slot) = slot {
                *slot = Money::from_total(row.total);
            }
        }
        let snapshot = Totals {
            total: Money::from_total(user.total_earnings),
            levels: by_level,
            balances,
        };
        earners.push(user.id);
        seqs.push(user.earnings_seq + 1);
        amounts.push(amount.as_decimal());
        approved.push(balances.approved.as_decimal());
        paid.push(balances.paid.as_decimal());
        totals.push(serde_json::to_string(&snapshot).expect("totals serialise"));
    }
    sqlx::query!(
        r#"with new as (
               insert into earnings (earner_id, seq, kind, amount, currency, payout_id, totals)
               select earner, seq, 'payout', amount, $5, $6, totals::jsonb
               from unnest($1::int8[], $2::int8[], $3::numeric[], $4::text[])
                    as t(earner, seq, amount, totals)
               returning id
           )
           insert into earning_outbox (earning_id) select id from new"#,
        &earners,
        &seqs,
        &amounts,
        &totals,
        currency,
        id,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        r#"update earner_balances b set earnings_seq = t.seq, approved_earnings = t.approved,
                  paid_earnings = t.paid
           from unnest($1::int8[], $2::int8[], $3::numeric[], $4::numeric[])
                as t(id, seq, approved, paid)
           where b.user_id = t.id"#,
        &earners,
        &seqs,
        &approved,
        &paid,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "update payouts set status = 'paid', paid_at = now() where id = $1",
        id
    )
    .execute(&mut *tx)
    .await?;
    Ok(true)
}

/// The filters of a user's ledger history (`GET /api/users/{id}/earnings/history`).
#[derive(Debug, Default, Clone)]
pub struct HistoryFilter {
    /// Entries with `seq` below this (the cursor); all when `None`.
    pub before_seq: Option<i64>,
    /// `pending`, `approved`, `paid` or `reversed`.
    pub status: Option<String>,
    /// `commission`, `reversal`, `approval` or `payout`.
    pub kind: Option<String>,
    pub level: Option<i16>,
    /// `created_at >= from`.
    pub from: Option<OffsetDateTime>,
    /// `created_at < to`.
    pub to: Option<OffsetDateTime>,
}

/// One ledger entry with its derived status.
#[derive(Debug)]
pub struct HistoryRow {
    pub earning_id: i64,
    pub seq: i64,
    pub kind: upline_common::rules::EntryKind,
    pub status: String,
    pub amount: Decimal,
    pub currency: String,
    pub level: Option<Level>,
    pub source_user_id: Option<UserId>,
    pub purchase_id: Option<String>,
    pub refers_to: Option<i64>,
    pub refund_id: Option<String>,
    pub payout_id: Option<i64>,
    pub created_at: OffsetDateTime,
}

/// A user's ledger entries, newest first (`seq` descending), at most `limit`, with each
/// entry's status (contract §10): a reversal is `reversed`, an approval `approved`, a payout
/// `paid`; a commission is `reversed` when its reversals add up to its whole amount, else
/// `pending` while held with no approval entry, else `paid` when the `seq` at which it became
/// approved (its approval's, or its own when it was never held) is covered by a line of a
/// paid payout batch (`through_seq`), else `approved`.
///
/// # Errors
/// Database errors.
pub async fn history(
    db: &PgPool,
    user_id: UserId,
    filter: &HistoryFilter,
    limit: i64,
) -> sqlx::Result<Vec<HistoryRow>> {
    sqlx::query_as!(
        HistoryRow,
        r#"select h.id as "earning_id!", h.seq as "seq!", h.kind as "kind!: upline_common::rules::EntryKind",
                  h.status as "status!", h.amount as "amount!", h.currency as "currency!",
                  h.level as "level: Level", h.source_user_id as "source_user_id: UserId",
                  h.purchase_id, h.refers_to, h.refund_id, h.payout_id, h.created_at as "created_at!"
           from (
               select e.id, e.seq, e.kind, e.amount, e.currency, e.level, e.source_user_id,
                      e.purchase_id, e.refers_to, e.refund_id, e.payout_id, e.created_at,
                      case e.kind
                          when 'reversal' then 'reversed'
                          when 'approval' then 'approved'
                          when 'payout' then 'paid'
                          else case
                              when -coalesce(rev.total, 0) >= e.amount then 'reversed'
                              when e.hold_until is not null and ap.seq is null then 'pending'
                              when exists (
                                  select 1 from payout_lines l join payouts p on p.id = l.payout_id
                                  where l.user_id = e.earner_id and p.status = 'paid'
                                    and l.through_seq >= coalesce(ap.seq, e.seq)) then 'paid'
                              else 'approved'
                          end
                      end as status
               from earnings e
               left join lateral (
                   select sum(r.amount) as total from earnings r
                   where r.kind = 'reversal' and r.refers_to = e.id
               ) rev on e.kind = 'commission'
               left join lateral (
                   select a.seq from earnings a where a.kind = 'approval' and a.refers_to = e.id
               ) ap on e.kind = 'commission'
               where e.earner_id = $1
                 and ($2::int8 is null or e.seq < $2)
                 and ($3::text is null or e.kind = $3)
                 and ($4::int2 is null or e.level = $4)
                 and ($5::timestamptz is null or e.created_at >= $5)
                 and ($6::timestamptz is null or e.created_at < $6)
           ) h
           where $7::text is null or h.status = $7
           order by h.seq desc
           limit $8"#,
        user_id.get(),
        filter.before_seq,
        filter.kind.as_deref(),
        filter.level,
        filter.from,
        filter.to,
        filter.status.as_deref(),
        limit,
    )
    .fetch_all(db)
    .await
}

// ---------------------------------------------------------------------------------------------
// Webhook endpoints (contract §11); the webhooks service's own SQL is in `upline-webhooks`.

/// A webhook endpoint without its secrets.
#[derive(Debug)]
pub struct WebhookEndpointRow {
    pub id: i64,
    pub url: String,
    pub description: String,
    pub event_types: Vec<String>,
    pub disabled_at: Option<OffsetDateTime>,
    pub disabled_reason: Option<String>,
    pub failing_since: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
}

/// Registers an endpoint with the signing key `secret` (base64), unless `max_endpoints` exist
/// already (`None`). Registrations are counted one at a time (an advisory lock), so the limit
/// holds under concurrent requests.
///
/// # Errors
/// Database errors.
pub async fn create_webhook_endpoint(
    db: &PgPool,
    url: &str,
    description: &str,
    event_types: &[String],
    secret: &str,
    max_endpoints: i64,
) -> sqlx::Result<Option<WebhookEndpointRow>> {
    let mut tx = db.begin().await?;
    sqlx::query!("select pg_advisory_xact_lock(hashtext('upline.webhook_endpoints'))")
        .execute(&mut *tx)
        .await?;
    let count = sqlx::query_scalar!(r#"select count(*) as "n!" from webhook_endpoints"#)
        .fetch_one(&mut *tx)
        .await?;
    if count >= max_endpoints {
        return Ok(None);
    }
    let row = sqlx::query_as!(
        WebhookEndpointRow,
        r#"insert into webhook_endpoints (url, description, event_types, secret)
           values ($1, $2, $3, $4)
           returning id, url, description, event_types, disabled_at, disabled_reason,
                     failing_since, created_at"#,
        url,
        description,
        event_types,
        secret,
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(row))
}

/// One endpoint.
///
/// # Errors
/// Database errors.
pub async fn webhook_endpoint(db: &PgPool, id: i64) -> sqlx::Result<Option<WebhookEndpointRow>> {
    sqlx::query_as!(
        WebhookEndpointRow,
        r#"select id, url, description, event_types, disabled_at, disabled_reason,
                  failing_since, created_at
           from webhook_endpoints where id = $1"#,
        id,
    )
    .fetch_optional(db)
    .await
}

/// Endpoints with an id above `after`, oldest first.
///
/// # Errors
/// Database errors.
pub async fn webhook_endpoints_page(
    db: &PgPool,
    after: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<WebhookEndpointRow>> {
    sqlx::query_as!(
        WebhookEndpointRow,
        r#"select id, url, description, event_types, disabled_at, disabled_reason,
                  failing_since, created_at
           from webhook_endpoints where id > coalesce($1::int8, 0) order by id limit $2"#,
        after,
        limit,
    )
    .fetch_all(db)
    .await
}

/// Deletes an endpoint with its deliveries; false when there is none.
///
/// # Errors
/// Database errors.
pub async fn delete_webhook_endpoint(db: &PgPool, id: i64) -> sqlx::Result<bool> {
    let done = sqlx::query!("delete from webhook_endpoints where id = $1", id)
        .execute(db)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Makes `secret` the endpoint's key and keeps the current one signing for `overlap`; returns
/// when it stops, or `None` when there is no such endpoint.
///
/// # Errors
/// Database errors.
pub async fn rotate_webhook_secret(
    db: &PgPool,
    id: i64,
    secret: &str,
    overlap: std::time::Duration,
) -> sqlx::Result<Option<OffsetDateTime>> {
    sqlx::query_scalar!(
        r#"update webhook_endpoints
              set previous_secret = secret, secret = $2,
                  previous_secret_expires_at = now() + make_interval(secs => $3)
            where id = $1
        returning previous_secret_expires_at as "expires!""#,
        id,
        secret,
        overlap.as_secs_f64(),
    )
    .fetch_optional(db)
    .await
}

/// Enables an endpoint and makes its pending deliveries due at once.
///
/// # Errors
/// Database errors.
pub async fn enable_webhook_endpoint(
    db: &PgPool,
    id: i64,
) -> sqlx::Result<Option<WebhookEndpointRow>> {
    let mut tx = db.begin().await?;
    let row = sqlx::query_as!(
        WebhookEndpointRow,
        r#"update webhook_endpoints
              set disabled_at = null, disabled_reason = null, failing_since = null
            where id = $1
        returning id, url, description, event_types, disabled_at, disabled_reason,
                  failing_since, created_at"#,
        id,
    )
    .fetch_optional(&mut *tx)
    .await?;
    if row.is_some() {
        sqlx::query!(
            r#"update webhook_deliveries set next_attempt_at = now()
                where endpoint_id = $1 and status = 'pending' and next_attempt_at > now()"#,
            id,
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(row)
}

/// A delivery with its message.
#[derive(Debug)]
pub struct WebhookDeliveryRow {
    pub id: i64,
    pub message_id: String,
    pub event_type: String,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: Option<OffsetDateTime>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: OffsetDateTime,
    pub delivered_at: Option<OffsetDateTime>,
    pub payload: String,
}

/// One attempt of a delivery.
#[derive(Debug)]
pub struct WebhookAttemptRow {
    pub delivery_id: i64,
    pub attempted_at: OffsetDateTime,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i32,
}

/// An endpoint's deliveries with an id below `before`, newest first, optionally of one
/// `status`, with the latest 20 attempts of each (newest first).
///
/// # Errors
/// Database errors.
pub async fn webhook_deliveries_page(
    db: &PgPool,
    endpoint_id: i64,
    status: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> sqlx::Result<(Vec<WebhookDeliveryRow>, Vec<WebhookAttemptRow>)> {
    let rows = sqlx::query_as!(
        WebhookDeliveryRow,
        r#"select d.id, d.message_id, m.event_type, d.status, d.attempts, d.next_attempt_at,
                  d.last_status_code, d.last_error, d.created_at, d.delivered_at, m.payload
           from webhook_deliveries d join webhook_messages m on m.id = d.message_id
           where d.endpoint_id = $1 and ($2::text is null or d.status = $2)
             and d.id < coalesce($3, 9223372036854775807)
           order by d.id desc limit $4"#,
        endpoint_id,
        status,
        before,
        limit,
    )
    .fetch_all(db)
    .await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let attempts = sqlx::query_as!(
        WebhookAttemptRow,
        r#"select a.delivery_id as "delivery_id!", a.attempted_at as "attempted_at!",
                  a.status_code, a.error, a.duration_ms as "duration_ms!"
           from unnest($1::int8[]) as d (id)
           cross join lateral (
               select delivery_id, attempted_at, status_code, error, duration_ms
               from webhook_attempts where delivery_id = d.id order by id desc limit 20) a"#,
        &ids,
    )
    .fetch_all(db)
    .await?;
    Ok((rows, attempts))
}

/// Queues a delivery of the endpoint for an attempt at once, with a fresh run of retries;
/// false when the endpoint has no such delivery.
///
/// # Errors
/// Database errors.
pub async fn replay_webhook_delivery(
    db: &PgPool,
    endpoint_id: i64,
    delivery_id: i64,
) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        r#"update webhook_deliveries
              set status = 'pending', attempts = 0, started_at = null, next_attempt_at = now()
            where id = $1 and endpoint_id = $2"#,
        delivery_id,
        endpoint_id,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() > 0)
}
