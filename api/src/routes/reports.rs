//! Reports: a user's earnings and referrals, and the leaderboard.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use upline_common::money::Money;
use upline_common::UserId;

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::extract::{PathId, Query};
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
    description = "`total` and `count`; `by_level`, every configured level with zero included; `by_referral`, the 100 largest (buyer, level) sources; `recent`, the 20 latest earning events (SPEC §4), newest first.",
    tag = "reports",
    params(
        ("id" = i64, Path, minimum = 1, description = "The user's id"),
    ),
    responses(
        (status = 200, description = "The user's earnings: totals per level, per referral, and the latest events", body = crate::openapi::EarningsReport),
        (status = 401, description = "`unauthorized`: no `Authorization: Bearer` credentials", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: neither this user's token nor the admin key", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no user with this id", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal_error`: logged; the detail says nothing more", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
    security(("user_token" = []), ("admin_key" = [])),
)]
/// `GET /api/users/{id}/earnings` (the user, admin): `{user_id, total, count, by_level,
/// by_referral, recent}`; `by_level` lists every configured level, `recent` the latest 20
/// earning events (SPEC §4), newest first.
pub async fn earnings(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
) -> Result<impl IntoResponse, ApiError> {
    caller.user_or_admin(id)?;
    let user = store::user(&state.db, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no user with id {id}")))?;
    let mut by_level: BTreeMap<String, Money> = (1..=state.rules.rates.len())
        .map(|l| (l.to_string(), Money::ZERO))
        .collect();
    let mut count = 0;
    for (level, total, n) in store::level_totals(&state.db, id).await? {
        by_level.insert(level.to_string(), Money::from_total(total));
        count += n;
    }
    let by_referral = store::earnings_by_referral(&state.db, id, BY_REFERRAL).await?;
    let recent = upline_common::db::recent_earnings(&state.db, id, RECENT).await?;
    Ok(Json(json!({
        "user_id": id,
        "total": Money::from_total(user.total_earnings),
        "count": count,
        "by_level": by_level,
        "by_referral": by_referral,
        "recent": recent,
    })))
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
        (status = 200, description = "The user's downline, two levels deep", body = crate::openapi::Referrals),
        (status = 401, description = "`unauthorized`: no `Authorization: Bearer` credentials", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: neither this user's token nor the admin key", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no user with this id", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal_error`: logged; the detail says nothing more", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
    security(("user_token" = []), ("admin_key" = [])),
)]
/// `GET /api/users/{id}/referrals` (the user, admin): the downline two levels deep.
pub async fn referrals(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
) -> Result<impl IntoResponse, ApiError> {
    caller.user_or_admin(id)?;
    if !store::user_exists(&state.db, id).await? {
        return Err(ApiError::NotFound(format!("no user with id {id}")));
    }
    let level_1 = store::referrals_of(&state.db, &[id]).await?;
    let ids: Vec<UserId> = level_1.iter().map(|r| r.id).collect();
    let level_2 = store::referrals_of(&state.db, &ids).await?;
    Ok(Json(
        json!({ "user_id": id, "level_1": level_1, "level_2": level_2 }),
    ))
}

#[derive(Debug, Deserialize)]
pub struct LeaderboardQuery {
    limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/leaderboard",
    operation_id = "leaderboard",
    summary = "Leaderboard",
    description = "The top earners by total earnings, largest first; no emails.",
    tag = "reports",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "How many, 1–100 (default 10)"),
    ),
    responses(
        (status = 200, description = "The top earners, largest first; no emails", body = Vec<crate::store::Leader>),
        (status = 422, description = "`validation_failed`: `field` is `limit` or `query`", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal_error`: logged; the detail says nothing more", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
    security(()),
)]
/// `GET /api/leaderboard?limit=10` (anyone): top earners `[{user_id, name, total_earnings}]`.
pub async fn leaderboard(
    State(state): State<AppState>,
    Query(q): Query<LeaderboardQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = q.limit.unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::validation("limit", "must be between 1 and 100"));
    }
    Ok(Json(store::leaderboard(&state.db, limit).await?))
}
