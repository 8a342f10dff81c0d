//! Several broker nodes in `amqp.url` (issue 13, a first part): services connect to the first
//! node that answers and, when it goes away, move to the next without a restart.
//!
//! The nodes here are not a cluster: a throwaway RabbitMQ node of the test's own
//! (`servers::RabbitNode`) first, then the shared one (the test's vhost). Nothing is in flight
//! when the first node stops, so this checks the services' failover, not the queue's
//! replication.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{free_port, Services, TestApp};
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
        match r.status().as_u16() {
            202 => return,
            503 => {}
            other => panic!(
                "{purchase_id}: {other} {}",
                r.text().await.unwrap_or_default()
            ),
        }
        assert!(Instant::now() < deadline, "{purchase_id} never accepted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
    let primary = PgCluster::start(&dir.sub("primary"), None).await;
    let standby = PgCluster::standby_of(&primary, &dir.sub("standby")).await;
    // Synchronous: a commit returns once the standby has it.
    let admin = sqlx::PgPool::connect(&primary.url("postgres", ""))
        .await
        .expect("the primary answers");
    sqlx::query("alter system set synchronous_standby_names = '*'")
        .execute(&admin)
        .await
        .expect("synchronous replication");
    sqlx::query("select pg_reload_conf()")
        .execute(&admin)
        .await
        .expect("reload");
    admin.close().await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/upline?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let app = TestApp::spawn_with(Services::default(), |s| s.database.url = url.clone()).await;
    let (a, b, c) = app.chain_abc().await;
    let mut ws = app.subscribe(b.id, &b.token, None).await;
    for i in 0..5 {
        purchase_when_accepted(&app, &format!("ha-{i}"), c.id).await;
    }
    for i in 0..5 {
        app.wait_processed(&format!("ha-{i}")).await;
    }

    primary.stop_immediate().await;
    // Purchases keep arriving while there is no primary (the queue holds them).
    for i in 5..8 {
        purchase_when_accepted(&app, &format!("ha-{i}"), c.id).await;
    }
    standby.promote().await;
    for i in 8..10 {
        purchase_when_accepted(&app, &format!("ha-{i}"), c.id).await;
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    for i in 0..10 {
        loop {
            let (status, report) = app.admin_get(&format!("/api/purchases/ha-{i}")).await;
            if status == 200 {
                assert_eq!(report["status"], "processed", "{report}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ha-{i} never processed after the failover"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let seqs: Vec<i64> = ws.earnings(10).await.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<_>>(),
        "every seq once, in order"
    );
    assert_eq!(app.earnings(b.id).await["total"], "1000.00");
    assert_eq!(app.earnings(a.id).await["total"], "200.00");
    app.wait_until_ready().await;
    app.stop().await;
}
