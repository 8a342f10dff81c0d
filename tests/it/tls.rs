//! TLS to PostgreSQL and RabbitMQ, for real: each test starts a throwaway server of its own
//! (PostgreSQL 15 cluster, RabbitMQ node) on random free ports, accepting TLS only, with a
//! certificate from a CA made here by the `openssl` CLI, and connects through upline's own
//! `db::connect_and_migrate` and `amqp::connect`. A second, unrelated CA must be refused.
//! The shared servers on 5432/5672 are never touched. Every server is stopped and its
//! directory removed by a guard, also when a test fails; every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::free_port;
use lapin::options::ConfirmSelectOptions;
use lapin::publisher_confirm::Confirmation;
use rand::Rng;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use upline_common::config::{AmqpSettings, DatabaseSettings};
use upline_common::{amqp, db, Settings};

const OPENSSL: &str = "/usr/bin/openssl";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";
/// How long any one step (a server start, a connection) may take.
const WAIT: Duration = Duration::from_secs(60);

/// A fresh directory under the system temp dir, readable by other users (the `postgres` user
/// must reach the cluster below it), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        use std::os::unix::fs::PermissionsExt;
        let path =
            std::env::temp_dir().join(format!("{prefix}-{:016x}", rand::thread_rng().gen::<u64>()));
        std::fs::create_dir(&path).expect("create the temp dir");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a command to completion within [`WAIT`], panicking with its output when it fails.
async fn run(cmd: &mut Command, what: &str) -> String {
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

/// A CA, a server certificate it signed for `localhost` and `127.0.0.1`, and an unrelated CA.
struct Certs {
    ca: PathBuf,
    wrong_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Certs {
    async fn generate(dir: &Path) -> Certs {
        let p = |name: &str| dir.join(name);
        for (name, cn) in [("ca", "upline test CA"), ("wrong-ca", "unrelated CA")] {
            run(
                Command::new(OPENSSL)
                    .args(["req", "-x509", "-nodes", "-days", "2"])
                    .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
                    .args(["-subj", &format!("/CN={cn}")])
                    .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                    .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                    .arg("-keyout")
                    .arg(p(&format!("{name}.key")))
                    .arg("-out")
                    .arg(p(&format!("{name}.pem"))),
                "openssl: making a CA",
            )
            .await;
        }
        run(
            Command::new(OPENSSL)
                .args(["req", "-new", "-nodes"])
                .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
                .args(["-subj", "/CN=localhost"])
                .arg("-keyout")
                .arg(p("server.key"))
                .arg("-out")
                .arg(p("server.csr")),
            "openssl: server key and request",
        )
        .await;
        std::fs::write(
            p("server.ext"),
            "subjectAltName = DNS:localhost, IP:127.0.0.1\n\
             basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature, keyEncipherment\n\
             extendedKeyUsage = serverAuth\n",
        )
        .expect("write the extensions file");
        run(
            Command::new(OPENSSL)
                .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
                .arg("-in")
                .arg(p("server.csr"))
                .arg("-CA")
                .arg(p("ca.pem"))
                .arg("-CAkey")
                .arg(p("ca.key"))
                .arg("-extfile")
                .arg(p("server.ext"))
                .arg("-out")
                .arg(p("server.pem")),
            "openssl: signing the server certificate",
        )
        .await;
        Certs {
            ca: p("ca.pem"),
            wrong_ca: p("wrong-ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
        }
    }
}

/// A throwaway PostgreSQL 15 cluster accepting only TLS on 127.0.0.1, run as the OS user
/// `postgres`; stopped (`-m immediate`) on drop, before its directory goes.
struct PgCluster {
    data: PathBuf,
    port: u16,
}

impl PgCluster {
    async fn start(dir: &Path, certs: &Certs) -> PgCluster {
        let data = dir.join("data");
        let port = free_port();
        let cluster = PgCluster {
            data: data.clone(),
            port,
        };
        run(
            Command::new("chown").arg("postgres:postgres").arg(dir),
            "chown the cluster dir to postgres",
        )
        .await;
        run(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(format!("{PG_BIN}/initdb"))
                .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
                .args(["--locale=C", "-D"])
                .arg(&data),
            "initdb",
        )
        .await;
        let socket_dir = dir.join("socket");
        std::fs::create_dir(&socket_dir).expect("create the socket dir");
        let cert = data.join("server.crt");
        let key = data.join("server.key");
        std::fs::copy(&certs.server_cert, &cert).expect("copy the server certificate");
        std::fs::copy(&certs.server_key, &key).expect("copy the server key");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 0600 the key");
        }
        let conf = format!(
            "\n# upline TLS test\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nssl = on\nssl_cert_file = '{}'\n\
             ssl_key_file = '{}'\nfsync = off\nmax_connections = 20\n",
            socket_dir.display(),
            cert.display(),
            key.display()
        );
        let mut postgresql_conf =
            std::fs::read_to_string(data.join("postgresql.conf")).expect("read postgresql.conf");
        postgresql_conf.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), postgresql_conf)
            .expect("write postgresql.conf");
        // TLS only: a plain TCP connection matches no line and is refused.
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 trust\n",
        )
        .expect("write pg_hba.conf");
        run(
            Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(dir),
            "chown the cluster's files to postgres",
        )
        .await;
        run(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(format!("{PG_BIN}/pg_ctl"))
                .args(["-w", "-t", "50", "-D"])
                .arg(&data)
                .arg("-l")
                .arg(dir.join("postgres.log"))
                .arg("start"),
            "pg_ctl start",
        )
        .await;
        cluster
    }

    /// Settings for database `upline_tls` on this cluster with the given URL query.
    fn settings(&self, query: &str) -> DatabaseSettings {
        DatabaseSettings {
            url: format!(
                "postgres://postgres@localhost:{}/upline_tls?{query}",
                self.port
            ),
            max_connections: 2,
            acquire_timeout_secs: 5,
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if !self.data.join("postmaster.pid").exists() {
            return; // never started
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
            eprintln!("pg_ctl stop of the TLS test cluster failed");
        }
    }
}

/// `connect_and_migrate`, bounded: a result within [`WAIT`], or a panic saying it hung
/// (retrying an error that retrying cannot fix).
async fn connect_and_migrate(settings: &DatabaseSettings) -> anyhow::Result<sqlx::PgPool> {
    let cancel = CancellationToken::new();
    let result = tokio::time::timeout(WAIT, db::connect_and_migrate(settings, &cancel)).await;
    cancel.cancel();
    result.unwrap_or_else(|_| panic!("connect_and_migrate({}) still retrying", settings.url))
}

#[tokio::test]
async fn postgres_over_tls_verifies_the_server_and_refuses_plain_connections() {
    let started = Instant::now();
    // Declared first so it drops last: the cluster stops before its directory goes.
    let dir = TempDir::new("upline-tls-pg");
    let certs = Certs::generate(dir.path()).await;
    let pg_dir = dir.path().join("pg");
    std::fs::create_dir(&pg_dir).expect("create the cluster dir");
    let cluster = PgCluster::start(&pg_dir, &certs).await;
    eprintln!(
        "PostgreSQL TLS cluster up on 127.0.0.1:{} in {:?}",
        cluster.port,
        started.elapsed()
    );
    let ca = certs.ca.display();

    // (a) verify-full against our CA: the database is created, migrated, and the session is TLS.
    let pool =
        connect_and_migrate(&cluster.settings(&format!("sslmode=verify-full&sslrootcert={ca}")))
            .await
            .expect("verify-full with the right CA connects, creates and migrates the database");
    let (ssl, version): (bool, String) =
        sqlx::query_as("select ssl, version from pg_stat_ssl where pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .expect("pg_stat_ssl");
    assert!(ssl, "the session must be encrypted");
    let migrations: i64 = sqlx::query_scalar("select count(*) from _sqlx_migrations where success")
        .fetch_one(&pool)
        .await
        .expect("the migrations table");
    assert_eq!(
        migrations,
        db::MIGRATOR.iter().count() as i64,
        "every migration applied"
    );
    let users: i64 = sqlx::query_scalar("select count(*) from users")
        .fetch_one(&pool)
        .await
        .expect("the schema is there");
    assert_eq!(users, 0);
    pool.close().await;
    eprintln!("verify-full: {version}, {migrations} migrations applied");

    // Again over an existing database, with verify-ca (no host name check).
    let pool =
        connect_and_migrate(&cluster.settings(&format!("sslmode=verify-ca&sslrootcert={ca}")))
            .await
            .expect("verify-ca with the right CA connects to the existing database");
    pool.close().await;

    // (b) a CA that did not sign the server certificate: refused at once, as a certificate error.
    let wrong = certs.wrong_ca.display();
    for mode in ["verify-full", "verify-ca"] {
        let err =
            connect_and_migrate(&cluster.settings(&format!("sslmode={mode}&sslrootcert={wrong}")))
                .await
                .expect_err("a server certificate from another CA must be refused");
        let message = format!("{err:#}");
        assert!(
            message.contains("invalid peer certificate") && message.contains("UnknownIssuer"),
            "{mode} with the wrong CA should fail verifying the certificate, got: {message}"
        );
        eprintln!("{mode} with the wrong CA: {message}");
    }
    // Nor do the built-in roots alone trust a private CA.
    let err = connect_and_migrate(&cluster.settings("sslmode=verify-full"))
        .await
        .expect_err("a private CA is not among the built-in roots");
    assert!(
        format!("{err:#}").contains("UnknownIssuer"),
        "built-in roots only: {err:#}"
    );

    // sslmode=require encrypts but checks no certificate (sqlx, unlike libpq, ignores
    // sslrootcert there): even the wrong CA gets through.
    let pool =
        connect_and_migrate(&cluster.settings(&format!("sslmode=require&sslrootcert={wrong}")))
            .await
            .expect("sslmode=require does not verify the certificate");
    let ssl: bool = sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("pg_stat_ssl");
    assert!(ssl, "sslmode=require is encrypted");
    pool.close().await;

    // (c) plain TCP is refused by the server (pg_hba.conf has hostssl lines only).
    let err = connect_and_migrate(&cluster.settings("sslmode=disable"))
        .await
        .expect_err("the server refuses unencrypted connections");
    let message = format!("{err:#}");
    assert!(
        message.contains("no pg_hba.conf entry") && message.contains("no encryption"),
        "sslmode=disable should be refused by pg_hba.conf, got: {message}"
    );
    eprintln!("sslmode=disable: {message}");
    eprintln!("PostgreSQL TLS test took {:?}", started.elapsed());
}

/// A throwaway RabbitMQ node (its own name, ports, directories and Erlang cookie) listening
/// only for AMQP over TLS on 127.0.0.1; stopped on drop (`rabbitmqctl stop`, then killed if
/// still there).
struct RabbitNode {
    name: String,
    port: u16,
    /// Holds `home/` (with the node's own Erlang cookie), `mnesia/`, `log/`, the config.
    dir: PathBuf,
    server: tokio::process::Child,
}

impl RabbitNode {
    async fn start(dir: &Path, certs: &Certs) -> RabbitNode {
        let name = format!(
            "upline-tls-{:08x}@localhost",
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
        std::fs::write(
            &cookie,
            format!("{:032X}", rand::thread_rng().gen::<u128>()),
        )
        .expect("write the cookie");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
                .expect("chmod the cookie");
        }
        // No plugins: management's port 15672 belongs to the shared node.
        std::fs::write(dir.join("enabled_plugins"), "").expect("write enabled_plugins");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp = none\n\
                 listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                certs.ca.display(),
                certs.server_cert.display(),
                certs.server_key.display()
            ),
        )
        .expect("write rabbitmq.conf");
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
        let mut node = RabbitNode {
            name,
            port,
            dir: dir.to_owned(),
            server,
        };
        node.await_startup(dir).await;
        node
    }

    fn ctl(&self) -> Command {
        let mut cmd = Command::new(format!("{RABBITMQ_BIN}/rabbitmqctl"));
        cmd.env("HOME", self.dir.join("home"))
            .args(["-n", &self.name]);
        cmd
    }

    /// Waits until the node has booted; `await_startup` fails at once while the node has not
    /// registered with epmd yet, hence the loop.
    async fn await_startup(&mut self, dir: &Path) {
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
                return;
            }
            let log = || std::fs::read_to_string(dir.join("server.out")).unwrap_or_default();
            if let Ok(Some(exit)) = self.server.try_wait() {
                panic!("rabbitmq-server exited ({exit}) before booting:\n{}", log());
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

    fn settings(&self, tls_ca_file: &Path) -> AmqpSettings {
        AmqpSettings {
            url: format!("amqps://guest:guest@localhost:{}/%2f", self.port),
            tls_ca_file: tls_ca_file.display().to_string(),
        }
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

/// Runs a command to completion within [`WAIT`] without an async runtime (for drop guards),
/// killing it when it takes longer; whether it succeeded.
fn run_bounded(cmd: &mut std::process::Command) -> bool {
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

/// `amqp::connect`, bounded by [`WAIT`].
async fn amqp_connect(settings: &AmqpSettings) -> lapin::Result<lapin::Connection> {
    tokio::time::timeout(WAIT, amqp::connect(settings, "upline-tls-test"))
        .await
        .unwrap_or_else(|_| panic!("connecting to {} hung", settings.url))
}

#[tokio::test]
async fn rabbitmq_over_tls_trusts_amqp_tls_ca_file_and_refuses_other_certificates() {
    let started = Instant::now();
    let dir = TempDir::new("upline-tls-rabbit");
    let certs = Certs::generate(dir.path()).await;
    let node_dir = dir.path().join("node");
    std::fs::create_dir(&node_dir).expect("create the node dir");
    let node = RabbitNode::start(&node_dir, &certs).await;
    eprintln!(
        "RabbitMQ TLS node {} up on 127.0.0.1:{} in {:?}",
        node.name,
        node.port,
        started.elapsed()
    );

    // amqps:// with amqp.tls_ca_file = our CA: connect, declare the topology, publish with a
    // confirm.
    let settings = node.settings(&certs.ca);
    let conn = amqp_connect(&settings)
        .await
        .expect("amqps:// with the right CA connects");
    let channel = conn.create_channel().await.expect("a channel");
    amqp::declare_topology(&channel)
        .await
        .expect("the topology is declared over TLS");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let confirmation = amqp::publish_purchase(&channel, br#"{"tls":true}"#)
        .await
        .expect("publish")
        .await
        .expect("the broker answers");
    assert!(
        matches!(confirmation, Confirmation::Ack(_)),
        "the broker confirms the message: {confirmation:?}"
    );
    conn.close(200, "done").await.expect("close");

    // The wrong CA, and the built-in roots alone, are refused as certificate errors.
    for (what, ca) in [
        ("the wrong CA", certs.wrong_ca.display().to_string()),
        ("the built-in roots only", String::new()),
    ] {
        let settings = AmqpSettings {
            tls_ca_file: ca,
            ..settings.clone()
        };
        let err = amqp_connect(&settings)
            .await
            .expect_err("a certificate from an untrusted CA must be refused");
        let message = err.to_string();
        assert!(
            message.contains("invalid peer certificate") && message.contains("UnknownIssuer"),
            "{what}: expected a certificate error, got: {message}"
        );
        eprintln!("{what}: {message}");
    }

    // Plain AMQP to the TLS port does not get through either.
    let plain = AmqpSettings {
        url: format!("amqp://guest:guest@localhost:{}/%2f", node.port),
        tls_ca_file: String::new(),
    };
    assert!(
        amqp_connect(&plain).await.is_err(),
        "plain amqp:// to a TLS listener"
    );
    eprintln!("RabbitMQ TLS test took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_bad_amqp_tls_ca_file_is_a_start_up_error_naming_the_setting() {
    let dir = TempDir::new("upline-tls-ca");
    let missing = dir.path().join("missing.pem");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "just text\n").expect("write a non-PEM file");
    for (path, expected) in [
        (&missing, "cannot read"),
        (&not_pem, "holds no PEM certificate"),
    ] {
        let mut settings = Settings::load_with_overrides(
            Path::new("/nonexistent/upline.toml"),
            &[("app.environment", "development")],
        )
        .expect("defaults load");
        settings.amqp.url = "amqps://guest:guest@localhost:5671/%2f".into();
        settings.amqp.tls_ca_file = path.display().to_string();
        let err = settings
            .validate()
            .expect_err("validation checks the CA file");
        let message = format!("{err:#}");
        assert!(
            message.contains("amqp.tls_ca_file") && message.contains(expected),
            "{message}"
        );
        // connect says the same, before any network traffic.
        let err = amqp::connect(&settings.amqp, "upline-tls-test")
            .await
            .expect_err("connect checks the CA file");
        assert!(err.to_string().contains("amqp.tls_ca_file"), "{err}");
    }
}
