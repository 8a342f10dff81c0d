//! Ledger gates (docs/perf.md, "Ledger gates"): a purchase batch waits at its gate before it
//! writes anything.

use std::time::{Duration, Instant};

use crate::harness::{Services, TestApp};

/// With `worker.ledger_writers = 1` every consumer's batches pass gate 0. While another
/// session holds gate 0, a purchase is not recorded: the worker's session waits for the gate
/// before its first write (no transaction id, so no row lock either). Once the gate is free,
/// the purchase is processed.
#[tokio::test]
async fn a_batch_waits_at_its_ledger_gate_before_it_writes() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.worker.ledger_writers = 1;
        s.worker.consumers = 2;
    })
    .await;
    let (_, _, c) = app.chain_abc().await;

    let mut holder = app.db.begin().await.expect("begin");
    sqlx::query("select pg_advisory_xact_lock(hashtext('upline.ledger_gate'), 0)")
        .execute(&mut *holder)
        .await
        .expect("take gate 0");
    app.purchase("gated-1", c.id, "2000.00").await;

    // The worker's session waiting for gate 0, and its transaction id if it has one.
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
    assert_eq!(
        xid, None,
        "a batch waits at its gate before its first write"
    );
    let recorded: i64 =
        sqlx::query_scalar("select count(*) from purchases where purchase_id = 'gated-1'")
            .fetch_one(&app.db)
            .await
            .expect("count");
    assert_eq!(recorded, 0, "nothing is recorded before the gate is passed");

    holder.rollback().await.expect("let go of gate 0");
    let report = app.wait_processed("gated-1").await;
    assert_eq!(report["status"], "processed");
    app.stop().await;
}
