//! The OpenAPI description of the api (SPEC §6), served at `GET /openapi.json`, with Swagger UI
//! at `GET /docs` (its assets are compiled into the binary: nothing is fetched from elsewhere).
//!
//! Handlers read their bodies as raw JSON objects (so that each field is validated and named
//! on its own), so the request and most response bodies are described here by
//! documentation-only types. Each handler's `#[utoipa::path]` lists its error statuses with
//! their `code`s in backticks; [`Documented`] turns those into a problem schema narrowed to
//! the listed codes, with one example per code rendered from the real [`ApiError`], and adds
//! the security schemes and a "who may call" line to every operation.

use std::collections::BTreeMap;

use axum::Router;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::schema::{
    AllOfBuilder, KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as OpenApiDoc, Ref, RefOr, Schema};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};
use utoipa_swagger_ui::SwaggerUi;

use crate::error::ApiError;
use crate::routes::{purchases, reports, users};
use crate::store;

/// `GET /openapi.json` and the Swagger UI under `/docs`, for merging into the api's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    SwaggerUi::new("/docs")
        .url("/openapi.json", ApiDoc::openapi())
        .into()
}

/// The whole description.
#[derive(OpenApi)]
#[openapi(
    info(title = "upline api", license(name = "MIT")),
    paths(
        users::register,
        users::list,
        users::me,
        users::get,
        users::set_referrer,
        users::deactivate,
        users::reactivate,
        users::token,
        users::revoke_tokens,
        users::erase,
        users::update,
        users::release_referral,
        reports::earnings,
        reports::referrals,
        reports::leaderboard,
        purchases::create,
        purchases::get,
        healthz,
        readyz,
        metrics,
        openapi_json,
        docs_redirect,
        docs_page,
        docs_asset,
        dashboard_page,
        dashboard_asset,
        dashboard_config,
    ),
    components(schemas(Problem, ErrorCode, PurchaseMessage, EarningEvent, Totals, Money)),
    modifiers(&Documented),
    tags(
        (name = "users", description = "Registration, the referral tree, activation and tokens"),
        (name = "purchases", description = "Purchase intake (published to RabbitMQ) and what the workers made of it"),
        (name = "reports", description = "Earnings, downlines and the leaderboard"),
        (name = "operations", description = "Liveness, readiness and metrics (every service serves them)"),
        (name = "documentation", description = "This description and its interactive viewer"),
        (name = "dashboard", description = "The browser dashboard (static page and its configuration)"),
    )
)]
pub struct ApiDoc;

const DESCRIPTION: &str = r#"The REST API of **upline**, a multi-level referral commission pipeline (SPEC §6).
A purchase accepted here (or published straight to RabbitMQ) pays the buyer's referrer and that
referrer's referrer; workers record the commissions exactly once and publish an earning event for
each, which the notifier streams to dashboards live.

## Who may call what

Credentials travel as `Authorization: Bearer <credential>`. Each operation names the ones it
accepts — in its **Who may call** line, in `security`, and in the `x-upline-auth` extension:

* **anyone** — no credentials needed (`security: [{}]`).
* **the user's own token** (`user_token`) — the signed token returned at registration (or by
  `POST /api/users/{id}/token`); it opens only its own user's resources (`{id}` in the path). It
  expires after `auth.token_ttl` (24 h by default; renew it before then with
  `POST /api/users/{id}/token`) and stops working at once when the user is deactivated or
  erased or its tokens are revoked (`DELETE /api/users/{id}/tokens`).
* **admin key** (`admin_key`) — `auth.admin_token` from the configuration; allowed everywhere.
* **producer key** (`producer_key`) — `auth.producer_token`; purchase intake and status.

Without credentials the answer is `401 unauthorized` (with `WWW-Authenticate: Bearer`); with
credentials that are invalid or do not allow the request, `403 forbidden` (`token_expired` and
`token_revoked` for user tokens past their expiry or revoked). Anonymous sign-ups and failed
authentications are limited per client address: past the budget, `429 rate_limited` with
`Retry-After`.

## Errors

Every error is `application/problem+json` (schema `Problem`): `type` (`/problems/<code>`),
`title`, `status`, `detail`, a stable machine `code`, and `field` naming the bad input for
`validation_failed` and `unknown_buyer`. Each response lists the codes it can carry, with an
example of each. Malformed JSON is `400 invalid_json`; bad input is a 4xx naming the field,
never a 5xx; `500 internal_error` is logged and says nothing more.

## Money

Answers carry amounts as decimal strings with two places (`"1530.00"`, schema `Money`);
requests accept a decimal string or an exact JSON number (at most two places, at most 10^12).

## Purchases over RabbitMQ (SPEC §3)

External systems may publish purchases straight to the broker instead of `POST /api/purchases`:
exchange `upline.purchases` (direct, durable), routing key `purchase`, persistent
(`delivery_mode` 2), `content_type` `application/json`, body `PurchaseMessage`. The
`purchase_id` is the idempotency key: a purchase is processed once however often it arrives; the
same id with other content is recorded as a conflict and pays nothing more. A message that is
not JSON or has no usable `purchase_id` is dead-lettered to `upline.purchases.dead` with header
`x-upline-error`; bad content under a usable id is stored as a `rejected` purchase with its
reason (see `GET /api/purchases/{purchase_id}`).

## Earning events (SPEC §4)

Each credited commission is published at least once, after the commit, to the topic exchange
`upline.earnings` with routing key `earning.<level>.<earner_id>`, body `EarningEvent`. `seq`
counts the earner's earnings 1, 2, 3 … without gaps; `totals` include this earning. The same
objects appear in `recent` of `GET /api/users/{id}/earnings`.

## Live updates: the notifier (port 8081)

Not served by this api but by the **notifier** service (default port 8081), which streams the
same `EarningEvent`s:

* **WebSocket** `GET ws://<host>:8081/ws` — send
  `{"type":"subscribe","user_id":7,"token":"<token>","since":12}` (`since` is optional: the last
  `seq` you have; every later earning is replayed from PostgreSQL first, then live ones follow,
  with no gap and no duplicate). The server answers `{"type":"subscribed","user_id":7}`, then
  `{"type":"earning","earning":{…EarningEvent…}}` per earning, or
  `{"type":"error","code":"unauthorized","message":"…"}` for a bad token or another user's token
  (the stream is not opened). The admin key with `"user_id":"*"` follows every earner. Idle
  connections are pinged; silent or too-slow ones are closed with a reason.
* **Server-Sent Events** `GET http://<host>:8081/events/{user_id}` — the token as
  `Authorization: Bearer` or `?token=`; one `event: earning` per earning with `id:` = `seq`,
  resuming after the `Last-Event-ID` header (or `?since=`).
"#;

// ---------------------------------------------------------------------------------------------
// Problems

/// An error (RFC 9457 problem details), served as `application/problem+json`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"type": "/problems/validation_failed", "title": "Unprocessable Entity",
    "status": 422, "detail": "email: must be an email address such as asha@example.com",
    "code": "validation_failed", "field": "email"}))]
pub struct Problem {
    /// `/problems/<code>`.
    #[serde(rename = "type")]
    #[schema(format = "uri-reference", example = "/problems/validation_failed")]
    pub problem_type: String,
    /// The status's reason phrase.
    #[schema(example = "Unprocessable Entity")]
    pub title: String,
    /// The HTTP status, repeated.
    #[schema(example = 422)]
    pub status: u16,
    /// What went wrong, for people.
    pub detail: String,
    pub code: ErrorCode,
    /// The request field at fault (`validation_failed`, `unknown_buyer`); query string errors
    /// name `query` or the parameter, header errors the header.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub field: Option<String>,
}

/// The stable machine code of a problem; each response lists the ones it can carry.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    ValidationFailed,
    Unauthorized,
    Forbidden,
    TokenExpired,
    TokenRevoked,
    AdminOnly,
    RateLimited,
    NotFound,
    ReferrerNotFound,
    EmailTaken,
    ReferralLimitReached,
    ReferrerInactive,
    AlreadyReferred,
    UserInactive,
    UserErased,
    ReferralNotReleasable,
    SelfReferral,
    ReferralCycle,
    UnknownBuyer,
    IdempotencyKeyRequired,
    PayloadTooLarge,
    BrokerUnavailable,
    DatabaseUnavailable,
    RequestTimeout,
    InternalError,
}

/// One instance of every [`ApiError`], to render examples from. The `match` makes a new
/// variant a compile error here until it has a sample.
fn samples() -> Vec<ApiError> {
    let all = vec![
        ApiError::InvalidJson("expected value at line 1 column 1".into()),
        ApiError::validation("email", "must be an email address such as asha@example.com"),
        ApiError::Unauthorized,
        ApiError::Forbidden,
        ApiError::TokenExpired,
        ApiError::TokenRevoked,
        ApiError::AdminOnly {
            field: "referrer_id",
            message:
                "naming a referrer by id needs the admin key; send the referrer's referral_code",
        },
        ApiError::RateLimited(upline_common::limits::RateLimited {
            retry_after: std::time::Duration::from_secs(12),
        }),
        ApiError::NotFound("no user with id 7".into()),
        ApiError::ReferrerNotFound,
        ApiError::EmailTaken,
        ApiError::ReferralLimitReached(8),
        ApiError::ReferrerInactive,
        ApiError::AlreadyReferred,
        ApiError::UserInactive,
        ApiError::UserErased,
        ApiError::ReferralNotReleasable,
        ApiError::SelfReferral,
        ApiError::ReferralCycle,
        ApiError::UnknownBuyer(upline_common::UserId::new(42).expect("positive")),
        ApiError::IdempotencyKeyRequired,
        ApiError::PayloadTooLarge,
        ApiError::DatabaseUnavailable,
        ApiError::RequestTimeout,
        ApiError::BrokerUnavailable,
        ApiError::Internal(anyhow::anyhow!("example")),
    ];
    for e in &all {
        match e {
            ApiError::InvalidJson(_)
            | ApiError::Validation { .. }
            | ApiError::Unauthorized
            | ApiError::Forbidden
            | ApiError::TokenExpired
            | ApiError::TokenRevoked
            | ApiError::AdminOnly { .. }
            | ApiError::RateLimited(_)
            | ApiError::NotFound(_)
            | ApiError::ReferrerNotFound
            | ApiError::EmailTaken
            | ApiError::ReferralLimitReached(_)
            | ApiError::ReferrerInactive
            | ApiError::AlreadyReferred
            | ApiError::UserInactive
            | ApiError::UserErased
            | ApiError::ReferralNotReleasable
            | ApiError::SelfReferral
            | ApiError::ReferralCycle
            | ApiError::UnknownBuyer(_)
            | ApiError::IdempotencyKeyRequired
            | ApiError::PayloadTooLarge
            | ApiError::DatabaseUnavailable
            | ApiError::RequestTimeout
            | ApiError::BrokerUnavailable
            | ApiError::Internal(_) => {}
        }
    }
    all
}

/// The body `ApiError::into_response` sends for `e` (without logging anything).
fn problem_body(e: &ApiError) -> Value {
    let (status, code) = e.status_and_code();
    upline_common::http::problem_body(status, code, &e.public_detail(), e.field())
}

/// The error codes named (in backticks) in a response description.
fn codes_in(description: &str) -> Vec<&str> {
    let known: Vec<&'static str> = samples().iter().map(|e| e.status_and_code().1).collect();
    let mut codes = Vec::new();
    for word in description.split('`').skip(1).step_by(2) {
        if known.contains(&word) && !codes.contains(&word) {
            codes.push(word);
        }
    }
    codes
}

// ---------------------------------------------------------------------------------------------
// Shared value types

/// Rupees as a decimal string with two places.
#[derive(ToSchema)]
#[schema(example = "1530.00", pattern = r"^[0-9]+\.[0-9]{2}$")]
#[allow(dead_code)]
pub struct Money(String);

/// An amount in a request: a decimal string or an exact JSON number, at most two decimal
/// places, at most 10^12 (`"2000.00"`, `"2000"`, `2000.5`).
pub struct MoneyInput;

impl PartialSchema for MoneyInput {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(r"^\s*\+?[0-9]+(\.[0-9]{1,2})?\s*$"))
                    .examples(["2000.00"]),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Number)
                    .minimum(Some(0))
                    .maximum(Some(1_000_000_000_000_i64))
                    .multiple_of(Some(0.01)),
            )
            .description(Some(
                "A decimal string or an exact JSON number, at most two decimal places, at most 10^12",
            ))
            .into()
    }
}

impl ToSchema for MoneyInput {}

/// A user id in a request: a positive integer, or a string of digits.
pub struct UserIdInput;

impl PartialSchema for UserIdInput {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                    .minimum(Some(1)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(r"^\s*0*[1-9][0-9]{0,17}\s*$")),
            )
            .description(Some("A positive integer, or a string of digits"))
            .into()
    }
}

impl ToSchema for UserIdInput {}

// ---------------------------------------------------------------------------------------------
// Request bodies

/// `POST /api/users`. Give the referrer by `referral_code`, or by `referrer_id` with the admin
/// key only (or both, naming the same user); `null` counts as absent and unknown fields are
/// ignored.
#[derive(ToSchema)]
#[schema(example = json!({"name": "Asha", "email": "asha@example.com", "referral_code": "K7QM2XPA"}))]
#[allow(dead_code)]
pub struct RegisterRequest {
    /// 1–100 characters (trimmed).
    #[schema(min_length = 1, max_length = 100)]
    name: String,
    /// Unique, compared case-insensitively.
    #[schema(format = Email, max_length = 254)]
    email: String,
    /// The referrer's id: with the admin key only (`403 admin_only` otherwise).
    referrer_id: Option<UserIdInput>,
    /// The referrer's referral code (case-insensitive).
    referral_code: Option<String>,
}

/// `PUT /api/users/{id}/referrer`: one of `referrer_id` (admin key only) or `referral_code` (or
/// both, naming the same user); `null` counts as absent.
#[derive(ToSchema)]
#[schema(example = json!({"referral_code": "K7QM2XPA"}))]
#[allow(dead_code)]
pub struct SetReferrerRequest {
    referrer_id: Option<UserIdInput>,
    referral_code: Option<String>,
}

/// `POST /api/purchases`: the purchase message of SPEC §3, with `purchase_id` optional (else
/// the `Idempotency-Key` header, else generated: `api-…`). `null` counts as absent; unknown
/// fields are ignored.
#[derive(ToSchema)]
#[schema(example = json!({"purchase_id": "ord-2026-000123", "buyer_id": 42, "amount": "2000.00",
    "currency": "INR", "profit": "400.00", "occurred_at": "2026-11-20T10:00:00Z"}))]
#[allow(dead_code)]
pub struct PurchaseRequest {
    /// The idempotency key: 1–64 characters of `A-Za-z0-9._:-`.
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,64}$")]
    purchase_id: Option<String>,
    /// The buyer: an existing user.
    buyer_id: UserIdInput,
    /// The purchase amount, positive.
    amount: MoneyInput,
    /// The configured currency (default `INR`), case-insensitive; defaults to it.
    #[schema(example = "INR")]
    currency: Option<String>,
    /// When given, commissions are computed on it rather than on `amount`; 0 ≤ profit ≤ amount.
    profit: Option<MoneyInput>,
    /// RFC 3339; defaults to the time of receipt.
    #[schema(format = DateTime)]
    occurred_at: Option<String>,
}

/// The purchase message of SPEC §3, as published to exchange `upline.purchases` (routing key
/// `purchase`, persistent, `content_type: application/json`) by the api or by external
/// systems. Unknown fields are ignored.
#[derive(ToSchema)]
#[schema(example = json!({"purchase_id": "ord-2026-000123", "buyer_id": 42, "amount": "2000.00",
    "currency": "INR", "profit": "400.00", "occurred_at": "2026-11-20T10:00:00Z"}))]
#[allow(dead_code)]
pub struct PurchaseMessage {
    /// The idempotency key: 1–64 characters of `A-Za-z0-9._:-`.
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,64}$")]
    purchase_id: String,
    buyer_id: UserIdInput,
    amount: MoneyInput,
    /// Default: the configured currency.
    #[schema(example = "INR")]
    currency: Option<String>,
    /// Default: none (commissions on `amount`).
    profit: Option<MoneyInput>,
    /// Default: the time of receipt.
    #[schema(format = DateTime)]
    occurred_at: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Response bodies

/// `201` of `POST /api/users`: the user and its bearer token.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct RegisteredUser {
    #[serde(flatten)]
    user: store::User,
    /// The user's bearer token (`user_token`), valid until `token_expires_at`
    /// (`auth.token_ttl`); renew it with `POST /api/users/{id}/token` before then.
    token: String,
    #[schema(format = DateTime)]
    token_expires_at: String,
}

/// A page of users.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UserPage {
    items: Vec<store::User>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

/// What the bearer of the credentials is.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Me {
    role: Role,
    /// Present when `role` is `user`.
    #[schema(nullable = false)]
    user: Option<store::User>,
}

#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum Role {
    Admin,
    Producer,
    User,
}

/// A fresh token for a user.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct IssuedToken {
    user_id: i64,
    token: String,
    /// When the token stops being valid (RFC 3339).
    #[schema(format = DateTime)]
    expires_at: String,
}

/// `PATCH /api/users/{id}`.
#[derive(ToSchema)]
#[schema(example = json!({"show_on_leaderboard": false}))]
#[allow(dead_code)]
pub struct UpdateUserRequest {
    /// `false` hides the user from the public leaderboard.
    show_on_leaderboard: bool,
}

/// A user's earnings.
#[derive(ToSchema)]
#[schema(example = json!({"user_id": 7, "total": "1530.00", "count": 12,
    "by_level": {"1": "1400.00", "2": "130.00"},
    "by_referral": [{"source_user_id": 42, "name": "Ravi", "level": 1, "total": "100.00", "count": 1}],
    "recent": [{"earning_id": 9812, "seq": 17, "earner_id": 7, "source_user_id": 42,
        "purchase_id": "ord-2026-000123", "level": 1, "rate": "0.05", "amount": "100.00",
        "currency": "INR", "totals": {"total": "1530.00", "level_1": "1400.00", "level_2": "130.00"},
        "created_at": "2026-11-20T10:00:00.123Z"}]}))]
#[allow(dead_code)]
pub struct EarningsReport {
    user_id: i64,
    total: Money,
    /// How many earnings.
    count: i64,
    /// Total per level, every configured level listed (`"1"`, `"2"`, …), zero included.
    by_level: BTreeMap<String, Money>,
    /// The 100 largest sources: per buyer and level, largest first.
    by_referral: Vec<store::ReferralEarnings>,
    /// The 20 latest earning events, newest first.
    recent: Vec<EarningEvent>,
}

/// A user's downline, two levels deep.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Referrals {
    user_id: i64,
    /// Direct referrals, by id.
    level_1: Vec<store::Referral>,
    /// Their referrals, by id.
    level_2: Vec<store::Referral>,
}

/// `202` of `POST /api/purchases`.
#[derive(ToSchema)]
#[schema(example = json!({"purchase_id": "ord-2026-000123", "status": "accepted"}))]
#[allow(dead_code)]
pub struct PurchaseAccepted {
    purchase_id: String,
    #[schema(inline)]
    status: Accepted,
}

#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum Accepted {
    Accepted,
}

/// What a worker recorded for a purchase.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PurchaseStatus {
    purchase_id: String,
    /// `conflict` once the id was received again with different content.
    status: PurchaseState,
    /// What the first message came to.
    original_status: OriginalState,
    /// Why it was rejected: the field first (`"currency: must be INR, found \"USD\""`).
    reason: Option<String>,
    buyer_id: Option<i64>,
    amount: Option<Money>,
    currency: Option<String>,
    profit: Option<Money>,
    #[schema(format = DateTime)]
    occurred_at: Option<String>,
    #[schema(format = DateTime)]
    processed_at: String,
    /// Every configured level, level 1 first (empty for a rejected purchase).
    levels: Vec<PurchaseLevel>,
    /// Later bodies that reused the id with other content (at most 100); they pay nothing.
    conflicts: Vec<PurchaseConflict>,
}

#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum PurchaseState {
    Processed,
    Rejected,
    Conflict,
}

#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum OriginalState {
    Processed,
    Rejected,
}

/// One level's outcome of a purchase.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PurchaseLevel {
    #[schema(minimum = 1)]
    level: i16,
    /// The upline member at this level; null when there is none.
    earner_id: Option<i64>,
    outcome: LevelOutcome,
    /// The configured rate, `"0.05"`.
    rate: String,
    /// Credited rupees (`"0.00"` unless `paid` or `capped`).
    amount: Money,
    /// The earning, when one was credited.
    earning_id: Option<i64>,
}

/// `paid`; `capped` (paid up to the level's cap); `below_threshold` (purchase at or under the
/// threshold, or a commission under one paisa); `inactive` (the earner is deactivated);
/// `cap_reached`; `no_referrer`.
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum LevelOutcome {
    Paid,
    Capped,
    BelowThreshold,
    Inactive,
    CapReached,
    NoReferrer,
}

/// A later message under the same purchase id with different content.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PurchaseConflict {
    #[schema(format = DateTime)]
    received_at: String,
    /// The message body as received.
    body: Object,
}

/// Any JSON object.
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
pub struct Object(BTreeMap<String, Value>);

/// An earning event (SPEC §4): one per credited commission, published at least once to
/// exchange `upline.earnings` (topic) with routing key `earning.<level>.<earner_id>`, streamed
/// by the notifier, and listed in `recent` of the earnings report.
#[derive(ToSchema)]
#[schema(example = json!({"earning_id": 9812, "seq": 17, "earner_id": 7, "source_user_id": 42,
    "purchase_id": "ord-2026-000123", "level": 1, "rate": "0.05", "amount": "100.00",
    "currency": "INR", "totals": {"total": "1530.00", "level_1": "1400.00", "level_2": "130.00"},
    "created_at": "2026-11-20T10:00:00.123Z"}))]
#[allow(dead_code)]
pub struct EarningEvent {
    earning_id: i64,
    /// The earner's earning count: 1, 2, 3 … without gaps, in commit order.
    #[schema(minimum = 1)]
    seq: i64,
    earner_id: i64,
    /// The buyer.
    source_user_id: i64,
    purchase_id: String,
    /// 1 = the buyer's direct referrer.
    #[schema(minimum = 1)]
    level: i16,
    /// As a decimal string, `"0.05"`.
    #[schema(example = "0.05")]
    rate: String,
    /// Credited rupees.
    amount: Money,
    #[schema(example = "INR")]
    currency: String,
    totals: Totals,
    #[schema(format = DateTime)]
    created_at: String,
}

/// The earner's totals including this earning: `total` and `level_1`, `level_2`, … for every
/// configured level.
#[derive(ToSchema)]
#[schema(example = json!({"total": "1530.00", "level_1": "1400.00", "level_2": "130.00"}))]
#[allow(dead_code)]
pub struct Totals {
    total: Money,
    #[serde(flatten)]
    levels: BTreeMap<String, Money>,
}

/// `GET /healthz`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Health {
    #[schema(example = "ok")]
    status: String,
}

/// `GET /readyz`.
#[derive(ToSchema)]
#[schema(example = json!({"status": "ready", "database": "up", "broker": "up"}))]
#[allow(dead_code)]
pub struct Readiness {
    #[schema(inline)]
    status: ReadyState,
    #[schema(inline)]
    database: UpDown,
    #[schema(inline)]
    broker: UpDown,
}

#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum ReadyState {
    Ready,
    NotReady,
}

#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum UpDown {
    Up,
    Down,
}

/// `GET /dashboard/config.json`: where the dashboard page finds the notifier.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct DashboardConfig {
    /// The notifier's WebSocket URL as a browser reaches it (`api.notifier_public_url`), or
    /// null: then `ws(s)://<the page's host>:<notifier_port>/ws`.
    notifier_ws_url: Option<String>,
    notifier_port: u16,
}

// ---------------------------------------------------------------------------------------------
// Path items for routes not defined by a handler of this crate

#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    summary = "Liveness",
    tag = "operations",
    responses((status = 200, description = "The process is alive", body = Health)),
    security(()),
)]
#[allow(dead_code)]
fn healthz() {}

#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    summary = "Readiness",
    tag = "operations",
    responses(
        (status = 200, description = "Ready: PostgreSQL answers and RabbitMQ is connected", body = Readiness),
        (status = 503, description = "Not ready: see which dependency is `down`", body = Readiness),
    ),
    security(()),
)]
#[allow(dead_code)]
fn readyz() {}

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    summary = "Prometheus metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus metrics (text exposition format)", body = String,
        content_type = "text/plain")),
    security(()),
)]
#[allow(dead_code)]
fn metrics() {}

#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    summary = "This OpenAPI description",
    tag = "documentation",
    responses((status = 200, description = "This OpenAPI description", body = Object)),
    security(()),
)]
#[allow(dead_code)]
fn openapi_json() {}

#[utoipa::path(
    get,
    path = "/docs",
    operation_id = "docs_redirect",
    summary = "Interactive docs (redirect)",
    tag = "documentation",
    responses((status = 303, description = "Redirects to `/docs/`",
        headers(("Location" = String, description = "`/docs/`")))),
    security(()),
)]
#[allow(dead_code)]
fn docs_redirect() {}

#[utoipa::path(
    get,
    path = "/docs/",
    operation_id = "docs",
    summary = "Interactive docs (Swagger UI)",
    tag = "documentation",
    responses((status = 200, description = "Swagger UI for this description", body = String,
        content_type = "text/html")),
    security(()),
)]
#[allow(dead_code)]
fn docs_page() {}

#[utoipa::path(
    get,
    path = "/docs/{file}",
    operation_id = "docs_asset",
    summary = "Swagger UI files",
    tag = "documentation",
    params(("file" = String, Path, description = "A Swagger UI file, e.g. `swagger-ui.css`, `swagger-ui-bundle.js`")),
    responses(
        (status = 200, description = "The file (JavaScript, CSS, HTML or an image), compiled into the binary", body = String,
            content_type = "application/octet-stream"),
        (status = 404, description = "No such file (empty body)"),
    ),
    security(()),
)]
#[allow(dead_code)]
fn docs_asset() {}

#[utoipa::path(
    get,
    path = "/",
    operation_id = "dashboard",
    summary = "The dashboard page",
    tag = "dashboard",
    params(("If-None-Match" = Option<String>, Header, description = "An `ETag` from an earlier answer")),
    responses(
        (status = 200, description = "The dashboard page; it signs in with a token or key and follows earnings live",
            body = String, content_type = "text/html", headers(("ETag" = String))),
        (status = 304, description = "Not modified"),
    ),
    security(()),
)]
#[allow(dead_code)]
fn dashboard_page() {}

#[utoipa::path(
    get,
    path = "/assets/{path}",
    operation_id = "dashboard_asset",
    summary = "The dashboard's files",
    tag = "dashboard",
    params(
        ("path" = String, Path, description = "A file of the page, e.g. `app.js`, `app.css`, `vendor/chart.umd.min.js`"),
        ("If-None-Match" = Option<String>, Header, description = "An `ETag` from an earlier answer"),
    ),
    responses(
        (status = 200, description = "The file, compiled into the binary", body = String,
            content_type = "application/octet-stream", headers(("ETag" = String))),
        (status = 304, description = "Not modified"),
        (status = 404, description = "`not_found`: no such file", body = Problem, content_type = "application/problem+json"),
    ),
    security(()),
)]
#[allow(dead_code)]
fn dashboard_asset() {}

#[utoipa::path(
    get,
    path = "/dashboard/config.json",
    operation_id = "dashboard_config",
    summary = "The dashboard's configuration",
    tag = "dashboard",
    responses((status = 200, description = "Where the page finds the notifier", body = DashboardConfig)),
    security(()),
)]
#[allow(dead_code)]
fn dashboard_config() {}

// ---------------------------------------------------------------------------------------------
// Post-processing

/// The security schemes (`user_token`, `admin_key`, `producer_key`), each operation's
/// "who may call" line and `x-upline-auth` extension, and the problem responses narrowed to
/// the codes each lists, with an example of each.
pub struct Documented;

/// The security schemes, and how the "who may call" line names them.
const SCHEMES: &[(&str, &str, &str)] = &[
    (
        "user_token",
        "the user's own token",
        "The signed per-user token returned at registration (`token`) or by \
         `POST /api/users/{id}/token`. It opens only its own user's resources.",
    ),
    (
        "admin_key",
        "admin key",
        "The admin key (`auth.admin_token` in the configuration). Allowed everywhere.",
    ),
    (
        "producer_key",
        "producer key",
        "The purchase producers' key (`auth.producer_token` in the configuration): \
         purchase intake and status.",
    ),
];

impl Modify for Documented {
    fn modify(&self, openapi: &mut OpenApiDoc) {
        openapi.info.description = Some(DESCRIPTION.to_owned());
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, _, description) in SCHEMES {
            let mut http = HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(*description));
            if *name == "user_token" {
                http = http.bearer_format("JWT");
            }
            components.add_security_scheme(*name, SecurityScheme::Http(http.build()));
        }
        let samples = samples();
        for item in openapi.paths.paths.values_mut() {
            for (_, operation) in operations_mut(item) {
                describe_access(operation);
                for (status, response) in operation.responses.responses.iter_mut() {
                    if let RefOr::T(response) = response {
                        narrow_problem(status, response, &samples);
                    }
                }
            }
        }
    }
}

/// Every operation of a path item, with its method.
fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = (&'static str, &mut Operation)> {
    [
        ("get", &mut item.get),
        ("put", &mut item.put),
        ("post", &mut item.post),
        ("delete", &mut item.delete),
        ("options", &mut item.options),
        ("head", &mut item.head),
        ("patch", &mut item.patch),
        ("trace", &mut item.trace),
    ]
    .into_iter()
    .filter_map(|(method, op)| op.as_mut().map(|op| (method, op)))
}

/// Who may call `operation`: from its security requirements, as a description line and the
/// `x-upline-auth` extension (`["anyone"]` or the scheme names).
fn describe_access(operation: &mut Operation) {
    let requirements: Vec<Value> = operation
        .security
        .iter()
        .flatten()
        .filter_map(|r| serde_json::to_value(r).ok())
        .collect();
    let mut who: Vec<&str> = Vec::new();
    let mut words: Vec<&str> = Vec::new();
    for requirement in &requirements {
        let names: Vec<&String> = requirement
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        if names.is_empty() {
            who.push("anyone");
            words.push("anyone, no credentials needed");
        }
        for (name, word, _) in SCHEMES {
            if names.iter().any(|n| n.as_str() == *name) {
                who.push(name);
                words.push(word);
            }
        }
    }
    let line = format!("**Who may call:** {}.", words.join(", or "));
    operation.description = Some(match operation.description.take() {
        Some(d) if !d.is_empty() => format!("{line}\n\n{d}"),
        _ => line,
    });
    operation
        .extensions
        .get_or_insert_with(Default::default)
        .insert("x-upline-auth".to_owned(), json!(who));
}

/// A problem response: its schema narrowed to the codes its description names, one example
/// per code.
fn narrow_problem(status: &str, response: &mut utoipa::openapi::Response, samples: &[ApiError]) {
    let Some(content) = response.content.get_mut("application/problem+json") else {
        return;
    };
    let codes = codes_in(&response.description);
    if codes.is_empty() {
        return;
    }
    let status: u16 = status.parse().unwrap_or_default();
    let narrowed = ObjectBuilder::new()
        .property(
            "code",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(codes.clone())),
        )
        .property(
            "status",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .enum_values(Some([status])),
        );
    content.schema = Some(
        AllOfBuilder::new()
            .item(Ref::from_schema_name("Problem"))
            .item(narrowed)
            .into(),
    );
    for code in codes {
        if let Some(e) = samples.iter().find(|e| e.status_and_code().1 == code) {
            let example = ExampleBuilder::new()
                .summary(code)
                .value(Some(problem_body(e)))
                .build();
            content.examples.insert(code.to_owned(), RefOr::T(example));
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::response::IntoResponse;

    use super::*;

    fn doc() -> Value {
        serde_json::to_value(ApiDoc::openapi()).expect("serialises")
    }

    #[tokio::test]
    async fn examples_are_what_the_errors_really_send() {
        for e in samples() {
            if matches!(e, ApiError::Internal(_)) {
                continue; // would log; its body is checked by hand below
            }
            let expected = problem_body(&e);
            let response = e.into_response();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("body");
            let actual: Value = serde_json::from_slice(&bytes).expect("json");
            assert_eq!(actual, expected);
        }
        let internal = problem_body(&ApiError::Internal(anyhow::anyhow!("secret")));
        assert_eq!(internal["code"], "internal_error");
        assert!(!internal["detail"].as_str().unwrap().contains("secret"));
    }

    #[test]
    fn the_code_enum_is_exactly_the_codes_of_api_error() {
        let doc = doc();
        let mut listed: Vec<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .expect("enum")
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let mut real: Vec<&str> = samples().iter().map(|e| e.status_and_code().1).collect();
        listed.sort_unstable();
        real.sort_unstable();
        assert_eq!(listed, real);
    }

    #[test]
    fn every_documented_problem_names_real_codes_of_its_status() {
        let doc = doc();
        let samples = samples();
        let mut checked = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let secured = op["x-upline-auth"] != json!(["anyone"]);
                let responses = op["responses"].as_object().unwrap();
                if secured {
                    assert!(responses.contains_key("401"), "{method} {path}: no 401");
                    assert!(responses.contains_key("403"), "{method} {path}: no 403");
                }
                for (status, response) in responses {
                    let Some(content) = response["content"].get("application/problem+json") else {
                        continue;
                    };
                    let description = response["description"].as_str().unwrap();
                    let codes = codes_in(description);
                    assert!(!codes.is_empty(), "{method} {path} {status}: no code named");
                    for code in codes {
                        let e = samples
                            .iter()
                            .find(|e| e.status_and_code().1 == code)
                            .unwrap();
                        assert_eq!(
                            e.status_and_code().0.as_str(),
                            status,
                            "{method} {path}: `{code}` listed under the wrong status"
                        );
                        assert!(content["examples"].get(code).is_some());
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 50, "only {checked} codes documented");
    }
}
