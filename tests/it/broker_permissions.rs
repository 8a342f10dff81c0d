//! Least-privilege broker users (`deploy/rabbitmq-users.sh`): the pipeline works end to end
//! with each service connecting as its own user, the api and the notifier wait for the worker
//! to declare the topology, and a producer (or the api's user) can publish purchases and do
//! nothing else.

use std::process::Command;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::ExchangeKind;
use rand::Rng;
use serde_json::{json, Value};
use upline_common::amqp;
use upline_common::Level;
use upline_testkit::rabbit::RabbitAdmin;

use crate::harness::{Services, TestApp, RABBIT_MANAGEMENT, SERVICE};

/// The broker users of one test, named uniquely (users are global in RabbitMQ), deleted on
/// drop, also when the test fails.
struct BrokerUsers {
    prefix: String,
    secret: String,
}

impl BrokerUsers {
    fn new() -> Self {
        let mut rng = rand::thread_rng();
        BrokerUsers {
            prefix: format!("upline-test-{:016x}-", rng.gen::<u64>()),
            secret: format!("{:032x}", rng.gen::<u128>()),
        }
    }

    fn name(&self, service: &str) -> String {
        format!("{}{service}", self.prefix)
    }

    fn password(&self, service: &str) -> String {
        format!("{}-{service}", self.secret)
    }

    /// The AMQP URL of `service`'s user on `vhost`; `service` may be [`SERVICE`].
    fn url(&self, service: &str, vhost: &str) -> String {
        format!(
            "amqp://{}:{}@127.0.0.1:5672/{vhost}",
            self.name(service),
            self.password(service)
        )
    }

    /// Runs `deploy/rabbitmq-users.sh` for `vhost` against the local management API, with
    /// the producer user too. Blocking: called before the services start.
    fn provision(&self, vhost: &str) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/rabbitmq-users.sh");
        let out = Command::new("sh")
            .arg(script)
            .env("RABBITMQ_MANAGEMENT_URL", RABBIT_MANAGEMENT)
            .env("RABBITMQ_ADMIN_USER", "guest")
            .env("RABBITMQ_ADMIN_PASSWORD", "guest")
            .env("RABBITMQ_VHOST", vhost)
            .env("UPLINE_AMQP_USER_PREFIX", &self.prefix)
            .env("UPLINE_API_AMQP_PASSWORD", self.password("api"))
            .env("UPLINE_WORKER_AMQP_PASSWORD", self.password("worker"))
            .env("UPLINE_NOTIFIER_AMQP_PASSWORD", self.password("notifier"))
            .env("UPLINE_WEBHOOKS_AMQP_PASSWORD", self.password("webhooks"))
            .env("UPLINE_PRODUCER_AMQP_USER", self.name("producer"))
            .env("UPLINE_PRODUCER_AMQP_PASSWORD", self.password("producer"))
            .output()
            .expect("sh runs the provisioning script");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "rabbitmq-users.sh failed:\n{stdout}{stderr}"
        );
        for service in ["api", "worker", "notifier", "webhooks", "producer"] {
            assert!(
                stdout.contains(&format!("user '{}'", self.name(service))),
                "the script did not report user {service}:\n{stdout}"
            );
        }
        assert!(
            !stdout.contains(&self.secret) && !stderr.contains(&self.secret),
            "the script printed a password"
        );
    }
}

impl Drop for BrokerUsers {
    fn drop(&mut self) {
        for service in ["api", "worker", "notifier", "webhooks", "producer"] {
            // Best effort (a user that was never created answers 404).
            let _ = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-u", "guest:guest", "-X", "DELETE"])
                .arg(format!(
                    "{RABBIT_MANAGEMENT}/api/users/{}",
                    self.name(service)
                ))
                .status();
        }
    }
}

/// Requires the broker's answer to be 403 ACCESS_REFUSED.
fn assert_refused<T: std::fmt::Debug>(what: &str, result: lapin::Result<T>) {
    match result {
        Err(e) if amqp::is_access_refused(&e) => {}
        other => panic!("{what}: expected ACCESS_REFUSED, got {other:?}"),
    }
}

/// Publishes `body` to `exchange` on a fresh confirming channel; the broker's confirm.
async fn publish(
    conn: &lapin::Connection,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
) -> lapin::Result<lapin::publisher_confirm::Confirmation> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions::default(),
            body,
            amqp::persistent_json(),
        )
        .await?
        .await
}

/// What a user may not do on `upline.purchases`: consume it or purge it.
async fn assert_cannot_consume_or_purge(user: &str, conn: &lapin::Connection) {
    let channel = conn.create_channel().await.expect("channel");
    assert_refused(
        &format!("{user} consuming upline.purchases"),
        channel
            .basic_consume(
                amqp::PURCHASES_QUEUE,
                "thief",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await,
    );
    let channel = conn.create_channel().await.expect("channel");
    assert_refused(
        &format!("{user} purging upline.purchases"),
        channel
            .queue_purge(amqp::PURCHASES_QUEUE, QueuePurgeOptions::default())
            .await,
    );
}

#[tokio::test]
async fn each_service_runs_as_its_own_least_privilege_user_and_producers_can_only_publish() {
    let users = BrokerUsers::new();
    // The api and the notifier start first, each as its own user, on a vhost where nothing
    // is declared yet: they may not declare the topology, so they must wait for the worker.
    let mut app = TestApp::spawn_with(
        Services {
            worker: false,
            broker: false,
        },
        |s| {
            let vhost = s
                .amqp
                .url
                .rsplit('/')
                .next()
                .expect("a vhost in the test URL")
                .to_owned();
            users.provision(&vhost);
            s.amqp.url = users.url(SERVICE, &vhost);
        },
    )
    .await;
    let vhost = app.vhost().to_owned();
    let (a, b, c) = app.chain_abc().await;

    // Without the topology: not ready, purchases refused as during a broker outage, and
    // neither the api nor the notifier declared anything.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        for base in [&app.api, &app.notifier] {
            let r = app
                .http
                .get(format!("{base}/readyz"))
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), 503, "{base} ready without the topology");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let r = app
        .post_purchase(json!({"purchase_id": "too-early", "buyer_id": c.id, "amount": "2000"}))
        .await;
    assert_eq!(r.status(), 503);
    let problem: Value = r.json().await.expect("json");
    assert_eq!(problem["code"], "broker_unavailable");
    for exchange in [amqp::PURCHASES_EXCHANGE, amqp::EARNINGS_EXCHANGE] {
        assert!(
            !RabbitAdmin::local()
                .exchange_exists(&vhost, exchange)
                .await
                .unwrap_or_else(|e| panic!("{e:#}")),
            "{exchange} was declared before the worker started"
        );
    }

    // The worker, last, declares the topology; the others notice by themselves.
    app.spawn_worker().await;
    app.wait_until_ready().await;
    // The webhooks service declares and binds its own queues as its own user.
    let stop_webhooks = tokio_util::sync::CancellationToken::new();
    let (_, webhooks) = app.spawn_stoppable_webhooks(stop_webhooks.clone()).await;
    for queue in [amqp::WEBHOOK_EARNINGS_QUEUE, amqp::WEBHOOK_PURCHASES_QUEUE] {
        assert!(
            RabbitAdmin::local()
                .queue_exists(&vhost, queue)
                .await
                .unwrap_or_else(|e| panic!("{e:#}")),
            "{queue} was not declared"
        );
    }
    stop_webhooks.cancel();
    webhooks
        .await
        .expect("joined")
        .expect("webhooks service stopped cleanly");

    // End to end over REST, with the earning pushed to a WebSocket subscriber.
    let mut ws = app.subscribe(b.id, &b.token, None).await;
    app.purchase("rest-1", c.id, "2000.00").await;
    let report = app.wait_processed("rest-1").await;
    assert_eq!(report["status"], "processed", "{report}");
    let e = ws.earnings(1).await.remove(0);
    assert_eq!(
        (
            e.purchase_id.as_deref(),
            e.level.map(Level::get),
            e.amount.to_string()
        ),
        (Some("rest-1"), Some(1), "100.00".to_owned())
    );
    assert_eq!(app.earnings(a.id).await["total"], "20.00");

    // An external producer: publishing purchases is confirmed (and they are paid) ...
    let producer = amqp::connect(
        &plain(users.url("producer", &vhost)),
        "upline-test-producer",
    )
    .await
    .expect("the producer user logs in");
    let body = json!({"purchase_id": "queued-1", "buyer_id": c.id, "amount": "1500.00"});
    let confirmation = publish(
        &producer,
        amqp::PURCHASES_EXCHANGE,
        amqp::PURCHASE_ROUTING_KEY,
        body.to_string().as_bytes(),
    )
    .await
    .expect("the producer may publish purchases");
    assert!(confirmation.is_ack(), "{confirmation:?}");
    let report = app.wait_processed("queued-1").await;
    assert_eq!(report["status"], "processed", "{report}");
    let e = ws.earnings(1).await.remove(0);
    assert_eq!(
        (e.purchase_id.as_deref(), e.amount.to_string()),
        (Some("queued-1"), "75.00".to_owned())
    );

    // ... and nothing else.
    let fake_earning = json!({"earning_id": 1, "earner_id": b.id, "seq": 99});
    assert_refused(
        "producer publishing to upline.earnings",
        publish(
            &producer,
            amqp::EARNINGS_EXCHANGE,
            &format!("earning.1.{}", b.id),
            fake_earning.to_string().as_bytes(),
        )
        .await,
    );
    assert_refused(
        "producer publishing to upline.purchases.dlx",
        publish(&producer, amqp::PURCHASES_DLX, "", b"{}").await,
    );
    assert_cannot_consume_or_purge("producer", &producer).await;
    let channel = producer.create_channel().await.expect("channel");
    assert_refused(
        "producer declaring an exchange",
        channel
            .exchange_declare(
                "upline.rogue",
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await,
    );
    let channel = producer.create_channel().await.expect("channel");
    assert_refused(
        "producer declaring a queue",
        channel
            .queue_declare(
                "upline.rogue",
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await,
    );
    assert_refused(
        "producer redeclaring upline.purchases",
        amqp::declare_topology(&producer).await,
    );
    producer.close(200, "done").await.expect("close");

    // The api's user is as limited.
    let api = amqp::connect(&plain(users.url("api", &vhost)), "upline-test-api-user")
        .await
        .expect("the api user logs in");
    assert_cannot_consume_or_purge("api user", &api).await;
    api.close(200, "done").await.expect("close");

    // Nothing was lost to the refusals: every purchase is still recorded once, and paid.
    assert_eq!(app.earnings(b.id).await["total"], "175.00");
    let (status, _) = app.admin_get("/api/purchases/too-early").await;
    assert_eq!(status, 404, "a refused purchase was recorded");
    app.stop().await;
    drop(users);
}

/// Broker settings for a plain `amqp://` URL.
fn plain(url: String) -> upline_common::config::AmqpSettings {
    upline_common::config::AmqpSettings {
        url,
        tls_ca_file: String::new(),
    }
}
