//! A small typed client of the REST API (SPEC §5) for tests, benchmarks and the demo: register
//! users with the admin key, post purchases with the producer key, read reports, wait until a
//! purchase is processed. Each call states the status it expects and fails with the status and
//! body otherwise.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use backon::BackoffBuilder;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use upline_common::UserId;

use crate::order::Order;

/// The api at `base`, with the admin and producer keys.
#[derive(Debug, Clone)]
pub struct Api {
    /// The HTTP client every call goes through (shared connection pool).
    pub http: reqwest::Client,
    base: String,
    admin: String,
    producer: String,
}

/// The body of `POST /api/users` naming the referrer by id (which takes the admin key).
#[derive(Debug, Clone, Serialize)]
pub struct NewUser {
    /// Display name.
    pub name: String,
    /// E-mail address, unique among users.
    pub email: String,
    /// The referrer's user id; `None` (sent as `null`) for a root.
    pub referrer_id: Option<UserId>,
}

/// The answer to a registration (201).
#[derive(Debug, Clone, Deserialize)]
pub struct Registered {
    /// The new user's id.
    pub id: UserId,
    /// The user's own bearer token.
    pub token: String,
    /// The code others sign up with to be referred by this user.
    pub referral_code: String,
}

impl NewUser {
    /// A user named `name` with address `email`, referred by `referrer_id` (if any).
    pub fn new(name: &str, email: String, referrer_id: Option<UserId>) -> Self {
        NewUser {
            name: name.to_owned(),
            email,
            referrer_id,
        }
    }
}

impl Api {
    /// A client of the api at `base` (`http://127.0.0.1:8080`), with the admin and producer
    /// keys.
    pub fn new(http: reqwest::Client, base: &str, admin: &str, producer: &str) -> Self {
        Api {
            http,
            base: base.trim_end_matches('/').to_owned(),
            admin: admin.to_owned(),
            producer: producer.to_owned(),
        }
    }

    /// `{base}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Whether `/readyz` answers 200.
    pub async fn is_ready(&self) -> bool {
        let r = self.http.get(self.url("/readyz")).send().await;
        matches!(&r, Ok(r) if r.status().is_success())
    }

    /// Registers a user with the admin key (referrers named by id; not rate-limited).
    ///
    /// # Errors
    /// No answer, or not 201.
    pub async fn register(&self, user: &NewUser) -> anyhow::Result<Registered> {
        let r = self
            .http
            .post(self.url("/api/users"))
            .bearer_auth(&self.admin)
            .json(user)
            .send()
            .await?;
        let r = expect(
            r,
            StatusCode::CREATED,
            &format!("registering {}", user.name),
        )
        .await?;
        Ok(r.json().await?)
    }

    /// Deactivates a user (admin key): it earns nothing from then on (SPEC §2).
    ///
    /// # Errors
    /// No answer, or not 200.
    pub async fn deactivate(&self, user_id: UserId) -> anyhow::Result<()> {
        let r = self
            .http
            .post(self.url(&format!("/api/users/{user_id}/deactivate")))
            .bearer_auth(&self.admin)
            .send()
            .await?;
        expect(r, StatusCode::OK, &format!("deactivating user {user_id}")).await?;
        Ok(())
    }

    /// `POST /api/purchases` with the producer key and any JSON body; the answer as it is.
    ///
    /// # Errors
    /// No answer.
    pub async fn post_purchase(&self, body: &impl Serialize) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(self.url("/api/purchases"))
            .bearer_auth(&self.producer)
            .json(body)
            .send()
            .await
    }

    /// Posts an order and requires 202 (accepted: confirmed by the broker). A 503 is retried
    /// as a shop would ([`while_unavailable`]).
    ///
    /// # Errors
    /// No answer, or not 202.
    pub async fn purchase(&self, order: &Order) -> anyhow::Result<()> {
        let r = while_unavailable(|| self.post_purchase(order)).await?;
        expect(
            r,
            StatusCode::ACCEPTED,
            &format!("posting {}", order.purchase_id),
        )
        .await?;
        Ok(())
    }

    /// `GET {path}` with the admin key: the status and the JSON body (`null` when not JSON).
    ///
    /// # Errors
    /// No answer.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.admin)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// Waits until a worker has recorded the purchase (`GET /api/purchases/{id}` answers 200
    /// rather than 404); returns its report.
    ///
    /// # Errors
    /// Another answer than 200 or 404, or still 404 after `within`.
    pub async fn wait_processed(
        &self,
        purchase_id: &str,
        within: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let (status, body) = self
                .admin_get(&format!("/api/purchases/{purchase_id}"))
                .await?;
            match status {
                200 => return Ok(body),
                404 if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                404 => bail!("purchase {purchase_id} was not processed within {within:?}"),
                _ => bail!("unexpected answer for {purchase_id}: {status} {body}"),
            }
        }
    }
}

impl Api {
    /// `POST /api/purchases/{purchase_id}/refunds` with the producer key and any JSON body
    /// (contract §10); the answer as it is.
    ///
    /// # Errors
    /// No answer.
    pub async fn post_refund(
        &self,
        purchase_id: &str,
        body: &impl Serialize,
    ) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(self.url(&format!("/api/purchases/{purchase_id}/refunds")))
            .bearer_auth(&self.producer)
            .json(body)
            .send()
            .await
    }

    /// `POST /api/payouts` with the admin key, `idempotency_key` sent in the `Idempotency-Key`
    /// header (none when `None`) and `body` as the body: the status and the JSON body.
    ///
    /// # Errors
    /// No answer.
    pub async fn create_payout(
        &self,
        idempotency_key: Option<&str>,
        body: &impl Serialize,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .http
            .post(self.url("/api/payouts"))
            .bearer_auth(&self.admin)
            .json(body);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let r = request.send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// `POST /api/payouts/{id}/paid` with the admin key: the status and the JSON body.
    ///
    /// # Errors
    /// No answer.
    pub async fn mark_payout_paid(&self, payout_id: i64) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .post(self.url(&format!("/api/payouts/{payout_id}/paid")))
            .bearer_auth(&self.admin)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// `GET {path}` with the admin key, for a text answer (CSV): the status, the
    /// `Content-Type` and `Content-Disposition` headers (empty when absent) and the body.
    ///
    /// # Errors
    /// No answer.
    pub async fn admin_get_text(
        &self,
        path: &str,
    ) -> anyhow::Result<(u16, String, String, String)> {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.admin)
            .send()
            .await?;
        let header = |name: reqwest::header::HeaderName| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let (status, content_type, disposition) = (
            r.status().as_u16(),
            header(reqwest::header::CONTENT_TYPE),
            header(reqwest::header::CONTENT_DISPOSITION),
        );
        Ok((status, content_type, disposition, r.text().await?))
    }
}

/// Sends `request()` again while the api answers 503 (its broker or database is unavailable,
/// as while a broker node or the primary fails over), as a producer should: after 100 ms, then
/// doubling up to 5 s, jittered, at most 40 times (about three minutes); the last answer is
/// returned whatever it is. Safe for purchases and refunds, which are idempotent by their id
/// (contract §3, §10).
///
/// # Errors
/// No answer.
pub async fn while_unavailable<F, Fut>(request: F) -> reqwest::Result<reqwest::Response>
where
    F: Fn() -> Fut,
    Fut: Future<Output = reqwest::Result<reqwest::Response>>,
{
    let mut delays = upline_common::amqp::backoff().with_max_times(40).build();
    loop {
        let answer = request().await?;
        match delays.next() {
            Some(delay) if answer.status() == StatusCode::SERVICE_UNAVAILABLE => {
                tokio::time::sleep(delay).await;
            }
            _ => return Ok(answer),
        }
    }
}

/// The response when its status is `want`, else an error naming `what`, the status and the body.
async fn expect(
    r: reqwest::Response,
    want: StatusCode,
    what: &str,
) -> anyhow::Result<reqwest::Response> {
    if r.status() == want {
        return Ok(r);
    }
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    Err(anyhow::anyhow!("{status} {body}")).context(format!("{what}: expected {want}"))
}
