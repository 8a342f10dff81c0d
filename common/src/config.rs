//! Typed settings, read once at start-up: `config/default.toml` (or built-in defaults), then
//! environment variables `UPLINE__SECTION__KEY`; the conventional `DATABASE_URL` and `AMQP_URL`
//! win over both (SPEC §7). No other module reads the environment.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use rust_decimal::Decimal;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::money::Money;

/// The defaults, compiled in so that a binary runs from any directory; `config/default.toml`
/// in the working directory, when present, is read on top of them.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Development secrets: filled in for empty settings only with `app.environment =
/// "development"` (with a warning at start-up), and refused everywhere else.
pub const DEV_TOKEN_SECRET: &str = "dev-only-token-secret-change-me";
pub const DEV_ADMIN_TOKEN: &str = "dev-admin-token";
pub const DEV_PRODUCER_TOKEN: &str = "dev-producer-token";

/// Shortest secret accepted outside development, in characters.
pub const MIN_SECRET_LEN: usize = 32;

/// Every setting of every service.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub app: AppSettings,
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub api: ApiSettings,
    pub worker: WorkerSettings,
    pub notifier: NotifierSettings,
    pub webhooks: WebhookSettings,
    pub commission: CommissionSettings,
    pub payout: PayoutSettings,
    pub referrals: ReferralSettings,
    pub auth: AuthSettings,
    pub limits: LimitSettings,
    pub privacy: PrivacySettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AppSettings {
    /// `production` by default. `development` fills in built-in secrets for empty `auth.*`
    /// settings (with a warning); anything else requires real ones (see [`Settings::validate`]).
    pub environment: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    /// PostgreSQL URL; the database is created if missing and migrated at start-up. TLS is
    /// chosen by its query, as with libpq: `sslmode=require|verify-ca|verify-full` and
    /// `sslrootcert=/path/ca.pem` (see [`crate::db::connect_and_migrate`]).
    pub url: String,
    /// Connections per service process.
    pub max_connections: u32,
    /// Seconds to wait for a free connection before an infrastructure error (api: 503).
    pub acquire_timeout_secs: u64,
    /// Serve the api's report reads (a user's earnings, referrals and history, the
    /// leaderboard) from a hot standby listed in `url`, while it is at most
    /// `standby_max_lag_secs` behind the primary (see [`crate::db::standby`]). Off by default:
    /// every read goes to the primary.
    #[serde(default)]
    pub standby_reads: bool,
    /// How far behind the primary, in seconds, the standby may be and still serve report reads;
    /// beyond it they go to the primary until it catches up. A read from the standby is at most
    /// this plus one second (the check interval) old.
    #[serde(default = "default_standby_max_lag_secs")]
    pub standby_max_lag_secs: u64,
}

fn default_standby_max_lag_secs() -> u64 {
    5
}

#[derive(Debug, Clone, Deserialize)]
pub struct AmqpSettings {
    /// RabbitMQ URL, vhost included (`%2f` is `/`): `amqp://` is plain TCP, `amqps://` is TLS
    /// (server certificate and host name checked). A cluster's nodes are given as several URLs
    /// separated by commas: services connect to the first that answers, starting with the one
    /// reached last, and move on to the next when a connection is lost.
    pub url: String,
    /// Path to a PEM file of CA certificates trusted for `amqps://` in addition to the built-in
    /// Mozilla roots (a private CA); empty means the built-in roots only. Read and checked at
    /// start-up (see [`crate::amqp::tls_config`]) and again on every (re)connect.
    #[serde(default)]
    pub tls_ca_file: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiSettings {
    pub bind: SocketAddr,
    /// The notifier's WebSocket URL as a browser reaches it; empty means "same host, notifier port".
    pub notifier_public_url: String,
    /// Largest request body, in bytes (413 above it).
    pub max_body_bytes: usize,
    /// Seconds a request may take before it is answered 503 `request_timeout`.
    pub request_timeout_secs: u64,
}

/// The most `worker.ledger_writers` can be: more batches holding earners at once than this is
/// never useful, since they all credit the same top earners.
pub const MAX_LEDGER_WRITERS: u16 = 64;

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSettings {
    /// Health and metrics endpoint.
    pub bind: SocketAddr,
    /// Unacknowledged deliveries the broker may hand each consumer at once.
    pub prefetch: u16,
    /// Consumers (each with its own channel) in one worker process.
    pub consumers: u16,
    /// Most purchases recorded in one transaction.
    pub batch_size: usize,
    /// Purchase batches that may hold earners' rows at once across all workers (1 to
    /// [`MAX_LEDGER_WRITERS`], default 1): each consumer's batches pass ledger gate `consumer
    /// number mod ledger_writers` before they lock their first earner (docs/perf.md, "Ledger
    /// gates", "The gate before the earners").
    pub ledger_writers: u16,
    /// Whether a worker's consumer number i consumes only while it holds consumer slot i, a
    /// PostgreSQL advisory lock, so that across all workers one consumer of each number
    /// consumes and the rest stand by (docs/perf.md, "Standby consumers"). `false`: every
    /// consumer of every worker consumes.
    pub standby: bool,
    /// How often (ms) a standby consumer tries for its slot, and a consumer holding one checks
    /// in: a stopped or crashed worker's slots pass to a standby within about this long, a
    /// holder cut off from PostgreSQL loses them within three times this. 100 to 60,000.
    pub standby_poll_ms: u64,
    /// How often the outbox relay looks for earnings left unpublished by a crashed worker (ms).
    pub outbox_poll_ms: u64,
    /// Largest purchase message, in bytes; bigger ones are dead-lettered with their reason.
    pub max_message_bytes: usize,
    /// Depth of `upline.purchases.dead` above which the worker warns (gauge
    /// `upline_dead_letters` on `/metrics`).
    pub dead_letter_alert: u32,
    /// How long the outbox relay waits for a batch's publisher confirms before it backs off
    /// and tries again (ms); its lease on the batch is twice this plus a second.
    pub outbox_confirm_timeout_ms: u64,
    /// How often (seconds) each worker approves commissions whose holding period ended and
    /// applies refunds that were waiting for their purchase (contract §10). At least 1.
    pub lifecycle_interval_secs: u64,
    /// How often (ms) the workers refresh the leaderboard snapshot that `GET /api/leaderboard`
    /// serves (contract §6), so how old its totals may be. At least 100.
    pub leaderboard_refresh_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NotifierSettings {
    pub bind: SocketAddr,
    /// Seconds between pings to an idle connection.
    pub ping_interval_secs: u64,
    /// A connection that has not answered for this many seconds is closed.
    pub idle_timeout_secs: u64,
    /// Frames buffered for the admin feed of every earner (`"*"`), which has no replay: a
    /// subscriber further behind is closed with `lagged`. At least 1.
    pub buffer: usize,
    /// Frames buffered in each earner's channel, shared by that earner's subscriptions and
    /// allocated up front (about 40 bytes a frame) while the earner has any. A subscription
    /// further behind is not closed: it catches up from PostgreSQL (contract §5). At least 1.
    pub user_buffer: usize,
    /// Seconds one frame may take to be written to a client before it counts as too slow.
    pub send_timeout_secs: u64,
    /// Kernel send buffer per client socket, in bytes (fixed, so it cannot grow unbounded).
    pub socket_send_buffer: usize,
    /// Earnings read from PostgreSQL per query while a subscription replays or catches up; a
    /// subscription holds at most this many frames in memory. At least 1.
    pub replay_page_size: usize,
    /// Seconds a new WebSocket may take to send its `subscribe` message before it is closed
    /// (code 4006, `subscribe_timeout`). At least 1.
    pub subscribe_timeout_secs: u64,
    /// Open WebSocket and SSE connections this notifier accepts in all; past it new ones are
    /// refused with `notifier_full` (WebSocket close code 1013, SSE `503`). Always enforced.
    /// At least 1.
    pub max_connections: usize,
    /// Open subscriptions per user (WebSocket and SSE together); past it `429` /
    /// close code 4004 `too_many_connections_for_user`. An abuse limit: off with
    /// `limits.enabled = false`. At least 1.
    pub max_connections_per_user: usize,
    /// Open connections per client address (WebSocket and SSE together, subscribed or not,
    /// the address as `limits.trust_forwarded_for` says); past it `429` / close code 4005
    /// `too_many_connections_from_address`. An abuse limit: off with `limits.enabled =
    /// false`. At least 1.
    pub max_connections_per_address: usize,
}

/// Signed webhooks (contract §11): the `upline-webhooks` service and `/api/webhooks`.
#[derive(Debug, Clone, Deserialize)]
pub struct WebhookSettings {
    /// Health and metrics of the webhooks service.
    pub bind: SocketAddr,
    /// Accept endpoint URLs on loopback, private, link-local and other non-public addresses
    /// (SSRF protection off). `false` by default; for tests and closed networks only.
    pub allow_private_targets: bool,
    /// The wait before each retry of a failed delivery, in order (`"5s"`, `"5m"`, …): a
    /// delivery is attempted once at once and once after each of these, each wait varied by up
    /// to ±20 % (jitter). At least one; each at most 7 days.
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub retry_schedule: Vec<String>,
    /// Seconds an endpoint has to answer an attempt (connect, send and the response headers);
    /// at least 1.
    pub timeout_secs: u64,
    /// Deliveries in flight at once from one webhooks service, all endpoints together.
    pub max_in_flight: usize,
    /// Deliveries in flight at once to any one endpoint: a slow endpoint uses up only these,
    /// never the others' share.
    pub max_in_flight_per_endpoint: usize,
    /// Most endpoints that can be registered.
    pub max_endpoints: i64,
    /// Longest endpoint URL, in bytes.
    pub max_url_bytes: usize,
    /// Milliseconds between looks for due retries when nothing new arrives.
    pub poll_ms: u64,
    /// Events the webhooks service takes from each of its queues before acknowledging any.
    pub prefetch: u16,
    /// How long a rotated-out secret keeps signing deliveries next to the new one (`"24h"`).
    #[serde(with = "humantime_serde_compat")]
    pub rotation_overlap: Duration,
    /// How long messages, deliveries and attempts are kept once no delivery of the message is
    /// pending (`"30d"`).
    #[serde(with = "humantime_serde_compat")]
    pub retention: Duration,
}

impl WebhookSettings {
    /// [`Self::retry_schedule`] parsed.
    ///
    /// # Errors
    /// An empty schedule, or an entry that is not a duration of at most 7 days, named by its key.
    pub fn retry_waits(&self) -> anyhow::Result<Vec<Duration>> {
        if self.retry_schedule.is_empty() {
            bail!("webhooks.retry_schedule must list at least one wait");
        }
        self.retry_schedule
            .iter()
            .map(|w| {
                let wait = humantime::parse_duration(w.trim()).with_context(|| {
                    format!("webhooks.retry_schedule: {w:?} is not a duration such as \"5m\"")
                })?;
                if wait > Duration::from_secs(7 * 24 * 3600) {
                    bail!("webhooks.retry_schedule: {w:?} is longer than 7 days");
                }
                Ok(wait)
            })
            .collect()
    }
}

/// Commission rules, SPEC §2.
#[derive(Debug, Clone, Deserialize)]
pub struct CommissionSettings {
    /// Rate per level as decimal strings, level 1 first: `["0.05", "0.01"]` in the file, or
    /// `0.05,0.01` in `UPLINE__COMMISSION__RATES`.
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub rates: Vec<String>,
    /// A purchase qualifies when its amount is strictly greater than this (rupees).
    pub min_purchase: String,
    /// Lifetime cap per earner per level (rupees); empty or absent means none.
    #[serde(default)]
    pub cap_per_level: Option<String>,
    /// The one accepted currency.
    pub currency: String,
    /// Days a new commission stays `pending` before it is `approved` (contract §10), as a
    /// decimal string or number: `30`, `0` (approved at once), `0.0001` (8.64 seconds).
    pub hold_days: String,
}

/// Payout batches, contract §10.
#[derive(Debug, Clone, Deserialize)]
pub struct PayoutSettings {
    /// Smallest approved balance (rupees) that gets a payout line.
    pub minimum: String,
}

impl PayoutSettings {
    /// `minimum` as money.
    ///
    /// # Errors
    /// Not a non-negative amount.
    pub fn minimum(&self) -> anyhow::Result<Money> {
        Money::parse_non_negative(&self.minimum).map_err(|e| anyhow::anyhow!("payout.minimum: {e}"))
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ReferralSettings {
    /// Most direct referrals per user.
    pub max_direct: i32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuthSettings {
    /// HMAC key that signs per-user tokens.
    pub token_secret: SecretString,
    /// Bearer key for admin routes.
    pub admin_token: SecretString,
    /// Bearer key for purchase producers.
    pub producer_token: SecretString,
    /// How long a user token is valid: `"24h"` in the file, 1 second to 30 days.
    #[serde(with = "humantime_serde_compat")]
    pub token_ttl: Duration,
}

/// Abuse limits per client address (README "Security").
#[derive(Debug, Clone, Deserialize)]
pub struct LimitSettings {
    /// `false` turns every abuse limit off (tests and benchmarks).
    pub enabled: bool,
    /// Anonymous sign-ups per client address per minute (also the burst).
    pub registrations_per_minute: u32,
    /// Failed authentications per client address per minute (also the burst); past it, every
    /// authenticated request from the address answers 429 until the budget refills.
    pub auth_failures_per_minute: u32,
    /// Take the client address from `X-Forwarded-For` (only behind a proxy that sets it).
    pub trust_forwarded_for: bool,
}

/// What is kept about people and producers, and for how long.
#[derive(Debug, Clone, Deserialize)]
pub struct PrivacySettings {
    /// How long raw purchase message bodies are kept (`"30d"`); zero drops them at once.
    #[serde(with = "humantime_serde_compat")]
    pub raw_body_retention: Duration,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    /// `human` or `json`.
    pub format: String,
    /// `tracing` filter used when `RUST_LOG` is not set.
    pub level: String,
}

impl Settings {
    /// Loads the settings: defaults, `config/default.toml` if present, `UPLINE__…`, then
    /// `DATABASE_URL` / `AMQP_URL`.
    ///
    /// # Errors
    /// A malformed file or variable, or a setting that fails [`Settings::validate`].
    pub fn load() -> anyhow::Result<Self> {
        Self::load_from(Path::new("config/default.toml"))
    }

    /// Like [`Settings::load`] with an explicit file (which may be absent).
    ///
    /// # Errors
    /// As [`Settings::load`].
    pub fn load_from(file: &Path) -> anyhow::Result<Self> {
        Self::load_with(file, None, &[])
    }

    /// Like [`Settings::load_from`], then `overrides` (`("app.environment", "development")`)
    /// on top of everything, before validation: how tests and tools pick their settings
    /// without touching the process environment.
    ///
    /// # Errors
    /// As [`Settings::load`].
    pub fn load_with_overrides(file: &Path, overrides: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::load_with(file, None, overrides)
    }

    /// Loads with `environment` standing in for the process environment (`None` = the real one).
    fn load_with(
        file: &Path,
        environment: Option<config::Map<String, String>>,
        overrides: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let database_url = environment.as_ref().map_or_else(
            || std::env::var("DATABASE_URL").ok(),
            |e| e.get("DATABASE_URL").cloned(),
        );
        let amqp_url = environment.as_ref().map_or_else(
            || std::env::var("AMQP_URL").ok(),
            |e| e.get("AMQP_URL").cloned(),
        );
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(
                DEFAULT_TOML,
                config::FileFormat::Toml,
            ))
            .add_source(config::File::from(file).required(false))
            .add_source(
                // Values stay strings (no guessing of numbers: a secret like "0123" must stay
                // as written); typed settings are parsed from them.
                config::Environment::with_prefix("UPLINE")
                    .prefix_separator("__")
                    .separator("__")
                    .source(environment),
            );
        if let Some(url) = database_url {
            builder = builder.set_override("database.url", url)?;
        }
        if let Some(url) = amqp_url {
            builder = builder.set_override("amqp.url", url)?;
        }
        for (key, value) in overrides {
            builder = builder.set_override(*key, *value)?;
        }
        let mut settings: Settings = builder
            .build()
            .context("reading configuration")?
            .try_deserialize()
            .context("parsing configuration")?;
        settings.fill_development_secrets();
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what the types cannot: rates, amounts, limits, secrets, and that
    /// `amqp.tls_ca_file` (when set) is a readable PEM file of certificates.
    ///
    /// Outside development each of `auth.token_secret`, `auth.admin_token` and
    /// `auth.producer_token` must be set, at least [`MIN_SECRET_LEN`] characters long, not a
    /// built-in development value, and different from the other two.
    ///
    /// # Errors
    /// The first invalid setting, named by its key.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.commission.rules().context("commission settings")?;
        self.payout.minimum()?;
        if !(100..=60_000).contains(&self.worker.standby_poll_ms) {
            bail!(
                "worker.standby_poll_ms must be between 100 and 60000, found {}",
                self.worker.standby_poll_ms
            );
        }
        if self.worker.leaderboard_refresh_ms < 100 {
            bail!("worker.leaderboard_refresh_ms must be at least 100");
        }
        if self.worker.lifecycle_interval_secs == 0 {
            bail!("worker.lifecycle_interval_secs must be at least 1");
        }
        if self.referrals.max_direct < 0 {
            bail!("referrals.max_direct must not be negative");
        }
        crate::amqp::tls_config(&self.amqp)?;
        if self.worker.prefetch == 0 || self.worker.consumers == 0 || self.worker.batch_size == 0 {
            bail!("worker.prefetch, worker.consumers and worker.batch_size must be at least 1");
        }
        if self.worker.ledger_writers == 0 || self.worker.ledger_writers > MAX_LEDGER_WRITERS {
            bail!(
                "worker.ledger_writers must be between 1 and {MAX_LEDGER_WRITERS}, found {}",
                self.worker.ledger_writers
            );
        }
        let n = &self.notifier;
        if n.replay_page_size == 0
            || n.buffer == 0
            || n.user_buffer == 0
            || n.subscribe_timeout_secs == 0
            || n.max_connections == 0
            || n.max_connections_per_user == 0
            || n.max_connections_per_address == 0
        {
            bail!("notifier.replay_page_size, notifier.buffer, notifier.user_buffer, notifier.subscribe_timeout_secs, notifier.max_connections, notifier.max_connections_per_user and notifier.max_connections_per_address must be at least 1");
        }
        if self.database.standby_reads
            && crate::db::Hosts::parse(&self.database.url)
                .map(|h| h.urls.len() < 2)
                .unwrap_or(true)
        {
            bail!("database.standby_reads needs the standby in database.url: list the primary and its standbys, as in postgres://user@db1:5432,db2:5432/upline?target_session_attrs=read-write");
        }
        if self.database.standby_reads && self.database.standby_max_lag_secs == 0 {
            bail!("database.standby_max_lag_secs must be at least 1");
        }
        if crate::amqp::broker_urls(&self.amqp.url).is_empty() {
            bail!("amqp.url (or AMQP_URL) is empty: give one broker URL, or a cluster's nodes separated by commas");
        }
        self.webhooks.retry_waits()?;
        let w = &self.webhooks;
        if w.timeout_secs == 0
            || w.max_in_flight == 0
            || w.max_in_flight_per_endpoint == 0
            || w.max_endpoints < 1
            || w.max_url_bytes < 16
            || w.poll_ms == 0
            || w.prefetch == 0
        {
            bail!("webhooks.timeout_secs, webhooks.max_in_flight, webhooks.max_in_flight_per_endpoint, webhooks.max_endpoints, webhooks.poll_ms and webhooks.prefetch must be at least 1, webhooks.max_url_bytes at least 16");
        }
        if self.worker.outbox_confirm_timeout_ms < 100 {
            bail!("worker.outbox_confirm_timeout_ms must be at least 100");
        }
        if self.auth.token_ttl < Duration::from_secs(1)
            || self.auth.token_ttl > Duration::from_secs(30 * 24 * 3600)
        {
            bail!("auth.token_ttl must be between 1 second and 30 days");
        }
        if self.limits.enabled
            && (self.limits.registrations_per_minute == 0
                || self.limits.auth_failures_per_minute == 0)
        {
            bail!("limits.registrations_per_minute and limits.auth_failures_per_minute must be at least 1 (or limits.enabled = false)");
        }
        let secrets = [
            (
                "auth.token_secret",
                &self.auth.token_secret,
                DEV_TOKEN_SECRET,
            ),
            ("auth.admin_token", &self.auth.admin_token, DEV_ADMIN_TOKEN),
            (
                "auth.producer_token",
                &self.auth.producer_token,
                DEV_PRODUCER_TOKEN,
            ),
        ];
        for (i, (key, value, _)) in secrets.iter().enumerate() {
            if let Some((other, _, _)) = secrets[i + 1..].iter().find(|(_, v, _)| {
                !v.expose_secret().is_empty() && v.expose_secret() == value.expose_secret()
            }) {
                bail!("{key} and {other} must differ: each credential grants other rights");
            }
        }
        if self.is_development() {
            return Ok(());
        }
        for (key, value, _) in secrets {
            let value = value.expose_secret();
            let variable = format!("UPLINE__{}", key.replace('.', "__").to_ascii_uppercase());
            if value.is_empty() {
                bail!(
                    "{key} is not set: set {variable} to a random secret of at least {MIN_SECRET_LEN} \
                     characters (e.g. `openssl rand -hex 32`), or app.environment = \"development\" \
                     on a machine of your own"
                );
            }
            if [DEV_TOKEN_SECRET, DEV_ADMIN_TOKEN, DEV_PRODUCER_TOKEN].contains(&value) {
                bail!("{key} is a built-in development value, refused outside development: set {variable} to a secret of your own");
            }
            if value.chars().count() < MIN_SECRET_LEN {
                bail!("{key} is too short: it must be at least {MIN_SECRET_LEN} characters outside development (set {variable})");
            }
        }
        Ok(())
    }

    /// In development, fills each empty secret with its built-in value.
    fn fill_development_secrets(&mut self) {
        if !self.is_development() {
            return;
        }
        for (value, dev) in [
            (&mut self.auth.token_secret, DEV_TOKEN_SECRET),
            (&mut self.auth.admin_token, DEV_ADMIN_TOKEN),
            (&mut self.auth.producer_token, DEV_PRODUCER_TOKEN),
        ] {
            if value.expose_secret().is_empty() {
                *value = SecretString::from(dev);
            }
        }
    }

    /// True when the built-in development secrets are acceptable.
    pub fn is_development(&self) -> bool {
        self.app.environment == "development"
    }

    /// Whether any secret is still a built-in development value (logged loudly at start-up).
    pub fn uses_development_secrets(&self) -> bool {
        self.auth.token_secret.expose_secret() == DEV_TOKEN_SECRET
            || self.auth.admin_token.expose_secret() == DEV_ADMIN_TOKEN
            || self.auth.producer_token.expose_secret() == DEV_PRODUCER_TOKEN
    }
}

/// A duration written for people (`"24h"`, `"30d"`, `"90s"`), parsed with `humantime`.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration such as \"24h\" or \"30d\": {e}"
            ))
        })
    }
}

/// A list from the file, or a comma-separated string from the environment.
fn list_or_comma_separated<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Rates {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Rates::deserialize(d)? {
        Rates::List(list) => list,
        Rates::Text(text) => text
            .split(',')
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty())
            .collect(),
    })
}

/// The commission rules in domain types, parsed from [`CommissionSettings`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Rate per level, level 1 first; 1 to 10 entries, each in `(0, 1]`.
    pub rates: Vec<Decimal>,
    /// Qualifying purchases are strictly above this amount.
    pub min_purchase: Money,
    /// Lifetime cap per earner per level.
    pub cap_per_level: Option<Money>,
    /// The accepted currency (upper-case ISO code).
    pub currency: String,
    /// How long a new commission is held (`pending`); zero = approved at once.
    pub hold: Duration,
}

impl CommissionSettings {
    /// Parses the settings into [`Rules`].
    ///
    /// # Errors
    /// A rate that is not a decimal in `(0, 1]`, 0 or more than 10 levels, a bad amount.
    pub fn rules(&self) -> anyhow::Result<Rules> {
        if self.rates.is_empty() || self.rates.len() > 10 {
            bail!(
                "commission.rates must list 1 to 10 levels, found {}",
                self.rates.len()
            );
        }
        let rates = self
            .rates
            .iter()
            .map(|r| {
                let rate: Decimal = r
                    .trim()
                    .parse()
                    .with_context(|| format!("commission.rates: {r:?} is not a decimal"))?;
                if rate <= Decimal::ZERO || rate > Decimal::ONE {
                    bail!("commission.rates: {r} must be greater than 0 and at most 1");
                }
                Ok(rate.normalize())
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let min_purchase = Money::parse_non_negative(&self.min_purchase)
            .map_err(|e| anyhow::anyhow!("commission.min_purchase: {e}"))?;
        let cap_per_level = match self.cap_per_level.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(cap) => Some(
                Money::parse(cap).map_err(|e| anyhow::anyhow!("commission.cap_per_level: {e}"))?,
            ),
        };
        let currency = self.currency.trim().to_ascii_uppercase();
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            bail!(
                "commission.currency must be a three-letter code, found {:?}",
                self.currency
            );
        }
        let hold_days: Decimal = self.hold_days.trim().parse().with_context(|| {
            format!("commission.hold_days: {:?} is not a number", self.hold_days)
        })?;
        if hold_days.is_sign_negative() || hold_days > Decimal::from(36_500) {
            bail!("commission.hold_days must be between 0 and 36500, found {hold_days}");
        }
        let hold_ms = (hold_days * Decimal::from(86_400_000_u64)).round();
        let hold = Duration::from_millis(
            u64::try_from(hold_ms).context("commission.hold_days out of range")?,
        );
        Ok(Rules {
            rates,
            min_purchase,
            cap_per_level,
            currency,
            hold,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> config::Map<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn load(pairs: &[(&str, &str)]) -> anyhow::Result<Settings> {
        Settings::load_with(Path::new("/nonexistent.toml"), Some(env(pairs)), &[])
    }

    const DEVELOPMENT: (&str, &str) = ("UPLINE__APP__ENVIRONMENT", "development");
    const SECRET: &str = "0123456789abcdef0123456789abcdef-token";
    const ADMIN: &str = "0123456789abcdef0123456789abcdef-admin";
    const PRODUCER: &str = "0123456789abcdef0123456789abcdef-producer";

    #[test]
    fn built_in_defaults_give_the_rules_of_the_contract() {
        let settings = load(&[DEVELOPMENT]).expect("defaults load in development");
        let rules = settings
            .commission
            .rules()
            .expect("default rules are valid");
        assert_eq!(rules.rates, vec![Decimal::new(5, 2), Decimal::new(1, 2)]);
        assert_eq!(rules.min_purchase.to_string(), "1000.00");
        assert_eq!(rules.cap_per_level, None);
        assert_eq!(rules.currency, "INR");
        assert_eq!(settings.referrals.max_direct, 8);
        assert_eq!(settings.auth.token_ttl, Duration::from_secs(24 * 3600));
        assert!(settings.limits.enabled);
    }

    #[test]
    fn with_nothing_configured_the_default_environment_is_production_and_refuses_to_start() {
        let e = load(&[]).expect_err("no secrets, production");
        let message = format!("{e:#}");
        assert!(
            message.contains("auth.token_secret is not set")
                && message.contains("UPLINE__AUTH__TOKEN_SECRET"),
            "{message}"
        );
    }

    #[test]
    fn outside_development_built_in_short_or_repeated_secrets_are_refused_by_name() {
        let with = |secret: &str, admin: &str, producer: &str| {
            load(&[
                ("UPLINE__AUTH__TOKEN_SECRET", secret),
                ("UPLINE__AUTH__ADMIN_TOKEN", admin),
                ("UPLINE__AUTH__PRODUCER_TOKEN", producer),
            ])
            .map_err(|e| format!("{e:#}"))
        };
        assert!(with(SECRET, ADMIN, PRODUCER).is_ok());
        let built_in = with(SECRET, DEV_ADMIN_TOKEN, PRODUCER).expect_err("dev admin key");
        assert!(
            built_in.contains("auth.admin_token is a built-in development value"),
            "{built_in}"
        );
        let short = with(SECRET, ADMIN, "short-producer-key").expect_err("short");
        assert!(
            short.contains("auth.producer_token is too short"),
            "{short}"
        );
        let same = with(SECRET, ADMIN, ADMIN).expect_err("same key twice");
        assert!(
            same.contains("auth.admin_token and auth.producer_token must differ"),
            "{same}"
        );
    }

    #[test]
    fn development_fills_in_the_built_in_secrets_but_still_wants_distinct_keys() {
        let settings = load(&[DEVELOPMENT]).expect("development");
        assert_eq!(settings.auth.admin_token.expose_secret(), DEV_ADMIN_TOKEN);
        assert!(settings.uses_development_secrets());
        let e = load(&[
            DEVELOPMENT,
            ("UPLINE__AUTH__ADMIN_TOKEN", "same"),
            ("UPLINE__AUTH__PRODUCER_TOKEN", "same"),
        ])
        .expect_err("repeated key");
        assert!(format!("{e:#}").contains("must differ"));
    }

    #[test]
    fn durations_and_limits_are_read_from_the_environment() {
        let settings = load(&[
            DEVELOPMENT,
            ("UPLINE__AUTH__TOKEN_TTL", "90m"),
            ("UPLINE__LIMITS__ENABLED", "false"),
            ("UPLINE__LIMITS__REGISTRATIONS_PER_MINUTE", "7"),
            ("UPLINE__PRIVACY__RAW_BODY_RETENTION", "12h"),
        ])
        .expect("loads");
        assert_eq!(settings.auth.token_ttl, Duration::from_secs(90 * 60));
        assert!(!settings.limits.enabled);
        assert_eq!(settings.limits.registrations_per_minute, 7);
        assert_eq!(
            settings.privacy.raw_body_retention,
            Duration::from_secs(12 * 3600)
        );
        let e = load(&[DEVELOPMENT, ("UPLINE__AUTH__TOKEN_TTL", "forever")]).expect_err("bad");
        assert!(format!("{e:#}").contains("not a duration"), "{e:#}");
    }

    #[test]
    fn rates_can_be_overridden_from_the_environment_as_a_comma_separated_list() {
        let settings = load(&[
            DEVELOPMENT,
            ("UPLINE__COMMISSION__RATES", "0.05, 0.01,0.005"),
            ("UPLINE__AUTH__ADMIN_TOKEN", "0123"),
            ("DATABASE_URL", "postgres://db.example/upline"),
        ])
        .expect("loads");
        let rules = settings.commission.rules().expect("valid rules");
        assert_eq!(
            rules.rates,
            vec![Decimal::new(5, 2), Decimal::new(1, 2), Decimal::new(5, 3)]
        );
        assert_eq!(
            settings.auth.admin_token.expose_secret(),
            "0123",
            "values are not guessed to be numbers"
        );
        assert_eq!(settings.database.url, "postgres://db.example/upline");
    }

    #[test]
    fn notifier_buffers_default_to_a_short_earner_channel_and_refuse_zero() {
        let settings = load(&[DEVELOPMENT]).expect("defaults load");
        assert_eq!(settings.notifier.user_buffer, 64);
        assert_eq!(settings.notifier.buffer, 1024);
        let e = load(&[DEVELOPMENT, ("UPLINE__NOTIFIER__USER_BUFFER", "0")]).expect_err("zero");
        assert!(format!("{e:#}").contains("notifier.user_buffer"), "{e:#}");
    }

    #[test]
    fn standby_is_on_polls_every_second_and_refuses_polls_out_of_range() {
        let settings = load(&[DEVELOPMENT]).expect("defaults load");
        assert!(settings.worker.standby);
        assert_eq!(settings.worker.standby_poll_ms, 1000);
        for refused in ["99", "60001"] {
            let e = load(&[DEVELOPMENT, ("UPLINE__WORKER__STANDBY_POLL_MS", refused)])
                .expect_err("out of range");
            assert!(format!("{e:#}").contains("worker.standby_poll_ms"), "{e:#}");
        }
    }

    #[test]
    fn ledger_writers_default_to_one_and_refuse_zero_and_more_than_the_maximum() {
        let settings = load(&[DEVELOPMENT]).expect("defaults load");
        assert_eq!(settings.worker.ledger_writers, 1);
        for refused in ["0", "65"] {
            let e = load(&[DEVELOPMENT, ("UPLINE__WORKER__LEDGER_WRITERS", refused)])
                .expect_err("out of range");
            assert!(format!("{e:#}").contains("worker.ledger_writers"), "{e:#}");
        }
    }

    #[test]
    fn rates_outside_zero_to_one_are_refused() {
        let mut c = load(&[DEVELOPMENT]).expect("defaults load").commission;
        c.rates = vec!["1.5".into()];
        assert!(c.rules().is_err());
        c.rates = vec![];
        assert!(c.rules().is_err());
    }
}
