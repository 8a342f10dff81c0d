//! Webhook endpoints (contract §11), admin only: register (`POST /api/webhooks`), list, show,
//! delete, rotate the secret, enable again after the service disabled one, and see each
//! delivery with its attempts and replay it. The webhooks service (`upline-webhooks`) does the
//! sending; this module only manages what it reads.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use upline_common::http::Problem;
use upline_common::webhook::{self, EVENT_TYPES};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::extract::{next_cursor, Page, PathText, Query, ValidatedJson};
use crate::responses::AdminErrors;
use crate::{store, AppState};

/// Longest description, in characters.
const DESCRIPTION_MAX: usize = 200;
/// Bytes of a new signing key (192 bits, as the Standard Webhooks libraries make them).
const KEY_BYTES: usize = 24;

/// `POST /api/webhooks`. Unknown fields are ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"url": "https://shop.example/hooks/upline",
    "events": ["earning.created", "purchase.rejected"], "description": "texts referrers"}))]
pub struct NewEndpoint {
    /// Where to POST: an absolute `http` or `https` URL without credentials, at most
    /// `webhooks.max_url_bytes`; refused when its host is or resolves to a non-public address,
    /// unless `webhooks.allow_private_targets`.
    #[schema(value_type = String, example = "https://shop.example/hooks/upline")]
    pub url: Option<Value>,
    /// The event types to receive, at least one: `earning.created`, `earning.reversed`,
    /// `earning.approved`, `earning.paid`, `purchase.processed`, `purchase.rejected`.
    #[schema(value_type = Vec<String>, min_items = 1)]
    pub events: Option<Value>,
    /// A note for admins, at most 200 characters.
    #[serde(default)]
    #[schema(value_type = Option<String>, max_length = 200)]
    pub description: Option<Value>,
}

/// A registered endpoint (its secret only when it is made or rotated).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id": 4, "url": "https://shop.example/hooks/upline",
    "description": "texts referrers", "events": ["earning.created"], "enabled": true,
    "disabled_at": null, "disabled_reason": null, "failing_since": null,
    "created_at": "2026-12-03T10:00:00Z"}))]
pub struct Endpoint {
    pub id: i64,
    pub url: String,
    pub description: String,
    pub events: Vec<String>,
    /// False once disabled: no new messages are queued for it, and its pending deliveries
    /// wait until `POST /api/webhooks/{id}/enable`.
    pub enabled: bool,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub disabled_at: Option<OffsetDateTime>,
    /// Why the webhooks service disabled it.
    pub disabled_reason: Option<String>,
    /// When its current run of failed attempts began; null after any success.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub failing_since: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

/// A new endpoint with its signing secret, shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedEndpoint {
    #[serde(flatten)]
    pub endpoint: Endpoint,
    /// The signing secret in Standard Webhooks form: `whsec_` + base64 of the key.
    #[schema(example = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")]
    pub secret: String,
}

/// A new secret after a rotation.
#[derive(Debug, Serialize, ToSchema)]
pub struct RotatedSecret {
    /// The new signing secret, `whsec_` + base64.
    pub secret: String,
    /// Until then deliveries carry a signature with the previous secret too
    /// (`webhooks.rotation_overlap` from now).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub previous_secret_expires_at: OffsetDateTime,
}

/// A page of endpoints, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct EndpointPage {
    pub items: Vec<Endpoint>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// One attempt of a delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct Attempt {
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub attempted_at: OffsetDateTime,
    /// The HTTP status, when the endpoint answered.
    pub status_code: Option<i32>,
    /// Why it failed without an answer, or the start (1 KiB) of a non-2xx answer's body.
    pub error: Option<String>,
    pub duration_ms: i32,
}

/// One message's delivery to the endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct Delivery {
    pub id: i64,
    /// The `webhook-id` header: the same in every attempt and replay.
    pub message_id: String,
    pub event_type: String,
    /// `pending` (waiting for its next attempt), `delivered` (a 2xx answer) or `failed`
    /// (every attempt failed).
    #[schema(example = "delivered")]
    pub status: String,
    pub attempts: i32,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_attempt_at: Option<OffsetDateTime>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub delivered_at: Option<OffsetDateTime>,
    /// The latest 20 attempts, newest first.
    pub attempt_log: Vec<Attempt>,
    /// The body sent (the Standard Webhooks envelope `{type, timestamp, data}`).
    #[schema(value_type = Object)]
    pub payload: Box<serde_json::value::RawValue>,
}

/// A page of deliveries, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryPage {
    pub items: Vec<Delivery>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// `GET /api/webhooks/{id}/deliveries` filters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveryFilter {
    /// `pending`, `delivered` or `failed`; absent: all.
    pub status: Option<String>,
}

impl From<store::WebhookEndpointRow> for Endpoint {
    fn from(r: store::WebhookEndpointRow) -> Self {
        Endpoint {
            id: r.id,
            url: r.url,
            description: r.description,
            events: r.event_types,
            enabled: r.disabled_at.is_none(),
            disabled_at: r.disabled_at,
            disabled_reason: r.disabled_reason,
            failing_since: r.failing_since,
            created_at: r.created_at,
        }
    }
}

/// A new random signing key: (stored base64, shown `whsec_` form).
fn new_secret() -> (String, String) {
    let mut key = [0u8; KEY_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let encoded = STANDARD.encode(key);
    let shown = format!("whsec_{encoded}");
    (encoded, shown)
}

/// The endpoint id of a path segment; anything else is 404.
fn endpoint_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0 && raw.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| not_found(raw))
}

fn not_found(raw: &str) -> ApiError {
    ApiError::NotFound(format!("no webhook endpoint with id {raw:?}"))
}

/// The checked fields of a [`NewEndpoint`].
async fn validate(
    state: &AppState,
    body: NewEndpoint,
) -> Result<(String, Vec<String>, String), ApiError> {
    let settings = &state.webhooks;
    let url = match body.url {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => return Err(ApiError::validation("url", "is required")),
        Some(_) => return Err(ApiError::validation("url", "must be a string")),
    };
    let url = webhook::parse_target(&url, settings.max_url_bytes)
        .map_err(|e| ApiError::validation("url", e.to_string()))?;
    webhook::check_target(&url, settings.allow_private_targets)
        .await
        .map_err(|e| ApiError::validation("url", e.to_string()))?;
    let known = || {
        EVENT_TYPES
            .iter()
            .map(|(t, _)| *t)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut events = match body.events {
        Some(Value::Array(items)) if !items.is_empty() => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) if webhook::is_event_type(&s) => Ok(s),
                other => Err(ApiError::validation(
                    "events",
                    format!("{other} is not an event type; known: {}", known()),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        None | Some(Value::Null) => return Err(ApiError::validation("events", "is required")),
        Some(_) => {
            return Err(ApiError::validation(
                "events",
                format!("must be a non-empty array of event types: {}", known()),
            ))
        }
    };
    events.sort();
    events.dedup();
    let description = match body.description {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) if s.trim().chars().count() <= DESCRIPTION_MAX => {
            s.trim().to_owned()
        }
        Some(Value::String(_)) => {
            return Err(ApiError::validation(
                "description",
                "must be at most 200 characters",
            ))
        }
        Some(_) => return Err(ApiError::validation("description", "must be a string")),
    };
    Ok((url.to_string(), events, description))
}

#[utoipa::path(
    post,
    path = "/api/webhooks",
    operation_id = "create_webhook",
    summary = "Register a webhook endpoint",
    description = "Registers an endpoint for the event types in `events` (contract §11) and answers with its signing secret, shown this once (`POST /api/webhooks/{id}/rotate-secret` makes a new one). The endpoint receives the events that happen from now on, signed as the Standard Webhooks specification says. `url` is refused when it is not `http`/`https`, carries credentials, or its host is or resolves to a loopback, private, link-local or otherwise non-public address (unless `webhooks.allow_private_targets`).",
    tag = "webhooks",
    request_body(content = NewEndpoint, content_type = "application/json"),
    responses(
        (status = 201, description = "Registered, with its secret", body = CreatedEndpoint,
            headers(("Location" = String, description = "`/api/webhooks/{id}`"))),
        (status = 400, description = "`invalid_json`: the body is not a JSON object", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: `field` names the bad one (`url`, `events`, `description`), or `url` when `webhooks.max_endpoints` endpoints exist already", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// `POST /api/webhooks` (admin): 201 with the endpoint and its `whsec_` secret; 422 naming
/// `url`, `events` or `description`.
pub async fn create(
    State(state): State<AppState>,
    caller: Authenticated,
    ValidatedJson(body): ValidatedJson<NewEndpoint>,
) -> Result<Response, ApiError> {
    caller.admin()?;
    let (url, events, description) = validate(&state, body).await?;
    let (key, shown) = new_secret();
    let row = store::create_webhook_endpoint(
        &state.db,
        &url,
        &description,
        &events,
        &key,
        state.webhooks.max_endpoints,
    )
    .await?
    .ok_or_else(|| {
        ApiError::validation(
            "url",
            format!(
                "{} endpoints are registered already (webhooks.max_endpoints); delete one first",
                state.webhooks.max_endpoints
            ),
        )
    })?;
    let id = row.id;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/webhooks/{id}"))],
        Json(CreatedEndpoint {
            endpoint: row.into(),
            secret: shown,
        }),
    )
        .into_response())
}

#[utoipa::path(
    get,
    path = "/api/webhooks",
    operation_id = "list_webhooks",
    summary = "List webhook endpoints",
    description = "Endpoints oldest first, without their secrets, `limit` at a time; pass `next_cursor` as `cursor` for the next page.",
    tag = "webhooks",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "Page size, 1–500 (default 50)"),
        ("cursor" = Option<String>, Query, pattern = "^[0-9]*$", description = "`next_cursor` of the previous page; absent for the first page"),
    ),
    responses(
        (status = 200, description = "A page of endpoints", body = EndpointPage),
        (status = 422, description = "`validation_failed`: `field` is `limit`, `cursor` or `query`", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// `GET /api/webhooks?limit=&cursor=` (admin): endpoints oldest first.
pub async fn list(
    State(state): State<AppState>,
    caller: Authenticated,
    Query(page): Query<Page>,
) -> Result<Json<EndpointPage>, ApiError> {
    caller.admin()?;
    let limit = page.limit()?;
    let after = page.cursor()?;
    let rows = store::webhook_endpoints_page(&state.db, after, limit).await?;
    let next = next_cursor(&rows, limit, |r| r.id);
    Ok(Json(EndpointPage {
        items: rows.into_iter().map(Endpoint::from).collect(),
        next_cursor: next,
    }))
}

#[utoipa::path(
    get,
    path = "/api/webhooks/{id}",
    operation_id = "get_webhook",
    summary = "Get a webhook endpoint",
    description = "The endpoint without its secret; `enabled`, `disabled_reason` and `failing_since` say how its deliveries go.",
    tag = "webhooks",
    params(("id" = i64, Path, minimum = 1, description = "The endpoint id")),
    responses(
        (status = 200, description = "The endpoint", body = Endpoint),
        (status = 404, description = "`not_found`: no endpoint with this id", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// `GET /api/webhooks/{id}` (admin).
pub async fn get(
    State(state): State<AppState>,
    caller: Authenticated,
    PathText(raw): PathText,
) -> Result<Json<Endpoint>, ApiError> {
    caller.admin()?;
    let id = endpoint_id(&raw)?;
    let row = store::webhook_endpoint(&state.db, id)
        .await?
        .ok_or_else(|| not_found(&raw))?;
    Ok(Json(row.into()))
}

#[utoipa::path(
    delete,
    path = "/api/webhooks/{id}",
    operation_id = "delete_webhook",
    summary = "Delete a webhook endpoint",
    description = "Deletes the endpoint with its deliveries and their attempts; nothing more is sent to it (an attempt already in flight may still arrive).",
    tag = "webhooks",
    params(("id" = i64, Path, minimum = 1, description = "The endpoint id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`not_found`: no endpoint with this id", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// `DELETE /api/webhooks/{id}` (admin): 204, or 404.
pub async fn delete(
    State(state): State<AppState>,
    caller: Authenticated,
    PathText(raw): PathText,
) -> Result<StatusCode, ApiError> {
    caller.admin()?;
    let id = endpoint_id(&raw)?;
    if store::delete_webhook_endpoint(&state.db, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(&raw))
    }
}

#[utoipa::path(
    post,
    path = "/api/webhooks/{id}/rotate-secret",
    operation_id = "rotate_webhook_secret",
    summary = "Rotate a webhook endpoint's secret",
    description = "Makes a new signing secret. For `webhooks.rotation_overlap` (default 24 h) every delivery carries two signatures in `webhook-signature`, one per secret, so that the receiver can switch over without losing a message; then only the new one.",
    tag = "webhooks",
    params(("id" = i64, Path, minimum = 1, description = "The endpoint id")),
    responses(
        (status = 200, description = "The new secret", body = RotatedSecret),
        (status = 404, description = "`not_found`: no endpoint with this id", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// `POST /api/webhooks/{id}/rotate-secret` (admin): the new `whsec_` secret.
pub async fn rotate_secret(
    State(state): State<AppState>,
    caller: Authenticated,
    PathText(raw): PathText,
) -> Result<Json<RotatedSecret>, ApiError> {
    caller.admin()?;
    let id = endpoint_id(&raw)?;
    let (key, shown) = new_secret();
    let expires =
        store::rotate_webhook_secret(&state.db, id, &key, state.webhooks.rotation_overlap)
            .await?
            .ok_or_else(|| not_found(&raw))?;
    Ok(Json(RotatedSecret {
        secret: shown,
        previous_secret_expires_at: expires,
    }))
}

#[utoipa::path(
    post,
    path = "/api/webhooks/{id}/enable",
    operation_id = "enable_webhook",
    summary = "Enable a disabled webhook endpoint",
    description = "Enables an endpoint the webhooks service disabled (see `disabled_reason`): its pending deliveries are attempted at once and new events are queued for it again. Events that happened while it was disabled are not queued for it. Idempotent.",
    tag = "webhooks",
    params(("id" = i64, Path, minimum = 1, description = "The endpoint id")),
    responses(
        (status = 200, description = "The endpoint, enabled", body = Endpoint),
        (status = 404, description = "`not_found`: no endpoint with this id", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// `POST /api/webhooks/{id}/enable` (admin).
pub async fn enable(
    State(state): State<AppState>,
    caller: Authenticated,
    PathText(raw): PathText,
) -> Result<Json<Endpoint>, ApiError> {
    caller.admin()?;
    let id = endpoint_id(&raw)?;
    let row = store::enable_webhook_endpoint(&state.db, id)
        .await?
        .ok_or_else(|| not_found(&raw))?;
    Ok(Json(row.into()))
}

#[utoipa::path(
    get,
    path = "/api/webhooks/{id}/deliveries",
    operation_id = "list_webhook_deliveries",
    summary = "List an endpoint's deliveries with their attempts",
    description = "The endpoint's deliveries newest first, each with its status, its latest 20 attempts and the body sent, `limit` at a time; `status` filters.",
    tag = "webhooks",
    params(
        ("id" = i64, Path, minimum = 1, description = "The endpoint id"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "Page size, 1–500 (default 50)"),
        ("cursor" = Option<String>, Query, pattern = "^[0-9]*$", description = "`next_cursor` of the previous page; absent for the first page"),
        DeliveryFilter,
    ),
    responses(
        (status = 200, description = "A page of deliveries", body = DeliveryPage),
        (status = 404, description = "`not_found`: no endpoint with this id", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: `field` is `limit`, `cursor`, `status` or `query`", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// `GET /api/webhooks/{id}/deliveries?status=&limit=&cursor=` (admin).
pub async fn deliveries(
    State(state): State<AppState>,
    caller: Authenticated,
    PathText(raw): PathText,
    Query(page): Query<Page>,
    Query(filter): Query<DeliveryFilter>,
) -> Result<Json<DeliveryPage>, ApiError> {
    caller.admin()?;
    let id = endpoint_id(&raw)?;
    let limit = page.limit()?;
    let before = page.cursor()?;
    if let Some(s) = filter.status.as_deref() {
        if !["pending", "delivered", "failed"].contains(&s) {
            return Err(ApiError::validation(
                "status",
                "must be pending, delivered or failed",
            ));
        }
    }
    if store::webhook_endpoint(&state.db, id).await?.is_none() {
        return Err(not_found(&raw));
    }
    let (rows, attempts) =
        store::webhook_deliveries_page(&state.db, id, filter.status.as_deref(), before, limit)
            .await?;
    let next = next_cursor(&rows, limit, |r| r.id);
    let items = rows
        .into_iter()
        .map(|r| {
            let attempt_log = attempts
                .iter()
                .filter(|a| a.delivery_id == r.id)
                .map(|a| Attempt {
                    attempted_at: a.attempted_at,
                    status_code: a.status_code,
                    error: a.error.clone(),
                    duration_ms: a.duration_ms,
                })
                .collect();
            let payload = serde_json::value::RawValue::from_string(r.payload)
                .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("stored payload")))?;
            Ok(Delivery {
                id: r.id,
                message_id: r.message_id,
                event_type: r.event_type,
                status: r.status,
                attempts: r.attempts,
                next_attempt_at: r.next_attempt_at,
                last_status_code: r.last_status_code,
                last_error: r.last_error,
                created_at: r.created_at,
                delivered_at: r.delivered_at,
                attempt_log,
                payload,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Json(DeliveryPage {
        items,
        next_cursor: next,
    }))
}

#[utoipa::path(
    post,
    path = "/api/webhooks/{id}/deliveries/{delivery_id}/replay",
    operation_id = "replay_webhook_delivery",
    summary = "Send a delivery again",
    description = "Queues the delivery for an attempt at once, with a fresh run of `webhooks.retry_schedule`, whatever its status: the same message, with the same `webhook-id`, newly signed. A disabled endpoint gets it once enabled again.",
    tag = "webhooks",
    params(
        ("id" = i64, Path, minimum = 1, description = "The endpoint id"),
        ("delivery_id" = i64, Path, minimum = 1, description = "The delivery id"),
    ),
    responses(
        (status = 202, description = "Queued"),
        (status = 404, description = "`not_found`: no such delivery of this endpoint", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// `POST /api/webhooks/{id}/deliveries/{delivery_id}/replay` (admin): 202.
pub async fn replay(
    State(state): State<AppState>,
    caller: Authenticated,
    axum::extract::Path((raw, raw_delivery)): axum::extract::Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.admin()?;
    let missing = || {
        ApiError::NotFound(format!(
            "no delivery {raw_delivery:?} of webhook endpoint {raw:?}"
        ))
    };
    let id = endpoint_id(&raw).map_err(|_| missing())?;
    let delivery = endpoint_id(&raw_delivery).map_err(|_| missing())?;
    if store::replay_webhook_delivery(&state.db, id, delivery).await? {
        Ok(StatusCode::ACCEPTED)
    } else {
        Err(missing())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_standard_webhooks_secrets() {
        let (stored, shown) = new_secret();
        assert_eq!(shown, format!("whsec_{stored}"));
        assert_eq!(STANDARD.decode(&stored).unwrap().len(), KEY_BYTES);
        assert_ne!(new_secret().0, stored);
    }

    #[test]
    fn endpoint_ids_are_positive_digits() {
        assert_eq!(endpoint_id("12").ok(), Some(12));
        for bad in ["0", "-1", "+1", "1.0", "x", "99999999999999999999"] {
            assert!(endpoint_id(bad).is_err(), "{bad}");
        }
    }
}
