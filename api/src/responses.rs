//! The error responses that many operations share, as `utoipa::IntoResponses` sets, so that
//! each `#[utoipa::path]` lists only its own. Every description names its problem `code`s in
//! backticks: the OpenAPI assembly narrows each problem schema to those codes and adds an
//! example of each, rendered from the real [`ApiError`](crate::error::ApiError).

use std::collections::BTreeMap;

use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{IntoResponses, PartialSchema};

/// `401 unauthorized`, as every operation that needs credentials answers it.
pub const UNAUTHORIZED: &str = "`unauthorized`: no `Authorization: Bearer` credentials";
/// `500 internal_error`, possible everywhere.
pub const INTERNAL: &str = "`internal_error`: logged; the detail says nothing more";
/// `429 rate_limited` after failed authentications.
pub const RATE_LIMITED: &str = "`rate_limited`: too many failed authentications from this address";

/// An `application/problem+json` response described by `description`; `retry_after` adds
/// the `Retry-After` header.
pub fn problem(description: &str, retry_after: bool) -> RefOr<Response> {
    let mut response = ResponseBuilder::new().description(description).content(
        "application/problem+json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Problem")))
            .build(),
    );
    if retry_after {
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(String::schema())
                .description(Some("Seconds to wait"))
                .build(),
        );
    }
    RefOr::T(response.build())
}

/// A set of problem responses by status.
fn set(responses: &[(u16, &str, bool)]) -> BTreeMap<String, RefOr<Response>> {
    responses
        .iter()
        .map(|(status, description, retry_after)| {
            (status.to_string(), problem(description, *retry_after))
        })
        .collect()
}

/// Operations open to the user's own token and the admin key: 401, 403 (`forbidden`,
/// `token_expired`, `token_revoked`), 429, 500.
pub struct UserOrAdminErrors;

impl IntoResponses for UserOrAdminErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        set(&[
            (401, UNAUTHORIZED, false),
            (
                403,
                "`forbidden`: neither this user's token nor the admin key; `token_expired`, `token_revoked`",
                false,
            ),
            (429, RATE_LIMITED, true),
            (500, INTERNAL, false),
        ])
    }
}

/// `PUT /api/users/{id}/referrer`: as [`UserOrAdminErrors`], and 403 `admin_only` for a
/// `referrer_id` sent without the admin key.
pub struct SetReferrerErrors;

impl IntoResponses for SetReferrerErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        set(&[
            (401, UNAUTHORIZED, false),
            (
                403,
                "`forbidden`: neither this user's token nor the admin key; `token_expired`, `token_revoked`; `admin_only`: `referrer_id` was sent without the admin key (send the referrer's `referral_code`)",
                false,
            ),
            (429, RATE_LIMITED, true),
            (500, INTERNAL, false),
        ])
    }
}

/// Admin-only operations: 401, 403 `forbidden`, 429, 500.
pub struct AdminErrors;

impl IntoResponses for AdminErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        set(&[
            (401, UNAUTHORIZED, false),
            (
                403,
                "`forbidden`: invalid credentials, or credentials that do not allow this request",
                false,
            ),
            (429, RATE_LIMITED, true),
            (500, INTERNAL, false),
        ])
    }
}

/// Operations of purchase producers and the admin: 401, 403 `forbidden`, 429, 500.
pub struct ProducerErrors;

impl IntoResponses for ProducerErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        set(&[
            (401, UNAUTHORIZED, false),
            (
                403,
                "`forbidden`: neither the producer key nor the admin key",
                false,
            ),
            (429, RATE_LIMITED, true),
            (500, INTERNAL, false),
        ])
    }
}

/// Operations open to any valid credentials: 401, 403 (`forbidden`, `token_expired`,
/// `token_revoked`), 429, 500.
pub struct AnyCallerErrors;

impl IntoResponses for AnyCallerErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        set(&[
            (401, UNAUTHORIZED, false),
            (
                403,
                "`forbidden`: credentials that are not valid (or the token's user no longer exists); `token_expired`, `token_revoked`",
                false,
            ),
            (429, RATE_LIMITED, true),
            (500, INTERNAL, false),
        ])
    }
}

/// Public operations: only 500.
pub struct PublicErrors;

impl IntoResponses for PublicErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        set(&[(500, INTERNAL, false)])
    }
}
