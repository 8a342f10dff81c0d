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
use crate::servers::{RabbitNode, TempDir};

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
