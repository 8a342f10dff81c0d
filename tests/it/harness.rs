//! `TestApp`: api, worker and notifier running in this process on ephemeral ports, in a
//! sandbox of its own (fresh database and RabbitMQ vhost, `upline_testkit::sandbox`).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use lapin::options::BasicGetOptions;
use serde_json::Value;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use upline_common::amqp::Publisher;
use upline_common::{amqp, Settings, UserId};
use upline_testkit::client::{Api, NewUser};
use upline_testkit::order::{self, Order};
use upline_testkit::rabbit::RabbitAdmin;
use upline_testkit::sandbox::Sandbox;

pub use upline_testkit::local::RABBIT_MANAGEMENT;
pub use upline_testkit::spawn::free_port;
pub use upline_testkit::unique;

pub const ADMIN: &str = "test-admin-key";
pub const PRODUCER: &str = "test-producer-key";

/// Which services a test app runs in-process.
#[derive(Clone, Copy)]
pub struct Services {
    pub worker: bool,
    /// Whether the app's broker is reachable (readiness is awaited only then).
    pub broker: bool,
}

impl Services {
    /// The broker up and no in-process worker: the test drives the ledger, or starts and stops
    /// workers of its own.
    pub const NO_WORKER: Services = Services {
        worker: false,
        broker: true,
    };
}

impl Default for Services {
    fn default() -> Self {
        Services {
            worker: true,
            broker: true,
        }
    }
}

pub struct TestApp {
    pub api: String,
    pub notifier: String,
    pub ws_url: String,
    /// The in-process worker's health and metrics base URL, when the app runs one.
    pub worker: Option<String>,
    pub db: PgPool,
    pub settings: Settings,
    pub http: reqwest::Client,
    /// The api as a typed client, with the test keys.
    pub client: Api,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    sandbox: Sandbox,
}

/// A registered user.
#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub token: String,
    pub referral_code: String,
}

/// A test's user id as the domain type (test users are registered, so positive).
/// The Prometheus text a service serves at `{base}/metrics`.
pub async fn metrics_text(http: &reqwest::Client, base: &str) -> String {
    http.get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

pub use upline_testkit::pipeline::metric_value;

pub fn user_id(id: i64) -> UserId {
    UserId::new(id).expect("a positive user id")
}

/// Settings for this machine's servers (a [`Sandbox`] points them at its own database and
/// vhost), everything bound to 127.0.0.1:0.
pub fn test_settings() -> Settings {
    // Development, explicitly (the default is production, which refuses the short test keys);
    // abuse limits off: every test client comes from 127.0.0.1 (tests of the limits turn them
    // back on).
    let mut s = upline_testkit::local::settings(&[("limits.enabled", "false")])
        .expect("built-in defaults load");
    s.database.max_connections = 5;
    s.api.bind = "127.0.0.1:0".parse().expect("valid address");
    s.worker.bind = "127.0.0.1:0".parse().expect("valid address");
    s.notifier.bind = "127.0.0.1:0".parse().expect("valid address");
    s.worker.outbox_poll_ms = 100;
    s.worker.leaderboard_refresh_ms = 100;
    s.auth.admin_token = ADMIN.to_owned().into();
    s.auth.producer_token = PRODUCER.to_owned().into();
    s.auth.token_secret = "test-token-secret-0123456789".to_owned().into();
    s.log.level = "warn".into();
    s
}

/// A fresh sandbox for a test on this machine's servers, with [`test_settings`].
pub async fn sandbox() -> Sandbox {
    Sandbox::create(&test_settings(), &RabbitAdmin::local(), "upline_test")
        .await
        .expect("creating a test sandbox")
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(Services::default(), |_| {}).await
    }

    /// Spawns with chosen services and settings adjusted by `configure`.
    pub async fn spawn_with(services: Services, configure: impl FnOnce(&mut Settings)) -> TestApp {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        let mut sandbox = sandbox().await;
        configure(&mut sandbox.settings);
        // Migrate once before the services start.
        let db = sandbox.migrate().await.expect("database ready");
        let mut settings = sandbox.settings.clone();
        let shutdown = CancellationToken::new();

        let api_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let notifier_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let api = format!("http://{}", api_listener.local_addr().expect("addr"));
        let notifier_addr = notifier_listener.local_addr().expect("addr");
        // The dashboard served by the api connects to this notifier.
        settings.api.notifier_public_url = format!("ws://{notifier_addr}/ws");
        let mut tasks = vec![
            tokio::spawn(upline_api::run(
                service_settings(&settings, "api"),
                api_listener,
                shutdown.clone(),
            )),
            tokio::spawn(upline_notifier::run(
                service_settings(&settings, "notifier"),
                notifier_listener,
                shutdown.clone(),
            )),
        ];
        let mut worker = None;
        if services.worker {
            let worker_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            worker = Some(format!(
                "http://{}",
                worker_listener.local_addr().expect("addr")
            ));
            tasks.push(tokio::spawn(upline_worker::run(
                service_settings(&settings, "worker"),
                worker_listener,
                shutdown.clone(),
            )));
        }
        let client = Api::new(http.clone(), &api, ADMIN, PRODUCER);
        let app = TestApp {
            api,
            notifier: format!("http://{notifier_addr}"),
            ws_url: format!("ws://{notifier_addr}/ws"),
            worker,
            db,
            settings,
            http,
            client,
            shutdown,
            tasks,
            sandbox,
        };
        let probe = if services.broker {
            "/readyz"
        } else {
            "/healthz"
        };
        app.wait_ready(&app.api, probe).await;
        app.wait_ready(&app.notifier, probe).await;
        app
    }

    async fn wait_ready(&self, base: &str, probe: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self.http.get(format!("{base}{probe}")).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "{base} did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every service and removes the database and vhost.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            match tokio::time::timeout(Duration::from_secs(15), task).await {
                Ok(joined) => joined
                    .expect("service task did not panic")
                    .expect("service stopped cleanly"),
                Err(_) => panic!("a service did not stop within 15 s of shutdown"),
            }
        }
        self.db.close().await;
        self.sandbox.destroy().await.expect("drop test database");
    }

    /// Starts one more notifier on this app's database and vhost; returns its WebSocket URL.
    pub async fn spawn_notifier(&mut self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        self.tasks.push(tokio::spawn(upline_notifier::run(
            service_settings(&self.settings, "notifier"),
            listener,
            self.shutdown.clone(),
        )));
        self.wait_ready(&format!("http://{addr}"), "/readyz").await;
        format!("ws://{addr}/ws")
    }

    /// Starts one more api on this app's database and vhost, with its settings adjusted by
    /// `configure`; returns a client of it with the test keys.
    pub async fn spawn_api(&mut self, configure: impl FnOnce(&mut Settings)) -> Api {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let mut settings = service_settings(&self.settings, "api");
        configure(&mut settings);
        self.tasks.push(tokio::spawn(upline_api::run(
            settings,
            listener,
            self.shutdown.clone(),
        )));
        self.wait_ready(&base, "/readyz").await;
        Api::new(self.http.clone(), &base, ADMIN, PRODUCER)
    }

    /// `upline worker` as a process of its own against this app's database and vhost, with
    /// small batches (16, prefetch 32), so that a stream takes many transactions and a kill
    /// lands inside it, and a 100 ms outbox sweep. Add settings with `.env`, then `.spawn()`.
    pub fn worker_process(&self) -> upline_testkit::spawn::ServiceCommand {
        upline_testkit::spawn::ServiceCommand::new(
            std::path::Path::new(env!("CARGO_BIN_EXE_upline")),
            "worker",
        )
        .settings(&self.settings)
        .env("UPLINE__WORKER__OUTBOX_POLL_MS", "100")
        .env("UPLINE__WORKER__BATCH_SIZE", "16")
        .env("UPLINE__WORKER__PREFETCH", "32")
    }

    /// Starts a worker in this process (for apps spawned without one).
    pub async fn spawn_worker(&mut self) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        self.tasks.push(tokio::spawn(upline_worker::run(
            service_settings(&self.settings, "worker"),
            listener,
            self.shutdown.clone(),
        )));
    }

    /// Starts a notifier on `addr` (port 0 for any) that stops when `stop` is cancelled, as a
    /// notifier restart would; returns its HTTP base URL. Await the handle after cancelling.
    pub async fn spawn_stoppable_notifier(
        &self,
        addr: &str,
        stop: CancellationToken,
    ) -> (String, JoinHandle<anyhow::Result<()>>) {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(upline_notifier::run(
            service_settings(&self.settings, "notifier"),
            listener,
            stop,
        ));
        let base = format!("http://{addr}");
        self.wait_ready(&base, "/readyz").await;
        (base, task)
    }

    /// Starts a webhooks service that stops when `stop` is cancelled, as a restart would;
    /// returns its health base URL once ready. Await the handle after cancelling.
    pub async fn spawn_stoppable_webhooks(
        &self,
        stop: CancellationToken,
    ) -> (String, JoinHandle<anyhow::Result<()>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(upline_webhooks::run(
            service_settings(&self.settings, "webhooks"),
            listener,
            stop,
        ));
        self.wait_ready(&base, "/readyz").await;
        (base, task)
    }

    /// Starts a worker that stops when `stop` is cancelled (for apps spawned without one), as
    /// a worker restart would. Await the handle after cancelling.
    pub async fn spawn_stoppable_worker(
        &self,
        stop: CancellationToken,
    ) -> JoinHandle<anyhow::Result<()>> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(upline_worker::run(
            service_settings(&self.settings, "worker"),
            listener,
            stop,
        ));
        self.wait_ready(&base, "/readyz").await;
        task
    }

    /// Closes, from the broker's side, every connection of this app whose client-provided
    /// name is `name` (e.g. "upline-notifier"), as a broker restart or network cut would.
    /// The management API lists connections with a few seconds' delay, so this waits (up to
    /// 20 s) until at least one shows. Returns how many were closed.
    pub async fn kill_broker_connections(&self, name: &str) -> usize {
        let rabbit = self.sandbox.rabbit();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let list = rabbit
                .connections(self.vhost())
                .await
                .unwrap_or_else(|e| panic!("{e:?}"));
            let mut closed = 0;
            for c in list {
                if c.client_properties.connection_name.as_deref() != Some(name) {
                    continue;
                }
                rabbit
                    .close_connection(&c.name)
                    .await
                    .unwrap_or_else(|e| panic!("{e:#}"));
                closed += 1;
            }
            if closed > 0 {
                return closed;
            }
            assert!(
                Instant::now() < deadline,
                "no {name} connection showed up in the management API"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api)
    }

    /// Registers a user, optionally under a referrer.
    pub async fn register(&self, name: &str, referrer: Option<i64>) -> User {
        let email = format!(
            "{}@example.com",
            unique(&name.to_lowercase().replace(' ', "."))
        );
        // Naming the referrer by id takes the admin key (README "Security").
        let r = self
            .client
            .register(&NewUser::new(name, email, referrer.map(user_id)))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        User {
            id: r.id.get(),
            token: r.token,
            referral_code: r.referral_code,
        }
    }

    /// A chain A ← B ← C (C referred by B, B by A), as in SPEC §2.
    pub async fn chain_abc(&self) -> (User, User, User) {
        let a = self.register("Asha", None).await;
        let b = self.register("Bala", Some(a.id)).await;
        let c = self.register("Chitra", Some(b.id)).await;
        (a, b, c)
    }

    /// Deactivates a user with the admin key, requiring 200.
    pub async fn deactivate(&self, user_id: i64) {
        self.client
            .deactivate(self::user_id(user_id))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// POST /api/purchases as the producer.
    pub async fn post_purchase(&self, body: Value) -> reqwest::Response {
        self.client.post_purchase(&body).await.expect("request")
    }

    /// POST a purchase and require 202.
    pub async fn purchase(&self, purchase_id: &str, buyer_id: i64, amount: &str) {
        let amount = amount.parse().expect("a decimal amount");
        self.client
            .purchase(&Order::new(purchase_id, user_id(buyer_id), amount))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// GET with the admin key.
    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        self.client.admin_get(path).await.expect("request")
    }

    /// Waits (up to 20 s) until a worker has recorded the purchase; returns its report.
    pub async fn wait_processed(&self, purchase_id: &str) -> Value {
        self.client
            .wait_processed(purchase_id, Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Waits until `count` purchases are recorded.
    pub async fn wait_purchase_count(&self, count: i64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let n = upline_testkit::pipeline::purchases(&self.db)
                .await
                .expect("count");
            if n >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {n} of {count} purchases processed within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A user's earnings summary (as admin).
    pub async fn earnings(&self, user_id: i64) -> Value {
        let (status, body) = self
            .admin_get(&format!("/api/users/{user_id}/earnings"))
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// A broker connection to this app's vhost.
    pub async fn amqp(&self) -> lapin::Connection {
        amqp::connect(&self.settings.amqp, "upline-test")
            .await
            .expect("connect to RabbitMQ")
    }

    /// A connection of its own and a channel on it in publisher-confirm mode.
    pub async fn confirming_channel(&self) -> (lapin::Connection, lapin::Channel) {
        let conn = self.amqp().await;
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(Default::default())
            .await
            .expect("confirms");
        (conn, channel)
    }

    /// Publishes raw bytes onto `upline.purchases` (like a careless external producer: not
    /// mandatory, no message id) and waits for the broker's confirm.
    pub async fn publish_raw(&self, body: &[u8]) {
        let (conn, channel) = self.confirming_channel().await;
        let confirm = amqp::publish_raw(&channel, body)
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
        conn.close(200, "done").await.expect("close");
    }

    /// Publishes purchases onto `upline.purchases` through the api's own publisher
    /// (mandatory, message id = purchase id), in order, pipelined, and waits until the broker
    /// confirmed them all.
    pub async fn publish_all(&self, orders: impl IntoIterator<Item = Order>) {
        let orders: Vec<Order> = orders.into_iter().collect();
        let publisher = Publisher::new(self.settings.amqp.clone(), Default::default())
            .with_connection_name("upline-test");
        let currency = self.settings.commission.rules().expect("rules").currency;
        order::publish(&publisher, &orders, &currency)
            .await
            .unwrap_or_else(|e| panic!("publishing purchases: {e:#}"));
        publisher.close().await;
    }

    /// Publishes a refund onto `upline.purchases` with routing key `refund`, as an external
    /// system would (through the api's publisher: mandatory, message id = refund id), and
    /// waits for the broker's confirm. `amount` `None` refunds whatever remains.
    pub async fn publish_refund(&self, refund_id: &str, purchase_id: &str, amount: Option<&str>) {
        let refund = upline_common::refund::Refund {
            refund_id: upline_common::refund::RefundId::parse(refund_id).expect("valid id"),
            purchase_id: upline_common::purchase::PurchaseId::parse(purchase_id).expect("valid id"),
            amount: amount.map(|a| upline_common::Money::parse(a).expect("valid amount")),
        };
        let publisher = Publisher::new(self.settings.amqp.clone(), Default::default())
            .with_connection_name("upline-test");
        publisher
            .publish_refund(&refund)
            .await
            .unwrap_or_else(|e| panic!("publishing refund {refund_id}: {e}"));
        publisher.close().await;
    }

    /// Publishes `n` purchases of 2000.00 by `buyer`, ids `<prefix>-0` …, straight onto the
    /// queue ([`TestApp::publish_all`]).
    pub async fn publish_purchases(&self, prefix: &str, buyer: i64, n: usize) {
        let amount = rust_decimal::Decimal::new(200_000, 2);
        self.publish_all(
            (0..n).map(|i| Order::new(format!("{prefix}-{i}"), user_id(buyer), amount)),
        )
        .await;
    }

    /// Takes one message from the dead-letter queue, waiting up to 10 s.
    pub async fn get_dead_letter(&self) -> lapin::message::BasicGetMessage {
        let conn = self.amqp().await;
        let channel = conn.create_channel().await.expect("channel");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(m) = channel
                .basic_get(amqp::PURCHASES_DEAD_QUEUE, BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get")
            {
                conn.close(200, "done").await.expect("close");
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "nothing reached the dead-letter queue within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens a WebSocket on this app's notifier and subscribes to `user_id` (a user id, or
    /// `Target::All`).
    pub async fn subscribe(
        &self,
        user_id: impl SubscribeTarget,
        token: &str,
        since: Option<i64>,
    ) -> Ws {
        subscribe_at(&self.ws_url, user_id, token, since).await
    }
}

/// What a subscription may name: a test user's id (`i64`, positive), a `UserId`, or a
/// `Target` (`Target::All` for the admin feed).
pub trait SubscribeTarget {
    /// The target of the `subscribe` message.
    fn target(self) -> upline_common::protocol::Target;
}

impl SubscribeTarget for i64 {
    fn target(self) -> upline_common::protocol::Target {
        upline_common::UserId::new(self)
            .expect("a positive user id")
            .into()
    }
}

impl SubscribeTarget for upline_common::UserId {
    fn target(self) -> upline_common::protocol::Target {
        self.into()
    }
}

impl SubscribeTarget for upline_common::protocol::Target {
    fn target(self) -> upline_common::protocol::Target {
        self
    }
}

/// Opens a WebSocket on a notifier and subscribes; returns the socket after `subscribed`.
pub async fn subscribe_at(
    ws_url: &str,
    user_id: impl SubscribeTarget,
    token: &str,
    since: Option<i64>,
) -> Ws {
    use upline_common::protocol::{ServerMessage, Subscribe};
    let (ws, _) = tokio_tungstenite::connect_async(ws_url)
        .await
        .expect("websocket connects");
    let mut ws = Ws(ws);
    let target = user_id.target();
    ws.send_text(Subscribe::new(target, token, since).to_text())
        .await
        .expect("send subscribe");
    let first = ws.next().await;
    assert_eq!(
        first,
        ServerMessage::Subscribed { user_id: target },
        "unexpected first frame"
    );
    ws
}

/// A WebSocket client.
pub struct Ws(
    pub tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
);

impl Ws {
    /// Sends a text frame (a [`upline_common::protocol::Subscribe`] as text, or anything a
    /// test wants the notifier to read).
    pub async fn send_text(
        &mut self,
        text: String,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.0.send(Message::Text(text.into())).await
    }

    /// Sends `subscribe` to `user_id` with `token` (and `since`), without waiting for the
    /// answer.
    pub async fn send_subscribe(
        &mut self,
        user_id: impl SubscribeTarget,
        token: &str,
        since: Option<i64>,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        let subscribe = upline_common::protocol::Subscribe::new(user_id.target(), token, since);
        self.send_text(subscribe.to_text()).await
    }

    /// The next message from the notifier (pings answered by the library), waiting up to
    /// 15 s; panics on a close or a frame that is not a protocol message.
    pub async fn next(&mut self) -> upline_common::protocol::ServerMessage {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(15), self.0.next())
                .await
                .expect("a frame within 15 s")
                .expect("socket open")
                .expect("frame");
            match msg {
                Message::Text(t) => return server_message(&t),
                Message::Close(c) => panic!("socket closed: {c:?}"),
                _ => {}
            }
        }
    }

    /// The next `n` earning events.
    pub async fn earnings(&mut self, n: usize) -> Vec<upline_common::events::EarningEvent> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next().await {
                upline_common::protocol::ServerMessage::Earning { earning } => out.push(earning),
                other => panic!("unexpected frame {other:?}"),
            }
        }
        out
    }
}

/// A text frame of the notifier as a protocol message; panics on anything else.
pub fn server_message(text: &str) -> upline_common::protocol::ServerMessage {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not a server message ({e}): {text}"))
}

/// `tests/browser/node_modules`, installed with `npm ci` when missing.
pub async fn browser_test_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let installed = ["playwright-core", "socket.io-client", "standardwebhooks"]
        .iter()
        .all(|module| dir.join("node_modules").join(module).is_dir());
    if !installed {
        let out = tokio::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .await
            .expect("npm runs (Node.js 18+ and npm are needed for the browser test)");
        assert!(
            out.status.success(),
            "`npm ci` in {} failed; run it by hand:\n{}{}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

impl Ws {
    /// Reads until the server closes the socket (waiting up to 15 s): the messages that
    /// came first, and the close code and reason.
    pub async fn until_close(
        &mut self,
    ) -> (
        Vec<upline_common::protocol::ServerMessage>,
        Option<(u16, String)>,
    ) {
        let mut frames = Vec::new();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(15), self.0.next())
                .await
                .expect("the server closes within 15 s");
            match msg {
                None | Some(Err(_)) => return (frames, None),
                Some(Ok(Message::Text(t))) => frames.push(server_message(&t)),
                Some(Ok(Message::Close(c))) => {
                    return (frames, c.map(|c| (u16::from(c.code), c.reason.to_string())))
                }
                Some(Ok(_)) => {}
            }
        }
    }
}

/// An SSE stream read with reqwest, as a non-browser client would.
pub struct Sse {
    response: reqwest::Response,
    buffer: String,
}

impl Sse {
    /// Opens `GET {notifier}/events/{user_id}` with the token in the `Authorization` header,
    /// or in `?token=` when `in_url`. Returns the status and, on 200, the stream.
    pub async fn open(app: &TestApp, user_id: i64, token: &str, in_url: bool) -> (u16, Self) {
        let url = format!("{}/events/{user_id}", app.notifier);
        let request = if in_url {
            app.http.get(format!("{url}?token={token}"))
        } else {
            app.http.get(url).bearer_auth(token)
        };
        let response = request.send().await.expect("request");
        (
            response.status().as_u16(),
            Sse {
                response,
                buffer: String::new(),
            },
        )
    }

    /// The body of an answer that was not a stream.
    pub async fn problem(self) -> Value {
        self.response.json().await.expect("problem+json")
    }

    /// Reads events until one named `event` arrives (waiting up to 15 s); returns its data
    /// (an `EarningEvent` for `earning`, an `ErrorMessage` for `feed-error`). `None` if the
    /// stream ended first.
    pub async fn until_event<T: serde::de::DeserializeOwned>(
        &mut self,
        event: upline_common::protocol::SseEvent,
    ) -> Option<T> {
        let name = event.as_str();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                let mut kind = "message";
                let mut data = String::new();
                for line in event.lines() {
                    if let Some(k) = line.strip_prefix("event:") {
                        kind = k.trim();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim());
                    }
                }
                if kind == name {
                    return Some(serde_json::from_str(&data).unwrap_or_else(|e| {
                        panic!("`{name}` data is not the protocol's ({e}): {data}")
                    }));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, self.response.chunk())
                .await
                .unwrap_or_else(|_| panic!("no `{name}` event within 15 s"))
                .expect("stream readable")?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

/// Stands, in `amqp.url`, for the name of the service connecting ("api", "worker",
/// "notifier"), so that each service of a test app can connect as its own broker user.
pub const SERVICE: &str = "{service}";

/// The settings one service of a test app runs with: `amqp.url` with every [`SERVICE`]
/// replaced by `service` (unchanged when there is none).
pub fn service_settings(settings: &Settings, service: &str) -> Settings {
    let mut s = settings.clone();
    s.amqp.url = s.amqp.url.replace(SERVICE, service);
    s
}

impl TestApp {
    /// Waits (up to 20 s) until the api and the notifier answer `/readyz` with 200.
    pub async fn wait_until_ready(&self) {
        self.wait_ready(&self.api, "/readyz").await;
        self.wait_ready(&self.notifier, "/readyz").await;
    }

    /// This app's RabbitMQ vhost.
    pub fn vhost(&self) -> &str {
        self.sandbox.name()
    }
}

/// Runs `node <dir>/<script> <args>` (a browser test in `tests/browser/`) and fails the test,
/// with everything it printed, unless it exits 0 within `within`.
pub async fn run_node_script(dir: &std::path::Path, script: &str, args: &[&str], within: Duration) {
    let run = tokio::process::Command::new("node")
        .arg(dir.join(script))
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(within, run)
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within {within:?}"))
        .expect("node runs (Node.js 18+ is needed for the browser tests)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}
