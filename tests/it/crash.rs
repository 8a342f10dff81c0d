//! A worker killed with SIGKILL in the middle of a stream loses and doubles nothing.

use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use upline_testkit::order::Order;
use upline_testkit::spawn::Service;
use upline_testkit::{oracle, pipeline};

use crate::harness::{user_id, Services, TestApp};

/// Starts `upline worker` as a separate process against the app's database and vhost.
fn spawn_worker(app: &TestApp) -> Service {
    app.worker_process()
        .spawn()
        .expect("the upline binary starts")
}

async fn processed(app: &TestApp) -> i64 {
    pipeline::purchases(&app.db).await.expect("count")
}

#[tokio::test]
async fn a_worker_killed_mid_stream_and_restarted_leaves_totals_exactly_right() {
    let app = TestApp::spawn_with(Services::NO_WORKER, |_| {}).await;
    // Two roots, four in the middle, eight buyers.
    let roots = [
        app.register("Root A", None).await,
        app.register("Root B", None).await,
    ];
    let mut mids = Vec::new();
    for i in 0..4 {
        mids.push(
            app.register(&format!("Mid {i}"), Some(roots[i % 2].id))
                .await,
        );
    }
    let mut buyers = Vec::new();
    for i in 0..8 {
        buyers.push(
            app.register(&format!("Buyer {i}"), Some(mids[i % 4].id))
                .await,
        );
    }

    // 400 purchases straight onto the queue before any worker runs.
    let orders: Vec<Order> = (0..400i64)
        .map(|i| {
            let buyer = &buyers[(i % 8) as usize];
            let amount = Decimal::new(90_000 + (i * 3_701) % 400_000, 2); // 900.00 … 4899.99
            Order::new(format!("kill-{i}"), user_id(buyer.id), amount)
        })
        .collect();
    let rules = app.settings.commission.rules().expect("rules");
    let expected = oracle::recompute(&app.db, &orders, &rules)
        .await
        .expect("recompute")
        .by_earner;
    app.publish_all(orders).await;

    // Kill the first worker with SIGKILL once it is well into the stream.
    let mut worker = spawn_worker(&app);
    let deadline = Instant::now() + Duration::from_secs(60);
    while processed(&app).await < 60 {
        assert!(
            Instant::now() < deadline,
            "the worker did not start processing"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    worker.kill().await; // SIGKILL, and reaped
    let at_kill = processed(&app).await;
    assert!(
        at_kill < 400,
        "the kill landed after the stream ended ({at_kill}); nothing was tested"
    );

    // A new worker finishes the stream, including whatever the dead one left unacknowledged
    // and any earnings it committed but did not publish.
    let mut worker = spawn_worker(&app);
    app.wait_purchase_count(400, Duration::from_secs(90)).await;
    pipeline::wait_outbox_empty(&app.db, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    worker.kill().await;

    let actual: Vec<(i64, Decimal, i64, i64)> = sqlx::query_as(
        "select earner_id, sum(amount), count(*), max(seq) from earnings group by 1",
    )
    .fetch_all(&app.db)
    .await
    .expect("totals");
    for (earner, total, count, max_seq) in &actual {
        assert_eq!(Some(total), expected.get(earner), "earner {earner}");
        assert_eq!(
            count, max_seq,
            "earner {earner}: seq must run 1..n without gaps"
        );
        let recorded: Decimal =
            sqlx::query_scalar("select total_earnings from earner_balances where user_id = $1")
                .bind(earner)
                .fetch_one(&app.db)
                .await
                .expect("user total");
        assert_eq!(&recorded, total, "earner {earner}: running total");
    }
    assert_eq!(actual.len(), expected.len());
    let doubled: i64 = sqlx::query_scalar("select count(*) from (select purchase_id, level from earnings group by 1, 2 having count(*) > 1) d")
        .fetch_one(&app.db)
        .await
        .expect("count");
    assert_eq!(doubled, 0);
    app.stop().await;
}
