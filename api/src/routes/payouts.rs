//! Payout batches (contract §10), admin only: `POST /api/payouts` makes a batch of every
//! approved balance over `payout.minimum`, `GET /api/payouts[/{id}[.csv]]` lists and exports
//! them for the finance team, and `POST /api/payouts/{id}/paid` records that the batch was
//! paid, which appends a `payout` ledger entry per earner (approved → paid). No money leaves
//! the system: the batch is the instruction.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use upline_common::http::Problem;
use upline_common::money::Money;
use upline_common::purchase::PurchaseId;
use upline_common::UserId;
use utoipa::ToSchema;

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::extract::{idempotency_key, next_cursor, Page, PathText, Query, ValidatedJson};
use crate::responses::AdminErrors;
use crate::{store, AppState};

/// Longest batch label, in characters.
const LABEL_MAX: usize = 100;

/// `POST /api/payouts`. The idempotency key comes from `idempotency_key` or the
/// `Idempotency-Key` header (one is required; they must agree when both are sent). `null`
/// counts as absent; unknown fields are ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"label": "November 2026", "idempotency_key": "payout-2026-11"}))]
pub struct PayoutRequest {
    /// A name for the batch, at most 100 characters (trimmed; blank = none).
    #[serde(default)]
    #[schema(value_type = Option<String>, max_length = 100)]
    pub label: Option<Value>,
    /// The idempotency key, when not sent in the `Idempotency-Key` header: 1–64 characters of
    /// `A-Za-z0-9._:-`.
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = r"^[A-Za-z0-9._:-]{1,64}$")]
    pub idempotency_key: Option<Value>,
}

/// Whether a batch has been paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PayoutStatus {
    /// Made, not yet paid: its earners get no line in another batch until it is.
    Created,
    /// Paid: each line's amount moved from `approved` to `paid` with a `payout` ledger entry.
    Paid,
}

/// A payout batch without its lines (the items of `GET /api/payouts`).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id": 3, "status": "created", "label": "November 2026",
    "period_start": "2026-10-31T18:00:00Z", "period_end": "2026-11-30T18:00:00Z",
    "minimum": "500.00", "currency": "INR", "total": "1600.00", "line_count": 2,
    "created_at": "2026-11-30T18:00:00Z", "paid_at": null}))]
pub struct PayoutSummary {
    pub id: i64,
    pub status: PayoutStatus,
    pub label: Option<String>,
    /// The previous batch's `period_end`; `null` for the first batch.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub period_start: Option<OffsetDateTime>,
    /// When the batch was made: the approved balances are as of then.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub period_end: OffsetDateTime,
    /// `payout.minimum` when the batch was made: smaller approved balances got no line.
    pub minimum: Money,
    #[schema(example = "INR")]
    pub currency: String,
    /// The sum of the lines, rupees.
    pub total: Money,
    pub line_count: i32,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// When it was marked paid; `null` until then.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub paid_at: Option<OffsetDateTime>,
}

/// One earner's line of a batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct PayoutLine {
    #[schema(value_type = i64, minimum = 1)]
    pub user_id: UserId,
    pub name: String,
    /// The earner's whole approved balance when the batch was made, rupees.
    pub amount: Money,
    /// The earner's last ledger `seq` when the batch was made: everything approved up to it
    /// is covered.
    pub through_seq: i64,
}

/// A payout batch with its lines, by user id.
#[derive(Debug, Serialize, ToSchema)]
pub struct PayoutBatch {
    #[serde(flatten)]
    pub batch: PayoutSummary,
    pub lines: Vec<PayoutLine>,
}

/// A page of payout batches, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct PayoutPage {
    pub items: Vec<PayoutSummary>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

impl From<store::PayoutRow> for PayoutSummary {
    fn from(r: store::PayoutRow) -> Self {
        PayoutSummary {
            id: r.id,
            status: if r.status == "paid" {
                PayoutStatus::Paid
            } else {
                PayoutStatus::Created
            },
            label: r.label,
            period_start: r.period_start,
            period_end: r.period_end,
            minimum: Money::from_total(r.minimum),
            currency: r.currency,
            total: Money::from_total(r.total),
            line_count: r.line_count,
            created_at: r.created_at,
            paid_at: r.paid_at,
        }
    }
}

impl PayoutBatch {
    fn new(row: store::PayoutRow, lines: Vec<store::PayoutLineRow>) -> Self {
        PayoutBatch {
            batch: row.into(),
            lines: lines
                .into_iter()
                .map(|l| PayoutLine {
                    user_id: l.user_id,
                    name: l.name,
                    amount: Money::from_total(l.amount),
                    through_seq: l.through_seq,
                })
                .collect(),
        }
    }

    /// The batch as CSV: `payout_id,user_id,name,amount,currency,through_seq`, a row per
    /// line by user id, quoted as RFC 4180 says.
    ///
    /// # Errors
    /// Never in practice (writing to memory).
    pub fn to_csv(&self) -> Result<Vec<u8>, ApiError> {
        let mut w = csv::Writer::from_writer(Vec::new());
        let fail = |e: csv::Error| ApiError::Internal(anyhow::Error::new(e).context("csv"));
        w.write_record([
            "payout_id",
            "user_id",
            "name",
            "amount",
            "currency",
            "through_seq",
        ])
        .map_err(fail)?;
        for line in &self.lines {
            w.write_record([
                self.batch.id.to_string(),
                line.user_id.to_string(),
                line.name.clone(),
                line.amount.to_string(),
                self.batch.currency.clone(),
                line.through_seq.to_string(),
            ])
            .map_err(fail)?;
        }
        w.into_inner()
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("csv: {e}")))
    }
}

/// The idempotency key and label of a batch request.
fn key_and_label(
    headers: &HeaderMap,
    body: PayoutRequest,
) -> Result<(String, Option<String>), ApiError> {
    let body_key = || match &body.idempotency_key {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
        Some(_) => Err(ApiError::validation("idempotency_key", "must be a string")),
    };
    let Some((field, key)) = idempotency_key(headers, body_key, "idempotency_key")? else {
        return Err(ApiError::PayoutKeyRequired);
    };
    PurchaseId::parse(&key).map_err(|m| ApiError::validation(field, m))?;
    let label = match body.label {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let s = s.trim();
            if s.chars().count() > LABEL_MAX {
                return Err(ApiError::validation(
                    "label",
                    "must be at most 100 characters",
                ));
            }
            (!s.is_empty()).then(|| s.to_owned())
        }
        Some(_) => return Err(ApiError::validation("label", "must be a string")),
    };
    Ok((key, label))
}

#[utoipa::path(
    post,
    path = "/api/payouts",
    operation_id = "create_payout",
    summary = "Make a payout batch",
    description = "Makes a batch (contract §10) with a line for every earner whose approved balance is at least `payout.minimum` (and above zero) and who has no line in a batch not yet paid; each line pays the earner's whole approved balance, through the earner's current ledger `seq`. `period_start` is the previous batch's `period_end`, `period_end` now. A batch may have no lines. The idempotency key (`idempotency_key` or the `Idempotency-Key` header) is required: the same key with the same `label` answers 200 with the batch it made; with another `label`, `409 idempotency_conflict`. Batches are made one at a time.",
    tag = "payouts",
    params(
        ("Idempotency-Key" = Option<String>, Header, max_length = 64, pattern = "^[A-Za-z0-9._:-]{1,64}$",
            description = "The idempotency key, when the body has no `idempotency_key` (they must agree when both are sent)"),
    ),
    request_body(content = PayoutRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Made: the new batch with its lines", body = PayoutBatch,
            headers(("Location" = String, description = "`/api/payouts/{id}`"))),
        (status = 200, description = "The batch this idempotency key made before", body = PayoutBatch),
        (status = 400, description = "`invalid_json`: the body is not a JSON object", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`idempotency_conflict`: the key was used for a batch with another `label`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: `field` names the bad one (`label`, `idempotency_key`, `Idempotency-Key`); `idempotency_key_required`: neither `idempotency_key` nor `Idempotency-Key` was sent", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// `POST /api/payouts` (admin), contract §10: makes a payout batch, idempotently (see the
/// operation's description). 201 with the new batch, 200 with the one the key made before,
/// 409 `idempotency_conflict`, 422 `idempotency_key_required` or naming a bad field.
pub async fn create(
    State(state): State<AppState>,
    caller: Authenticated,
    headers: HeaderMap,
    ValidatedJson(body): ValidatedJson<PayoutRequest>,
) -> Result<Response, ApiError> {
    caller.admin()?;
    let (key, label) = key_and_label(&headers, body)?;
    let fingerprint = format!(
        "v1|{}",
        serde_json::to_string(&label).expect("a string serialises")
    );
    let mut tx = state.db.begin().await?;
    let created = store::create_payout(
        &mut tx,
        &store::NewPayout {
            idempotency_key: &key,
            fingerprint: &fingerprint,
            label: label.as_deref(),
            minimum: state.payout_minimum,
            currency: &state.rules.currency,
        },
    )
    .await?;
    let (store::PayoutCreation::Created(id) | store::PayoutCreation::Existing(id)) = created;
    let (row, lines) = store::payout(&mut tx, id)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("payout {id} vanished")))?;
    tx.commit().await?;
    let batch = Json(PayoutBatch::new(row, lines));
    Ok(match created {
        store::PayoutCreation::Created(id) => {
            metrics::counter!("upline_payouts_created_total").increment(1);
            (
                StatusCode::CREATED,
                [(header::LOCATION, format!("/api/payouts/{id}"))],
                batch,
            )
                .into_response()
        }
        store::PayoutCreation::Existing(_) => (StatusCode::OK, batch).into_response(),
    })
}

#[utoipa::path(
    get,
    path = "/api/payouts",
    operation_id = "list_payouts",
    summary = "List payout batches",
    description = "Batches newest first, without their lines, `limit` at a time; pass `next_cursor` as `cursor` for the next page (it is null on the last one).",
    tag = "payouts",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "Page size, 1–500 (default 50)"),
        ("cursor" = Option<String>, Query, pattern = "^[0-9]*$", description = "`next_cursor` of the previous page; absent for the first page"),
    ),
    responses(
        (status = 200, description = "A page of batches, newest first; `next_cursor` is null on the last page", body = PayoutPage),
        (status = 422, description = "`validation_failed`: `field` is `limit`, `cursor` or `query`", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// `GET /api/payouts?limit=&cursor=` (admin): batches newest first, without their lines.
pub async fn list(
    State(state): State<AppState>,
    caller: Authenticated,
    Query(page): Query<Page>,
) -> Result<Json<PayoutPage>, ApiError> {
    caller.admin()?;
    let limit = page.limit()?;
    let before = page.cursor()?;
    let rows = store::payouts_page(&state.db, before, limit).await?;
    let next = next_cursor(&rows, limit, |r| r.id);
    Ok(Json(PayoutPage {
        items: rows.into_iter().map(PayoutSummary::from).collect(),
        next_cursor: next,
    }))
}

/// The batch id of a path segment `<digits>` (`csv` false) or `<digits>.csv` (`csv` true).
fn parse_id(raw: &str) -> Option<(i64, bool)> {
    let (digits, csv) = match raw.strip_suffix(".csv") {
        Some(d) => (d, true),
        None => (raw, false),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(|id| (id, csv))
}

async fn load(state: &AppState, id: i64) -> Result<PayoutBatch, ApiError> {
    let mut conn = state.db.acquire().await?;
    let (row, lines) = store::payout(&mut conn, id)
        .await?
        .ok_or_else(|| ApiError::PayoutNotFound(format!("no payout batch with id {id}")))?;
    Ok(PayoutBatch::new(row, lines))
}

#[utoipa::path(
    get,
    path = "/api/payouts/{id}",
    operation_id = "get_payout",
    summary = "Get a payout batch",
    tag = "payouts",
    params(
        ("id" = i64, Path, minimum = 1, description = "The batch id"),
    ),
    responses(
        (status = 200, description = "The batch with its lines, by user id", body = PayoutBatch),
        (status = 404, description = "`payout_not_found`: no batch with this id", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// `GET /api/payouts/{id}` (admin): the batch with its lines; `GET /api/payouts/{id}.csv`: the
/// same as CSV (served by this handler too: the router cannot capture a suffix).
pub async fn get(
    State(state): State<AppState>,
    caller: Authenticated,
    PathText(raw): PathText,
) -> Result<Response, ApiError> {
    caller.admin()?;
    let (id, csv) = parse_id(&raw)
        .ok_or_else(|| ApiError::PayoutNotFound(format!("no payout batch with id {raw:?}")))?;
    let batch = load(&state, id).await?;
    if !csv {
        return Ok(Json(batch).into_response());
    }
    let body = batch.to_csv()?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"payout-{id}.csv\""),
            ),
        ],
        body,
    )
        .into_response())
}

#[utoipa::path(
    get,
    path = "/api/payouts/{id}.csv",
    operation_id = "get_payout_csv",
    summary = "Export a payout batch as CSV",
    description = "The batch for the finance team, as an attachment `payout-<id>.csv`: the header row `payout_id,user_id,name,amount,currency,through_seq`, then a row per line by user id (RFC 4180 quoting).",
    tag = "payouts",
    params(
        ("id" = i64, Path, minimum = 1, description = "The batch id"),
    ),
    responses(
        (status = 200, description = "The batch's lines as CSV", body = String, content_type = "text/csv",
            headers(("Content-Disposition" = String, description = "`attachment; filename=\"payout-<id>.csv\"`"))),
        (status = 404, description = "`payout_not_found`: no batch with this id", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// The OpenAPI operation of `GET /api/payouts/{id}.csv`, which [`get`] serves.
#[allow(dead_code)]
fn get_csv() {}

#[utoipa::path(
    post,
    path = "/api/payouts/{id}/paid",
    operation_id = "mark_payout_paid",
    summary = "Mark a payout batch paid",
    description = "Records that the finance team paid the batch (contract §10): for each line, a `payout` ledger entry with the earner's next `seq` moves the line's amount from `approved` to `paid` (even when a clawback has since lowered the approved balance: it may go below zero, and later payouts recover it), and its earning event is published through the outbox. Idempotent: a batch already paid is answered as it is.",
    tag = "payouts",
    params(
        ("id" = i64, Path, minimum = 1, description = "The batch id"),
    ),
    responses(
        (status = 200, description = "The batch, paid", body = PayoutBatch),
        (status = 404, description = "`payout_not_found`: no batch with this id", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
    ),
    security(("admin_key" = [])),
)]
/// `POST /api/payouts/{id}/paid` (admin): marks the batch paid, idempotently, appending a
/// `payout` ledger entry per line (see [`store::mark_payout_paid`]).
pub async fn mark_paid(
    State(state): State<AppState>,
    caller: Authenticated,
    PathText(raw): PathText,
) -> Result<Json<PayoutBatch>, ApiError> {
    caller.admin()?;
    let not_found = || ApiError::PayoutNotFound(format!("no payout batch with id {raw:?}"));
    let id = match parse_id(&raw) {
        Some((id, false)) => id,
        _ => return Err(not_found()),
    };
    let mut tx = state.db.begin().await?;
    if !store::mark_payout_paid(&mut tx, id, state.rules.rates.len()).await? {
        return Err(not_found());
    }
    tx.commit().await?;
    Ok(Json(load(&state, id).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_with_or_without_the_csv_suffix() {
        assert_eq!(parse_id("12"), Some((12, false)));
        assert_eq!(parse_id("12.csv"), Some((12, true)));
        assert_eq!(parse_id(".csv"), None);
        assert_eq!(parse_id("-1"), None);
        assert_eq!(parse_id("1.json"), None);
        assert_eq!(parse_id("99999999999999999999"), None);
    }
}
