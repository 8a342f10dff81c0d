//! Refunds (contract §10): `POST /api/purchases/{purchase_id}/refunds` publishes a refund to
//! `upline.purchases` (routing key `refund`) for a worker to apply; `GET /api/refunds/{refund_id}`
//! tells what a worker made of it.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::Json;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use upline_common::http::Problem;
use upline_common::money::Money;
use upline_common::purchase::PurchaseId;
use upline_common::refund::{Refund, RefundId};
use utoipa::ToSchema;

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::extract::{PathText, ValidatedJson};
use crate::model::Accepted;
use crate::responses::ProducerErrors;
use crate::{store, AppState};

/// `POST /api/purchases/{purchase_id}/refunds`. `null` counts as absent; unknown fields are
/// ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"refund_id": "rf-2026-000045", "amount": "500.00"}))]
pub struct RefundRequest {
    /// The refund's idempotency key: 1–64 characters of `A-Za-z0-9._:-`.
    #[serde(default)]
    #[schema(value_type = String, required = true, pattern = r"^[A-Za-z0-9._:-]{1,64}$")]
    pub refund_id: Option<Value>,
    /// Rupees to refund, positive, at most two decimal places; absent = everything of the
    /// purchase still refundable.
    #[serde(default)]
    #[schema(value_type = Option<upline_common::purchase::MoneyInput>)]
    pub amount: Option<Value>,
}

impl RefundRequest {
    /// The refund of purchase `purchase_id` this request asks for.
    ///
    /// # Errors
    /// 422 naming `purchase_id`, `refund_id` or `amount`.
    pub fn into_refund(self, purchase_id: &str) -> Result<Refund, ApiError> {
        let purchase_id =
            PurchaseId::parse(purchase_id).map_err(|m| ApiError::validation("purchase_id", m))?;
        let refund_id = match self.refund_id {
            None | Some(Value::Null) => {
                return Err(ApiError::validation("refund_id", "is required"))
            }
            Some(Value::String(s)) => {
                RefundId::parse(&s).map_err(|m| ApiError::validation("refund_id", m))?
            }
            Some(_) => return Err(ApiError::validation("refund_id", "must be a string")),
        };
        let amount = match self.amount {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                Money::from_json(&v).map_err(|e| ApiError::validation("amount", e.to_string()))?,
            ),
        };
        Ok(Refund {
            refund_id,
            purchase_id,
            amount,
        })
    }
}

/// `202` of `POST /api/purchases/{purchase_id}/refunds`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"refund_id": "rf-2026-000045", "purchase_id": "ord-2026-000123",
    "status": "accepted"}))]
pub struct RefundAccepted {
    pub refund_id: String,
    pub purchase_id: String,
    pub status: Accepted,
}

/// What a worker made of a refund (contract §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RefundStatus {
    /// Its purchase has not been processed yet: applied once it is.
    Waiting,
    /// The commissions of the purchase were reversed in proportion.
    Applied,
    /// Nothing refunded: `reason` says why.
    Rejected,
}

/// A refund as a worker recorded it (`GET /api/refunds/{refund_id}`, and `refunds` of
/// `GET /api/purchases/{purchase_id}`).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"refund_id": "rf-2026-000045", "purchase_id": "ord-2026-000123",
    "requested": "500.00", "amount": "500.00", "status": "applied", "reason": null,
    "received_at": "2026-11-24T10:00:00Z", "applied_at": "2026-11-24T10:00:00.250Z"}))]
pub struct RefundReport {
    pub refund_id: String,
    pub purchase_id: String,
    /// The amount asked for, rupees; `null` = everything still refundable.
    pub requested: Option<Money>,
    /// What it refunded, rupees, once applied; `null` before (or when rejected).
    pub amount: Option<Money>,
    pub status: RefundStatus,
    /// Why it was rejected: the field first (`"amount: …"`).
    pub reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub received_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub applied_at: Option<OffsetDateTime>,
}

impl From<store::RefundRow> for RefundReport {
    fn from(r: store::RefundRow) -> Self {
        RefundReport {
            refund_id: r.refund_id,
            purchase_id: r.purchase_id,
            requested: r.requested.map(Money::from_total),
            amount: r.amount.map(Money::from_total),
            status: match r.status.as_str() {
                "applied" => RefundStatus::Applied,
                "rejected" => RefundStatus::Rejected,
                _ => RefundStatus::Waiting,
            },
            reason: r.reason,
            received_at: r.received_at,
            applied_at: r.applied_at,
        }
    }
}

/// The refunds of a purchase, for its report: what was refunded in all and each refund.
pub async fn of_purchase(
    state: &AppState,
    purchase_id: &str,
) -> Result<(Money, Vec<RefundReport>), ApiError> {
    let (refunded, rows): (Decimal, _) = store::purchase_refunds(&state.db, purchase_id).await?;
    Ok((
        Money::from_total(refunded),
        rows.into_iter().map(RefundReport::from).collect(),
    ))
}

#[utoipa::path(
    post,
    path = "/api/purchases/{purchase_id}/refunds",
    operation_id = "create_refund",
    summary = "Refund (part of) a purchase",
    description = "Validates the refund and publishes it to `upline.purchases` with routing key `refund` (contract §10), answering 202 once RabbitMQ confirmed it; a worker then reverses the purchase's commissions in proportion (a clawback). `refund_id` is the idempotency key: sending the same refund again is harmless, and reusing the id for another purchase or amount is `409 refund_conflict` once a worker has recorded the first. The purchase need not have been processed yet: the refund then waits for it. Without `amount`, everything still refundable is refunded.",
    tag = "purchases",
    params(
        ("purchase_id" = String, Path, description = "The purchase id (SPEC §3)"),
    ),
    request_body(content = RefundRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted: RabbitMQ confirmed the message; a worker will apply it", body = RefundAccepted,
            headers(("Location" = String, description = "`/api/refunds/{refund_id}`"))),
        (status = 400, description = "`invalid_json`: the body is not a JSON object", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`refund_conflict`: this `refund_id` was recorded with a different purchase or amount", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: `field` names the bad one (`purchase_id`, `refund_id`, `amount`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`broker_unavailable`: not accepted, retry later", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = String, description = "Seconds to wait: `5`"))),
        ProducerErrors,
    ),
    security(("producer_key" = []), ("admin_key" = [])),
)]
/// `POST /api/purchases/{purchase_id}/refunds` (producer, admin), contract §10: body
/// `{refund_id, amount?}`. 202 once the broker confirmed the refund message; 422 naming a bad
/// field; 409 `refund_conflict` when a worker recorded this `refund_id` with another purchase
/// or amount; 503 when the broker is down. The purchase need not exist yet.
pub async fn create(
    State(state): State<AppState>,
    caller: Authenticated,
    PathText(purchase_id): PathText,
    ValidatedJson(body): ValidatedJson<RefundRequest>,
) -> Result<
    (
        StatusCode,
        [(header::HeaderName, String); 1],
        Json<RefundAccepted>,
    ),
    ApiError,
> {
    caller.producer_or_admin()?;
    let refund = body.into_refund(&purchase_id)?;
    if let Some(stored) = store::refund_fingerprint(&state.db, refund.refund_id.as_str()).await? {
        if stored != refund.fingerprint() {
            return Err(ApiError::RefundConflict);
        }
    }
    state.publisher.publish_refund(&refund).await.map_err(|e| {
        tracing::warn!(error = %e, refund_id = %refund.refund_id, "refund not accepted");
        ApiError::BrokerUnavailable
    })?;
    metrics::counter!("upline_refunds_accepted_total").increment(1);
    Ok((
        StatusCode::ACCEPTED,
        [(
            header::LOCATION,
            format!("/api/refunds/{}", refund.refund_id),
        )],
        Json(RefundAccepted {
            refund_id: refund.refund_id.to_string(),
            purchase_id: refund.purchase_id.to_string(),
            status: Accepted::Accepted,
        }),
    ))
}

#[utoipa::path(
    get,
    path = "/api/refunds/{refund_id}",
    operation_id = "get_refund",
    summary = "What became of a refund",
    description = "`status` is `waiting` (its purchase is not processed yet), `applied` (`amount` was refunded and the commissions reversed in proportion) or `rejected` (with `reason`). 404 until a worker has recorded the refund.",
    tag = "purchases",
    params(
        ("refund_id" = String, Path, description = "The refund id"),
    ),
    responses(
        (status = 200, description = "What a worker recorded", body = RefundReport),
        (status = 404, description = "`refund_not_found`: not recorded (yet), or never received", body = Problem, content_type = "application/problem+json"),
        ProducerErrors,
    ),
    security(("producer_key" = []), ("admin_key" = [])),
)]
/// `GET /api/refunds/{refund_id}` (producer, admin): `{refund_id, purchase_id, requested,
/// amount, status, reason, received_at, applied_at}`; 404 `refund_not_found` until a worker
/// has recorded it.
pub async fn get(
    State(state): State<AppState>,
    caller: Authenticated,
    PathText(id): PathText,
) -> Result<Json<RefundReport>, ApiError> {
    caller.producer_or_admin()?;
    let not_found = || ApiError::RefundNotFound(format!("no refund with id {id:?} (yet)"));
    if RefundId::parse(&id).is_err() {
        return Err(not_found());
    }
    let row = store::refund(&state.db, &id).await?.ok_or_else(not_found)?;
    Ok(Json(row.into()))
}
