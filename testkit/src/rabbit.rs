//! A client of the RabbitMQ management API: creating and deleting vhosts, so that tests and
//! benchmarks run isolated from each other and from a running pipeline, and listing and
//! closing client connections, as a broker restart would. When the management API does not
//! answer (the plugin is not enabled), the same is done with `rabbitmqctl` (slower, but
//! always there next to the server).

use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::json;

use crate::local;

/// The management API at `base`, as `user` (an administrator).
#[derive(Debug, Clone)]
pub struct RabbitAdmin {
    http: reqwest::Client,
    base: String,
    user: String,
    password: String,
}

/// A client connection as the management API lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct BrokerConnection {
    /// The broker's name of the connection (`127.0.0.1:50632 -> 127.0.0.1:5672`), its key in
    /// `DELETE /api/connections/{name}`.
    pub name: String,
    /// What the client said about itself, `connection_name` among it.
    #[serde(default)]
    pub client_properties: ClientProperties,
}

/// The part of a connection's client properties the kit reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ClientProperties {
    /// The name the client gave (upline's services: `upline-api`, `upline-worker`, …).
    pub connection_name: Option<String>,
}

impl RabbitAdmin {
    /// A client of the management API at `base` (`http://host:15672`), as `user`.
    pub fn new(base: &str, user: &str, password: &str) -> Self {
        RabbitAdmin {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("a reqwest client builds"),
            base: base.trim_end_matches('/').to_owned(),
            user: user.to_owned(),
            password: password.to_owned(),
        }
    }

    /// The management API of this machine ([`local::RABBIT_MANAGEMENT`], guest/guest).
    pub fn local() -> Self {
        Self::new(
            local::RABBIT_MANAGEMENT,
            local::RABBIT_ADMIN_USER,
            local::RABBIT_ADMIN_PASSWORD,
        )
    }

    /// Its base URL, e.g. `http://127.0.0.1:15672`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The administrator's user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The administrator's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// `GET|PUT|DELETE {base}/api/{path}` as the administrator.
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}/api/{path}", self.base))
            .basic_auth(&self.user, Some(&self.password))
    }

    /// Creates `vhost` with full permissions for the administrator.
    ///
    /// # Errors
    /// Neither the management API nor `rabbitmqctl` could do it.
    pub async fn create_vhost(&self, vhost: &str) -> anyhow::Result<()> {
        let created = self
            .request(reqwest::Method::PUT, &format!("vhosts/{vhost}"))
            .send()
            .await;
        if matches!(&created, Ok(r) if r.status().is_success()) {
            let r = self
                .request(
                    reqwest::Method::PUT,
                    &format!("permissions/{vhost}/{}", self.user),
                )
                .json(&json!({"configure": ".*", "write": ".*", "read": ".*"}))
                .send()
                .await
                .context("setting vhost permissions")?;
            if !r.status().is_success() {
                bail!("setting permissions on vhost {vhost}: {}", r.status());
            }
            return Ok(());
        }
        rabbitmqctl(&["add_vhost", vhost]).await?;
        rabbitmqctl(&["set_permissions", "-p", vhost, &self.user, ".*", ".*", ".*"]).await?;
        Ok(())
    }

    /// Deletes `vhost` and everything in it; errors are ignored (best effort at clean-up).
    pub async fn delete_vhost(&self, vhost: &str) {
        let deleted = self
            .request(reqwest::Method::DELETE, &format!("vhosts/{vhost}"))
            .send()
            .await;
        if !matches!(&deleted, Ok(r) if r.status().is_success()) {
            let _ = rabbitmqctl(&["delete_vhost", vhost]).await;
        }
    }

    /// The client connections to `vhost` (the management API shows them a few seconds late;
    /// without it, `rabbitmqctl list_connections` at once).
    ///
    /// # Errors
    /// The management API answers an error, or it is unreachable and `rabbitmqctl` fails.
    pub async fn connections(&self, vhost: &str) -> anyhow::Result<Vec<BrokerConnection>> {
        let listed = self
            .request(
                reqwest::Method::GET,
                &format!("vhosts/{}/connections", encode(vhost)),
            )
            .send()
            .await;
        let Ok(r) = listed else {
            return ctl_connections(vhost).await;
        };
        Ok(r.error_for_status()?.json().await?)
    }

    /// Closes a connection from the broker's side; one already gone (404) counts as closed.
    ///
    /// # Errors
    /// The management API is unreachable or answers another error.
    pub async fn close_connection(&self, name: &str) -> anyhow::Result<()> {
        let closed = self
            .request(
                reqwest::Method::DELETE,
                &format!("connections/{}", encode(name)),
            )
            .send()
            .await;
        let Ok(r) = closed else {
            rabbitmqctl(&["close_connection", name, "closed by the upline test kit"]).await?;
            return Ok(());
        };
        if !(r.status().is_success() || r.status() == 404) {
            bail!("closing connection {name}: {}", r.status());
        }
        Ok(())
    }

    /// Whether exchange `name` exists in `vhost`.
    ///
    /// # Errors
    /// The management API is unreachable or answers neither 200 nor 404.
    pub async fn exchange_exists(&self, vhost: &str, name: &str) -> anyhow::Result<bool> {
        self.exists("exchanges", vhost, name).await
    }

    /// Whether queue `name` exists in `vhost`.
    ///
    /// # Errors
    /// The management API is unreachable or answers neither 200 nor 404.
    pub async fn queue_exists(&self, vhost: &str, name: &str) -> anyhow::Result<bool> {
        self.exists("queues", vhost, name).await
    }

    async fn exists(&self, kind: &str, vhost: &str, name: &str) -> anyhow::Result<bool> {
        let r = self
            .request(
                reqwest::Method::GET,
                &format!("{kind}/{}/{}", encode(vhost), encode(name)),
            )
            .send()
            .await
            .context("management API answers")?;
        match r.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            other => bail!("management API: {other}"),
        }
    }
}

/// Runs `rabbitmqctl <args>`; its standard output.
async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .context("running rabbitmqctl")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The connections to `vhost` from `rabbitmqctl list_connections`, whose JSON lists client
/// properties as `[key, type, value]` triples.
async fn ctl_connections(vhost: &str) -> anyhow::Result<Vec<BrokerConnection>> {
    #[derive(Deserialize)]
    struct Listed {
        name: String,
        client_properties: Vec<(String, String, serde_json::Value)>,
    }
    let out = rabbitmqctl(&[
        "list_connections",
        "-p",
        vhost,
        "name",
        "client_properties",
        "--formatter",
        "json",
    ])
    .await?;
    let listed: Vec<Listed> =
        serde_json::from_str(&out).context("reading rabbitmqctl list_connections")?;
    Ok(listed
        .into_iter()
        .map(|c| BrokerConnection {
            client_properties: ClientProperties {
                connection_name: c
                    .client_properties
                    .iter()
                    .find(|(key, _, _)| key == "connection_name")
                    .and_then(|(_, _, value)| value.as_str().map(str::to_owned)),
            },
            name: c.name,
        })
        .collect())
}

/// A path segment, percent-encoded (`/` and spaces included).
fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// The AMQP URL of `vhost` on the server of `base` (an `amqp://` URL, with or without a
/// vhost of its own), or on each node of a comma-separated list of them (a cluster).
pub fn vhost_url(base: &str, vhost: &str) -> String {
    base.split(',')
        .map(|node| {
            let node = node.trim();
            match node.rfind('/') {
                Some(i) if i > "amqp://".len() => format!("{}/{vhost}", &node[..i]),
                _ => format!("{node}/{vhost}"),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::vhost_url;

    #[test]
    fn vhost_url_replaces_the_vhost_or_appends_one() {
        assert_eq!(
            vhost_url("amqp://guest:guest@127.0.0.1:5672/%2f", "sandbox_1"),
            "amqp://guest:guest@127.0.0.1:5672/sandbox_1"
        );
        assert_eq!(
            vhost_url("amqp://127.0.0.1:5672", "sandbox_1"),
            "amqp://127.0.0.1:5672/sandbox_1"
        );
        assert_eq!(vhost_url("amqps://broker", "v"), "amqps://broker/v");
        assert_eq!(
            vhost_url("amqp://h1:5681/%2f,amqp://h2:5682/%2f", "v"),
            "amqp://h1:5681/v,amqp://h2:5682/v"
        );
    }
}
