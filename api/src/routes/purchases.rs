//! `/api/purchases`: intake (validate, publish with confirm, 202) and the processed result.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};
use upline_common::money::Money;
use upline_common::purchase::{self, PurchaseId};

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::extract::{opt_str, JsonObject, PathText};
use crate::{store, AppState};

#[utoipa::path(
    post,
    path = "/api/purchases",
    operation_id = "create_purchase",
    summary = "Submit a purchase",
    description = "Validates the purchase and publishes it to `upline.purchases` (SPEC §3) with publisher confirms, answering 202 once RabbitMQ confirmed it; a worker then credits the commissions. The purchase id comes from the body's `purchase_id` or the `Idempotency-Key` header, and one of them is required (`422 idempotency_key_required`): it is the idempotency key, so a client that retries after a timeout or a 503 with the same id never pays twice, which a server-generated id could not promise. Sending the same purchase again is harmless: it is processed once.",
    tag = "purchases",
    params(
        ("Idempotency-Key" = Option<String>, Header, max_length = 64, pattern = "^[A-Za-z0-9._:-]{1,64}$",
            description = "The purchase id, when the body has no `purchase_id` (they must agree when both are sent)"),
    ),
    request_body(content = crate::openapi::PurchaseRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted: RabbitMQ confirmed the message; a worker will process it", body = crate::openapi::PurchaseAccepted,
            headers(("Location" = String, description = "`/api/purchases/{purchase_id}`"))),
        (status = 400, description = "`invalid_json`: the body is not a JSON object", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: no `Authorization: Bearer` credentials", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: neither the producer key nor the admin key", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: `field` names the bad one (`purchase_id`, `Idempotency-Key`, `buyer_id`, `amount`, `currency`, `profit`, `occurred_at`); `unknown_buyer`: no user with this `buyer_id`; `idempotency_key_required`: neither `purchase_id` nor `Idempotency-Key` was sent", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal_error`: logged; the detail says nothing more", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`broker_unavailable`: not accepted, retry later", body = crate::openapi::Problem, content_type = "application/problem+json",
            headers(("Retry-After" = String, description = "Seconds to wait: `5`"))),
    ),
    security(("producer_key" = []), ("admin_key" = [])),
)]
/// `POST /api/purchases` (producer, admin). The purchase id comes from the body's
/// `purchase_id` or the `Idempotency-Key` header, and one of them is required (SPEC §6): a
/// server-generated id would make a client's retry after a timeout pay twice. 202 once the
/// broker confirmed the message; 422 for bad fields, an unknown buyer or no idempotency key;
/// 503 when the broker is down.
pub async fn create(
    State(state): State<AppState>,
    caller: Authenticated,
    headers: HeaderMap,
    JsonObject(mut body): JsonObject,
) -> Result<impl IntoResponse, ApiError> {
    caller.producer_or_admin()?;
    let header_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::validation("Idempotency-Key", "must be ASCII"))?
                .trim()
                .to_owned(),
        ),
    };
    let body_id = opt_str(&body, "purchase_id")?.map(str::to_owned);
    let raw_id = match (body_id, header_key) {
        (Some(b), Some(h)) if b != h => {
            return Err(ApiError::validation(
                "Idempotency-Key",
                "differs from the body's purchase_id",
            ));
        }
        (Some(id), _) | (None, Some(id)) => id,
        (None, None) => return Err(ApiError::IdempotencyKeyRequired),
    };
    let purchase_id =
        PurchaseId::parse(&raw_id).map_err(|m| ApiError::validation("purchase_id", m))?;
    body.insert("purchase_id".into(), Value::String(raw_id));
    let purchase = purchase::validate(purchase_id, &body, &state.rules)
        .map_err(|invalid| ApiError::validation(invalid.field, invalid.message))?;
    if !state
        .known_users
        .contains(&state.db, purchase.buyer_id)
        .await?
    {
        return Err(ApiError::UnknownBuyer(purchase.buyer_id));
    }
    state.publisher.publish(&purchase).await.map_err(|e| {
        tracing::warn!(error = %e, purchase_id = %purchase.purchase_id, "purchase not accepted");
        ApiError::BrokerUnavailable
    })?;
    metrics::counter!("upline_purchases_accepted_total").increment(1);
    Ok((
        StatusCode::ACCEPTED,
        [(
            axum::http::header::LOCATION,
            format!("/api/purchases/{}", purchase.purchase_id),
        )],
        Json(json!({ "purchase_id": purchase.purchase_id, "status": "accepted" })),
    ))
}

fn money(d: Option<rust_decimal::Decimal>) -> Value {
    d.map_or(Value::Null, |d| json!(Money::from_total(d)))
}

#[utoipa::path(
    get,
    path = "/api/purchases/{purchase_id}",
    operation_id = "get_purchase",
    summary = "What became of a purchase",
    description = "`status` is `processed` or `rejected` (with `reason`), or `conflict` once the id was received again with different content (`original_status` then tells what the first message came to; the later bodies are listed under `conflicts` and pay nothing). `levels` gives each configured level's outcome. 404 until a worker has processed the purchase.",
    tag = "purchases",
    params(
        ("purchase_id" = String, Path, description = "The purchase id (SPEC §3)"),
    ),
    responses(
        (status = 200, description = "What a worker recorded, with each level's outcome", body = crate::openapi::PurchaseStatus),
        (status = 401, description = "`unauthorized`: no `Authorization: Bearer` credentials", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: neither the producer key nor the admin key", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: not processed (yet), or never received", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal_error`: logged; the detail says nothing more", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
    security(("producer_key" = []), ("admin_key" = [])),
)]
/// `GET /api/purchases/{purchase_id}` (producer, admin): what a worker recorded. `status` is
/// `processed` or `rejected` (with `reason`), or `conflict` when the id was later received
/// with different content (`original_status` then tells what the first one came to; the
/// conflicting bodies are listed and paid nothing). 404 until a worker has processed it.
pub async fn get(
    State(state): State<AppState>,
    caller: Authenticated,
    PathText(id): PathText,
) -> Result<impl IntoResponse, ApiError> {
    caller.producer_or_admin()?;
    if PurchaseId::parse(&id).is_err() {
        return Err(ApiError::NotFound(format!(
            "no processed purchase with id {id:?}"
        )));
    }
    let (p, levels, conflicts) = store::purchase(&state.db, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no processed purchase with id {id:?} (yet)")))?;
    let status = if conflicts.is_empty() {
        p.status.as_str()
    } else {
        "conflict"
    };
    Ok(Json(json!({
        "purchase_id": p.purchase_id,
        "status": status,
        "original_status": p.status,
        "reason": p.reason,
        "buyer_id": p.buyer_id,
        "amount": money(p.amount),
        "currency": p.currency,
        "profit": money(p.profit),
        "occurred_at": p.occurred_at.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
        "processed_at": p.processed_at.format(&time::format_description::well_known::Rfc3339).ok(),
        "levels": levels.iter().map(|l| json!({
            "level": l.level,
            "earner_id": l.earner_id,
            "outcome": l.outcome,
            "rate": l.rate.normalize().to_string(),
            "amount": Money::from_total(l.amount),
            "earning_id": l.earning_id,
        })).collect::<Vec<_>>(),
        "conflicts": conflicts.iter().map(|c| json!({
            "received_at": c.received_at.format(&time::format_description::well_known::Rfc3339).ok(),
            "body": c.body.as_ref().map(|b| &b.0),
        })).collect::<Vec<_>>(),
    })))
}
