//! `GET /ws` (SPEC §5): subscribe with a token, replay from `since`, then live earnings;
//! pings idle connections and closes silent or too-slow ones with a reason.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::Response;
use upline_common::protocol::{
    CloseCode, ErrorCode, ErrorMessage, ServerMessage, Subscribe, Target,
};

use crate::feed::{Feed, FeedEnd};
use crate::slots::{CapExceeded, ConnectionSlot, RETRY_AFTER};
use crate::{Authorized, NotifierState, Refused};

pub async fn upgrade(
    State(state): State<NotifierState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let ip = state.limits.client_ip(Some(peer), &headers);
    // Counted from the request on, so that sockets which never subscribe count too. A refusal
    // is still upgraded: browsers show a WebSocket client no HTTP status, only close codes.
    let slot = state.slots.connect(ip);
    // Small buffers: tungstenite's defaults (128 KiB each way) would cost ~140 KiB per idle
    // connection; frames here are a few hundred bytes, and back-pressure is the hub's bounded
    // buffer, not the socket's. The read buffer is allocated up front for every connection
    // and grows to fit a longer message (a subscribe with its token is ~400 bytes).
    ws.max_message_size(64 * 1024)
        .read_buffer_size(512)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(64 * 1024)
        .on_upgrade(move |socket| connection(state, socket, ip, slot))
}

/// One WebSocket, from upgrade to close; `slot` (its place in the connection caps) is held
/// until it returns, however the connection ends.
async fn connection(
    state: NotifierState,
    socket: WebSocket,
    ip: Option<IpAddr>,
    slot: Result<ConnectionSlot, CapExceeded>,
) {
    let mut client = Client {
        socket,
        send_timeout: state.send_timeout,
    };
    let _slot = match slot {
        Ok(slot) => slot,
        Err(refused) => {
            client.refuse(refused).await;
            return;
        }
    };
    metrics::gauge!("upline_notifier_connections", "protocol" => "ws").increment(1.0);
    serve(&state, &mut client, ip).await;
    metrics::gauge!("upline_notifier_connections", "protocol" => "ws").decrement(1.0);
}

async fn serve(state: &NotifierState, socket: &mut Client, ip: Option<IpAddr>) {
    let timeout = state.subscribe_timeout;
    let request = match tokio::time::timeout(timeout, first_text(&mut socket.socket)).await {
        Ok(Some(text)) => text,
        Ok(None) => return,
        Err(_) => {
            let message = format!(
                "no subscribe message within {} s; send it as soon as the socket opens",
                timeout.as_secs()
            );
            metrics::counter!("upline_notifier_subscribe_timeouts_total").increment(1);
            socket
                .reject_with(
                    ErrorMessage::new(ErrorCode::SubscribeTimeout, message),
                    CloseCode::SubscribeTimeout,
                )
                .await;
            return;
        }
    };
    let sub: Subscribe = match serde_json::from_str(&request) {
        Ok(s) => s,
        Err(e) => {
            let message =
                format!("expected {{\"type\":\"subscribe\",\"user_id\":…,\"token\":…}}: {e}");
            socket
                .reject(ErrorMessage::new(ErrorCode::BadRequest, message))
                .await;
            return;
        }
    };
    // The set-up's futures (token check, first replay page) are boxed: inline, their
    // kilobytes would stay in this task's state for the connection's whole life, although they
    // are done once it subscribes.
    let Authorized { target, token } =
        match Box::pin(state.authorize(Ok(sub.user_id), &sub.token, ip)).await {
            Ok(authorized) => authorized,
            Err(refused) => {
                if let Refused::Db(e) = &refused {
                    tracing::error!(error = %e, "checking a token");
                }
                socket
                    .reject(ErrorMessage::new(refused.code(), refused.to_string()))
                    .await;
                return;
            }
        };
    // One of the user's stream slots, held as long as the feed (the admin feed of everyone is
    // not a user's).
    let _user_slot = match target {
        Target::User(id) => match state.slots.subscribe(id) {
            Ok(slot) => Some(slot),
            Err(refused) => {
                socket.refuse(refused).await;
                return;
            }
        },
        Target::All => None,
    };
    let mut feed = match Box::pin(Feed::open(
        &state.hub,
        state.db.clone(),
        target,
        sub.since,
        token,
        state.replay_page_size,
    ))
    .await
    {
        Ok(feed) => feed,
        Err(e) => {
            tracing::error!(error = %e, "opening a feed");
            socket
                .reject(ErrorMessage::new(
                    ErrorCode::InternalError,
                    "could not open the feed; try again",
                ))
                .await;
            return;
        }
    };
    let subscribed = ServerMessage::Subscribed { user_id: target };
    if socket.send(subscribed.to_text()).await.is_err() {
        return;
    }

    let mut ping = tokio::time::interval(state.ping_interval);
    ping.reset();
    let mut last_heard = Instant::now();
    let (code, reason) = loop {
        tokio::select! {
            () = state.shutdown.cancelled() => break (CloseCode::GoingAway, "notifier shutting down; reconnect with since".to_owned()),
            incoming = socket.socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => last_heard = Instant::now(),
            },
            frame = feed.next() => match frame {
                Ok(frame) => {
                    if socket.send(frame.ws_text.clone()).await.is_err() {
                        break (CloseCode::Lagged, format!("too slow to keep up; resume with since={}", feed.last_seq()));
                    }
                }
                Err(FeedEnd::Lagged { last_seq }) => {
                    let message = format!("too slow to keep up; resume with since={last_seq}");
                    let error = ErrorMessage::new(ErrorCode::Lagged, message.clone()).last_seq(last_seq);
                    let _ = socket.send(ServerMessage::Error(error).to_text()).await;
                    metrics::counter!("upline_notifier_lagged_total").increment(1);
                    break (CloseCode::Lagged, message);
                }
                Err(FeedEnd::Closed) => break (CloseCode::GoingAway, "notifier shutting down; reconnect with since".to_owned()),
                Err(end @ (FeedEnd::Revoked | FeedEnd::Expired)) => {
                    let code = if matches!(end, FeedEnd::Revoked) { ErrorCode::TokenRevoked } else { ErrorCode::TokenExpired };
                    let message = end.to_string();
                    let error = ErrorMessage::new(code, message.clone()).last_seq(feed.last_seq());
                    let _ = socket.send(ServerMessage::Error(error).to_text()).await;
                    metrics::counter!("upline_notifier_auth_closed_total", "reason" => code.as_str()).increment(1);
                    break (CloseCode::Unauthorized, message);
                }
                Err(FeedEnd::Db(e)) => {
                    tracing::error!(error = %e, "feed database error");
                    break (CloseCode::InternalError, format!("internal error; reconnect with since={}", feed.last_seq()));
                }
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > state.idle_timeout {
                    break (CloseCode::Idle, "no answer to pings".to_owned());
                }
                if socket.send_message(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
        }
    };
    socket.close(code, &reason).await;
}

/// The first text message (pings and pongs are skipped); `None` if the client went away.
async fn first_text(socket: &mut WebSocket) -> Option<String> {
    loop {
        match socket.recv().await? {
            Ok(Message::Text(t)) => return Some(t.to_string()),
            Ok(Message::Binary(b)) => return Some(String::from_utf8_lossy(&b).into_owned()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Longest wait for a client's close frame after the notifier sent its own.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);

/// A client socket with this notifier's send timeout.
struct Client {
    socket: WebSocket,
    send_timeout: Duration,
}

impl Client {
    async fn send(&mut self, text: String) -> Result<(), ()> {
        self.send_message(Message::Text(text.into())).await
    }

    /// Sends one message; one that cannot be written within `notifier.send_timeout_secs`
    /// means the client is not reading.
    async fn send_message(&mut self, message: Message) -> Result<(), ()> {
        match tokio::time::timeout(self.send_timeout, self.socket.send(message)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    /// An error frame, then a close with [`CloseCode::Policy`].
    async fn reject(&mut self, error: ErrorMessage) {
        self.reject_with(error, CloseCode::Policy).await;
    }

    /// An error frame, then a close with `close_code` and the error's message as reason.
    async fn reject_with(&mut self, error: ErrorMessage, close_code: CloseCode) {
        let reason = error.message.clone();
        let _ = self.send(ServerMessage::Error(error).to_text()).await;
        self.close(close_code, &reason).await;
    }

    /// Refuses a connection over a cap: an error frame with `retry_after` (seconds), then a
    /// close with the cap's own code.
    async fn refuse(&mut self, refused: CapExceeded) {
        let error = ErrorMessage::new(refused.code(), refused.to_string())
            .retry_after(RETRY_AFTER.as_secs());
        self.reject_with(error, refused.close_code()).await;
    }

    /// Sends the close frame, then waits up to [`CLOSE_HANDSHAKE`] for the client's (the
    /// closing handshake of RFC 6455 §7.1.1), reading and dropping whatever comes first.
    /// Dropping the connection at once, with frames of the client still unread (pongs it
    /// queued while not reading), can make the kernel reset it, and a reset can discard the
    /// close frame before the client reads it: the client would see a dropped connection
    /// instead of the reason.
    async fn close(&mut self, code: CloseCode, reason: &str) {
        // Close reasons are limited to 123 bytes.
        let reason: String = reason.chars().take(120).collect();
        let sent = self
            .send_message(Message::Close(Some(CloseFrame {
                code: code.code(),
                reason: reason.into(),
            })))
            .await;
        if sent.is_err() {
            return;
        }
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
            while let Some(Ok(message)) = self.socket.recv().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}
