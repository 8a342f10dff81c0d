//! Generic plans for small ledger batches (docs/perf.md, "Planned once, not per batch").

use rust_decimal::Decimal;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use upline_common::rules::Rules;
use upline_testkit::order::Order;
use upline_worker::ledger::{self, Incoming, Item, GENERIC_PLANS_UP_TO};

use crate::harness::{user_id, Services, TestApp};

/// How often the upline statement of the ledger was executed on a generic plan and on a plan
/// made for its parameters, on the pool's one connection (`pg_prepared_statements`; the
/// pattern is anchored, so that it does not match this query's own text).
async fn upline_plans(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "select generic_plans, custom_plans from pg_prepared_statements
         where statement like 'with recursive up%'",
    )
    .fetch_one(pool)
    .await
    .expect("the upline statement is prepared on this connection")
}

fn item(rules: &Rules, purchase_id: String, buyer: i64) -> Item {
    let order = Order::new(purchase_id, user_id(buyer), Decimal::new(200_000, 2)); // Rs 2000.00
    let serde_json::Value::Object(body) = serde_json::to_value(&order).expect("serialises") else {
        unreachable!("an order serialises as an object")
    };
    Item {
        incoming: Incoming::Valid(order.to_purchase(&rules.currency).expect("a valid order")),
        body,
    }
}

/// Batches of up to `GENERIC_PLANS_UP_TO` purchases never make a plan of their own (with
/// `plan_cache_mode = auto`, PostgreSQL made one for each of at least the first five); a
/// larger batch gets a plan made for its size. Every batch still pays both levels.
#[tokio::test]
async fn small_batches_run_on_generic_plans_and_large_ones_get_plans_of_their_own() {
    let app = TestApp::spawn_with(Services::NO_WORKER, |_| {}).await;
    let (_, _, c) = app.chain_abc().await;
    let rules = app.settings.commission.rules().expect("rules");
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*app.db.connect_options()).clone())
        .await
        .expect("a pool of one connection");

    for i in 0..8 {
        let small = [item(&rules, format!("plan-small-{i}"), c.id)];
        let committed = ledger::record_batch(&pool, &rules, &small, None, None)
            .await
            .expect("a small batch is recorded");
        assert_eq!(committed.events.len(), 2, "both levels are paid");
    }
    assert_eq!(
        upline_plans(&pool).await,
        (8, 0),
        "eight small batches: eight executions on the generic plan, no plan of their own"
    );

    let large: Vec<Item> = (0..=GENERIC_PLANS_UP_TO)
        .map(|i| item(&rules, format!("plan-large-{i}"), c.id))
        .collect();
    let committed = ledger::record_batch(&pool, &rules, &large, None, None)
        .await
        .expect("a large batch is recorded");
    assert_eq!(committed.events.len(), 2 * large.len());
    assert_eq!(
        upline_plans(&pool).await,
        (8, 1),
        "a batch of {} purchases gets a plan made for it",
        large.len()
    );
    pool.close().await;
    app.stop().await;
}
