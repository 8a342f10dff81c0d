//! Faults, for real: each test starts a PostgreSQL cluster and a RabbitMQ node of its own
//! (`servers.rs`; the shared servers on 5432/5672 are never touched), runs the api, a worker
//! and a notifier against them as child processes of the `upline` binary, streams purchases
//! over REST while it breaks something, and ends with
//!
//! (a) every purchase recorded exactly once and every earner's total equal to an independent
//!     recomputation (`upline_testkit::oracle`: SPEC §2 written out over the users as stored), each
//!     earner's `seq` gap-free and its running total equal to its earnings;
//! (b) WebSocket subscribers, kept connected (or reconnected with `since` when their
//!     connection dropped), holding every `seq` of their earner exactly once.
//!
//! Each test prints one summary line starting with `FAULT`. Every wait is bounded; servers
//! and services are stopped by drop guards, also when a test fails (and then the services'
//! logs are printed).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use upline_common::amqp;
use upline_common::config::{DatabaseSettings, DEV_ADMIN_TOKEN, DEV_PRODUCER_TOKEN};
use upline_common::protocol::{ServerMessage, Subscribe, Target};
use upline_testkit::client::{Api, NewUser};
use upline_testkit::oracle;
use upline_testkit::order::Order;
use upline_testkit::spawn::{self, Output, ServiceCommand};

use crate::harness::{metric_value, metrics_text, user_id};
use crate::servers::{PgCluster, RabbitNode, TempDir};

/// The longest any one phase (start-up, a stream, a drain) may take.
const PHASE: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------------
// Servers and services

/// One of the services, as a child process of the `upline` binary on a fixed port (kept across
/// restarts, so clients find it again). Killed (SIGKILL) on drop if still running.
struct Service {
    command: ServiceCommand,
    running: Option<spawn::Service>,
}

impl Service {
    fn base(&self) -> String {
        self.command.base()
    }

    fn spawn(&mut self) {
        self.running = Some(self.command.spawn().expect("the upline binary starts"));
    }

    /// Waits (bounded) until `/readyz` answers 200.
    async fn wait_ready(&mut self, http: &reqwest::Client) {
        self.running
            .as_mut()
            .expect("the service was started")
            .wait_ready(http, PHASE)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Sends SIGTERM and waits (up to 30 s) for the process to exit; its exit status.
    async fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut running = self.running.take().expect("the service is running");
        running
            .sigterm(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }
}

/// A test's own servers and the three services on them. Fields drop in order: the services
/// first, then the servers, then their directory.
struct Stack {
    label: &'static str,
    api: Service,
    worker: Service,
    notifier: Service,
    db: PgPool,
    http: reqwest::Client,
    /// The api, with the development keys.
    client: Api,
    pg: PgCluster,
    rabbit: RabbitNode,
    dir: TempDir,
}

impl Stack {
    /// Starts the servers, migrates, and starts the services (the worker with `worker_env`
    /// on top of the common environment), waiting until each is ready.
    async fn start(label: &'static str, worker_env: &[(&str, &str)]) -> Stack {
        let dir = TempDir::new(&format!("upline-fault-{label}"));
        let pg = PgCluster::start(&dir.sub("pg"), None).await;
        let rabbit = RabbitNode::start(&dir.sub("rabbit"), None).await;
        let database_url = pg.url("upline", "");
        let cancel = CancellationToken::new();
        let db = tokio::time::timeout(
            PHASE,
            upline_common::db::connect_and_migrate(
                &DatabaseSettings {
                    url: database_url.clone(),
                    max_connections: 4,
                    acquire_timeout_secs: 5,
                    standby_reads: false,
                    standby_max_lag_secs: 5,
                },
                &cancel,
            ),
        )
        .await
        .expect("PostgreSQL answers in time")
        .expect("the test database is created and migrated");
        let service = |kind: &'static str, extra: &[(&str, &str)]| {
            let mut command = ServiceCommand::new(Path::new(env!("CARGO_BIN_EXE_upline")), kind)
                .env("UPLINE__APP__ENVIRONMENT", "development")
                .env("UPLINE__LIMITS__ENABLED", "false")
                .env("UPLINE__WORKER__OUTBOX_POLL_MS", "100")
                .env("UPLINE__DATABASE__MAX_CONNECTIONS", "8")
                .env("RUST_LOG", "info,sqlx=warn,lapin=warn")
                .env("DATABASE_URL", database_url.clone())
                .env("AMQP_URL", rabbit.amqp_url())
                .output(Output::File(dir.path().join(format!("{kind}.log"))));
            for (k, v) in extra {
                command = command.env(k, *v);
            }
            Service {
                command,
                running: None,
            }
        };
        let mut worker_env = worker_env.to_vec();
        // Its sessions are told apart in pg_stat_activity.
        let worker_url = pg.url("upline", "application_name=upline-worker");
        worker_env.push(("DATABASE_URL", &worker_url));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        let api = service("api", &[]);
        let client = Api::new(
            http.clone(),
            &api.base(),
            DEV_ADMIN_TOKEN,
            DEV_PRODUCER_TOKEN,
        );
        let mut stack = Stack {
            label,
            api,
            worker: service("worker", &worker_env),
            notifier: service("notifier", &[]),
            db,
            http,
            client,
            pg,
            rabbit,
            dir,
        };
        // The worker first: it declares the topology the others use.
        stack.worker.spawn();
        stack.worker.wait_ready(&stack.http).await;
        stack.api.spawn();
        stack.notifier.spawn();
        stack.api.wait_ready(&stack.http).await;
        stack.notifier.wait_ready(&stack.http).await;
        stack
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.notifier.command.port())
    }

    /// Registers a user over REST with the admin key; its id and token.
    async fn register(&self, name: &str, referrer: Option<i64>) -> (i64, String) {
        let email = format!(
            "{}.{}@example.com",
            name.to_lowercase().replace(' ', "."),
            self.label
        );
        let user = NewUser::new(name, email, referrer.map(user_id));
        let r = self
            .client
            .register(&user)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        (r.id.get(), r.token)
    }

    /// A referral forest: 2 roots, 4 in the middle (one of them deactivated: its level-1
    /// commissions are not paid), 8 buyers under them.
    async fn forest(&self) -> Forest {
        let mut users = Vec::new();
        for i in 0..2 {
            users.push(self.register(&format!("Root {i}"), None).await);
        }
        for i in 0..4 {
            let referrer = users[i % 2].0;
            users.push(self.register(&format!("Mid {i}"), Some(referrer)).await);
        }
        let mut buyers = Vec::new();
        for i in 0..8 {
            let referrer = users[2 + i % 4].0;
            buyers.push(self.register(&format!("Buyer {i}"), Some(referrer)).await.0);
        }
        let inactive = users[5].0;
        self.client
            .deactivate(user_id(inactive))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        Forest {
            // A root and a middle earner are watched live.
            watched: vec![users[0].clone(), users[2].clone()],
            buyers,
        }
    }

    /// Every purchase in the ledger, processed, and the outbox empty (bounded by [`PHASE`]).
    async fn drain(&self, purchases: usize) {
        let deadline = Instant::now() + PHASE;
        loop {
            let counts: Option<(i64, i64)> = sqlx::query_as(
                "select (select count(*) from purchases), (select count(*) from earning_outbox)",
            )
            .fetch_one(&self.db)
            .await
            .ok();
            if counts == Some((purchases as i64, 0)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not drained within {PHASE:?}: (purchases, outbox) = {counts:?}, {purchases} sent"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// (a): each purchase id once, all processed, each earner's total equal to the
    /// recomputation; returns (earnings, earners).
    async fn check_ledger(&self, plan: &[Order]) -> (usize, usize) {
        self.check_subset(plan).await
    }

    /// The ledger holds exactly what `sent` should have paid, no more.
    async fn check_subset(&self, sent: &[Order]) -> (usize, usize) {
        let statuses: Vec<(String, i64)> =
            sqlx::query_as("select status, count(*) from purchases group by 1 order by 1")
                .fetch_all(&self.db)
                .await
                .expect("statuses");
        assert_eq!(
            statuses,
            vec![("processed".to_owned(), sent.len() as i64)],
            "every purchase recorded once, as processed"
        );
        let settings = upline_testkit::local::settings(&[]).expect("defaults load");
        let rules = settings.commission.rules().expect("default rules");
        let expected = oracle::recompute(&self.db, sent, &rules)
            .await
            .expect("recompute");
        let differences = oracle::compare(&self.db, "", &expected)
            .await
            .expect("compare");
        assert!(differences.is_empty(), "ledger differs: {differences:#?}");
        let (earnings, doubled): (i64, i64) = sqlx::query_as(
            "select count(*), count(*) - count(distinct (purchase_id, level)) from earnings",
        )
        .fetch_one(&self.db)
        .await
        .expect("count");
        assert_eq!(doubled, 0, "an earning recorded twice");
        assert_eq!(earnings as usize, expected.count, "number of earnings");
        (expected.count, expected.by_earner.len())
    }

    /// `earner_balances.earnings_seq` of a user.
    async fn latest_seq(&self, user: i64) -> i64 {
        sqlx::query_scalar("select earnings_seq from earner_balances where user_id = $1")
            .bind(user)
            .fetch_one(&self.db)
            .await
            .expect("earnings_seq")
    }

    /// The worker's `/readyz`: status and body.
    async fn worker_readyz(&self) -> (u16, Value) {
        match self
            .http
            .get(format!("{}/readyz", self.worker.base()))
            .send()
            .await
        {
            Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or(Value::Null)),
            Err(_) => (0, Value::Null),
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for kind in ["api", "worker", "notifier"] {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{kind}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- {} {kind} log (last 40 lines) ----", self.label);
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// The users of a test: earners watched over WebSocket (id, token), buyers.
struct Forest {
    watched: Vec<(i64, String)>,
    buyers: Vec<i64>,
}

// ---------------------------------------------------------------------------------------------
// Purchases

/// `n` purchases numbered from `from`, spread over the buyers, of every class: about a fifth
/// at or below the Rs 1000 threshold (exactly 1000.00 among them), a fifth with a profit,
/// amounts with paise that round half to even.
fn plan(forest: &Forest, prefix: &str, from: usize, n: usize) -> Vec<Order> {
    (from..from + n)
        .map(|i| {
            let amount = match i % 10 {
                0 => Decimal::new(100_000, 2), // 1000.00: not paid
                1 => Decimal::new(5_000 + (i as i64 * 7_919) % 95_000, 2), // below
                _ => Decimal::new(100_001 + (i as i64 * 37_813) % 4_900_000, 2),
            };
            let profit = (i % 5 == 3).then(|| Decimal::new(1_050 + (i as i64 * 311) % 50_000, 2));
            Order {
                purchase_id: format!("{prefix}-{i}"),
                buyer_id: user_id(forest.buyers[i % forest.buyers.len()]),
                amount,
                profit,
            }
        })
        .collect()
}

/// How a stream of REST purchases went.
#[derive(Default)]
struct StreamStats {
    /// Non-202 answers (status, or 0 for no answer at all) and how many of each.
    retried: BTreeMap<u16, usize>,
}

impl StreamStats {
    fn describe(&self) -> String {
        if self.retried.is_empty() {
            return "no retries".into();
        }
        let parts: Vec<String> = self
            .retried
            .iter()
            .map(|(status, n)| {
                if *status == 0 {
                    format!("{n}× no answer")
                } else {
                    format!("{n}× {status}")
                }
            })
            .collect();
        format!("retried {}", parts.join(", "))
    }
}

/// Streams `purchases` over REST from `clients` concurrent clients, each pausing `pace`
/// between purchases and retrying every answer but 202 (and every failed request) under the
/// same `purchase_id`, with backoff, until 202. `accepted` counts the 202s as they come.
fn stream(
    api: String,
    purchases: Vec<Order>,
    clients: usize,
    pace: Duration,
    accepted: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<StreamStats> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        let api = Api::new(http, &api, DEV_ADMIN_TOKEN, DEV_PRODUCER_TOKEN);
        let purchases = Arc::new(purchases);
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (api, purchases, next, accepted) = (
                api.clone(),
                purchases.clone(),
                next.clone(),
                accepted.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut retried: BTreeMap<u16, usize> = BTreeMap::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = purchases.get(i) else { break };
                    let deadline = Instant::now() + PHASE;
                    let mut attempt = 0u32;
                    loop {
                        let answer = api.post_purchase(p).await;
                        let status = answer.map_or(0, |r| r.status().as_u16());
                        if status == 202 {
                            break;
                        }
                        *retried.entry(status).or_default() += 1;
                        assert!(
                            Instant::now() < deadline,
                            "{} not accepted within {PHASE:?} (last answer {status})",
                            p.purchase_id
                        );
                        attempt += 1;
                        let wait = Duration::from_millis(50 * 2u64.pow(attempt.min(4)));
                        tokio::time::sleep(wait).await;
                    }
                    accepted.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(pace).await;
                }
                retried
            }));
        }
        let mut stats = StreamStats::default();
        for task in tasks {
            for (status, n) in task.await.expect("a client task did not panic") {
                *stats.retried.entry(status).or_default() += n;
            }
        }
        stats
    })
}

/// Waits (bounded) until `counter` reaches `n`.
async fn wait_count(counter: &AtomicUsize, n: usize, what: &str) {
    let deadline = Instant::now() + PHASE;
    while counter.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "{what}: {n} not reached in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket subscribers

/// A WebSocket client of one earner that reconnects with `since` (its last `seq`) whenever
/// its connection ends, and records every `seq` it receives.
struct Subscriber {
    user: i64,
    seqs: Arc<Mutex<Vec<i64>>>,
    connections: Arc<AtomicUsize>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    fn start(ws_url: String, user: i64, token: String) -> Subscriber {
        let seqs = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let task = {
            let (seqs, connections, stop) = (seqs.clone(), connections.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let since = seqs
                        .lock()
                        .expect("seqs lock")
                        .iter()
                        .copied()
                        .max()
                        .unwrap_or(0);
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = follow(&ws_url, user, &token, since, &seqs, &connections) => {}
                    }
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            })
        };
        Subscriber {
            user,
            seqs,
            connections,
            stop,
            task,
        }
    }

    /// Waits (bounded) until it holds `latest` seqs, lingers a moment for duplicates, stops,
    /// and checks it received 1..=latest exactly once; returns (seqs, connections).
    async fn finish(self, latest: i64) -> (usize, usize) {
        let deadline = Instant::now() + PHASE;
        loop {
            let n = self.seqs.lock().expect("seqs lock").len() as i64;
            if n >= latest {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "subscriber of {}: {n} of {latest} earnings within {PHASE:?}",
                self.user
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.stop.cancel();
        let _ = self.task.await;
        let seqs = self.seqs.lock().expect("seqs lock").clone();
        let mut counts: HashMap<i64, usize> = HashMap::new();
        for s in &seqs {
            *counts.entry(*s).or_default() += 1;
        }
        let duplicated: Vec<i64> = counts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(s, _)| *s)
            .collect();
        assert!(
            duplicated.is_empty(),
            "subscriber of {}: seqs received twice: {duplicated:?}",
            self.user
        );
        let missing: Vec<i64> = (1..=latest).filter(|s| !counts.contains_key(s)).collect();
        assert!(
            missing.is_empty(),
            "subscriber of {}: seqs missing: {missing:?}",
            self.user
        );
        assert_eq!(seqs.len() as i64, latest, "subscriber of {}", self.user);
        (seqs.len(), self.connections.load(Ordering::Relaxed))
    }
}

/// One connection: subscribe with `since`, record earnings until the socket ends.
async fn follow(
    ws_url: &str,
    user: i64,
    token: &str,
    since: i64,
    seqs: &Mutex<Vec<i64>>,
    connections: &AtomicUsize,
) {
    let Ok(Ok((mut ws, _))) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(ws_url),
    )
    .await
    else {
        return;
    };
    let subscribe = Subscribe::new(Target::from(user_id(user)), token, Some(since));
    if ws
        .send(Message::Text(subscribe.to_text().into()))
        .await
        .is_err()
    {
        return;
    }
    connections.fetch_add(1, Ordering::Relaxed);
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        match crate::harness::server_message(&text) {
            ServerMessage::Earning { earning } => {
                seqs.lock().expect("seqs lock").push(earning.seq);
            }
            ServerMessage::Subscribed { .. } => {}
            // lagged, a database error on the notifier's side…: reconnect with since.
            ServerMessage::Error(error) => {
                eprintln!("subscriber of {user}: {error:?}");
                return;
            }
        }
    }
}

/// Subscribers for every watched earner.
fn watch(stack: &Stack, forest: &Forest) -> Vec<Subscriber> {
    forest
        .watched
        .iter()
        .map(|(user, token)| Subscriber::start(stack.ws_url(), *user, token.clone()))
        .collect()
}

/// Finishes every subscriber; "N seqs exactly once over C connections" for each.
/// The load of a streaming fault test: the forest's watched users subscribed, and `n`
/// planned purchases streamed over REST by 4 clients, `pace` apart per client.
struct Load {
    subscribers: Vec<Subscriber>,
    purchases: Vec<Order>,
    /// Purchases answered 202 so far.
    accepted: Arc<AtomicUsize>,
    streaming: tokio::task::JoinHandle<StreamStats>,
}

impl Load {
    async fn start(stack: &Stack, prefix: &str, n: usize, pace: Duration) -> Load {
        let forest = stack.forest().await;
        let subscribers = watch(stack, &forest);
        let purchases = plan(&forest, prefix, 0, n);
        let accepted = Arc::new(AtomicUsize::new(0));
        let streaming = stream(
            stack.api.base(),
            purchases.clone(),
            4,
            pace,
            accepted.clone(),
        );
        Load {
            subscribers,
            purchases,
            accepted,
            streaming,
        }
    }
}

/// After the fault: the stream's statistics once it ends, the ledger checked once every
/// purchase is drained (earnings, earners), and what the subscribers saw.
async fn finish_load(
    stack: &Stack,
    streaming: tokio::task::JoinHandle<StreamStats>,
    purchases: &[Order],
    subscribers: Vec<Subscriber>,
) -> (StreamStats, (usize, usize), String) {
    let stats = tokio::time::timeout(PHASE, streaming)
        .await
        .expect("the stream ends in time")
        .expect("the stream did not panic");
    stack.drain(purchases.len()).await;
    let ledger = stack.check_ledger(purchases).await;
    let live = finish_all(stack, subscribers).await;
    (stats, ledger, live)
}

async fn finish_all(stack: &Stack, subscribers: Vec<Subscriber>) -> String {
    let mut parts = Vec::new();
    for s in subscribers {
        let latest = stack.latest_seq(s.user).await;
        let (n, connections) = s.finish(latest).await;
        parts.push(format!(
            "{n} seqs exactly once over {connections} connection(s)"
        ));
    }
    parts.join(" and ")
}

// ---------------------------------------------------------------------------------------------
// The faults

#[tokio::test]
async fn rabbitmq_restarted_while_purchases_stream_in_over_rest() {
    let started = Instant::now();
    let stack = Stack::start("rabbitmq-restart", &[]).await;
    // 600 purchases at 50 ms per client take ~7.5 s: long enough that `rabbitmqctl stop_app`,
    // slow to start on a loaded machine, still lands mid-stream.
    let Load {
        subscribers,
        purchases,
        accepted,
        streaming,
    } = Load::start(&stack, "rr", 600, Duration::from_millis(50)).await;

    wait_count(&accepted, 100, "accepted before the restart").await;
    let at_stop = accepted.load(Ordering::Relaxed);
    let down = Instant::now();
    stack.rabbit.ctl_run(&["stop_app"]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.rabbit.ctl_run(&["start_app"]).await;
    let outage = down.elapsed();

    let (stats, (earnings, earners), live) =
        finish_load(&stack, streaming, &purchases, subscribers).await;
    assert!(
        stats.retried.keys().any(|s| *s != 202),
        "no request was refused: the restart did not land mid-stream"
    );
    println!(
        "FAULT rabbitmq-restart: {} purchases over REST by 4 clients, broker stop_app/start_app \
         after {at_stop} accepted (down {:.1}s), {}, {}; exactly once: {earnings} earnings to \
         {earners} earners equal to the recomputation; live: {live}; {:.1}s",
        purchases.len(),
        outage.as_secs_f64(),
        stats.describe(),
        stack.worker_saw(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn postgres_restarted_mid_stream() {
    postgres_fault("postgres-restart", None).await;
}

#[tokio::test]
async fn postgres_down_for_five_seconds_mid_stream() {
    postgres_fault("postgres-down", Some(Duration::from_secs(5))).await;
}

/// Streams purchases and, mid-stream, restarts PostgreSQL (`pg_ctl restart -m fast`), or
/// with `down`, stops it (`-m fast`) and starts it again after that long.
async fn postgres_fault(label: &'static str, down: Option<Duration>) {
    let started = Instant::now();
    let stack = Stack::start(label, &[]).await;
    let Load {
        subscribers,
        purchases,
        accepted,
        streaming,
    } = Load::start(&stack, "pg", 400, Duration::from_millis(20)).await;

    wait_count(&accepted, 100, "accepted before the fault").await;
    let at_fault = accepted.load(Ordering::Relaxed);
    let recorded_before: i64 = sqlx::query_scalar("select count(*) from purchases")
        .fetch_one(&stack.db)
        .await
        .expect("count");
    let fault = Instant::now();
    let what = match down {
        None => {
            stack.pg.restart_fast().await;
            "pg_ctl restart -m fast"
        }
        Some(down) => {
            stack.pg.stop_fast().await;
            tokio::time::sleep(down).await;
            stack.pg.start_again().await;
            "pg_ctl stop -m fast, start"
        }
    };
    let took = fault.elapsed();
    let accepted_meanwhile = accepted.load(Ordering::Relaxed) - at_fault;

    let (stats, (earnings, earners), live) =
        finish_load(&stack, streaming, &purchases, subscribers).await;
    println!(
        "FAULT {label}: {} purchases over REST by 4 clients, {what} after {at_fault} accepted / \
         {recorded_before} recorded (database unavailable {:.1}s, {accepted_meanwhile} accepted \
         meanwhile), {}, {}; exactly once: {earnings} earnings to {earners} earners equal to the \
         recomputation; live: {live}; {:.1}s",
        purchases.len(),
        took.as_secs_f64(),
        stats.describe(),
        stack.worker_saw(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn sigterm_to_every_service_under_load_then_restart_and_drain() {
    let started = Instant::now();
    let mut stack = Stack::start("sigterm", &[]).await;
    let Load {
        subscribers,
        purchases,
        accepted,
        streaming,
    } = Load::start(&stack, "st", 400, Duration::from_millis(20)).await;

    wait_count(&accepted, 120, "accepted before SIGTERM").await;
    let at_term = accepted.load(Ordering::Relaxed);
    let (api, worker, notifier) = tokio::join!(
        stack.api.sigterm(),
        stack.worker.sigterm(),
        stack.notifier.sigterm()
    );
    for (kind, status) in [("api", api), ("worker", worker), ("notifier", notifier)] {
        assert!(status.success(), "{kind} did not stop cleanly: {status}");
    }
    // Nothing half-applied: what is recorded is exactly what those purchases should have paid.
    let recorded: Vec<String> = sqlx::query_scalar("select purchase_id from purchases")
        .fetch_all(&stack.db)
        .await
        .expect("recorded ids");
    let recorded: std::collections::HashSet<String> = recorded.into_iter().collect();
    let subset: Vec<Order> = purchases
        .iter()
        .filter(|p| recorded.contains(&p.purchase_id))
        .cloned()
        .collect();
    assert_eq!(
        subset.len(),
        recorded.len(),
        "only planned purchases recorded"
    );
    let (earnings_at_stop, _) = stack.check_subset(&subset).await;
    let outbox_at_stop: i64 = sqlx::query_scalar("select count(*) from earning_outbox")
        .fetch_one(&stack.db)
        .await
        .expect("outbox");
    assert_eq!(
        outbox_at_stop, 0,
        "the stopped worker left committed earnings unpublished"
    );
    let accepted_at_stop = accepted.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Back up, on the same ports; the clients are still retrying.
    stack.worker.spawn();
    stack.api.spawn();
    stack.notifier.spawn();
    stack.worker.wait_ready(&stack.http).await;
    stack.api.wait_ready(&stack.http).await;
    stack.notifier.wait_ready(&stack.http).await;

    let (stats, (earnings, earners), live) =
        finish_load(&stack, streaming, &purchases, subscribers).await;
    println!(
        "FAULT sigterm: {} purchases over REST by 4 clients, SIGTERM to api, worker and \
         notifier after {at_term} accepted: all exited 0; while down {} recorded, {} accepted, \
         {earnings_at_stop} earnings equal to the recomputation of exactly those, {outbox_at_stop} \
         left in the outbox; restarted, {}; exactly once: {earnings} earnings to {earners} \
         earners equal to the recomputation; live: {live}; {:.1}s",
        purchases.len(),
        recorded.len(),
        accepted_at_stop,
        stats.describe(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn broker_memory_alarm_blocks_the_relay_without_holding_a_transaction() {
    let started = Instant::now();
    // A short confirm timeout, so that the relay gives up and retries several times during
    // the alarm (its lease: 2 × 2 s + 1 s).
    let mut stack = Stack::start(
        "memory-alarm",
        &[("UPLINE__WORKER__OUTBOX_CONFIRM_TIMEOUT_MS", "2000")],
    )
    .await;
    let forest = stack.forest().await;
    let subscribers = watch(&stack, &forest);
    let accepted = Arc::new(AtomicUsize::new(0));

    // 100 purchases through the whole pipeline first.
    let first = plan(&forest, "ma", 0, 100);
    let stats_a = stream(
        stack.api.base(),
        first.clone(),
        4,
        Duration::ZERO,
        accepted.clone(),
    )
    .await
    .expect("the stream did not panic");
    stack.drain(first.len()).await;

    // 200 more queued while no worker runs, so that the next worker has earnings to publish.
    assert!(
        stack.worker.sigterm().await.success(),
        "worker stops cleanly"
    );
    let second = plan(&forest, "ma", 100, 200);
    let stats_b = stream(
        stack.api.base(),
        second.clone(),
        4,
        Duration::ZERO,
        accepted.clone(),
    )
    .await
    .expect("the stream did not panic");

    // The alarm. Check that it really blocks a publisher: no confirm while it lasts.
    stack
        .rabbit
        .ctl_run(&["set_vm_memory_high_watermark", "0.000001"])
        .await;
    let alarm = Instant::now();
    let probe = amqp::connect(
        &upline_common::config::AmqpSettings {
            url: stack.rabbit.amqp_url(),
            tls_ca_file: String::new(),
        },
        "upline-fault-probe",
    )
    .await
    .expect("connect during the alarm");
    let channel = probe.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let probe_confirm = tokio::spawn(async move {
        // Routed nowhere (no binding matches), so it is confirmed as soon as it is taken.
        let confirm = channel
            .basic_publish(
                amqp::EARNINGS_EXCHANGE,
                "fault.probe",
                BasicPublishOptions::default(),
                b"{}",
                amqp::persistent_json(),
            )
            .await
            .expect("publish")
            .await;
        (confirm, channel)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !probe_confirm.is_finished(),
        "the broker confirmed a publish during the memory alarm: it does not block publishers"
    );

    // A worker starts during the alarm: it records the queued purchases, and its relay cannot
    // publish their earnings.
    stack.worker.spawn();
    let deadline = Instant::now() + PHASE;
    let blocked_body = loop {
        let (status, body) = stack.worker_readyz().await;
        if status == 503 && body["broker"] == "blocked" {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the worker's /readyz never reported the blocked broker (last: {status} {body})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let blocked_after = alarm.elapsed();

    // Meanwhile (three confirm timeouts and a lease expiry): no transaction of the worker stays
    // open, the outbox holds events, and /readyz keeps saying blocked.
    let mut samples = 0;
    let mut oldest_xact = 0f64;
    let mut max_outbox = 0i64;
    let watch_until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < watch_until {
        let (idle_in_tx, oldest): (i64, f64) = sqlx::query_as(
            r#"select count(*) filter (where state like 'idle in transaction%'),
                      coalesce(max(extract(epoch from now() - xact_start)), 0)::float8
               from pg_stat_activity where application_name = 'upline-worker'"#,
        )
        .fetch_one(&stack.db)
        .await
        .expect("pg_stat_activity");
        assert_eq!(idle_in_tx, 0, "a worker session is idle in transaction");
        assert!(
            oldest < 1.0,
            "a worker transaction has been open for {oldest:.1}s during the alarm"
        );
        oldest_xact = oldest_xact.max(oldest);
        let outbox: i64 = sqlx::query_scalar("select count(*) from earning_outbox")
            .fetch_one(&stack.db)
            .await
            .expect("outbox");
        max_outbox = max_outbox.max(outbox);
        samples += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        max_outbox > 0,
        "the relay had nothing to publish during the alarm"
    );
    let (status, body) = stack.worker_readyz().await;
    assert_eq!(
        (status, &body["broker"]),
        (503, &json!("blocked")),
        "{body}"
    );
    let recorded_in_alarm: i64 = sqlx::query_scalar("select count(*) from purchases")
        .fetch_one(&stack.db)
        .await
        .expect("count");
    let metrics = metrics_text(&stack.http, &stack.worker.base()).await;
    let backlog = metric_value(&metrics, |l| l.starts_with("upline_outbox_backlog"));
    let timeouts = metrics
        .lines()
        .find(|l| l.starts_with("upline_outbox_relay_failures_total") && l.contains("timeout"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("0")
        .to_owned();
    assert!(
        backlog.is_some_and(|b| b > 0.0),
        "upline_outbox_backlog on /metrics during the alarm: {backlog:?}\n{metrics}"
    );

    // SIGTERM during the alarm: the worker stops (abandoning acknowledgements it cannot send)
    // and a new one starts, still under the alarm.
    let term = Instant::now();
    let status = stack.worker.sigterm().await;
    let stopped_in = term.elapsed();
    assert!(
        status.success(),
        "the blocked worker did not stop cleanly: {status}"
    );
    let abandoned = stack.log_count("worker", "abandoning their unacknowledged deliveries");
    stack.worker.spawn();
    let deadline = Instant::now() + PHASE;
    loop {
        let (status, body) = stack.worker_readyz().await;
        if status == 503 && body["broker"] == "blocked" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second worker's /readyz never reported the blocked broker ({status} {body})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The alarm clears: the probe's publish is confirmed, the worker recovers by itself.
    stack
        .rabbit
        .ctl_run(&["set_vm_memory_high_watermark", "0.4"])
        .await;
    let alarm_lasted = alarm.elapsed();
    let (confirm, _channel) = tokio::time::timeout(Duration::from_secs(20), probe_confirm)
        .await
        .expect("the held publish is confirmed once the alarm clears")
        .expect("probe task");
    assert!(confirm.expect("confirm").is_ack());
    let _ = probe.close(200, "done").await;
    let deadline = Instant::now() + PHASE;
    loop {
        let (status, _) = stack.worker_readyz().await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never became ready again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready_after = alarm.elapsed() - alarm_lasted;

    let all: Vec<Order> = first.into_iter().chain(second).collect();
    stack.drain(all.len()).await;
    let (earnings, earners) = stack.check_ledger(&all).await;
    let live = finish_all(&stack, subscribers).await;
    let mut stats = stats_a;
    for (s, n) in stats_b.retried {
        *stats.retried.entry(s).or_default() += n;
    }
    println!(
        "FAULT memory-alarm: {} purchases over REST ({}), 200 of them recorded by a worker \
         started during a vm_memory_high_watermark 0.000001 alarm of {:.1}s: a probe publish \
         got no confirm until it cleared; worker /readyz 503 {blocked_body} after {:.1}s; \
         {recorded_in_alarm} purchases recorded, up to {max_outbox} events in the outbox \
         (gauge {backlog:?}), {timeouts} relay confirm timeouts, {samples} pg_stat_activity \
         samples: no worker session idle in transaction, oldest worker transaction \
         {oldest_xact:.3}s; SIGTERM during the alarm: exit 0 in {:.1}s (consumers \
         abandoned after the grace period: {}), a new worker started still blocked; ready again {:.1}s after the \
         alarm cleared; exactly once: \
         {earnings} earnings to {earners} earners equal to the recomputation; live: {live}; \
         {:.1}s",
        all.len(),
        stats.describe(),
        alarm_lasted.as_secs_f64(),
        blocked_after.as_secs_f64(),
        stopped_in.as_secs_f64(),
        abandoned > 0,
        ready_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn nacked_earning_events_are_retried_without_ending_the_worker_session() {
    let started = Instant::now();
    let stack = Stack::start("nack", &[]).await;
    let forest = stack.forest().await;
    let subscribers = watch(&stack, &forest);

    // A queue that refuses everything (length 0, reject-publish) bound to every earning: the
    // broker nacks each event the relay publishes.
    let conn = amqp::connect(
        &upline_common::config::AmqpSettings {
            url: stack.rabbit.amqp_url(),
            tls_ca_file: String::new(),
        },
        "upline-fault-trap",
    )
    .await
    .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare("nack-trap", QueueDeclareOptions::default(), args)
        .await
        .expect("declare the trap");
    channel
        .queue_bind(
            "nack-trap",
            amqp::EARNINGS_EXCHANGE,
            "earning.#",
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the trap");

    let purchases = plan(&forest, "nk", 0, 150);
    let accepted = Arc::new(AtomicUsize::new(0));
    let stats = stream(
        stack.api.base(),
        purchases.clone(),
        4,
        Duration::ZERO,
        accepted.clone(),
    )
    .await
    .expect("the stream did not panic");
    stack.drain_purchases_only(purchases.len()).await;
    // Nacked for a while: the events stay in the outbox and the worker stays ready.
    let mut not_ready = 0;
    let mut outbox = 0i64;
    for _ in 0..20 {
        if stack.worker_readyz().await.0 != 200 {
            not_ready += 1;
        }
        outbox = sqlx::query_scalar("select count(*) from earning_outbox")
            .fetch_one(&stack.db)
            .await
            .expect("outbox");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(
        outbox > 0,
        "events left the outbox although every publish was nacked"
    );
    assert_eq!(
        not_ready, 0,
        "the worker was not ready while its events were nacked"
    );
    let metrics = metrics_text(&stack.http, &stack.worker.base()).await;
    let refused = metrics
        .lines()
        .find(|l| l.starts_with("upline_outbox_relay_failures_total") && l.contains("refused"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("0")
        .to_owned();
    assert_ne!(refused, "0", "no refused attempt counted:\n{metrics}");

    channel
        .queue_delete("nack-trap", Default::default())
        .await
        .expect("delete the trap");
    let _ = conn.close(200, "done").await;
    stack.drain(purchases.len()).await;
    let log = std::fs::read_to_string(stack.dir.path().join("worker.log")).unwrap_or_default();
    let sessions_ended = log.matches("broker session failed").count();
    assert_eq!(
        sessions_ended, 0,
        "a nack ended the worker's broker session:\n{log}"
    );
    let (earnings, earners) = stack.check_ledger(&purchases).await;
    let live = finish_all(&stack, subscribers).await;
    println!(
        "FAULT nack: {} purchases over REST ({}), every earning event nacked (a length-0 \
         reject-publish queue bound to earning.#) for 3s: {outbox} events held in the outbox, \
         {refused} refused relay attempts, worker /readyz 200 throughout, {sessions_ended} broker \
         sessions ended; trap removed: exactly once: {earnings} earnings to {earners} earners \
         equal to the recomputation; live: {live}; {:.1}s",
        purchases.len(),
        stats.describe(),
        started.elapsed().as_secs_f64()
    );
}

impl Stack {
    /// How many lines of a service's log (all its runs) contain `needle`.
    fn log_count(&self, kind: &str, needle: &str) -> usize {
        std::fs::read_to_string(self.dir.path().join(format!("{kind}.log")))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// What the worker logged about the fault: batches retried, relay attempts backed off,
    /// broker sessions ended.
    fn worker_saw(&self) -> String {
        format!(
            "worker logged {} batch retries (database unavailable), {} relay back-offs, {} \
             broker reconnects",
            self.log_count("worker", "retrying batch"),
            self.log_count("worker", "outbox relay: attempt failed"),
            self.log_count("worker", "broker session failed"),
        )
    }

    /// Every purchase in the ledger (the outbox may hold events still).
    async fn drain_purchases_only(&self, purchases: usize) {
        let deadline = Instant::now() + PHASE;
        loop {
            let n: i64 = sqlx::query_scalar("select count(*) from purchases")
                .fetch_one(&self.db)
                .await
                .unwrap_or(0);
            if n == purchases as i64 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} of {purchases} purchases recorded within {PHASE:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
