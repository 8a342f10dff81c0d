//! `GET /api/users/{id}/earnings/history`: every ledger entry of a user (contract §10), newest
//! first, with its status, filtered and paged, as JSON or CSV.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use upline_common::http::Problem;
use upline_common::money::Money;
use upline_common::rules::EntryKind;
use upline_common::{Level, UserId};
use utoipa::ToSchema;

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::extract::{PathId, Query};
use crate::responses::UserOrAdminErrors;
use crate::{store, AppState};

/// Most rows of a CSV export.
const CSV_CAP: i64 = 100_000;

/// Where an entry's money is (contract §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryStatus {
    /// A commission within its holding period.
    Pending,
    /// A commission past it (or never held) and not yet paid out; an approval entry.
    Approved,
    /// A commission covered by a paid payout batch; a payout entry.
    Paid,
    /// A commission reversed in full; a reversal entry.
    Reversed,
}

impl EntryStatus {
    fn as_str(self) -> &'static str {
        match self {
            EntryStatus::Pending => "pending",
            EntryStatus::Approved => "approved",
            EntryStatus::Paid => "paid",
            EntryStatus::Reversed => "reversed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            EntryStatus::Pending,
            EntryStatus::Approved,
            EntryStatus::Paid,
            EntryStatus::Reversed,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One ledger entry of a user's history.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"earning_id": 9812, "seq": 17, "kind": "commission", "status": "approved",
    "amount": "100.00", "currency": "INR", "level": 1, "source_user_id": 42,
    "purchase_id": "ord-2026-000123", "created_at": "2026-11-20T10:00:00.123Z"}))]
pub struct HistoryEntry {
    pub earning_id: i64,
    /// The earner's entry number: 1, 2, 3 … without gaps.
    pub seq: i64,
    pub kind: EntryKind,
    pub status: EntryStatus,
    /// Rupees: credited (commission), clawed back (reversal, negative), moved (approval,
    /// payout).
    #[schema(value_type = String, example = "100.00")]
    pub amount: Money,
    pub currency: String,
    /// Commission, reversal: 1 = the buyer's direct referrer.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<i16>, minimum = 1)]
    pub level: Option<Level>,
    /// Commission, reversal: the buyer.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<i64>)]
    pub source_user_id: Option<UserId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purchase_id: Option<String>,
    /// Reversal, approval: the commission's `earning_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refers_to: Option<i64>,
    /// Reversal: the refund that caused it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refund_id: Option<String>,
    /// Payout: the batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payout_id: Option<i64>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

impl From<store::HistoryRow> for HistoryEntry {
    fn from(r: store::HistoryRow) -> Self {
        HistoryEntry {
            earning_id: r.earning_id,
            seq: r.seq,
            kind: r.kind,
            status: EntryStatus::parse(&r.status).unwrap_or(EntryStatus::Approved),
            amount: Money::from_total(r.amount),
            currency: r.currency,
            level: r.level,
            source_user_id: r.source_user_id,
            purchase_id: r.purchase_id,
            refers_to: r.refers_to,
            refund_id: r.refund_id,
            payout_id: r.payout_id,
            created_at: r.created_at,
        }
    }
}

/// A page of a user's ledger entries, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryPage {
    pub items: Vec<HistoryEntry>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The query of `GET /api/users/{id}/earnings/history`, read as text and checked here so that
/// a bad value is a 422 naming its parameter.
#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    limit: Option<String>,
    cursor: Option<String>,
    status: Option<String>,
    kind: Option<String>,
    level: Option<String>,
    from: Option<String>,
    to: Option<String>,
    format: Option<String>,
}

/// A checked history query.
struct Checked {
    filter: store::HistoryFilter,
    limit: i64,
    csv: bool,
}

fn nonblank(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

fn timestamp(field: &str, v: Option<String>) -> Result<Option<OffsetDateTime>, ApiError> {
    nonblank(v)
        .map(|s| {
            OffsetDateTime::parse(&s, &Rfc3339).map_err(|_| {
                ApiError::validation(
                    field,
                    "must be an RFC 3339 time such as 2026-11-20T10:00:00Z",
                )
            })
        })
        .transpose()
}

impl HistoryQuery {
    fn check(self, levels: usize) -> Result<Checked, ApiError> {
        let limit = match nonblank(self.limit) {
            None => 50,
            Some(s) => s
                .parse::<i64>()
                .ok()
                .filter(|l| (1..=500).contains(l))
                .ok_or_else(|| ApiError::validation("limit", "must be between 1 and 500"))?,
        };
        let before_seq = nonblank(self.cursor)
            .map(|c| {
                c.parse::<i64>().map_err(|_| {
                    ApiError::validation("cursor", "is not a cursor this API returned")
                })
            })
            .transpose()?;
        let status = nonblank(self.status)
            .map(|s| {
                EntryStatus::parse(&s)
                    .map(|k| k.as_str().to_owned())
                    .ok_or_else(|| {
                        ApiError::validation(
                            "status",
                            "must be pending, approved, paid or reversed",
                        )
                    })
            })
            .transpose()?;
        let kind = nonblank(self.kind)
            .map(|s| {
                [
                    EntryKind::Commission,
                    EntryKind::Reversal,
                    EntryKind::Approval,
                    EntryKind::Payout,
                ]
                .into_iter()
                .find(|k| k.as_str() == s)
                .map(|k| k.as_str().to_owned())
                .ok_or_else(|| {
                    ApiError::validation("kind", "must be commission, reversal, approval or payout")
                })
            })
            .transpose()?;
        let level = nonblank(self.level)
            .map(|s| {
                s.parse::<i16>()
                    .ok()
                    .filter(|l| *l >= 1 && usize::try_from(*l).is_ok_and(|l| l <= levels))
                    .ok_or_else(|| {
                        ApiError::validation(
                            "level",
                            format!("must be a configured level, 1 to {levels}"),
                        )
                    })
            })
            .transpose()?;
        let from = timestamp("from", self.from)?;
        let to = timestamp("to", self.to)?;
        let csv = match nonblank(self.format).as_deref() {
            None | Some("json") => false,
            Some("csv") => true,
            Some(_) => return Err(ApiError::validation("format", "must be json or csv")),
        };
        Ok(Checked {
            filter: store::HistoryFilter {
                before_seq,
                status,
                kind,
                level,
                from,
                to,
            },
            limit,
            csv,
        })
    }
}

/// The entries as CSV, a header row then one row per entry (empty cells for absent fields).
fn to_csv(entries: &[HistoryEntry]) -> Result<Vec<u8>, ApiError> {
    let fail = |e: csv::Error| ApiError::Internal(anyhow::Error::new(e).context("csv"));
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "earning_id",
        "seq",
        "kind",
        "status",
        "amount",
        "currency",
        "level",
        "source_user_id",
        "purchase_id",
        "refers_to",
        "refund_id",
        "payout_id",
        "created_at",
    ])
    .map_err(fail)?;
    let opt = |v: Option<String>| v.unwrap_or_default();
    for e in entries {
        w.write_record([
            e.earning_id.to_string(),
            e.seq.to_string(),
            e.kind.as_str().to_owned(),
            e.status.as_str().to_owned(),
            e.amount.to_string(),
            e.currency.clone(),
            opt(e.level.map(|l| l.to_string())),
            opt(e.source_user_id.map(|u| u.to_string())),
            opt(e.purchase_id.clone()),
            opt(e.refers_to.map(|r| r.to_string())),
            opt(e.refund_id.clone()),
            opt(e.payout_id.map(|p| p.to_string())),
            e.created_at.format(&Rfc3339).unwrap_or_default(),
        ])
        .map_err(fail)?;
    }
    w.into_inner()
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("csv: {e}")))
}

#[utoipa::path(
    get,
    path = "/api/users/{id}/earnings/history",
    operation_id = "earnings_history",
    summary = "A user's ledger history",
    description = "Every ledger entry of the user (contract §10): commissions, reversals, approvals and payouts, newest first (`seq` descending), `limit` at a time; pass `next_cursor` as `cursor` for the next page (null on the last one). Each entry has its `status`: a commission is `pending` while held, `approved` once its holding period ended, `paid` once a paid payout batch covers it, `reversed` once refunds clawed back all of it; a reversal is `reversed`, an approval `approved`, a payout `paid`. Filters combine: `status`, `kind`, `level`, and `from` ≤ `created_at` < `to`. `format=csv` answers every matching entry (up to 100000, from `cursor` on, `limit` ignored) as CSV with the same columns.",
    tag = "reports",
    params(
        ("id" = i64, Path, minimum = 1, description = "The user's id"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "Page size, 1–500 (default 50)"),
        ("cursor" = Option<String>, Query, pattern = "^[0-9]*$", description = "`next_cursor` of the previous page; absent for the first page"),
        ("status" = Option<EntryStatus>, Query, description = "Only entries with this status"),
        ("kind" = Option<EntryKind>, Query, description = "Only entries of this kind"),
        ("level" = Option<i16>, Query, minimum = 1, description = "Only entries of this level (commissions and reversals)"),
        ("from" = Option<String>, Query, format = DateTime, description = "Only entries created at or after this time (RFC 3339)"),
        ("to" = Option<String>, Query, format = DateTime, description = "Only entries created before this time (RFC 3339)"),
        ("format" = Option<String>, Query, pattern = "^(json|csv)$", description = "`json` (default) or `csv`"),
    ),
    responses(
        (status = 200, description = "A page of entries, newest first (`application/json`), or every matching entry as CSV (`format=csv`)",
            content((HistoryPage = "application/json"), (String = "text/csv"))),
        (status = 404, description = "`not_found`: no user with this id", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: `field` is `limit`, `cursor`, `status`, `kind`, `level`, `from`, `to`, `format` or `query`", body = Problem, content_type = "application/problem+json"),
        UserOrAdminErrors,
    ),
    security(("user_token" = []), ("admin_key" = [])),
)]
/// `GET /api/users/{id}/earnings/history` (the user, admin): the user's ledger entries with
/// their status, newest first, `{items, next_cursor}`; or `?format=csv` for every matching
/// entry (up to 100000) as CSV. 422 naming a bad parameter; 404 for no such user.
pub async fn history(
    State(state): State<AppState>,
    caller: Authenticated,
    PathId(id): PathId,
    Query(query): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    caller.user_or_admin(id)?;
    let checked = query.check(state.rules.rates.len())?;
    let db = state.report_pool(id).await;
    if !store::user_exists(db, id).await? {
        return Err(ApiError::NotFound(format!("no user with id {id}")));
    }
    let limit = if checked.csv { CSV_CAP } else { checked.limit };
    let entries: Vec<HistoryEntry> = store::history(db, id, &checked.filter, limit)
        .await?
        .into_iter()
        .map(HistoryEntry::from)
        .collect();
    if checked.csv {
        return Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"earnings-{id}.csv\""),
                ),
            ],
            to_csv(&entries)?,
        )
            .into_response());
    }
    let next_cursor = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.seq.to_string()))
        .flatten();
    Ok(Json(HistoryPage {
        items: entries,
        next_cursor,
    })
    .into_response())
}
