//! `GET /events/{user_id}` (SPEC §5): the same feed as Server-Sent Events. `id:` is the
//! earning's `seq`, so a browser's `EventSource` resumes by itself with `Last-Event-ID`.
//! The token comes as `Authorization: Bearer …` or `?token=`; `?since=` also resumes.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::feed::{Feed, FeedEnd};
use crate::NotifierState;

#[derive(Debug, Deserialize)]
pub struct SseQuery {
    token: Option<String>,
    since: Option<i64>,
}

pub async fn events(
    State(state): State<NotifierState>,
    Path(user_id): Path<String>,
    Query(query): Query<SseQuery>,
    headers: HeaderMap,
) -> Response {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let Some(token) = bearer.or(query.token) else {
        return problem(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the token as Authorization: Bearer or ?token=",
        );
    };
    let user_value = user_id
        .parse::<i64>()
        .map_or_else(|_| Value::String(user_id.clone()), |id| json!(id));
    let Some(target) = state.authorize(&user_value, &token) else {
        return problem(
            StatusCode::FORBIDDEN,
            "unauthorized",
            "the token is not valid for this user",
        );
    };
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok());
    let since = last_event_id.or(query.since);
    let feed = match Feed::open(&state.hub, state.db.clone(), target, since).await {
        Ok(feed) => feed,
        Err(e) => {
            tracing::error!(error = %e, "opening an SSE feed");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "could not open the feed; retry",
            );
        }
    };
    metrics::counter!("upline_notifier_sse_streams_total").increment(1);
    let stream = feed_events(feed).take_until(state.shutdown.clone().cancelled_owned());
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// The feed as SSE events; after a lag or error one `event: error` is sent and the stream
/// ends, and the browser reconnects with `Last-Event-ID`.
fn feed_events(feed: Feed) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(Some(feed), |feed| async move {
        let mut feed = feed?;
        match feed.next().await {
            Ok(frame) => {
                let event = Event::default()
                    .event("earning")
                    .id(frame.seq.to_string())
                    .data(frame.event_json.clone());
                Some((Ok(event), Some(feed)))
            }
            Err(end) => {
                let code = match end {
                    FeedEnd::Lagged { .. } => "lagged",
                    FeedEnd::Closed => "closing",
                    FeedEnd::Db(_) => "internal_error",
                };
                let data =
                    json!({"code": code, "message": end.to_string(), "last_seq": feed.last_seq()});
                Some((
                    Ok(Event::default().event("error").data(data.to_string())),
                    None,
                ))
            }
        }
    })
}

fn problem(status: StatusCode, code: &str, detail: &str) -> Response {
    let body = json!({
        "type": format!("/problems/{code}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
        "code": code,
    });
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/problem+json"),
    );
    response
}
