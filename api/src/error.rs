//! `ApiError`: every failure a client can see, mapped to `application/problem+json` in one
//! place (SPEC §6). Database and other internal errors become a logged, generic 500; their
//! text never reaches the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use upline_common::http::Problem;

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
    /// 422 `idempotency_key_required`: a payout batch needs `idempotency_key` or
    /// `Idempotency-Key`, so that a retried request cannot create a second batch (contract §10).
    #[error("send an idempotency key as idempotency_key or in the Idempotency-Key header, so that a retry after a timeout or a 503 never creates a second batch")]
    PayoutKeyRequired,
    /// 409 `idempotency_conflict`: the idempotency key was used before with a different
    /// request (a payout batch with another `label`).
    #[error("this idempotency key was already used with a different request")]
    IdempotencyConflict,
    /// 409 `refund_conflict`: this `refund_id` was received before with a different purchase
    /// or amount (contract §10).
    #[error("refund_id: a refund with this id was received with a different purchase or amount")]
    RefundConflict,
    /// 404 `refund_not_found`: no refund with this id has been recorded (yet).
    #[error("{0}")]
    RefundNotFound(String),
    /// 404 `payout_not_found`: no payout batch with this id.
    #[error("{0}")]
    PayoutNotFound(String),
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
    /// 422 `validation_failed` naming `field`.
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Validation {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The HTTP status and stable machine code.
    pub fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        use ErrorCode as C;
        match self {
            ApiError::InvalidJson(_) => (StatusCode::BAD_REQUEST, C::InvalidJson),
            ApiError::Validation { .. } => (StatusCode::UNPROCESSABLE_ENTITY, C::ValidationFailed),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, C::Unauthorized),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, C::Forbidden),
            ApiError::TokenExpired => (StatusCode::FORBIDDEN, C::TokenExpired),
            ApiError::TokenRevoked => (StatusCode::FORBIDDEN, C::TokenRevoked),
            ApiError::AdminOnly { .. } => (StatusCode::FORBIDDEN, C::AdminOnly),
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, C::RateLimited),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, C::NotFound),
            ApiError::ReferrerNotFound => (StatusCode::NOT_FOUND, C::ReferrerNotFound),
            ApiError::EmailTaken => (StatusCode::CONFLICT, C::EmailTaken),
            ApiError::ReferralLimitReached(_) => (StatusCode::CONFLICT, C::ReferralLimitReached),
            ApiError::ReferrerInactive => (StatusCode::CONFLICT, C::ReferrerInactive),
            ApiError::AlreadyReferred => (StatusCode::CONFLICT, C::AlreadyReferred),
            ApiError::UserInactive => (StatusCode::CONFLICT, C::UserInactive),
            ApiError::UserErased => (StatusCode::CONFLICT, C::UserErased),
            ApiError::ReferralNotReleasable => (StatusCode::CONFLICT, C::ReferralNotReleasable),
            ApiError::SelfReferral => (StatusCode::UNPROCESSABLE_ENTITY, C::SelfReferral),
            ApiError::ReferralCycle => (StatusCode::UNPROCESSABLE_ENTITY, C::ReferralCycle),
            ApiError::UnknownBuyer(_) => (StatusCode::UNPROCESSABLE_ENTITY, C::UnknownBuyer),
            ApiError::IdempotencyKeyRequired | ApiError::PayoutKeyRequired => {
                (StatusCode::UNPROCESSABLE_ENTITY, C::IdempotencyKeyRequired)
            }
            ApiError::IdempotencyConflict => (StatusCode::CONFLICT, C::IdempotencyConflict),
            ApiError::RefundConflict => (StatusCode::CONFLICT, C::RefundConflict),
            ApiError::RefundNotFound(_) => (StatusCode::NOT_FOUND, C::RefundNotFound),
            ApiError::PayoutNotFound(_) => (StatusCode::NOT_FOUND, C::PayoutNotFound),
            ApiError::BrokerUnavailable => (StatusCode::SERVICE_UNAVAILABLE, C::BrokerUnavailable),
            ApiError::DatabaseUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, C::DatabaseUnavailable)
            }
            ApiError::RequestTimeout => (StatusCode::SERVICE_UNAVAILABLE, C::RequestTimeout),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, C::PayloadTooLarge),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, C::InternalError),
        }
    }

    /// The problem+json body this error is answered with (nothing is logged).
    pub fn problem(&self) -> Problem {
        let (status, code) = self.status_and_code();
        Problem::new(status, code.as_str(), &self.public_detail(), self.field())
    }

    /// One instance of every variant, for the examples of the OpenAPI description. The `match`
    /// makes a new variant a compile error here until it has a sample.
    pub fn samples() -> Vec<ApiError> {
        let all = vec![
            ApiError::InvalidJson("expected value at line 1 column 1".into()),
            ApiError::validation("email", "must be an email address such as asha@example.com"),
            ApiError::Unauthorized,
            ApiError::Forbidden,
            ApiError::TokenExpired,
            ApiError::TokenRevoked,
            ApiError::AdminOnly {
                field: "referrer_id",
                message: REFERRER_ID_ADMIN_ONLY,
            },
            ApiError::RateLimited(upline_common::limits::RateLimited {
                retry_after: std::time::Duration::from_secs(12),
            }),
            ApiError::NotFound("no user with id 7".into()),
            ApiError::ReferrerNotFound,
            ApiError::EmailTaken,
            ApiError::ReferralLimitReached(8),
            ApiError::ReferrerInactive,
            ApiError::AlreadyReferred,
            ApiError::UserInactive,
            ApiError::UserErased,
            ApiError::ReferralNotReleasable,
            ApiError::SelfReferral,
            ApiError::ReferralCycle,
            ApiError::UnknownBuyer(upline_common::UserId::new(42).expect("positive")),
            ApiError::IdempotencyKeyRequired,
            ApiError::IdempotencyConflict,
            ApiError::RefundConflict,
            ApiError::RefundNotFound("no refund with id \"rf-1\" (yet)".into()),
            ApiError::PayoutNotFound("no payout batch with id 3".into()),
            ApiError::PayloadTooLarge,
            ApiError::DatabaseUnavailable,
            ApiError::RequestTimeout,
            ApiError::BrokerUnavailable,
            ApiError::Internal(anyhow::anyhow!("example")),
        ];
        for e in &all {
            match e {
                ApiError::InvalidJson(_)
                | ApiError::Validation { .. }
                | ApiError::Unauthorized
                | ApiError::Forbidden
                | ApiError::TokenExpired
                | ApiError::TokenRevoked
                | ApiError::AdminOnly { .. }
                | ApiError::RateLimited(_)
                | ApiError::NotFound(_)
                | ApiError::ReferrerNotFound
                | ApiError::EmailTaken
                | ApiError::ReferralLimitReached(_)
                | ApiError::ReferrerInactive
                | ApiError::AlreadyReferred
                | ApiError::UserInactive
                | ApiError::UserErased
                | ApiError::ReferralNotReleasable
                | ApiError::SelfReferral
                | ApiError::ReferralCycle
                | ApiError::UnknownBuyer(_)
                | ApiError::IdempotencyKeyRequired
                | ApiError::PayoutKeyRequired
                | ApiError::IdempotencyConflict
                | ApiError::RefundConflict
                | ApiError::RefundNotFound(_)
                | ApiError::PayoutNotFound(_)
                | ApiError::PayloadTooLarge
                | ApiError::DatabaseUnavailable
                | ApiError::RequestTimeout
                | ApiError::BrokerUnavailable
                | ApiError::Internal(_) => {}
            }
        }
        all
    }
}

/// Why `referrer_id` is refused without the admin key (README "Security").
pub const REFERRER_ID_ADMIN_ONLY: &str =
    "naming a referrer by id needs the admin key; send the referrer's referral_code";

/// The stable machine `code` of a problem (SPEC §6), one per [`ApiError`] variant; each
/// response of the OpenAPI description lists the ones it can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    ValidationFailed,
    Unauthorized,
    Forbidden,
    TokenExpired,
    TokenRevoked,
    AdminOnly,
    RateLimited,
    NotFound,
    ReferrerNotFound,
    EmailTaken,
    ReferralLimitReached,
    ReferrerInactive,
    AlreadyReferred,
    UserInactive,
    UserErased,
    ReferralNotReleasable,
    SelfReferral,
    ReferralCycle,
    UnknownBuyer,
    IdempotencyKeyRequired,
    IdempotencyConflict,
    RefundConflict,
    RefundNotFound,
    PayoutNotFound,
    PayloadTooLarge,
    BrokerUnavailable,
    DatabaseUnavailable,
    RequestTimeout,
    InternalError,
}

impl ErrorCode {
    /// The code as sent in the problem's `code` (and `type`: `/problems/<code>`).
    pub fn as_str(self) -> &'static str {
        use ErrorCode as C;
        match self {
            C::InvalidJson => "invalid_json",
            C::ValidationFailed => "validation_failed",
            C::Unauthorized => "unauthorized",
            C::Forbidden => "forbidden",
            C::TokenExpired => "token_expired",
            C::TokenRevoked => "token_revoked",
            C::AdminOnly => "admin_only",
            C::RateLimited => "rate_limited",
            C::NotFound => "not_found",
            C::ReferrerNotFound => "referrer_not_found",
            C::EmailTaken => "email_taken",
            C::ReferralLimitReached => "referral_limit_reached",
            C::ReferrerInactive => "referrer_inactive",
            C::AlreadyReferred => "already_referred",
            C::UserInactive => "user_inactive",
            C::UserErased => "user_erased",
            C::ReferralNotReleasable => "referral_not_releasable",
            C::SelfReferral => "self_referral",
            C::ReferralCycle => "referral_cycle",
            C::UnknownBuyer => "unknown_buyer",
            C::IdempotencyKeyRequired => "idempotency_key_required",
            C::IdempotencyConflict => "idempotency_conflict",
            C::RefundConflict => "refund_conflict",
            C::RefundNotFound => "refund_not_found",
            C::PayoutNotFound => "payout_not_found",
            C::PayloadTooLarge => "payload_too_large",
            C::BrokerUnavailable => "broker_unavailable",
            C::DatabaseUnavailable => "database_unavailable",
            C::RequestTimeout => "request_timeout",
            C::InternalError => "internal_error",
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
            ApiError::PayoutKeyRequired => Some("idempotency_key"),
            ApiError::RefundConflict => Some("refund_id"),
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
        let (status, _) = self.status_and_code();
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = format!("{e:#}"), "internal error");
        }
        let mut response = self.problem().into_response();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_error_sends_its_problem_and_internal_errors_say_nothing_more() {
        for e in ApiError::samples() {
            if matches!(e, ApiError::Internal(_)) {
                continue; // would log; its body is checked below
            }
            let expected = serde_json::to_value(e.problem()).expect("serialises");
            let (status, code) = e.status_and_code();
            let response = e.into_response();
            assert_eq!(response.status(), status);
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("body");
            let actual: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
            assert_eq!(actual, expected);
            assert_eq!(actual["code"], code.as_str());
            assert_eq!(serde_json::to_value(code).expect("code"), code.as_str());
        }
        let internal = ApiError::Internal(anyhow::anyhow!("secret")).problem();
        assert_eq!(internal.code, "internal_error");
        assert!(!internal.detail.contains("secret"));
    }
}
