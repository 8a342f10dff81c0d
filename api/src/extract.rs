//! Extractors whose rejections are problem+json: the JSON body (as an object, so that each
//! field is validated and named on its own), path ids and query strings.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use upline_common::UserId;

use crate::error::ApiError;

/// A JSON object body. Missing or non-JSON bodies are 400 `invalid_json`.
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge
                } else {
                    ApiError::InvalidJson(e.body_text())
                }
            })?;
        if bytes.is_empty() {
            return Ok(JsonObject(Map::new()));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => {
                if let Some((field, _)) = map
                    .iter()
                    .find(|(k, v)| k.contains('\0') || upline_common::purchase::contains_nul(v))
                {
                    return Err(ApiError::validation(
                        field.replace('\0', ""),
                        "must not contain NUL characters",
                    ));
                }
                Ok(JsonObject(map))
            }
            Ok(_) => Err(ApiError::InvalidJson("expected a JSON object".into())),
            Err(e) => Err(ApiError::InvalidJson(e.to_string())),
        }
    }
}

/// A user id from the path; anything else is 404 (there is no such resource).
pub struct PathId(pub UserId);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|_| ApiError::NotFound("no such resource".into()))?;
        raw.parse()
            .map(PathId)
            .map_err(|_| ApiError::NotFound(format!("no user with id {raw:?}")))
    }
}

/// A text segment from the path; one that cannot be decoded is 404 (no such resource).
pub struct PathText(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathText {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|p| PathText(p.0))
            .map_err(|_| ApiError::NotFound("no such resource".into()))
    }
}

/// Query parameters; a bad one is 422 naming it.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| ApiError::validation("query", e.body_text()))
    }
}

/// Reads an optional string field; `null` counts as absent.
pub fn opt_str<'a>(map: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::validation(field, "must be a string")),
    }
}

/// Reads an optional user id field (positive integer or string of digits).
pub fn opt_user_id(map: &Map<String, Value>, field: &str) -> Result<Option<UserId>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => UserId::from_json(v)
            .map(Some)
            .ok_or_else(|| ApiError::validation(field, "must be a positive integer")),
    }
}

/// Two numeric ids from the path (`/api/users/{id}/referrals/{referral_id}`); anything else
/// is 404.
pub struct PathIds(pub UserId, pub UserId);

impl<S: Send + Sync> FromRequestParts<S> for PathIds {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path((a, b)) =
            axum::extract::Path::<(String, String)>::from_request_parts(parts, state)
                .await
                .map_err(|_| ApiError::NotFound("no such resource".into()))?;
        match (a.parse(), b.parse()) {
            (Ok(a), Ok(b)) => Ok(PathIds(a, b)),
            _ => Err(ApiError::NotFound(format!(
                "no user with id {a:?} or {b:?}"
            ))),
        }
    }
}

/// The client's address as the abuse limits see it (`None` when unknown).
pub struct ClientIp(pub Option<std::net::IpAddr>);

impl FromRequestParts<crate::AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &crate::AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(crate::auth::client_ip(parts, state)))
    }
}
