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
use serde_json::json;
use sqlx::PgPool;

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

/// The body of an error, RFC 9457 problem details as every service sends them (SPEC §6):
/// `type` (`/problems/<code>`), `title` (the status's reason phrase), `status`, `detail` (for
/// people), the stable machine `code`, and `field` naming the bad input when there is one.
pub fn problem_body(
    status: StatusCode,
    code: &str,
    detail: &str,
    field: Option<&str>,
) -> serde_json::Value {
    let mut body = json!({
        "type": format!("/problems/{code}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
        "code": code,
    });
    if let Some(field) = field {
        body["field"] = json!(field);
    }
    body
}

/// [`problem_body`] as an `application/problem+json` response.
pub fn problem_response(
    status: StatusCode,
    code: &str,
    detail: &str,
    field: Option<&str>,
) -> axum::response::Response {
    let mut response = (status, Json(problem_body(status, code, detail, field))).into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// `/healthz`, `/readyz` and `/metrics`, for merging into a service's router.
///
/// Installs the Prometheus recorder at once (every service builds these routes at start-up):
/// installed lazily on the first scrape, it dropped every metric recorded before it.
pub fn ops_routes<S: Clone + Send + Sync + 'static>(probes: Probes) -> Router<S> {
    let _ = crate::telemetry::metrics();
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|| async { crate::telemetry::metrics().render() }),
        )
        .with_state(probes)
}

async fn readyz(State(p): State<Probes>) -> impl IntoResponse {
    let db = matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("select 1").execute(&p.db)
        )
        .await,
        Ok(Ok(_))
    );
    let writable = p.database_writable.load(Ordering::Relaxed);
    let up = p.broker_up.load(Ordering::Relaxed);
    let broker = match (up, p.broker_blocked.load(Ordering::Relaxed)) {
        (false, _) => "down",
        (true, true) => "blocked",
        (true, false) => "up",
    };
    let status = if db && writable && broker == "up" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if status == StatusCode::OK { "ready" } else { "not_ready" },
            "database": match (db, writable) {
                (true, true) => "up",
                (true, false) => "failing",
                (false, _) => "down",
            },
            "broker": broker,
        })),
    )
}
