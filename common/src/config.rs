//! Typed settings, read once at start-up: `config/default.toml` (or built-in defaults), then
//! environment variables `UPLINE__SECTION__KEY`; the conventional `DATABASE_URL` and `AMQP_URL`
//! win over both (SPEC §7). No other module reads the environment.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context};
use rust_decimal::Decimal;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::money::Money;

/// The defaults, compiled in so that a binary runs from any directory; `config/default.toml`
/// in the working directory, when present, is read on top of them.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Development secrets: accepted only with `app.environment = "development"`, with a warning.
const DEV_TOKEN_SECRET: &str = "dev-only-token-secret-change-me";
const DEV_ADMIN_TOKEN: &str = "dev-admin-token";
const DEV_PRODUCER_TOKEN: &str = "dev-producer-token";

/// Every setting of every service.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub app: AppSettings,
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub api: ApiSettings,
    pub worker: WorkerSettings,
    pub notifier: NotifierSettings,
    pub commission: CommissionSettings,
    pub referrals: ReferralSettings,
    pub auth: AuthSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AppSettings {
    /// `development` allows the built-in secrets (with a warning); anything else requires real ones.
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
}

#[derive(Debug, Clone, Deserialize)]
pub struct AmqpSettings {
    /// RabbitMQ URL, vhost included (`%2f` is `/`): `amqp://` is plain TCP, `amqps://` is TLS
    /// (server certificate and host name checked).
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
}

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
    /// How often the outbox relay looks for earnings left unpublished by a crashed worker (ms).
    pub outbox_poll_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NotifierSettings {
    pub bind: SocketAddr,
    /// Seconds between pings to an idle connection.
    pub ping_interval_secs: u64,
    /// A connection that has not answered for this many seconds is closed.
    pub idle_timeout_secs: u64,
    /// Frames buffered per subscription before a slow client is closed.
    pub buffer: usize,
    /// Seconds one frame may take to be written to a client before it counts as too slow.
    pub send_timeout_secs: u64,
    /// Kernel send buffer per client socket, in bytes (fixed, so it cannot grow unbounded).
    pub socket_send_buffer: usize,
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
    pub fn load_from(file: &Path) -> anyhow::Result<Self> {
        Self::load_with(file, None)
    }

    /// Loads with `environment` standing in for the process environment (`None` = the real one).
    fn load_with(
        file: &Path,
        environment: Option<config::Map<String, String>>,
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
        let settings: Settings = builder
            .build()
            .context("reading configuration")?
            .try_deserialize()
            .context("parsing configuration")?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what the types cannot: rates, amounts, secrets, and that `amqp.tls_ca_file` (when
    /// set) is a readable PEM file of certificates.
    ///
    /// # Errors
    /// The first invalid setting, named by its key.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.commission.rules().context("commission settings")?;
        if self.referrals.max_direct < 0 {
            bail!("referrals.max_direct must not be negative");
        }
        crate::amqp::tls_config(&self.amqp)?;
        if self.worker.prefetch == 0 || self.worker.consumers == 0 || self.worker.batch_size == 0 {
            bail!("worker.prefetch, worker.consumers and worker.batch_size must be at least 1");
        }
        if !self.is_development() {
            for (key, value, dev) in [
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
            ] {
                let value = value.expose_secret();
                if value == dev || value.len() < 16 {
                    bail!("{key} must be set to a secret of at least 16 characters outside development");
                }
            }
        }
        Ok(())
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
        Ok(Rules {
            rates,
            min_purchase,
            cap_per_level,
            currency,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_defaults_give_the_rules_of_the_contract() {
        let settings =
            Settings::load_with(Path::new("/nonexistent.toml"), Some(config::Map::new()))
                .expect("defaults load");
        let rules = settings
            .commission
            .rules()
            .expect("default rules are valid");
        assert_eq!(rules.rates, vec![Decimal::new(5, 2), Decimal::new(1, 2)]);
        assert_eq!(rules.min_purchase.to_string(), "1000.00");
        assert_eq!(rules.cap_per_level, None);
        assert_eq!(rules.currency, "INR");
        assert_eq!(settings.referrals.max_direct, 8);
    }

    #[test]
    fn rates_can_be_overridden_from_the_environment_as_a_comma_separated_list() {
        let env = config::Map::from([
            (
                "UPLINE__COMMISSION__RATES".to_owned(),
                "0.05, 0.01,0.005".to_owned(),
            ),
            ("UPLINE__AUTH__ADMIN_TOKEN".to_owned(), "0123".to_owned()),
            (
                "DATABASE_URL".to_owned(),
                "postgres://db.example/upline".to_owned(),
            ),
        ]);
        let settings =
            Settings::load_with(Path::new("/nonexistent.toml"), Some(env)).expect("loads");
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
    fn rates_outside_zero_to_one_are_refused() {
        let mut c = Settings::load_from(Path::new("/nonexistent.toml"))
            .expect("defaults load")
            .commission;
        c.rates = vec!["1.5".into()];
        assert!(c.rules().is_err());
        c.rates = vec![];
        assert!(c.rules().is_err());
    }
}
