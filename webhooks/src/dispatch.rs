//! Sending: claims due deliveries from PostgreSQL, signs and POSTs each to its endpoint, and
//! records the attempt (contract §11).
//!
//! - **Isolation.** Each attempt runs as a task of its own, holding one of
//!   `webhooks.max_in_flight` permits and one of its endpoint's
//!   `webhooks.max_in_flight_per_endpoint` slots; the claim never takes more for an endpoint
//!   than its free slots. A slow or dead endpoint therefore ties up only its own slots, never
//!   the others', and nothing here touches a row the ledger writes.
//! - **Retries.** A failed attempt (no answer within `webhooks.timeout_secs`, or an answer
//!   other than 2xx; redirects are not followed) is tried again after the next wait of
//!   `webhooks.retry_schedule`, varied by ±20 %. The schedule is in PostgreSQL
//!   (`next_attempt_at`), so it survives restarts; a claimed delivery is held for the timeout
//!   plus 30 s, after which any webhooks service tries it again (at least once).
//! - **Disabling.** When a delivery fails every attempt and its endpoint has not succeeded
//!   since the first of them, the endpoint is disabled with the reason.
//! - **SSRF.** Unless `webhooks.allow_private_targets`, the HTTP client resolves names through
//!   [`PublicOnly`], which drops non-public addresses, and literal IP targets are checked before
//!   sending: a name re-pointed at an internal address after registration is refused too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use upline_common::config::WebhookSettings;
use upline_common::webhook::is_public;

use crate::signing;
use crate::store::{self, AfterFailure, AttemptResult, Claimed, Success};

/// Most bytes of a failed answer's body kept with the attempt.
const KEPT_BODY_BYTES: usize = 1024;
/// How long past the timeout a claimed delivery is held before another service may retry it.
const LEASE_MARGIN: Duration = Duration::from_secs(30);
/// How long a stopping dispatcher waits for its attempts in flight.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Most successful attempts recorded by one statement.
const SUCCESS_BATCH: usize = 512;
/// Most deliveries claimed by one statement.
const CLAIM_BATCH: usize = 500;

/// The dispatcher's settings and shared state.
pub struct Dispatcher {
    db: PgPool,
    http: reqwest::Client,
    waits: Vec<Duration>,
    timeout: Duration,
    per_endpoint: usize,
    poll: Duration,
    allow_private: bool,
    permits: Arc<Semaphore>,
    /// Attempts in flight per endpoint.
    in_flight: Arc<Mutex<HashMap<i64, usize>>>,
    /// Woken when deliveries were queued or an attempt ended.
    wake: Arc<Notify>,
    /// Successful attempts, for [`record_successes`] to write in batches.
    successes: mpsc::Sender<Success>,
    successes_rx: Mutex<Option<mpsc::Receiver<Success>>>,
}

impl Dispatcher {
    /// A dispatcher for `settings`, woken early by `wake`.
    ///
    /// # Errors
    /// An invalid `webhooks.retry_schedule`, or an HTTP client that cannot be built.
    pub fn new(db: PgPool, settings: &WebhookSettings, wake: Arc<Notify>) -> anyhow::Result<Self> {
        let timeout = Duration::from_secs(settings.timeout_secs);
        let (successes, successes_rx) = mpsc::channel(SUCCESS_BATCH * 4);
        let mut http = reqwest::Client::builder()
            .user_agent(concat!("upline-webhooks/", env!("CARGO_PKG_VERSION")))
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_max_idle_per_host(settings.max_in_flight_per_endpoint);
        if !settings.allow_private_targets {
            http = http.dns_resolver(Arc::new(PublicOnly));
        }
        Ok(Dispatcher {
            db,
            http: http.build()?,
            waits: settings.retry_waits()?,
            timeout,
            per_endpoint: settings.max_in_flight_per_endpoint,
            poll: Duration::from_millis(settings.poll_ms),
            allow_private: settings.allow_private_targets,
            permits: Arc::new(Semaphore::new(settings.max_in_flight)),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            wake,
            successes,
            successes_rx: Mutex::new(Some(successes_rx)),
        })
    }

    /// Claims and sends until `cancel` fires, then waits up to [`STOP_GRACE`] for the attempts
    /// in flight.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let recorder_stop = CancellationToken::new();
        let recorder = self
            .successes_rx
            .lock()
            .expect("receiver")
            .take()
            .map(|rx| tokio::spawn(record_successes(self.db.clone(), rx, recorder_stop.clone())));
        let mut attempts = JoinSet::new();
        let mut failures = 0u32;
        loop {
            while attempts.try_join_next().is_some() {}
            let free = self.permits.available_permits().min(CLAIM_BATCH);
            let claimed = if free == 0 {
                Ok(Vec::new())
            } else {
                let busy: Vec<(i64, i32)> = self
                    .in_flight
                    .lock()
                    .expect("in-flight counts")
                    .iter()
                    .map(|(e, n)| (*e, i32::try_from(*n).unwrap_or(i32::MAX)))
                    .collect();
                store::claim(
                    &self.db,
                    &busy,
                    i32::try_from(self.per_endpoint).unwrap_or(i32::MAX),
                    free as i64,
                    self.timeout + LEASE_MARGIN,
                )
                .await
            };
            let wait = match claimed {
                Ok(claimed) if !claimed.is_empty() => {
                    failures = 0;
                    for delivery in claimed {
                        let permit = self
                            .permits
                            .clone()
                            .try_acquire_owned()
                            .expect("claimed no more than the free permits");
                        *self
                            .in_flight
                            .lock()
                            .expect("in-flight counts")
                            .entry(delivery.endpoint_id)
                            .or_default() += 1;
                        let this = self.clone();
                        attempts.spawn(async move {
                            this.attempt(&delivery).await;
                            this.release(delivery.endpoint_id);
                            drop(permit);
                            this.wake.notify_one();
                        });
                    }
                    continue;
                }
                Ok(_) => self.poll,
                Err(e) => {
                    failures += 1;
                    let wait = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot claim webhook deliveries");
                    wait
                }
            };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        // Attempts in flight get a few seconds to finish; the rest are dropped, and their
        // leases let any webhooks service attempt them again.
        let drained = tokio::time::timeout(STOP_GRACE, async {
            while attempts.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::info!(
                abandoned = attempts.len(),
                "stopping with webhook attempts in flight; they will be attempted again"
            );
            attempts.abort_all();
        }
        recorder_stop.cancel();
        if let Some(recorder) = recorder {
            let _ = recorder.await;
        }
    }

    fn release(&self, endpoint_id: i64) {
        let mut in_flight = self.in_flight.lock().expect("in-flight counts");
        if let Some(n) = in_flight.get_mut(&endpoint_id) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&endpoint_id);
            }
        }
    }

    /// One attempt: send, then record (retrying the record while the database is away; the
    /// lease keeps others off meanwhile).
    async fn attempt(&self, delivery: &Claimed) {
        let result = self.send(delivery).await;
        let retry_in = self
            .waits
            .get(usize::try_from(delivery.attempt - 1).unwrap_or(usize::MAX))
            .map(|w| jitter(*w));
        let outcome = if result.succeeded() {
            "delivered"
        } else {
            "failed"
        };
        metrics::counter!("upline_webhook_attempts_total", "result" => outcome).increment(1);
        metrics::histogram!("upline_webhook_attempt_seconds").record(result.duration.as_secs_f64());
        if let (true, Some(status_code)) = (result.succeeded(), result.status_code) {
            let success = Success {
                delivery_id: delivery.delivery_id,
                endpoint_id: delivery.endpoint_id,
                status_code,
                duration: result.duration,
            };
            // Closed only once the dispatcher stopped: the lease then brings the delivery back.
            let _ = self.successes.send(success).await;
            return;
        }
        for retry in 0u32.. {
            match store::record(&self.db, delivery, &result, retry_in).await {
                Ok(Some(AfterFailure::Disabled)) => {
                    tracing::warn!(
                        endpoint = delivery.endpoint_id,
                        message = %delivery.message_id,
                        "webhook endpoint disabled: a message failed every attempt"
                    );
                    metrics::counter!("upline_webhook_endpoints_disabled_total").increment(1);
                    return;
                }
                Ok(Some(AfterFailure::Failed)) => {
                    metrics::counter!("upline_webhook_deliveries_failed_total").increment(1);
                    return;
                }
                Ok(_) => return,
                Err(e) if retry < 5 => {
                    tracing::warn!(error = %e, "cannot record a webhook attempt; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(retry))).await;
                }
                Err(e) => {
                    // The lease ends and the delivery is attempted again: at least once.
                    tracing::error!(error = %e, delivery = delivery.delivery_id, "webhook attempt not recorded; it will be attempted again");
                    return;
                }
            }
        }
    }

    /// Signs and POSTs the message; a 2xx answer is a success.
    async fn send(&self, delivery: &Claimed) -> AttemptResult {
        let started = Instant::now();
        let failed = |error: String| AttemptResult {
            status_code: None,
            error: Some(error),
            duration: started.elapsed(),
        };
        let url = match reqwest::Url::parse(&delivery.url) {
            Ok(url) => url,
            Err(e) => return failed(format!("the endpoint URL is invalid: {e}")),
        };
        if !self.allow_private {
            let literal = match url.host() {
                Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
                Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
                _ => None,
            };
            if let Some(ip) = literal.filter(|ip| !is_public(*ip)) {
                return failed(format!(
                    "{ip} is not a public address (webhooks.allow_private_targets is off)"
                ));
            }
        }
        let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut keys = vec![delivery.secret.as_str()];
        keys.extend(delivery.previous_secret.as_deref());
        let signature =
            match signing::header(&keys, &delivery.message_id, timestamp, &delivery.payload) {
                Ok(s) => s,
                Err(e) => return failed(format!("the endpoint's secret is not base64: {e}")),
            };
        let sent = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &delivery.message_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(delivery.payload.clone())
            .send()
            .await;
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => return failed(describe(&e)),
        };
        let status = response.status();
        let error = if status.is_success() {
            None
        } else {
            let mut kept = Vec::new();
            while kept.len() < KEPT_BODY_BYTES {
                match response.chunk().await {
                    Ok(Some(chunk)) => kept.extend_from_slice(&chunk),
                    _ => break,
                }
            }
            kept.truncate(KEPT_BODY_BYTES);
            Some(String::from_utf8_lossy(&kept).into_owned())
        };
        AttemptResult {
            status_code: Some(status.as_u16()),
            error,
            duration: started.elapsed(),
        }
    }
}

/// Writes successful attempts in batches of up to [`SUCCESS_BATCH`], as they come, until
/// `stop`, then what is left. A batch that cannot be written is retried a few times; after
/// that its deliveries' leases end and they are attempted again (at least once).
async fn record_successes(db: PgPool, mut rx: mpsc::Receiver<Success>, stop: CancellationToken) {
    let mut batch = Vec::with_capacity(SUCCESS_BATCH);
    loop {
        let stopping = tokio::select! {
            n = rx.recv_many(&mut batch, SUCCESS_BATCH) => n == 0,
            () = stop.cancelled() => {
                while let Ok(s) = rx.try_recv() {
                    batch.push(s);
                }
                true
            }
        };
        if !batch.is_empty() {
            for retry in 0u32..5 {
                match store::record_successes(&db, &batch).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, size = batch.len(), retry, "cannot record delivered webhooks; retrying");
                        tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(retry))).await;
                    }
                }
            }
            batch.clear();
        }
        if stopping {
            return;
        }
    }
}

/// A send error with its causes (reqwest's own message hides them).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut text = kind.to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `wait` varied by up to ±20 %, so that deliveries failed together do not retry together.
fn jitter(wait: Duration) -> Duration {
    wait.mul_f64(rand::thread_rng().gen_range(0.8..=1.2))
}

/// A resolver that returns only public addresses (see [`is_public`]), so that no request
/// reaches an internal service through a name, whatever it resolves to at the time.
pub struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = all.into_iter().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(format!(
                    "{host} resolves to no public address (webhooks.allow_private_targets is off)"
                )
                .into());
            }
            let addrs: Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..1000 {
            let w = jitter(Duration::from_secs(100));
            assert!(
                w >= Duration::from_secs(80) && w <= Duration::from_secs(120),
                "{w:?}"
            );
        }
    }

    #[tokio::test]
    async fn names_of_internal_addresses_resolve_to_nothing() {
        let err = PublicOnly
            .resolve(Name::from_str("localhost").unwrap())
            .await
            .err()
            .expect("localhost is refused");
        assert!(err.to_string().contains("no public address"), "{err}");
    }
}
