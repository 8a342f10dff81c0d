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

/// A row leased to a worker that died after its commit is left alone while the lease runs
/// (no relay publishes it behind the holder's back), then any relay's sweep publishes it: the
/// event reaches `upline.earnings` a second time, at least once, and the outbox empties.
#[tokio::test]
async fn a_dead_workers_leased_rows_wait_out_the_lease_then_any_relay_publishes_them() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
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
    let mut deliveries = channel
        .basic_consume(
            &queue,
            "outbox-test",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
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
