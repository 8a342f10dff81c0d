//! `GET /ws` (SPEC §5): subscribe with a token, replay from `since`, then live earnings;
//! pings idle connections and closes silent or too-slow ones with a reason.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::feed::{Feed, FeedEnd, Target};
use crate::slots::{CapExceeded, ConnectionSlot, RETRY_AFTER};
use crate::{Authorized, NotifierState, Refused};

/// Close codes (4000–4999 are the application's own).
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_LAGGED: u16 = 4001;
const CLOSE_IDLE: u16 = 4002;
/// The token was revoked or expired: sign in again (or renew the token) before reconnecting.
const CLOSE_UNAUTHORIZED: u16 = 4003;
/// The user has `notifier.max_connections_per_user` streams open already.
const CLOSE_TOO_MANY_FOR_USER: u16 = 4004;
/// The client address has `notifier.max_connections_per_address` connections open already.
const CLOSE_TOO_MANY_FROM_ADDRESS: u16 = 4005;
/// No `subscribe` message within `notifier.subscribe_timeout_secs`.
const CLOSE_SUBSCRIBE_TIMEOUT: u16 = 4006;
/// The notifier is at `notifier.max_connections` (RFC 6455's "Try Again Later").
const CLOSE_TRY_AGAIN_LATER: u16 = 1013;
const CLOSE_ERROR: u16 = 1011;

/// The close code of a refusal by a connection cap.
fn cap_close_code(refused: CapExceeded) -> u16 {
    match refused {
        CapExceeded::User(_) => CLOSE_TOO_MANY_FOR_USER,
        CapExceeded::Address(_) => CLOSE_TOO_MANY_FROM_ADDRESS,
        CapExceeded::Full => CLOSE_TRY_AGAIN_LATER,
    }
}

/// `{"type":"subscribe","user_id":7 | "*","token":"…","since":12}`
#[derive(Debug, Deserialize)]
struct Subscribe {
    #[serde(rename = "type")]
    kind: String,
    user_id: Value,
    token: String,
    since: Option<i64>,
}

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
    // buffer, not the socket's.
    ws.max_message_size(64 * 1024)
        .read_buffer_size(4 * 1024)
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
                .reject_with("subscribe_timeout", &message, CLOSE_SUBSCRIBE_TIMEOUT)
                .await;
            return;
        }
    };
    let sub: Subscribe = match serde_json::from_str(&request) {
        Ok(s) => s,
        Err(e) => {
            socket
                .reject(
                    "bad_request",
                    &format!("expected {{\"type\":\"subscribe\",\"user_id\":…,\"token\":…}}: {e}"),
                )
                .await;
            return;
        }
    };
    if sub.kind != "subscribe" {
        socket
            .reject(
                "bad_request",
                "the first message must have \"type\":\"subscribe\"",
            )
            .await;
        return;
    }
    let Authorized { target, token } = match state.authorize(&sub.user_id, &sub.token, ip).await {
        Ok(authorized) => authorized,
        Err(refused) => {
            if let Refused::Db(e) = &refused {
                tracing::error!(error = %e, "checking a token");
            }
            socket.reject(refused.code(), &refused.to_string()).await;
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
    let mut feed = match Feed::open(
        &state.hub,
        state.db.clone(),
        target,
        sub.since,
        token,
        state.replay_page_size,
    )
    .await
    {
        Ok(feed) => feed,
        Err(e) => {
            tracing::error!(error = %e, "opening a feed");
            socket
                .reject("internal_error", "could not open the feed; try again")
                .await;
            return;
        }
    };
    let user_id = match target {
        Target::User(id) => json!(id),
        Target::All => json!("*"),
    };
    if socket
        .send(json!({"type": "subscribed", "user_id": user_id}).to_string())
        .await
        .is_err()
    {
        return;
    }

    let mut ping = tokio::time::interval(state.ping_interval);
    ping.reset();
    let mut last_heard = Instant::now();
    let (code, reason) = loop {
        tokio::select! {
            () = state.shutdown.cancelled() => break (CLOSE_GOING_AWAY, "notifier shutting down; reconnect with since".to_owned()),
            incoming = socket.socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => last_heard = Instant::now(),
            },
            frame = feed.next() => match frame {
                Ok(frame) => {
                    if socket.send(frame.ws_text.clone()).await.is_err() {
                        break (CLOSE_LAGGED, format!("too slow to keep up; resume with since={}", feed.last_seq()));
                    }
                }
                Err(FeedEnd::Lagged { last_seq }) => {
                    let message = format!("too slow to keep up; resume with since={last_seq}");
                    let _ = socket.send(json!({"type": "error", "code": "lagged", "message": message, "last_seq": last_seq}).to_string()).await;
                    metrics::counter!("upline_notifier_lagged_total").increment(1);
                    break (CLOSE_LAGGED, message);
                }
                Err(FeedEnd::Closed) => break (CLOSE_GOING_AWAY, "notifier shutting down; reconnect with since".to_owned()),
                Err(end @ (FeedEnd::Revoked | FeedEnd::Expired)) => {
                    let code = if matches!(end, FeedEnd::Revoked) { "token_revoked" } else { "token_expired" };
                    let message = end.to_string();
                    let _ = socket.send(json!({"type": "error", "code": code, "message": message, "last_seq": feed.last_seq()}).to_string()).await;
                    metrics::counter!("upline_notifier_auth_closed_total", "reason" => code).increment(1);
                    break (CLOSE_UNAUTHORIZED, message);
                }
                Err(FeedEnd::Db(e)) => {
                    tracing::error!(error = %e, "feed database error");
                    break (CLOSE_ERROR, format!("internal error; reconnect with since={}", feed.last_seq()));
                }
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > state.idle_timeout {
                    break (CLOSE_IDLE, "no answer to pings".to_owned());
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

    async fn reject(&mut self, code: &str, message: &str) {
        self.reject_with(code, message, CLOSE_POLICY).await;
    }

    /// An error frame, then a close with `close_code`.
    async fn reject_with(&mut self, code: &str, message: &str, close_code: u16) {
        let _ = self
            .send(json!({"type": "error", "code": code, "message": message}).to_string())
            .await;
        self.close(close_code, message).await;
    }

    /// Refuses a connection over a cap: an error frame with `retry_after` (seconds), then a
    /// close with the cap's own code.
    async fn refuse(&mut self, refused: CapExceeded) {
        let message = refused.to_string();
        let _ = self
            .send(
                json!({
                    "type": "error",
                    "code": refused.code(),
                    "message": message,
                    "retry_after": RETRY_AFTER.as_secs(),
                })
                .to_string(),
            )
            .await;
        self.close(cap_close_code(refused), &message).await;
    }

    async fn close(&mut self, code: u16, reason: &str) {
        // Close reasons are limited to 123 bytes.
        let reason: String = reason.chars().take(120).collect();
        let _ = self
            .send_message(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })))
            .await;
    }
}
