//! upline-api: the REST API of SPEC §6 — registration and the referral tree, purchase intake
//! (validated, published to RabbitMQ with publisher confirms, answered 202), reports, admin,
//! health and metrics.

pub mod auth;
pub mod error;
pub mod extract;
pub mod model;
pub mod openapi;
pub mod publisher;
pub mod responses;
pub mod routes;
pub mod store;

use std::sync::Arc;

use axum::routing::{delete, get, post, put};
use axum::Router;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use upline_common::auth::Auth;
use upline_common::http::Probes;
use upline_common::limits::Limits;
use upline_common::rules::Rules;
use upline_common::Settings;

use crate::publisher::Publisher;
use crate::routes::{dashboard, history, payouts, purchases, refunds, reports, users, webhooks};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    /// Where report reads go: a fresh standby with `database.standby_reads`, else `db`.
    pub reports: upline_common::db::standby::ReportReads,
    pub auth: Auth,
    pub rules: Arc<Rules>,
    pub publisher: Publisher,
    pub max_direct: i32,
    /// Abuse limits per client address (`limits.*`).
    pub limits: Limits,
    /// Largest request body (`api.max_body_bytes`).
    pub max_body_bytes: usize,
    /// Longest a request may take (`api.request_timeout_secs`).
    pub request_timeout: std::time::Duration,
    /// Buyers already checked to exist (purchase intake).
    pub known_users: Arc<store::KnownUsers>,
    /// Where the dashboard page finds the notifier (`GET /dashboard/config.json`).
    pub dashboard: Arc<dashboard::DashboardConfig>,
    /// Smallest approved balance that gets a payout line (`payout.minimum`, contract §10).
    pub payout_minimum: upline_common::money::Money,
    /// `webhooks.*`: what endpoints may be registered (contract §11).
    pub webhooks: upline_common::config::WebhookSettings,
}

impl AppState {
    /// The pool for a report read about user `id` (`database.standby_reads`; docs/operations.md,
    /// "Report reads from the standby"): the standby's while it is fresh and knows the user,
    /// the primary's otherwise. A user who has just signed up may not have reached the standby
    /// yet, and must not be answered 404; a standby that fails this first query is left for
    /// the primary until the next check finds it fresh again.
    pub async fn report_pool(&self, id: upline_common::UserId) -> &PgPool {
        let pool = self.reports.pool();
        if !self.reports.is_standby(pool) {
            return pool;
        }
        match store::user_exists(pool, id).await {
            Ok(true) => pool,
            Ok(false) => self.reports.primary(),
            Err(_) => {
                self.reports.standby_failed();
                self.reports.primary()
            }
        }
    }
}

/// The whole HTTP surface.
pub fn router(state: AppState, probes: Probes) -> Router {
    let (max_body, timeout) = (state.max_body_bytes, state.request_timeout);
    Router::new()
        .route("/api/users", post(users::register).get(users::list))
        .route("/api/me", get(users::me))
        .route(
            "/api/users/{id}",
            get(users::get).patch(users::update).delete(users::erase),
        )
        .route("/api/users/{id}/referrer", put(users::set_referrer))
        .route("/api/users/{id}/deactivate", post(users::deactivate))
        .route("/api/users/{id}/reactivate", post(users::reactivate))
        .route("/api/users/{id}/token", post(users::token))
        .route("/api/users/{id}/tokens", delete(users::revoke_tokens))
        .route(
            "/api/users/{id}/referrals/{referral_id}",
            delete(users::release_referral),
        )
        .route("/api/users/{id}/earnings", get(reports::earnings))
        .route("/api/users/{id}/referrals", get(reports::referrals))
        .route("/api/purchases", post(purchases::create))
        .route("/api/purchases/{purchase_id}", get(purchases::get))
        .route(
            "/api/purchases/{purchase_id}/refunds",
            post(refunds::create),
        )
        .route("/api/refunds/{refund_id}", get(refunds::get))
        .route("/api/payouts", post(payouts::create).get(payouts::list))
        .route("/api/payouts/{id}", get(payouts::get))
        .route("/api/payouts/{id}/paid", post(payouts::mark_paid))
        .route("/api/users/{id}/earnings/history", get(history::history))
        .route("/api/leaderboard", get(reports::leaderboard))
        .route("/api/webhooks", post(webhooks::create).get(webhooks::list))
        .route(
            "/api/webhooks/{id}",
            get(webhooks::get).delete(webhooks::delete),
        )
        .route(
            "/api/webhooks/{id}/rotate-secret",
            post(webhooks::rotate_secret),
        )
        .route("/api/webhooks/{id}/enable", post(webhooks::enable))
        .route("/api/webhooks/{id}/deliveries", get(webhooks::deliveries))
        .route(
            "/api/webhooks/{id}/deliveries/{delivery_id}/replay",
            post(webhooks::replay),
        )
        .route("/", get(dashboard::index))
        .route("/assets/{*path}", get(dashboard::asset))
        .route("/dashboard/config.json", get(dashboard::config))
        .fallback(|| async { error::ApiError::NotFound("no such endpoint".into()) })
        .with_state(state)
        .merge(upline_common::http::ops_routes(probes))
        .merge(routes::docs::routes())
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(move |request, next| {
            within(timeout, request, next)
        }))
        .layer(tower_http::trace::TraceLayer::new_for_http())
}

/// Answers `503 request_timeout` (problem+json, `Retry-After`) for a request that takes longer
/// than `timeout`; the handler is dropped, so a transaction it holds is rolled back.
async fn within(
    timeout: std::time::Duration,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("upline_api_request_timeouts_total").increment(1);
            error::ApiError::RequestTimeout.into_response()
        }
    }
}

/// Serves the api on `listener` until `shutdown` fires (in-flight requests are finished).
///
/// # Errors
/// Invalid settings, a database that cannot be migrated, or a server error.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let rules = Arc::new(settings.commission.rules()?);
    let payout_minimum = settings.payout.minimum()?;
    let db = upline_common::db::connect_and_migrate(&settings.database, &shutdown).await?;
    let probes = Probes::new(db.clone());
    let publisher = Publisher::new(settings.amqp.clone(), probes.broker_up.clone());
    publisher.warm_up().await;
    let keep_connected = tokio::spawn(publisher.clone().keep_connected(shutdown.clone()));
    let state = AppState {
        reports: upline_common::db::standby::ReportReads::start(db.clone(), &settings.database)?,
        db,
        auth: Auth::new(&settings.auth),
        rules,
        publisher: publisher.clone(),
        max_direct: settings.referrals.max_direct,
        limits: Limits::new(&settings.limits),
        max_body_bytes: settings.api.max_body_bytes,
        request_timeout: std::time::Duration::from_secs(settings.api.request_timeout_secs.max(1)),
        known_users: Arc::default(),
        dashboard: Arc::new(dashboard::DashboardConfig::new(
            &settings.api.notifier_public_url,
            settings.notifier.bind,
        )),
        payout_minimum,
        webhooks: settings.webhooks.clone(),
    };
    tracing::info!(addr = %listener.local_addr()?, "api listening");
    // The peer address feeds the abuse limits.
    let app = router(state, probes).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    keep_connected.abort();
    let _ = keep_connected.await;
    publisher.close().await;
    served?;
    tracing::info!("api stopped");
    Ok(())
}
