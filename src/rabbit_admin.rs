//! Creating and deleting RabbitMQ vhosts, so that tests and benchmarks run isolated from each
//! other and from a running pipeline: through the management API when the plugin is enabled,
//! else with `rabbitmqctl` (slower, but always there next to the server).

use anyhow::{bail, Context};
use serde_json::json;

/// The management API on this machine.
pub const MANAGEMENT: &str = "http://127.0.0.1:15672";

/// Creates `vhost` with full permissions for `guest`.
///
/// # Errors
/// Neither the management API nor `rabbitmqctl` could do it.
pub async fn create_vhost(http: &reqwest::Client, vhost: &str) -> anyhow::Result<()> {
    let created = http
        .put(format!("{MANAGEMENT}/api/vhosts/{vhost}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await;
    if matches!(&created, Ok(r) if r.status().is_success()) {
        let r = http
            .put(format!("{MANAGEMENT}/api/permissions/{vhost}/guest"))
            .basic_auth("guest", Some("guest"))
            .json(&json!({"configure": ".*", "write": ".*", "read": ".*"}))
            .send()
            .await
            .context("setting vhost permissions")?;
        if !r.status().is_success() {
            bail!("setting permissions on vhost {vhost}: {}", r.status());
        }
        return Ok(());
    }
    for args in [
        vec!["add_vhost", vhost],
        vec!["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
    ] {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args(&args)
            .output()
            .await
            .context("running rabbitmqctl")?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// Deletes `vhost` and everything in it; errors are ignored (best effort at clean-up).
pub async fn delete_vhost(http: &reqwest::Client, vhost: &str) {
    let deleted = http
        .delete(format!("{MANAGEMENT}/api/vhosts/{vhost}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await;
    if !matches!(&deleted, Ok(r) if r.status().is_success()) {
        let _ = tokio::process::Command::new("rabbitmqctl")
            .args(["delete_vhost", vhost])
            .output()
            .await;
    }
}

/// The AMQP URL of `vhost` on the server of `base` (an `amqp://` URL).
pub fn vhost_url(base: &str, vhost: &str) -> String {
    match base.rfind('/') {
        Some(i) if i > "amqp://".len() => format!("{}/{vhost}", &base[..i]),
        _ => format!("{base}/{vhost}"),
    }
}
