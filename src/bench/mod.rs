//! `upline bench`: performance scenarios that print their figures (SPEC-adjacent targets live
//! here, not in timed tests). Each scenario runs against its own fresh database and RabbitMQ
//! vhost, starts the services it needs as separate processes of this binary (so each one's
//! CPU can be read from `/proc`), seeds its own data, shows a live line while it runs, and
//! checks its own results against an independent recomputation.
//!
//! Build with `--release`: `cargo run --release -- bench <scenario>`.

mod drain;
mod env;
mod reads;
mod rest;
mod ws;

use std::time::Duration;

use clap::Subcommand;
use hdrhistogram::Histogram;
use upline_common::Settings;

/// The scenarios.
#[derive(Debug, Subcommand)]
pub enum Scenario {
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
}

/// Runs a scenario.
///
/// # Errors
/// Set-up failures, or a failed correctness check.
pub async fn run(settings: &Settings, scenario: Scenario) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("note: this is a debug build; figures are only meaningful with `cargo run --release -- bench …`");
    }
    match scenario {
        Scenario::Rest(args) => rest::run(settings, args).await,
        Scenario::Drain(args) => drain::run(settings, args).await,
        Scenario::Reads(args) => reads::run(settings, args).await,
        Scenario::Ws(args) => ws::run(settings, args).await,
    }
}

/// Latencies in microseconds, 1 µs to 1 hour, 3 significant digits.
pub(crate) struct Latency(Histogram<u64>);

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

/// A live progress line on stderr.
pub(crate) fn progress(line: &str) {
    eprint!("\r\x1b[2K  {line}");
}

pub(crate) fn progress_done() {
    eprintln!();
}
