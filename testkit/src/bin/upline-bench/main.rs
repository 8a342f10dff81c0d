//! `upline-bench`: performance scenarios that print their figures (SPEC-adjacent targets live
//! here, not in timed tests). Each scenario runs in its own sandbox (fresh database and
//! RabbitMQ vhost, `upline_testkit::sandbox`), starts the services it needs as separate
//! processes of the `upline` binary (so each one's CPU can be read from `/proc`), seeds its own
//! data, shows a live line while it runs, and checks its own results against the commission
//! oracle (`upline_testkit::oracle`).
//!
//! Build with `--release`: `cargo build --release -p upline -p upline-testkit`, then
//! `target/release/upline-bench <scenario>` (or `scripts/bench`). It reads the same
//! configuration as `upline` (`config/upline.toml`, `UPLINE__…`, `DATABASE_URL`, `AMQP_URL`)
//! for the servers and settings it starts the services with.

mod autovacuum;
mod churn;
mod drain;
mod env;
mod floor;
mod reads;
mod rest;
mod webhooks;
mod ws;

use std::time::Duration;

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use upline_testkit::{local, rabbit::RabbitAdmin};

/// upline-bench: throughput and latency of the upline pipeline (build with --release); see
/// README "Performance".
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// RabbitMQ management API, for the scenario's vhost.
    #[arg(long, env = "RABBITMQ_MANAGEMENT_URL", default_value = local::RABBIT_MANAGEMENT)]
    rabbitmq_management_url: String,
    /// RabbitMQ administrator (creates and deletes the vhost).
    #[arg(long, env = "RABBITMQ_ADMIN_USER", default_value = local::RABBIT_ADMIN_USER)]
    rabbitmq_admin_user: String,
    /// Its password.
    #[arg(long, env = "RABBITMQ_ADMIN_PASSWORD", default_value = local::RABBIT_ADMIN_PASSWORD, hide_default_value = true)]
    rabbitmq_admin_password: String,
    /// Refuse to run while PostgreSQL's autovacuum is off, instead of turning it on for the
    /// run (and resetting it afterwards).
    #[arg(long)]
    keep_autovacuum_setting: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

/// The scenarios.
#[derive(Debug, Subcommand)]
enum Scenario {
    /// REST end to end: POST /api/purchases for a while, until processed and delivered on a
    /// WebSocket; throughput, HTTP and purchase-to-socket latency, CPU per service.
    Rest(rest::RestArgs),
    /// Queue backlog drain: publish N purchases, then time 1, 2, 4 … workers draining them,
    /// next to the same writes applied by the ledger straight to PostgreSQL.
    Drain(drain::DrainArgs),
    /// Reads at scale: earnings summary of a user with 1,000,000 earnings and the leaderboard
    /// over 1,000,000 users.
    Reads(reads::ReadsArgs),
    /// Many WebSocket subscribers: delivered events per second, latency, memory per connection.
    Ws(ws::WsArgs),
    /// Signed webhooks: deliveries per second to local endpoints, commit-to-endpoint latency,
    /// exactly-once per endpoint after de-duplication, with optional slow endpoints.
    Webhooks(webhooks::WebhooksArgs),
    /// The floor: the path of a purchase with upline's code removed (HTTP, a quorum queue
    /// with confirms, a batch transaction of the ledger's round trips, a fan-out exchange, a
    /// WebSocket); its latency next to `rest`'s.
    Floor(floor::FloorArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = upline_testkit::tool_settings()?;
    if cfg!(debug_assertions) {
        eprintln!(
            "note: this is a debug build; figures are only meaningful with a --release build"
        );
    }
    let rabbit = RabbitAdmin::new(
        &cli.rabbitmq_management_url,
        &cli.rabbitmq_admin_user,
        &cli.rabbitmq_admin_password,
    );
    let env = env::Bench {
        settings: &settings,
        rabbit: &rabbit,
    };
    let autovacuum =
        autovacuum::Autovacuum::ensure_on(&settings, cli.keep_autovacuum_setting).await?;
    let result = match cli.scenario {
        Scenario::Rest(args) => rest::run(env, args).await,
        Scenario::Drain(args) => drain::run(env, args).await,
        Scenario::Reads(args) => reads::run(env, args).await,
        Scenario::Ws(args) => ws::run(env, args).await,
        Scenario::Webhooks(args) => webhooks::run(env, args).await,
        Scenario::Floor(args) => floor::run(env, args).await,
    };
    autovacuum.restore().await;
    result
}

/// Latencies in microseconds, 1 µs to 1 hour, 3 significant digits.
struct Latency(Histogram<u64>);

impl Latency {
    pub fn new() -> Self {
        Latency(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"))
    }

    pub fn record(&mut self, d: Duration) {
        let micros = u64::try_from(d.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, 3_600_000_000);
        self.0.record(micros).expect("value within bounds");
    }

    pub fn add(&mut self, other: &Latency) {
        self.0.add(&other.0).expect("same bounds");
    }

    /// The latency at quantile `q` (0.0–1.0), in milliseconds; `None` without samples.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        (!self.0.is_empty()).then(|| self.0.value_at_quantile(q) as f64 / 1000.0)
    }

    /// `p50 1.23 ms, p99 4.56 ms, max 7.89 ms (n = 1000)`
    pub fn summary(&self) -> String {
        if self.0.is_empty() {
            return "no samples".into();
        }
        let ms = |v: u64| v as f64 / 1000.0;
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n = {})",
            ms(self.0.value_at_quantile(0.50)),
            ms(self.0.value_at_quantile(0.99)),
            ms(self.0.max()),
            self.0.len()
        )
    }
}

/// One load-generator connection's pace when `rate` requests a second are shared by
/// `connections`: a ticker whose missed ticks are delayed, not bunched; `None` (no rate) = as
/// fast as the answers come.
fn pacer(rate: Option<u64>, connections: usize) -> Option<tokio::time::Interval> {
    rate.filter(|&r| r > 0).map(|r| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(connections as f64 / r as f64));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    })
}

/// A live progress line on stderr.
fn progress(line: &str) {
    eprint!("\r\x1b[2K  {line}");
}

fn progress_done() {
    eprintln!();
}
