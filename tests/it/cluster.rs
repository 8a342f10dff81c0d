//! Past one machine (issue 13, a first part): several broker nodes in `amqp.url`, and a
//! primary with its standby in `database.url`. Services connect to the first node that answers
//! and to the host that is not in recovery, and follow a lost node or a promoted standby
//! without a restart. The servers are throwaway ones of each test (`servers`), stopped on drop.

use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use rust_decimal::Decimal;
use serde_json::json;
use upline_common::amqp::{self, Publisher};
use upline_testkit::order::Order;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use upline_common::protocol::ServerMessage;

use crate::harness::{free_port, server_message, user_id, Services, TestApp, User, Ws};
use crate::servers::{PgCluster, RabbitNode, TempDir};

/// POSTs a purchase until the api accepts it (it answers 503 while it reconnects).
async fn purchase_when_accepted(app: &TestApp, purchase_id: &str, buyer_id: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = app
            .post_purchase(
                json!({"purchase_id": purchase_id, "buyer_id": buyer_id, "amount": "2000.00"}),
            )
            .await;
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        match status {
            202 => return,
            503 => {}
            other => panic!("{purchase_id}: {other} {body}"),
        }
        assert!(
            Instant::now() < deadline,
            "{purchase_id} never accepted; the last answer was 503 {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until a worker has recorded every purchase of `ids` as processed, within `within`.
async fn wait_all_processed(
    app: &TestApp,
    ids: impl IntoIterator<Item = String>,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    for id in ids {
        loop {
            let (status, report) = app.admin_get(&format!("/api/purchases/{id}")).await;
            if status == 200 {
                assert_eq!(report["status"], "processed", "{report}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{id} never processed after the failover"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A primary and its hot standby in `dir`, replicating synchronously, and a `database.url`
/// listing both (primary first) with `target_session_attrs=read-write`.
async fn primary_and_standby(dir: &TempDir) -> (PgCluster, PgCluster, String) {
    let primary = PgCluster::start(&dir.sub("primary"), None).await;
    let standby = PgCluster::standby_of(&primary, &dir.sub("standby")).await;
    make_synchronous(&primary).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/upline?target_session_attrs=read-write",
        primary.port, standby.port
    );
    (primary, standby, url)
}

/// Makes `primary` replicate synchronously: a commit returns once a standby has it.
async fn make_synchronous(primary: &PgCluster) {
    run_sql(
        primary,
        &[
            "alter system set synchronous_standby_names = '*'",
            "select pg_reload_conf()",
        ],
    )
    .await;
}

/// The `seq`s a subscriber of `user` receives on `ws` until it holds `n`, reconnecting with
/// `since` whenever the notifier closes the feed (it does when its database reads fail:
/// "reconnect with since"), as a dashboard does.
async fn follow(app: &TestApp, user: &User, mut ws: Ws, n: usize) -> Vec<i64> {
    let mut seqs: Vec<i64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while seqs.len() < n {
        assert!(
            Instant::now() < deadline,
            "the subscriber holds only {seqs:?}"
        );
        match tokio::time::timeout(Duration::from_secs(10), ws.0.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if let ServerMessage::Earning { earning } = server_message(&t) {
                    seqs.push(earning.seq);
                }
            }
            Ok(Some(Ok(_))) => {}
            _ => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                ws = app
                    .subscribe(user.id, &user.token, seqs.last().copied())
                    .await;
            }
        }
    }
    seqs
}

#[tokio::test]
async fn services_move_to_the_next_broker_node_when_theirs_goes_away() {
    let dir = TempDir::new("upline-nodes");
    let first = RabbitNode::start(&dir.sub("rabbit"), None).await;
    let first_url = first.amqp_url();
    let app = TestApp::spawn_with(Services::default(), |s| {
        // A node that is down, the throwaway node, then the shared node.
        let down = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
        s.amqp.url = format!("{down},{first_url}, {}", s.amqp.url);
    })
    .await;
    let (_, b, c) = app.chain_abc().await;
    let mut ws = app.subscribe(b.id, &b.token, None).await;
    purchase_when_accepted(&app, "node-1", c.id).await;
    app.wait_processed("node-1").await;
    let e = ws.earnings(1).await.remove(0);
    assert_eq!((e.seq, e.purchase_id.as_deref()), (1, Some("node-1")));
    // The services declared their topology on the throwaway node.
    let queues = first.ctl_run(&["list_queues", "-q", "name"]).await;
    assert!(queues.contains("upline.purchases"), "{queues}");

    drop(first);
    purchase_when_accepted(&app, "node-2", c.id).await;
    app.wait_processed("node-2").await;
    let e = ws.earnings(1).await.remove(0);
    assert_eq!((e.seq, e.purchase_id.as_deref()), (2, Some("node-2")));
    app.wait_until_ready().await;
    assert_eq!(app.earnings(b.id).await["total"], "200.00");
    app.stop().await;
}

/// A primary and a hot standby (streaming replication, synchronous), both in `database.url`
/// with `target_session_attrs=read-write`. The primary dies while purchases arrive; the
/// standby is promoted; every service moves to it by itself, and every purchase is paid
/// exactly once, with a WebSocket subscriber holding every `seq` once.
#[tokio::test]
async fn services_follow_the_standby_promoted_after_the_primary_dies() {
    let dir = TempDir::new("upline-standby");
    let (primary, standby, url) = primary_and_standby(&dir).await;
    let app = TestApp::spawn_with(Services::default(), |s| s.database.url = url.clone()).await;
    let (a, b, c) = app.chain_abc().await;
    let ws = app.subscribe(b.id, &b.token, None).await;
    for i in 0..5 {
        purchase_when_accepted(&app, &format!("ha-{i}"), c.id).await;
    }
    for i in 0..5 {
        app.wait_processed(&format!("ha-{i}")).await;
    }

    // The notifier's token-revocation listener is on the primary (it once took the multi-host
    // URL as it was, failed to parse it and never listened).
    wait_listening(&primary).await;

    primary.stop_immediate().await;
    // Purchases keep arriving while there is no primary (the queue holds them).
    for i in 5..8 {
        purchase_when_accepted(&app, &format!("ha-{i}"), c.id).await;
    }
    standby.promote().await;
    for i in 8..10 {
        purchase_when_accepted(&app, &format!("ha-{i}"), c.id).await;
    }
    wait_all_processed(
        &app,
        (0..10).map(|i| format!("ha-{i}")),
        Duration::from_secs(90),
    )
    .await;
    let seqs = follow(&app, &b, ws, 10).await;
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<_>>(),
        "every seq once, in order"
    );
    assert_eq!(app.earnings(b.id).await["total"], "1000.00");
    assert_eq!(app.earnings(a.id).await["total"], "200.00");
    app.wait_until_ready().await;

    // The listener followed the pool to the promoted standby, and a revocation there still
    // closes the user's stream.
    wait_listening(&standby).await;
    let mut ws = app.subscribe(c.id, &c.token, None).await;
    let revoked = app
        .http
        .delete(app.url(&format!("/api/users/{}/tokens", c.id)))
        .bearer_auth(&c.token)
        .send()
        .await
        .expect("request");
    assert_eq!(revoked.status(), 204);
    let (frames, close) = ws.until_close().await;
    assert_eq!(close.map(|c| c.0), Some(4003), "{frames:?}");
    app.stop().await;
}

/// Polls, within 20 s, until a session on `cluster`'s `upline` database is listening for token
/// revocations (its last statement a `LISTEN`), as the notifier's listener is.
async fn wait_listening(cluster: &PgCluster) {
    let db = sqlx::PgPool::connect(&cluster.url("postgres", ""))
        .await
        .expect("the server answers");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listening: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity where datname = 'upline' and query ilike 'listen %'",
        )
        .fetch_one(&db)
        .await
        .expect("pg_stat_activity");
        if listening > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no session listens for token revocations on {}",
            cluster.url("upline", "")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    db.close().await;
}

/// Runs `statements` on `cluster`'s `postgres` database.
async fn run_sql(cluster: &PgCluster, statements: &[&str]) {
    let admin = sqlx::PgPool::connect(&cluster.url("postgres", ""))
        .await
        .expect("the server answers");
    for statement in statements {
        sqlx::query(statement)
            .execute(&admin)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    admin.close().await;
}

/// `user`'s earnings total as the api of `client` reports it (admin key).
async fn total_at(client: &upline_testkit::client::Api, user: i64) -> String {
    let (status, body) = client
        .admin_get(&format!("/api/users/{user}/earnings"))
        .await
        .expect("request");
    assert_eq!(status, 200, "{body}");
    body["total"].as_str().expect("a total").to_owned()
}

/// Polls until `user`'s total at `client` is `want`, within 20 s.
async fn wait_total_at(client: &upline_testkit::client::Api, user: i64, want: &str, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let total = total_at(client, user).await;
        if total == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{why}: still {total}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `database.standby_reads`: report reads go to the standby while it is fresh enough, and to
/// the primary otherwise. With the standby's replay paused, an api that tolerates 60 s of lag
/// still reports the total before the latest purchase (it reads the standby), one that
/// tolerates 1 s reports the new total (it went back to the primary); a user who signed up
/// after the pause is found, not 404; with the standby gone every read still answers 200.
#[tokio::test]
async fn report_reads_go_to_a_fresh_standby_and_to_the_primary_otherwise() {
    let dir = TempDir::new("upline-reads");
    let (primary, standby, url) = primary_and_standby(&dir).await;
    let mut app = TestApp::spawn_with(Services::default(), |s| {
        s.database.url = url.clone();
        s.database.standby_reads = true;
        s.database.standby_max_lag_secs = 60;
    })
    .await;
    let strict = app.spawn_api(|s| s.database.standby_max_lag_secs = 1).await;
    let (_, b, c) = app.chain_abc().await;
    app.purchase("reads-1", c.id, "2000.00").await;
    app.wait_processed("reads-1").await;
    wait_total_at(&app.client, b.id, "100.00", "the standby caught up").await;
    wait_total_at(&strict, b.id, "100.00", "the standby caught up").await;

    // The leaderboard snapshot (refreshed every 100 ms in the tests) has B's 100.00 on the
    // standby too before its replay stops.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, leaders) = app.admin_get("/api/leaderboard?limit=5").await;
        if leaders[0]["total_earnings"] == "100.00" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leaderboard never showed B: {leaders}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    run_sql(&standby, &["select pg_wal_replay_pause()"]).await;
    app.purchase("reads-2", c.id, "2000.00").await;
    app.wait_processed("reads-2").await;
    // The standby has the purchase (synchronous replication) but has not replayed it.
    wait_total_at(
        &strict,
        b.id,
        "200.00",
        "1 s of lag allowed: the primary answers",
    )
    .await;
    assert_eq!(
        total_at(&app.client, b.id).await,
        "100.00",
        "60 s of lag allowed: the paused standby answers"
    );
    let (status, leaders) = app.admin_get("/api/leaderboard?limit=5").await;
    assert_eq!(status, 200, "{leaders}");
    assert_eq!(leaders[0]["total_earnings"], "100.00", "{leaders}");
    // Signed up after the pause: the standby does not know them, the primary does.
    let d = app.register("dee", Some(c.id)).await;
    assert_eq!(total_at(&app.client, d.id).await, "0.00");
    let (status, _) = app
        .admin_get(&format!("/api/users/{}/referrals", d.id))
        .await;
    assert_eq!(status, 200);

    run_sql(&standby, &["select pg_wal_replay_resume()"]).await;
    wait_total_at(&app.client, b.id, "200.00", "the standby caught up").await;

    // Without the standby (and without waiting for it: asynchronous from now on).
    run_sql(
        &primary,
        &[
            "alter system set synchronous_standby_names = ''",
            "select pg_reload_conf()",
        ],
    )
    .await;
    standby.stop_immediate().await;
    for _ in 0..10 {
        assert_eq!(total_at(&app.client, b.id).await, "200.00");
        let (status, leaders) = app.admin_get("/api/leaderboard?limit=5").await;
        assert_eq!(status, 200, "{leaders}");
        let (status, history) = app
            .admin_get(&format!("/api/users/{}/earnings/history", b.id))
            .await;
        assert_eq!(status, 200, "{history}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

/// Publishes a purchase straight onto the queue (as an outside producer does) until the
/// broker confirms it, reconnecting to the next node as needed.
async fn publish_when_confirmed(publisher: &Publisher, purchase_id: &str, buyer_id: i64) {
    let purchase = Order::new(purchase_id, user_id(buyer_id), Decimal::new(200_000, 2))
        .to_purchase("INR")
        .expect("a valid purchase");
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = publisher.publish(&purchase).await {
        assert!(
            Instant::now() < deadline,
            "{purchase_id} never confirmed: {e}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A 3-node RabbitMQ cluster: `upline.purchases` and `upline.purchases.dead` are quorum
/// queues with a replica on each node, and every service lists the three nodes, the first one first, so that the queue's
/// leader and the api's, workers' and notifier's connections are all on it. It is stopped
/// while purchases stream in over REST and straight onto the queue: the queue elects a leader
/// on the other two, the services move there by themselves, and every purchase is paid exactly
/// once, with a WebSocket subscriber holding every `seq` once, and every service is ready again.
/// (This test found that the dead-letter queue, a classic queue then, lived on the first node
/// only: with it gone, every service failed to declare the topology and stayed not ready.)
#[tokio::test]
async fn a_rabbitmq_node_lost_mid_stream_loses_and_doubles_nothing() {
    let dir = TempDir::new("upline-rabbit-cluster");
    let mut nodes = RabbitNode::start_cluster(&dir, 3).await;
    let urls: Vec<String> = nodes.iter().map(RabbitNode::amqp_url).collect();
    let app = TestApp::spawn_with(Services::default(), |s| s.amqp.url = urls.join(",")).await;
    let members = nodes[0]
        .ctl_run(&["list_queues", "-q", "name", "leader", "members"])
        .await;
    let purchases_line = members
        .lines()
        .find(|l| l.starts_with("upline.purchases\t"))
        .unwrap_or_else(|| panic!("no upline.purchases queue: {members}"));
    assert!(
        purchases_line.contains(&nodes[0].name),
        "the leader is on the first node: {purchases_line}"
    );
    for node in &nodes {
        assert!(
            purchases_line.matches(&node.name).count() >= 1,
            "a replica on {}: {purchases_line}",
            node.name
        );
    }
    let (a, b, c) = app.chain_abc().await;
    let ws = app.subscribe(b.id, &b.token, None).await;
    let producer = Publisher::new(app.settings.amqp.clone(), Default::default())
        .with_connection_name("upline-test-producer");

    for i in 0..10 {
        purchase_when_accepted(&app, &format!("rest-{i}"), c.id).await;
        publish_when_confirmed(&producer, &format!("queue-{i}"), c.id).await;
    }
    // The first node goes, with the queue's leader and every connection.
    let first = nodes.remove(0);
    let stopping = tokio::task::spawn_blocking(move || drop(first));
    for i in 10..20 {
        purchase_when_accepted(&app, &format!("rest-{i}"), c.id).await;
        publish_when_confirmed(&producer, &format!("queue-{i}"), c.id).await;
    }
    stopping.await.expect("the first node stopped");

    wait_all_processed(
        &app,
        (0..20).flat_map(|i| [format!("rest-{i}"), format!("queue-{i}")]),
        Duration::from_secs(120),
    )
    .await;
    let seqs = follow(&app, &b, ws, 40).await;
    assert_eq!(
        seqs,
        (1..=40).collect::<Vec<_>>(),
        "every seq once, in order"
    );
    assert_eq!(app.earnings(b.id).await["total"], "4000.00");
    assert_eq!(app.earnings(a.id).await["total"], "800.00");
    let recorded: i64 = sqlx::query_scalar("select count(*) from purchases")
        .fetch_one(&app.db)
        .await
        .expect("count");
    assert_eq!(recorded, 40);
    app.wait_until_ready().await;
    producer.close().await;
    app.stop().await;
}

/// Both at once: a 3-node RabbitMQ cluster and a PostgreSQL primary with a synchronous
/// standby. The broker node holding the queue's leader and every connection, and the
/// primary, are lost together while purchases arrive over REST and straight on the queue; the
/// standby is promoted. Every purchase is paid once, every `seq` arrives once, and every
/// service is ready again without a restart.
#[tokio::test]
async fn a_broker_node_and_the_primary_lost_together_lose_and_double_nothing() {
    let dir = TempDir::new("upline-both");
    let mut nodes = RabbitNode::start_cluster(&dir, 3).await;
    let (primary, standby, database) = primary_and_standby(&dir).await;
    let urls: Vec<String> = nodes.iter().map(RabbitNode::amqp_url).collect();
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.amqp.url = urls.join(",");
        s.database.url = database.clone();
    })
    .await;
    let (a, b, c) = app.chain_abc().await;
    let ws = app.subscribe(b.id, &b.token, None).await;
    let producer = Publisher::new(app.settings.amqp.clone(), Default::default())
        .with_connection_name("upline-test-producer");
    for i in 0..5 {
        purchase_when_accepted(&app, &format!("rest-{i}"), c.id).await;
        publish_when_confirmed(&producer, &format!("queue-{i}"), c.id).await;
    }
    let first = nodes.remove(0);
    let stopping = tokio::task::spawn_blocking(move || drop(first));
    primary.stop_immediate().await;
    for i in 5..8 {
        publish_when_confirmed(&producer, &format!("queue-{i}"), c.id).await;
    }
    standby.promote().await;
    stopping.await.expect("the first node stopped");
    for i in 5..10 {
        purchase_when_accepted(&app, &format!("rest-{i}"), c.id).await;
    }
    for i in 8..10 {
        publish_when_confirmed(&producer, &format!("queue-{i}"), c.id).await;
    }
    wait_all_processed(
        &app,
        (0..10).flat_map(|i| [format!("rest-{i}"), format!("queue-{i}")]),
        Duration::from_secs(120),
    )
    .await;
    let seqs = follow(&app, &b, ws, 20).await;
    assert_eq!(
        seqs,
        (1..=20).collect::<Vec<_>>(),
        "every seq once, in order"
    );
    assert_eq!(app.earnings(b.id).await["total"], "2000.00");
    assert_eq!(app.earnings(a.id).await["total"], "400.00");
    app.wait_until_ready().await;
    producer.close().await;
    app.stop().await;
}

/// A dead-letter queue made as a classic queue by an earlier version is kept: declaring the
/// topology (now with a quorum dead-letter queue) over it succeeds, twice, and leaves it bound
/// to the dead-letter exchange.
#[tokio::test]
async fn a_classic_dead_letter_queue_of_an_earlier_version_is_kept() {
    let sandbox = crate::harness::sandbox().await;
    let conn = amqp::connect(&sandbox.settings.amqp, "upline-test")
        .await
        .expect("the broker answers");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .queue_declare(
            amqp::PURCHASES_DEAD_QUEUE,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("a classic dead-letter queue, as an earlier version made it");
    amqp::declare_topology(&conn)
        .await
        .expect("the topology is declared over it");
    amqp::declare_topology(&conn).await.expect("and again");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .basic_publish(
            amqp::PURCHASES_DLX,
            "purchase",
            BasicPublishOptions::default(),
            b"dead",
            amqp::persistent_json(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        if let Some(m) = channel
            .basic_get(amqp::PURCHASES_DEAD_QUEUE, BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "nothing reached the classic dead-letter queue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(got.delivery.data, b"dead");
    conn.close(200, "done").await.expect("close");
    sandbox.destroy().await.expect("sandbox removed");
}
