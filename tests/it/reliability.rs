//! Survive faults and stay bounded (README "Reliability"): services that start together against
//! an empty server, database failures that stop the workers instead of dead-lettering good
//! purchases, and the api's bounds (body size, request time, connection pool) — each against
//! the real servers.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::process::Command;
use upline_common::{amqp, Settings};
use upline_testkit::spawn::{Output, Service, ServiceCommand};

use crate::harness::{sandbox, Services, TestApp, ADMIN};

/// How many messages wait in `upline.purchases.dead`.
async fn dead_letters(app: &TestApp) -> u32 {
    let conn = app.amqp().await;
    let channel = conn.create_channel().await.expect("channel");
    let depth = amqp::queue_depth(&channel, amqp::PURCHASES_DEAD_QUEUE)
        .await
        .expect("the dead-letter queue exists");
    let _ = conn.close(200, "done").await;
    depth
}

/// The worker's `/readyz`: its status and body.
async fn worker_ready(app: &TestApp) -> (u16, Value) {
    let base = app.worker.as_deref().expect("the app runs a worker");
    let r = app
        .http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits (up to 20 s) until the worker's readiness says `database: want`.
async fn wait_worker_database(app: &TestApp, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = worker_ready(app).await;
        if body["database"] == want {
            assert_eq!(status == 200, want == "up", "{body}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the worker's readiness never said database {want}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ends every other session on the app's database, so that the services reconnect (and pick
/// up per-database settings), as after a failover.
async fn reconnect_everyone(db: &PgPool) {
    sqlx::query(
        "select pg_terminate_backend(pid) from pg_stat_activity \
         where datname = current_database() and pid <> pg_backend_pid()",
    )
    .execute(db)
    .await
    .expect("terminate backends");
}

/// A connection of the test's own to the app's database, outside the app's pools.
async fn admin_db(app: &TestApp) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&app.settings.database.url)
        .await
        .expect("connect")
}

#[tokio::test]
async fn a_failover_or_a_rolling_deploy_stops_the_workers_and_dead_letters_nothing() {
    let app = TestApp::spawn().await;
    let (a, b, c) = app.chain_abc().await;
    let admin = admin_db(&app).await;
    let database = app
        .settings
        .database
        .url
        .rsplit('/')
        .next()
        .expect("name")
        .to_owned();

    // 1. Failover: the database answers, but read-only (SQLSTATE 25006).
    sqlx::query(&format!(
        r#"alter database "{database}" set default_transaction_read_only = on"#
    ))
    .execute(&admin)
    .await
    .expect("read-only");
    reconnect_everyone(&admin).await;
    for i in 0..5 {
        app.purchase(&format!("during-failover-{i}"), c.id, "2000.00")
            .await;
    }
    wait_worker_database(&app, "failing").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recorded: i64 = sqlx::query_scalar("select count(*) from purchases")
        .fetch_one(&admin)
        .await
        .expect("count");
    assert_eq!(recorded, 0);
    assert_eq!(dead_letters(&app).await, 0, "nothing good is dead-lettered");
    sqlx::query(&format!(
        r#"alter database "{database}" reset default_transaction_read_only"#
    ))
    .execute(&admin)
    .await
    .expect("writable again");
    reconnect_everyone(&admin).await;
    for i in 0..5 {
        app.wait_processed(&format!("during-failover-{i}")).await;
    }
    wait_worker_database(&app, "up").await;

    // 2. A rolling deploy: the schema is not what this binary expects yet (42P01).
    sqlx::query("alter table earnings rename to earnings_during_deploy")
        .execute(&admin)
        .await
        .expect("rename");
    app.purchase("during-deploy", c.id, "2000.00").await;
    wait_worker_database(&app, "failing").await;
    assert_eq!(dead_letters(&app).await, 0, "nothing good is dead-lettered");
    sqlx::query("alter table earnings_during_deploy rename to earnings")
        .execute(&admin)
        .await
        .expect("rename back");
    app.wait_processed("during-deploy").await;
    wait_worker_database(&app, "up").await;

    // Every purchase paid exactly once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.earnings(b.id).await["total"], "600.00");
    assert_eq!(app.earnings(a.id).await["total"], "120.00");
    assert_eq!(dead_letters(&app).await, 0);
    admin.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_answered_413_naming_the_limit() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.api.max_body_bytes = 64 * 1024;
    })
    .await;
    let huge = format!(
        r#"{{"name": "Huge", "email": "huge@example.com", "padding": "{}"}}"#,
        "x".repeat(10 * 1024 * 1024)
    );
    for (path, key) in [("/api/users", None), ("/api/purchases", Some(ADMIN))] {
        let mut request = app
            .http
            .post(app.url(path))
            .header("content-type", "application/json")
            .body(huge.clone());
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let r = request.send().await.expect("request");
        assert_eq!(r.status(), 413, "{path}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let problem: Value = r.json().await.expect("json");
        assert_eq!(problem["code"], "payload_too_large", "{path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn an_exhausted_pool_and_a_slow_request_answer_503_with_retry_after() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.database.max_connections = 1;
        s.database.acquire_timeout_secs = 1;
        s.api.request_timeout_secs = 3;
    })
    .await;
    let (a, _, _) = app.chain_abc().await;
    // Hold A's row: deactivating A takes the api's only connection and waits on the lock.
    let admin = admin_db(&app).await;
    let mut holder = admin.begin().await.expect("begin");
    sqlx::query("select 1 from users where id = $1 for update")
        .bind(a.id)
        .execute(&mut *holder)
        .await
        .expect("lock");
    let slow = {
        let (http, url) = (
            app.http.clone(),
            app.url(&format!("/api/users/{}/deactivate", a.id)),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let r = http
                .post(url)
                .bearer_auth(ADMIN)
                .send()
                .await
                .expect("request");
            (
                r.status().as_u16(),
                r.headers().contains_key("retry-after"),
                r.json::<Value>().await.unwrap_or(Value::Null),
                started.elapsed(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile the pool is exhausted.
    let r = app
        .http
        .get(app.url("/api/leaderboard"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "database_unavailable"
    );
    // The slow request is abandoned after api.request_timeout_secs.
    let (status, retry_after, problem, took) = slow.await.expect("task");
    assert_eq!((status, retry_after), (503, true), "{problem}");
    assert_eq!(problem["code"], "request_timeout");
    assert!(took < Duration::from_secs(10), "{took:?}");
    holder.rollback().await.expect("release");
    // Nothing was half-applied, and the api serves again.
    let (status, user) = app.admin_get(&format!("/api/users/{}", a.id)).await;
    assert_eq!((status, user["is_active"].clone()), (200, json!(true)));
    admin.close().await;
    app.stop().await;
}

/// `upline <service>` as a child process on a port of its own, against the database and
/// vhost of `settings` (development keys, abuse limits off).
fn spawn_service(service: &str, settings: &Settings) -> Service {
    ServiceCommand::new(Path::new(env!("CARGO_BIN_EXE_upline")), service)
        .env("DATABASE_URL", &settings.database.url)
        .env("AMQP_URL", &settings.amqp.url)
        .env("UPLINE__APP__ENVIRONMENT", "development")
        .env("UPLINE__LIMITS__ENABLED", "false")
        .output(Output::PipedStderr)
        .spawn()
        .expect("the upline binary starts")
}

#[tokio::test]
async fn every_service_started_at_once_against_an_empty_server_comes_up() {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    // Three cold starts, each with a database and a vhost that do not exist yet: the api, two
    // workers and the notifier at the same moment, as a fresh deployment starts them.
    for round in 0..3 {
        let sandbox = sandbox().await;
        let mut children: Vec<(&str, Service)> = ["api", "worker", "worker", "notifier"]
            .into_iter()
            .map(|service| (service, spawn_service(service, &sandbox.settings)))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        for (service, child) in &mut children {
            loop {
                if let Ok(Some(status)) = child.child().try_wait() {
                    let mut stderr = String::new();
                    if let Some(mut err) = child.child().stderr.take() {
                        use tokio::io::AsyncReadExt;
                        let _ = err.read_to_string(&mut stderr).await;
                    }
                    panic!("round {round}: {service} exited ({status}):\n{stderr}");
                }
                let ready = http
                    .get(format!("{}/readyz", child.base()))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if ready {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round}: {service} at {} never became ready",
                    child.base()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        println!("cold start round {round}: api, 2 workers and notifier all ready");
        for (_, child) in &mut children {
            child.kill().await;
        }
        sandbox.destroy().await.expect("drop test database");
    }
}

/// Runs `upline dlq <args>` against the app's broker; returns what it printed (it must succeed).
async fn upline_dlq(app: &TestApp, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_upline"))
        .arg("dlq")
        .args(args)
        .env("AMQP_URL", &app.settings.amqp.url)
        .env("DATABASE_URL", &app.settings.database.url)
        .env("UPLINE__APP__ENVIRONMENT", "development")
        .kill_on_drop(true)
        .output()
        .await
        .expect("upline runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "upline dlq {args:?} failed:\n{text}");
    text
}

/// Waits (up to 20 s) until the dead-letter queue holds `n` messages.
async fn wait_dead_letters(app: &TestApp, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let depth = dead_letters(app).await;
        if depth == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the dead-letter queue holds {depth}, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn dead_letters_are_listed_shown_and_replayed_with_upline_dlq() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
    // Unreadable, and too large: the worker dead-letters both with their reasons.
    app.publish_raw(b"not json at all").await;
    let big = json!({"purchase_id": "too-big", "buyer_id": c.id, "amount": "2000.00",
        "note": "x".repeat(70_000)});
    app.publish_raw(big.to_string().as_bytes()).await;
    wait_dead_letters(&app, 2).await;
    // A good purchase set aside by some past failure, with its reason.
    let (conn, channel) = app.confirming_channel().await;
    let good = json!({"purchase_id": "good-from-dlq", "buyer_id": c.id, "amount": "2000.00"});
    let confirm = channel
        .basic_publish(
            amqp::PURCHASES_DLX,
            "",
            Default::default(),
            good.to_string().as_bytes(),
            amqp::with_error_header(&amqp::persistent_json(), "set aside by an older version"),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
    let _ = conn.close(200, "done").await;
    wait_dead_letters(&app, 3).await;

    let list = upline_dlq(&app, &["list"]).await;
    println!("{list}");
    assert!(list.contains("3 message(s)"), "{list}");
    assert!(list.contains("message too large: "), "{list}");
    assert!(
        list.contains("good-from-dlq") && list.contains("set aside by an older version"),
        "{list}"
    );
    assert_eq!(dead_letters(&app).await, 3, "listing leaves them in place");
    let shown = upline_dlq(&app, &["show", "3"]).await;
    assert!(
        shown.contains("\"purchase_id\": \"good-from-dlq\"") && shown.contains("reason: set aside"),
        "{shown}"
    );

    // Replay the good one: it is paid once.
    let replayed = upline_dlq(&app, &["replay", "--position", "3"]).await;
    assert!(replayed.contains("replayed 1 of 3"), "{replayed}");
    app.wait_processed("good-from-dlq").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.earnings(b.id).await["total"], "100.00");
    // Replaying everything is safe: what still cannot be read comes back, with its reason.
    let replayed = upline_dlq(&app, &["replay", "--all"]).await;
    assert!(replayed.contains("replayed 2 of 2"), "{replayed}");
    wait_dead_letters(&app, 2).await;
    let list = upline_dlq(&app, &["list"]).await;
    assert!(list.contains("message too large: "), "{list}");
    let (status, _) = app.admin_get("/api/purchases/too-big").await;
    assert_eq!(status, 404, "the oversize message was never recorded");
    assert_eq!(app.earnings(b.id).await["total"], "100.00");
    app.stop().await;
}

/// Ends the session `pid` from `admin` and waits (up to 10 s) until the server has let it go.
async fn terminate(admin: &PgPool, pid: i32) {
    sqlx::query("select pg_terminate_backend($1)")
        .bind(pid)
        .execute(admin)
        .await
        .expect("terminate");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: bool =
            sqlx::query_scalar("select exists (select 1 from pg_stat_activity where pid = $1)")
                .bind(pid)
                .fetch_one(admin)
                .await
                .expect("pg_stat_activity");
        if !alive {
            return;
        }
        assert!(Instant::now() < deadline, "session {pid} never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The worker's pool (`Checkout::PingWhenIdle`) pings a connection before handing it out only
/// when it sat idle for `PING_WHEN_IDLE` or longer. A connection the server dropped while it
/// was idle that long is replaced before anyone uses it; one dropped moments after its last use
/// may fail the next statement, as an infrastructure error (the worker retries the batch), and
/// is never handed out again (sqlx tests a connection as it comes back to the pool).
#[tokio::test]
async fn a_pool_that_pings_only_idle_connections_never_hands_out_a_dropped_one_twice() {
    use upline_common::db::{self, Checkout, ErrorClass, PING_WHEN_IDLE};
    let sandbox = sandbox().await;
    let mut settings = sandbox.settings.database.clone();
    settings.max_connections = 1;
    let cancel = tokio_util::sync::CancellationToken::new();
    let pool = db::connect_and_migrate_with(&settings, &cancel, Checkout::PingWhenIdle)
        .await
        .expect("connect");
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&settings.url)
        .await
        .expect("connect");
    let backend = || sqlx::query_scalar::<_, i32>("select pg_backend_pid()").fetch_one(&pool);
    // Back in the pool (its test on release done) before the server drops it.
    let idle = || async {
        while pool.num_idle() < 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };

    // Dropped, then idle for longer than PING_WHEN_IDLE: the ping finds it gone.
    let first = backend().await.expect("a connection");
    idle().await;
    terminate(&admin, first).await;
    tokio::time::sleep(PING_WHEN_IDLE + Duration::from_millis(100)).await;
    let second = backend()
        .await
        .expect("a connection dropped while idle is replaced before use");
    assert_ne!(first, second);

    // Dropped moments after its last use: it goes out unpinged, unless this machine took
    // longer than PING_WHEN_IDLE to get here.
    idle().await;
    terminate(&admin, second).await;
    match backend().await {
        Ok(third) => assert_ne!(third, second, "a dropped connection was used"),
        Err(e) => {
            assert_eq!(db::classify(&e), ErrorClass::Infrastructure, "{e}");
            let third = backend()
                .await
                .expect("the connection that failed is not handed out again");
            assert_ne!(third, second);
        }
    }
    pool.close().await;
    admin.close().await;
    sandbox.destroy().await.expect("drop test database");
}
