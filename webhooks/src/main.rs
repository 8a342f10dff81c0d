//! `upline-webhooks`: see the crate docs.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = upline_common::Settings::load()?;
    upline_common::telemetry::init_tracing(&settings.log);
    upline_common::telemetry::warn_on_development_secrets(&settings);
    let listener = tokio::net::TcpListener::bind(settings.webhooks.bind).await?;
    upline_webhooks::run(settings, listener, upline_common::shutdown::signal()).await
}
