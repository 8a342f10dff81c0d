//! The floor: the pipeline's path with upline's own code taken out, so that a latency target
//! can be set against what the parts alone take on the same machine (docs/perf.md, "The
//! floor: the path with our code removed").
//!
//! One message travels the path a purchase takes, through the same servers and kinds of
//! connection, with nothing of upline's in between:
//! 1. a `POST` over loopback HTTP to an axum handler that publishes the body, persistent, to a
//!    quorum queue and answers `202` after the publisher confirm (the api);
//! 2. a consumer with manual acknowledgements takes whatever deliveries are ready as one batch
//!    and runs one transaction of `--round-trips` round trips (`BEGIN`, one `insert` of the
//!    batch's ids, `select 1`s, `COMMIT` with `synchronous_commit` on), publishes each id
//!    `--events` times to a fan-out exchange (once per earning), and acknowledges the batch
//!    (the worker; the ledger's batch takes 7 round trips);
//! 3. a consumer of an exclusive, auto-deleting queue bound to that exchange writes each id to
//!    a WebSocket (the notifier), with its transaction's start (PostgreSQL's `now()`), so that
//!    the path splits there as `rest` splits it;
//! 4. the load generator's WebSocket client reads it.
//!
//! Every role runs in this one process (the real services are four), over the real sockets.
//! With `--rate 0` each connection sends its next message as soon as the last is answered:
//! REST as fast as possible, with upline's code removed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::extract::ws::{Message as AxumMessage, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, ExchangeKind};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use upline_common::amqp;

use super::env::{cpu_report, Bench, BenchEnv};
use super::{pacer, progress, progress_done, Latency};

/// The quorum queue the handler publishes to.
const IN_QUEUE: &str = "floor.in";
/// The fan-out exchange the consumer publishes to.
const OUT_EXCHANGE: &str = "floor.out";

#[derive(Debug, clap::Args)]
pub struct FloorArgs {
    /// Seconds of load.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Messages per second in total; `0` = as fast as the connections go (each sends its next
    /// message when the last is answered), as `rest` without `--rate`.
    #[arg(long, default_value_t = 20)]
    rate: u64,
    /// Concurrent HTTP connections.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Round trips of each batch's transaction, `BEGIN` and `COMMIT` included (at least 3).
    #[arg(long, default_value_t = 7)]
    round_trips: usize,
    /// Consumers taking batches from the quorum queue, each with its own channel.
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    /// Messages the consumer publishes to the fan-out exchange per message it commits: one per
    /// earning, so 2 is a purchase paying the default two levels.
    #[arg(long, default_value_t = 1)]
    events: usize,
    /// Most deliveries in one batch.
    #[arg(long, default_value_t = 1024)]
    batch_size: usize,
    /// Seconds at the start whose messages are left out of the latency figures, as with
    /// `rest --warmup-secs`; the to-WebSocket figures with them are printed too.
    #[arg(long, default_value_t = 0)]
    warmup_secs: u64,
    #[arg(long)]
    keep: bool,
}

pub async fn run(bench: Bench<'_>, args: FloorArgs) -> anyhow::Result<()> {
    let env = BenchEnv::new(bench, "floor", args.keep).await?;
    let result = scenario(&env, &args).await;
    env.finish().await;
    result
}

async fn scenario(env: &BenchEnv, args: &FloorArgs) -> anyhow::Result<()> {
    if args.round_trips < 3 {
        bail!("--round-trips is at least 3 (BEGIN, the insert, COMMIT)");
    }
    if args.events == 0 {
        bail!("--events is at least 1 (the observer waits for each message's first)");
    }
    let rate = match args.rate {
        0 => "as fast as possible".to_owned(),
        r => format!("{r} messages/s"),
    };
    println!(
        "floor (the path with upline's code removed): {} s, {rate}, {} connections, {} consumers, {} round trips a batch, {} events a message",
        args.duration, args.connections, args.consumers, args.round_trips, args.events
    );
    sqlx::query("create table floor_rows (id text primary key)")
        .execute(&env.db)
        .await?;
    // As the worker's pool: no ping before handing out a connection in steady use.
    let db = PgPoolOptions::new()
        .max_connections(8)
        .test_before_acquire(false)
        .connect(&env.settings.database.url)
        .await?;
    let conn = amqp::connect(&env.settings.amqp, "upline-bench-floor").await?;
    let setup = conn.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    setup
        .queue_declare(IN_QUEUE, durable, amqp::quorum_queue())
        .await?;
    setup
        .exchange_declare(
            OUT_EXCHANGE,
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;

    let stop = CancellationToken::new();
    // The notifier's part: its own queue, each id to every WebSocket.
    let (to_sockets, _) = broadcast::channel::<String>(65_536);
    let notifier_conn = amqp::connect(&env.settings.amqp, "upline-bench-floor-notifier").await?;
    let notifier = notifier_conn.create_channel().await?;
    let own = notifier
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    notifier
        .queue_bind(
            own.name().as_str(),
            OUT_EXCHANGE,
            "",
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut deliveries = notifier
        .basic_consume(
            own.name().as_str(),
            "floor-notifier",
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let fan_out = {
        let to_sockets = to_sockets.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = deliveries.next().await {
                let _ = to_sockets.send(String::from_utf8_lossy(&d.data).into_owned());
            }
        })
    };

    // The worker's part.
    let worker_conn = amqp::connect(&env.settings.amqp, "upline-bench-floor-worker").await?;
    let mut consumers = Vec::new();
    for n in 0..args.consumers {
        let channel = worker_conn.create_channel().await?;
        consumers.push(tokio::spawn(consume(
            channel,
            db.clone(),
            format!("floor-worker-{n}"),
            args.batch_size,
            args.round_trips,
            args.events,
            stop.clone(),
        )));
    }

    // The api's and the notifier's HTTP side.
    let api_conn = amqp::connect(&env.settings.amqp, "upline-bench-floor-api").await?;
    let publisher = api_conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let app = Router::new()
        .route("/m", post(accept))
        .with_state(publisher)
        .route("/ws", get(socket).with_state(to_sockets.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("127.0.0.1:{}", listener.local_addr()?.port());
    let server = {
        let stop = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };

    // The load generator's WebSocket client.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{base}/ws")).await?;
    // Each id's send time, by the monotonic clock and the wall clock (to split the path at the
    // transaction's start, PostgreSQL's now(), which the consumer sends along with the id).
    let sent: Arc<Mutex<HashMap<String, (Instant, OffsetDateTime)>>> = Arc::default();
    let delivered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let warmed = started + Duration::from_secs(args.warmup_secs);
    let observer = {
        let (sent, delivered, stop) = (sent.clone(), delivered.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut latency, mut to_tx, mut from_tx, mut with_warmup) = (
                Latency::new(),
                Latency::new(),
                Latency::new(),
                Latency::new(),
            );
            loop {
                let msg = tokio::select! {
                    () = stop.cancelled() => break,
                    msg = ws.next() => msg,
                };
                match msg {
                    Some(Ok(Message::Text(text))) => {
                        let Some((id, started)) = text.split_once(' ') else {
                            continue;
                        };
                        let at = sent.lock().expect("not poisoned").remove(id);
                        if let Some((t0, wall)) = at {
                            delivered.fetch_add(1, Ordering::Relaxed);
                            with_warmup.record(t0.elapsed());
                            if t0 < warmed {
                                continue;
                            }
                            latency.record(t0.elapsed());
                            let started = started
                                .parse::<i128>()
                                .ok()
                                .and_then(|n| OffsetDateTime::from_unix_timestamp_nanos(n).ok());
                            if let Some(started) = started {
                                let now = OffsetDateTime::now_utc();
                                to_tx.record((started - wall).try_into().unwrap_or_default());
                                from_tx.record((now - started).try_into().unwrap_or_default());
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => break,
                }
            }
            (latency, to_tx, from_tx, with_warmup)
        })
    };

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let deadline = started + Duration::from_secs(args.duration);
    let accepted = Arc::new(AtomicU64::new(0));
    let cpu_before = env.cpu();
    let mut tasks = Vec::new();
    for task in 0..args.connections {
        let (http, sent, accepted) = (http.clone(), sent.clone(), accepted.clone());
        let url = format!("http://{base}/m");
        let (rate, connections) = (args.rate, args.connections);
        tasks.push(tokio::spawn(async move {
            let mut latency = Latency::new();
            let mut ticker = pacer(Some(rate), connections);
            let mut n = 0u64;
            while Instant::now() < deadline {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let id = format!("f{task}-{n}");
                n += 1;
                let t0 = Instant::now();
                sent.lock()
                    .expect("not poisoned")
                    .insert(id.clone(), (t0, OffsetDateTime::now_utc()));
                let ok = http
                    .post(&url)
                    .body(id.clone())
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == StatusCode::ACCEPTED);
                if t0 >= warmed {
                    latency.record(t0.elapsed());
                }
                if ok {
                    accepted.fetch_add(1, Ordering::Relaxed);
                } else {
                    sent.lock().expect("not poisoned").remove(&id);
                }
            }
            latency
        }));
    }
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    while Instant::now() < deadline {
        ticker.tick().await;
        progress(&format!(
            "{:>5.1} s  accepted {}  delivered {}",
            started.elapsed().as_secs_f64(),
            accepted.load(Ordering::Relaxed),
            delivered.load(Ordering::Relaxed)
        ));
    }
    let mut http_latency = Latency::new();
    for t in tasks {
        http_latency.add(&t.await?);
    }
    let accepted_n = accepted.load(Ordering::Relaxed);
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    while delivered.load(Ordering::Relaxed) < accepted_n {
        if Instant::now() > drain_deadline {
            bail!(
                "not delivered within 60 s: {} of {accepted_n}",
                delivered.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress_done();
    let wall = started.elapsed();
    let cpu_after = env.cpu();
    stop.cancel();
    let (latency, to_tx, from_tx, with_warmup) = observer.await?;
    for c in consumers {
        c.await?.context("a floor consumer failed")?;
    }
    server.await??;
    fan_out.abort();
    let rows: i64 = sqlx::query_scalar("select count(*) from floor_rows")
        .fetch_one(&db)
        .await?;
    db.close().await;
    for c in [conn, notifier_conn, worker_conn, api_conn] {
        let _ = c.close(200, "done").await;
    }

    println!(
        "accepted        {accepted_n} messages in {:.1} s, {rows} rows committed",
        wall.as_secs_f64()
    );
    println!(
        "end to end      all {accepted_n} committed and delivered after {:.1} s = {:.0} messages/s",
        wall.as_secs_f64(),
        accepted_n as f64 / wall.as_secs_f64()
    );
    println!("HTTP latency    {}", http_latency.summary());
    println!("to WebSocket    {}", latency.summary());
    println!(
        "  of which      POST → transaction start {}",
        to_tx.summary()
    );
    println!(
        "                transaction start → WebSocket {}",
        from_tx.summary()
    );
    if args.warmup_secs > 0 {
        println!(
            "  warm-up       the messages sent in the first {} s are left out above; with them, to WebSocket {}",
            args.warmup_secs,
            with_warmup.summary()
        );
    }
    println!(
        "CPU (cores)     {}",
        cpu_report(&cpu_before, &cpu_after, wall)
    );
    if rows != i64::try_from(accepted_n)? {
        bail!("{rows} rows committed for {accepted_n} accepted messages");
    }
    Ok(())
}

/// The api's part: publish the body, persistent, to the quorum queue; `202` after the
/// publisher confirm, `503` if the broker refused it.
async fn accept(State(channel): State<Channel>, body: String) -> StatusCode {
    let confirmed = async {
        channel
            .basic_publish(
                "",
                IN_QUEUE,
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await
    };
    match confirmed.await {
        Ok(c) if c.is_ack() => StatusCode::ACCEPTED,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The notifier's part: every id published to the fan-out exchange, to this socket.
async fn socket(
    State(ids): State<broadcast::Sender<String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let mut ids = ids.subscribe();
    upgrade.on_upgrade(move |mut ws: WebSocket| async move {
        while let Ok(id) = ids.recv().await {
            if ws.send(AxumMessage::Text(id.into())).await.is_err() {
                break;
            }
        }
    })
}

/// The worker's part: batches of what is ready, one transaction each, then each id to the
/// fan-out exchange and one `multiple` ack.
async fn consume(
    channel: Channel,
    db: PgPool,
    tag: String,
    batch_size: usize,
    round_trips: usize,
    events: usize,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_qos(
            u16::try_from(batch_size).unwrap_or(u16::MAX),
            BasicQosOptions::default(),
        )
        .await?;
    let consumer = channel
        .basic_consume(
            IN_QUEUE,
            &tag,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut batches = consumer.ready_chunks(batch_size);
    loop {
        let chunk = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            chunk = batches.next() => chunk,
        };
        let Some(chunk) = chunk else { return Ok(()) };
        let deliveries = chunk.into_iter().collect::<Result<Vec<_>, _>>()?;
        let Some(last) = deliveries.last().map(|d| d.delivery_tag) else {
            continue;
        };
        let ids: Vec<String> = deliveries
            .iter()
            .map(|d| String::from_utf8_lossy(&d.data).into_owned())
            .collect();
        let mut tx = db.begin().await?;
        let started: OffsetDateTime = sqlx::query_scalar(
            "with rows as (insert into floor_rows (id) select * from unnest($1::text[])) select now()",
        )
        .bind(&ids)
        .fetch_one(&mut *tx)
        .await?;
        let started = started.unix_timestamp_nanos();
        for _ in 3..round_trips {
            sqlx::query("select 1").execute(&mut *tx).await?;
        }
        tx.commit().await?;
        for id in ids.iter().flat_map(|id| std::iter::repeat_n(id, events)) {
            // Not waited for here: routing to the notifier's queue does not wait for it.
            let _confirm = channel
                .basic_publish(
                    OUT_EXCHANGE,
                    "",
                    BasicPublishOptions::default(),
                    format!("{id} {started}").as_bytes(),
                    BasicProperties::default(),
                )
                .await?;
        }
        channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await?;
    }
}
