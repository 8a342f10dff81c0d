//! The `Caller` extractor and the access rules of SPEC §6: 401 without credentials, 403 with
//! credentials that are invalid or do not allow the request.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
pub use upline_common::auth::Caller;
use upline_common::UserId;

use crate::error::ApiError;
use crate::AppState;

/// The authenticated caller of a request.
pub struct Authenticated(pub Caller);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or(ApiError::Unauthorized)?;
        let value = header.to_str().map_err(|_| ApiError::Forbidden)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(ApiError::Unauthorized)?
            .trim();
        if token.is_empty() {
            return Err(ApiError::Unauthorized);
        }
        state
            .auth
            .identify(token)
            .map(Authenticated)
            .ok_or(ApiError::Forbidden)
    }
}

impl Authenticated {
    /// Admin only.
    ///
    /// # Errors
    /// 403 for anyone else.
    pub fn admin(&self) -> Result<(), ApiError> {
        match self.0 {
            Caller::Admin => Ok(()),
            _ => Err(ApiError::Forbidden),
        }
    }

    /// The user themself, or an admin.
    ///
    /// # Errors
    /// 403 for anyone else.
    pub fn user_or_admin(&self, user_id: UserId) -> Result<(), ApiError> {
        match self.0 {
            Caller::Admin => Ok(()),
            Caller::User(id) if id == user_id => Ok(()),
            _ => Err(ApiError::Forbidden),
        }
    }

    /// A purchase producer, or an admin.
    ///
    /// # Errors
    /// 403 for anyone else.
    pub fn producer_or_admin(&self) -> Result<(), ApiError> {
        match self.0 {
            Caller::Admin | Caller::Producer => Ok(()),
            Caller::User(_) => Err(ApiError::Forbidden),
        }
    }
}
