//! Extractors whose rejections are problem+json: the typed JSON body ([`ValidatedJson`]), path
//! ids and query strings.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use upline_common::UserId;

use crate::error::ApiError;

/// A JSON object body deserialized into the request type `T` (which derives `Deserialize` and
/// `ToSchema`: the same type is the OpenAPI schema). An empty body counts as `{}`. Rejections
/// are problem+json: 413 `payload_too_large` over `api.max_body_bytes`; 400 `invalid_json` for
/// a body that is not a JSON object; 422 `validation_failed` naming the field (its path, via
/// `serde_path_to_error`) that does not deserialize or holds a NUL character (PostgreSQL text
/// and jsonb cannot store it).
pub struct ValidatedJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ValidatedJson<T> {
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
        let map = if bytes.is_empty() {
            Map::new()
        } else {
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Object(map)) => map,
                Ok(_) => return Err(ApiError::InvalidJson("expected a JSON object".into())),
                Err(e) => return Err(ApiError::InvalidJson(e.to_string())),
            }
        };
        if let Some((field, _)) = map
            .iter()
            .find(|(k, v)| k.contains('\0') || upline_common::purchase::contains_nul(v))
        {
            return Err(ApiError::validation(
                field.replace('\0', ""),
                "must not contain NUL characters",
            ));
        }
        serde_path_to_error::deserialize(Value::Object(map))
            .map(ValidatedJson)
            .map_err(|e| {
                let field = match e.path().to_string() {
                    path if path == "." => "body".to_owned(),
                    path => path,
                };
                ApiError::validation(field, e.into_inner().to_string())
            })
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

/// The query of a paginated list (`GET /api/users`, `GET /api/payouts`): `limit` (1–500,
/// default 50) and `cursor`, the `next_cursor` of the previous page (an id as digits).
#[derive(Debug, serde::Deserialize)]
pub struct Page {
    limit: Option<i64>,
    cursor: Option<String>,
}

impl Page {
    /// The page size.
    ///
    /// # Errors
    /// 422 naming `limit` outside 1–500.
    pub fn limit(&self) -> Result<i64, ApiError> {
        let limit = self.limit.unwrap_or(50);
        if (1..=500).contains(&limit) {
            Ok(limit)
        } else {
            Err(ApiError::validation("limit", "must be between 1 and 500"))
        }
    }

    /// The id the previous page ended at, if any.
    ///
    /// # Errors
    /// 422 naming `cursor` when it is not one this API returned.
    pub fn cursor(&self) -> Result<Option<i64>, ApiError> {
        match self.cursor.as_deref() {
            None | Some("") => Ok(None),
            Some(c) => c
                .parse()
                .map(Some)
                .map_err(|_| ApiError::validation("cursor", "is not a cursor this API returned")),
        }
    }
}

/// The `next_cursor` of a page of `rows` asked for with `limit`: the id of its last row when
/// the page is full (there may be more), `None` on the last page.
pub fn next_cursor<T>(rows: &[T], limit: i64, id: impl Fn(&T) -> i64) -> Option<String> {
    (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| id(r).to_string()))
        .flatten()
}

/// The idempotency key of a request that may carry it in the body (`body_field`, read by
/// `body_key` once the header was) or in the `Idempotency-Key` header; both may be sent when
/// they agree. Returns the key and where it came from (`body_field` or `"Idempotency-Key"`,
/// the field to name when the key itself is invalid), or `None` when neither was sent.
///
/// # Errors
/// 422 naming `Idempotency-Key` when the header is not ASCII or differs from the body's key;
/// `body_key`'s error.
pub fn idempotency_key(
    headers: &axum::http::HeaderMap,
    body_key: impl FnOnce() -> Result<Option<String>, ApiError>,
    body_field: &'static str,
) -> Result<Option<(&'static str, String)>, ApiError> {
    let header_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::validation("Idempotency-Key", "must be ASCII"))?
                .trim()
                .to_owned(),
        ),
    };
    match (body_key()?, header_key) {
        (Some(b), Some(h)) if b != h => Err(ApiError::validation(
            "Idempotency-Key",
            format!("differs from the body's {body_field}"),
        )),
        (Some(key), _) => Ok(Some((body_field, key))),
        (None, Some(key)) => Ok(Some(("Idempotency-Key", key))),
        (None, None) => Ok(None),
    }
}
