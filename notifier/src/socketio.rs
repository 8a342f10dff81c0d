//! Socket.IO at `/socket.io/` (docs/contract.md §5, "Socket.IO"): the protocol of the Node
//! systems upline replaces, so that their dashboards connect unchanged with a stock
//! `socket.io-client` 4.x.
//!
//! - Handshake `auth`: `{token, since?}`. A user token opens that user's feed at once; the
//!   admin key opens nothing until `emit('register', userId)`. `since` is the last `seq` the
//!   client holds: the feed replays every earning after it from PostgreSQL first (set `auth` to
//!   a function so that each reconnect sends the latest).
//! - `register` with a user id: opens that user's feed (the admin key; a later `register`
//!   replaces it), or confirms the user's own (a user token, which gets `error` for anyone
//!   else's and keeps its feed).
//! - `new_earning`: one earning event of §4 per emit, as a JSON object, in `seq` order.
//! - `error`: `{code, message, last_seq?, retry_after?}`, the WebSocket's error frame. Without
//!   a valid token `register` gets only this, never data. A feed that ends (token revoked or
//!   expired, client too slow, shutdown) sends it with `last_seq`, then the server
//!   disconnects.
//!
//! Each connection takes a place in the same caps as WebSocket and SSE
//! (`notifier.max_connections*`; over one the client gets `connect_error` with the reason), and
//! failed tokens count against the same per-address budget.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::extract::ConnectInfo;
use serde::Deserialize;
use serde_json::value::RawValue;
use socketioxide::extract::{SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::SocketIo;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use upline_common::auth::Credential;
use upline_common::protocol::{ErrorCode, ErrorMessage, Target};
use upline_common::UserId;

use crate::feed::{Feed, FeedEnd};
use crate::slots::{CapExceeded, ConnectionSlot, RETRY_AFTER};
use crate::{Authorized, NotifierState, Refused};

/// The handshake's `auth` object.
#[derive(Debug, Default, Deserialize)]
struct Handshake {
    /// A user token, or the admin key.
    #[serde(default)]
    token: Option<String>,
    /// Replay the earnings after this `seq` first.
    #[serde(default)]
    since: Option<i64>,
}

/// `register`'s argument: a user id, as a number or a string of digits.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RegisterId {
    Number(i64),
    Text(String),
}

impl RegisterId {
    fn user_id(&self) -> Option<UserId> {
        let id = match self {
            RegisterId::Number(n) => *n,
            RegisterId::Text(s) => s.trim().parse().ok()?,
        };
        UserId::new(id)
    }
}

/// The tower layer serving Socket.IO at `/socket.io/`, with `state`'s caps and credentials.
pub fn layer(state: NotifierState) -> SocketIoLayer {
    let (layer, io) = SocketIo::builder()
        .ping_interval(state.ping_interval)
        .ping_timeout(state.idle_timeout)
        .connect_timeout(state.subscribe_timeout)
        // A register or a handshake is a few hundred bytes.
        .max_payload(64 * 1024)
        // Packets queued for one client before an emit fails: the client is not reading.
        .max_buffer_size(MAX_UNREAD_PACKETS)
        // Allocated up front for every WebSocket (engineioxide's default is 4 KiB); it grows to
        // fit a longer message, as on `/ws`.
        .ws_read_buffer_size(512)
        .build_layer();
    let handler = {
        let state = state.clone();
        move |socket: SocketRef| {
            let state = state.clone();
            async move { connected(state, socket) }
        }
    };
    let middleware = move |socket: SocketRef, TryData(auth): TryData<Handshake>| {
        let state = state.clone();
        async move { prepare(&state, &socket, auth.unwrap_or_default()) }
    };
    io.ns("/", handler.with(middleware));
    layer
}

/// Packets one client may leave unread before it counts as too slow.
pub const MAX_UNREAD_PACKETS: usize = 256;

/// What a socket's connection task is asked to do.
enum Command {
    Register(UserId),
}

/// A socket between its handshake and its connection task: what [`prepare`] set up.
struct Session {
    slot: ConnectionSlot,
    auth: Handshake,
    ip: Option<IpAddr>,
    commands: mpsc::Receiver<Command>,
    gone: CancellationToken,
}

/// Kept in the socket's extensions (which need `Clone`) until the connection task takes it.
#[derive(Clone)]
struct PendingSession(Arc<Mutex<Option<Session>>>);

/// Runs before the server confirms the connection: takes a connection slot (over a cap the
/// client gets `connect_error` with the reason) and attaches the `register` and disconnect
/// handlers, so that a `register` emitted the moment the client connects is never missed.
fn prepare(state: &NotifierState, socket: &SocketRef, auth: Handshake) -> Result<(), CapExceeded> {
    let peer = socket
        .req_parts()
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let ip = state.limits.client_ip(peer, &socket.req_parts().headers);
    let slot = state.slots.connect(ip)?;
    let (commands, rx) = mpsc::channel::<Command>(4);
    let gone = CancellationToken::new();
    {
        let gone = gone.clone();
        socket.on_disconnect(move || async move { gone.cancel() });
    }
    socket.on(
        "register",
        move |socket: SocketRef, TryData(id): TryData<RegisterId>| async move {
            match id.ok().and_then(|id| id.user_id()) {
                Some(user) => {
                    if commands.try_send(Command::Register(user)).is_err() {
                        let error = ErrorMessage::new(
                            ErrorCode::RateLimited,
                            "too many register calls at once",
                        );
                        let _ = socket.emit("error", &error);
                    }
                }
                None => {
                    let error = ErrorMessage::new(
                        ErrorCode::BadRequest,
                        "register takes a user id: a positive integer",
                    );
                    let _ = socket.emit("error", &error);
                }
            }
        },
    );
    socket
        .extensions
        .insert(PendingSession(Arc::new(Mutex::new(Some(Session {
            slot,
            auth,
            ip,
            commands: rx,
            gone,
        })))));
    Ok(())
}

/// The connection is confirmed: its task runs until the socket goes away.
fn connected(state: NotifierState, socket: SocketRef) {
    let session = socket
        .extensions
        .get::<PendingSession>()
        .and_then(|pending| pending.0.lock().ok()?.take());
    let Some(mut session) = session else {
        return;
    };
    tokio::spawn(async move {
        let _slot = session.slot;
        metrics::gauge!("upline_notifier_connections", "protocol" => "socket.io").increment(1.0);
        serve(
            &state,
            &socket,
            session.auth,
            session.ip,
            &mut session.commands,
            &session.gone,
        )
        .await;
        metrics::gauge!("upline_notifier_connections", "protocol" => "socket.io").decrement(1.0);
    });
}

/// A socket's life: its token checked, then feeds as it registers, until it goes away.
async fn serve(
    state: &NotifierState,
    socket: &SocketRef,
    auth: Handshake,
    ip: Option<IpAddr>,
    commands: &mut mpsc::Receiver<Command>,
    gone: &CancellationToken,
) {
    let token = auth.token.unwrap_or_default();
    // A user token names its user: its feed opens at once. The admin key waits for register.
    let mut next = match state.auth.identify(&token) {
        Ok(Credential::User(user)) => Some(user.user_id),
        Ok(Credential::Admin) => None,
        Ok(Credential::Producer) | Err(_) => {
            // Counted and reported now; every register on this socket is refused too.
            let refused = Box::pin(state.authorize(Ok(Target::All), &token, ip)).await;
            if let Err(refused) = refused {
                emit_refused(socket, &refused);
            }
            None
        }
    };
    let mut since = auth.since;
    loop {
        if let Some(user) = next.take() {
            match stream(state, socket, &token, user, since, ip, commands, gone).await {
                Outcome::Registered(other) => {
                    // A new feed from its own start: the handshake's `since` was the previous
                    // user's.
                    since = None;
                    next = Some(other);
                    continue;
                }
                // The socket stays open: it may register a user its token is good for.
                Outcome::Refused => {}
                Outcome::Ended => {
                    let _ = socket.clone().disconnect();
                    return;
                }
            }
        }
        tokio::select! {
            () = gone.cancelled() => return,
            () = state.shutdown.cancelled() => return,
            command = commands.recv() => match command {
                Some(Command::Register(user)) => next = Some(user),
                None => return,
            },
        }
    }
}

/// How a feed stopped.
enum Outcome {
    /// The client registered another user.
    Registered(UserId),
    /// The token is not good for the user (the client got `error`); no feed was opened.
    Refused,
    /// The socket went away, or the feed ended (and the client was told why).
    Ended,
}

/// Checks `token` for `user`, opens the feed and emits `new_earning` until it ends.
#[allow(clippy::too_many_arguments)]
async fn stream(
    state: &NotifierState,
    socket: &SocketRef,
    token_text: &str,
    user: UserId,
    since: Option<i64>,
    ip: Option<IpAddr>,
    commands: &mut mpsc::Receiver<Command>,
    gone: &CancellationToken,
) -> Outcome {
    let Authorized { target, token } =
        match Box::pin(state.authorize(Ok(Target::User(user)), token_text, ip)).await {
            Ok(authorized) => authorized,
            Err(refused) => {
                emit_refused(socket, &refused);
                return Outcome::Refused;
            }
        };
    let _user_slot = match state.slots.subscribe(user) {
        Ok(slot) => slot,
        Err(refused) => {
            let error = ErrorMessage::new(refused.code(), refused.to_string())
                .retry_after(RETRY_AFTER.as_secs());
            let _ = socket.emit("error", &error);
            return Outcome::Ended;
        }
    };
    let mut feed = match Box::pin(Feed::open(
        &state.hub,
        state.db.clone(),
        target,
        since,
        token,
        state.replay_page_size,
    ))
    .await
    {
        Ok(feed) => feed,
        Err(e) => {
            tracing::error!(error = %e, "opening a Socket.IO feed");
            let error = ErrorMessage::new(
                ErrorCode::InternalError,
                "could not open the feed; try again",
            );
            let _ = socket.emit("error", &error);
            return Outcome::Ended;
        }
    };
    let _ = socket.emit("registered", &user.get());
    loop {
        tokio::select! {
            () = gone.cancelled() => return Outcome::Ended,
            () = state.shutdown.cancelled() => {
                let error = ErrorMessage::new(ErrorCode::Closing, "notifier shutting down; reconnect with since")
                    .last_seq(feed.last_seq());
                let _ = socket.emit("error", &error);
                return Outcome::Ended;
            }
            command = commands.recv() => match command {
                Some(Command::Register(next)) if next == user => {
                    let _ = socket.emit("registered", &user.get());
                }
                Some(Command::Register(next)) => {
                    // A user token registering someone else keeps its own feed.
                    match Box::pin(state.authorize(Ok(Target::User(next)), token_text, ip)).await {
                        Ok(_) => return Outcome::Registered(next),
                        Err(refused) => emit_refused(socket, &refused),
                    }
                }
                None => return Outcome::Ended,
            },
            frame = feed.next() => match frame {
                Ok(frame) => {
                    // The event as an object, its JSON written as is (not a string of it).
                    let event: &RawValue = match serde_json::from_str(&frame.event_json) {
                        Ok(event) => event,
                        Err(e) => {
                            tracing::error!(error = %e, seq = frame.seq, "an earning event that is not JSON");
                            continue;
                        }
                    };
                    if socket.emit("new_earning", event).is_err() {
                        // The client's buffer is full (it is not reading) or it is gone.
                        let last_seq = frame.seq - 1;
                        let message = format!("too slow to keep up; resume with since={last_seq}");
                        metrics::counter!("upline_notifier_lagged_total").increment(1);
                        let _ = socket.emit("error", &ErrorMessage::new(ErrorCode::Lagged, message).last_seq(last_seq));
                        return Outcome::Ended;
                    }
                }
                Err(end) => {
                    let code = match &end {
                        FeedEnd::Lagged { .. } => ErrorCode::Lagged,
                        FeedEnd::Closed => ErrorCode::Closing,
                        FeedEnd::Revoked => ErrorCode::TokenRevoked,
                        FeedEnd::Expired => ErrorCode::TokenExpired,
                        FeedEnd::Db(e) => {
                            tracing::error!(error = %e, "Socket.IO feed database error");
                            ErrorCode::InternalError
                        }
                    };
                    let error = ErrorMessage::new(code, end.to_string()).last_seq(feed.last_seq());
                    let _ = socket.emit("error", &error);
                    return Outcome::Ended;
                }
            },
        }
    }
}

fn emit_refused(socket: &SocketRef, refused: &Refused) {
    if let Refused::Db(e) = refused {
        tracing::error!(error = %e, "checking a Socket.IO token");
    }
    let error = ErrorMessage::new(refused.code(), refused.to_string());
    let _ = socket.emit("error", &error);
}
