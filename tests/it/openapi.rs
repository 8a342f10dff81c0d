//! The OpenAPI description at `/openapi.json` and Swagger UI at `/docs` (SPEC §6): every route
//! of the api documented with its methods, responses and who may call it; the UI's files
//! served by the api itself.

use serde_json::Value;

use crate::harness::TestApp;

/// Every route of the api router, with its methods.
const ROUTES: &[(&str, &[&str])] = &[
    ("/api/users", &["get", "post"]),
    ("/api/me", &["get"]),
    ("/api/users/{id}", &["get", "patch", "delete"]),
    ("/api/users/{id}/referrer", &["put"]),
    ("/api/users/{id}/deactivate", &["post"]),
    ("/api/users/{id}/reactivate", &["post"]),
    ("/api/users/{id}/token", &["post"]),
    ("/api/users/{id}/tokens", &["delete"]),
    ("/api/users/{id}/referrals/{referral_id}", &["delete"]),
    ("/api/users/{id}/earnings", &["get"]),
    ("/api/users/{id}/referrals", &["get"]),
    ("/api/purchases", &["post"]),
    ("/api/purchases/{purchase_id}", &["get"]),
    ("/api/purchases/{purchase_id}/refunds", &["post"]),
    ("/api/refunds/{refund_id}", &["get"]),
    ("/api/payouts", &["get", "post"]),
    ("/api/payouts/{id}", &["get"]),
    ("/api/payouts/{id}.csv", &["get"]),
    ("/api/payouts/{id}/paid", &["post"]),
    ("/api/users/{id}/earnings/history", &["get"]),
    ("/api/leaderboard", &["get"]),
    ("/api/webhooks", &["get", "post"]),
    ("/api/webhooks/{id}", &["get", "delete"]),
    ("/api/webhooks/{id}/rotate-secret", &["post"]),
    ("/api/webhooks/{id}/enable", &["post"]),
    ("/api/webhooks/{id}/deliveries", &["get"]),
    (
        "/api/webhooks/{id}/deliveries/{delivery_id}/replay",
        &["post"],
    ),
    ("/healthz", &["get"]),
    ("/readyz", &["get"]),
    ("/metrics", &["get"]),
    ("/openapi.json", &["get"]),
    ("/docs", &["get"]),
    ("/docs/", &["get"]),
    ("/docs/{file}", &["get"]),
    ("/", &["get"]),
    ("/assets/{path}", &["get"]),
    ("/dashboard/config.json", &["get"]),
];

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Who may call what: `anyone`, or the security schemes accepted.
const ACCESS: &[(&str, &str, &[&str])] = &[
    ("post", "/api/users", &["anyone", "admin_key"]),
    ("get", "/api/users", &["admin_key"]),
    (
        "get",
        "/api/me",
        &["user_token", "admin_key", "producer_key"],
    ),
    ("get", "/api/users/{id}", &["user_token", "admin_key"]),
    (
        "put",
        "/api/users/{id}/referrer",
        &["user_token", "admin_key"],
    ),
    ("post", "/api/users/{id}/deactivate", &["admin_key"]),
    ("post", "/api/users/{id}/reactivate", &["admin_key"]),
    (
        "post",
        "/api/users/{id}/token",
        &["user_token", "admin_key"],
    ),
    (
        "delete",
        "/api/users/{id}/tokens",
        &["user_token", "admin_key"],
    ),
    ("delete", "/api/users/{id}", &["user_token", "admin_key"]),
    ("patch", "/api/users/{id}", &["user_token", "admin_key"]),
    (
        "delete",
        "/api/users/{id}/referrals/{referral_id}",
        &["user_token", "admin_key"],
    ),
    (
        "get",
        "/api/users/{id}/earnings",
        &["user_token", "admin_key"],
    ),
    (
        "get",
        "/api/users/{id}/referrals",
        &["user_token", "admin_key"],
    ),
    ("post", "/api/purchases", &["producer_key", "admin_key"]),
    (
        "get",
        "/api/purchases/{purchase_id}",
        &["producer_key", "admin_key"],
    ),
    (
        "post",
        "/api/purchases/{purchase_id}/refunds",
        &["producer_key", "admin_key"],
    ),
    (
        "get",
        "/api/refunds/{refund_id}",
        &["producer_key", "admin_key"],
    ),
    ("post", "/api/payouts", &["admin_key"]),
    ("get", "/api/payouts", &["admin_key"]),
    ("get", "/api/payouts/{id}", &["admin_key"]),
    ("get", "/api/payouts/{id}.csv", &["admin_key"]),
    ("post", "/api/payouts/{id}/paid", &["admin_key"]),
    (
        "get",
        "/api/users/{id}/earnings/history",
        &["user_token", "admin_key"],
    ),
    ("get", "/api/leaderboard", &["anyone"]),
    ("get", "/healthz", &["anyone"]),
    ("get", "/readyz", &["anyone"]),
    ("get", "/metrics", &["anyone"]),
];

async fn get(app: &TestApp, path: &str) -> reqwest::Response {
    app.http.get(app.url(path)).send().await.expect("request")
}

fn content_type(r: &reqwest::Response) -> String {
    r.headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn openapi_json_describes_every_route_with_its_responses_and_access() {
    let app = TestApp::spawn().await;
    let r = get(&app, "/openapi.json").await;
    assert_eq!(r.status(), 200);
    assert!(content_type(&r).starts_with("application/json"));
    let doc: Value = r.json().await.expect("valid JSON");
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    assert!(doc["info"]["title"].is_string());
    let description = doc["info"]["description"].as_str().expect("description");
    for mention in [
        "8081",
        "/ws",
        "/events/{user_id}",
        "upline.purchases",
        "upline.earnings",
    ] {
        assert!(description.contains(mention), "description lacks {mention}");
    }

    // Exactly the router's routes, each with exactly its methods.
    let paths = doc["paths"].as_object().expect("paths");
    for (path, methods) in ROUTES {
        let item = paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} undocumented"));
        let documented: Vec<&str> = METHODS
            .iter()
            .copied()
            .filter(|m| item.get(*m).is_some())
            .collect();
        let mut expected = methods.to_vec();
        expected.sort_by_key(|m| METHODS.iter().position(|x| x == m));
        assert_eq!(documented, expected, "{path}");
    }
    let mut extra: Vec<&String> = paths
        .keys()
        .filter(|p| !ROUTES.iter().any(|(r, _)| r == p))
        .collect();
    extra.sort();
    assert!(extra.is_empty(), "documented but not routed: {extra:?}");

    // Every operation: responses, and a security requirement or the explicit public `{}`.
    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("security schemes");
    for name in ["user_token", "admin_key", "producer_key"] {
        assert_eq!(schemes[name]["type"], "http", "{name}");
        assert_eq!(schemes[name]["scheme"], "bearer", "{name}");
    }
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let at = format!("{method} {path}");
            assert!(op["operationId"].is_string(), "{at}: no operationId");
            assert!(op["summary"].is_string(), "{at}: no summary");
            let responses = op["responses"].as_object().expect("responses");
            assert!(!responses.is_empty(), "{at}: no responses");
            let security = op["security"]
                .as_array()
                .unwrap_or_else(|| panic!("{at}: no security"));
            assert!(!security.is_empty(), "{at}: empty security");
            let public = security
                .iter()
                .any(|s| s.as_object().is_some_and(|o| o.is_empty()));
            for requirement in security {
                for name in requirement.as_object().unwrap().keys() {
                    assert!(schemes.contains_key(name), "{at}: unknown scheme {name}");
                }
            }
            let auth: Vec<&str> = op["x-upline-auth"]
                .as_array()
                .unwrap_or_else(|| panic!("{at}: no x-upline-auth"))
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(public, auth.first() == Some(&"anyone"), "{at}: {auth:?}");
            assert!(
                op["description"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("**Who may call:**")),
                "{at}"
            );
            if !public {
                assert!(responses.contains_key("401"), "{at}: no 401");
                assert!(responses.contains_key("403"), "{at}: no 403");
            }
            for (status, response) in responses {
                assert!(response["description"].is_string(), "{at} {status}");
                if let Some(problem) = response["content"].get("application/problem+json") {
                    let codes = &problem["schema"]["allOf"][1]["properties"]["code"]["enum"];
                    assert!(
                        codes.as_array().is_some_and(|c| !c.is_empty()),
                        "{at} {status}: codes not listed"
                    );
                    for code in codes.as_array().unwrap() {
                        let example = &problem["examples"][code.as_str().unwrap()]["value"];
                        assert_eq!(example["code"], *code, "{at} {status}");
                        assert_eq!(example["status"].to_string(), *status, "{at}");
                    }
                }
            }
        }
    }
    for (method, path, who) in ACCESS {
        let op = &doc["paths"][path][method];
        assert_eq!(
            op["x-upline-auth"],
            serde_json::json!(who),
            "{method} {path}"
        );
    }

    // Bodies and the error format.
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    let problem = &schemas["Problem"];
    for field in ["type", "title", "status", "detail", "code"] {
        assert!(
            problem["properties"].get(field).is_some(),
            "Problem.{field}"
        );
        assert!(
            problem["required"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == field),
            "Problem.{field} not required"
        );
    }
    assert!(problem["properties"].get("field").is_some());
    let codes = schemas["ErrorCode"]["enum"].as_array().expect("codes");
    for code in [
        "invalid_json",
        "validation_failed",
        "unknown_buyer",
        "broker_unavailable",
    ] {
        assert!(codes.iter().any(|c| c == code), "{code}");
    }
    for name in [
        "PurchaseMessage",
        "EarningEvent",
        "Totals",
        "PurchaseRequest",
        "RegisterRequest",
        "SetReferrerRequest",
        "User",
        "RegisteredUser",
        "PurchaseReport",
        "EarningsReport",
        "Referrals",
        "Leader",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    let event = &schemas["EarningEvent"]["properties"];
    for field in [
        "earning_id",
        "seq",
        "earner_id",
        "source_user_id",
        "purchase_id",
        "level",
        "rate",
        "amount",
        "currency",
        "totals",
        "created_at",
    ] {
        assert!(event.get(field).is_some(), "EarningEvent.{field}");
    }
    for (method, path) in [
        ("post", "/api/users"),
        ("put", "/api/users/{id}/referrer"),
        ("post", "/api/purchases"),
    ] {
        assert!(
            doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
                .is_object(),
            "{method} {path}: no request body"
        );
    }

    // What the description says about errors is what the api answers.
    let r = get(&app, "/api/users").await;
    assert_eq!(r.status(), 401);
    assert_eq!(content_type(&r), "application/problem+json");
    let body: Value = r.json().await.expect("json");
    let documented = &doc["paths"]["/api/users"]["get"]["responses"]["401"]["content"]
        ["application/problem+json"]["examples"]["unauthorized"]["value"];
    assert_eq!(&body, documented);
    app.stop().await;
}

#[tokio::test]
async fn docs_serve_swagger_ui_from_the_api_itself() {
    let app = TestApp::spawn().await;
    // `/docs` redirects to `/docs/` (reqwest follows it).
    let r = get(&app, "/docs").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.url().path(), "/docs/");
    assert!(
        content_type(&r).starts_with("text/html"),
        "{}",
        content_type(&r)
    );
    let html = r.text().await.expect("html");
    assert!(html.contains("swagger-ui"));

    // Every script and stylesheet the page references is served here, none from elsewhere.
    let references: Vec<String> = ["src=\"", "href=\""]
        .into_iter()
        .flat_map(|attr| html.split(attr).skip(1))
        .map(|rest| rest.split('"').next().unwrap().to_owned())
        .collect();
    let scripts: Vec<&String> = references.iter().filter(|r| r.ends_with(".js")).collect();
    let styles: Vec<&String> = references.iter().filter(|r| r.ends_with(".css")).collect();
    assert!(!scripts.is_empty() && !styles.is_empty(), "{references:?}");
    for reference in &references {
        assert!(
            !reference.contains("://") && !reference.starts_with("//"),
            "loads {reference} from another host"
        );
        let path = format!("/docs/{}", reference.trim_start_matches("./"));
        let r = get(&app, &path).await;
        assert_eq!(r.status(), 200, "{path}");
        let kind = content_type(&r);
        if path.ends_with(".js") {
            assert!(kind.contains("javascript"), "{path}: {kind}");
        } else if path.ends_with(".css") {
            assert!(kind.starts_with("text/css"), "{path}: {kind}");
        }
        assert!(
            !r.bytes().await.expect("body").is_empty(),
            "{path} is empty"
        );
    }

    // The initializer points the UI at this api's description.
    let init = get(&app, "/docs/swagger-initializer.js").await;
    assert_eq!(init.status(), 200);
    assert!(init.text().await.unwrap().contains("\"/openapi.json\""));
    app.stop().await;
}
