//! upline's test kit: what the end-to-end tests, the benchmarks (`upline-bench`) and the demo
//! (`upline-demo`) share, and what the shipped `upline` binary does not contain.
//!
//! - [`local`]: where this machine's PostgreSQL and RabbitMQ are (the only place that knows).
//! - [`rabbit::RabbitAdmin`]: the RabbitMQ management API (vhosts, connections), URL and
//!   credentials as parameters.
//! - [`sandbox::Sandbox`]: a fresh database and vhost of their own, settings pointing at them,
//!   dropped afterwards.
//! - [`spawn`]: the services (`upline api|worker|notifier`) as child processes.
//! - [`pipeline`]: what the pipeline has recorded (purchases, outbox), read from its database.
//! - [`oracle`]: an independent recomputation of commissions (SPEC §2), compared with the
//!   ledger.
//! - [`client::Api`]: a small typed REST client (register, deactivate, purchases, reports), and
//!   [`order::Order`], a purchase as a client sends it, over REST or through
//!   [`upline_common::amqp::Publisher`].
//!
//! It is a dev-dependency of the `upline` package only; `cargo tree -p upline -e normal`
//! does not list it.

pub mod client;
pub mod local;
pub mod oracle;
pub mod order;
pub mod pipeline;
pub mod rabbit;
pub mod sandbox;
pub mod spawn;

/// `<prefix>_<16 random hex digits>`: a name no other test or run uses (databases, vhosts,
/// e-mail addresses).
pub fn unique(prefix: &str) -> String {
    use rand::Rng;
    format!("{prefix}_{:016x}", rand::thread_rng().gen::<u64>())
}

/// For the dev binaries: the configuration as `upline` reads it (`config/upline.toml`,
/// `UPLINE__…`, `DATABASE_URL`, `AMQP_URL`), with tracing set up to show only warnings (the
/// tools print their own report).
///
/// # Errors
/// The configuration does not load or validate.
pub fn tool_settings() -> anyhow::Result<upline_common::Settings> {
    let mut settings = upline_common::Settings::load()?;
    settings.log.level = "warn,sqlx=error".into();
    upline_common::telemetry::init_tracing(&settings.log);
    Ok(settings)
}
