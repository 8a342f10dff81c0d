//! Publishing purchases to `upline.purchases` (SPEC §3) over one long-lived channel with
//! publisher confirms (pipelined: many callers share the channel, each awaits its own confirm).
//! Every message is persistent JSON, `mandatory` (an unroutable message is an error, not a
//! silent loss) and carries the purchase id as its AMQP `message_id`. This is the one
//! publisher of purchases: the api uses it for `POST /api/purchases`, and the demo, the
//! benchmarks and the end-to-end tests publish through it too.
//! A lost connection is re-opened on the next publish, and in the background by
//! [`Publisher::keep_connected`]; while the broker is down, or while `upline.purchases` does
//! not exist yet (a least-privilege api user cannot declare it: the worker does), publishing
//! fails fast with `broker_unavailable` and readiness says not ready.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::amqp;
use crate::config::AmqpSettings;
use crate::purchase::Purchase;
use crate::refund::Refund;
use lapin::options::ConfirmSelectOptions;
use lapin::publisher_confirm::Confirmation;
use lapin::{Channel, Connection};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// How long a publish waits for the broker (connecting, or the confirm) before it fails; the
/// api then answers 503.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

/// A shared, reconnecting purchase publisher.
#[derive(Clone)]
pub struct Publisher {
    amqp: Arc<AmqpSettings>,
    /// Connection name shown in the RabbitMQ management UI.
    name: &'static str,
    link: Arc<Mutex<Option<(Connection, Channel)>>>,
    broker_up: Arc<AtomicBool>,
    /// Set once the "may not declare the topology" fallback has been logged.
    fallback_noted: Arc<AtomicBool>,
}

/// Why a purchase was not accepted by the broker.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No connection or channel (or it broke while publishing); the text says why.
    #[error("broker unreachable: {0}")]
    Unreachable(String),
    /// The broker nacked, could not route the message, or did not answer within
    /// [`BROKER_TIMEOUT`].
    #[error("broker did not confirm: {0}")]
    NotConfirmed(String),
}

impl Publisher {
    /// A publisher for the broker of `amqp` (URL and TLS CA), not connected yet; `broker_up`
    /// is kept true while it holds a channel ready to publish. Its connection is named
    /// `upline-api` (see [`Publisher::with_connection_name`]).
    pub fn new(amqp: AmqpSettings, broker_up: Arc<AtomicBool>) -> Self {
        Publisher {
            amqp: Arc::new(amqp),
            name: "upline-api",
            link: Arc::new(Mutex::new(None)),
            broker_up,
            fallback_noted: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The same publisher, its connection named `name` in the RabbitMQ management UI (e.g.
    /// `upline-demo`, `upline-test`).
    #[must_use]
    pub fn with_connection_name(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// A channel in confirm mode, (re)connecting and declaring the topology (or, without the
    /// permission, checking that `upline.purchases` exists) if needed.
    async fn channel(&self) -> Result<Channel, PublishError> {
        let mut link = self.link.lock().await;
        if let Some((conn, channel)) = link.as_ref() {
            if conn.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        self.broker_up.store(false, Ordering::Relaxed);
        if let Some((old, _)) = link.take() {
            // Closed, not just dropped: a connection whose channel failed may still be open on
            // the broker's side and would linger there.
            if old.status().connected() {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    old.close(200, "replacing the publishing connection"),
                )
                .await;
            }
        }
        let connect = async {
            let conn = amqp::connect(&self.amqp, self.name).await?;
            let prepared = async {
                let channel = amqp::declare_topology_if_allowed(
                    &conn,
                    &[amqp::PURCHASES_EXCHANGE],
                    &self.fallback_noted,
                )
                .await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                Ok::<_, lapin::Error>(channel)
            }
            .await;
            match prepared {
                Ok(channel) => Ok((conn, channel)),
                Err(e) => {
                    // Not left to drop: the background retry would pile up connections.
                    let _ = conn.close(200, "not ready to publish").await;
                    Err(e)
                }
            }
        };
        let (conn, channel) = tokio::time::timeout(BROKER_TIMEOUT, connect)
            .await
            .map_err(|_| PublishError::Unreachable("timed out connecting".into()))?
            .map_err(|e| PublishError::Unreachable(e.to_string()))?;
        *link = Some((conn, channel.clone()));
        self.broker_up.store(true, Ordering::Relaxed);
        Ok(channel)
    }

    /// Connects now, so that readiness reflects the broker before the first purchase.
    pub async fn warm_up(&self) {
        if let Err(e) = self.channel().await {
            tracing::warn!(
                error = %e,
                "cannot publish to RabbitMQ yet (unreachable, or no worker has declared the \
                 topology); purchases answer 503 until it can"
            );
        }
    }

    /// Keeps the publishing channel open until `shutdown` fires: checks it every second and
    /// re-opens it with backoff (100 ms doubling to 5 s) when it is gone, so that readiness
    /// recovers by itself after a broker outage or once the worker has declared the topology,
    /// without waiting for a purchase to come in. Meant to run after [`Publisher::warm_up`].
    pub async fn keep_connected(self, shutdown: CancellationToken) {
        const CHECK_EVERY: Duration = Duration::from_secs(1);
        const FIRST_RETRY: Duration = Duration::from_millis(100);
        let mut failing = !self.broker_up.load(Ordering::Relaxed);
        let mut retry = FIRST_RETRY;
        loop {
            let wait = if failing {
                let wait = retry;
                retry = (retry * 2).min(Duration::from_secs(5));
                wait
            } else {
                retry = FIRST_RETRY;
                CHECK_EVERY
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            match self.channel().await {
                Ok(_) if failing => {
                    tracing::info!("RabbitMQ ready: purchases are accepted again");
                    failing = false;
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    tracing::warn!(error = %e, "cannot publish to RabbitMQ; retrying in the background");
                    failing = true;
                }
                Err(e) => tracing::debug!(error = %e, "still cannot publish to RabbitMQ"),
            }
        }
    }

    /// Publishes one purchase (persistent, mandatory) and waits for the broker's confirm, at
    /// most [`BROKER_TIMEOUT`].
    ///
    /// # Errors
    /// [`PublishError`] when the broker is unreachable, nacks, or cannot route the message.
    pub async fn publish(&self, purchase: &Purchase) -> Result<(), PublishError> {
        self.publish_within(std::slice::from_ref(purchase), BROKER_TIMEOUT)
            .await
    }

    /// Publishes one refund (routing key `refund`, persistent, mandatory, `message_id` = the
    /// refund id) and waits for the broker's confirm, at most [`BROKER_TIMEOUT`].
    ///
    /// # Errors
    /// As [`Publisher::publish`].
    pub async fn publish_refund(&self, refund: &Refund) -> Result<(), PublishError> {
        self.publish_within(std::slice::from_ref(refund), BROKER_TIMEOUT)
            .await
    }

    /// Publishes purchases in their order on the one channel, pipelined (every message is
    /// sent before the first confirm is awaited), and waits until the broker confirmed them
    /// all: [`BROKER_TIMEOUT`] plus as much again per thousand messages.
    ///
    /// # Errors
    /// As [`Publisher::publish`], for the first message that failed (those before it were
    /// confirmed; those after it may or may not have been).
    pub async fn publish_all(&self, purchases: &[Purchase]) -> Result<(), PublishError> {
        let thousands = u32::try_from(purchases.len() / 1000).unwrap_or(u32::MAX);
        self.publish_within(
            purchases,
            BROKER_TIMEOUT.saturating_mul(thousands.saturating_add(1)),
        )
        .await
    }

    async fn publish_within<M: Message>(
        &self,
        messages: &[M],
        within: Duration,
    ) -> Result<(), PublishError> {
        let channel = self.channel().await?;
        let confirms = async {
            let mut pending = Vec::with_capacity(messages.len());
            for message in messages {
                let properties =
                    amqp::persistent_json().with_message_id(message.message_id().into());
                pending.push(
                    amqp::publish_mandatory(
                        &channel,
                        M::ROUTING_KEY,
                        &message.to_json(),
                        properties,
                    )
                    .await?,
                );
            }
            let mut confirmations = Vec::with_capacity(pending.len());
            for confirm in pending {
                confirmations.push(confirm.await?);
            }
            Ok::<_, lapin::Error>(confirmations)
        };
        match tokio::time::timeout(within, confirms).await {
            Err(_) => Err(PublishError::NotConfirmed(
                "timed out waiting for the confirm".into(),
            )),
            Ok(Err(e)) => {
                self.broker_up.store(false, Ordering::Relaxed);
                Err(PublishError::Unreachable(e.to_string()))
            }
            Ok(Ok(confirmations)) => {
                confirmations
                    .into_iter()
                    .try_for_each(|confirmation| match confirmation {
                        Confirmation::Ack(None) => Ok(()),
                        Confirmation::Ack(Some(_)) => {
                            Err(PublishError::NotConfirmed("message was unroutable".into()))
                        }
                        other => Err(PublishError::NotConfirmed(format!("{other:?}"))),
                    })
            }
        }
    }

    /// Closes the connection (at shutdown). A later publish opens a new one.
    pub async fn close(&self) {
        if let Some((conn, _)) = self.link.lock().await.take() {
            let _ = conn.close(200, "publisher closing").await;
        }
    }
}

/// A message the [`Publisher`] sends to `upline.purchases`.
trait Message {
    const ROUTING_KEY: &'static str;
    fn message_id(&self) -> &str;
    fn to_json(&self) -> Vec<u8>;
}

impl Message for Purchase {
    const ROUTING_KEY: &'static str = amqp::PURCHASE_ROUTING_KEY;
    fn message_id(&self) -> &str {
        self.purchase_id.as_str()
    }
    fn to_json(&self) -> Vec<u8> {
        Purchase::to_json(self)
    }
}

impl Message for Refund {
    const ROUTING_KEY: &'static str = amqp::REFUND_ROUTING_KEY;
    fn message_id(&self) -> &str {
        self.refund_id.as_str()
    }
    fn to_json(&self) -> Vec<u8> {
        Refund::to_json(self)
    }
}
