//! Many WebSocket subscribers across many users: delivered events per second, purchase-to-
//! client latency, and the notifier's memory per connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::stream::{self, StreamExt};
use rand::Rng;
use rust_decimal::Decimal;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use upline_common::amqp::Publisher;
use upline_common::auth::Auth;
use upline_common::protocol::{ServerMessage, Subscribe, Target};
use upline_common::UserId;
use upline_testkit::order::Order;

use super::env::{cpu_report, rss_bytes, seed_tree, subscribe, Bench, BenchEnv};
use super::{progress, progress_done, Latency};

#[derive(Debug, clap::Args)]
pub struct WsArgs {
    /// WebSocket connections.
    #[arg(long, default_value_t = 10_000)]
    subscribers: usize,
    /// Distinct users subscribed to (connections are spread evenly over them).
    #[arg(long, default_value_t = 1_000)]
    users: i64,
    /// Purchases per second published while subscribed.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Seconds of purchases.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    #[arg(long)]
    keep: bool,
}

pub async fn run(bench: Bench<'_>, args: WsArgs) -> anyhow::Result<()> {
    let mut env = BenchEnv::new(bench, "ws", args.keep).await?;
    let result = scenario(&mut env, &args).await;
    env.finish().await;
    result
}

async fn scenario(env: &mut BenchEnv, args: &WsArgs) -> anyhow::Result<()> {
    println!(
        "WebSocket fan-out: {} connections over {} users, {} purchases/s for {} s",
        args.subscribers, args.users, args.rate, args.duration
    );
    // Subscribed users 1..=users; their direct referrals (8 each) are the buyers.
    let tree = args.users * 8 + 1;
    seed_tree(&env.db, tree).await?;
    env.start("worker", &[]).await?;
    let notifier = env.start("notifier", &[]).await?;
    let (notifier_pid, ws_url) = (
        notifier.pid,
        format!("{}/ws", notifier.base.replacen("http", "ws", 1)),
    );
    let auth = Auth::new(&env.settings.auth);

    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let delivered = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let rss_before = rss_bytes(notifier_pid);
    let started = Instant::now();
    // Open the connections, 256 handshakes at a time.
    let sockets: Vec<anyhow::Result<_>> = stream::iter(0..args.subscribers)
        .map(|i| {
            let user = UserId::new((i as i64 % args.users) + 1).expect("positive");
            let (url, token, connected) =
                (ws_url.clone(), auth.issue(user, 0).token, connected.clone());
            async move {
                let ws = subscribe(&url, &Subscribe::new(Target::User(user), token, None)).await?;
                let n = connected.fetch_add(1, Ordering::Relaxed) + 1;
                if n % 500 == 0 {
                    progress(&format!("connected {n}"));
                }
                Ok(ws)
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    progress_done();
    let mut readers = Vec::with_capacity(sockets.len());
    for ws in sockets {
        let mut ws = ws?;
        let (sent, delivered, stop) = (sent.clone(), delivered.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut latency = Latency::new();
            loop {
                let msg = tokio::select! {
                    () = stop.cancelled() => break,
                    msg = ws.next() => msg,
                };
                match msg {
                    Some(Ok(Message::Text(t))) => {
                        let Ok(ServerMessage::Earning { earning }) = serde_json::from_str(&t)
                        else {
                            continue;
                        };
                        delivered.fetch_add(1, Ordering::Relaxed);
                        let sent = sent.lock().expect("not poisoned");
                        if let Some(t0) =
                            sent.get(earning.purchase_id.as_deref().unwrap_or_default())
                        {
                            latency.record(t0.elapsed());
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
            latency
        }));
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_bytes(notifier_pid);
    let per_connection = rss_after.saturating_sub(rss_before) as f64 / args.subscribers as f64;
    println!(
        "connected {} subscribers in {connect_secs:.1} s; notifier RSS {:.1} MiB → {:.1} MiB = {:.1} KiB per connection",
        args.subscribers,
        rss_before as f64 / 1_048_576.0,
        rss_after as f64 / 1_048_576.0,
        per_connection / 1024.0
    );

    // Drive purchases straight onto the queue at a steady rate.
    let publisher = Publisher::new(env.settings.amqp.clone(), Default::default())
        .with_connection_name("upline-bench");
    let currency = env.settings.commission.rules()?.currency;
    let cpu_before = env.cpu();
    let load_started = Instant::now();
    let total = args.rate * args.duration;
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let per_tick = (args.rate as f64 / 100.0).max(1.0);
    let mut published = 0u64;
    let mut confirms = Vec::new();
    let mut owed = 0.0;
    while published < total {
        ticker.tick().await;
        owed += per_tick;
        while owed >= 1.0 && published < total {
            owed -= 1.0;
            let buyer = rand::thread_rng().gen_range(2..=tree);
            let id = format!("w{published}");
            let purchase = Order::new(
                id.clone(),
                UserId::new(buyer).expect("a positive id"),
                Decimal::new(200_000, 2),
            )
            .to_purchase(&currency)?;
            sent.lock()
                .expect("not poisoned")
                .insert(id, Instant::now());
            let publisher = publisher.clone();
            confirms.push(tokio::spawn(
                async move { publisher.publish(&purchase).await },
            ));
            published += 1;
        }
        if published.is_multiple_of(args.rate.max(1)) {
            progress(&format!(
                "published {published}/{total}, delivered {}",
                delivered.load(Ordering::Relaxed)
            ));
        }
    }
    for c in confirms {
        c.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let expected = loop {
        // Each earning goes to every connection subscribed to its earner.
        let per_earner: Vec<(i64, i64)> = sqlx::query_as(
            "select earner_id, count(*) from earnings where earner_id <= $1 group by 1",
        )
        .bind(args.users)
        .fetch_all(&env.db)
        .await?;
        let expected: u64 = per_earner
            .iter()
            .map(|&(earner, n)| n as u64 * subscribers_of(args, earner))
            .sum();
        let processed = upline_testkit::pipeline::purchases(&env.db).await?;
        let got = delivered.load(Ordering::Relaxed);
        progress(&format!(
            "processed {processed}/{total}, delivered {got}/{expected}"
        ));
        if processed as u64 >= total && got >= expected {
            break expected;
        }
        if Instant::now() > deadline {
            progress_done();
            bail!("not all events delivered within 120 s: {got}/{expected}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    progress_done();
    let secs = load_started.elapsed();
    let cpu = cpu_report(&cpu_before, &env.cpu(), secs);
    stop.cancel();
    let mut latency = Latency::new();
    for r in readers {
        latency.add(&r.await?);
    }
    publisher.close().await;
    println!(
        "delivered {expected} events to {} subscribers in {:.1} s = {:.0} events/s",
        args.subscribers,
        secs.as_secs_f64(),
        expected as f64 / secs.as_secs_f64()
    );
    println!("purchase → client {}", latency.summary());
    println!("CPU (cores)       {cpu}");
    Ok(())
}

/// Connections subscribed to `user`: connection `i` follows user `i % users + 1`.
fn subscribers_of(args: &WsArgs, user: i64) -> u64 {
    let (s, u) = (args.subscribers as u64, args.users as u64);
    let index = u64::try_from(user - 1).unwrap_or(u64::MAX);
    s / u + u64::from(index < s % u)
}
