//! A benchmark's environment: its own sandbox (database and RabbitMQ vhost), services started
//! as separate processes of the `upline` binary (so each one's CPU can be measured), and CPU
//! sampling from `/proc`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use sqlx::PgPool;
use tokio_tungstenite::tungstenite::Message;
use upline_common::protocol::{ServerMessage, Subscribe};
use upline_common::Settings;
use upline_testkit::pipeline::metric_value;
use upline_testkit::rabbit::RabbitAdmin;
use upline_testkit::sandbox::Sandbox;
use upline_testkit::spawn::{self, ServiceCommand};

/// What every scenario starts from: the configured settings (servers, secrets, rules) and the
/// RabbitMQ management API its vhost is made with.
#[derive(Clone, Copy)]
pub struct Bench<'a> {
    pub settings: &'a Settings,
    pub rabbit: &'a RabbitAdmin,
}

/// A service process started by a benchmark.
pub struct Service {
    pub name: String,
    pub pid: u32,
    /// `http://127.0.0.1:<port>` (health, metrics; the api's and notifier's own endpoints).
    pub base: String,
    process: spawn::Service,
}

/// A fresh database and vhost, and the services running on them.
pub struct BenchEnv {
    pub settings: Settings,
    pub db: PgPool,
    pub http: reqwest::Client,
    pub services: Vec<Service>,
    sandbox: Sandbox,
    binary: PathBuf,
    keep: bool,
}

impl BenchEnv {
    /// Creates database and vhost `upline_bench_<label>_<random>`, migrated and with the
    /// topology declared.
    ///
    /// # Errors
    /// PostgreSQL or RabbitMQ unreachable, or no `upline` binary next to this one.
    pub async fn new(bench: Bench<'_>, label: &str, keep: bool) -> anyhow::Result<Self> {
        let binary = spawn::upline_binary()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build()?;
        let mut sandbox = Sandbox::create(
            bench.settings,
            bench.rabbit,
            &format!("upline_bench_{label}"),
        )
        .await?;
        sandbox.settings.database.max_connections = 32;
        let db = sandbox.migrate().await?;
        sandbox.declare_topology().await?;
        Ok(BenchEnv {
            settings: sandbox.settings.clone(),
            db,
            http,
            services: Vec::new(),
            sandbox,
            binary,
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
        let mut command = ServiceCommand::new(&self.binary, kind)
            .settings(&self.settings)
            // Abuse limits off: the load comes from one address on purpose.
            .env("UPLINE__LIMITS__ENABLED", "false");
        for (k, v) in extra {
            command = command.env(k, v.clone());
        }
        let mut process = command.spawn()?;
        let pid = process.pid().context("the child has a pid")?;
        process
            .wait_ready(&self.http, Duration::from_secs(60))
            .await
            .with_context(|| format!("upline {kind}"))?;
        let n = self
            .services
            .iter()
            .filter(|s| s.name.starts_with(kind))
            .count();
        self.services.push(Service {
            name: format!("{kind}-{}", n + 1),
            pid,
            base: process.base(),
            process,
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
        out.push(("bench".into(), process_cpu(std::process::id())));
        out.push((MACHINE.into(), machine_busy()));
        out
    }

    /// The purchase batches the workers have written so far, from each worker's
    /// `upline_batch_size` summary on `/metrics`: (batches, purchases in them). A worker
    /// that has written no batch yet (a standby, docs/perf.md "Standby consumers") has no
    /// summary and counts 0.
    ///
    /// # Errors
    /// A worker's `/metrics` cannot be read, or has the summary without both values.
    pub async fn batches(&self) -> anyhow::Result<(f64, f64)> {
        let (mut batches, mut purchases) = (0.0, 0.0);
        for s in self
            .services
            .iter()
            .filter(|s| s.name.starts_with("worker"))
        {
            let text = self
                .http
                .get(format!("{}/metrics", s.base))
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            if !text.contains("upline_batch_size_count") {
                continue;
            }
            let value = |name: &str| {
                metric_value(&text, |l| l.starts_with(&format!("{name} ")))
                    .with_context(|| format!("{name} on {}/metrics", s.base))
            };
            batches += value("upline_batch_size_count")?;
            purchases += value("upline_batch_size_sum")?;
        }
        Ok((batches, purchases))
    }

    /// Stops the services (SIGTERM) and removes the database and vhost unless kept.
    pub async fn finish(mut self) {
        for s in &mut self.services {
            s.process.stop(Duration::from_secs(15)).await;
        }
        self.db.close().await;
        if self.keep {
            println!("kept database and vhost {}", self.sandbox.name());
            return;
        }
        if let Err(e) = self.sandbox.destroy().await {
            eprintln!("{e:#}");
        }
    }
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

/// The name of [`BenchEnv::cpu`]'s last entry: every process on the machine together.
const MACHINE: &str = "machine";

/// CPU seconds the whole machine spent busy, every core together (`/proc/stat`'s first line:
/// everything but idle and I/O wait).
fn machine_busy() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let ticks: Vec<f64> = s
                .lines()
                .next()?
                .strip_prefix("cpu ")?
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal (guest time is inside user).
            let busy: f64 = ticks.iter().take(8).sum::<f64>() - ticks.get(3)? - ticks.get(4)?;
            Some(busy / TICKS)
        })
        .unwrap_or(0.0)
}

/// The `/proc/<pid>` folders of every process whose command name is `comm`.
fn processes_named(comm: &str) -> Vec<std::path::PathBuf> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path())
        .filter(|p| std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim_end() == comm))
        .collect()
}

/// CPU seconds of every process whose command name is `comm`, children included.
pub fn cpu_by_command(comm: &str) -> f64 {
    processes_named(comm)
        .iter()
        .filter_map(|p| std::fs::read_to_string(p.join("stat")).ok())
        .filter_map(|s| stat_cpu(&s))
        .sum()
}

/// CPU seconds in a `/proc/<pid>/stat` (or `/proc/thread-self/stat`) line: user and system,
/// with those of waited-for children.
pub fn stat_cpu(stat: &str) -> Option<f64> {
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

/// Per thread of every process whose command name is `comm`: (seconds on a core, seconds
/// waiting on a run queue for one), from `/proc/<pid>/task/<tid>/schedstat` (nanoseconds).
pub fn sched_by_command(comm: &str) -> HashMap<u32, (f64, f64)> {
    let mut out = HashMap::new();
    for process in processes_named(comm) {
        let Ok(tasks) = std::fs::read_dir(process.join("task")) else {
            continue;
        };
        for task in tasks.filter_map(Result::ok) {
            let tid = task.file_name().to_string_lossy().parse::<u32>();
            let stat = std::fs::read_to_string(task.path().join("schedstat"));
            if let (Ok(tid), Ok(stat)) = (tid, stat) {
                let mut f = stat
                    .split_whitespace()
                    .map(|n| n.parse::<f64>().unwrap_or(0.0));
                if let (Some(on), Some(waiting)) = (f.next(), f.next()) {
                    out.insert(tid, (on / 1e9, waiting / 1e9));
                }
            }
        }
    }
    out
}

/// Between two [`sched_by_command`] samples, over the threads alive at the second (those
/// started in between from zero; those ended in between are not counted): how long they
/// waited for a core per second they ran on one (`1.0` = as long waiting as running). A
/// thread waits when it is ready to run while others hold the cores, so on a machine with
/// cores to spare this is near 0.
pub fn run_queue_wait(before: &HashMap<u32, (f64, f64)>, after: &HashMap<u32, (f64, f64)>) -> f64 {
    let (on, waiting) = after
        .iter()
        .map(|(tid, (on, w))| {
            let (on0, w0) = before.get(tid).copied().unwrap_or_default();
            (on - on0, w - w0)
        })
        .fold((0.0, 0.0), |(a, b), (on, w)| (a + on, b + w));
    if on > 0.0 {
        waiting / on
    } else {
        0.0
    }
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

/// CPU used between two samples, as cores busy over `wall` (1.0 = one core fully busy): per
/// process (the bench's own load generator as `bench`), then the whole machine's busy cores
/// out of all it has, which says whether a run was bound by the cores.
pub fn cpu_report(before: &[(String, f64)], after: &[(String, f64)], wall: Duration) -> String {
    let before: HashMap<&str, f64> = before.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    let busy =
        |name: &str, c: f64| (c - before.get(name).copied().unwrap_or(0.0)) / wall.as_secs_f64();
    let processes = after
        .iter()
        .filter(|(name, _)| name != MACHINE)
        .map(|(name, c)| format!("{name} {:.2}", busy(name, *c)))
        .collect::<Vec<_>>()
        .join(", ");
    match after.iter().find(|(name, _)| name == MACHINE) {
        Some((_, c)) => format!(
            "{processes}; machine {:.2} of {} cores busy",
            busy(MACHINE, *c),
            std::thread::available_parallelism().map_or(1, usize::from)
        ),
        None => processes,
    }
}

/// Seeds `n` users as a complete 8-ary referral tree (user 1 the root; user i referred by
/// user (i-2)/8+1), in one statement.
///
/// # Errors
/// Database errors.
pub async fn seed_tree(db: &PgPool, n: i64) -> anyhow::Result<()> {
    seed_forest(db, n, 1).await
}

/// Seeds `trees` referral trees of `n / trees` users each (the last one takes what is left):
/// tree k holds the users `k * m + 1 ..= (k + 1) * m`, where m is `n / trees` rounded up, with
/// user `k * m + 1` at its root and each user referring 8 more, as [`seed_tree`] does for one.
/// An earner's downline then stays in its tree: [`forest_tree`] is the tree of a buyer and of
/// every earner it pays.
///
/// # Errors
/// `trees` outside 1..=`n`; database errors.
pub async fn seed_forest(db: &PgPool, n: i64, trees: i64) -> anyhow::Result<()> {
    anyhow::ensure!(trees >= 1 && trees <= n, "between 1 and {n} trees");
    sqlx::query(
        r#"insert into users (id, name, email, referral_code, referrer_id, direct_referrals)
           select i, 'User ' || i, 'user' || i || '@bench.example', 'B' || lpad(to_hex(i), 10, '0'),
                  case when j = 1 then null else k * m + (j - 2) / 8 + 1 end,
                  greatest(0, least(8, least(m, $1 - k * m) - (8 * (j - 1) + 1)))
           from (select i, (i - 1) / m as k, (i - 1) % m + 1 as j, m
                 from generate_series(1, $1::int8) i,
                      (select ($1::int8 + $2::int8 - 1) / $2::int8 as m) size) t"#,
    )
    .bind(n)
    .bind(trees)
    .execute(db)
    .await?;
    sqlx::query("select setval(pg_get_serial_sequence('users', 'id'), $1)")
        .bind(n)
        .execute(db)
        .await?;
    sqlx::query("analyze users").execute(db).await?;
    Ok(())
}

/// The tree of [`seed_forest`]`(_, n, trees)` that user `id` is in: 0 to `trees - 1`.
pub fn forest_tree(id: i64, n: i64, trees: i64) -> usize {
    let m = (n + trees - 1) / trees;
    usize::try_from((id - 1) / m).expect("ids start at 1")
}

/// A WebSocket client of the notifier.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to `url`, sends `subscribe`, and waits for the `subscribed` answer.
///
/// # Errors
/// The connection fails, or the notifier answers anything else (an error frame, a close).
pub async fn subscribe(url: &str, subscribe: &Subscribe) -> anyhow::Result<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    ws.send(Message::Text(subscribe.to_text().into())).await?;
    match ws.next().await {
        Some(Ok(Message::Text(t)))
            if matches!(
                serde_json::from_str(&t),
                Ok(ServerMessage::Subscribed { .. })
            ) =>
        {
            Ok(ws)
        }
        other => anyhow::bail!("subscription refused: {other:?}"),
    }
}

/// `batches` of [`BenchEnv::batches`] as a report line: how many, and their mean size.
pub fn batch_report((batches, purchases): (f64, f64)) -> String {
    if batches == 0.0 {
        return "none recorded".to_owned();
    }
    format!(
        "{batches:.0} batches, {:.1} purchases each on average",
        purchases / batches
    )
}
