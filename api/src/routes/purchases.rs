//! `/api/purchases`: intake (validate, publish with confirm, 202) and the processed result.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use rand::Rng;
use serde_json::{json, Value};
use upline_common::money::Money;
use upline_common::purchase::{self, PurchaseId};

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::extract::{opt_str, JsonObject};
use crate::{store, AppState};

/// `POST /api/purchases` (producer, admin). The purchase id comes from the body's
/// `purchase_id`, else the `Idempotency-Key` header, else is generated. 202 once the broker
/// confirmed the message; 422 for bad fields or an unknown buyer; 503 when the broker is down.
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
        (None, None) => generated_id(),
    };
    let purchase_id =
        PurchaseId::parse(&raw_id).map_err(|m| ApiError::validation("purchase_id", m))?;
    body.insert("purchase_id".into(), Value::String(raw_id));
    let purchase = purchase::validate(purchase_id, &body, &state.rules)
        .map_err(|invalid| ApiError::validation(invalid.field, invalid.message))?;
    if !store::user_exists(&state.db, purchase.buyer_id).await? {
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

fn generated_id() -> String {
    let n: u128 = rand::thread_rng().gen();
    format!("api-{n:032x}")
}

fn money(d: Option<rust_decimal::Decimal>) -> Value {
    d.map_or(Value::Null, |d| json!(Money::from_total(d)))
}

/// `GET /api/purchases/{purchase_id}` (producer, admin): what a worker recorded. `status` is
/// `processed` or `rejected` (with `reason`), or `conflict` when the id was later received
/// with different content (`original_status` then tells what the first one came to; the
/// conflicting bodies are listed and paid nothing). 404 until a worker has processed it.
pub async fn get(
    State(state): State<AppState>,
    caller: Authenticated,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    caller.producer_or_admin()?;
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
            "body": c.body.0,
        })).collect::<Vec<_>>(),
    })))
}
