//! How earning events leave the worker (README "Exactly once"): published right after the
//! ledger's commit, with `earning_outbox` as the recovery path for a worker that dies first.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use upline_common::amqp;
use upline_common::events::EarningEvent;

use crate::harness::{metric_value, metrics_text, Services, TestApp};

async fn outbox_rows(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from earning_outbox")
        .fetch_one(&app.db)
        .await
        .expect("count the outbox")
}

/// The next event on `deliveries` that `wanted` picks, acknowledging the others on the way.
async fn next_event(
    deliveries: &mut lapin::Consumer,
    wanted: impl Fn(&EarningEvent) -> bool,
) -> EarningEvent {
    loop {
        let delivery = tokio::time::timeout(Duration::from_secs(20), deliveries.next())
            .await
            .expect("an earning event within 20 s")
            .expect("the consumer is open")
            .expect("a delivery");
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
        let event: EarningEvent = serde_json::from_slice(&delivery.data).expect("an event");
        if wanted(&event) {
            return event;
        }
    }
}

/// A connection with a consumer of its own exclusive queue, bound to every earning event on
/// `upline.earnings`.
async fn earnings_consumer(app: &TestApp) -> (lapin::Connection, lapin::Consumer) {
    let conn = app.amqp().await;
    let channel = conn.create_channel().await.expect("channel");
    let queue = channel
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare a queue")
        .name()
        .as_str()
        .to_owned();
    channel
        .queue_bind(
            &queue,
            amqp::EARNINGS_EXCHANGE,
            "earning.#",
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind it to upline.earnings");
    let deliveries = channel
        .basic_consume(
            &queue,
            "outbox-test",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    (conn, deliveries)
}

async fn wait_outbox_empty(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while outbox_rows(app).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the outbox still holds published events"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With the sweep an hour apart, only the direct path can publish a purchase's earnings: they
/// reach the subscriber, and the outbox is empty again, as soon as the batch is recorded.
#[tokio::test]
async fn earning_events_are_published_right_after_the_commit_without_waiting_for_a_sweep() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.worker.outbox_poll_ms = 3_600_000;
    })
    .await;
    let (_, b, c) = app.chain_abc().await;
    let mut ws = app.subscribe(b.id, &b.token, None).await;
    for i in 0..3 {
        app.purchase(&format!("direct-{i}"), c.id, "2000.00").await;
    }
    let events = ws.earnings(3).await;
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    wait_outbox_empty(&app).await;
    // Counted as published by the direct path (the metrics recorder is the test process's, so
    // other tests' workers add to it too; none of this one's events went through a sweep).
    let worker = app.worker.as_deref().expect("a worker");
    let metrics = metrics_text(&app.http, worker).await;
    let direct = metric_value(&metrics, |l| {
        l.starts_with(r#"upline_earning_events_published_total{path="direct"}"#)
    });
    assert!(direct.is_some_and(|n| n >= 6.0), "{metrics}");
    app.stop().await;
}

/// The relay publishes a handed-over batch while earlier ones still await their confirms (up
/// to 8 settle at once). With batches of 2 purchases, one consumer and the sweep an hour apart,
/// 200 purchases go out as about a hundred direct hand-overs: the referrer's 200 events reach
/// the broker each once, in `seq` order, and every outbox row is deleted.
#[tokio::test]
async fn pipelined_direct_batches_reach_the_broker_once_each_in_seq_order() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.worker.outbox_poll_ms = 3_600_000;
        s.worker.batch_size = 2;
        s.worker.consumers = 1;
    })
    .await;
    let (_, b, c) = app.chain_abc().await;
    let (conn, mut deliveries) = earnings_consumer(&app).await;
    app.publish_purchases("pipelined", c.id, 200).await;
    let mut seqs = Vec::with_capacity(200);
    while seqs.len() < 200 {
        let event = next_event(&mut deliveries, |e| e.earner_id.get() == b.id).await;
        seqs.push(event.seq);
    }
    assert_eq!(seqs, (1..=200).collect::<Vec<i64>>());
    wait_outbox_empty(&app).await;
    let _ = conn.close(200, "done").await;
    app.stop().await;
}

/// The relay queues a whole batch's events on its channel before it awaits any of them, so
/// that the connection writes them together. 400 purchases wait on the queue before the
/// worker starts, so they are recorded in a few large batches (800 events, two earners
/// interleaved): each earner's events still reach the broker once each, in `seq` order.
#[tokio::test]
async fn a_large_batchs_events_reach_the_broker_in_each_earners_seq_order() {
    let mut app = TestApp::spawn_with(Services::NO_WORKER, |s| {
        s.worker.outbox_poll_ms = 3_600_000;
        s.worker.batch_size = 512;
        s.worker.consumers = 1;
    })
    .await;
    let (a, b, c) = app.chain_abc().await;
    let (conn, mut deliveries) = earnings_consumer(&app).await;
    app.publish_purchases("batched", c.id, 400).await;
    app.spawn_worker().await;
    let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
    while from_a.len() + from_b.len() < 800 {
        let event = next_event(&mut deliveries, |_| true).await;
        match event.earner_id.get() {
            id if id == a.id => from_a.push(event.seq),
            id if id == b.id => from_b.push(event.seq),
            other => panic!("an event for {other}, who earns nothing here"),
        }
    }
    let in_order: Vec<i64> = (1..=400).collect();
    assert_eq!(from_b, in_order, "the referrer's events, in seq order");
    assert_eq!(
        from_a, in_order,
        "the referrer's referrer's events, in seq order"
    );
    let transactions: i64 = sqlx::query_scalar("select count(distinct xmin::text) from purchases")
        .fetch_one(&app.db)
        .await
        .expect("count the ledger transactions");
    assert!(
        transactions <= 10,
        "400 purchases took {transactions} transactions; the test needs large batches"
    );
    wait_outbox_empty(&app).await;
    let _ = conn.close(200, "done").await;
    app.stop().await;
}

/// A row leased to a worker that died after its commit is left alone while the lease runs
/// (no relay publishes it behind the holder's back), then any relay's sweep publishes it: the
/// event reaches `upline.earnings` a second time, at least once, and the outbox empties.
#[tokio::test]
async fn a_dead_workers_leased_rows_wait_out_the_lease_then_any_relay_publishes_them() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
    let (conn, mut deliveries) = earnings_consumer(&app).await;
    app.purchase("lease-1", c.id, "2000.00").await;
    let first = next_event(&mut deliveries, |e| e.earner_id.get() == b.id).await;
    assert_eq!(first.seq, 1);
    wait_outbox_empty(&app).await;

    // The worker "dies" between its commit and its publish: its row is back, leased to it.
    sqlx::query(
        "insert into earning_outbox (earning_id, claimed_by, claimed_until) \
         values ($1, 'a-worker-that-died', now() + interval '3 seconds')",
    )
    .bind(first.earning_id)
    .execute(&app.db)
    .await
    .expect("a leased outbox row");
    let leased_at = Instant::now();
    // The sweep runs every 100 ms in the tests: for the rest of the lease it must skip the row.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        outbox_rows(&app).await,
        1,
        "a relay took a row another worker still holds"
    );
    let again = next_event(&mut deliveries, |e| e.earning_id == first.earning_id).await;
    assert!(
        leased_at.elapsed() >= Duration::from_millis(2900),
        "republished {:?} after the lease began, before it expired",
        leased_at.elapsed()
    );
    assert_eq!(
        (again.earning_id, again.seq, again.amount),
        (first.earning_id, first.seq, first.amount),
        "the same event, published again"
    );
    wait_outbox_empty(&app).await;
    let _ = conn.close(200, "done").await;
    app.stop().await;
}

/// A relay's claim leases at most one batch (500 rows), whatever plan PostgreSQL picks.
/// Found by `upline-bench rest`: on a fresh database the prepared claim had kept a plan made
/// while the outbox was nearly empty, a nested loop that re-ran `earning_id in (select … limit
/// 500 for update skip locked)` for every row of the outbox. One claim leased all 104,080 rows
/// and ran for minutes while their events waited. Here the planner is pushed to that plan; the
/// claim now takes its ids from an array evaluated once.
#[tokio::test]
async fn a_relay_claims_at_most_one_batch_whatever_plan_the_planner_picks() {
    let app = TestApp::spawn_with(Services::NO_WORKER, |_| {}).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = app.spawn_stoppable_worker(stop.clone()).await;
    let (_, _, c) = app.chain_abc().await;
    app.publish_purchases("claim", c.id, 400).await;
    app.wait_purchase_count(400, Duration::from_secs(120)).await;
    wait_outbox_empty(&app).await;
    stop.cancel();
    worker.await.expect("joined").expect("the worker stopped");

    // 800 earnings (2 levels × 400) back in the outbox, unleased, as after a broker outage.
    sqlx::query("insert into earning_outbox (earning_id) select id from earnings")
        .execute(&app.db)
        .await
        .expect("refill the outbox");
    assert_eq!(outbox_rows(&app).await, 800);
    let nested_loops = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .after_connect(|conn, _| {
            Box::pin(async move {
                for setting in [
                    "enable_hashjoin",
                    "enable_mergejoin",
                    "enable_material",
                    "enable_hashagg",
                    "enable_sort",
                ] {
                    sqlx::query(&format!("set {setting} = off"))
                        .execute(&mut *conn)
                        .await?;
                }
                Ok(())
            })
        })
        .connect(&app.settings.database.url)
        .await
        .expect("connect");
    let claimed =
        upline_worker::outbox::claim(&nested_loops, "test-relay", Duration::from_secs(60))
            .await
            .expect("claim");
    let leased: i64 =
        sqlx::query_scalar("select count(*) from earning_outbox where claimed_by = 'test-relay'")
            .fetch_one(&app.db)
            .await
            .expect("count the leases");
    assert_eq!(
        (claimed.len(), leased),
        (500, 500),
        "one batch claimed and leased"
    );
    let ids: Vec<i64> = claimed.iter().map(|e| e.id).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted, "oldest first");
    nested_loops.close().await;
    app.stop().await;
}
