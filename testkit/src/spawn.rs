//! The services as child processes of the `upline` binary (`upline api|worker|notifier`), for
//! tests that kill or restart one and for benchmarks that read each one's CPU from `/proc`.
//! A [`ServiceCommand`] says how to start one (it can start it again, on the same port); a
//! [`Service`] is one running, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use secrecy::ExposeSecret;
use tokio::process::{Child, Command};
use upline_common::Settings;

/// The `upline` binary: `$UPLINE_BIN`, else `upline` next to the running executable (where
/// cargo puts every binary of a build: `target/release/upline-bench` finds
/// `target/release/upline`). Tests pass `env!("CARGO_BIN_EXE_upline")` instead.
///
/// # Errors
/// Neither exists.
pub fn upline_binary() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("UPLINE_BIN") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()?.with_file_name("upline"),
    };
    if !path.is_file() {
        bail!(
            "the upline binary is not at {} (build it: `cargo build --release -p upline`, or set UPLINE_BIN)",
            path.display()
        );
    }
    Ok(path)
}

/// A free port on 127.0.0.1 (bound, then released for a service or server to take).
///
/// # Panics
/// No port can be bound.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local address")
        .port()
}

/// Where a service's output goes.
#[derive(Debug, Clone)]
pub enum Output {
    /// Standard output discarded, standard error shared with this process.
    Stderr,
    /// Standard output discarded, standard error piped (read it from [`Service::child`]).
    PipedStderr,
    /// Both appended to this file (a log kept across restarts).
    File(PathBuf),
}

/// How to start one service: `upline <kind>` listening on `127.0.0.1:<port>`, with
/// `RUST_LOG=warn` and whatever environment is added.
#[derive(Debug, Clone)]
pub struct ServiceCommand {
    binary: PathBuf,
    kind: String,
    port: u16,
    env: Vec<(String, String)>,
    output: Output,
}

impl ServiceCommand {
    /// `binary kind` (`api`, `worker` or `notifier`) on a free port.
    pub fn new(binary: &Path, kind: &str) -> Self {
        let port = free_port();
        ServiceCommand {
            binary: binary.to_owned(),
            kind: kind.to_owned(),
            port,
            env: vec![
                (
                    format!("UPLINE__{}__BIND", kind.to_uppercase()),
                    format!("127.0.0.1:{port}"),
                ),
                ("RUST_LOG".into(), "warn".into()),
            ],
            output: Output::Stderr,
        }
    }

    /// Sets an environment variable (a later value of the same name wins).
    #[must_use]
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// The connections and secrets of `settings`: `DATABASE_URL`, `AMQP_URL`,
    /// `amqp.tls_ca_file`, the three `auth` secrets and `app.environment`.
    #[must_use]
    pub fn settings(self, s: &Settings) -> Self {
        self.env("DATABASE_URL", &s.database.url)
            .env("AMQP_URL", &s.amqp.url)
            .env("UPLINE__AMQP__TLS_CA_FILE", &s.amqp.tls_ca_file)
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
    }

    /// Where its output goes (default [`Output::Stderr`]).
    #[must_use]
    pub fn output(mut self, output: Output) -> Self {
        self.output = output;
        self
    }

    /// Its kind (`api`, `worker`, `notifier`).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The port it listens on (the same on every start).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`: health, metrics, and the api's or notifier's endpoints.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts it.
    ///
    /// # Errors
    /// The binary cannot be run, or the log file cannot be opened.
    pub fn spawn(&self) -> anyhow::Result<Service> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg(&self.kind)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        match &self.output {
            Output::Stderr => {
                cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
            }
            Output::PipedStderr => {
                cmd.stdout(Stdio::null()).stderr(Stdio::piped());
            }
            Output::File(path) => {
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                cmd.stdout(log.try_clone()?).stderr(log);
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} {}", self.binary.display(), self.kind))?;
        Ok(Service {
            kind: self.kind.clone(),
            port: self.port,
            child,
        })
    }
}

/// A running service; killed (SIGKILL) on drop if still running.
#[derive(Debug)]
pub struct Service {
    kind: String,
    port: u16,
    child: Child,
}

impl Service {
    /// Its kind (`api`, `worker`, `notifier`).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its process id (`None` once it has been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The child process (its piped standard error, `try_wait`, …).
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits until `/readyz` answers 200.
    ///
    /// # Errors
    /// The process exited first, or `within` passed.
    pub async fn wait_ready(
        &mut self,
        http: &reqwest::Client,
        within: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", self.base())).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("{} exited ({status}) before it was ready", self.kind);
            }
            if Instant::now() > deadline {
                bail!("{} not ready within {within:?}", self.kind);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and waits for the process to exit; its exit status.
    ///
    /// # Errors
    /// `kill` fails, or the process is still running after `within`.
    pub async fn sigterm(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        let pid = self.child.id().context("the service has already exited")?;
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .context("running kill")?;
        if !sent.success() {
            bail!("kill -TERM {pid} failed");
        }
        tokio::time::timeout(within, self.child.wait())
            .await
            .with_context(|| format!("{} still running {within:?} after SIGTERM", self.kind))?
            .context("waiting for the child")
    }

    /// Stops it gracefully (SIGTERM), or with SIGKILL when it does not exit within `within`.
    pub async fn stop(&mut self, within: Duration) {
        if self.sigterm(within).await.is_err() {
            self.kill().await;
        }
    }

    /// SIGKILL, and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}
