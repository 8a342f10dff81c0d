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

#[utoipa::path(
    post,
    path = "/api/users",
    operation_id = "register_user",
    summary = "Register a user",
    description = "Registers a user, optionally under a referrer named by `referrer_id` or `referral_code`. Answers 201 with the user, its own `referral_code` to share, and its `token`.",
    tag = "users",
    request_body(content = crate::openapi::RegisterRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Registered: the user with its `referral_code` and `token`", body = crate::openapi::RegisteredUser,
            headers(("Location" = String, description = "`/api/users/{id}`"))),
        (status = 400, description = "`invalid_json`: the body is not a JSON object", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`referrer_not_found`: no user has this `referrer_id` or `referral_code`", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`email_taken`; `referral_limit_reached`: the referrer has the most direct referrals allowed; `referrer_inactive`", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: `field` names the bad one (`name`, `email`, `referrer_id`, `referral_code`)", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal_error`: logged; the detail says nothing more", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
    security(()),
)]
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

#[utoipa::path(
    get,
    path = "/api/users",
    operation_id = "list_users",
    summary = "List users",
    description = "Users by id, `limit` at a time; pass `next_cursor` as `cursor` for the next page (it is null on the last one).",
    tag = "users",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "Page size, 1–500 (default 50)"),
        ("cursor" = Option<String>, Query, pattern = "^[0-9]*$", description = "`next_cursor` of the previous page; absent for the first page"),
    ),
    responses(
        (status = 200, description = "A page of users by id; `next_cursor` is null on the last page", body = crate::openapi::UserPage),
        (status = 401, description = "`unauthorized`: no `Authorization: Bearer` credentials", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: invalid credentials, or credentials that do not allow this request", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: `field` is `limit`, `cursor` or `query`", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal_error`: logged; the detail says nothing more", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
    security(("admin_key" = [])),
)]
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

#[utoipa::path(
    get,
    path = "/api/me",
    operation_id = "whoami",
    summary = "Who am I",
    description = "Who the bearer is: `{\"role\": \"admin\"}`, `{\"role\": \"producer\"}` or `{\"role\": \"user\", \"user\": {…}}`. The dashboard signs in with it.",
    tag = "users",
    responses(
        (status = 200, description = "Who the bearer is: `admin`, `producer`, or `user` with the user", body = crate::openapi::Me),
        (status = 401, description = "`unauthorized`: no `Authorization: Bearer` credentials", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: credentials that are not valid (or the token's user no longer exists)", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal_error`: logged; the detail says nothing more", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
    security(("user_token" = []), ("admin_key" = []), ("producer_key" = [])),
)]
/// `GET /api/me` (any credentials): who the bearer is — `{"role": "admin" | "producer"}` or
/// `{"role": "user", "user": {…}}`. The dashboard uses it to sign in.
pub async fn me(
    State(state): State<AppState>,
    caller: Authenticated,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(match caller.0 {
        crate::auth::Caller::Admin => json!({ "role": "admin" }),
        crate::auth::Caller::Producer => json!({ "role": "producer" }),
        crate::auth::Caller::User(id) => {
            let user = store::user(&state.db, id)
                .await?
                .ok_or(ApiError::Forbidden)?;
            json!({ "role": "user", "user": user })
        }
    }))
}

#[utoipa::path(
    get,
    path = "/api/users/{id}",
    operation_id = "get_user",
    summary = "Get a user",
    tag = "users",
    params(
        ("id" = i64, Path, minimum = 1, description = "The user's id"),
    ),
    responses(
        (status = 200, description = "The user", body = crate::store::User),
        (status = 401, description = "`unauthorized`: no `Authorization: Bearer` credentials", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: neither this user's token nor the admin key", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no user with this id", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal_error`: logged; the detail says nothing more", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
    security(("user_token" = []), ("admin_key" = [])),
)]
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

#[utoipa::path(
    put,
    path = "/api/users/{id}/referrer",
    operation_id = "set_referrer",
    summary = "Set a user's referrer",
    description = "Sets the referrer once, e.g. a referral code entered after sign-up. The referral graph stays a forest (no self-referral, no cycle); the referrer must be active and below its direct-referral limit.",
    tag = "users",
    params(
        ("id" = i64, Path, minimum = 1, description = "The user's id"),
    ),
    request_body(content = crate::openapi::SetReferrerRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The user, now with its referrer", body = crate::store::User),
        (status = 400, description = "`invalid_json`: the body is not a JSON object", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: no `Authorization: Bearer` credentials", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: neither this user's token nor the admin key", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no user with this id; `referrer_not_found`: no user has this `referrer_id` or `referral_code`", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`already_referred`: a referrer is set once; `referral_limit_reached`; `referrer_inactive`", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` (`referrer_id`, `referral_code`); `self_referral`; `referral_cycle`: the referrer is in this user's downline", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal_error`: logged; the detail says nothing more", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
    security(("user_token" = []), ("admin_key" = [])),
)]
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

#[utoipa::path(
    post,
    path = "/api/users/{id}/deactivate",
    operation_id = "deactivate_user",
    summary = "Deactivate a user",
    description = "An inactive user earns nothing: its levels of later purchases show `inactive`.",
    tag = "users",
    params(
        ("id" = i64, Path, minimum = 1, description = "The user's id"),
    ),
    responses(
        (status = 200, description = "The user, inactive: it earns nothing until reactivated", body = crate::store::User),
        (status = 401, description = "`unauthorized`: no `Authorization: Bearer` credentials", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: invalid credentials, or credentials that do not allow this request", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no user with this id", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal_error`: logged; the detail says nothing more", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
    security(("admin_key" = [])),
)]
/// `POST /api/users/{id}/deactivate` (admin).
pub async fn deactivate(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
) -> Result<impl IntoResponse, ApiError> {
    set_active(state, caller, id, false).await
}

#[utoipa::path(
    post,
    path = "/api/users/{id}/reactivate",
    operation_id = "reactivate_user",
    summary = "Reactivate a user",
    tag = "users",
    params(
        ("id" = i64, Path, minimum = 1, description = "The user's id"),
    ),
    responses(
        (status = 200, description = "The user, active again", body = crate::store::User),
        (status = 401, description = "`unauthorized`: no `Authorization: Bearer` credentials", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: invalid credentials, or credentials that do not allow this request", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no user with this id", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal_error`: logged; the detail says nothing more", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
    security(("admin_key" = [])),
)]
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

#[utoipa::path(
    post,
    path = "/api/users/{id}/token",
    operation_id = "issue_token",
    summary = "Issue a user token",
    description = "A fresh token for the user; earlier ones stay valid (rotating `auth.token_secret` revokes them all).",
    tag = "users",
    params(
        ("id" = i64, Path, minimum = 1, description = "The user's id"),
    ),
    responses(
        (status = 200, description = "A fresh token for the user (earlier ones stay valid)", body = crate::openapi::IssuedToken),
        (status = 401, description = "`unauthorized`: no `Authorization: Bearer` credentials", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: invalid credentials, or credentials that do not allow this request", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no user with this id", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal_error`: logged; the detail says nothing more", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
    security(("admin_key" = [])),
)]
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
