//! REST end to end: accepted → processed → earning event delivered on a WebSocket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::StreamExt;
use rand::Rng;
use rust_decimal::Decimal;
use secrecy::ExposeSecret;
use tokio_tungstenite::tungstenite::Message;
use upline_common::auth::Auth;
use upline_common::protocol::{ServerMessage, Subscribe, Target};
use upline_common::{Level, UserId};
use upline_testkit::client::Api;
use upline_testkit::order::Order;
use upline_testkit::{oracle, pipeline};

use super::churn;
use super::env::{batch_report, cpu_report, rss_bytes, seed_tree, subscribe, Bench, BenchEnv};
use super::{pacer, progress, progress_done, Latency};

#[derive(Debug, clap::Args)]
pub struct RestArgs {
    /// Users in the referral tree (a complete 8-ary tree).
    #[arg(long, default_value_t = 10_000)]
    users: i64,
    /// Seconds of load.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Concurrent HTTP connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Target purchases per second in total (steady load for latency); unset = as fast as possible.
    #[arg(long)]
    rate: Option<u64>,
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// A soak's report: every this many seconds, the purchase → WebSocket latency of the
    /// purchases sent in that window, each service's resident memory, the hot tables' dead
    /// rows, the CPU per process and what PostgreSQL's active sessions waited on (sampled every
    /// 50 ms); at the end, the last window against the first.
    #[arg(long)]
    window_secs: Option<u64>,
    /// WebSocket subscribers beside the observer that each follow one earner, dropping the
    /// connection every 2–10 s and reconnecting with `since` (churn).
    #[arg(long, default_value_t = 0)]
    churn: usize,
    /// Seconds at the start whose purchases are left out of the latency figures; they are
    /// still sent, processed, delivered and checked. The first purchases after the services
    /// start pay for first connections and cold caches in every process (docs/perf.md, "The
    /// first second, and a p99 of enough purchases"). The purchase → WebSocket figures with
    /// them are printed too.
    #[arg(long, default_value_t = 0)]
    warmup_secs: u64,
    /// Keep the benchmark's database and vhost afterwards.
    #[arg(long)]
    keep: bool,
}

/// What one soak window ended with.
struct WindowSample {
    accepted: u64,
    /// Resident memory per service, MiB.
    rss: Vec<(String, f64)>,
    /// Dead and live row versions of the hot tables (`pg_stat_user_tables`).
    tables: Vec<(String, i64, i64)>,
    /// CPU seconds so far, as [`BenchEnv::cpu`].
    cpu: Vec<(String, f64)>,
    /// What PostgreSQL's active sessions were doing over the window, from [`WaitEvents`].
    waits: WaitCounts,
}

/// How often a soak looks at what PostgreSQL's sessions are waiting on.
const WAIT_SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Over one window: how many times `pg_stat_activity` was sampled, and how many session
/// samples were active per wait event (`wait_event_type:wait_event`, or `running` for none:
/// on a core or waiting for one).
#[derive(Debug, Default, Clone)]
struct WaitCounts {
    polls: u64,
    by_event: std::collections::BTreeMap<String, u64>,
}

/// Samples the active sessions of the bench's database every [`WAIT_SAMPLE_EVERY`] until
/// stopped, counting what each is waiting on; a soak takes the counts at each window's end.
/// It tells a window slowed by waiting on the disk (`IO:WALSync`, `LWLock:WALWrite`) from one
/// slowed by locks or by the cores.
struct WaitEvents {
    counts: Arc<Mutex<WaitCounts>>,
    stop: tokio_util::sync::CancellationToken,
}

impl WaitEvents {
    fn start(db: sqlx::PgPool) -> WaitEvents {
        let counts: Arc<Mutex<WaitCounts>> = Arc::default();
        let stop = tokio_util::sync::CancellationToken::new();
        let (into, until) = (counts.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(WAIT_SAMPLE_EVERY);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = until.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                let rows: Vec<(String, i64)> = match sqlx::query_as(
                    "select coalesce(wait_event_type || ':' || wait_event, 'running'), count(*)
                     from pg_stat_activity
                     where datname = current_database() and state = 'active'
                       and pid <> pg_backend_pid()
                     group by 1",
                )
                .fetch_all(&db)
                .await
                {
                    Ok(rows) => rows,
                    Err(_) => continue,
                };
                let mut c = into.lock().expect("not poisoned");
                c.polls += 1;
                for (event, n) in rows {
                    *c.by_event.entry(event).or_default() += n.unsigned_abs();
                }
            }
        });
        WaitEvents { counts, stop }
    }

    /// The counts since the last take.
    fn take(&self) -> WaitCounts {
        std::mem::take(&mut *self.counts.lock().expect("not poisoned"))
    }
}

impl Drop for WaitEvents {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl std::fmt::Display for WaitCounts {
    /// `1.42 active: running 61 %, IO:WALSync 22 %, …` (the mean number of active sessions,
    /// then each event's share of the active session samples, largest first, the top five).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: u64 = self.by_event.values().sum();
        if self.polls == 0 || total == 0 {
            return f.write_str("no active session sampled");
        }
        let mut events: Vec<(&String, &u64)> = self.by_event.iter().collect();
        events.sort_by(|a, b| b.1.cmp(a.1));
        write!(f, "{:.2} active:", total as f64 / self.polls as f64)?;
        for (i, (event, n)) in events.iter().take(5).enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            write!(f, "{sep}{event} {:.0} %", 100.0 * **n as f64 / total as f64)?;
        }
        Ok(())
    }
}

pub async fn run(bench: Bench<'_>, args: RestArgs) -> anyhow::Result<()> {
    let mut env = BenchEnv::new(bench, "rest", args.keep).await?;
    let result = scenario(&mut env, &args).await;
    env.finish().await;
    result
}

async fn scenario(env: &mut BenchEnv, args: &RestArgs) -> anyhow::Result<()> {
    println!(
        "REST end to end: {} users, {} s, {} connections, {}, {} worker(s)",
        args.users,
        args.duration,
        args.connections,
        args.rate
            .map_or("as fast as possible".to_owned(), |r| format!(
                "{r} purchases/s"
            )),
        args.workers
    );
    seed_tree(&env.db, args.users).await?;
    for _ in 0..args.workers {
        env.start("worker", &[]).await?;
    }
    // The observer below follows every earning on one admin feed, which is closed (`lagged`)
    // once it falls `notifier.buffer` frames behind; at full speed the worker publishes
    // ~10,000 events/s in bursts, and on two shared cores the observer's reads can stall for
    // longer than 1,024 frames take. It is the instrument, not the system under test: give it
    // room.
    env.start(
        "notifier",
        &[("UPLINE__NOTIFIER__BUFFER", "65536".to_owned())],
    )
    .await?;
    env.start("api", &[]).await?;
    let api = env.service("api").expect("started").base.clone();
    let ws_url = format!(
        "{}/ws",
        env.service("notifier")
            .expect("started")
            .base
            .replacen("http", "ws", 1)
    );
    let admin = env.settings.auth.admin_token.expose_secret().to_owned();
    let producer = env.settings.auth.producer_token.expose_secret().to_owned();
    let client = Api::new(env.http.clone(), &api, &admin, &producer);

    // The observer: one admin subscription to every earning.
    let started = Instant::now();
    let warmed = started + Duration::from_secs(args.warmup_secs);
    let window = args.window_secs.map(|w| Duration::from_secs(w.max(1)));
    let sent: Arc<Mutex<HashMap<String, (Instant, time::OffsetDateTime)>>> = Arc::default();
    let delivered = Arc::new(AtomicU64::new(0));
    let stop_observer = tokio_util::sync::CancellationToken::new();
    let observer = {
        let (sent, delivered, stop) = (sent.clone(), delivered.clone(), stop_observer.clone());
        let mut ws = subscribe(&ws_url, &Subscribe::new(Target::All, admin.as_str(), None)).await?;
        tokio::spawn(async move {
            // Whole path, then split at the ledger transaction (the event's created_at is
            // PostgreSQL's now(): the start of the transaction that credited it).
            let (mut latency, mut to_ledger, mut from_ledger) =
                (Latency::new(), Latency::new(), Latency::new());
            // The whole path including the warm-up's purchases.
            let mut with_warmup = Latency::new();
            // By the window the purchase was sent in.
            let mut windows: Vec<Latency> = Vec::new();
            let mut slowest = Slowest::default();
            loop {
                let msg = tokio::select! {
                    () = stop.cancelled() => break,
                    msg = ws.next() => msg,
                };
                let Some(Ok(Message::Text(text))) = msg else {
                    match msg {
                        None => break,
                        // Say why: a feed closed under load (`lagged`) stops the count.
                        Some(Ok(Message::Close(frame))) => {
                            eprintln!("\nobserver: the notifier closed the admin feed: {frame:?}");
                        }
                        Some(Err(e)) => eprintln!("\nobserver: WebSocket error: {e}"),
                        _ => {}
                    }
                    continue;
                };
                let Ok(ServerMessage::Earning { earning }) = serde_json::from_str(&text) else {
                    continue;
                };
                delivered.fetch_add(1, Ordering::Relaxed);
                if earning.level.map(Level::get) == Some(1) {
                    let sent_at = sent
                        .lock()
                        .expect("not poisoned")
                        .remove(earning.purchase_id.as_deref().unwrap_or_default());
                    if let Some((t, wall)) = sent_at {
                        let took = t.elapsed();
                        with_warmup.record(took);
                        if t < warmed {
                            continue;
                        }
                        latency.record(took);
                        if let Some(w) = window {
                            let i = (t.duration_since(started).as_secs() / w.as_secs()) as usize;
                            if windows.len() <= i {
                                windows.resize_with(i + 1, Latency::new);
                            }
                            windows[i].record(took);
                        }
                        let (created, now) = (earning.created_at, time::OffsetDateTime::now_utc());
                        let to: Duration = (created - wall).try_into().unwrap_or_default();
                        let from: Duration = (now - created).try_into().unwrap_or_default();
                        to_ledger.record(to);
                        from_ledger.record(from);
                        slowest.add(took, to, from, t.duration_since(started));
                    }
                }
            }
            (
                latency,
                to_ledger,
                from_ledger,
                windows,
                slowest,
                with_warmup,
            )
        })
    };

    let accepted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = started + Duration::from_secs(args.duration);
    let churn = (args.churn > 0).then(|| {
        // The earners of the 8-ary tree: every user with a referral.
        let earners = (args.users - 2) / 8 + 1;
        tokio::spawn(churn::run(
            ws_url.clone(),
            Auth::new(&env.settings.auth),
            earners,
            args.churn,
            deadline,
        ))
    });
    let cpu_before = env.cpu();
    let mut tasks = Vec::new();
    for task in 0..args.connections {
        let (client, sent, accepted, failed) = (
            client.clone(),
            sent.clone(),
            accepted.clone(),
            failed.clone(),
        );
        let users = args.users;
        let (rate, connections) = (args.rate, args.connections);
        tasks.push(tokio::spawn(async move {
            let mut latency = Latency::new();
            let mut sent_list = Vec::new();
            let mut ticker = pacer(rate, connections);
            let mut n = 0u64;
            while Instant::now() < deadline {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let (buyer, amount) = {
                    let mut rng = rand::thread_rng();
                    // Users from 10 on have two levels above them.
                    (
                        rng.gen_range(10..=users),
                        Decimal::new(rng.gen_range(50_000..500_000), 2),
                    )
                };
                let id = format!("r{task}-{n}");
                n += 1;
                let t0 = Instant::now();
                sent.lock()
                    .expect("not poisoned")
                    .insert(id.clone(), (t0, time::OffsetDateTime::now_utc()));
                let buyer = UserId::new(buyer).expect("a positive id");
                let order = Order::new(id.clone(), buyer, amount);
                let r = client.post_purchase(&order).await;
                if t0 >= warmed {
                    latency.record(t0.elapsed());
                }
                match r {
                    Ok(r) if r.status().as_u16() == 202 => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        sent_list.push(order);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        sent.lock().expect("not poisoned").remove(&id);
                    }
                }
            }
            (latency, sent_list)
        }));
    }
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let mut samples: Vec<WindowSample> = Vec::new();
    let waits = window.map(|_| WaitEvents::start(env.db.clone()));
    while Instant::now() < deadline {
        ticker.tick().await;
        if let (Some(w), Some(waits)) = (window, &waits) {
            if started.elapsed() >= w * (samples.len() as u32 + 1) {
                samples.push(sample(env, accepted.load(Ordering::Relaxed), waits.take()).await?);
            }
        }
        let secs = started.elapsed().as_secs_f64();
        progress(&format!(
            "{secs:>5.1} s  accepted {} ({:.0}/s)  delivered events {}",
            accepted.load(Ordering::Relaxed),
            accepted.load(Ordering::Relaxed) as f64 / secs,
            delivered.load(Ordering::Relaxed)
        ));
    }
    let mut http_latency = Latency::new();
    let mut all_sent = Vec::new();
    for t in tasks {
        let (l, s) = t.await?;
        http_latency.add(&l);
        all_sent.extend(s);
    }
    let load_time = started.elapsed();
    let accepted_n = accepted.load(Ordering::Relaxed);

    // Drain: every accepted purchase processed, every earning delivered.
    let drain_deadline = Instant::now() + Duration::from_secs(300);
    let (processed, earnings) = loop {
        let processed = pipeline::purchases(&env.db).await?;
        let earnings: i64 = sqlx::query_scalar("select count(*) from earnings")
            .fetch_one(&env.db)
            .await?;
        let d = delivered.load(Ordering::Relaxed);
        progress(&format!(
            "draining: processed {processed}/{accepted_n}, delivered {d}/{earnings}"
        ));
        if processed as u64 >= accepted_n && d >= earnings as u64 {
            break (processed, earnings);
        }
        if Instant::now() > drain_deadline {
            progress_done();
            // Where the events stopped: still in the outbox (the relay), or published but not
            // delivered (the notifier or the observer).
            let outbox: i64 = sqlx::query_scalar("select count(*) from earning_outbox")
                .fetch_one(&env.db)
                .await?;
            bail!("not drained within 300 s: processed {processed}/{accepted_n}, delivered {d}/{earnings}, {outbox} events still in the outbox");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    progress_done();
    let total_time = started.elapsed();
    let cpu_after = env.cpu();
    stop_observer.cancel();
    let (e2e, to_ledger, from_ledger, windows, slowest, with_warmup) = observer.await?;
    let churned = match churn {
        Some(task) => Some(task.await?),
        None => None,
    };

    let rules = env.settings.commission.rules()?;
    let expected = oracle::recompute(&env.db, &all_sent, &rules).await?;
    let differences = oracle::compare(&env.db, "r", &expected).await?;

    println!(
        "accepted        {accepted_n} purchases in {:.1} s = {:.0}/s ({} failed)",
        load_time.as_secs_f64(),
        accepted_n as f64 / load_time.as_secs_f64(),
        failed.load(Ordering::Relaxed)
    );
    println!("end to end      all {processed} processed and {earnings} earning events delivered after {:.1} s = {:.0} purchases/s", total_time.as_secs_f64(), processed as f64 / total_time.as_secs_f64());
    println!("HTTP latency    {}", http_latency.summary());
    println!("to WebSocket    {}", e2e.summary());
    println!(
        "  of which      POST → ledger transaction start {}",
        to_ledger.summary()
    );
    println!(
        "                ledger transaction start → WebSocket {}",
        from_ledger.summary()
    );
    println!("  slowest       {slowest}");
    if args.warmup_secs > 0 {
        println!(
            "  warm-up       the purchases sent in the first {} s are left out above; with them, to WebSocket {}",
            args.warmup_secs,
            with_warmup.summary()
        );
    }
    println!(
        "CPU (cores)     {}",
        cpu_report(&cpu_before, &cpu_after, total_time)
    );
    println!("ledger batches  {}", batch_report(env.batches().await?));
    if let Some(w) = window {
        print_windows(w, &windows, &samples, &cpu_before);
    }
    if let Some(c) = &churned {
        println!(
            "churn           {} connections subscribed, {} earnings received, {} failed, {} out of seq order",
            c.connections, c.earnings, c.failures, c.out_of_order
        );
        if c.out_of_order > 0 {
            bail!("check FAILED: a churning subscriber received an earning twice or out of order");
        }
    }
    if differences.is_empty() && expected.count as i64 == earnings {
        println!(
            "check           passed: {} earnings, totals equal an independent recomputation",
            expected.count
        );
        Ok(())
    } else {
        for d in &differences {
            println!("  {d}");
        }
        bail!(
            "check FAILED: expected {} earnings, found {earnings}; {} difference(s)",
            expected.count,
            differences.len()
        )
    }
}

/// The purchases slowest to reach the WebSocket, to tell whether a tail is one stage's or the
/// whole machine's: each as its total, split at the ledger transaction's start, and when it
/// was sent.
#[derive(Debug, Default)]
struct Slowest(Vec<SlowPurchase>);

#[derive(Debug)]
struct SlowPurchase {
    total: Duration,
    to_ledger: Duration,
    from_ledger: Duration,
    sent: Duration,
}

impl Slowest {
    /// How many are kept.
    const KEEP: usize = 5;

    fn add(&mut self, total: Duration, to_ledger: Duration, from_ledger: Duration, sent: Duration) {
        if self.0.len() == Self::KEEP && self.0.last().is_some_and(|p| p.total >= total) {
            return;
        }
        self.0.push(SlowPurchase {
            total,
            to_ledger,
            from_ledger,
            sent,
        });
        self.0.sort_by_key(|p| std::cmp::Reverse(p.total));
        self.0.truncate(Self::KEEP);
    }
}

impl std::fmt::Display for Slowest {
    /// `12.31 ms (POST → transaction 2.10 + → WebSocket 10.21) at 4.5 s; …`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(
                f,
                "{:.2} ms (POST → transaction {:.2} + → WebSocket {:.2}) at {:.1} s",
                ms(p.total),
                ms(p.to_ledger),
                ms(p.from_ledger),
                p.sent.as_secs_f64()
            )?;
        }
        Ok(())
    }
}

/// Each service's RSS, the hot tables' row versions and the CPU used so far, now; with the
/// window's `waits`.
async fn sample(env: &BenchEnv, accepted: u64, waits: WaitCounts) -> anyhow::Result<WindowSample> {
    let rss = env
        .services
        .iter()
        .map(|s| (s.name.clone(), rss_bytes(s.pid) as f64 / 1_048_576.0))
        .collect();
    let tables = sqlx::query_as(
        "select relname::text, n_dead_tup, n_live_tup from pg_stat_user_tables
         where relname in ('users', 'earning_outbox', 'earner_levels') order by relname",
    )
    .fetch_all(&env.db)
    .await?;
    Ok(WindowSample {
        accepted,
        rss,
        tables,
        cpu: env.cpu(),
        waits,
    })
}

/// One line per soak window, then the last window against the first.
fn print_windows(
    window: Duration,
    latency: &[Latency],
    samples: &[WindowSample],
    cpu_at_start: &[(String, f64)],
) {
    let w = window.as_secs();
    let mut before = 0;
    let mut cpu_before = cpu_at_start;
    for (i, s) in samples.iter().enumerate() {
        let rss: Vec<String> = s
            .rss
            .iter()
            .map(|(n, mib)| format!("{n} {mib:.1}"))
            .collect();
        let tables: Vec<String> = s
            .tables
            .iter()
            .map(|(n, dead, live)| format!("{n} {dead}/{live}"))
            .collect();
        println!(
            "window {:>5}-{:<5} s  {:>6} purchases  to WebSocket {}\n                     RSS MiB: {}; dead/live rows: {}\n                     CPU (cores) {}\n                     PostgreSQL sessions, {}",
            i as u64 * w,
            (i as u64 + 1) * w,
            s.accepted - before,
            latency.get(i).map_or("no samples".into(), Latency::summary),
            rss.join(", "),
            tables.join(", "),
            cpu_report(cpu_before, &s.cpu, window),
            s.waits
        );
        before = s.accepted;
        cpu_before = &s.cpu;
    }
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return;
    };
    let last_i = samples.len() - 1;
    let p99 = |i: usize| latency.get(i).and_then(|l| l.quantile_ms(0.99));
    if let (Some(a), Some(b)) = (p99(0), p99(last_i)) {
        println!(
            "soak            p99 to WebSocket: first window {a:.2} ms, last {b:.2} ms = {:.2}×",
            b / a
        );
    }
    let growth: Vec<String> = first
        .rss
        .iter()
        .zip(&last.rss)
        .map(|((n, a), (_, b))| format!("{n} {a:.1} → {b:.1}"))
        .collect();
    println!(
        "soak            RSS MiB, first window → last: {}",
        growth.join(", ")
    );
}
