//! `upline dlq`: the operator's view of `upline.purchases.dead`. It lists the dead-lettered
//! messages with the reason each was set aside (`x-upline-error`, or RabbitMQ's own `x-death`
//! for a message that exhausted its delivery limit), shows one in full, and replays selected
//! or all of them onto `upline.purchases`.
//!
//! Replay is safe because purchases are idempotent by `purchase_id`: a message that was in fact
//! processed is a duplicate and pays nothing more, and one that still cannot be read is
//! dead-lettered again, with its reason. Messages are read with `basic.get` without
//! acknowledging; those not replayed are returned with one `nack(requeue)` at the end, which
//! puts them back where they were. A replayed message is acknowledged (removed from the
//! dead-letter queue) only after RabbitMQ confirmed its copy on `upline.purchases`.

use anyhow::{bail, Context};
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use upline_common::{amqp, Settings};

/// `upline dlq …`
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead-lettered messages: position, purchase id (when readable), size and reason.
    List {
        /// Most messages listed, from the head of the queue.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one message in full: its headers (the reason among them) and its body.
    Show {
        /// Its position in `upline dlq list` (1 = the oldest).
        position: usize,
    },
    /// Put messages back onto `upline.purchases` (safe: purchases are idempotent).
    Replay {
        /// Every message in the queue now (messages dead-lettered again meanwhile are not
        /// replayed twice).
        #[arg(long, conflicts_with = "position")]
        all: bool,
        /// Positions from `upline dlq list` (1 = the oldest); may be repeated.
        #[arg(long, num_args = 1.., required_unless_present = "all")]
        position: Vec<usize>,
    },
}

/// A dead-lettered message, read but not yet acknowledged.
struct Dead {
    message: BasicGetMessage,
}

impl Dead {
    fn header(&self, name: &str) -> Option<String> {
        let headers = self.message.properties.headers().as_ref()?;
        match headers.inner().get(name)? {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    /// Why it was dead-lettered.
    fn reason(&self) -> String {
        if let Some(reason) = self.header(amqp::ERROR_HEADER) {
            return reason;
        }
        // Dead-lettered by RabbitMQ itself (x-death): e.g. the delivery limit was reached.
        self.header("x-death").map_or_else(
            || "unknown (no x-upline-error header)".into(),
            |death| format!("dead-lettered by RabbitMQ: {death}"),
        )
    }

    fn purchase_id(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.message.data)
            .ok()
            .and_then(|v| {
                v.get("purchase_id")
                    .and_then(|p| p.as_str().map(str::to_owned))
            })
            .unwrap_or_else(|| "-".into())
    }
}

/// Runs a `dlq` command against the broker of `settings` (it needs read and write on
/// `upline.purchases.dead` and write on `upline.purchases`: the administrator's credentials).
///
/// # Errors
/// The broker is unreachable or refuses, or a position does not exist.
pub async fn run(settings: &Settings, command: DlqCommand) -> anyhow::Result<()> {
    let conn = amqp::connect(&settings.amqp, "upline-dlq")
        .await
        .context("connecting to RabbitMQ (amqp.url / AMQP_URL)")?;
    let channel = conn.create_channel().await?;
    let depth = depth(&channel).await?;
    let result = match command {
        DlqCommand::List { limit } => {
            let messages = fetch(&channel, limit.min(depth)).await?;
            println!(
                "{depth} message(s) in {}{}",
                amqp::PURCHASES_DEAD_QUEUE,
                if depth > messages.len() {
                    format!(", the first {} listed", messages.len())
                } else {
                    String::new()
                }
            );
            println!("{:>5}  {:<24} {:>8}  reason", "pos", "purchase_id", "bytes");
            for (i, m) in messages.iter().enumerate() {
                println!(
                    "{:>5}  {:<24} {:>8}  {}",
                    i + 1,
                    m.purchase_id(),
                    m.message.data.len(),
                    m.reason()
                );
            }
            give_back(&channel, &messages).await
        }
        DlqCommand::Show { position } => {
            if position == 0 || position > depth {
                bail!("no message at position {position}: the queue holds {depth}");
            }
            let messages = fetch(&channel, position).await?;
            let m = messages.last().context("the message at that position")?;
            println!("position: {position}");
            println!("reason: {}", m.reason());
            println!("redelivered: {}", m.message.redelivered);
            if let Some(headers) = m.message.properties.headers() {
                for (name, value) in headers.inner() {
                    println!("header {name}: {value:?}");
                }
            }
            match serde_json::from_slice::<serde_json::Value>(&m.message.data) {
                Ok(json) => println!("body:\n{}", serde_json::to_string_pretty(&json)?),
                Err(_) => println!(
                    "body ({} bytes, not JSON):\n{}",
                    m.message.data.len(),
                    String::from_utf8_lossy(&m.message.data)
                ),
            }
            give_back(&channel, &messages).await
        }
        DlqCommand::Replay { all, position } => {
            let selected: Vec<usize> = if all {
                (1..=depth).collect()
            } else {
                if let Some(p) = position.iter().find(|p| **p == 0 || **p > depth) {
                    bail!("no message at position {p}: the queue holds {depth}");
                }
                position
            };
            replay(&channel, depth, &selected).await
        }
    };
    let _ = conn.close(200, "dlq done").await;
    result
}

/// How many messages the dead-letter queue holds now.
async fn depth(channel: &Channel) -> anyhow::Result<usize> {
    let depth = amqp::queue_depth(channel, amqp::PURCHASES_DEAD_QUEUE)
        .await
        .with_context(|| format!("{} does not exist", amqp::PURCHASES_DEAD_QUEUE))?;
    Ok(depth as usize)
}

/// Reads up to `n` messages from the head of the queue without acknowledging them.
async fn fetch(channel: &Channel, n: usize) -> anyhow::Result<Vec<Dead>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match channel
            .basic_get(
                amqp::PURCHASES_DEAD_QUEUE,
                BasicGetOptions { no_ack: false },
            )
            .await?
        {
            Some(message) => out.push(Dead { message }),
            None => break,
        }
    }
    Ok(out)
}

/// Returns messages to the queue, where they were.
async fn give_back(channel: &Channel, messages: &[Dead]) -> anyhow::Result<()> {
    if let Some(last) = messages.last() {
        channel
            .basic_nack(
                last.message.delivery_tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await?;
    }
    Ok(())
}

/// Replays the messages at `selected` positions (1-based) among the first `depth`, in pages,
/// each copy confirmed before its original is removed.
async fn replay(channel: &Channel, depth: usize, selected: &[usize]) -> anyhow::Result<()> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let last = selected.iter().copied().max().unwrap_or(0);
    let messages = fetch(channel, last).await?;
    let (mut replayed, mut kept) = (0, Vec::new());
    for (i, dead) in messages.into_iter().enumerate() {
        if !selected.contains(&(i + 1)) {
            kept.push(dead);
            continue;
        }
        let confirm = amqp::publish_mandatory(
            channel,
            replay_routing_key(&dead),
            &dead.message.data,
            replay_properties(&dead),
        )
        .await?
        .await?;
        if !matches!(confirm, Confirmation::Ack(None)) {
            kept.push(dead);
            give_back(channel, &kept).await?;
            bail!(
                "RabbitMQ did not accept the copy of message {}; it stays in the dead-letter queue",
                i + 1
            );
        }
        channel
            .basic_ack(dead.message.delivery_tag, BasicAckOptions::default())
            .await?;
        replayed += 1;
    }
    give_back(channel, &kept).await?;
    println!(
        "replayed {replayed} of {depth} message(s) onto {}; {} left in {}",
        amqp::PURCHASES_EXCHANGE,
        depth - replayed,
        amqp::PURCHASES_DEAD_QUEUE
    );
    Ok(())
}

/// The original's properties, persistent, without the dead-letter headers, and marked as a
/// replay (with the reason it had been set aside).
fn replay_properties(dead: &Dead) -> BasicProperties {
    let mut headers = dead
        .message
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    let mut inner = headers.inner().clone();
    inner.remove(&ShortString::from(amqp::ERROR_HEADER));
    inner.remove(&ShortString::from("x-death"));
    inner.insert(
        "x-upline-replayed".into(),
        AMQPValue::LongString(dead.reason().into()),
    );
    headers = FieldTable::from(inner);
    dead.message
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2)
}

/// The routing key a dead letter is replayed under: the one it was dead-lettered with (the
/// worker keeps it, so a refund goes back as a refund), `purchase` for older dead letters.
fn replay_routing_key(dead: &Dead) -> &str {
    match dead.message.delivery.routing_key.as_str() {
        amqp::REFUND_ROUTING_KEY => amqp::REFUND_ROUTING_KEY,
        _ => amqp::PURCHASE_ROUTING_KEY,
    }
}
