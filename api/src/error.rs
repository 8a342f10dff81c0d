//! `ApiError`: every failure a client can see, mapped to `application/problem+json` in one
//! place (SPEC §6). Database and other internal errors become a logged, generic 500; their
//! text never reaches the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// A failure, with the status and stable `code` it is reported with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid_json`: the body is not a JSON object.
    #[error("the request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// 422 `validation_failed`: `field` is missing or wrong.
    #[error("{field}: {message}")]
    Validation { field: String, message: String },
    /// 401 `unauthorized`: no `Authorization: Bearer …` credentials.
    #[error("this endpoint needs credentials: Authorization: Bearer <token>")]
    Unauthorized,
    /// 403 `forbidden`: credentials that do not allow this.
    #[error("these credentials do not allow this request")]
    Forbidden,
    /// 403 `token_expired`: a user token past its expiry; renew tokens before they expire
    /// (`POST /api/users/{id}/token`) or have a new one issued.
    #[error("the token has expired; renew it before it expires, or have a new one issued")]
    TokenExpired,
    /// 403 `token_revoked`: the user's tokens were revoked (sign-out everywhere,
    /// deactivation, erasure) or the user is inactive.
    #[error("the token was revoked, or its user is inactive")]
    TokenRevoked,
    /// 403 `admin_only`: `field` may be sent only with the admin key.
    #[error("{field}: {message}")]
    AdminOnly {
        field: &'static str,
        message: &'static str,
    },
    /// 429 `rate_limited`: too many requests of this kind from this address; see `Retry-After`.
    #[error("{0}")]
    RateLimited(#[from] upline_common::limits::RateLimited),
    /// 404 `not_found`.
    #[error("{0}")]
    NotFound(String),
    /// 404 `referrer_not_found`.
    #[error("no user matches the given referrer")]
    ReferrerNotFound,
    /// 409 `email_taken` (emails are compared case-insensitively).
    #[error("a user with this email already exists")]
    EmailTaken,
    /// 409 `referral_limit_reached`.
    #[error("the referrer already has the most direct referrals allowed ({0})")]
    ReferralLimitReached(i32),
    /// 409 `referrer_inactive`.
    #[error("the referrer is inactive")]
    ReferrerInactive,
    /// 409 `already_referred`: a referrer is set once.
    #[error("this user already has a referrer")]
    AlreadyReferred,
    /// 409 `user_inactive`: tokens are not issued to inactive users.
    #[error("the user is inactive; reactivate it first")]
    UserInactive,
    /// 409 `user_erased`: the user's personal data was erased; the account cannot be used again.
    #[error("the user was erased")]
    UserErased,
    /// 409 `referral_not_releasable`: a referrer may release only a referral that has brought
    /// it nothing and has no referrals of its own; an admin may release any.
    #[error("this referral has made purchases or referred others; only an admin may release it")]
    ReferralNotReleasable,
    /// 422 `self_referral`.
    #[error("a user cannot refer themselves")]
    SelfReferral,
    /// 422 `referral_cycle`.
    #[error("the referrer is in this user's downline; the referral graph must stay a forest")]
    ReferralCycle,
    /// 422 `idempotency_key_required`: a purchase needs `purchase_id` or `Idempotency-Key`, so
    /// that a retried request cannot pay twice.
    #[error("send the purchase's id as purchase_id or in the Idempotency-Key header: it is the idempotency key, so a retry after a timeout or a 503 never pays twice")]
    IdempotencyKeyRequired,
    /// 422 `unknown_buyer`.
    #[error("buyer_id: no user with id {0}")]
    UnknownBuyer(upline_common::UserId),
    /// 503 `database_unavailable`: the database is unreachable, failing over or out of
    /// connections (`database.acquire_timeout_secs`); retry later.
    #[error("the database is unavailable; retry later")]
    DatabaseUnavailable,
    /// 503 `request_timeout`: the request took longer than `api.request_timeout_secs`.
    #[error("the request took too long and was abandoned; retry later")]
    RequestTimeout,
    /// 413 `payload_too_large`: the body is over `api.max_body_bytes`.
    #[error("the request body is larger than this api accepts (api.max_body_bytes)")]
    PayloadTooLarge,
    /// 503 `broker_unavailable`: the purchase was not accepted; retry later.
    #[error("the message broker is unavailable; the purchase was not accepted, retry later")]
    BrokerUnavailable,
    /// 500 `internal_error`: logged with its cause chain, reported without it.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Validation {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The HTTP status and stable machine code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            ApiError::Validation { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::TokenExpired => (StatusCode::FORBIDDEN, "token_expired"),
            ApiError::TokenRevoked => (StatusCode::FORBIDDEN, "token_revoked"),
            ApiError::AdminOnly { .. } => (StatusCode::FORBIDDEN, "admin_only"),
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::ReferrerNotFound => (StatusCode::NOT_FOUND, "referrer_not_found"),
            ApiError::EmailTaken => (StatusCode::CONFLICT, "email_taken"),
            ApiError::ReferralLimitReached(_) => (StatusCode::CONFLICT, "referral_limit_reached"),
            ApiError::ReferrerInactive => (StatusCode::CONFLICT, "referrer_inactive"),
            ApiError::AlreadyReferred => (StatusCode::CONFLICT, "already_referred"),
            ApiError::UserInactive => (StatusCode::CONFLICT, "user_inactive"),
            ApiError::UserErased => (StatusCode::CONFLICT, "user_erased"),
            ApiError::ReferralNotReleasable => (StatusCode::CONFLICT, "referral_not_releasable"),
            ApiError::SelfReferral => (StatusCode::UNPROCESSABLE_ENTITY, "self_referral"),
            ApiError::ReferralCycle => (StatusCode::UNPROCESSABLE_ENTITY, "referral_cycle"),
            ApiError::UnknownBuyer(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_buyer"),
            ApiError::IdempotencyKeyRequired => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_required")
            }
            ApiError::BrokerUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable"),
            ApiError::DatabaseUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable")
            }
            ApiError::RequestTimeout => (StatusCode::SERVICE_UNAVAILABLE, "request_timeout"),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    /// Infrastructure errors (an unreachable or failing-over database, an exhausted pool) are
    /// `503 database_unavailable`, logged as warnings; anything else is a logged 500.
    fn from(e: sqlx::Error) -> Self {
        match upline_common::db::classify(&e) {
            upline_common::db::ErrorClass::Infrastructure => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::DatabaseUnavailable
            }
            upline_common::db::ErrorClass::Content => {
                ApiError::Internal(anyhow::Error::new(e).context("database"))
            }
        }
    }
}

impl ApiError {
    /// The request field at fault, for the problem's `field`.
    pub fn field(&self) -> Option<&str> {
        match self {
            ApiError::Validation { field, .. } => Some(field),
            ApiError::AdminOnly { field, .. } => Some(field),
            ApiError::UnknownBuyer(_) => Some("buyer_id"),
            ApiError::IdempotencyKeyRequired => Some("purchase_id"),
            _ => None,
        }
    }

    /// What the client is told: the message, except for internal errors, whose text never
    /// leaves the server.
    pub fn public_detail(&self) -> String {
        match self {
            ApiError::Internal(_) => "an internal error occurred; it has been logged".to_owned(),
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = format!("{e:#}"), "internal error");
        }
        let mut response = upline_common::http::problem_response(
            status,
            code,
            &self.public_detail(),
            self.field(),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if let ApiError::RateLimited(limited) = &self {
            if let Ok(value) = HeaderValue::from_str(&limited.retry_after_secs().to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Maps a named constraint violation to an [`ApiError`] (rw's `on_constraint`).
pub trait ResultExt<T> {
    fn on_constraint(self, name: &str, f: impl FnOnce() -> ApiError) -> Result<T, ApiError>;
}

impl<T, E: Into<ApiError>> ResultExt<T> for Result<T, E> {
    fn on_constraint(self, name: &str, f: impl FnOnce() -> ApiError) -> Result<T, ApiError> {
        self.map_err(|e| match e.into() {
            ApiError::Internal(inner) => match inner.downcast_ref::<sqlx::Error>() {
                Some(sqlx::Error::Database(db)) if db.constraint() == Some(name) => f(),
                _ => ApiError::Internal(inner),
            },
            other => other,
        })
    }
}
