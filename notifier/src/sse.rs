//! `GET /events/{user_id}` (SPEC §5): the same feed as Server-Sent Events. `id:` is the
//! earning's `seq`, so a browser's `EventSource` resumes by itself with `Last-Event-ID`.
//! The token comes as `Authorization: Bearer …` or `?token=`; `?since=` also resumes.

use std::convert::Infallible;
use std::time::Duration;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use upline_common::protocol::{ErrorCode, ErrorMessage, SseEvent, Target, SSE_SUBSCRIBED_COMMENT};

use crate::feed::{Feed, FeedEnd};
use crate::slots::{CapExceeded, RETRY_AFTER};
use crate::{Authorized, NotifierState, Refused};

/// The reconnection delay suggested to clients (`retry:`).
const RECONNECT: Duration = Duration::from_secs(1);

#[derive(Debug, Deserialize)]
pub struct SseQuery {
    token: Option<String>,
    since: Option<i64>,
}

pub async fn events(
    State(state): State<NotifierState>,
    Path(user_id): Path<String>,
    Query(query): Query<SseQuery>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let ip = state.limits.client_ip(Some(peer), &headers);
    // Before the token is looked at: a refusal here costs nothing.
    let slot = match state.slots.connect(ip) {
        Ok(slot) => slot,
        Err(refused) => return over_cap(refused),
    };
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let in_url = bearer.is_none() && query.token.is_some();
    let Some(token) = bearer.or(query.token) else {
        return problem(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "send the token as Authorization: Bearer or ?token=",
        );
    };
    let Authorized { target, token } = match state.authorize(user_id.parse(), &token, ip).await {
        Ok(authorized) => authorized,
        Err(Refused::RateLimited(limited)) => {
            let mut response = problem(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                &limited.to_string(),
            );
            if let Ok(value) = HeaderValue::from_str(&limited.retry_after_secs().to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            return response;
        }
        Err(Refused::Db(e)) => {
            tracing::error!(error = %e, "checking an SSE token");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "could not check the token; try again",
            );
        }
        Err(refused) => {
            return problem(StatusCode::FORBIDDEN, refused.code(), &refused.to_string())
        }
    };
    // Only user tokens may travel in a URL (proxies and browser history keep URLs): the admin
    // key must come in the Authorization header. It was valid, so it leaked: say so loudly.
    if in_url && token.is_none() {
        tracing::warn!(
            "refused the admin key in an SSE URL; send it as Authorization: Bearer and rotate it"
        );
        return problem(
            StatusCode::FORBIDDEN,
            ErrorCode::KeyInUrl,
            "the admin key may not be sent in a URL (?token=), where proxies and browser history keep it; send it as Authorization: Bearer, and rotate it",
        );
    }
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let last_event_id = match last_event_id.map(str::parse::<i64>) {
        None => None,
        Some(Ok(seq)) => Some(seq),
        Some(Err(_)) => {
            tracing::warn!(value = ?last_event_id, "ignoring a Last-Event-ID that is not a seq");
            None
        }
    };
    let since = last_event_id.or(query.since);
    let user_slot = match target {
        Target::User(id) => match state.slots.subscribe(id) {
            Ok(slot) => Some(slot),
            Err(refused) => return over_cap(refused),
        },
        Target::All => None,
    };
    // Ask browsers to reconnect one second after a drop (the EventSource default is ~3 s).
    let hello = stream::once(async {
        Ok(Event::default()
            .retry(RECONNECT)
            .comment(SSE_SUBSCRIBED_COMMENT))
    });
    let feed = match Feed::open(
        &state.hub,
        state.db.clone(),
        target,
        since,
        token,
        state.replay_page_size,
    )
    .await
    {
        Ok(feed) => feed,
        Err(e) => {
            // Not a 503: an EventSource gives up for good on any answer but 200. A stream that
            // ends at once makes it come back after `retry`.
            tracing::error!(error = %e, "opening an SSE feed");
            let unavailable = Event::default().event(SseEvent::FeedError.as_str()).data(
                ErrorMessage::new(
                    ErrorCode::Unavailable,
                    "could not open the feed; reconnecting",
                )
                .to_text(),
            );
            let stream = hello.chain(stream::once(async { Ok(unavailable) }));
            return Sse::new(stream).into_response();
        }
    };
    metrics::counter!("upline_notifier_sse_streams_total").increment(1);
    metrics::gauge!("upline_notifier_connections", "protocol" => "sse").increment(1.0);
    // The stream owns the slots: however it ends (client gone, feed ended, shutdown), the
    // response body is dropped and they are released.
    let guards = (slot, user_slot, SseGauge);
    let stream = hello
        .chain(feed_events(feed, target))
        .take_until(state.shutdown.clone().cancelled_owned())
        .map(move |event| {
            let _held = &guards;
            event
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// The feed as SSE events; after a lag or error one `event: feed-error` is sent (a name of its
/// own: browsers deliver their connection errors as `error`) and the stream ends, and the
/// browser reconnects with `Last-Event-ID`. The admin feed of every earner is live only: its
/// events carry no `id:`, since each earner's `seq` counts separately.
fn feed_events(feed: Feed, target: Target) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(Some(feed), move |feed| async move {
        let mut feed = feed?;
        match feed.next().await {
            Ok(frame) => {
                let event = Event::default()
                    .event(SseEvent::Earning.as_str())
                    .data(frame.event_json.clone());
                let event = match target {
                    Target::User(_) => event.id(frame.seq.to_string()),
                    Target::All => event,
                };
                Some((Ok(event), Some(feed)))
            }
            Err(end) => {
                let code = match end {
                    FeedEnd::Lagged { .. } => ErrorCode::Lagged,
                    FeedEnd::Closed => ErrorCode::Closing,
                    FeedEnd::Revoked => ErrorCode::TokenRevoked,
                    FeedEnd::Expired => ErrorCode::TokenExpired,
                    FeedEnd::Db(_) => ErrorCode::InternalError,
                };
                let data = ErrorMessage::new(code, end.to_string()).last_seq(feed.last_seq());
                let event = Event::default()
                    .event(SseEvent::FeedError.as_str())
                    .data(data.to_text());
                Some((Ok(event), None))
            }
        }
    })
}

/// `upline_notifier_connections{protocol="sse"}`, decremented when the stream is dropped.
struct SseGauge;

impl Drop for SseGauge {
    fn drop(&mut self) {
        metrics::gauge!("upline_notifier_connections", "protocol" => "sse").decrement(1.0);
    }
}

/// A refusal by a connection cap: `429` for the per-user and per-address caps, `503` when the
/// notifier is full, each with `Retry-After`. (An `EventSource` does not retry after either:
/// a page stuck in a loop of refusals would only add load.)
fn over_cap(refused: CapExceeded) -> Response {
    let status = match refused {
        CapExceeded::User(_) | CapExceeded::Address(_) => StatusCode::TOO_MANY_REQUESTS,
        CapExceeded::Full => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut response = problem(status, refused.code(), &refused.to_string());
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(RETRY_AFTER.as_secs()),
    );
    response
}

fn problem(status: StatusCode, code: ErrorCode, detail: &str) -> Response {
    upline_common::http::problem_response(status, code.as_str(), detail, None)
}
