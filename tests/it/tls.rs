//! TLS to PostgreSQL and RabbitMQ, for real: each test starts a throwaway server of its own
//! (PostgreSQL 15 cluster, RabbitMQ node) on random free ports, accepting TLS only, with a
//! certificate from a CA made here by the `openssl` CLI, and connects through upline's own
//! `db::connect_and_migrate` and `amqp::connect`. A second, unrelated CA must be refused.
//! The shared servers on 5432/5672 are never touched. Every server is stopped and its
//! directory removed by a guard, also when a test fails; every wait is bounded.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::servers::{run, PgCluster, RabbitNode, ServerTls, TempDir, WAIT};
use lapin::options::ConfirmSelectOptions;
use lapin::publisher_confirm::Confirmation;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use upline_common::config::{AmqpSettings, DatabaseSettings};
use upline_common::{amqp, db, Settings};

const OPENSSL: &str = "/usr/bin/openssl";

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

impl Certs {
    /// What a TLS-only test server needs.
    fn server_tls(&self) -> ServerTls {
        ServerTls {
            ca: self.ca.clone(),
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
        }
    }
}

/// Settings for database `upline_tls` on the TLS cluster with the given URL query.
fn pg_settings(cluster: &PgCluster, query: &str) -> DatabaseSettings {
    DatabaseSettings {
        url: cluster.url("upline_tls", query),
        max_connections: 2,
        acquire_timeout_secs: 5,
        standby_reads: false,
        standby_max_lag_secs: 5,
    }
}

/// Settings for the TLS node, trusting `tls_ca_file`.
fn rabbit_settings(node: &RabbitNode, tls_ca_file: &Path) -> AmqpSettings {
    AmqpSettings {
        url: format!("amqps://guest:guest@localhost:{}/%2f", node.port),
        tls_ca_file: tls_ca_file.display().to_string(),
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
    let cluster = PgCluster::start(&pg_dir, Some(&certs.server_tls())).await;
    eprintln!(
        "PostgreSQL TLS cluster up on 127.0.0.1:{} in {:?}",
        cluster.port,
        started.elapsed()
    );
    let ca = certs.ca.display();

    // (a) verify-full against our CA: the database is created, migrated, and the session is TLS.
    let pool = connect_and_migrate(&pg_settings(
        &cluster,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
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
    let pool = connect_and_migrate(&pg_settings(
        &cluster,
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    ))
    .await
    .expect("verify-ca with the right CA connects to the existing database");
    pool.close().await;

    // (b) a CA that did not sign the server certificate: refused at once, as a certificate error.
    let wrong = certs.wrong_ca.display();
    for mode in ["verify-full", "verify-ca"] {
        let err = connect_and_migrate(&pg_settings(
            &cluster,
            &format!("sslmode={mode}&sslrootcert={wrong}"),
        ))
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
    let err = connect_and_migrate(&pg_settings(&cluster, "sslmode=verify-full"))
        .await
        .expect_err("a private CA is not among the built-in roots");
    assert!(
        format!("{err:#}").contains("UnknownIssuer"),
        "built-in roots only: {err:#}"
    );

    // sslmode=require encrypts but checks no certificate (sqlx, unlike libpq, ignores
    // sslrootcert there): even the wrong CA gets through.
    let pool = connect_and_migrate(&pg_settings(
        &cluster,
        &format!("sslmode=require&sslrootcert={wrong}"),
    ))
    .await
    .expect("sslmode=require does not verify the certificate");
    let ssl: bool = sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("pg_stat_ssl");
    assert!(ssl, "sslmode=require is encrypted");
    pool.close().await;

    // (c) plain TCP is refused by the server (pg_hba.conf has hostssl lines only).
    let err = connect_and_migrate(&pg_settings(&cluster, "sslmode=disable"))
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
    let node = RabbitNode::start(&node_dir, Some(&certs.server_tls())).await;
    eprintln!(
        "RabbitMQ TLS node {} up on 127.0.0.1:{} in {:?}",
        node.name,
        node.port,
        started.elapsed()
    );

    // amqps:// with amqp.tls_ca_file = our CA: connect, declare the topology, publish with a
    // confirm.
    let settings = rabbit_settings(&node, &certs.ca);
    let conn = amqp_connect(&settings)
        .await
        .expect("amqps:// with the right CA connects");
    amqp::declare_topology(&conn)
        .await
        .expect("the topology is declared over TLS");
    let channel = conn.create_channel().await.expect("a channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let confirmation = amqp::publish_raw(&channel, br#"{"tls":true}"#)
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
