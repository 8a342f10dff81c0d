//! The `Caller` extractors and the access rules of SPEC §6: 401 without credentials, 403 with
//! credentials that are invalid, expired, revoked or do not allow the request, 429 while the
//! client's address is over its budget of failed authentications (README "Security").

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts, OptionalFromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
pub use upline_common::auth::Caller;
use upline_common::auth::{Credential, CredentialError};
use upline_common::UserId;

use crate::error::ApiError;
use crate::AppState;

/// The authenticated caller of a request.
pub struct Authenticated(pub Caller);

/// The client's address, as the abuse limits see it (`limits.trust_forwarded_for`).
pub fn client_ip(parts: &Parts, state: &AppState) -> Option<IpAddr> {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    state.limits.client_ip(peer, &parts.headers)
}

/// The bearer credential of a request: `Ok(None)` without an `Authorization` header.
fn bearer(parts: &Parts) -> Result<Option<&str>, ApiError> {
    let Some(header) = parts.headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let value = header.to_str().map_err(|_| ApiError::Forbidden)?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or(ApiError::Unauthorized)?
        .trim();
    if token.is_empty() {
        return Err(ApiError::Unauthorized);
    }
    Ok(Some(token))
}

/// Checks a credential: the keys, or a user token whose version is current and whose user is
/// active. Every failure counts against the client's address.
async fn authenticate(
    state: &AppState,
    ip: Option<IpAddr>,
    token: &str,
) -> Result<Caller, ApiError> {
    state.limits.check_auth_allowed(ip)?;
    let outcome = match state.auth.identify(token) {
        Ok(Credential::Admin) => Ok(Caller::Admin),
        Ok(Credential::Producer) => Ok(Caller::Producer),
        Ok(Credential::User(user)) => {
            if upline_common::auth::token_is_current(&state.db, &user).await? {
                Ok(Caller::User(user.user_id))
            } else {
                Err(ApiError::TokenRevoked)
            }
        }
        Err(CredentialError::Expired) => Err(ApiError::TokenExpired),
        Err(CredentialError::Invalid) => Err(ApiError::Forbidden),
    };
    if outcome.is_err() {
        state.limits.record_auth_failure(ip);
    }
    outcome
}

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts)?.ok_or(ApiError::Unauthorized)?;
        let ip = client_ip(parts, state);
        authenticate(state, ip, token).await.map(Authenticated)
    }
}

/// Credentials are optional (`Option<Authenticated>`): absent is `None`, but credentials that
/// are sent must be valid.
impl OptionalFromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Option<Self>, Self::Rejection> {
        let Some(token) = bearer(parts)? else {
            return Ok(None);
        };
        let ip = client_ip(parts, state);
        authenticate(state, ip, token)
            .await
            .map(|caller| Some(Authenticated(caller)))
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

    /// Whether the caller holds the admin key.
    pub fn is_admin(&self) -> bool {
        self.0 == Caller::Admin
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
