//! Ledger gates (docs/perf.md, "Ledger gates", "The gate before the earners"): a purchase
//! batch waits at its gate after inserting its purchases and before it locks an earner; and
//! standby consumers ("Standby consumers"): one consumer of each number consumes across all
//! workers.

use std::time::{Duration, Instant};

use upline_testkit::pipeline;
use upline_testkit::spawn::Service;

use crate::harness::{metrics_text, Services, TestApp};

/// With `worker.ledger_writers = 1` every consumer's batches pass gate 0. While another
/// session holds gate 0, a purchase is not recorded: the worker's batch inserts its purchase
/// (so it holds a transaction id), then waits for the gate before it locks its first earner.
/// Meanwhile the earners' rows are free: another session locks them with `nowait`. Once the
/// gate is free, the purchase is processed and its earners credited.
#[tokio::test]
async fn a_batch_waits_at_its_ledger_gate_before_it_locks_an_earner() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.worker.ledger_writers = 1;
        s.worker.consumers = 2;
    })
    .await;
    let (a, b, c) = app.chain_abc().await;

    let mut holder = app.db.begin().await.expect("begin");
    sqlx::query("select pg_advisory_xact_lock(hashtext('upline.ledger_gate'), 0)")
        .execute(&mut *holder)
        .await
        .expect("take gate 0");
    app.purchase("gated-1", c.id, "2000.00").await;

    // The worker's session waiting for gate 0, and its transaction id.
    let deadline = Instant::now() + Duration::from_secs(20);
    let xid = loop {
        let waiting: Option<(Option<String>,)> = sqlx::query_as(
            "select a.backend_xid::text
             from pg_locks l join pg_stat_activity a on a.pid = l.pid
             where not l.granted and l.locktype = 'advisory'
               and l.database = (select oid from pg_database where datname = current_database())
               and l.classid::int8 = hashtext('upline.ledger_gate')::oid::int8
               and l.objid = 0 and l.objsubid = 2",
        )
        .fetch_optional(&app.db)
        .await
        .expect("look for a session waiting at the gate");
        if let Some((xid,)) = waiting {
            break xid;
        }
        assert!(
            Instant::now() < deadline,
            "no worker session came to wait at gate 0 within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        xid.is_some(),
        "the batch inserts its purchases before the gate, so it waits with a transaction id"
    );
    // No earner's row is held by the waiting batch: they lock at once from here.
    let mut other = app.db.begin().await.expect("begin");
    let locked: Vec<i64> = sqlx::query_scalar(
        "select user_id from earner_balances where user_id = any($1)
         order by user_id for no key update nowait",
    )
    .bind(vec![a.id, b.id])
    .fetch_all(&mut *other)
    .await
    .expect("the earners' rows are not locked by a batch waiting at its gate");
    assert_eq!(locked.len(), 2);
    other.rollback().await.expect("let go of the earners");
    let recorded: i64 =
        sqlx::query_scalar("select count(*) from purchases where purchase_id = 'gated-1'")
            .fetch_one(&app.db)
            .await
            .expect("count");
    assert_eq!(
        recorded, 0,
        "nothing is committed before the gate is passed"
    );

    holder.rollback().await.expect("let go of gate 0");
    let report = app.wait_processed("gated-1").await;
    assert_eq!(report["status"], "processed");
    let credited: i64 = sqlx::query_scalar(
        "select count(*) from earnings where purchase_id = 'gated-1' and kind = 'commission'",
    )
    .fetch_one(&app.db)
    .await
    .expect("count earnings");
    assert_eq!(credited, 2, "both levels credited once the gate was passed");
    app.stop().await;
}

/// The consumers `upline.purchases` has now, as the broker counts them.
async fn queue_consumers(channel: &lapin::Channel) -> u32 {
    channel
        .queue_declare(
            upline_common::amqp::PURCHASES_QUEUE,
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("look at upline.purchases")
        .consumer_count()
}

/// Sessions holding a consumer slot in the app's database.
async fn slots_held(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_locks
         where granted and locktype = 'advisory'
           and database = (select oid from pg_database where datname = current_database())
           and classid::int8 = hashtext('upline.consumer_slot')::oid::int8",
    )
    .fetch_one(&app.db)
    .await
    .expect("count the consumer slots held")
}

/// Polls `check` every 50 ms until it is true, or fails with `what` after `within`.
async fn wait_for<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts `upline worker` as a process of its own with two consumers, a standby poll of
/// 200 ms and small batches.
fn spawn_worker(app: &TestApp) -> Service {
    app.worker_process()
        .env("UPLINE__WORKER__CONSUMERS", "2")
        .env("UPLINE__WORKER__STANDBY_POLL_MS", "200")
        .spawn()
        .expect("the upline binary starts")
}

/// docs/perf.md, "Standby consumers": two workers of two consumers each put two consumers on
/// `upline.purchases`, the first worker's, holding consumer slots 0 and 1; the second's stand
/// by, consuming nothing. When the first worker is killed (SIGKILL, mid-stream), the second's
/// consumers take the slots and finish the stream: every purchase recorded once, every earning
/// published.
#[tokio::test]
async fn one_consumer_per_slot_and_standbys_take_over_from_a_killed_worker() {
    let app = TestApp::spawn_with(Services::NO_WORKER, |_| {}).await;
    let (_, _, c) = app.chain_abc().await;
    let conn = app.amqp().await;
    let channel = conn.create_channel().await.expect("channel");
    let http = reqwest::Client::new();

    let mut first = spawn_worker(&app);
    first
        .wait_ready(&http, Duration::from_secs(30))
        .await
        .expect("first worker ready");
    wait_for(
        Duration::from_secs(10),
        "the first worker's consumers did not take the slots",
        || async { slots_held(&app).await == 2 && queue_consumers(&channel).await == 2 },
    )
    .await;
    let mut second = spawn_worker(&app);
    second
        .wait_ready(&http, Duration::from_secs(30))
        .await
        .expect("second worker ready");
    // Ten of the standbys' polls: still two consumers on the queue, two slots held.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        (queue_consumers(&channel).await, slots_held(&app).await),
        (2, 2),
        "standbys consume nothing"
    );
    for (worker, held) in [(&first, 2), (&second, 0)] {
        let metrics = metrics_text(&http, &worker.base()).await;
        assert!(
            metrics
                .lines()
                .any(|l| l == format!("upline_consumer_slots_held {held}")),
            "upline_consumer_slots_held {held} on {}/metrics:\n{metrics}",
            worker.base()
        );
    }

    app.publish_purchases("standby", c.id, 300).await;
    wait_for(
        Duration::from_secs(30),
        "the slots' holder did not start on the stream",
        || async { pipeline::purchases(&app.db).await.expect("count") > 0 },
    )
    .await;
    first.kill().await;
    app.publish_purchases("after-the-kill", c.id, 300).await;
    app.wait_purchase_count(600, Duration::from_secs(60)).await;
    assert_eq!(
        (queue_consumers(&channel).await, slots_held(&app).await),
        (2, 2),
        "the second worker's consumers took the slots"
    );
    pipeline::wait_outbox_empty(&app.db, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    // Each of the 600 purchases credited c's referrer and grand-referrer once, seq gap-free.
    let rows: Vec<(i64, i64, i64)> =
        sqlx::query_as("select earner_id, count(*), max(seq) from earnings group by 1 order by 1")
            .fetch_all(&app.db)
            .await
            .expect("earnings");
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (earner, count, max_seq) in rows {
        assert_eq!((count, max_seq), (600, 600), "earner {earner}");
    }
    second.kill().await;
    conn.close(200, "done").await.ok();
    app.stop().await;
}
