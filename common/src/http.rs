//! The endpoints every service exposes (SPEC §6): `/healthz` (the process is alive),
//! `/readyz` (database and broker reachable), `/metrics` (Prometheus text format).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;

/// What readiness checks: a pool to ping and flags the service keeps up to date while it
/// holds a broker connection.
#[derive(Clone)]
pub struct Probes {
    /// Pinged by `/readyz` (2 s at most).
    pub db: PgPool,
    /// Set while the service holds a live broker connection.
    pub broker_up: Arc<AtomicBool>,
    /// Cleared while the database answers `select 1` but fails the service's own work with
    /// infrastructure errors (read-only after a failover, timeouts, a schema not migrated
    /// yet): the worker's circuit is open.
    pub database_writable: Arc<AtomicBool>,
    /// Set while RabbitMQ holds the connection blocked (`connection.blocked`: a memory or disk
    /// alarm), so that nothing can be published; `/readyz` then answers 503 with
    /// `"broker": "blocked"`. Services that do not watch for it leave it unset.
    pub broker_blocked: Arc<AtomicBool>,
}

impl Probes {
    /// Probes of `db`, with the broker down and not blocked until the service says otherwise.
    pub fn new(db: PgPool) -> Self {
        Probes {
            db,
            broker_up: Arc::new(AtomicBool::new(false)),
            database_writable: Arc::new(AtomicBool::new(true)),
            broker_blocked: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// The body of every error, RFC 9457 problem details as every service sends them (SPEC §6),
/// served as `application/problem+json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"type": "/problems/validation_failed", "title": "Unprocessable Entity",
    "status": 422, "detail": "email: must be an email address such as asha@example.com",
    "code": "validation_failed", "field": "email"}))]
pub struct Problem {
    /// `/problems/<code>`.
    #[serde(rename = "type")]
    #[schema(format = "uri-reference", example = "/problems/validation_failed")]
    pub problem_type: String,
    /// The status's reason phrase.
    #[schema(example = "Unprocessable Entity")]
    pub title: String,
    /// The HTTP status, repeated.
    #[schema(example = 422, minimum = 100, maximum = 599)]
    pub status: u16,
    /// What went wrong, for people.
    pub detail: String,
    /// The stable machine code (`validation_failed`, `not_found`, …); each response of the
    /// OpenAPI description lists the ones it can carry.
    #[schema(example = "validation_failed")]
    pub code: String,
    /// The request field at fault (`validation_failed`, `admin_only`, `unknown_buyer`); query
    /// string errors name `query` or the parameter, header errors the header.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    #[schema(nullable = false)]
    pub field: Option<String>,
}

impl Problem {
    /// The problem for `status` with machine `code`, human `detail` and the bad `field`.
    pub fn new(status: StatusCode, code: &str, detail: &str, field: Option<&str>) -> Self {
        Problem {
            problem_type: format!("/problems/{code}"),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail: detail.to_owned(),
            code: code.to_owned(),
            field: field.map(str::to_owned),
        }
    }
}

impl IntoResponse for Problem {
    /// The problem with its status, as `application/problem+json`.
    fn into_response(self) -> axum::response::Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self)).into_response();
        response.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

/// The [`Problem`] body for `status` and `code` (SPEC §6).
pub fn problem_body(status: StatusCode, code: &str, detail: &str, field: Option<&str>) -> Problem {
    Problem::new(status, code, detail, field)
}

/// [`Problem`] as an `application/problem+json` response.
pub fn problem_response(
    status: StatusCode,
    code: &str,
    detail: &str,
    field: Option<&str>,
) -> axum::response::Response {
    Problem::new(status, code, detail, field).into_response()
}

/// `GET /healthz`: the process is alive.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    pub status: String,
}

/// `GET /readyz`: whether the service can do its work, and which dependency stops it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"status": "ready", "database": "up", "broker": "up"}))]
pub struct Readiness {
    pub status: ReadyState,
    pub database: DatabaseState,
    pub broker: BrokerState,
}

/// `ready` (200) or `not_ready` (503).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReadyState {
    Ready,
    NotReady,
}

/// `up`; `failing` (answers `select 1` but fails the service's own work, e.g. read-only after
/// a failover); `down` (no answer within 2 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DatabaseState {
    Up,
    Failing,
    Down,
}

/// `up`; `blocked` (RabbitMQ holds the connection blocked: a memory or disk alarm); `down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BrokerState {
    Up,
    Blocked,
    Down,
}

/// `/healthz`, `/readyz` and `/metrics`, for merging into a service's router.
///
/// Installs the Prometheus recorder at once (every service builds these routes at start-up):
/// installed lazily on the first scrape, it dropped every metric recorded before it.
pub fn ops_routes<S: Clone + Send + Sync + 'static>(probes: Probes) -> Router<S> {
    let _ = crate::telemetry::metrics();
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(probes)
}

#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    summary = "Liveness",
    tag = "operations",
    responses((status = 200, description = "The process is alive", body = Health)),
    security(()),
)]
/// `GET /healthz`: `{"status": "ok"}` while the process runs.
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
    })
}

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    summary = "Prometheus metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus metrics (text exposition format)", body = String,
        content_type = "text/plain")),
    security(()),
)]
/// `GET /metrics`: every metric of the process, Prometheus text format.
pub async fn metrics() -> String {
    crate::telemetry::metrics().render()
}

#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    summary = "Readiness",
    tag = "operations",
    responses(
        (status = 200, description = "Ready: PostgreSQL answers and RabbitMQ is connected", body = Readiness),
        (status = 503, description = "Not ready: see which dependency is not `up`", body = Readiness),
    ),
    security(()),
)]
/// `GET /readyz`: 200 when the database and the broker are usable, else 503 naming which is not.
pub async fn readyz(State(p): State<Probes>) -> (StatusCode, Json<Readiness>) {
    let db = matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query_scalar!("select 1").fetch_one(&p.db)
        )
        .await,
        Ok(Ok(_))
    );
    let writable = p.database_writable.load(Ordering::Relaxed);
    let up = p.broker_up.load(Ordering::Relaxed);
    let broker = match (up, p.broker_blocked.load(Ordering::Relaxed)) {
        (false, _) => BrokerState::Down,
        (true, true) => BrokerState::Blocked,
        (true, false) => BrokerState::Up,
    };
    let database = match (db, writable) {
        (true, true) => DatabaseState::Up,
        (true, false) => DatabaseState::Failing,
        (false, _) => DatabaseState::Down,
    };
    let ready = database == DatabaseState::Up && broker == BrokerState::Up;
    let (status, state) = if ready {
        (StatusCode::OK, ReadyState::Ready)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, ReadyState::NotReady)
    };
    (
        status,
        Json(Readiness {
            status: state,
            database,
            broker,
        }),
    )
}
