//! Command-line interface of the `upline` binary.

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use upline_common::Settings;

/// upline: multi-level referral commissions over RabbitMQ and PostgreSQL.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run api, worker, notifier and webhooks service in this process (database created and migrated, broker
    /// topology declared). Stops gracefully on Ctrl-C or SIGTERM.
    Run,
    /// Create the database if missing and apply pending migrations.
    Migrate,
    /// Drive a realistic referral forest and purchase stream through the running pipeline and
    /// check what was paid (runs the development tool `upline-demo`, which a checkout builds
    /// with `scripts/demo`; it is not part of this binary). Arguments go to `upline-demo`.
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Inspect and replay dead-lettered purchase messages (`upline.purchases.dead`).
    #[command(subcommand)]
    Dlq(crate::dlq::DlqCommand),
    /// Run only the api (same as `upline-api`).
    Api,
    /// Run only a worker (same as `upline-worker`).
    Worker,
    /// Run only a notifier (same as `upline-notifier`).
    Notifier,
    /// Run only a webhooks service (same as `upline-webhooks`).
    Webhooks,
}

/// Executes a parsed command line.
///
/// # Errors
/// Configuration, start-up or service errors, with context.
pub async fn main(cli: Cli) -> anyhow::Result<()> {
    if let Command::Demo { args } = &cli.command {
        return run_demo(args);
    }
    let mut settings = Settings::load()?;
    if matches!(cli.command, Command::Dlq(_)) {
        // The operator's command prints its own report; only warnings from the libraries.
        settings.log.level = "warn,sqlx=error".into();
    }
    upline_common::telemetry::init_tracing(&settings.log);
    if !matches!(cli.command, Command::Migrate | Command::Dlq(_)) {
        upline_common::telemetry::warn_on_development_secrets(&settings);
    }
    let shutdown = upline_common::shutdown::signal();
    match cli.command {
        Command::Run => run_all(settings, shutdown).await,
        Command::Migrate => {
            let pool =
                upline_common::db::connect_and_migrate(&settings.database, &shutdown).await?;
            let applied =
                sqlx::query_scalar!(r#"select count(*) as "count!" from _sqlx_migrations"#)
                    .fetch_one(&pool)
                    .await?;
            println!("database ready: {applied} migration(s) applied");
            Ok(())
        }
        Command::Dlq(command) => crate::dlq::run(&settings, command).await,
        Command::Demo { .. } => unreachable!("handled before the settings are loaded"),
        Command::Api => {
            let listener = bind(settings.api.bind, "api.bind").await?;
            upline_api::run(settings, listener, shutdown).await
        }
        Command::Worker => {
            let listener = bind(settings.worker.bind, "worker.bind").await?;
            upline_worker::run(settings, listener, shutdown).await
        }
        Command::Notifier => {
            let listener = bind(settings.notifier.bind, "notifier.bind").await?;
            upline_notifier::run(settings, listener, shutdown).await
        }
        Command::Webhooks => {
            let listener = bind(settings.webhooks.bind, "webhooks.bind").await?;
            upline_webhooks::run(settings, listener, shutdown).await
        }
    }
}

/// Runs `upline-demo` from beside this binary (or from `PATH`) with `args`, as `git` runs its
/// external commands: the demo lives in the development test kit, which this binary does not
/// contain (README "Layout").
///
/// # Errors
/// `upline-demo` cannot be found or started, or it exits unsuccessfully.
fn run_demo(args: &[std::ffi::OsString]) -> anyhow::Result<()> {
    const DEMO: &str = "upline-demo";
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(DEMO)))
        .filter(|path| path.is_file());
    let program = beside.map_or_else(|| DEMO.into(), std::path::PathBuf::into_os_string);
    let status = std::process::Command::new(&program)
        .args(args)
        .status()
        .with_context(|| {
            format!(
                "running {DEMO}: it is a development tool, not part of this binary; from a \
                 checkout run scripts/demo, or build it with \
                 `cargo build --release -p upline-testkit --bin {DEMO}`"
            )
        })?;
    anyhow::ensure!(status.success(), "{DEMO} failed ({status})");
    Ok(())
}

async fn bind(addr: std::net::SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {key} = {addr}"))
}

/// Runs the four services side by side until `shutdown` fires or one of them fails (then
/// the others are stopped too).
///
/// # Errors
/// The first service error.
pub async fn run_all(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Create and migrate once, before the services race to do it.
    upline_common::db::connect_and_migrate(&settings.database, &shutdown)
        .await?
        .close()
        .await;
    let api = bind(settings.api.bind, "api.bind").await?;
    let worker = bind(settings.worker.bind, "worker.bind").await?;
    let notifier = bind(settings.notifier.bind, "notifier.bind").await?;
    let webhooks = bind(settings.webhooks.bind, "webhooks.bind").await?;
    println!(
        "upline running: api http://{}  notifier ws://{}/ws  worker health http://{}/healthz  webhooks health http://{}/healthz  (Ctrl-C stops)",
        api.local_addr()?,
        notifier.local_addr()?,
        worker.local_addr()?,
        webhooks.local_addr()?
    );
    let mut services = JoinSet::new();
    services.spawn(named(
        "api",
        upline_api::run(settings.clone(), api, shutdown.clone()),
    ));
    services.spawn(named(
        "worker",
        upline_worker::run(settings.clone(), worker, shutdown.clone()),
    ));
    services.spawn(named(
        "notifier",
        upline_notifier::run(settings.clone(), notifier, shutdown.clone()),
    ));
    services.spawn(named(
        "webhooks",
        upline_webhooks::run(settings, webhooks, shutdown.clone()),
    ));
    let mut first_error = None;
    while let Some(joined) = services.join_next().await {
        let result = joined.context("service task panicked").and_then(|r| r);
        if let Err(e) = result {
            tracing::error!(
                error = format!("{e:#}"),
                "service failed; stopping the others"
            );
            shutdown.cancel();
            first_error.get_or_insert(e);
        } else if !shutdown.is_cancelled() {
            shutdown.cancel();
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn named(
    name: &'static str,
    service: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    service.await.with_context(|| format!("{name} service"))
}
