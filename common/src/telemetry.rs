//! Logging with `tracing` (human or JSON) and the process-wide Prometheus recorder.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Libraries that log whole messages at trace level, which is never let through whatever
/// `RUST_LOG` asks: their messages carry user tokens (a WebSocket `subscribe` frame) and admin
/// keys. Tokens, keys and emails never reach the logs at any level (README "Security");
/// `security::tokens_keys_and_emails_never_appear_in_the_logs_even_at_trace_level` runs the
/// whole pipeline at `RUST_LOG=trace` to check it.
const PAYLOAD_LOGGING_TARGETS: &[&str] = &["tungstenite", "tokio_tungstenite"];

/// Whether an event or span may be logged at all: not at trace level from a library of
/// [`PAYLOAD_LOGGING_TARGETS`]. A cap, not a level: it lowers what `RUST_LOG` allows there and
/// never raises it.
fn may_log(meta: &tracing::Metadata<'_>) -> bool {
    *meta.level() < tracing::Level::TRACE
        || !PAYLOAD_LOGGING_TARGETS.iter().any(|target| {
            meta.target()
                .strip_prefix(target)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
}

/// Installs the global subscriber: `RUST_LOG` if set, else `log.level`, never trace from the
/// libraries of [`PAYLOAD_LOGGING_TARGETS`]; JSON when `log.format = "json"`. Calling it again
/// is harmless.
pub fn init_tracing(settings: &LogSettings) {
    use tracing_subscriber::filter::{filter_fn, FilterExt};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&settings.level))
        .and(filter_fn(may_log));
    let layer = if settings.format == "json" {
        tracing_subscriber::fmt::layer()
            .json()
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().with_filter(filter).boxed()
    };
    let _already_set = tracing_subscriber::registry().with(layer).try_init();
}

/// How often the recorder's histogram samples are folded into their summaries, whether or not
/// anyone scrapes `/metrics` (a scrape folds them in too). The library's own default, in seconds.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process's Prometheus recorder, installed on first use, with its upkeep thread.
///
/// A histogram keeps each sample it records (about 16 bytes, the value and when) until upkeep
/// or a scrape folds it into its summary, whose size is fixed. `install_recorder` leaves upkeep
/// to the caller, so without the thread a process that nobody scrapes grows for as long as it
/// runs: the worker records two samples a batch (docs/perf.md "Worker memory").
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .install_recorder()
                .expect("the Prometheus recorder is installed once, guarded by OnceLock");
            let upkeep = handle.clone();
            let started = std::thread::Builder::new()
                .name("metrics-upkeep".to_owned())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                });
            if let Err(e) = started {
                tracing::warn!(error = %e, "no metrics upkeep thread: histogram samples are kept until /metrics is scraped");
            }
            handle
        })
        .clone()
}

/// Logs a loud warning when the built-in development secrets are in use.
pub fn warn_on_development_secrets(settings: &crate::Settings) {
    if settings.uses_development_secrets() {
        tracing::warn!(
            "USING DEVELOPMENT SECRETS: set auth.token_secret, auth.admin_token and auth.producer_token \
             (UPLINE__AUTH__…) before exposing this service"
        );
    }
}
