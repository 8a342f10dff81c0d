//! The notifier's wire protocol (SPEC §5, `docs/contract.md`): every message of the WebSocket
//! at `GET /ws` and every event of the Server-Sent Events stream at `GET /events/{user_id}`,
//! as serde types. The notifier sends and reads only these; clients (the tests, the bench,
//! the demo) build and parse them with the same types.
//!
//! **WebSocket** (JSON text frames):
//! - client → [`Subscribe`]: `{"type":"subscribe","user_id":7 | "*","token":"…","since":12}`,
//!   the first message, within `notifier.subscribe_timeout_secs`.
//! - server → [`ServerMessage`]: `{"type":"subscribed","user_id":7}`, then
//!   `{"type":"earning","earning":{…}}` per earning (built once per event by
//!   [`earning_text`]), or `{"type":"error","code":…,"message":…}` ([`ErrorMessage`]) followed
//!   by a close with a [`CloseCode`].
//!
//! **SSE**: `event: earning` ([`SseEvent::Earning`]) with the [`EarningEvent`] as `data:` and
//! `id:` = its `seq`; a stream that ends early sends one `event: feed-error`
//! ([`SseEvent::FeedError`]) with an [`ErrorMessage`] as `data:`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

use crate::events::EarningEvent;
use crate::UserId;

/// Whose earnings a subscription follows: one user's (`7`, a user token of that user or the
/// admin key) or every earner's (`"*"`, the admin key only; live, without replay).
///
/// JSON: a positive integer, or a string of its digits, or `"*"`. Serialises as the number or
/// `"*"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// One earner.
    User(UserId),
    /// Every earner (admin only).
    All,
}

impl From<UserId> for Target {
    /// That user's earnings.
    fn from(id: UserId) -> Self {
        Target::User(id)
    }
}

/// The text of [`Target::All`].
const ALL: &str = "*";

impl fmt::Display for Target {
    /// The user id, or `*`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::User(id) => id.fmt(f),
            Target::All => f.write_str(ALL),
        }
    }
}

/// A target that is neither `"*"` nor a positive user id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be \"*\" or a positive integer")]
pub struct InvalidTarget;

impl FromStr for Target {
    type Err = InvalidTarget;

    /// `*`, or a user id (digits; surrounding blanks ignored), as in the SSE path
    /// `/events/{user_id}`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Target::from_json(&serde_json::Value::String(s.to_owned()))
    }
}

impl Target {
    /// A target from any JSON value: `"*"`, a positive integer or a string of its digits.
    fn from_json(v: &serde_json::Value) -> Result<Self, InvalidTarget> {
        if v == ALL {
            return Ok(Target::All);
        }
        UserId::from_json(v).map(Target::User).ok_or(InvalidTarget)
    }
}

impl Serialize for Target {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Target::User(id) => id.serialize(s),
            Target::All => s.serialize_str(ALL),
        }
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through a `Value`: numbers arrive as `arbitrary_precision` numbers.
        let v = serde_json::Value::deserialize(d)?;
        Target::from_json(&v).map_err(serde::de::Error::custom)
    }
}

impl PartialSchema for Target {
    /// `oneOf`: a user id (integer ≥ 1) or the string `"*"`.
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .description(Some(
                "A user id (its earnings), or \"*\" for every earner's (the admin key only).",
            ))
            .item(UserId::schema())
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some([ALL])),
            )
            .examples([serde_json::json!(7), serde_json::json!(ALL)])
            .into()
    }
}

impl ToSchema for Target {}

/// The literal `"subscribe"` of [`Subscribe`]'s `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SubscribeType {
    #[default]
    Subscribe,
}

/// The client's one message, the first on a WebSocket:
/// `{"type":"subscribe","user_id":7,"token":"<token>","since":12}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"type": "subscribe", "user_id": 7, "token": "<token>", "since": 12}))]
pub struct Subscribe {
    /// Always `"subscribe"`.
    #[serde(rename = "type")]
    pub kind: SubscribeType,
    /// The earner to follow, or `"*"` for all (admin key).
    pub user_id: Target,
    /// A user token of `user_id`, or the admin key.
    pub token: String,
    /// The last `seq` the client has: every later earning is replayed from PostgreSQL first,
    /// then live ones follow, with no gap and no duplicate. Absent: live ones only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
}

impl Subscribe {
    /// A subscription to `user_id` with `token`, replaying after `since`.
    pub fn new(user_id: Target, token: impl Into<String>, since: Option<i64>) -> Self {
        Subscribe {
            kind: SubscribeType::Subscribe,
            user_id,
            token: token.into(),
            since,
        }
    }

    /// The JSON text frame.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("a Subscribe always serialises")
    }
}

/// A message from the notifier on the WebSocket, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[expect(
    clippy::large_enum_variant,
    reason = "one short-lived value per frame; a Box would only add an allocation"
)]
pub enum ServerMessage {
    /// `{"type":"subscribed","user_id":7}`: the subscription is open; earnings follow.
    Subscribed {
        /// As subscribed: the user id or `"*"`.
        user_id: Target,
    },
    /// `{"type":"earning","earning":{…}}`: one earning (SPEC §4). The notifier sends the
    /// text [`earning_text`] built once per event.
    Earning {
        /// The earning event.
        earning: EarningEvent,
    },
    /// `{"type":"error","code":…,"message":…}`: the subscription was refused or ended; a
    /// close with a [`CloseCode`] follows.
    Error(ErrorMessage),
}

impl ServerMessage {
    /// The JSON text frame.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("a ServerMessage always serialises")
    }
}

/// `{"type":"earning","earning":<event>}` around an event's JSON that is already serialised:
/// the same text as [`ServerMessage::Earning`], built once per event and shared by every
/// subscriber.
pub fn earning_text(event: &RawValue) -> String {
    /// [`ServerMessage::Earning`] borrowing the serialised event.
    #[derive(Serialize)]
    #[serde(tag = "type", rename = "earning")]
    struct EarningFrame<'a> {
        earning: &'a RawValue,
    }
    serde_json::to_string(&EarningFrame { earning: event })
        .expect("a raw JSON value always serialises")
}

/// Why a subscription was refused or ended: the WebSocket `{"type":"error",…}` frame (see
/// [`ServerMessage::Error`]) and the data of SSE `event: feed-error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"code": "lagged", "message": "too slow to keep up; resume with since=12", "last_seq": 12}))]
pub struct ErrorMessage {
    /// What happened, stable for programs.
    pub code: ErrorCode,
    /// What happened and what to do, for people.
    pub message: String,
    /// The last `seq` the client was sent, when a feed that was open ends: resume with
    /// `since` = this (SSE: the browser resumes with `Last-Event-ID` by itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<i64>,
    /// Seconds to wait before trying again, when a connection cap refused the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl ErrorMessage {
    /// An error with `code` and `message`, without `last_seq` or `retry_after`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorMessage {
            code,
            message: message.into(),
            last_seq: None,
            retry_after: None,
        }
    }

    /// With `last_seq`.
    pub fn last_seq(mut self, last_seq: i64) -> Self {
        self.last_seq = Some(last_seq);
        self
    }

    /// With `retry_after` (seconds).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// The JSON text (the SSE `feed-error` data).
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("an ErrorMessage always serialises")
    }
}

/// The notifier's error codes: in WebSocket error frames, SSE `feed-error` events and the
/// `code` of SSE problem answers (`application/problem+json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The first message was not a [`Subscribe`] (close [`CloseCode::Policy`]).
    BadRequest,
    /// No `subscribe` within `notifier.subscribe_timeout_secs` (close
    /// [`CloseCode::SubscribeTimeout`]).
    SubscribeTimeout,
    /// A bad token, or a token of another user (close [`CloseCode::Policy`]; SSE 401/403).
    Unauthorized,
    /// The token expired: renew it (close [`CloseCode::Policy`] at subscribe, then
    /// [`CloseCode::Unauthorized`]; SSE 403 or `feed-error`).
    TokenExpired,
    /// The token was revoked, or its user deactivated or erased: sign in again (as
    /// [`ErrorCode::TokenExpired`]).
    TokenRevoked,
    /// The address spent its budget of failed authentications (SSE 429 with `Retry-After`).
    RateLimited,
    /// A server fault (close [`CloseCode::Policy`] at subscribe, [`CloseCode::InternalError`]
    /// later): reconnect with `since`.
    InternalError,
    /// The user has `notifier.max_connections_per_user` streams open (close
    /// [`CloseCode::TooManyForUser`]; SSE 429).
    TooManyConnectionsForUser,
    /// The address has `notifier.max_connections_per_address` connections open (close
    /// [`CloseCode::TooManyFromAddress`]; SSE 429).
    TooManyConnectionsFromAddress,
    /// The notifier is at `notifier.max_connections` (close [`CloseCode::TryAgainLater`];
    /// SSE 503).
    NotifierFull,
    /// The client fell too far behind the live feed: resume with `since` = `last_seq` (close
    /// [`CloseCode::Lagged`]).
    Lagged,
    /// SSE `feed-error`: the notifier is shutting down; reconnect.
    Closing,
    /// SSE: the token could not be checked (503) or the feed not opened (`feed-error`); try
    /// again.
    Unavailable,
    /// SSE 403: the admin key was sent in the URL (`?token=`); send it as
    /// `Authorization: Bearer`, and rotate it.
    KeyInUrl,
}

impl ErrorCode {
    /// The code as sent, `"token_revoked"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::SubscribeTimeout => "subscribe_timeout",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenRevoked => "token_revoked",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::TooManyConnectionsForUser => "too_many_connections_for_user",
            ErrorCode::TooManyConnectionsFromAddress => "too_many_connections_from_address",
            ErrorCode::NotifierFull => "notifier_full",
            ErrorCode::Lagged => "lagged",
            ErrorCode::Closing => "closing",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::KeyInUrl => "key_in_url",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The WebSocket close codes the notifier sends (RFC 6455 §7.4; 4000–4999 are the
/// application's own). An error frame ([`ServerMessage::Error`]) comes first, except for
/// [`CloseCode::GoingAway`], [`CloseCode::Idle`] and [`CloseCode::InternalError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// The notifier is shutting down: reconnect with `since`.
    GoingAway = 1001,
    /// The subscription was refused: a bad message, token or user ([`ErrorCode::BadRequest`],
    /// [`ErrorCode::Unauthorized`], …).
    Policy = 1008,
    /// A server fault after the subscription opened: reconnect with `since`.
    InternalError = 1011,
    /// The notifier is at `notifier.max_connections` (RFC 6455's "Try Again Later";
    /// [`ErrorCode::NotifierFull`]).
    TryAgainLater = 1013,
    /// Too slow to keep up ([`ErrorCode::Lagged`]): resume with `since` = `last_seq`.
    Lagged = 4001,
    /// No answer to pings within `notifier.idle_timeout_secs`.
    Idle = 4002,
    /// The token was revoked or expired ([`ErrorCode::TokenRevoked`],
    /// [`ErrorCode::TokenExpired`]): sign in again (or renew the token) before reconnecting.
    Unauthorized = 4003,
    /// The user has `notifier.max_connections_per_user` streams open already
    /// ([`ErrorCode::TooManyConnectionsForUser`]).
    TooManyForUser = 4004,
    /// The client address has `notifier.max_connections_per_address` connections open
    /// already ([`ErrorCode::TooManyConnectionsFromAddress`]).
    TooManyFromAddress = 4005,
    /// No `subscribe` message within `notifier.subscribe_timeout_secs`
    /// ([`ErrorCode::SubscribeTimeout`]).
    SubscribeTimeout = 4006,
}

impl CloseCode {
    /// Every close code, in numeric order.
    pub const ALL: [CloseCode; 10] = [
        CloseCode::GoingAway,
        CloseCode::Policy,
        CloseCode::InternalError,
        CloseCode::TryAgainLater,
        CloseCode::Lagged,
        CloseCode::Idle,
        CloseCode::Unauthorized,
        CloseCode::TooManyForUser,
        CloseCode::TooManyFromAddress,
        CloseCode::SubscribeTimeout,
    ];

    /// The number on the wire.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// The close code numbered `code`, if the notifier sends it.
    pub fn from_code(code: u16) -> Option<CloseCode> {
        CloseCode::ALL.into_iter().find(|c| c.code() == code)
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> u16 {
        code.code()
    }
}

/// The SSE event names (`event:`) of `GET /events/{user_id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SseEvent {
    /// `event: earning`, `id:` = `seq` (none on the admin feed of every earner), `data:` = the
    /// [`EarningEvent`].
    Earning,
    /// `event: feed-error`, `data:` = an [`ErrorMessage`]; the stream then ends and the
    /// browser reconnects with `Last-Event-ID`. A name of its own: browsers deliver their
    /// connection errors as `error`.
    FeedError,
}

impl SseEvent {
    /// The `event:` name.
    pub fn as_str(self) -> &'static str {
        match self {
            SseEvent::Earning => "earning",
            SseEvent::FeedError => "feed-error",
        }
    }
}

/// The SSE comment (`: subscribed`) that opens every stream, with `retry:`.
pub const SSE_SUBSCRIBED_COMMENT: &str = "subscribed";

#[cfg(test)]
mod tests {
    use super::*;

    /// The earning event example of contract §4.
    const EVENT: &str = r#"{"earning_id":9812,"seq":17,"earner_id":7,"kind":"commission","source_user_id":42,"purchase_id":"ord-2026-000123","level":1,"rate":"0.05","amount":"100.00","currency":"INR","totals":{"total":"1530.00","level_1":"1400.00","level_2":"130.00","pending":"230.00","approved":"300.00","paid":"1000.00","reversed":"50.00"},"created_at":"2026-11-20T10:00:00.123Z"}"#;

    fn user(id: i64) -> Target {
        Target::User(UserId::new(id).expect("positive"))
    }

    fn event() -> EarningEvent {
        serde_json::from_str(EVENT).expect("the SPEC §4 example parses")
    }

    /// `text` parses as `T`, which serialises back to the same JSON value.
    fn round_trips<T>(text: &str) -> T
    where
        T: Serialize + for<'de> Deserialize<'de>,
    {
        let parsed: T = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let back = serde_json::to_value(&parsed).expect("serialises");
        let original: serde_json::Value = serde_json::from_str(text).expect("JSON");
        assert_eq!(back, original, "{text} round-trips");
        parsed
    }

    #[test]
    fn the_contract_subscribe_messages_round_trip() {
        let sub: Subscribe =
            round_trips(r#"{"type":"subscribe","user_id":7,"token":"<token>","since":12}"#);
        assert_eq!(sub, Subscribe::new(user(7), "<token>", Some(12)));
        let sub: Subscribe = round_trips(r#"{"type":"subscribe","user_id":"*","token":"k"}"#);
        assert_eq!(sub, Subscribe::new(Target::All, "k", None));
        assert_eq!(
            sub.to_text(),
            r#"{"type":"subscribe","user_id":"*","token":"k"}"#
        );
    }

    #[test]
    fn a_subscribe_takes_a_user_id_as_digits_and_refuses_anything_else() {
        let sub: Subscribe =
            serde_json::from_str(r#"{"type":"subscribe","user_id":"7","token":"t"}"#)
                .expect("digits");
        assert_eq!(sub.user_id, user(7));
        for bad in [r#""seven""#, "0", "-3", "null", r#""**""#] {
            let text = format!(r#"{{"type":"subscribe","user_id":{bad},"token":"t"}}"#);
            assert!(
                serde_json::from_str::<Subscribe>(&text).is_err(),
                "{bad} is not a target"
            );
        }
        assert!(
            serde_json::from_str::<Subscribe>(r#"{"type":"hello","user_id":7,"token":"t"}"#)
                .is_err(),
            "the type must be subscribe"
        );
        assert!(
            serde_json::from_str::<Subscribe>(r#"{"type":"subscribe","user_id":7}"#).is_err(),
            "the token is required"
        );
    }

    #[test]
    fn a_target_parses_from_an_sse_path() {
        assert_eq!("*".parse(), Ok(Target::All));
        assert_eq!("42".parse(), Ok(user(42)));
        assert_eq!("x".parse::<Target>(), Err(InvalidTarget));
        assert_eq!(Target::All.to_string(), "*");
        assert_eq!(user(42).to_string(), "42");
    }

    #[test]
    fn the_contract_server_messages_round_trip() {
        assert_eq!(
            round_trips::<ServerMessage>(r#"{"type":"subscribed","user_id":7}"#),
            ServerMessage::Subscribed { user_id: user(7) }
        );
        assert_eq!(
            round_trips::<ServerMessage>(r#"{"type":"subscribed","user_id":"*"}"#),
            ServerMessage::Subscribed {
                user_id: Target::All
            }
        );
        assert_eq!(
            round_trips::<ServerMessage>(&format!(r#"{{"type":"earning","earning":{EVENT}}}"#)),
            ServerMessage::Earning { earning: event() }
        );
        assert_eq!(
            round_trips::<ServerMessage>(
                r#"{"type":"error","code":"unauthorized","message":"the token is not valid for this user"}"#
            ),
            ServerMessage::Error(ErrorMessage::new(
                ErrorCode::Unauthorized,
                "the token is not valid for this user"
            ))
        );
        assert_eq!(
            round_trips::<ServerMessage>(
                r#"{"type":"error","code":"lagged","message":"m","last_seq":12}"#
            ),
            ServerMessage::Error(ErrorMessage::new(ErrorCode::Lagged, "m").last_seq(12))
        );
        assert_eq!(
            round_trips::<ServerMessage>(
                r#"{"type":"error","code":"notifier_full","message":"m","retry_after":10}"#
            ),
            ServerMessage::Error(ErrorMessage::new(ErrorCode::NotifierFull, "m").retry_after(10))
        );
    }

    #[test]
    fn the_earning_frame_text_is_the_typed_message() {
        let raw = serde_json::value::to_raw_value(&event()).expect("serialises");
        let text = earning_text(&raw);
        assert!(
            text.starts_with(r#"{"type":"earning","earning":{"#),
            "{text}"
        );
        assert_eq!(
            serde_json::from_str::<ServerMessage>(&text).expect("a server message"),
            ServerMessage::Earning { earning: event() }
        );
        assert_eq!(
            text,
            ServerMessage::Earning { earning: event() }.to_text(),
            "the same bytes as the typed message"
        );
        // The event's own text is kept as it came (the notifier forwards the broker's bytes).
        let raw: Box<RawValue> = serde_json::from_str(EVENT).expect("raw");
        assert_eq!(
            earning_text(&raw),
            format!(r#"{{"type":"earning","earning":{EVENT}}}"#)
        );
    }

    #[test]
    fn the_sse_feed_error_data_round_trips() {
        let data: ErrorMessage = round_trips(
            r#"{"code":"token_revoked","message":"the token was revoked; sign in again","last_seq":3}"#,
        );
        assert_eq!(data.code, ErrorCode::TokenRevoked);
        round_trips::<ErrorMessage>(
            r#"{"code":"unavailable","message":"could not open the feed; reconnecting"}"#,
        );
        assert_eq!(SseEvent::Earning.as_str(), "earning");
        assert_eq!(SseEvent::FeedError.as_str(), "feed-error");
    }

    #[test]
    fn error_codes_are_sent_as_documented() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::SubscribeTimeout,
            ErrorCode::Unauthorized,
            ErrorCode::TokenExpired,
            ErrorCode::TokenRevoked,
            ErrorCode::RateLimited,
            ErrorCode::InternalError,
            ErrorCode::TooManyConnectionsForUser,
            ErrorCode::TooManyConnectionsFromAddress,
            ErrorCode::NotifierFull,
            ErrorCode::Lagged,
            ErrorCode::Closing,
            ErrorCode::Unavailable,
            ErrorCode::KeyInUrl,
        ] {
            assert_eq!(
                serde_json::to_value(code).expect("serialises"),
                code.as_str(),
                "{code:?}"
            );
        }
    }

    #[test]
    fn close_codes_are_the_documented_numbers() {
        let numbers: Vec<u16> = CloseCode::ALL.into_iter().map(u16::from).collect();
        assert_eq!(
            numbers,
            [1001, 1008, 1011, 1013, 4001, 4002, 4003, 4004, 4005, 4006]
        );
        assert_eq!(CloseCode::from_code(4003), Some(CloseCode::Unauthorized));
        assert_eq!(CloseCode::from_code(1000), None);
    }

    #[test]
    fn the_schemas_name_every_message() {
        let schema = serde_json::to_value(ServerMessage::schema()).expect("schema");
        let text = schema.to_string();
        for variant in ["subscribed", "earning", "error"] {
            assert!(
                text.contains(&format!("\"{variant}\"")),
                "{variant}: {text}"
            );
        }
        let target = serde_json::to_value(Target::schema()).expect("schema");
        assert_eq!(target["oneOf"][0]["minimum"], 1, "{target}");
        assert_eq!(target["oneOf"][1]["enum"][0], "*", "{target}");
    }
}
