//! Throwaway servers of a test's own, for tests that must restart, reconfigure or break a
//! server without touching the shared PostgreSQL (5432) and RabbitMQ (5672/15672) every other
//! test uses: a PostgreSQL 15 cluster (initdb/pg_ctl as the OS user `postgres`) and a RabbitMQ
//! node (its own node name, ports, directories, and HOME with its own Erlang cookie), each on
//! random free ports of 127.0.0.1, plain TCP or TLS only. Every server is stopped by a drop
//! guard, also when a test fails, and every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::process::Command;

use crate::harness::free_port;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// `runuser -u postgres -- <PG_BIN>/<program>`: a PostgreSQL tool run as the OS user
/// `postgres`, which owns the test clusters.
fn as_postgres(program: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"])
        .arg(format!("{PG_BIN}/{program}"));
    cmd
}
pub const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";
/// How long any one step (a server start, a restart, a connection) may take.
pub const WAIT: Duration = Duration::from_secs(60);
/// How many times a RabbitMQ node is started before a port taken under it fails the test
/// ([`RabbitNode::start_with_cookie`]).
const BOOT_ATTEMPTS: u32 = 3;

/// A fresh directory under the system temp dir, readable by other users (the `postgres` user
/// must reach a cluster below it), removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        use std::os::unix::fs::PermissionsExt;
        let path =
            std::env::temp_dir().join(format!("{prefix}-{:016x}", rand::thread_rng().gen::<u64>()));
        std::fs::create_dir(&path).expect("create the temp dir");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A new subdirectory.
    pub fn sub(&self, name: &str) -> PathBuf {
        let dir = self.0.join(name);
        std::fs::create_dir(&dir).expect("create a subdirectory");
        dir
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a command to completion within [`WAIT`], panicking with its output when it fails.
pub async fn run(cmd: &mut Command, what: &str) -> String {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what}: still running after {WAIT:?}"))
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs a command to completion within [`WAIT`] without an async runtime (for drop guards),
/// killing it when it takes longer; whether it succeeded.
pub fn run_bounded(cmd: &mut std::process::Command) -> bool {
    let Ok(mut child) = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = Instant::now() + WAIT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// A server certificate and key (and the CA that signed them), for TLS-only servers.
pub struct ServerTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A throwaway PostgreSQL 15 cluster on 127.0.0.1, run as the OS user `postgres`, trusting
/// every local connection (TLS only when started with [`ServerTls`]); stopped (`-m
/// immediate`) on drop, before its directory goes.
pub struct PgCluster {
    pub data: PathBuf,
    pub port: u16,
    dir: PathBuf,
}

impl PgCluster {
    /// initdb and start a cluster in `dir` (which must exist and may be chowned to postgres).
    pub async fn start(dir: &Path, tls: Option<&ServerTls>) -> PgCluster {
        let data = dir.join("data");
        let port = free_port();
        let cluster = PgCluster {
            data: data.clone(),
            port,
            dir: dir.to_owned(),
        };
        run(
            Command::new("chown").arg("postgres:postgres").arg(dir),
            "chown the cluster dir to postgres",
        )
        .await;
        run(
            as_postgres("initdb")
                .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
                .args(["--locale=C", "-D"])
                .arg(&data),
            "initdb",
        )
        .await;
        let socket_dir = dir.join("socket");
        std::fs::create_dir(&socket_dir).expect("create the socket dir");
        let mut conf = format!(
            "\n# upline test cluster\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nfsync = off\nfull_page_writes = off\n",
            socket_dir.display(),
        );
        let hba = match tls {
            Some(tls) => {
                let cert = data.join("server.crt");
                let key = data.join("server.key");
                std::fs::copy(&tls.cert, &cert).expect("copy the server certificate");
                std::fs::copy(&tls.key, &key).expect("copy the server key");
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                        .expect("chmod 0600 the key");
                }
                conf.push_str(&format!(
                    "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nmax_connections = 20\n",
                    cert.display(),
                    key.display()
                ));
                // TLS only: a plain TCP connection matches no line and is refused.
                "hostssl all all 127.0.0.1/32 trust\n"
            }
            None => {
                // Three services and the test: room for everyone's pool.
                conf.push_str("max_connections = 60\n");
                // Replication too, for a standby ([`PgCluster::standby_of`]).
                "host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n"
            }
        };
        let mut postgresql_conf =
            std::fs::read_to_string(data.join("postgresql.conf")).expect("read postgresql.conf");
        postgresql_conf.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), postgresql_conf)
            .expect("write postgresql.conf");
        std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        run(
            Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(dir),
            "chown the cluster's files to postgres",
        )
        .await;
        cluster.pg_ctl(&["start"], "pg_ctl start").await;
        cluster
    }

    async fn pg_ctl(&self, action: &[&str], what: &str) {
        run(
            as_postgres("pg_ctl")
                .args(["-w", "-t", "50", "-D"])
                .arg(&self.data)
                .arg("-l")
                .arg(self.dir.join("postgres.log"))
                .args(action),
            what,
        )
        .await;
    }

    /// `pg_ctl restart -m fast`: every session is terminated, then the server comes back.
    pub async fn restart_fast(&self) {
        self.pg_ctl(&["-m", "fast", "restart"], "pg_ctl restart -m fast")
            .await;
    }

    /// `pg_ctl stop -m fast`: every session is terminated and the server stays down until
    /// [`PgCluster::start_again`].
    pub async fn stop_fast(&self) {
        self.pg_ctl(&["-m", "fast", "stop"], "pg_ctl stop -m fast")
            .await;
    }

    /// `pg_ctl start` after [`PgCluster::stop_fast`].
    pub async fn start_again(&self) {
        self.pg_ctl(&["start"], "pg_ctl start").await;
    }

    /// A hot standby of `primary` in `dir` (which must exist), by streaming replication:
    /// `pg_basebackup -R` from the primary, then started on a port of its own.
    pub async fn standby_of(primary: &PgCluster, dir: &Path) -> PgCluster {
        let data = dir.join("data");
        let port = free_port();
        let cluster = PgCluster {
            data: data.clone(),
            port,
            dir: dir.to_owned(),
        };
        let socket_dir = dir.join("socket");
        std::fs::create_dir(&socket_dir).expect("create the socket dir");
        run(
            Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(dir),
            "chown the standby dir to postgres",
        )
        .await;
        run(
            as_postgres("pg_basebackup")
                .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
                .args([
                    "-U",
                    "postgres",
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "--no-sync",
                    "-D",
                ])
                .arg(&data),
            "pg_basebackup",
        )
        .await;
        // The copied postgresql.conf names the primary's port and socket: later lines win.
        let mut conf =
            std::fs::read_to_string(data.join("postgresql.conf")).expect("read postgresql.conf");
        conf.push_str(&format!(
            "\n# standby\nport = {port}\nunix_socket_directories = '{}'\n",
            socket_dir.display()
        ));
        std::fs::write(data.join("postgresql.conf"), conf).expect("write postgresql.conf");
        cluster.pg_ctl(&["start"], "pg_ctl start (standby)").await;
        cluster
    }

    /// `pg_ctl promote`: a standby becomes a primary (waits until it accepts writes).
    pub async fn promote(&self) {
        self.pg_ctl(&["promote"], "pg_ctl promote").await;
    }

    /// `pg_ctl stop -m immediate`: the server dies as in a crash.
    pub async fn stop_immediate(&self) {
        self.pg_ctl(&["-m", "immediate", "stop"], "pg_ctl stop -m immediate")
            .await;
    }

    /// A URL for `database` on this cluster (as user `postgres`), with `query` (may be empty).
    pub fn url(&self, database: &str, query: &str) -> String {
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!(
            "postgres://postgres@localhost:{}/{database}{query}",
            self.port
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if !self.data.join("postmaster.pid").exists() {
            return; // never started, or already stopped
        }
        let stopped = run_bounded(
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(format!("{PG_BIN}/pg_ctl"))
                .args(["-w", "-t", "30", "-m", "immediate", "-D"])
                .arg(&self.data)
                .arg("stop"),
        );
        if !stopped {
            eprintln!(
                "pg_ctl stop of the test cluster {} failed",
                self.data.display()
            );
        }
    }
}

/// A throwaway RabbitMQ node (its own name, ports, directories and Erlang cookie) listening on
/// 127.0.0.1 for plain AMQP, or only for AMQP over TLS when started with [`ServerTls`]; no
/// plugins (management's port 15672 belongs to the shared node). Stopped on drop
/// (`rabbitmqctl stop`, then killed if still there).
pub struct RabbitNode {
    pub name: String,
    pub port: u16,
    /// Holds `home/` (with the node's own Erlang cookie), `mnesia/`, `log/`, the config.
    dir: PathBuf,
    server: tokio::process::Child,
}

impl RabbitNode {
    /// Starts a node in `dir` (which must exist) and waits until it has booted.
    pub async fn start(dir: &Path, tls: Option<&ServerTls>) -> RabbitNode {
        let cookie = format!("{:032X}", rand::thread_rng().gen::<u128>());
        Self::start_with_cookie(dir, tls, &cookie).await
    }

    /// Starts nodes in subdirectories of `dir`, all with one Erlang cookie, and joins each to
    /// the first (`rabbitmqctl join_cluster`): a cluster of `n` nodes on this machine.
    pub async fn start_cluster(dir: &TempDir, n: usize) -> Vec<RabbitNode> {
        let cookie = format!("{:032X}", rand::thread_rng().gen::<u128>());
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let node =
                Self::start_with_cookie(&dir.sub(&format!("rabbit-{i}")), None, &cookie).await;
            if let Some(first) = nodes.first() {
                let first: &RabbitNode = first;
                node.ctl_run(&["stop_app"]).await;
                node.ctl_run(&["join_cluster", &first.name]).await;
                node.ctl_run(&["start_app"]).await;
            }
            nodes.push(node);
        }
        for node in &mut nodes {
            node.await_startup().await;
        }
        nodes
    }

    /// [`RabbitNode::start`] with a given Erlang cookie (nodes of one cluster share theirs).
    ///
    /// The node's ports are picked free, then released for RabbitMQ to bind; a test running
    /// beside this one may take one in between, and the node then fails to boot with
    /// `eaddrinuse`. It is started again, with other ports, in a directory of its own, up to
    /// [`BOOT_ATTEMPTS`] times.
    pub async fn start_with_cookie(
        dir: &Path,
        tls: Option<&ServerTls>,
        cookie_value: &str,
    ) -> RabbitNode {
        let mut attempt = 1;
        loop {
            let dir = if attempt == 1 {
                dir.to_owned()
            } else {
                let again = dir.join(format!("attempt-{attempt}"));
                std::fs::create_dir(&again).expect("create a node dir for another attempt");
                again
            };
            let mut node = Self::spawn(&dir, tls, cookie_value);
            match node.boot().await {
                Ok(()) => return node,
                Err(log) if attempt < BOOT_ATTEMPTS && log.contains("eaddrinuse") => {
                    eprintln!(
                        "RabbitMQ node {} found its port taken (attempt {attempt}); starting it again on other ports",
                        node.name
                    );
                    attempt += 1;
                }
                Err(log) => panic!("{log}"),
            }
        }
    }

    /// Starts `rabbitmq-server` for a node in `dir`, on free ports, without waiting for it.
    fn spawn(dir: &Path, tls: Option<&ServerTls>, cookie_value: &str) -> RabbitNode {
        let name = format!(
            "upline-test-{:08x}@localhost",
            rand::thread_rng().gen::<u32>()
        );
        let (port, dist_port) = {
            // Both bound at once so that they differ.
            let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let b = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            (
                a.local_addr().expect("addr").port(),
                b.local_addr().expect("addr").port(),
            )
        };
        let home = dir.join("home");
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir(dir.join(sub)).expect("create a node dir");
        }
        // A cookie of its own in a HOME of its own: nothing of root's or of the shared node's
        // is read or written.
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, cookie_value).expect("write the cookie");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
                .expect("chmod the cookie");
        }
        std::fs::write(dir.join("enabled_plugins"), "").expect("write enabled_plugins");
        let config = match tls {
            Some(tls) => format!(
                "listeners.tcp = none\n\
                 listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                tls.ca.display(),
                tls.cert.display(),
                tls.key.display()
            ),
            None => format!("listeners.tcp.default = 127.0.0.1:{port}\n"),
        };
        std::fs::write(dir.join("rabbitmq.conf"), config).expect("write rabbitmq.conf");
        let log = std::fs::File::create(dir.join("server.out")).expect("create server.out");
        let mut cmd = Command::new(format!("{RABBITMQ_BIN}/rabbitmq-server"));
        cmd.env("HOME", &home)
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("node.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .kill_on_drop(true);
        let server = cmd.spawn().expect("start rabbitmq-server");
        RabbitNode {
            name,
            port,
            dir: dir.to_owned(),
            server,
        }
    }

    /// `rabbitmqctl -n <this node>`, with this node's HOME (and so its cookie).
    pub fn ctl(&self) -> Command {
        let mut cmd = Command::new(format!("{RABBITMQ_BIN}/rabbitmqctl"));
        cmd.env("HOME", self.dir.join("home"))
            .args(["-n", &self.name]);
        cmd
    }

    /// Runs `rabbitmqctl -n <node> <args>` within [`WAIT`]; its standard output.
    pub async fn ctl_run(&self, args: &[&str]) -> String {
        let what = format!("rabbitmqctl {}", args.join(" "));
        run(self.ctl().args(args), &what).await
    }

    /// Waits until the node (or, after `start_app`, the application) has booted;
    /// `await_startup` fails at once while the node has not registered with epmd yet, hence
    /// the loop.
    pub async fn await_startup(&mut self) {
        if let Err(log) = self.boot().await {
            panic!("{log}");
        }
    }

    /// [`RabbitNode::await_startup`], but a server that exits before booting is an `Err` with
    /// its output, for the caller to judge; a node still not up after [`WAIT`] panics.
    async fn boot(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = tokio::time::timeout(
                WAIT,
                self.ctl()
                    .args(["await_startup", "--timeout", "60"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .status(),
            )
            .await;
            if matches!(status, Ok(Ok(s)) if s.success()) {
                return Ok(());
            }
            let log = || std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default();
            if let Ok(Some(exit)) = self.server.try_wait() {
                return Err(format!(
                    "rabbitmq-server exited ({exit}) before booting:\n{}",
                    log()
                ));
            }
            assert!(
                Instant::now() < deadline,
                "RabbitMQ node {} not up after {WAIT:?}:\n{}",
                self.name,
                log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` (plain nodes).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        // rabbitmqctl stop PID_FILE returns once the VM has exited.
        let pid_file = self.dir.join("node.pid");
        let vm_pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        let mut stop = std::process::Command::new(format!("{RABBITMQ_BIN}/rabbitmqctl"));
        stop.env("HOME", self.dir.join("home"))
            .args(["-n", &self.name, "stop"]);
        if vm_pid.is_some() {
            stop.arg(&pid_file);
        }
        if !run_bounded(&mut stop) {
            eprintln!("rabbitmqctl stop of {} failed", self.name);
        }
        // The rabbitmq-server script exits after its VM.
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.server.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if matches!(self.server.try_wait(), Ok(None)) {
            eprintln!("RabbitMQ node {} still running; killing it", self.name);
            if let Some(pid) = vm_pid {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            let _ = self.server.start_kill();
        }
    }
}
