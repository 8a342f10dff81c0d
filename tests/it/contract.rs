//! The api keeps the contract it publishes: live replies of a running api, success and error
//! alike, are validated against the schemas of `/openapi.json` (status documented, content
//! type documented, body valid); then schemathesis generates requests from the same document
//! and checks the answers (no 5xx, documented statuses, content types and schemas).

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{TestApp, ADMIN, PRODUCER};

/// The published document, and the replies checked against it.
struct Contract {
    doc: Value,
    checked: usize,
}

impl Contract {
    async fn load(app: &TestApp) -> Contract {
        let doc: Value = app
            .http
            .get(app.url("/openapi.json"))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("the document is JSON");
        Contract { doc, checked: 0 }
    }

    /// Sends `request`, checks the reply against operation `method path` of the document, and
    /// returns its status and JSON body (`Null` when it has none).
    async fn call(
        &mut self,
        method: &str,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> (u16, Value) {
        let r = request.send().await.expect("request");
        let status = r.status().as_u16();
        let media = r
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_owned());
        let bytes = r.bytes().await.expect("body");
        let at = format!("{method} {path} → {status}");
        let operation = &self.doc["paths"][path][method];
        assert!(operation.is_object(), "{method} {path} is not documented");
        let response = &operation["responses"][status.to_string()];
        assert!(response.is_object(), "{at}: status not documented");
        let Some(media) = media.filter(|_| !bytes.is_empty()) else {
            assert!(
                response.get("content").is_none() || bytes.is_empty(),
                "{at}: body without a content type"
            );
            self.checked += 1;
            return (status, Value::Null);
        };
        let schema = &response["content"][&media]["schema"];
        assert!(
            schema.is_object(),
            "{at}: content type {media} not documented"
        );
        let body: Value = if media == "application/json" || media.ends_with("+json") {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{at}: body is not JSON ({e})"))
        } else {
            // Text (HTML, Prometheus metrics): its schema is a string.
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        };
        self.validate(&at, schema, &body);
        self.checked += 1;
        (status, body)
    }

    /// Validates `body` against `schema`, whose `$ref`s point into the document's components.
    fn validate(&self, at: &str, schema: &Value, body: &Value) {
        let mut root = schema.clone();
        let object = root.as_object_mut().expect("schema object");
        object.insert("components".into(), self.doc["components"].clone());
        object.insert(
            "$schema".into(),
            json!("https://json-schema.org/draft/2020-12/schema"),
        );
        let validator = jsonschema::validator_for(&root)
            .unwrap_or_else(|e| panic!("{at}: the schema does not compile: {e}"));
        let errors: Vec<String> = validator
            .iter_errors(body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{at}: {body}\n{}", errors.join("\n"));
    }
}

#[tokio::test]
async fn every_reply_matches_the_openapi_document() {
    let app = TestApp::spawn().await;
    let mut c = Contract::load(&app).await;
    let h = &app.http;
    let url = |p: &str| app.url(p);

    // Registration: 201, 400, 409, 422, 403 admin_only, 404 referrer_not_found.
    let (status, ravi) = c
        .call(
            "post",
            "/api/users",
            h.post(url("/api/users"))
                .json(&json!({"name": "Ravi", "email": "ravi@example.com"})),
        )
        .await;
    assert_eq!(status, 201);
    let ravi_id = ravi["id"].as_i64().expect("id");
    let ravi_token = ravi["token"].as_str().expect("token").to_owned();
    let code = ravi["referral_code"].as_str().expect("code").to_owned();
    let (status, asha) = c
        .call(
            "post",
            "/api/users",
            h.post(url("/api/users"))
                .json(&json!({"name": "Asha", "email": "asha@example.com", "referral_code": code})),
        )
        .await;
    assert_eq!(status, 201);
    let asha_id = asha["id"].as_i64().expect("id");
    let asha_token = asha["token"].as_str().expect("token").to_owned();
    for (body, expected) in [
        (json!({"name": "X", "email": "ravi@example.com"}), 409),
        (json!({"name": "", "email": "x@example.com"}), 422),
        (
            json!({"name": "X", "email": "x@example.com", "referrer_id": ravi_id}),
            403,
        ),
        (
            json!({"name": "X", "email": "x@example.com", "referral_code": "NOSUCH99"}),
            404,
        ),
    ] {
        let (status, _) = c
            .call("post", "/api/users", h.post(url("/api/users")).json(&body))
            .await;
        assert_eq!(status, expected, "{body}");
    }
    let (status, _) = c
        .call(
            "post",
            "/api/users",
            h.post(url("/api/users"))
                .header("content-type", "application/json")
                .body("{nope"),
        )
        .await;
    assert_eq!(status, 400);

    // Users, me, tokens.
    for (token, expected) in [(ADMIN, 200), ("wrong", 403)] {
        let (status, _) = c
            .call(
                "get",
                "/api/users",
                h.get(url("/api/users?limit=1")).bearer_auth(token),
            )
            .await;
        assert_eq!(status, expected);
    }
    let (status, _) = c.call("get", "/api/users", h.get(url("/api/users"))).await;
    assert_eq!(status, 401);
    let (status, _) = c
        .call(
            "get",
            "/api/users",
            h.get(url("/api/users?limit=0")).bearer_auth(ADMIN),
        )
        .await;
    assert_eq!(status, 422);
    for token in [ADMIN, PRODUCER, asha_token.as_str()] {
        let (status, _) = c
            .call("get", "/api/me", h.get(url("/api/me")).bearer_auth(token))
            .await;
        assert_eq!(status, 200);
    }
    let user = |id: i64| format!("/api/users/{id}");
    for (id, token, expected) in [
        (asha_id, asha_token.as_str(), 200),
        (ravi_id, asha_token.as_str(), 403),
        (999_999, ADMIN, 404),
    ] {
        let (status, _) = c
            .call(
                "get",
                "/api/users/{id}",
                h.get(url(&user(id))).bearer_auth(token),
            )
            .await;
        assert_eq!(status, expected);
    }
    let (status, _) = c
        .call(
            "post",
            "/api/users/{id}/token",
            h.post(url(&format!("{}/token", user(asha_id))))
                .bearer_auth(&asha_token),
        )
        .await;
    assert_eq!(status, 200);
    for (body, expected) in [
        (json!({"show_on_leaderboard": false}), 200),
        (json!({"show_on_leaderboard": "no"}), 422),
        (json!({}), 422),
    ] {
        let (status, _) = c
            .call(
                "patch",
                "/api/users/{id}",
                h.patch(url(&user(asha_id)))
                    .bearer_auth(&asha_token)
                    .json(&body),
            )
            .await;
        assert_eq!(status, expected, "{body}");
    }

    // Referrers: 409 already referred, 422 self-referral, 200.
    let (status, kiran) = c
        .call(
            "post",
            "/api/users",
            h.post(url("/api/users"))
                .json(&json!({"name": "Kiran", "email": "kiran@example.com"})),
        )
        .await;
    assert_eq!(status, 201);
    let kiran_id = kiran["id"].as_i64().expect("id");
    let (status, problem) = c
        .call(
            "put",
            "/api/users/{id}/referrer",
            h.put(url(&format!("{}/referrer", user(kiran_id))))
                .bearer_auth(kiran["token"].as_str().expect("token"))
                .json(&json!({"referrer_id": asha_id})),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (403, Some("admin_only"))
    );
    for (id, body, expected) in [
        (asha_id, json!({"referrer_id": kiran_id}), 409),
        (kiran_id, json!({"referrer_id": kiran_id}), 422),
        (kiran_id, json!({}), 422),
        (kiran_id, json!({"referrer_id": asha_id}), 200),
    ] {
        let (status, _) = c
            .call(
                "put",
                "/api/users/{id}/referrer",
                h.put(url(&format!("{}/referrer", user(id))))
                    .bearer_auth(ADMIN)
                    .json(&body),
            )
            .await;
        assert_eq!(status, expected, "{id} {body}");
    }

    // Purchases: 202, 422 (field, unknown buyer, no key), 200 once processed, 404.
    let (status, _) = c
        .call(
            "post",
            "/api/purchases",
            h.post(url("/api/purchases")).bearer_auth(PRODUCER).json(
                &json!({"purchase_id": "contract-1", "buyer_id": kiran_id, "amount": "2000.00"}),
            ),
        )
        .await;
    assert_eq!(status, 202);
    for body in [
        json!({"purchase_id": "contract-2", "buyer_id": kiran_id, "amount": "-1"}),
        json!({"purchase_id": "contract-3", "buyer_id": 999_999, "amount": "5"}),
        json!({"buyer_id": kiran_id, "amount": "5"}),
    ] {
        let (status, _) = c
            .call(
                "post",
                "/api/purchases",
                h.post(url("/api/purchases")).bearer_auth(ADMIN).json(&body),
            )
            .await;
        assert_eq!(status, 422, "{body}");
    }
    let (status, _) = c
        .call(
            "post",
            "/api/purchases",
            h.post(url("/api/purchases"))
                .bearer_auth(&asha_token)
                .json(&json!({"purchase_id": "contract-4", "buyer_id": kiran_id, "amount": "5"})),
        )
        .await;
    assert_eq!(status, 403);
    app.wait_processed("contract-1").await;
    // The same id with other content: the report lists the conflict.
    app.publish_raw(
        json!({"purchase_id": "contract-1", "buyer_id": kiran_id, "amount": "1.00"})
            .to_string()
            .as_bytes(),
    )
    .await;
    let report = loop {
        let (status, report) = c
            .call(
                "get",
                "/api/purchases/{purchase_id}",
                h.get(url("/api/purchases/contract-1"))
                    .bearer_auth(PRODUCER),
            )
            .await;
        assert_eq!(status, 200);
        if report["status"] == "conflict" {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(report["levels"][0]["outcome"], "paid");
    app.publish_raw(br#"{"purchase_id":"contract-rejected","buyer_id":"x","amount":"5"}"#)
        .await;
    app.wait_processed("contract-rejected").await;
    let (status, report) = c
        .call(
            "get",
            "/api/purchases/{purchase_id}",
            h.get(url("/api/purchases/contract-rejected"))
                .bearer_auth(ADMIN),
        )
        .await;
    assert_eq!((status, report["status"].as_str()), (200, Some("rejected")));
    let (status, _) = c
        .call(
            "get",
            "/api/purchases/{purchase_id}",
            h.get(url("/api/purchases/never-sent")).bearer_auth(ADMIN),
        )
        .await;
    assert_eq!(status, 404);

    // Reports.
    for (path, template) in [
        (
            format!("{}/earnings", user(asha_id)),
            "/api/users/{id}/earnings",
        ),
        (
            format!("{}/referrals", user(ravi_id)),
            "/api/users/{id}/referrals",
        ),
    ] {
        let (status, body) = c
            .call("get", template, h.get(url(&path)).bearer_auth(ADMIN))
            .await;
        assert_eq!(status, 200);
        assert!(body["user_id"].is_i64());
    }
    let (_, earnings) = c
        .call(
            "get",
            "/api/users/{id}/earnings",
            h.get(url(&format!("{}/earnings", user(asha_id))))
                .bearer_auth(&asha_token),
        )
        .await;
    assert_eq!(earnings["recent"][0]["totals"]["level_1"], "100.00");
    for (query, expected) in [("", 200), ("?limit=0", 422)] {
        let (status, _) = c
            .call(
                "get",
                "/api/leaderboard",
                h.get(url(&format!("/api/leaderboard{query}"))),
            )
            .await;
        assert_eq!(status, expected);
    }

    // Activation, release, revocation, erasure.
    for action in ["deactivate", "reactivate"] {
        let (status, _) = c
            .call(
                "post",
                &format!("/api/users/{{id}}/{action}"),
                h.post(url(&format!("{}/{action}", user(kiran_id))))
                    .bearer_auth(ADMIN),
            )
            .await;
        assert_eq!(status, 200);
    }
    let (status, _) = c
        .call(
            "delete",
            "/api/users/{id}/referrals/{referral_id}",
            h.delete(url(&format!("{}/referrals/{kiran_id}", user(asha_id))))
                .bearer_auth(&asha_token),
        )
        .await;
    assert_eq!(
        status, 409,
        "Kiran's purchase paid Asha: only an admin may release it"
    );
    let (status, _) = c
        .call(
            "delete",
            "/api/users/{id}/tokens",
            h.delete(url(&format!("{}/tokens", user(ravi_id))))
                .bearer_auth(&ravi_token),
        )
        .await;
    assert_eq!(status, 204);
    let (status, _) = c
        .call(
            "post",
            "/api/users/{id}/token",
            h.post(url(&format!("{}/token", user(ravi_id))))
                .bearer_auth(&ravi_token),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = c
        .call(
            "delete",
            "/api/users/{id}",
            h.delete(url(&user(ravi_id))).bearer_auth(ADMIN),
        )
        .await;
    assert_eq!(status, 204);

    // Operations, documentation and the dashboard.
    for (path, expected) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/metrics", 200),
        ("/openapi.json", 200),
        ("/docs/", 200),
        ("/dashboard/config.json", 200),
        ("/", 200),
    ] {
        let (status, _) = c.call("get", path, h.get(url(path))).await;
        assert_eq!(status, expected, "{path}");
    }
    let (status, _) = c
        .call("get", "/assets/{path}", h.get(url("/assets/nope.js")))
        .await;
    assert_eq!(status, 404);
    let (status, _) = c
        .call("get", "/docs/{file}", h.get(url("/docs/nope.js")))
        .await;
    assert_eq!(status, 404);
    assert!(c.checked >= 50, "only {} replies checked", c.checked);
    app.stop().await;
}

/// Where `scripts/test` installs schemathesis.
const SCHEMATHESIS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/venv/bin/schemathesis");

#[tokio::test]
async fn schemathesis_finds_nothing_wrong() {
    let installed = std::path::Path::new(SCHEMATHESIS).exists();
    if !installed {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "schemathesis is not installed at {SCHEMATHESIS}: scripts/test installs it"
        );
        eprintln!(
            "skipped: schemathesis is not installed at {SCHEMATHESIS} (scripts/test installs it)"
        );
        return;
    }
    let app = TestApp::spawn().await;
    // Users and a purchase to find, so that generated ids sometimes hit.
    let (_, _, c) = app.chain_abc().await;
    app.purchase("st-1", c.id, "2000").await;
    app.wait_processed("st-1").await;
    let run = tokio::process::Command::new(SCHEMATHESIS)
        .args(["run", &app.url("/openapi.json")])
        .args(["--url", &app.api])
        .args(["--header", &format!("Authorization: Bearer {ADMIN}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--max-examples", "25", "--seed", "1", "--workers", "1"])
        .args(["--mode", "all", "--suppress-health-check", "all"])
        .args(["--no-color", "--request-timeout", "10"])
        .env("SCHEMATHESIS_HOOKS", "")
        // Its example cache (`.schemathesis/`) goes under target/, not into the source tree.
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/target"))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("schemathesis finishes within 4 minutes")
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    app.stop().await;
    println!("{stdout}");
    assert!(
        output.status.success(),
        "schemathesis failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
}

/// The replies of the commission lifecycle's operations (contract §10) match the document:
/// refunds, payout batches (JSON and CSV), the ledger history (JSON and CSV).
#[tokio::test]
async fn every_lifecycle_reply_matches_the_openapi_document() {
    let app = TestApp::spawn_with(crate::harness::Services::default(), |s| {
        s.commission.hold_days = "0".into();
    })
    .await;
    let mut c = Contract::load(&app).await;
    let h = &app.http;
    let url = |p: &str| app.url(p);
    let (_, b, buyer) = app.chain_abc().await;
    app.purchase("lc-1", buyer.id, "20000").await;
    app.wait_processed("lc-1").await;

    let refunds = "/api/purchases/{purchase_id}/refunds";
    for (body, token, expected) in [
        (
            json!({"refund_id": "lc-rf-1", "amount": "10"}),
            PRODUCER,
            202,
        ),
        (json!({"refund_id": "lc-rf-2", "amount": "-1"}), ADMIN, 422),
        (json!({"amount": "1"}), PRODUCER, 422),
        (json!({"refund_id": "lc-rf-3"}), b.token.as_str(), 403),
    ] {
        let (status, _) = c
            .call(
                "post",
                refunds,
                h.post(url("/api/purchases/lc-1/refunds"))
                    .bearer_auth(token)
                    .json(&body),
            )
            .await;
        assert_eq!(status, expected, "{body}");
    }
    let (status, _) = c
        .call(
            "get",
            "/api/refunds/{refund_id}",
            h.get(url("/api/refunds/lc-never")).bearer_auth(PRODUCER),
        )
        .await;
    assert_eq!(status, 404);

    let create = |key: Option<&str>, body: Value| {
        let mut r = h.post(url("/api/payouts")).bearer_auth(ADMIN).json(&body);
        if let Some(key) = key {
            r = r.header("Idempotency-Key", key);
        }
        r
    };
    let (status, batch) = c
        .call(
            "post",
            "/api/payouts",
            create(Some("lc-1"), json!({"label": "L"})),
        )
        .await;
    assert_eq!(status, 201);
    let id = batch["id"].as_i64().expect("id");
    for (key, body, expected) in [
        (Some("lc-1"), json!({"label": "L"}), 200),
        (Some("lc-1"), json!({"label": "M"}), 409),
        (None, json!({}), 422),
        (Some("lc 2"), json!({}), 422),
    ] {
        let (status, _) = c.call("post", "/api/payouts", create(key, body)).await;
        assert_eq!(status, expected);
    }
    let (status, _) = c
        .call(
            "get",
            "/api/payouts",
            h.get(url("/api/payouts?limit=1")).bearer_auth(ADMIN),
        )
        .await;
    assert_eq!(status, 200);
    for (path, expected) in [
        (format!("/api/payouts/{id}"), 200),
        ("/api/payouts/999999".into(), 404),
    ] {
        let (status, _) = c
            .call(
                "get",
                "/api/payouts/{id}",
                h.get(url(&path)).bearer_auth(ADMIN),
            )
            .await;
        assert_eq!(status, expected);
    }
    let (status, csv) = c
        .call(
            "get",
            "/api/payouts/{id}.csv",
            h.get(url(&format!("/api/payouts/{id}.csv")))
                .bearer_auth(ADMIN),
        )
        .await;
    assert_eq!(status, 200);
    assert!(csv.as_str().is_some_and(|t| t.starts_with("payout_id,")));
    let (status, _) = c
        .call(
            "get",
            "/api/payouts/{id}",
            h.get(url(&format!("/api/payouts/{id}")))
                .bearer_auth(&b.token),
        )
        .await;
    assert_eq!(status, 403);
    for (path, expected) in [
        (format!("/api/payouts/{id}/paid"), 200),
        ("/api/payouts/999999/paid".into(), 404),
    ] {
        let (status, _) = c
            .call(
                "post",
                "/api/payouts/{id}/paid",
                h.post(url(&path)).bearer_auth(ADMIN),
            )
            .await;
        assert_eq!(status, expected);
    }

    let history = "/api/users/{id}/earnings/history";
    for (query, token, expected) in [
        ("?limit=1", b.token.as_str(), 200),
        ("?format=csv", ADMIN, 200),
        ("?status=nope", ADMIN, 422),
        ("", buyer.token.as_str(), 403),
    ] {
        let (status, body) = c
            .call(
                "get",
                history,
                h.get(url(&format!("/api/users/{}/earnings/history{query}", b.id)))
                    .bearer_auth(token),
            )
            .await;
        assert_eq!(status, expected, "{query}: {body}");
    }
    assert!(c.checked >= 20, "only {} replies checked", c.checked);
    app.stop().await;
}
