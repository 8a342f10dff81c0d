//! `/api/users`: registration, the referral tree's edges, activation, tokens.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::Json;
use rand::Rng;
use upline_common::UserId;

use crate::auth::Authenticated;
use crate::error::{ApiError, REFERRER_ID_ADMIN_ONLY};
use crate::extract::{next_cursor, ClientIp, Page, PathId, PathIds, Query, ValidatedJson};
use crate::model::{
    IssuedToken, Me, NewUser, ReferrerChoice, RegisterRequest, RegisteredUser, SetReferrerRequest,
    UpdateUserRequest, UserPage, UserUpdate,
};
use crate::responses::{AdminErrors, AnyCallerErrors, SetReferrerErrors, UserOrAdminErrors};
use crate::{store, AppState};
use upline_common::http::Problem;

/// Characters of referral codes: no 0/O or 1/I/L to misread.
const CODE_ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";
const CODE_LEN: usize = 8;

fn new_referral_code() -> String {
    let mut rng = rand::thread_rng();
    (0..CODE_LEN)
        .map(|_| char::from(CODE_ALPHABET[rng.gen_range(0..CODE_ALPHABET.len())]))
        .collect()
}

/// The referrer named by `referrer_id` and/or `referral_code` (they must agree). Only the admin
/// key may name a referrer by id: ids are sequential and public, so anyone else could fill a
/// stranger's referral slots (README "Security"); everyone else uses the referrer's code.
async fn resolve_referrer(
    state: &AppState,
    choice: ReferrerChoice,
    admin: bool,
) -> Result<Option<UserId>, ApiError> {
    let by_id = choice.by_id;
    if by_id.is_some() && !admin {
        return Err(ApiError::AdminOnly {
            field: "referrer_id",
            message: REFERRER_ID_ADMIN_ONLY,
        });
    }
    let by_code = match choice.by_code.as_deref() {
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
    description = "Registers a user, optionally under a referrer named by its `referral_code` (or by `referrer_id`, with the admin key only). Answers 201 with the user, its own `referral_code` to share, its `token` and `token_expires_at`. Anonymous sign-ups are limited per client address (`limits.registrations_per_minute`); the admin key is not.",
    tag = "users",
    request_body(content = RegisterRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Registered: the user with its `referral_code` and `token`", body = RegisteredUser,
            headers(("Location" = String, description = "`/api/users/{id}`"))),
        (status = 400, description = "`invalid_json`: the body is not a JSON object", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`referrer_not_found`: no user has this `referrer_id` or `referral_code`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: an `Authorization` header that is not `Bearer …` (send none to sign up anonymously)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`admin_only`: `referrer_id` was sent without the admin key (anyone else names the referrer by `referral_code`); `forbidden`, `token_expired`, `token_revoked`: credentials were sent and are not valid", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`email_taken`; `referral_limit_reached`: the referrer has the most direct referrals allowed; `referrer_inactive`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: `field` names the bad one (`name`, `email`, `referrer_id`, `referral_code`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`: too many sign-ups (or failed authentications) from this address (`limits.registrations_per_minute`)", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = String, description = "Seconds to wait"))),
        (status = 500, description = "`internal_error`: logged; the detail says nothing more", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_key" = [])),
)]
/// `POST /api/users`: registers a user, optionally under a referrer. 201 with the user, its
/// `referral_code` and its `token`.
pub async fn register(
    State(state): State<AppState>,
    caller: Option<Authenticated>,
    ClientIp(ip): ClientIp,
    ValidatedJson(body): ValidatedJson<RegisterRequest>,
) -> Result<
    (
        StatusCode,
        [(header::HeaderName, String); 1],
        Json<RegisteredUser>,
    ),
    ApiError,
> {
    let admin = caller.as_ref().is_some_and(Authenticated::is_admin);
    if !admin {
        state.limits.check_registration(ip)?;
    }
    let NewUser {
        name,
        email,
        referrer,
    } = body.try_into()?;
    let referrer = resolve_referrer(&state, referrer, admin).await?;
    for _ in 0..5 {
        let mut tx = state.db.begin().await?;
        if let Some(referrer_id) = referrer {
            store::take_referral_slot(&mut tx, referrer_id, state.max_direct).await?;
        }
        let Some(user) = store::insert_user(
            &mut tx,
            &name,
            email.as_str(),
            &new_referral_code(),
            referrer,
        )
        .await?
        else {
            continue; // referral code collision: draw again
        };
        tx.commit().await?;
        metrics::counter!("upline_users_registered_total").increment(1);
        let token = state.auth.issue(user.id, 0);
        return Ok((
            StatusCode::CREATED,
            [(header::LOCATION, format!("/api/users/{}", user.id))],
            Json(RegisteredUser {
                user,
                token: token.token,
                token_expires_at: token.expires_at,
            }),
        ));
    }
    Err(ApiError::Internal(anyhow::anyhow!(
        "could not draw a unique referral code"
    )))
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
        (status = 200, description = "A page of users by id; `next_cursor` is null on the last page", body = UserPage),
        (status = 422, description = "`validation_failed`: `field` is `limit`, `cursor` or `query`", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// `GET /api/users?limit=&cursor=` (admin): users by id; `next_cursor` is absent on the last page.
pub async fn list(
    State(state): State<AppState>,
    caller: Authenticated,
    Query(page): Query<Page>,
) -> Result<Json<UserPage>, ApiError> {
    caller.admin()?;
    let limit = page.limit()?;
    let after = page.cursor()?.unwrap_or(0);
    let users = store::users_page(&state.db, after, limit).await?;
    let next = next_cursor(&users, limit, |u| u.id.get());
    Ok(Json(UserPage {
        items: users,
        next_cursor: next,
    }))
}

#[utoipa::path(
    get,
    path = "/api/me",
    operation_id = "whoami",
    summary = "Who am I",
    description = "Who the bearer is: `{\"role\": \"admin\"}`, `{\"role\": \"producer\"}` or `{\"role\": \"user\", \"user\": {…}}`. The dashboard signs in with it.",
    tag = "users",
    responses(
        (status = 200, description = "Who the bearer is: `admin`, `producer`, or `user` with the user", body = Me),
        AnyCallerErrors,
    ),
    security(("user_token" = []), ("admin_key" = []), ("producer_key" = [])),
)]
/// `GET /api/me` (any credentials): who the bearer is — `{"role": "admin" | "producer"}` or
/// `{"role": "user", "user": {…}}`. The dashboard uses it to sign in.
pub async fn me(
    State(state): State<AppState>,
    caller: Authenticated,
) -> Result<Json<Me>, ApiError> {
    Ok(Json(match caller.0 {
        crate::auth::Caller::Admin => Me::Admin,
        crate::auth::Caller::Producer => Me::Producer,
        crate::auth::Caller::User(id) => Me::User {
            user: store::user(&state.db, id)
                .await?
                .ok_or(ApiError::Forbidden)?,
        },
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
        (status = 404, description = "`not_found`: no user with this id", body = Problem, content_type = "application/problem+json"),
        UserOrAdminErrors,
    ),
    security(("user_token" = []), ("admin_key" = [])),
)]
/// `GET /api/users/{id}` (the user, admin).
pub async fn get(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
) -> Result<Json<store::User>, ApiError> {
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
    request_body(content = SetReferrerRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The user, now with its referrer", body = crate::store::User),
        (status = 400, description = "`invalid_json`: the body is not a JSON object", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no user with this id; `referrer_not_found`: no user has this `referrer_id` or `referral_code`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`already_referred`: a referrer is set once; `referral_limit_reached`; `referrer_inactive`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` (`referrer_id`, `referral_code`); `self_referral`; `referral_cycle`: the referrer is in this user's downline", body = Problem, content_type = "application/problem+json"),
        SetReferrerErrors,
    ),
    security(("user_token" = []), ("admin_key" = [])),
)]
/// `PUT /api/users/{id}/referrer` (the user, admin): sets the referrer once.
pub async fn set_referrer(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
    ValidatedJson(body): ValidatedJson<SetReferrerRequest>,
) -> Result<Json<store::User>, ApiError> {
    caller.user_or_admin(id)?;
    let referrer_id = resolve_referrer(&state, body.into(), caller.is_admin())
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
        (status = 404, description = "`not_found`: no user with this id", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`user_erased`: an erased user stays inactive", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// `POST /api/users/{id}/deactivate` (admin).
pub async fn deactivate(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
) -> Result<Json<store::User>, ApiError> {
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
        (status = 404, description = "`not_found`: no user with this id", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`user_erased`: an erased user stays inactive", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// `POST /api/users/{id}/reactivate` (admin).
pub async fn reactivate(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
) -> Result<Json<store::User>, ApiError> {
    set_active(state, caller, id, true).await
}

async fn set_active(
    state: AppState,
    caller: Authenticated,
    id: UserId,
    active: bool,
) -> Result<Json<store::User>, ApiError> {
    caller.admin()?;
    let mut tx = state.db.begin().await?;
    let user = store::set_active(&mut tx, id, active)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no user with id {id}")))?;
    tx.commit().await?;
    Ok(Json(user))
}

#[utoipa::path(
    post,
    path = "/api/users/{id}/token",
    operation_id = "issue_token",
    summary = "Issue or renew a user token",
    description = "A fresh token for the user, valid for `auth.token_ttl` (24 h by default). The user renews its own token with a token that has not expired yet; the admin issues one at any time (for instance after a revocation). Earlier tokens stay valid until they expire or are revoked.",
    tag = "users",
    params(
        ("id" = i64, Path, minimum = 1, description = "The user's id"),
    ),
    responses(
        (status = 200, description = "A fresh token and when it expires", body = IssuedToken),
        (status = 404, description = "`not_found`: no user with this id", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`user_inactive`: the user is deactivated; `user_erased`", body = Problem, content_type = "application/problem+json"),
        UserOrAdminErrors,
    ),
    security(("user_token" = []), ("admin_key" = [])),
)]
/// `POST /api/users/{id}/token` (the user, admin): a fresh token for the user.
pub async fn token(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
) -> Result<Json<IssuedToken>, ApiError> {
    caller.user_or_admin(id)?;
    let version = store::token_version_for_issue(&state.db, id).await?;
    let issued = state.auth.issue(id, version);
    Ok(Json(IssuedToken {
        user_id: id,
        token: issued.token,
        expires_at: issued.expires_at,
    }))
}

#[utoipa::path(
    delete,
    path = "/api/users/{id}/tokens",
    operation_id = "revoke_tokens",
    summary = "Revoke every token of a user",
    description = "Signs the user out everywhere: every token issued so far stops working at once, and the notifier closes the user's open WebSocket (close code 4003) and SSE streams. The admin then issues a new token with `POST /api/users/{id}/token`.",
    tag = "users",
    params(
        ("id" = i64, Path, minimum = 1, description = "The user's id"),
    ),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "`not_found`: no user with this id", body = Problem, content_type = "application/problem+json"),
        UserOrAdminErrors,
    ),
    security(("user_token" = []), ("admin_key" = [])),
)]
/// `DELETE /api/users/{id}/tokens` (the user, admin): revokes all the user's tokens. 204.
pub async fn revoke_tokens(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
) -> Result<StatusCode, ApiError> {
    caller.user_or_admin(id)?;
    if !store::user_exists(&state.db, id).await? {
        return Err(ApiError::NotFound(format!("no user with id {id}")));
    }
    let mut tx = state.db.begin().await?;
    store::revoke_tokens(&mut tx, id).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    delete,
    path = "/api/users/{id}",
    operation_id = "erase_user",
    summary = "Erase a user's personal data",
    description = "Erases the user's name (reports show `erased user`), email and referral code, deactivates the user, hides it from the leaderboard and revokes its tokens. The ledger stays exact: its earnings, totals and place in the referral tree remain, under the anonymous label. Erasing twice is harmless.",
    tag = "users",
    params(
        ("id" = i64, Path, minimum = 1, description = "The user's id"),
    ),
    responses(
        (status = 204, description = "Erased"),
        (status = 404, description = "`not_found`: no user with this id", body = Problem, content_type = "application/problem+json"),
        UserOrAdminErrors,
    ),
    security(("user_token" = []), ("admin_key" = [])),
)]
/// `DELETE /api/users/{id}` (the user, admin): erases the user's personal data. 204.
pub async fn erase(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
) -> Result<StatusCode, ApiError> {
    caller.user_or_admin(id)?;
    let mut tx = state.db.begin().await?;
    if !store::erase_user(&mut tx, id).await? {
        return Err(ApiError::NotFound(format!("no user with id {id}")));
    }
    tx.commit().await?;
    metrics::counter!("upline_users_erased_total").increment(1);
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    patch,
    path = "/api/users/{id}",
    operation_id = "update_user",
    summary = "Change a user's settings",
    description = "`show_on_leaderboard: false` hides the user from the public leaderboard (its earnings are unaffected).",
    tag = "users",
    params(
        ("id" = i64, Path, minimum = 1, description = "The user's id"),
    ),
    request_body(content = UpdateUserRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The user", body = crate::store::User),
        (status = 400, description = "`invalid_json`: the body is not a JSON object", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no user with this id", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`user_erased`: an erased user cannot be shown", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: `field` is `show_on_leaderboard`", body = Problem, content_type = "application/problem+json"),
        UserOrAdminErrors,
    ),
    security(("user_token" = []), ("admin_key" = [])),
)]
/// `PATCH /api/users/{id}` (the user, admin): `{show_on_leaderboard}`.
pub async fn update(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
    ValidatedJson(body): ValidatedJson<UpdateUserRequest>,
) -> Result<Json<store::User>, ApiError> {
    caller.user_or_admin(id)?;
    let UserUpdate {
        show_on_leaderboard: visible,
    } = body.try_into()?;
    let mut tx = state.db.begin().await?;
    let user = store::set_leaderboard_visibility(&mut tx, id, visible)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no user with id {id}")))?;
    tx.commit().await?;
    Ok(Json(user))
}

#[utoipa::path(
    delete,
    path = "/api/users/{id}/referrals/{referral_id}",
    operation_id = "release_referral",
    summary = "Release a direct referral",
    description = "Frees one of the user's referral slots: the referral loses its referrer (and may set another). A user may release a referral that has brought it nothing yet and has no referrals of its own, the remedy for sign-ups that squat its slots; the admin may release any.",
    tag = "users",
    params(
        ("id" = i64, Path, minimum = 1, description = "The referrer's id"),
        ("referral_id" = i64, Path, minimum = 1, description = "The direct referral's id"),
    ),
    responses(
        (status = 204, description = "Released"),
        (status = 404, description = "`not_found`: not a direct referral of this user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`referral_not_releasable`: it has brought the user commissions or has referrals of its own (admin only)", body = Problem, content_type = "application/problem+json"),
        UserOrAdminErrors,
    ),
    security(("user_token" = []), ("admin_key" = [])),
)]
/// `DELETE /api/users/{id}/referrals/{referral_id}` (the user, admin): releases a referral. 204.
pub async fn release_referral(
    State(state): State<AppState>,
    caller: Authenticated,
    PathIds(id, referral_id): PathIds,
) -> Result<StatusCode, ApiError> {
    caller.user_or_admin(id)?;
    let mut tx = state.db.begin().await?;
    store::release_referral(&mut tx, id, referral_id, caller.is_admin()).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
