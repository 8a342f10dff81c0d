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

/// What readiness checks: a pool to ping and a flag the service keeps up to date while it
/// holds a live broker connection.
#[derive(Clone)]
pub struct Probes {
    pub db: PgPool,
    pub broker_up: Arc<AtomicBool>,
    /// Cleared while the database answers `select 1` but fails the service's own work with
    /// infrastructure errors (read-only after a failover, timeouts, a schema not migrated
    /// yet): the worker's circuit is open.
    pub database_writable: Arc<AtomicBool>,
}

impl Probes {
    pub fn new(db: PgPool) -> Self {
        Probes {
            db,
            broker_up: Arc::new(AtomicBool::new(false)),
            database_writable: Arc::new(AtomicBool::new(true)),
        }
    }
}

/// `/healthz`, `/readyz` and `/metrics`, for merging into a service's router.
pub fn ops_routes<S: Clone + Send + Sync + 'static>(probes: Probes) -> Router<S> {
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
    let broker = p.broker_up.load(Ordering::Relaxed);
    let status = if db && writable && broker {
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
            "broker": if broker { "up" } else { "down" },
        })),
    )
}
