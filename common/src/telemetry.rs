//! Logging with `tracing` (human or JSON) and the process-wide Prometheus recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Installs the global subscriber: `RUST_LOG` if set, else `log.level`; JSON when
/// `log.format = "json"`. Calling it again is harmless.
pub fn init_tracing(settings: &LogSettings) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
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
