//! `/api/users`: registration, the referral tree's edges, activation, tokens.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use upline_common::UserId;

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::extract::{opt_str, opt_user_id, JsonObject, PathId, Query};
use crate::{store, AppState};

/// Characters of referral codes: no 0/O or 1/I/L to misread.
const CODE_ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";
const CODE_LEN: usize = 8;

fn new_referral_code() -> String {
    let mut rng = rand::thread_rng();
    (0..CODE_LEN)
        .map(|_| char::from(CODE_ALPHABET[rng.gen_range(0..CODE_ALPHABET.len())]))
        .collect()
}

fn parse_name(map: &Map<String, Value>) -> Result<String, ApiError> {
    let name = opt_str(map, "name")?.map(str::trim).unwrap_or_default();
    if name.is_empty() {
        return Err(ApiError::validation("name", "is required"));
    }
    if name.chars().count() > 100 {
        return Err(ApiError::validation(
            "name",
            "must be at most 100 characters",
        ));
    }
    Ok(name.to_owned())
}

fn parse_email(map: &Map<String, Value>) -> Result<String, ApiError> {
    let email = opt_str(map, "email")?.map(str::trim).unwrap_or_default();
    if email.is_empty() {
        return Err(ApiError::validation("email", "is required"));
    }
    let valid = email.len() <= 254
        && !email.chars().any(char::is_whitespace)
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        });
    if !valid {
        return Err(ApiError::validation(
            "email",
            "must be an email address such as asha@example.com",
        ));
    }
    Ok(email.to_owned())
}

/// The referrer named by `referrer_id` and/or `referral_code` (they must agree).
async fn parse_referrer(
    state: &AppState,
    map: &Map<String, Value>,
) -> Result<Option<UserId>, ApiError> {
    let by_id = opt_user_id(map, "referrer_id")?;
    let code = opt_str(map, "referral_code")?
        .map(str::trim)
        .filter(|c| !c.is_empty());
    let by_code = match code {
        None => None,
        Some(code) => Some(
            store::user_id_by_code(&state.db, code)
                .await?
                .ok_or(ApiError::ReferrerNotFound)?,
        ),
    };
    match (by_id, by_code) {
        (Some(a), Some(b)) if a != b => Err(ApiError::validation(
            "referral_code",
            "names a different user than referrer_id; send one of them",
        )),
        (a, b) => Ok(a.or(b)),
    }
}

/// `POST /api/users`: registers a user, optionally under a referrer. 201 with the user, its
/// `referral_code` and its `token`.
pub async fn register(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<impl IntoResponse, ApiError> {
    let name = parse_name(&body)?;
    let email = parse_email(&body)?;
    let referrer = parse_referrer(&state, &body).await?;
    for _ in 0..5 {
        let mut tx = state.db.begin().await?;
        if let Some(referrer_id) = referrer {
            store::take_referral_slot(&mut tx, referrer_id, state.max_direct).await?;
        }
        let Some(user) =
            store::insert_user(&mut tx, &name, &email, &new_referral_code(), referrer).await?
        else {
            continue; // referral code collision: draw again
        };
        tx.commit().await?;
        metrics::counter!("upline_users_registered_total").increment(1);
        let token = state.auth.issue(user.id);
        let mut body = serde_json::to_value(&user).map_err(anyhow::Error::from)?;
        body["token"] = json!(token);
        return Ok((
            StatusCode::CREATED,
            [(
                axum::http::header::LOCATION,
                format!("/api/users/{}", user.id),
            )],
            Json(body),
        ));
    }
    Err(ApiError::Internal(anyhow::anyhow!(
        "could not draw a unique referral code"
    )))
}

#[derive(Debug, Deserialize)]
pub struct Page {
    limit: Option<i64>,
    cursor: Option<String>,
}

/// `GET /api/users?limit=&cursor=` (admin): users by id; `next_cursor` is absent on the last page.
pub async fn list(
    State(state): State<AppState>,
    caller: Authenticated,
    Query(page): Query<Page>,
) -> Result<impl IntoResponse, ApiError> {
    caller.admin()?;
    let limit = page.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::validation("limit", "must be between 1 and 500"));
    }
    let after = match page.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => c
            .parse()
            .map_err(|_| ApiError::validation("cursor", "is not a cursor this API returned"))?,
    };
    let users = store::users_page(&state.db, after, limit).await?;
    let next = (users.len() as i64 == limit)
        .then(|| users.last().map(|u| u.id.to_string()))
        .flatten();
    Ok(Json(json!({ "items": users, "next_cursor": next })))
}

/// `GET /api/me` (any credentials): who the bearer is — `{"role": "admin" | "producer"}` or
/// `{"role": "user", "user": {…}}`. The dashboard uses it to sign in.
pub async fn me(State(state): State<AppState>, caller: Authenticated) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(match caller.0 {
        crate::auth::Caller::Admin => json!({ "role": "admin" }),
        crate::auth::Caller::Producer => json!({ "role": "producer" }),
        crate::auth::Caller::User(id) => {
            let user = store::user(&state.db, id).await?.ok_or(ApiError::Forbidden)?;
            json!({ "role": "user", "user": user })
        }
    }))
}

/// `GET /api/users/{id}` (the user, admin).
pub async fn get(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
) -> Result<impl IntoResponse, ApiError> {
    caller.user_or_admin(id)?;
    let user = store::user(&state.db, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no user with id {id}")))?;
    Ok(Json(user))
}

/// `PUT /api/users/{id}/referrer` (the user, admin): sets the referrer once.
pub async fn set_referrer(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
    JsonObject(body): JsonObject,
) -> Result<impl IntoResponse, ApiError> {
    caller.user_or_admin(id)?;
    let referrer_id = parse_referrer(&state, &body)
        .await?
        .ok_or_else(|| ApiError::validation("referrer_id", "send referrer_id or referral_code"))?;
    let mut tx = state.db.begin().await?;
    store::lock_referral_graph(&mut tx).await?;
    if store::lock_user_referrer(&mut tx, id).await?.is_some() {
        return Err(ApiError::AlreadyReferred);
    }
    if referrer_id == id {
        return Err(ApiError::SelfReferral);
    }
    if store::upline_contains(&mut tx, referrer_id, id).await? {
        return Err(ApiError::ReferralCycle);
    }
    store::take_referral_slot(&mut tx, referrer_id, state.max_direct).await?;
    store::set_referrer(&mut tx, id, referrer_id).await?;
    let user = store::user(&mut *tx, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no user with id {id}")))?;
    tx.commit().await?;
    Ok(Json(user))
}

/// `POST /api/users/{id}/deactivate` (admin).
pub async fn deactivate(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
) -> Result<impl IntoResponse, ApiError> {
    set_active(state, caller, id, false).await
}

/// `POST /api/users/{id}/reactivate` (admin).
pub async fn reactivate(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
) -> Result<impl IntoResponse, ApiError> {
    set_active(state, caller, id, true).await
}

async fn set_active(
    state: AppState,
    caller: Authenticated,
    id: UserId,
    active: bool,
) -> Result<Json<store::User>, ApiError> {
    caller.admin()?;
    let user = store::set_active(&state.db, id, active)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no user with id {id}")))?;
    Ok(Json(user))
}

/// `POST /api/users/{id}/token` (admin): a fresh token for the user.
pub async fn token(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
) -> Result<impl IntoResponse, ApiError> {
    caller.admin()?;
    if !store::user_exists(&state.db, id).await? {
        return Err(ApiError::NotFound(format!("no user with id {id}")));
    }
    Ok(Json(
        json!({ "user_id": id, "token": state.auth.issue(id) }),
    ))
}
