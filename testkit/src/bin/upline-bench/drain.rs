//! Queue backlog drain: N purchases waiting on `upline.purchases`, drained by 1, 2, 4 …
//! worker processes; next to "PostgreSQL alone": the same purchases applied by the ledger's
//! batch transaction straight to the database, with no broker in the way.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::stream::{self, StreamExt};
use futures_util::{future, FutureExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use upline_common::amqp::{self, Publisher};
use upline_common::events::EarningEvent;
use upline_common::UserId;
use upline_testkit::order::{self, Order};
use upline_testkit::{oracle, pipeline};
use upline_worker::ledger::{self, Incoming, Item};

use super::env::{
    batch_report, cpu_report, forest_tree, run_queue_wait, sched_by_command, seed_forest,
    seed_tree, stat_cpu, Bench, BenchEnv,
};
use super::{progress, progress_done};

#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    /// Purchases in the backlog.
    #[arg(long, default_value_t = 100_000)]
    purchases: usize,
    /// Users in the referral tree.
    #[arg(long, default_value_t = 10_000)]
    users: i64,
    /// Worker counts to measure, comma-separated; `0` alone measures only PostgreSQL alone.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    workers: Vec<usize>,
    /// Consumers per worker process (UPLINE__WORKER__CONSUMERS); default from configuration.
    #[arg(long)]
    consumers: Option<u16>,
    /// Batch size (UPLINE__WORKER__BATCH_SIZE); default from configuration.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Prefetch (UPLINE__WORKER__PREFETCH); default from configuration.
    #[arg(long)]
    prefetch: Option<u16>,
    /// Skip the PostgreSQL-alone baseline.
    #[arg(long)]
    no_baseline: bool,
    /// Run the PostgreSQL-alone baseline a second time while two busy threads of this process
    /// take about this many cores between them (each spinning while behind its share of CPU
    /// time, checked every 10 ms). They
    /// stand in for the CPU that RabbitMQ and the worker take during a drain (about 0.7 cores
    /// on two cores), to tell how much of the drain's gap to the ledger alone is sharing the
    /// cores. The bench's CPU in the report includes them.
    #[arg(long)]
    load_cores: Option<f64>,
    /// Run the PostgreSQL-alone baseline once more beside the broker's part of a drain, with
    /// no worker: the backlog is first published to `upline.purchases`; while the ledger
    /// applies it, consumers in this process take the same purchases from the queue, publish
    /// each committed batch's earning events to `upline.earnings` with publisher confirms,
    /// and acknowledge the purchases once the ledger has committed as many. The drain's limit
    /// with the worker's own code taken out (docs/perf.md, "The drain with the worker taken
    /// out").
    #[arg(long)]
    broker_load: bool,
    /// Run the PostgreSQL-alone baseline once more for each number of partitions given
    /// (comma-separated), on a forest of that many referral trees of `users / k` users each,
    /// with one writer per tree: each applies, one batch after the other, the purchases whose
    /// buyers are in its tree, and the writers run at once. No two writers ever share an
    /// earner: a simulation of one writer per earner (docs/perf.md, "One writer per earner,
    /// simulated"). No gate; the same purchases as every other scenario.
    #[arg(long, value_delimiter = ',')]
    partitions: Vec<i64>,
    #[arg(long)]
    keep: bool,
}

fn purchases(n: usize, users: i64) -> Vec<Order> {
    let mut rng = StdRng::seed_from_u64(7);
    (0..n)
        .map(|i| {
            Order::new(
                format!("d{i}"),
                UserId::new(rng.gen_range(10..=users)).expect("a positive id"),
                Decimal::new(rng.gen_range(50_000..500_000), 2),
            )
        })
        .collect()
}

pub async fn run(bench: Bench<'_>, args: DrainArgs) -> anyhow::Result<()> {
    let settings = bench.settings;
    let batch_size = args.batch_size.unwrap_or(settings.worker.batch_size);
    let consumers = args.consumers.unwrap_or(settings.worker.consumers);
    let prefetch = args.prefetch.unwrap_or(settings.worker.prefetch);
    println!(
        "Backlog drain: {} purchases, {} users; per worker {consumers} consumers, prefetch {prefetch}, batch {batch_size}",
        args.purchases, args.users
    );
    let sent = purchases(args.purchases, args.users);
    let mut rows = Vec::new();
    if !args.no_baseline {
        // The ledger alone; then, as asked, beside busy threads and beside the broker's part.
        let besides = std::iter::once(Beside::Nothing)
            .chain(args.load_cores.filter(|&c| c > 0.0).map(Beside::Busy))
            .chain(args.broker_load.then_some(Beside::Broker { prefetch }));
        for beside in besides {
            let mut env = BenchEnv::new(bench, "baseline", args.keep).await?;
            let r = baseline(
                &mut env,
                &sent,
                args.users,
                batch_size,
                usize::from(consumers),
                beside,
            )
            .await;
            env.finish().await;
            let (label, r) = r?;
            rows.push((label, r));
        }
    }
    for &trees in &args.partitions {
        let mut env = BenchEnv::new(bench, "partitions", args.keep).await?;
        let r = partitioned(&mut env, &sent, args.users, batch_size, trees).await;
        env.finish().await;
        rows.push((
            format!("PostgreSQL alone, {trees} partition(s) of the earners, one writer each"),
            r?,
        ));
    }
    for &workers in args.workers.iter().filter(|&&w| w > 0) {
        let mut env = BenchEnv::new(bench, "drain", args.keep).await?;
        let extra = [
            ("UPLINE__WORKER__CONSUMERS", consumers.to_string()),
            ("UPLINE__WORKER__BATCH_SIZE", batch_size.to_string()),
            ("UPLINE__WORKER__PREFETCH", prefetch.to_string()),
        ];
        let r = drain(&mut env, &sent, args.users, workers, &extra).await;
        env.finish().await;
        rows.push((format!("{workers} worker(s) draining the queue"), r?));
    }
    println!("\n| scenario | purchases/s | seconds |");
    println!("| --- | ---: | ---: |");
    for (name, (rate, secs)) in &rows {
        println!("| {name} | {rate:.0} | {secs:.1} |");
    }
    Ok(())
}

/// Two threads that keep about `cores` cores busy between them until [`BusyLoad::finish`]:
/// every 10 ms each spins for as long as it is behind its share of CPU time (read from
/// `/proc/thread-self/stat`), so that it takes its share even while other processes hold the
/// cores, and sleeps the rest.
struct BusyLoad {
    stop: Arc<AtomicBool>,
    started: Instant,
    /// Each thread's CPU seconds when it ends.
    threads: Vec<std::thread::JoinHandle<f64>>,
}

impl BusyLoad {
    const PERIOD: Duration = Duration::from_millis(10);

    fn start(cores: f64) -> BusyLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let share = (cores / 2.0).clamp(0.0, 1.0);
        let threads = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let cpu = || {
                        std::fs::read_to_string("/proc/thread-self/stat")
                            .ok()
                            .and_then(|s| stat_cpu(&s))
                            .unwrap_or(0.0)
                    };
                    let (began, cpu_before) = (Instant::now(), cpu());
                    while !stop.load(Ordering::Relaxed) {
                        let period = Instant::now();
                        let behind = share * began.elapsed().as_secs_f64() - (cpu() - cpu_before);
                        let busy = Self::PERIOD
                            .mul_f64((behind / Self::PERIOD.as_secs_f64()).clamp(0.0, 1.0));
                        while period.elapsed() < busy {
                            std::hint::spin_loop();
                        }
                        std::thread::sleep(Self::PERIOD.saturating_sub(period.elapsed()));
                    }
                    cpu() - cpu_before
                })
            })
            .collect();
        BusyLoad {
            stop,
            started: Instant::now(),
            threads,
        }
    }

    /// Stops the threads; returns the cores they kept busy on average.
    fn finish(mut self) -> f64 {
        self.stop() / self.started.elapsed().as_secs_f64()
    }

    /// Stops and joins the threads still running; the CPU seconds they took.
    fn stop(&mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .drain(..)
            .map(|t| t.join().unwrap_or(0.0))
            .sum()
    }
}

impl Drop for BusyLoad {
    /// An error in the baseline must not leave the threads spinning.
    fn drop(&mut self) {
        self.stop();
    }
}

/// What runs beside a PostgreSQL-alone baseline.
#[derive(Debug, Clone, Copy)]
enum Beside {
    /// Nothing: the ledger has the machine to itself.
    Nothing,
    /// A [`BusyLoad`] asked for this many cores.
    Busy(f64),
    /// A [`BrokerLoad`], its consumers with this prefetch.
    Broker { prefetch: u16 },
}

/// Applies the purchases with the ledger directly, with `beside` running next to it; returns
/// the scenario's name and (purchases/s, seconds).
async fn baseline(
    env: &mut BenchEnv,
    sent: &[Order],
    users: i64,
    batch_size: usize,
    concurrency: usize,
    beside: Beside,
) -> anyhow::Result<(String, (f64, f64))> {
    seed_tree(&env.db, users).await?;
    let rules = Arc::new(env.settings.commission.rules()?);
    let items: Vec<Item> = sent
        .iter()
        .map(|s| ledger_item(s, &rules.currency))
        .collect::<anyhow::Result<_>>()?;
    let broker = match beside {
        Beside::Broker { prefetch } => {
            println!("PostgreSQL alone, again, beside the broker's part of a drain (no worker):");
            Some(BrokerLoad::start(env, sent, concurrency, prefetch, batch_size).await?)
        }
        _ => None,
    };
    let busy = match beside {
        Beside::Busy(cores) => {
            println!("PostgreSQL alone, again, beside busy threads asked for {cores:.2} cores:");
            Some(BusyLoad::start(cores))
        }
        _ => None,
    };
    let done = broker
        .as_ref()
        .map_or_else(Default::default, |b| b.committed.clone());
    let events = broker.as_ref().map(|b| b.events.clone());
    let cpu_before = env.cpu();
    let sched_before = sched_by_command("postgres");
    let started = Instant::now();
    let work = stream::iter(items.chunks(batch_size))
        .map(|chunk| {
            let (db, rules, done, events) =
                (env.db.clone(), rules.clone(), done.clone(), events.clone());
            async move {
                let committed = ledger::record_batch(&db, &rules, chunk, None, None).await?;
                if let Some(events) = events {
                    // As the worker does: the events go to the publisher before the purchases
                    // are acknowledged.
                    let _ = events.send(committed.events);
                }
                let n = done.fetch_add(chunk.len() as u64, Ordering::SeqCst) + chunk.len() as u64;
                if n % (batch_size as u64 * 50) < chunk.len() as u64 {
                    progress(&format!("PostgreSQL alone: {n}/{}", sent.len()));
                }
                Ok::<_, sqlx::Error>(())
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_report(&cpu_before, &env.cpu(), started.elapsed());
    let run_queue = run_queue_wait(&sched_before, &sched_by_command("postgres"));
    // The publisher ends once every sender is gone.
    drop(events);
    progress_done();
    println!(
        "PostgreSQL alone: {} purchases in {secs:.1} s = {:.0}/s (batches of {batch_size}, {concurrency} at a time); CPU (cores) {cpu}",
        sent.len(),
        sent.len() as f64 / secs,
    );
    print_run_queue(run_queue);
    if let Some(e) = work.into_iter().find_map(Result::err) {
        // The loads stop as they are dropped.
        return Err(e.into());
    }
    let label = match (busy, broker) {
        (Some(load), _) => {
            let took = load.finish();
            println!("  the busy threads took {took:.2} cores");
            format!("PostgreSQL alone, {took:.2} cores busy beside it")
        }
        (_, Some(broker)) => {
            let (acked, published) = broker.finish().await?;
            println!(
                "  the broker's part kept pace: when the ledger had committed all {} purchases, {acked} were acknowledged and {published} earning events confirmed",
                sent.len()
            );
            "PostgreSQL alone, beside the broker's part of a drain".to_owned()
        }
        _ => "PostgreSQL alone (ledger batches, no broker)".to_owned(),
    };
    verify(env, sent).await?;
    Ok((label, (sent.len() as f64 / secs, secs)))
}

/// An order as the ledger's input, as the worker makes it from a message.
fn ledger_item(order: &Order, currency: &str) -> anyhow::Result<Item> {
    let purchase = order.to_purchase(currency)?;
    let serde_json::Value::Object(body) = serde_json::to_value(order)? else {
        unreachable!("an order serialises as an object")
    };
    Ok(Item {
        incoming: Incoming::Valid(purchase),
        body,
    })
}

/// The ledger alone with one writer per partition of the earners: `trees` referral trees
/// ([`seed_forest`]), and per tree one writer applying the batches of its buyers' purchases in
/// turn, all writers at once, without gates. A buyer's earners are in the buyer's tree, so no
/// two writers share an earner's row. Returns the scenario's (purchases/s, seconds).
async fn partitioned(
    env: &mut BenchEnv,
    sent: &[Order],
    users: i64,
    batch_size: usize,
    trees: i64,
) -> anyhow::Result<(f64, f64)> {
    seed_forest(&env.db, users, trees).await?;
    let rules = Arc::new(env.settings.commission.rules()?);
    let mut parts: Vec<Vec<Item>> = (0..trees).map(|_| Vec::new()).collect();
    for order in sent {
        parts[forest_tree(order.buyer_id.get(), users, trees)]
            .push(ledger_item(order, &rules.currency)?);
    }
    let sizes: Vec<String> = parts.iter().map(|p| p.len().to_string()).collect();
    let cpu_before = env.cpu();
    let sched_before = sched_by_command("postgres");
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(lock_waits(env.db.clone(), stop_sampling.clone()));
    let started = Instant::now();
    let writers = parts.iter().map(|items| {
        let (db, rules) = (env.db.clone(), rules.clone());
        async move {
            for chunk in items.chunks(batch_size) {
                ledger::record_batch(&db, &rules, chunk, None, None).await?;
            }
            Ok::<_, sqlx::Error>(())
        }
    });
    let done = future::try_join_all(writers).await;
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_report(&cpu_before, &env.cpu(), started.elapsed());
    let run_queue = run_queue_wait(&sched_before, &sched_by_command("postgres"));
    stop_sampling.store(true, Ordering::Relaxed);
    let waits = sampler.await??;
    done?;
    println!(
        "PostgreSQL alone, {trees} partition(s) of the earners: {} purchases in {secs:.1} s = {:.0}/s (batches of {batch_size}, one writer per partition, purchases per partition {}); CPU (cores) {cpu}",
        sent.len(),
        sent.len() as f64 / secs,
        sizes.join(" / "),
    );
    print_lock_waits(&waits);
    print_run_queue(run_queue);
    verify(env, sent).await?;
    Ok((sent.len() as f64 / secs, secs))
}

/// The broker's part of a drain, with no worker: the backlog waits on `upline.purchases`;
/// consumers take it as ready (up to the batch size at a time) and acknowledge a batch once
/// the ledger beside them has committed as many purchases; a publisher sends each committed
/// batch's earning events to `upline.earnings` with publisher confirms, as the worker's relay
/// does right after a commit. The purchases it takes are not the ones the ledger applies,
/// only as many.
struct BrokerLoad {
    /// Purchases the ledger has committed; the consumers acknowledge up to it.
    committed: Arc<AtomicU64>,
    /// Each committed batch's events, for the publisher.
    events: tokio::sync::mpsc::UnboundedSender<Vec<EarningEvent>>,
    acked: Arc<AtomicU64>,
    published: Arc<AtomicU64>,
    total: u64,
    conn: lapin::Connection,
    /// The consumers' channels.
    channels: Vec<lapin::Channel>,
    /// The consumers, aborted when dropped (as on an error of the ledger).
    consumers: tokio::task::JoinSet<anyhow::Result<()>>,
    publisher: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl BrokerLoad {
    /// Publishes `sent` to `upline.purchases` (untimed), then starts `consumers` consumers
    /// with `prefetch` and the publisher.
    async fn start(
        env: &BenchEnv,
        sent: &[Order],
        consumers: usize,
        prefetch: u16,
        batch_size: usize,
    ) -> anyhow::Result<BrokerLoad> {
        publish_backlog(env, sent).await?;
        let conn = amqp::connect(&env.settings.amqp, "upline-bench-broker-load").await?;
        let (committed, acked, published, taken) = Default::default();
        let total = sent.len() as u64;
        let (mut channels, mut tasks) = (Vec::new(), tokio::task::JoinSet::new());
        for k in 0..consumers {
            let channel = conn.create_channel().await?;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let deliveries = channel
                .basic_consume(
                    amqp::PURCHASES_QUEUE,
                    &format!("upline-bench-{k}"),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            tasks.spawn(consume(
                deliveries,
                batch_size,
                Arc::clone(&taken),
                Arc::clone(&committed),
                Arc::clone(&acked),
                total,
            ));
            channels.push(channel);
        }
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let publisher = tokio::spawn(publish_events(channel, rx, Arc::clone(&published)));
        Ok(BrokerLoad {
            committed,
            events,
            acked,
            published,
            total,
            conn,
            channels,
            consumers: tasks,
            publisher,
        })
    }

    /// What had been acknowledged and confirmed when called: (purchases, earning events);
    /// then waits (up to a minute) for the rest and closes the connection.
    async fn finish(mut self) -> anyhow::Result<(u64, u64)> {
        let now = (
            self.acked.load(Ordering::SeqCst),
            self.published.load(Ordering::SeqCst),
        );
        drop(self.events);
        let rest = tokio::time::timeout(Duration::from_secs(60), async {
            self.publisher.await??;
            while self.acked.load(Ordering::SeqCst) < self.total {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(())
        })
        .await;
        self.consumers.abort_all();
        for channel in &self.channels {
            let _ = channel.close(200, "bench done").await;
        }
        let _ = self.conn.close(200, "bench done").await;
        match rest {
            Ok(r) => r.map(|()| now),
            Err(_) => bail!("the broker load did not finish within a minute of the ledger"),
        }
    }
}

/// One consumer of [`BrokerLoad`]: takes the deliveries that are ready, up to `batch_size`,
/// waits until the ledger has committed as many purchases as all consumers have taken, and
/// acknowledges the batch at once.
async fn consume(
    mut deliveries: lapin::Consumer,
    batch_size: usize,
    taken: Arc<AtomicU64>,
    committed: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    total: u64,
) -> anyhow::Result<()> {
    while acked.load(Ordering::SeqCst) < total {
        let Some(first) = deliveries.next().await else {
            break;
        };
        let mut batch = vec![first?];
        while batch.len() < batch_size {
            match deliveries.next().now_or_never() {
                Some(Some(delivery)) => batch.push(delivery?),
                _ => break,
            }
        }
        let through = taken.fetch_add(batch.len() as u64, Ordering::SeqCst) + batch.len() as u64;
        while committed.load(Ordering::SeqCst) < through {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let last = batch.last().expect("a batch holds a delivery at least");
        last.acker.ack(BasicAckOptions { multiple: true }).await?;
        acked.fetch_add(batch.len() as u64, Ordering::SeqCst);
    }
    Ok(())
}

/// The publisher of [`BrokerLoad`]: each batch of events, every publish queued before any
/// is awaited, then its confirms.
async fn publish_events(
    channel: lapin::Channel,
    mut batches: tokio::sync::mpsc::UnboundedReceiver<Vec<EarningEvent>>,
    published: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    while let Some(events) = batches.recv().await {
        let publishes = events.iter().map(|event| {
            let (channel, key) = (&channel, event.routing_key());
            let body = serde_json::to_vec(event).expect("an EarningEvent always serialises");
            async move {
                channel
                    .basic_publish(
                        amqp::EARNINGS_EXCHANGE,
                        &key,
                        BasicPublishOptions::default(),
                        &body,
                        amqp::persistent_json(),
                    )
                    .await
            }
        });
        for confirm in future::try_join_all(publishes).await? {
            if !confirm.await?.is_ack() {
                bail!("the broker refused an earning event");
            }
        }
        published.fetch_add(events.len() as u64, Ordering::SeqCst);
    }
    Ok(())
}

/// Publishes `sent` to `upline.purchases`, persistent and confirmed, in windows of 2,000;
/// returns how long that took.
async fn publish_backlog(env: &BenchEnv, sent: &[Order]) -> anyhow::Result<Duration> {
    let publisher = Publisher::new(env.settings.amqp.clone(), Default::default())
        .with_connection_name("upline-bench");
    let currency = env.settings.commission.rules()?.currency;
    let started = Instant::now();
    for (i, window) in sent.chunks(2000).enumerate() {
        order::publish(&publisher, window, &currency).await?;
        progress(&format!(
            "publishing the backlog: {}/{}",
            ((i + 1) * 2000).min(sent.len()),
            sent.len()
        ));
    }
    progress_done();
    let took = started.elapsed();
    publisher.close().await;
    Ok(took)
}

/// Publishes the backlog, then times `workers` worker processes draining it.
async fn drain(
    env: &mut BenchEnv,
    sent: &[Order],
    users: i64,
    workers: usize,
    extra: &[(&str, String)],
) -> anyhow::Result<(f64, f64)> {
    seed_tree(&env.db, users).await?;
    let publish = publish_backlog(env, sent).await?.as_secs_f64();
    println!(
        "published {} purchases in {publish:.1} s = {:.0}/s (persistent, confirmed)",
        sent.len(),
        sent.len() as f64 / publish
    );

    let cpu_before = env.cpu();
    let sched_before = sched_by_command("postgres");
    let started = Instant::now();
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(lock_waits(env.db.clone(), stop_sampling.clone()));
    for _ in 0..workers {
        env.start("worker", extra).await?;
    }
    loop {
        let n = pipeline::purchases_towards(&env.db, sent.len() as i64).await?;
        let secs = started.elapsed().as_secs_f64();
        progress(&format!(
            "{workers} worker(s): {n}/{} processed, {:.0}/s",
            sent.len(),
            n as f64 / secs
        ));
        if n as usize >= sent.len() {
            break;
        }
        if secs > 1800.0 {
            bail!("the backlog was not drained within 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    progress_done();
    let cpu = cpu_report(&cpu_before, &env.cpu(), started.elapsed());
    let run_queue = run_queue_wait(&sched_before, &sched_by_command("postgres"));
    stop_sampling.store(true, Ordering::Relaxed);
    let waits = sampler.await??;
    // Events: wait for the outbox to empty (all earning events confirmed by the broker).
    pipeline::wait_outbox_empty(&env.db, Duration::from_secs(1800)).await?;
    let with_events = started.elapsed().as_secs_f64();
    println!(
        "{workers} worker(s): drained {} purchases in {secs:.1} s = {:.0}/s (all earning events published after {with_events:.1} s); CPU (cores) {cpu}",
        sent.len(),
        sent.len() as f64 / secs
    );
    print_lock_waits(&waits);
    print_run_queue(run_queue);
    println!("  ledger batches: {}", batch_report(env.batches().await?));
    verify(env, sent).await?;
    Ok((sent.len() as f64 / secs, secs))
}

/// Prints what [`lock_waits`] counted.
fn print_lock_waits(waits: &LockWaits) {
    println!(
        "  row-lock waits: {:.1} % of the time in writing transactions; at a ledger gate {:.1} %; on other locks {:.1} % ({} samples of pg_stat_activity every {} ms: of {} session samples holding a transaction id, {} waited on a row lock, {} at a gate, {} on another lock)",
        waits.share(waits.rows),
        waits.share(waits.gate),
        waits.share(waits.other),
        waits.samples,
        SAMPLE_EVERY.as_millis(),
        waits.writing,
        waits.rows,
        waits.gate,
        waits.other,
    );
}

/// Prints a [`run_queue_wait`] of PostgreSQL's processes.
fn print_run_queue(waited: f64) {
    println!(
        "  run-queue waits: PostgreSQL's processes waited {:.0} ms for a core per second on one",
        1000.0 * waited
    );
}

/// How often [`lock_waits`] looks at `pg_stat_activity`.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// What [`lock_waits`] counted: session samples of writing transactions, and of those the
/// ones waiting on earners' rows and at a ledger gate.
#[derive(Debug, Default, Clone, Copy)]
struct LockWaits {
    samples: u64,
    /// Session samples holding a transaction id (the ledger's batches, the relay's writes) or
    /// waiting at a gate.
    writing: i64,
    /// Of those, waiting on a row lock: on the holder's `transactionid`, or on the `tuple`.
    rows: i64,
    /// Of those, waiting on an advisory lock: a ledger gate (docs/perf.md, "Ledger gates").
    gate: i64,
    /// Of those, waiting on any other lock (a relation's, say).
    other: i64,
}

impl LockWaits {
    fn share(&self, n: i64) -> f64 {
        if self.writing == 0 {
            0.0
        } else {
            100.0 * n as f64 / self.writing as f64
        }
    }
}

/// Samples `pg_stat_activity` of the bench's database every [`SAMPLE_EVERY`] until `stop`:
/// per sample, the sessions in a transaction that has written (it holds a transaction id: the
/// ledger's batches and the relay's statements, not the bench's own reads) or that waits at a
/// ledger gate (a build whose batches wait there before their first write has no transaction
/// id yet), and those of them waiting on a lock (`wait_event_type = 'Lock'`), by the lock's
/// kind. Each kind's count over
/// the writing count is the share of write-transaction time spent waiting on it.
async fn lock_waits(db: sqlx::PgPool, stop: Arc<AtomicBool>) -> anyhow::Result<LockWaits> {
    let mut waits = LockWaits::default();
    while !stop.load(Ordering::Relaxed) {
        let (writing, rows, gate, other): (i64, i64, i64, i64) = sqlx::query_as(
            "select count(*), \
                    count(*) filter (where wait_event_type = 'Lock' and wait_event in ('transactionid', 'tuple')), \
                    count(*) filter (where wait_event_type = 'Lock' and wait_event = 'advisory'), \
                    count(*) filter (where wait_event_type = 'Lock' and wait_event not in ('transactionid', 'tuple', 'advisory')) \
             from pg_stat_activity \
             where datname = current_database() and pid <> pg_backend_pid() \
               and (backend_xid is not null or (wait_event_type = 'Lock' and wait_event = 'advisory'))",
        )
        .fetch_one(&db)
        .await?;
        waits.samples += 1;
        waits.writing += writing;
        waits.rows += rows;
        waits.gate += gate;
        waits.other += other;
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    Ok(waits)
}

async fn verify(env: &BenchEnv, sent: &[Order]) -> anyhow::Result<()> {
    let rules = env.settings.commission.rules()?;
    let expected = oracle::recompute(&env.db, sent, &rules).await?;
    let differences = oracle::compare(&env.db, "d", &expected).await?;
    let earnings: i64 = sqlx::query_scalar("select count(*) from earnings")
        .fetch_one(&env.db)
        .await?;
    if !differences.is_empty() || earnings as usize != expected.count {
        for d in &differences {
            println!("  {d}");
        }
        bail!(
            "check FAILED: expected {} earnings, found {earnings}",
            expected.count
        );
    }
    println!("  check passed: {earnings} earnings equal an independent recomputation");
    Ok(())
}
