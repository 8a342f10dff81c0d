//! `/api/purchases`: intake (validate, publish with confirm, 202) and the processed result.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use upline_common::http::Problem;
use upline_common::purchase::{Field, PurchaseId, PurchaseRequest};

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::extract::{idempotency_key, PathText, ValidatedJson};
use crate::model::{Accepted, PurchaseAccepted, PurchaseReport};
use crate::responses::ProducerErrors;
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
    request_body(content = PurchaseRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted: RabbitMQ confirmed the message; a worker will process it", body = PurchaseAccepted,
            headers(("Location" = String, description = "`/api/purchases/{purchase_id}`"))),
        (status = 400, description = "`invalid_json`: the body is not a JSON object", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: `field` names the bad one (`purchase_id`, `Idempotency-Key`, `buyer_id`, `amount`, `currency`, `profit`, `occurred_at`); `unknown_buyer`: no user with this `buyer_id`; `idempotency_key_required`: neither `purchase_id` nor `Idempotency-Key` was sent", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`broker_unavailable`: not accepted, retry later", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = String, description = "Seconds to wait: `5`"))),
        ProducerErrors,
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
    ValidatedJson(body): ValidatedJson<PurchaseRequest>,
) -> Result<
    (
        StatusCode,
        [(header::HeaderName, String); 1],
        Json<PurchaseAccepted>,
    ),
    ApiError,
> {
    caller.producer_or_admin()?;
    let body_id = || match body.purchase_id.clone() {
        None => Ok(None),
        Some(Field::Valid(id)) => Ok(Some(id)),
        Some(Field::Invalid(message)) => Err(ApiError::validation("purchase_id", message)),
    };
    let Some((_, raw_id)) = idempotency_key(&headers, body_id, "purchase_id")? else {
        return Err(ApiError::IdempotencyKeyRequired);
    };
    let purchase_id =
        PurchaseId::parse(&raw_id).map_err(|m| ApiError::validation("purchase_id", m))?;
    let purchase = body
        .into_message(purchase_id)
        .validate(&state.rules)
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
            header::LOCATION,
            format!("/api/purchases/{}", purchase.purchase_id),
        )],
        Json(PurchaseAccepted {
            purchase_id: purchase.purchase_id,
            status: Accepted::Accepted,
        }),
    ))
}

#[utoipa::path(
    get,
    path = "/api/purchases/{purchase_id}",
    operation_id = "get_purchase",
    summary = "What became of a purchase",
    description = "`status` is `processed` or `rejected` (with `reason`), or `conflict` once the id was received again with different content (`original_status` then tells what the first message came to; the later bodies are listed under `conflicts` and pay nothing). `levels` gives each configured level's outcome; `refunded` is what its applied refunds refunded and `refunds` lists every refund recorded for it (contract §10). 404 until a worker has processed the purchase.",
    tag = "purchases",
    params(
        ("purchase_id" = String, Path, description = "The purchase id (SPEC §3)"),
    ),
    responses(
        (status = 200, description = "What a worker recorded, with each level's outcome", body = PurchaseReport),
        (status = 404, description = "`not_found`: not processed (yet), or never received", body = Problem, content_type = "application/problem+json"),
        ProducerErrors,
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
) -> Result<Json<PurchaseReport>, ApiError> {
    caller.producer_or_admin()?;
    if PurchaseId::parse(&id).is_err() {
        return Err(ApiError::NotFound(format!(
            "no processed purchase with id {id:?}"
        )));
    }
    let (p, levels, conflicts) = store::purchase(&state.db, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no processed purchase with id {id:?} (yet)")))?;
    let mut report = PurchaseReport::new(p, levels, conflicts);
    (report.refunded, report.refunds) = crate::routes::refunds::of_purchase(&state, &id).await?;
    Ok(Json(report))
}
