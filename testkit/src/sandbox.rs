//! A sandbox: a fresh PostgreSQL database and a fresh RabbitMQ vhost of the same unique name on
//! the servers of some base settings, the settings pointing at them, and their removal. Every
//! end-to-end test app and every benchmark scenario runs in one, isolated from the others and
//! from a pipeline running on the same servers.

use anyhow::Context;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use upline_common::Settings;

use crate::rabbit::{vhost_url, RabbitAdmin};

/// A database and a vhost named [`Sandbox::name`]; removed by [`Sandbox::destroy`] (not on
/// drop: that needs the runtime).
pub struct Sandbox {
    /// The base settings with `database.url` and `amqp.url` pointing at the sandbox; adjust
    /// the rest freely before starting services with them.
    pub settings: Settings,
    name: String,
    /// The same server's `postgres` database, from which the sandbox's is dropped.
    maintenance_url: String,
    rabbit: RabbitAdmin,
}

impl Sandbox {
    /// Creates the vhost `<prefix>_<random>` through `rabbit` and points a copy of `base` at
    /// it and at the database of the same name on `base`'s PostgreSQL server (same user and
    /// parameters). The database itself is created by [`Sandbox::migrate`] (or by the first
    /// service that starts).
    ///
    /// # Errors
    /// `base.database.url` is not a URL, or the vhost cannot be created.
    pub async fn create(
        base: &Settings,
        rabbit: &RabbitAdmin,
        prefix: &str,
    ) -> anyhow::Result<Self> {
        let name = crate::unique(prefix);
        let mut url = url::Url::parse(&base.database.url).context("database.url")?;
        url.set_path(&name);
        let mut maintenance = url.clone();
        maintenance.set_path("postgres");
        rabbit
            .create_vhost(&name)
            .await
            .with_context(|| format!("creating vhost {name} (is RabbitMQ running?)"))?;
        let mut settings = base.clone();
        settings.database.url = url.to_string();
        settings.amqp.url = vhost_url(&base.amqp.url, &name);
        Ok(Sandbox {
            settings,
            name,
            maintenance_url: maintenance.to_string(),
            rabbit: rabbit.clone(),
        })
    }

    /// The database's and the vhost's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The management client the vhost was made with.
    pub fn rabbit(&self) -> &RabbitAdmin {
        &self.rabbit
    }

    /// Creates the database if needed and applies the migrations; a pool of
    /// `settings.database.max_connections`.
    ///
    /// # Errors
    /// PostgreSQL unreachable, or a migration fails.
    pub async fn migrate(&self) -> anyhow::Result<PgPool> {
        upline_common::db::connect_and_migrate(&self.settings.database, &CancellationToken::new())
            .await
    }

    /// Declares the broker topology (SPEC §3) in the vhost, as a worker would at start-up.
    ///
    /// # Errors
    /// RabbitMQ unreachable or refusing.
    pub async fn declare_topology(&self) -> anyhow::Result<()> {
        let conn = upline_common::amqp::connect(&self.settings.amqp, "upline-testkit").await?;
        upline_common::amqp::declare_topology(&conn).await?;
        conn.close(200, "topology declared").await?;
        Ok(())
    }

    /// Drops the database (terminating its sessions) and deletes the vhost.
    ///
    /// # Errors
    /// The database could not be dropped (the vhost is deleted anyway, best effort).
    pub async fn destroy(self) -> anyhow::Result<()> {
        let dropped = async {
            let admin = PgPool::connect(&self.maintenance_url).await?;
            sqlx::query(&format!(
                r#"drop database if exists "{}" with (force)"#,
                self.name
            ))
            .execute(&admin)
            .await?;
            admin.close().await;
            Ok::<_, sqlx::Error>(())
        }
        .await;
        self.rabbit.delete_vhost(&self.name).await;
        dropped.with_context(|| format!("dropping database {}", self.name))
    }
}
