//! [`Documented`]: what the derive cannot say — the prose (`description.md`), the security
//! schemes, who may call each operation, the problem codes of each response, and fields that
//! exclude each other.

use serde_json::{json, Value};
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::schema::{AllOfBuilder, AnyOfBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as OpenApiDoc, Ref, RefOr};
use utoipa::Modify;

use crate::error::{ApiError, ErrorCode};

/// The description's prose: who may call what, errors, money, the queue, events, the notifier.
const DESCRIPTION: &str = include_str!("description.md");

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
        for (path, item) in openapi.paths.paths.iter_mut() {
            let resource = path.starts_with("/api/");
            for (_, operation) in operations_mut(item) {
                describe_access(operation);
                if resource {
                    describe_overload(operation);
                }
                for (status, response) in operation.responses.responses.iter_mut() {
                    if let RefOr::T(response) = response {
                        narrow_problem(status, response, &samples);
                    }
                }
            }
        }
    }
}

/// Why any `/api/` operation may answer 503 (besides its own reasons).
const UNAVAILABLE: &str = "`database_unavailable`: PostgreSQL cannot be reached; \
    `request_timeout`: no answer within `api.request_timeout_secs`; retry after `Retry-After`";

/// What every `/api/` operation may answer whatever it does: 503 when PostgreSQL is down or
/// the request outlives `api.request_timeout_secs` (the middleware `within`), and, with a
/// body, 413 past `api.max_body_bytes`. Added here once rather than to each handler's list.
fn describe_overload(operation: &mut Operation) {
    let responses = &mut operation.responses.responses;
    match responses.get_mut("503") {
        Some(RefOr::T(own)) if !own.description.contains("`request_timeout`") => {
            own.description = format!("{}; {UNAVAILABLE}", own.description);
        }
        Some(_) => {}
        None => {
            responses.insert("503".into(), crate::responses::problem(UNAVAILABLE, true));
        }
    }
    if operation.request_body.is_some() && !responses.contains_key("413") {
        responses.insert(
            "413".into(),
            crate::responses::problem(
                "`payload_too_large`: the body is larger than `api.max_body_bytes`",
                false,
            ),
        );
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
    use crate::openapi::ApiDoc;
    use utoipa::OpenApi;

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

    #[test]
    fn every_resource_documents_overload_and_bodies_their_size_limit() {
        let doc = doc();
        let paths = doc["paths"].as_object().expect("paths");
        let mut checked = 0;
        for (path, item) in paths.iter().filter(|(p, _)| p.starts_with("/api/")) {
            for (method, op) in item.as_object().expect("path item") {
                let unavailable = op["responses"]["503"]["description"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{method} {path} documents no 503"));
                assert!(
                    unavailable.contains("`database_unavailable`")
                        && unavailable.contains("`request_timeout`"),
                    "{method} {path}: {unavailable}"
                );
                assert_eq!(
                    op.get("requestBody").is_some(),
                    op["responses"].get("413").is_some(),
                    "{method} {path}: 413 exactly when there is a body"
                );
                checked += 1;
            }
        }
        assert!(checked >= 15, "only {checked} operations under /api/");
        let accept = &paths["/api/purchases"]["post"]["responses"]["503"]["description"];
        assert!(accept
            .as_str()
            .is_some_and(|d| d.contains("`broker_unavailable`")));
    }
}
