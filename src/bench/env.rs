//! A benchmark's environment: its own database and RabbitMQ vhost, services started as
//! separate processes of this binary (so each one's CPU can be measured), and CPU sampling
//! from `/proc`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::Rng;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use upline_common::Settings;

use crate::rabbit_admin;

/// A service process started by a benchmark.
pub struct Service {
    pub name: String,
    pub pid: u32,
    /// `http://127.0.0.1:<port>` (health, metrics; the api's and notifier's own endpoints).
    pub base: String,
    child: Child,
}

/// A fresh database and vhost, and the services running on them.
pub struct BenchEnv {
    pub settings: Settings,
    pub db: PgPool,
    pub http: reqwest::Client,
    pub services: Vec<Service>,
    db_name: String,
    vhost: String,
    keep: bool,
}

impl BenchEnv {
    /// Creates database `upline_bench_<label>_<random>` and a vhost of the same name, migrated
    /// and with the topology declared.
    ///
    /// # Errors
    /// PostgreSQL or RabbitMQ unreachable.
    pub async fn new(base: &Settings, label: &str, keep: bool) -> anyhow::Result<Self> {
        let name = format!(
            "upline_bench_{label}_{:08x}",
            rand::thread_rng().gen::<u32>()
        );
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build()?;
        rabbit_admin::create_vhost(&http, &name)
            .await
            .context("creating the benchmark's vhost (is RabbitMQ running?)")?;
        let mut settings = base.clone();
        // The same server and parameters (`?sslmode=…`), another database.
        let mut url = url::Url::parse(&settings.database.url).context("database.url")?;
        url.set_path(&name);
        settings.database.url = url.to_string();
        settings.database.max_connections = 32;
        settings.amqp.url = rabbit_admin::vhost_url(&base.amqp.url, &name);
        let db =
            upline_common::db::connect_and_migrate(&settings.database, &CancellationToken::new())
                .await?;
        let conn = upline_common::amqp::connect(&settings.amqp, "upline-bench").await?;
        let channel = conn.create_channel().await?;
        upline_common::amqp::declare_topology(&channel).await?;
        conn.close(200, "topology declared").await?;
        Ok(BenchEnv {
            settings,
            db,
            http,
            services: Vec::new(),
            db_name: name.clone(),
            vhost: name,
            keep,
        })
    }

    /// Starts `upline <kind>` (api, worker or notifier) with `extra` environment; waits until
    /// it is ready.
    ///
    /// # Errors
    /// The process does not start or never becomes ready.
    pub async fn start(
        &mut self,
        kind: &str,
        extra: &[(&str, String)],
    ) -> anyhow::Result<&Service> {
        let port = free_port()?;
        let s = &self.settings;
        let bind_key = format!("UPLINE__{}__BIND", kind.to_uppercase());
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg(kind)
            .env("DATABASE_URL", &s.database.url)
            .env("AMQP_URL", &s.amqp.url)
            .env("UPLINE__AMQP__TLS_CA_FILE", &s.amqp.tls_ca_file)
            .env(bind_key, format!("127.0.0.1:{port}"))
            .env(
                "UPLINE__AUTH__TOKEN_SECRET",
                s.auth.token_secret.expose_secret(),
            )
            .env(
                "UPLINE__AUTH__ADMIN_TOKEN",
                s.auth.admin_token.expose_secret(),
            )
            .env(
                "UPLINE__AUTH__PRODUCER_TOKEN",
                s.auth.producer_token.expose_secret(),
            )
            .env("UPLINE__APP__ENVIRONMENT", &s.app.environment)
            // Abuse limits off: the load comes from one address on purpose.
            .env("UPLINE__LIMITS__ENABLED", "false")
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting upline {kind}"))?;
        let pid = child.id().context("the child has a pid")?;
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self.http.get(format!("{base}/readyz")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("upline {kind} did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let n = self
            .services
            .iter()
            .filter(|s| s.name.starts_with(kind))
            .count();
        self.services.push(Service {
            name: format!("{kind}-{}", n + 1),
            pid,
            base,
            child,
        });
        Ok(self.services.last().expect("just pushed"))
    }

    /// The first service of a kind.
    pub fn service(&self, kind: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name.starts_with(kind))
    }

    /// CPU seconds used so far: each service, plus PostgreSQL and RabbitMQ.
    pub fn cpu(&self) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = self
            .services
            .iter()
            .map(|s| (s.name.clone(), process_cpu(s.pid)))
            .collect();
        out.push(("postgres".into(), cpu_by_command("postgres")));
        out.push(("rabbitmq".into(), cpu_by_command("beam.smp")));
        out
    }

    /// Stops the services (SIGTERM) and removes the database and vhost unless kept.
    pub async fn finish(mut self) {
        for s in &mut self.services {
            if let Some(pid) = s.child.id() {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status()
                    .await;
            }
            if tokio::time::timeout(Duration::from_secs(15), s.child.wait())
                .await
                .is_err()
            {
                let _ = s.child.kill().await;
            }
        }
        self.db.close().await;
        if self.keep {
            println!("kept database and vhost {}", self.db_name);
            return;
        }
        let server = self
            .settings
            .database
            .url
            .rsplit_once('/')
            .map_or("", |(s, _)| s)
            .to_owned();
        if let Ok(admin) = PgPool::connect(&format!("{server}/postgres")).await {
            let _ = sqlx::query(&format!(
                r#"drop database if exists "{}" with (force)"#,
                self.db_name
            ))
            .execute(&admin)
            .await;
        }
        rabbit_admin::delete_vhost(&self.http, &self.vhost).await;
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU seconds (user + system) of one process.
pub fn process_cpu(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_cpu(&s))
        .unwrap_or(0.0)
}

/// CPU seconds of every process whose command name is `comm`, children included.
pub fn cpu_by_command(comm: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|s| {
            s.split_once(" (")
                .and_then(|(_, r)| r.split_once(')'))
                .is_some_and(|(c, _)| c == comm)
        })
        .filter_map(|s| stat_cpu(&s))
        .sum()
}

fn stat_cpu(stat: &str) -> Option<f64> {
    // Fields after "(comm)": state is field 3; utime 14, stime 15, cutime 16, cstime 17.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..15)?
        .iter()
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    Some(ticks / TICKS)
}

/// Resident memory of a process, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU used between two samples, as cores busy over `wall` (1.0 = one core fully busy).
pub fn cpu_report(before: &[(String, f64)], after: &[(String, f64)], wall: Duration) -> String {
    let before: HashMap<&str, f64> = before.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    after
        .iter()
        .map(|(name, c)| {
            format!(
                "{name} {:.2}",
                (c - before.get(name.as_str()).copied().unwrap_or(0.0)) / wall.as_secs_f64()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Seeds `n` users as a complete 8-ary referral tree (user 1 the root; user i referred by
/// user (i-2)/8+1), in one statement.
///
/// # Errors
/// Database errors.
pub async fn seed_tree(db: &PgPool, n: i64) -> anyhow::Result<()> {
    sqlx::query(
        r#"insert into users (id, name, email, referral_code, referrer_id, direct_referrals)
           select i, 'User ' || i, 'user' || i || '@bench.example', 'B' || lpad(to_hex(i), 10, '0'),
                  case when i = 1 then null else (i - 2) / 8 + 1 end,
                  greatest(0, least(8, $1 - (8 * (i - 1) + 1)))
           from generate_series(1, $1::int8) i"#,
    )
    .bind(n)
    .execute(db)
    .await?;
    sqlx::query("select setval(pg_get_serial_sequence('users', 'id'), $1)")
        .bind(n)
        .execute(db)
        .await?;
    sqlx::query("analyze users").execute(db).await?;
    Ok(())
}
