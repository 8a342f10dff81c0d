//! Webhook throughput (contract §11): purchases published as fast as the broker confirms, a
//! worker and a webhooks service as separate processes, and endpoints served by this bench
//! (axum) that check every signature. Prints deliveries per second, the latency from an
//! earning's commit (`created_at`) to its arrival at the endpoint, the CPU of each process,
//! and whether every healthy endpoint got every earning exactly once. Optional slow endpoints
//! answer only after `--slow-ms`, to show what they cost the others.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use rand::Rng;
use rust_decimal::Decimal;
use upline_common::amqp::Publisher;
use upline_common::UserId;
use upline_testkit::order::Order;

use super::env::{cpu_report, seed_tree, Bench, BenchEnv};
use super::{progress, progress_done, Latency};

#[derive(Debug, clap::Args)]
pub struct WebhooksArgs {
    /// Purchases published (each credits 2 earnings, one `earning.created` webhook each).
    #[arg(long, default_value_t = 20_000)]
    purchases: u64,
    /// Healthy endpoints, each subscribed to `earning.created`: every earning is delivered
    /// to each of them.
    #[arg(long, default_value_t = 4)]
    endpoints: usize,
    /// Endpoints that answer only after `--slow-ms` (also subscribed to `earning.created`).
    #[arg(long, default_value_t = 0)]
    slow_endpoints: usize,
    /// How long a slow endpoint takes to answer, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    slow_ms: u64,
    /// Users in the referral tree.
    #[arg(long, default_value_t = 10_000)]
    users: i64,
    #[arg(long)]
    keep: bool,
}

/// What the endpoints saw.
#[derive(Default)]
struct Seen {
    /// Per healthy endpoint: how many times each webhook-id arrived.
    ids: Mutex<HashMap<(usize, String), u32>>,
    latency: Mutex<Option<Latency>>,
    /// Distinct (endpoint, webhook-id) pairs received by the healthy endpoints.
    delivered: AtomicU64,
    bad_signatures: AtomicU64,
}

struct Endpoints {
    seen: Seen,
    /// The key of each endpoint (base64), by index.
    keys: Vec<String>,
    healthy: usize,
    slow: Duration,
}

pub async fn run(bench: Bench<'_>, args: WebhooksArgs) -> anyhow::Result<()> {
    let mut env = BenchEnv::new(bench, "webhooks", args.keep).await?;
    let result = scenario(&mut env, &args).await;
    env.finish().await;
    result
}

async fn scenario(env: &mut BenchEnv, args: &WebhooksArgs) -> anyhow::Result<()> {
    println!(
        "webhooks: {} purchases, {} healthy endpoints, {} answering after {} ms",
        args.purchases, args.endpoints, args.slow_endpoints, args.slow_ms
    );
    seed_tree(&env.db, args.users).await?;
    let total_endpoints = args.endpoints + args.slow_endpoints;
    let keys: Vec<String> = (0..total_endpoints)
        .map(|_| {
            let key: [u8; 24] = rand::thread_rng().gen();
            base64::engine::general_purpose::STANDARD.encode(key)
        })
        .collect();
    let endpoints = Arc::new(Endpoints {
        seen: Seen {
            latency: Mutex::new(Some(Latency::new())),
            ..Seen::default()
        },
        keys: keys.clone(),
        healthy: args.endpoints,
        slow: Duration::from_millis(args.slow_ms),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/hook/{n}", axum::routing::post(receive))
        .with_state(endpoints.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    for (n, key) in keys.iter().enumerate() {
        sqlx::query(
            "insert into webhook_endpoints (url, event_types, secret) values ($1, '{earning.created}', $2)",
        )
        .bind(format!("http://{addr}/hook/{n}"))
        .bind(key)
        .execute(&env.db)
        .await?;
    }
    let webhooks = [
        ("UPLINE__WEBHOOKS__ALLOW_PRIVATE_TARGETS", "true".to_owned()),
        ("UPLINE__WEBHOOKS__POLL_MS", "100".to_owned()),
    ];
    env.start("webhooks", &webhooks).await?;
    env.start("worker", &[]).await?;

    let publisher = Publisher::new(env.settings.amqp.clone(), Default::default())
        .with_connection_name("upline-bench");
    let currency = env.settings.commission.rules()?.currency;
    let cpu_before = env.cpu();
    let started = Instant::now();
    let mut confirms = Vec::new();
    let buyers = 2..=args.users;
    for i in 0..args.purchases {
        let buyer = rand::thread_rng().gen_range(buyers.clone());
        let purchase = Order::new(
            format!("wh{i}"),
            UserId::new(buyer).expect("a positive id"),
            Decimal::new(200_000, 2),
        )
        .to_purchase(&currency)?;
        let publisher = publisher.clone();
        confirms.push(tokio::spawn(
            async move { publisher.publish(&purchase).await },
        ));
        if confirms.len() >= 1000 {
            for c in confirms.drain(..) {
                c.await??;
            }
            progress(&format!(
                "published {}/{}, delivered {}",
                i + 1,
                args.purchases,
                endpoints.seen.delivered.load(Ordering::Relaxed)
            ));
        }
    }
    for c in confirms {
        c.await??;
    }
    publisher.close().await;
    let published_in = started.elapsed();
    // Every purchase pays 2 levels except the root's direct referrals (1 level).
    let deadline = Instant::now() + Duration::from_secs(600);
    let expected = loop {
        let processed = upline_testkit::pipeline::purchases(&env.db).await?;
        let earnings: i64 = sqlx::query_scalar("select count(*) from earnings")
            .fetch_one(&env.db)
            .await?;
        let expected = earnings as u64 * args.endpoints as u64;
        let got = endpoints.seen.delivered.load(Ordering::Relaxed);
        progress(&format!(
            "processed {processed}/{}, delivered {got}/{expected} to the healthy endpoints",
            args.purchases
        ));
        if processed as u64 >= args.purchases && got >= expected {
            break expected;
        }
        if Instant::now() > deadline {
            progress_done();
            bail!("not every webhook delivered within 600 s: {got}/{expected}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    progress_done();
    let secs = started.elapsed();
    let cpu = cpu_report(&cpu_before, &env.cpu(), secs);
    let ids = endpoints.seen.ids.lock().expect("not poisoned");
    let twice = ids.values().filter(|n| **n > 1).count();
    let distinct = ids.len() as u64;
    let latency = endpoints
        .seen
        .latency
        .lock()
        .expect("not poisoned")
        .take()
        .context("latency")?;
    let bad = endpoints.seen.bad_signatures.load(Ordering::Relaxed);
    server.abort();
    println!(
        "published {} purchases in {:.1} s; {expected} webhooks to {} healthy endpoints in {:.1} s = {:.0} deliveries/s",
        args.purchases,
        published_in.as_secs_f64(),
        args.endpoints,
        secs.as_secs_f64(),
        expected as f64 / secs.as_secs_f64()
    );
    println!("earning committed → endpoint {}", latency.summary());
    println!("CPU (cores)       {cpu}");
    println!(
        "distinct (endpoint, webhook-id) {distinct} of {expected}; received more than once: {twice}; bad signatures: {bad}"
    );
    if distinct != expected || bad > 0 {
        bail!("the healthy endpoints did not get every webhook with a valid signature");
    }
    Ok(())
}

/// An endpoint: checks the signature, records the webhook-id and the latency since the
/// earning's `created_at`; slow endpoints answer after their delay.
async fn receive(
    State(endpoints): State<Arc<Endpoints>>,
    Path(n): Path<usize>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let (id, timestamp) = (header("webhook-id"), header("webhook-timestamp"));
    let Some(key) = endpoints.keys.get(n) else {
        return StatusCode::NOT_FOUND;
    };
    let expected = upline_webhooks::signing::sign(key, id, timestamp.parse().unwrap_or(0), &body)
        .unwrap_or_default();
    if !header("webhook-signature")
        .split(' ')
        .any(|s| s == expected)
    {
        endpoints
            .seen
            .bad_signatures
            .fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED;
    }
    if n >= endpoints.healthy {
        tokio::time::sleep(endpoints.slow).await;
        return StatusCode::NO_CONTENT;
    }
    let created = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["data"]["created_at"].as_str().map(str::to_owned))
        .and_then(|t| {
            time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).ok()
        });
    if let Some(created) = created {
        let age = time::OffsetDateTime::now_utc() - created;
        if let Some(latency) = endpoints
            .seen
            .latency
            .lock()
            .expect("not poisoned")
            .as_mut()
        {
            latency.record(age.try_into().unwrap_or_default());
        }
    }
    let first = {
        let mut ids = endpoints.seen.ids.lock().expect("not poisoned");
        let times = ids.entry((n, id.to_owned())).or_default();
        *times += 1;
        *times == 1
    };
    if first {
        endpoints.seen.delivered.fetch_add(1, Ordering::Relaxed);
    }
    StatusCode::NO_CONTENT
}
