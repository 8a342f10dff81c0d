//! Reports: a user's earnings and referrals, and the leaderboard.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use upline_common::http::Problem;
use upline_common::money::Money;
use upline_common::UserId;

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::extract::{PathId, Query};
use crate::model::{EarningsReport, LegEarnings, Referrals};
use crate::responses::{PublicErrors, UserOrAdminErrors};
use crate::{store, AppState};

/// Latest earnings listed in the summary.
const RECENT: i64 = 20;
/// Rows of `by_referral`.
const BY_REFERRAL: i64 = 100;

#[utoipa::path(
    get,
    path = "/api/users/{id}/earnings",
    operation_id = "user_earnings",
    summary = "A user's earnings",
    description = "`total` and `count`; the money by state (contract §10): `pending`, `approved`, `paid` (`total = pending + approved + paid`) and `reversed`; `by_level`, every configured level with zero included; `by_referral`, the 100 largest (buyer, level) sources; `by_leg`, per direct referral and everyone below them, largest first; `recent`, the 20 latest ledger entries as earning events (SPEC §4, contract §10), newest first.",
    tag = "reports",
    params(
        ("id" = i64, Path, minimum = 1, description = "The user's id"),
    ),
    responses(
        (status = 200, description = "The user's earnings: totals by state, per level, per referral and per leg, and the latest events", body = EarningsReport),
        (status = 404, description = "`not_found`: no user with this id", body = Problem, content_type = "application/problem+json"),
        UserOrAdminErrors,
    ),
    security(("user_token" = []), ("admin_key" = [])),
)]
/// `GET /api/users/{id}/earnings` (the user, admin): `{user_id, total, count, pending,
/// approved, paid, reversed, by_level, by_referral, by_leg, recent}` (contract §4, §10).
/// Money by state comes from the user's balances (`total = pending + approved + paid`);
/// `by_level` and each leg's `by_level` list every configured level; `by_leg` has one entry
/// per direct referral whose leg brought anything, largest total first; `recent` the latest
/// 20 ledger entries as earning events, newest first.
///
/// # Errors
/// 404 `not_found` for no such user; 401/403 as [`Authenticated::user_or_admin`] says.
pub async fn earnings(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
) -> Result<Json<EarningsReport>, ApiError> {
    caller.user_or_admin(id)?;
    let db = state.report_pool(id).await;
    let balances = store::earnings_balances(db, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no user with id {id}")))?;
    let levels = state.rules.rates.len();
    let mut by_level: BTreeMap<String, Money> =
        (1..=levels).map(|l| (l.to_string(), Money::ZERO)).collect();
    let mut count = 0;
    for (level, total, n) in store::level_totals(db, id).await? {
        by_level.insert(level.to_string(), Money::from_total(total));
        count += n;
    }
    let by_referral = store::earnings_by_referral(db, id, BY_REFERRAL).await?;
    let by_leg = LegEarnings::from_rows(store::earnings_by_leg(db, id).await?, levels);
    let recent = upline_common::db::recent_earnings(db, id, RECENT).await?;
    Ok(Json(EarningsReport {
        user_id: id,
        total: Money::from_total(balances.total),
        count,
        pending: Money::from_total(balances.pending),
        approved: Money::from_total(balances.approved),
        paid: Money::from_total(balances.paid),
        reversed: Money::from_total(balances.reversed),
        by_level,
        by_referral,
        by_leg,
        recent,
    }))
}

#[utoipa::path(
    get,
    path = "/api/users/{id}/referrals",
    operation_id = "user_referrals",
    summary = "A user's referrals",
    description = "Direct referrals (`level_1`) and their referrals (`level_2`), by id.",
    tag = "reports",
    params(
        ("id" = i64, Path, minimum = 1, description = "The user's id"),
    ),
    responses(
        (status = 200, description = "The user's downline, two levels deep", body = Referrals),
        (status = 404, description = "`not_found`: no user with this id", body = Problem, content_type = "application/problem+json"),
        UserOrAdminErrors,
    ),
    security(("user_token" = []), ("admin_key" = [])),
)]
/// `GET /api/users/{id}/referrals` (the user, admin): the downline two levels deep.
pub async fn referrals(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
) -> Result<Json<Referrals>, ApiError> {
    caller.user_or_admin(id)?;
    let db = state.report_pool(id).await;
    if !store::user_exists(db, id).await? {
        return Err(ApiError::NotFound(format!("no user with id {id}")));
    }
    let level_1 = store::referrals_of(db, &[id]).await?;
    let ids: Vec<UserId> = level_1.iter().map(|r| r.id).collect();
    let level_2 = store::referrals_of(db, &ids).await?;
    Ok(Json(Referrals {
        user_id: id,
        level_1,
        level_2,
    }))
}

/// `GET /api/leaderboard` query: `limit`, 1–100 (default 10).
#[derive(Debug, Deserialize)]
pub struct LeaderboardQuery {
    limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/leaderboard",
    operation_id = "leaderboard",
    summary = "Leaderboard",
    description = "The top earners by total earnings, largest first; no emails. A snapshot the workers refresh every `worker.leaderboard_refresh_ms` (default 10 s): totals and order may be that old. A user who hides (`show_on_leaderboard`) or is erased is left out at once.",
    tag = "reports",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "How many, 1–100 (default 10)"),
    ),
    responses(
        (status = 200, description = "The top earners, largest first; no emails", body = Vec<crate::store::Leader>),
        (status = 422, description = "`validation_failed`: `field` is `limit` or `query`", body = Problem, content_type = "application/problem+json"),
        PublicErrors,
    ),
    security(()),
)]
/// `GET /api/leaderboard?limit=10` (anyone): top earners `[{user_id, name, total_earnings}]`.
pub async fn leaderboard(
    State(state): State<AppState>,
    Query(q): Query<LeaderboardQuery>,
) -> Result<Json<Vec<store::Leader>>, ApiError> {
    let limit = q.limit.unwrap_or(10);
    // The snapshot's size; the OpenAPI `maximum` above says the same.
    let max = i64::from(upline_common::db::LEADERBOARD_ENTRIES);
    if !(1..=max).contains(&limit) {
        return Err(ApiError::validation(
            "limit",
            format!("must be between 1 and {max}"),
        ));
    }
    let db = state.reports.pool();
    let leaders = match store::leaderboard(db, limit).await {
        Ok(leaders) => leaders,
        // The standby went away since the last check: the primary answers instead.
        Err(_) if state.reports.is_standby(db) => {
            state.reports.standby_failed();
            store::leaderboard(state.reports.primary(), limit).await?
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Json(leaders))
}
