//! upline-notifier: consumes earning events and fans them out to WebSocket (`/ws`), SSE
//! (`/events/{user_id}`) and Socket.IO (`/socket.io/`) clients (SPEC §5). Any number of notifiers may run; each has its own
//! queue on `upline.earnings` and serves its own clients. Subscriptions resume from `since` /
//! `Last-Event-ID` by replaying from PostgreSQL, with no gap and no duplicate at the seam.

pub mod consumer;
pub mod feed;
pub mod hub;
pub mod revocations;
pub mod slots;
pub mod socketio;
pub mod sse;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use axum::Router;
use sqlx::PgPool;
use std::net::IpAddr;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use upline_common::auth::{Auth, Credential, CredentialError, UserToken};
use upline_common::http::Probes;
use upline_common::limits::{Limits, RateLimited};
use upline_common::protocol::{ErrorCode, InvalidTarget, Target};
use upline_common::Settings;

use crate::hub::Hub;
use crate::slots::{Caps, Slots};

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
    /// Abuse limits per client address (`limits.*`): failed authentications.
    pub limits: Limits,
    /// Connection caps (`notifier.max_connections*`).
    pub slots: Slots,
    /// How long a new WebSocket may take to subscribe (`notifier.subscribe_timeout_secs`).
    pub subscribe_timeout: Duration,
    /// Earnings per replay query, the most a subscription holds (`notifier.replay_page_size`).
    pub replay_page_size: usize,
    pub shutdown: CancellationToken,
}

/// A feed a credential may open.
#[derive(Debug, Clone, Copy)]
pub struct Authorized {
    pub target: Target,
    /// The user token it was opened with (`None` for the admin key): the feed ends when it
    /// expires or is revoked.
    pub token: Option<UserToken>,
}

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Not a credential for this feed (WebSocket `unauthorized`, SSE 403).
    #[error("the token is not valid for this user")]
    Unauthorized,
    #[error("the token has expired; renew it (POST /api/users/{{id}}/token) and reconnect")]
    Expired,
    #[error("the token was revoked, or its user is inactive")]
    Revoked,
    /// The address spent its budget of failed authentications.
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

impl Refused {
    /// The stable machine code clients see.
    pub fn code(&self) -> ErrorCode {
        match self {
            Refused::Unauthorized => ErrorCode::Unauthorized,
            Refused::Expired => ErrorCode::TokenExpired,
            Refused::Revoked => ErrorCode::TokenRevoked,
            Refused::RateLimited(_) => ErrorCode::RateLimited,
            Refused::Db(_) => ErrorCode::InternalError,
        }
    }
}

impl NotifierState {
    /// The feed `token` may open for `target` (a user, or every earner for the admin key).
    /// A user token must be current ([`upline_common::auth::token_is_current`]) and name the
    /// user. A target that did not parse is refused as [`Refused::Unauthorized`], once the
    /// token has been checked. Failures count against `ip`'s budget
    /// (`limits.auth_failures_per_minute`).
    ///
    /// # Errors
    /// [`Refused`], saying why.
    pub async fn authorize(
        &self,
        target: Result<Target, InvalidTarget>,
        token: &str,
        ip: Option<IpAddr>,
    ) -> Result<Authorized, Refused> {
        self.limits.check_auth_allowed(ip)?;
        let outcome = self.check(target, token).await;
        if matches!(
            outcome,
            Err(Refused::Unauthorized | Refused::Expired | Refused::Revoked)
        ) {
            self.limits.record_auth_failure(ip);
        }
        outcome
    }

    async fn check(
        &self,
        target: Result<Target, InvalidTarget>,
        token: &str,
    ) -> Result<Authorized, Refused> {
        let credential = self.auth.identify(token).map_err(|e| match e {
            CredentialError::Expired => Refused::Expired,
            CredentialError::Invalid => Refused::Unauthorized,
        })?;
        let target = target.map_err(|InvalidTarget| Refused::Unauthorized)?;
        match (target, credential) {
            (_, Credential::Admin) => Ok(Authorized {
                target,
                token: None,
            }),
            (Target::User(id), Credential::User(user)) if user.user_id == id => {
                if upline_common::auth::token_is_current(&self.db, &user).await? {
                    Ok(Authorized {
                        target: Target::User(id),
                        token: Some(user),
                    })
                } else {
                    Err(Refused::Revoked)
                }
            }
            _ => Err(Refused::Unauthorized),
        }
    }
}

/// The notifier's HTTP surface.
///
/// SSE and Socket.IO are readable cross-origin (`Access-Control-Allow-Origin: *`): dashboards
/// are served by the api on another port, and credentials travel in the URL, the
/// `Authorization` header or Socket.IO's `auth`, never in cookies.
pub fn router(state: NotifierState, probes: Probes) -> Router {
    let cors = tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        // POST: Socket.IO's long-polling transport sends with it.
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers([
            axum::http::header::AUTHORIZATION,
            axum::http::HeaderName::from_static("last-event-id"),
        ]);
    let socketio = socketio::layer(state.clone());
    Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/events/{user_id}", get(sse::events))
        .with_state(state)
        .merge(upline_common::http::ops_routes(probes))
        // It answers `/socket.io/` itself and passes every other request on.
        .layer(socketio)
        .layer(cors)
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
    let hub = Arc::new(Hub::new(
        settings.notifier.user_buffer,
        settings.notifier.buffer,
    ));
    serve(settings, listener, shutdown, hub).await
}

/// The connection caps `settings` ask for: per address and per user only with
/// `limits.enabled`.
pub fn caps(settings: &Settings) -> Caps {
    let n = &settings.notifier;
    let abuse = settings.limits.enabled;
    Caps {
        total: n.max_connections,
        per_address: abuse.then_some(n.max_connections_per_address),
        per_user: abuse.then_some(n.max_connections_per_user),
    }
}

/// [`run`] with a hub of the caller's (tests watch its entries).
///
/// # Errors
/// As [`run`].
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
    hub: Arc<Hub>,
) -> anyhow::Result<()> {
    let db = upline_common::db::connect_and_migrate(&settings.database, &shutdown).await?;
    let probes = Probes::new(db.clone());
    let consumer = tokio::spawn(consumer::run(
        settings.amqp.clone(),
        hub.clone(),
        probes.broker_up.clone(),
        shutdown.clone(),
    ));
    let revocations = tokio::spawn(revocations::listen(
        db.clone(),
        hub.clone(),
        shutdown.clone(),
    ));
    let state = NotifierState {
        db,
        hub,
        auth: Auth::new(&settings.auth),
        limits: Limits::new(&settings.limits),
        slots: Slots::new(caps(&settings)),
        subscribe_timeout: Duration::from_secs(settings.notifier.subscribe_timeout_secs),
        replay_page_size: settings.notifier.replay_page_size,
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
    // The peer address feeds the abuse limits.
    let app = router(state, probes).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    consumer.await.context("earnings consumer task")?;
    revocations
        .await
        .context("token revocation listener task")?;
    tracing::info!("notifier stopped");
    Ok(())
}
