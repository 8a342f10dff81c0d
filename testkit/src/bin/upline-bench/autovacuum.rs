//! Benchmarks run with autovacuum on. Without it the hot tables bloat without end (the
//! insert-then-delete `earning_outbox`, `commission_holds`, and the `users` rows the ledger
//! updates with every batch), and a long run measures the bloat rather than upline. The test
//! servers of this project run with `autovacuum = off` (a CI setting), so every scenario checks
//! the server first: it turns autovacuum on for the run and resets it afterwards, or, with
//! `--keep-autovacuum-setting`, refuses to run while it is off.

use anyhow::{bail, Context};
use sqlx::{Connection, PgConnection};
use upline_common::Settings;

/// What the run changed, to undo afterwards.
pub struct Autovacuum {
    /// The maintenance database of the server, when the run turned autovacuum on.
    turned_on: Option<String>,
}

impl Autovacuum {
    /// Checks `autovacuum` on the server of `settings.database.url`; turns it on (`ALTER
    /// SYSTEM`, then `pg_reload_conf()`) unless `keep_setting`.
    ///
    /// # Errors
    /// The server cannot be reached; autovacuum is off and `keep_setting`; or it is off and
    /// this user may not change it.
    pub async fn ensure_on(settings: &Settings, keep_setting: bool) -> anyhow::Result<Self> {
        let mut url = url::Url::parse(&settings.database.url).context("database.url")?;
        url.set_path("postgres");
        let url = url.to_string();
        let mut conn = PgConnection::connect(&url)
            .await
            .context("connecting to PostgreSQL to check autovacuum")?;
        let setting: String = sqlx::query_scalar("show autovacuum")
            .fetch_one(&mut conn)
            .await?;
        if setting == "on" {
            eprintln!("autovacuum: on");
            return Ok(Autovacuum { turned_on: None });
        }
        if keep_setting {
            bail!(
                "autovacuum is off on this PostgreSQL server: the hot tables would bloat and the \
                 figures would measure the bloat. Turn it on (ALTER SYSTEM SET autovacuum = on; \
                 SELECT pg_reload_conf();) or run without --keep-autovacuum-setting, which turns \
                 it on for the run"
            );
        }
        sqlx::query("alter system set autovacuum = on")
            .execute(&mut conn)
            .await
            .context(
                "autovacuum is off and this user may not turn it on (ALTER SYSTEM needs a \
                 superuser): ask for ALTER SYSTEM SET autovacuum = on; SELECT pg_reload_conf();",
            )?;
        sqlx::query("select pg_reload_conf()")
            .execute(&mut conn)
            .await?;
        eprintln!("autovacuum: was off; turned on for this run (ALTER SYSTEM), reset afterwards");
        Ok(Autovacuum {
            turned_on: Some(url),
        })
    }

    /// Resets what [`Autovacuum::ensure_on`] changed (`ALTER SYSTEM RESET autovacuum`).
    pub async fn restore(self) {
        let Some(url) = self.turned_on else {
            return;
        };
        let reset = async {
            let mut conn = PgConnection::connect(&url).await?;
            sqlx::query("alter system reset autovacuum")
                .execute(&mut conn)
                .await?;
            sqlx::query("select pg_reload_conf()")
                .execute(&mut conn)
                .await?;
            Ok::<_, sqlx::Error>(())
        };
        match reset.await {
            Ok(()) => eprintln!("autovacuum: setting reset to the server's configuration"),
            Err(e) => eprintln!(
                "autovacuum: could not reset the setting ({e}); run ALTER SYSTEM RESET autovacuum; \
                 SELECT pg_reload_conf();"
            ),
        }
    }
}
