//! The OpenAPI description of the api (SPEC §6), served at `GET /openapi.json`, with Swagger UI
//! at `GET /docs` (its assets are compiled into the binary: nothing is fetched from elsewhere).
//!
//! An assembly of what the handlers and types declare: the `#[utoipa::path]` of each handler,
//! the request and reply types of [`crate::model`], the shared error sets of
//! [`crate::responses`]. [`Documented`] adds the security schemes and a "who may call" line to
//! every operation, narrows each problem response to the `code`s its description names (with
//! an example of each, rendered from the real [`ApiError`]), and states that `referrer_id` and
//! `referral_code` exclude each other.

use std::sync::{Arc, LazyLock};

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use upline_common::events::{EarningEvent, Totals};
use upline_common::http::Problem;
use upline_common::purchase::PurchaseMessage;
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::schema::{AllOfBuilder, AnyOfBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as OpenApiDoc, Ref, RefOr};
use utoipa::{Modify, OpenApi};

use crate::error::{ApiError, ErrorCode};
use crate::routes::{dashboard, purchases, reports, users};

/// The real [`upline_common::Money`], under the path `store.rs` names in its
/// `#[schema(value_type = …)]` attributes.
pub use upline_common::Money;

/// `GET /openapi.json` and the Swagger UI under `/docs`, for merging into the api's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(docs_redirect))
        .route("/docs/", get(docs_page))
        .route("/docs/{*file}", get(docs_asset))
}

/// The description, assembled once.
static DOC: LazyLock<OpenApiDoc> = LazyLock::new(ApiDoc::openapi);

/// Swagger UI's configuration: this api's description.
static SWAGGER: LazyLock<Arc<utoipa_swagger_ui::Config<'static>>> =
    LazyLock::new(|| Arc::new(utoipa_swagger_ui::Config::from("/openapi.json")));

#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    summary = "This OpenAPI description",
    tag = "documentation",
    responses((status = 200, description = "This OpenAPI description", body = Object)),
    security(()),
)]
/// `GET /openapi.json`: this description.
pub async fn openapi_json() -> Json<OpenApiDoc> {
    Json(DOC.clone())
}

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
/// `GET /docs`: 303 to `/docs/`.
pub async fn docs_redirect() -> Redirect {
    Redirect::to("/docs/")
}

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
/// `GET /docs/`: the Swagger UI page.
pub async fn docs_page() -> Response {
    swagger_file("index.html")
}

#[utoipa::path(
    get,
    path = "/docs/{file}",
    operation_id = "docs_asset",
    summary = "Swagger UI files",
    tag = "documentation",
    params(("file" = String, Path, description = "A Swagger UI file, e.g. `swagger-ui.css`, `swagger-ui-bundle.js`")),
    responses(
        (status = 200, description = "The file (JavaScript, CSS, HTML or an image), compiled into the binary",
            content((String = "application/javascript"), (String = "text/css"), (String = "text/html"), (String = "image/png"), (String = "application/json"))),
        (status = 404, description = "No such file (empty body)"),
    ),
    security(()),
)]
/// `GET /docs/{file}`: a file of Swagger UI; `swagger-initializer.js` points it at
/// `/openapi.json`.
pub async fn docs_asset(Path(file): Path<String>) -> Response {
    swagger_file(&file)
}

/// A Swagger UI file with its content type; 404 with an empty body when there is none.
fn swagger_file(path: &str) -> Response {
    match utoipa_swagger_ui::serve(path, SWAGGER.clone()) {
        Ok(Some(file)) => (
            [(header::CONTENT_TYPE, file.content_type)],
            file.bytes.into_owned(),
        )
            .into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => ApiError::Internal(anyhow::anyhow!("swagger ui: {e}")).into_response(),
    }
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
        upline_common::http::healthz,
        upline_common::http::readyz,
        upline_common::http::metrics,
        openapi_json,
        docs_redirect,
        docs_page,
        docs_asset,
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

/// The security schemes (`user_token`, `admin_key`, `producer_key`), each operation's
/// "who may call" line and `x-upline-auth` extension, the problem responses narrowed to the
/// codes each lists, with an example of each, and the fields that exclude each other.
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
        for name in ["RegisterRequest", "SetReferrerRequest"] {
            exclusive(components, name, "referrer_id", "referral_code");
        }
        let samples = ApiError::samples();
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
    let codes: Vec<&str> = codes.into_iter().map(ErrorCode::as_str).collect();
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
        if let Some(e) = samples
            .iter()
            .find(|e| e.status_and_code().1.as_str() == code)
        {
            let example = ExampleBuilder::new()
                .summary(code)
                .value(serde_json::to_value(e.problem()).ok())
                .build();
            content.examples.insert(code.to_owned(), RefOr::T(example));
        }
    }
}

/// The problem codes named (in backticks) in a response description.
fn codes_in(description: &str) -> Vec<ErrorCode> {
    let known: Vec<ErrorCode> = ApiError::samples()
        .iter()
        .map(|e| e.status_and_code().1)
        .collect();
    let mut codes = Vec::new();
    for word in description.split('`').skip(1).step_by(2) {
        if let Some(code) = known.iter().find(|c| c.as_str() == word) {
            if !codes.contains(code) {
                codes.push(*code);
            }
        }
    }
    codes
}

/// Says in the schema `name` that fields `a` and `b` exclude each other: at most one of them
/// is sent non-null (`allOf` the derived object and `anyOf` "a is null or absent", "b is null
/// or absent").
fn exclusive(components: &mut utoipa::openapi::Components, name: &str, a: &str, b: &str) {
    let Some(schema) = components.schemas.remove(name) else {
        return;
    };
    let null_or_absent = |field: &str| {
        ObjectBuilder::new().property(field, ObjectBuilder::new().schema_type(Type::Null))
    };
    let description = format!("Send `{a}` or `{b}`, not both.");
    let combined = AllOfBuilder::new()
        .item(schema)
        .item(
            AnyOfBuilder::new()
                .item(null_or_absent(a))
                .item(null_or_absent(b))
                .description(Some(description)),
        )
        .build();
    components
        .schemas
        .insert(name.to_owned(), RefOr::T(combined.into()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        serde_json::to_value(ApiDoc::openapi()).expect("serialises")
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
        let mut real: Vec<&str> = ApiError::samples()
            .iter()
            .map(|e| e.status_and_code().1.as_str())
            .collect();
        listed.sort_unstable();
        real.sort_unstable();
        assert_eq!(listed, real);
    }

    #[test]
    fn every_documented_problem_names_real_codes_of_its_status() {
        let doc = doc();
        let samples = ApiError::samples();
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
                            "{method} {path}: `{}` listed under the wrong status",
                            code.as_str()
                        );
                        assert!(content["examples"].get(code.as_str()).is_some());
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 50, "only {checked} codes documented");
    }

    #[test]
    fn purchase_bodies_share_their_content_and_the_queue_message_requires_its_id() {
        let doc = doc();
        let schemas = &doc["components"]["schemas"];
        for name in ["PurchaseMessage", "PurchaseRequest"] {
            assert_eq!(
                schemas[name]["allOf"][0]["$ref"], "#/components/schemas/PurchaseContent",
                "{name}"
            );
        }
        assert_eq!(
            schemas["PurchaseMessage"]["allOf"][1]["required"],
            json!(["purchase_id"])
        );
        assert!(schemas["PurchaseRequest"]["allOf"][1]["required"].is_null());
        assert_eq!(
            schemas["PurchaseContent"]["required"],
            json!(["buyer_id", "amount"])
        );
    }

    #[test]
    fn referrer_id_and_referral_code_exclude_each_other() {
        let doc = doc();
        for name in ["RegisterRequest", "SetReferrerRequest"] {
            let any_of = &doc["components"]["schemas"][name]["allOf"][1]["anyOf"];
            assert_eq!(
                any_of[0]["properties"]["referrer_id"]["type"], "null",
                "{name}"
            );
            assert_eq!(
                any_of[1]["properties"]["referral_code"]["type"], "null",
                "{name}"
            );
        }
    }
}
