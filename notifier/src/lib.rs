//! upline-notifier: consumes earning events and fans them out to WebSocket (`/ws`) and SSE
//! (`/events/{user_id}`) clients (SPEC §5). Any number of notifiers may run; each has its own
//! queue on `upline.earnings` and serves its own clients. Subscriptions resume from `since` /
//! `Last-Event-ID` by replaying from PostgreSQL, with no gap and no duplicate at the seam.

pub mod consumer;
pub mod feed;
pub mod hub;
pub mod sse;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use axum::Router;
use serde_json::Value;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use upline_common::auth::{Auth, Caller};
use upline_common::http::Probes;
use upline_common::Settings;

use crate::feed::Target;
use crate::hub::Hub;

/// What connection handlers share.
#[derive(Clone)]
pub struct NotifierState {
    pub db: PgPool,
    pub hub: Arc<Hub>,
    pub auth: Auth,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// A frame that cannot be written within this time means the client is not reading.
    pub send_timeout: Duration,
    pub shutdown: CancellationToken,
}

impl NotifierState {
    /// The feed a token may open for `user_id` (a number, or `"*"` for admins).
    pub fn authorize(&self, user_id: &Value, token: &str) -> Option<Target> {
        let caller = self.auth.identify(token)?;
        match (user_id, caller) {
            (Value::String(s), Caller::Admin) if s == "*" => Some(Target::All),
            (v, caller) => {
                let id = upline_common::purchase::parse_user_id(v)?;
                match caller {
                    Caller::Admin => Some(Target::User(id)),
                    Caller::User(u) if u == id => Some(Target::User(id)),
                    _ => None,
                }
            }
        }
    }
}

/// The notifier's HTTP surface.
///
/// SSE is readable cross-origin (`Access-Control-Allow-Origin: *`): dashboards are served by
/// the api on another port, and credentials travel in the URL or `Authorization` header,
/// never in cookies.
pub fn router(state: NotifierState, probes: Probes) -> Router {
    let cors = tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([axum::http::Method::GET])
        .allow_headers([
            axum::http::header::AUTHORIZATION,
            axum::http::HeaderName::from_static("last-event-id"),
        ]);
    Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/events/{user_id}", get(sse::events))
        .with_state(state)
        .layer(cors)
        .merge(upline_common::http::ops_routes(probes))
}

/// Serves WebSocket and SSE clients on `listener` until `shutdown` fires.
///
/// # Errors
/// Invalid settings, an unreachable database at start-up, or a server error.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let db = upline_common::db::connect_and_migrate(&settings.database, &shutdown).await?;
    let probes = Probes::new(db.clone());
    let hub = Arc::new(Hub::new(settings.notifier.buffer));
    let consumer = tokio::spawn(consumer::run(
        settings.amqp.clone(),
        hub.clone(),
        probes.broker_up.clone(),
        shutdown.clone(),
    ));
    let state = NotifierState {
        db,
        hub,
        auth: Auth::new(&settings.auth),
        ping_interval: Duration::from_secs(settings.notifier.ping_interval_secs),
        idle_timeout: Duration::from_secs(settings.notifier.idle_timeout_secs),
        send_timeout: Duration::from_secs(settings.notifier.send_timeout_secs),
        shutdown: shutdown.clone(),
    };
    tracing::info!(addr = %listener.local_addr()?, "notifier listening");
    // A fixed send buffer per connection: without it the kernel grows each socket's buffer
    // up to megabytes for a client that does not read, hiding slow clients and costing memory.
    let send_buffer = settings.notifier.socket_send_buffer;
    let listener =
        axum::serve::ListenerExt::tap_io(listener, move |tcp: &mut tokio::net::TcpStream| {
            let socket = socket2::SockRef::from(&*tcp);
            if let Err(e) = socket
                .set_send_buffer_size(send_buffer)
                .and_then(|()| socket.set_tcp_nodelay(true))
            {
                tracing::debug!(error = %e, "could not set socket options");
            }
        });
    axum::serve(listener, router(state, probes))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    consumer.await.context("earnings consumer task")?;
    tracing::info!("notifier stopped");
    Ok(())
}
