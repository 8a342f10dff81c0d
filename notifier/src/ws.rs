//! `GET /ws` (SPEC §5): subscribe with a token, replay from `since`, then live earnings;
//! pings idle connections and closes silent or too-slow ones with a reason.

use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::feed::{Feed, FeedEnd, Target};
use crate::NotifierState;

/// How long a new connection may take to send its `subscribe` message.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);
/// A send that takes longer than this means the client is not reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Close codes (4000–4999 are the application's own).
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_LAGGED: u16 = 4001;
const CLOSE_IDLE: u16 = 4002;
const CLOSE_ERROR: u16 = 1011;

/// `{"type":"subscribe","user_id":7 | "*","token":"…","since":12}`
#[derive(Debug, Deserialize)]
struct Subscribe {
    #[serde(rename = "type")]
    kind: String,
    user_id: Value,
    token: String,
    since: Option<i64>,
}

pub async fn upgrade(State(state): State<NotifierState>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(64 * 1024)
        .on_upgrade(move |socket| connection(state, socket))
}

async fn connection(state: NotifierState, mut socket: WebSocket) {
    metrics::gauge!("upline_notifier_connections", "protocol" => "ws").increment(1.0);
    serve(&state, &mut socket).await;
    metrics::gauge!("upline_notifier_connections", "protocol" => "ws").decrement(1.0);
}

async fn serve(state: &NotifierState, socket: &mut WebSocket) {
    let request = match tokio::time::timeout(SUBSCRIBE_TIMEOUT, first_text(socket)).await {
        Ok(Some(text)) => text,
        Ok(None) => return,
        Err(_) => {
            reject(socket, "bad_request", "send a subscribe message first").await;
            return;
        }
    };
    let sub: Subscribe = match serde_json::from_str(&request) {
        Ok(s) => s,
        Err(e) => {
            reject(
                socket,
                "bad_request",
                &format!("expected {{\"type\":\"subscribe\",\"user_id\":…,\"token\":…}}: {e}"),
            )
            .await;
            return;
        }
    };
    if sub.kind != "subscribe" {
        reject(
            socket,
            "bad_request",
            "the first message must have \"type\":\"subscribe\"",
        )
        .await;
        return;
    }
    let Some(target) = state.authorize(&sub.user_id, &sub.token) else {
        reject(
            socket,
            "unauthorized",
            "the token is not valid for this user",
        )
        .await;
        return;
    };
    let mut feed = match Feed::open(&state.hub, state.db.clone(), target, sub.since).await {
        Ok(feed) => feed,
        Err(e) => {
            tracing::error!(error = %e, "opening a feed");
            reject(
                socket,
                "internal_error",
                "could not open the feed; try again",
            )
            .await;
            return;
        }
    };
    let user_id = match target {
        Target::User(id) => json!(id),
        Target::All => json!("*"),
    };
    if send(
        socket,
        json!({"type": "subscribed", "user_id": user_id}).to_string(),
    )
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
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => last_heard = Instant::now(),
            },
            frame = feed.next() => match frame {
                Ok(frame) => {
                    if send(socket, frame.ws_text.clone()).await.is_err() {
                        break (CLOSE_LAGGED, format!("too slow to keep up; resume with since={}", feed.last_seq()));
                    }
                }
                Err(FeedEnd::Lagged { last_seq }) => {
                    let message = format!("too slow to keep up; resume with since={last_seq}");
                    let _ = send(socket, json!({"type": "error", "code": "lagged", "message": message, "last_seq": last_seq}).to_string()).await;
                    metrics::counter!("upline_notifier_lagged_total").increment(1);
                    break (CLOSE_LAGGED, message);
                }
                Err(FeedEnd::Closed) => break (CLOSE_GOING_AWAY, "notifier shutting down; reconnect with since".to_owned()),
                Err(FeedEnd::Db(e)) => {
                    tracing::error!(error = %e, "feed database error");
                    break (CLOSE_ERROR, format!("internal error; reconnect with since={}", feed.last_seq()));
                }
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > state.idle_timeout {
                    break (CLOSE_IDLE, "no answer to pings".to_owned());
                }
                if send_message(socket, Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
        }
    };
    close(socket, code, &reason).await;
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

async fn send(socket: &mut WebSocket, text: String) -> Result<(), ()> {
    send_message(socket, Message::Text(text.into())).await
}

async fn send_message(socket: &mut WebSocket, message: Message) -> Result<(), ()> {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(message)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

async fn reject(socket: &mut WebSocket, code: &str, message: &str) {
    let _ = send(
        socket,
        json!({"type": "error", "code": code, "message": message}).to_string(),
    )
    .await;
    close(socket, CLOSE_POLICY, message).await;
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    // Close reasons are limited to 123 bytes.
    let reason: String = reason.chars().take(120).collect();
    let _ = send_message(
        socket,
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })),
    )
    .await;
}
