//! The OpenAPI description of the api (SPEC §6), served by [`crate::routes::docs`] at
//! `GET /openapi.json`, with Swagger UI at `GET /docs`.
//!
//! An assembly of what the handlers and types declare: the `#[utoipa::path]` of each handler,
//! the request and reply types of [`crate::model`], the shared error sets of
//! [`crate::responses`]. [`Documented`] adds the prose of `description.md`, the security
//! schemes and a "who may call" line to every operation, narrows each problem response to the
//! `code`s its description names (with an example of each, rendered from the real
//! [`crate::error::ApiError`]), and states that `referrer_id` and `referral_code` exclude each
//! other.

use std::sync::LazyLock;

use upline_common::events::{EarningEvent, Totals};
use upline_common::http::Problem;
use upline_common::purchase::PurchaseMessage;
use utoipa::openapi::OpenApi as OpenApiDoc;
use utoipa::OpenApi;

use crate::error::ErrorCode;
use crate::routes::{
    dashboard, docs, history, payouts, purchases, refunds, reports, users, webhooks,
};

mod document;

pub use document::Documented;
/// The real [`upline_common::Money`], under the path `store.rs` names in its
/// `#[schema(value_type = …)]` attributes.
pub use upline_common::Money;

/// The description, assembled once.
pub fn document() -> &'static OpenApiDoc {
    static DOC: LazyLock<OpenApiDoc> = LazyLock::new(ApiDoc::openapi);
    &DOC
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
        refunds::create,
        refunds::get,
        payouts::create,
        payouts::list,
        payouts::get,
        payouts::get_csv,
        payouts::mark_paid,
        history::history,
        webhooks::create,
        webhooks::list,
        webhooks::get,
        webhooks::delete,
        webhooks::rotate_secret,
        webhooks::enable,
        webhooks::deliveries,
        webhooks::replay,
        upline_common::http::healthz,
        upline_common::http::readyz,
        upline_common::http::metrics,
        docs::openapi_json,
        docs::docs_redirect,
        docs::docs_page,
        docs::docs_asset,
        dashboard::index,
        dashboard::asset,
        dashboard::config,
    ),
    components(schemas(Problem, ErrorCode, PurchaseMessage, EarningEvent, Totals, Money)),
    modifiers(&Documented),
    tags(
        (name = "users", description = "Registration, the referral tree, activation and tokens"),
        (name = "purchases", description = "Purchase intake (published to RabbitMQ) and what the workers made of it"),
        (name = "reports", description = "Earnings, downlines and the leaderboard"),
        (name = "payouts", description = "Payout batches of approved earnings, their CSV export, and marking them paid (contract §10)"),
        (name = "webhooks", description = "Signed webhooks (Standard Webhooks): endpoints, their secrets, deliveries and replays (contract §11)"),
        (name = "operations", description = "Liveness, readiness and metrics (every service serves them)"),
        (name = "documentation", description = "This description and its interactive viewer"),
        (name = "dashboard", description = "The browser dashboard (static page and its configuration)"),
    )
)]
pub struct ApiDoc;
