//! WebSocket churn for soaks: dashboards that each follow one earner, drop their connection
//! every few seconds and reconnect with `since` = the last `seq` they saw, as a dashboard on a
//! flaky network does. Exercises the notifier's connect, replay and clean-up paths for the
//! whole run, so that a leak per connection shows as growing RSS, and checks that no earning
//! arrives twice or out of order across the reconnects.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand::Rng;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use upline_common::auth::Auth;
use upline_common::protocol::{ServerMessage, Subscribe, Target};
use upline_common::UserId;

use super::env::subscribe;

/// What the churning subscribers did.
#[derive(Debug, Default)]
pub struct ChurnReport {
    /// Connections opened and subscribed.
    pub connections: u64,
    /// Earnings received in all (live and replayed).
    pub earnings: u64,
    /// Connections refused, failed or closed with an error frame.
    pub failures: u64,
    /// Earnings that arrived out of `seq` order or twice within one user's stream.
    pub out_of_order: u64,
}

impl ChurnReport {
    fn add(&mut self, other: &ChurnReport) {
        self.connections += other.connections;
        self.earnings += other.earnings;
        self.failures += other.failures;
        self.out_of_order += other.out_of_order;
    }
}

/// Runs `subscribers` churning WebSocket clients against `ws_url` until `until`. Each follows
/// one earner picked at random from `1..=users` (the earners of an 8-ary tree of `8 × users`
/// are its first `users` ids), 2–10 s per connection and up to 1 s apart.
pub async fn run(
    ws_url: String,
    auth: Auth,
    users: i64,
    subscribers: usize,
    until: Instant,
) -> ChurnReport {
    let mut set = JoinSet::new();
    for _ in 0..subscribers {
        let (url, auth) = (ws_url.clone(), auth.clone());
        set.spawn(async move {
            let mut report = ChurnReport::default();
            let user = rand::thread_rng().gen_range(1..=users);
            // The last seq seen, as a dashboard keeps it: live only until it has one.
            let mut seen = 0;
            while Instant::now() < until {
                let (hold, pause) = {
                    let mut rng = rand::thread_rng();
                    (
                        Duration::from_millis(rng.gen_range(2_000..10_000)),
                        Duration::from_millis(rng.gen_range(0..1_000)),
                    )
                };
                if follow(&url, &auth, user, hold, &mut seen, &mut report)
                    .await
                    .is_err()
                {
                    report.failures += 1;
                }
                tokio::time::sleep(pause).await;
            }
            report
        });
    }
    let mut total = ChurnReport::default();
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            total.add(&r);
        }
    }
    total
}

/// One connection: subscribe to `user` after `last_seq` (live only while it is 0), read for
/// `hold`, close.
async fn follow(
    url: &str,
    auth: &Auth,
    user: i64,
    hold: Duration,
    last_seq: &mut i64,
    report: &mut ChurnReport,
) -> anyhow::Result<()> {
    let user = UserId::new(user).expect("a positive id");
    let token = auth.issue(user, 0).token;
    let since = (*last_seq > 0).then_some(*last_seq);
    let mut ws = subscribe(url, &Subscribe::new(Target::User(user), token, since)).await?;
    report.connections += 1;
    let end = tokio::time::Instant::now() + hold;
    loop {
        let msg = match tokio::time::timeout_at(end, ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(msg))) => msg,
            Ok(_) => anyhow::bail!("closed by the notifier"),
        };
        let Message::Text(text) = msg else { continue };
        match serde_json::from_str::<ServerMessage>(&text)? {
            ServerMessage::Subscribed { .. } => {}
            ServerMessage::Earning { earning } => {
                report.earnings += 1;
                if earning.seq <= *last_seq {
                    report.out_of_order += 1;
                }
                *last_seq = (*last_seq).max(earning.seq);
            }
            ServerMessage::Error(e) => anyhow::bail!("error frame {}", e.code),
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}
