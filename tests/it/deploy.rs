//! The deployment files users copy (`docker-compose.yml`, `docker-compose.ha.yml`,
//! `.env.example`, `deploy/`), checked with what runs here, where there is no Docker engine:
//! every variable compose requires (no default) is in `.env.example`, every file mounted from `deploy/`
//! exists, and in the HA file every service lists the three RabbitMQ nodes and both PostgreSQL
//! servers. (docs/operations.md says how the files were checked beyond this.)

use std::collections::BTreeSet;
use std::path::Path;

fn read(path: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The names of the `${NAME…}` interpolations in a compose file that have no default
/// (`${NAME:-default}` has one).
fn required_variables(compose: &str) -> BTreeSet<String> {
    compose
        .split("${")
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!rest[name.len()..].starts_with(":-")).then_some(name)
        })
        .collect()
}

#[test]
fn every_variable_the_compose_files_require_is_in_env_example_and_every_mounted_file_exists() {
    let example = read(".env.example");
    let defined: BTreeSet<&str> = example
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
        .collect();
    for file in ["docker-compose.yml", "docker-compose.ha.yml"] {
        let compose = read(file);
        for name in required_variables(&compose) {
            assert!(
                defined.contains(name.as_str()),
                "{file} uses ${{{name}}}, which .env.example does not list"
            );
        }
        for mount in compose.split("./deploy/").skip(1) {
            let name: String = mount
                .chars()
                .take_while(|c| !matches!(c, ':' | '"' | ' ' | '\n'))
                .collect();
            let path = format!("deploy/{name}");
            assert!(
                Path::new(env!("CARGO_MANIFEST_DIR")).join(&path).is_file(),
                "{file} mounts ./{path}, which does not exist"
            );
        }
    }
}

#[test]
fn in_the_ha_file_every_service_lists_the_three_nodes_and_both_servers() {
    let compose = read("docker-compose.ha.yml");
    let amqp: Vec<&str> = compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("AMQP_URL: "))
        .collect();
    assert_eq!(amqp.len(), 4, "api, worker, notifier and webhooks");
    for url in amqp {
        let nodes: Vec<&str> = url.split(',').collect();
        assert_eq!(nodes.len(), 3, "{url}");
        for (node, host) in nodes
            .iter()
            .zip(["@rabbitmq:", "@rabbitmq-2:", "@rabbitmq-3:"])
        {
            assert!(node.contains(host), "{url}");
        }
    }
    assert!(compose
        .contains("@postgres:5432,postgres-standby:5432/upline?target_session_attrs=read-write"));
    assert_eq!(compose.matches("DATABASE_URL: *database-url").count(), 4);
    let cluster = read("deploy/rabbitmq-cluster.conf");
    for node in [
        "rabbit@rabbitmq\n",
        "rabbit@rabbitmq-2\n",
        "rabbit@rabbitmq-3\n",
    ] {
        assert!(cluster.contains(node), "{node}");
    }
}
