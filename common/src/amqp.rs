//! The RabbitMQ side of the contract (SPEC §3–4): exchange, queue and routing-key names, the
//! topology declared idempotently at start-up, and connecting with retry.
//!
//! Who declares: the worker owns the topology and always declares it. The api and the notifier
//! declare it too when their broker user may (development, tests: one all-powerful user); with
//! least-privilege users (`deploy/rabbitmq-users.sh`) they cannot, and only check passively
//! that what they use exists ([`declare_topology_if_allowed`]).
//!
//! TLS is chosen by the URL: `amqps://` connects with rustls (ring), checking the server's
//! certificate and host name against the built-in Mozilla roots (webpki-roots) plus the CA
//! certificates of `amqp.tls_ca_file`, if set; `amqp://` is plain TCP.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use crate::config::AmqpSettings;

pub mod publisher;
pub use publisher::{PublishError, Publisher};

/// Direct exchange where producers publish purchases, routing key [`PURCHASE_ROUTING_KEY`].
pub const PURCHASES_EXCHANGE: &str = "upline.purchases";
/// Quorum queue the workers consume.
pub const PURCHASES_QUEUE: &str = "upline.purchases";
pub const PURCHASE_ROUTING_KEY: &str = "purchase";
/// The routing key of refund messages on [`PURCHASES_EXCHANGE`] (contract §10); bound to
/// [`PURCHASES_QUEUE`] too, so the same workers apply them.
pub const REFUND_ROUTING_KEY: &str = "refund";
/// Fanout exchange for purchase messages that could not be read at all.
pub const PURCHASES_DLX: &str = "upline.purchases.dlx";
/// Durable queue keeping dead-lettered purchases for inspection and replay.
pub const PURCHASES_DEAD_QUEUE: &str = "upline.purchases.dead";
/// Topic exchange of earning events, routing key `earning.<level>.<earner_id>`.
pub const EARNINGS_EXCHANGE: &str = "upline.earnings";
/// Quorum queue of the webhooks service for earning events, bound to [`EARNINGS_EXCHANGE`]
/// with `earning.#` (contract §11). Declared by the webhooks service only, so it exists once
/// one has run.
pub const WEBHOOK_EARNINGS_QUEUE: &str = "upline.webhooks.earnings";
/// Quorum queue of the webhooks service for purchase messages, bound to
/// [`PURCHASES_EXCHANGE`] with [`PURCHASE_ROUTING_KEY`]: a copy of each purchase, held until a
/// worker has recorded it, then turned into `purchase.processed` or `purchase.rejected`.
pub const WEBHOOK_PURCHASES_QUEUE: &str = "upline.webhooks.purchases";
/// Most messages each webhooks queue keeps while no webhooks service consumes it; past that
/// the oldest are dropped (`x-overflow = drop-head`), so that a webhooks service taken out of a
/// deployment cannot fill the broker's disk.
pub const WEBHOOK_QUEUE_MAX_LENGTH: i64 = 10_000_000;
/// Header of a dead-lettered message saying why it could not be processed.
pub const ERROR_HEADER: &str = "x-upline-error";
/// Deliveries of one message after which RabbitMQ dead-letters it (a message that keeps
/// crashing workers must not stall the queue).
pub const DELIVERY_LIMIT: i64 = 20;

/// Why `amqp.tls_ca_file` cannot be used; every message names the setting and the path.
#[derive(Debug, thiserror::Error)]
pub enum TlsCaError {
    /// The file is missing or unreadable.
    #[error("amqp.tls_ca_file: cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// A PEM section is malformed.
    #[error("amqp.tls_ca_file: {path} is not a valid PEM file: {error}")]
    Pem {
        path: String,
        error: rustls_pki_types::pem::Error,
    },
    /// The file has no `CERTIFICATE` section.
    #[error("amqp.tls_ca_file: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: String },
}

/// The TLS configuration for `amqps://` URLs: the PEM CA certificates of `amqp.tls_ca_file`,
/// trusted on top of the built-in roots, or the default (built-in roots only) when it is empty.
/// `amqp://` URLs ignore it. The file is read on every call, so a reconnect sees a replaced CA.
///
/// # Errors
/// The file cannot be read, is not PEM, or holds no certificate.
pub fn tls_config(settings: &AmqpSettings) -> Result<OwnedTLSConfig, TlsCaError> {
    let path = settings.tls_ca_file.trim();
    if path.is_empty() {
        return Ok(OwnedTLSConfig::default());
    }
    let pem = std::fs::read_to_string(path).map_err(|error| TlsCaError::Read {
        path: path.to_owned(),
        error,
    })?;
    let mut certificates = 0;
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        cert.map_err(|error| TlsCaError::Pem {
            path: path.to_owned(),
            error,
        })?;
        certificates += 1;
    }
    if certificates == 0 {
        return Err(TlsCaError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(OwnedTLSConfig {
        identity: None,
        cert_chain: Some(pem),
    })
}

/// The broker URLs of `amqp.url`: one URL, or the nodes of a cluster separated by commas
/// (`amqp://u:p@node1:5672/%2f,amqp://u:p@node2:5672/%2f`).
pub fn broker_urls(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// The position in [`broker_urls`] of the node this process reached last: the next connection
/// tries it first, then the others in order.
static PREFERRED_NODE: AtomicUsize = AtomicUsize::new(0);

/// How long one node may take to accept a connection before the next one is tried.
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `host:port` of a broker URL, for logs (never its credentials).
fn node_name(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port().unwrap_or(5672))))
        .unwrap_or_else(|| "an unreadable amqp.url entry".into())
}

/// Opens a connection driven by tokio to the first node of `settings.url` that answers (see
/// [`broker_urls`]), starting with the node reached last (TLS for `amqps://`, trusting
/// `settings.tls_ca_file` too); `name` shows in the RabbitMQ management UI. Each node gets
/// 10 s to accept.
///
/// # Errors
/// No node can be reached (the last node's error), a certificate is not trusted (`amqps://`),
/// the broker refuses the credentials, or `amqp.tls_ca_file` cannot be used (an
/// [`lapin::Error::IOError`] whose message names the setting).
pub async fn connect(settings: &AmqpSettings, name: &str) -> lapin::Result<Connection> {
    let urls = broker_urls(&settings.url);
    if urls.is_empty() {
        return Err(lapin::Error::IOError(Arc::new(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "amqp.url is empty",
        ))));
    }
    let first = PREFERRED_NODE.load(Ordering::Relaxed) % urls.len();
    let mut last_error = None;
    for i in 0..urls.len() {
        let node = (first + i) % urls.len();
        let tls = tls_config(settings).map_err(|e| {
            lapin::Error::IOError(Arc::new(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                e,
            )))
        })?;
        let mut props = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio)
            .with_connection_name(name.into());
        props
            .client_properties
            .insert("product".into(), AMQPValue::LongString("upline".into()));
        let attempt = tokio::time::timeout(
            NODE_CONNECT_TIMEOUT,
            Connection::connect_with_config(urls[node], props, tls),
        )
        .await
        .unwrap_or_else(|_| {
            Err(lapin::Error::IOError(Arc::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {NODE_CONNECT_TIMEOUT:?}"),
            ))))
        });
        match attempt {
            Ok(conn) => {
                PREFERRED_NODE.store(node, Ordering::Relaxed);
                if i > 0 {
                    tracing::info!(node = %node_name(urls[node]), "connected to another RabbitMQ node of amqp.url");
                }
                return Ok(conn);
            }
            Err(e) => {
                if urls.len() > 1 {
                    tracing::warn!(node = %node_name(urls[node]), error = %e, "RabbitMQ node unreachable; trying the next one of amqp.url");
                }
                last_error = Some(e);
            }
        }
    }
    Err(last_error.expect("at least one node was tried"))
}

/// Connects as [`connect`] does, retrying with exponential backoff (up to 5 s apart) until it
/// succeeds or `cancel` fires (`None`).
pub async fn connect_with_retry(
    settings: &AmqpSettings,
    name: &str,
    cancel: &CancellationToken,
) -> Option<Connection> {
    let attempt = || async { connect(settings, name).await };
    let retrying = attempt.retry(backoff()).sleep(tokio::time::sleep).notify(
        |e: &lapin::Error, wait: Duration| {
            tracing::warn!(error = %e, retry_in = ?wait, "RabbitMQ unreachable; retrying");
        },
    );
    tokio::select! {
        () = cancel.cancelled() => None,
        conn = retrying => conn.ok(),
    }
}

/// Backoff for reconnecting: 100 ms doubling to 5 s, forever.
pub fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(usize::MAX)
        .with_jitter()
}

/// The arguments that make a declared queue a quorum queue (`x-queue-type: quorum`), to add
/// a queue's other arguments to.
pub fn quorum_queue() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Declares the whole topology of SPEC §3 on channels of `conn`; idempotent.
///
/// Both queues are quorum queues, so that on a cluster they keep working while a majority of
/// the nodes is up. A `upline.purchases.dead` made as a classic queue by an earlier version is
/// kept as it is (a warning says how to replace it): it lives on one node, and while that node
/// is down nothing can be dead-lettered into it.
///
/// # Errors
/// A broker error, e.g. a queue that exists with other arguments.
pub async fn declare_topology(conn: &Connection) -> lapin::Result<()> {
    let channel = conn.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            PURCHASES_EXCHANGE,
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            PURCHASES_DLX,
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            EARNINGS_EXCHANGE,
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;

    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut args = quorum_queue();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(PURCHASES_DLX.into()),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    channel
        .queue_declare(PURCHASES_QUEUE, durable_queue, args)
        .await?;
    for key in [PURCHASE_ROUTING_KEY, REFUND_ROUTING_KEY] {
        channel
            .queue_bind(
                PURCHASES_QUEUE,
                PURCHASES_EXCHANGE,
                key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let channel = match channel
        .queue_declare(PURCHASES_DEAD_QUEUE, durable_queue, quorum_queue())
        .await
    {
        Ok(_) => channel,
        Err(e) if is_precondition_failed(&e) => {
            tracing::warn!(
                "upline.purchases.dead is a classic queue made by an earlier version: it lives on                  one node only; to make it a replicated quorum queue, replay or inspect what it                  holds (upline dlq), delete it, and restart a worker"
            );
            // The refusal closed that channel.
            conn.create_channel().await?
        }
        Err(e) => return Err(e),
    };
    channel
        .queue_bind(
            PURCHASES_DEAD_QUEUE,
            PURCHASES_DLX,
            "",
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "topology declared").await;
    Ok(())
}

/// Whether the broker refused a declaration for arguments that differ from the existing
/// entity's (AMQP 406 `PRECONDITION_FAILED`, which also closes the channel).
pub fn is_precondition_failed(error: &lapin::Error) -> bool {
    matches!(
        error,
        lapin::Error::ProtocolError(e)
            if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    )
}

/// Declares and binds the webhooks service's two queues ([`WEBHOOK_EARNINGS_QUEUE`],
/// [`WEBHOOK_PURCHASES_QUEUE`]): durable quorum queues, at most [`WEBHOOK_QUEUE_MAX_LENGTH`]
/// messages each. The exchanges must exist ([`declare_topology`]).
///
/// # Errors
/// Broker errors (a 403 when the user may not configure `upline.webhooks.*`).
pub async fn declare_webhook_queues(channel: &Channel) -> lapin::Result<()> {
    let mut args = quorum_queue();
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(WEBHOOK_QUEUE_MAX_LENGTH),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("drop-head".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (queue, exchange, key) in [
        (WEBHOOK_EARNINGS_QUEUE, EARNINGS_EXCHANGE, "earning.#"),
        (
            WEBHOOK_PURCHASES_QUEUE,
            PURCHASES_EXCHANGE,
            PURCHASE_ROUTING_KEY,
        ),
    ] {
        channel.queue_declare(queue, durable, args.clone()).await?;
        channel
            .queue_bind(
                queue,
                exchange,
                key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Whether the broker refused an operation for lack of permissions (AMQP 403
/// `ACCESS_REFUSED`, which also closes the channel it happened on).
pub fn is_access_refused(error: &lapin::Error) -> bool {
    matches!(
        error,
        lapin::Error::ProtocolError(e)
            if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
    )
}

/// Declares the whole topology ([`declare_topology`]) if this connection's user is allowed to;
/// if the broker refuses (403), checks passively on a fresh channel that each exchange in
/// `needed` exists (passive declares need no permission), so a least-privilege user works
/// once the worker has declared the topology. Returns an open channel for the caller's use.
///
/// The first fallback is logged at info, once per `fallback_noted` flag (one per service).
///
/// # Errors
/// A broker error other than the refusal, or a needed exchange that does not exist (404
/// `NOT_FOUND`: no worker has declared the topology yet; retry later).
pub async fn declare_topology_if_allowed(
    conn: &Connection,
    needed: &[&str],
    fallback_noted: &AtomicBool,
) -> lapin::Result<Channel> {
    match declare_topology(conn).await {
        Ok(()) => return conn.create_channel().await,
        Err(e) if is_access_refused(&e) => {
            if !fallback_noted.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    reason = %e,
                    needed = ?needed,
                    "this broker user may not declare the topology (the worker's user declares \
                     it); checking passively that what this service needs exists"
                );
            }
        }
        Err(e) => return Err(e),
    }
    // The refusal closed that channel.
    let channel = conn.create_channel().await?;
    for exchange in needed {
        channel
            .exchange_declare(
                exchange,
                ExchangeKind::Direct, // ignored by a passive declare
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
    }
    Ok(channel)
}

/// Publishes raw bytes to `upline.purchases` (persistent JSON properties, routing key
/// `purchase`, neither `mandatory` nor a `message_id`), as a careless external producer might:
/// for tests and tools that need a body no [`Publisher`] would send (not JSON, invalid, too
/// large). Purchases are published with [`Publisher::publish`]. Await the returned confirm for
/// the broker's answer.
///
/// # Errors
/// The channel is closed.
pub async fn publish_raw(
    channel: &Channel,
    body: &[u8],
) -> lapin::Result<lapin::publisher_confirm::PublisherConfirm> {
    channel
        .basic_publish(
            PURCHASES_EXCHANGE,
            PURCHASE_ROUTING_KEY,
            lapin::options::BasicPublishOptions::default(),
            body,
            persistent_json(),
        )
        .await
}

/// Publishes one message to `upline.purchases` under `routing_key` (`purchase` or `refund`) as `mandatory`, so
/// that an unroutable message comes back as `Ack(Some(message))` instead of being dropped,
/// with `properties` as given. The [`Publisher`] and `upline dlq replay` publish through it.
/// Await the returned confirm for the broker's answer.
///
/// # Errors
/// The channel is closed.
pub async fn publish_mandatory(
    channel: &Channel,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> lapin::Result<lapin::publisher_confirm::PublisherConfirm> {
    channel
        .basic_publish(
            PURCHASES_EXCHANGE,
            routing_key,
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        )
        .await
}

/// How many messages wait in `queue`, by a passive declaration (which needs no permission).
///
/// # Errors
/// The queue does not exist (the channel is then closed), or the channel failed.
pub async fn queue_depth(channel: &Channel, queue: &str) -> lapin::Result<u32> {
    let declared = channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(declared.message_count())
}

/// Properties of every message upline publishes: persistent JSON.
pub fn persistent_json() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
}

/// Properties for a dead-lettered copy: the original's, plus [`ERROR_HEADER`].
pub fn with_error_header(original: &BasicProperties, reason: &str) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    headers.insert(
        ERROR_HEADER.into(),
        AMQPValue::LongString(LongString::from(reason)),
    );
    original.clone().with_headers(headers).with_delivery_mode(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqp_url_lists_a_clusters_nodes_separated_by_commas() {
        assert_eq!(
            broker_urls("amqp://a:1/%2f, amqp://b:2/%2f,"),
            ["amqp://a:1/%2f", "amqp://b:2/%2f"]
        );
        assert_eq!(broker_urls("amqp://a/%2f"), ["amqp://a/%2f"]);
        assert!(broker_urls(" , ").is_empty());
        assert_eq!(
            node_name("amqp://user:secret@rabbit-2:5673/%2f"),
            "rabbit-2:5673"
        );
        assert!(!node_name("amqp://user:secret@rabbit-2/%2f").contains("secret"));
    }
}
