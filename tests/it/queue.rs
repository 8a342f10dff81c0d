//! The queue contract of SPEC §3: external producers, idempotency, conflicts, rejections and
//! the dead-letter queue.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Services, TestApp};

#[tokio::test]
async fn a_purchase_published_three_times_pays_once() {
    let app = TestApp::spawn().await;
    let (a, b, c) = app.chain_abc().await;
    let body =
        json!({"purchase_id": "dup-1", "buyer_id": c.id, "amount": "2000.00", "currency": "INR"});
    // Once over REST, twice straight onto the queue (once written differently but equal).
    app.purchase("dup-1", c.id, "2000.00").await;
    app.publish_raw(body.to_string().as_bytes()).await;
    app.publish_raw(
        json!({"purchase_id": "dup-1", "buyer_id": c.id.to_string(), "amount": 2000})
            .to_string()
            .as_bytes(),
    )
    .await;
    app.purchase("after-dups", c.id, "1500.00").await;
    // Queue order: once the later purchase is processed the duplicates have been seen.
    app.wait_processed("after-dups").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = app.wait_processed("dup-1").await;
    assert_eq!(report["status"], "processed");
    assert_eq!(report["conflicts"], json!([]));
    assert_eq!(app.earnings(b.id).await["total"], "175.00"); // 100 + 75
    assert_eq!(app.earnings(a.id).await["total"], "35.00"); // 20 + 15
    let earnings: i64 =
        sqlx::query_scalar("select count(*) from earnings where purchase_id = 'dup-1'")
            .fetch_one(&app.db)
            .await
            .expect("count");
    assert_eq!(earnings, 2);
    app.stop().await;
}

#[tokio::test]
async fn the_same_id_with_a_different_body_is_a_conflict_and_pays_nothing_more() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
    app.purchase("conf-1", c.id, "2000.00").await;
    app.wait_processed("conf-1").await;
    app.publish_raw(
        json!({"purchase_id": "conf-1", "buyer_id": c.id, "amount": "9000.00"})
            .to_string()
            .as_bytes(),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let report = loop {
        let report = app.wait_processed("conf-1").await;
        if report["status"] == "conflict" {
            break report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "conflict not recorded: {report}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(report["original_status"], "processed");
    assert_eq!(report["conflicts"][0]["body"]["amount"], "9000.00");
    assert_eq!(report["amount"], "2000.00");
    assert_eq!(app.earnings(b.id).await["total"], "100.00");
    app.stop().await;
}

#[tokio::test]
async fn a_garbage_message_is_dead_lettered_while_the_next_good_one_is_processed() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
    app.publish_raw(b"\x00\x01 this is not json").await;
    app.publish_raw(
        json!({"buyer_id": c.id, "amount": "2000"})
            .to_string()
            .as_bytes(),
    )
    .await;
    app.publish_raw(
        json!({"purchase_id": "good-after-garbage", "buyer_id": c.id, "amount": "2000"})
            .to_string()
            .as_bytes(),
    )
    .await;
    let report = app.wait_processed("good-after-garbage").await;
    assert_eq!(report["status"], "processed");
    assert_eq!(app.earnings(b.id).await["total"], "100.00");

    let mut reasons = Vec::new();
    for _ in 0..2 {
        let dead = app.get_dead_letter().await;
        let headers = dead.delivery.properties.headers().clone().expect("headers");
        let reason = headers
            .inner()
            .get("x-upline-error")
            .expect("x-upline-error header")
            .clone();
        let reason = match reason {
            lapin::types::AMQPValue::LongString(s) => s.to_string(),
            other => panic!("unexpected header type {other:?}"),
        };
        reasons.push((
            String::from_utf8_lossy(&dead.delivery.data).into_owned(),
            reason,
        ));
    }
    reasons.sort();
    assert!(
        reasons
            .iter()
            .any(|(body, why)| body.contains("not json") && why.contains("not JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(body, why)| body.contains("buyer_id") && why.contains("purchase_id is missing")),
        "{reasons:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn bad_content_under_a_usable_id_is_stored_as_rejected_with_its_reason() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
    app.publish_raw(
        json!({"purchase_id": "rej-buyer", "buyer_id": 424_242, "amount": "2000"})
            .to_string()
            .as_bytes(),
    )
    .await;
    app.publish_raw(json!({"purchase_id": "rej-currency", "buyer_id": c.id, "amount": "2000", "currency": "USD"}).to_string().as_bytes()).await;
    app.publish_raw(
        json!({"purchase_id": "rej-amount", "buyer_id": c.id, "amount": "-1"})
            .to_string()
            .as_bytes(),
    )
    .await;
    let r = app.wait_processed("rej-buyer").await;
    assert_eq!(r["status"], "rejected");
    assert!(
        r["reason"].as_str().is_some_and(|s| s.contains("buyer_id")),
        "{r}"
    );
    let r = app.wait_processed("rej-currency").await;
    assert_eq!(r["status"], "rejected");
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|s| s.starts_with("currency")),
        "{r}"
    );
    let r = app.wait_processed("rej-amount").await;
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|s| s.starts_with("amount")),
        "{r}"
    );
    assert_eq!(app.earnings(b.id).await["total"], "0.00");
    app.stop().await;
}

#[tokio::test]
async fn one_batch_holding_repeats_a_conflict_a_rejection_and_garbage_records_each_correctly() {
    let mut app = TestApp::spawn_with(
        Services {
            worker: false,
            broker: true,
        },
        |s| s.worker.consumers = 1,
    )
    .await;
    let (a, b, c) = app.chain_abc().await;
    // A backlog the single consumer takes as one batch.
    let messages = [
        json!({"purchase_id": "batch-1", "buyer_id": c.id, "amount": "2000.00"}).to_string(),
        json!({"purchase_id": "batch-1", "buyer_id": c.id, "amount": 2000}).to_string(),
        json!({"purchase_id": "batch-1", "buyer_id": c.id, "amount": "7000.00"}).to_string(),
        "{ not json".to_owned(),
        json!({"purchase_id": "batch-2", "buyer_id": b.id, "amount": "3000.00"}).to_string(),
        json!({"purchase_id": "batch-3", "buyer_id": 99_999, "amount": "3000.00"}).to_string(),
        json!({"purchase_id": "batch-4", "buyer_id": c.id, "amount": "1000.01", "profit": "500.00"}).to_string(),
    ];
    for m in &messages {
        app.publish_raw(m.as_bytes()).await;
    }
    app.spawn_worker().await;
    app.wait_purchase_count(4, Duration::from_secs(20)).await;
    let r1 = app.wait_processed("batch-1").await;
    assert_eq!(
        (r1["status"].as_str(), r1["original_status"].as_str()),
        (Some("conflict"), Some("processed"))
    );
    assert_eq!(r1["conflicts"].as_array().map(Vec::len), Some(1), "{r1}");
    assert_eq!(app.wait_processed("batch-3").await["status"], "rejected");
    // batch-1: B 100.00, A 20.00; batch-2 (bought by B): A 150.00; batch-4 on profit 500: B 25.00, A 5.00
    assert_eq!(app.earnings(b.id).await["total"], "125.00");
    assert_eq!(app.earnings(a.id).await["total"], "175.00");
    let seqs: Vec<(i64, i64)> =
        sqlx::query_as("select earner_id, seq from earnings order by earner_id, seq")
            .fetch_all(&app.db)
            .await
            .expect("earnings");
    assert_eq!(
        seqs,
        vec![(a.id, 1), (a.id, 2), (a.id, 3), (b.id, 1), (b.id, 2)]
    );
    let dead = app.get_dead_letter().await;
    assert_eq!(dead.delivery.data, b"{ not json");
    app.stop().await;
}

/// A consumer of this test's own on `upline.purchases`, at priority 0 like the worker's second
/// consumer, that takes deliveries and never acknowledges them.
async fn bystander(app: &TestApp) -> (lapin::Connection, lapin::Consumer) {
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let conn = app.amqp().await;
    let channel = conn.create_channel().await.expect("channel");
    channel
        .basic_qos(5, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut arguments = FieldTable::default();
    arguments.insert("x-priority".into(), AMQPValue::LongInt(0));
    let consumer = channel
        .basic_consume(
            upline_common::amqp::PURCHASES_QUEUE,
            "bystander",
            BasicConsumeOptions::default(),
            arguments,
        )
        .await
        .expect("consume");
    (conn, consumer)
}

/// How many deliveries `consumer` gets within `within`.
async fn deliveries_within(consumer: &mut lapin::Consumer, within: Duration) -> usize {
    use futures_util::StreamExt;
    let mut n = 0;
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(delivery)) = tokio::time::timeout_at(deadline, consumer.next()).await {
        delivery.expect("a delivery");
        n += 1;
    }
    n
}

/// The worker's first consumer has the highest priority (`x-priority`), so under light load it
/// takes every purchase and batches are not split between consumers; only what overflows its
/// prefetch goes to the consumers below it. Seen from a bystander consumer at the second
/// consumer's priority: it gets nothing while purchases come one at a time (with equal
/// priorities the broker would hand it every third), and its share once a backlog fills the
/// first consumer's prefetch; what it held is paid once it lets go.
#[tokio::test]
async fn the_first_consumer_takes_every_purchase_until_its_prefetch_is_full() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.worker.consumers = 2;
        s.worker.prefetch = 2;
        s.worker.batch_size = 2;
    })
    .await;
    let (_, _, c) = app.chain_abc().await;
    let (conn, mut consumer) = bystander(&app).await;

    for i in 0..6 {
        let id = format!("light-{i}");
        app.purchase(&id, c.id, "2000.00").await;
        assert_eq!(
            deliveries_within(&mut consumer, Duration::from_millis(300)).await,
            0,
            "{id}: under light load the first consumer takes every purchase"
        );
        app.wait_processed(&id).await;
    }

    let backlog: Vec<upline_testkit::order::Order> = (0..40)
        .map(|i| {
            upline_testkit::order::Order::new(
                format!("backlog-{i}"),
                crate::harness::user_id(c.id),
                "2000.00".parse().expect("amount"),
            )
        })
        .collect();
    app.publish_all(backlog).await;
    let held = deliveries_within(&mut consumer, Duration::from_secs(2)).await;
    assert!(held > 0, "a backlog overflows to the lower priority");
    conn.close(200, "done").await.expect("close");
    app.wait_purchase_count(46, Duration::from_secs(30)).await;
    let earnings: i64 = sqlx::query_scalar("select count(*) from earnings")
        .fetch_one(&app.db)
        .await
        .expect("count");
    assert_eq!(earnings, 46 * 2, "every purchase paid once");
    app.stop().await;
}
