//! Registration and the referral rules of SPEC §2 and §6.

use serde_json::{json, Value};

use crate::harness::{TestApp, ADMIN};

#[tokio::test]
async fn twenty_concurrent_signups_under_one_referrer_make_exactly_eight_referrals() {
    let app = TestApp::spawn().await;
    let referrer = app.register("Ravi", None).await;
    let attempts = (0..20).map(|i| {
        let (http, url, code) = (
            app.http.clone(),
            app.url("/api/users"),
            referrer.referral_code.clone(),
        );
        async move {
            let r = http
                .post(url)
                .json(&json!({"name": format!("Joiner {i}"), "email": format!("joiner{i}@example.com"), "referral_code": code}))
                .send()
                .await
                .expect("request");
            let status = r.status().as_u16();
            let body: Value = r.json().await.expect("json");
            (status, body)
        }
    });
    let results = futures_util::future::join_all(attempts).await;
    let created = results.iter().filter(|(s, _)| *s == 201).count();
    let refused: Vec<_> = results.iter().filter(|(s, _)| *s != 201).collect();
    assert_eq!(created, 8);
    assert_eq!(refused.len(), 12);
    assert!(
        refused
            .iter()
            .all(|(s, b)| *s == 409 && b["code"] == "referral_limit_reached"),
        "{refused:?}"
    );
    let count: i64 = sqlx::query_scalar("select count(*) from users where referrer_id = $1")
        .bind(referrer.id)
        .fetch_one(&app.db)
        .await
        .expect("count");
    assert_eq!(count, 8);
    app.stop().await;
}

#[tokio::test]
async fn registration_enforces_every_referral_rule_with_clear_errors() {
    let app = TestApp::spawn().await;
    let post = |body: Value| {
        let (http, url) = (app.http.clone(), app.url("/api/users"));
        async move {
            let r = http.post(url).json(&body).send().await.expect("request");
            let status = r.status().as_u16();
            let ct = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap_or("").to_owned());
            let body: Value = r.json().await.expect("json");
            (status, body, ct)
        }
    };

    let (status, asha, _) = post(json!({"name": "Asha", "email": "Asha@Example.com"})).await;
    assert_eq!(status, 201);
    assert!(asha["token"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(asha["referral_code"].as_str().map(str::len), Some(8));

    // Emails are unique, case-insensitively.
    let (status, body, ct) = post(json!({"name": "Other", "email": "asha@example.COM"})).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("email_taken")));
    assert_eq!(ct.as_deref(), Some("application/problem+json"));
    assert_eq!(body["status"], 409);
    assert!(body["type"].is_string() && body["title"].is_string() && body["detail"].is_string());

    // Validation names the field.
    let (status, body, _) = post(json!({"email": "x@example.com"})).await;
    assert_eq!((status, body["field"].as_str()), (422, Some("name")));
    let (status, body, _) = post(json!({"name": "X", "email": "not-an-email"})).await;
    assert_eq!((status, body["field"].as_str()), (422, Some("email")));
    let (status, body, _) =
        post(json!({"name": "X", "email": "x@example.com", "referrer_id": "abc"})).await;
    assert_eq!((status, body["field"].as_str()), (422, Some("referrer_id")));
    let r = app
        .http
        .post(app.url("/api/users"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 400);

    // Only the admin key may name a referrer by id (anyone else uses its referral code).
    let (status, body, _) =
        post(json!({"name": "X", "email": "x1@example.com", "referrer_id": 1})).await;
    assert_eq!(
        (status, body["code"].as_str(), body["field"].as_str()),
        (403, Some("admin_only"), Some("referrer_id"))
    );

    // The referrer must exist and be active.
    let r = app
        .http
        .post(app.url("/api/users"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "X", "email": "x1@example.com", "referrer_id": 999_999}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "referrer_not_found"
    );
    let (status, body, _) =
        post(json!({"name": "X", "email": "x2@example.com", "referral_code": "NOSUCH99"})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("referrer_not_found"))
    );
    let asha_id = asha["id"].as_i64().expect("id");
    app.deactivate(asha_id).await;
    let (status, body, _) = post(
        json!({"name": "X", "email": "x3@example.com", "referral_code": asha["referral_code"]}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("referrer_inactive"))
    );
    let r = app
        .http
        .post(app.url(&format!("/api/users/{asha_id}/reactivate")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("request");
    assert_eq!(r.json::<Value>().await.expect("json")["is_active"], true);

    // Active again, the referral code works.
    let (status, body, _) = post(json!({"name": "Bala", "email": "bala@example.com", "referral_code": asha["referral_code"]})).await;
    assert_eq!(status, 201);
    assert_eq!(body["referrer_id"].as_i64(), Some(asha_id));
    app.stop().await;
}

#[tokio::test]
async fn a_referrer_is_set_once_without_self_referral_or_cycles() {
    let app = TestApp::spawn().await;
    let a = app.register("Asha", None).await;
    let b = app.register("Bala", Some(a.id)).await;
    let c = app.register("Chitra", Some(b.id)).await;
    let d = app.register("Dev", None).await;
    let put = |user: i64, token: String, body: Value| {
        let (http, url) = (
            app.http.clone(),
            app.url(&format!("/api/users/{user}/referrer")),
        );
        async move {
            let r = http
                .put(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .expect("request");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("json"))
        }
    };
    // C already has a referrer.
    let (status, body) = put(
        c.id,
        c.token.clone(),
        json!({"referral_code": d.referral_code}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("already_referred"))
    );
    // A cannot refer themself, nor join under their own downline.
    let (status, body) = put(
        a.id,
        a.token.clone(),
        json!({"referral_code": a.referral_code}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("self_referral"))
    );
    let (status, body) = put(
        a.id,
        a.token.clone(),
        json!({"referral_code": c.referral_code}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("referral_cycle"))
    );
    // A user names its referrer by code, not by id; only the admin key may use ids.
    let (status, body) = put(a.id, a.token.clone(), json!({"referrer_id": d.id})).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("admin_only")));
    // Another user's token may not change A.
    let (status, _) = put(
        a.id,
        d.token.clone(),
        json!({"referral_code": d.referral_code}),
    )
    .await;
    assert_eq!(status, 403);
    // A joins D with D's referral code; a second change is refused.
    let (status, body) = put(
        a.id,
        a.token.clone(),
        json!({"referral_code": d.referral_code}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["referrer_id"].as_i64(), Some(d.id));
    let (status, body) = put(a.id, ADMIN.to_owned(), json!({"referrer_id": b.id})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("already_referred"))
    );
    app.stop().await;
}

#[tokio::test]
async fn routes_answer_401_without_credentials_and_403_with_the_wrong_ones() {
    let app = TestApp::spawn().await;
    let a = app.register("Asha", None).await;
    let b = app.register("Bala", None).await;
    let get = |path: String, token: Option<String>| {
        let (http, url) = (app.http.clone(), app.url(&path));
        async move {
            let mut req = http.get(url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            req.send().await.expect("request").status().as_u16()
        }
    };
    assert_eq!(get(format!("/api/users/{}", a.id), None).await, 401);
    assert_eq!(
        get(format!("/api/users/{}", a.id), Some("forged".into())).await,
        403
    );
    assert_eq!(
        get(format!("/api/users/{}", a.id), Some(b.token.clone())).await,
        403
    );
    assert_eq!(
        get(format!("/api/users/{}", a.id), Some(a.token.clone())).await,
        200
    );
    assert_eq!(
        get(
            format!("/api/users/{}/earnings", a.id),
            Some(a.token.clone())
        )
        .await,
        200
    );
    assert_eq!(get("/api/users".into(), Some(a.token.clone())).await, 403);
    assert_eq!(get("/api/users".into(), Some(ADMIN.into())).await, 200);
    assert_eq!(get("/api/leaderboard".into(), None).await, 200);
    // Purchases are for producers and admins.
    let r = app
        .http
        .post(app.url("/api/purchases"))
        .bearer_auth(&a.token)
        .json(&json!({"buyer_id": a.id, "amount": "2000"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 403);

    // Users are listed page by page.
    let (status, page) = app.admin_get("/api/users?limit=1").await;
    assert_eq!(status, 200);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1));
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let (_, page2) = app
        .admin_get(&format!("/api/users?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(page2["items"][0]["id"].as_i64(), Some(b.id));
    let (status, body) = app.admin_get("/api/users?limit=0").await;
    assert_eq!((status, body["field"].as_str()), (422, Some("limit")));
    app.stop().await;
}
