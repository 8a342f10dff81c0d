//! Logging with `tracing` (human or JSON) and the process-wide Prometheus recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Libraries that log whole messages at their most detailed levels, and the level they are
/// held to whatever `RUST_LOG` asks: their messages carry user tokens (a WebSocket `subscribe`
/// frame) and admin keys. Tokens, keys and emails never reach the logs at any level
/// (README "Security"); `security::tokens_keys_and_emails_never_appear_in_the_logs_even_at_trace_level`
/// runs the whole pipeline at `RUST_LOG=trace` to check it.
const PAYLOAD_LOGGING_TARGETS: &[&str] = &["tungstenite=debug", "tokio_tungstenite=debug"];

/// Installs the global subscriber: `RUST_LOG` if set, else `log.level`, with the libraries of
/// [`PAYLOAD_LOGGING_TARGETS`] held below trace; JSON when `log.format = "json"`. Calling it
/// again is harmless.
pub fn init_tracing(settings: &LogSettings) {
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    for directive in PAYLOAD_LOGGING_TARGETS {
        filter = filter.add_directive(
            directive
                .parse()
                .expect("the payload-logging directives are valid"),
        );
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _already_set = if settings.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The process's Prometheus recorder, installed on first use.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .expect("the Prometheus recorder is installed once, guarded by OnceLock")
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
